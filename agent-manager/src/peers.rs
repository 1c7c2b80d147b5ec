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

use backend_core::{ExecutionBackend, NetworkPolicy};
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
    /// Agent id → (container, session) of a run being started: its container runs (and
    /// may connect) before the agent's record names it.
    starting: HashMap<String, (String, String)>,
}

impl State {
    fn forget_agent(&mut self, id: &str) {
        self.asked.remove(id);
        self.by_ip.retain(|_, (agent, _)| agent != id);
    }

    /// The agent `ip` names, if it is still running (or being started) with the cached
    /// container.
    fn current(&mut self, ip: IpAddr, store: &Store) -> Option<Agent> {
        let (id, container) = self.by_ip.get(&ip)?.clone();
        let starting = self.starting.get(&id).is_some_and(|(c, _)| *c == container);
        match store.cached_agent(&id) {
            Some(agent)
                if starting
                    || (agent.status == AgentStatus::Running && agent.container_id.as_deref() == Some(&container)) =>
            {
                Some(agent)
            }
            _ => {
                self.forget_agent(&id);
                None
            }
        }
    }
}

/// A run being started, from [`PeerCache::starting`]; forgotten when dropped, also when
/// the start is abandoned half-way.
#[derive(Debug)]
pub(crate) struct Starting<'a> {
    cache: &'a PeerCache,
    agent_id: String,
}

impl Drop for Starting<'_> {
    fn drop(&mut self) {
        lock(&self.cache.state).starting.remove(&self.agent_id);
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
    /// The agent's new container runs from now on, before its record names it, until the
    /// guard is dropped (the record names it then, or the start failed).
    pub(crate) fn starting<'a>(&'a self, agent_id: &str, container: &str, session: &str) -> Starting<'a> {
        lock(&self.state).starting.insert(agent_id.to_owned(), (container.to_owned(), session.to_owned()));
        Starting { cache: self, agent_id: agent_id.to_owned() }
    }

    pub(crate) async fn lookup<B: ExecutionBackend + ?Sized>(
        &self,
        ip: IpAddr,
        store: &Store,
        backend: &B,
    ) -> Option<Agent> {
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
            // Agent id → (container, session) of every live run with an address of its
            // own: the records' (host and none networks have none), then the runs being
            // started, which are newer.
            let mut live: HashMap<String, (String, String)> = running
                .iter()
                .filter(|(a, _)| !matches!(a.spec.network, NetworkPolicy::Host | NetworkPolicy::None))
                .filter_map(|(a, _)| a.container_id.clone().map(|c| (a.id.clone(), (c, a.session.clone()))))
                .collect();
            live.extend(state.starting.iter().map(|(id, run)| (id.clone(), run.clone())));
            let stale: Vec<String> = state
                .asked
                .iter()
                .filter(|(id, container)| live.get(id.as_str()).is_none_or(|(c, _)| c != *container))
                .map(|(id, _)| id.clone())
                .collect();
            for id in stale {
                state.forget_agent(&id);
            }
            live.into_iter()
                .filter(|(id, _)| !state.asked.contains_key(id))
                .map(|(id, (container, session))| (id, container, session))
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
            if addresses.is_empty() {
                // Not running yet, or ended: asked again by the next refresh.
                continue;
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Desired, NewAgent};
    use backend_core::{OwnershipLabels, SessionHealth, SessionSpec};
    use backend_mock::{MockBackend, MockEngine, PLAIN_IMAGE};

    /// A run's container connects before its agent's record names it (between the
    /// engine's start and the `running` transition): it is its agent already, and no
    /// longer once the start is over without the record naming it.
    #[tokio::test]
    async fn a_run_being_started_is_its_agent_before_its_record_says_so() {
        let store = Store::in_memory().await.expect("store");
        let engine = MockEngine::new();
        let backend = MockBackend::new(engine.clone(), OwnershipLabels::new("agentd", "peers").expect("labels"));
        let defaults = crate::AgentDefaults { image: PLAIN_IMAGE.into(), ..Default::default() };
        let spec = defaults
            .resolve(NewAgent { name: "early".into(), kind: Some(crate::AgentKind::Image), ..NewAgent::default() })
            .expect("spec");
        let now = time::OffsetDateTime::now_utc().replace_millisecond(0).expect("ms");
        let agent = Agent {
            id: "early-id".into(),
            name: "early".into(),
            status: AgentStatus::Pending,
            desired: Desired::Running,
            health: SessionHealth::Unknown,
            session: "agentd-early".into(),
            container_id: None,
            spec,
            restarts: 0,
            crash_streak: 0,
            next_restart_at: None,
            reason: None,
            created_at: now,
            updated_at: now,
        };
        store.insert_agent(&agent).await.expect("insert");
        let container = backend.create_session(&SessionSpec::new(&agent.session, &agent.id, PLAIN_IMAGE)).await;
        let container = container.expect("create");
        backend.start_session(&agent.session).await.expect("start");
        let ip = engine.session_address(&agent.session).expect("address");

        let cache = PeerCache::default();
        let starting = cache.starting(&agent.id, &container, &agent.session);
        assert_eq!(cache.lookup(ip, &store, &backend).await.map(|a| a.id), Some(agent.id.clone()));
        drop(starting);
        assert!(cache.lookup(ip, &store, &backend).await.is_none(), "a start that never recorded its run");
    }
}
