//! Configuration of the Docker backend.

use std::time::Duration;

use backend_core::{check_engine_address, BackendConfig, ConfigProblem};
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
        let mut problems: Vec<ConfigProblem> =
            check_engine_address("socket", self.socket.as_deref()).into_iter().collect();
        if !(1..=3600).contains(&self.request_timeout.as_secs()) {
            let secs = self.request_timeout.as_secs().to_string();
            problems.push(ConfigProblem::value("request_timeout_secs", secs, "1 to 3600 (seconds)"));
        }
        if let Err(allowed) = backend_core::rules::engine_name(&self.isolated_network) {
            problems.push(ConfigProblem::value("isolated_network", format!("{:?}", self.isolated_network), allowed));
        }
        problems
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
