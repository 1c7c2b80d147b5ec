//! Configuration of the Podman backend.

use std::path::PathBuf;
use std::time::Duration;

use backend_core::{check_engine_connection, BackendConfig, ConfigProblem};
use serde_with::{serde_as, DurationSeconds};

/// The socket of the rootful Podman service, the last address tried.
pub const ROOTFUL_SOCKET: &str = "unix:///run/podman/podman.sock";

/// The command that starts a Podman service on the rootful socket where nothing else
/// (systemd's `podman.socket`) does.
pub const START_SERVICE: &str = "podman system service --time=0 unix:///run/podman/podman.sock";

/// Where the stdin keepers' FIFOs live unless [`PodmanConfig::stdin_dir`] says otherwise.
pub const DEFAULT_STDIN_DIR: &str = "/run/agentd/podman-stdin";

/// Where and how to reach the Podman service (libpod API): the daemon's `[podman]`
/// section.
#[serde_as]
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PodmanConfig {
    /// The service's address (`unix:///run/podman/podman.sock`, `tcp://host:8080`).
    /// `None` resolves it as [`PodmanConfig::candidates`] describes.
    pub socket: Option<String>,
    /// How long an ordinary engine call may take before it counts as "engine
    /// unavailable". Stops wait this plus their grace period. Key `request_timeout_secs`.
    #[serde(rename = "request_timeout_secs")]
    #[serde_as(as = "DurationSeconds<u64>")]
    pub request_timeout: Duration,
    /// The internal network `isolated` sessions join (created when missing, with a
    /// gateway so that the host is reachable; shared by every agentd on the host, never
    /// removed).
    pub isolated_network: String,
    /// The directory of the sessions' stdin FIFOs (`<container id>.stdin`, with the
    /// keeper's diagnostics in `<container id>.log`), created with mode 0700. Every agentd
    /// on the host may share it; it must be on a local file system (a tmpfs like `/run`
    /// is best). See the README's "Attach closes the container's stdin".
    pub stdin_dir: PathBuf,
    /// The Podman command-line client that runs the stdin keepers (`podman attach`): a
    /// name looked up in `PATH`, or a path.
    pub podman_command: PathBuf,
}

impl Default for PodmanConfig {
    fn default() -> Self {
        Self {
            socket: None,
            request_timeout: Duration::from_secs(30),
            isolated_network: "agentd-isolated".into(),
            stdin_dir: DEFAULT_STDIN_DIR.into(),
            podman_command: "podman".into(),
        }
    }
}

impl BackendConfig for PodmanConfig {
    fn check(&self) -> Vec<ConfigProblem> {
        let mut problems =
            check_engine_connection(self.socket.as_deref(), self.request_timeout, &self.isolated_network);
        if !self.stdin_dir.is_absolute() {
            problems.push(ConfigProblem::value(
                "stdin_dir",
                format!("{:?}", self.stdin_dir.display().to_string()),
                "an absolute path",
            ));
        }
        if self.podman_command.as_os_str().is_empty() {
            problems.push(ConfigProblem::value(
                "podman_command",
                "\"\"",
                "a command name looked up in PATH, or a path",
            ));
        }
        problems
    }
}

impl PodmanConfig {
    /// The addresses to try, in order:
    ///
    /// 1. [`PodmanConfig::socket`], when set: only that;
    /// 2. else `CONTAINER_HOST` (Podman's own variable), when set: only that;
    /// 3. else the rootless socket `$XDG_RUNTIME_DIR/podman/podman.sock` (when
    ///    `XDG_RUNTIME_DIR` is set), then the rootful [`ROOTFUL_SOCKET`]; the first that
    ///    answers wins.
    pub fn candidates(&self) -> Vec<String> {
        candidates(
            self.socket.as_deref(),
            std::env::var("CONTAINER_HOST").ok().as_deref(),
            std::env::var("XDG_RUNTIME_DIR").ok().as_deref(),
        )
    }
}

/// [`PodmanConfig::candidates`] with the environment passed in.
pub(crate) fn candidates(
    socket: Option<&str>,
    container_host: Option<&str>,
    xdg_runtime_dir: Option<&str>,
) -> Vec<String> {
    let explicit = |s: Option<&str>| s.map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned);
    if let Some(address) = explicit(socket).or_else(|| explicit(container_host)) {
        return vec![normalize(&address)];
    }
    let mut found = Vec::new();
    if let Some(dir) = explicit(xdg_runtime_dir) {
        found.push(format!("unix://{}/podman/podman.sock", dir.trim_end_matches('/')));
    }
    if !found.iter().any(|a| a == ROOTFUL_SOCKET) {
        found.push(ROOTFUL_SOCKET.to_owned());
    }
    found
}

/// A bare socket path (`/run/podman/podman.sock`) is a `unix://` address.
fn normalize(address: &str) -> String {
    if address.starts_with('/') {
        format!("unix://{address}")
    } else {
        address.to_owned()
    }
}

/// Whether the address is a socket on this host, where the host's kernel log and network
/// interfaces are the engine's.
pub(crate) fn is_local(address: &str) -> bool {
    address.starts_with("unix://")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_addresses_win_and_are_tried_alone() {
        assert_eq!(candidates(Some("unix:///a.sock"), Some("tcp://h:1"), Some("/run/user/1")), vec!["unix:///a.sock"]);
        assert_eq!(candidates(None, Some("tcp://h:1"), Some("/run/user/1")), vec!["tcp://h:1"]);
        assert_eq!(candidates(Some("/b.sock"), None, None), vec!["unix:///b.sock"], "a bare path is a unix socket");
    }

    #[test]
    fn defaults_are_the_rootless_then_the_rootful_socket() {
        assert_eq!(
            candidates(None, None, Some("/run/user/1000/")),
            vec!["unix:///run/user/1000/podman/podman.sock", ROOTFUL_SOCKET]
        );
        assert_eq!(candidates(None, Some(" "), None), vec![ROOTFUL_SOCKET], "an empty CONTAINER_HOST is unset");
        assert_eq!(candidates(None, None, Some("/run")), vec![ROOTFUL_SOCKET], "no duplicate");
    }
}
