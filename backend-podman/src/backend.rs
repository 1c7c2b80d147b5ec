//! The Podman implementation of the backend contract.

use std::future::Future;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use backend_core::{
    BackendError, BackendEvent, Capabilities, CommandOutput, EventReceiver, ExecutionBackend, LogsCollector,
    NetworkGateways, OutputCursor, OutputLines, OwnershipLabels, Result, SessionAttach, SessionExitInfo, SessionHealth,
    SessionSpec, SessionState, SessionStatus, EVENT_BUFFER,
};
use futures_util::StreamExt;
use podman_api::models::InspectContainerData;
use podman_api::opts::{
    ContainerDeleteOpts, ContainerListFilter, ContainerListOpts, ContainerLogsOpts, ExecCreateOpts, ExecStartOpts,
};
use podman_api::Podman;
use time::OffsetDateTime;
use tokio::sync::broadcast;
use tracing::{debug, info};

mod network;

use crate::attach;
use crate::config::{is_local, START_SERVICE};
use crate::convert::{self, grace_secs};
use crate::error::{map_err, status_of, timed_out, Subject, NAME};
use crate::events::Pump;
use crate::health::{self, HealthDriver, HealthScheduling};
use crate::oom::OomJudge;
use crate::raw::Libpod;
use crate::stdin::Keepers;
use crate::PodmanConfig;

/// The oldest Podman this backend supports: the libpod API of 4.0 (netavark networks,
/// the SpecGenerator fields used here).
const MIN_MAJOR: u64 = 4;

/// How long connect waits for each candidate address to answer a ping.
const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// Where `sd_booted()` looks to tell whether the host runs systemd.
const SYSTEMD_DIR: &str = "/run/systemd/system";

/// An [`ExecutionBackend`] on the Podman service (libpod API). Clones share one
/// connection, one health-check driver and one OOM judge.
#[derive(Debug, Clone)]
pub struct PodmanBackend {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    podman: Podman,
    libpod: Libpod,
    owner: OwnershipLabels,
    config: PodmanConfig,
    address: String,
    engine_version: String,
    /// The host's addresses on the default and the isolated network.
    gateways: NetworkGateways,
    scheduling: HealthScheduling,
    oom: OomJudge,
    /// Health changes the check driver makes, for event subscribers.
    health_events: broadcast::Sender<BackendEvent>,
    /// The processes that hold the sessions' stdin open (see `stdin.rs`).
    keepers: Keepers,
    /// The host's CPU count, asked once (Podman does not refuse a CPU limit above it).
    cpus: tokio::sync::OnceCell<Option<u32>>,
    /// Runs health checks while the backend lives.
    _driver: HealthDriver,
}

fn parse_major(version: &str) -> Option<u64> {
    version.trim_start_matches('v').split('.').next()?.parse().ok()
}

impl PodmanBackend {
    /// Connects to the first Podman service that answers (see
    /// [`PodmanConfig::candidates`]), checks its version, prepares the networks and
    /// starts the health-check driver. Fails with [`BackendError::Unavailable`] naming
    /// every address tried and the command that starts a service when none answers.
    pub async fn connect(config: PodmanConfig, owner: OwnershipLabels) -> Result<Self> {
        let candidates = config.candidates();
        let mut tried = Vec::new();
        let mut found = None;
        for address in &candidates {
            let podman = match Podman::new(address) {
                Ok(podman) => podman,
                Err(e) => {
                    tried.push(format!("{address} ({e})"));
                    continue;
                }
            };
            match tokio::time::timeout(PING_TIMEOUT.min(config.request_timeout), podman.ping()).await {
                Ok(Ok(_)) => {
                    found = Some((address.clone(), podman));
                    break;
                }
                Ok(Err(e)) => tried.push(format!("{address} ({e})")),
                Err(_) => tried.push(format!("{address} (no answer within {PING_TIMEOUT:?})")),
            }
        }
        let Some((address, podman)) = found else {
            return Err(BackendError::unavailable(
                NAME,
                format!(
                    "no Podman service answers; tried {}. Start one with `{START_SERVICE}` (as root; rootless: \
                     `podman system service --time=0` with XDG_RUNTIME_DIR set), or point [podman] socket / \
                     CONTAINER_HOST at it",
                    tried.join(", ")
                ),
            ));
        };
        let version = tokio::time::timeout(config.request_timeout, podman.version())
            .await
            .map_err(|_| timed_out("the version query", config.request_timeout))?
            .map_err(|e| map_err(e, Subject::Other))?;
        let engine_version = version.version.clone().unwrap_or_default();
        let major = parse_major(&engine_version).unwrap_or(0);
        if major < MIN_MAJOR {
            return Err(BackendError::engine(
                NAME,
                format!(
                    "Podman at {address} is version {engine_version:?} (API {:?}); agentd needs Podman {MIN_MAJOR}.0 or newer",
                    version.api_version.unwrap_or_default()
                ),
            ));
        }
        let libpod = Libpod::new(&address).map_err(|e| map_err(e, Subject::Other))?;
        let local = is_local(&address);
        // Both read the filesystem (the kernel log, the first time, is the whole ring
        // buffer): off the async workers.
        let (scheduling, oom) = tokio::task::spawn_blocking(move || {
            (HealthScheduling::detect(local, Path::new(SYSTEMD_DIR)), OomJudge::new(major, local))
        })
        .await
        .map_err(|e| {
            BackendError::engine(
                crate::error::NAME,
                format!("the start-up checks of the Podman backend ended early: {e}"),
            )
        })?;
        info!(
            address = %address,
            engine = %engine_version,
            api = %version.api_version.unwrap_or_default(),
            health_checks = ?scheduling,
            oom_detection = oom.can_detect(),
            "Connected to Podman."
        );

        let (health_events, _) = broadcast::channel(EVENT_BUFFER);
        let driver = HealthDriver::spawn(
            podman.clone(),
            owner.clone(),
            scheduling,
            config.request_timeout,
            health_events.clone(),
        );
        let keepers = Keepers::new(
            config.stdin_dir.clone(),
            config.podman_command.clone(),
            &address,
            local,
            config.request_timeout,
        );
        let mut inner = Inner {
            podman,
            libpod,
            owner,
            config,
            address,
            engine_version,
            gateways: NetworkGateways::default(),
            scheduling,
            oom,
            health_events,
            keepers,
            cpus: tokio::sync::OnceCell::new(),
            _driver: driver,
        };
        inner.gateways = inner.prepare_networks().await?;
        Ok(Self { inner: Arc::new(inner) })
    }

    /// The podman-api client, for tests and fixtures.
    pub fn client(&self) -> &Podman {
        &self.inner.podman
    }

    /// The address of the service this backend talks to.
    pub fn address(&self) -> &str {
        &self.inner.address
    }

    /// The engine's version (`4.3.1`).
    pub fn engine_version(&self) -> &str {
        &self.inner.engine_version
    }

    /// Who runs health checks on this engine.
    pub fn health_scheduling(&self) -> HealthScheduling {
        self.inner.scheduling
    }

    /// Whether the backend runs every health check itself (the engine's host has no
    /// systemd to schedule them).
    pub fn drives_health_checks(&self) -> bool {
        self.inner.scheduling == HealthScheduling::Backend
    }
}

impl Inner {
    /// Runs one engine call with the request timeout; a timeout is `Unavailable`.
    async fn call<T>(
        &self,
        what: &str,
        subject: Subject<'_>,
        call: impl Future<Output = podman_api::Result<T>>,
    ) -> Result<T> {
        self.call_within(self.config.request_timeout, what, subject, call).await
    }

    async fn call_within<T>(
        &self,
        limit: Duration,
        what: &str,
        subject: Subject<'_>,
        call: impl Future<Output = podman_api::Result<T>>,
    ) -> Result<T> {
        match tokio::time::timeout(limit, call).await {
            Ok(outcome) => outcome.map_err(|e| map_err(e, subject)),
            Err(_) => Err(timed_out(what, limit)),
        }
    }

    /// The container of this name if it is ours; a container of the name that is not
    /// ours is, for us, not there.
    async fn inspect(&self, session: &str) -> Result<Option<InspectContainerData>> {
        let container = self.podman.containers().get(session);
        match self.call("the container inspection", Subject::Session(session), container.inspect()).await {
            Ok(inspect) => Ok(self.owner.owns(&convert::labels_of(&inspect)).then_some(inspect)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The session's full state: the inspection, OOM evidence, hung health checks.
    async fn state(&self, session: &str) -> Result<SessionState> {
        let Some(inspect) = self.inspect(session).await? else {
            return Ok(SessionState::missing(session));
        };
        let mut state = convert::state_of(session, &inspect);
        let started_at =
            inspect.state.as_ref().and_then(|s| convert::engine_time(s.started_at.as_ref().map(|t| t.to_rfc3339())));
        self.refine(&mut state, started_at).await;
        Ok(state)
    }

    /// Applies what the engine does not say itself: OOM kills (from host evidence) and
    /// health checks hung past their timeout.
    async fn refine(&self, state: &mut SessionState, started_at: Option<OffsetDateTime>) {
        if let Some(exit) = &mut state.exit {
            self.oom.refine(&state.id, started_at, exit).await;
        }
        if state.status == SessionStatus::Running {
            if let Some(overlay) = health::overlay(&state.id) {
                state.health = overlay;
            }
        }
    }

    async fn list(&self) -> Result<Vec<podman_api::models::ListContainer>> {
        let filters = self
            .owner
            .label_filters()
            .into_iter()
            .filter_map(|f| f.split_once('=').map(|(k, v)| ContainerListFilter::LabelKeyVal(k.into(), v.into())));
        let opts = ContainerListOpts::builder().all(true).filter(filters).build();
        self.call("the container listing", Subject::Other, self.podman.containers().list(&opts)).await
    }

    fn not_found(session: &str) -> BackendError {
        BackendError::not_found(NAME, session)
    }

    /// Removes the container, and the files of its stdin keeper (container `id`), which
    /// ends with it.
    async fn remove(&self, session: &str, id: Option<&str>) -> Result<()> {
        // Force, without waiting for a stop timeout: remove is a kill.
        let opts = ContainerDeleteOpts::builder().force(true).volumes(true).timeout(0).build();
        let container = self.podman.containers().get(session);
        match self.call("the container removal", Subject::Session(session), container.delete(&opts)).await {
            Ok(()) => debug!(session = %session, "Container removed."),
            Err(e) if e.is_not_found() => {}
            // Removal already in progress (two removers at once).
            Err(BackendError::AlreadyExists { .. }) => {}
            Err(e) => return Err(e),
        }
        if let Some(id) = id {
            self.keepers.forget(id);
        }
        Ok(())
    }
}

#[async_trait]
impl ExecutionBackend for PodmanBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn ownership(&self) -> &OwnershipLabels {
        &self.inner.owner
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { oom_detection: self.inner.oom.can_detect(), ..Capabilities::ALL }
    }

    async fn gateway_addresses(&self) -> Result<NetworkGateways> {
        Ok(self.inner.gateways)
    }

    async fn isolated_network(&self) -> Result<Option<backend_core::IsolatedNetwork>> {
        self.inner.isolated_network_info().await
    }

    async fn session_addresses(&self, session: &str) -> Result<Vec<IpAddr>> {
        let inspect = self.inner.inspect(session).await?.ok_or_else(|| Inner::not_found(session))?;
        if !inspect.state.as_ref().and_then(|s| s.running).unwrap_or(false) {
            return Ok(Vec::new());
        }
        let networks = inspect.network_settings.and_then(|n| n.networks).unwrap_or_default();
        Ok(backend_core::session_addresses(
            networks.values().flat_map(|n| [n.ip_address.as_deref(), n.global_i_pv_6_address.as_deref()]),
        ))
    }

    async fn engine_cpus(&self) -> Result<Option<u32>> {
        let inner = &self.inner;
        let cpus = inner
            .cpus
            .get_or_try_init(|| async {
                let info = inner.call("the engine information", Subject::Other, inner.podman.info()).await?;
                Ok::<_, BackendError>(
                    info.host.and_then(|h| h.cpus).and_then(|n| u32::try_from(n).ok()).filter(|n| *n > 0),
                )
            })
            .await?;
        Ok(*cpus)
    }

    async fn image_exists(&self, image: &str) -> Result<bool> {
        let handle = self.inner.podman.images().get(image);
        self.inner.call("the image lookup", Subject::Image(image), handle.exists()).await
    }

    async fn image_user(&self, image: &str) -> Result<Option<String>> {
        let handle = self.inner.podman.images().get(image);
        let inspect = self.inner.call("the image inspection", Subject::Image(image), handle.inspect()).await?;
        Ok(inspect.config.and_then(|c| c.user).filter(|u| !u.trim().is_empty()))
    }

    fn engine_socket(&self) -> Option<std::path::PathBuf> {
        backend_core::unix_socket_path(&self.inner.address)
    }

    async fn create_session(&self, spec: &SessionSpec) -> Result<String> {
        let inner = &self.inner;
        inner.owner.validate_spec(spec)?;
        if let Some(cpus) = spec.resources.cpus {
            // Docker refuses a limit above the host's CPUs; Podman would take it in silence.
            if let Some(host) = self.engine_cpus().await?.filter(|host| cpus > f64::from(*host)) {
                let message = format!("Range of CPUs is from 0.01 to {host}, as there are only {host} CPUs available");
                return Err(BackendError::Rejected { backend: NAME, message });
            }
        }
        inner
            .call_within(inner.config.request_timeout, "the volume setup", Subject::Other, async {
                Ok::<_, podman_api::Error>(crate::volumes::ensure(&inner.podman, &inner.owner, spec).await)
            })
            .await??;
        let plan = convert::network_plan(
            spec.network,
            &inner.config.isolated_network,
            inner.gateways.internet,
            inner.gateways.isolated,
        );
        let body = convert::create_body(spec, &inner.owner, &plan);
        let subject = Subject::Create { session: &spec.session, image: &spec.image };
        let id = backend_core::create_replacing_stale(
            NAME,
            &spec.session,
            || inner.call("the container creation", subject, inner.libpod.create(&body)),
            || inner.inspect(&spec.session),
            |stale| async move { inner.remove(&spec.session, stale.id.as_deref()).await },
        )
        .await?;
        info!(session = %spec.session, id = %id, network = %spec.network, "Container created.");
        Ok(id)
    }

    async fn start_session(&self, session: &str) -> Result<()> {
        if self.inner.inspect(session).await?.is_none() {
            return Err(Inner::not_found(session));
        }
        let container = self.inner.podman.containers().get(session);
        match tokio::time::timeout(self.inner.config.request_timeout, container.start(None)).await {
            Ok(Ok(())) => {
                debug!(session = %session, "Container started.");
                Ok(())
            }
            // 304: already running.
            Ok(Err(e)) if status_of(&e).is_some_and(|s| s.as_u16() == 304) => Ok(()),
            Ok(Err(e)) => Err(map_err(e, Subject::Session(session))),
            Err(_) => Err(timed_out("the container start", self.inner.config.request_timeout)),
        }
    }

    async fn session_exists(&self, session: &str) -> Result<bool> {
        Ok(self.inner.inspect(session).await?.is_some())
    }

    async fn stop_session(&self, session: &str, grace: Duration) -> Result<()> {
        let inner = &self.inner;
        let Some(inspect) = inner.inspect(session).await? else {
            return Err(Inner::not_found(session));
        };
        let status = convert::status_of(inspect.state.as_ref().and_then(|s| s.status.as_deref()).unwrap_or_default());
        if status != SessionStatus::Running {
            return Ok(());
        }
        let id = inspect.id.clone().unwrap_or_else(|| session.to_owned());
        // libpod reads the grace period only as lowercase `timeout=` (see raw.rs); the
        // call lasts as long as the grace period, so it gets that much more time.
        let limit = inner.config.request_timeout + grace;
        inner
            .call_within(
                limit,
                "the container stop",
                Subject::Session(session),
                inner.libpod.stop(&id, grace_secs(grace)),
            )
            .await?;
        info!(session = %session, grace_ms = grace.as_millis() as u64, "Container stopped.");
        Ok(())
    }

    async fn remove_session(&self, session: &str) -> Result<()> {
        let Some(inspect) = self.inner.inspect(session).await? else {
            return Ok(());
        };
        self.inner.remove(session, inspect.id.as_deref()).await
    }

    async fn send_command(&self, session: &str, command: &[String]) -> Result<CommandOutput> {
        let inner = &self.inner;
        if inner.inspect(session).await?.is_none() {
            return Err(Inner::not_found(session));
        }
        let container = inner.podman.containers().get(session);
        let opts =
            ExecCreateOpts::builder().command(command.iter().cloned()).attach_stdout(true).attach_stderr(true).build();
        let exec = inner.call("the exec creation", Subject::Session(session), container.create_exec(&opts)).await?;
        let run = async {
            let mut output = String::new();
            if let Some(mut stream) = exec.start(&ExecStartOpts::builder().build()).await? {
                while let Some(chunk) = stream.next().await {
                    output.push_str(&String::from_utf8_lossy(&chunk?));
                }
            }
            Ok(output)
        };
        let output = inner.call("the command", Subject::Session(session), run).await?;
        let details = inner.call("the exec inspection", Subject::Other, exec.inspect()).await?;
        Ok(CommandOutput { exit_code: details.get("ExitCode").and_then(serde_json::Value::as_i64), output })
    }

    async fn snapshot(&self) -> Result<Vec<SessionState>> {
        let inner = &self.inner;
        let listed = inner.list().await?;
        let mut states = Vec::with_capacity(listed.len());
        for summary in &listed {
            let Some(mut state) = convert::state_of_summary(summary) else { continue };
            if !inner.owner.owns(&state.labels) {
                continue;
            }
            if let Some(exit) = &state.exit {
                if inner.oom.listing_cannot_tell(exit) {
                    // The listing lacks the engine's OOM flag: callers ask
                    // session_exit_info, which inspects.
                    state.exit = None;
                }
            }
            let started_at = convert::unix_time(summary.started_at);
            inner.refine(&mut state, started_at).await;
            states.push(state);
        }
        Ok(states)
    }

    async fn session_state(&self, session: &str) -> Result<SessionState> {
        self.inner.state(session).await
    }

    async fn session_health(&self, session: &str) -> Result<SessionHealth> {
        Ok(self.inner.state(session).await?.health)
    }

    async fn session_exit_info(&self, session: &str) -> Result<Option<SessionExitInfo>> {
        Ok(self.inner.state(session).await?.exit)
    }

    async fn session_logs(&self, session: &str, tail: Option<usize>) -> Result<String> {
        let inner = &self.inner;
        if inner.inspect(session).await?.is_none() {
            return Err(Inner::not_found(session));
        }
        let container = inner.podman.containers().get(session);
        let opts = ContainerLogsOpts::builder()
            .stdout(true)
            .stderr(true)
            .tail(tail.map_or_else(|| "all".to_owned(), |t| t.to_string()))
            .build();
        let read = async {
            let mut logs = LogsCollector::new();
            let mut stream = container.logs(&opts);
            while let Some(chunk) = stream.next().await {
                logs.push(&chunk?);
            }
            Ok(logs.finish())
        };
        inner.call("the logs", Subject::Session(session), read).await
    }

    async fn attach_session(&self, session: &str, from: Option<OutputCursor>) -> Result<SessionAttach> {
        let inner = &self.inner;
        let inspect = inner.inspect(session).await?.ok_or_else(|| Inner::not_found(session))?;
        if !inspect.state.as_ref().and_then(|s| s.running).unwrap_or(false) {
            return Err(attach::not_running(session));
        }
        if !inspect.config.as_ref().and_then(|c| c.open_stdin).unwrap_or(false) {
            return Err(BackendError::InvalidSpec {
                field: "stdin_open",
                message: format!("session {session} was created without an open stdin; it cannot be written to"),
            });
        }
        let id = inspect.id.clone().unwrap_or_default();
        // Never libpod's attach with stdin: its end would close the session's stdin. The
        // session's keeper holds one attach for the whole run (see stdin.rs).
        let input = match inner.keepers.input(&inner.podman, session, &id).await {
            Ok(input) => input,
            Err(e @ BackendError::Engine { .. }) => {
                // The session may have ended or gone meanwhile: say that instead.
                return Err(match inner.inspect(session).await {
                    Ok(None) => Inner::not_found(session),
                    Ok(Some(now)) if !now.state.as_ref().and_then(|s| s.running).unwrap_or(false) => {
                        attach::not_running(session)
                    }
                    _ => e,
                });
            }
            Err(e) => return Err(e),
        };
        let output = attach::output(&inner.podman, session, from, true);
        Ok(SessionAttach { input: Box::new(input), output })
    }

    async fn list_volumes(&self) -> Result<Vec<backend_core::VolumeState>> {
        crate::volumes::list(&self.inner.podman, &self.inner.owner).await
    }

    async fn remove_volume(&self, name: &str) -> Result<()> {
        crate::volumes::remove(&self.inner.podman, &self.inner.owner, name).await
    }

    async fn session_output(&self, session: &str, from: Option<OutputCursor>, follow: bool) -> Result<OutputLines> {
        let inner = &self.inner;
        if inner.inspect(session).await?.is_none() {
            return Err(Inner::not_found(session));
        }
        Ok(attach::output(&inner.podman, session, from, follow))
    }

    async fn subscribe_events(&self) -> Result<Option<EventReceiver>> {
        let inner = &self.inner;
        // Fail now, not in the background, when the engine is down.
        inner.call("the ping", Subject::Other, inner.podman.ping()).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(EVENT_BUFFER);
        let pump = Pump {
            podman: inner.podman.clone(),
            owner: inner.owner.clone(),
            tx,
            driver: inner.health_events.subscribe(),
            // From a second ago: the stream connects in the background, and a service on
            // another host may run a little behind this clock.
            since: OffsetDateTime::now_utc() - Duration::from_secs(1),
            request_timeout: inner.config.request_timeout,
        };
        tokio::spawn(pump.run());
        Ok(Some(rx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_to_their_major() {
        assert_eq!(parse_major("4.3.1"), Some(4));
        assert_eq!(parse_major("v5.0.0-dev"), Some(5));
        assert_eq!(parse_major(""), None);
    }
}
