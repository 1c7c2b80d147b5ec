//! The daemon's configuration: figment layers, validation that names the offending key
//! and where it came from, and `config show`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use agent_manager::{AgentDefaults, ManagerConfig, ProtectedPath, ReconcileConfig};
use backend_core::{BackendFactory, NetworkPolicy, Section};
use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Value};
use figment::{Figment, Metadata, Source};
use serde::{Deserialize, Serialize};

use crate::backends::{self, AUTO};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

/// The whole configuration. Every key is optional; see `docs/configuration.md`.
///
/// The top level allows these fields and one section per registered backend
/// ([`crate::backends::BACKENDS`]), named as the backend; the sections are kept in
/// [`Config::backends`] for their factories, which own their keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// `auto` or the name of a registered backend.
    pub backend: String,
    pub instance_id: Option<String>,
    pub server: ServerConfig,
    pub store: StoreConfig,
    /// `[gateway]`: what agentd serves to its containers.
    pub gateway: GatewayConfig,
    /// `[model]`: where the model gateway forwards to, with which credential, within which
    /// limits.
    pub model: ModelConfig,
    /// `[firewall]`: the host firewall rules that confine `isolated` agents.
    pub firewall: FirewallConfig,
    /// `[agents]`: the manager's own type.
    pub agents: AgentDefaults,
    /// `[reconcile]`: the manager's own type.
    pub reconcile: ReconcileConfig,
    pub shutdown: ShutdownConfig,
    pub log: LogConfig,
    /// Each registered backend's section, with every key (defaults filled in by its
    /// factory), by backend name.
    #[serde(skip)]
    pub backends: BTreeMap<String, Section>,
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
    /// Connections to the API open at once, from everyone.
    pub max_connections: usize,
    /// Connections to the API open at once from one address.
    pub max_connections_per_peer: usize,
    /// Seconds a connection may take to send a whole request head (also the keep-alive
    /// idle limit between requests).
    pub header_timeout_secs: u64,
    /// Seconds a connection with no request in flight may move no byte.
    pub idle_timeout_secs: u64,
    /// The most KiB of a request head.
    pub max_header_kib: usize,
    /// The most MiB of a request body.
    pub max_request_body_mb: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// The SQLite file; default `$XDG_DATA_HOME/agentd/agentd.db`, as root without
    /// `XDG_DATA_HOME` `/var/lib/agentd/agentd.db`, else `~/.local/share/agentd/agentd.db`.
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

/// `[gateway]`: the listeners agentd serves on the engine networks' gateway addresses (the
/// host's address on each network its containers join), never on the API's address.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    /// The model gateway's port (Anthropic Messages API, authenticated per agent).
    pub port: u16,
    /// The egress proxy's port (HTTP CONNECT, checked against each agent's allow-list).
    pub proxy_port: u16,
    /// Connections open at once to one gateway listener, from everyone.
    pub max_connections: usize,
    /// Connections open at once to one gateway listener from one address (a container).
    pub max_connections_per_peer: usize,
    /// Seconds a connection may take to send a whole request head (also the keep-alive
    /// idle limit between requests): half-sent headers are closed after it.
    pub header_timeout_secs: u64,
    /// Seconds a connection with no request in flight (a tunnel, for one) may move no
    /// byte before it is closed.
    pub idle_timeout_secs: u64,
    /// The most KiB of a request head (start line and headers).
    pub max_header_kib: usize,
    /// The most MiB of a request body (a model request).
    pub max_request_body_mb: u64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        let l = crate::listen::ConnLimits::GATEWAY;
        Self {
            port: 7007,
            proxy_port: 7008,
            max_connections: l.max_connections,
            max_connections_per_peer: l.max_connections_per_peer,
            header_timeout_secs: l.header_timeout.as_secs(),
            idle_timeout_secs: l.idle_timeout.as_secs(),
            max_header_kib: l.max_header_bytes / 1024,
            max_request_body_mb: l.max_request_body_bytes.unwrap_or(0) / (1024 * 1024),
        }
    }
}

impl GatewayConfig {
    /// The limits each gateway listener is served within.
    pub fn limits(&self) -> crate::listen::ConnLimits {
        self.limit_keys().limits(crate::listen::ConnLimits::GATEWAY)
    }

    fn limit_keys(&self) -> LimitKeys {
        LimitKeys {
            max_connections: self.max_connections,
            max_connections_per_peer: self.max_connections_per_peer,
            header_timeout_secs: self.header_timeout_secs,
            idle_timeout_secs: self.idle_timeout_secs,
            max_header_kib: self.max_header_kib,
            max_request_body_mb: self.max_request_body_mb,
        }
    }
}

impl ServerConfig {
    /// The limits the API is served within.
    pub fn limits(&self) -> crate::listen::ConnLimits {
        self.limit_keys().limits(crate::listen::ConnLimits::API)
    }

    fn limit_keys(&self) -> LimitKeys {
        LimitKeys {
            max_connections: self.max_connections,
            max_connections_per_peer: self.max_connections_per_peer,
            header_timeout_secs: self.header_timeout_secs,
            idle_timeout_secs: self.idle_timeout_secs,
            max_header_kib: self.max_header_kib,
            max_request_body_mb: self.max_request_body_mb,
        }
    }
}

/// The connection limit keys `[server]` and `[gateway]` both have (each section keeps its
/// own fields, so that unknown keys stay errors).
#[derive(Debug, Clone, Copy)]
struct LimitKeys {
    max_connections: usize,
    max_connections_per_peer: usize,
    header_timeout_secs: u64,
    idle_timeout_secs: u64,
    max_header_kib: usize,
    max_request_body_mb: u64,
}

impl LimitKeys {
    /// The limits these keys set; what no key sets comes from `base`.
    fn limits(self, base: crate::listen::ConnLimits) -> crate::listen::ConnLimits {
        crate::listen::ConnLimits {
            max_connections: self.max_connections,
            max_connections_per_peer: self.max_connections_per_peer,
            header_timeout: std::time::Duration::from_secs(self.header_timeout_secs),
            idle_timeout: std::time::Duration::from_secs(self.idle_timeout_secs),
            max_header_bytes: self.max_header_kib.saturating_mul(1024),
            max_request_body_bytes: Some(self.max_request_body_mb.saturating_mul(1024 * 1024)),
            shutdown_grace: base.shutdown_grace,
        }
    }

    /// The checks of one section's limit keys (`section` is `server` or `gateway`).
    fn check(self, section: &str, bad: &mut dyn FnMut(&str, String, &str)) {
        let key = |k: &str| format!("{section}.{k}");
        let LimitKeys {
            max_connections,
            max_connections_per_peer,
            header_timeout_secs,
            idle_timeout_secs,
            max_header_kib,
            max_request_body_mb,
        } = self;
        if !(1..=1_000_000).contains(&max_connections) {
            bad(&key("max_connections"), max_connections.to_string(), "from 1 to 1000000");
        }
        if max_connections_per_peer == 0 || max_connections_per_peer > max_connections {
            bad(
                &key("max_connections_per_peer"),
                max_connections_per_peer.to_string(),
                &format!("from 1 to {section}.max_connections ({max_connections})"),
            );
        }
        if !(1..=3600).contains(&header_timeout_secs) {
            bad(&key("header_timeout_secs"), header_timeout_secs.to_string(), "from 1 to 3600 seconds");
        }
        if !(1..=86_400).contains(&idle_timeout_secs) {
            bad(&key("idle_timeout_secs"), idle_timeout_secs.to_string(), "from 1 to 86400 seconds");
        }
        if !(8..=1024).contains(&max_header_kib) {
            bad(&key("max_header_kib"), max_header_kib.to_string(), "from 8 to 1024 KiB");
        }
        if !(1..=4096).contains(&max_request_body_mb) {
            bad(&key("max_request_body_mb"), max_request_body_mb.to_string(), "from 1 to 4096 MiB");
        }
    }
}

/// `[model]`: the upstream model API, the daemon's credential for it, and the default
/// limits of each agent's use of it (a spawn may set its own).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Where the gateway forwards model requests (`https://api.anthropic.com`).
    pub upstream: String,
    /// A file whose first line is the API key (sent upstream as `x-api-key`). When unset,
    /// the daemon's `ANTHROPIC_API_KEY`, else its `CLAUDE_CODE_OAUTH_TOKEN` (sent as a
    /// bearer token).
    pub api_key_file: Option<PathBuf>,
    /// Model requests an agent may start per minute; unset: no limit.
    pub requests_per_minute: Option<u32>,
    /// Model requests an agent may have in flight at once; unset: no limit.
    pub max_concurrent_requests: Option<u32>,
    /// Output tokens an agent may use per UTC day; unset: no limit.
    pub max_output_tokens_per_day: Option<u64>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            upstream: "https://api.anthropic.com".into(),
            api_key_file: None,
            requests_per_minute: None,
            max_concurrent_requests: None,
            max_output_tokens_per_day: None,
        }
    }
}

/// `[firewall]`: how agentd installs the host firewall rules that let containers on the
/// isolated network reach only its gateway ports (see docs/security.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FirewallConfig {
    /// The `iptables` program (a name looked up on `PATH`, or a path).
    pub iptables_command: String,
    /// The `ip6tables` program, used when this host has IPv6.
    pub ip6tables_command: String,
    /// How long one run of either may take, in seconds.
    pub command_timeout_secs: u64,
}

impl Default for FirewallConfig {
    fn default() -> Self {
        Self { iptables_command: "iptables".into(), ip6tables_command: "ip6tables".into(), command_timeout_secs: 10 }
    }
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
            backend: AUTO.into(),
            instance_id: None,
            server: ServerConfig::default(),
            store: StoreConfig::default(),
            gateway: GatewayConfig::default(),
            model: ModelConfig::default(),
            firewall: FirewallConfig::default(),
            agents: AgentDefaults::default(),
            reconcile: ReconcileConfig::default(),
            shutdown: ShutdownConfig::default(),
            log: LogConfig::default(),
            backends: BTreeMap::new(),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        let l = crate::listen::ConnLimits::API;
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7006)),
            token: None,
            token_file: None,
            max_connections: l.max_connections,
            max_connections_per_peer: l.max_connections_per_peer,
            header_timeout_secs: l.header_timeout.as_secs(),
            idle_timeout_secs: l.idle_timeout.as_secs(),
            max_header_kib: l.max_header_bytes / 1024,
            max_request_body_mb: l.max_request_body_bytes.unwrap_or(0) / (1024 * 1024),
        }
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
/// `--config` file < environment. The defaults include every registered backend's
/// section.
pub fn figment(sources: &Sources) -> Result<Figment, ConfigError> {
    figment_with(sources, backends::BACKENDS)
}

/// [`figment`] with the given backend registry.
pub fn figment_with(sources: &Sources, registry: &[&dyn BackendFactory]) -> Result<Figment, ConfigError> {
    let mut figment = Figment::from(Serialized::defaults(Config::default()));
    for factory in registry {
        let defaults = factory.parse(&Section::Null).map_err(|p| {
            ConfigError(vec![format!("backend {}: its default section does not parse: {}", factory.name(), p.message)])
        })?;
        figment = figment.merge(Serialized::default(factory.name(), defaults));
    }
    figment = figment.merge(Toml::file(&sources.system)).merge(Toml::file(sources.user.clone().unwrap_or_default()));
    if let Some(path) = &sources.explicit {
        if path.is_dir() {
            return Err(ConfigError(vec![format!(
                "--config {}: a directory, not a file (give the configuration file itself, such as {}/agentd.toml)",
                path.display(),
                path.display()
            )]));
        }
        if !path.is_file() {
            return Err(ConfigError(vec![format!(
                "--config {}: no such file (leave --config out to use the default locations)",
                path.display()
            )]));
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    // The legacy name and the current one may not disagree: which one wins would be a guess.
    let legacy = std::env::var("AGENTD_SHUTDOWN_LEAVE_RUNNING").ok();
    let current = std::env::var("AGENTD_SHUTDOWN__LEAVE_RUNNING").ok();
    if let (Some(legacy), Some(current)) = (&legacy, &current) {
        if legacy.trim() != current.trim() {
            return Err(ConfigError(vec![format!(
                "shutdown.leave_running: AGENTD_SHUTDOWN__LEAVE_RUNNING = {current:?} and the legacy \
                 AGENTD_SHUTDOWN_LEAVE_RUNNING = {legacy:?} disagree; unset the legacy one"
            )]));
        }
    }
    let env = Env::prefixed("AGENTD_").ignore(NOT_CONFIG).map(|key| {
        // `AGENTD_SHUTDOWN_LEAVE_RUNNING` (one underscore) is accepted too, as a legacy name.
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
    load_with(sources, backends::BACKENDS)
}

/// [`load`] with the given backend registry.
pub fn load_with(sources: &Sources, registry: &[&dyn BackendFactory]) -> Result<Config, ConfigError> {
    let figment = figment_with(sources, registry)?;
    let config = extract(&figment, registry)?;
    config.validate(&figment, registry)?;
    Ok(config)
}

/// Step 1: types and keys. The top level is checked here (its fields and one section
/// per registered backend), the sections by their own types: the manager's, and each
/// backend's through its factory.
fn extract(figment: &Figment, registry: &[&dyn BackendFactory]) -> Result<Config, ConfigError> {
    let top: Dict = figment.extract().map_err(|e| from_figment(figment, e))?;
    let own = Value::serialize(Config::default()).ok().and_then(|v| v.into_dict()).unwrap_or_default();
    let allowed: Vec<&str> =
        own.keys().map(String::as_str).chain(registry.iter().map(|f| f.name())).collect::<Vec<_>>();
    for key in top.keys() {
        if !allowed.contains(&key.as_str()) {
            let source = source_of(figment, None, key);
            let mut sorted = allowed.clone();
            sorted.sort_unstable();
            return Err(ConfigError(vec![format!(
                "{key}: unknown key {key:?}; allowed here: {} (from {source})",
                sorted.join(", ")
            )]));
        }
    }
    let mut config: Config = figment.extract().map_err(|e| from_figment(figment, e))?;
    if config.backend != AUTO && !registry.iter().any(|f| f.name() == config.backend) {
        let source = source_of(figment, None, "backend");
        return Err(ConfigError(vec![format!(
            "backend = {:?} (from {source}): unknown backend; use one of: {}",
            config.backend,
            backends::choices(registry).join(", ")
        )]));
    }
    for factory in registry {
        let name = factory.name();
        let raw: Section = match figment.find_value(name) {
            Ok(value) => value.deserialize().map_err(|e| from_figment(figment, e))?,
            Err(_) => Section::Null,
        };
        let section = factory.parse(&raw).map_err(|p| {
            let key = if p.key.is_empty() { name.to_owned() } else { format!("{name}.{}", p.key) };
            let source = source_of(figment, None, &key);
            ConfigError(vec![format!("{key}: {} (from {source})", p.message)])
        })?;
        config.backends.insert(name.to_owned(), section);
    }
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
    pub fn validate(&self, figment: &Figment, registry: &[&dyn BackendFactory]) -> Result<(), ConfigError> {
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
        let g = &self.gateway;
        for (key, port) in [("gateway.port", g.port), ("gateway.proxy_port", g.proxy_port)] {
            if port == 0 {
                bad(key, "0".into(), "a port from 1 to 65535 (containers connect to it)");
            } else if port == self.server.listen.port() {
                bad(key, port.to_string(), "a port other than server.listen's: the API is never served to containers");
            }
        }
        if g.port != 0 && g.port == g.proxy_port {
            bad("gateway.proxy_port", g.proxy_port.to_string(), "a port other than gateway.port");
        }
        self.server.limit_keys().check("server", &mut bad);
        g.limit_keys().check("gateway", &mut bad);
        let m = &self.model;
        let upstream_ok = ["https://", "http://"].iter().any(|scheme| {
            m.upstream.strip_prefix(scheme).is_some_and(|rest| !rest.is_empty() && !rest.contains(char::is_whitespace))
        });
        if !upstream_ok {
            bad(
                "model.upstream",
                format!("{:?}", m.upstream),
                "an http:// or https:// URL such as https://api.anthropic.com",
            );
        }
        if let Some(path) = &m.api_key_file {
            match std::fs::read_to_string(path) {
                Ok(text) if text.lines().next().is_some_and(|l| !l.trim().is_empty()) => {}
                Ok(_) => {
                    bad("model.api_key_file", path.display().to_string(), "the file's first line must hold the API key")
                }
                Err(e) => bad("model.api_key_file", path.display().to_string(), &format!("cannot be read: {e}")),
            }
        }
        if m.requests_per_minute == Some(0) {
            bad("model.requests_per_minute", "0".into(), "at least 1, or leave it unset for no limit");
        }
        if m.max_concurrent_requests == Some(0) {
            bad("model.max_concurrent_requests", "0".into(), "at least 1, or leave it unset for no limit");
        }
        if m.max_output_tokens_per_day == Some(0) {
            bad("model.max_output_tokens_per_day", "0".into(), "at least 1, or leave it unset for no limit");
        }
        let f = &self.firewall;
        for (key, command) in
            [("firewall.iptables_command", &f.iptables_command), ("firewall.ip6tables_command", &f.ip6tables_command)]
        {
            if command.trim().is_empty() || command.contains(char::is_whitespace) {
                bad(key, format!("{command:?}"), "a program name or path, without arguments or spaces");
            }
        }
        if !(1..=300).contains(&f.command_timeout_secs) {
            bad("firewall.command_timeout_secs", f.command_timeout_secs.to_string(), "1 to 300 (seconds)");
        }
        for factory in registry {
            let section = self.backends.get(factory.name()).cloned().unwrap_or(Section::Null);
            for p in factory.check(&section) {
                let key = format!("{}.{}", factory.name(), p.key);
                bad(&key, p.value.unwrap_or_default(), &p.message);
            }
        }
        let a = &self.agents;
        for v in a.check() {
            bad(&format!("agents.{}", v.field), v.value, &v.allowed);
        }
        if a.network == Some(NetworkPolicy::Host) && self.server.token.is_none() && self.server.token_file.is_none() {
            bad(
                "agents.network",
                "\"host\"".into(),
                "host-network agents reach the API on loopback: set server.token (or token_file) first",
            );
        }
        for v in self.reconcile.check() {
            bad(&format!("reconcile.{}", v.field), v.value, &v.allowed);
        }
        if !log_filter_names_levels(&self.log.level) {
            bad(
                "log.level",
                format!("{:?}", self.log.level),
                "a level (trace, debug, info, warn, error, off) or a tracing filter whose every directive names one, \
                 such as info or agentd=debug,info",
            );
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

    /// The database file: `store.path`, else `$XDG_DATA_HOME/agentd/agentd.db`, else (run
    /// as root: a system daemon) `/var/lib/agentd/agentd.db`, else
    /// `$HOME/.local/share/agentd/agentd.db`.
    pub fn store_path(&self) -> PathBuf {
        if let Some(path) = &self.store.path {
            return path.clone();
        }
        default_store_path(
            rustix::process::geteuid().is_root(),
            std::env::var_os("XDG_DATA_HOME"),
            std::env::var_os("HOME"),
        )
    }

    /// The host paths no agent may be given besides the system trees (see
    /// `agent_manager::check_host_dir`): the directory of the engine's socket (`socket`,
    /// the backend's [`backend_core::ExecutionBackend::engine_socket`]), agentd's data
    /// directory (the store's), and the files holding the API token and the model
    /// credential.
    pub fn protected_paths(&self, backend: &str, socket: Option<PathBuf>) -> Vec<ProtectedPath> {
        let absolute = |path: &std::path::Path| std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let mut out = Vec::new();
        if let Some(socket) = socket {
            let dir = socket.parent().filter(|d| d.parent().is_some()).map(std::path::Path::to_path_buf);
            let what = format!("the directory of the {backend} engine's socket {}", socket.display());
            out.push(ProtectedPath::new(dir.unwrap_or_else(|| socket.clone()), what));
        }
        let store = absolute(&self.store_path());
        if let Some(dir) = store.parent() {
            out.push(ProtectedPath::new(dir, format!("agentd's data directory (store.path {})", store.display())));
        }
        if let Some(file) = &self.server.token_file {
            out.push(ProtectedPath::new(absolute(file), "the API token file (server.token_file)"));
        }
        if let Some(file) = &self.model.api_key_file {
            out.push(ProtectedPath::new(absolute(file), "the model credential file (model.api_key_file)"));
        }
        out
    }

    /// The manager's settings from this configuration: its own sections, as they are.
    pub fn manager_config(&self) -> ManagerConfig {
        ManagerConfig {
            defaults: self.agents.clone(),
            reconcile: self.reconcile.clone(),
            events_retention: match self.store.events_retention_days {
                0 => None,
                days => Some(std::time::Duration::from_secs(days.saturating_mul(86_400))),
            },
            // Filled in by the daemon once the backend told it the gateway addresses.
            gateway: None,
            model_limits: agent_manager::ModelLimits {
                requests_per_minute: self.model.requests_per_minute,
                max_concurrent_requests: self.model.max_concurrent_requests,
                max_output_tokens_per_day: self.model.max_output_tokens_per_day,
            },
            // Filled in by the daemon once it knows the backend's socket (`protected_paths`).
            protected_paths: Vec::new(),
            // Filled in by the daemon once it tried to install the firewall.
            isolated_refusal: None,
            claude_refusal: None,
        }
    }

    /// The selected backend's section (`Null` for `auto`, which reads each candidate's
    /// own).
    pub fn backend_section(&self, name: &str) -> Section {
        self.backends.get(name).cloned().unwrap_or(Section::Null)
    }
}

/// The effective configuration, one `key = value  # source` line per setting, secrets
/// redacted.
pub fn show(sources: &Sources) -> Result<String, ConfigError> {
    let registry = backends::BACKENDS;
    let figment = figment_with(sources, registry)?;
    let config = extract(&figment, registry)?;
    let value = Value::serialize(&config).map_err(|e| ConfigError(vec![e.to_string()]))?;
    let mut dict = value.into_dict().unwrap_or_default();
    for (name, section) in &config.backends {
        let section = Value::serialize(section).map_err(|e| ConfigError(vec![e.to_string()]))?;
        dict.insert(name.clone(), section);
    }
    let mut lines = Vec::new();
    leaves(&Value::from(dict), String::new(), &mut lines);
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

/// The default database file (see [`Config::store_path`]), from whether the daemon runs as
/// root and the values of `XDG_DATA_HOME` and `HOME`.
pub fn default_store_path(root: bool, xdg_data_home: Option<OsString>, home: Option<OsString>) -> PathBuf {
    const SYSTEM: &str = "/var/lib/agentd/agentd.db";
    if let Some(dir) = xdg_data_home.filter(|v| !v.is_empty()) {
        return PathBuf::from(dir).join("agentd/agentd.db");
    }
    if root {
        return PathBuf::from(SYSTEM);
    }
    home.filter(|v| !v.is_empty())
        .map(|h| PathBuf::from(h).join(".local/share/agentd/agentd.db"))
        .unwrap_or_else(|| PathBuf::from(SYSTEM))
}

#[cfg(test)]
mod protected_paths_tests {
    use super::*;

    #[test]
    fn the_socket_directory_the_data_directory_and_credential_files_are_protected() {
        let mut config = Config::default();
        config.store.path = Some("/srv/agentd/agentd.db".into());
        config.server.token_file = Some("/srv/secrets/token".into());
        config.model.api_key_file = Some("/srv/secrets/anthropic".into());
        let paths = config.protected_paths("docker", Some("/var/run/docker.sock".into()));
        let got: Vec<(&str, &str)> =
            paths.iter().map(|p| (p.path.to_str().unwrap_or_default(), p.what.as_str())).collect();
        assert_eq!(
            got,
            [
                ("/var/run", "the directory of the docker engine's socket /var/run/docker.sock"),
                ("/srv/agentd", "agentd's data directory (store.path /srv/agentd/agentd.db)"),
                ("/srv/secrets/token", "the API token file (server.token_file)"),
                ("/srv/secrets/anthropic", "the model credential file (model.api_key_file)"),
            ]
        );
        // A remote engine has no socket here; a relative store is made absolute.
        config.store.path = Some("agentd.db".into());
        let paths = config.protected_paths("podman", None);
        assert!(paths.iter().all(|p| p.path.is_absolute() && !p.what.contains("socket")), "{paths:?}");
    }
}

/// Whether `filter` is a tracing filter whose every directive names a level: a bare level
/// (`info`) or `TARGET=LEVEL`. A bare word that is no level (`verbose`) parses as a target
/// name and silences every other log line, so it is refused.
pub fn log_filter_names_levels(filter: &str) -> bool {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let is_level = |word: &str| LEVELS.iter().any(|l| l.eq_ignore_ascii_case(word.trim()));
    filter.parse::<tracing_subscriber::EnvFilter>().is_ok()
        && filter.split(',').map(str::trim).filter(|d| !d.is_empty()).all(|directive| {
            match directive.rsplit_once('=') {
                Some((_, level)) => is_level(level),
                None => is_level(directive),
            }
        })
        && filter.split(',').any(|d| !d.trim().is_empty())
}

#[cfg(test)]
mod log_filter_tests {
    use super::log_filter_names_levels;

    #[test]
    fn every_directive_must_name_a_level() {
        for ok in ["info", "INFO", "agentd=debug,info", "warn,agentd::lifecycle=trace", "off"] {
            assert!(log_filter_names_levels(ok), "{ok}");
        }
        for bad in ["verbose", "agentd", "info,verbose", "agentd=loud", "", " , "] {
            assert!(!log_filter_names_levels(bad), "{bad}");
        }
    }
}

#[cfg(test)]
mod store_path_tests {
    use super::default_store_path;
    use std::path::PathBuf;

    #[test]
    fn a_root_daemon_without_xdg_data_home_stores_in_var_lib() {
        let home = Some("/root".into());
        assert_eq!(default_store_path(true, None, home.clone()), PathBuf::from("/var/lib/agentd/agentd.db"));
        assert_eq!(default_store_path(true, Some("".into()), home), PathBuf::from("/var/lib/agentd/agentd.db"));
        assert_eq!(
            default_store_path(true, Some("/srv/data".into()), None),
            PathBuf::from("/srv/data/agentd/agentd.db")
        );
        assert_eq!(
            default_store_path(false, None, Some("/home/u".into())),
            PathBuf::from("/home/u/.local/share/agentd/agentd.db")
        );
        assert_eq!(
            default_store_path(false, Some("/x".into()), Some("/home/u".into())),
            PathBuf::from("/x/agentd/agentd.db")
        );
    }
}
