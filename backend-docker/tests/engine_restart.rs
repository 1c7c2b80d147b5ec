//! The manager on a Docker Engine that goes away and comes back.
//!
//! The test runs a dockerd of its own (own socket, data and exec directories, its own
//! bridge interface and address pool, no iptables rules, no sysctl changes,
//! `--live-restore` so that containers outlive the daemon) and ends it by PID; the shared
//! engine is only read from, to copy the echo image. Without root, `dockerd` or `ip` the
//! test is skipped (saying why), and fails when `CI` is set.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use agent_manager::{AgentKind, AgentManager, AgentStatus, ManagerConfig, NewAgent, Store};
use backend_core::conformance::skip_or_fail;
use backend_core::{ExecutionBackend, NetworkPolicy, OwnershipLabels};
use backend_docker::{DockerBackend, DockerConfig};
use bollard::query_parameters::KillContainerOptions;
use tokio::time::Instant;

const IMAGE: &str = "agentd-echo:latest";
const ENGINE: &str = "Docker (a dockerd of the test's own)";

/// A dockerd of this test's own. Dropping it removes its containers and networks, ends
/// it (SIGTERM, then SIGKILL), and deletes its bridge interface and directories.
struct OwnDockerd {
    dir: PathBuf,
    bridge: String,
    child: Option<Child>,
}

fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program).args(args).output().map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("`{program} {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl OwnDockerd {
    /// Starts one and waits until it answers, or says why it cannot.
    fn launch() -> Result<Self, String> {
        let uid = Command::new("id").arg("-u").output().map_err(|e| format!("cannot run `id -u`: {e}"))?;
        if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
            return Err("a dockerd of the test's own needs root".into());
        }
        let found = Command::new("dockerd").arg("--version").output();
        if !found.is_ok_and(|o| o.status.success()) {
            return Err("dockerd is not on PATH".into());
        }
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let pid = std::process::id();
        let dir = std::env::temp_dir().join(format!("agentd-k8-{pid}-{nanos}"));
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        // The default bridge of its own: the shared engine's docker0 is not touched.
        let bridge = format!("agk8br{}", pid % 100_000);
        let address = format!("10.251.{}.1/24", pid % 250);
        run("ip", &["link", "add", &bridge, "type", "bridge"])?;
        let mut engine = Self { dir, bridge, child: None };
        run("ip", &["addr", "add", &address, "dev", &engine.bridge])?;
        run("ip", &["link", "set", &engine.bridge, "up"])?;
        engine.start()?;
        Ok(engine)
    }

    fn socket(&self) -> String {
        format!("unix://{}", self.dir.join("docker.sock").display())
    }

    fn start(&mut self) -> Result<(), String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("dockerd.log"))
            .map_err(|e| format!("cannot open the dockerd log: {e}"))?;
        let err = log.try_clone().map_err(|e| format!("cannot open the dockerd log: {e}"))?;
        let path = |name: &str| self.dir.join(name).display().to_string();
        let child = Command::new("dockerd")
            .args(["--data-root", &path("data"), "--exec-root", &path("exec")])
            // Its own namespaces, should it find a containerd the host's Docker shares.
            .args(["--containerd-namespace", &format!("agentd-k8-{}", std::process::id())])
            .args(["--containerd-plugins-namespace", &format!("agentd-k8-{}-plugins", std::process::id())])
            .args(["--host", &self.socket(), "--pidfile", &path("docker.pid")])
            .args(["--bridge", &self.bridge, "--default-address-pool", "base=10.252.0.0/16,size=24"])
            .args(["--iptables=false", "--ip-masq=false", "--ip-forward=false", "--live-restore"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start dockerd: {e}"))?;
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !self.answers() {
            if std::time::Instant::now() > deadline {
                return Err(format!("dockerd did not answer within 30 s; its log:\n{}", self.log_tail()));
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(format!("dockerd exited ({status}); its log:\n{}", self.log_tail()));
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    fn answers(&self) -> bool {
        let version = Command::new("docker").args(["--host", &self.socket(), "version"]).output();
        version.is_ok_and(|o| o.status.success())
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("dockerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Ends the dockerd by its PID: SIGTERM, then SIGKILL after 20 s.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let pid = child.id().to_string();
        if let Err(e) = Command::new("kill").args(["-TERM", &pid]).status() {
            eprintln!("could not send SIGTERM to dockerd {pid}: {e}");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
                _ => break,
            }
        }
        eprintln!("dockerd {pid} did not end within 20 s of SIGTERM; killing it");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Copies an image from the shared engine (`DOCKER_HOST`) into this one.
    fn load_image(&self, image: &str) -> Result<(), String> {
        let mut save = Command::new("docker")
            .args(["save", image])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run `docker save`: {e}"))?;
        let out = save.stdout.take().ok_or("`docker save` has no stdout")?;
        let load = Command::new("docker")
            .args(["--host", &self.socket(), "load"])
            .stdin(out)
            .output()
            .map_err(|e| format!("cannot run `docker load`: {e}"))?;
        let saved = save.wait_with_output().map_err(|e| format!("`docker save` failed: {e}"))?;
        if !saved.status.success() {
            return Err(format!(
                "`docker save {image}` on the shared engine failed ({}); build it with `cargo xtask images`",
                String::from_utf8_lossy(&saved.stderr).trim()
            ));
        }
        if !load.status.success() {
            return Err(format!("`docker load` failed: {}", String::from_utf8_lossy(&load.stderr).trim()));
        }
        Ok(())
    }
}

impl Drop for OwnDockerd {
    fn drop(&mut self) {
        if self.child.is_none() {
            // Down (a failure during the outage): bring it back, to remove what runs on it.
            if let Err(e) = self.start() {
                eprintln!("could not restart the test's dockerd to clean up: {e}");
            }
        }
        if self.child.is_some() {
            let socket = self.socket();
            let listed = Command::new("docker").args(["--host", &socket, "ps", "-aq"]).output();
            let ids: Vec<String> = listed
                .map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().map(str::to_owned).collect())
                .unwrap_or_default();
            if !ids.is_empty() {
                let removed = Command::new("docker").args(["--host", &socket, "rm", "-f"]).args(&ids).output();
                if !removed.is_ok_and(|o| o.status.success()) {
                    eprintln!("could not remove the containers {ids:?} of the test's dockerd");
                }
            }
            // Its networks' bridge interfaces go with the networks.
            if let Err(e) = run("docker", &["--host", &socket, "network", "prune", "--force"]) {
                eprintln!("{e}");
            }
        }
        self.stop();
        if let Err(e) = run("ip", &["link", "del", &self.bridge]) {
            eprintln!("{e}");
        }
        // dockerd bind-mounts its data root on itself and, with live-restore, leaves it.
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let data = self.dir.join("data").display().to_string();
        if mounts.lines().any(|l| l.split_whitespace().nth(1) == Some(data.as_str())) {
            if let Err(e) = run("umount", &[&data]) {
                eprintln!("{e}");
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!("could not remove {}: {e}", self.dir.display());
        }
    }
}

/// Waits at most `bound` for `check`, polling every 20 ms; `false` if it never held.
async fn within<F, Fut>(bound: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + bound;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outside_kill_right_after_an_engine_restart_is_noticed_from_the_new_event_stream() {
    let engine = match tokio::task::spawn_blocking(|| {
        let engine = OwnDockerd::launch()?;
        engine.load_image(IMAGE)?;
        Ok::<_, String>(engine)
    })
    .await
    .expect("join")
    {
        Ok(engine) => engine,
        Err(why) => {
            skip_or_fail::<()>(ENGINE, why);
            return;
        }
    };
    let engine = Arc::new(std::sync::Mutex::new(engine));
    let socket = engine.lock().expect("engine").socket();
    let instance = format!("k8-{}", std::process::id());
    let owner = OwnershipLabels::new("agentd-k8", instance).expect("labels");
    let docker = DockerBackend::connect(DockerConfig { socket: Some(socket), ..DockerConfig::default() }, owner)
        .await
        .expect("connect to the test's dockerd");
    let client = docker.client().clone();
    let backend: Arc<dyn ExecutionBackend> = Arc::new(docker);
    let mut config = ManagerConfig::default();
    config.defaults.kind = AgentKind::Image;
    config.defaults.image = IMAGE.into();
    // No traffic to speak of: the test's dockerd routes nothing.
    config.defaults.network = Some(NetworkPolicy::None);
    config.defaults.stop_grace_secs = 1;
    // A relist every 6 s: an outside kill noticed much sooner came from events.
    config.reconcile.interval = Duration::from_secs(6);
    let store = Store::in_memory().await.expect("store");
    let manager = Arc::new(AgentManager::new(backend, store, config));
    let victim = manager.spawn(NewAgent { name: "victim".into(), ..NewAgent::default() }).await.expect("spawn");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let supervisor = tokio::spawn(manager.clone().supervise(stopped));
    let metrics = || manager.metrics().snapshot();
    assert!(within(Duration::from_secs(10), || async { metrics().reconcile_passes >= 1 }).await, "no first pass");

    // A 20 s outage: the event stream's reconnect backoff grows meanwhile (to 16 s and
    // more), and the supervisor's passes fail.
    let failures = metrics().reconcile_failures;
    {
        let engine = engine.clone();
        tokio::task::spawn_blocking(move || engine.lock().expect("engine").stop()).await.expect("stop dockerd");
    }
    assert!(
        within(Duration::from_secs(20), || async { metrics().reconcile_failures > failures }).await,
        "the supervisor did not notice the outage"
    );
    tokio::time::sleep(Duration::from_secs(20)).await;
    {
        let engine = engine.clone();
        tokio::task::spawn_blocking(move || engine.lock().expect("engine").start())
            .await
            .expect("join")
            .expect("restart dockerd");
    }

    // Recovery is noticed (a pass succeeds); a kill right after it is noticed promptly.
    let passes = metrics().reconcile_passes;
    assert!(
        within(Duration::from_secs(20), || async { metrics().reconcile_passes > passes }).await,
        "no pass succeeded within 20 s of the engine's return"
    );
    let running = manager.get("victim").await.expect("victim").agent;
    assert_eq!(running.status, AgentStatus::Running, "the container outlives the engine restart: {running:?}");
    client
        .kill_container(&victim.agent.session, Some(KillContainerOptions { signal: "SIGKILL".into() }))
        .await
        .expect("docker kill");
    let killed = Instant::now();
    let noticed = within(Duration::from_secs(3), || async {
        manager.get("victim").await.is_ok_and(|v| v.agent.status == AgentStatus::Failed)
    })
    .await;
    assert!(noticed, "an outside kill right after the engine came back was not noticed within 3 s");
    eprintln!("outside kill noticed {} ms after it happened", killed.elapsed().as_millis());

    stop.send(true).expect("stop the supervisor");
    tokio::time::timeout(Duration::from_secs(10), supervisor).await.expect("the supervisor stops").expect("join");
    let summary = manager.shutdown_all(false).await.expect("shutdown");
    assert!(summary.not_removed.is_empty() && summary.sweep_error.is_none(), "{summary:?}");
    drop(manager);
    tokio::task::spawn_blocking(move || drop(engine)).await.expect("end the test's dockerd");
}
