//! The supervision loop: one loop per daemon that reconciles on every backend event,
//! periodically, and when a scheduled restart or grace period is due. Its passes are
//! serialised and short; the slow work they decide on (stops and restarts, each with its
//! grace period) runs in tasks the loop owns, so that no pass and no event waits for it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use backend_core::{BackendEvent, EventReceiver, ExecutionBackend};
use time::OffsetDateTime;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::conversation::task::RestartRequest;
use crate::metrics::Metrics;
use crate::reconcile::Action;
use crate::AgentManager;

/// More distinct sessions than this in one burst of events: relist instead.
const EVENT_BURST_RELIST: usize = 64;
const RESUBSCRIBE_MIN: Duration = Duration::from_millis(500);
const RESUBSCRIBE_MAX: Duration = Duration::from_secs(30);
/// The least time between two passes that are not periodic relists.
const MIN_GAP: Duration = Duration::from_millis(250);
/// The least time before the next such pass when what fell due waits for an action in
/// flight.
const BUSY_GAP: Duration = Duration::from_secs(1);
/// How many slow actions (stops, restarts) run at once.
const ACTION_CONCURRENCY: usize = 16;
/// How often old events are pruned (by the manager's clock), besides once at start.
const PRUNE_EVERY: time::Duration = time::Duration::hours(1);

/// The loop's slow work in flight: the actions passes decided on, the restarts
/// conversation tasks asked for, and the events prune. Each runs in a task of its own.
struct Work {
    tasks: JoinSet<()>,
    /// The agent each action task is about.
    action_of: HashMap<tokio::task::Id, String>,
    /// Agents with an action queued or running. Another action a pass decides for one
    /// of them is dropped: the pass after the one in flight looks at the agent again.
    busy: HashSet<String>,
    /// Bounds the actions and restarts that run at once.
    permits: Arc<Semaphore>,
    pruning: Option<tokio::task::Id>,
}

impl Work {
    fn new() -> Self {
        Self {
            tasks: JoinSet::new(),
            action_of: HashMap::new(),
            busy: HashSet::new(),
            permits: Arc::new(Semaphore::new(ACTION_CONCURRENCY)),
            pruning: None,
        }
    }

    /// Forgets a finished task.
    fn finished(&mut self, id: tokio::task::Id) {
        if let Some(agent) = self.action_of.remove(&id) {
            self.busy.remove(&agent);
        }
        if self.pruning == Some(id) {
            self.pruning = None;
        }
    }
}

impl<B: ExecutionBackend + ?Sized + 'static> AgentManager<B> {
    /// Supervises until `stop` turns true: one pass now, then a pass per event burst, one
    /// every `reconcile.interval`, and one whenever a restart or grace period is due. A
    /// closed event stream is resubscribed with backoff, followed by a full relist (events
    /// may have been lost meanwhile). Once the engine answers again after an outage (a
    /// pass succeeds), the stream is resubscribed at once, whatever the backoff had grown
    /// to. The stops and restarts passes decide on run in tasks of the loop's own (at most
    /// [`ACTION_CONCURRENCY`] at once), so that events keep being handled meanwhile; when
    /// the loop stops, those in flight run to their end (shutdown waits for them). Stored
    /// events older than the retention are pruned at start and hourly.
    pub async fn supervise(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        // Marks the loop dead for `health` when it returns or panics.
        let _supervising = crate::health::Supervising::start(&self.health);
        let interval = self.config.reconcile.interval;
        let mut events: Option<EventReceiver> = None;
        let mut subscribe_at = Some(Instant::now());
        let mut resubscribe_delay = RESUBSCRIBE_MIN;
        let mut subscribed_before = false;
        // Whether the backend has an event stream at all (it says so when subscribed).
        let mut has_events = true;
        // Set by a call that found the engine unavailable, cleared by one it answered.
        let mut engine_down = false;
        // Passes that are not a periodic relist (due wake-ups, retries) keep at least this
        // far apart: after a failed pass it doubles up to the relist interval, so an
        // unreachable engine is not hammered.
        let mut gap = MIN_GAP;
        let mut next_allowed = Instant::now();
        let mut first_pass = true;
        let mut next_relist = Instant::now();
        let mut next_prune: Option<OffsetDateTime> = None;
        let mut restarts = crate::manager::lock(&self.restart_rx).take();
        let mut work = Work::new();
        loop {
            if *stop.borrow() {
                break;
            }
            // Subscribe before the first pass, so no event falls between the two.
            if events.is_none() && subscribe_at.is_some_and(|at| at <= Instant::now()) {
                match self.backend.subscribe_events().await {
                    Ok(Some(rx)) => {
                        events = Some(rx);
                        subscribe_at = None;
                        resubscribe_delay = RESUBSCRIBE_MIN;
                        engine_down = false;
                        if subscribed_before {
                            info!("Backend event stream resubscribed; relisting.");
                            Metrics::add(&self.metrics.relists_after_resync);
                            next_relist = Instant::now();
                        }
                        subscribed_before = true;
                    }
                    Ok(None) => {
                        debug!(backend = self.backend.name(), "Backend has no event stream; relisting only.");
                        subscribe_at = None;
                        has_events = false;
                    }
                    Err(e) => {
                        Metrics::add(&self.metrics.engine_errors);
                        engine_down |= e.is_retryable();
                        warn!(error = %e, retry_in_ms = resubscribe_delay.as_millis() as u64, "Could not subscribe to backend events.");
                        subscribe_at = Some(Instant::now() + resubscribe_delay);
                        resubscribe_delay = (resubscribe_delay * 2).min(RESUBSCRIBE_MAX);
                    }
                }
            }
            if self.config.events_retention.is_some() && work.pruning.is_none() {
                let now = self.now();
                if next_prune.is_none_or(|at| at <= now) {
                    next_prune = Some(now + PRUNE_EVERY);
                    self.queue_prune(&mut work);
                }
            }
            let mut wake = next_relist;
            if let Some(due) = self.next_wakeup() {
                let wait = Duration::try_from(due - self.now()).unwrap_or(Duration::ZERO);
                wake = wake.min((Instant::now() + wait).max(next_allowed));
            }
            if let Some(at) = subscribe_at {
                wake = wake.min(at);
            }
            // A pass's outcome, when one ran: whether the engine answered.
            let mut answered: Option<bool> = None;
            tokio::select! {
                _ = stop.changed() => {}
                // An earlier wake-up was scheduled meanwhile: recompute the sleep.
                _ = self.wakeup_changed.notified() => {}
                _ = tokio::time::sleep_until(wake) => {
                    let now = Instant::now();
                    let due = now >= next_allowed && self.next_wakeup().is_some_and(|d| d <= self.now());
                    if now >= next_relist || due || first_pass {
                        first_pass = false;
                        let outcome = self.reconcile_decide().await;
                        let ok = outcome.is_ok();
                        match outcome {
                            Ok((_, actions)) => {
                                answered = Some(true);
                                if self.queue_actions(&mut work, actions) > 0 {
                                    // What fell due waits for an action in flight: look
                                    // again in a second, not at every gap.
                                    next_allowed = next_allowed.max(Instant::now() + BUSY_GAP);
                                }
                            }
                            Err(e) if e.is_engine_unavailable() => answered = Some(false),
                            Err(_) => {}
                        }
                        gap = if ok { MIN_GAP } else { (gap * 2).max(Duration::from_secs(1)).min(interval) };
                        next_allowed = next_allowed.max(Instant::now() + gap);
                        // A failed relist is retried after the gap, not a whole interval.
                        next_relist = Instant::now() + if ok { interval } else { gap };
                    }
                }
                request = recv_restart(&mut restarts) => match request {
                    Some(request) => self.queue_restart(&mut work, request),
                    None => restarts = None,
                },
                event = recv(&mut events) => match event {
                    Some(first) => {
                        // The stream delivers: it is up, whatever the passes saw.
                        engine_down = false;
                        let (actions, outcome) = self.handle_events(first, events.as_mut()).await;
                        answered = outcome;
                        let _ = self.queue_actions(&mut work, actions);
                    }
                    None => {
                        warn!("Backend event stream ended; resubscribing.");
                        events = None;
                        subscribe_at = Some(Instant::now() + resubscribe_delay);
                    }
                },
                Some(done) = work.tasks.join_next_with_id(), if !work.tasks.is_empty() => {
                    let id = match done {
                        Ok((id, ())) => id,
                        Err(e) => {
                            error!(error = %e, "A supervision task failed; the next pass looks at its agent again.");
                            e.id()
                        }
                    };
                    work.finished(id);
                }
            }
            match answered {
                Some(false) => engine_down = true,
                Some(true) if engine_down => {
                    // The engine answers again after an outage. Whatever the stream's
                    // backoff (ours, or the backend's own reconnects) has grown to,
                    // subscribe afresh now; the relist after it covers the gap.
                    engine_down = false;
                    resubscribe_delay = RESUBSCRIBE_MIN;
                    if has_events {
                        info!("The engine answers again; resubscribing to its events now.");
                        events = None;
                        subscribe_at = Some(Instant::now());
                    }
                }
                _ => {}
            }
        }
        if let Some(rx) = restarts {
            *crate::manager::lock(&self.restart_rx) = Some(rx);
        }
        // What is in flight runs to its end (each holds the operations gate, so shutdown
        // waits for it); an action that has not begun finds the manager shutting down.
        work.tasks.detach_all();
        debug!("Supervision loop stopped.");
    }

    /// Starts the actions a pass decided on, each in a task of its own, unless an action
    /// for the same agent is in flight. Returns how many were left for that reason.
    fn queue_actions(self: &Arc<Self>, work: &mut Work, actions: Vec<(String, Action)>) -> usize {
        let mut left = 0;
        for (agent_id, action) in actions {
            if !work.busy.insert(agent_id.clone()) {
                debug!(agent_id = %agent_id, "An action for this agent is in flight; the next pass looks again.");
                left += 1;
                continue;
            }
            let manager = self.clone();
            let permits = work.permits.clone();
            let id = agent_id.clone();
            let task = work.tasks.spawn(async move {
                let _permit = permits.acquire_owned().await;
                if let Err(e) = manager.run_action(&id, action).await {
                    warn!(agent_id = %id, error = %e, "Supervision action failed; the next pass looks again.");
                }
            });
            work.action_of.insert(task.id(), agent_id);
        }
        left
    }

    /// Starts a restart a conversation task asked for (a stuck turn), in a task of its own.
    fn queue_restart(self: &Arc<Self>, work: &mut Work, request: RestartRequest) {
        let manager = self.clone();
        let permits = work.permits.clone();
        work.tasks.spawn(async move {
            let _permit = permits.acquire_owned().await;
            let agent_id = request.agent_id.clone();
            if let Err(e) = manager.restart_stuck(request).await {
                warn!(agent_id = %agent_id, error = %e, "Restart of a stuck agent failed.");
            }
        });
    }

    /// Prunes old events in a task of its own.
    fn queue_prune(self: &Arc<Self>, work: &mut Work) {
        let manager = self.clone();
        let task = work.tasks.spawn(async move {
            if let Err(e) = manager.prune_events().await {
                warn!(error = %e, "Could not prune old events; the next prune tries again.");
            }
        });
        work.pruning = Some(task.id());
    }

    /// Handles one event and whatever else is already queued behind it. Returns the slow
    /// actions the passes decided on, and whether the engine answered (`None`: it was
    /// not asked).
    async fn handle_events(
        &self,
        first: BackendEvent,
        events: Option<&mut EventReceiver>,
    ) -> (Vec<(String, Action)>, Option<bool>) {
        let mut sessions = BTreeSet::new();
        let mut relist = false;
        let mut note = |event: BackendEvent, sessions: &mut BTreeSet<String>| {
            Metrics::add(&self.metrics.events_received);
            match event {
                BackendEvent::Resync { reason } => {
                    info!(%reason, "Backend events may have been lost; relisting.");
                    Metrics::add(&self.metrics.relists_after_resync);
                    relist = true;
                }
                // Noted at once, before the exit it causes is looked at: who ended the run
                // is decided when its end is recorded.
                BackendEvent::Killed { container, signal, .. } => self.note_signalled(&container, signal),
                other => {
                    if let Some(session) = other.session() {
                        sessions.insert(session.to_owned());
                    }
                }
            }
        };
        note(first, &mut sessions);
        if let Some(rx) = events {
            while let Ok(event) = rx.try_recv() {
                note(event, &mut sessions);
            }
        }
        if relist || sessions.len() > EVENT_BURST_RELIST {
            return match self.reconcile_decide().await {
                Ok((_, actions)) => (actions, Some(true)),
                Err(e) => (Vec::new(), e.is_engine_unavailable().then_some(false)),
            };
        }
        let mut actions = Vec::new();
        let mut answered = None;
        for session in sessions {
            match self.reconcile_session_decide(&session).await {
                Ok(action) => {
                    // One call the engine could not answer outweighs any it did.
                    answered = answered.or(Some(true));
                    actions.extend(action);
                }
                Err(e) => {
                    if e.is_engine_unavailable() {
                        answered = Some(false);
                    }
                    warn!(session, error = %e, "Could not reconcile after an event; the next relist will.");
                }
            }
        }
        (actions, answered)
    }
}

async fn recv_restart(
    restarts: &mut Option<tokio::sync::mpsc::UnboundedReceiver<RestartRequest>>,
) -> Option<RestartRequest> {
    match restarts {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn recv(events: &mut Option<EventReceiver>) -> Option<BackendEvent> {
    match events {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use backend_core::{ExecutionBackend, OwnershipLabels};
    use backend_mock::{MockBackend, MockCall, MockEngine, PLAIN_IMAGE};

    use crate::{AgentKind, AgentManager, AgentStatus, ManagerConfig, ManualClock, NewAgent, RestartPolicy, Store};

    async fn until(what: &str, bound: Duration, mut check: impl AsyncFnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + bound;
        while !check().await {
            assert!(tokio::time::Instant::now() < deadline, "timed out after {bound:?} waiting for {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// K3 with the actions off the loop: a pass that finds a due agent held by an
    /// operation looks again about a second later, not at the next periodic relist.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_due_restart_of_a_busy_agent_follows_about_a_second_after_the_operation() {
        let engine = MockEngine::new();
        let store = Store::in_memory().await.expect("store");
        let owner = OwnershipLabels::new("agentd", "supervise-test").expect("labels");
        let backend: Arc<dyn ExecutionBackend> = Arc::new(MockBackend::new(engine.clone(), owner));
        let mut config = ManagerConfig::default();
        config.defaults.kind = AgentKind::Image;
        config.defaults.image = PLAIN_IMAGE.into();
        config.reconcile.interval = Duration::from_secs(3600);
        let clock = ManualClock::new();
        let manager = Arc::new(AgentManager::new(backend, store, config).with_clock(Arc::new(clock.clone())));
        let new = NewAgent { name: "crashy".into(), restart: Some(RestartPolicy::OnFailure), ..NewAgent::default() };
        let agent = manager.spawn(new).await.expect("spawn").agent;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let supervisor = tokio::spawn(manager.clone().supervise(stopped));
        until("the supervisor to subscribe", Duration::from_secs(5), async || {
            engine.calls().contains(&MockCall::Subscribe)
        })
        .await;

        // It crashes; its restart is due in 10 s (by the manager's clock).
        engine.exit(&agent.session, 1);
        until("the crash to be recorded", Duration::from_secs(5), async || {
            manager.agent("crashy").await.is_ok_and(|a| a.status == AgentStatus::Failed && a.next_restart_at.is_some())
        })
        .await;
        // When the restart falls due, an operation holds the agent: the pass skips it.
        let held = manager.lock_agent(&agent.id).await;
        let passes = manager.metrics().snapshot().reconcile_passes;
        clock.advance(Duration::from_secs(10));
        manager.wake_at(manager.now());
        until("the pass that skips the held agent", Duration::from_secs(5), async || {
            manager.metrics().snapshot().reconcile_passes > passes
        })
        .await;
        assert_eq!(manager.agent("crashy").await.expect("agent").status, AgentStatus::Failed);

        // The operation ends; a second later (by both clocks) the restart is done.
        drop(held);
        clock.advance(Duration::from_secs(1));
        until("the restart after the operation", Duration::from_secs(5), async || {
            manager.agent("crashy").await.is_ok_and(|a| a.status == AgentStatus::Running && a.restarts == 1)
        })
        .await;
        stop.send(true).expect("stop");
        tokio::time::timeout(Duration::from_secs(5), supervisor).await.expect("stops").expect("join");
    }
}
