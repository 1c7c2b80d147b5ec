//! Supervision of agentd's agents: spawn, reconcile, restart and shutdown, generic over the
//! execution backend, recorded in SQLite.
//!
//! [`AgentManager`] is the one place that decides what an agent's status is. It learns the
//! truth from the backend (one snapshot per reconcile pass, plus the backend's event
//! stream where it has one), writes every transition to the [`Store`] together with the
//! run's exit information, and announces it three ways: a tracing event under the target
//! `agentd::lifecycle`, a stored event row, and a broadcast to subscribers.
//!
//! Architecture invariant: this crate never names a concrete backend; it works with any
//! `B: ExecutionBackend + ?Sized`, including `dyn ExecutionBackend`.

mod backoff;
mod clock;
mod config;
pub mod conversation;
pub mod egress;
mod error;
mod health;
mod locks;
mod manager;
mod metrics;
pub mod model;
mod page;
mod paths;
mod peers;
mod reconcile;
#[cfg(feature = "testing")]
pub mod scenarios;
mod secrets;
mod store;
mod supervise;

pub use backoff::Backoff;
pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{
    AgentDefaults, GatewayEndpoints, ManagerConfig, ReconcileConfig, Violation, DEFAULT_EVENTS_RETENTION,
    MAX_STOP_GRACE_SECS, MODEL_ENV,
};
pub use conversation::approvals::{Approval, DecidedBy, Decision};
pub use conversation::{ConversationEntry, Delivery, Direction, LastResult, LiveEntry, SessionView, Turn, Usage};
pub use error::{ManagerError, Result};
pub use health::{EngineState, Health, HealthStatus, SupervisorState};
pub use manager::{AgentManager, RunOutput, ShutdownSummary};
pub use metrics::{AgentCounts, Metrics, MetricsSnapshot};
pub use model::{
    Agent, AgentKind, AgentSpec, AgentStatus, AgentView, ApprovalPolicy, Desired, EndedBy, EventKind, ExitView,
    LifecycleEvent, ModelLimits, ModelRequest, ModelUsage, NewAgent, RestartPolicy, Run, UnhealthyAction,
    PERMISSION_MODES,
};
pub use page::{AgentCursor, BadCursor, DEFAULT_AGENT_PAGE, MAX_AGENT_PAGE};
pub use paths::{check_host_dir, ProtectedPath, SYSTEM_TREES};
pub use reconcile::ReconcileReport;
pub use secrets::{AgentSecret, GatewaySecrets, SECRET_PREFIX};
pub use store::{Store, StoreError};

/// The tracing target of lifecycle events.
pub const LIFECYCLE_TARGET: &str = "agentd::lifecycle";
