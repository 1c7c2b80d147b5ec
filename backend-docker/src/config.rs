//! Configuration of the Docker backend.

use std::time::Duration;

/// Where and how to reach Docker Engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerConfig {
    /// The engine's address (`unix:///var/run/docker.sock`, `tcp://host:2375`); `None`
    /// uses `DOCKER_HOST`, else the platform default.
    pub socket: Option<String>,
    /// How long an ordinary engine call may take before it counts as "engine
    /// unavailable". Stops wait this plus their grace period.
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

impl DockerConfig {
    /// The address this config connects to.
    pub fn address(&self) -> String {
        self.socket
            .clone()
            .or_else(|| std::env::var("DOCKER_HOST").ok().filter(|h| !h.is_empty()))
            .unwrap_or_else(|| "unix:///var/run/docker.sock".to_owned())
    }
}
