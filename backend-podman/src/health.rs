//! Health checks where Podman does not run them.
//!
//! Podman schedules a container's health checks with a transient systemd timer
//! (`systemd-run ... podman healthcheck run ID`). Without systemd the timer cannot be
//! created, Podman logs the failure and never checks: health stays `starting` forever
//! (containers/podman#19326; Podman has no scheduler of its own). So the backend drives
//! checks itself: a
//! [`HealthDriver`] per backend lists the owned running containers, reads each one's
//! configured check (interval, timeout, retries, start period) and asks libpod to run it
//! through `GET /libpod/containers/{id}/healthcheck` at the interval. libpod then applies
//! retries and the start period and records the result, so `State.Health`, the listing's
//! health and the `health_status` events all stay libpod's.
//!
//! - **Where Podman schedules checks** ([`HealthScheduling::Engine`]), the driver runs
//!   none, except for a container whose health is still `starting` long after its first
//!   checks were due (its timer evidently failed); then it takes that container over and
//!   says so. A working engine keeps no container in `starting` that long, so checks are
//!   never doubled.
//! - **One driver per container.** Several backends in one process (two managers of one
//!   instance during a hand-over) share a registry: the first driver to see a container
//!   claims it, and releases it when it is dropped.
//! - **Timeouts.** libpod 4.3 does not enforce a check's timeout (fixed upstream in
//!   containers/podman#26086): a hanging check command hangs the call, and the container
//!   keeps its last health. The driver counts a check still running after its timeout as
//!   failed, and every further interval it stays hung as another failure, as Docker would
//!   with a fresh check each time. Once that reaches the retries (outside the start
//!   period) the backend reports the session unhealthy and emits `HealthChanged`, until a
//!   check completes again.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use backend_core::{BackendEvent, OwnershipLabels, SessionHealth};
use podman_api::opts::{ContainerListFilter, ContainerListOpts};
use podman_api::Podman;
use time::OffsetDateTime;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::convert::{self, CheckTiming};
use crate::error::status_of;

/// How often the driver lists the running owned containers.
const LIST_EVERY: Duration = Duration::from_secs(1);

/// How much longer than its checks should take a container may stay `starting` under an
/// engine that schedules checks before the driver takes it over.
const TAKEOVER_SLACK: Duration = Duration::from_secs(5);

/// Who runs health checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthScheduling {
    /// The engine runs them (systemd timers); the backend only takes over a container
    /// whose checks evidently never run.
    Engine,
    /// The engine cannot run them (no systemd on its host): the backend runs every
    /// check at the container's interval.
    Backend,
}

impl HealthScheduling {
    /// `Backend` when the engine is on this host and the host was not booted with systemd
    /// (no `systemd_dir`, as `sd_booted()` tells it); `Engine` otherwise, including for a
    /// remote engine, whose host cannot be seen from here (the take-over rule covers it).
    pub(crate) fn detect(engine_is_local: bool, systemd_dir: &Path) -> Self {
        if engine_is_local && !systemd_dir.is_dir() {
            Self::Backend
        } else {
            Self::Engine
        }
    }
}

/// Which driver runs which container's checks, and which sessions read unhealthy because
/// a check hangs past its timeout; shared by every backend in the process.
static CLAIMS: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());
static HUNG: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Claims the container for `driver`; true when it is (now or already) this driver's.
fn claim(container: &str, driver: u64) -> bool {
    *lock(&CLAIMS).entry(container.to_owned()).or_insert(driver) == driver
}

fn release(container: &str, driver: u64) {
    let mut claims = lock(&CLAIMS);
    if claims.get(container) == Some(&driver) {
        claims.remove(container);
    }
}

/// The health the backend reports instead of libpod's for a container whose check hangs
/// past its timeout (see the module docs), if any.
pub(crate) fn overlay(container: &str) -> Option<SessionHealth> {
    lock(&HUNG).contains(container).then_some(SessionHealth::Unhealthy)
}

/// Sets or clears the hung-check overlay; true when it changed.
fn set_hung(container: &str, hung: bool) -> bool {
    let mut set = lock(&HUNG);
    if hung {
        set.insert(container.to_owned())
    } else {
        set.remove(container)
    }
}

/// The background task that runs health checks for one backend's containers. Dropping it
/// stops the task and releases its containers.
#[derive(Debug)]
pub(crate) struct HealthDriver {
    id: u64,
    task: JoinHandle<()>,
}

impl Drop for HealthDriver {
    fn drop(&mut self) {
        self.task.abort();
        let mut claims = lock(&CLAIMS);
        claims.retain(|_, driver| *driver != self.id);
    }
}

impl HealthDriver {
    /// Starts the driver for `owner`'s containers.
    pub(crate) fn spawn(
        podman: Podman,
        owner: OwnershipLabels,
        scheduling: HealthScheduling,
        request_timeout: Duration,
        events: broadcast::Sender<BackendEvent>,
    ) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let driver = Driver { id, podman, owner, scheduling, request_timeout, events, tracked: HashMap::new() };
        Self { id, task: tokio::spawn(driver.run()) }
    }
}

/// A running container the driver knows.
#[derive(Debug)]
struct Tracked {
    session: String,
    /// `None` when the container has no health check.
    timing: Option<CheckTiming>,
    started_at: OffsetDateTime,
    /// Whether this driver runs the container's checks.
    driving: bool,
    next_due: Instant,
    /// The check in flight, since when.
    in_flight: Option<(Instant, JoinHandle<()>)>,
}

/// How a check call ended.
#[derive(Debug)]
enum Outcome {
    /// libpod ran the check and recorded its result.
    Ran,
    /// The container is no longer running.
    NotRunning,
    /// The call failed; try again at the next interval.
    Failed(String),
}

struct Driver {
    id: u64,
    podman: Podman,
    owner: OwnershipLabels,
    scheduling: HealthScheduling,
    request_timeout: Duration,
    events: broadcast::Sender<BackendEvent>,
    tracked: HashMap<String, Tracked>,
}

/// When a wall-clock time comes on tokio's clock.
fn instant_at(at: OffsetDateTime) -> Instant {
    let ahead = at - OffsetDateTime::now_utc();
    Instant::now() + Duration::try_from(ahead).unwrap_or(Duration::ZERO)
}

/// How many failed checks a check that has run for `elapsed` stands for: none within
/// the timeout, one at the timeout, one more for every further interval.
pub(crate) fn hung_failures(elapsed: Duration, timing: &CheckTiming) -> u32 {
    if elapsed <= timing.timeout {
        return 0;
    }
    let past = elapsed - timing.timeout;
    let interval = timing.interval.max(Duration::from_millis(1));
    let more = past.as_nanos() / interval.as_nanos();
    1 + u32::try_from(more).unwrap_or(u32::MAX - 1)
}

/// Whether a container still `starting` at `now` should have left that state long ago
/// if anything ran its checks.
pub(crate) fn overdue(started_at: OffsetDateTime, timing: &CheckTiming, now: OffsetDateTime) -> bool {
    let checks = (timing.interval + timing.timeout) * (timing.retries + 1);
    now > started_at + timing.start_period + checks + TAKEOVER_SLACK
}

impl Driver {
    async fn run(mut self) {
        info!(scheduling = ?self.scheduling, "Health check driver started.");
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<(String, Outcome)>();
        let mut next_list = Instant::now();
        loop {
            let now = Instant::now();
            if now >= next_list {
                self.relist().await;
                next_list = Instant::now() + LIST_EVERY;
            }
            self.start_due_checks(&done_tx);
            self.judge_hung_checks();
            let wake = self
                .tracked
                .values()
                .filter(|t| t.driving)
                .filter_map(|t| {
                    let timing = t.timing?;
                    Some(match &t.in_flight {
                        // Judge a check in flight at its timeout, then every interval.
                        Some((since, _)) if since.elapsed() <= timing.timeout => {
                            *since + timing.timeout + Duration::from_millis(1)
                        }
                        Some(_) => Instant::now() + timing.interval,
                        None => t.next_due,
                    })
                })
                .fold(next_list, Instant::min);
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                Some((container, outcome)) = done_rx.recv() => self.finished(&container, outcome),
            }
        }
    }

    /// Lists the running owned containers: new ones are inspected for their check, gone
    /// ones forgotten, and under engine scheduling overdue ones taken over.
    async fn relist(&mut self) {
        let mut filters: Vec<ContainerListFilter> = self
            .owner
            .label_filters()
            .into_iter()
            .filter_map(|f| f.split_once('=').map(|(k, v)| ContainerListFilter::LabelKeyVal(k.into(), v.into())))
            .collect();
        filters.push(ContainerListFilter::Status(podman_api::models::ContainerStatus::Running));
        let opts = ContainerListOpts::builder().all(true).filter(filters).build();
        let listed = match tokio::time::timeout(self.request_timeout, self.podman.containers().list(&opts)).await {
            Ok(Ok(listed)) => listed,
            Ok(Err(e)) => return debug!(error = %e, "Health driver could not list containers."),
            Err(_) => return debug!("Health driver listing timed out."),
        };
        let mut running = BTreeMap::new();
        for summary in listed {
            let labels = summary.labels.clone().unwrap_or_default().into_iter().collect();
            if !self.owner.owns(&labels) {
                continue;
            }
            if let (Some(id), Some(name)) = (summary.id.clone(), convert::summary_name(&summary)) {
                running.insert(id, (name, summary.status.clone().unwrap_or_default()));
            }
        }
        let gone: Vec<String> = self.tracked.keys().filter(|id| !running.contains_key(*id)).cloned().collect();
        for id in gone {
            self.forget(&id);
        }
        let now = OffsetDateTime::now_utc();
        for (id, (session, health)) in running {
            if !self.tracked.contains_key(&id) {
                if let Some(tracked) = self.inspect(&id, session).await {
                    self.tracked.insert(id.clone(), tracked);
                }
            }
            let Some(t) = self.tracked.get_mut(&id) else { continue };
            let Some(timing) = t.timing else { continue };
            if !t.driving
                && self.scheduling == HealthScheduling::Engine
                && health == "starting"
                && overdue(t.started_at, &timing, now)
            {
                warn!(
                    session = %t.session,
                    "Health still starting long after its checks were due: Podman is not running them; the backend runs them from now on."
                );
                t.driving = true;
                t.next_due = Instant::now();
            }
        }
    }

    /// Reads a new container's check and start time.
    async fn inspect(&self, id: &str, session: String) -> Option<Tracked> {
        let inspect = match tokio::time::timeout(self.request_timeout, self.podman.containers().get(id).inspect()).await
        {
            Ok(Ok(inspect)) => inspect,
            Ok(Err(e)) => {
                debug!(session = %session, error = %e, "Health driver could not inspect a container.");
                return None;
            }
            Err(_) => return None,
        };
        let timing = convert::check_timing(inspect.config.as_ref().and_then(|c| c.healthcheck.as_ref()));
        let started_at = inspect
            .state
            .as_ref()
            .and_then(|s| convert::engine_time(s.started_at.as_ref().map(|t| t.to_rfc3339())))
            .unwrap_or_else(OffsetDateTime::now_utc);
        let driving = timing.is_some() && self.scheduling == HealthScheduling::Backend;
        if let Some(timing) = &timing {
            debug!(session = %session, interval_ms = timing.interval.as_millis() as u64, driving, "Container with a health check.");
        }
        Some(Tracked {
            next_due: instant_at(started_at + timing.map_or(Duration::ZERO, |t| t.interval)),
            session,
            timing,
            started_at,
            driving,
            in_flight: None,
        })
    }

    fn start_due_checks(&mut self, done: &mpsc::UnboundedSender<(String, Outcome)>) {
        let now = Instant::now();
        for (id, t) in &mut self.tracked {
            if !t.driving || t.in_flight.is_some() || t.next_due > now || t.timing.is_none() {
                continue;
            }
            if !claim(id, self.id) {
                // Another backend in this process drives it; look again an interval later.
                t.next_due = now + t.timing.map_or(LIST_EVERY, |timing| timing.interval);
                continue;
            }
            let (podman, container, done) = (self.podman.clone(), id.clone(), done.clone());
            let session = t.session.clone();
            let task = tokio::spawn(async move {
                // No client timeout: libpod 4.3 does not end a hanging check, and the call
                // ends when the check does (or the container stops).
                let outcome = match podman.containers().get(container.as_str()).healthcheck().await {
                    Ok(result) => {
                        debug!(session = %session, result = ?result.status, "Health check ran.");
                        Outcome::Ran
                    }
                    Err(e) => match status_of(&e).map(|s| s.as_u16()) {
                        Some(404 | 409) => Outcome::NotRunning,
                        _ => Outcome::Failed(e.to_string()),
                    },
                };
                let _ = done.send((container, outcome));
            });
            t.in_flight = Some((now, task));
        }
    }

    fn finished(&mut self, container: &str, outcome: Outcome) {
        let Some(t) = self.tracked.get_mut(container) else { return };
        t.in_flight = None;
        t.next_due = Instant::now() + t.timing.map_or(LIST_EVERY, |timing| timing.interval);
        set_hung(container, false);
        match outcome {
            Outcome::Ran => {}
            Outcome::NotRunning => self.forget(container),
            Outcome::Failed(error) => {
                debug!(container, %error, "Health check call failed; retrying at the next interval.")
            }
        }
    }

    /// Turns checks hung past their timeout into the unhealthy overlay.
    fn judge_hung_checks(&self) {
        let now = OffsetDateTime::now_utc();
        for (id, t) in &self.tracked {
            let (Some((since, _)), Some(timing)) = (&t.in_flight, &t.timing) else { continue };
            let counts = now >= t.started_at + timing.start_period;
            let failures = if counts { hung_failures(since.elapsed(), timing) } else { 0 };
            let hung = failures >= timing.retries;
            if set_hung(id, hung) && hung {
                warn!(
                    session = %t.session,
                    timeout_ms = timing.timeout.as_millis() as u64,
                    "Health check hangs past its timeout (libpod 4.3 does not end it); the session reads unhealthy."
                );
                let _ = self
                    .events
                    .send(BackendEvent::HealthChanged { session: t.session.clone(), health: SessionHealth::Unhealthy });
            }
        }
    }

    fn forget(&mut self, container: &str) {
        if let Some(t) = self.tracked.remove(container) {
            if let Some((_, task)) = t.in_flight {
                task.abort();
            }
        }
        release(container, self.id);
        set_hung(container, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(interval_ms: u64, timeout_ms: u64, retries: u32) -> CheckTiming {
        CheckTiming {
            interval: Duration::from_millis(interval_ms),
            timeout: Duration::from_millis(timeout_ms),
            retries,
            start_period: Duration::ZERO,
        }
    }

    #[test]
    fn the_backend_drives_checks_only_on_a_local_host_without_systemd() {
        let nowhere = Path::new("/nonexistent/run/systemd/system");
        assert_eq!(HealthScheduling::detect(true, nowhere), HealthScheduling::Backend);
        assert_eq!(HealthScheduling::detect(false, nowhere), HealthScheduling::Engine, "a remote host is unknown");
        let exists = std::env::temp_dir();
        assert_eq!(HealthScheduling::detect(true, &exists), HealthScheduling::Engine);
    }

    #[test]
    fn a_hung_check_counts_one_failure_at_its_timeout_and_one_per_interval_after() {
        let t = timing(1000, 2000, 3);
        assert_eq!(hung_failures(Duration::from_millis(1500), &t), 0);
        assert_eq!(hung_failures(Duration::from_millis(2001), &t), 1);
        assert_eq!(hung_failures(Duration::from_millis(3001), &t), 2);
        assert_eq!(hung_failures(Duration::from_millis(4500), &t), 3);
    }

    #[test]
    fn a_container_is_overdue_only_well_after_its_checks_were_due() {
        let t = timing(1000, 3000, 2);
        let started = OffsetDateTime::now_utc();
        assert!(!overdue(started, &t, started + Duration::from_secs(10)));
        assert!(overdue(started, &t, started + Duration::from_secs(20)));
    }

    #[test]
    fn a_container_is_driven_by_one_driver_at_a_time() {
        let id = "claim-test-container";
        assert!(claim(id, 1));
        assert!(claim(id, 1));
        assert!(!claim(id, 2));
        release(id, 2);
        assert!(!claim(id, 2), "only the owner releases");
        release(id, 1);
        assert!(claim(id, 2));
        release(id, 2);
        assert!(set_hung(id, true));
        assert_eq!(overlay(id), Some(SessionHealth::Unhealthy));
        assert!(!set_hung(id, true));
        assert!(set_hung(id, false));
        assert_eq!(overlay(id), None);
    }
}
