//! The client's output through the binary, against an in-process daemon on the mock
//! backend (issue J, items 8, 9, 12 and 6): `-o json|wide|name` and `--format` on every
//! listing verb, docker-like STATUS and `ls -a`, the spec in `inspect`, and env values
//! masked unless `--show-secrets` on a loopback, token-authenticated request.

use std::net::{IpAddr, SocketAddr};
use std::process::Output;
use std::time::Duration;

use backend_mock::MockEngine;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

#[path = "support/in_process.rs"]
mod in_process;
use in_process::{test_config, InProcess};

const TOKEN: &str = "cli-output-token-0123456789";
const SECRET: &str = "s3cret-value-never-shown";

struct TestDaemon {
    addr: SocketAddr,
    base: String,
    http: reqwest::Client,
    token: Option<String>,
    daemon: InProcess,
    xdg: std::path::PathBuf,
}

impl TestDaemon {
    async fn start(token: Option<&str>, listen: &str) -> Self {
        let mut config = test_config(token);
        config.server.listen = listen.parse().expect("addr");
        let xdg = std::env::temp_dir().join(format!("agentd-cli-output-{}-{}", std::process::id(), unique()));
        std::fs::create_dir_all(&xdg).expect("mkdir");
        // A model credential (never used: no agent here reaches the model), so that
        // claude-code agents may be spawned.
        let key = xdg.join("model-key");
        std::fs::write(&key, "sk-fake-cli-output\n").expect("write the key file");
        config.model.api_key_file = Some(key);
        let daemon = InProcess::start(&config, MockEngine::new()).await;
        Self {
            addr: daemon.addr,
            base: format!("http://127.0.0.1:{}", daemon.addr.port()),
            http: reqwest::Client::new(),
            token: token.map(str::to_owned),
            daemon,
            xdg,
        }
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut r = self.http.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            r = r.bearer_auth(t);
        }
        if let Some(b) = body {
            r = r.json(&b);
        }
        let response = r.send().await.expect("request");
        let status = response.status();
        let text = response.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn spawn(&self, body: Value) -> Value {
        let (status, agent) = self.call(Method::POST, "/v1/agents", Some(body)).await;
        assert_eq!(status, StatusCode::CREATED, "{agent}");
        agent
    }

    /// Waits until the agent's JSON satisfies `done`.
    async fn until(&self, name: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let (_, agent) = self.call(Method::GET, &format!("/v1/agents/{name}"), None).await;
            if done(&agent) {
                return agent;
            }
            assert!(tokio::time::Instant::now() < deadline, "{name} never became {what}: {agent}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Runs the client binary against the daemon, with no configuration and no AGENTD_*
    /// variables but AGENTD_URL (and AGENTD_TOKEN when the daemon has one).
    async fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_agentd"));
        cmd.args(args).env("XDG_CONFIG_HOME", &self.xdg);
        for (key, _) in std::env::vars() {
            if key.starts_with("AGENTD_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("AGENTD_URL", &self.base);
        if let Some(token) = &self.token {
            cmd.env("AGENTD_TOKEN", token);
        }
        tokio::task::spawn_blocking(move || cmd.output()).await.expect("join").expect("run agentd")
    }

    /// The client's stdout, asserting it exited 0.
    async fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args).await;
        assert!(out.status.success(), "agentd {args:?} failed: {}", text(&out.stderr));
        text(&out.stdout)
    }

    async fn stop(self) {
        self.daemon.stop(Duration::from_secs(10)).await;
        let _ = std::fs::remove_dir_all(&self.xdg);
    }
}

/// A number no other daemon of this process uses.
fn unique() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn lines(out: &str) -> Vec<&str> {
    out.lines().collect()
}

/// Plain `ls` shows live agents only and `ls -a` every one, with docker's STATUS and the
/// current run's AGE; `--status` implies `-a`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ls_shows_live_agents_and_ls_a_all_with_a_docker_like_status() {
    let d = TestDaemon::start(None, "127.0.0.1:0").await;
    d.spawn(json!({ "name": "up-one" })).await;
    d.spawn(json!({ "name": "done-three", "env": { "ECHO_EXIT_AFTER_MS": "50", "ECHO_EXIT_CODE": "3" } })).await;
    d.spawn(json!({
        "name": "crashy", "restart": "on-failure",
        "env": { "ECHO_EXIT_AFTER_MS": "50", "ECHO_EXIT_CODE": "4" }
    }))
    .await;
    d.until("done-three", "failed", |a| a["status"] == "failed").await;
    let crashy = d.until("crashy", "scheduled to restart", |a| !a["next_restart_at"].is_null()).await;
    assert!(crashy["started_at"].is_string(), "the current run's start is shown: {crashy}");

    let live = d.ok(&["ls"]).await;
    let rows = lines(&live);
    assert_eq!(rows[0].split_whitespace().collect::<Vec<_>>(), ["NAME", "IMAGE", "STATUS", "RESTARTS", "AGE"]);
    let row = |name: &str, table: &str| {
        table.lines().find(|l| l.starts_with(&format!("{name} "))).map(str::to_owned).unwrap_or_default()
    };
    assert!(row("up-one", &live).contains("Up "), "{live}");
    assert!(row("done-three", &live).is_empty(), "plain ls leaves out an ended agent: {live}");
    let restarting = row("crashy", &live);
    let status = restarting.split("  ").map(str::trim).find(|c| c.starts_with("Restarting")).unwrap_or_default();
    let secs: Option<u64> = status
        .strip_prefix("Restarting in ")
        .and_then(|s| s.strip_suffix("s (attempt 1)"))
        .and_then(|s| s.parse().ok());
    assert!(secs.is_some_and(|s| (1..=10).contains(&s)), "a restarting agent is live: {live}");

    let all = d.ok(&["ls", "-a"]).await;
    let done = row("done-three", &all);
    assert!(done.contains("Exited (3) ") && done.contains(" ago"), "ls -a shows the ended one: {all}");
    let stopped = d.ok(&["ls", "--status", "failed", "-o", "name"]).await;
    assert!(lines(&stopped).contains(&"done-three"), "--status needs no -a: {stopped}");
    assert!(!stopped.contains("up-one"), "{stopped}");
    d.stop().await;
}

/// `-o json|wide|name` and `--format` work on ls, inspect, runs, approvals and
/// conversation; `--json` stays an alias of `-o json`; JSON keys come sorted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_listing_verb_takes_o_json_wide_name_and_a_format_template() {
    let d = TestDaemon::start(None, "127.0.0.1:0").await;
    d.spawn(json!({ "name": "fmt-a" })).await;
    d.spawn(json!({ "name": "fmt-b" })).await;
    let talker = json!({ "name": "fmt-talk", "kind": "claude-code", "image": backend_mock::ECHO_IMAGE,
                         "network": "internet", "prompt": "!tool Bash touch /x" });
    d.spawn(talker).await;
    d.until("fmt-talk", "awaiting approval", |a| a["turn"] == "awaiting_approval").await;

    // ls
    let json_out: Value = serde_json::from_str(&d.ok(&["ls", "-o", "json"]).await).expect("ls -o json is JSON");
    let names: Vec<&str> = json_out.as_array().expect("an array").iter().filter_map(|a| a["name"].as_str()).collect();
    assert_eq!(names, ["fmt-a", "fmt-b", "fmt-talk"], "in creation order");
    let keys: Vec<&String> = json_out[0].as_object().expect("object").keys().collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "keys sorted");
    assert_eq!(d.ok(&["ls", "--json"]).await, d.ok(&["ls", "-o", "json"]).await, "--json is -o json");
    assert_eq!(d.ok(&["ls", "-o", "name"]).await, "fmt-a\nfmt-b\nfmt-talk\n");
    let wide = d.ok(&["ls", "-o", "wide"]).await;
    assert!(lines(&wide)[0].split_whitespace().take(2).eq(["NAME", "ID"]), "{wide}");
    for column in ["KIND", "HEALTH", "EXIT", "NETWORK", "RESTART ", "COMMAND"] {
        assert!(lines(&wide)[0].contains(column), "wide has {column}: {wide}");
    }
    assert!(wide.contains("Awaiting approval"), "{wide}");
    assert_eq!(
        d.ok(&["ls", "--format", "{{.name}}\\t{{.kind}} {{.exit.code}}|{{.nope}}"]).await,
        "fmt-a\timage |<no value>\nfmt-b\timage |<no value>\nfmt-talk\tclaude-code |<no value>\n"
    );
    let bad = d.cli(&["ls", "--format", "{{name}}"]).await;
    assert_eq!(bad.status.code(), Some(1));
    assert!(text(&bad.stderr).contains("{{name}} is not a field"), "{}", text(&bad.stderr));
    let both = d.cli(&["ls", "--json", "-o", "wide"]).await;
    assert_eq!(both.status.code(), Some(2), "clap refuses --json with -o: {}", text(&both.stderr));

    // inspect
    assert_eq!(d.ok(&["inspect", "-o", "name", "fmt-a", "fmt-b"]).await, "fmt-a\nfmt-b\n");
    let (_, first_runs) = d.call(Method::GET, "/v1/agents/fmt-a/runs", None).await;
    let first = first_runs[0]["id"].as_i64().expect("a run id");
    assert_eq!(d.ok(&["inspect", "--format", "{{.name}} {{.runs.0.id}}", "fmt-a"]).await, format!("fmt-a {first}\n"));
    let one: Value = serde_json::from_str(&d.ok(&["inspect", "-o", "json", "fmt-a"]).await).expect("JSON");
    assert_eq!(one["name"], "fmt-a", "one name is one object");
    let wide_one = d.ok(&["inspect", "-o", "wide", "fmt-a"]).await;
    assert!(lines(&wide_one)[0].split_whitespace().take(2).eq(["NAME", "ID"]), "{wide_one}");

    // runs
    d.call(Method::POST, "/v1/agents/fmt-a/restart", None).await;
    let runs = d.ok(&["runs", "fmt-a"]).await;
    let rows = lines(&runs);
    assert_eq!(
        rows[0].split("  ").filter(|c| !c.is_empty()).collect::<Vec<_>>(),
        ["RUN", "STARTED", "DURATION", "EXIT", "ENDED BY"]
    );
    assert_eq!(rows.len(), 3, "two runs: {runs}");
    assert!(rows[1].contains("restart") && rows[2].contains("(running)"), "{runs}");
    let runs_json: Value = serde_json::from_str(&d.ok(&["runs", "fmt-a", "-o", "json"]).await).expect("JSON");
    assert_eq!(runs_json[0]["ended_by"], "restart", "{runs_json}");
    let second = runs_json[1]["id"].as_i64().expect("a run id");
    assert_eq!(d.ok(&["runs", "fmt-a", "-o", "name"]).await, format!("{first}\n{second}\n"));
    assert!(lines(&d.ok(&["runs", "fmt-a", "-o", "wide"]).await)[0].contains("CONTAINER"));
    assert_eq!(
        d.ok(&["runs", "fmt-a", "--format", "{{.id}}:{{.ended_by}}"]).await,
        format!("{first}:restart\n{second}:\n")
    );

    // approvals
    let approvals: Value = serde_json::from_str(&d.ok(&["approvals", "-o", "json"]).await).expect("JSON");
    let id = approvals[0]["id"].as_str().expect("a pending approval").to_owned();
    assert_eq!(d.ok(&["approvals", "-o", "name"]).await, format!("{id}\n"));
    assert_eq!(d.ok(&["approvals", "--json"]).await, d.ok(&["approvals", "-o", "json"]).await);
    let wide = d.ok(&["approvals", "-o", "wide"]).await;
    let header: Vec<&str> = lines(&wide)[0].split_whitespace().collect();
    assert!(header.ends_with(&["REQUESTED", "MESSAGE"]) && wide.contains("touch /x"), "{wide}");
    assert_eq!(d.ok(&["approvals", "--format", "{{.tool}} {{.agent}}"]).await, "Bash fmt-talk\n");

    // conversation
    let jsonl = d.ok(&["conversation", "fmt-talk", "-o", "json"]).await;
    let entries: Vec<Value> = jsonl.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert_eq!(entries[0]["text"], "!tool Bash touch /x", "{jsonl}");
    assert_eq!(jsonl, d.ok(&["conversation", "fmt-talk", "--json"]).await, "--json is -o json");
    let seqs: Vec<String> = entries.iter().map(|e| e["seq"].to_string()).collect();
    assert_eq!(d.ok(&["conversation", "fmt-talk", "-o", "name"]).await, seqs.join("\n") + "\n");
    assert!(d.ok(&["conversation", "fmt-talk", "-o", "wide"]).await.contains("→ user"));
    let kinds = d.ok(&["conversation", "fmt-talk", "--format", "{{.seq}} {{.kind}}"]).await;
    assert_eq!(lines(&kinds)[0], "1 user", "{kinds}");
    d.stop().await;
}

/// `inspect` shows the spec (image, command, limits, network, workdir, restart policy,
/// env names, next_restart_at, the current run's start); env values are masked in every
/// answer of the API; `--show-secrets` needs a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_shows_the_spec_and_masks_env_values() {
    let d = TestDaemon::start(None, "127.0.0.1:0").await;
    let spawned = d
        .spawn(json!({
            "name": "specced", "command": ["/agent", "--quiet"], "memory_mb": 512, "cpus": 0.5, "restart": "on-failure",
            "env": { "GITHUB_TOKEN": SECRET },
            "model_limits": { "requests_per_minute": 7 }
        }))
        .await;
    assert_eq!(spawned["env"], json!({ "GITHUB_TOKEN": "<masked>" }), "the spawn's answer masks: {spawned}");

    let out = d.ok(&["inspect", "specced"]).await;
    assert!(!out.contains(SECRET), "inspect shows the secret: {out}");
    let agent: Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(agent["image"], backend_mock::ECHO_IMAGE);
    assert_eq!(agent["command"], json!(["/agent", "--quiet"]));
    assert_eq!(agent["memory_mb"], 512);
    assert_eq!(agent["cpus"], 0.5);
    assert_eq!(agent["network"], "internet");
    assert_eq!(agent["restart"], "on-failure");
    assert_eq!(agent["workdir"], Value::Null);
    assert_eq!(agent["stop_grace_secs"], 10);
    assert_eq!(agent["on_unhealthy"], "record");
    assert_eq!(agent["approvals"], "ask");
    assert_eq!(agent["read_only_rootfs"], false);
    for field in ["pids_limit", "user", "model", "permission_mode", "max_turns", "max_budget_usd"] {
        assert!(agent.as_object().is_some_and(|a| a.contains_key(field)), "inspect lacks {field}: {agent}");
    }
    assert_eq!(agent["model_limits"]["requests_per_minute"], 7);
    assert_eq!(agent["env"], json!({ "GITHUB_TOKEN": "<masked>" }), "{agent}");
    assert!(agent.as_object().is_some_and(|a| a.contains_key("next_restart_at")), "{agent}");
    assert!(agent["started_at"].is_string(), "{agent}");
    assert_eq!(agent["runs"][0]["started_at"], agent["started_at"], "the current run's start");

    for path in ["/v1/agents", "/v1/agents/specced", "/v1/agents/specced/runs"] {
        let (_, body) = d.call(Method::GET, path, None).await;
        assert!(!body.to_string().contains(SECRET), "{path} returns the secret: {body}");
    }
    let (_, stopped) = d.call(Method::POST, "/v1/agents/specced/stop", None).await;
    assert!(!stopped.to_string().contains(SECRET), "{stopped}");

    let (status, body) = d.call(Method::GET, "/v1/agents/specced?show_secrets=true", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert!(body["error"].as_str().is_some_and(|e| e.contains("server.token")), "{body}");
    let refused = d.cli(&["inspect", "--show-secrets", "specced"]).await;
    assert_eq!(refused.status.code(), Some(1));
    let stderr = text(&refused.stderr);
    assert!(stderr.contains("token-authenticated") && stderr.contains("HTTP 403"), "{stderr}");
    assert!(!text(&refused.stdout).contains(SECRET));
    d.stop().await;
}

/// A local address of this host that is not loopback (the source address toward a
/// TEST-NET address: no packet is sent), if it has one.
fn non_loopback_address() -> Option<IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?;
    Some(socket.local_addr().ok()?.ip()).filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
}

/// `--show-secrets` shows env values to a token-authenticated request from a loopback
/// peer, and is refused (403, saying why) from any other peer, token or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_secrets_is_honoured_only_for_a_token_from_a_loopback_peer() {
    let d = TestDaemon::start(Some(TOKEN), "0.0.0.0:0").await;
    d.spawn(json!({ "name": "keeper", "env": { "GITHUB_TOKEN": SECRET, "PLAIN": "x" } })).await;

    let out = d.ok(&["inspect", "keeper"]).await;
    assert!(!out.contains(SECRET), "{out}");
    let shown: Value = serde_json::from_str(&d.ok(&["inspect", "--show-secrets", "keeper"]).await).expect("JSON");
    assert_eq!(shown["env"], json!({ "GITHUB_TOKEN": SECRET, "PLAIN": "x" }), "{shown}");

    let Some(ip) = non_loopback_address() else {
        assert!(std::env::var_os("CI").is_none(), "CI: this host has no non-loopback address to test from");
        eprintln!("skipping the non-loopback half: this host has no non-loopback address");
        d.stop().await;
        return;
    };
    let remote = format!("http://{}", SocketAddr::new(ip, d.addr.port()));
    let response = d
        .http
        .get(format!("{remote}/v1/agents/keeper?show_secrets=true"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .expect("request from a non-loopback address");
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let body = response.text().await.expect("body");
    assert!(body.contains("loopback") && body.contains(&ip.to_string()) && !body.contains(SECRET), "{body}");
    let masked = d.http.get(format!("{remote}/v1/agents/keeper")).bearer_auth(TOKEN).send().await.expect("request");
    assert_eq!(masked.status(), StatusCode::OK);
    let masked = masked.text().await.expect("body");
    assert!(masked.contains("<masked>") && !masked.contains(SECRET), "{masked}");
    d.stop().await;
}
