//! The one error type of the backend contract.

/// A boxed error from an engine client, kept as the `source` of a [`BackendError`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Result of every backend operation.
pub type Result<T, E = BackendError> = std::result::Result<T, E>;

/// What went wrong in a backend call, as the cases callers branch on.
///
/// The split that matters most: [`BackendError::Unavailable`] means the engine could not
/// be asked (socket down, timeout, daemon restarting) and says nothing about the session;
/// [`BackendError::NotFound`] means the engine answered that the session does not exist.
/// A caller must never treat the first as the second.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// The engine answered that the session does not exist.
    #[error("session {session} not found on {backend}")]
    NotFound { backend: &'static str, session: String },

    /// A session with this name exists already and is not ours to replace.
    #[error("session {session} already exists on {backend}: {detail}")]
    AlreadyExists { backend: &'static str, session: String, detail: String },

    /// The image the spec names is not present in the engine (nothing is ever pulled).
    #[error("image {image} is not present on {backend}; build it first (for the test agent: `cargo xtask images`)")]
    ImageNotFound { backend: &'static str, image: String },

    /// The engine could not be reached or did not answer in time. Retryable; says
    /// nothing about the state of any session.
    #[error("{backend} engine unavailable: {message}")]
    Unavailable {
        backend: &'static str,
        message: String,
        #[source]
        source: Option<BoxError>,
    },

    /// The session spec is invalid; `field` names the offending field.
    #[error("invalid session spec: {field}: {message}")]
    InvalidSpec { field: &'static str, message: String },

    /// The engine refused the request as invalid: a 4xx answer other than "not found"
    /// or "conflict", for a value of the spec or a reference it cannot honour (such as a
    /// CPU limit above the host's CPUs). `message` is the engine's answer. A client's
    /// mistake, never retryable.
    #[error("{backend} refused the request: {message}")]
    Rejected { backend: &'static str, message: String },

    /// The backend's configuration section is invalid; `key` names the offending key
    /// within it.
    #[error("invalid [{backend}] configuration: {key}: {message}")]
    InvalidConfig { backend: &'static str, key: String, message: String },

    /// The backend does not support this operation.
    #[error("{backend} does not support {operation}")]
    Unsupported { backend: &'static str, operation: &'static str },

    /// Any other engine failure, with the engine's own error as source.
    #[error("{backend} engine error: {message}")]
    Engine {
        backend: &'static str,
        message: String,
        #[source]
        source: Option<BoxError>,
    },
}

impl BackendError {
    /// An [`BackendError::Unavailable`] with a message and no source.
    pub fn unavailable(backend: &'static str, message: impl Into<String>) -> Self {
        Self::Unavailable { backend, message: message.into(), source: None }
    }

    /// An [`BackendError::Engine`] with a message and no source.
    pub fn engine(backend: &'static str, message: impl Into<String>) -> Self {
        Self::Engine { backend, message: message.into(), source: None }
    }

    /// Whether trying the same call again later may succeed: true only for an
    /// unreachable engine.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }

    /// Whether the engine answered that the session does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Self::NotFound { .. })
    }
}
