//! Events pushed by backends whose engine has an event stream.

use crate::{SessionExitInfo, SessionHealth};

/// How many events a backend buffers for a slow consumer before it drops them and
/// sends [`BackendEvent::Resync`] instead.
pub const EVENT_BUFFER: usize = 1024;

/// The receiving end of a backend's event stream. The stream ends (`None`) only when the
/// backend gives up; until then the backend reconnects by itself.
pub type EventReceiver = tokio::sync::mpsc::Receiver<BackendEvent>;
/// The sending end, for backends.
pub type EventSender = tokio::sync::mpsc::Sender<BackendEvent>;

/// Something that happened to an owned session, as the engine reported it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BackendEvent {
    /// The session's main process started.
    Started { session: String },
    /// The engine was asked to signal the session's main process: a stop, a kill or a
    /// forced removal, by agentd or from outside. Engines send it before the `Died` it
    /// causes. `container` is the engine's id of the container signalled (the session
    /// name outlives its containers); `signal` is the one sent, when the engine says.
    Killed { session: String, container: String, signal: Option<i32> },
    /// The session's main process ended. `exit` holds what the event carried (often
    /// only the code); the full record comes from `session_exit_info`.
    Died { session: String, exit: SessionExitInfo },
    /// The kernel's OOM killer hit the session.
    OomKilled { session: String },
    /// The session's health changed.
    HealthChanged { session: String, health: SessionHealth },
    /// The session's main process was frozen (`docker pause`).
    Paused { session: String },
    /// The session's main process was thawed.
    Unpaused { session: String },
    /// The session was removed.
    Removed { session: String },
    /// Events may have been lost (the stream reconnected, or the consumer was too slow):
    /// the consumer must relist.
    Resync { reason: String },
}

impl BackendEvent {
    /// The session the event is about; `None` for [`BackendEvent::Resync`].
    pub fn session(&self) -> Option<&str> {
        match self {
            Self::Started { session }
            | Self::Killed { session, .. }
            | Self::Died { session, .. }
            | Self::OomKilled { session }
            | Self::HealthChanged { session, .. }
            | Self::Paused { session }
            | Self::Unpaused { session }
            | Self::Removed { session } => Some(session),
            Self::Resync { .. } => None,
        }
    }
}

/// Sends `event` without blocking the engine reader. When the consumer's buffer is full
/// the event is dropped and `lagged` is set; the consumer then gets a
/// [`BackendEvent::Resync`] before the next event that fits, so it knows to relist.
/// Returns false when the consumer is gone.
pub fn forward_event(tx: &EventSender, event: BackendEvent, lagged: &mut bool) -> bool {
    use tokio::sync::mpsc::error::TrySendError;
    if *lagged {
        match tx.try_send(BackendEvent::Resync { reason: "events were dropped for a slow consumer".into() }) {
            Ok(()) => *lagged = false,
            Err(TrySendError::Full(_)) => return true,
            Err(TrySendError::Closed(_)) => return false,
        }
    }
    match tx.try_send(event) {
        Ok(()) => true,
        Err(TrySendError::Full(_)) => {
            *lagged = true;
            true
        }
        Err(TrySendError::Closed(_)) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_buffer_turns_into_a_resync_once_there_is_room() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(2);
        let mut lagged = false;
        let started = |s: &str| BackendEvent::Started { session: s.into() };
        assert!(forward_event(&tx, started("a"), &mut lagged));
        assert!(forward_event(&tx, started("b"), &mut lagged));
        assert!(forward_event(&tx, started("c"), &mut lagged), "dropped, not blocked");
        assert!(lagged);
        assert_eq!(rx.try_recv().ok(), Some(started("a")));
        assert_eq!(rx.try_recv().ok(), Some(started("b")));
        assert!(forward_event(&tx, started("d"), &mut lagged));
        assert!(!lagged);
        assert!(matches!(rx.try_recv(), Ok(BackendEvent::Resync { .. })), "the consumer learns it missed events");
        assert_eq!(rx.try_recv().ok(), Some(started("d")));
        drop(rx);
        assert!(!forward_event(&tx, started("e"), &mut lagged), "a gone consumer ends the forwarding");
    }
}
