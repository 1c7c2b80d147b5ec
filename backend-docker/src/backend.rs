//! The Docker implementation of the backend contract.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::time::Duration;

use async_trait::async_trait;
use backend_core::{
    timestamped_lines, BackendError, Capabilities, CommandOutput, EventReceiver, ExecutionBackend, LineWriter,
    LogsCollector, NetworkGateways, OutputCursor, OutputDecoder, OutputLines, OutputStream, OwnershipLabels, Result,
    SessionAttach, SessionExitInfo, SessionHealth, SessionSpec, SessionState, SessionStatus, EVENT_BUFFER,
    LABEL_PREFIX,
};
use bollard::container::LogOutput;
use bollard::exec::{StartExecOptions, StartExecResults};
use bollard::models::{ExecConfig, NetworkCreateRequest};
use bollard::query_parameters::{
    AttachContainerOptions, CreateContainerOptions, InspectContainerOptions, InspectNetworkOptions,
    ListContainersOptions, ListNetworksOptions, LogsOptions, RemoveContainerOptions, StartContainerOptions,
    StopContainerOptions,
};
use bollard::Docker;
use futures_util::StreamExt;
use tracing::{debug, info};

use crate::convert::{self, grace_secs};
use crate::error::{map_err, Subject, NAME};
use crate::{events, DockerConfig};

/// The oldest engine API this backend supports: 1.41 (Docker 20.10) brought
/// `host-gateway`, which the `internet` policy relies on.
const MIN_API: (u32, u32) = (1, 41);

/// An [`ExecutionBackend`] on Docker Engine.
#[derive(Debug, Clone)]
pub struct DockerBackend {
    docker: Docker,
    owner: OwnershipLabels,
    config: DockerConfig,
    /// The id of the internal network for `isolated` sessions.
    isolated_network: String,
    /// The host's addresses on the default bridge and the isolated network.
    gateways: NetworkGateways,
}

/// The address of this host on a network: its IPAM gateway, or else (the default bridge
/// lists only its subnet) the subnet's first address, as Docker assigns it. Docker brings
/// a network's bridge up when it creates the network, so the address counts only if it
/// is bound here (with a remote engine there is none).
fn host_gateway(configs: Vec<bollard::models::IpamConfig>) -> Option<IpAddr> {
    let candidates = configs.into_iter().flat_map(|c| {
        let gateway = c.gateway.and_then(|g| g.parse::<IpAddr>().ok());
        let first = c.subnet.and_then(|s| {
            let (net, _) = s.split_once('/')?;
            let net: std::net::Ipv4Addr = net.parse().ok()?;
            Some(IpAddr::V4(std::net::Ipv4Addr::from(u32::from(net) + 1)))
        });
        gateway.into_iter().chain(first)
    });
    backend_core::host_address(candidates, false)
}

fn parse_api(version: &str) -> Option<(u32, u32)> {
    let (major, minor) = version.split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

impl DockerBackend {
    /// Connects to the engine, checks its API version, and prepares the networks. Fails
    /// with [`BackendError::Unavailable`] naming the address when the engine does not
    /// answer, and with [`BackendError::Unsupported`] when it is too old.
    pub async fn connect(config: DockerConfig, owner: OwnershipLabels) -> Result<Self> {
        let address = config.address();
        let unavailable = |message: String| BackendError::Unavailable { backend: NAME, message, source: None };
        let docker = Docker::connect_with_host(&address).map_err(|e| {
            unavailable(format!("cannot use Docker address {address}: {e}; set [docker] socket or DOCKER_HOST"))
        })?;
        let docker = docker.with_timeout(config.request_timeout);
        let docker = docker.negotiate_version().await.map_err(|e| {
            unavailable(format!(
                "Docker Engine does not answer at {address}: {e}. Start it (for example `dockerd`), or point \
                 [docker] socket / DOCKER_HOST at it"
            ))
        })?;
        let version = docker.version().await.map_err(|e| map_err(e, Subject::Other))?;
        let api = version.api_version.clone().unwrap_or_default();
        match parse_api(&api) {
            Some(found) if found >= MIN_API => {}
            _ => {
                return Err(BackendError::Engine {
                    backend: NAME,
                    message: format!(
                        "Docker Engine at {address} speaks API {api:?} (engine {}); agentd needs API {}.{} (Docker 20.10) or newer",
                        version.version.unwrap_or_default(),
                        MIN_API.0,
                        MIN_API.1
                    ),
                    source: None,
                })
            }
        }
        info!(address = %address, api = %api, engine = %version.version.unwrap_or_default(), "Connected to Docker Engine.");
        let mut backend = Self {
            isolated_network: config.isolated_network.clone(),
            docker,
            owner,
            config,
            gateways: NetworkGateways::default(),
        };
        backend.gateways.internet = backend.network_gateway("bridge").await?;
        let (network, gateway) = backend.ensure_isolated_network().await?;
        backend.isolated_network = network;
        backend.gateways.isolated = gateway;
        Ok(backend)
    }

    /// The bollard client, for tests and fixtures.
    pub fn client(&self) -> &Docker {
        &self.docker
    }

    async fn network_gateway(&self, network: &str) -> Result<Option<IpAddr>> {
        let inspect = self
            .docker
            .inspect_network(network, None::<InspectNetworkOptions>)
            .await
            .map_err(|e| map_err(e, Subject::Other))?;
        Ok(host_gateway(inspect.ipam.and_then(|ipam| ipam.config).unwrap_or_default()))
    }

    /// The internal network for isolated sessions: its id and host-side gateway. Docker
    /// allows several networks of one name (concurrent creates race); every agentd picks
    /// the oldest, so all converge on one.
    async fn find_isolated_network(&self) -> Result<Option<(String, Option<IpAddr>)>> {
        let name = &self.config.isolated_network;
        let options = ListNetworksOptions { filters: Some(HashMap::from([("name".to_owned(), vec![name.clone()])])) };
        let mut networks: Vec<_> = self
            .docker
            .list_networks(Some(options))
            .await
            .map_err(|e| map_err(e, Subject::Other))?
            .into_iter()
            .filter(|n| n.name.as_deref() == Some(name.as_str()))
            .collect();
        networks.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
        Ok(networks.into_iter().next().map(|n| {
            let gateway = host_gateway(n.ipam.and_then(|ipam| ipam.config).unwrap_or_default());
            (n.id.unwrap_or_default(), gateway)
        }))
    }

    /// Creates the internal network for isolated sessions unless it exists. An internal
    /// network has no route out of the host; its gateway address is the host side, where
    /// the daemon serves the agent channel.
    async fn ensure_isolated_network(&self) -> Result<(String, Option<IpAddr>)> {
        static CREATING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let _one_at_a_time = CREATING.lock().await;
        if let Some(found) = self.find_isolated_network().await? {
            return Ok(found);
        }
        let request = NetworkCreateRequest {
            name: self.config.isolated_network.clone(),
            driver: Some("bridge".into()),
            internal: Some(true),
            labels: Some(HashMap::from([(LABEL_PREFIX.to_owned(), self.owner.prefix().to_owned())])),
            ..NetworkCreateRequest::default()
        };
        match self.docker.create_network(request).await {
            Ok(_) => {
                info!(network = %self.config.isolated_network, "Created the internal network for isolated agents.")
            }
            Err(bollard::errors::Error::DockerResponseServerError { status_code: 409, .. }) => {}
            Err(e) => return Err(map_err(e, Subject::Other)),
        }
        self.find_isolated_network().await?.ok_or_else(|| {
            BackendError::engine(
                NAME,
                format!("network {} vanished right after it was created", self.config.isolated_network),
            )
        })
    }

    async fn inspect(&self, session: &str) -> Result<Option<bollard::models::ContainerInspectResponse>> {
        match self.docker.inspect_container(session, None::<InspectContainerOptions>).await {
            Ok(inspect) => {
                let labels =
                    inspect.config.as_ref().and_then(|c| c.labels.clone()).unwrap_or_default().into_iter().collect();
                // A container of this name that is not ours is, for us, not there.
                Ok(self.owner.owns(&labels).then_some(inspect))
            }
            Err(e) => match map_err(e, Subject::Session(session)) {
                e if e.is_not_found() => Ok(None),
                e => Err(e),
            },
        }
    }

    async fn list(&self, extra: Option<(&str, &str)>) -> Result<Vec<bollard::models::ContainerSummary>> {
        let mut filters = HashMap::from([("label".to_owned(), self.owner.label_filters())]);
        if let Some((key, value)) = extra {
            filters.insert(key.to_owned(), vec![value.to_owned()]);
        }
        let options = ListContainersOptions { all: true, filters: Some(filters), ..ListContainersOptions::default() };
        self.docker.list_containers(Some(options)).await.map_err(|e| map_err(e, Subject::Other))
    }

    /// Creates the spec's named volumes that do not exist yet, with the ownership
    /// labels; one of that name that is not ours is [`BackendError::AlreadyExists`].
    async fn ensure_volumes(&self, spec: &SessionSpec) -> Result<()> {
        for volume in &spec.volumes {
            match self.docker.inspect_volume(&volume.name).await {
                Ok(found) => {
                    let labels = found.labels.into_iter().collect();
                    if !self.owner.owns(&labels) {
                        return Err(BackendError::not_owned(NAME, "volume", &volume.name));
                    }
                }
                Err(e) => match map_err(e, Subject::Session(&volume.name)) {
                    e if e.is_not_found() => {
                        let labels = self.owner.labels_for(&spec.session, &spec.agent_id).into_iter().collect();
                        let request = bollard::models::VolumeCreateRequest {
                            name: Some(volume.name.clone()),
                            labels: Some(labels),
                            ..Default::default()
                        };
                        self.docker.create_volume(request).await.map_err(|e| map_err(e, Subject::Other))?;
                    }
                    e => return Err(e),
                },
            }
        }
        Ok(())
    }

    fn not_found(session: &str) -> BackendError {
        BackendError::not_found(NAME, session)
    }
}

#[async_trait]
impl ExecutionBackend for DockerBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn ownership(&self) -> &OwnershipLabels {
        &self.owner
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::ALL
    }

    async fn gateway_addresses(&self) -> Result<NetworkGateways> {
        Ok(self.gateways)
    }

    async fn isolated_network(&self) -> Result<Option<backend_core::IsolatedNetwork>> {
        let inspect = self
            .docker
            .inspect_network(&self.isolated_network, None::<InspectNetworkOptions>)
            .await
            .map_err(|e| map_err(e, Subject::Other))?;
        let id = inspect.id.clone().unwrap_or_else(|| self.isolated_network.clone());
        // Docker names a network's bridge `br-` and the first 12 characters of its id,
        // unless the network was created with a name of its own for it.
        let interface = inspect
            .options
            .as_ref()
            .and_then(|o| o.get("com.docker.network.bridge.name"))
            .filter(|n| !n.is_empty())
            .cloned()
            .unwrap_or_else(|| format!("br-{}", id.get(..12).unwrap_or(&id)));
        let configs = inspect.ipam.and_then(|ipam| ipam.config).unwrap_or_default();
        let subnets = configs.iter().filter_map(|c| c.subnet.clone()).collect();
        // The IPv4 address as for the gateway addresses; an IPv6 subnet's gateway as Docker
        // lists it.
        let v6 = configs.iter().filter_map(|c| c.gateway.as_deref()?.parse::<IpAddr>().ok()).filter(IpAddr::is_ipv6);
        let gateways = self.gateways.isolated.into_iter().chain(v6).collect();
        Ok(Some(backend_core::IsolatedNetwork {
            name: inspect.name.unwrap_or_else(|| self.config.isolated_network.clone()),
            interface,
            gateways,
            subnets,
            on_this_host: self.gateways.isolated.is_some(),
        }))
    }

    async fn session_addresses(&self, session: &str) -> Result<Vec<IpAddr>> {
        let inspect = self.inspect(session).await?.ok_or_else(|| Self::not_found(session))?;
        if !inspect.state.as_ref().and_then(|s| s.running).unwrap_or(false) {
            return Ok(Vec::new());
        }
        let networks = inspect.network_settings.and_then(|n| n.networks).unwrap_or_default();
        Ok(backend_core::session_addresses(
            networks.values().flat_map(|n| [n.ip_address.as_deref(), n.global_ipv6_address.as_deref()]),
        ))
    }

    async fn engine_cpus(&self) -> Result<Option<u32>> {
        let info = self.docker.info().await.map_err(|e| map_err(e, Subject::Other))?;
        Ok(info.ncpu.and_then(|n| u32::try_from(n).ok()).filter(|n| *n > 0))
    }

    async fn image_exists(&self, image: &str) -> Result<bool> {
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(e) => match map_err(e, Subject::Image(image)) {
                BackendError::ImageNotFound { .. } => Ok(false),
                other => Err(other),
            },
        }
    }

    async fn image_user(&self, image: &str) -> Result<Option<String>> {
        let inspect = self.docker.inspect_image(image).await.map_err(|e| map_err(e, Subject::Image(image)))?;
        Ok(inspect.config.and_then(|c| c.user).filter(|u| !u.trim().is_empty()))
    }

    fn engine_socket(&self) -> Option<std::path::PathBuf> {
        backend_core::unix_socket_path(&self.config.address())
    }

    async fn create_session(&self, spec: &SessionSpec) -> Result<String> {
        self.owner.validate_spec(spec)?;
        self.ensure_volumes(spec).await?;
        let plan = convert::network_plan(spec.network, &self.isolated_network);
        let body = convert::create_body(spec, &self.owner, plan);
        let options = CreateContainerOptions { name: Some(spec.session.clone()), platform: String::new() };
        let create = || async {
            let created = self.docker.create_container(Some(options.clone()), body.clone()).await;
            created.map(|c| c.id).map_err(|e| map_err(e, Subject::Session(&spec.session)))
        };
        let id = backend_core::create_replacing_stale(
            NAME,
            &spec.session,
            create,
            || self.inspect(&spec.session),
            |_| self.remove_session(&spec.session),
        )
        .await?;
        debug!(session = %spec.session, id = %id, "Container created.");
        Ok(id)
    }

    async fn start_session(&self, session: &str) -> Result<()> {
        if self.inspect(session).await?.is_none() {
            return Err(Self::not_found(session));
        }
        self.docker
            .start_container(session, None::<StartContainerOptions>)
            .await
            .map_err(|e| map_err(e, Subject::Session(session)))
    }

    async fn session_exists(&self, session: &str) -> Result<bool> {
        Ok(self.inspect(session).await?.is_some())
    }

    async fn stop_session(&self, session: &str, grace: Duration) -> Result<()> {
        if self.inspect(session).await?.is_none() {
            return Err(Self::not_found(session));
        }
        let secs = grace_secs(grace);
        let options = StopContainerOptions { t: Some(i32::try_from(secs).unwrap_or(i32::MAX)), signal: None };
        // The call lasts as long as the grace period: give it that much more time.
        let docker = self.docker.clone().with_timeout(self.config.request_timeout + grace);
        match docker.stop_container(session, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) => Err(map_err(e, Subject::Session(session))),
        }
    }

    async fn remove_session(&self, session: &str) -> Result<()> {
        if self.inspect(session).await?.is_none() {
            return Ok(());
        }
        let options = RemoveContainerOptions { force: true, v: true, link: false };
        match self.docker.remove_container(session, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) => match map_err(e, Subject::Session(session)) {
                e if e.is_not_found() => Ok(()),
                // Removal already in progress (two removers at once).
                BackendError::AlreadyExists { .. } => Ok(()),
                e => Err(e),
            },
        }
    }

    async fn send_command(&self, session: &str, command: &[String]) -> Result<CommandOutput> {
        if self.inspect(session).await?.is_none() {
            return Err(Self::not_found(session));
        }
        let exec = self
            .docker
            .create_exec(
                session,
                ExecConfig {
                    cmd: Some(command.to_vec()),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    ..ExecConfig::default()
                },
            )
            .await
            .map_err(|e| map_err(e, Subject::Session(session)))?;
        let mut output = String::new();
        match self
            .docker
            .start_exec(&exec.id, None::<StartExecOptions>)
            .await
            .map_err(|e| map_err(e, Subject::Session(session)))?
        {
            StartExecResults::Attached { output: mut stream, .. } => {
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(|e| map_err(e, Subject::Session(session)))?;
                    output.push_str(&chunk.to_string());
                }
            }
            StartExecResults::Detached => {}
        }
        let inspect = self.docker.inspect_exec(&exec.id).await.map_err(|e| map_err(e, Subject::Other))?;
        Ok(CommandOutput { exit_code: inspect.exit_code, output })
    }

    async fn snapshot(&self) -> Result<Vec<SessionState>> {
        let all = self.list(None).await?;
        // Engines with API 1.52+ put health in the listing: one call. Docker 20.10's
        // listing has none; two filtered listings then give it exactly, without parsing
        // the human-readable status text.
        let running =
            |c: &&bollard::models::ContainerSummary| convert::status_of_summary(c.state) == SessionStatus::Running;
        let listed_health = all.iter().filter(running).all(|c| c.health.as_ref().and_then(|h| h.status).is_some());
        let health_of: Box<dyn Fn(&bollard::models::ContainerSummary) -> SessionHealth + Send> = if listed_health {
            Box::new(convert::health_of_summary)
        } else {
            let (unhealthy, starting) =
                tokio::try_join!(self.list(Some(("health", "unhealthy"))), self.list(Some(("health", "starting"))))?;
            let ids = |list: Vec<bollard::models::ContainerSummary>| -> HashSet<String> {
                list.into_iter().filter_map(|c| c.id).collect()
            };
            let (unhealthy, starting) = (ids(unhealthy), ids(starting));
            Box::new(move |summary| {
                let id = summary.id.as_deref().unwrap_or_default();
                if unhealthy.contains(id) {
                    SessionHealth::Unhealthy
                } else if starting.contains(id) {
                    SessionHealth::Starting
                } else {
                    SessionHealth::Healthy
                }
            })
        };
        Ok(all
            .iter()
            .filter_map(|summary| convert::state_of_summary(summary, health_of(summary)))
            .filter(|s| self.owner.owns(&s.labels))
            .collect())
    }

    async fn session_state(&self, session: &str) -> Result<SessionState> {
        Ok(match self.inspect(session).await? {
            Some(inspect) => convert::state_of(session, &inspect),
            None => SessionState::missing(session),
        })
    }

    async fn session_health(&self, session: &str) -> Result<SessionHealth> {
        Ok(self.session_state(session).await?.health)
    }

    async fn session_exit_info(&self, session: &str) -> Result<Option<SessionExitInfo>> {
        Ok(self.session_state(session).await?.exit)
    }

    async fn session_logs(&self, session: &str, tail: Option<usize>) -> Result<String> {
        if self.inspect(session).await?.is_none() {
            return Err(Self::not_found(session));
        }
        let options = LogsOptions {
            stdout: true,
            stderr: true,
            tail: tail.map_or_else(|| "all".to_owned(), |t| t.to_string()),
            ..LogsOptions::default()
        };
        let mut stream = self.docker.logs(session, Some(options));
        let mut logs = LogsCollector::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| map_err(e, Subject::Session(session)))?;
            logs.push(&chunk.into_bytes());
        }
        Ok(logs.finish())
    }

    async fn list_volumes(&self) -> Result<Vec<backend_core::VolumeState>> {
        let filters = HashMap::from([("label".to_owned(), self.owner.label_filters())]);
        let options = bollard::query_parameters::ListVolumesOptions { filters: Some(filters) };
        let listed = self.docker.list_volumes(Some(options)).await.map_err(|e| map_err(e, Subject::Other))?;
        Ok(listed
            .volumes
            .unwrap_or_default()
            .into_iter()
            .map(|v| backend_core::VolumeState {
                name: v.name,
                created_at: v.created_at,
                labels: v.labels.into_iter().collect(),
            })
            .filter(|v| self.owner.owns(&v.labels))
            .collect())
    }

    async fn remove_volume(&self, name: &str) -> Result<()> {
        match self.docker.inspect_volume(name).await {
            Ok(found) => {
                if !self.owner.owns(&found.labels.into_iter().collect()) {
                    return Ok(());
                }
            }
            Err(e) => {
                return match map_err(e, Subject::Session(name)) {
                    e if e.is_not_found() => Ok(()),
                    e => Err(e),
                }
            }
        }
        let options = bollard::query_parameters::RemoveVolumeOptions { force: false };
        match self.docker.remove_volume(name, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) => match map_err(e, Subject::Session(name)) {
                e if e.is_not_found() => Ok(()),
                BackendError::AlreadyExists { detail, .. } => {
                    Err(BackendError::engine(NAME, format!("volume {name} is in use: {detail}")))
                }
                e => Err(e),
            },
        }
    }

    async fn attach_session(&self, session: &str, from: Option<OutputCursor>) -> Result<SessionAttach> {
        let inspect = self.inspect(session).await?.ok_or_else(|| Self::not_found(session))?;
        // A paused container counts as running: the attach waits for it like its stdin does.
        if !inspect.state.as_ref().and_then(|s| s.running).unwrap_or(false) {
            return Err(BackendError::engine(NAME, format!("session {session} is not running; cannot attach")));
        }
        if !inspect.config.as_ref().and_then(|c| c.open_stdin).unwrap_or(false) {
            return Err(BackendError::InvalidSpec {
                field: "stdin_open",
                message: format!("session {session} was created without an open stdin; it cannot be written to"),
            });
        }
        // Stdin through the attach; output from the log, which carries positions.
        let options =
            AttachContainerOptions { stdin: true, stream: true, stdout: false, stderr: false, ..Default::default() };
        let attached = self
            .docker
            .attach_container(session, Some(options))
            .await
            .map_err(|e| map_err(e, Subject::Session(session)))?;
        let output = self.session_output(session, from, true).await?;
        Ok(SessionAttach { input: Box::new(LineWriter::new(NAME, attached.input)), output })
    }

    async fn session_output(&self, session: &str, from: Option<OutputCursor>, follow: bool) -> Result<OutputLines> {
        if self.inspect(session).await?.is_none() {
            return Err(Self::not_found(session));
        }
        let since = OutputDecoder::new(from).since_secs().unwrap_or(0).max(0);
        let options = LogsOptions {
            stdout: true,
            stderr: true,
            timestamps: true,
            follow,
            since: i32::try_from(since).unwrap_or(i32::MAX),
            tail: "all".to_owned(),
            ..LogsOptions::default()
        };
        let owned = session.to_owned();
        let entries = self.docker.logs(session, Some(options)).filter_map(move |item| {
            let out = match item {
                Ok(LogOutput::StdOut { message }) => Some(Ok((OutputStream::Stdout, message))),
                Ok(LogOutput::StdErr { message }) => Some(Ok((OutputStream::Stderr, message))),
                Ok(LogOutput::Console { message }) => Some(Ok((OutputStream::Stdout, message))),
                Ok(LogOutput::StdIn { .. }) => None,
                Err(e) => Some(Err(map_err(e, Subject::Session(&owned)))),
            };
            std::future::ready(out)
        });
        Ok(timestamped_lines(entries, from))
    }

    async fn subscribe_events(&self) -> Result<Option<EventReceiver>> {
        // Fail now, not in the background, when the engine is down.
        self.docker.ping().await.map_err(|e| map_err(e, Subject::Other))?;
        let (tx, rx) = tokio::sync::mpsc::channel(EVENT_BUFFER);
        tokio::spawn(events::pump(self.docker.clone(), self.owner.clone(), tx));
        Ok(Some(rx))
    }
}
