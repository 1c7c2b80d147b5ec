//! Caller identity by peer address: which live agent a connection to one of the daemon's
//! gateway listeners comes from.
//!
//! The backend names each running session's addresses
//! ([`backend_core::ExecutionBackend::session_addresses`]); a container's address does not
//! change while it runs, so they are cached per container. An entry counts only while its
//! agent is `running` with that same container (read from the store's memory on every
//! lookup), so a container that ended or was replaced is never taken for its agent. An
//! address nobody has is looked up again at most once a second (per address), by asking
//! the engine about the running agents whose current container it has not asked about
//! yet. An address two live agents claim (one of them stale) names neither. Host-network
//! agents have no address of their own: they are never found.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use backend_core::ExecutionBackend;
use futures_util::stream::{self, StreamExt};
use tracing::debug;

use crate::manager::lock;
use crate::model::{Agent, AgentStatus};
use crate::Store;

/// How often an unknown address may make the engine be asked again.
pub const MISS_RETRY: Duration = Duration::from_secs(1);

/// How many engine questions one refresh asks at once.
const CONCURRENCY: usize = 16;

/// How long one engine question may take.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// The most unknown addresses remembered (for [`MISS_RETRY`]).
const MAX_MISSES: usize = 4096;

#[derive(Debug, Default)]
struct State {
    /// Address → (agent id, container id).
    by_ip: HashMap<IpAddr, (String, String)>,
    /// Agent id → the container whose addresses are in `by_ip`.
    asked: HashMap<String, String>,
    /// Unknown addresses, with when the engine was last asked on their behalf.
    misses: HashMap<IpAddr, Instant>,
}

impl State {
    fn forget_agent(&mut self, id: &str) {
        self.asked.remove(id);
        self.by_ip.retain(|_, (agent, _)| agent != id);
    }

    /// The agent `ip` names, if it is still running with the cached container.
    fn current(&mut self, ip: IpAddr, store: &Store) -> Option<Agent> {
        let (id, container) = self.by_ip.get(&ip)?.clone();
        match store.cached_agent(&id) {
            Some(agent) if agent.status == AgentStatus::Running && agent.container_id.as_deref() == Some(&container) => {
                Some(agent)
            }
            _ => {
                self.forget_agent(&id);
                None
            }
        }
    }
}

/// The cache behind [`crate::AgentManager::agent_for_peer`].
#[derive(Debug, Default)]
pub(crate) struct PeerCache {
    state: Mutex<State>,
    /// One refresh at a time: a burst of unknown callers asks the engine once.
    refresh: tokio::sync::Mutex<()>,
}

impl PeerCache {
    pub(crate) async fn lookup<B: ExecutionBackend + ?Sized>(&self, ip: IpAddr, store: &Store, backend: &B) -> Option<Agent> {
        {
            let mut state = lock(&self.state);
            if let Some(agent) = state.current(ip, store) {
                return Some(agent);
            }
            let now = Instant::now();
            if state.misses.get(&ip).is_some_and(|at| now.duration_since(*at) < MISS_RETRY) {
                return None;
            }
            if state.misses.len() >= MAX_MISSES {
                state.misses.retain(|_, at| now.duration_since(*at) < MISS_RETRY);
            }
            if state.misses.len() >= MAX_MISSES {
                return None;
            }
            state.misses.insert(ip, now);
        }
        let _refresh = self.refresh.lock().await;
        // Another refresh may have found it meanwhile.
        if let Some(agent) = lock(&self.state).current(ip, store) {
            return Some(agent);
        }
        let running = store.list_agents_versioned(Some(AgentStatus::Running));
        let to_ask: Vec<(String, String, String)> = {
            let mut state = lock(&self.state);
            let live: HashMap<&str, &str> = running
                .iter()
                .filter_map(|(a, _)| a.container_id.as_deref().map(|c| (a.id.as_str(), c)))
                .collect();
            let stale: Vec<String> = state
                .asked
                .iter()
                .filter(|(id, container)| live.get(id.as_str()) != Some(&container.as_str()))
                .map(|(id, _)| id.clone())
                .collect();
            for id in stale {
                state.forget_agent(&id);
            }
            live.iter()
                .filter(|(id, _)| !state.asked.contains_key(**id))
                .filter_map(|(id, container)| {
                    let agent = running.iter().find(|(a, _)| a.id == *id)?;
                    Some((id.to_string(), container.to_string(), agent.0.session.clone()))
                })
                .collect()
        };
        let answers: Vec<_> = stream::iter(to_ask)
            .map(|(id, container, session)| async move {
                let answer = tokio::time::timeout(ASK_TIMEOUT, backend.session_addresses(&session)).await;
                (id, container, session, answer)
            })
            .buffer_unordered(CONCURRENCY)
            .collect()
            .await;
        let mut state = lock(&self.state);
        for (id, container, session, answer) in answers {
            let addresses = match answer {
                Ok(Ok(addresses)) => addresses,
                Ok(Err(e)) => {
                    debug!(agent_id = %id, session = %session, error = %e, "Cannot tell the agent's addresses.");
                    continue;
                }
                Err(_) => {
                    debug!(agent_id = %id, session = %session, "The engine did not tell the agent's addresses in time.");
                    continue;
                }
            };
            state.asked.insert(id.clone(), container.clone());
            for address in addresses {
                match state.by_ip.get(&address) {
                    Some((other, _)) if *other != id => {
                        // Two live agents claim it: one record is stale. Neither is
                        // named until both are asked again.
                        let other = other.clone();
                        debug!(address = %address, agent_id = %id, other = %other, "Two agents claim one address.");
                        state.forget_agent(&other);
                        state.asked.remove(&id);
                        state.by_ip.remove(&address);
                    }
                    _ => {
                        state.by_ip.insert(address, (id.clone(), container.clone()));
                    }
                }
            }
        }
        let found = state.current(ip, store);
        if found.is_some() {
            state.misses.remove(&ip);
        }
        found
    }
}
