//! What an agent container needs: the session spec.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::BackendError;

/// How a session reaches the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum NetworkPolicy {
    /// A bridge network with a route out, and the host reachable as `host.docker.internal`.
    #[default]
    Internet,
    /// No route out of the host; only the agentd agent channel on the host is reachable.
    Isolated,
    /// No network at all (loopback only); the agent cannot reach the agent channel.
    None,
    /// The host's network namespace.
    Host,
}

impl NetworkPolicy {
    /// The snake_case name used in config and JSON.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Internet => "internet",
            Self::Isolated => "isolated",
            Self::None => "none",
            Self::Host => "host",
        }
    }

    /// Every policy.
    pub const ALL: [NetworkPolicy; 4] = [Self::Internet, Self::Isolated, Self::None, Self::Host];
}

impl fmt::Display for NetworkPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for NetworkPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| format!("unknown network policy {s:?}; expected one of: internet, isolated, none, host"))
    }
}

/// A bind mount into the session.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Mount {
    /// Absolute path on the host.
    pub source: PathBuf,
    /// Absolute path in the container.
    pub target: PathBuf,
    /// Mount read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// A named engine volume mounted into the session: it outlives the session's containers
/// (an agent's HOME, with its conversation files). The backend creates it on first use
/// with the ownership labels, and removes it only when asked
/// ([`crate::ExecutionBackend::remove_volume`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VolumeMount {
    /// The volume's name; it starts with the backend's prefix.
    pub name: String,
    /// Absolute path in the container.
    pub target: PathBuf,
}

/// Resource limits. `None` means the engine's default (no limit).
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct Resources {
    /// Memory limit in bytes (swap is limited to the same value: no swap).
    pub memory_bytes: Option<u64>,
    /// CPU limit in cores (1.5 = one and a half cores).
    pub cpus: Option<f64>,
    /// Maximum number of processes.
    pub pids_limit: Option<i64>,
}

/// A health check to run inside the session.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HealthCheck {
    /// The command, run directly (exec form, no shell).
    pub command: Vec<String>,
    /// Time between checks.
    pub interval: Duration,
    /// Time one check may take before it counts as failed.
    pub timeout: Duration,
    /// Consecutive failures that make the session unhealthy.
    pub retries: u32,
    /// Grace period after start during which failures do not count. Zero means none.
    pub start_period: Duration,
}

/// What the spec says about health checking.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HealthCheckSpec {
    /// Use the image's HEALTHCHECK, if it has one.
    #[default]
    Image,
    /// Replace the image's check with this one.
    Override(HealthCheck),
    /// Run no health check, even if the image has one.
    Disabled,
}

/// Everything a backend needs to create one agent session (one container).
///
/// `Debug` prints environment variable names only: values may be API keys.
#[derive(Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SessionSpec {
    /// The session (container) name; it starts with the backend's prefix.
    pub session: String,
    /// The id of the agent the session runs.
    pub agent_id: String,
    /// A local image reference. Images are never pulled.
    pub image: String,
    /// The program (and its first arguments) to run instead of the image's `ENTRYPOINT`;
    /// `None` keeps the image's. When set, the image's `CMD` is not used either (as
    /// `docker run --entrypoint` does): the session runs `entrypoint` followed by
    /// `command`, if any.
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// The arguments (`CMD`) given to the entrypoint instead of the image's `CMD`; `None`
    /// keeps the image's (or none, when `entrypoint` is set). Without an entrypoint, the
    /// image's `ENTRYPOINT`, if it has one, runs it.
    pub command: Option<Vec<String>>,
    /// Environment variables, exactly these (the backend adds nothing but what its
    /// documentation lists).
    pub env: BTreeMap<String, String>,
    /// Host directory mounted at `/workspace` and used as the working directory.
    pub workdir: Option<PathBuf>,
    /// Further bind mounts.
    pub mounts: Vec<Mount>,
    /// Named volumes, created with the ownership labels when missing.
    #[serde(default)]
    pub volumes: Vec<VolumeMount>,
    /// Memory, CPU and process limits.
    pub resources: Resources,
    /// Network policy.
    pub network: NetworkPolicy,
    /// User (`uid`, `uid:gid` or name) to run as; `None` keeps the image's.
    pub user: Option<String>,
    /// Health check to use.
    pub health_check: HealthCheckSpec,
    /// How long `stop` waits after SIGTERM before SIGKILL.
    pub stop_grace: Duration,
    /// Mount the root filesystem read-only (a tmpfs is mounted at `/tmp`).
    pub read_only_rootfs: bool,
    /// Extra labels; the ownership labels are added by the backend and win.
    pub labels: BTreeMap<String, String>,
    /// Keep the main process's stdin open (no TTY), so that
    /// [`crate::ExecutionBackend::attach_session`] can write to it across attaches.
    #[serde(default)]
    pub stdin_open: bool,
}

impl fmt::Debug for SessionSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionSpec")
            .field("session", &self.session)
            .field("agent_id", &self.agent_id)
            .field("image", &self.image)
            .field("entrypoint", &self.entrypoint)
            .field("command", &self.command)
            .field("env_keys", &self.env.keys().collect::<Vec<_>>())
            .field("workdir", &self.workdir)
            .field("mounts", &self.mounts)
            .field("volumes", &self.volumes)
            .field("resources", &self.resources)
            .field("network", &self.network)
            .field("user", &self.user)
            .field("health_check", &self.health_check)
            .field("stop_grace", &self.stop_grace)
            .field("read_only_rootfs", &self.read_only_rootfs)
            .field("labels", &self.labels)
            .field("stdin_open", &self.stdin_open)
            .finish()
    }
}

/// The smallest memory limit engines accept (Docker refuses less than 6 MiB).
pub const MIN_MEMORY_BYTES: u64 = rules::MIN_MEMORY_MB * 1024 * 1024;

/// The rules for what becomes a session, in one place for every layer that checks them
/// (this spec, the manager's agent specs and defaults, the daemon's configuration). Each
/// returns, when the value breaks it, what is allowed, in words the caller puts after the
/// field (or config key) and the value.
pub mod rules {
    /// The smallest memory limit in MiB (Docker refuses less than 6 MiB).
    pub const MIN_MEMORY_MB: u64 = 6;
    /// The largest memory limit in MiB: 2^40 MiB (1 EiB), so that its bytes (2^60) fit
    /// every engine's signed 64-bit field.
    pub const MAX_MEMORY_MB: u64 = 1 << 40;
    /// The smallest CPU limit in cores (Docker's and the kernel's least quota).
    pub const MIN_CPUS: f64 = 0.01;
    /// The largest CPU limit in cores; the engine's host CPU count bounds it further.
    pub const MAX_CPUS: f64 = 1024.0;
    /// The longest image name (without tag and digest), as the reference grammar says.
    pub const MAX_IMAGE_NAME: usize = 255;

    /// An image reference, by the grammar of Docker's and the OCI distribution's
    /// references: `[HOST[:PORT]/]PATH[:TAG][@DIGEST]`, where PATH is `/`-separated
    /// lower-case components of `[a-z0-9]` joined by `.`, `_`, `__` or dashes, the TAG
    /// is `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}` and the DIGEST `ALGORITHM:HEX` (`sha256:`
    /// and 64 lower-case hex digits); or an image id `sha256:<64 hex digits>`.
    pub fn image(image: &str) -> Result<(), &'static str> {
        image::check(image)
    }

    /// A memory limit in MiB: from [`MIN_MEMORY_MB`] to [`MAX_MEMORY_MB`].
    pub fn memory_mb(mb: u64) -> Result<(), &'static str> {
        if !(MIN_MEMORY_MB..=MAX_MEMORY_MB).contains(&mb) {
            return Err("from 6 to 1099511627776 (MiB: 6 MiB to 2^40 MiB)");
        }
        Ok(())
    }

    /// A memory limit in bytes: from [`MIN_MEMORY_MB`] MiB to [`MAX_MEMORY_MB`] MiB.
    pub fn memory_bytes(bytes: u64) -> Result<(), &'static str> {
        if !(super::MIN_MEMORY_BYTES..=MAX_MEMORY_MB << 20).contains(&bytes) {
            return Err("from 6 MiB (6291456 bytes) to 2^60 bytes");
        }
        Ok(())
    }

    /// The bytes of a memory limit in MiB, when it is one [`memory_mb`] allows.
    pub fn memory_mb_to_bytes(mb: u64) -> Option<u64> {
        memory_mb(mb).ok()?;
        mb.checked_mul(1024 * 1024)
    }

    /// A CPU limit: a finite number of cores from [`MIN_CPUS`] to [`MAX_CPUS`].
    pub fn cpus(cpus: f64) -> Result<(), &'static str> {
        if !(cpus.is_finite() && (MIN_CPUS..=MAX_CPUS).contains(&cpus)) {
            return Err("a number of cores from 0.01 to 1024 (and at most the engine host's CPUs), such as 0.5 or 2");
        }
        Ok(())
    }

    /// A process limit: at least 1.
    pub fn pids_limit(pids: i64) -> Result<(), &'static str> {
        if pids < 1 {
            return Err("at least 1");
        }
        Ok(())
    }

    /// An engine object name (a network, a volume): a letter or digit, then
    /// `[A-Za-z0-9_.-]`, at most 128 characters.
    pub fn engine_name(name: &str) -> Result<(), &'static str> {
        let mut bytes = name.bytes();
        let ok = matches!(bytes.next(), Some(b) if b.is_ascii_alphanumeric())
            && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
            && name.len() <= 128;
        if !ok {
            return Err("a name starting with a letter or digit, from [A-Za-z0-9_.-], at most 128 characters");
        }
        Ok(())
    }

    /// The longest user or group name [`user`] accepts.
    pub const MAX_USER_NAME: usize = 32;

    /// A user to run as: `NAME`, `UID` or `UID:GID`, where a name is
    /// `[a-z_][a-z0-9_-]*` (at most 32 characters) and ids are 32-bit numbers.
    pub fn user(user: &str) -> Result<(), &'static str> {
        const ALLOWED: &str =
            "NAME, UID or UID:GID, such as 1000:1000 (a name is [a-z_][a-z0-9_-]*, at most 32 characters; ids are numbers up to 4294967295)";
        let id = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && s.parse::<u32>().is_ok();
        let name = |s: &str| {
            let mut bytes = s.bytes();
            matches!(bytes.next(), Some(b) if b.is_ascii_lowercase() || b == b'_')
                && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
                && s.len() <= MAX_USER_NAME
        };
        let ok = match user.split_once(':') {
            Some((uid, gid)) => id(uid) && id(gid),
            None => id(user) || name(user),
        };
        if !ok {
            return Err(ALLOWED);
        }
        Ok(())
    }

    /// Whether `user` (a `USER` or a spec's user: `NAME`, `UID`, `NAME:GROUP` or
    /// `UID:GID`) is root: its user part is `root` or the number 0. A name is judged as
    /// written: what it maps to inside an image is the image's business.
    pub fn user_is_root(user: &str) -> bool {
        let uid = user.split_once(':').map_or(user, |(uid, _)| uid).trim();
        uid == "root"
            || (!uid.is_empty() && uid.bytes().all(|b| b.is_ascii_digit()) && uid.trim_start_matches('0').is_empty())
    }

    /// An environment variable name: `[A-Za-z_][A-Za-z0-9_]*`.
    pub fn env_name(name: &str) -> Result<(), &'static str> {
        let ok = !name.is_empty()
            && !name.starts_with(|c: char| c.is_ascii_digit())
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !ok {
            return Err("a variable name ([A-Za-z_][A-Za-z0-9_]*)");
        }
        Ok(())
    }

    /// The image reference grammar ([`image`]).
    mod image {
        const NAME: &str = "an image reference such as agentd-echo:latest or registry.example:5000/team/agent:1.2 \
            (lower-case name components of [a-z0-9] joined by '.', '_', '__' or '-', separated by '/')";
        const TAG: &str = "a tag of [A-Za-z0-9_.-], at most 128 characters, not starting with '.' or '-', after ':'";
        const DIGEST: &str = "a digest such as sha256: and 64 lower-case hex digits, after '@'";
        const LONG: &str = "an image name of at most 255 characters";
        const HOST: &str = "a registry host of [A-Za-z0-9-] labels joined by '.', or [IPv6], with an optional :PORT";

        pub(super) fn check(reference: &str) -> Result<(), &'static str> {
            if let Some(hex) = reference.strip_prefix("sha256:") {
                // An image id.
                return if is_hex(hex, 64) { Ok(()) } else { Err(DIGEST) };
            }
            let (rest, digest) = match reference.split_once('@') {
                Some((rest, digest)) => (rest, Some(digest)),
                None => (reference, None),
            };
            if let Some(digest) = digest {
                check_digest(digest)?;
            }
            let last = rest.rfind('/').map_or(0, |i| i + 1);
            let (name, tag) = match rest[last..].rfind(':') {
                Some(i) => (&rest[..last + i], Some(&rest[last + i + 1..])),
                None => (rest, None),
            };
            if let Some(tag) = tag {
                check_tag(tag)?;
            }
            if name.len() > super::MAX_IMAGE_NAME {
                return Err(LONG);
            }
            let (host, path) = match name.split_once('/') {
                Some((first, path))
                    if first.contains(['.', ':', '['])
                        || first == "localhost"
                        || first.bytes().any(|b| b.is_ascii_uppercase()) =>
                {
                    (Some(first), path)
                }
                _ => (None, name),
            };
            if let Some(host) = host {
                check_host(host)?;
            }
            if path.split('/').all(path_component) {
                Ok(())
            } else {
                Err(NAME)
            }
        }

        fn is_hex(s: &str, len: usize) -> bool {
            s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        }

        /// `[a-z0-9]+` runs joined by `.`, `_`, `__` or one or more `-`.
        fn path_component(component: &str) -> bool {
            let bytes = component.as_bytes();
            let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
            let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) else { return false };
            if !alnum(first) || !alnum(last) {
                return false;
            }
            let mut i = 0;
            while i < bytes.len() {
                if alnum(bytes[i]) {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < bytes.len() && !alnum(bytes[i]) {
                    i += 1;
                }
                let separator = &component[start..i];
                let ok = matches!(separator, "." | "_" | "__") || separator.bytes().all(|b| b == b'-');
                if !ok {
                    return false;
                }
            }
            true
        }

        fn check_tag(tag: &str) -> Result<(), &'static str> {
            let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
            let mut bytes = tag.bytes();
            let ok =
                tag.len() <= 128 && bytes.next().is_some_and(word) && bytes.all(|b| word(b) || b == b'.' || b == b'-');
            if ok {
                Ok(())
            } else {
                Err(TAG)
            }
        }

        fn check_digest(digest: &str) -> Result<(), &'static str> {
            let Some((algorithm, hex)) = digest.split_once(':') else { return Err(DIGEST) };
            let ok = match algorithm {
                "sha256" => is_hex(hex, 64),
                "sha512" => is_hex(hex, 128),
                _ => {
                    let component = |c: &str| {
                        let mut bytes = c.bytes();
                        bytes.next().is_some_and(|b| b.is_ascii_alphabetic())
                            && bytes.all(|b| b.is_ascii_alphanumeric())
                    };
                    algorithm.split(['+', '.', '_', '-']).all(component)
                        && hex.len() >= 32
                        && hex.bytes().all(|b| b.is_ascii_hexdigit())
                }
            };
            if ok {
                Ok(())
            } else {
                Err(DIGEST)
            }
        }

        fn check_host(host: &str) -> Result<(), &'static str> {
            let (name, port) = if let Some(v6) = host.strip_prefix('[') {
                let Some((address, rest)) = v6.split_once(']') else { return Err(HOST) };
                if address.parse::<std::net::Ipv6Addr>().is_err() {
                    return Err(HOST);
                }
                (None, if rest.is_empty() { None } else { Some(rest.strip_prefix(':').ok_or(HOST)?) })
            } else {
                match host.split_once(':') {
                    Some((name, port)) => (Some(name), Some(port)),
                    None => (Some(host), None),
                }
            };
            let label = |l: &str| {
                let bytes = l.as_bytes();
                !bytes.is_empty()
                    && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
                    && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
                    && bytes.iter().all(|b| b.is_ascii_alphanumeric() || *b == b'-')
            };
            let name_ok = name.is_none_or(|n| n.split('.').all(label));
            let port_ok = port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
            if name_ok && port_ok {
                Ok(())
            } else {
                Err(HOST)
            }
        }
    }
}

impl SessionSpec {
    /// A spec with the given names and image and defaults everywhere else: no command
    /// override, no env, no mounts, no limits, `internet`, the image's health check,
    /// a 10 s stop grace period.
    pub fn new(session: impl Into<String>, agent_id: impl Into<String>, image: impl Into<String>) -> Self {
        Self {
            session: session.into(),
            agent_id: agent_id.into(),
            image: image.into(),
            entrypoint: None,
            command: None,
            env: BTreeMap::new(),
            workdir: None,
            mounts: Vec::new(),
            volumes: Vec::new(),
            resources: Resources::default(),
            network: NetworkPolicy::Internet,
            user: None,
            health_check: HealthCheckSpec::Image,
            stop_grace: Duration::from_secs(10),
            read_only_rootfs: false,
            labels: BTreeMap::new(),
            stdin_open: false,
        }
    }

    /// Checks the spec for values no engine accepts; the error names the field.
    pub fn validate(&self) -> Result<(), BackendError> {
        let invalid = |field, message: String| Err(BackendError::InvalidSpec { field, message });
        let name_ok = |s: &str| {
            let mut bytes = s.bytes();
            matches!(bytes.next(), Some(b) if b.is_ascii_alphanumeric())
                && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        };
        if !name_ok(&self.session) || self.session.len() > 128 {
            return invalid(
                "session",
                format!(
                    "{:?} must start with a letter or digit and use only [A-Za-z0-9_.-], at most 128 characters",
                    self.session
                ),
            );
        }
        if self.agent_id.is_empty() {
            return invalid("agent_id", "must not be empty".into());
        }
        if let Err(allowed) = rules::image(&self.image) {
            return invalid("image", format!("{:?}: {allowed}", self.image));
        }
        if let Some(entrypoint) = &self.entrypoint {
            if entrypoint.first().is_none_or(String::is_empty) {
                return invalid("entrypoint", "must name a program; omit it to use the image's entrypoint".into());
            }
        }
        if let Some(command) = &self.command {
            // Under an entrypoint, the command is its arguments, which may be none.
            if self.entrypoint.is_none() && command.first().is_none_or(String::is_empty) {
                return invalid("command", "must name a program; omit it to use the image's entrypoint".into());
            }
        }
        for key in self.env.keys() {
            if let Err(allowed) = rules::env_name(key) {
                return invalid("env", format!("{key:?}: {allowed}"));
            }
        }
        if let Some(Err(allowed)) = self.user.as_deref().map(rules::user) {
            return invalid("user", format!("{:?}: {allowed}", self.user.as_deref().unwrap_or_default()));
        }
        if let Some(dir) = &self.workdir {
            if !dir.is_absolute() {
                return invalid("workdir", format!("{} must be an absolute host path", dir.display()));
            }
        }
        for mount in &self.mounts {
            if !mount.source.is_absolute() || !mount.target.is_absolute() {
                return invalid(
                    "mounts",
                    format!("{} -> {}: both paths must be absolute", mount.source.display(), mount.target.display()),
                );
            }
        }
        for volume in &self.volumes {
            let prefix = self.session.split('-').next().unwrap_or_default();
            if !name_ok(&volume.name) || !volume.name.starts_with(prefix) || !volume.target.is_absolute() {
                return invalid(
                    "volumes",
                    format!(
                        "{:?} at {}: the name must use [A-Za-z0-9_.-] and start like the session's, the target must be absolute",
                        volume.name,
                        volume.target.display()
                    ),
                );
            }
        }
        if let Some(Err(allowed)) = self.resources.memory_bytes.map(rules::memory_bytes) {
            let memory = self.resources.memory_bytes.unwrap_or_default();
            return invalid("resources.memory_bytes", format!("{memory}: {allowed}"));
        }
        if let Some(Err(allowed)) = self.resources.cpus.map(rules::cpus) {
            let cpus = self.resources.cpus.unwrap_or_default();
            return invalid("resources.cpus", format!("{cpus}: {allowed}"));
        }
        if let Some(Err(allowed)) = self.resources.pids_limit.map(rules::pids_limit) {
            let pids = self.resources.pids_limit.unwrap_or_default();
            return invalid("resources.pids_limit", format!("{pids}: {allowed}"));
        }
        if let HealthCheckSpec::Override(check) = &self.health_check {
            if check.command.is_empty() {
                return invalid("health_check.command", "must name a program".into());
            }
            if check.interval < Duration::from_millis(1) || check.timeout < Duration::from_millis(1) {
                return invalid("health_check", "interval and timeout must be at least 1 ms".into());
            }
            if check.retries == 0 {
                return invalid("health_check.retries", "must be at least 1".into());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_env_values() {
        let mut spec = SessionSpec::new("agentd-a", "id", "img:latest");
        spec.env.insert("ANTHROPIC_API_KEY".into(), "sk-secret".into());
        let debug = format!("{spec:?}");
        assert!(debug.contains("ANTHROPIC_API_KEY"));
        assert!(!debug.contains("sk-secret"), "{debug}");
    }

    #[test]
    fn invalid_specs_name_the_field() {
        let base = SessionSpec::new("agentd-a", "id", "img:latest");
        assert!(base.validate().is_ok());
        type Mutate = Box<dyn Fn(&mut SessionSpec)>;
        let cases: Vec<(&str, Mutate)> = vec![
            ("session", Box::new(|s| s.session = "-bad".into())),
            ("image", Box::new(|s| s.image = " ".into())),
            ("command", Box::new(|s| s.command = Some(vec![]))),
            ("entrypoint", Box::new(|s| s.entrypoint = Some(vec![]))),
            ("entrypoint", Box::new(|s| s.entrypoint = Some(vec![String::new(), "x".into()]))),
            ("env", Box::new(|s| drop(s.env.insert("A=B".into(), "x".into())))),
            ("workdir", Box::new(|s| s.workdir = Some("relative".into()))),
            ("resources.memory_bytes", Box::new(|s| s.resources.memory_bytes = Some(1024))),
            ("resources.cpus", Box::new(|s| s.resources.cpus = Some(0.0))),
            ("resources.cpus", Box::new(|s| s.resources.cpus = Some(1025.0))),
            ("env", Box::new(|s| drop(s.env.insert("1ABC".into(), "x".into())))),
            ("resources.pids_limit", Box::new(|s| s.resources.pids_limit = Some(0))),
            ("user", Box::new(|s| s.user = Some("1000:".into()))),
        ];
        for (field, mutate) in cases {
            let mut spec = base.clone();
            mutate(&mut spec);
            match spec.validate() {
                Err(BackendError::InvalidSpec { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: expected InvalidSpec, got {other:?}"),
            }
        }
    }

    #[test]
    fn image_references_follow_the_grammar() {
        let sha = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        for ok in [
            "agentd-echo:latest".to_owned(),
            "agentd-echo".into(),
            "busybox".into(),
            "library/busybox:1.36".into(),
            "docker.io/library/busybox:1.36.1-glibc".into(),
            "localhost/agentd-claude:latest".into(),
            "localhost:5000/team/agent:v1".into(),
            "registry.example.com:5000/a/b/c:TAG_1".into(),
            "Registry.Example/team/agent".into(),
            "[::1]:5000/agent:1".into(),
            "a__b.c_d---e:x".into(),
            format!("agentd-echo@sha256:{sha}"),
            format!("agentd-echo:latest@sha256:{sha}"),
            format!("sha256:{sha}"),
            sha.to_owned(),
            "a".repeat(255),
            format!("a:{}", "t".repeat(128)),
        ] {
            assert!(rules::image(&ok).is_ok(), "{ok}");
        }
        for bad in [
            "".to_owned(),
            " ".into(),
            "agentd-echo:latest;id".into(),
            "$(id)".into(),
            "`id`".into(),
            "a|b".into(),
            "AGENTD-ECHO:LATEST".into(),
            "agentd-echo:lat est".into(),
            "a".repeat(5000),
            "a".repeat(256),
            "agentd\0echo:latest".into(),
            "agentd-echo@sha256:zzz".into(),
            format!("agentd-echo@sha256:{}", sha.to_uppercase()),
            "sha256:".into(),
            "agentd-echo:".into(),
            "agentd-echo:-x".into(),
            format!("a:{}", "t".repeat(129)),
            ":latest".into(),
            "a/".into(),
            "/a".into(),
            "a//b".into(),
            "-a".into(),
            "a-".into(),
            "a...b".into(),
            "a___b".into(),
            "host:port/a".into(),
            "-host.example/a".into(),
            "[zz]:5000/a".into(),
            "a@".into(),
            "a@sha256".into(),
        ] {
            assert!(rules::image(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn limits_have_a_range_and_never_wrap() {
        assert!(rules::cpus(0.01).is_ok() && rules::cpus(1024.0).is_ok() && rules::cpus(2.5).is_ok());
        for bad in [1e-12, 0.009, 0.0, -1.0, 1024.5, f64::NAN, f64::INFINITY] {
            assert!(rules::cpus(bad).is_err(), "{bad}");
        }
        assert_eq!(rules::memory_mb_to_bytes(64), Some(64 << 20));
        assert_eq!(rules::memory_mb_to_bytes(1 << 40), Some(1 << 60));
        assert_eq!(rules::memory_mb_to_bytes((1 << 44) + 64), None, "2^44 + 64 MiB must not wrap to 64 MiB");
        assert_eq!(rules::memory_mb_to_bytes(1 << 44), None);
        assert_eq!(rules::memory_mb_to_bytes(5), None);
        assert!(rules::memory_mb(u64::MAX).is_err());
        assert!(rules::memory_bytes((1 << 60) + 1).is_err());
    }

    #[test]
    fn users_are_names_uids_or_uid_gid_pairs() {
        for ok in ["1000", "1000:1000", "0", "root", "agent", "_svc-1", "4294967295:0", &"a".repeat(32)] {
            assert!(rules::user(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ":",
            "1000:",
            ":1000",
            "Agent",
            "1a",
            "a b",
            "4294967296",
            "-1",
            "agent:agent",
            "1:2:3",
            &"a".repeat(33),
        ] {
            assert!(rules::user(bad).is_err(), "{bad}");
        }
        for root in ["0", "00", "root", "0:0", "0:1000", "root:root", "root:1000"] {
            assert!(rules::user_is_root(root), "{root}");
        }
        for other in ["1000", "1000:0", "rooty", "10", "", "65534:65534", "agent"] {
            assert!(!rules::user_is_root(other), "{other}");
        }
    }
}
