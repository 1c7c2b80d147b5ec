//! The manager's domain types: agents, runs and lifecycle events.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use backend_core::{NetworkPolicy, SessionExitInfo, SessionHealth};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant),*
        }

        impl $name {
            /// Every variant.
            pub const ALL: &'static [$name] = &[$($name::$variant),*];

            /// The snake_case name used in JSON, config and the database.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),*
                }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl ::std::str::FromStr for $name {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::ALL.iter().copied().find(|v| v.as_str() == s).ok_or_else(|| {
                    let allowed: Vec<&str> = Self::ALL.iter().map(|v| v.as_str()).collect();
                    format!("unknown value {s:?}; expected one of: {}", allowed.join(", "))
                })
            }
        }

        impl ::serde::Serialize for $name {
            fn serialize<S: ::serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        /// A string, one of the snake_case names.
        #[cfg(feature = "openapi")]
        impl ::utoipa::PartialSchema for $name {
            fn schema() -> ::utoipa::openapi::RefOr<::utoipa::openapi::schema::Schema> {
                ::utoipa::openapi::schema::ObjectBuilder::new()
                    .schema_type(::utoipa::openapi::schema::Type::String)
                    .enum_values(Some(Self::ALL.iter().map(|v| v.as_str())))
                    .into()
            }
        }

        #[cfg(feature = "openapi")]
        impl ::utoipa::ToSchema for $name {}

        impl<'de> ::serde::Deserialize<'de> for $name {
            fn deserialize<D: ::serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = <String as ::serde::Deserialize>::deserialize(deserializer)?;
                text.parse().map_err(<D::Error as ::serde::de::Error>::custom)
            }
        }
    };
}

pub(crate) use text_enum;

text_enum! {
    /// Where an agent is in its life.
    ///
    /// An agent stopped on purpose (stop, remove, daemon shutdown) reads `Stopped` whatever
    /// its exit code; `Failed` is for agents that ended by themselves with a non-zero code,
    /// were OOM-killed, or were stopped, killed or removed from outside agentd (whatever
    /// their exit code).
    AgentStatus {
        /// Recorded, container not started yet.
        Pending = "pending",
        /// Its container runs.
        Running = "running",
        /// Ended on purpose or with exit code 0.
        Stopped = "stopped",
        /// Ended by itself with an error or an OOM kill, or stopped, killed or removed from
        /// outside.
        Failed = "failed",
    }
}

text_enum! {
    /// What runs in the agent's container.
    AgentKind {
        /// The Claude Code CLI, speaking stream-json over its container's stdin and
        /// stdout.
        ClaudeCode = "claude-code",
        /// The image's own entrypoint, or the given command.
        Image = "image",
    }
}

text_enum! {
    /// When the manager starts an agent again after it ended.
    RestartPolicy {
        /// Never (the default).
        Never = "never",
        /// When it failed (non-zero exit, OOM, outside kill, vanished).
        OnFailure = "on-failure",
        /// Whenever it ended by itself, and at daemon start-up after a shutdown stopped it.
        Always = "always",
    }
}

text_enum! {
    /// What the manager does when a running agent is unhealthy.
    UnhealthyAction {
        /// Record the health and log it.
        Record = "record",
        /// Restart the agent once it has been unhealthy for the configured time.
        Restart = "restart",
    }
}

text_enum! {
    /// How a claude-code agent's tool-permission requests are answered.
    ApprovalPolicy {
        /// Kept pending for a person (the default).
        Ask = "ask",
        /// Allowed at once.
        Allow = "allow",
        /// Denied at once.
        Deny = "deny",
    }
}

/// Claude Code's `--permission-mode` choices (2.1.328).
pub const PERMISSION_MODES: &[&str] =
    &["default", "acceptEdits", "auto", "bypassPermissions", "manual", "dontAsk", "plan"];

text_enum! {
    /// Whether the agent should be running: set by spawn/restart, cleared by stop.
    Desired {
        Running = "running",
        Stopped = "stopped",
    }
}

text_enum! {
    /// Who ended a run.
    EndedBy {
        /// The agent ended by itself (exit, OOM).
        Itself = "itself",
        /// Someone other than agentd stopped, killed or removed its container.
        Outside = "outside",
        /// A user stopped the agent.
        Stop = "stop",
        /// A restart (by a user or by the manager) replaced the run.
        Restart = "restart",
        /// The agent was removed.
        Remove = "remove",
        /// The daemon shut down.
        Shutdown = "shutdown",
        /// The container of an interrupted spawn disappeared without a trace.
        Vanished = "vanished",
        /// The container could not be started.
        StartError = "start_error",
    }
}

text_enum! {
    /// The kind of a lifecycle event.
    EventKind {
        Spawned = "spawned",
        Started = "started",
        Exited = "exited",
        Stopped = "stopped",
        Failed = "failed",
        Restarted = "restarted",
        RestartScheduled = "restart_scheduled",
        HealthChanged = "health_changed",
        Adopted = "adopted",
        LeftRunning = "left_running",
        Connected = "connected",
        Disconnected = "disconnected",
        Paused = "paused",
        Unpaused = "unpaused",
        ApprovalRequested = "approval_requested",
        ApprovalDecided = "approval_decided",
        TurnInterrupted = "turn_interrupted",
        Removed = "removed",
        OrphanRemoved = "orphan_removed",
        OrphanFound = "orphan_found",
        /// The egress proxy refused a destination not on the agent's allow-list.
        EgressDenied = "egress_denied",
    }
}

/// What a user asks for when creating an agent; unset fields take the manager's
/// [`crate::AgentDefaults`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NewAgent {
    pub name: String,
    pub kind: Option<AgentKind>,
    pub image: Option<String>,
    /// The program (and its first arguments) run instead of the image's `ENTRYPOINT`
    /// (kind image); `command`, if any, follows as its arguments.
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// Alone: the program and its arguments, run instead of the image's `ENTRYPOINT` and
    /// `CMD` (kind image). With `entrypoint`: that entrypoint's arguments.
    pub command: Option<Vec<String>>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub workdir: Option<PathBuf>,
    pub memory_mb: Option<u64>,
    pub cpus: Option<f64>,
    pub pids_limit: Option<i64>,
    pub network: Option<NetworkPolicy>,
    pub restart: Option<RestartPolicy>,
    pub on_unhealthy: Option<UnhealthyAction>,
    pub stop_grace_secs: Option<u64>,
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub user: Option<String>,
    pub read_only_rootfs: Option<bool>,
    /// How tool-permission requests are answered (claude-code).
    pub approvals: Option<ApprovalPolicy>,
    /// Claude Code's `--permission-mode` (claude-code).
    pub permission_mode: Option<String>,
    /// Claude Code's `--max-turns` (claude-code).
    pub max_turns: Option<u32>,
    /// Claude Code's `--max-budget-usd` (claude-code).
    pub max_budget_usd: Option<f64>,
    /// The destinations the egress proxy lets the agent reach (see [`crate::egress`]);
    /// unset takes `agents.egress_allow`, an empty list allows nothing.
    #[serde(default)]
    pub egress_allow: Option<Vec<String>>,
    /// Limits of the agent's use of the model gateway; unset fields follow `[model]`.
    pub model_limits: Option<ModelLimits>,
}

/// Limits of an agent's requests through the model gateway. Each unset field follows the
/// daemon's `[model]` default at the time of the request (unset there too: no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ModelLimits {
    /// Requests admitted in any 60 s window.
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    /// Requests in flight at once.
    #[serde(default)]
    pub max_concurrent_requests: Option<u32>,
    /// Output tokens recorded since 00:00 UTC.
    #[serde(default)]
    pub max_output_tokens_per_day: Option<u64>,
}

impl ModelLimits {
    /// These limits, with each unset field taken from `defaults`.
    pub fn or(self, defaults: ModelLimits) -> ModelLimits {
        ModelLimits {
            requests_per_minute: self.requests_per_minute.or(defaults.requests_per_minute),
            max_concurrent_requests: self.max_concurrent_requests.or(defaults.max_concurrent_requests),
            max_output_tokens_per_day: self.max_output_tokens_per_day.or(defaults.max_output_tokens_per_day),
        }
    }

    /// Whether no field is set.
    pub fn is_empty(&self) -> bool {
        *self == ModelLimits::default()
    }
}

/// An agent's use of the model through the gateway, summed over every recorded request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ModelUsage {
    /// Requests recorded (every status).
    pub requests: u64,
    /// The responses' `usage.input_tokens`, summed.
    pub input_tokens: u64,
    /// The responses' `usage.output_tokens`, summed.
    pub output_tokens: u64,
}

/// One request of an agent through the model gateway, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRequest {
    pub agent_id: String,
    /// When it was admitted.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The model that answered (or was asked for), if known.
    pub model: Option<String>,
    /// The HTTP status the agent got.
    pub status: u16,
    /// From admission to the end of the response body.
    pub latency_ms: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// The full, resolved description of an agent, stored with it.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentSpec {
    pub kind: AgentKind,
    pub image: String,
    /// The entrypoint given at spawn, if any (see [`NewAgent::entrypoint`]).
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    pub command: Option<Vec<String>>,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<PathBuf>,
    pub memory_mb: Option<u64>,
    pub cpus: Option<f64>,
    pub pids_limit: Option<i64>,
    pub network: NetworkPolicy,
    pub restart: RestartPolicy,
    pub on_unhealthy: UnhealthyAction,
    pub stop_grace_secs: u64,
    pub model: Option<String>,
    pub prompt: Option<String>,
    pub user: Option<String>,
    pub read_only_rootfs: bool,
    #[serde(default = "default_approvals")]
    pub approvals: ApprovalPolicy,
    #[serde(default)]
    pub permission_mode: Option<String>,
    #[serde(default)]
    pub max_turns: Option<u32>,
    #[serde(default)]
    pub max_budget_usd: Option<f64>,
    /// The agent's own model gateway limits, as given at spawn (unset fields follow
    /// `[model]`).
    #[serde(default)]
    pub model_limits: ModelLimits,
    /// The egress allow-list, validated (see [`crate::egress`]).
    #[serde(default)]
    pub egress_allow: Vec<String>,
}

fn default_approvals() -> ApprovalPolicy {
    ApprovalPolicy::Ask
}

impl fmt::Debug for AgentSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentSpec")
            .field("kind", &self.kind)
            .field("image", &self.image)
            .field("entrypoint", &self.entrypoint)
            .field("command", &self.command)
            .field("env_keys", &self.env.keys().collect::<Vec<_>>())
            .field("workdir", &self.workdir)
            .field("memory_mb", &self.memory_mb)
            .field("cpus", &self.cpus)
            .field("pids_limit", &self.pids_limit)
            .field("network", &self.network)
            .field("restart", &self.restart)
            .field("on_unhealthy", &self.on_unhealthy)
            .field("stop_grace_secs", &self.stop_grace_secs)
            .field("model", &self.model)
            .field("prompt", &self.prompt.as_ref().map(|p| format!("<{} bytes>", p.len())))
            .field("user", &self.user)
            .field("read_only_rootfs", &self.read_only_rootfs)
            .field("approvals", &self.approvals)
            .field("permission_mode", &self.permission_mode)
            .field("max_turns", &self.max_turns)
            .field("max_budget_usd", &self.max_budget_usd)
            .field("model_limits", &self.model_limits)
            .field("egress_allow", &self.egress_allow)
            .finish()
    }
}

/// An agent as stored.
#[derive(Clone, PartialEq, Serialize)]
pub struct Agent {
    pub id: String,
    pub name: String,
    pub status: AgentStatus,
    pub desired: Desired,
    pub health: SessionHealth,
    /// The session (container) name; stable across the agent's runs.
    pub session: String,
    pub container_id: Option<String>,
    /// What the agent runs (kind, image, restart policy, limits, ...), as resolved at spawn.
    pub spec: AgentSpec,
    /// Restarts performed, by users and by the restart policy.
    pub restarts: u32,
    /// Consecutive failed runs, for crash-loop backoff.
    pub crash_streak: u32,
    /// When the restart policy starts the agent again.
    #[serde(with = "time::serde::rfc3339::option")]
    pub next_restart_at: Option<OffsetDateTime>,
    /// Why the agent is in its status, in words (for example "stopped from outside").
    pub reason: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

impl fmt::Debug for Agent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Agent")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("status", &self.status)
            .field("desired", &self.desired)
            .field("health", &self.health)
            .field("session", &self.session)
            .field("container_id", &self.container_id)
            .field("restarts", &self.restarts)
            .field("crash_streak", &self.crash_streak)
            .field("next_restart_at", &self.next_restart_at)
            .field("reason", &self.reason)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// Whether the agent speaks stream-json over its stdin and stdout, so that agentd
    /// holds a conversation with it.
    pub fn speaks_stream_json(&self) -> bool {
        self.spec.kind == AgentKind::ClaudeCode
    }
}

/// An agent with the exit of its last run, as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentView {
    #[serde(flatten)]
    pub agent: Agent,
    pub exit: Option<ExitView>,
    /// When its latest run (the current one, or the last if none runs) started; `None`
    /// before the first.
    #[serde(with = "time::serde::rfc3339::option")]
    pub started_at: Option<OffsetDateTime>,
    /// Whether agentd holds a live attach to the agent's stdin and output.
    pub connected: bool,
    /// Whether the engine has the agent's container frozen (`docker pause`).
    pub paused: bool,
    /// The session of a stream-json agent: `session_id`, `turn`, `cost_usd`, `usage`,
    /// `last_result`.
    #[serde(flatten)]
    pub session: Option<crate::conversation::SessionView>,
    /// The agent's requests through the model gateway, summed.
    pub model_usage: ModelUsage,
    /// The limits its model requests are held to now: its own, else `[model]`'s.
    pub model_limits: ModelLimits,
}

/// How a run ended, as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExitView {
    pub code: Option<i64>,
    pub oom_killed: bool,
    pub signal: Option<i32>,
    pub error: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
}

impl From<&SessionExitInfo> for ExitView {
    fn from(e: &SessionExitInfo) -> Self {
        Self {
            code: e.exit_code,
            oom_killed: e.oom_killed,
            signal: e.signal,
            error: e.error.clone(),
            finished_at: e.finished_at,
        }
    }
}

/// One container run of an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Run {
    pub id: i64,
    pub agent_id: String,
    pub session: String,
    pub container_id: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
    /// How it ended; `None` while it runs.
    pub exit: Option<ExitView>,
    pub ended_by: Option<EndedBy>,
}

/// Something that happened to an agent, stored and broadcast.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LifecycleEvent {
    pub id: i64,
    pub agent_id: String,
    pub agent_name: Option<String>,
    pub kind: EventKind,
    pub from: Option<AgentStatus>,
    pub to: Option<AgentStatus>,
    pub detail: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// Checks an agent name: `[a-z0-9][a-z0-9-]{0,62}`.
pub fn validate_name(name: &str) -> Result<(), String> {
    let mut bytes = name.bytes();
    let first_ok = matches!(bytes.next(), Some(b) if b.is_ascii_lowercase() || b.is_ascii_digit());
    let rest_ok = bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if first_ok && rest_ok && name.len() <= 63 {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a valid agent name: use 1 to 63 characters from a-z, 0-9 and '-', starting with a letter or digit"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_documented_pattern() {
        for ok in ["a", "agent-1", "0", &"a".repeat(63)] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "A", "a_b", "a.b", &"a".repeat(64), "é"] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn enums_round_trip_and_list_allowed_values() {
        for p in RestartPolicy::ALL {
            assert_eq!(p.as_str().parse::<RestartPolicy>(), Ok(*p));
        }
        let err = "sometimes".parse::<RestartPolicy>().expect_err("invalid");
        assert!(err.contains("never, on-failure, always"), "{err}");
        assert_eq!(serde_json::to_string(&AgentKind::ClaudeCode).expect("json"), "\"claude-code\"");
    }
}
