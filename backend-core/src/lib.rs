//! The contract between agentd and the container engines that run its agents.
//!
//! `backend-core` defines *what* a backend promises, never *how* an engine keeps the
//! promise: the [`ExecutionBackend`] trait, the data it returns ([`SessionHealth`],
//! [`SessionExitInfo`], [`SessionState`], [`BackendEvent`]), the one error type callers
//! branch on ([`BackendError`]), the ownership labels every backend writes and filters on
//! ([`OwnershipLabels`]), and the session spec ([`SessionSpec`]).
//!
//! Architecture invariant: this crate depends on no engine, database or HTTP crate.
//!
//! For the engine crates it also holds the plumbing they would otherwise each copy: the
//! spec and prefix check ([`OwnershipLabels::validate_spec`]), the stale-container
//! replacement ([`create_replacing_stale`]), the host's address on a network
//! ([`host_address`]) and the cap on logs ([`LogsCollector`]).
//!
//! With the `testing` feature, [`conformance`] holds the suite of async test functions that
//! every backend crate runs against its engine, and the test runner that reports each as
//! passed, failed or ignored with its reason.

mod attach;
mod backend;
mod error;
mod events;
mod exit;
mod factory;
mod health;
mod labels;
mod logs;
mod plumbing;
mod spec;
mod state;

#[cfg(feature = "testing")]
pub mod conformance;

pub use attach::{
    split_timestamp, timestamped_lines, LineWriter, OutputCursor, OutputDecoder, OutputLine, OutputLines, OutputStream,
    SessionAttach, SessionInput, MAX_LINE_BYTES,
};
pub use backend::{
    Capabilities, Capability, CommandOutput, ExecutionBackend, IsolatedNetwork, NetworkGateways, ShutdownReport,
    SHUTDOWN_CONCURRENCY,
};
pub use error::{BackendError, BoxError, Result};
pub use events::{forward_event, BackendEvent, EventReceiver, EventSender, EVENT_BUFFER};
pub use exit::SessionExitInfo;
pub use factory::{
    check_engine_address, check_engine_connection, check_section, connect_config, parse_section, parse_to_section,
    BackendConfig, BackendFactory, ConfigProblem, Section, TypedFactory,
};
pub use health::{ParseHealthError, SessionHealth};
pub use labels::{OwnershipLabels, LABEL_AGENT_ID, LABEL_INSTANCE, LABEL_PREFIX, LABEL_SESSION};
pub use logs::{cap_logs, LogsCollector, LOGS_TRUNCATED, SESSION_LOGS_MAX_BYTES};
pub use plumbing::{create_replacing_stale, host_address, session_addresses, unix_socket_path};
pub use spec::{rules, HealthCheck, HealthCheckSpec, Mount, NetworkPolicy, Resources, SessionSpec, VolumeMount};
pub use state::{SessionState, SessionStatus, VolumeState};

/// Formats a timestamp as RFC 3339, the form every agentd interface uses.
pub fn format_time(at: time::OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| at.unix_timestamp().to_string())
}

/// Parses an engine's RFC 3339 timestamp. Engines write the zero time
/// (`0001-01-01T00:00:00Z`) for "never"; that, an empty string and anything unparsable
/// read as `None`.
pub fn parse_engine_time(text: &str) -> Option<time::OffsetDateTime> {
    let at = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).ok()?;
    (at.year() > 1970).then_some(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_engine_time_reads_as_never() {
        assert_eq!(parse_engine_time("0001-01-01T00:00:00Z"), None);
        assert_eq!(parse_engine_time(""), None);
        let at = parse_engine_time("2024-05-06T07:08:09.123456789Z").expect("valid time");
        assert_eq!(at.year(), 2024);
        assert_eq!(at.nanosecond(), 123_456_789);
    }
}
