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

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
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
        let db = std::env::temp_dir().join(format!("agentd-e2e-{id}.db"));
        let port = free_port();
        let mut env = BTreeMap::new();
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
        ] {
            env.insert(k.to_owned(), v);
        }
        Self { engine, prefix: format!("e2e{id}"), instance: format!("i-{id}"), port, db, env }
    }

    fn set(&mut self, key: &str, value: &str) {
        self.env.insert(key.to_owned(), value.to_owned());
    }

    fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_agentd"));
        cmd.args(args).env("XDG_CONFIG_HOME", std::env::temp_dir().join("agentd-e2e-no-config"));
        for (key, _) in std::env::vars() {
            if key.starts_with("AGENTD_") {
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
        for suffix in ["", "-wal", "-shm", ".log"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.db.display()));
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
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async {
        let client = reqwest::Client::new();
        let mut request = client.request(method.parse().map_err(|_| "method")?, url).timeout(Duration::from_secs(30));
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
    let table = setup.cli(&["ls"]);
    for row in ["zero", "three", "hog", "victim"] {
        assert!(table.contains(row), "{table}");
    }
    assert!(table.contains("oom(137)"), "{table}");
    let events = setup.cli(&["events", "--agent", "three"]);
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
    let events = setup.cli(&["events"]);
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
    let events = setup.cli(&["events", "--agent", "keeper"]);
    assert!(events.contains("left_running") && events.contains("adopted"), "{events}");
    let out = setup.cli(&["send", "keeper", "still there?"]);
    assert!(out.contains("echo: still there?"), "{out}");
    // Clean up: this time stop everything.
    setup.cli(&["rm", "keeper"]);
    daemon.terminate();
}

/// Spawns a claude-code agent of the real image that talks to the stand-in model.
fn spawn_claude(setup: &Setup, name: &str, model_url: &str, extra: &[&str]) {
    let env_url = format!("ANTHROPIC_BASE_URL={model_url}");
    let mut args = vec!["spawn", name, "--kind", "claude-code", "--image", CLAUDE_IMAGE, "--env", &env_url];
    args.extend(["--env", "ANTHROPIC_API_KEY=sk-stand-in"]);
    // The stand-in model is a host service: reached through the egress proxy, which the
    // agent's HTTP_PROXY points at, so it must be on the allow-list.
    let model_host = model_url.trim_start_matches("http://").split('/').next().unwrap_or_default();
    args.extend(["--egress-allow", model_host]);
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
    let model = rt.block_on(support::model::StandIn::start());
    let model_url = format!("http://{}:{}", engine.host_alias(), model.port());
    model.push(support::model::Reply::text("Hello from the stand-in."));
    model.push(support::model::Reply::text("Second answer, same session."));

    let mut setup = Setup::new(engine, "claude");
    setup.set("AGENTD_SHUTDOWN_LEAVE_RUNNING", "true");
    let daemon = setup.start();
    let spawned = Instant::now();
    spawn_claude(&setup, "coder", &model_url, &[]);
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
    assert_eq!(request.header("x-api-key"), Some("sk-stand-in"), "the agent's own env reaches the CLI");

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
    for _ in 0..6 {
        model.push(support::model::Reply::text("pong"));
    }
    let direct = direct_turn_latency(engine, &model_url, 5);
    eprintln!(
        "measured: {}: POST /messages to result in the API, median of 5: {through_agentd:?}; claude in `{} run -i` directly: {direct:?}",
        engine.name(),
        engine.name()
    );
    setup.cli(&["rm", "coder"]);
    daemon.terminate();
    drop(model);
    rt.shutdown_timeout(Duration::from_secs(1));
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
    let model = rt.block_on(support::model::StandIn::start());
    let model_url = format!("http://{}:{}", engine.host_alias(), model.port());
    let mut setup = Setup::new(engine, "steer");
    setup.set("AGENTD_SHUTDOWN_LEAVE_RUNNING", "true");
    // Low enough for a test, high enough that a busy CI machine does not look stuck.
    setup.set("AGENTD_AGENTS__TURN_IDLE_TIMEOUT_SECS", "8");
    let workspace = std::env::temp_dir().join(format!("agentd-e2e-ws-{}", setup.prefix));
    std::fs::create_dir_all(&workspace).expect("workspace");
    // The agent runs as uid 1000.
    std::fs::set_permissions(&workspace, std::os::unix::fs::PermissionsExt::from_mode(0o777)).expect("chmod");
    let daemon = setup.start();
    let ws = workspace.display().to_string();
    spawn_claude(&setup, "coder", &model_url, &["--workdir", &ws, "--restart", "on-failure"]);

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
    let events = setup.cli(&["events", "--agent", "coder"]);
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
            setup.cli(&["events", "--agent", "coder"])
        );
        let reply = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(reply.contains("Back to work."), "{reply}");
    }

    // A turn limit: the result that hits it is the turn's error, and the agent stays up.
    spawn_claude(&setup, "limited", &model_url, &["--max-turns", "1", "--approvals", "allow"]);
    model.push(support::model::Reply::tool_use("Bash", json!({"command": "echo one", "description": "one"})));
    model.push(support::model::Reply::text("never reached"));
    let out = setup.command(&["send", "limited", "go on and on"]).output().expect("send");
    assert_eq!(out.status.code(), Some(1), "an error result exits 1: {}", String::from_utf8_lossy(&out.stderr));
    let limited = setup.agent("limited");
    assert_eq!(limited["last_result"]["subtype"], "error_max_turns", "{limited}");
    assert_eq!(limited["last_result"]["is_error"], true, "{limited}");
    assert_eq!(limited["status"], "running", "the agent stays up: {limited}");
    setup.cli(&["rm", "limited"]);

    // rm leaves no volume behind.
    setup.cli(&["rm", "coder"]);
    let filter = format!("label=agentd.prefix={}", setup.prefix);
    let volumes = engine.run(&["volume", "ls", "-q", "--filter", &filter]);
    assert!(
        String::from_utf8_lossy(&volumes.stdout).trim().is_empty(),
        "volumes left: {}",
        String::from_utf8_lossy(&volumes.stdout)
    );
    daemon.terminate();
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
        let events = setup.cli(&["events", "--agent", "egress"]);
        if events.contains("egress_denied") && events.contains(&refuse) {
            assert!(!events.contains(&format!("{allow} is not")), "{events}");
            break;
        }
        assert!(Instant::now() < deadline, "no egress_denied event for {refuse}: {events}");
        std::thread::sleep(Duration::from_millis(200));
    }
    setup.cli(&["rm", "egress"]);
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
    // E: the egress allow-list.
    egress_allow_list_through_the_proxy,
);
