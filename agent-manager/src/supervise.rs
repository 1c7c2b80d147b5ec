//! The supervision loop: one serialised loop per daemon that reconciles on every backend
//! event, periodically, and when a scheduled restart or grace period is due.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use backend_core::{BackendEvent, EventReceiver, ExecutionBackend};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;
use crate::AgentManager;

/// More distinct sessions than this in one burst of events: relist instead.
const EVENT_BURST_RELIST: usize = 64;
const RESUBSCRIBE_MIN: Duration = Duration::from_millis(500);
const RESUBSCRIBE_MAX: Duration = Duration::from_secs(30);
/// The least time between two passes that are not periodic relists.
const MIN_GAP: Duration = Duration::from_millis(250);

impl<B: ExecutionBackend + ?Sized + 'static> AgentManager<B> {
    /// Supervises until `stop` turns true: one pass now, then a pass per event burst, one
    /// every `reconcile.interval`, and one whenever a restart or grace period is due. A
    /// closed event stream is resubscribed with backoff, followed by a full relist (events
    /// may have been lost meanwhile).
    pub async fn supervise(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let interval = self.config.reconcile.interval;
        let mut events: Option<EventReceiver> = None;
        let mut subscribe_at = Some(Instant::now());
        let mut resubscribe_delay = RESUBSCRIBE_MIN;
        let mut subscribed_before = false;
        // Passes that are not a periodic relist (due wake-ups, retries) keep at least this
        // far apart: after a failed pass it doubles up to the relist interval, so an
        // unreachable engine is not hammered.
        let mut gap = MIN_GAP;
        let mut next_allowed = Instant::now();
        let mut first_pass = true;
        let mut next_relist = Instant::now();
        let mut restarts = crate::manager::lock(&self.restart_rx).take();
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
                    }
                    Err(e) => {
                        Metrics::add(&self.metrics.engine_errors);
                        warn!(error = %e, retry_in_ms = resubscribe_delay.as_millis() as u64, "Could not subscribe to backend events.");
                        subscribe_at = Some(Instant::now() + resubscribe_delay);
                        resubscribe_delay = (resubscribe_delay * 2).min(RESUBSCRIBE_MAX);
                    }
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
            tokio::select! {
                _ = stop.changed() => {}
                // An earlier wake-up was scheduled meanwhile: recompute the sleep.
                _ = self.wakeup_changed.notified() => {}
                _ = tokio::time::sleep_until(wake) => {
                    let now = Instant::now();
                    let due = now >= next_allowed && self.next_wakeup().is_some_and(|d| d <= self.now());
                    if now >= next_relist || due || first_pass {
                        first_pass = false;
                        let ok = self.reconcile().await.is_ok();
                        gap = if ok { MIN_GAP } else { (gap * 2).max(Duration::from_secs(1)).min(interval) };
                        next_allowed = Instant::now() + gap;
                        // A failed relist is retried after the gap, not a whole interval.
                        next_relist = Instant::now() + if ok { interval } else { gap };
                    }
                }
                request = recv_restart(&mut restarts) => match request {
                    // Slow (a stop with its grace): its own task, so events keep flowing.
                    Some(request) => {
                        let manager = self.clone();
                        tokio::spawn(async move {
                            let agent_id = request.agent_id.clone();
                            if let Err(e) = manager.restart_stuck(request).await {
                                warn!(agent_id = %agent_id, error = %e, "Restart of a stuck agent failed.");
                            }
                        });
                    }
                    None => restarts = None,
                },
                event = recv(&mut events) => match event {
                    Some(first) => self.handle_events(first, events.as_mut()).await,
                    None => {
                        warn!("Backend event stream ended; resubscribing.");
                        events = None;
                        subscribe_at = Some(Instant::now() + resubscribe_delay);
                    }
                },
            }
        }
        if let Some(rx) = restarts {
            *crate::manager::lock(&self.restart_rx) = Some(rx);
        }
        debug!("Supervision loop stopped.");
    }

    /// Handles one event and whatever else is already queued behind it.
    async fn handle_events(&self, first: BackendEvent, events: Option<&mut EventReceiver>) {
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
            let _ = self.reconcile().await;
            return;
        }
        for session in sessions {
            if let Err(e) = self.reconcile_session(&session).await {
                warn!(session, error = %e, "Could not reconcile after an event; the next relist will.");
            }
        }
    }
}

async fn recv_restart(
    restarts: &mut Option<tokio::sync::mpsc::UnboundedReceiver<crate::conversation::task::RestartRequest>>,
) -> Option<crate::conversation::task::RestartRequest> {
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
