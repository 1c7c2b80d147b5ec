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
    /// The session's main process ended. `exit` holds what the event carried (often
    /// only the code); the full record comes from `session_exit_info`.
    Died { session: String, exit: SessionExitInfo },
    /// The kernel's OOM killer hit the session.
    OomKilled { session: String },
    /// The session's health changed.
    HealthChanged { session: String, health: SessionHealth },
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
            | Self::Died { session, .. }
            | Self::OomKilled { session }
            | Self::HealthChanged { session, .. }
            | Self::Removed { session } => Some(session),
            Self::Resync { .. } => None,
        }
    }
}
