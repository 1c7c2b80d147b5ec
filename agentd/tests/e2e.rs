//! End to end: the real `agentd` binary on a real engine, driven over HTTP and the CLI.
//!
//! Every test runs against Docker and against Podman (`docker_*` / `podman_*`), each with
//! its own prefix, instance id, port and database, and removes its containers at the end
//! (also when it fails).
#![allow(unsafe_code)] // kill(2) to send SIGTERM to the daemon

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use backend_core::conformance::skip_or_fail;
use backend_core::OwnershipLabels;
use serde_json::{json, Value};

mod support;

const IMAGE: &str = "agentd-echo:latest";
/// The real Claude Code image (`cargo xtask images` builds it).
const CLAUDE_IMAGE: &str = "agentd-claude:latest";
const PATIENCE: Duration = Duration::from_secs(90);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Engine {
    Docker,
    Podman,
}

impl Engine {
    fn name(self) -> &'static str {
        match self {
            Engine::Docker => "docker",
            Engine::Podman => "podman",
        }
    }

    /// Whether the engine and the echo image are there (skip or fail otherwise).
    fn available(self) -> bool {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(self.probe(&[IMAGE]))
    }

    /// Whether the engine and the echo and Claude Code images are there.
    fn has_claude(self) -> bool {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(self.probe(&[IMAGE, CLAUDE_IMAGE]))
    }

    /// The host name containers on the engine's default network reach the host by.
    fn host_alias(self) -> &'static str {
        match self {
            Engine::Docker => "host.docker.internal",
            Engine::Podman => "host.containers.internal",
        }
    }

    async fn probe(self, images: &[&str]) -> bool {
        let owner = OwnershipLabels::new("agentd-probe", "probe").expect("labels");
        // The daemon's own registry connects the engine, with its section's defaults.
        let factory = agentd::backends::BACKENDS
            .iter()
            .find(|f| f.name() == self.name())
            .unwrap_or_else(|| panic!("{} is not a registered backend", self.name()));
        let backend = factory.connect(backend_core::Section::Null, owner).await;
        let label = self.name();
        let backend = match backend {
            Err(e) => return skip_or_fail::<()>(label, e).is_some(),
            Ok(b) => b,
        };
        for image in images {
            match backend.image_exists(image).await {
                Ok(true) => {}
                Ok(false) => {
                    return skip_or_fail::<()>(label, format!("image {image} is missing; run `cargo xtask images`"))
                        .is_some()
                }
                Err(e) => return skip_or_fail::<()>(label, e).is_some(),
            }
        }
        true
    }

    /// The engine's CLI, for interference from outside and cleanup.
    fn cli(self) -> Command {
        let mut cmd = Command::new(self.name());
        if self == Engine::Podman {
            if let Ok(url) = std::env::var("CONTAINER_HOST") {
                cmd.args(["--url", &url]);
            } else {
                cmd.args(["--url", "unix:///run/podman/podman.sock"]);
            }
        }
        cmd.stdin(Stdio::null());
        cmd
    }

    fn run(self, args: &[&str]) -> Output {
        let out = self.cli().args(args).output().unwrap_or_else(|e| panic!("{} {args:?}: {e}", self.name()));
        assert!(out.status.success(), "{} {args:?} failed: {}", self.name(), String::from_utf8_lossy(&out.stderr));
        out
    }

    fn inspect(self, container: &str, format: &str) -> String {
        let out = self.run(&["inspect", "--format", format, container]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

fn unique(tag: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    format!("{tag}{:x}", (nanos as u64) ^ u64::from(std::process::id()) << 32)
}

/// A port free now and never handed out before in this test process: two ports taken
/// one after the other can be the same one (the first was only bound for a moment),
/// which a daemon refuses as `gateway.port` and `gateway.proxy_port` both.
fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port");
        let mut given = GIVEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// One daemon configuration: engine, prefix, instance, port, database.
struct Setup {
    engine: Engine,
    prefix: String,
    instance: String,
    port: u16,
    db: PathBuf,
    env: BTreeMap<String, String>,
}

impl Setup {
    fn new(engine: Engine, tag: &str) -> Self {
        let id = unique(tag);
        // A data directory of its own: agentd never gives an agent its data directory, or
        // anything above it, so the database must not sit in the temp dir itself.
        let data = std::env::temp_dir().join(format!("agentd-e2e-{id}"));
        std::fs::create_dir_all(&data).expect("data directory");
        let db = data.join("agentd.db");
        let port = free_port();
        let mut env = BTreeMap::new();
        // Every daemon on an engine serves the model gateway (and, later, the proxy) on the
        // engine's gateway addresses: ports of its own, so that tests run side by side.
        env.insert("AGENTD_GATEWAY__PORT".to_owned(), free_port().to_string());
        env.insert("AGENTD_GATEWAY__PROXY_PORT".to_owned(), free_port().to_string());
        for (k, v) in [
            ("AGENTD_BACKEND", engine.name().to_owned()),
            ("AGENTD_INSTANCE_ID", format!("i-{id}")),
            ("AGENTD_STORE__PATH", db.display().to_string()),
            ("AGENTD_SERVER__LISTEN", format!("127.0.0.1:{port}")),
            ("AGENTD_AGENTS__PREFIX", format!("e2e{id}")),
            ("AGENTD_AGENTS__KIND", "image".to_owned()),
            ("AGENTD_AGENTS__IMAGE", IMAGE.to_owned()),
            ("AGENTD_AGENTS__STOP_GRACE_SECS", "3".to_owned()),
            // A relist only at start: anything detected later came from engine events.
            ("AGENTD_RECONCILE__INTERVAL_SECS", "3600".to_owned()),
            ("AGENTD_RECONCILE__ORPHAN_GRACE_SECS", "0".to_owned()),
            ("AGENTD_LOG__FORMAT", "json".to_owned()),
            ("AGENTD_LOG__LEVEL", "info".to_owned()),
            // Each daemon its own egress proxy port on the engine's gateway addresses.
            ("AGENTD_GATEWAY__PROXY_PORT", free_port().to_string()),
            // A model credential, without which claude-code spawns are refused; tests that
            // talk to a model replace it (`use_model`).
            ("ANTHROPIC_API_KEY", "sk-ant-e2e-unused".to_owned()),
        ] {
            env.insert(k.to_owned(), v);
        }
        Self { engine, prefix: format!("e2e{id}"), instance: format!("i-{id}"), port, db, env }
    }

    fn set(&mut self, key: &str, value: &str) {
        self.env.insert(key.to_owned(), value.to_owned());
    }

    /// Makes the stand-in the daemon's `model.upstream` and gives the daemon a credential of
    /// this test's own (`ANTHROPIC_API_KEY` in its environment); returns the credential.
    fn use_model(&mut self, model: &support::model::StandIn) -> String {
        let credential = format!("sk-ant-e2e-credential-{}", unique("k"));
        self.set("AGENTD_MODEL__UPSTREAM", &model.base_url());
        self.set("ANTHROPIC_API_KEY", &credential);
        credential
    }

    /// The daemon's log file (it outlives the daemon until the setup is dropped).
    fn log_text(&self) -> String {
        std::fs::read_to_string(format!("{}.log", self.db.display())).unwrap_or_default()
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_agentd"));
        cmd.args(args).env("XDG_CONFIG_HOME", std::env::temp_dir().join("agentd-e2e-no-config"));
        for (key, _) in std::env::vars() {
            if key.starts_with("AGENTD_") || agent_manager::MODEL_ENV.contains(&key.as_str()) {
                cmd.env_remove(key);
            }
        }
        cmd.envs(&self.env).env("AGENTD_URL", self.base()).stdin(Stdio::null());
        cmd
    }

    /// Starts `agentd serve` and waits until `/healthz` answers.
    fn start(&self) -> Daemon {
        let log = std::env::temp_dir().join(format!("{}.log", self.db.display()));
        let file = std::fs::File::create(&log).expect("log file");
        let child = self.command(&["serve"]).stdout(Stdio::null()).stderr(file).spawn().expect("start agentd serve");
        let daemon = Daemon { child, log, base: self.base() };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(body) = http("GET", &format!("{}/healthz", daemon.base), None) {
                assert_eq!(body["status"], "ok");
                return daemon;
            }
            assert!(Instant::now() < deadline, "agentd did not answer within 30 s; log:\n{}", daemon.log_text());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs a CLI command and returns its stdout; panics with stderr if it fails.
    fn cli(&self, args: &[&str]) -> String {
        let out = self.command(args).output().expect("run agentd");
        assert!(out.status.success(), "agentd {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn agent(&self, name: &str) -> Value {
        http("GET", &format!("{}/v1/agents/{name}", self.base()), None)
            .unwrap_or_else(|e| panic!("GET agent {name}: {e}"))
    }

    /// Waits until `check` holds for the agent's JSON.
    fn wait_agent(&self, daemon: &Daemon, name: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let agent = self.agent(name);
            if check(&agent) {
                return agent;
            }
            assert!(
                Instant::now() < deadline,
                "agent {name} never became {what}: {agent}\nlog:\n{}",
                daemon.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        // Remove every container of this test's prefix, whatever happened.
        let filter = format!("label=agentd.prefix={}", self.prefix);
        if let Ok(out) = self.engine.cli().args(["ps", "-aq", "--filter", &filter]).output() {
            let ids: Vec<String> = String::from_utf8_lossy(&out.stdout).split_whitespace().map(str::to_owned).collect();
            if !ids.is_empty() {
                let _ = self.engine.cli().args(["rm", "-f"]).args(&ids).output();
            }
        }
        // The daemon's host firewall rules, which a killed or leave-running daemon keeps.
        remove_rules_tagged(&format!("agentd:{}", self.instance));
        for suffix in ["", "-wal", "-shm", ".lock", ".log"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.db.display()));
        }
        if let Some(data) = self.db.parent() {
            let _ = std::fs::remove_dir(data);
        }
    }
}

struct Daemon {
    child: Child,
    log: PathBuf,
    base: String,
}

impl Daemon {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits for the process to exit; returns how long that took.
    fn terminate(mut self) -> Duration {
        let started = Instant::now();
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: sending a signal to our own child process.
        let sent = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(sent, 0, "kill(SIGTERM) failed");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(status.success(), "agentd exited with {status}; log:\n{}", self.log_text());
                return started.elapsed();
            }
            assert!(Instant::now() < deadline, "agentd did not exit within 120 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A blocking HTTP call: JSON in, JSON out.
fn http(method: &str, url: &str, body: Option<Value>) -> Result<Value, String> {
    http_as(method, url, body, None)
}

/// [`http`] with a bearer token.
fn http_as(method: &str, url: &str, body: Option<Value>, token: Option<&str>) -> Result<Value, String> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async {
        let client = reqwest::Client::new();
        let mut request = client.request(method.parse().map_err(|_| "method")?, url).timeout(Duration::from_secs(30));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.map_err(|e| e.to_string())?;
        let status = response.status();
        let text = response.text().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("{status}: {text}"));
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    })
}

fn exit_code(agent: &Value) -> Option<i64> {
    agent["exit"]["code"].as_i64()
}

/// Exit 0 → stopped; exit 3 → failed with 3; OOM → failed, OOM-killed; a kill from outside
/// → failed; all learned from engine events (the periodic relist is an hour away).
fn lifecycle_is_tracked_from_events(engine: Engine) {
    if !engine.available() {
        return;
    }
    let setup = Setup::new(engine, "life");
    let daemon = setup.start();
    setup.cli(&["spawn", "zero", "--env", "ECHO_EXIT_AFTER_MS=1500"]);
    setup.cli(&["spawn", "three", "--env", "ECHO_EXIT_AFTER_MS=1500", "--env", "ECHO_EXIT_CODE=3"]);
    setup.cli(&["spawn", "hog", "--memory-mb", "64", "--env", "ECHO_ALLOC_MB=256"]);
    let victim = setup.cli(&["spawn", "victim"]);
    assert!(victim.contains("victim running"), "{victim}");

    let zero = setup.wait_agent(&daemon, "zero", "stopped", |a| a["status"] == "stopped");
    assert_eq!(exit_code(&zero), Some(0), "{zero}");
    let three = setup.wait_agent(&daemon, "three", "failed", |a| a["status"] == "failed");
    assert_eq!(exit_code(&three), Some(3), "{three}");
    let hog = setup.wait_agent(&daemon, "hog", "failed", |a| a["status"] == "failed");
    assert_eq!(hog["exit"]["oom_killed"], true, "{hog}");
    assert_eq!(exit_code(&hog), Some(137), "{hog}");

    let session = setup.agent("victim")["session"].as_str().expect("session").to_owned();
    setup.wait_agent(&daemon, "victim", "healthy", |a| a["health"] == "healthy");
    // Let wake-ups from the spawns settle, then count passes across the kill.
    std::thread::sleep(Duration::from_millis(1500));
    let passes_before = passes(&setup);
    engine.run(&["kill", "--signal", "KILL", &session]);
    let victim = setup.wait_agent(&daemon, "victim", "failed", |a| a["status"] == "failed");
    assert_eq!(exit_code(&victim), Some(137), "{victim}");
    assert_eq!(victim["exit"]["oom_killed"], false, "{victim}");

    assert_eq!(passes(&setup), passes_before, "the kill was learned from a relist, not from the engine's events");
    let table = setup.cli(&["ls", "-a", "-o", "wide"]);
    for row in ["zero", "three", "hog", "victim"] {
        assert!(table.contains(row), "{table}");
    }
    assert!(table.contains("oom(137)"), "{table}");
    let events = setup.cli(&["events", "--since", "0", "--agent", "three"]);
    assert!(events.contains("failed") && events.contains("exit 3"), "{events}");
    daemon.terminate();
}

/// Completed reconcile passes, from `/metrics`.
fn passes(setup: &Setup) -> u64 {
    let metrics = reqwest_text(&format!("{}/metrics", setup.base()));
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("agentd_reconcile_passes_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no pass counter in:\n{metrics}"))
}

fn reqwest_text(url: &str) -> String {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    rt.block_on(async { reqwest::get(url).await.expect("get").text().await.expect("text") })
}

/// At start-up, an orphan of this instance is removed; another instance's container and a
/// foreign one are left alone.
fn orphans_are_cleaned_up_at_start(engine: Engine) {
    if !engine.available() {
        return;
    }
    let setup = Setup::new(engine, "orph");
    let label = |k: &str, v: &str| format!("--label={k}={v}");
    let orphan = format!("{}-orphan", setup.prefix);
    let theirs = format!("{}-theirs", setup.prefix);
    let foreign = format!("{}-foreign", setup.prefix);
    let image = if engine == Engine::Podman { format!("localhost/{IMAGE}") } else { IMAGE.to_owned() };
    for (name, instance) in [(&orphan, setup.instance.as_str()), (&theirs, "another-instance")] {
        engine.run(&[
            "run",
            "-d",
            "--name",
            name,
            &label("agentd.prefix", &setup.prefix),
            &label("agentd.instance", instance),
            &label("agentd.session", name),
            &label("agentd.agent-id", "nobody"),
            &image,
        ]);
    }
    engine.run(&["run", "-d", "--name", &foreign, &label("agentd.prefix", &setup.prefix), &image]);
    let daemon = setup.start();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let out = engine.cli().args(["inspect", &orphan]).output().expect("inspect");
        if !out.status.success() {
            break;
        }
        assert!(Instant::now() < deadline, "the orphan was not removed; log:\n{}", daemon.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(engine.inspect(&theirs, "{{.State.Running}}"), "true", "another instance's container was touched");
    assert_eq!(engine.inspect(&foreign, "{{.State.Running}}"), "true", "a foreign container was touched");
    let events = setup.cli(&["events", "--since", "0"]);
    assert!(events.contains("orphan_removed") && events.contains(&orphan), "{events}");
    daemon.terminate();
}

/// SIGTERM without leave-running stops every agent in parallel: ten agents that ignore
/// SIGTERM, with a 3 s grace each, are all stopped (and recorded) well within 10 × 3 s.
fn sigterm_stops_all_agents_in_parallel(engine: Engine) {
    if !engine.available() {
        return;
    }
    let setup = Setup::new(engine, "term");
    let daemon = setup.start();
    for i in 0..10 {
        let name = format!("stubborn{i}");
        http(
            "POST",
            &format!("{}/v1/agents", setup.base()),
            Some(json!({ "name": name, "env": { "ECHO_IGNORE_SIGTERM": "1" }, "stop_grace_secs": 3 })),
        )
        .expect("spawn");
    }
    let took = daemon.terminate();
    eprintln!("{}: SIGTERM with 10 agents (3 s grace each) took {took:?}", engine.name());
    assert!(took < Duration::from_secs(15), "shutdown took {took:?}: agents were not stopped in parallel");
    let filter = format!("label=agentd.prefix={}", setup.prefix);
    let out = engine.run(&["ps", "-q", "--filter", &filter]);
    assert!(String::from_utf8_lossy(&out.stdout).trim().is_empty(), "containers still running after shutdown");
    // The next start shows every exit recorded, on purpose: stopped, 137 after the grace.
    let daemon = setup.start();
    for i in 0..10 {
        let agent = setup.agent(&format!("stubborn{i}"));
        assert_eq!(agent["status"], "stopped", "{agent}");
        assert_eq!(exit_code(&agent), Some(137), "{agent}");
    }
    daemon.terminate();
}

/// SIGTERM with leave-running, then a new daemon: the same container is adopted, stays
/// running, is attached again with no restart, and answers.
fn leave_running_then_restart_adopts_the_same_containers(engine: Engine) {
    if !engine.available() {
        return;
    }
    let mut setup = Setup::new(engine, "adopt");
    setup.set("AGENTD_SHUTDOWN_LEAVE_RUNNING", "true");
    let daemon = setup.start();
    // The echo agent speaking stream-json, as claude-code agents do.
    setup.cli(&["spawn", "keeper", "--kind", "claude-code", "--image", IMAGE]);
    let before = setup.wait_agent(&daemon, "keeper", "attached", |a| a["connected"] == true);
    let container = engine.inspect(before["session"].as_str().expect("session"), "{{.Id}}");
    daemon.terminate();
    assert_eq!(engine.inspect(&container, "{{.State.Running}}"), "true", "leave-running stopped the container");

    let daemon = setup.start();
    let after = setup.wait_agent(&daemon, "keeper", "attached again", |a| a["connected"] == true);
    assert_eq!(after["status"], "running");
    assert_eq!(after["restarts"], 0, "{after}");
    assert_eq!(
        engine.inspect(after["session"].as_str().expect("session"), "{{.Id}}"),
        container,
        "not the same container"
    );
    let events = setup.cli(&["events", "--since", "0", "--agent", "keeper"]);
    assert!(events.contains("left_running") && events.contains("adopted"), "{events}");
    let out = setup.cli(&["send", "keeper", "still there?"]);
    assert!(out.contains("echo: still there?"), "{out}");
    // Clean up: this time stop everything.
    setup.cli(&["rm", "-f", "keeper"]);
    daemon.terminate();
}

/// Spawns a claude-code agent of the real image; it reaches the model through agentd's
/// gateway (agentd sets its `ANTHROPIC_*`; see [`Setup::use_model`]).
fn spawn_claude(setup: &Setup, name: &str, extra: &[&str]) {
    let mut args = vec!["spawn", name, "--kind", "claude-code", "--image", CLAUDE_IMAGE];
    args.extend(extra);
    setup.cli(&args);
}

/// The conversation of an agent as the API lists it.
fn conversation(setup: &Setup, name: &str) -> Vec<Value> {
    let entries = http("GET", &format!("{}/v1/agents/{name}/conversation?limit=10000", setup.base()), None)
        .unwrap_or_else(|e| panic!("GET conversation of {name}: {e}"));
    entries.as_array().cloned().unwrap_or_default()
}

fn from_agent<'a>(entries: &'a [Value], kind: &str) -> Vec<&'a Value> {
    entries.iter().filter(|e| e["direction"] == "from_agent" && e["kind"] == kind).collect()
}

/// How long from `POST /messages` until the turn's result is in the API, over `turns`
/// messages; the median.
fn api_turn_latency(setup: &Setup, name: &str, turns: usize) -> Duration {
    let mut took = Vec::new();
    for i in 0..turns {
        let before = from_agent(&conversation(setup, name), "result").len();
        let started = Instant::now();
        http(
            "POST",
            &format!("{}/v1/agents/{name}/messages", setup.base()),
            Some(json!({ "text": format!("ping {i}") })),
        )
        .expect("post message");
        let deadline = Instant::now() + PATIENCE;
        while from_agent(&conversation(setup, name), "result").len() == before {
            assert!(Instant::now() < deadline, "no result for ping {i}");
            std::thread::sleep(Duration::from_millis(5));
        }
        took.push(started.elapsed());
    }
    took.sort();
    took[took.len() / 2]
}

/// The same turns with claude in `<engine> run -i`, talking to the same stand-in with no
/// agentd in between: from writing the user line to reading the result line; the median.
fn direct_turn_latency(engine: Engine, model_url: &str, turns: usize) -> Duration {
    use std::io::{BufRead, BufReader, Write};
    let session = uuid::Uuid::new_v4().to_string();
    let mut cmd = engine.cli();
    cmd.args([
        "run",
        "-i",
        "--rm",
        "-e",
        &format!("ANTHROPIC_BASE_URL={model_url}"),
        "-e",
        "ANTHROPIC_API_KEY=sk-direct",
    ]);
    if engine == Engine::Docker {
        // agentd adds this for its agents on Docker; Podman adds host.containers.internal itself.
        cmd.args(["--add-host", "host.docker.internal:host-gateway"]);
    }
    let mut child = cmd
        .args([CLAUDE_IMAGE, "claude", "-p", "--input-format", "stream-json", "--output-format", "stream-json"])
        .args(["--verbose", "--permission-prompt-tool", "stdio", "--session-id", &session])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run claude directly");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut took = Vec::new();
    for i in 0..=turns {
        let started = Instant::now();
        let message = json!({"type": "user", "message": {"role": "user", "content": format!("direct {i}")}, "parent_tool_use_id": null, "session_id": ""});
        writeln!(stdin, "{message}").expect("write");
        stdin.flush().expect("flush");
        loop {
            let line = lines.next().expect("claude ended early").expect("read");
            if serde_json::from_str::<Value>(&line).is_ok_and(|v| v["type"] == "result") {
                break;
            }
        }
        // The first turn includes the process's start-up, as agentd's first turn does not.
        if i > 0 {
            took.push(started.elapsed());
        }
    }
    drop(stdin);
    let _ = child.wait();
    took.sort();
    took[took.len() / 2]
}

/// The real Claude Code CLI in its image, against the stand-in model: a message is
/// answered through `agentd send`, the conversation API shows both sides and the cost,
/// and after a leave-running restart the adopted container's same session answers a
/// second message, with the conversation whole: no gap, no double.
fn claude_code_converses_and_survives_adoption(engine: Engine) {
    if !engine.has_claude() {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    // On loopback only: the agent reaches it through agentd's gateway or not at all.
    let model = rt.block_on(support::model::StandIn::start_loopback());
    model.push(support::model::Reply::text("Hello from the stand-in."));
    model.push(support::model::Reply::text("Second answer, same session."));

    let mut setup = Setup::new(engine, "claude");
    setup.set("AGENTD_SHUTDOWN_LEAVE_RUNNING", "true");
    let credential = setup.use_model(&model);
    let daemon = setup.start();
    let spawned = Instant::now();
    spawn_claude(&setup, "coder", &[]);
    let reply = setup.cli(&["send", "coder", "hello"]);
    let first_reply = spawned.elapsed();
    assert!(reply.contains("Hello from the stand-in."), "agentd send printed: {reply}\nlog:\n{}", daemon.log_text());
    eprintln!("measured: {}: spawn to first reply with the stand-in: {first_reply:?}", engine.name());

    let entries = conversation(&setup, "coder");
    let users: Vec<&Value> = entries.iter().filter(|e| e["direction"] == "to_agent" && e["kind"] == "user").collect();
    assert_eq!(users.len(), 1, "{entries:#?}");
    assert_eq!(users[0]["text"], "hello");
    assert_eq!(users[0]["delivery"], "delivered");
    assert!(from_agent(&entries, "assistant").iter().any(|e| e["text"] == "Hello from the stand-in."), "{entries:#?}");
    let results = from_agent(&entries, "result");
    assert_eq!(results.len(), 1, "{entries:#?}");
    assert!(results[0]["data"]["total_cost_usd"].is_number(), "the result carries its cost: {}", results[0]);
    let agent = setup.agent("coder");
    let session_id = agent["session_id"].as_str().expect("session_id").to_owned();
    assert_eq!(session_id, agent["id"].as_str().expect("id"), "claude runs with --session-id <agent id>");
    assert_eq!(agent["turn"], "idle", "{agent}");
    assert!(agent["cost_usd"].is_number(), "{agent}");
    assert_eq!(agent["last_result"]["subtype"], "success", "{agent}");
    let container = engine.inspect(agent["session"].as_str().expect("session"), "{{.Id}}");
    let request = model.requests().into_iter().find(|r| r.path.starts_with("/v1/messages")).expect("a model request");
    assert_eq!(request.header("x-api-key"), Some(credential.as_str()), "the stand-in gets the daemon's credential");
    let env = engine.inspect(&container, "{{range .Config.Env}}{{println .}}{{end}}");
    assert!(env.lines().any(|l| l.starts_with("ANTHROPIC_API_KEY=agentd-gw-")), "the agent's own secret: {env}");
    assert!(env.lines().any(|l| l.starts_with("ANTHROPIC_BASE_URL=http://")), "the gateway: {env}");
    assert_no_credential(&setup, engine, "coder", &credential);

    // Leave it running, start a new daemon, and talk again.
    daemon.terminate();
    assert_eq!(engine.inspect(&container, "{{.State.Running}}"), "true", "leave-running stopped the container");
    let daemon = setup.start();
    setup.wait_agent(&daemon, "coder", "attached again", |a| a["connected"] == true);
    let reply = setup.cli(&["send", "coder", "are you still there?"]);
    assert!(reply.contains("Second answer, same session."), "{reply}\nlog:\n{}", daemon.log_text());
    let agent = setup.agent("coder");
    assert_eq!(agent["session_id"], session_id.as_str());
    assert_eq!(agent["restarts"], 0);
    assert_eq!(engine.inspect(agent["session"].as_str().expect("session"), "{{.Id}}"), container, "the same container");
    let second_request = model.requests().into_iter().rfind(|r| r.path.starts_with("/v1/messages")).expect("request");
    assert!(
        second_request.message_texts().iter().any(|t| t.contains("hello")),
        "the same session's history reached the model: {:?}",
        second_request.message_texts()
    );

    let entries = conversation(&setup, "coder");
    let seqs: Vec<i64> = entries.iter().filter_map(|e| e["seq"].as_i64()).collect();
    assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>(), "no gap and no double");
    assert_eq!(from_agent(&entries, "result").len(), 2, "{entries:#?}");
    let inits = entries.iter().filter(|e| e["direction"] == "to_agent" && e["text"] == "initialize").count();
    assert_eq!(inits, 1, "one handshake per container");
    let users: Vec<&str> = entries
        .iter()
        .filter(|e| e["direction"] == "to_agent" && e["kind"] == "user")
        .filter_map(|e| e["text"].as_str())
        .collect();
    assert_eq!(users, ["hello", "are you still there?"]);
    let assistants: Vec<&str> = from_agent(&entries, "assistant").iter().filter_map(|e| e["text"].as_str()).collect();
    assert_eq!(assistants, ["Hello from the stand-in.", "Second answer, same session."]);

    // A frozen agent (`docker pause`): seen as paused, its message queued, not reported
    // delivered, and delivered once it thaws.
    frozen_agent_keeps_its_message(&setup, &daemon, engine, &model, &container);

    // Latency side by side, in one run: through agentd's API, and claude in `run -i`.
    for _ in 0..6 {
        model.push(support::model::Reply::text("pong"));
    }
    let through_agentd = api_turn_latency(&setup, "coder", 5);
    // The direct run is no agent of agentd's: it talks to a stand-in of its own, on all
    // addresses, through the engine's host alias.
    let direct_model = rt.block_on(support::model::StandIn::start());
    for _ in 0..6 {
        direct_model.push(support::model::Reply::text("pong"));
    }
    let direct_url = format!("http://{}:{}", engine.host_alias(), direct_model.port());
    let direct = direct_turn_latency(engine, &direct_url, 5);
    eprintln!(
        "measured: {}: POST /messages to result in the API, median of 5: {through_agentd:?}; claude in `{} run -i` directly: {direct:?}",
        engine.name(),
        engine.name()
    );
    setup.cli(&["rm", "-f", "coder"]);
    daemon.terminate();
    assert!(!setup.log_text().contains(&credential), "the daemon's log holds the credential");
    drop(model);
    drop(direct_model);
    rt.shutdown_timeout(Duration::from_secs(1));
}

/// Scans everything a user or a process in the container can read for the daemon's
/// model credential: the container's environment (from inside, and the engine's inspect),
/// agentd's inspect, logs, events and conversation, and the daemon's log so far.
fn assert_no_credential(setup: &Setup, engine: Engine, name: &str, credential: &str) {
    let session = setup.agent(name)["session"].as_str().expect("session").to_owned();
    let text = |out: Output| String::from_utf8_lossy(&out.stdout).into_owned();
    let captured = [
        ("the container's env, from inside", text(engine.run(&["exec", &session, "env"]))),
        ("engine inspect", text(engine.run(&["inspect", &session]))),
        ("agentd inspect", setup.cli(&["inspect", name])),
        ("agentd logs", setup.cli(&["logs", name])),
        ("agentd events", setup.cli(&["events", "--since", "0"])),
        ("agentd conversation", setup.cli(&["conversation", name, "--json"])),
        ("the daemon's log", setup.log_text()),
    ];
    for (what, output) in &captured {
        assert!(!output.is_empty() || *what == "agentd logs", "{what}: nothing captured");
        assert!(!output.contains(credential), "{what} holds the daemon's credential");
    }
    assert!(captured[0].1.contains("ANTHROPIC_API_KEY=agentd-gw-"), "the scan read the agent's env");
}

/// Waits until the agent's conversation satisfies `done`; returns it.
fn wait_conversation(
    setup: &Setup,
    daemon: &Daemon,
    name: &str,
    what: &str,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let entries = conversation(setup, name);
        if done(&entries) {
            return entries;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: never got {what}; conversation tail: {:#?}\nlog:\n{}",
            entries
                .iter()
                .rev()
                .take(8)
                .map(|e| (e["seq"].clone(), e["kind"].clone(), e["text"].clone()))
                .collect::<Vec<_>>(),
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The pending approvals of an agent.
fn pending_approvals(setup: &Setup, name: &str) -> Vec<Value> {
    let approvals =
        http("GET", &format!("{}/v1/approvals?agent={name}&pending=true", setup.base()), None).expect("approvals");
    approvals.as_array().cloned().unwrap_or_default()
}

fn wait_pending(setup: &Setup, daemon: &Daemon, name: &str) -> Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Some(first) = pending_approvals(setup, name).into_iter().next() {
            return first;
        }
        assert!(Instant::now() < deadline, "{name}: no pending approval; log:\n{}", daemon.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn results(entries: &[Value]) -> usize {
    from_agent(entries, "result").len()
}

/// The real Claude Code CLI asks for permissions, gets them answered through agentd
/// (also across a daemon restart), resumes its session after an outside kill and after
/// `agentd restart`, has a stalled turn interrupted, and leaves no volume behind.
fn claude_code_approvals_resume_and_stuck_turns(engine: Engine) {
    if !engine.has_claude() {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let model = rt.block_on(support::model::StandIn::start_loopback());
    let mut setup = Setup::new(engine, "steer");
    setup.set("AGENTD_SHUTDOWN_LEAVE_RUNNING", "true");
    let credential = setup.use_model(&model);
    // Low enough for a test, high enough that a busy CI machine does not look stuck.
    setup.set("AGENTD_AGENTS__TURN_IDLE_TIMEOUT_SECS", "8");
    let workspace = std::env::temp_dir().join(format!("agentd-e2e-ws-{}", setup.prefix));
    std::fs::create_dir_all(&workspace).expect("workspace");
    // The agent runs as uid 1000.
    std::fs::set_permissions(&workspace, std::os::unix::fs::PermissionsExt::from_mode(0o777)).expect("chmod");
    let daemon = setup.start();
    let ws = workspace.display().to_string();
    spawn_claude(&setup, "coder", &["--workdir", &ws, "--restart", "on-failure"]);

    // Allow: the tool runs in the workspace and its output reaches the model.
    model.push(support::model::Reply::tool_use(
        "Bash",
        json!({"command": "touch /workspace/made-by-claude && echo touched-it", "description": "make a file"}),
    ));
    model.push(support::model::Reply::text("The file is made."));
    http("POST", &format!("{}/v1/agents/coder/messages", setup.base()), Some(json!({"text": "make a file"})))
        .expect("post");
    let approval = wait_pending(&setup, &daemon, "coder");
    assert_eq!(approval["tool"], "Bash", "{approval}");
    assert_eq!(setup.agent("coder")["turn"], "awaiting_approval");
    let id = approval["id"].as_str().expect("id").to_owned();
    let out = setup.cli(&["approvals"]);
    assert!(out.contains(&id) && out.contains("Bash"), "{out}");
    setup.cli(&["approve", &id]);
    let entries = wait_conversation(&setup, &daemon, "coder", "the allowed turn's result", |e| results(e) >= 1);
    assert!(workspace.join("made-by-claude").exists(), "the allowed tool did not run in the workspace");
    assert!(
        entries.iter().any(|e| e["kind"] == "user"
            && e["direction"] == "from_agent"
            && e["text"].as_str().is_some_and(|t| t.contains("touched-it"))),
        "the tool's output is in the conversation"
    );
    let tool_results: Vec<Value> = model.requests().iter().flat_map(|r| r.tool_results()).collect();
    assert!(
        tool_results.iter().any(|r| r.to_string().contains("touched-it")),
        "the model got the tool's output: {tool_results:?}"
    );
    let again = reqwest_status("POST", &format!("{}/v1/approvals/{id}", setup.base()), json!({"decision": "allow"}));
    assert_eq!(again, 409, "deciding again must conflict");

    // Deny: the tool does not run, and the turn ends.
    model.push(support::model::Reply::tool_use(
        "Bash",
        json!({"command": "touch /workspace/denied", "description": "no"}),
    ));
    model.push(support::model::Reply::text("Understood, not doing it."));
    http("POST", &format!("{}/v1/agents/coder/messages", setup.base()), Some(json!({"text": "make another"})))
        .expect("post");
    let approval = wait_pending(&setup, &daemon, "coder");
    setup.cli(&["deny", approval["id"].as_str().expect("id"), "--message", "not today"]);
    wait_conversation(&setup, &daemon, "coder", "the denied turn's result", |e| results(e) >= 2);
    assert!(!workspace.join("denied").exists(), "a denied tool ran");

    // Pending across a leave-running restart of the daemon.
    model.push(support::model::Reply::tool_use(
        "Bash",
        json!({"command": "touch /workspace/after-restart", "description": "later"}),
    ));
    model.push(support::model::Reply::text("Done after the restart."));
    http("POST", &format!("{}/v1/agents/coder/messages", setup.base()), Some(json!({"text": "one more"})))
        .expect("post");
    let pending = wait_pending(&setup, &daemon, "coder");
    daemon.terminate();
    let daemon = setup.start();
    let still = wait_pending(&setup, &daemon, "coder");
    assert_eq!(still["id"], pending["id"], "the pending approval survived the restart");
    setup.cli(&["approve", still["id"].as_str().expect("id")]);
    wait_conversation(&setup, &daemon, "coder", "the turn after the restart", |e| results(e) >= 3);
    assert!(workspace.join("after-restart").exists());

    // Resume after an outside kill (restart = on-failure): the history reaches the model.
    let container = engine.inspect(setup.agent("coder")["session"].as_str().expect("session"), "{{.Id}}");
    engine.run(&["kill", &container]);
    setup.wait_agent(&daemon, "coder", "restarted by its policy", |a| {
        a["restarts"] == 1 && a["status"] == "running" && a["connected"] == true
    });
    model.push(support::model::Reply::text("I remember."));
    let reply = setup.cli(&["send", "coder", "what did I ask first?"]);
    assert!(reply.contains("I remember."), "{reply}");
    let last = model.messages().last().cloned().expect("a request");
    assert!(
        last.message_texts().iter().any(|t| t.contains("make a file")),
        "the resumed session's history: {:?}",
        last.message_texts()
    );

    // And after `agentd restart`.
    setup.cli(&["restart", "coder"]);
    setup.wait_agent(&daemon, "coder", "attached after restart", |a| a["restarts"] == 2 && a["connected"] == true);
    model.push(support::model::Reply::text("Still here."));
    let reply = setup.cli(&["send", "coder", "and now?"]);
    assert!(reply.contains("Still here."), "{reply}");
    let last = model.messages().last().cloned().expect("a request");
    assert!(
        last.message_texts().iter().any(|t| t.contains("what did I ask first?")),
        "history after agentd restart: {:?}",
        last.message_texts()
    );
    let agent = setup.agent("coder");
    assert!(agent["cost_usd"].as_f64().is_some_and(|c| c > 0.0), "the cost is kept across runs: {agent}");

    // A stalled model stream is interrupted after the (lowered) idle timeout.
    model.push(support::model::Reply::Stall { text: Some("thinking".into()) });
    let before = results(&conversation(&setup, "coder"));
    http("POST", &format!("{}/v1/agents/coder/messages", setup.base()), Some(json!({"text": "stall please"})))
        .expect("post");
    // The CLI is done with the interrupted turn once it says the command was cancelled.
    wait_conversation(&setup, &daemon, "coder", "the interrupted turn's end", |e| {
        results(e) > before && e.iter().any(|x| x["kind"] == "command_lifecycle" && x["text"] == "cancelled")
    });
    let events = setup.cli(&["events", "--since", "0", "--agent", "coder"]);
    assert!(events.contains("turn_interrupted"), "{events}");
    {
        // The stalled stream is given up by the model end, as a real endpoint times out: the
        // CLI's next request must not queue behind a connection it abandoned.
        model.cut_stalled();
        model.push(support::model::Reply::text("Back to work."));
        let out = setup.command(&["send", "coder", "are you back?"]).output().expect("send");
        assert!(
            out.status.success(),
            "the message after the interrupt was not answered: {}\nmodel requests: {:#?}\nconversation tail: {:#?}\nevents:\n{}",
            String::from_utf8_lossy(&out.stderr),
            model.requests().iter().rev().take(4).map(|r| (r.path.clone(), r.body.as_ref().map(|b| (b["stream"].clone(), b["messages"].as_array().map(|m| m.len())))) ).collect::<Vec<_>>(),
            conversation(&setup, "coder")
                .iter()
                .rev()
                .take(12)
                .map(|e| (e["seq"].clone(), e["direction"].clone(), e["kind"].clone(), e["text"].clone()))
                .collect::<Vec<_>>(),
            setup.cli(&["events", "--since", "0", "--agent", "coder"])
        );
        let reply = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(reply.contains("Back to work."), "{reply}");
    }

    // A turn limit: the result that hits it is the turn's error, and the agent stays up.
    spawn_claude(&setup, "limited", &["--max-turns", "1", "--approvals", "allow"]);
    model.push(support::model::Reply::tool_use("Bash", json!({"command": "echo one", "description": "one"})));
    model.push(support::model::Reply::text("never reached"));
    let out = setup.command(&["send", "limited", "go on and on"]).output().expect("send");
    assert_eq!(out.status.code(), Some(1), "an error result exits 1: {}", String::from_utf8_lossy(&out.stderr));
    let limited = setup.agent("limited");
    assert_eq!(limited["last_result"]["subtype"], "error_max_turns", "{limited}");
    assert_eq!(limited["last_result"]["is_error"], true, "{limited}");
    assert_eq!(limited["status"], "running", "the agent stays up: {limited}");
    setup.cli(&["rm", "-f", "limited"]);

    // rm leaves no volume behind.
    setup.cli(&["rm", "-f", "coder"]);
    let filter = format!("label=agentd.prefix={}", setup.prefix);
    let volumes = engine.run(&["volume", "ls", "-q", "--filter", &filter]);
    assert!(
        String::from_utf8_lossy(&volumes.stdout).trim().is_empty(),
        "volumes left: {}",
        String::from_utf8_lossy(&volumes.stdout)
    );
    assert!(
        model.messages().iter().all(|r| r.header("x-api-key") == Some(credential.as_str())),
        "every model request carried the daemon's credential"
    );
    daemon.terminate();
    assert!(!setup.log_text().contains(&credential), "the daemon's log holds the credential");
    let _ = std::fs::remove_dir_all(&workspace);
    drop(model);
    rt.shutdown_timeout(Duration::from_secs(1));
}

/// Pauses the agent's container, sends a message, checks it stays queued, thaws it,
/// and waits for the answer.
fn frozen_agent_keeps_its_message(
    setup: &Setup,
    daemon: &Daemon,
    engine: Engine,
    model: &support::model::StandIn,
    container: &str,
) {
    engine.run(&["pause", container]);
    setup.wait_agent(daemon, "coder", "paused", |a| a["paused"] == true);
    model.push(support::model::Reply::text("Thawed and answering."));
    let queued =
        http("POST", &format!("{}/v1/agents/coder/messages", setup.base()), Some(json!({ "text": "wake up" })))
            .expect("post to a paused agent");
    let seq = queued["seq"].as_i64().expect("seq");
    std::thread::sleep(Duration::from_millis(1500));
    let entry = conversation(setup, "coder").into_iter().find(|e| e["seq"] == seq).expect("the queued entry");
    assert_eq!(entry["delivery"], "queued", "a message to a frozen agent must not read delivered: {entry}");
    engine.run(&["unpause", container]);
    let deadline = Instant::now() + PATIENCE;
    while !from_agent(&conversation(setup, "coder"), "assistant").iter().any(|e| e["text"] == "Thawed and answering.") {
        assert!(
            Instant::now() < deadline,
            "no answer after the thaw; conversation tail: {:#?}\nlog:\n{}",
            conversation(setup, "coder")
                .iter()
                .rev()
                .take(6)
                .map(|e| (
                    e["seq"].clone(),
                    e["direction"].clone(),
                    e["kind"].clone(),
                    e["text"].clone(),
                    e["delivery"].clone()
                ))
                .collect::<Vec<_>>(),
            daemon.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(setup.agent("coder")["paused"], false);
}

/// The HTTP status of a call with a JSON body.
fn reqwest_status(method: &str, url: &str, body: Value) -> u16 {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    rt.block_on(async {
        let client = reqwest::Client::new();
        let response = client.request(method.parse().expect("method"), url).json(&body).send().await.expect("request");
        response.status().as_u16()
    })
}

// The model gateway (issue I, A1).

/// Whether the gateway refuses an agent's secret presented from another container (by
/// the caller's address). The coordinator wires this to the peer check once it is in
/// (`AgentManager::agent_for_peer`); until then a valid secret works from any container.
fn gateway_checks_the_callers_container() -> bool {
    agentd::gateway::CHECKS_CALLER_ADDRESS
}

/// A request from inside `session` (bash's /dev/tcp) to `ANTHROPIC_BASE_URL`'s host at
/// `port` (the gateway's when `None`), with `key` as `x-api-key`: the response's status
/// line, or why there is none.
fn request_from(engine: Engine, session: &str, key: &str, port: Option<u16>) -> String {
    let script = r#"url=${ANTHROPIC_BASE_URL#http://}; host=${url%:*}; port=${2:-${url##*:}}
exec 3<>"/dev/tcp/$host/$port" || { echo "no connection to $host:$port"; exit 0; }
printf 'POST /v1/messages HTTP/1.1\r\nHost: %s\r\nx-api-key: %s\r\nanthropic-version: 2023-06-01\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}' "$host" "$1" >&3
read -r -t 30 status <&3 || { echo "no answer"; exit 0; }
echo "$status""#;
    let port = port.map(|p| p.to_string()).unwrap_or_default();
    let out = engine.run(&["exec", session, "bash", "-c", script, "probe", key, &port]);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Two claude-code agents, each with a gateway secret of its own: from inside the first
/// container its own secret reaches the model (with the daemon's credential), a tampered
/// one, the real credential and (once the peer check is wired) the second agent's get 401,
/// and the stand-in itself, on the host's loopback, is out of reach.
fn gateway_secrets_are_per_agent(engine: Engine) {
    if !engine.has_claude() {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let model = rt.block_on(support::model::StandIn::start_loopback());
    let mut setup = Setup::new(engine, "gwsec");
    let credential = setup.use_model(&model);
    let daemon = setup.start();
    spawn_claude(&setup, "first", &[]);
    // On the isolated network: the gateway serves there too.
    spawn_claude(&setup, "second", &["--network", "isolated"]);
    let session = |name: &str| {
        let agent = setup.wait_agent(&daemon, name, "running", |a| a["status"] == "running");
        agent["session"].as_str().expect("session").to_owned()
    };
    let (first, second) = (session("first"), session("second"));
    let secret_of = |session: &str| {
        let env = engine.inspect(session, "{{range .Config.Env}}{{println .}}{{end}}");
        let secret = env.lines().find_map(|l| l.strip_prefix("ANTHROPIC_API_KEY=")).map(str::to_owned);
        secret.unwrap_or_else(|| panic!("{session} has no ANTHROPIC_API_KEY: {env}"))
    };
    let (own, other) = (secret_of(&first), secret_of(&second));
    assert!(own.starts_with("agentd-gw-") && other.starts_with("agentd-gw-"), "gateway secrets");
    assert_ne!(own, other, "each agent has a secret of its own");

    let status = request_from(engine, &first, &own, None);
    assert!(status.starts_with("HTTP/1.1 200"), "own secret from its container: {status}\nlog:\n{}", daemon.log_text());
    let probe = model.messages().into_iter().find(|r| r.body == Some(json!({}))).expect("the probe reached the model");
    assert_eq!(probe.header("x-api-key"), Some(credential.as_str()), "the stand-in gets the daemon's credential");

    let mut tampered = own.clone();
    let last = tampered.pop().expect("char");
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    for (what, key) in [("a tampered secret", tampered.as_str()), ("the daemon's credential", credential.as_str())] {
        let status = request_from(engine, &first, key, None);
        assert!(status.starts_with("HTTP/1.1 401"), "{what}: {status}");
    }
    let status = request_from(engine, &first, &other, None);
    if gateway_checks_the_callers_container() {
        assert!(status.starts_with("HTTP/1.1 401"), "another agent's secret from the first container: {status}");
    } else {
        eprintln!(
            "note: {}: the gateway's caller check is not wired yet; another agent's secret got: {status}",
            engine.name()
        );
    }
    let status = request_from(engine, &second, &other, None);
    assert!(status.starts_with("HTTP/1.1 200"), "own secret from an isolated container: {status}");
    let direct = request_from(engine, &first, &own, Some(model.port()));
    assert!(!direct.starts_with("HTTP/"), "the stand-in on the host's loopback must be out of reach: {direct}");

    assert_no_credential(&setup, engine, "first", &credential);
    setup.cli(&["rm", "-f", "first"]);
    setup.cli(&["rm", "-f", "second"]);
    daemon.terminate();
    assert!(!setup.log_text().contains(&credential), "the daemon's log holds the credential");
    drop(model);
    rt.shutdown_timeout(Duration::from_secs(1));
}

// --- E: the egress allow-list -----------------------------------------------------------

/// A TCP server on the host's loopback that greets every connection with `greeting` and
/// keeps it open a while; counts its connections.
fn greeting_server(greeting: &'static str) -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::Write;
    use std::sync::atomic::Ordering;
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a test server");
    let port = listener.local_addr().expect("addr").port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { break };
            count.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let _ = stream.write_all(greeting.as_bytes());
                std::thread::sleep(Duration::from_secs(10));
            });
        }
    });
    (port, accepted)
}

/// An agent reaches an allowed host server through the egress proxy (`$HTTPS_PROXY`,
/// with bash's /dev/tcp from the Claude Code image) and reads its answer; a different
/// one is refused with 403 and an `egress_denied` event, and is never connected to.
fn egress_allow_list_through_the_proxy(engine: Engine) {
    use std::sync::atomic::Ordering;
    if !engine.has_claude() {
        return;
    }
    let setup = Setup::new(engine, "egr");
    let daemon = setup.start();
    let (allowed, allowed_hits) = greeting_server("hello from the allowed server\n");
    let (other, other_hits) = greeting_server("hello from the other server\n");
    let script = r#"
hp=${HTTPS_PROXY#http://}; host=${hp%:*}; port=${hp##*:}
echo "proxy $host:$port"
for target in "$@"; do
  echo "BEGIN $target"
  if exec 3<>"/dev/tcp/$host/$port"; then
    printf 'CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n' "$target" "$target" >&3
    while IFS= read -r -t 5 line <&3; do echo "< ${line%$'\r'}"; done
    exec 3<&-
  else
    echo "cannot connect to the proxy"
  fi
  echo "END $target"
done
sleep 600
"#;
    let allow = format!("127.0.0.1:{allowed}");
    let refuse = format!("127.0.0.1:{other}");
    setup.cli(&[
        "spawn",
        "egress",
        "--image",
        CLAUDE_IMAGE,
        "--network",
        "internet",
        "--egress-allow",
        &allow,
        "--",
        "bash",
        "-c",
        script,
        "probe",
        &allow,
        &refuse,
    ]);
    let deadline = Instant::now() + PATIENCE;
    let logs = loop {
        let logs = setup.cli(&["logs", "egress"]);
        if logs.contains(&format!("END {refuse}")) {
            break logs;
        }
        assert!(Instant::now() < deadline, "the probes did not finish: {logs}\nlog:\n{}", daemon.log_text());
        std::thread::sleep(Duration::from_millis(300));
    };
    let section = |target: &str| {
        let begin = logs.find(&format!("BEGIN {target}")).unwrap_or_else(|| panic!("no probe of {target}: {logs}"));
        let end = logs.find(&format!("END {target}")).unwrap_or_else(|| panic!("no end of {target}: {logs}"));
        logs[begin..end].to_owned()
    };
    let through = section(&allow);
    assert!(through.contains("< HTTP/1.1 200"), "the allowed server was not tunnelled to: {through}");
    assert!(through.contains("< hello from the allowed server"), "its answer did not come through: {through}");
    assert_eq!(allowed_hits.load(Ordering::SeqCst), 1, "{logs}");
    let refused = section(&refuse);
    assert!(refused.contains("< HTTP/1.1 403"), "the other server was not refused: {refused}");
    assert!(refused.contains("not on the egress allow-list"), "{refused}");
    assert!(!refused.contains("hello from the other server"), "{refused}");
    assert_eq!(other_hits.load(Ordering::SeqCst), 0, "the refused server was connected to");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let events = setup.cli(&["events", "--since", "0", "--agent", "egress"]);
        if events.contains("egress_denied") && events.contains(&refuse) {
            assert!(!events.contains(&format!("{allow} is not")), "{events}");
            break;
        }
        assert!(Instant::now() < deadline, "no egress_denied event for {refuse}: {events}");
        std::thread::sleep(Duration::from_millis(200));
    }
    setup.cli(&["rm", "-f", "egress"]);
    daemon.terminate();
}

macro_rules! per_engine {
    ($($scenario:ident),* $(,)?) => {
        mod docker {
            $(
                #[test]
                fn $scenario() {
                    super::$scenario(super::Engine::Docker)
                }
            )*
        }
        mod podman {
            $(
                #[test]
                fn $scenario() {
                    super::$scenario(super::Engine::Podman)
                }
            )*
        }
    };
}

per_engine!(
    lifecycle_is_tracked_from_events,
    orphans_are_cleaned_up_at_start,
    sigterm_stops_all_agents_in_parallel,
    leave_running_then_restart_adopts_the_same_containers,
    claude_code_converses_and_survives_adoption,
    claude_code_approvals_resume_and_stuck_turns,
    // A2: metering and limits of the model gateway.
    claude_code_model_usage_is_metered_and_limited,
    // The model gateway (A1).
    gateway_secrets_are_per_agent,
    // The firewall of the isolated network (B).
    isolated_agents_reach_only_the_gateway,
    // E: the egress allow-list.
    egress_allow_list_through_the_proxy,
);

// A2: metering and limits of the model gateway.

/// A metric's value from `/metrics`.
fn metric(setup: &Setup, name: &str) -> f64 {
    let text = reqwest_text(&format!("{}/metrics", setup.base()));
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

/// The real Claude Code CLI through the model gateway (the stand-in model as
/// `model.upstream`, the daemon's own key): every request is metered exactly against the
/// stand-in's usage numbers, in the agent JSON and on `/metrics`; with
/// `--requests-per-minute 2` the third request within the minute gets 429 from the gateway
/// (never reaching the model), the turn reports it as its error, and the agent stays up.
fn claude_code_model_usage_is_metered_and_limited(engine: Engine) {
    use support::model::{Reply, StandIn, INPUT_TOKENS, OUTPUT_TOKENS};
    if !engine.has_claude() {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let model = rt.block_on(StandIn::start());
    let mut setup = Setup::new(engine, "meter");
    setup.set("AGENTD_MODEL__UPSTREAM", &model.base_url());
    setup.set("ANTHROPIC_API_KEY", "sk-daemon-meter-e2e");
    let daemon = setup.start();
    let spawned = setup.cli(&[
        "spawn",
        "metered",
        "--kind",
        "claude-code",
        "--image",
        CLAUDE_IMAGE,
        "--requests-per-minute",
        "2",
    ]);
    assert!(spawned.contains("metered running"), "{spawned}");
    let agent = setup.agent("metered");
    assert_eq!(agent["model_limits"]["requests_per_minute"], 2, "{agent}");
    assert_eq!(agent["model_usage"], json!({"requests": 0, "input_tokens": 0, "output_tokens": 0}), "{agent}");

    // Two turns of one model request each, within the limit.
    model.push(Reply::text("First answer."));
    model.push(Reply::text("Second answer."));
    let reply = setup.cli(&["send", "metered", "one"]);
    assert!(reply.contains("First answer."), "{reply}\nlog:\n{}", daemon.log_text());
    let reply = setup.cli(&["send", "metered", "two"]);
    assert!(reply.contains("Second answer."), "{reply}\nlog:\n{}", daemon.log_text());
    let upstream = model.messages().len() as u64;
    assert_eq!(upstream, 2, "one model request per turn reached the stand-in");

    // Recorded once each body ended: exactly the stand-in's numbers.
    let agent = setup.wait_agent(&daemon, "metered", "metered twice", |a| a["model_usage"]["requests"] == 2);
    assert_eq!(
        agent["model_usage"],
        json!({"requests": 2, "input_tokens": 2 * INPUT_TOKENS, "output_tokens": 2 * OUTPUT_TOKENS}),
        "{agent}"
    );
    assert_eq!(metric(&setup, "agentd_model_requests_total"), 2.0);
    assert_eq!(metric(&setup, "agentd_model_input_tokens_total"), (2 * INPUT_TOKENS) as f64);
    assert_eq!(metric(&setup, "agentd_model_output_tokens_total"), (2 * OUTPUT_TOKENS) as f64);
    let inspect = setup.cli(&["inspect", "metered"]);
    assert!(inspect.contains("\"model_usage\""), "{inspect}");

    // The third request within the minute: 429 at the gateway, reported by the turn.
    model.push(Reply::text("never sent"));
    let out = setup.command(&["send", "metered", "three"]).output().expect("send");
    assert_eq!(
        out.status.code(),
        Some(1),
        "the refused turn ends in an error result: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let agent = setup.agent("metered");
    assert_eq!(agent["last_result"]["is_error"], true, "{agent}");
    let text = agent["last_result"]["text"].as_str().unwrap_or_default();
    assert!(
        text.contains("requests_per_minute") || text.contains("429"),
        "the turn says why it failed: {text:?}\n{agent}"
    );
    assert_eq!(agent["status"], "running", "the agent stays up: {agent}");
    assert_eq!(model.messages().len(), 2, "the refused request never reached the model");
    assert_eq!(metric(&setup, "agentd_model_requests_refused_total"), 1.0);
    assert_eq!(agent["model_usage"]["requests"], 2, "a refusal is not a model request: {agent}");
    let log = daemon.log_text();
    assert!(log.contains("Model request refused"), "the refusal is logged:\n{log}");

    setup.cli(&["rm", "-f", "metered"]);
    daemon.terminate();
    drop(model);
    rt.shutdown_timeout(Duration::from_secs(1));
}

// ---- Identity and files (issue I, item 5) ----

/// An image without a `USER` (`cargo xtask images` builds it from the Claude Code image).
const NOUSER_IMAGE: &str = "agentd-nouser:latest";

/// A refused spawn: its status and error text.
fn spawn_refusal(setup: &Setup, body: Value) -> (u16, String) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    rt.block_on(async {
        let response = reqwest::Client::new()
            .post(format!("{}/v1/agents", setup.base()))
            .json(&body)
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .expect("POST /v1/agents");
        let status = response.status().as_u16();
        let body: Value = response.json().await.expect("a JSON error body");
        (status, body["error"].as_str().unwrap_or_default().to_owned())
    })
}

/// The output of a command run in a container, trimmed.
fn exec_in(engine: Engine, container: &str, command: &[&str]) -> String {
    let out = engine.run(&[&["exec", container][..], command].concat());
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The engine's socket, as the daemon connects to it (the variables the tests set, else
/// the default).
fn engine_socket(engine: Engine) -> PathBuf {
    let (var, default) = match engine {
        Engine::Docker => ("DOCKER_HOST", "unix:///var/run/docker.sock"),
        Engine::Podman => ("CONTAINER_HOST", "unix:///run/podman/podman.sock"),
    };
    let address = std::env::var(var).ok().filter(|v| v.starts_with("unix://")).unwrap_or_else(|| default.to_owned());
    PathBuf::from(address.trim_start_matches("unix://"))
}

/// An image without USER runs as uid and gid 1000 (`agents.default_user`); `user: "0"` is
/// refused with 422; a workdir of `/`, `/etc`, the engine socket's directory or agentd's
/// data directory is refused with 422 naming the rule; an allowed workdir is mounted and
/// the agent (uid 1000) writes into it.
fn identity_and_files(engine: Engine) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    if !rt.block_on(engine.probe(&[IMAGE, NOUSER_IMAGE])) {
        return;
    }
    let setup = Setup::new(engine, "ident");
    let daemon = setup.start();
    let agents = format!("{}/v1/agents", setup.base());

    // No USER in the image: the default user, uid and gid 1000.
    http("POST", &agents, Some(json!({"name": "nouser", "image": NOUSER_IMAGE, "command": ["sleep", "600"]})))
        .unwrap_or_else(|e| panic!("spawn nouser: {e}\nlog:\n{}", daemon.log_text()));
    let agent = setup.wait_agent(&daemon, "nouser", "running", |a| a["status"] == "running");
    let session = agent["session"].as_str().expect("session").to_owned();
    assert_eq!(exec_in(engine, &session, &["id", "-u"]), "1000", "uid of an agent whose image has no USER");
    assert_eq!(exec_in(engine, &session, &["id", "-g"]), "1000", "gid of an agent whose image has no USER");

    // Root, by uid or by name, is refused.
    for user in ["0", "root", "0:0"] {
        let (status, error) =
            spawn_refusal(&setup, json!({"name": "root", "image": NOUSER_IMAGE, "command": ["true"], "user": user}));
        assert_eq!(status, 422, "user {user:?}: {error}");
        assert!(error.contains("is refused") && error.contains("agents.allow_root"), "user {user:?}: {error}");
    }

    // Workdirs that are never given to an agent, each named with its rule.
    let socket_dir = engine_socket(engine).parent().expect("the socket's directory").to_path_buf();
    let data_dir = setup.db.parent().expect("the data directory").to_path_buf();
    let refused: [(PathBuf, &[&str]); 5] = [
        ("/".into(), &["the host's root directory"]),
        ("/etc".into(), &["inside /etc, a system directory"]),
        ("/var/run".into(), &["a system directory"]),
        // /var/run/docker.sock's directory is /var/run (a system tree); Podman's is
        // /run/podman, inside /run; either way refused, with the rule named.
        (socket_dir.clone(), &["a system directory", "engine's socket"]),
        (data_dir.clone(), &["agentd's data directory"]),
    ];
    for (dir, rules) in refused {
        let body = json!({"name": "wd", "image": NOUSER_IMAGE, "command": ["true"], "workdir": dir});
        let (status, error) = spawn_refusal(&setup, body);
        assert_eq!(status, 422, "workdir {}: {error}", dir.display());
        assert!(error.starts_with("workdir "), "the error names the field: {error}");
        assert!(error.contains(&dir.display().to_string()), "the error names the path: {error}");
        assert!(rules.iter().any(|rule| error.contains(rule)), "workdir {}: {error}", dir.display());
    }
    let listed = http("GET", &agents, None).expect("list");
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "no refused agent was recorded: {listed}");

    // An allowed workdir is mounted at /workspace, and the agent writes into it as uid 1000.
    let workspace = std::env::temp_dir().join(format!("agentd-e2e-ws-{}", setup.prefix));
    std::fs::create_dir_all(&workspace).expect("workspace");
    std::fs::set_permissions(&workspace, std::os::unix::fs::PermissionsExt::from_mode(0o777)).expect("chmod");
    let script = "id -u > /workspace/who.tmp && mv /workspace/who.tmp /workspace/who && exec sleep 600";
    let body =
        json!({"name": "writer", "image": NOUSER_IMAGE, "command": ["bash", "-c", script], "workdir": workspace});
    http("POST", &agents, Some(body)).unwrap_or_else(|e| panic!("spawn writer: {e}\nlog:\n{}", daemon.log_text()));
    let writer = setup.wait_agent(&daemon, "writer", "running", |a| a["status"] == "running");
    let who = workspace.join("who");
    let deadline = Instant::now() + PATIENCE;
    while !who.exists() {
        assert!(Instant::now() < deadline, "the agent wrote nothing into its workdir: {writer}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(std::fs::read_to_string(&who).expect("read who").trim(), "1000");
    let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&who).expect("stat who"));
    assert_eq!(owner, 1000, "the file the agent wrote is owned by uid 1000, not root");

    daemon.terminate();
    let _ = std::fs::remove_dir_all(&workspace);
}

/// The scenarios of this block, per engine: `identity::docker::…`, `identity::podman::…`.
mod identity {
    use super::{identity_and_files, Engine};
    per_engine!(identity_and_files);
}

// ---- The firewall of the isolated network (issue I, helper B) ----

/// A GET with the API token.
fn get_with_token(url: &str, token: &str) -> Value {
    let value = http_as("GET", url, None, Some(token)).unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert!(!value.is_null(), "GET {url}: not JSON");
    value
}

/// Whether a TCP connection from inside `container` to `host:port` succeeds within 5 s.
fn connects_from(engine: Engine, container: &str, host: &str, port: u16) -> bool {
    let script = format!("exec 3<>/dev/tcp/{host}/{port}");
    let out = engine
        .cli()
        .args(["exec", container, "timeout", "5", "bash", "-c", &script])
        .output()
        .unwrap_or_else(|e| panic!("{} exec: {e}", engine.name()));
    match out.status.code() {
        Some(0) => true,
        // bash's connect failed, or `timeout` ended it.
        Some(1) | Some(124) => false,
        other => panic!(
            "the probe of {host}:{port} in {container} did not run ({other:?}): {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// The rule lines of an iptables chain, empty when it does not exist.
fn chain_rules(chain: &str) -> Vec<String> {
    match Command::new("iptables").args(["-S", chain]).output() {
        Ok(out) if out.status.success() => {
            String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.starts_with("-A ")).map(str::to_owned).collect()
        }
        _ => Vec::new(),
    }
}

/// Removes the host firewall rules a test daemon left (it was killed, left its agents
/// running, or the test failed first): every rule with its comment `tag`, and a chain that
/// leaves empty with the jumps to it.
fn remove_rules_tagged(tag: &str) {
    use std::os::fd::AsRawFd;
    // The daemons' lock, so that no daemon installing meanwhile loses a chain.
    let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open("/run/agentd-firewall.lock");
    if let Ok(file) = &lock {
        // SAFETY: flock(2) on a descriptor this function holds open; released when it closes.
        unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
    }
    let run = |family: &str, args: &[String]| {
        Command::new(family)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().map(str::to_owned).collect::<Vec<_>>())
    };
    let words = |line: &str| line.split_whitespace().map(|w| w.trim_matches('"').to_owned()).collect::<Vec<_>>();
    for family in ["iptables", "ip6tables"] {
        let all = run(family, &["-S".to_owned()]).unwrap_or_default();
        let chains: Vec<String> =
            all.iter().filter_map(|l| l.strip_prefix("-N AGENTD-")).map(|c| format!("AGENTD-{c}")).collect();
        for chain in chains {
            let lines = run(family, &["-S".to_owned(), chain.clone()]).unwrap_or_default();
            let ours: Vec<&String> = lines.iter().filter(|l| l.contains(&format!("\"{tag}\""))).collect();
            if ours.is_empty() {
                continue;
            }
            for line in &ours {
                let mut args = words(line);
                args[0] = "-D".into();
                run(family, &args);
            }
            if lines.iter().filter(|l| l.starts_with("-A ")).count() == ours.len() {
                for line in all.iter().filter(|l| l.ends_with(&format!("-j {chain}"))) {
                    let mut args = words(line);
                    args[0] = "-D".into();
                    run(family, &args);
                }
                run(family, &["-X".to_owned(), chain.clone()]);
            }
        }
    }
}

/// The packets the rules in `chain` have matched (any daemon's: the first reject in the
/// chain, maybe another test daemon's, takes the packet).
fn matched_packets(chain: &str) -> u64 {
    let out = Command::new("iptables").args(["-v", "-S", chain]).output().expect("iptables");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("-A "))
        .filter_map(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            let at = words.iter().position(|w| *w == "-c")?;
            words.get(at + 1)?.parse::<u64>().ok()
        })
        .sum()
}

/// The `interface` field of the daemon's "rules are in place" log line.
fn firewall_interface(daemon: &Daemon) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = daemon.log_text();
        let found = log.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).find(|l| {
            l["message"].as_str().is_some_and(|m| m.starts_with("Host firewall rules for isolated agents are in place"))
        });
        if let Some(line) = found {
            return line["interface"].as_str().expect("interface field").to_owned();
        }
        assert!(Instant::now() < deadline, "no firewall line in the log:\n{log}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The host's address on the isolated network, as the engine lists it.
fn isolated_gateway(engine: Engine) -> String {
    let format = match engine {
        Engine::Docker => "{{(index .IPAM.Config 0).Gateway}}",
        Engine::Podman => "{{(index .Subnets 0).Gateway}}",
    };
    let out = engine.run(&["network", "inspect", "--format", format, "agentd-isolated"]);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// From inside an isolated agent's container only agentd's gateway ports on the gateway
/// address answer: not a host service listening on every address, not the management API
/// (listening on 0.0.0.0 here), not another container, nothing outside the host. The rules
/// stay at a leave-running shutdown, are not duplicated by the next start, and are gone
/// after a stopping one.
fn isolated_agents_reach_only_the_gateway(engine: Engine) {
    if !engine.has_claude() {
        return;
    }
    let mut setup = Setup::new(engine, "fw");
    let token = "fw-test-token-0123456789";
    let (model_port, proxy_port) = (free_port(), free_port());
    setup.set("AGENTD_SERVER__LISTEN", &format!("0.0.0.0:{}", setup.port));
    setup.set("AGENTD_SERVER__TOKEN", token);
    setup.set("AGENTD_TOKEN", token);
    setup.set("AGENTD_GATEWAY__PORT", &model_port.to_string());
    setup.set("AGENTD_GATEWAY__PROXY_PORT", &proxy_port.to_string());
    setup.set("AGENTD_SHUTDOWN__LEAVE_RUNNING", "true");
    let daemon = setup.start();
    let interface = firewall_interface(&daemon);
    let input = format!("AGENTD-IN-{interface}");
    let forward = format!("AGENTD-FWD-{interface}");
    let tag = format!("\"agentd:{}\"", setup.instance);
    let ours = |chain: &str| chain_rules(chain).into_iter().filter(|l| l.contains(&tag)).collect::<Vec<_>>();
    let input_rules = ours(&input);
    assert_eq!(input_rules.len(), 5, "replies, two ports, two rejects: {input_rules:#?}");
    assert_eq!(ours(&forward).len(), 2, "{:#?}", chain_rules(&forward));

    // A service of the host on all addresses, and the gateway ports (agentd's gateway may
    // serve them; if not, the test listens there itself).
    let gateway = isolated_gateway(engine);
    let host_service = TcpListener::bind("0.0.0.0:0").expect("host listener");
    let host_port = host_service.local_addr().expect("addr").port();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
    let mut own_listeners = Vec::new();
    for port in [model_port, proxy_port] {
        let addr = std::net::SocketAddr::new(gateway.parse().expect("gateway ip"), port);
        match rt.block_on(async { agentd::listen::bind_gateway(addr) }) {
            Ok(listener) => own_listeners.push(listener),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {}
            Err(e) => panic!("binding {addr}: {e}"),
        }
    }

    setup.cli(&[
        "spawn",
        "prober",
        "--kind",
        "image",
        "--image",
        CLAUDE_IMAGE,
        "--network",
        "isolated",
        "--",
        "sleep",
        "600",
    ]);
    let agents = format!("{}/v1/agents", setup.base());
    let prober = get_with_token(&format!("{agents}/prober"), token);
    assert_eq!(prober["network"], "isolated", "the firewall test needs an isolated agent: {prober}");
    let container = prober["session"].as_str().expect("session").to_owned();
    // An isolated agent with a listener, and a container on the internet network with one.
    setup.cli(&["spawn", "neighbour", "--network", "isolated", "--env", "ECHO_LISTEN_PORT=9090"]);
    let neighbour = get_with_token(&format!("{agents}/neighbour"), token);
    let neighbour_session = neighbour["session"].as_str().expect("session").to_owned();
    let peer = format!("{}-peer", setup.prefix);
    let label = format!("agentd.prefix={}", setup.prefix);
    engine.run(&["run", "-d", "--name", &peer, "--label", &label, "-e", "ECHO_LISTEN_PORT=9090", IMAGE]);
    let address_of = |container: &str| {
        let ips = engine.inspect(container, "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}");
        ips.split_whitespace().next().unwrap_or_else(|| panic!("{container} has no address")).to_owned()
    };
    let (peer_ip, neighbour_ip) = (address_of(&peer), address_of(&neighbour_session));

    // The controls: each target answers where it is not fenced off (the host reaching the
    // isolated agent also shows that replies pass the rules).
    for target in [format!("{peer_ip}:9090"), format!("{neighbour_ip}:9090")] {
        let addr: std::net::SocketAddr = target.parse().expect("addr");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_err() {
            assert!(Instant::now() < deadline, "the listener at {addr} never answered the host");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    for port in [model_port, proxy_port] {
        assert!(connects_from(engine, &container, &gateway, port), "the gateway port {gateway}:{port} is reachable");
    }

    // What must be out of reach.
    assert!(!connects_from(engine, &container, &gateway, host_port), "a host service on 0.0.0.0 at {gateway}");
    assert!(!connects_from(engine, &container, &gateway, setup.port), "the management API at {gateway}");
    assert!(!connects_from(engine, &container, &peer_ip, 9090), "a container on the internet network");
    let bridged =
        std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables").is_ok_and(|v| v.trim() == "1");
    if bridged {
        assert!(!connects_from(engine, &container, &neighbour_ip, 9090), "another isolated agent (br_netfilter on)");
    } else {
        eprintln!("br_netfilter is off here: traffic between isolated agents on one bridge is not filtered");
    }
    // Nothing routed out: Podman's internal network gives its containers no default
    // route; Docker's gives one through the bridge, where the daemon's forward rules reject
    // what would leave (its own rule drops it too).
    let routed_before = matched_packets(&forward);
    assert!(!connects_from(engine, &container, "1.1.1.1", 443), "an address outside the host");
    let routes = engine.run(&["exec", &container, "cat", "/proc/net/route"]);
    let routes = String::from_utf8_lossy(&routes.stdout).into_owned();
    let default_route = routes.lines().skip(1).any(|l| l.split_whitespace().nth(1) == Some("00000000"));
    if engine == Engine::Podman {
        assert!(!default_route, "no default route: {routes}");
    }
    if default_route {
        assert!(matched_packets(&forward) > routed_before, "the forward rules rejected the way out");
    }
    drop(host_service);
    drop(own_listeners);

    // A leave-running shutdown keeps the rules for the agents left running; the next start
    // adds none twice; a stopping shutdown removes them.
    daemon.terminate();
    assert_eq!(ours(&input), input_rules, "the rules stay while the agents run on");
    setup.set("AGENTD_SHUTDOWN__LEAVE_RUNNING", "false");
    let daemon = setup.start();
    firewall_interface(&daemon);
    assert_eq!(ours(&input), input_rules, "a restart duplicates nothing");
    let adopted = get_with_token(&format!("{agents}/prober"), token);
    assert_eq!(adopted["status"], "running", "{adopted}");
    daemon.terminate();
    assert!(ours(&input).is_empty() && ours(&forward).is_empty(), "the rules are gone: {:#?}", chain_rules(&input));
    let input_jump = format!("-i {interface} -m comment --comment agentd -j {input}");
    let jumps = Command::new("iptables").args(["-S", "INPUT"]).output().expect("iptables");
    let jumps = String::from_utf8_lossy(&jumps.stdout).into_owned();
    if chain_rules(&input).is_empty() {
        assert!(!jumps.contains(&input_jump), "no jump to an empty chain is left: {jumps}");
    }
}

/// No exhaustion (issue I, item 6): whatever containers can reach, they cannot exhaust.
/// A module of its own, so that its `per_engine!` list (`exhaustion::docker::…`) merges
/// apart from the others.
mod exhaustion {
    use super::*;

    /// The API token of the exhaustion tests (their API listens on all addresses).
    const FLOOD_TOKEN: &str = "exhaustion-test-token-0123456789";
    /// The longest any of the probed calls may take while a container floods a listener.
    const ANSWER_WITHIN: Duration = Duration::from_millis(100);

    /// The exhaustion tests run one at a time (each engine's and each other's): a flood of
    /// 21,000 connections starves the reader of another test's 128 MiB of output, which
    /// then outruns the engine's log rotation (json-file keeps 3 × 10 MiB) and is lost.
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
        ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Which daemon listener the flood targets: the model gateway's port (the flood
    /// container, on the engine's default network, reaches it at the network's gateway
    /// address).
    fn flood_target_port(setup: &Setup) -> u16 {
        setup.env["AGENTD_GATEWAY__PORT"].parse().expect("the gateway port")
    }

    /// The limits of the listener the flood targets: the model gateway's.
    const TARGET_LIMITS: agentd::listen::ConnLimits = agentd::listen::ConnLimits::GATEWAY;

    /// The host's address on the engine's default network, where agentd serves its gateway.
    fn internet_gateway(engine: Engine) -> String {
        let out = match engine {
            Engine::Docker => {
                engine.run(&["network", "inspect", "bridge", "--format", "{{(index .IPAM.Config 0).Gateway}}"])
            }
            Engine::Podman => {
                engine.run(&["network", "inspect", "podman", "--format", "{{(index .Subnets 0).Gateway}}"])
            }
        };
        let address = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(address.parse::<std::net::IpAddr>().is_ok(), "no gateway address of {}: {address:?}", engine.name());
        address
    }

    /// A daemon whose API listens on all addresses (with a token), so that a container on the
    /// internet network reaches it at the host alias, and a claude-code echo agent,
    /// `bystander`, attached.
    fn exhaustion_setup(engine: Engine, tag: &str) -> (Setup, Daemon) {
        let mut setup = Setup::new(engine, tag);
        setup.set("AGENTD_SERVER__LISTEN", &format!("0.0.0.0:{}", setup.port));
        setup.set("AGENTD_SERVER__TOKEN", FLOOD_TOKEN);
        // The client's token (not a configuration key).
        setup.set("AGENTD_TOKEN", FLOOD_TOKEN);
        let daemon = setup.start();
        setup.cli(&["spawn", "bystander", "--kind", "claude-code", "--image", IMAGE]);
        let deadline = Instant::now() + PATIENCE;
        while authed(&setup, "GET", "/v1/agents/bystander", None).map(|a| a["connected"] == true) != Ok(true) {
            assert!(Instant::now() < deadline, "bystander never attached; log:\n{}", daemon.log_text());
            std::thread::sleep(Duration::from_millis(100));
        }
        (setup, daemon)
    }

    /// A blocking API call with the token.
    fn authed(setup: &Setup, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        http_as(method, &format!("{}{path}", setup.base()), body, Some(FLOOD_TOKEN))
    }

    /// The slowest answer of each probe over `rounds` rounds, each on a new connection:
    /// `/healthz`, `GET /v1/agents` (with the live status of the bystander), a message to the
    /// bystander answered (posted, and its echo read back from the conversation), and an
    /// engine call (the bystander's logs, read from the engine).
    fn probe_latencies(setup: &Setup, rounds: usize, tag: &str) -> Samples {
        let mut worst = Samples::new();
        let mut note = |name: &'static str, took: Duration| worst.entry(name).or_default().push(took);
        for i in 0..rounds {
            let started = Instant::now();
            let health = http("GET", &format!("{}/healthz", setup.base()), None).expect("healthz");
            note("healthz", started.elapsed());
            assert_eq!(health["status"], "ok");

            let started = Instant::now();
            let agents = authed(setup, "GET", "/v1/agents", None).expect("GET /v1/agents");
            note("list", started.elapsed());
            let bystander = agents.as_array().and_then(|a| a.iter().find(|a| a["name"] == "bystander")).cloned();
            assert_eq!(bystander.as_ref().map(|b| b["status"].clone()), Some(json!("running")), "{agents}");

            let started = Instant::now();
            let conversation =
                authed(setup, "GET", "/v1/agents/bystander/conversation?limit=10000", None).expect("conversation");
            note("conversation", started.elapsed());
            let after =
                conversation.as_array().and_then(|e| e.last().map(|e| e["seq"].as_i64().unwrap_or(0))).unwrap_or(0);
            let text = format!("probe {tag} {i}");
            let started = Instant::now();
            authed(setup, "POST", "/v1/agents/bystander/messages", Some(json!({ "text": text }))).expect("message");
            note("send", started.elapsed());
            let deadline = Instant::now() + PATIENCE;
            loop {
                let entries = authed(setup, "GET", &format!("/v1/agents/bystander/conversation?after={after}"), None)
                    .expect("conversation");
                let answered =
                    entries.as_array().into_iter().flatten().any(|e| {
                        e["kind"] == "result" && e["data"]["result"].as_str() == Some(&format!("echo: {text}"))
                    });
                if answered {
                    break;
                }
                assert!(Instant::now() < deadline, "the bystander never answered {text:?}");
                std::thread::sleep(Duration::from_millis(2));
            }
            note("message", started.elapsed());

            let started = Instant::now();
            authed(setup, "GET", "/v1/agents/bystander/logs", None).expect("logs (an engine call)");
            note("engine", started.elapsed());
        }
        worst
    }

    /// Starts the flood container (the echo agent's `flood` subcommand) against the daemon's
    /// `port` at the host alias; returns its name. The engines cannot raise a container's
    /// open-file limit past their own hard limit here (20,000), so the flood splits its
    /// connections between two processes of the one container (one peer address), each
    /// with a limit of 16,384.
    fn start_flood(setup: &Setup, port: u16, args: &[&str]) -> String {
        let engine = setup.engine;
        let name = format!("{}-flood", setup.prefix);
        let image = if engine == Engine::Podman { format!("localhost/{IMAGE}") } else { IMAGE.to_owned() };
        let target = format!("{}:{port}", internet_gateway(engine));
        let prefix_label = format!("--label=agentd.prefix={}", setup.prefix);
        // Podman's default is 1024 here; the engines cannot go past their own hard limit.
        let mut run = vec!["run", "-d", "--name", &name, &prefix_label, "--ulimit", "nofile=16384:16384"];
        match engine {
            Engine::Docker => run.extend(["--add-host", "host.docker.internal:host-gateway"]),
            // An explicit --ulimit replaces all of containers.conf's, nproc among them.
            Engine::Podman => run.extend(["--ulimit", "nproc=1024:1024"]),
        }
        run.extend([image.as_str(), "flood", &target, "--processes", "2"]);
        run.extend(args);
        engine.run(&run);
        name
    }

    /// The flood container's latest status line (`flood: opened=… open=… closed_by_peer=…`),
    /// parsed, once `check` holds for it.
    fn wait_flood(
        engine: Engine,
        name: &str,
        what: &str,
        check: impl Fn(&BTreeMap<String, u64>) -> bool,
    ) -> BTreeMap<String, u64> {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let out = engine.cli().args(["logs", name]).output().expect("flood logs");
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let last = text.lines().rev().find(|l| l.starts_with("flood: opened=") && l.contains(" open="));
            if let Some(line) = last {
                let fields: BTreeMap<String, u64> = line
                    .trim_start_matches("flood: ")
                    .split_whitespace()
                    .filter_map(|kv| kv.split_once('='))
                    .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
                    .collect();
                if check(&fields) {
                    return fields;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the flood never got {what}; its output:\n{text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Each probe's answer times.
    type Samples = BTreeMap<&'static str, Vec<Duration>>;

    fn summary(samples: &Samples) -> String {
        samples
            .iter()
            .map(|(probe, took)| {
                let mut sorted = took.clone();
                sorted.sort();
                let max = sorted.last().copied().unwrap_or_default();
                format!(
                    "{probe}: median {:?} p90 {:?} max {max:?} (n={})",
                    sorted[sorted.len() / 2],
                    p90(&sorted),
                    sorted.len()
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// The median of `samples`.
    fn median(samples: &[Duration]) -> Duration {
        let mut sorted = samples.to_vec();
        sorted.sort();
        sorted[sorted.len() / 2]
    }

    /// The 90th percentile of `samples` (one slow outlier in ten is let through: this host's
    /// two cores are shared with the flood's own connects).
    fn p90(samples: &[Duration]) -> Duration {
        let mut sorted = samples.to_vec();
        sorted.sort();
        sorted[(sorted.len() * 9).div_ceil(10).saturating_sub(1)]
    }

    /// Each probe of the daemon (`/healthz`, the agent list, another agent's conversation,
    /// a message to it accepted, an engine call) answered within [`ANSWER_WITHIN`] (median)
    /// during every phase, and its 90th percentile at most that much over its own without
    /// the flood. The message's round trip through the other agent
    /// (`message`: its answer read back) must complete, and is reported, not timed: it is
    /// the agent's and the engine log's latency (about 230 ms on Podman without any flood),
    /// and on a CI host shared with other tests it has measured 215 ms at the 90th
    /// percentile on Docker.
    fn assert_answers_within(phases: &[(&str, &Samples)], baseline: &Samples, what: &str) {
        eprintln!("measured: {what}: without the flood: {}", summary(baseline));
        for (phase, samples) in phases {
            eprintln!("measured: {what}: {phase}: {}", summary(samples));
        }
        for (phase, samples) in phases {
            for (probe, took) in *samples {
                if *probe == "message" {
                    continue;
                }
                // The typical answer within 100 ms, and the slow ones (90th percentile) at
                // most 100 ms slower than the same probe's without the flood, measured just
                // before in the same run: this host's two cores are shared with the flood's
                // own connects and with the other tests.
                let typical = median(took);
                assert!(
                    typical <= ANSWER_WITHIN,
                    "{probe} took {typical:?} (median) during {what} ({phase}; limit {ANSWER_WITHIN:?}): {}",
                    summary(samples)
                );
                let allowed = ANSWER_WITHIN + p90(&baseline[probe]);
                let p = p90(took);
                assert!(
                    p <= allowed,
                    "{probe} took {p:?} (90th percentile) during {what} ({phase}; limit {allowed:?}: 100 ms over \
                     its 90th percentile without the flood): {}",
                    summary(samples)
                );
            }
        }
    }

    /// 21,000 connections from one container to a daemon listener: the listener holds at most
    /// its per-peer cap and closes the rest at once; `/healthz`, the API, another agent's
    /// conversation and an engine call answer within 100 ms throughout; the refusals are
    /// logged once.
    fn a_connection_flood_does_not_exhaust_the_daemon(engine: Engine) {
        if !engine.available() {
            return;
        }
        let _alone = one_at_a_time();
        let (setup, daemon) = exhaustion_setup(engine, "flood");
        let baseline = probe_latencies(&setup, 10, "baseline");
        let per_peer = TARGET_LIMITS.max_connections_per_peer as u64;
        let flood = start_flood(&setup, flood_target_port(&setup), &["--connections", "21000", "--hold-secs", "120"]);
        // While it connects, and while it holds what it got.
        let during = probe_latencies(&setup, 20, "connecting");
        let report = wait_flood(engine, &flood, "through its connects", |f| {
            f.contains_key("failed") && f["opened"] + f["failed"] >= 21_000
        });
        let held = probe_latencies(&setup, 20, "holding");
        let report =
            wait_flood(engine, &flood, "a settled count", |f| f["open"] <= per_peer && f["opened"] == report["opened"]);
        eprintln!("measured: flood of 21000: {report:?}");
        assert!(
            report["opened"] >= 20_000,
            "the flood could not open its connections (accepted and closed count): {report:?}"
        );
        assert!(report["open"] <= per_peer, "the listener holds more than its per-peer cap: {report:?}");
        assert!(
            report["closed_by_peer"] + report["open"] == report["opened"],
            "every connection past the cap was closed: {report:?}"
        );
        assert_answers_within(
            &[("while connecting", &during), ("while holding", &held)],
            &baseline,
            "a flood of 21000 connections",
        );
        // Refusals are logged at most once a minute per peer, not once per connection.
        let mut last: BTreeMap<String, time::OffsetDateTime> = BTreeMap::new();
        let mut refusals = 0;
        for line in daemon.log_text().lines().filter(|l| l.contains("over the connection cap")) {
            let record: Value = serde_json::from_str(line).expect("a JSON log line");
            let at = record["timestamp"]
                .as_str()
                .and_then(|t| time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok())
                .expect("timestamp");
            let peer = record["peer"].as_str().expect("peer").to_owned();
            if let Some(before) = last.insert(peer.clone(), at) {
                assert!(at - before >= time::Duration::seconds(60), "{peer} refused twice within a minute:\n{line}");
            }
            refusals += 1;
        }
        assert!(refusals >= 1, "the refusals were not logged");
        engine.run(&["rm", "-f", &flood]);
        daemon.terminate();
    }

    /// 3,000 half-sent request heads from one container: every one is closed (the ones past the
    /// cap at once, the held ones at the header timeout), and the daemon answers within 100 ms
    /// meanwhile.
    fn half_open_requests_are_closed(engine: Engine) {
        if !engine.available() {
            return;
        }
        let _alone = one_at_a_time();
        let (setup, daemon) = exhaustion_setup(engine, "half");
        let baseline = probe_latencies(&setup, 10, "baseline");
        let started = Instant::now();
        let flood = start_flood(
            &setup,
            flood_target_port(&setup),
            &["--connections", "3000", "--half-open", "--hold-secs", "120"],
        );
        let during = probe_latencies(&setup, 20, "half-open");
        let report = wait_flood(engine, &flood, "every connection closed", |f| f["opened"] >= 3000 && f["open"] == 0);
        let header_timeout = TARGET_LIMITS.header_timeout;
        eprintln!("measured: 3000 half-open: {report:?}, all closed {:?} after the flood started", started.elapsed());
        assert_eq!(report["closed_by_peer"], report["opened"], "{report:?}");
        assert!(started.elapsed() < header_timeout + PATIENCE, "closed only after {:?}", started.elapsed());
        assert_answers_within(&[("while held", &during)], &baseline, "3000 half-open requests");
        engine.run(&["rm", "-f", &flood]);
        daemon.terminate();
    }

    /// The daemon's resident set (`VmRSS`) and its peak (`VmHWM`), in bytes.
    fn rss(pid: u32) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map(|kib| kib * 1024)
                .unwrap_or_else(|| panic!("no {name} in {status}"))
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// The most the daemon's peak RSS may grow over its baseline while an agent writes a
    /// 64 MiB line and sixteen 4 MiB ones, with a conversation stream that never reads.
    const RSS_BOUND: u64 = 128 * 1024 * 1024;

    /// An agent that writes a 64 MiB line and then sixteen 4 MiB ones: the long one is cut at
    /// `MAX_LINE_BYTES` (stored as a `truncated` marker entry), the others are stored whole,
    /// and the daemon's peak RSS grows by less than [`RSS_BOUND`].
    fn oversized_lines_are_cut_and_memory_stays_bounded(engine: Engine) {
        if !engine.available() {
            return;
        }
        let _alone = one_at_a_time();
        let (setup, daemon) = exhaustion_setup(engine, "big");
        let pid = daemon.child.id();
        // A conversation stream whose client never reads: what the daemon queues for it is
        // bounded too (the broadcast's byte budget).
        let stalled = {
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
            socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
            let addr: std::net::SocketAddr = format!("127.0.0.1:{}", setup.port).parse().expect("addr");
            socket.connect(&addr.into()).expect("connect");
            let mut stream: std::net::TcpStream = socket.into();
            use std::io::Write;
            write!(
                stream,
                "GET /v1/agents/bystander/conversation/stream HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {FLOOD_TOKEN}\r\n\r\n"
            )
            .expect("request");
            stream
        };
        let (base, base_peak) = rss(pid);
        let after = authed(&setup, "GET", "/v1/agents/bystander/conversation?limit=10000", None)
            .expect("conversation")
            .as_array()
            .and_then(|e| e.last().map(|e| e["seq"].as_i64().unwrap_or(0)))
            .unwrap_or(0);
        let started = Instant::now();
        authed(&setup, "POST", "/v1/agents/bystander/messages", Some(json!({ "text": "!big 64 4 16" })))
            .expect("message");
        // The turn's end, from the agent JSON (small): the entries are read only after the
        // peak is taken, so that the test's own reads are not in it.
        let deadline = Instant::now() + PATIENCE;
        loop {
            let agent = authed(&setup, "GET", "/v1/agents/bystander", None).expect("agent");
            if !agent["last_result"].is_null() {
                break;
            }
            assert!(Instant::now() < deadline, "the turn never ended: {agent}\nlog:\n{}", daemon.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
        let took = started.elapsed();
        let (now, peak) = rss(pid);
        drop(stalled);
        // Small pages: one entry at a time.
        let mut entries: Vec<Value> = Vec::new();
        let mut last = after;
        loop {
            let page = authed(&setup, "GET", &format!("/v1/agents/bystander/conversation?after={last}&limit=1"), None)
                .expect("conversation");
            let Some(entry) = page.as_array().and_then(|p| p.first()).cloned() else { break };
            last = entry["seq"].as_i64().expect("seq");
            // Keep only the shape of each entry.
            let pad = entry["data"]["pad"].as_str().map(str::len);
            let mut kept = entry;
            if pad.is_some() {
                kept["data"]["pad"] = json!(pad);
            }
            entries.push(kept);
        }

        let truncated: Vec<&Value> = entries.iter().filter(|e| e["kind"] == "truncated").collect();
        let big: Vec<&Value> = entries.iter().filter(|e| e["kind"] == "big").collect();
        eprintln!(
        "measured: {} MiB written in {took:?}; entries: {} truncated, {} of 4 MiB lines; RSS baseline {} MiB (peak {} MiB), after {} MiB, peak {} MiB (+{} MiB)",
        64 + 16 * 4,
        truncated.len(),
        big.len(),
        base >> 20,
        base_peak >> 20,
        now >> 20,
        peak >> 20,
        peak.saturating_sub(base) >> 20,
    );
        assert_eq!(truncated.len(), 1, "the 64 MiB line is one truncated entry: {entries:?}");
        assert_eq!(truncated[0]["data"]["limit_bytes"], backend_core::MAX_LINE_BYTES as u64);
        assert!(truncated[0]["data"]["head"].as_str().is_some_and(|h| h.starts_with(r#"{"type":"big","n":0"#)));
        // Every line at most 4 MiB long arrives as it was written, but what the engine's log
        // lost or repeated: Docker's json-file follow (10 MiB × 3 files) was seen to drop and
        // to repeat 16 KiB pieces of lines around its rotations under this burst.
        let exact = |e: &&&Value| {
            let n = e["data"]["n"].as_u64().unwrap_or(0);
            let overhead = format!(r#"{{"type":"big","n":{n},"pad":""#).len() + 2;
            e["data"]["pad"].as_u64() == Some((4 << 20) - overhead as u64)
        };
        let whole = big.iter().filter(exact).count();
        eprintln!("measured: {whole} of {} 4 MiB entries exactly as written", big.len());
        assert!(whole >= 1, "no 4 MiB line arrived whole: {entries:?}");
        for entry in &big {
            let pad = entry["data"]["pad"].as_u64().expect("pad");
            assert!(pad < backend_core::MAX_LINE_BYTES as u64, "an entry past the limit: {entry}");
        }
        assert!(
            peak.saturating_sub(base) <= RSS_BOUND,
            "the daemon's peak RSS grew by {} MiB (bound {} MiB)",
            peak.saturating_sub(base) >> 20,
            RSS_BOUND >> 20
        );
        daemon.terminate();
    }

    per_engine!(
        a_connection_flood_does_not_exhaust_the_daemon,
        half_open_requests_are_closed,
        oversized_lines_are_cut_and_memory_stays_bounded,
    );
}

/// The client's output on a real engine (issue J, items 8, 9, 12 and 6): docker's STATUS
/// from the engine's health and exit, `ls` live-only and `ls -a`, `runs`, the spec in
/// `inspect` with env values masked (but given to the container), `--show-secrets` with
/// the token on loopback. A module of its own, so that its `per_engine!` list merges apart.
mod cli_output {
    use super::*;

    const TOKEN: &str = "cli-output-e2e-token-0123456789";
    const SECRET: &str = "e2e-secret-value-never-shown";

    /// The agent's JSON, with the token.
    fn agent(setup: &Setup, name: &str) -> Value {
        http_as("GET", &format!("{}/v1/agents/{name}", setup.base()), None, Some(TOKEN))
            .unwrap_or_else(|e| panic!("GET agent {name}: {e}"))
    }

    fn until(setup: &Setup, daemon: &Daemon, name: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let agent = agent(setup, name);
            if check(&agent) {
                return agent;
            }
            assert!(Instant::now() < deadline, "{name} never became {what}: {agent}\nlog:\n{}", daemon.log_text());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The table row of `name`.
    fn row(table: &str, name: &str) -> String {
        table.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_default().to_owned()
    }

    fn status_spec_and_masked_env_on_the_engine(engine: Engine) {
        let mut setup = Setup::new(engine, "out");
        setup.set("AGENTD_SERVER__TOKEN", TOKEN);
        let daemon = setup.start();
        let env = format!("GITHUB_TOKEN={SECRET}");
        setup.cli(&["spawn", "shown", "--env", &env, "--memory-mb", "256", "--cpus", "0.5", "--restart", "on-failure"]);
        until(&setup, &daemon, "shown", "healthy", |a| a["health"] == "healthy");

        let live = setup.cli(&["ls"]);
        let shown = row(&live, "shown");
        assert!(shown.contains("Up ") && shown.contains("(healthy)"), "{live}");

        let inspected = setup.cli(&["inspect", "shown"]);
        assert!(!inspected.contains(SECRET), "inspect shows the env value: {inspected}");
        let json: Value = serde_json::from_str(&inspected).expect("inspect prints JSON");
        assert_eq!(json["env"], serde_json::json!({ "GITHUB_TOKEN": "<masked>" }), "{json}");
        assert_eq!(json["memory_mb"], 256, "{json}");
        assert_eq!(json["cpus"], 0.5, "{json}");
        assert_eq!(json["restart"], "on-failure", "{json}");
        assert_eq!(json["image"], IMAGE, "{json}");
        assert_eq!(json["started_at"], json["runs"][0]["started_at"], "AGE counts the current run: {json}");
        let session = json["session"].as_str().expect("session").to_owned();
        let inspect_env = ["inspect", "--format", "{{json .Config.Env}}", session.as_str()];
        let container_env = String::from_utf8_lossy(&engine.run(&inspect_env).stdout).into_owned();
        assert!(container_env.contains(&env), "masked in the API, but the container has it: {container_env}");
        let shown_secrets: Value =
            serde_json::from_str(&setup.cli(&["inspect", "--show-secrets", "shown"])).expect("JSON");
        assert_eq!(shown_secrets["env"]["GITHUB_TOKEN"], SECRET, "{shown_secrets}");

        setup.cli(&["stop", "shown"]);
        assert!(!setup.cli(&["ls", "-o", "name"]).lines().any(|l| l == "shown"), "plain ls leaves out a stopped agent");
        let all = setup.cli(&["ls", "-a"]);
        let stopped = row(&all, "shown");
        assert!(stopped.contains("Exited (") && stopped.contains(" ago"), "{all}");
        let runs = setup.cli(&["runs", "shown"]);
        assert_eq!(runs.lines().count(), 2, "one run: {runs}");
        assert!(runs.lines().nth(1).is_some_and(|r| r.contains(" stop")), "ended by stop: {runs}");
        setup.cli(&["rm", "shown"]);
        daemon.terminate();
    }

    per_engine!(status_spec_and_masked_env_on_the_engine);
}

// jl: `agentd logs` streams from the engine through the daemon (issue J, item 1).
mod logs_stream {
    use super::*;
    use std::io::Read;
    use std::sync::{Arc, Mutex};

    /// `agentd logs …` running in the background, its stdout collected as it comes.
    struct Follower {
        child: Child,
        out: Arc<Mutex<Vec<u8>>>,
        what: String,
    }

    impl Follower {
        fn start(setup: &Setup, args: &[&str]) -> Self {
            let mut child = setup
                .command(args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("agentd {args:?}: {e}"));
            let mut stdout = child.stdout.take().expect("stdout");
            let out = Arc::new(Mutex::new(Vec::new()));
            let sink = out.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stdout.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    sink.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend_from_slice(&buf[..n]);
                }
            });
            Self { child, out, what: format!("agentd {}", args.join(" ")) }
        }

        fn text(&self) -> String {
            String::from_utf8(self.out.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone())
                .unwrap_or_else(|e| panic!("{}: output is not UTF-8: {e}", self.what))
        }

        /// Waits until the output holds what `check` wants.
        fn wait_for(&mut self, daemon: &Daemon, what: &str, check: impl Fn(&str) -> bool) -> String {
            let deadline = Instant::now() + PATIENCE;
            loop {
                let text = self.text();
                if check(&text) {
                    return text;
                }
                if let Ok(Some(status)) = self.child.try_wait() {
                    // Exited: the output is complete once the reader drained it.
                    std::thread::sleep(Duration::from_millis(200));
                    let text = self.text();
                    assert!(check(&text), "{} exited ({status}) before {what}; it printed:\n{text}", self.what);
                    return text;
                }
                assert!(
                    Instant::now() < deadline,
                    "{}: never {what}; it printed:\n{text}\nlog:\n{}",
                    self.what,
                    daemon.log_text()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }

        /// Waits for the process to exit by itself; returns its code and what it printed.
        fn wait_exit(mut self, within: Duration) -> (Option<i32>, String, String) {
            let deadline = Instant::now() + within;
            let status = loop {
                if let Some(status) = self.child.try_wait().expect("wait") {
                    break status;
                }
                if Instant::now() >= deadline {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    panic!("{} did not exit within {within:?}; it printed:\n{}", self.what, self.text());
                }
                std::thread::sleep(Duration::from_millis(50));
            };
            let mut stderr = String::new();
            if let Some(mut err) = self.child.stderr.take() {
                let _ = err.read_to_string(&mut stderr);
            }
            std::thread::sleep(Duration::from_millis(200));
            (status.code(), self.text(), stderr)
        }
    }

    impl Drop for Follower {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Spawns an agent of kind image on the Claude Code image (it has bash) running `script`.
    fn spawn_script(setup: &Setup, name: &str, restart: &str, script: &str) {
        setup.cli(&[
            "spawn",
            "--kind",
            "image",
            "--image",
            CLAUDE_IMAGE,
            "--restart",
            restart,
            name,
            "--",
            "bash",
            "-c",
            script,
        ]);
    }

    /// `logs -f` ends with its run; `--follow-restarts` goes on across runs, each new run's
    /// first lines after a marker, and ends when the agent is stopped; non-ASCII output
    /// (漢 ✓ 🙂, on stdout and stderr) comes through whole.
    pub(super) fn logs_follow_runs_and_restarts(engine: Engine) {
        if !engine.has_claude() {
            return;
        }
        let mut setup = Setup::new(engine, "lgf");
        setup.set("AGENTD_RECONCILE__RESTART_BACKOFF__INITIAL_SECS", "1");
        setup.set("AGENTD_RECONCILE__RESTART_BACKOFF__MAX_SECS", "2");
        let daemon = setup.start();
        let script =
            r#"echo "first line of $HOSTNAME: 漢 ✓ 🙂"; echo "on stderr: 漢" >&2; sleep 2; echo "last line ✓"; exit 3"#;
        spawn_script(&setup, "lgf", "on-failure", script);
        let restarts = Follower::start(&setup, &["logs", "--follow-restarts", "lgf"]);
        let run = Follower::start(&setup, &["logs", "-f", "lgf"]);

        // One run: from its first line to its last, then the command exits 0 by itself.
        let (code, text, stderr) = run.wait_exit(PATIENCE);
        assert_eq!(code, Some(0), "logs -f: {stderr}\nprinted:\n{text}");
        assert!(text.contains(": 漢 ✓ 🙂\n") && text.contains("on stderr: 漢\n"), "logs -f:\n{text}");
        assert!(text.ends_with("last line ✓\n"), "logs -f did not end with its run's last line:\n{text}");
        assert!(!text.contains("--- agentd:"), "logs -f went past its run:\n{text}");

        // Across runs: each restart's marker, then that run's first line.
        let mut restarts = restarts;
        let text = restarts.wait_for(&daemon, "followed two restarts", |t| {
            // Two markers, and the last run's first two lines after the second.
            t.matches("--- agentd: run ").count() >= 2
                && t.rsplit("--- agentd: run ").next().is_some_and(|last| last.lines().count() >= 3)
        });
        let runs: Vec<&str> = text.split("--- agentd: run ").collect();
        assert!(runs[0].contains("first line of ") && runs[0].contains("last line ✓\n"), "run 1:\n{text}");
        for (n, run) in runs.iter().enumerate().skip(1) {
            let (marker, lines) = run.split_once('\n').unwrap_or((run, ""));
            assert!(marker.starts_with(&format!("{} of lgf started (container ", n + 1)), "marker {n}:\n{text}");
            // Its first lines, on stdout and on stderr (the two streams' order is the engine's).
            let first: Vec<&str> = lines.lines().take(2).collect();
            assert!(
                first.iter().any(|l| l.starts_with("first line of ") && l.ends_with(": 漢 ✓ 🙂"))
                    && first.contains(&"on stderr: 漢"),
                "run {} lost its first lines:\n{text}",
                n + 1
            );
        }
        let hosts: std::collections::BTreeSet<&str> =
            text.lines().filter_map(|l| l.strip_prefix("first line of ")).collect();
        assert!(hosts.len() >= 3, "the runs are not three containers: {hosts:?}\n{text}");

        // Stopped for good: the follower ends, exit 0.
        setup.cli(&["stop", "lgf"]);
        let (code, text, stderr) = restarts.wait_exit(Duration::from_secs(30));
        assert_eq!(code, Some(0), "logs --follow-restarts after stop: {stderr}\nprinted:\n{text}");
        setup.cli(&["rm", "-f", "lgf"]);
        daemon.terminate();
    }

    /// `--tail`, `--since` (a time, a duration) and `--timestamps`, and `logs -f` exiting
    /// when the agent is stopped, with the run's last line.
    pub(super) fn logs_since_tail_timestamps(engine: Engine) {
        if !engine.has_claude() {
            return;
        }
        let setup = Setup::new(engine, "lgs");
        let daemon = setup.start();
        let script = r#"trap 'echo "bye 🙂"; exit 0' TERM; echo "one 漢"; sleep 1.5; echo two; echo three; while :; do sleep 0.2; done"#;
        spawn_script(&setup, "lgs", "never", script);
        let deadline = Instant::now() + PATIENCE;
        while !setup.cli(&["logs", "lgs"]).contains("three") {
            assert!(
                Instant::now() < deadline,
                "no output: {}\nlog:\n{}",
                setup.cli(&["logs", "lgs"]),
                daemon.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(setup.cli(&["logs", "lgs"]), "one 漢\ntwo\nthree\n");
        assert_eq!(setup.cli(&["logs", "--tail", "2", "lgs"]), "two\nthree\n");
        assert_eq!(setup.cli(&["logs", "-n", "0", "--since", "1h", "lgs"]), "");

        let stamped = setup.cli(&["logs", "-t", "lgs"]);
        let lines: Vec<(&str, &str)> = stamped.lines().map(|l| l.split_once(' ').expect("a time first")).collect();
        assert_eq!(lines.iter().map(|(_, text)| *text).collect::<Vec<_>>(), ["one 漢", "two", "three"], "{stamped}");
        for (at, _) in &lines {
            assert_eq!(at.len(), "2026-12-01T19:00:00.123456789Z".len(), "not fixed width: {stamped}");
            time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339)
                .unwrap_or_else(|e| panic!("{at}: {e}\n{stamped}"));
        }
        let two_at = lines[1].0;
        assert_eq!(setup.cli(&["logs", "--since", two_at, "lgs"]), "two\nthree\n");
        assert_eq!(setup.cli(&["logs", "--since", "10m", "lgs"]), "one 漢\ntwo\nthree\n");
        assert_eq!(setup.cli(&["logs", "--since", "2099-01-01T00:00:00Z", "lgs"]), "");
        assert_eq!(setup.cli(&["logs", "-t", "--tail", "1", "lgs"]), format!("{} three\n", lines[2].0));
        let bad = setup.command(&["logs", "--since", "yesterday", "lgs"]).output().expect("agentd logs");
        let stderr = String::from_utf8_lossy(&bad.stderr);
        assert!(!bad.status.success() && stderr.contains("RFC 3339") && stderr.contains("HTTP 400"), "{stderr}");

        // Following from the last line on; the stop's last line, then the end.
        let mut follow = Follower::start(&setup, &["logs", "-f", "--tail", "1", "lgs"]);
        follow.wait_for(&daemon, "printed the last line", |t| t == "three\n");
        setup.cli(&["stop", "lgs"]);
        let (code, text, stderr) = follow.wait_exit(Duration::from_secs(30));
        assert_eq!(code, Some(0), "logs -f after stop: {stderr}\nprinted:\n{text}");
        assert_eq!(text, "three\nbye 🙂\n");
        // A stopped agent's container keeps its log: -f prints it and ends at once.
        let (code, text, _) = Follower::start(&setup, &["logs", "-f", "lgs"]).wait_exit(Duration::from_secs(30));
        assert_eq!((code, text.as_str()), (Some(0), "one 漢\ntwo\nthree\nbye 🙂\n"));
        setup.cli(&["rm", "-f", "lgs"]);
        daemon.terminate();
    }

    per_engine!(logs_follow_runs_and_restarts, logs_since_tail_timestamps);
}

// ---- Spawn input and the engine's answers (issue J, items 2, 14, 17 and 18) ----

/// What a spawn gets: the status and the error text (`None` for a 2xx).
fn spawn_answer(setup: &Setup, body: Value) -> (u16, Option<String>) {
    let (status, error) = spawn_refusal(setup, body);
    (status, (!(200..300).contains(&status)).then_some(error))
}

/// `spawn -- COMMAND` replaces the image's entrypoint (the echo image's `/agent`, under
/// which `/agent --version` would run as `/agent /agent --version`, an agent that never
/// exits), and `--entrypoint X -- ARGS` runs `X ARGS`.
fn spawn_command_replaces_the_entrypoint(engine: Engine) {
    if !engine.available() {
        return;
    }
    let setup = Setup::new(engine, "entry");
    let daemon = setup.start();
    setup.cli(&["spawn", "whole", "--kind", "image", "--", "/agent", "--version"]);
    setup.cli(&["spawn", "split", "--kind", "image", "--entrypoint", "/agent", "--", "--version"]);
    let via_api = json!({"name": "api", "kind": "image", "entrypoint": ["/agent", "--version"]});
    http("POST", &format!("{}/v1/agents", setup.base()), Some(via_api)).expect("spawn with an entrypoint");
    for name in ["whole", "split", "api"] {
        let agent =
            setup.wait_agent(&daemon, name, "stopped", |a| a["status"] != "running" && a["status"] != "pending");
        assert_eq!(agent["status"], "stopped", "{name}: /agent --version exits 0: {agent}");
        assert_eq!(exit_code(&agent), Some(0), "{name}: {agent}");
        let session = agent["session"].as_str().expect("session");
        let logs = engine.run(&["logs", session]);
        let logs = String::from_utf8_lossy(&logs.stdout).into_owned() + &String::from_utf8_lossy(&logs.stderr);
        assert!(logs.contains("echo-agent 0."), "{name}: the version line: {logs:?}");
        assert!(!logs.contains("echo-agent started"), "{name}: not the image's entrypoint: {logs:?}");
    }
    // Claude Code agents run the CLI: no entrypoint of the user's.
    let (status, error) = spawn_answer(&setup, json!({"name": "cc", "kind": "claude-code", "entrypoint": ["/bin/sh"]}));
    assert_eq!(status, 400, "{error:?}");
    assert!(error.unwrap_or_default().contains("entrypoint"));
    daemon.terminate();
}

/// Bad image references, CPU and memory limits get 400 naming the rule, never 500 (the
/// engine's answers included); claude-code spawns without a credential or without their
/// image say what to do.
fn spawn_input_is_checked_before_the_engine(engine: Engine) {
    if !engine.available() {
        return;
    }
    let mut setup = Setup::new(engine, "input");
    setup.set("AGENTD_AGENTS__KIND", "claude-code");
    setup.set("AGENTD_AGENTS__IMAGE", &format!("agentd-claude:missing-{}", setup.prefix));
    let daemon = setup.start();
    let bad_images = [
        "agentd-echo:latest;id".to_owned(),
        "$(id)".into(),
        "`id`".into(),
        "a|b".into(),
        "AGENTD-ECHO:LATEST".into(),
        "a".repeat(5000),
        "agentd-echo\0:latest".into(),
        "agentd-echo@sha256:zzz".into(),
        "sha256:".into(),
    ];
    for image in &bad_images {
        let (status, error) = spawn_answer(&setup, json!({"name": "img", "kind": "image", "image": image}));
        let error = error.unwrap_or_default();
        assert_eq!(status, 400, "image {image:?}: {error}");
        assert!(error.contains("invalid image") && error.len() < 1000, "{image:?}: {error}");
    }
    let format = match engine {
        Engine::Docker => "{{.NCPU}}",
        Engine::Podman => "{{.Host.CPUs}}",
    };
    let cpus: u32 = String::from_utf8_lossy(&engine.run(&["info", "--format", format]).stdout)
        .trim()
        .parse()
        .expect("the engine's CPU count");
    let over = f64::from(cpus + 1);
    let limits = [
        (json!({"cpus": 1024}), vec!["invalid cpus", "at most"]),
        (json!({"cpus": over}), vec!["invalid cpus", "at most"]),
        (json!({"cpus": 1e-12}), vec!["invalid cpus", "0.01"]),
        (json!({"memory_mb": (1u64 << 44) + 64}), vec!["invalid memory_mb", "1099511627776"]),
        (json!({"memory_mb": 1u64 << 44}), vec!["invalid memory_mb", "1099511627776"]),
    ];
    for (limit, needles) in limits {
        let mut body = json!({"name": "lim", "kind": "image", "image": IMAGE});
        body.as_object_mut().expect("object").extend(limit.as_object().expect("object").clone());
        let (status, error) = spawn_answer(&setup, body);
        let error = error.unwrap_or_default();
        assert_eq!(status, 400, "{limit}: {error}");
        for needle in needles {
            assert!(error.contains(needle), "{limit}: {needle:?} in {error}");
        }
    }
    // The same ranges in the CLI, before any request.
    for (flag, value, needle) in [("--cpus", "1e-12", "0.01"), ("--memory-mb", "17592186044480", "1099511627776")] {
        let out = setup.command(&["spawn", "cli", "--kind", "image", flag, value]).output().expect("run agentd");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(needle), "{flag} {value}: {stderr}");
    }
    // A limit the engine host can honour runs.
    let (status, error) = spawn_answer(&setup, json!({"name": "fits", "kind": "image", "image": IMAGE, "cpus": 0.01}));
    assert_eq!(status, 201, "{error:?}");

    // The default kind's missing image: how to build it, and how to run another.
    let out = setup.command(&["spawn", "coder"]).output().expect("run agentd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    for needle in ["cargo xtask images", "--kind image"] {
        assert!(stderr.contains(needle), "{needle:?} in: {stderr}");
    }
    daemon.terminate();

    // Without a model credential, claude-code spawns are refused (422) naming what to set.
    setup.env.remove("ANTHROPIC_API_KEY");
    let daemon = setup.start();
    let (status, error) = spawn_answer(&setup, json!({"name": "coder", "image": IMAGE}));
    let error = error.unwrap_or_default();
    assert_eq!(status, 422, "{error}");
    for needle in ["model.api_key_file", "ANTHROPIC_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN", "--kind image"] {
        assert!(error.contains(needle), "{needle:?} in: {error}");
    }
    let (status, error) = spawn_answer(&setup, json!({"name": "plain", "kind": "image", "image": IMAGE}));
    assert_eq!(status, 201, "image agents need no credential: {error:?}");
    daemon.terminate();
}

/// The scenarios of this block, per engine: `spawn_input::docker::…`, `spawn_input::podman::…`.
mod spawn_input {
    use super::{spawn_command_replaces_the_entrypoint, spawn_input_is_checked_before_the_engine, Engine};
    per_engine!(spawn_command_replaces_the_entrypoint, spawn_input_is_checked_before_the_engine);
}
