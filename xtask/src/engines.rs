//! Installing and starting Docker Engine and Podman without systemd.
//!
//! What works on these machines is written down in `.ci/podman/containers.conf` and
//! `backend-podman/README.md`: Debian's `docker.io` and `podman` packages, `dockerd`
//! started directly, and `podman system service` with a project-owned containers.conf.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{project_root, run_cmd};

const DOCKER_SOCKET: &str = "/var/run/docker.sock";
const PODMAN_SOCKET: &str = "/run/podman/podman.sock";
const PACKAGES: &str = "docker.io podman runc";

/// Where the engines answer, for the tests.
#[derive(Debug, Clone)]
pub struct Engines {
    pub docker_host: String,
    pub docker_cli: String,
    pub podman_url: String,
    pub containers_conf: String,
}

impl Engines {
    /// Environment for test processes: engines required, and where they are.
    pub fn test_vars(&self) -> Vec<(&str, &str)> {
        vec![
            ("CI", "true"),
            ("DOCKER_HOST", &self.docker_host),
            ("CONTAINER_HOST", &self.podman_url),
            ("CONTAINERS_CONF", &self.containers_conf),
        ]
    }
}

/// Installs what is missing (as root, with apt), starts what does not answer, and waits
/// until both engines answer.
pub fn provision() -> Result<Engines> {
    let containers_conf = project_root().join(".ci/podman/containers.conf");
    let containers_conf = containers_conf.to_string_lossy().to_string();
    let missing: Vec<&str> = ["dockerd", "podman", "runc"].into_iter().filter(|b| which(b).is_none()).collect();
    if !missing.is_empty() {
        install(&missing)?;
    }
    let docker_cli = which("docker").context("the docker client is missing after installing docker.io")?;

    if ping(Path::new(DOCKER_SOCKET), "/_ping").is_err() {
        let log = log_path("dockerd.log")?;
        println!("xtask: starting dockerd (log: {})", log.display());
        spawn_detached(Command::new("dockerd"), &log)?;
        wait_until_answers("Docker Engine", Path::new(DOCKER_SOCKET), "/_ping", &log)?;
    }
    println!("xtask: Docker Engine answers on {DOCKER_SOCKET}");

    if ping(Path::new(PODMAN_SOCKET), "/v4.0.0/libpod/_ping").is_err() {
        let _ = std::fs::remove_file(PODMAN_SOCKET);
        if let Some(dir) = Path::new(PODMAN_SOCKET).parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let log = log_path("podman-service.log")?;
        println!("xtask: starting the Podman service (log: {})", log.display());
        let mut cmd = Command::new("podman");
        cmd.args(["system", "service", "--time=0", &format!("unix://{PODMAN_SOCKET}")])
            .env("CONTAINERS_CONF", &containers_conf);
        spawn_detached(cmd, &log)?;
        wait_until_answers("Podman", Path::new(PODMAN_SOCKET), "/v4.0.0/libpod/_ping", &log)?;
    }
    println!("xtask: Podman answers on {PODMAN_SOCKET}");

    Ok(Engines {
        docker_host: format!("unix://{DOCKER_SOCKET}"),
        docker_cli: docker_cli.to_string_lossy().to_string(),
        podman_url: format!("unix://{PODMAN_SOCKET}"),
        containers_conf,
    })
}

fn install(missing: &[&str]) -> Result<()> {
    let is_root = Command::new("id").arg("-u").output().map(|o| o.stdout.starts_with(b"0")).unwrap_or(false);
    let has_apt = which("apt-get").is_some();
    if !is_root || !has_apt {
        bail!(
            "{} not installed, and this machine {}. Install them yourself:\n    sudo apt-get install -y {PACKAGES}\n\
             then run `cargo xtask ci` again",
            missing.join(", "),
            if has_apt { "is not run as root" } else { "has no apt-get" }
        );
    }
    println!("xtask: installing {PACKAGES} (missing: {})", missing.join(", "));
    let started = Instant::now();
    run_cmd(Command::new("apt-get").args(["update", "-q"]).env("DEBIAN_FRONTEND", "noninteractive"))?;
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "-q"])
            .args(PACKAGES.split(' '))
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    println!("xtask: packages installed in {:.0}s", started.elapsed().as_secs_f64());
    Ok(())
}

/// The path of `binary` on PATH (or in the sbin directories), if it is installed.
pub(crate) fn which(binary: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    let extra = ["/usr/sbin", "/sbin", "/usr/bin"];
    std::env::split_paths(&path)
        .chain(extra.iter().map(PathBuf::from))
        .map(|dir| dir.join(binary))
        .find(|candidate| candidate.is_file())
}

fn log_path(name: &str) -> Result<PathBuf> {
    let dir = project_root().join("target/engines");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir.join(name))
}

/// Starts a daemon in its own process group, detached from this one, logging to `log`.
fn spawn_detached(mut cmd: Command, log: &Path) -> Result<()> {
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    // Not the project root: conmon drops files (an `oom` marker on OOM kills) into its
    // working directory.
    let dir = log.parent().unwrap_or(Path::new("/"));
    cmd.stdin(Stdio::null()).stdout(out).stderr(err).process_group(0).current_dir(dir);
    let child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
    println!("xtask: started {:?} as pid {}", cmd.get_program(), child.id());
    Ok(())
}

fn wait_until_answers(what: &str, socket: &Path, path: &str, log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match ping(socket, path) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                let tail = std::fs::read_to_string(log).unwrap_or_default();
                let tail: Vec<&str> = tail.lines().rev().take(20).collect();
                bail!(
                    "{what} did not answer on {} within 60 s ({e}); last log lines:\n{}",
                    socket.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// A bare HTTP/1.0 GET over a unix socket; Ok when the answer is 200.
fn ping(socket: &Path, path: &str) -> Result<()> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    if answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200") {
        Ok(())
    } else {
        bail!("unexpected answer: {}", answer.lines().next().unwrap_or_default())
    }
}

/// The name of the container that keeps Podman's default bridge alive (see
/// [`pin_podman_bridge`]).
pub const PODMAN_ANCHOR: &str = "agentd-ci-podman-network-anchor";
/// The address `podman0` is pinned to: locally administered, and no container's.
const PODMAN_BRIDGE_MAC: &str = "02:88:00:00:00:01";

/// Gives Podman's default bridge one MAC address for the whole run.
///
/// netavark 1.4 (Debian 12) creates `podman0` with no address of its own, so the kernel
/// gives the bridge the lowest MAC of its ports and changes it whenever a container joins
/// or leaves. A running container keeps the old gateway MAC in its neighbour table, and
/// until that entry is renewed its packets to the host are sent to the wrong port: under
/// the parallel tests, an established agent's model connection stalled about once in a
/// few hundred turns (measured; see backend-podman/README.md). Docker sets a MAC on
/// `docker0` itself. An address set by hand is kept; netavark deletes the bridge with its
/// last container, so a small anchor container (the echo agent, no agentd labels) keeps
/// it, and with it the pinned address, for as long as the service runs.
pub fn pin_podman_bridge(env: &Engines) -> Result<()> {
    let podman = |args: &[&str]| {
        let mut cmd = Command::new("podman");
        cmd.args(["--url", &env.podman_url]).args(args);
        cmd
    };
    let running = podman(&["ps", "-q", "--filter", &format!("name=^{PODMAN_ANCHOR}$")])
        .output()
        .context("asking Podman for the network anchor")?;
    if String::from_utf8_lossy(&running.stdout).trim().is_empty() {
        let _ = podman(&["rm", "-f", PODMAN_ANCHOR]).output();
        run_cmd(&mut podman(&[
            "run",
            "-d",
            "--name",
            PODMAN_ANCHOR,
            "--network",
            "podman",
            "--memory",
            "32m",
            "localhost/agentd-echo:latest",
        ]))?;
    }
    let bridge = podman(&["network", "inspect", "podman", "--format", "{{.NetworkInterface}}"])
        .output()
        .context("asking Podman for its default bridge")?;
    let bridge = String::from_utf8_lossy(&bridge.stdout).trim().to_owned();
    if bridge.is_empty() {
        bail!("Podman names no interface for its default network `podman`");
    }
    run_cmd(Command::new("ip").args(["link", "set", &bridge, "address", PODMAN_BRIDGE_MAC]))?;
    println!("xtask: Podman's bridge {bridge} is pinned to {PODMAN_BRIDGE_MAC}, kept by {PODMAN_ANCHOR}");
    Ok(())
}
