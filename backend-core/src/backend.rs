//! The `ExecutionBackend` trait.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::stream::{self, StreamExt};

use crate::{
    BackendError, EventReceiver, OutputCursor, OutputLines, OwnershipLabels, Result, SessionAttach, SessionExitInfo,
    SessionHealth, SessionSpec, SessionState, VolumeState,
};

/// How many sessions the default [`ExecutionBackend::shutdown_all_sessions`] stops at once.
pub const SHUTDOWN_CONCURRENCY: usize = 64;

/// What a backend can do, and where its engine's lifecycle differs from Docker's. The
/// conformance suite reads these: a test whose capability is missing is reported as
/// ignored with the capability named, never passed silently; and the lifecycle flags
/// (`two_phase_start`, `exit_info_after_stop`, `image_errors_at_create`) choose what the
/// suite asserts, so that an engine such as Kubernetes can pass it honestly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Health reflects a running health check (not just "running").
    pub health_checks: bool,
    /// [`ExecutionBackend::subscribe_events`] returns a stream.
    pub events: bool,
    /// OOM kills are reported in [`SessionExitInfo::oom_killed`].
    pub oom_detection: bool,
    /// [`ExecutionBackend::send_command`] works.
    pub exec: bool,
    /// [`ExecutionBackend::session_logs`] works.
    pub logs: bool,
    /// [`NetworkPolicy::Isolated`](crate::NetworkPolicy::Isolated) is enforced.
    pub network_isolation: bool,
    /// [`ExecutionBackend::attach_session`] and [`ExecutionBackend::session_output`] work.
    pub attach: bool,
    /// [`SessionSpec::volumes`], [`ExecutionBackend::list_volumes`] and
    /// [`ExecutionBackend::remove_volume`] work.
    pub volumes: bool,
    /// Creating and starting are two steps: a created session reads
    /// [`SessionStatus::Created`](crate::SessionStatus::Created) until
    /// [`ExecutionBackend::start_session`] runs it (Docker, Podman). Without it, the
    /// engine may run a session as soon as it is created (a Kubernetes pod), and
    /// `start_session` of a session that runs already succeeds.
    pub two_phase_start: bool,
    /// A stopped session keeps its container and its exit info until it is removed
    /// (Docker, Podman). Without it, a stop may take the session away with its exit
    /// info (deleting a pod), so the caller reads the exit before it stops, or not at all.
    pub exit_info_after_stop: bool,
    /// A missing image fails [`ExecutionBackend::create_session`] with
    /// [`BackendError::ImageNotFound`] (Docker, Podman). Without it, the create may
    /// succeed and the missing image surface later: `start_session` fails with
    /// `ImageNotFound`, or the session ends with exit info whose `error` names the image
    /// (a pod that cannot pull).
    pub image_errors_at_create: bool,
}

impl Capabilities {
    /// Every capability, with Docker's lifecycle.
    pub const ALL: Capabilities = Capabilities {
        health_checks: true,
        events: true,
        oom_detection: true,
        exec: true,
        logs: true,
        network_isolation: true,
        attach: true,
        volumes: true,
        two_phase_start: true,
        exit_info_after_stop: true,
        image_errors_at_create: true,
    };

    /// Whether the backend has `capability`.
    pub fn has(&self, capability: Capability) -> bool {
        match capability {
            Capability::HealthChecks => self.health_checks,
            Capability::Events => self.events,
            Capability::OomDetection => self.oom_detection,
            Capability::Exec => self.exec,
            Capability::Logs => self.logs,
            Capability::NetworkIsolation => self.network_isolation,
            Capability::Attach => self.attach,
            Capability::Volumes => self.volumes,
            Capability::TwoPhaseStart => self.two_phase_start,
            Capability::ExitInfoAfterStop => self.exit_info_after_stop,
            Capability::ImageErrorsAtCreate => self.image_errors_at_create,
        }
    }
}

/// One field of [`Capabilities`], by name: what a conformance test needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capability {
    /// [`Capabilities::health_checks`].
    HealthChecks,
    /// [`Capabilities::events`].
    Events,
    /// [`Capabilities::oom_detection`].
    OomDetection,
    /// [`Capabilities::exec`].
    Exec,
    /// [`Capabilities::logs`].
    Logs,
    /// [`Capabilities::network_isolation`].
    NetworkIsolation,
    /// [`Capabilities::attach`].
    Attach,
    /// [`Capabilities::volumes`].
    Volumes,
    /// [`Capabilities::two_phase_start`].
    TwoPhaseStart,
    /// [`Capabilities::exit_info_after_stop`].
    ExitInfoAfterStop,
    /// [`Capabilities::image_errors_at_create`].
    ImageErrorsAtCreate,
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::HealthChecks => "health_checks",
            Self::Events => "events",
            Self::OomDetection => "oom_detection",
            Self::Exec => "exec",
            Self::Logs => "logs",
            Self::NetworkIsolation => "network_isolation",
            Self::Attach => "attach",
            Self::Volumes => "volumes",
            Self::TwoPhaseStart => "two_phase_start",
            Self::ExitInfoAfterStop => "exit_info_after_stop",
            Self::ImageErrorsAtCreate => "image_errors_at_create",
        })
    }
}

/// The host's addresses on the engine's networks, where sessions reach services on the
/// host: the gateway of the network `internet` sessions join, and of the one `isolated`
/// sessions join. `None` where there is no such network, or the address is not this
/// host's (a remote engine).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetworkGateways {
    /// On the network of [`NetworkPolicy::Internet`](crate::NetworkPolicy::Internet).
    pub internet: Option<std::net::IpAddr>,
    /// On the network of [`NetworkPolicy::Isolated`](crate::NetworkPolicy::Isolated).
    pub isolated: Option<std::net::IpAddr>,
}

/// The engine network `isolated` sessions join, as the host's firewall sees it: the
/// bridge interface their traffic enters the host by, the host's addresses on it, and its
/// subnets. The daemon installs its host firewall rules for this interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsolatedNetwork {
    /// The engine's name of the network (`agentd-isolated`).
    pub name: String,
    /// The host's bridge interface (Docker: `br-<id12>` or the network's
    /// `com.docker.network.bridge.name`; Podman: the network's `network_interface`). It
    /// may not exist while no session is attached (Podman).
    pub interface: String,
    /// The host's addresses on the network (its gateways), IPv4 and IPv6.
    pub gateways: Vec<std::net::IpAddr>,
    /// The network's subnets in CIDR form (`172.18.0.0/16`).
    pub subnets: Vec<String>,
    /// Whether the network is on this host (the engine is local): only then can this
    /// host's firewall protect it.
    pub on_this_host: bool,
}

/// The result of running a command in a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    /// The command's exit code, when the engine reports it.
    pub exit_code: Option<i64>,
    /// Standard output and standard error, interleaved.
    pub output: String,
}

/// What [`ExecutionBackend::shutdown_all_sessions`] did.
#[derive(Debug, Default)]
pub struct ShutdownReport {
    /// Sessions stopped and removed.
    pub stopped: Vec<String>,
    /// Sessions that could not be stopped, with the reason.
    pub failed: Vec<(String, BackendError)>,
}

/// A container engine that runs agent sessions.
///
/// # Contract
/// - A *session* is one container whose main process is the agent. Its name is
///   [`SessionSpec::session`] and starts with [`ExecutionBackend::prefix`].
/// - Every container a backend creates carries the labels of its
///   [`OwnershipLabels`]; every listing returns only containers carrying this prefix
///   **and** this instance id. Nothing else is ever listed, stopped or removed by a
///   listing-driven call.
/// - [`BackendError::Unavailable`] means the engine could not be asked. It never stands for
///   "the session is gone": that is `Ok(false)` from `session_exists`, or
///   [`SessionStatus::Missing`].
/// - Creating a session whose name is taken never reuses the old container: a stale
///   container of ours is removed and recreated, anything else fails with
///   [`BackendError::AlreadyExists`]. A name without the prefix is
///   [`BackendError::InvalidSpec`].
/// - Exit information stays readable until the session is removed (with
///   [`Capabilities::exit_info_after_stop`], also after a stop).
/// - Nothing is pulled: a missing image is [`BackendError::ImageNotFound`], from
///   `create_session` with [`Capabilities::image_errors_at_create`].
/// - [`ExecutionBackend::session_logs`] returns at most [`SESSION_LOGS_MAX_BYTES`] (the
///   end of the output, after a [`LOGS_TRUNCATED`] line saying how much was left out).
///
/// Where an engine's lifecycle differs from Docker's, [`Capabilities`] says so.
///
/// [`SESSION_LOGS_MAX_BYTES`]: crate::SESSION_LOGS_MAX_BYTES
/// [`LOGS_TRUNCATED`]: crate::LOGS_TRUNCATED
/// [`SessionStatus::Missing`]: crate::SessionStatus::Missing
#[async_trait]
pub trait ExecutionBackend: Send + Sync + fmt::Debug {
    /// A short lowercase name: `docker`, `podman`, `mock`.
    fn name(&self) -> &'static str;

    /// The ownership this backend stamps and filters on.
    fn ownership(&self) -> &OwnershipLabels;

    /// The prefix of every session name this backend creates.
    fn prefix(&self) -> &str {
        self.ownership().prefix()
    }

    /// What this backend supports.
    fn capabilities(&self) -> Capabilities;

    /// The host's addresses on the engine's networks, for services offered to sessions.
    /// All `None` means loopback is enough (or the backend offers no such network).
    async fn gateway_addresses(&self) -> Result<NetworkGateways> {
        Ok(NetworkGateways::default())
    }

    /// The network `isolated` sessions join, for the host firewall. `None`: sessions of
    /// this backend do not use this host's network stack (an in-memory backend), so there
    /// is nothing to firewall here.
    async fn isolated_network(&self) -> Result<Option<IsolatedNetwork>> {
        Ok(None)
    }

    /// The running session's addresses on its engine networks (what a peer connecting
    /// from it appears as, from the host's side of its network). Empty while the session
    /// does not run, for `none` and `host` networks (a host-network session has the
    /// host's addresses, so it cannot be told apart), and for backends that cannot tell
    /// (the default). An address does not change while the session's container runs. A
    /// missing session is [`BackendError::NotFound`] where the backend can tell.
    async fn session_addresses(&self, session: &str) -> Result<Vec<std::net::IpAddr>> {
        let _ = session;
        Ok(Vec::new())
    }

    /// The number of CPUs the engine's host has (Docker's `NCPU`, Podman's `host.cpus`):
    /// the most a session's CPU limit may be. `None` when the backend cannot tell (the
    /// default).
    async fn engine_cpus(&self) -> Result<Option<u32>> {
        Ok(None)
    }

    /// Whether `image` is present locally (nothing is ever pulled).
    async fn image_exists(&self, image: &str) -> Result<bool>;

    /// The user the image runs as (its `USER`: a name, `uid` or `uid:gid`, as the image
    /// says it); `None` when the image names none (it would run as root). A missing image
    /// is [`BackendError::ImageNotFound`].
    async fn image_user(&self, image: &str) -> Result<Option<String>>;

    /// The engine's API socket on this host, when the backend talks to it over a local
    /// Unix socket: a session that can see it can command the engine, so no mount may
    /// expose it. `None` for a remote engine (or none at all).
    fn engine_socket(&self) -> Option<std::path::PathBuf> {
        None
    }

    /// Creates the session's container from `spec`, without starting it. Returns the
    /// engine's container id.
    async fn create_session(&self, spec: &SessionSpec) -> Result<String>;

    /// Starts a created session; the agent becomes the container's main process.
    async fn start_session(&self, session: &str) -> Result<()>;

    /// Whether the session exists. `Ok(false)` only when the engine said so.
    async fn session_exists(&self, session: &str) -> Result<bool>;

    /// Stops the session: SIGTERM, then SIGKILL after `grace`. The container and its exit
    /// info stay. Stopping a session that is not running succeeds; a missing one is
    /// [`BackendError::NotFound`].
    async fn stop_session(&self, session: &str, grace: Duration) -> Result<()>;

    /// Removes the session's container, forcibly. Removing a missing session succeeds.
    async fn remove_session(&self, session: &str) -> Result<()>;

    /// Stops (with `grace`) and removes the session. Idempotent: a missing session is
    /// success. The caller reads exit info first if it wants it.
    async fn kill_session(&self, session: &str, grace: Duration) -> Result<()> {
        match self.stop_session(session, grace).await {
            Ok(()) => {}
            Err(e) if e.is_not_found() => return Ok(()),
            Err(e) => return Err(e),
        }
        self.remove_session(session).await
    }

    /// Runs `command` inside the running session and returns its output.
    async fn send_command(&self, session: &str, command: &[String]) -> Result<CommandOutput> {
        let _ = (session, command);
        Err(BackendError::Unsupported { backend: self.name(), operation: "send_command" })
    }

    /// The names of all sessions this backend owns (prefix and instance).
    async fn list_sessions(&self) -> Result<Vec<String>> {
        Ok(self.snapshot().await?.into_iter().map(|s| s.session).collect())
    }

    /// The state of every owned session, in as few engine calls as the engine allows
    /// (one listing, independent of the number of sessions).
    async fn snapshot(&self) -> Result<Vec<SessionState>>;

    /// The state of one session; [`SessionStatus::Missing`] when the engine has none.
    ///
    /// [`SessionStatus::Missing`]: crate::SessionStatus::Missing
    async fn session_state(&self, session: &str) -> Result<SessionState> {
        Ok(self
            .snapshot()
            .await?
            .into_iter()
            .find(|s| s.session == session)
            .unwrap_or_else(|| SessionState::missing(session)))
    }

    /// The session's health. Backends without health support report `Unknown`.
    async fn session_health(&self, session: &str) -> Result<SessionHealth> {
        let _ = session;
        Ok(SessionHealth::Unknown)
    }

    /// How the session ended; `None` while it runs, when it never ran, or when it is
    /// missing. Backends without exit support report `None`.
    async fn session_exit_info(&self, session: &str) -> Result<Option<SessionExitInfo>> {
        let _ = session;
        Ok(None)
    }

    /// The last `tail` lines (all when `None`) of the session's output, stdout and stderr
    /// interleaved, capped at [`SESSION_LOGS_MAX_BYTES`]: when the output is longer, only
    /// its end is returned, after one line that starts with [`LOGS_TRUNCATED`] and says how
    /// many bytes were left out (see [`LogsCollector`]). For all of a long output, read
    /// [`ExecutionBackend::session_output`], which streams.
    ///
    /// [`SESSION_LOGS_MAX_BYTES`]: crate::SESSION_LOGS_MAX_BYTES
    /// [`LOGS_TRUNCATED`]: crate::LOGS_TRUNCATED
    /// [`LogsCollector`]: crate::LogsCollector
    async fn session_logs(&self, session: &str, tail: Option<usize>) -> Result<String> {
        let _ = (session, tail);
        Err(BackendError::Unsupported { backend: self.name(), operation: "session_logs" })
    }

    /// The named volumes this backend owns (prefix and instance), as sessions' specs
    /// created them.
    async fn list_volumes(&self) -> Result<Vec<VolumeState>> {
        Err(BackendError::Unsupported { backend: self.name(), operation: "list_volumes" })
    }

    /// Removes an owned named volume. Removing a missing one succeeds; one that a
    /// container still uses is an error.
    async fn remove_volume(&self, name: &str) -> Result<()> {
        let _ = name;
        Err(BackendError::Unsupported { backend: self.name(), operation: "remove_volume" })
    }

    /// Attaches to the session's stdin and follows its output from `from` (from its first
    /// line when `None`); see [`SessionAttach`]. The session must run and have been created
    /// with [`SessionSpec::stdin_open`]. A missing session is [`BackendError::NotFound`];
    /// an unreachable engine is [`BackendError::Unavailable`].
    async fn attach_session(&self, session: &str, from: Option<OutputCursor>) -> Result<SessionAttach> {
        let _ = (session, from);
        Err(BackendError::Unsupported { backend: self.name(), operation: "attach_session" })
    }

    /// The session's output after `from` (all of it when `None`), read from the engine's
    /// log, stdout and stderr tagged. Without `follow` the stream ends at what was written
    /// so far; with it, when the session's main process has ended. Works on sessions that
    /// have ended, as long as they exist.
    async fn session_output(&self, session: &str, from: Option<OutputCursor>, follow: bool) -> Result<OutputLines> {
        let _ = (session, from, follow);
        Err(BackendError::Unsupported { backend: self.name(), operation: "session_output" })
    }

    /// Subscribes to the engine's events for owned sessions. `None` means this backend
    /// has no events and the caller must rely on relisting. A backend whose engine tells
    /// of the signals it sends containers (stop, kill, forced removal) passes each on as
    /// [`BackendEvent::Killed`](crate::BackendEvent::Killed) before the `Died` it causes:
    /// that is how a caller tells an outside stop from an exit by itself.
    async fn subscribe_events(&self) -> Result<Option<EventReceiver>> {
        Ok(None)
    }

    /// Stops and removes every owned session, concurrently (at most
    /// [`SHUTDOWN_CONCURRENCY`] at once), each with `grace`.
    async fn shutdown_all_sessions(&self, grace: Duration) -> Result<ShutdownReport> {
        let sessions = self.list_sessions().await?;
        let outcomes: Vec<(String, Result<()>)> = stream::iter(sessions)
            .map(|session| async move {
                let outcome = self.kill_session(&session, grace).await;
                (session, outcome)
            })
            .buffer_unordered(SHUTDOWN_CONCURRENCY)
            .collect()
            .await;
        let mut report = ShutdownReport::default();
        for (session, outcome) in outcomes {
            match outcome {
                Ok(()) => report.stopped.push(session),
                Err(e) => report.failed.push((session, e)),
            }
        }
        Ok(report)
    }
}
