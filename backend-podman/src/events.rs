//! libpod's event stream, filtered to owned containers, with reconnects.

use std::collections::HashMap;
use std::time::Duration;

use backend_core::{BackendEvent, EventSender, OwnershipLabels, SessionExitInfo, SessionHealth, LABEL_SESSION};
use futures_util::StreamExt;
use podman_api::models::Event;
use podman_api::opts::EventsOpts;
use podman_api::Podman;
use time::OffsetDateTime;
use tokio::sync::broadcast::{self, error::RecvError};
use tracing::{debug, warn};

use crate::convert;
use crate::health;

const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// What one libpod event means for agentd.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Mapped {
    /// An event to pass on as is.
    Event(BackendEvent),
    /// A health check ran. libpod 4.3's `health_status` event carries the status from
    /// *before* the check, so the pump reads the container's health instead.
    HealthCheckRan { session: String, container: String },
}

/// Maps one libpod event to what it means; `None` for events of other owners and for
/// those agentd ignores (`exec_died` from health probes, `init`, `sync`, `cleanup`, ...).
pub(crate) fn map_event(event: &Event, owner: &OwnershipLabels) -> Option<Mapped> {
    if !event.typ.eq_ignore_ascii_case("container") {
        return None;
    }
    let attributes = &event.actor.attributes;
    // libpod ORs several label filters; only events of owned containers count.
    if !owner.owns(&attributes.iter().map(|(k, v)| (k.clone(), v.clone())).collect()) {
        return None;
    }
    let session = attributes.get(LABEL_SESSION).or_else(|| attributes.get("name"))?.clone();
    let at = OffsetDateTime::from_unix_timestamp_nanos(i128::from(event.time_nano)).ok();
    Some(Mapped::Event(match event.action.as_str() {
        "start" => BackendEvent::Started { session },
        "died" | "die" => {
            let code = attributes.get("containerExitCode").and_then(|c| c.parse().ok());
            let exit = match code {
                Some(code) => SessionExitInfo::exited(code, at),
                None => SessionExitInfo { finished_at: at, ..SessionExitInfo::default() },
            };
            BackendEvent::Died { session, exit }
        }
        // `podman kill` (the event names no signal). libpod 4.3 sends no event for the
        // signal of `podman stop` or `rm -f`, and `stop` only when its stop call wins a race
        // with the container's cleanup; when it comes, it still counts.
        "kill" | "stop" => BackendEvent::Killed {
            session,
            container: event.actor.id.clone(),
            signal: attributes.get("signal").and_then(|s| s.parse().ok()),
        },
        "oom" => BackendEvent::OomKilled { session },
        "remove" | "destroy" => BackendEvent::Removed { session },
        "pause" => BackendEvent::Paused { session },
        "unpause" => BackendEvent::Unpaused { session },
        "health_status" => return Some(Mapped::HealthCheckRan { session, container: event.actor.id.clone() }),
        _ => return None,
    }))
}

/// `since` for libpod: unix seconds with nanoseconds.
pub(crate) fn since_param(at: OffsetDateTime) -> String {
    let nanos = at.unix_timestamp_nanos();
    format!("{}.{:09}", nanos.div_euclid(1_000_000_000), nanos.rem_euclid(1_000_000_000))
}

/// Everything the pump needs.
pub(crate) struct Pump {
    pub podman: Podman,
    pub owner: OwnershipLabels,
    pub tx: EventSender,
    /// Health changes the backend's check driver made (hung checks).
    pub driver: broadcast::Receiver<BackendEvent>,
    /// Events from this moment on are delivered, also those between the subscription and
    /// the stream's first connection.
    pub since: OffsetDateTime,
    pub request_timeout: Duration,
}

impl Pump {
    /// Forwards owned container events to `tx` until the receiver is dropped. When the
    /// stream breaks it reconnects with backoff, replaying from the last event it saw,
    /// and sends `Resync`. A full buffer also becomes a `Resync` once there is room.
    pub(crate) async fn run(mut self) {
        let mut since = self.since;
        let mut backoff = BACKOFF_MIN;
        let mut lagged = false;
        let mut first = true;
        let mut driver_open = true;
        let mut health: HashMap<String, SessionHealth> = HashMap::new();
        loop {
            if self.tx.is_closed() {
                return;
            }
            if !first && !send(&self.tx, resync("event stream reconnected"), &mut lagged) {
                return;
            }
            first = false;
            let filters = vec![
                ("type".to_owned(), vec!["container".to_owned()]),
                ("label".to_owned(), self.owner.label_filters()),
            ];
            let opts = EventsOpts::builder().stream(true).since(since_param(since)).filters(filters).build();
            let podman = self.podman.clone();
            let mut stream = podman.events(&opts);
            let mut healthy_stream = false;
            loop {
                tokio::select! {
                    _ = self.tx.closed() => return,
                    changed = self.driver.recv(), if driver_open => match changed {
                        Ok(event) => {
                            if !self.forward(event, &mut health, &mut lagged) {
                                return;
                            }
                        }
                        Err(RecvError::Lagged(_)) => {
                            if !send(&self.tx, resync("health changes were dropped"), &mut lagged) {
                                return;
                            }
                        }
                        Err(RecvError::Closed) => driver_open = false,
                    },
                    item = stream.next() => match item {
                        Some(Ok(event)) => {
                            healthy_stream = true;
                            backoff = BACKOFF_MIN;
                            if let Ok(at) = OffsetDateTime::from_unix_timestamp_nanos(i128::from(event.time_nano)) {
                                since = since.max(at);
                            }
                            let event = match map_event(&event, &self.owner) {
                                Some(Mapped::Event(event)) => event,
                                Some(Mapped::HealthCheckRan { session, container }) => {
                                    match self.health_of(&container).await {
                                        Some(now) => BackendEvent::HealthChanged { session, health: now },
                                        None => continue,
                                    }
                                }
                                None => continue,
                            };
                            debug!(event = ?event, "Podman event.");
                            if !self.forward(event, &mut health, &mut lagged) {
                                return;
                            }
                        }
                        Some(Err(e)) => {
                            warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "Podman event stream failed; reconnecting.");
                            break;
                        }
                        None => {
                            warn!(retry_in_ms = backoff.as_millis() as u64, "Podman event stream ended; reconnecting.");
                            break;
                        }
                    }
                }
            }
            if healthy_stream {
                tokio::time::sleep(BACKOFF_MIN).await;
            } else {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }

    /// Sends the event, passing health changes only when the health differs from the last
    /// one sent for the session. Returns false when the receiver is gone.
    fn forward(&self, event: BackendEvent, health: &mut HashMap<String, SessionHealth>, lagged: &mut bool) -> bool {
        match &event {
            // A repeat of the last health sent is no change.
            BackendEvent::HealthChanged { session, health: now }
                if health.insert(session.clone(), *now) == Some(*now) =>
            {
                return true;
            }
            BackendEvent::Started { session } | BackendEvent::Removed { session } => {
                health.remove(session);
            }
            _ => {}
        }
        send(&self.tx, event, lagged)
    }

    /// The container's health now (with the check driver's view of hung checks); `None`
    /// when it cannot be read (gone, or the engine is busy: the next check tells).
    async fn health_of(&self, container: &str) -> Option<SessionHealth> {
        let handle = self.podman.containers().get(container);
        let inspect = tokio::time::timeout(self.request_timeout, handle.inspect()).await.ok()?.ok()?;
        let state = inspect.state.as_ref()?;
        let status = convert::status_of(state.status.as_deref().unwrap_or_default());
        let libpod = convert::health_of(status, state.health.as_ref().and_then(|h| h.status.as_deref()));
        Some(match health::overlay(container) {
            Some(overlay) if libpod != SessionHealth::Unknown => overlay,
            _ => libpod,
        })
    }
}

fn resync(reason: &str) -> BackendEvent {
    BackendEvent::Resync { reason: reason.into() }
}

fn send(tx: &EventSender, event: BackendEvent, lagged: &mut bool) -> bool {
    backend_core::forward_event(tx, event, lagged)
}

#[cfg(test)]
mod tests {
    use podman_api::models::Actor;

    use super::*;

    fn owner() -> OwnershipLabels {
        OwnershipLabels::new("agentd", "i1").expect("labels")
    }

    fn event(action: &str, attrs: &[(&str, &str)]) -> Event {
        let mut attributes: HashMap<String, String> = owner().labels_for("s1", "a1").into_iter().collect();
        attributes.extend(attrs.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Event {
            typ: "container".into(),
            action: action.into(),
            actor: Actor { id: "abc".into(), attributes },
            status: Some(action.into()),
            id: Some("abc".into()),
            from: None,
            time: 1,
            time_nano: 1_000_000_000,
        }
    }

    #[test]
    fn died_carries_the_exit_code_and_health_checks_are_reread() {
        let died = map_event(&event("died", &[("containerExitCode", "3")]), &owner());
        assert!(matches!(
            died,
            Some(Mapped::Event(BackendEvent::Died { ref session, ref exit })) if session == "s1" && exit.exit_code == Some(3)
        ));
        assert_eq!(
            map_event(&event("health_status", &[]), &owner()),
            Some(Mapped::HealthCheckRan { session: "s1".into(), container: "abc".into() })
        );
        assert_eq!(map_event(&event("exec_died", &[]), &owner()), None, "exec noise is ignored");
        assert_eq!(map_event(&event("cleanup", &[]), &owner()), None);
        assert_eq!(
            map_event(&event("start", &[]), &owner()),
            Some(Mapped::Event(BackendEvent::Started { session: "s1".into() }))
        );
        assert_eq!(
            map_event(&event("remove", &[]), &owner()),
            Some(Mapped::Event(BackendEvent::Removed { session: "s1".into() }))
        );
        for action in ["kill", "stop"] {
            assert_eq!(
                map_event(&event(action, &[]), &owner()),
                Some(Mapped::Event(BackendEvent::Killed {
                    session: "s1".into(),
                    container: "abc".into(),
                    signal: None
                })),
                "{action} names the container"
            );
        }
    }

    #[test]
    fn events_of_other_owners_are_dropped() {
        let theirs = OwnershipLabels::new("agentd", "i2").expect("labels");
        assert_eq!(map_event(&event("died", &[("containerExitCode", "0")]), &theirs), None);
        let mut image = event("remove", &[]);
        image.typ = "image".into();
        assert_eq!(map_event(&image, &owner()), None);
    }

    #[test]
    fn since_is_seconds_with_nanoseconds() {
        let at = OffsetDateTime::from_unix_timestamp_nanos(1_795_891_929_481_408_439).expect("time");
        assert_eq!(since_param(at), "1795891929.481408439");
    }

    #[tokio::test]
    async fn health_changes_are_passed_on_once_and_lag_becomes_resync() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let (_driver_tx, driver) = broadcast::channel(1);
        let pump = Pump {
            podman: Podman::new("unix:///nonexistent.sock").expect("client"),
            owner: owner(),
            tx,
            driver,
            since: OffsetDateTime::now_utc(),
            request_timeout: Duration::from_secs(1),
        };
        let (mut health, mut lagged) = (HashMap::new(), false);
        let unhealthy = BackendEvent::HealthChanged { session: "s1".into(), health: SessionHealth::Unhealthy };
        assert!(pump.forward(unhealthy.clone(), &mut health, &mut lagged));
        assert!(pump.forward(unhealthy.clone(), &mut health, &mut lagged), "a repeat is dropped, not sent");
        assert!(!lagged);
        assert_eq!(rx.recv().await, Some(unhealthy));
        assert!(pump.forward(BackendEvent::Started { session: "s1".into() }, &mut health, &mut lagged));
        assert!(pump.forward(BackendEvent::Removed { session: "s1".into() }, &mut health, &mut lagged));
        assert!(lagged, "the buffer of one is full");
        assert_eq!(rx.recv().await, Some(BackendEvent::Started { session: "s1".into() }));
        assert!(pump.forward(BackendEvent::Removed { session: "s1".into() }, &mut health, &mut lagged));
        assert!(matches!(rx.recv().await, Some(BackendEvent::Resync { .. })));
    }
}
