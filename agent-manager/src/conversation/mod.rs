//! Agents' conversations: every line between agentd and a stream-json agent, stored in
//! order, and the state of each agent's session.
//!
//! One task per live stream-json agent ([`task`]) holds the attach to its container. It
//! sends the `initialize` handshake once per container, writes the user messages and
//! control responses queued for the agent, and reads every line the agent writes. Each
//! line, in either direction, is stored as one [`ConversationEntry`] (with the output
//! cursor, in the same transaction) before it is broadcast, so an API client never sees a
//! line the store could lose, and a task that attaches again (after a lost attach, or
//! after a daemon restart that adopted the container) goes on from the stored cursor:
//! nothing is lost or doubled.

pub mod approvals;
pub(crate) mod protocol;
mod store;
pub(crate) mod task;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use backend_core::OutputCursor;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use tokio::sync::{broadcast, Notify};

use crate::manager::lock;
use crate::model::text_enum;
use crate::store::{Store, StoreError};

pub use protocol::MAX_ENTRY_TEXT;

text_enum! {
    /// Which way a line went.
    Direction {
        /// Written by the agent (its stdout or stderr).
        FromAgent = "from_agent",
        /// Written by agentd to the agent's stdin.
        ToAgent = "to_agent",
    }
}

text_enum! {
    /// Where a line to the agent is.
    Delivery {
        /// Stored, not yet written to the agent's stdin (the agent is frozen, or not
        /// attached yet).
        Queued = "queued",
        /// Written to the agent's stdin.
        Delivered = "delivered",
        /// A control response for a run that ended before it was written.
        Expired = "expired",
    }
}

text_enum! {
    /// Where the session's current turn is.
    Turn {
        /// No turn in progress: the agent waits for a message.
        Idle = "idle",
        /// A turn is in progress.
        Busy = "busy",
        /// The turn waits for a decision on a tool-permission request.
        AwaitingApproval = "awaiting_approval",
    }
}

/// One line of an agent's conversation (its JSON, read back by the client, has no
/// `agent_id`: that one reads as empty).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ConversationEntry {
    #[serde(skip)]
    pub agent_id: String,
    /// Per agent, increasing from 1.
    pub seq: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub direction: Direction,
    /// The line's `type` (`user`, `assistant`, `result`, `system`, `control_request`,
    /// `control_response`, …), `raw` for a line that is not JSON, `stderr` for a line on
    /// the agent's stderr.
    pub kind: String,
    /// A short human text (at most [`MAX_ENTRY_TEXT`] bytes).
    pub text: String,
    /// The whole line: its JSON, or its raw text as a string.
    pub data: Value,
    /// For lines to the agent, whether they were written yet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivery: Option<Delivery>,
}

/// What the broadcast of new entries carries.
#[derive(Debug, Clone, PartialEq)]
pub enum LiveEntry {
    /// A new entry, whole.
    Entry(ConversationEntry),
    /// A new entry that was stored but not broadcast whole, because it is larger than
    /// [`BROADCAST_ENTRY_MAX_BYTES`] or the broadcast's byte budget was spent: read it
    /// (and anything after it) from the store.
    Elided { agent_id: String, seq: i64 },
}

impl LiveEntry {
    /// The agent the entry is of.
    pub fn agent_id(&self) -> &str {
        match self {
            LiveEntry::Entry(e) => &e.agent_id,
            LiveEntry::Elided { agent_id, .. } => agent_id,
        }
    }
}

/// The most bytes of entries one read of a conversation returns (at least one entry):
/// readers page on with `after` until a page is empty.
pub const CONVERSATION_PAGE_BYTES: usize = 16 * 1024 * 1024;

/// How many entries the broadcast of new entries holds for its slowest receiver.
pub const BROADCAST_CAPACITY: usize = 4096;
/// The largest entry (its `text` and `data` as JSON) broadcast whole; a larger one is
/// broadcast as [`LiveEntry::Elided`].
pub const BROADCAST_ENTRY_MAX_BYTES: usize = 1024 * 1024;
/// The most bytes of whole entries the broadcast may hold, all agents together: the sum
/// over the last [`BROADCAST_CAPACITY`] entries sent (all the broadcast can keep).
pub const BROADCAST_BUDGET_BYTES: usize = 64 * 1024 * 1024;
/// The same, per agent.
pub const BROADCAST_AGENT_BUDGET_BYTES: usize = 16 * 1024 * 1024;

/// The byte sizes of the last [`BROADCAST_CAPACITY`] entries broadcast (whole or
/// elided), so that what the broadcast can hold stays within the budgets.
#[derive(Debug, Default)]
struct Window {
    sent: std::collections::VecDeque<(Arc<str>, usize)>,
    total: usize,
    per_agent: HashMap<Arc<str>, usize>,
}

impl Window {
    /// Whether an entry of `size` bytes of `agent` may go out whole; records what goes.
    fn admit(&mut self, agent: &str, size: usize) -> bool {
        if self.sent.len() >= BROADCAST_CAPACITY {
            if let Some((old, n)) = self.sent.pop_front() {
                self.total -= n;
                if let Some(sum) = self.per_agent.get_mut(&old) {
                    *sum -= n;
                    if *sum == 0 {
                        self.per_agent.remove(&old);
                    }
                }
            }
        }
        let agent_sum = self.per_agent.get(agent).copied().unwrap_or(0);
        let whole = size <= BROADCAST_ENTRY_MAX_BYTES
            && self.total + size <= BROADCAST_BUDGET_BYTES
            && agent_sum + size <= BROADCAST_AGENT_BUDGET_BYTES;
        let counted = if whole { size } else { 0 };
        let key: Arc<str> = self.per_agent.get_key_value(agent).map_or_else(|| Arc::from(agent), |(k, _)| k.clone());
        self.sent.push_back((key.clone(), counted));
        self.total += counted;
        if counted > 0 {
            *self.per_agent.entry(key).or_insert(0) += counted;
        }
        whole
    }
}

/// The bytes an entry takes in the broadcast: its text and its data as JSON.
fn entry_size(entry: &ConversationEntry) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    let _ = serde_json::to_writer(&mut count, &entry.data);
    entry.text.len() + entry.kind.len() + count.0 + 128
}

/// The last result of a session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LastResult {
    pub subtype: String,
    pub is_error: bool,
    pub text: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// Tokens a session used, summed from its results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// What the agent JSON shows of a stream-json agent's session.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SessionView {
    pub session_id: String,
    pub turn: Turn,
    pub cost_usd: f64,
    pub usage: Usage,
    pub last_result: Option<LastResult>,
    /// Turns that ended with a result, over all runs.
    pub turns: u64,
    /// Whether the CLI began the session (its files exist): later runs resume it.
    pub started: bool,
}

/// The stored state of one agent's conversation.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SessionRecord {
    pub agent_id: String,
    pub session_id: String,
    pub turn: Turn,
    pub cost_before_usd: f64,
    pub run_cost_usd: f64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub results: u64,
    pub started: bool,
    pub last_result: Option<LastResult>,
    /// The container whose output `output_cursor` is a position in.
    pub container_id: Option<String>,
    pub output_cursor: Option<OutputCursor>,
    /// The container that was sent the `initialize` handshake.
    pub handshake_container: Option<String>,
}

impl SessionRecord {
    /// A fresh record; the session id is the agent id until the agent says otherwise.
    pub fn new(agent_id: &str) -> Self {
        Self {
            agent_id: agent_id.to_owned(),
            session_id: agent_id.to_owned(),
            turn: Turn::Idle,
            cost_before_usd: 0.0,
            run_cost_usd: 0.0,
            input_tokens: 0,
            output_tokens: 0,
            results: 0,
            started: false,
            last_result: None,
            container_id: None,
            output_cursor: None,
            handshake_container: None,
        }
    }

    /// The session's cost over all its runs.
    pub fn cost_usd(&self) -> f64 {
        self.cost_before_usd + self.run_cost_usd
    }

    /// Moves the record to a new container: its output is read from the start, it gets
    /// its own handshake, and its process's cost counts on top of the earlier runs'.
    pub fn enter_container(&mut self, container: &str) {
        if self.container_id.as_deref() == Some(container) {
            return;
        }
        self.cost_before_usd += self.run_cost_usd;
        self.run_cost_usd = 0.0;
        self.container_id = Some(container.to_owned());
        self.output_cursor = None;
        self.turn = Turn::Idle;
    }

    fn view(&self) -> SessionView {
        SessionView {
            session_id: self.session_id.clone(),
            turn: self.turn,
            cost_usd: self.cost_usd(),
            usage: Usage { input_tokens: self.input_tokens, output_tokens: self.output_tokens },
            last_result: self.last_result.clone(),
            turns: self.results,
            started: self.started,
        }
    }
}

/// A line to store.
#[derive(Debug, Clone)]
pub(crate) struct NewEntry {
    pub direction: Direction,
    pub kind: String,
    pub text: String,
    pub data: Value,
    pub delivery: Option<Delivery>,
    pub at: OffsetDateTime,
}

/// The conversation task of one agent.
#[derive(Debug)]
struct TaskSlot {
    container: String,
    /// Wakes the task to deliver queued lines.
    wake: Arc<Notify>,
    handle: tokio::task::JoinHandle<()>,
}

/// Every agent's conversation state and task, and the broadcast of new entries.
#[derive(Debug)]
pub(crate) struct Hub {
    pub(crate) store: Store,
    entries: broadcast::Sender<LiveEntry>,
    /// What the broadcast holds, in bytes.
    window: Mutex<Window>,
    /// Session records of the agents seen, as stored.
    records: Mutex<HashMap<String, SessionRecord>>,
    /// Agents whose task holds a live attach.
    connected: Mutex<HashMap<String, bool>>,
    tasks: Mutex<HashMap<String, TaskSlot>>,
    /// Serialises appends, so that seq order is store order is broadcast order. Holds
    /// each agent's next seq.
    next_seq: tokio::sync::Mutex<HashMap<String, i64>>,
}

impl Hub {
    pub(crate) fn new(store: Store) -> Self {
        Self {
            store,
            entries: broadcast::channel(BROADCAST_CAPACITY).0,
            window: Mutex::new(Window::default()),
            records: Mutex::new(HashMap::new()),
            connected: Mutex::new(HashMap::new()),
            tasks: Mutex::new(HashMap::new()),
            next_seq: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    /// New entries of every agent, from now on.
    pub(crate) fn subscribers(&self) -> usize {
        self.entries.receiver_count()
    }

    pub(crate) fn subscribe(&self) -> broadcast::Receiver<LiveEntry> {
        self.entries.subscribe()
    }

    /// The agent's session record, loading it from the store the first time.
    pub(crate) async fn record(&self, agent_id: &str) -> Result<SessionRecord, StoreError> {
        if let Some(record) = lock(&self.records).get(agent_id) {
            return Ok(record.clone());
        }
        let record = self.store.load_session(agent_id).await?.unwrap_or_else(|| SessionRecord::new(agent_id));
        Ok(lock(&self.records).entry(agent_id.to_owned()).or_insert(record).clone())
    }

    /// What the agent JSON shows of the session, when one was recorded.
    pub(crate) fn view(&self, agent_id: &str) -> Option<SessionView> {
        lock(&self.records).get(agent_id).map(SessionRecord::view)
    }

    /// Whether the agent's task holds a live attach.
    pub(crate) fn is_connected(&self, agent_id: &str) -> bool {
        lock(&self.connected).get(agent_id).copied().unwrap_or(false)
    }

    /// Sets whether the agent is attached; returns whether that changed.
    pub(crate) fn set_connected(&self, agent_id: &str, connected: bool) -> bool {
        lock(&self.connected).insert(agent_id.to_owned(), connected) != Some(connected)
    }

    /// Stores `entries` (and `record`, when given, in the same transaction), then keeps
    /// the record and broadcasts the entries.
    pub(crate) async fn append(
        &self,
        agent_id: &str,
        entries: Vec<NewEntry>,
        record: Option<&SessionRecord>,
    ) -> Result<Vec<ConversationEntry>, StoreError> {
        self.append_with(agent_id, entries, record, &[]).await
    }

    /// [`Hub::append`] with approval changes in the same transaction.
    pub(crate) async fn append_with(
        &self,
        agent_id: &str,
        entries: Vec<NewEntry>,
        record: Option<&SessionRecord>,
        changes: &[approvals::ApprovalChange],
    ) -> Result<Vec<ConversationEntry>, StoreError> {
        let mut next = self.next_seq.lock().await;
        let first = match next.get(agent_id) {
            Some(seq) => *seq,
            None => self.store.max_seq(agent_id).await? + 1,
        };
        let stored: Vec<ConversationEntry> = entries
            .into_iter()
            .enumerate()
            .map(|(i, e)| ConversationEntry {
                agent_id: agent_id.to_owned(),
                seq: first + i as i64,
                // The store keeps milliseconds: what is broadcast equals what is read back.
                at: e.at.replace_nanosecond(e.at.millisecond() as u32 * 1_000_000).unwrap_or(e.at),
                direction: e.direction,
                kind: e.kind,
                text: e.text,
                data: e.data,
                delivery: e.delivery,
            })
            .collect();
        // The record is kept before the entries can be read back, so whoever reads an
        // entry (a `result`) and then the agent sees the session the entry made (`idle`);
        // a failed write puts the previous record back.
        let previous = record.map(|record| lock(&self.records).insert(agent_id.to_owned(), record.clone()));
        if let Err(e) = self.store.append_conversation(&stored, record, changes).await {
            match previous {
                Some(Some(previous)) => {
                    lock(&self.records).insert(agent_id.to_owned(), previous);
                }
                Some(None) => {
                    lock(&self.records).remove(agent_id);
                }
                None => {}
            }
            return Err(e);
        }
        next.insert(agent_id.to_owned(), first + stored.len() as i64);
        if self.entries.receiver_count() > 0 {
            let mut window = lock(&self.window);
            for entry in &stored {
                let live = if window.admit(agent_id, entry_size(entry)) {
                    LiveEntry::Entry(entry.clone())
                } else {
                    LiveEntry::Elided { agent_id: agent_id.to_owned(), seq: entry.seq }
                };
                let _ = self.entries.send(live);
            }
        }
        Ok(stored)
    }

    /// Saves a changed record.
    pub(crate) async fn save(&self, record: &SessionRecord) -> Result<(), StoreError> {
        self.store.save_session(record).await?;
        lock(&self.records).insert(record.agent_id.clone(), record.clone());
        Ok(())
    }

    /// Marks a line to the agent delivered.
    pub(crate) async fn delivered(&self, agent_id: &str, seq: i64) -> Result<(), StoreError> {
        self.store.mark_delivered(agent_id, seq).await
    }

    /// Wakes the agent's task to deliver what is queued.
    pub(crate) fn wake(&self, agent_id: &str) {
        if let Some(slot) = lock(&self.tasks).get(agent_id) {
            slot.wake.notify_one();
        }
    }

    /// Whether a task runs for the agent's `container`.
    pub(crate) fn has_task(&self, agent_id: &str, container: &str) -> bool {
        lock(&self.tasks).get(agent_id).is_some_and(|s| s.container == container && !s.handle.is_finished())
    }

    /// Installs the task for `container`, returning the one it replaces (for another
    /// container), which the new task lets finish first.
    pub(crate) fn install(
        &self,
        agent_id: &str,
        container: &str,
        wake: Arc<Notify>,
        handle: tokio::task::JoinHandle<()>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let slot = TaskSlot { container: container.to_owned(), wake, handle };
        lock(&self.tasks).insert(agent_id.to_owned(), slot).map(|old| old.handle)
    }

    /// Ends the agent's task and forgets its state (the agent was removed).
    pub(crate) async fn forget(&self, agent_id: &str) {
        if let Some(slot) = lock(&self.tasks).remove(agent_id) {
            slot.handle.abort();
        }
        lock(&self.records).remove(agent_id);
        lock(&self.connected).remove(agent_id);
        self.next_seq.lock().await.remove(agent_id);
    }

    /// Ends every task (daemon shutdown); the containers run on.
    pub(crate) fn abort_all(&self) {
        for (_, slot) in lock(&self.tasks).drain() {
            slot.handle.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_broadcast_window_keeps_its_byte_budgets() {
        let mut w = Window::default();
        assert!(!w.admit("a", BROADCAST_ENTRY_MAX_BYTES + 1), "a large entry is never broadcast whole");
        // One agent: 16 × 1 MiB fills its budget; the next is elided, another agent's is not.
        for _ in 0..16 {
            assert!(w.admit("a", BROADCAST_ENTRY_MAX_BYTES));
        }
        assert!(!w.admit("a", 1024), "past the agent's budget");
        assert!(w.admit("b", 1024));
        for agent in ["c", "d", "e"] {
            for _ in 0..16 {
                w.admit(agent, BROADCAST_ENTRY_MAX_BYTES);
            }
        }
        assert!(w.total <= BROADCAST_BUDGET_BYTES, "{}", w.total);
        assert!(!w.admit("f", BROADCAST_ENTRY_MAX_BYTES), "past the total budget");
        // Once the ring has moved on by its capacity, the budget is free again.
        for _ in 0..BROADCAST_CAPACITY {
            w.admit("g", 10);
        }
        assert!(w.admit("a", BROADCAST_ENTRY_MAX_BYTES));
        assert!(w.per_agent.len() <= 2, "agents that left the window are forgotten: {:?}", w.per_agent.keys());
    }
}
