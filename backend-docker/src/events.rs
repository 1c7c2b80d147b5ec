//! The engine's event stream, filtered to owned containers, with reconnects.

use std::collections::HashMap;
use std::time::Duration;

use backend_core::{BackendEvent, EventSender, OwnershipLabels, SessionExitInfo, SessionHealth, LABEL_SESSION};
use bollard::models::{EventMessage, EventMessageTypeEnum};
use bollard::query_parameters::EventsOptions;
use bollard::Docker;
use futures_util::StreamExt;
use time::OffsetDateTime;
use tracing::{debug, warn};

const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Maps one engine event to a backend event; `None` for events agentd ignores (exec
/// noise from health probes, attach, resize, ...).
pub(crate) fn map_event(event: &EventMessage) -> Option<BackendEvent> {
    if event.typ != Some(EventMessageTypeEnum::CONTAINER) {
        return None;
    }
    let action = event.action.as_deref()?;
    let attributes = event.actor.as_ref()?.attributes.as_ref()?;
    let session = attributes.get(LABEL_SESSION).or_else(|| attributes.get("name"))?.clone();
    let finished_at = event.time_nano.and_then(|n| OffsetDateTime::from_unix_timestamp_nanos(i128::from(n)).ok());
    Some(match action {
        "start" => BackendEvent::Started { session },
        "die" => {
            let code = attributes.get("exitCode").and_then(|c| c.parse().ok());
            let exit = match code {
                Some(code) => SessionExitInfo::exited(code, finished_at),
                None => SessionExitInfo { finished_at, ..SessionExitInfo::default() },
            };
            BackendEvent::Died { session, exit }
        }
        // `docker stop`, `kill` and `rm -f` (and agentd's own stops), before the `die`.
        "kill" => BackendEvent::Killed {
            session,
            container: event.actor.as_ref()?.id.clone()?,
            signal: attributes.get("signal").and_then(|s| s.parse().ok()),
        },
        "oom" => BackendEvent::OomKilled { session },
        "destroy" => BackendEvent::Removed { session },
        "pause" => BackendEvent::Paused { session },
        "unpause" => BackendEvent::Unpaused { session },
        other => {
            let health = match other.strip_prefix("health_status")?.trim_start_matches(':').trim() {
                "healthy" => SessionHealth::Healthy,
                "unhealthy" => SessionHealth::Unhealthy,
                "starting" => SessionHealth::Starting,
                _ => return None,
            };
            BackendEvent::HealthChanged { session, health }
        }
    })
}

/// Forwards owned container events to `tx` until the receiver is dropped. When the stream
/// breaks it reconnects with backoff, replaying from the last event it saw, and sends
/// `Resync` (the engine keeps only 256 events and drops slow subscribers). A full buffer
/// also becomes a `Resync` once there is room.
pub(crate) async fn pump(docker: Docker, owner: OwnershipLabels, tx: EventSender) {
    let mut since: Option<i64> = None;
    let mut backoff = BACKOFF_MIN;
    let mut lagged = false;
    let mut first = true;
    loop {
        if tx.is_closed() {
            return;
        }
        let filters = HashMap::from([
            ("type".to_owned(), vec!["container".to_owned()]),
            ("label".to_owned(), owner.label_filters()),
        ]);
        let options = EventsOptions { since: since.map(|s| s.to_string()), until: None, filters: Some(filters) };
        if !first && !send(&tx, BackendEvent::Resync { reason: "event stream reconnected".into() }, &mut lagged) {
            return;
        }
        first = false;
        let mut stream = docker.events(Some(options));
        let mut healthy_stream = false;
        loop {
            tokio::select! {
                _ = tx.closed() => return,
                item = stream.next() => match item {
                    Some(Ok(event)) => {
                        healthy_stream = true;
                        backoff = BACKOFF_MIN;
                        if let Some(t) = event.time {
                            since = Some(t);
                        }
                        if let Some(mapped) = map_event(&event) {
                            debug!(?mapped, "Docker event.");
                            if !send(&tx, mapped, &mut lagged) {
                                return;
                            }
                        }
                    }
                    Some(Err(e)) => {
                        warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "Docker event stream failed; reconnecting.");
                        break;
                    }
                    None => {
                        warn!(retry_in_ms = backoff.as_millis() as u64, "Docker event stream ended; reconnecting.");
                        break;
                    }
                }
            }
        }
        if !healthy_stream {
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        } else {
            tokio::time::sleep(BACKOFF_MIN).await;
        }
    }
}

fn send(tx: &EventSender, event: BackendEvent, lagged: &mut bool) -> bool {
    backend_core::forward_event(tx, event, lagged)
}

#[cfg(test)]
mod tests {
    use bollard::models::EventActor;

    use super::*;

    fn event(action: &str, attrs: &[(&str, &str)]) -> EventMessage {
        EventMessage {
            typ: Some(EventMessageTypeEnum::CONTAINER),
            action: Some(action.into()),
            actor: Some(EventActor {
                id: Some("abc".into()),
                attributes: Some(attrs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            }),
            time: Some(1),
            time_nano: Some(1_000_000_000),
            ..EventMessage::default()
        }
    }

    #[test]
    fn die_carries_the_exit_code_and_health_events_their_status() {
        let died = map_event(&event("die", &[(LABEL_SESSION, "s1"), ("exitCode", "3")]));
        assert!(
            matches!(died, Some(BackendEvent::Died { ref session, ref exit }) if session == "s1" && exit.exit_code == Some(3))
        );
        let health = map_event(&event("health_status: unhealthy", &[("name", "s1")]));
        assert_eq!(
            health,
            Some(BackendEvent::HealthChanged { session: "s1".into(), health: SessionHealth::Unhealthy })
        );
        assert_eq!(map_event(&event("exec_start: /agent --health", &[("name", "s1")])), None, "exec noise is ignored");
        assert_eq!(
            map_event(&event("destroy", &[("name", "s1")])),
            Some(BackendEvent::Removed { session: "s1".into() })
        );
        assert_eq!(
            map_event(&event("kill", &[("name", "s1"), ("signal", "15")])),
            Some(BackendEvent::Killed { session: "s1".into(), container: "abc".into(), signal: Some(15) }),
            "a stop or kill names the container and the signal"
        );
    }
}
