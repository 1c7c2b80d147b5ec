//! Reconcile: compare what the store says with what the engine has, and act.
//!
//! Rules:
//! - A live record whose session exited: exit 0 → stopped, non-zero or OOM → failed; a
//!   session stopped on purpose → stopped whatever its code. The exit is written to the
//!   run row before anything may remove the container.
//! - A session stopped, killed or removed from outside (the engine told of a signal
//!   agentd did not send, the main process ended by SIGTERM or SIGKILL, or the container
//!   is gone) → failed, "stopped from outside", whatever its exit code. A successful
//!   exit of an agent that should run is recorded only once it is [`EXIT_SETTLE`] old,
//!   so that a forced removal racing the exit, or the engine's word of a signal, is seen
//!   first: the same outside action always gives the same record.
//! - A live record without a session → failed, "stopped from outside" (the run's error:
//!   "session disappeared").
//! - A pending record left by a crash is resolved: a running session is adopted, a created
//!   one is started, a missing one fails.
//! - Engine unavailable → nothing changes; the pass reports the error and is retried.
//! - Health is recorded, and with `on_unhealthy = restart` acted on. A frozen (paused)
//!   container is live; the change is recorded. Losing agentd's own attach to an agent
//!   is never a reason to restart it: its conversation task attaches again.
//! - Orphans (sessions of this prefix and instance with no record) older than the
//!   creation grace are removed, or only reported in dry-run mode.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use backend_core::{ExecutionBackend, SessionExitInfo, SessionHealth, SessionState, SessionStatus, LABEL_AGENT_ID};
use time::OffsetDateTime;
use tracing::{debug, warn};

use crate::manager::{lock, short, Runtime};
use crate::metrics::Metrics;
use crate::model::{Agent, AgentStatus, Desired, EndedBy, EventKind, LifecycleEvent, RestartPolicy, UnhealthyAction};
use crate::{AgentManager, ManagerError, Result};

/// What one reconcile pass saw and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReconcileReport {
    /// Agents looked at.
    pub agents: usize,
    /// Sessions the snapshot listed.
    pub sessions: usize,
    /// Agents whose status, health or run changed.
    pub changed: usize,
    /// Agents skipped because an operation on them was in flight.
    pub busy: usize,
    /// Restarts performed.
    pub restarted: usize,
    /// Orphans removed.
    pub orphans_removed: usize,
    /// Orphans found but left: younger than the grace, or dry run.
    pub orphans_kept: usize,
    /// Agents whose reconciliation failed (logged), to be retried next pass.
    pub errors: usize,
}

enum Outcome {
    Unchanged,
    Changed,
    /// Something that takes a grace period (a stop, a restart): done after the pass,
    /// concurrently, so the pass and its lock stay short.
    Act(Action),
}

/// A slow action a pass decided on.
#[derive(Debug, Clone)]
pub(crate) enum Action {
    /// Restart a live agent that is unhealthy for too long.
    Liveness { why: String, run_since: OffsetDateTime, container: Option<String> },
    /// Start an ended agent again, as its restart policy scheduled.
    Policy,
    /// Finish a stop that failed half-way (the agent should not run).
    FinishStop,
    /// Stop a container that runs although its agent was stopped.
    StopStray,
}

/// How many slow actions run at once after a pass.
const ACTION_CONCURRENCY: usize = 16;

/// How long a successful exit of an agent that should run waits before it is recorded,
/// for a forced removal racing it (Podman's `rm -f` sends SIGTERM, and the echo agent
/// exits 0 on it) or the engine's word of a signal to show.
pub(crate) const EXIT_SETTLE: Duration = Duration::from_secs(2);

/// The signals engines stop and kill containers with: a main process that ended by one
/// of them was ended from outside (a container's PID 1 cannot be sent them from inside).
const STOP_SIGNALS: [i32; 2] = [9, 15];

impl<B: ExecutionBackend + ?Sized + 'static> AgentManager<B> {
    /// Runs one reconcile pass over every agent and every owned session.
    ///
    /// Costs one backend snapshot (agents are read from the store's memory) when nothing
    /// changed. When the engine is unavailable the pass changes nothing and returns the
    /// error. Restarts and stops the pass decides on run after it, concurrently.
    pub async fn reconcile(&self) -> Result<ReconcileReport> {
        let (mut report, actions) = self.reconcile_decide().await?;
        report.restarted += self.run_actions(actions).await;
        Ok(report)
    }

    /// One pass, without its slow actions: they are returned, for the caller to run (the
    /// supervision loop runs them in tasks of their own, so that no pass waits for them).
    pub(crate) async fn reconcile_decide(&self) -> Result<(ReconcileReport, Vec<(String, Action)>)> {
        let (outcome, actions) = {
            let _pass = self.pass_lock.lock().await;
            if self.shutting_down.load(std::sync::atomic::Ordering::SeqCst) {
                return Ok((ReconcileReport::default(), Vec::new()));
            }
            let started = Instant::now();
            let mut actions = Vec::new();
            let outcome = self.reconcile_pass(&mut actions).await;
            self.record_pass(&outcome, started);
            (outcome, actions)
        };
        Ok((outcome?, actions))
    }

    fn record_pass(&self, outcome: &Result<ReconcileReport>, started: Instant) {
        match outcome {
            Ok(report) => {
                self.health.pass_succeeded(self.now());
                Metrics::add(&self.metrics.reconcile_passes);
                let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                self.metrics.last_pass_micros.store(micros, std::sync::atomic::Ordering::Relaxed);
                debug!(
                    agents = report.agents,
                    sessions = report.sessions,
                    changed = report.changed,
                    micros,
                    "Reconcile pass done."
                );
            }
            Err(e) => {
                Metrics::add(&self.metrics.reconcile_failures);
                if e.is_engine_unavailable() {
                    Metrics::add(&self.metrics.engine_errors);
                    self.health.engine_failed(self.now(), e.to_string());
                }
                warn!(error = %e, "Reconcile pass failed; nothing was changed and it will be retried.");
            }
        }
    }

    /// Runs the slow actions passes decided on, at most [`ACTION_CONCURRENCY`] at once,
    /// each under its agent's lock and after checking it still applies. Returns how many
    /// restarts were performed.
    async fn run_actions(&self, actions: Vec<(String, Action)>) -> usize {
        use futures_util::stream::{self, StreamExt};
        stream::iter(actions)
            .map(|(id, action)| async move {
                match self.run_action(&id, action).await {
                    Ok(restarted) => usize::from(restarted),
                    Err(e) => {
                        warn!(agent_id = %id, error = %e, "Supervision action failed; the next pass looks again.");
                        0
                    }
                }
            })
            .buffer_unordered(ACTION_CONCURRENCY)
            .fold(0, |sum, n| async move { sum + n })
            .await
    }

    pub(crate) async fn run_action(&self, id: &str, action: Action) -> Result<bool> {
        let _op = self.ops.read().await;
        if self.shutting_down.load(std::sync::atomic::Ordering::SeqCst) {
            // Shutdown stops every live agent and removes every container itself.
            return Ok(false);
        }
        let _guard = self.lock_agent(id).await;
        let Some(mut agent) = self.store.cached_agent(id) else {
            return Ok(false);
        };
        let now = self.now();
        let live = matches!(agent.status, AgentStatus::Running | AgentStatus::Pending);
        let stopping = self.shutting_down.load(std::sync::atomic::Ordering::SeqCst);
        match action {
            // Still the same run, and still unhealthy.
            Action::Liveness { why, run_since, container }
                if live
                    && agent.desired.is_running()
                    && !stopping
                    && agent.container_id == container
                    && agent.health == SessionHealth::Unhealthy =>
            {
                self.liveness_restart(&mut agent, &why, run_since, now).await
            }
            Action::Policy
                if !live
                    && !stopping
                    && agent.desired.is_running()
                    && agent.next_restart_at.is_some_and(|d| d <= now) =>
            {
                self.restart_by_policy(&mut agent).await
            }
            Action::FinishStop if live && !agent.desired.is_running() => {
                self.stop_locked(&mut agent, EndedBy::Stop).await?;
                Ok(false)
            }
            Action::StopStray if !live && !agent.desired.is_running() => {
                warn!(agent_id = %agent.id, agent = %agent.name, "Stopped agent's container runs again; stopping it.");
                let grace = Duration::from_secs(agent.spec.stop_grace_secs);
                self.backend.stop_session(&agent.session, grace).await?;
                Ok(false)
            }
            // The agent changed meanwhile: the action no longer applies.
            _ => Ok(false),
        }
    }

    async fn reconcile_pass(&self, actions: &mut Vec<(String, Action)>) -> Result<ReconcileReport> {
        // Snapshot first, records second: a session in the snapshot whose spawn is in
        // flight already has its record, so it is never taken for an orphan.
        let snapshot = self.backend.snapshot().await?;
        let agents = self.store.list_agents_versioned(None);
        let now = self.now();
        let mut report =
            ReconcileReport { agents: agents.len(), sessions: snapshot.len(), ..ReconcileReport::default() };
        let by_session: HashMap<&str, &SessionState> = snapshot.iter().map(|s| (s.session.as_str(), s)).collect();
        let known: HashSet<String> = agents.iter().map(|(a, _)| a.session.clone()).collect();
        // Wake-ups set from now on (by operations during the pass) are kept and merged.
        lock(&self.next_wakeup).take();
        let mut wakeup: Option<OffsetDateTime> = None;
        let mut skipped = false;
        for (mut agent, version) in agents {
            let Some(_guard) = self.try_lock_agent(&agent.id) else {
                report.busy += 1;
                skipped = true;
                continue;
            };
            // An operation that finished between the snapshot and the lock changed the
            // record: the snapshot predates it, so leave the agent to the next pass.
            if !self.store.is_current(&agent.id, version) {
                report.busy += 1;
                skipped = true;
                continue;
            }
            let observed = by_session.get(agent.session.as_str()).copied();
            match self.reconcile_agent(&mut agent, observed, now).await {
                Ok(Outcome::Unchanged) => {}
                Ok(Outcome::Changed) => report.changed += 1,
                Ok(Outcome::Act(action)) => {
                    report.changed += 1;
                    actions.push((agent.id.clone(), action));
                }
                Err(e) if e.is_engine_unavailable() => return Err(e),
                Err(e) => {
                    report.errors += 1;
                    warn!(agent_id = %agent.id, agent = %agent.name, error = %e, "Could not reconcile agent; will retry.");
                }
            }
            if let Some(due) = self.due_time(&agent) {
                wakeup = Some(wakeup.map_or(due, |w| w.min(due)));
            }
        }
        if skipped {
            // What the snapshot showed of a skipped agent is not lost with this pass's
            // cleared wake-up: look again shortly, not at the next periodic relist.
            let soon = now + std::time::Duration::from_secs(1);
            wakeup = Some(wakeup.map_or(soon, |w| w.min(soon)));
        }
        if let Some(at) = wakeup {
            self.wake_at(at);
        }
        for state in snapshot.iter().filter(|s| !known.contains(&s.session)) {
            match self.handle_orphan(state, now).await {
                Ok(true) => report.orphans_removed += 1,
                Ok(false) => report.orphans_kept += 1,
                // The agents' changes above are applied; one orphan must not undo the pass.
                Err(e) => {
                    report.errors += 1;
                    warn!(session = %state.session, error = %e, "Could not handle an orphaned session; the next pass tries again.");
                }
            }
        }
        // Forget the reports of orphans that are gone: one that comes back is news again,
        // and the set stays as small as the orphans are few.
        lock(&self.reported_orphans).retain(|s| by_session.contains_key(s.as_str()) && !known.contains(s));
        self.sweep_orphan_volumes(now, &mut report).await;
        Ok(report)
    }

    /// Removes owned volumes whose agent has no record and that are older than the
    /// orphan grace (or reports them, in dry-run mode). Runs at most once a minute: a
    /// pass otherwise costs one snapshot. A failure is logged and counted; the next
    /// sweep tries again.
    async fn sweep_orphan_volumes(&self, now: OffsetDateTime, report: &mut ReconcileReport) {
        {
            let mut last = lock(&self.last_volume_sweep);
            if last.is_some_and(|at| now - at < time::Duration::minutes(1)) {
                return;
            }
            *last = Some(now);
        }
        let volumes = match self.backend.list_volumes().await {
            Ok(volumes) => volumes,
            Err(backend_core::BackendError::Unsupported { .. }) => return,
            Err(e) => {
                report.errors += 1;
                warn!(error = %e, "Could not list volumes to look for orphans; the next sweep tries again.");
                return;
            }
        };
        {
            let listed: HashSet<&str> = volumes.iter().map(|v| v.name.as_str()).collect();
            lock(&self.reported_orphan_volumes).retain(|name| listed.contains(name.as_str()));
        }
        let cfg = &self.config.reconcile;
        for volume in volumes {
            let owner = volume.agent_id().map(str::to_owned);
            if owner.as_deref().is_some_and(|id| self.store.cached_agent(id).is_some()) {
                continue;
            }
            let age = volume.created_at.map_or(time::Duration::ZERO, |c| now - c);
            if age < cfg.orphan_grace {
                continue;
            }
            let agent_id = owner.unwrap_or_else(|| volume.name.clone());
            let (kind, detail) = if cfg.orphan_dry_run {
                if !lock(&self.reported_orphan_volumes).insert(volume.name.clone()) {
                    continue;
                }
                (
                    EventKind::OrphanFound,
                    format!("volume {} ({}s old) has no agent; dry run, not removed", volume.name, age.whole_seconds()),
                )
            } else {
                if let Err(e) = self.backend.remove_volume(&volume.name).await {
                    report.errors += 1;
                    warn!(volume = %volume.name, error = %e, "Could not remove an orphaned volume.");
                    continue;
                }
                Metrics::add(&self.metrics.orphans_removed);
                report.orphans_removed += 1;
                (
                    EventKind::OrphanRemoved,
                    format!("volume {} ({}s old) had no agent; removed", volume.name, age.whole_seconds()),
                )
            };
            let event =
                LifecycleEvent { id: 0, agent_id, agent_name: None, kind, from: None, to: None, detail, at: now };
            match self.store.insert_event(&event).await {
                Ok(stored) => self.announce(stored, &volume.name, None),
                Err(e) => warn!(error = %e, "Could not record an orphaned volume."),
            }
        }
    }

    /// Reconciles the one session an engine event was about.
    pub async fn reconcile_session(&self, session: &str) -> Result<()> {
        if let Some(action) = self.reconcile_session_decide(session).await? {
            self.run_actions(vec![action]).await;
        }
        Ok(())
    }

    /// [`Self::reconcile_session`] without the slow action: it is returned, for the
    /// caller to run.
    pub(crate) async fn reconcile_session_decide(&self, session: &str) -> Result<Option<(String, Action)>> {
        let action = {
            let _pass = self.pass_lock.lock().await;
            if self.shutting_down.load(std::sync::atomic::Ordering::SeqCst) {
                return Ok(None);
            }
            let Some(found) = self.store.find_agent_by_session(session) else {
                return Ok(None);
            };
            let Some(_guard) = self.try_lock_agent(&found.id) else {
                // An operation holds the agent: look again shortly, not at the next relist.
                self.wake_at(self.now() + std::time::Duration::from_secs(1));
                return Ok(None);
            };
            let Some(mut agent) = self.store.cached_agent(&found.id) else {
                return Ok(None);
            };
            let state = self.backend.session_state(session).await?;
            let observed = (state.status != SessionStatus::Missing).then_some(&state);
            let outcome = self.reconcile_agent(&mut agent, observed, self.now()).await?;
            if let Some(due) = self.due_time(&agent) {
                self.wake_at(due);
            }
            match outcome {
                Outcome::Act(action) => Some((agent.id.clone(), action)),
                _ => None,
            }
        };
        Ok(action)
    }

    /// When the manager must look at this agent again without being told: a scheduled
    /// restart, or the end of an unhealthy grace.
    fn due_time(&self, agent: &Agent) -> Option<OffsetDateTime> {
        if agent.desired.is_running() && matches!(agent.status, AgentStatus::Stopped | AgentStatus::Failed) {
            return agent.next_restart_at;
        }
        if agent.status != AgentStatus::Running {
            return None;
        }
        let rt = lock(&self.runtime).get(&agent.id).cloned()?;
        if let Some(seen) = rt.exit_seen {
            return Some(seen + EXIT_SETTLE);
        }
        let cfg = &self.config.reconcile;
        let extra = self.liveness_backoff(agent);
        if agent.spec.on_unhealthy != UnhealthyAction::Restart {
            return None;
        }
        rt.unhealthy_since.map(|since| since + cfg.unhealthy_grace + extra)
    }

    /// Applies the rules to one agent. The caller holds the agent's lock.
    async fn reconcile_agent(
        &self,
        agent: &mut Agent,
        observed: Option<&SessionState>,
        now: OffsetDateTime,
    ) -> Result<Outcome> {
        let status = observed.map_or(SessionStatus::Missing, |s| s.status);
        match (agent.status, status) {
            (AgentStatus::Running | AgentStatus::Pending, SessionStatus::Running | SessionStatus::Paused) => {
                let state = observed.ok_or_else(|| ManagerError::Conflict("running session without state".into()))?;
                self.check_live(agent, state, now).await
            }
            (AgentStatus::Running | AgentStatus::Pending, SessionStatus::Exited) => {
                let listed = observed.and_then(|s| s.exit.clone());
                let exit = match listed {
                    Some(exit) => Some(exit),
                    None => self.backend.session_exit_info(&agent.session).await?,
                };
                match exit {
                    Some(exit) => {
                        if let Some(until) = self.settling(agent, &exit, now) {
                            self.wake_at(until);
                            return Ok(Outcome::Unchanged);
                        }
                        self.record_end(agent, exit, EndedBy::Itself, now).await
                    }
                    None => self.record_vanished(agent, now).await,
                }
            }
            (AgentStatus::Running | AgentStatus::Pending, SessionStatus::Missing) => {
                self.record_vanished(agent, now).await
            }
            (AgentStatus::Running | AgentStatus::Pending, SessionStatus::Created) => {
                if self.store.open_run(&agent.id).await?.is_none() {
                    self.store.start_run(agent, now).await?;
                }
                if !agent.desired.is_running() {
                    // A spawn interrupted and then stopped: it never ran; clear it away.
                    self.backend.remove_session(&agent.session).await?;
                    let exit = SessionExitInfo {
                        error: Some("stopped before its container started".into()),
                        finished_at: Some(now),
                        ..SessionExitInfo::default()
                    };
                    agent.reason = exit.error.clone();
                    agent.container_id = None;
                    let detail = agent.reason.clone().unwrap_or_default();
                    self.transition(
                        agent,
                        AgentStatus::Stopped,
                        EventKind::Stopped,
                        detail,
                        Some((&exit, EndedBy::Stop)),
                    )
                    .await?;
                    return Ok(Outcome::Changed);
                }
                // A spawn interrupted between create and start: finish it.
                if let Err(e) = self.backend.start_session(&agent.session).await {
                    if e.is_retryable() {
                        return Err(e.into());
                    }
                    let exit = SessionExitInfo {
                        error: Some(format!("start failed: {e}")),
                        finished_at: Some(now),
                        ..SessionExitInfo::default()
                    };
                    agent.reason = exit.error.clone();
                    self.schedule_restart(agent, true, now).await?;
                    let detail = agent.reason.clone().unwrap_or_default();
                    self.transition(
                        agent,
                        AgentStatus::Failed,
                        EventKind::Failed,
                        detail,
                        Some((&exit, EndedBy::StartError)),
                    )
                    .await?;
                    self.announce_schedule(agent).await?;
                    return Ok(Outcome::Changed);
                }
                self.remember_run(agent, observed.map(|s| s.id.clone()).unwrap_or_default(), now);
                let detail = "interrupted spawn completed: container started".to_owned();
                self.transition(agent, AgentStatus::Running, EventKind::Started, detail, None).await?;
                Ok(Outcome::Changed)
            }
            (AgentStatus::Stopped | AgentStatus::Failed, SessionStatus::Running | SessionStatus::Paused) => {
                if !agent.desired.is_running() {
                    // Started from outside after a stop: converge on what the user asked.
                    return Ok(Outcome::Act(Action::StopStray));
                }
                // The agent should run and its container does (a start that timed out but
                // happened, for example): adopt it rather than leave it unsupervised.
                agent.next_restart_at = None;
                let state = observed.ok_or_else(|| ManagerError::Conflict("running session without state".into()))?;
                self.check_live(agent, state, now).await
            }
            (AgentStatus::Stopped | AgentStatus::Failed, _) => match agent.next_restart_at {
                Some(due) if agent.desired.is_running() && due <= now => Ok(Outcome::Act(Action::Policy)),
                _ => Ok(Outcome::Unchanged),
            },
        }
    }

    fn remember_run(&self, agent: &Agent, container: String, since: OffsetDateTime) {
        lock(&self.runtime).insert(agent.id.clone(), Runtime::new(container, since));
    }

    /// A live session: adoption, health, freezing, stop convergence, the conversation.
    async fn check_live(&self, agent: &mut Agent, state: &SessionState, now: OffsetDateTime) -> Result<Outcome> {
        let mut outcome = Outcome::Unchanged;
        let known = lock(&self.runtime).get(&agent.id).is_some_and(|rt| rt.container == state.id);
        if !known {
            // A running container this process did not start: adopt it (after a
            // leave-running shutdown, or a crash).
            self.remember_run(agent, state.id.clone(), now);
            if self.store.open_run(&agent.id).await?.is_none() {
                self.store.start_run(agent, now).await?;
            }
            agent.container_id = Some(state.id.clone());
            let detail = format!("running container {} adopted", short(&state.id));
            self.transition(agent, AgentStatus::Running, EventKind::Adopted, detail, None).await?;
            outcome = Outcome::Changed;
        }
        if !agent.desired.is_running() {
            // A stop that failed half-way (engine unavailable): finish it.
            return Ok(Outcome::Act(Action::FinishStop));
        }
        if state.health != agent.health {
            let detail = format!("{} -> {}", agent.health, state.health);
            agent.health = state.health;
            let status = agent.status;
            self.transition(agent, status, EventKind::HealthChanged, detail, None).await?;
            outcome = Outcome::Changed;
        }
        self.ensure_conversation(agent);
        let paused = state.status == SessionStatus::Paused;
        let (unhealthy_since, run_since, pause_changed) = {
            let mut runtime = lock(&self.runtime);
            let rt =
                runtime.get_mut(&agent.id).ok_or_else(|| ManagerError::Conflict("runtime entry vanished".into()))?;
            // Live again (started from outside after the exit a pass saw): no exit waits.
            rt.exit_seen = None;
            rt.unhealthy_since = match state.health {
                SessionHealth::Unhealthy => Some(rt.unhealthy_since.unwrap_or(now)),
                _ => None,
            };
            let changed = rt.paused != paused;
            rt.paused = paused;
            (rt.unhealthy_since, rt.since, changed)
        };
        if pause_changed {
            let (kind, detail) = if paused {
                (EventKind::Paused, "the engine froze the container: it reads and writes nothing; messages wait")
            } else {
                (EventKind::Unpaused, "the container runs again")
            };
            self.record(agent, kind, Some(agent.status), Some(agent.status), detail.to_owned()).await?;
            if !paused {
                self.conversations.wake(&agent.id);
            }
            outcome = Outcome::Changed;
        }
        let cfg = &self.config.reconcile;
        // Restarts for liveness back off like crash loops: each one in a row waits longer.
        let extra = self.liveness_backoff(agent);
        if let Some(since) = unhealthy_since {
            if agent.spec.on_unhealthy == UnhealthyAction::Restart && now - since >= cfg.unhealthy_grace + extra {
                let why = format!("unhealthy for {}s", (now - since).whole_seconds());
                let container = agent.container_id.clone();
                return Ok(Outcome::Act(Action::Liveness { why, run_since, container }));
            }
        }
        Ok(outcome)
    }

    /// The extra wait before a liveness restart of an agent already restarted for
    /// liveness that many times in a row.
    pub(crate) fn liveness_backoff(&self, agent: &Agent) -> std::time::Duration {
        match lock(&self.liveness_streaks).get(&agent.id).copied().unwrap_or(0) {
            0 => std::time::Duration::ZERO,
            streak => self.config.reconcile.restart_backoff.delay(streak),
        }
    }

    /// Notes that the engine was asked to signal `container` (a `Killed` event). Whether
    /// agentd asked is decided when the run's end is recorded.
    pub(crate) fn note_signalled(&self, container: &str, signal: Option<i32>) {
        let mut runtime = lock(&self.runtime);
        if let Some(rt) = runtime.values_mut().find(|rt| rt.container == container) {
            // The last signal the engine named is the one that ended the process.
            rt.signalled = Some(signal.or(rt.signalled.flatten()));
        }
    }

    /// Whether a successful exit of an agent that should run must wait before it is
    /// recorded; if so, until when.
    fn settling(&self, agent: &Agent, exit: &SessionExitInfo, now: OffsetDateTime) -> Option<OffsetDateTime> {
        if !agent.desired.is_running() || !exit.is_success() {
            return None;
        }
        let mut runtime = lock(&self.runtime);
        let rt = runtime.get_mut(&agent.id).filter(|rt| Some(&rt.container) == agent.container_id.as_ref())?;
        if rt.signalled.is_some() {
            return None;
        }
        let until = *rt.exit_seen.get_or_insert(now) + EXIT_SETTLE;
        (now < until).then_some(until)
    }

    /// Whether the run that ended was stopped from outside: the engine told of a signal to
    /// its container, or the process ended by a stop signal (`Some(signal)` when the
    /// engine named it). Takes the note.
    fn take_signalled(&self, agent: &Agent, exit: Option<&SessionExitInfo>) -> Option<Option<i32>> {
        let noted = {
            let mut runtime = lock(&self.runtime);
            runtime
                .get_mut(&agent.id)
                .filter(|rt| Some(&rt.container) == agent.container_id.as_ref())
                .and_then(|rt| rt.signalled.take())
        };
        let by_signal = exit.is_some_and(|e| !e.oom_killed && e.signal.is_some_and(|s| STOP_SIGNALS.contains(&s)));
        noted.or(by_signal.then_some(None))
    }

    /// A run ended: record it, decide the status, and schedule a restart if the policy
    /// wants one.
    async fn record_end(
        &self,
        agent: &mut Agent,
        exit: SessionExitInfo,
        ended_by: EndedBy,
        now: OffsetDateTime,
    ) -> Result<Outcome> {
        let outside = self.take_signalled(agent, Some(&exit));
        self.record_end_as(agent, exit, ended_by, outside, now).await
    }

    /// [`Self::record_end`] with what is known of an outside stop: `Some(signal)` when the
    /// agent was stopped from outside.
    async fn record_end_as(
        &self,
        agent: &mut Agent,
        exit: SessionExitInfo,
        ended_by: EndedBy,
        outside: Option<Option<i32>>,
        now: OffsetDateTime,
    ) -> Result<Outcome> {
        let on_purpose = !agent.desired.is_running();
        let outside = if on_purpose { None } else { outside };
        if let Some(rt) = lock(&self.runtime).get_mut(&agent.id) {
            rt.exit_seen = None;
        }
        let mut exit = exit;
        if !on_purpose && outside.is_none() && !exit.is_success() && exit.error.is_none() && agent.speaks_stream_json()
        {
            // Why the CLI gave up is its last word on stderr (a refused --resume says
            // "No conversation found with session ID …"): make it the run's error.
            if let Ok(Some(said)) = self.store.last_stderr(&agent.id).await {
                exit.error = Some(format!("claude said: {said}"));
            }
        }
        let (to, kind) = if on_purpose || (outside.is_none() && exit.is_success()) {
            (AgentStatus::Stopped, EventKind::Stopped)
        } else {
            (AgentStatus::Failed, EventKind::Failed)
        };
        let ended_by = match (on_purpose, outside) {
            (true, _) => EndedBy::Stop,
            (false, Some(_)) => EndedBy::Outside,
            (false, None) => ended_by,
        };
        agent.reason = Some(match (&exit.error, on_purpose, outside) {
            (_, true, _) => format!("stopped on request; {}", exit.summary()),
            (_, false, Some(Some(signal))) => format!("stopped from outside (signal {signal})"),
            (_, false, Some(None)) => "stopped from outside".to_owned(),
            (Some(error), false, None) => format!("{}: {error}", exit.summary()),
            (None, false, None) => exit.summary(),
        });
        agent.health = SessionHealth::Unknown;
        let detail = match outside {
            // The event says how the run ended; the reason says who ended it.
            Some(_) => format!("{}; {}", agent.reason.as_deref().unwrap_or_default(), exit_detail(&exit)),
            None => agent.reason.clone().unwrap_or_default(),
        };
        self.schedule_restart(agent, to == AgentStatus::Failed, now).await?;
        self.transition(agent, to, kind, detail, Some((&exit, ended_by))).await?;
        self.announce_schedule(agent).await?;
        Ok(Outcome::Changed)
    }

    /// A live record whose session is gone without a trace: removed from outside (or, for
    /// a pending record, a spawn interrupted before its container was created).
    async fn record_vanished(&self, agent: &mut Agent, now: OffsetDateTime) -> Result<Outcome> {
        let pending = agent.status == AgentStatus::Pending;
        let reason = if pending { "spawn interrupted before its container was created" } else { "session disappeared" };
        let exit =
            SessionExitInfo { error: Some(reason.to_owned()), finished_at: Some(now), ..SessionExitInfo::default() };
        // What the engine told of a signal before the removal names it.
        let outside = if pending { None } else { Some(self.take_signalled(agent, None).flatten()) };
        agent.container_id = None;
        lock(&self.runtime).remove(&agent.id);
        if self.store.open_run(&agent.id).await?.is_none() {
            // A pending record never got a run: give the failure one, so it is kept.
            self.store.start_run(agent, now).await?;
        }
        self.record_end_as(agent, exit, EndedBy::Vanished, outside, now).await
    }

    /// Sets `next_restart_at` by the restart policy and the crash-loop backoff.
    pub(crate) async fn schedule_restart(&self, agent: &mut Agent, failed: bool, now: OffsetDateTime) -> Result<()> {
        let wanted = agent.desired.is_running()
            && match agent.spec.restart {
                RestartPolicy::Never => false,
                RestartPolicy::OnFailure => failed,
                RestartPolicy::Always => true,
            };
        if !wanted {
            agent.next_restart_at = None;
            return Ok(());
        }
        let ran_for = match self.store.open_run(&agent.id).await? {
            Some(run) => now - run.started_at,
            None => time::Duration::ZERO,
        };
        if ran_for >= self.config.reconcile.restart_backoff.reset_after {
            agent.crash_streak = 0;
        }
        agent.crash_streak += 1;
        agent.next_restart_at = Some(now + self.config.reconcile.restart_backoff.delay(agent.crash_streak));
        Ok(())
    }

    pub(crate) async fn announce_schedule(&self, agent: &Agent) -> Result<()> {
        if let Some(at) = agent.next_restart_at {
            // The wait as scheduled, not as left by now: a record written a moment after the
            // schedule would otherwise read `restarting in 9s` for a 10 s wait.
            let delay = self.config.reconcile.restart_backoff.delay(agent.crash_streak).as_secs();
            let detail = format!(
                "restart policy {}: restarting in {delay}s (attempt {})",
                agent.spec.restart, agent.crash_streak
            );
            self.record(agent, EventKind::RestartScheduled, Some(agent.status), Some(agent.status), detail).await?;
            self.wake_at(at);
        }
        Ok(())
    }

    /// Starts an ended agent again as its restart policy asked. Returns whether it did.
    async fn restart_by_policy(&self, agent: &mut Agent) -> Result<bool> {
        let due = agent.next_restart_at.take();
        let why = format!("restart policy {} (attempt {})", agent.spec.restart, agent.crash_streak);
        match self.restart_locked(agent, &why, AgentStatus::Failed).await {
            Ok(()) => Ok(true),
            Err(e) if e.is_engine_unavailable() => {
                // Nothing happened: keep the restart due, the next pass tries again.
                agent.next_restart_at = due;
                agent.updated_at = self.now();
                self.store.update_agent(agent).await?;
                Err(e)
            }
            Err(e) => {
                warn!(agent_id = %agent.id, agent = %agent.name, error = %e, "Restart failed.");
                self.retry_failed_restart(agent).await?;
                Ok(false)
            }
        }
    }

    /// A restart whose new run could not be created or started counts as another crash:
    /// schedule the next attempt (unless the failed start already did).
    async fn retry_failed_restart(&self, agent: &mut Agent) -> Result<()> {
        if agent.next_restart_at.is_some() {
            return Ok(());
        }
        let now = self.now();
        agent.desired = Desired::Running;
        self.schedule_restart(agent, true, now).await?;
        agent.updated_at = now;
        self.store.update_agent(agent).await?;
        self.announce_schedule(agent).await
    }

    /// A liveness restart. Consecutive ones back off (the streak ends when the agent
    /// connects, or after a run of the backoff's reset time). Returns whether it restarted.
    async fn liveness_restart(
        &self,
        agent: &mut Agent,
        why: &str,
        since: OffsetDateTime,
        now: OffsetDateTime,
    ) -> Result<bool> {
        {
            let mut streaks = lock(&self.liveness_streaks);
            let streak = streaks.entry(agent.id.clone()).or_default();
            if now - since >= self.config.reconcile.restart_backoff.reset_after {
                *streak = 0;
            }
            *streak += 1;
        }
        match self.restart_locked(agent, why, AgentStatus::Failed).await {
            Ok(()) => Ok(true),
            Err(e) if e.is_engine_unavailable() => {
                if !matches!(agent.status, AgentStatus::Running | AgentStatus::Pending) {
                    // The old run ended before the engine went away: the restart is still
                    // owed, so the next pass retries it.
                    agent.next_restart_at = Some(now);
                    agent.updated_at = self.now();
                    self.store.update_agent(agent).await?;
                }
                Err(e)
            }
            Err(e) => {
                warn!(agent_id = %agent.id, agent = %agent.name, error = %e, "Liveness restart failed.");
                self.retry_failed_restart(agent).await?;
                Ok(false)
            }
        }
    }

    /// Removes an orphan older than the grace (or reports it in dry-run mode). Returns
    /// whether it was removed.
    async fn handle_orphan(&self, state: &SessionState, now: OffsetDateTime) -> Result<bool> {
        let cfg = &self.config.reconcile;
        let age = state.created_at.map_or(time::Duration::ZERO, |c| now - c);
        if age < cfg.orphan_grace {
            debug!(session = %state.session, age_secs = age.whole_seconds(), "Orphan younger than the grace; left alone.");
            return Ok(false);
        }
        let agent_id = state.labels.get(LABEL_AGENT_ID).cloned().unwrap_or_else(|| state.session.clone());
        let event = |kind, detail: String| LifecycleEvent {
            id: 0,
            agent_id: agent_id.clone(),
            agent_name: None,
            kind,
            from: None,
            to: None,
            detail,
            at: now,
        };
        if cfg.orphan_dry_run {
            if lock(&self.reported_orphans).insert(state.session.clone()) {
                let detail = format!(
                    "session {} ({}, {}s old) has no record; dry run, not removed",
                    state.session,
                    state.status,
                    age.whole_seconds()
                );
                let stored = self.store.insert_event(&event(EventKind::OrphanFound, detail)).await?;
                self.announce(stored, &state.session, None);
            }
            return Ok(false);
        }
        self.backend.remove_session(&state.session).await?;
        Metrics::add(&self.metrics.orphans_removed);
        let detail = format!(
            "session {} ({}, {}s old) had no record; removed",
            state.session,
            state.status,
            age.whole_seconds()
        );
        let stored = self.store.insert_event(&event(EventKind::OrphanRemoved, detail)).await?;
        self.announce(stored, &state.session, None);
        Ok(true)
    }

    /// Makes the supervisor wake at `at` at the latest.
    pub(crate) fn wake_at(&self, at: OffsetDateTime) {
        {
            let mut next = lock(&self.next_wakeup);
            *next = Some(next.map_or(at, |w| w.min(at)));
        }
        self.wakeup_changed.notify_one();
    }

    /// The next time a pass must run for a scheduled restart or a grace period to end.
    pub fn next_wakeup(&self) -> Option<OffsetDateTime> {
        *lock(&self.next_wakeup)
    }
}

/// How a run ended, for an event's detail: the exit summary, with the error if any.
fn exit_detail(exit: &SessionExitInfo) -> String {
    match &exit.error {
        Some(error) => format!("{}: {error}", exit.summary()),
        None => exit.summary(),
    }
}
