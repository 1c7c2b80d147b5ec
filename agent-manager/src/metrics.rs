//! Counters the daemon exports, and the agent counts it reports, both read from memory.

use std::sync::atomic::{AtomicU64, Ordering};

use backend_core::{ExecutionBackend, SessionHealth};

use crate::model::{AgentStatus, ModelUsage};
use crate::AgentManager;

/// Supervision counters, updated by the manager.
#[derive(Debug, Default)]
pub struct Metrics {
    pub(crate) reconcile_passes: AtomicU64,
    pub(crate) reconcile_failures: AtomicU64,
    pub(crate) last_pass_micros: AtomicU64,
    pub(crate) engine_errors: AtomicU64,
    pub(crate) restarts: AtomicU64,
    pub(crate) relists_after_resync: AtomicU64,
    pub(crate) orphans_removed: AtomicU64,
    pub(crate) events_received: AtomicU64,
    pub(crate) model_requests: AtomicU64,
    pub(crate) model_input_tokens: AtomicU64,
    pub(crate) model_output_tokens: AtomicU64,
    pub(crate) model_refusals: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MetricsSnapshot {
    /// Completed reconcile passes.
    pub reconcile_passes: u64,
    /// Passes that could not complete (engine unavailable, database error).
    pub reconcile_failures: u64,
    /// Duration of the last completed pass, in microseconds.
    pub last_pass_micros: u64,
    /// Engine calls that failed because the engine was unavailable.
    pub engine_errors: u64,
    /// Restarts performed by users and by restart policies.
    pub restarts: u64,
    /// Full relists triggered because backend events may have been lost.
    pub relists_after_resync: u64,
    /// Orphaned sessions removed.
    pub orphans_removed: u64,
    /// Backend events received.
    pub events_received: u64,
    /// Model requests recorded since the daemon started.
    pub model_requests: u64,
    /// Their input tokens.
    pub model_input_tokens: u64,
    /// Their output tokens.
    pub model_output_tokens: u64,
    /// Model requests refused under their agent's limits since the daemon started.
    pub model_refusals: u64,
}

impl Metrics {
    /// Reads every counter.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            reconcile_passes: get(&self.reconcile_passes),
            reconcile_failures: get(&self.reconcile_failures),
            last_pass_micros: get(&self.last_pass_micros),
            engine_errors: get(&self.engine_errors),
            restarts: get(&self.restarts),
            relists_after_resync: get(&self.relists_after_resync),
            orphans_removed: get(&self.orphans_removed),
            events_received: get(&self.events_received),
            model_requests: get(&self.model_requests),
            model_input_tokens: get(&self.model_input_tokens),
            model_output_tokens: get(&self.model_output_tokens),
            model_refusals: get(&self.model_refusals),
        }
    }

    pub(crate) fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn add_model_usage(&self, usage: ModelUsage) {
        self.model_requests.fetch_add(usage.requests, Ordering::Relaxed);
        self.model_input_tokens.fetch_add(usage.input_tokens, Ordering::Relaxed);
        self.model_output_tokens.fetch_add(usage.output_tokens, Ordering::Relaxed);
    }
}

/// How many agents there are in each status, how many of the running ones in each health,
/// and to how many agentd holds a live attach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentCounts {
    /// Every status, with its count (0 included).
    pub by_status: Vec<(AgentStatus, u64)>,
    /// Every health, with the count of running agents in it (0 included).
    pub running_by_health: Vec<(SessionHealth, u64)>,
    /// Agents whose stdin and output agentd holds attached.
    pub connected: u64,
}

impl<B: ExecutionBackend + ?Sized + 'static> AgentManager<B> {
    /// Counts the agents from memory: a `/metrics` scrape costs no database query, however
    /// many agents there are.
    pub fn agent_counts(&self) -> AgentCounts {
        let mut by_status: Vec<(AgentStatus, u64)> = AgentStatus::ALL.iter().map(|s| (*s, 0)).collect();
        let mut running_by_health: Vec<(SessionHealth, u64)> = SessionHealth::ALL.iter().map(|h| (*h, 0)).collect();
        let mut connected = 0;
        for (id, status, health) in self.store.agent_states() {
            if let Some((_, n)) = by_status.iter_mut().find(|(s, _)| *s == status) {
                *n += 1;
            }
            if status == AgentStatus::Running {
                if let Some((_, n)) = running_by_health.iter_mut().find(|(h, _)| *h == health) {
                    *n += 1;
                }
            }
            connected += u64::from(self.conversations.is_connected(&id));
        }
        AgentCounts { by_status, running_by_health, connected }
    }
}
