//! The simulated engine shared by every [`crate::MockBackend`] built on it.

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use backend_core::{
    BackendError, BackendEvent, Capabilities, EventReceiver, EventSender, HealthCheck, HealthCheckSpec, NetworkPolicy,
    OutputStream, OwnershipLabels, SessionExitInfo, SessionHealth, SessionSpec, SessionState, SessionStatus,
    EVENT_BUFFER, LABEL_SESSION,
};
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::agent::{self, EchoSession};
use crate::output::{self, Output, Stdin};

pub(crate) const NAME: &str = "mock";

/// The most calls the call log keeps ([`MockEngine::calls`]); older ones are dropped
/// first, so a long-running `backend = "mock"` daemon does not grow without bound.
pub const MAX_CALLS: usize = 100_000;

/// The echo-agent image, with a health check every second (like the real image).
pub const ECHO_IMAGE: &str = "agentd-echo:latest";
/// An image without a health check and without a `USER` (it would run as root).
pub const PLAIN_IMAGE: &str = "agentd-plain:latest";
/// The `USER` of [`ECHO_IMAGE`], as the real image has it.
pub const ECHO_IMAGE_USER: &str = "65534:65534";

/// One call a backend made to the engine, for tests that count engine round trips.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MockCall {
    ImageExists(String),
    /// `image_user`.
    ImageUser(String),
    Create(String),
    Start(String),
    Exists(String),
    Stop(String),
    Remove(String),
    Exec(String),
    Snapshot,
    State(String),
    Health(String),
    ExitInfo(String),
    Logs(String),
    /// `attach_session`.
    Attach(String),
    /// `session_output`.
    Output(String),
    Subscribe,
    Volumes,
    RemoveVolume(String),
    /// `session_addresses`.
    Addresses(String),
}

/// The simulated echo-agent behaviour of one container, from its environment.
#[derive(Debug, Clone, Default)]
struct Behaviour {
    exit_after: Option<Duration>,
    exit_code: i64,
    alloc_mb: Option<u64>,
    oom: bool,
    ignore_sigterm: bool,
    unhealthy_after: Option<Duration>,
    /// Stdio mode: the stream-json session id.
    stdio: Option<String>,
    /// Run as `/agent --version`: print the version and exit 0.
    version: bool,
}

impl Behaviour {
    fn from_spec(spec: &SessionSpec) -> Self {
        let ms = |key: &str| spec.env.get(key).and_then(|v| v.parse::<u64>().ok()).map(Duration::from_millis);
        let alloc_mb = spec.env.get("ECHO_ALLOC_MB").and_then(|v| v.parse::<u64>().ok());
        let oom = match (alloc_mb, spec.resources.memory_bytes) {
            (Some(mb), Some(limit)) => mb * 1024 * 1024 > limit,
            _ => false,
        };
        Self {
            exit_after: ms("ECHO_EXIT_AFTER_MS"),
            exit_code: spec.env.get("ECHO_EXIT_CODE").and_then(|v| v.parse().ok()).unwrap_or(0),
            alloc_mb,
            oom,
            ignore_sigterm: spec.env.get("ECHO_IGNORE_SIGTERM").is_some_and(|v| v == "1"),
            unhealthy_after: ms("ECHO_UNHEALTHY_AFTER_MS"),
            stdio: agent::stdio_session_id(spec),
            version: agent::agent_args(spec).first().is_some_and(|a| a == "--version"),
        }
    }
}

#[derive(Debug, Clone)]
struct Container {
    id: String,
    labels: BTreeMap<String, String>,
    status: SessionStatus,
    health: SessionHealth,
    pinned_health: Option<SessionHealth>,
    exit: Option<SessionExitInfo>,
    created_at: OffsetDateTime,
    check: Option<HealthCheck>,
    behaviour: Behaviour,
    /// Bumped on every start and stop, so timers of an earlier run do nothing.
    generation: u64,
    /// Consecutive failed health checks in this run.
    check_failures: u32,
    /// Everything the container wrote, capped (see [`output::MAX_LOG_ENTRIES`] and
    /// [`output::MAX_LOG_BYTES`]): what `session_logs`, `session_output` and attaches read.
    output: Output,
    /// Created with [`SessionSpec::stdin_open`].
    stdin_open: bool,
    /// The stdin of the current run's simulated agent (stdio mode with an open stdin).
    /// Dropped when the run ends, never by a detach.
    stdin: Option<mpsc::UnboundedSender<String>>,
    /// The named volumes it mounts.
    volumes: Vec<String>,
    /// The image, when it is missing (a pod-like engine creates the container anyway).
    missing_image: Option<String>,
    /// The spec it was created from.
    spec: Option<SessionSpec>,
    /// Its address on its network while it runs (see [`MockEngine::session_address`]);
    /// `None` for the `none` and `host` networks.
    address: Option<IpAddr>,
}

impl Container {
    fn new(
        id: String,
        labels: BTreeMap<String, String>,
        check: Option<HealthCheck>,
        behaviour: Behaviour,
        stdin_open: bool,
    ) -> Self {
        Container {
            id,
            labels,
            status: SessionStatus::Created,
            health: SessionHealth::Unknown,
            pinned_health: None,
            exit: None,
            created_at: OffsetDateTime::now_utc(),
            check,
            behaviour,
            generation: 0,
            check_failures: 0,
            output: output::new_output(),
            stdin_open,
            stdin: None,
            volumes: Vec::new(),
            missing_image: None,
            spec: None,
            address: None,
        }
    }

    /// Writes engine-side lines of the current run (start-up, exit messages).
    fn say(&self, lines: impl IntoIterator<Item = String>) {
        self.output.send_modify(|log| log.append(lines.into_iter().map(|l| (OutputStream::Stdout, l))));
    }

    fn health(&self) -> SessionHealth {
        if self.status != SessionStatus::Running {
            return SessionHealth::Unknown;
        }
        self.pinned_health.unwrap_or(self.health)
    }

    fn state(&self, name: &str, include_exit: bool) -> SessionState {
        SessionState {
            session: name.to_owned(),
            id: self.id.clone(),
            status: self.status,
            health: self.health(),
            exit: if include_exit { self.exit.clone() } else { None },
            created_at: Some(self.created_at),
            labels: self.labels.clone(),
        }
    }
}

#[derive(Debug)]
struct Subscriber {
    owner: OwnershipLabels,
    tx: EventSender,
    lagged: bool,
}

type CallMatcher = Arc<dyn Fn(&MockCall) -> bool + Send + Sync>;

struct State {
    containers: BTreeMap<String, Container>,
    images: BTreeMap<String, Option<HealthCheck>>,
    /// The `USER` of each image that has one.
    image_users: BTreeMap<String, String>,
    next_id: u64,
    fail_next: u32,
    fail_matching: Vec<(u32, CallMatcher)>,
    slow_matching: Vec<(Duration, CallMatcher)>,
    latency: Duration,
    calls: VecDeque<MockCall>,
    subscribers: Vec<Subscriber>,
    snapshot_exit_info: bool,
    /// The host's CPUs, as the engine reports them; `None`: it cannot tell.
    cpus: Option<u32>,
    /// Creates refused as invalid with this answer (see [`MockEngine::reject_creates`]).
    reject_creates: Option<String>,
    /// What backends report, and the lifecycle the engine follows.
    capabilities: Capabilities,
    /// Named volumes: name → (labels, created at).
    volumes: BTreeMap<String, (BTreeMap<String, String>, OffsetDateTime)>,
    /// What backends report as the isolated network (`None`: nothing to firewall).
    isolated_network: Option<backend_core::IsolatedNetwork>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("containers", &self.containers.len())
            .field("fail_next", &self.fail_next)
            .field("latency", &self.latency)
            .field("calls", &self.calls.len())
            .finish_non_exhaustive()
    }
}

/// The simulated container engine. Clones share state.
#[derive(Debug, Clone)]
pub struct MockEngine {
    state: Arc<Mutex<State>>,
}

impl Default for MockEngine {
    fn default() -> Self {
        Self::new()
    }
}

impl MockEngine {
    /// An engine with every capability and two images: [`ECHO_IMAGE`] (health check
    /// every second) and [`PLAIN_IMAGE`] (none).
    pub fn new() -> Self {
        let echo_check = HealthCheck {
            command: vec!["/agent".into(), "--health".into()],
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            retries: 1,
            start_period: Duration::ZERO,
        };
        let state = State {
            containers: BTreeMap::new(),
            images: BTreeMap::from([(ECHO_IMAGE.to_owned(), Some(echo_check)), (PLAIN_IMAGE.to_owned(), None)]),
            image_users: BTreeMap::from([(ECHO_IMAGE.to_owned(), ECHO_IMAGE_USER.to_owned())]),
            next_id: 1,
            fail_next: 0,
            fail_matching: Vec::new(),
            slow_matching: Vec::new(),
            latency: Duration::ZERO,
            calls: VecDeque::new(),
            subscribers: Vec::new(),
            snapshot_exit_info: true,
            cpus: None,
            reject_creates: None,
            capabilities: Capabilities { network_isolation: false, ..Capabilities::ALL },
            volumes: BTreeMap::new(),
            isolated_network: None,
        };
        Self { state: Arc::new(Mutex::new(state)) }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock (a failed assertion in a test) must not poison
        // every later call.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// An engine with a pod's lifecycle instead of Docker's, as a Kubernetes backend
    /// would have: a session runs as soon as it is created, a stop deletes it with its
    /// exit info, and a missing image is created anyway and ends the session when it
    /// starts, with an error that names the image.
    pub fn pod_like() -> Self {
        let engine = Self::new();
        engine.lock().capabilities = Capabilities {
            two_phase_start: false,
            exit_info_after_stop: false,
            image_errors_at_create: false,
            ..engine.capabilities()
        };
        engine
    }

    /// What backends on this engine can do: everything but network isolation; the
    /// lifecycle is Docker's unless the engine is [`MockEngine::pod_like`].
    pub(crate) fn capabilities(&self) -> Capabilities {
        self.lock().capabilities
    }

    /// Makes backends report `network` as their isolated network (the daemon then
    /// installs its host firewall rules for it), or none (the default: an in-memory
    /// engine has no host network to protect).
    pub fn set_isolated_network(&self, network: Option<backend_core::IsolatedNetwork>) {
        self.lock().isolated_network = network;
    }

    pub(crate) fn isolated_network(&self) -> Option<backend_core::IsolatedNetwork> {
        self.lock().isolated_network.clone()
    }

    /// Whether snapshots carry exit info (like Podman) or leave it to `session_exit_info`
    /// (like Docker, whose listing lacks it).
    pub fn set_snapshot_exit_info(&self, included: bool) {
        self.lock().snapshot_exit_info = included;
    }

    /// The host's CPU count the engine reports (none by default); a session asking for
    /// more is refused at create, as Docker refuses it.
    pub fn set_cpus(&self, cpus: Option<u32>) {
        self.lock().cpus = cpus;
    }

    /// Every create is refused as the engine refuses a value it cannot honour (a 400:
    /// [`BackendError::Rejected`] with `answer`), until called with `None`.
    pub fn reject_creates(&self, answer: Option<&str>) {
        self.lock().reject_creates = answer.map(str::to_owned);
    }

    pub(crate) fn cpus(&self) -> Option<u32> {
        self.lock().cpus
    }

    /// The next `n` backend calls fail as "engine unavailable".
    pub fn fail_next(&self, n: u32) {
        self.lock().fail_next = n;
    }

    /// The next `n` backend calls that `matcher` accepts fail as "engine unavailable"
    /// (for example only creates).
    pub fn fail_next_matching(&self, n: u32, matcher: impl Fn(&MockCall) -> bool + Send + Sync + 'static) {
        self.lock().fail_matching.push((n, Arc::new(matcher)));
    }

    /// Backend calls that `matcher` accepts wait `latency` (on top of the engine-wide
    /// latency) before they act.
    pub fn slow_calls(&self, latency: Duration, matcher: impl Fn(&MockCall) -> bool + Send + Sync + 'static) {
        self.lock().slow_matching.push((latency, Arc::new(matcher)));
    }

    /// Every backend call waits this long before it acts.
    pub fn set_latency(&self, latency: Duration) {
        self.lock().latency = latency;
    }

    /// Adds (or replaces) an image without a health check whose `USER` is `user` (none
    /// when `None`).
    pub fn add_image(&self, image: &str, user: Option<&str>) {
        let mut state = self.lock();
        state.images.insert(image.to_owned(), None);
        match user {
            Some(user) => state.image_users.insert(image.to_owned(), user.to_owned()),
            None => state.image_users.remove(image),
        };
    }

    /// The spec a container was created from, if it exists.
    pub fn created_spec(&self, name: &str) -> Option<SessionSpec> {
        self.lock().containers.get(name).and_then(|c| c.spec.clone())
    }

    /// The calls backends made, oldest first: the last [`MAX_CALLS`].
    pub fn calls(&self) -> Vec<MockCall> {
        self.lock().calls.iter().cloned().collect()
    }

    /// Forgets the recorded calls.
    pub fn clear_calls(&self) {
        self.lock().calls.clear();
    }

    /// The number of containers the engine holds, owned or not.
    pub fn container_count(&self) -> usize {
        self.lock().containers.len()
    }

    /// The engine id of a container, if it exists.
    pub fn container_id(&self, name: &str) -> Option<String> {
        self.lock().containers.get(name).map(|c| c.id.clone())
    }

    /// Makes a running session's agent exit by itself with `code`.
    pub fn exit(&self, session: &str, code: i64) {
        self.finish(session, SessionExitInfo::exited(code, Some(OffsetDateTime::now_utc())));
    }

    /// OOM-kills a running session.
    pub fn oom_kill(&self, session: &str) {
        let exit =
            SessionExitInfo { oom_killed: true, ..SessionExitInfo::exited(137, Some(OffsetDateTime::now_utc())) };
        self.finish(session, exit);
    }

    /// Kills a running session with SIGKILL, as `docker kill` from outside would (the
    /// engine tells of the signal first).
    pub fn kill_from_outside(&self, session: &str) {
        let mut state = self.lock();
        state.signal(session, 9);
        state.finish(session, SessionExitInfo::exited(137, Some(OffsetDateTime::now_utc())));
    }

    /// Stops a running session with SIGTERM, as `docker stop` from outside would: the
    /// engine tells of the signal, and the echo agent exits 0 on it (one that ignores
    /// SIGTERM is killed, 137, without waiting for a grace).
    pub fn stop_from_outside(&self, session: &str) {
        let mut state = self.lock();
        let Some(ignores) = state.containers.get(session).map(|c| c.behaviour.ignore_sigterm) else { return };
        state.signal(session, 15);
        if ignores {
            state.signal(session, 9);
        }
        let code = if ignores { 137 } else { 0 };
        state.finish(session, SessionExitInfo::exited(code, Some(OffsetDateTime::now_utc())));
    }

    /// Pins a session's health (it no longer follows its simulated check).
    pub fn set_health(&self, session: &str, health: SessionHealth) {
        let mut state = self.lock();
        if let Some(c) = state.containers.get_mut(session) {
            let before = c.health();
            c.pinned_health = Some(health);
            let after = c.health();
            let labels = c.labels.clone();
            if before != after {
                state.emit(&labels, BackendEvent::HealthChanged { session: session.to_owned(), health: after });
            }
        }
    }

    /// Removes a session as `docker rm -f` from outside would, without a trace of how
    /// it ended. With `announce`, subscribers get the removal event; without, the event
    /// is lost (as a dropped event stream loses it).
    pub fn vanish(&self, session: &str, announce: bool) {
        let mut state = self.lock();
        if let Some(c) = state.containers.remove(session) {
            end_run(&c);
            if announce {
                state.emit(&c.labels, BackendEvent::Removed { session: session.to_owned() });
            }
        }
    }

    /// Adds a running container that no backend created (for example an unlabelled
    /// container of another tool).
    pub fn insert_foreign(&self, name: &str, labels: BTreeMap<String, String>) {
        let mut state = self.lock();
        let id = state.new_id();
        let mut c = Container::new(id, labels, None, Behaviour::default(), false);
        c.status = SessionStatus::Running;
        c.health = SessionHealth::Healthy;
        c.output.send_modify(|log| log.run = Some(0));
        state.containers.insert(name.to_owned(), c);
    }

    /// Sets a container's creation time (to test creation grace periods).
    pub fn set_created_at(&self, session: &str, at: OffsetDateTime) {
        if let Some(c) = self.lock().containers.get_mut(session) {
            c.created_at = at;
        }
    }

    /// Ends every event stream, as an engine restart ends its connections: each
    /// subscriber's receiver reads `None`.
    pub fn end_event_streams(&self) {
        self.lock().subscribers.clear();
    }

    /// How many event streams are open (subscribed and not dropped).
    pub fn open_event_streams(&self) -> usize {
        self.lock().subscribers.iter().filter(|sub| !sub.tx.is_closed()).count()
    }

    /// Tells every subscriber that events may have been lost.
    pub fn announce_resync(&self, reason: &str) {
        let mut state = self.lock();
        for sub in &mut state.subscribers {
            let _ = sub.tx.try_send(BackendEvent::Resync { reason: reason.to_owned() });
        }
    }

    fn finish(&self, session: &str, exit: SessionExitInfo) {
        let mut state = self.lock();
        state.finish(session, exit);
    }

    /// Applies the engine's latency and scripted failures, then records the call.
    pub(crate) async fn enter(&self, call: MockCall) -> Result<(), BackendError> {
        let latency = {
            let state = self.lock();
            state.latency + state.slow_matching.iter().filter(|(_, m)| m(&call)).map(|(d, _)| *d).sum::<Duration>()
        };
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let mut state = self.lock();
        let scripted = state.fail_matching.iter_mut().find(|(n, matcher)| *n > 0 && matcher(&call));
        let failed = if let Some((n, _)) = scripted {
            *n -= 1;
            true
        } else {
            false
        };
        if state.calls.len() >= MAX_CALLS {
            state.calls.pop_front();
        }
        state.calls.push_back(call);
        if failed {
            return Err(BackendError::unavailable(NAME, "scripted failure: engine unavailable"));
        }
        if state.fail_next > 0 {
            state.fail_next -= 1;
            return Err(BackendError::unavailable(NAME, "scripted failure: engine unavailable"));
        }
        Ok(())
    }

    pub(crate) fn image_exists(&self, image: &str) -> bool {
        self.lock().images.contains_key(image)
    }

    /// The image's `USER`; a missing image is `ImageNotFound`.
    pub(crate) fn image_user(&self, image: &str) -> Result<Option<String>, BackendError> {
        let state = self.lock();
        if !state.images.contains_key(image) {
            return Err(BackendError::ImageNotFound { backend: NAME, image: image.to_owned() });
        }
        Ok(state.image_users.get(image).cloned())
    }

    /// The owned volumes.
    pub(crate) fn volumes(&self, owner: &OwnershipLabels) -> Vec<backend_core::VolumeState> {
        let state = self.lock();
        state
            .volumes
            .iter()
            .filter(|(_, (labels, _))| owner.owns(labels))
            .map(|(name, (labels, at))| backend_core::VolumeState {
                name: name.clone(),
                created_at: Some(*at),
                labels: labels.clone(),
            })
            .collect()
    }

    /// Removes an owned volume; one in use by a container is an error.
    pub(crate) fn remove_volume(&self, owner: &OwnershipLabels, name: &str) -> Result<(), BackendError> {
        let mut state = self.lock();
        if !state.volumes.get(name).is_some_and(|(labels, _)| owner.owns(labels)) {
            return Ok(());
        }
        if state.containers.values().any(|c| c.volumes.iter().any(|v| v == name)) {
            return Err(BackendError::engine(NAME, format!("volume {name} is in use by a container")));
        }
        state.volumes.remove(name);
        Ok(())
    }

    pub(crate) fn create(
        &self,
        spec: &SessionSpec,
        labels: BTreeMap<String, String>,
        owner: &OwnershipLabels,
    ) -> Result<String, BackendError> {
        let mut state = self.lock();
        if let Some(message) = state.reject_creates.clone() {
            return Err(BackendError::Rejected { backend: NAME, message });
        }
        if let (Some(host), Some(cpus)) = (state.cpus, spec.resources.cpus) {
            if cpus > f64::from(host) {
                let message =
                    format!("Range of CPUs is from 0.01 to {host}.00, as there are only {host} CPUs available");
                return Err(BackendError::Rejected { backend: NAME, message });
            }
        }
        for volume in &spec.volumes {
            if let Some((existing, _)) = state.volumes.get(&volume.name) {
                if !owner.owns(existing) {
                    return Err(BackendError::not_owned(NAME, "volume", &volume.name));
                }
            } else {
                let volume_labels = owner.labels_for(&spec.session, &spec.agent_id);
                state.volumes.insert(volume.name.clone(), (volume_labels, OffsetDateTime::now_utc()));
            }
        }
        let missing_image = !state.images.contains_key(&spec.image);
        if missing_image && state.capabilities.image_errors_at_create {
            return Err(BackendError::ImageNotFound { backend: NAME, image: spec.image.clone() });
        }
        let image_check = state.images.get(&spec.image).cloned().flatten();
        if let Some(existing) = state.containers.get(&spec.session) {
            if !owner.owns(&existing.labels) {
                return Err(BackendError::not_owned(NAME, "container", &spec.session));
            }
            // A stale container of ours: replace it, never reuse it.
            state.containers.remove(&spec.session);
        }
        let check = match &spec.health_check {
            HealthCheckSpec::Image => image_check,
            HealthCheckSpec::Override(check) => Some(check.clone()),
            HealthCheckSpec::Disabled => None,
        };
        let serial = state.next_id;
        let id = state.new_id();
        let mut c = Container::new(id.clone(), labels, check, Behaviour::from_spec(spec), spec.stdin_open);
        c.volumes = spec.volumes.iter().map(|v| v.name.clone()).collect();
        c.missing_image = missing_image.then(|| spec.image.clone());
        c.spec = Some(spec.clone());
        c.address = matches!(spec.network, NetworkPolicy::Internet | NetworkPolicy::Isolated).then(|| {
            // 127.77.0.0/16 without .0 and .255 (a loopback address on Linux), one per
            // container, for 65,024 containers.
            let index = serial % (256 * 254);
            IpAddr::V4(Ipv4Addr::new(127, 77, (index / 254) as u8, (index % 254 + 1) as u8))
        });
        state.containers.insert(spec.session.clone(), c);
        Ok(id)
    }

    pub(crate) fn start(&self, session: &str) -> Result<(), BackendError> {
        let mut state = self.lock();
        let Some(c) = state.containers.get_mut(session) else {
            return Err(not_found(session));
        };
        if c.status.is_alive() {
            return Ok(());
        }
        if let Some(image) = &c.missing_image {
            let error = format!("image {image} is not present; nothing is pulled");
            let exit = SessionExitInfo {
                exit_code: None,
                error: Some(error),
                finished_at: Some(OffsetDateTime::now_utc()),
                ..SessionExitInfo::default()
            };
            c.status = SessionStatus::Running;
            state.finish(session, exit);
            return Ok(());
        }
        c.generation += 1;
        c.status = SessionStatus::Running;
        c.exit = None;
        c.pinned_health = None;
        c.check_failures = 0;
        c.health = if c.check.is_some() { SessionHealth::Starting } else { SessionHealth::Healthy };
        let generation = c.generation;
        c.output.send_modify(|log| {
            log.run = Some(generation);
            log.frozen = false;
        });
        if c.behaviour.version {
            c.say([concat!("echo-agent ", env!("CARGO_PKG_VERSION")).to_owned()]);
            let labels = c.labels.clone();
            state.emit(&labels, BackendEvent::Started { session: session.to_owned() });
            state.finish(session, SessionExitInfo::exited(0, Some(OffsetDateTime::now_utc())));
            return Ok(());
        }
        c.say(["echo-agent started".to_owned()]);
        if let Some(mb) = c.behaviour.alloc_mb {
            c.say([format!("allocating {mb} MB")]);
            if !c.behaviour.oom {
                c.say([format!("allocated {mb} MB")]);
            }
        }
        // Stdio mode: an agent that reads this run's stdin. Without an open stdin it reads
        // EOF at once and exits 0, as the echo agent (and `claude`) do.
        let agent = c.behaviour.stdio.clone().map(|sid| {
            let (tx, rx) = mpsc::unbounded_channel();
            c.stdin = c.stdin_open.then_some(tx);
            (rx, EchoSession::new(sid))
        });
        let (behaviour, check, labels, output) =
            (c.behaviour.clone(), c.check.clone(), c.labels.clone(), c.output.clone());
        state.emit(&labels, BackendEvent::Started { session: session.to_owned() });
        drop(state);
        if let Some((stdin, echo)) = agent {
            tokio::spawn(agent::run(self.clone(), session.to_owned(), generation, output.clone(), stdin, echo));
        }
        if behaviour.exit_after.is_some() || behaviour.oom || check.is_some() {
            tokio::spawn(simulate(self.clone(), session.to_owned(), generation, behaviour, check, output));
        }
        Ok(())
    }

    /// Stops a session: SIGTERM, honoured at once unless the agent ignores it (or is
    /// paused, and so handles nothing), in which case SIGKILL follows after `grace`.
    pub(crate) async fn stop(&self, session: &str, grace: Duration) -> Result<(), BackendError> {
        let (ignores, generation) = {
            let state = self.lock();
            let Some(c) = state.containers.get(session) else {
                return Err(not_found(session));
            };
            if !c.status.is_alive() {
                return Ok(());
            }
            (c.behaviour.ignore_sigterm || c.status == SessionStatus::Paused, c.generation)
        };
        if ignores {
            tokio::time::sleep(grace).await;
        }
        let mut state = self.lock();
        let Some(c) = state.containers.get(session).filter(|c| c.generation == generation && c.status.is_alive())
        else {
            return Ok(());
        };
        let code = if ignores { 137 } else { 0 };
        if !ignores {
            c.say(["echo-agent received SIGTERM; exiting 0".to_owned()]);
        }
        state.signal(session, if ignores { 9 } else { 15 });
        state.finish(session, SessionExitInfo::exited(code, Some(OffsetDateTime::now_utc())));
        Ok(())
    }

    /// The simulated agent of run `generation` exits by itself with `code` (`!exit`, or
    /// EOF on its stdin).
    pub(crate) fn exit_run(&self, session: &str, generation: u64, code: i64) {
        let mut state = self.lock();
        if state.containers.get(session).is_some_and(|c| c.generation == generation) {
            state.finish(session, SessionExitInfo::exited(code, Some(OffsetDateTime::now_utc())));
        }
    }

    /// Drops every attach to `session`, as an engine restart or a broken connection
    /// would: their output ends with an `Unavailable` error and their input fails. The
    /// container and its agent run on, stdin still open; a new attach works.
    pub fn drop_attachments(&self, session: &str) {
        if let Some(c) = self.lock().containers.get(session) {
            c.output.send_modify(|log| log.attach_epoch += 1);
        }
    }

    /// Pauses a running session, as `docker pause` would: it reads `Paused`, its health
    /// `Unknown`, and its agent reads and writes nothing until [`MockEngine::unpause`];
    /// input sent meanwhile is handled after, in order. Subscribers get the health change.
    pub fn pause(&self, session: &str) {
        self.set_paused(session, true);
    }

    /// Unpauses a paused session: it runs on where it stopped.
    pub fn unpause(&self, session: &str) {
        self.set_paused(session, false);
    }

    fn set_paused(&self, session: &str, paused: bool) {
        let mut state = self.lock();
        let Some(c) = state.containers.get_mut(session) else { return };
        let (from, to) = if paused {
            (SessionStatus::Running, SessionStatus::Paused)
        } else {
            (SessionStatus::Paused, SessionStatus::Running)
        };
        if c.status != from {
            return;
        }
        let before = c.health();
        c.status = to;
        c.output.send_modify(|log| log.frozen = paused);
        let after = c.health();
        let labels = c.labels.clone();
        let frozen = if paused {
            BackendEvent::Paused { session: session.to_owned() }
        } else {
            BackendEvent::Unpaused { session: session.to_owned() }
        };
        state.emit(&labels, frozen);
        if before != after {
            state.emit(&labels, BackendEvent::HealthChanged { session: session.to_owned(), health: after });
        }
    }

    pub(crate) fn remove(&self, session: &str) {
        let mut state = self.lock();
        state.signal(session, 9);
        if let Some(c) = state.containers.remove(session) {
            if c.status.is_alive() {
                let exit = SessionExitInfo::exited(137, Some(OffsetDateTime::now_utc()));
                state.emit(&c.labels, BackendEvent::Died { session: session.to_owned(), exit });
            }
            end_run(&c);
            state.emit(&c.labels, BackendEvent::Removed { session: session.to_owned() });
        }
    }

    pub(crate) fn owned_state(&self, owner: &OwnershipLabels, session: &str) -> SessionState {
        let state = self.lock();
        match state.containers.get(session) {
            Some(c) if owner.owns(&c.labels) => c.state(session, true),
            _ => SessionState::missing(session),
        }
    }

    pub(crate) fn snapshot(&self, owner: &OwnershipLabels) -> Vec<SessionState> {
        let state = self.lock();
        let include_exit = state.snapshot_exit_info;
        state
            .containers
            .iter()
            .filter(|(_, c)| owner.owns(&c.labels))
            .map(|(name, c)| c.state(name, include_exit))
            .collect()
    }

    pub(crate) fn logs(
        &self,
        owner: &OwnershipLabels,
        session: &str,
        tail: Option<usize>,
    ) -> Result<String, BackendError> {
        Ok(backend_core::cap_logs(&self.output(owner, session)?.borrow().text(tail)))
    }

    /// The output log of an owned session.
    pub(crate) fn output(&self, owner: &OwnershipLabels, session: &str) -> Result<Output, BackendError> {
        let state = self.lock();
        let c = state.containers.get(session).filter(|c| owner.owns(&c.labels)).ok_or_else(|| not_found(session))?;
        Ok(c.output.clone())
    }

    /// The stdin of an owned, live session created with an open stdin, and its log.
    pub(crate) fn attach(&self, owner: &OwnershipLabels, session: &str) -> Result<(Stdin, Output), BackendError> {
        let state = self.lock();
        let c = state.containers.get(session).filter(|c| owner.owns(&c.labels)).ok_or_else(|| not_found(session))?;
        // A paused session can be attached to, as on the engines: its input waits.
        if !c.status.is_alive() {
            return Err(BackendError::engine(NAME, format!("session {session} is not running; cannot attach")));
        }
        if !c.stdin_open {
            return Err(BackendError::InvalidSpec {
                field: "stdin_open",
                message: format!("session {session} was created without an open stdin; it cannot be written to"),
            });
        }
        let epoch = c.output.borrow().attach_epoch;
        let stdin = Stdin { output: c.output.clone(), run: c.generation, epoch, agent: c.stdin.clone() };
        Ok((stdin, c.output.clone()))
    }

    /// The addresses of an owned session: its one address while it runs (or is paused).
    pub(crate) fn addresses(&self, owner: &OwnershipLabels, session: &str) -> Result<Vec<IpAddr>, BackendError> {
        let state = self.lock();
        let c = state.containers.get(session).filter(|c| owner.owns(&c.labels)).ok_or_else(|| not_found(session))?;
        Ok(c.address.filter(|_| c.status.is_alive()).into_iter().collect())
    }

    /// The address a session has on its network while it runs, whatever its status:
    /// distinct per container, in 127.77.0.0/16 (loopback on Linux, so that a test can
    /// connect from it by binding its socket there); `None` for the `none` and `host`
    /// networks, or a missing session.
    pub fn session_address(&self, session: &str) -> Option<IpAddr> {
        self.lock().containers.get(session).and_then(|c| c.address)
    }

    pub(crate) fn is_running(&self, owner: &OwnershipLabels, session: &str) -> Result<bool, BackendError> {
        let state = self.lock();
        let c = state.containers.get(session).filter(|c| owner.owns(&c.labels)).ok_or_else(|| not_found(session))?;
        Ok(c.status == SessionStatus::Running)
    }

    pub(crate) fn subscribe(&self, owner: &OwnershipLabels) -> EventReceiver {
        let (tx, rx) = tokio::sync::mpsc::channel(EVENT_BUFFER);
        self.lock().subscribers.push(Subscriber { owner: owner.clone(), tx, lagged: false });
        rx
    }

    /// One tick of a running session's simulation. Returns false when the run is over.
    fn tick(&self, session: &str, generation: u64, tick: Tick) -> Ticked {
        let mut state = self.lock();
        let Some(c) = state.containers.get_mut(session) else { return Ticked::Over };
        if c.generation != generation || !c.status.is_alive() {
            return Ticked::Over;
        }
        if c.status == SessionStatus::Paused {
            // A paused process does nothing, and its health is not checked.
            return Ticked::Paused;
        }
        match tick {
            Tick::Exit(exit) => {
                if !exit.oom_killed {
                    c.say([format!("echo-agent exiting with code {}", exit.exit_code.unwrap_or(0))]);
                }
                state.finish(session, exit);
                Ticked::Over
            }
            Tick::Check { passed, counts, retries } => {
                let before = c.health();
                if passed {
                    c.health = SessionHealth::Healthy;
                    c.check_failures = 0;
                } else if counts {
                    c.check_failures += 1;
                    if c.check_failures >= retries {
                        c.health = SessionHealth::Unhealthy;
                    }
                }
                let after = c.health();
                let labels = c.labels.clone();
                if before != after {
                    state.emit(&labels, BackendEvent::HealthChanged { session: session.to_owned(), health: after });
                }
                Ticked::Running
            }
        }
    }
}

enum Tick {
    Exit(SessionExitInfo),
    Check { passed: bool, counts: bool, retries: u32 },
}

/// What a tick found.
#[derive(Debug, PartialEq, Eq)]
enum Ticked {
    /// The run goes on.
    Running,
    /// The run is paused: nothing happened.
    Paused,
    /// The run is over.
    Over,
}

/// Drives one run of a simulated echo agent: its exit, OOM kill and health checks. A
/// paused run skips its checks, and exits only once unpaused.
async fn simulate(
    engine: MockEngine,
    session: String,
    generation: u64,
    behaviour: Behaviour,
    check: Option<HealthCheck>,
    output: Output,
) {
    let mut frozen = output.subscribe();
    let started = Instant::now();
    let end = if behaviour.oom {
        Some((started + Duration::from_millis(50), true))
    } else {
        behaviour.exit_after.map(|after| (started + after, false))
    };
    let mut next_check = check.as_ref().map(|c| started + c.interval);
    loop {
        let wake = match (end, next_check) {
            (Some((at, _)), Some(check_at)) => at.min(check_at),
            (Some((at, _)), None) => at,
            (None, Some(check_at)) => check_at,
            (None, None) => return,
        };
        tokio::time::sleep_until(wake).await;
        let now = Instant::now();
        if let Some((at, oom)) = end {
            if now >= at {
                let finished = Some(OffsetDateTime::now_utc());
                let exit = if oom {
                    SessionExitInfo { oom_killed: true, ..SessionExitInfo::exited(137, finished) }
                } else {
                    SessionExitInfo::exited(behaviour.exit_code, finished)
                };
                while engine.tick(&session, generation, Tick::Exit(exit.clone())) == Ticked::Paused {
                    if !output::thawed(&mut frozen, generation).await {
                        return;
                    }
                }
                return;
            }
        }
        if let (Some(check), Some(at)) = (&check, next_check) {
            if now >= at {
                let passed = behaviour.unhealthy_after.is_none_or(|after| now < started + after);
                let counts = now >= started + check.start_period;
                let tick = Tick::Check { passed, counts, retries: check.retries };
                if engine.tick(&session, generation, tick) == Ticked::Over {
                    return;
                }
                next_check = Some(at + check.interval);
            }
        }
    }
}

impl State {
    fn new_id(&mut self) -> String {
        let id = format!("mock{:012x}", self.next_id);
        self.next_id += 1;
        id
    }

    /// Tells subscribers that the engine signals a live container (before its exit).
    fn signal(&mut self, session: &str, signal: i32) {
        let Some(c) = self.containers.get(session).filter(|c| c.status.is_alive()) else { return };
        let (labels, container) = (c.labels.clone(), c.id.clone());
        self.emit(&labels, BackendEvent::Killed { session: session.to_owned(), container, signal: Some(signal) });
    }

    fn finish(&mut self, session: &str, exit: SessionExitInfo) {
        let Some(c) = self.containers.get_mut(session) else { return };
        if !c.status.is_alive() {
            return;
        }
        c.generation += 1;
        c.status = SessionStatus::Exited;
        c.exit = Some(exit.clone());
        end_run(c);
        c.stdin = None;
        let labels = c.labels.clone();
        if exit.oom_killed {
            self.emit(&labels, BackendEvent::OomKilled { session: session.to_owned() });
        }
        self.emit(&labels, BackendEvent::Died { session: session.to_owned(), exit });
    }

    /// Sends an event to the subscribers that own the container. A subscriber whose
    /// buffer is full loses the event and gets a `Resync` as soon as there is room.
    fn emit(&mut self, labels: &BTreeMap<String, String>, event: BackendEvent) {
        if labels.get(LABEL_SESSION).is_none() {
            return;
        }
        self.subscribers.retain_mut(|sub| {
            if !sub.owner.owns(labels) {
                return !sub.tx.is_closed();
            }
            backend_core::forward_event(&sub.tx, event.clone(), &mut sub.lagged)
        });
    }
}

/// Ends the output of a container's run: followers end once they have read it, and its
/// agent writes no more. Run before its stdin closes, so the agent does not take the
/// closing for EOF.
fn end_run(c: &Container) {
    c.output.send_modify(|log| {
        log.run = None;
        log.frozen = false;
    });
}

fn not_found(session: &str) -> BackendError {
    BackendError::not_found(NAME, session)
}
