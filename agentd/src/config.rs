//! The daemon's configuration: figment layers, validation that names the offending key
//! and where it came from, and `config show`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use agent_manager::{AgentDefaults, AgentKind, ManagerConfig, ReconcileConfig, RestartPolicy, UnhealthyAction};
use backend_core::NetworkPolicy;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::Value;
use figment::{Figment, Metadata, Source};
use serde::{Deserialize, Serialize};

/// Which engine runs the agents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// The first engine that answers: Docker, then Podman.
    Auto,
    Docker,
    Podman,
    /// The in-memory engine (for trying the API; nothing really runs).
    Mock,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

/// The whole configuration. Every key is optional; see `docs/configuration.md`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub backend: BackendChoice,
    pub instance_id: Option<String>,
    pub server: ServerConfig,
    pub store: StoreConfig,
    pub docker: SocketConfig,
    pub podman: SocketConfig,
    pub agents: AgentsConfig,
    pub reconcile: ReconcileSection,
    pub shutdown: ShutdownConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address of the HTTP API.
    pub listen: SocketAddr,
    /// Bearer token for `/v1/*` and `/metrics`.
    pub token: Option<String>,
    /// A file holding the token (first line).
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// The SQLite file; default `$XDG_DATA_HOME/agentd/agentd.db`.
    pub path: Option<PathBuf>,
    /// Lifecycle events older than this many days are deleted; 0 keeps them forever.
    pub events_retention_days: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        let days = agent_manager::DEFAULT_EVENTS_RETENTION.as_secs() / 86_400;
        Self { path: None, events_retention_days: days }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SocketConfig {
    /// The engine's socket, `unix:///...`.
    pub socket: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentsConfig {
    pub prefix: String,
    pub kind: AgentKind,
    pub image: String,
    pub memory_mb: u64,
    pub cpus: f64,
    pub pids_limit: i64,
    pub network: NetworkPolicy,
    pub restart: RestartPolicy,
    pub on_unhealthy: UnhealthyAction,
    pub stop_grace_secs: u64,
    pub read_only_rootfs: bool,
    /// Daemon environment variables copied into every agent (API keys).
    pub forward_env: Vec<String>,
    /// How claude-code tool-permission requests are answered: ask, allow or deny.
    pub approvals: agent_manager::ApprovalPolicy,
    /// Claude Code's `--permission-mode`; unset keeps the CLI's default.
    pub permission_mode: Option<String>,
    /// How long a pending tool-permission request waits before it is denied.
    pub approval_timeout_secs: u64,
    /// How long a busy turn may write nothing before it is interrupted.
    pub turn_idle_timeout_secs: u64,
    /// Claude Code's `--max-turns`.
    pub max_turns: Option<u32>,
    /// Claude Code's `--max-budget-usd`.
    pub max_budget_usd: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReconcileSection {
    pub interval_secs: u64,
    pub orphan_grace_secs: u64,
    pub orphan_dry_run: bool,
    pub unhealthy_grace_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownConfig {
    /// Leave agents running at shutdown; the next start adopts them.
    pub leave_running: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter (`info`, `agentd=debug,info`); `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            backend: BackendChoice::Auto,
            instance_id: None,
            server: ServerConfig::default(),
            store: StoreConfig::default(),
            docker: SocketConfig::default(),
            podman: SocketConfig::default(),
            agents: AgentsConfig::default(),
            reconcile: ReconcileSection::default(),
            shutdown: ShutdownConfig::default(),
            log: LogConfig::default(),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self { listen: SocketAddr::from(([127, 0, 0, 1], 7006)), token: None, token_file: None }
    }
}

impl Default for AgentsConfig {
    fn default() -> Self {
        let d = AgentDefaults::default();
        Self {
            prefix: "agentd".into(),
            kind: d.kind,
            image: d.image,
            memory_mb: 2048,
            cpus: 2.0,
            pids_limit: 512,
            network: d.network,
            restart: d.restart,
            on_unhealthy: d.on_unhealthy,
            stop_grace_secs: d.stop_grace_secs,
            read_only_rootfs: false,
            forward_env: ManagerConfig::default().forward_env,
            approvals: d.approvals,
            permission_mode: None,
            approval_timeout_secs: 900,
            turn_idle_timeout_secs: 600,
            max_turns: None,
            max_budget_usd: None,
        }
    }
}

impl Default for ReconcileSection {
    fn default() -> Self {
        Self { interval_secs: 10, orphan_grace_secs: 300, orphan_dry_run: false, unhealthy_grace_secs: 30 }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { format: LogFormat::Pretty, level: "info".into() }
    }
}

/// A configuration problem: what, where it came from, what is allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub Vec<String>);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "invalid configuration:")?;
        for problem in &self.0 {
            writeln!(f, "  - {problem}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Environment variables with the `AGENTD_` prefix that are not configuration keys:
/// the client's and the agents' own.
const NOT_CONFIG: &[&str] = &["url", "token", "ws_url", "agent_token", "agent_id", "agent_name"];

/// Where the layers come from; tests point these at temporary files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sources {
    pub system: PathBuf,
    pub user: Option<PathBuf>,
    pub explicit: Option<PathBuf>,
}

impl Sources {
    /// The standard layers: `/etc/agentd/agentd.toml`,
    /// `$XDG_CONFIG_HOME/agentd/agentd.toml` (or `~/.config/...`), and `--config FILE`.
    pub fn standard(explicit: Option<PathBuf>) -> Self {
        let user = std::env::var_os("XDG_CONFIG_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
            .map(|dir| dir.join("agentd/agentd.toml"));
        Self { system: PathBuf::from("/etc/agentd/agentd.toml"), user, explicit }
    }
}

/// The figment of all layers, later wins: defaults < system file < user file <
/// `--config` file < environment.
pub fn figment(sources: &Sources) -> Result<Figment, ConfigError> {
    let mut figment = Figment::from(Serialized::defaults(Config::default()))
        .merge(Toml::file(&sources.system))
        .merge(Toml::file(sources.user.clone().unwrap_or_default()));
    if let Some(path) = &sources.explicit {
        if !path.is_file() {
            return Err(ConfigError(vec![format!(
                "--config {}: no such file (leave --config out to use the default locations)",
                path.display()
            )]));
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    let env = Env::prefixed("AGENTD_").ignore(NOT_CONFIG).map(|key| {
        // The change request's variable keeps working.
        if key == "shutdown_leave_running" {
            "shutdown.leave_running".into()
        } else {
            key.as_str().replace("__", ".").into()
        }
    });
    Ok(figment.merge(env))
}

/// Loads and validates the configuration.
pub fn load(sources: &Sources) -> Result<Config, ConfigError> {
    let figment = figment(sources)?;
    let config: Config = figment.extract().map_err(|e| from_figment(&figment, e))?;
    config.validate(&figment)?;
    Ok(config)
}

fn from_figment(figment: &Figment, error: figment::Error) -> ConfigError {
    let problems = error
        .into_iter()
        .map(|e| {
            let mut path = e.path.clone();
            if let figment::error::Kind::UnknownField(field, _) = &e.kind {
                if path.last() != Some(field) {
                    path.push(field.clone());
                }
            }
            let key = path.join(".");
            let source = source_of(figment, e.metadata.as_ref(), &key);
            let what = match &e.kind {
                figment::error::Kind::UnknownField(field, expected) => {
                    format!("unknown key {field:?}; allowed here: {}", expected.join(", "))
                }
                other => other.to_string(),
            };
            if key.is_empty() {
                format!("{what} (from {source})")
            } else {
                format!("{key}: {what} (from {source})")
            }
        })
        .collect();
    ConfigError(problems)
}

/// Where a key's value came from, in words: `default`, a file path, or an environment
/// variable name.
fn source_of(figment: &Figment, metadata: Option<&Metadata>, key: &str) -> String {
    let metadata = metadata.or_else(|| figment.find_metadata(key));
    match metadata {
        None => "an unknown source".into(),
        Some(md) => match &md.source {
            Some(Source::File(path)) => path.display().to_string(),
            Some(Source::Code(_)) => "default".into(),
            _ if md.name.contains("environment") => env_var_for(key),
            _ => md.name.to_string(),
        },
    }
}

fn env_var_for(key: &str) -> String {
    if key == "shutdown.leave_running" && std::env::var_os("AGENTD_SHUTDOWN_LEAVE_RUNNING").is_some() {
        return "environment variable AGENTD_SHUTDOWN_LEAVE_RUNNING".into();
    }
    format!("environment variable AGENTD_{}", key.replace('.', "__").to_ascii_uppercase())
}

impl Config {
    /// Checks values no type can rule out; every problem names its key, value and source.
    pub fn validate(&self, figment: &Figment) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut bad = |key: &str, value: String, allowed: &str| {
            let source = source_of(figment, None, key);
            problems.push(format!("{key} = {value} (from {source}): {allowed}"));
        };
        if let Some(id) = &self.instance_id {
            if backend_core::OwnershipLabels::new("agentd", id.clone()).is_err() {
                bad("instance_id", format!("{id:?}"), "use 1 to 63 characters from [A-Za-z0-9_.-]");
            }
        }
        if self.server.token.is_some() && self.server.token_file.is_some() {
            bad("server.token_file", "set".into(), "set either server.token or server.token_file, not both");
        }
        if let Some(token) = &self.server.token {
            if token.trim() != token {
                bad("server.token", "<redacted>".into(), "remove the spaces around the token");
            } else if token.chars().count() < 16 {
                bad("server.token", "<redacted>".into(), "a token must be at least 16 characters");
            }
        }
        if let Some(path) = &self.server.token_file {
            match std::fs::read_to_string(path) {
                Ok(text) if text.lines().next().is_some_and(|l| l.trim().chars().count() >= 16) => {}
                Ok(_) => bad(
                    "server.token_file",
                    path.display().to_string(),
                    "the file's first line must hold a token of at least 16 characters",
                ),
                Err(e) => bad("server.token_file", path.display().to_string(), &format!("cannot be read: {e}")),
            }
        }
        if !self.server.listen.ip().is_loopback() && self.server.token.is_none() && self.server.token_file.is_none() {
            bad(
                "server.listen",
                self.server.listen.to_string(),
                "a non-loopback address needs server.token or server.token_file (or listen on 127.0.0.1)",
            );
        }
        for (key, socket) in [("docker.socket", &self.docker.socket), ("podman.socket", &self.podman.socket)] {
            if let Some(s) = socket {
                if !(s.starts_with("unix://") || s.starts_with("tcp://") || s.starts_with("http://")) {
                    bad(key, format!("{s:?}"), "use unix:///path/to.sock or tcp://host:port");
                }
            }
        }
        let a = &self.agents;
        let prefix_ok = backend_core::OwnershipLabels::new(a.prefix.clone(), "x").is_ok()
            && a.prefix.len() <= 30
            && a.prefix.starts_with(|c: char| c.is_ascii_alphanumeric());
        if !prefix_ok {
            bad(
                "agents.prefix",
                format!("{:?}", a.prefix),
                "use 1 to 30 characters from [A-Za-z0-9_.-], starting with a letter or digit (it starts container names)",
            );
        }
        for name in &a.forward_env {
            let valid = !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !valid || name.starts_with("AGENTD_") {
                bad(
                    "agents.forward_env",
                    format!("{name:?}"),
                    "names of the daemon's variables to copy into agents ([A-Za-z_][A-Za-z0-9_]*), never AGENTD_*",
                );
            }
        }
        if a.image.trim().is_empty() || a.image.contains(char::is_whitespace) {
            bad("agents.image", format!("{:?}", a.image), "an image reference such as agentd-echo:latest");
        }
        if a.memory_mb < 6 {
            bad("agents.memory_mb", a.memory_mb.to_string(), "at least 6 (MiB)");
        }
        if !(a.cpus.is_finite() && a.cpus > 0.0 && a.cpus <= 1024.0) {
            bad("agents.cpus", a.cpus.to_string(), "a number of cores above 0 and at most 1024, such as 0.5 or 2");
        }
        if a.pids_limit < 1 {
            bad("agents.pids_limit", a.pids_limit.to_string(), "at least 1");
        }
        if let Some(mode) = &a.permission_mode {
            if !agent_manager::PERMISSION_MODES.contains(&mode.as_str()) {
                bad(
                    "agents.permission_mode",
                    format!("{mode:?}"),
                    &format!("one of Claude Code's modes: {}", agent_manager::PERMISSION_MODES.join(", ")),
                );
            }
        }
        if !(1..=86_400).contains(&a.approval_timeout_secs) {
            bad("agents.approval_timeout_secs", a.approval_timeout_secs.to_string(), "1 to 86400 (seconds)");
        }
        if !(1..=86_400).contains(&a.turn_idle_timeout_secs) {
            bad("agents.turn_idle_timeout_secs", a.turn_idle_timeout_secs.to_string(), "1 to 86400 (seconds)");
        }
        if a.max_turns == Some(0) {
            bad("agents.max_turns", "0".into(), "at least 1, or leave it unset for no limit");
        }
        if let Some(budget) = a.max_budget_usd {
            if !(budget.is_finite() && budget > 0.0) {
                bad("agents.max_budget_usd", budget.to_string(), "a positive number of US dollars, or unset");
            }
        }
        if a.stop_grace_secs > agent_manager::MAX_STOP_GRACE_SECS {
            bad("agents.stop_grace_secs", a.stop_grace_secs.to_string(), "at most 3600");
        }
        if a.network == NetworkPolicy::Host && self.server.token.is_none() && self.server.token_file.is_none() {
            bad(
                "agents.network",
                "\"host\"".into(),
                "host-network agents reach the API on loopback: set server.token (or token_file) first",
            );
        }
        if a.kind == AgentKind::ClaudeCode && a.network == NetworkPolicy::None {
            bad(
                "agents.network",
                "\"none\"".into(),
                "kind claude-code needs to reach its model API; use internet, isolated or host",
            );
        }
        let r = &self.reconcile;
        if r.interval_secs == 0 {
            bad("reconcile.interval_secs", "0".into(), "at least 1 (seconds)");
        }
        if self.log.level.parse::<tracing_subscriber::EnvFilter>().is_err() {
            bad("log.level", format!("{:?}", self.log.level), "a tracing filter such as info or agentd=debug,info");
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError(problems))
        }
    }

    /// The bearer token, from `token` or `token_file`.
    pub fn token(&self) -> Option<String> {
        self.server.token.as_ref().map(|t| t.trim().to_owned()).or_else(|| {
            let path = self.server.token_file.as_ref()?;
            let text = std::fs::read_to_string(path).ok()?;
            text.lines().next().map(|l| l.trim().to_owned())
        })
    }

    /// The database file.
    pub fn store_path(&self) -> PathBuf {
        if let Some(path) = &self.store.path {
            return path.clone();
        }
        std::env::var_os("XDG_DATA_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
            .map(|dir| dir.join("agentd/agentd.db"))
            .unwrap_or_else(|| PathBuf::from("/var/lib/agentd/agentd.db"))
    }

    /// The manager's settings from this configuration.
    pub fn manager_config(&self) -> ManagerConfig {
        let a = &self.agents;
        let r = &self.reconcile;
        let secs = std::time::Duration::from_secs;
        ManagerConfig {
            defaults: AgentDefaults {
                kind: a.kind,
                image: a.image.clone(),
                memory_mb: Some(a.memory_mb),
                cpus: Some(a.cpus),
                pids_limit: Some(a.pids_limit),
                network: a.network,
                restart: a.restart,
                on_unhealthy: a.on_unhealthy,
                stop_grace_secs: a.stop_grace_secs,
                read_only_rootfs: a.read_only_rootfs,
                approvals: a.approvals,
                permission_mode: a.permission_mode.clone(),
                max_turns: a.max_turns,
                max_budget_usd: a.max_budget_usd,
            },
            reconcile: ReconcileConfig {
                interval: secs(r.interval_secs),
                orphan_grace: secs(r.orphan_grace_secs),
                orphan_dry_run: r.orphan_dry_run,
                unhealthy_grace: secs(r.unhealthy_grace_secs),
                approval_timeout: secs(a.approval_timeout_secs),
                turn_idle_timeout: secs(a.turn_idle_timeout_secs),
                ..ReconcileConfig::default()
            },
            forward_env: a.forward_env.clone(),
            events_retention: match self.store.events_retention_days {
                0 => None,
                days => Some(secs(days.saturating_mul(86_400))),
            },
            ..ManagerConfig::default()
        }
    }
}

/// The effective configuration, one `key = value  # source` line per setting, secrets
/// redacted.
pub fn show(sources: &Sources) -> Result<String, ConfigError> {
    let figment = figment(sources)?;
    let config: Config = figment.extract().map_err(|e| from_figment(&figment, e))?;
    let value = Value::serialize(&config).map_err(|e| ConfigError(vec![e.to_string()]))?;
    let mut lines = Vec::new();
    leaves(&value, String::new(), &mut lines);
    let width = lines.iter().map(|(k, v)| k.len() + v.len() + 3).max().unwrap_or(0);
    let mut out = String::new();
    for (key, shown) in lines {
        let shown = if key == "server.token" && shown != "(unset)" { "\"<redacted>\"".to_owned() } else { shown };
        let line = format!("{key} = {shown}");
        let _ = writeln!(out, "{line:<width$}  # {}", source_of(&figment, None, &key));
    }
    Ok(out)
}

fn leaves(value: &Value, prefix: String, out: &mut Vec<(String, String)>) {
    match value {
        Value::Dict(_, dict) => {
            for (k, v) in dict {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                leaves(v, key, out);
            }
        }
        other => {
            let shown = match other {
                Value::Empty(..) => "(unset)".to_owned(),
                Value::String(_, s) => format!("{s:?}"),
                Value::Array(_, items) => {
                    let items: Vec<String> = items
                        .iter()
                        .map(|i| i.as_str().map_or_else(|| format!("{i:?}"), |s| format!("{s:?}")))
                        .collect();
                    format!("[{}]", items.join(", "))
                }
                Value::Bool(_, b) => b.to_string(),
                Value::Num(_, n) => match (n.to_u128(), n.to_i128(), n.to_f64()) {
                    (Some(u), _, _) => u.to_string(),
                    (_, Some(i), _) => i.to_string(),
                    (_, _, Some(f)) => f.to_string(),
                    _ => format!("{n:?}"),
                },
                Value::Char(_, c) => format!("{c:?}"),
                Value::Dict(..) => "{...}".to_owned(),
            };
            out.push((prefix, shown));
        }
    }
}

/// The explicit config file path of a command line, for error messages.
pub fn describe(path: Option<&Path>) -> String {
    path.map_or_else(|| "the default locations".to_owned(), |p| p.display().to_string())
}
