//! What the daemon knows of its own health: whether the engine answered its last call
//! and when the supervision loop last completed a full pass. Recorded by the manager,
//! read by whoever reports it (the daemon's `/healthz`); nothing here speaks HTTP.

use std::sync::Mutex;
use std::time::Duration;

use time::OffsetDateTime;

use crate::manager::lock;

/// Whether the engine answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineState {
    /// The last call (a full pass) was answered.
    Ok,
    /// The last call found the engine unreachable.
    Unavailable,
}

/// The supervision loop's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SupervisorState {
    /// It has not completed a full pass yet (it just started, or never ran).
    Starting,
    /// Its last successful full pass is recent (see [`Health::stale_after`]).
    Running,
    /// It runs, but its last successful full pass is older than the bound.
    Stale,
    /// Its task ended (it was stopped, or it panicked).
    Dead,
}

/// The overall verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthStatus {
    /// The engine answers and the supervisor's view is fresh.
    Ok,
    /// The daemon serves, but what it reports may be out of date (engine unavailable,
    /// no recent pass).
    Degraded,
    /// The supervision loop is dead: nothing is reconciled any more.
    Failing,
}

/// A snapshot of the daemon's health ([`crate::AgentManager::health`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Health {
    pub status: HealthStatus,
    pub engine: EngineState,
    /// When `engine` took its current value (the manager's creation until a first pass).
    pub engine_since: OffsetDateTime,
    /// The last engine error seen, and when, even if the engine answers again since.
    pub last_engine_error: Option<(OffsetDateTime, String)>,
    pub supervisor: SupervisorState,
    /// The end of the last successful full pass.
    pub last_pass_at: Option<OffsetDateTime>,
    /// How long ago that was.
    pub last_pass_age: Option<Duration>,
    /// A last pass older than this makes the supervisor `stale`: twice
    /// `reconcile.interval` plus 30 s.
    pub stale_after: Duration,
}

#[derive(Debug)]
struct Inner {
    engine: EngineState,
    engine_since: OffsetDateTime,
    last_engine_error: Option<(OffsetDateTime, String)>,
    last_pass_at: Option<OffsetDateTime>,
    supervising: bool,
    supervised_before: bool,
}

/// The manager's record of its health.
#[derive(Debug)]
pub(crate) struct HealthRecord(Mutex<Inner>);

impl HealthRecord {
    pub(crate) fn new(now: OffsetDateTime) -> Self {
        Self(Mutex::new(Inner {
            engine: EngineState::Ok,
            engine_since: now,
            last_engine_error: None,
            last_pass_at: None,
            supervising: false,
            supervised_before: false,
        }))
    }

    /// A full pass succeeded at `now`: the engine answered.
    pub(crate) fn pass_succeeded(&self, now: OffsetDateTime) {
        let mut h = lock(&self.0);
        h.last_pass_at = Some(now);
        if h.engine != EngineState::Ok {
            h.engine = EngineState::Ok;
            h.engine_since = now;
        }
    }

    /// A call found the engine unreachable at `now`.
    pub(crate) fn engine_failed(&self, now: OffsetDateTime, error: String) {
        let mut h = lock(&self.0);
        if h.engine != EngineState::Unavailable {
            h.engine = EngineState::Unavailable;
            h.engine_since = now;
        }
        h.last_engine_error = Some((now, error));
    }

    /// The supervision loop started (`true`) or its task ended (`false`).
    pub(crate) fn set_supervising(&self, running: bool) {
        let mut h = lock(&self.0);
        h.supervising = running;
        h.supervised_before |= running;
    }

    pub(crate) fn snapshot(&self, now: OffsetDateTime, interval: Duration) -> Health {
        let h = lock(&self.0);
        let stale_after = interval.saturating_mul(2).saturating_add(Duration::from_secs(30));
        let last_pass_age = h.last_pass_at.map(|at| Duration::try_from(now - at).unwrap_or(Duration::ZERO));
        let supervisor = if !h.supervising {
            if h.supervised_before {
                SupervisorState::Dead
            } else {
                SupervisorState::Starting
            }
        } else {
            match last_pass_age {
                None => SupervisorState::Starting,
                Some(age) if age > stale_after => SupervisorState::Stale,
                Some(_) => SupervisorState::Running,
            }
        };
        let status = match (supervisor, h.engine) {
            (SupervisorState::Dead, _) => HealthStatus::Failing,
            (SupervisorState::Running, EngineState::Ok) => HealthStatus::Ok,
            _ => HealthStatus::Degraded,
        };
        Health {
            status,
            engine: h.engine,
            engine_since: h.engine_since,
            last_engine_error: h.last_engine_error.clone(),
            supervisor,
            last_pass_at: h.last_pass_at,
            last_pass_age,
            stale_after,
        }
    }
}

/// Marks the supervision loop ended when dropped: on return and on panic alike.
pub(crate) struct Supervising<'a>(pub(crate) &'a HealthRecord);

impl<'a> Supervising<'a> {
    pub(crate) fn start(record: &'a HealthRecord) -> Self {
        record.set_supervising(true);
        Self(record)
    }
}

impl Drop for Supervising<'_> {
    fn drop(&mut self) {
        self.0.set_supervising(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verdict_follows_the_engine_and_the_supervisor() {
        let t0 = OffsetDateTime::UNIX_EPOCH;
        let interval = Duration::from_secs(10);
        let at = |secs: i64| t0 + time::Duration::seconds(secs);
        let record = HealthRecord::new(t0);
        assert_eq!(record.snapshot(t0, interval).supervisor, SupervisorState::Starting);
        assert_eq!(record.snapshot(t0, interval).status, HealthStatus::Degraded);
        let guard = Supervising::start(&record);
        record.pass_succeeded(at(1));
        let h = record.snapshot(at(2), interval);
        assert_eq!(
            (h.status, h.supervisor, h.last_pass_age),
            (HealthStatus::Ok, SupervisorState::Running, Some(Duration::from_secs(1)))
        );
        record.engine_failed(at(3), "engine down".into());
        let h = record.snapshot(at(4), interval);
        assert_eq!((h.status, h.engine, h.engine_since), (HealthStatus::Degraded, EngineState::Unavailable, at(3)));
        record.pass_succeeded(at(5));
        let h = record.snapshot(at(5), interval);
        assert_eq!((h.status, h.engine_since), (HealthStatus::Ok, at(5)));
        assert_eq!(h.last_engine_error, Some((at(3), "engine down".into())));
        assert_eq!(record.snapshot(at(56), interval).supervisor, SupervisorState::Stale);
        drop(guard);
        assert_eq!(record.snapshot(at(6), interval).status, HealthStatus::Failing);
    }
}
