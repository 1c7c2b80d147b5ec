//! The manager and its user-facing operations: spawn, stop, restart, remove, get, list.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use backend_core::{ExecutionBackend, SessionExitInfo, SessionHealth, SessionSpec};
use futures_util::stream::{self, StreamExt};
use time::OffsetDateTime;
use tokio::sync::broadcast;
use tracing::{info, warn};

use crate::conversation::approvals::{Approval, DecidedBy, Decision};
use crate::conversation::task::{self, RestartRequest, Target, TaskContext};
use crate::conversation::{ConversationEntry, Delivery, Direction, Hub, NewEntry, SessionRecord};
use crate::locks::{AgentGuard, AgentLocks};
use crate::model::{
    Agent, AgentKind, AgentStatus, AgentView, Desired, EndedBy, EventKind, LifecycleEvent, ModelLimits, ModelRequest,
    ModelUsage, NewAgent, RestartPolicy, Run,
};
use crate::{Clock, ManagerConfig, ManagerError, Metrics, Result, Store, SystemClock, LIFECYCLE_TARGET, MODEL_ENV};

/// Stores, logs and broadcasts lifecycle events; cheap to clone, so that tasks of their
/// own (the conversations) can record events too.
#[derive(Clone)]
pub(crate) struct Lifecycle {
    store: Store,
    events: broadcast::Sender<LifecycleEvent>,
    clock: Arc<dyn Clock>,
}

impl Lifecycle {
    /// The current time, in the store's precision (milliseconds).
    pub(crate) fn now(&self) -> OffsetDateTime {
        let now = self.clock.now();
        now.replace_nanosecond(now.millisecond() as u32 * 1_000_000).unwrap_or(now)
    }

    /// Stores and announces an event that changes no agent.
    pub(crate) async fn record(
        &self,
        agent_id: &str,
        agent_name: &str,
        session: &str,
        kind: EventKind,
        detail: String,
    ) -> Result<()> {
        let event = LifecycleEvent {
            id: 0,
            agent_id: agent_id.to_owned(),
            agent_name: Some(agent_name.to_owned()),
            kind,
            from: None,
            to: None,
            detail,
            at: self.now(),
        };
        let stored = self.store.insert_event(&event).await?;
        self.announce(stored, session, None);
        Ok(())
    }

    /// Logs a stored event and broadcasts it to subscribers.
    pub(crate) fn announce(&self, event: LifecycleEvent, session: &str, exit: Option<&SessionExitInfo>) {
        log_event(&event, session, exit);
        let _ = self.events.send(event);
    }
}

/// What the manager remembers about a live agent between passes (not persisted).
#[derive(Debug, Clone)]
pub(crate) struct Runtime {
    /// The container this process has seen running for the agent.
    pub container: String,
    /// When the current run started, or was adopted by this process.
    pub since: OffsetDateTime,
    /// Whether the engine reported the container frozen.
    pub paused: bool,
    /// When the agent was first seen unhealthy in a row of unhealthy observations.
    pub unhealthy_since: Option<OffsetDateTime>,
    /// The engine was asked to signal this container (a stop, kill or forced removal),
    /// with the signal when the engine told it. Whether agentd asked is decided when the
    /// run's end is recorded: an agent agentd did not stop was stopped from outside.
    pub signalled: Option<Option<i32>>,
    /// When a pass first saw this run ended with success and no word of a signal: its
    /// record waits [`crate::reconcile::EXIT_SETTLE`] for the engine to tell more.
    pub exit_seen: Option<OffsetDateTime>,
}

impl Runtime {
    pub(crate) fn new(container: String, since: OffsetDateTime) -> Self {
        Self { container, since, paused: false, unhealthy_since: None, signalled: None, exit_seen: None }
    }
}

/// What [`AgentManager::run_output`] found: the agent as its lock showed it, which run
/// that is (1 for the first; 0 when it never ran), and the run's output, `None` when the
/// agent has no container.
pub struct RunOutput {
    pub agent: Agent,
    pub run: usize,
    pub lines: Option<backend_core::OutputLines>,
}

impl std::fmt::Debug for RunOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOutput").field("agent", &self.agent.id).field("run", &self.run).finish_non_exhaustive()
    }
}

/// What [`AgentManager::shutdown_all`] did.
#[derive(Debug, Default)]
pub struct ShutdownSummary {
    /// Agents stopped, with their exit recorded.
    pub stopped: Vec<String>,
    /// Agents left running for the next start to adopt.
    pub left_running: Vec<String>,
    /// Agents that could not be stopped, with why.
    pub failed: Vec<(String, String)>,
    /// Containers the closing sweep stopped and removed: after a shutdown that stops the
    /// agents, no container of this instance is left, recorded or not.
    pub removed: Vec<String>,
    /// Containers the sweep could not remove, with why.
    pub not_removed: Vec<(String, String)>,
    /// Why the sweep could not list the containers, if it could not.
    pub sweep_error: Option<String>,
}

/// Spawns, watches, restarts and stops agents on backend `B`, recording everything in a
/// [`Store`].
///
/// Every operation on one agent holds that agent's lock, so a reconcile pass never acts on
/// an agent while a spawn, stop or restart of it is in flight: the pass skips it and the
/// next pass looks again.
pub struct AgentManager<B: ExecutionBackend + ?Sized> {
    pub(crate) backend: Arc<B>,
    pub(crate) store: Store,
    pub(crate) conversations: Arc<Hub>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) config: ManagerConfig,
    pub(crate) metrics: Metrics,
    /// Per-agent locks; see [`AgentLocks`] for when an entry lives.
    pub(crate) locks: AgentLocks,
    pub(crate) runtime: Mutex<HashMap<String, Runtime>>,
    /// When orphaned volumes were last looked for.
    pub(crate) last_volume_sweep: Mutex<Option<OffsetDateTime>>,
    /// Orphaned sessions already reported in dry-run mode, so each is reported once;
    /// every full pass forgets those that are gone.
    pub(crate) reported_orphans: Mutex<HashSet<String>>,
    /// The same for orphaned volumes; every volume sweep forgets those that are gone.
    pub(crate) reported_orphan_volumes: Mutex<HashSet<String>>,
    pub(crate) pass_lock: tokio::sync::Mutex<()>,
    pub(crate) next_wakeup: Mutex<Option<OffsetDateTime>>,
    /// Wakes the supervisor when `next_wakeup` moves earlier.
    pub(crate) wakeup_changed: tokio::sync::Notify,
    /// Liveness restarts in a row per agent (not persisted: a daemon restart forgives).
    pub(crate) liveness_streaks: Mutex<HashMap<String, u32>>,
    /// Every operation that changes agents holds this for reading; shutdown takes it for
    /// writing, so it waits for operations in flight and no new one starts after it.
    pub(crate) ops: tokio::sync::RwLock<()>,
    lifecycle: Lifecycle,
    /// Restarts conversation tasks ask for; the supervisor takes the receiver.
    restart_tx: tokio::sync::mpsc::UnboundedSender<RestartRequest>,
    pub(crate) restart_rx: Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<RestartRequest>>>,
    pub(crate) shutting_down: AtomicBool,
    /// Which agent a peer address is (`agent_for_peer`).
    peers: crate::peers::PeerCache,
    /// The engine's and the supervisor's health ([`AgentManager::health`]).
    pub(crate) health: crate::health::HealthRecord,
}

impl<B: ExecutionBackend + ?Sized + 'static> std::fmt::Debug for AgentManager<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentManager")
            .field("backend", &self.backend)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl<B: ExecutionBackend + ?Sized + 'static> AgentManager<B> {
    /// A manager of `backend`'s sessions, recording in `store`.
    pub fn new(backend: Arc<B>, store: Store, config: ManagerConfig) -> Self {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let health = crate::health::HealthRecord::new(clock.now());
        let lifecycle = Lifecycle { store: store.clone(), events: broadcast::channel(1024).0, clock: clock.clone() };
        let (restart_tx, restart_rx) = tokio::sync::mpsc::unbounded_channel();
        Self {
            backend,
            conversations: Arc::new(Hub::new(store.clone())),
            store,
            clock,
            config,
            metrics: Metrics::default(),
            locks: AgentLocks::default(),
            runtime: Mutex::new(HashMap::new()),
            reported_orphans: Mutex::new(HashSet::new()),
            reported_orphan_volumes: Mutex::new(HashSet::new()),
            last_volume_sweep: Mutex::new(None),
            pass_lock: tokio::sync::Mutex::new(()),
            next_wakeup: Mutex::new(None),
            wakeup_changed: tokio::sync::Notify::new(),
            liveness_streaks: Mutex::new(HashMap::new()),
            ops: tokio::sync::RwLock::new(()),
            lifecycle,
            restart_tx,
            restart_rx: Mutex::new(Some(restart_rx)),
            shutting_down: AtomicBool::new(false),
            peers: crate::peers::PeerCache::default(),
            health,
        }
    }

    /// The daemon's health now: the engine's state, the supervisor's last full pass, and
    /// the verdict (see [`crate::Health`]).
    pub fn health(&self) -> crate::Health {
        self.health.snapshot(self.now(), self.config.reconcile.interval)
    }

    /// Replaces the clock (tests use [`crate::ManualClock`]).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.lifecycle.clock = clock.clone();
        self.clock = clock;
        self
    }

    /// The backend.
    pub fn backend(&self) -> &Arc<B> {
        &self.backend
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The configuration.
    pub fn config(&self) -> &ManagerConfig {
        &self.config
    }

    /// The supervision counters.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The clock the manager reads (the model gateway's limits read it too).
    pub fn clock(&self) -> Arc<dyn Clock> {
        self.clock.clone()
    }

    /// Records one request an agent made through the model gateway; see
    /// [`Self::record_model_requests`].
    pub async fn record_model_request(&self, request: &ModelRequest) -> Result<()> {
        self.record_model_requests(std::slice::from_ref(request)).await
    }

    /// Records requests agents made through the model gateway, in one transaction, and
    /// adds them to each agent's sums (in the store and in memory) and to the daemon's
    /// totals. A request of an agent removed meanwhile is dropped.
    pub async fn record_model_requests(&self, requests: &[ModelRequest]) -> Result<()> {
        if requests.is_empty() {
            return Ok(());
        }
        let sums = self.store.record_model_requests(requests).await?;
        self.metrics.add_model_usage(sums);
        Ok(())
    }

    /// Counts a model request refused under its agent's limits.
    pub fn count_model_refusal(&self) {
        Metrics::add(&self.metrics.model_refusals);
    }

    /// The agent's model usage, summed over every recorded request (from memory).
    pub fn model_usage(&self, agent_id: &str) -> ModelUsage {
        self.store.model_usage(agent_id)
    }

    /// The output tokens of the agent's requests recorded since 00:00 UTC today, by the
    /// manager's clock (from memory).
    pub fn model_output_tokens_today(&self, agent_id: &str) -> u64 {
        self.store.model_output_tokens_on(agent_id, self.clock.now())
    }

    /// The limits the agent's model requests are held to now: its own, else `[model]`'s.
    pub fn model_limits(&self, agent: &Agent) -> ModelLimits {
        agent.spec.model_limits.or(self.config.model_limits)
    }

    /// The agent's last `limit` model requests, oldest first.
    pub async fn model_requests(&self, id_or_name: &str, limit: i64) -> Result<Vec<ModelRequest>> {
        let agent = self.find(id_or_name).await?;
        Ok(self.store.list_model_requests(&agent.id, limit).await?)
    }

    /// The live agent whose current container has the address `ip` on its network: who
    /// a connection to one of the daemon's gateway listeners comes from. Cached per
    /// container (a hit costs no engine call); an unknown address asks the engine at most
    /// once a second. Host-network agents share the host's addresses and are never found.
    pub async fn agent_for_peer(&self, ip: std::net::IpAddr) -> Option<Agent> {
        self.peers.lookup(ip, &self.store, &*self.backend).await
    }

    /// Records that the egress proxy refused `destination` (`host:port`) to the agent:
    /// an `egress_denied` event. The caller limits how often.
    pub async fn note_egress_denied(&self, agent: &Agent, destination: &str) -> Result<()> {
        let detail = format!("{destination} is not on the agent's egress allow-list");
        self.lifecycle.record(&agent.id, &agent.name, &agent.session, EventKind::EgressDenied, detail).await
    }

    /// Live lifecycle events, from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<LifecycleEvent> {
        self.lifecycle.events.subscribe()
    }

    /// The current time, in the store's precision (milliseconds), so that what is kept
    /// in memory equals what is read back.
    pub(crate) fn now(&self) -> OffsetDateTime {
        let now = self.clock.now();
        now.replace_nanosecond(now.millisecond() as u32 * 1_000_000).unwrap_or(now)
    }

    pub(crate) async fn lock_agent(&self, id: &str) -> AgentGuard {
        self.locks.lock(id).await
    }

    /// The agent's lock if nobody holds it.
    pub(crate) fn try_lock_agent(&self, id: &str) -> Option<AgentGuard> {
        self.locks.try_lock(id)
    }

    fn check_accepting(&self) -> Result<()> {
        if self.shutting_down.load(Ordering::SeqCst) {
            Err(ManagerError::ShuttingDown)
        } else {
            Ok(())
        }
    }

    async fn find(&self, id_or_name: &str) -> Result<Agent> {
        self.store.find_agent(id_or_name).ok_or_else(|| ManagerError::AgentNotFound(id_or_name.to_owned()))
    }

    /// The agent's lock and its record as it is under that lock.
    async fn find_locked(&self, id_or_name: &str) -> Result<(AgentGuard, Agent)> {
        let found = self.find(id_or_name).await?;
        let guard = self.lock_agent(&found.id).await;
        let agent = self.find(&found.id).await?;
        Ok((guard, agent))
    }

    /// Refuses to run an agent on a network that cannot be protected now
    /// ([`ManagerConfig::isolated_refusal`](crate::ManagerConfig::isolated_refusal)).
    fn check_network(&self, name: &str, spec: &crate::model::AgentSpec) -> Result<()> {
        match &self.config.isolated_refusal {
            Some(reason) if spec.network == backend_core::NetworkPolicy::Isolated => {
                Err(ManagerError::NetworkUnprotected {
                    agent: name.to_owned(),
                    network: spec.network,
                    reason: reason.clone(),
                })
            }
            _ => Ok(()),
        }
    }

    /// Refuses a CPU limit the spawn `given` above what the engine's host has (the
    /// engine's own answer, as Docker gives it; Podman would take it in silence). The
    /// `agents.cpus` default is lowered to the host's CPUs instead: "2" means "up to 2".
    async fn check_cpus(&self, spec: &mut crate::model::AgentSpec, given: bool) -> Result<()> {
        let Some(cpus) = spec.cpus else { return Ok(()) };
        match self.backend.engine_cpus().await? {
            Some(host) if cpus > f64::from(host) && !given => {
                info!(cpus, engine_cpus = host, "Lowered the default CPU limit to the engine host's CPUs.");
                spec.cpus = Some(f64::from(host));
                Ok(())
            }
            Some(host) if cpus > f64::from(host) => Err(ManagerError::Invalid {
                field: "cpus",
                message: format!(
                    "{cpus}: at most {host}, the number of CPUs of the {} engine's host (and at least 0.01)",
                    self.backend.name()
                ),
            }),
            _ => Ok(()),
        }
    }

    /// Creates an agent and starts its container, with the agent as the container's main
    /// process.
    pub async fn spawn(&self, new: NewAgent) -> Result<AgentView> {
        let _op = self.ops.read().await;
        self.check_accepting()?;
        let mut spec = self.config.defaults.resolve(new.clone())?;
        self.check_network(&new.name, &spec)?;
        if let Some(reason) = self.config.claude_refusal.as_ref().filter(|_| spec.kind == AgentKind::ClaudeCode) {
            return Err(ManagerError::Refused { field: "kind", value: spec.kind.to_string(), rule: reason.clone() });
        }
        self.check_cpus(&mut spec, new.cpus.is_some()).await?;
        if let Some(dir) = spec.workdir.take() {
            // The canonical path is what is stored (and mounted).
            spec.workdir = Some(self.check_host_dirs(Some(dir), Vec::new()).await?.0.unwrap_or_default());
        }
        if !self.backend.image_exists(&spec.image).await? {
            let ours = spec.image.contains("agentd-claude") || spec.image.contains("agentd-echo");
            let hint = if spec.kind == AgentKind::ClaudeCode {
                let build = if ours {
                    "build it with `cargo xtask images` (in agentd's source tree)".to_owned()
                } else {
                    format!(
                        "build or load it into the {} engine first (agentd never pulls images)",
                        self.backend.name()
                    )
                };
                format!(
                    "{build}. Kind claude-code, the default kind, needs an image with Claude Code's `claude`; to run \
                     any other image, spawn it with `--kind image --image IMAGE` (API: \"kind\": \"image\")"
                )
            } else if ours {
                "build it with `cargo xtask images`".to_owned()
            } else {
                format!("build or load it into the {} engine first (agentd never pulls images)", self.backend.name())
            };
            return Err(ManagerError::ImageMissing { backend: self.backend.name(), image: spec.image, hint });
        }
        let id = uuid::Uuid::new_v4().to_string();
        let now = self.now();
        let mut agent = Agent {
            session: format!("{}-{}-{}", self.backend.prefix(), new.name, &id[..8]),
            id,
            name: new.name,
            status: AgentStatus::Pending,
            desired: Desired::Running,
            health: SessionHealth::Unknown,
            container_id: None,
            spec,
            restarts: 0,
            crash_streak: 0,
            next_restart_at: None,
            reason: None,
            created_at: now,
            updated_at: now,
        };
        // The record exists before the container does, so no reconcile pass can take the
        // new container for an orphan; the lock keeps passes off it until it runs.
        let _guard = self.lock_agent(&agent.id).await;
        self.store.insert_agent(&agent).await?;
        self.record(
            &agent,
            EventKind::Spawned,
            None,
            Some(AgentStatus::Pending),
            format!("image {}", agent.spec.image),
        )
        .await?;
        if agent.speaks_stream_json() {
            // The conversation exists from the start; the prompt is its first message,
            // delivered once the agent is attached.
            self.conversations.save(&SessionRecord::new(&agent.id)).await?;
            if let Some(prompt) = agent.spec.prompt.clone() {
                self.queue_user_message(&agent, &prompt).await?;
            }
        }
        if let Err(e) = self.launch(&mut agent, EndedBy::StartError).await {
            if agent.container_id.is_none() {
                // Nothing was created: forget the agent, so the name is free again.
                self.store.delete_agent(&agent.id).await?;
                self.record(&agent, EventKind::Removed, Some(AgentStatus::Pending), None, format!("spawn failed: {e}"))
                    .await?;
                return Err(e);
            }
            return Err(match e {
                ManagerError::Backend(source) => ManagerError::StartFailed { agent: agent.name.clone(), source },
                other => other,
            });
        }
        self.view(agent).await
    }

    /// The session spec the agent's next run is created from.
    pub fn session_spec_for(&self, agent: &Agent) -> Result<SessionSpec> {
        let s = &agent.spec;
        let mut spec = SessionSpec::new(&agent.session, &agent.id, &s.image);
        let claude = s.kind == AgentKind::ClaudeCode;
        for key in &self.config.defaults.forward_env {
            // The configuration refuses these; never forward a model credential.
            if claude && MODEL_ENV.contains(&key.as_str()) {
                continue;
            }
            if let Ok(value) = std::env::var(key) {
                spec.env.insert(key.clone(), value);
            }
        }
        spec.env.extend(s.env.clone());
        if claude {
            // Agents spawned before the gateway may have stored these; agentd sets them.
            for key in MODEL_ENV {
                if spec.env.remove(*key).is_some() {
                    warn!(
                        agent_id = %agent.id,
                        key,
                        "Dropped a stored variable from the agent's environment: agentd sets it itself (the model \
                         gateway); the real credential belongs in [model]."
                    );
                }
            }
            if let Some((address, port)) =
                self.config.gateway.and_then(|g| g.address_for(s.network).map(|a| (a, g.model_port)))
            {
                let url = format!("http://{}", std::net::SocketAddr::new(address, port));
                spec.env.insert("ANTHROPIC_BASE_URL".into(), url);
                let secret = self.store.gateway_secrets().secret_for(&agent.id);
                spec.env.insert("ANTHROPIC_API_KEY".into(), secret.expose().to_owned());
            }
        }
        spec.env.insert("AGENTD_AGENT_ID".into(), agent.id.clone());
        spec.env.insert("AGENTD_AGENT_NAME".into(), agent.name.clone());
        // The egress proxy, where the agent's network has a gateway address; its values
        // win over the agent's own. Host-network agents get none: the proxy cannot tell
        // them apart from the host, and refuses them.
        if let Some(endpoints) = self.config.gateway.filter(|_| s.network != backend_core::NetworkPolicy::Host) {
            if let Some(address) = endpoints.address_for(s.network) {
                spec.env.extend(crate::egress::proxy_env(address, endpoints.proxy_port));
            }
        }
        spec.command = match s.kind {
            // `command` alone replaces the image's entrypoint, as documented: its program
            // becomes the entrypoint and the rest its arguments.
            AgentKind::Image => match (&s.entrypoint, &s.command) {
                (Some(entrypoint), command) => {
                    spec.entrypoint = Some(entrypoint.clone());
                    command.clone().filter(|c| !c.is_empty())
                }
                (None, Some(command)) => {
                    let (program, args) =
                        command.split_first().map_or((String::new(), &[][..]), |(p, a)| (p.clone(), a));
                    spec.entrypoint = Some(vec![program]);
                    (!args.is_empty()).then(|| args.to_vec())
                }
                (None, None) => None,
            },
            AgentKind::ClaudeCode => {
                spec.stdin_open = true;
                // HOME (with the CLI's conversation files) outlives the containers, so a
                // new run can resume the session.
                spec.volumes.push(backend_core::VolumeMount { name: home_volume(agent), target: CLAUDE_HOME.into() });
                // Once the CLI began the session (its files are in the HOME volume), later
                // runs resume it: a second --session-id would be refused as in use.
                let view = self.conversations.view(&agent.id);
                let resume = view.as_ref().is_some_and(|v| v.started || v.turns > 0);
                let session_flag = if resume { "--resume" } else { "--session-id" };
                let session_id = view.map(|v| v.session_id).filter(|_| resume).unwrap_or_else(|| agent.id.clone());
                let mut command: Vec<String> = [
                    "claude",
                    "-p",
                    "--input-format",
                    "stream-json",
                    "--output-format",
                    "stream-json",
                    "--verbose",
                    "--permission-prompt-tool",
                    "stdio",
                    session_flag,
                    &session_id,
                ]
                .map(String::from)
                .to_vec();
                if let Some(model) = &s.model {
                    command.extend(["--model".to_owned(), model.clone()]);
                }
                if let Some(mode) = &s.permission_mode {
                    command.extend(["--permission-mode".to_owned(), mode.clone()]);
                }
                if let Some(turns) = s.max_turns {
                    command.extend(["--max-turns".to_owned(), turns.to_string()]);
                }
                if let Some(budget) = s.max_budget_usd {
                    command.extend(["--max-budget-usd".to_owned(), budget.to_string()]);
                }
                Some(command)
            }
        };
        spec.workdir = s.workdir.clone();
        spec.resources.memory_bytes = match s.memory_mb {
            Some(mb) => Some(backend_core::rules::memory_mb_to_bytes(mb).ok_or_else(|| ManagerError::Invalid {
                field: "memory_mb",
                message: format!("{mb}: {}", backend_core::rules::memory_mb(mb).err().unwrap_or("out of range")),
            })?),
            None => None,
        };
        spec.resources.cpus = s.cpus;
        spec.resources.pids_limit = s.pids_limit;
        spec.network = s.network;
        spec.user = s.user.clone();
        spec.stop_grace = Duration::from_secs(s.stop_grace_secs);
        spec.read_only_rootfs = s.read_only_rootfs;
        spec.labels.insert("agentd.name".into(), agent.name.clone());
        Ok(spec)
    }

    /// Creates and starts a new run of the agent and records it running. On a failed
    /// start the run is recorded with the error and the agent is failed.
    pub(crate) async fn launch(&self, agent: &mut Agent, failure: EndedBy) -> Result<()> {
        if agent.speaks_stream_json() {
            // The session record decides between --session-id and --resume.
            self.conversations.record(&agent.id).await?;
        }
        let mut spec = self.session_spec_for(agent)?;
        agent.container_id = None;
        self.check_network(&agent.name, &agent.spec)?;
        self.contain(&mut spec).await?;
        let container = self.backend.create_session(&spec).await?;
        agent.container_id = Some(container.clone());
        let started_at = self.now();
        self.store.start_run(agent, started_at).await?;
        // The container may call the daemon's gateway listeners before its record says
        // it runs.
        let _starting = self.peers.starting(&agent.id, &container, &agent.session);
        self.finish_launch(agent, container, started_at, failure).await
    }

    /// The rest of [`Self::launch`]: starts the created container and records the run.
    async fn finish_launch(
        &self,
        agent: &mut Agent,
        container: String,
        started_at: OffsetDateTime,
        failure: EndedBy,
    ) -> Result<()> {
        if let Err(e) = self.backend.start_session(&agent.session).await {
            let exit = SessionExitInfo {
                error: Some(format!("start failed: {e}")),
                finished_at: Some(self.now()),
                ..SessionExitInfo::default()
            };
            agent.reason = exit.error.clone();
            let detail = exit.error.clone().unwrap_or_default();
            // A failed start is a failure like any other for the restart policy.
            let now = self.now();
            self.schedule_restart(agent, true, now).await?;
            self.transition(agent, AgentStatus::Failed, EventKind::Failed, detail, Some((&exit, failure))).await?;
            self.announce_schedule(agent).await?;
            return Err(e.into());
        }
        lock(&self.runtime).insert(agent.id.clone(), Runtime::new(container.clone(), started_at));
        agent.reason = None;
        agent.health = SessionHealth::Unknown;
        let detail = format!("container {}", short(&container));
        self.transition(agent, AgentStatus::Running, EventKind::Started, detail, None).await?;
        self.ensure_conversation(agent);
        Ok(())
    }

    /// Applies the identity and file rules to a spec about to become a container (at every
    /// creation: a stored agent whose user or paths break the rules now is refused with
    /// the same error as a new one): the user it runs as (see [`Self::run_as`]), and its
    /// workdir and mount sources, resolved to canonical paths and checked (see
    /// [`crate::check_host_dir`]).
    async fn contain(&self, spec: &mut SessionSpec) -> Result<()> {
        spec.user = self.run_as(spec.user.take(), &spec.image).await?;
        let mounts = std::mem::take(&mut spec.mounts);
        let (workdir, mounts) = self.check_host_dirs(spec.workdir.take(), mounts).await?;
        spec.workdir = workdir;
        spec.mounts = mounts;
        Ok(())
    }

    /// Who a container runs as: the spec's user (never root unless `agents.allow_root`);
    /// else the image's `USER` when it names one other than root (`None`: the image's);
    /// else `agents.default_user`. An image without a `USER` would run as root, so it gets
    /// the default user, and so does an image whose `USER` is root: root is only ever
    /// what an operator asks for by name.
    async fn run_as(&self, user: Option<String>, image: &str) -> Result<Option<String>> {
        let defaults = &self.config.defaults;
        if let Some(user) = user {
            defaults.check_root("user", &user)?;
            return Ok(Some(user));
        }
        match self.backend.image_user(image).await? {
            Some(own) if !backend_core::rules::user_is_root(&own) => Ok(None),
            _ => {
                defaults.check_root("agents.default_user", &defaults.default_user)?;
                Ok(Some(defaults.default_user.clone()))
            }
        }
    }

    /// Resolves and checks a workdir and mount sources (off the async workers: they are
    /// file-system calls); returns them with their canonical paths.
    async fn check_host_dirs(
        &self,
        workdir: Option<std::path::PathBuf>,
        mounts: Vec<backend_core::Mount>,
    ) -> Result<(Option<std::path::PathBuf>, Vec<backend_core::Mount>)> {
        if workdir.is_none() && mounts.is_empty() {
            return Ok((None, mounts));
        }
        let protected = self.config.protected_paths.clone();
        let roots = self.config.defaults.workdir_roots.clone();
        tokio::task::spawn_blocking(move || {
            let workdir = workdir.map(|dir| crate::check_host_dir("workdir", &dir, &protected, &roots)).transpose()?;
            let mounts = mounts
                .into_iter()
                .map(|mount| {
                    let source = crate::check_host_dir("mounts", &mount.source, &protected, &roots)?;
                    Ok(backend_core::Mount { source, ..mount })
                })
                .collect::<Result<Vec<_>>>()?;
            Ok((workdir, mounts))
        })
        .await
        .map_err(|e| ManagerError::Conflict(format!("the check of the agent's host paths did not finish: {e}")))?
    }

    /// Starts the conversation task of a live stream-json agent's container, unless one
    /// runs for it already. Cheap when one does: passes call it for every live agent.
    pub(crate) fn ensure_conversation(&self, agent: &Agent) {
        let Some(container) = agent.container_id.clone() else {
            return;
        };
        if !agent.speaks_stream_json() || self.conversations.has_task(&agent.id, &container) {
            return;
        }
        if self.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        let ctx = TaskContext {
            backend: self.backend.clone(),
            hub: self.conversations.clone(),
            lifecycle: self.lifecycle.clone(),
            restarts: self.restart_tx.clone(),
        };
        let rules = &self.config.defaults;
        let target = Target {
            agent_id: agent.id.clone(),
            agent_name: agent.name.clone(),
            session: agent.session.clone(),
            container: container.clone(),
            approvals: agent.spec.approvals,
            approval_timeout: rules.approval_timeout,
            turn_idle_timeout: rules.turn_idle_timeout,
            interrupt_grace: rules.interrupt_grace,
        };
        let wake = Arc::new(tokio::sync::Notify::new());
        let (previous_tx, previous_rx) = tokio::sync::oneshot::channel();
        let handle = tokio::spawn(task::run(ctx, target, wake.clone(), previous_rx));
        let previous = self.conversations.install(&agent.id, &container, wake, handle);
        let _ = previous_tx.send(previous);
    }

    /// Stores a line for the agent, queued for delivery, and wakes its task.
    async fn queue_line(
        &self,
        agent: &Agent,
        kind: &str,
        text: String,
        data: serde_json::Value,
    ) -> Result<ConversationEntry> {
        let entry = NewEntry {
            direction: Direction::ToAgent,
            kind: kind.into(),
            text,
            data,
            delivery: Some(Delivery::Queued),
            at: self.now(),
        };
        let mut stored = self.conversations.append(&agent.id, vec![entry], None).await?;
        self.conversations.wake(&agent.id);
        stored.pop().ok_or_else(|| ManagerError::Conflict(format!("the {kind} line was not stored")))
    }

    /// Stores a user message for the agent, queued for delivery.
    async fn queue_user_message(&self, agent: &Agent, text: &str) -> Result<ConversationEntry> {
        let data = crate::conversation::protocol::user_message(text);
        self.queue_line(agent, "user", crate::conversation::protocol::cut(text), data).await
    }

    /// The agent, if it is a running claude-code agent; `refusal` says what a kind that
    /// holds no conversation lacks.
    async fn running_conversation(&self, id_or_name: &str, refusal: &str) -> Result<Agent> {
        let agent = self.find(id_or_name).await?;
        if !agent.speaks_stream_json() {
            return Err(ManagerError::Conflict(format!(
                "agent {} is of kind {} and {refusal}",
                agent.name, agent.spec.kind
            )));
        }
        if agent.status != AgentStatus::Running {
            return Err(ManagerError::NotRunning { agent: agent.name.clone(), status: agent.status });
        }
        Ok(agent)
    }

    /// Queues a user message for a running stream-json agent and returns its entry; it
    /// is delivered as soon as agentd holds an attach and the container is not frozen.
    pub async fn send_message(&self, id_or_name: &str, text: &str) -> Result<ConversationEntry> {
        let refusal = "takes no messages; only claude-code agents hold a conversation";
        let agent = self.running_conversation(id_or_name, refusal).await?;
        if text.trim().is_empty() {
            return Err(ManagerError::Invalid { field: "text", message: "must not be empty".into() });
        }
        self.queue_user_message(&agent, text).await
    }

    /// Interrupts the agent's current turn (as Ctrl-C would): queues Claude Code's
    /// `interrupt` control request.
    pub async fn interrupt(&self, id_or_name: &str) -> Result<ConversationEntry> {
        let agent = self.running_conversation(id_or_name, "has no turns").await?;
        let request_id = format!("agentd-interrupt-{}", uuid::Uuid::new_v4().simple());
        let data = crate::conversation::protocol::interrupt_request(&request_id);
        self.queue_line(&agent, "control_request", "interrupt".into(), data).await
    }

    /// Tool-permission requests, newest first: of one agent (id or name) or all,
    /// optionally only the pending ones.
    pub async fn approvals(&self, agent: Option<&str>, pending: bool) -> Result<Vec<Approval>> {
        let agent_id = match agent {
            Some(a) => Some(self.find(a).await?.id),
            None => None,
        };
        let mut approvals = self.store.list_approvals(agent_id.as_deref(), pending).await?;
        for approval in &mut approvals {
            approval.agent = self.store.cached_agent(&approval.agent_id).map(|a| a.name);
        }
        Ok(approvals)
    }

    /// One tool-permission request.
    pub async fn approval(&self, id: &str) -> Result<Approval> {
        let mut approval =
            self.store.approval(id).await?.ok_or_else(|| ManagerError::ApprovalNotFound(id.to_owned()))?;
        approval.agent = self.store.cached_agent(&approval.agent_id).map(|a| a.name);
        Ok(approval)
    }

    /// Decides a pending tool-permission request; its answer reaches the run that asked.
    /// One that is decided already is a [`ManagerError::Conflict`].
    pub async fn decide(&self, id: &str, decision: Decision, message: Option<String>) -> Result<Approval> {
        let approval = self.store.approval(id).await?.ok_or_else(|| ManagerError::ApprovalNotFound(id.to_owned()))?;
        if approval.decision.is_some() {
            return Err(ManagerError::Conflict(format!(
                "approval {id} is decided already ({})",
                approval.decision.map(Decision::as_str).unwrap_or_default()
            )));
        }
        let agent = self.find(&approval.agent_id).await?;
        if agent.status != AgentStatus::Running || agent.container_id.as_deref() != Some(approval.container_id.as_str())
        {
            return Err(ManagerError::Conflict(format!(
                "approval {id} belongs to a run of {} that has ended; nothing waits for it any more",
                agent.name
            )));
        }
        task::decide_in(
            &self.conversations,
            &self.lifecycle,
            &agent.name,
            &agent.session,
            &approval,
            decision,
            message,
            DecidedBy::User,
        )
        .await?;
        let mut decided =
            self.store.approval(id).await?.ok_or_else(|| ManagerError::ApprovalNotFound(id.to_owned()))?;
        decided.agent = Some(agent.name);
        Ok(decided)
    }

    /// Restarts the run a conversation task found stuck, if it is still that run.
    pub(crate) async fn restart_stuck(&self, request: RestartRequest) -> Result<()> {
        let _op = self.ops.read().await;
        self.check_accepting()?;
        let _guard = self.lock_agent(&request.agent_id).await;
        let Some(mut agent) = self.store.cached_agent(&request.agent_id) else {
            return Ok(());
        };
        if agent.status != AgentStatus::Running || agent.container_id.as_deref() != Some(request.container.as_str()) {
            return Ok(());
        }
        self.restart_locked(&mut agent, &request.why, AgentStatus::Failed).await
    }

    /// The agent's conversation entries after `after`, oldest first, at most `limit` and at
    /// most [`crate::conversation::CONVERSATION_PAGE_BYTES`] of them (at least one): page on
    /// with `after` until a page is empty.
    pub async fn conversation(&self, id_or_name: &str, after: i64, limit: i64) -> Result<Vec<ConversationEntry>> {
        let agent = self.find(id_or_name).await?;
        Ok(self.store.list_conversation(&agent.id, after, limit).await?)
    }

    /// New conversation entries of every agent, from now on; each is stored before it is
    /// sent here. A large entry (or one past the broadcast's byte budget) comes as
    /// [`LiveEntry::Elided`]: read it from the store.
    pub fn subscribe_conversations(&self) -> broadcast::Receiver<crate::conversation::LiveEntry> {
        self.conversations.subscribe()
    }

    /// How many receivers the two broadcasts have now: lifecycle events
    /// ([`Self::subscribe`]) and conversation entries ([`Self::subscribe_conversations`]).
    /// Every open API stream holds one; a closed one must give it back.
    pub fn subscribers(&self) -> (usize, usize) {
        (self.lifecycle.events.receiver_count(), self.conversations.subscribers())
    }

    /// Stops the agent's container (SIGTERM, then SIGKILL after the agent's grace period),
    /// records the run's exit, and marks the agent stopped. The container stays, with its
    /// logs, until the agent is restarted or removed.
    pub async fn stop(&self, id_or_name: &str) -> Result<AgentView> {
        self.stop_with_grace(id_or_name, None).await
    }

    /// [`Self::stop`], with `grace` (when given) instead of the agent's own grace period
    /// between SIGTERM and SIGKILL, for this stop only.
    pub async fn stop_with_grace(&self, id_or_name: &str, grace: Option<Duration>) -> Result<AgentView> {
        let _op = self.ops.read().await;
        let (_guard, mut agent) = self.find_locked(id_or_name).await?;
        agent.desired = Desired::Stopped;
        agent.next_restart_at = None;
        self.stop_locked_with(&mut agent, EndedBy::Stop, grace).await?;
        self.view(agent).await
    }

    /// Stops a live agent's run on purpose and records it stopped; an agent that is not
    /// live only has its fields saved.
    pub(crate) async fn stop_locked(&self, agent: &mut Agent, ended_by: EndedBy) -> Result<()> {
        self.stop_locked_with(agent, ended_by, None).await
    }

    /// [`Self::stop_locked`], with `grace` overriding the agent's grace period.
    async fn stop_locked_with(&self, agent: &mut Agent, ended_by: EndedBy, grace: Option<Duration>) -> Result<()> {
        if !matches!(agent.status, AgentStatus::Running | AgentStatus::Pending) {
            agent.updated_at = self.now();
            self.store.update_agent(agent).await?;
            return Ok(());
        }
        // Persist the intent first: if the daemon dies mid-stop, the next pass still
        // reads the exit as on purpose.
        self.store.update_agent(agent).await?;
        let exit = self.end_run(agent, grace).await?;
        agent.reason = Some(match ended_by {
            EndedBy::Shutdown => "stopped by daemon shutdown".to_owned(),
            _ => "stopped on request".to_owned(),
        });
        agent.health = SessionHealth::Unknown;
        let detail = format!("{}; {}", agent.reason.as_deref().unwrap_or_default(), exit.summary());
        self.transition(agent, AgentStatus::Stopped, EventKind::Stopped, detail, Some((&exit, ended_by))).await
    }

    /// Stops the agent's container (with `grace`, or the agent's own grace period) and
    /// reads how it ended; a missing container is an exit with an error saying so.
    async fn end_run(&self, agent: &Agent, grace: Option<Duration>) -> Result<SessionExitInfo> {
        let grace = grace.unwrap_or_else(|| Duration::from_secs(agent.spec.stop_grace_secs));
        match self.backend.stop_session(&agent.session, grace).await {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {
                return Ok(SessionExitInfo {
                    error: Some("session was already gone".into()),
                    finished_at: Some(self.now()),
                    ..SessionExitInfo::default()
                })
            }
            Err(e) => return Err(e.into()),
        }
        lock(&self.runtime).remove(&agent.id);
        Ok(self.backend.session_exit_info(&agent.session).await?.unwrap_or_else(|| SessionExitInfo {
            error: Some("the engine reported no exit information".into()),
            finished_at: Some(self.now()),
            ..SessionExitInfo::default()
        }))
    }

    /// Stops the agent if it runs (recording the exit) and starts a new run.
    pub async fn restart(&self, id_or_name: &str) -> Result<AgentView> {
        let _op = self.ops.read().await;
        self.check_accepting()?;
        let (_guard, mut agent) = self.find_locked(id_or_name).await?;
        // Before the running container is stopped: a refused restart leaves it as it is.
        self.check_network(&agent.name, &agent.spec)?;
        agent.desired = Desired::Running;
        agent.next_restart_at = None;
        agent.crash_streak = 0;
        self.restart_locked(&mut agent, "restart requested", AgentStatus::Stopped).await?;
        self.view(agent).await
    }

    /// Ends the current run (if live) and launches a new one, counting a restart. The
    /// ended run leaves the agent `between` (stopped for a requested restart, failed for
    /// one the manager decided), which is what it reads if the new run cannot be created.
    pub(crate) async fn restart_locked(&self, agent: &mut Agent, why: &str, between: AgentStatus) -> Result<()> {
        if matches!(agent.status, AgentStatus::Running | AgentStatus::Pending) {
            let exit = self.end_run(agent, None).await?;
            agent.reason = Some(why.to_owned());
            agent.health = SessionHealth::Unknown;
            let detail = format!("{why}; {}", exit.summary());
            let kind = if between == AgentStatus::Failed { EventKind::Failed } else { EventKind::Stopped };
            self.transition(agent, between, kind, detail, Some((&exit, EndedBy::Restart))).await?;
        }
        self.backend.remove_session(&agent.session).await?;
        agent.restarts += 1;
        Metrics::add(&self.metrics.restarts);
        let from = agent.status;
        self.record(agent, EventKind::Restarted, Some(from), Some(from), why.to_owned()).await?;
        if let Err(e) = self.launch(agent, EndedBy::StartError).await {
            if agent.container_id.is_none() {
                // The new container could not even be created: say so on the record.
                agent.reason = Some(format!("restart failed: {e}"));
                agent.updated_at = self.now();
                self.store.update_agent(agent).await?;
            }
            return Err(e);
        }
        Ok(())
    }

    /// Stops the agent (recording the exit), removes its container and deletes its record
    /// and runs. Its events stay.
    pub async fn remove(&self, id_or_name: &str) -> Result<()> {
        let _op = self.ops.read().await;
        let (guard, mut agent) = self.find_locked(id_or_name).await?;
        agent.desired = Desired::Stopped;
        agent.next_restart_at = None;
        self.stop_locked(&mut agent, EndedBy::Remove).await?;
        self.backend.remove_session(&agent.session).await?;
        if agent.speaks_stream_json() {
            match self.backend.remove_volume(&home_volume(&agent)).await {
                Ok(()) | Err(backend_core::BackendError::Unsupported { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.store.delete_agent(&agent.id).await?;
        self.conversations.forget(&agent.id).await;
        lock(&self.runtime).remove(&agent.id);
        lock(&self.liveness_streaks).remove(&agent.id);
        self.record(&agent, EventKind::Removed, Some(agent.status), None, "container and record removed".into())
            .await?;
        // The lock's entry goes with the last guard or waiter (see `AgentLocks`).
        drop(guard);
        Ok(())
    }

    /// The agent with this id or name, with its last exit.
    pub async fn get(&self, id_or_name: &str) -> Result<AgentView> {
        let agent = self.find(id_or_name).await?;
        self.view(agent).await
    }

    /// The agent record itself.
    pub async fn agent(&self, id_or_name: &str) -> Result<Agent> {
        self.find(id_or_name).await
    }

    /// Every agent, optionally only those with `status`, with their last exits.
    pub async fn list(&self, status: Option<AgentStatus>) -> Result<Vec<AgentView>> {
        let agents = self.store.list_agents(status).await?;
        // One query for every agent's last exit, not one per agent.
        let mut exits = self.store.last_exits().await?;
        let mut starts = self.store.last_runs_started().await?;
        let mut views = Vec::with_capacity(agents.len());
        for agent in agents {
            let exit = exits.remove(&agent.id);
            let started_at = starts.remove(&agent.id);
            views.push(self.view_with(agent, exit, started_at).await?);
        }
        Ok(views)
    }

    /// A page of agents: at most `limit` (1 to [`crate::MAX_AGENT_PAGE`]) after `after`,
    /// oldest first, with `status` when given, and the cursor of the next page when more
    /// follow. It costs the page, not the number of agents: the store's ordered index is
    /// walked from the cursor, and one query reads the page's last exits.
    pub async fn list_page(
        &self,
        status: Option<AgentStatus>,
        after: Option<&crate::AgentCursor>,
        limit: usize,
    ) -> Result<(Vec<AgentView>, Option<crate::AgentCursor>)> {
        let limit = limit.clamp(1, crate::MAX_AGENT_PAGE);
        let (agents, more) = self.store.list_agents_page(status, after, limit);
        let ids: Vec<&str> = agents.iter().map(|a| a.id.as_str()).collect();
        let mut exits = self.store.last_exits_of(&ids).await?;
        let mut starts = self.store.last_runs_started_of(&ids).await?;
        let next = more.then(|| agents.last().map(|a| crate::AgentCursor::after(a.created_at, &a.id))).flatten();
        let mut views = Vec::with_capacity(agents.len());
        for agent in agents {
            let exit = exits.remove(&agent.id);
            let started_at = starts.remove(&agent.id);
            views.push(self.view_with(agent, exit, started_at).await?);
        }
        Ok((views, next))
    }

    pub(crate) async fn view(&self, agent: Agent) -> Result<AgentView> {
        let exit = self.store.last_exit(&agent.id).await?;
        let started_at = self.store.last_run_started(&agent.id).await?;
        self.view_with(agent, exit, started_at).await
    }

    async fn view_with(
        &self,
        agent: Agent,
        exit: Option<crate::model::ExitView>,
        started_at: Option<OffsetDateTime>,
    ) -> Result<AgentView> {
        let session = if agent.speaks_stream_json() {
            self.conversations.record(&agent.id).await?;
            self.conversations.view(&agent.id)
        } else {
            None
        };
        let live = matches!(agent.status, AgentStatus::Running | AgentStatus::Pending);
        let paused = live && lock(&self.runtime).get(&agent.id).is_some_and(|rt| rt.paused);
        let connected = self.conversations.is_connected(&agent.id);
        let model_usage = self.store.model_usage(&agent.id);
        let model_limits = self.model_limits(&agent);
        Ok(AgentView { agent, exit, started_at, connected, paused, session, model_usage, model_limits })
    }

    /// The agent's runs, oldest first.
    pub async fn runs(&self, id_or_name: &str) -> Result<Vec<Run>> {
        let agent = self.find(id_or_name).await?;
        Ok(self.store.list_runs(&agent.id).await?)
    }

    /// The last `tail` lines of the agent's container output.
    pub async fn logs(&self, id_or_name: &str, tail: Option<usize>) -> Result<String> {
        let agent = self.find(id_or_name).await?;
        match self.backend.session_logs(&agent.session, tail).await {
            Err(e) if e.is_not_found() => Err(ManagerError::Conflict(format!(
                "agent {} has no container (it is {}); logs are kept only while its container exists",
                agent.name, agent.status
            ))),
            other => Ok(other?),
        }
    }

    /// The output of the agent's current (or last) run, read from the engine's log from
    /// `from(&agent)` on (everything when it says `None`) and, with `follow`, followed
    /// until the run ends. The record and the stream are taken under the agent's lock, so
    /// the stream is the output of the container the record names (never of one a restart
    /// in flight is replacing). `lines` is `None` when the agent has no container now.
    pub async fn run_output(
        &self,
        id_or_name: &str,
        from: impl FnOnce(&Agent) -> Option<backend_core::OutputCursor> + Send,
        follow: bool,
    ) -> Result<RunOutput> {
        let (_guard, agent) = self.find_locked(id_or_name).await?;
        let run = self.store.list_runs(&agent.id).await?.len();
        let lines = match agent.container_id {
            None => None,
            Some(_) => match self.backend.session_output(&agent.session, from(&agent), follow).await {
                Ok(lines) => Some(lines),
                Err(e) if e.is_not_found() => None,
                Err(e) => return Err(e.into()),
            },
        };
        Ok(RunOutput { agent, run, lines })
    }

    /// Stored events after id `since`, optionally of one agent.
    pub async fn events(&self, agent: Option<&str>, since: i64, limit: i64) -> Result<Vec<LifecycleEvent>> {
        Ok(self.store.list_events(agent, since, limit).await?)
    }

    /// Stops accepting work and then either stops every live agent concurrently, each
    /// within its own grace period, recording every exit; or, with `leave_running`, leaves
    /// them running with their records intact for the next start to adopt.
    pub async fn shutdown_all(&self, leave_running: bool) -> Result<ShutdownSummary> {
        self.shutting_down.store(true, Ordering::SeqCst);
        // Wait for operations in flight (a spawn or restart finishing after the listing
        // below would leave an agent running), then for a reconcile pass in flight.
        let _no_ops = self.ops.write().await;
        let _pass = self.pass_lock.lock().await;
        let live: Vec<Agent> = self
            .store
            .list_agents(None)
            .await?
            .into_iter()
            .filter(|a| matches!(a.status, AgentStatus::Running | AgentStatus::Pending))
            .collect();
        let mut summary = ShutdownSummary::default();
        if leave_running {
            // The containers run on; their conversations are picked up from the stored
            // cursors by the next start.
            self.conversations.abort_all();
            for agent in live {
                let detail = "daemon shut down with leave-running; the next start adopts it".to_owned();
                self.record(&agent, EventKind::LeftRunning, Some(agent.status), Some(agent.status), detail).await?;
                summary.left_running.push(agent.name);
            }
            return Ok(summary);
        }
        let outcomes: Vec<(String, Result<()>)> = stream::iter(live)
            .map(|agent| async move {
                let name = agent.name.clone();
                let _guard = self.lock_agent(&agent.id).await;
                let outcome = async {
                    let mut agent = self.find(&agent.id).await?;
                    if agent.spec.restart == RestartPolicy::Always {
                        // Like an engine's "always": it comes back when the daemon does.
                        agent.next_restart_at = Some(self.now());
                    } else {
                        agent.desired = Desired::Stopped;
                    }
                    self.stop_locked(&mut agent, EndedBy::Shutdown).await
                }
                .await;
                (name, outcome)
            })
            .buffer_unordered(SHUTDOWN_CONCURRENCY)
            .collect()
            .await;
        self.conversations.abort_all();
        for (name, outcome) in outcomes {
            match outcome {
                Ok(()) => summary.stopped.push(name),
                Err(e) => {
                    warn!(agent = %name, error = %e, "Agent could not be stopped at shutdown.");
                    summary.failed.push((name, e.to_string()));
                }
            }
        }
        if summary.failed.is_empty() {
            self.sweep_at_shutdown(&mut summary).await;
        } else {
            // Their records still read running: removing their containers now would have
            // the next start record them as stopped from outside. Leave them to it.
            warn!(failed = summary.failed.len(), "Containers not swept at shutdown: some agents could not be stopped.");
            summary.sweep_error = Some("not swept: some agents could not be stopped".into());
        }
        Ok(summary)
    }

    /// The end of a shutdown that stops the agents: stops and removes every container of
    /// this instance that is left (the stopped agents' own, whose exits are recorded,
    /// and any without a record), so none survives the daemon.
    async fn sweep_at_shutdown(&self, summary: &mut ShutdownSummary) {
        let grace = Duration::from_secs(self.config.defaults.stop_grace_secs);
        match self.backend.shutdown_all_sessions(grace).await {
            Ok(report) => {
                for (session, e) in report.failed {
                    warn!(session, error = %e, "Container could not be removed at shutdown.");
                    summary.not_removed.push((session, e.to_string()));
                }
                summary.removed = report.stopped;
                info!(
                    removed = summary.removed.len(),
                    failed = summary.not_removed.len(),
                    "Containers swept at shutdown."
                );
            }
            Err(e) => {
                warn!(error = %e, "Could not list the containers left at shutdown; some may survive the daemon.");
                summary.sweep_error = Some(e.to_string());
            }
        }
    }

    /// Deletes the stored events and model requests older than `events_retention` (by the
    /// manager's clock) and returns how many events; with no retention, none. The
    /// supervisor runs it at start and hourly.
    pub async fn prune_events(&self) -> Result<u64> {
        let Some(retention) = self.config.events_retention else {
            return Ok(0);
        };
        let Some(before) = self.now().checked_sub(time::Duration::try_from(retention).unwrap_or(time::Duration::MAX))
        else {
            return Ok(0);
        };
        let deleted = self.store.prune_events(before).await?;
        if deleted > 0 {
            info!(deleted, retention_days = retention.as_secs() / 86_400, "Old events pruned.");
        }
        // The model requests share the retention (their sums stay).
        let requests = self.store.prune_model_requests(before).await?;
        if requests > 0 {
            info!(deleted = requests, retention_days = retention.as_secs() / 86_400, "Old model requests pruned.");
        }
        Ok(deleted)
    }

    /// Saves the agent with its new status (and, with `finish`, the end of its open run)
    /// in one transaction, and announces the transition.
    pub(crate) async fn transition(
        &self,
        agent: &mut Agent,
        to: AgentStatus,
        kind: EventKind,
        detail: String,
        finish: Option<(&SessionExitInfo, EndedBy)>,
    ) -> Result<()> {
        let from = agent.status;
        agent.status = to;
        agent.updated_at = self.now();
        let event = self.event(agent, kind, Some(from), Some(to), detail);
        let stored = self.store.transition(agent, finish.map(|(exit, by)| (exit, by, event.at)), &event).await?;
        self.lifecycle.announce(stored, &agent.session, finish.map(|(e, _)| e));
        Ok(())
    }

    /// Stores and announces an event that changes nothing about the agent.
    pub(crate) async fn record(
        &self,
        agent: &Agent,
        kind: EventKind,
        from: Option<AgentStatus>,
        to: Option<AgentStatus>,
        detail: String,
    ) -> Result<()> {
        let event = self.event(agent, kind, from, to, detail);
        let stored = self.store.insert_event(&event).await?;
        self.lifecycle.announce(stored, &agent.session, None);
        Ok(())
    }

    fn event(
        &self,
        agent: &Agent,
        kind: EventKind,
        from: Option<AgentStatus>,
        to: Option<AgentStatus>,
        detail: String,
    ) -> LifecycleEvent {
        LifecycleEvent {
            id: 0,
            agent_id: agent.id.clone(),
            agent_name: Some(agent.name.clone()),
            kind,
            from,
            to,
            detail,
            at: self.now(),
        }
    }

    /// Logs a stored event and broadcasts it to subscribers.
    pub(crate) fn announce(&self, event: LifecycleEvent, session: &str, exit: Option<&SessionExitInfo>) {
        self.lifecycle.announce(event, session, exit);
    }
}

/// Logs a lifecycle event under [`LIFECYCLE_TARGET`], fields first.
fn log_event(event: &LifecycleEvent, session: &str, exit: Option<&SessionExitInfo>) {
    let from = event.from.map(AgentStatus::as_str);
    let to = event.to.map(AgentStatus::as_str);
    let exit_code = exit.and_then(|e| e.exit_code);
    let oom_killed = exit.map(|e| e.oom_killed);
    let agent = event.agent_name.as_deref().unwrap_or_default();
    let message = match event.kind {
        EventKind::Spawned => "Agent spawned.",
        EventKind::Started => "Agent started.",
        EventKind::Exited => "Agent exited.",
        EventKind::Stopped => "Agent stopped.",
        EventKind::Failed => "Agent failed.",
        EventKind::Restarted => "Agent restarted.",
        EventKind::RestartScheduled => "Agent restart scheduled.",
        EventKind::HealthChanged => "Agent health changed.",
        EventKind::Adopted => "Agent adopted.",
        EventKind::LeftRunning => "Agent left running.",
        EventKind::Connected => "Agent attached.",
        EventKind::Disconnected => "Agent detached.",
        EventKind::Paused => "Agent paused.",
        EventKind::Unpaused => "Agent unpaused.",
        EventKind::ApprovalRequested => "Agent asks for a tool permission.",
        EventKind::ApprovalDecided => "Tool permission decided.",
        EventKind::TurnInterrupted => "Stuck turn interrupted.",
        EventKind::Removed => "Agent removed.",
        EventKind::OrphanRemoved => "Orphaned session removed.",
        EventKind::OrphanFound => "Orphaned session found.",
        EventKind::EgressDenied => "Egress refused.",
    };
    if matches!(event.kind, EventKind::Failed | EventKind::EgressDenied) {
        warn!(target: LIFECYCLE_TARGET, agent_id = %event.agent_id, agent, session, kind = event.kind.as_str(), from, to, exit_code, oom_killed, reason = %event.detail, "{message}");
    } else {
        info!(target: LIFECYCLE_TARGET, agent_id = %event.agent_id, agent, session, kind = event.kind.as_str(), from, to, exit_code, oom_killed, reason = %event.detail, "{message}");
    }
}

/// Where a claude-code agent's HOME volume is mounted: the Claude Code image's HOME.
pub const CLAUDE_HOME: &str = "/home/agent";

/// How many agents shutdown stops at once.
pub const SHUTDOWN_CONCURRENCY: usize = 256;

/// The name of a claude-code agent's HOME volume.
pub(crate) fn home_volume(agent: &Agent) -> String {
    format!("{}-home", agent.session)
}

pub(crate) fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}
