//! Counters the daemon exports.

use std::sync::atomic::{AtomicU64, Ordering};

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
        }
    }

    pub(crate) fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
