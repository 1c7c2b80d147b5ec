//! The observed state of sessions, as one snapshot.

use std::collections::BTreeMap;
use std::fmt;

use time::OffsetDateTime;

use crate::{SessionExitInfo, SessionHealth, LABEL_AGENT_ID};

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionStatus {
    /// Created and never started.
    Created,
    /// The main process runs (an engine's "restarting" counts as running).
    Running,
    /// The main process is frozen (`docker pause`): alive, but it reads and writes
    /// nothing until it is unpaused.
    Paused,
    /// The main process has ended; the container is still there with its exit info.
    Exited,
    /// The engine answered that no such session exists.
    Missing,
}

impl SessionStatus {
    /// The snake_case name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Exited => "exited",
            Self::Missing => "missing",
        }
    }
}

impl SessionStatus {
    /// Whether the main process is alive: running or paused.
    pub const fn is_alive(self) -> bool {
        matches!(self, Self::Running | Self::Paused)
    }
}

impl fmt::Display for SessionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One session as the engine sees it at one moment.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SessionState {
    /// The session (container) name.
    pub session: String,
    /// The engine's id for the container; empty when missing.
    pub id: String,
    /// Where the session is in its life.
    pub status: SessionStatus,
    /// Health, by the rules of [`SessionHealth`] (Unknown unless running).
    pub health: SessionHealth,
    /// How the session ended, when it has ended and the listing carries it. Backends whose
    /// listing lacks it leave `None`; callers then ask
    /// [`crate::ExecutionBackend::session_exit_info`].
    pub exit: Option<SessionExitInfo>,
    /// When the container was created.
    #[serde(with = "time::serde::rfc3339::option")]
    pub created_at: Option<OffsetDateTime>,
    /// The container's labels.
    pub labels: BTreeMap<String, String>,
}

impl SessionState {
    /// The state of a session the engine does not have.
    pub fn missing(session: impl Into<String>) -> Self {
        Self {
            session: session.into(),
            id: String::new(),
            status: SessionStatus::Missing,
            health: SessionHealth::Unknown,
            exit: None,
            created_at: None,
            labels: BTreeMap::new(),
        }
    }

    /// The agent id label, if present.
    pub fn agent_id(&self) -> Option<&str> {
        self.labels.get(LABEL_AGENT_ID).map(String::as_str)
    }
}

/// An owned named volume, as the engine lists it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VolumeState {
    /// The volume's name.
    pub name: String,
    /// When the engine created it, if it says.
    #[serde(with = "time::serde::rfc3339::option")]
    pub created_at: Option<OffsetDateTime>,
    /// The volume's labels.
    pub labels: BTreeMap<String, String>,
}

impl VolumeState {
    /// The agent id label, if present.
    pub fn agent_id(&self) -> Option<&str> {
        self.labels.get(LABEL_AGENT_ID).map(String::as_str)
    }
}
