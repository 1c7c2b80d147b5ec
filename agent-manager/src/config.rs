//! The manager's settings.

use std::path::PathBuf;
use std::time::Duration;

use backend_core::NetworkPolicy;

use serde::{Deserialize, Serialize};
use serde_with::{serde_as, DurationSeconds};

use crate::model::{
    AgentKind, AgentSpec, ApprovalPolicy, ModelLimits, NewAgent, RestartPolicy, UnhealthyAction, PERMISSION_MODES,
};
use crate::{Backoff, ManagerError};

/// The longest stop grace period an agent may ask for.
pub const MAX_STOP_GRACE_SECS: u64 = 3600;

/// The `[agents]` section: defaults for fields a [`NewAgent`] leaves unset, and the
/// settings that apply to every agent. Every key is optional; see
/// `docs/configuration.md`.
#[serde_as]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentDefaults {
    /// Starts every container name and is the `agentd.prefix` label: the daemon makes
    /// its backend's ownership labels from it (the manager takes names from the backend).
    pub prefix: String,
    pub kind: AgentKind,
    pub image: String,
    pub memory_mb: Option<u64>,
    pub cpus: Option<f64>,
    pub pids_limit: Option<i64>,
    /// The network of agents that name none. Unset: `isolated` for `claude-code` agents,
    /// `internet` for `image` agents ([`AgentDefaults::network_for`]).
    pub network: Option<NetworkPolicy>,
    pub restart: RestartPolicy,
    pub on_unhealthy: UnhealthyAction,
    pub stop_grace_secs: u64,
    pub read_only_rootfs: bool,
    /// Variables copied from the daemon's environment into every agent's, when set
    /// there and not set by the agent's own env. Never the model credential: it stays in
    /// the daemon (`[model]`), and claude-code agents get a gateway secret instead
    /// ([`MODEL_ENV`] is refused here).
    pub forward_env: Vec<String>,
    /// How claude-code tool-permission requests are answered: ask, allow or deny.
    pub approvals: ApprovalPolicy,
    /// Claude Code's `--permission-mode`; unset keeps the CLI's default.
    pub permission_mode: Option<String>,
    /// How long a pending tool-permission request waits for a decision before it is
    /// denied. Key `approval_timeout_secs`.
    #[serde(rename = "approval_timeout_secs")]
    #[serde_as(as = "DurationSeconds<u64>")]
    pub approval_timeout: Duration,
    /// How long a busy turn may go without output before it is interrupted. Key
    /// `turn_idle_timeout_secs`.
    #[serde(rename = "turn_idle_timeout_secs")]
    #[serde_as(as = "DurationSeconds<u64>")]
    pub turn_idle_timeout: Duration,
    /// How long an interrupted turn may take to end before the agent is restarted. Key
    /// `interrupt_grace_secs`.
    #[serde(rename = "interrupt_grace_secs")]
    #[serde_as(as = "DurationSeconds<u64>")]
    pub interrupt_grace: Duration,
    /// Claude Code's `--max-turns`.
    pub max_turns: Option<u32>,
    /// Claude Code's `--max-budget-usd`.
    pub max_budget_usd: Option<f64>,
    /// Who an agent runs as when it names no user and its image names none or root
    /// (`NAME`, `UID` or `UID:GID`).
    pub default_user: String,
    /// Whether agents may run as root: a `user` of `0` or `root` (`0:…`, `root:…`), or
    /// a root `default_user`. Off: such agents are refused.
    pub allow_root: bool,
    /// The host directories an agent's workdir and mounts must be inside (absolute
    /// paths); empty: anywhere that is not protected.
    pub workdir_roots: Vec<PathBuf>,
    /// The destinations every agent's egress proxy allows unless its spawn names its own
    /// list (see [`crate::egress`]): `host` (ports 443 and 80), `host:port`,
    /// `*.domain[:port]`. Empty: nothing.
    pub egress_allow: Vec<String>,
}

impl Default for AgentDefaults {
    fn default() -> Self {
        Self {
            prefix: "agentd".into(),
            kind: AgentKind::ClaudeCode,
            image: "agentd-claude:latest".into(),
            memory_mb: Some(2048),
            cpus: Some(2.0),
            pids_limit: Some(512),
            network: None,
            restart: RestartPolicy::Never,
            on_unhealthy: UnhealthyAction::Record,
            stop_grace_secs: 10,
            read_only_rootfs: false,
            forward_env: Vec::new(),
            approvals: ApprovalPolicy::Ask,
            permission_mode: None,
            approval_timeout: Duration::from_secs(900),
            turn_idle_timeout: Duration::from_secs(600),
            interrupt_grace: Duration::from_secs(30),
            max_turns: None,
            max_budget_usd: None,
            default_user: DEFAULT_USER.into(),
            allow_root: false,
            workdir_roots: Vec::new(),
            egress_allow: Vec::new(),
        }
    }
}

/// Who agents run as unless told otherwise: `1000:1000`.
pub const DEFAULT_USER: &str = "1000:1000";

/// A value that breaks a rule: the field (or config key within its section), the value
/// as shown, and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub field: &'static str,
    pub value: String,
    pub allowed: String,
}

impl Violation {
    fn new(field: &'static str, value: impl Into<String>, allowed: impl Into<String>) -> Self {
        Self { field, value: value.into(), allowed: allowed.into() }
    }

    /// The violation as the API reports it: the field and `value: allowed`.
    pub fn into_error(self) -> ManagerError {
        ManagerError::Invalid { field: self.field, message: format!("{}: {}", self.value, self.allowed) }
    }
}

/// The rules of every agent setting that the spec of an agent and the `[agents]`
/// defaults share: limits (`backend_core::rules`), image, grace, Claude Code's options
/// and the kind/network pair. One validator for the API's spawns and the daemon's
/// configuration.
fn check_common(spec: &AgentSpec, out: &mut Vec<Violation>) {
    use backend_core::rules;
    if let Err(allowed) = rules::image(&spec.image) {
        // A reference of thousands of characters is not echoed whole.
        let shown = match spec.image.char_indices().nth(80) {
            Some((end, _)) => format!("{:?}… ({} bytes)", &spec.image[..end], spec.image.len()),
            None => format!("{:?}", spec.image),
        };
        out.push(Violation::new("image", shown, allowed));
    }
    if let Some(Err(allowed)) = spec.memory_mb.map(rules::memory_mb) {
        out.push(Violation::new("memory_mb", spec.memory_mb.unwrap_or_default().to_string(), allowed));
    }
    if let Some(Err(allowed)) = spec.cpus.map(rules::cpus) {
        out.push(Violation::new("cpus", spec.cpus.unwrap_or_default().to_string(), allowed));
    }
    if let Some(Err(allowed)) = spec.pids_limit.map(rules::pids_limit) {
        out.push(Violation::new("pids_limit", spec.pids_limit.unwrap_or_default().to_string(), allowed));
    }
    if spec.stop_grace_secs > MAX_STOP_GRACE_SECS {
        out.push(Violation::new("stop_grace_secs", spec.stop_grace_secs.to_string(), "at most 3600 (seconds)"));
    }
    if let Some(mode) = &spec.permission_mode {
        if !PERMISSION_MODES.contains(&mode.as_str()) {
            let allowed = format!("one of Claude Code's modes: {}", PERMISSION_MODES.join(", "));
            out.push(Violation::new("permission_mode", format!("{mode:?}"), allowed));
        }
    }
    if spec.max_turns == Some(0) {
        out.push(Violation::new("max_turns", "0", "at least 1, or leave it unset for no limit"));
    }
    if let Some(budget) = spec.max_budget_usd {
        if !(budget.is_finite() && budget > 0.0) {
            out.push(Violation::new("max_budget_usd", budget.to_string(), "a positive number of US dollars, or unset"));
        }
    }
    if let Err(why) = crate::egress::EgressList::parse(&spec.egress_allow) {
        out.push(Violation::new(
            "egress_allow",
            why,
            "entries HOST (ports 443 and 80), HOST:PORT, *.DOMAIN[:PORT] or an IP address ([IPv6]:PORT)",
        ));
    }
    if spec.kind == AgentKind::ClaudeCode && spec.network == NetworkPolicy::None {
        out.push(Violation::new(
            "network",
            "\"none\"",
            "kind claude-code needs to reach its model API; use internet, isolated or host",
        ));
    }
}

impl ModelLimits {
    /// Checks that every set limit is at least 1; each violation names its spawn field
    /// (`model_limits.requests_per_minute`, ...).
    pub fn check(&self) -> Vec<Violation> {
        [
            ("model_limits.requests_per_minute", self.requests_per_minute.map(u64::from)),
            ("model_limits.max_concurrent_requests", self.max_concurrent_requests.map(u64::from)),
            ("model_limits.max_output_tokens_per_day", self.max_output_tokens_per_day),
        ]
        .into_iter()
        .filter(|(_, value)| *value == Some(0))
        .map(|(field, _)| Violation::new(field, "0", "at least 1, or leave it unset for the [model] default"))
        .collect()
    }
}
/// The variables agentd sets itself in a claude-code agent's environment (the model
/// gateway's address and the agent's own secret), and the credential variables the real
/// credential would travel in: a spawn's `env` and `agents.forward_env` may not name them.
pub const MODEL_ENV: &[&str] =
    &["ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "CLAUDE_CODE_OAUTH_TOKEN", "ANTHROPIC_BASE_URL"];

/// What to do instead of passing a [`MODEL_ENV`] variable.
const MODEL_ENV_ALLOWED: &str = "agentd sets the model variables of claude-code agents itself (the model gateway's \
     address and a secret of the agent's own); put the real credential in [model] (model.api_key_file, or the \
     daemon's ANTHROPIC_API_KEY or CLAUDE_CODE_OAUTH_TOKEN)";

/// Checks a variable name an agent's environment gets.
fn check_env_name(field: &'static str, name: &str) -> Option<Violation> {
    if let Err(allowed) = backend_core::rules::env_name(name) {
        return Some(Violation::new(field, format!("{name:?}"), allowed));
    }
    name.starts_with("AGENTD_")
        .then(|| Violation::new(field, format!("{name:?}"), "not AGENTD_*: agentd sets AGENTD_* variables itself"))
}

impl AgentDefaults {
    /// Checks every value of the section; each violation names its key within
    /// `[agents]`.
    pub fn check(&self) -> Vec<Violation> {
        let mut out = Vec::new();
        let prefix_ok = backend_core::OwnershipLabels::new(self.prefix.clone(), "x").is_ok()
            && self.prefix.len() <= 30
            && self.prefix.starts_with(|c: char| c.is_ascii_alphanumeric());
        if !prefix_ok {
            out.push(Violation::new(
                "prefix",
                format!("{:?}", self.prefix),
                "use 1 to 30 characters from [A-Za-z0-9_.-], starting with a letter or digit (it starts container names)",
            ));
        }
        let spec = AgentSpec {
            kind: self.kind,
            image: self.image.clone(),
            entrypoint: None,
            command: None,
            env: Default::default(),
            workdir: None,
            memory_mb: self.memory_mb,
            cpus: self.cpus,
            pids_limit: self.pids_limit,
            network: self.network_for(self.kind),
            restart: self.restart,
            on_unhealthy: self.on_unhealthy,
            stop_grace_secs: self.stop_grace_secs,
            model: None,
            prompt: None,
            user: None,
            read_only_rootfs: self.read_only_rootfs,
            approvals: self.approvals,
            permission_mode: self.permission_mode.clone(),
            max_turns: self.max_turns,
            max_budget_usd: self.max_budget_usd,
            model_limits: ModelLimits::default(),
            egress_allow: self.egress_allow.clone(),
        };
        check_common(&spec, &mut out);
        out.extend(self.forward_env.iter().filter_map(|name| check_env_name("forward_env", name)));
        out.extend(
            self.forward_env
                .iter()
                .filter(|name| MODEL_ENV.contains(&name.as_str()))
                .map(|name| Violation::new("forward_env", format!("{name:?}"), MODEL_ENV_ALLOWED)),
        );
        if let Err(allowed) = backend_core::rules::user(&self.default_user) {
            out.push(Violation::new("default_user", format!("{:?}", self.default_user), allowed));
        } else if backend_core::rules::user_is_root(&self.default_user) && !self.allow_root {
            out.push(Violation::new(
                "default_user",
                format!("{:?}", self.default_user),
                "a user other than root, such as 1000:1000; or set agents.allow_root = true to run agents as root",
            ));
        }
        for root in &self.workdir_roots {
            if !root.is_absolute() {
                out.push(Violation::new(
                    "workdir_roots",
                    format!("{:?}", root.display().to_string()),
                    "absolute paths",
                ));
            }
        }
        for (field, value) in [
            ("approval_timeout_secs", self.approval_timeout),
            ("turn_idle_timeout_secs", self.turn_idle_timeout),
            ("interrupt_grace_secs", self.interrupt_grace),
        ] {
            if !(1..=86_400).contains(&value.as_secs()) {
                out.push(Violation::new(field, value.as_secs().to_string(), "1 to 86400 (seconds)"));
            }
        }
        out
    }

    /// The network of an agent of `kind` that names none: `agents.network`, or when that is
    /// unset `isolated` for `claude-code` agents (which need only the daemon's gateway) and
    /// `internet` for `image` agents.
    pub fn network_for(&self, kind: AgentKind) -> NetworkPolicy {
        self.network.unwrap_or(match kind {
            AgentKind::ClaudeCode => NetworkPolicy::Isolated,
            AgentKind::Image => NetworkPolicy::Internet,
        })
    }

    /// Fills the unset fields of `new` and checks every value; errors name the field.
    pub fn resolve(&self, new: NewAgent) -> Result<AgentSpec, ManagerError> {
        fn invalid<T>(field: &'static str, message: String) -> Result<T, ManagerError> {
            Err(ManagerError::Invalid { field, message })
        }
        crate::model::validate_name(&new.name).or_else(|m| invalid("name", m))?;
        let spec = AgentSpec {
            kind: new.kind.unwrap_or(self.kind),
            image: new.image.unwrap_or_else(|| self.image.clone()),
            entrypoint: new.entrypoint,
            command: new.command,
            env: new.env,
            workdir: new.workdir,
            memory_mb: new.memory_mb.or(self.memory_mb),
            cpus: new.cpus.or(self.cpus),
            pids_limit: new.pids_limit.or(self.pids_limit),
            network: new.network.unwrap_or_else(|| self.network_for(new.kind.unwrap_or(self.kind))),
            restart: new.restart.unwrap_or(self.restart),
            on_unhealthy: new.on_unhealthy.unwrap_or(self.on_unhealthy),
            stop_grace_secs: new.stop_grace_secs.unwrap_or(self.stop_grace_secs),
            model: new.model,
            prompt: new.prompt,
            user: new.user,
            read_only_rootfs: new.read_only_rootfs.unwrap_or(self.read_only_rootfs),
            approvals: new.approvals.unwrap_or(self.approvals),
            permission_mode: new.permission_mode,
            max_turns: new.max_turns,
            max_budget_usd: new.max_budget_usd,
            model_limits: new.model_limits.unwrap_or_default(),
            egress_allow: new.egress_allow.unwrap_or_else(|| self.egress_allow.clone()),
        };
        // The Claude Code defaults apply to Claude Code agents only.
        let mut spec = spec;
        if spec.kind == AgentKind::ClaudeCode {
            spec.permission_mode = spec.permission_mode.or_else(|| self.permission_mode.clone());
            spec.max_turns = spec.max_turns.or(self.max_turns);
            spec.max_budget_usd = spec.max_budget_usd.or(self.max_budget_usd);
        }
        if let Some(entrypoint) = &spec.entrypoint {
            if entrypoint.first().is_none_or(String::is_empty) {
                return invalid("entrypoint", "must name a program; leave it out to run the image's entrypoint".into());
            }
            if spec.kind == AgentKind::ClaudeCode {
                return invalid(
                    "entrypoint",
                    "kind claude-code runs the Claude Code CLI; use kind \"image\" to run an entrypoint of your own"
                        .into(),
                );
            }
        }
        if let Some(command) = &spec.command {
            // Under an entrypoint of its own the command is the entrypoint's arguments,
            // which may be none; alone it is the program and its arguments.
            if spec.entrypoint.is_none() && command.first().is_none_or(String::is_empty) {
                return invalid("command", "must name a program; leave it out to run the image's entrypoint".into());
            }
            if spec.kind == AgentKind::ClaudeCode {
                return invalid(
                    "command",
                    "kind claude-code runs the Claude Code CLI; use kind \"image\" to run a command".into(),
                );
            }
        }
        if let Some(violation) = spec.env.keys().find_map(|key| check_env_name("env", key)) {
            return Err(violation.into_error());
        }
        if spec.kind == AgentKind::ClaudeCode {
            if let Some(key) = spec.env.keys().find(|key| MODEL_ENV.contains(&key.as_str())) {
                return invalid("env", format!("{key:?}: {MODEL_ENV_ALLOWED}"));
            }
        }
        if let Some(user) = &spec.user {
            // Root first: `root:wheel` is refused as root, whatever its group's form.
            self.check_root("user", user)?;
            if let Err(allowed) = backend_core::rules::user(user) {
                return invalid("user", format!("{user:?}: {allowed}"));
            }
        }
        let mut violations = spec.model_limits.check();
        check_common(&spec, &mut violations);
        if let Some(violation) = violations.into_iter().next() {
            return Err(violation.into_error());
        }
        let claude_only = spec.permission_mode.is_some() || spec.max_turns.is_some() || spec.max_budget_usd.is_some();
        if claude_only && spec.kind != AgentKind::ClaudeCode {
            return invalid(
                "kind",
                format!(
                    "permission_mode, max_turns and max_budget_usd are Claude Code options; kind {} takes none",
                    spec.kind
                ),
            );
        }
        if spec.prompt.is_some() && spec.kind != AgentKind::ClaudeCode {
            return invalid(
                "prompt",
                format!("kind {} holds no conversation; a prompt needs kind claude-code", spec.kind),
            );
        }
        Ok(spec)
    }

    /// Refuses `user` (the value of `field`) when it is root and root is not allowed.
    pub fn check_root(&self, field: &'static str, user: &str) -> Result<(), ManagerError> {
        if backend_core::rules::user_is_root(user) && !self.allow_root {
            return Err(ManagerError::Refused {
                field,
                value: user.to_owned(),
                rule: "agents run as root only where the daemon's configuration sets agents.allow_root = true; \
                       run it as another user, such as 1000:1000"
                    .into(),
            });
        }
        Ok(())
    }
}

/// The `[reconcile]` section: when and how reconcile acts.
#[serde_as]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReconcileConfig {
    /// Time between periodic relists. Key `interval_secs`.
    #[serde(rename = "interval_secs")]
    #[serde_as(as = "DurationSeconds<u64>")]
    pub interval: Duration,
    /// An orphaned session younger than this is left alone. Key `orphan_grace_secs`.
    #[serde(rename = "orphan_grace_secs")]
    #[serde_as(as = "DurationSeconds<u64>")]
    pub orphan_grace: Duration,
    /// Report orphans without removing them.
    pub orphan_dry_run: bool,
    /// How long an agent whose `on_unhealthy` is `restart` may stay unhealthy. Key
    /// `unhealthy_grace_secs`.
    #[serde(rename = "unhealthy_grace_secs")]
    #[serde_as(as = "DurationSeconds<u64>")]
    pub unhealthy_grace: Duration,
    /// The crash-loop back-off of restarts (`[reconcile.restart_backoff]`).
    pub restart_backoff: Backoff,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            orphan_grace: Duration::from_secs(300),
            orphan_dry_run: false,
            unhealthy_grace: Duration::from_secs(30),
            restart_backoff: Backoff::default(),
        }
    }
}

impl ReconcileConfig {
    /// Checks every value of the section; each violation names its key within
    /// `[reconcile]`.
    pub fn check(&self) -> Vec<Violation> {
        let mut out = Vec::new();
        let b = &self.restart_backoff;
        // Every duration is bounded, so that no deadline computed from one (an `Instant`,
        // an `OffsetDateTime`) can overflow.
        for (field, value, min, max) in [
            ("interval_secs", self.interval, 1, MAX_RECONCILE_SECS),
            ("orphan_grace_secs", self.orphan_grace, 0, MAX_GRACE_SECS),
            ("unhealthy_grace_secs", self.unhealthy_grace, 0, MAX_RECONCILE_SECS),
            ("restart_backoff.initial_secs", b.initial, 1, MAX_RECONCILE_SECS),
            ("restart_backoff.max_secs", b.max, 1, MAX_RECONCILE_SECS),
            ("restart_backoff.reset_after_secs", b.reset_after, 0, MAX_GRACE_SECS),
        ] {
            if !(min..=max).contains(&value.as_secs()) {
                out.push(Violation::new(field, value.as_secs().to_string(), format!("{min} to {max} (seconds)")));
            }
        }
        if b.max < b.initial && b.max.as_secs() >= 1 && b.initial.as_secs() <= MAX_RECONCILE_SECS {
            out.push(Violation::new(
                "restart_backoff.max_secs",
                b.max.as_secs().to_string(),
                format!("at least restart_backoff.initial_secs ({})", b.initial.as_secs()),
            ));
        }
        out
    }
}

/// The longest `reconcile.interval_secs`, `unhealthy_grace_secs` and restart back-off
/// wait: a day.
pub const MAX_RECONCILE_SECS: u64 = 86_400;
/// The longest `reconcile.orphan_grace_secs` and `restart_backoff.reset_after_secs`: 30
/// days.
pub const MAX_GRACE_SECS: u64 = 30 * 86_400;

/// Everything the manager needs to know besides its backend and store: the daemon's
/// `[agents]` and `[reconcile]` sections.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ManagerConfig {
    #[serde(rename = "agents")]
    pub defaults: AgentDefaults,
    pub reconcile: ReconcileConfig,
    /// Stored lifecycle events older than this are deleted (at start and hourly);
    /// `None` keeps them forever. Set from the daemon's `store.events_retention_days`.
    #[serde(skip, default = "default_events_retention")]
    pub events_retention: Option<Duration>,
    /// Where the daemon serves its containers (the model gateway and the egress proxy), set
    /// by the daemon once its backend told it the networks' gateway addresses. `None`: no
    /// gateway (agents get no gateway variables).
    #[serde(skip)]
    pub gateway: Option<GatewayEndpoints>,
    /// The default limits of every agent's model requests, set from the daemon's `[model]`
    /// section; a spawn's own `model_limits` win field by field.
    #[serde(skip)]
    pub model_limits: ModelLimits,
    /// Host paths no agent may be given, besides [`crate::SYSTEM_TREES`]: set by the daemon
    /// (its engine's socket directory, its data directory, its credential files).
    #[serde(skip)]
    pub protected_paths: Vec<crate::ProtectedPath>,
    /// Why `isolated` agents cannot run now (the host firewall that protects their network
    /// could not be installed), set by the daemon. While set, spawns, restarts and
    /// restart-policy starts of isolated agents are refused with
    /// [`ManagerError::NetworkUnprotected`] carrying this text. `None`: they may run.
    #[serde(skip)]
    pub isolated_refusal: Option<String>,
    /// Why `claude-code` agents cannot be spawned now (the daemon has no model credential
    /// for its gateway), set by the daemon. While set, spawns of claude-code agents are
    /// refused with [`ManagerError::Refused`] carrying this text. `None`: they may.
    #[serde(skip)]
    pub claude_refusal: Option<String>,
}

/// The daemon's listeners on the engine networks' gateway addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatewayEndpoints {
    /// The host's address on each network ([`backend_core::ExecutionBackend::gateway_addresses`]).
    pub addresses: backend_core::NetworkGateways,
    /// The model gateway's port.
    pub model_port: u16,
    /// The egress proxy's port.
    pub proxy_port: u16,
}

impl GatewayEndpoints {
    /// The address an agent on `network` reaches the daemon at: the gateway of its network
    /// (the internet network's for `host`, whose namespace has every host address); `None`
    /// for `none`, or when the backend has no such address.
    pub fn address_for(&self, network: backend_core::NetworkPolicy) -> Option<std::net::IpAddr> {
        use backend_core::NetworkPolicy as N;
        match network {
            N::Internet | N::Host => self.addresses.internet,
            N::Isolated => self.addresses.isolated,
            N::None => None,
        }
    }
}

/// How long lifecycle events are kept by default: 30 days.
pub const DEFAULT_EVENTS_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

fn default_events_retention() -> Option<Duration> {
    Some(DEFAULT_EVENTS_RETENTION)
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            defaults: AgentDefaults::default(),
            reconcile: ReconcileConfig::default(),
            events_retention: default_events_retention(),
            gateway: None,
            model_limits: ModelLimits::default(),
            protected_paths: Vec::new(),
            isolated_refusal: None,
            claude_refusal: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_spawns_are_checked_by_the_same_rules() {
        let mut defaults = AgentDefaults { memory_mb: Some(4), cpus: Some(2000.0), ..AgentDefaults::default() };
        defaults.forward_env.push("AGENTD_TOKEN".into());
        defaults.interrupt_grace = Duration::ZERO;
        let fields: Vec<&str> = defaults.check().iter().map(|v| v.field).collect();
        assert_eq!(fields, ["memory_mb", "cpus", "forward_env", "interrupt_grace_secs"]);

        let spawn = |new: NewAgent| AgentDefaults::default().resolve(new).expect_err("invalid");
        let message = |e: ManagerError| match e {
            ManagerError::Invalid { field, message } => format!("{field}: {message}"),
            other => panic!("expected Invalid, got {other:?}"),
        };
        let base = || NewAgent { name: "a".into(), ..NewAgent::default() };
        let memory = defaults.check().into_iter().next().expect("memory");
        let range = "from 6 to 1099511627776 (MiB: 6 MiB to 2^40 MiB)";
        assert_eq!(message(spawn(NewAgent { memory_mb: Some(4), ..base() })), format!("memory_mb: 4: {range}"));
        assert_eq!(memory.allowed, range);
        let huge = (1 << 44) + 64;
        assert_eq!(message(spawn(NewAgent { memory_mb: Some(huge), ..base() })), format!("memory_mb: {huge}: {range}"));
        assert!(message(spawn(NewAgent { cpus: Some(2000.0), ..base() })).contains("to 1024"));
        assert!(message(spawn(NewAgent { cpus: Some(1e-12), ..base() })).contains("from 0.01"));
        let entrypoint = |kind, entrypoint: Vec<&str>| NewAgent {
            kind: Some(kind),
            entrypoint: Some(entrypoint.into_iter().map(str::to_owned).collect()),
            ..base()
        };
        assert!(message(spawn(entrypoint(AgentKind::Image, vec![]))).starts_with("entrypoint: must name a program"));
        assert!(message(spawn(entrypoint(AgentKind::ClaudeCode, vec!["/bin/sh"]))).contains("kind claude-code runs"));
        let mut env = base();
        env.env.insert("AGENTD_TOKEN".into(), "x".into());
        assert!(message(spawn(env)).starts_with("env: \"AGENTD_TOKEN\": not AGENTD_*"));
        assert!(AgentDefaults::default().check().is_empty());
        assert!(ReconcileConfig::default().check().is_empty());
    }

    #[test]
    fn the_model_credential_is_never_forwarded_nor_passed_to_claude_code() {
        assert!(AgentDefaults::default().forward_env.is_empty(), "no credential forwarded by default");
        let defaults = AgentDefaults {
            forward_env: vec!["HTTPS_PROXY".into(), "ANTHROPIC_API_KEY".into(), "CLAUDE_CODE_OAUTH_TOKEN".into()],
            ..AgentDefaults::default()
        };
        let refused: Vec<String> = defaults.check().into_iter().map(|v| format!("{}: {}", v.field, v.value)).collect();
        assert_eq!(refused, ["forward_env: \"ANTHROPIC_API_KEY\"", "forward_env: \"CLAUDE_CODE_OAUTH_TOKEN\""]);
        assert!(defaults.check()[0].allowed.contains("[model]"));
    }

    #[test]
    fn the_sections_read_durations_as_seconds_and_refuse_unknown_keys() {
        let reconcile: ReconcileConfig = serde_json::from_value(serde_json::json!({
            "interval_secs": 3, "restart_backoff": { "max_secs": 60 }
        }))
        .expect("parses");
        assert_eq!(reconcile.interval, Duration::from_secs(3));
        assert_eq!(reconcile.restart_backoff.max, Duration::from_secs(60));
        assert_eq!(reconcile.restart_backoff.initial, Backoff::default().initial);
        let unknown = serde_json::from_value::<AgentDefaults>(serde_json::json!({ "memroy_mb": 1 }));
        assert!(unknown.expect_err("unknown key").to_string().contains("memroy_mb"));
    }
}
