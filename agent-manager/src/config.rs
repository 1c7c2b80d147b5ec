//! The manager's settings.

use std::time::Duration;

use backend_core::NetworkPolicy;

use crate::model::{AgentKind, AgentSpec, ApprovalPolicy, NewAgent, RestartPolicy, UnhealthyAction, PERMISSION_MODES};
use crate::{Backoff, ManagerError};

/// Defaults for fields a [`NewAgent`] leaves unset.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentDefaults {
    pub kind: AgentKind,
    pub image: String,
    pub memory_mb: Option<u64>,
    pub cpus: Option<f64>,
    pub pids_limit: Option<i64>,
    pub network: NetworkPolicy,
    pub restart: RestartPolicy,
    pub on_unhealthy: UnhealthyAction,
    pub stop_grace_secs: u64,
    pub read_only_rootfs: bool,
    pub approvals: ApprovalPolicy,
    pub permission_mode: Option<String>,
    pub max_turns: Option<u32>,
    pub max_budget_usd: Option<f64>,
}

impl Default for AgentDefaults {
    fn default() -> Self {
        Self {
            kind: AgentKind::ClaudeCode,
            image: "agentd-claude:latest".into(),
            memory_mb: Some(2048),
            cpus: Some(2.0),
            pids_limit: Some(512),
            network: NetworkPolicy::Internet,
            restart: RestartPolicy::Never,
            on_unhealthy: UnhealthyAction::Record,
            stop_grace_secs: 10,
            read_only_rootfs: false,
            approvals: ApprovalPolicy::Ask,
            permission_mode: None,
            max_turns: None,
            max_budget_usd: None,
        }
    }
}

/// The longest stop grace period an agent may ask for.
pub const MAX_STOP_GRACE_SECS: u64 = 3600;

impl AgentDefaults {
    /// Fills the unset fields of `new` and checks every value; errors name the field.
    pub fn resolve(&self, new: NewAgent) -> Result<AgentSpec, ManagerError> {
        fn invalid<T>(field: &'static str, message: String) -> Result<T, ManagerError> {
            Err(ManagerError::Invalid { field, message })
        }
        crate::model::validate_name(&new.name).or_else(|m| invalid("name", m))?;
        let spec = AgentSpec {
            kind: new.kind.unwrap_or(self.kind),
            image: new.image.unwrap_or_else(|| self.image.clone()),
            command: new.command,
            env: new.env,
            workdir: new.workdir,
            memory_mb: new.memory_mb.or(self.memory_mb),
            cpus: new.cpus.or(self.cpus),
            pids_limit: new.pids_limit.or(self.pids_limit),
            network: new.network.unwrap_or(self.network),
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
        };
        // The Claude Code defaults apply to Claude Code agents only.
        let mut spec = spec;
        if spec.kind == AgentKind::ClaudeCode {
            spec.permission_mode = spec.permission_mode.or_else(|| self.permission_mode.clone());
            spec.max_turns = spec.max_turns.or(self.max_turns);
            spec.max_budget_usd = spec.max_budget_usd.or(self.max_budget_usd);
        }
        check_claude_options(&spec)?;
        if spec.image.trim().is_empty() || spec.image.contains(char::is_whitespace) {
            return invalid("image", format!("{:?} is not an image reference", spec.image));
        }
        if let Some(command) = &spec.command {
            if command.is_empty() || command[0].is_empty() {
                return invalid("command", "must name a program; leave it out to run the image's entrypoint".into());
            }
            if spec.kind == AgentKind::ClaudeCode {
                return invalid(
                    "command",
                    "kind claude-code runs the Claude Code CLI; use kind \"image\" to run a command".into(),
                );
            }
        }
        for key in spec.env.keys() {
            let ok = !key.is_empty()
                && !key.starts_with(|c: char| c.is_ascii_digit())
                && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !ok {
                return invalid("env", format!("{key:?} is not a valid variable name ([A-Za-z_][A-Za-z0-9_]*)"));
            }
            if key.starts_with("AGENTD_") {
                return invalid("env", format!("{key} is reserved: agentd sets AGENTD_* variables itself"));
            }
        }
        if let Some(dir) = &spec.workdir {
            if !dir.is_absolute() {
                return invalid("workdir", format!("{} must be an absolute path", dir.display()));
            }
        }
        if let Some(mb) = spec.memory_mb {
            if mb < 6 {
                return invalid("memory_mb", format!("{mb} MiB is below the 6 MiB engines accept"));
            }
        }
        if let Some(cpus) = spec.cpus {
            if !(cpus.is_finite() && cpus > 0.0 && cpus <= 1024.0) {
                return invalid("cpus", format!("{cpus} must be a number of cores above 0 and at most 1024"));
            }
        }
        if let Some(pids) = spec.pids_limit {
            if pids < 1 {
                return invalid("pids_limit", format!("{pids} must be at least 1"));
            }
        }
        if spec.stop_grace_secs > MAX_STOP_GRACE_SECS {
            return invalid(
                "stop_grace_secs",
                format!("{} is above the {MAX_STOP_GRACE_SECS} s maximum", spec.stop_grace_secs),
            );
        }
        if spec.kind == AgentKind::ClaudeCode && spec.network == NetworkPolicy::None {
            return invalid(
                "network",
                "kind claude-code needs to reach its model API, which network \"none\" cannot".into(),
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
}

/// Checks the options only Claude Code takes.
pub(crate) fn check_claude_options(spec: &AgentSpec) -> Result<(), ManagerError> {
    let invalid = |field: &'static str, message: String| Err(ManagerError::Invalid { field, message });
    if let Some(mode) = &spec.permission_mode {
        if !PERMISSION_MODES.contains(&mode.as_str()) {
            return invalid(
                "permission_mode",
                format!("{mode:?} is not a Claude Code permission mode; use one of: {}", PERMISSION_MODES.join(", ")),
            );
        }
    }
    if spec.max_turns == Some(0) {
        return invalid("max_turns", "must be at least 1; leave it out for no limit".into());
    }
    if let Some(budget) = spec.max_budget_usd {
        if !(budget.is_finite() && budget > 0.0) {
            return invalid("max_budget_usd", format!("{budget} must be a positive number of US dollars"));
        }
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
    Ok(())
}

/// When and how reconcile acts.
#[derive(Debug, Clone, PartialEq)]
pub struct ReconcileConfig {
    /// Time between periodic relists.
    pub interval: Duration,
    /// An orphaned session younger than this is left alone.
    pub orphan_grace: Duration,
    /// Report orphans without removing them.
    pub orphan_dry_run: bool,
    /// How long an agent whose `on_unhealthy` is `restart` may stay unhealthy.
    pub unhealthy_grace: Duration,
    /// How long a pending tool-permission request waits for a decision before it is
    /// denied.
    pub approval_timeout: Duration,
    /// How long a busy turn may go without output before it is interrupted.
    pub turn_idle_timeout: Duration,
    /// How long an interrupted turn may take to end before the agent is restarted.
    pub interrupt_grace: Duration,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(10),
            orphan_grace: Duration::from_secs(300),
            orphan_dry_run: false,
            unhealthy_grace: Duration::from_secs(30),
            approval_timeout: Duration::from_secs(900),
            turn_idle_timeout: Duration::from_secs(600),
            interrupt_grace: Duration::from_secs(30),
        }
    }
}

/// Everything the manager needs to know besides its backend and store.
#[derive(Debug, Clone, PartialEq)]
pub struct ManagerConfig {
    pub defaults: AgentDefaults,
    pub reconcile: ReconcileConfig,
    pub backoff: Backoff,
    /// Variables copied from the daemon's environment into every agent's, when set
    /// there and not set by the agent's own env (API keys).
    pub forward_env: Vec<String>,
    /// How many agents shutdown stops at once.
    pub shutdown_concurrency: usize,
    /// Stored lifecycle events older than this are deleted (at start and hourly);
    /// `None` keeps them forever.
    pub events_retention: Option<Duration>,
}

/// How long lifecycle events are kept by default: 30 days.
pub const DEFAULT_EVENTS_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            defaults: AgentDefaults::default(),
            reconcile: ReconcileConfig::default(),
            backoff: Backoff::default(),
            forward_env: vec!["ANTHROPIC_API_KEY".into(), "CLAUDE_CODE_OAUTH_TOKEN".into()],
            shutdown_concurrency: 256,
            events_retention: Some(DEFAULT_EVENTS_RETENTION),
        }
    }
}
