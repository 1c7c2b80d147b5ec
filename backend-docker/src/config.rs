//! Configuration of the Docker backend.

use std::time::Duration;

use backend_core::{check_engine_connection, BackendConfig, ConfigProblem};
use serde_with::{serde_as, DurationSeconds};

/// Where and how to reach Docker Engine: the daemon's `[docker]` section.
#[serde_as]
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DockerConfig {
    /// The engine's address (`unix:///var/run/docker.sock`, `tcp://host:2375`); `None`
    /// uses `DOCKER_HOST`, else the platform default.
    pub socket: Option<String>,
    /// How long an ordinary engine call may take before it counts as "engine
    /// unavailable". Stops wait this plus their grace period. Key `request_timeout_secs`.
    #[serde(rename = "request_timeout_secs")]
    #[serde_as(as = "DurationSeconds<u64>")]
    pub request_timeout: Duration,
    /// The internal network `isolated` sessions join (created when missing, shared by
    /// every agentd on the host, never removed).
    pub isolated_network: String,
}

impl Default for DockerConfig {
    fn default() -> Self {
        Self { socket: None, request_timeout: Duration::from_secs(30), isolated_network: "agentd-isolated".into() }
    }
}

impl BackendConfig for DockerConfig {
    fn check(&self) -> Vec<ConfigProblem> {
        check_engine_connection(self.socket.as_deref(), self.request_timeout, &self.isolated_network)
    }
}

impl DockerConfig {
    /// The address this config connects to.
    pub fn address(&self) -> String {
        self.socket
            .clone()
            .or_else(|| std::env::var("DOCKER_HOST").ok().filter(|h| !h.is_empty()))
            .unwrap_or_else(|| "unix:///var/run/docker.sock".to_owned())
    }
}
