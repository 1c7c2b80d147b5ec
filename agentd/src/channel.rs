//! The agent channel: one WebSocket per agent, authenticated with the agent's own secret.
//!
//! The registry knows which agents are connected (the manager asks it through
//! [`agent_manager::AgentChannel`]), relays messages posted to the API, and keeps the last
//! messages each agent sent.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::Serialize;
use time::OffsetDateTime;
use tokio::sync::mpsc;

/// How many messages per agent the transcript keeps.
const TRANSCRIPT_LEN: usize = 200;
/// How many outgoing messages may wait for a slow agent.
const OUTBOX: usize = 256;

/// One message on an agent's channel.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TranscriptEntry {
    /// `to_agent` or `from_agent`.
    pub direction: &'static str,
    pub text: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

#[derive(Debug)]
struct Connection {
    id: u64,
    outbox: mpsc::Sender<String>,
}

/// Connected agents and their transcripts.
#[derive(Debug, Default)]
pub struct ChannelRegistry {
    connections: Mutex<HashMap<String, Connection>>,
    transcripts: Mutex<HashMap<String, VecDeque<TranscriptEntry>>>,
    next_id: AtomicU64,
}

/// Why a message could not be delivered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("agent {0} is not connected to the agent channel")]
    NotConnected(String),
    #[error("agent {0} is not reading its messages (its outbox is full)")]
    Full(String),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ChannelRegistry {
    /// Registers a new connection of `agent_id`, replacing (and so closing) an older one.
    /// Returns the connection id and the receiving end of its outbox.
    pub fn register(&self, agent_id: &str) -> (u64, mpsc::Receiver<String>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (outbox, rx) = mpsc::channel(OUTBOX);
        lock(&self.connections).insert(agent_id.to_owned(), Connection { id, outbox });
        (id, rx)
    }

    /// Removes a connection if it is still the current one. Returns whether it was.
    pub fn unregister(&self, agent_id: &str, id: u64) -> bool {
        let mut connections = lock(&self.connections);
        if connections.get(agent_id).is_some_and(|c| c.id == id) {
            connections.remove(agent_id);
            true
        } else {
            false
        }
    }

    /// Queues `text` for the agent.
    pub fn send(&self, agent_id: &str, text: String) -> Result<(), SendError> {
        let outbox = lock(&self.connections)
            .get(agent_id)
            .map(|c| c.outbox.clone())
            .ok_or_else(|| SendError::NotConnected(agent_id.to_owned()))?;
        outbox.try_send(text.clone()).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SendError::Full(agent_id.to_owned()),
            mpsc::error::TrySendError::Closed(_) => SendError::NotConnected(agent_id.to_owned()),
        })?;
        self.record(agent_id, "to_agent", text);
        Ok(())
    }

    /// Keeps a message in the agent's transcript.
    pub fn record(&self, agent_id: &str, direction: &'static str, text: String) {
        let mut transcripts = lock(&self.transcripts);
        let log = transcripts.entry(agent_id.to_owned()).or_default();
        if log.len() == TRANSCRIPT_LEN {
            log.pop_front();
        }
        log.push_back(TranscriptEntry { direction, text, at: OffsetDateTime::now_utc() });
    }

    /// The agent's last messages, oldest first.
    pub fn transcript(&self, agent_id: &str) -> Vec<TranscriptEntry> {
        lock(&self.transcripts).get(agent_id).map(|l| l.iter().cloned().collect()).unwrap_or_default()
    }

    /// Forgets a removed agent.
    pub fn forget(&self, agent_id: &str) {
        lock(&self.connections).remove(agent_id);
        lock(&self.transcripts).remove(agent_id);
    }

    /// How many agents are connected.
    pub fn connected_count(&self) -> usize {
        lock(&self.connections).len()
    }
}

impl agent_manager::AgentChannel for ChannelRegistry {
    fn is_connected(&self, agent_id: &str) -> bool {
        lock(&self.connections).get(agent_id).is_some_and(|c| !c.outbox.is_closed())
    }
}

/// A user message in Claude Code's stream-json input format.
pub fn user_message(text: &str) -> String {
    serde_json::json!({
        "type": "user",
        "message": {"role": "user", "content": text},
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use agent_manager::AgentChannel;

    use super::*;

    #[test]
    fn a_newer_connection_replaces_the_older_one() {
        let registry = ChannelRegistry::default();
        let (first, _rx1) = registry.register("a");
        let (second, mut rx2) = registry.register("a");
        assert!(!registry.unregister("a", first), "the old connection is no longer current");
        assert!(registry.is_connected("a"));
        registry.send("a", "hi".into()).expect("send");
        assert_eq!(rx2.try_recv().ok().as_deref(), Some("hi"));
        assert!(registry.unregister("a", second));
        assert_eq!(registry.send("a", "x".into()), Err(SendError::NotConnected("a".into())));
    }

    #[test]
    fn transcripts_are_bounded() {
        let registry = ChannelRegistry::default();
        for i in 0..(TRANSCRIPT_LEN + 5) {
            registry.record("a", "from_agent", i.to_string());
        }
        let t = registry.transcript("a");
        assert_eq!(t.len(), TRANSCRIPT_LEN);
        assert_eq!(t[0].text, "5");
    }
}
