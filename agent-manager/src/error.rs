//! The manager's error type.

use backend_core::BackendError;

use crate::store::StoreError;

/// Result of manager operations.
pub type Result<T, E = ManagerError> = std::result::Result<T, E>;

/// What went wrong in a manager operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManagerError {
    /// No agent has this id or name.
    #[error("no agent with id or name {0:?}")]
    AgentNotFound(String),

    /// No approval has this id.
    #[error("no approval with id {0:?}; list them with `agentd approvals`")]
    ApprovalNotFound(String),

    /// The name is taken.
    #[error("an agent named {0:?} already exists; pick another name or remove it first")]
    NameTaken(String),

    /// A field of the request is invalid.
    #[error("invalid {field}: {message}")]
    Invalid { field: &'static str, message: String },

    /// The request is well formed but breaks a containment rule: a host path an agent
    /// may not be given, or a user it may not run as. `value` is the value as given,
    /// `rule` what it breaks and what to do instead.
    #[error("{field} {value:?} is refused: {rule}")]
    Refused { field: &'static str, value: String, rule: String },

    /// The image is not present in the engine.
    #[error("image {image:?} is not present in the {backend} engine; {hint}")]
    ImageMissing { backend: &'static str, image: String, hint: String },

    /// The operation does not apply to the agent in its current state.
    #[error("{0}")]
    Conflict(String),

    /// The operation needs the agent running.
    #[error("agent {agent} is {status}, not running; start it with `agentd restart {agent}`")]
    NotRunning { agent: String, status: crate::model::AgentStatus },

    /// The agent's network cannot be protected now (the host firewall for `isolated`
    /// could not be installed): the agent is not started rather than run unprotected.
    #[error("agent {agent} is not started: its network {network} is not protected: {reason}")]
    NetworkUnprotected { agent: String, network: backend_core::NetworkPolicy, reason: String },

    /// The daemon is shutting down and accepts no new work.
    #[error("the daemon is shutting down")]
    ShuttingDown,

    /// The agent's container was created but could not be started; the agent is
    /// recorded as failed.
    #[error("agent {agent} could not be started: {source}")]
    StartFailed {
        agent: String,
        #[source]
        source: BackendError,
    },

    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),

    /// The database failed.
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for ManagerError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NameTaken(name) => Self::NameTaken(name),
            StoreError::AgentGone(id) => Self::AgentNotFound(id),
            StoreError::Conflict(message) => Self::Conflict(message),
            other => Self::Store(other),
        }
    }
}

impl ManagerError {
    /// Whether the engine was unreachable (the call may succeed later).
    pub fn is_engine_unavailable(&self) -> bool {
        match self {
            Self::Backend(e) | Self::StartFailed { source: e, .. } => e.is_retryable(),
            _ => false,
        }
    }
}
