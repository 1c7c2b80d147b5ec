//! The HTTP API and agents' conversations, in process, on the mock backend.

use std::sync::Arc;
use std::time::Duration;

use agent_manager::Store;
use agentd::config::Config;
use agentd::daemon::Daemon;
use backend_core::{ExecutionBackend, OwnershipLabels};
use backend_mock::{MockBackend, MockEngine};
use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::{json, Value};

#[path = "support/in_process.rs"]
mod in_process;
use in_process::{test_config, InProcess};

const TOKEN: &str = "test-token-0123456789";

struct TestDaemon {
    base: String,
    engine: MockEngine,
    store: Store,
    http: reqwest::Client,
    token: Option<String>,
    manager: Arc<agent_manager::AgentManager<dyn ExecutionBackend>>,
    daemon: InProcess,
}

/// A model credential file of a fake key, one per call.
fn fake_key_file() -> std::path::PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("agentd-api-test-key-{}-{n}", std::process::id()));
    std::fs::write(&path, "sk-ant-api-test-unused\n").expect("write the fake key file");
    path
}

impl TestDaemon {
    async fn start(token: Option<&str>) -> Self {
        Self::start_with(token, |_, _| {}).await
    }

    /// A daemon whose configuration and engine `prepare` adjusts first.
    async fn start_with(token: Option<&str>, prepare: impl FnOnce(&mut Config, &MockEngine)) -> Self {
        let mut config = test_config(token);
        // A model credential, without which claude-code spawns are refused (none is used).
        let key_file = fake_key_file();
        config.model.api_key_file = Some(key_file.clone());
        let engine = MockEngine::new();
        prepare(&mut config, &engine);
        let daemon = InProcess::start(&config, engine).await;
        // The daemon read it at bind.
        let _ = std::fs::remove_file(&key_file);
        Self {
            base: daemon.base.clone(),
            engine: daemon.engine.clone(),
            store: daemon.store.clone(),
            http: reqwest::Client::new(),
            token: token.map(str::to_owned),
            manager: daemon.manager.clone(),
            daemon,
        }
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut r = self.req(method, path);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let response = r.send().await.expect("request");
        let status = response.status();
        let text = response.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn spawn(&self, name: &str) -> Value {
        let (status, agent) = self.call(reqwest::Method::POST, "/v1/agents", Some(json!({ "name": name }))).await;
        assert_eq!(status, StatusCode::CREATED, "{agent}");
        agent
    }

    async fn stop(self) -> agent_manager::ShutdownSummary {
        self.daemon.stop(Duration::from_secs(10)).await
    }
}

fn error_text(body: &Value) -> &str {
    body.get("error").and_then(Value::as_str).unwrap_or_else(|| panic!("no error field in {body}"))
}

#[tokio::test]
async fn agents_can_be_spawned_listed_inspected_stopped_restarted_and_removed() {
    let d = TestDaemon::start(None).await;
    let agent = d.spawn("alpha").await;
    for field in [
        "id",
        "name",
        "kind",
        "status",
        "health",
        "connected",
        "session",
        "image",
        "restart",
        "restarts",
        "exit",
        "created_at",
        "updated_at",
    ] {
        assert!(agent.get(field).is_some(), "agent JSON lacks {field}: {agent}");
    }
    assert_eq!(agent["status"], "running");
    assert_eq!(agent["kind"], "image");
    assert_eq!(agent["connected"], false);
    assert_eq!(agent["exit"], Value::Null);
    let id = agent["id"].as_str().expect("id").to_owned();

    let (status, list) = d.call(reqwest::Method::GET, "/v1/agents", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    let (_, running) = d.call(reqwest::Method::GET, "/v1/agents?status=running", None).await;
    assert_eq!(running.as_array().map(Vec::len), Some(1));
    let (_, stopped) = d.call(reqwest::Method::GET, "/v1/agents?status=stopped", None).await;
    assert_eq!(stopped.as_array().map(Vec::len), Some(0));
    let (status, body) = d.call(reqwest::Method::GET, "/v1/agents?status=sleeping", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_text(&body).contains("expected one of"), "{body}");

    let (status, by_id) = d.call(reqwest::Method::GET, &format!("/v1/agents/{id}"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(by_id["name"], "alpha");

    let (status, logs) = d.call(reqwest::Method::GET, "/v1/agents/alpha/logs?tail=10", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(logs.as_str().unwrap_or_default().contains("echo-agent started"), "{logs}");

    let (status, stopped) = d.call(reqwest::Method::POST, "/v1/agents/alpha/stop", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stopped["status"], "stopped");
    assert_eq!(stopped["exit"]["code"], 0);

    let (status, restarted) = d.call(reqwest::Method::POST, "/v1/agents/alpha/restart", None).await;
    assert_eq!(status, StatusCode::OK, "{restarted}");
    assert_eq!(restarted["status"], "running");
    assert_eq!(restarted["restarts"], 1);

    let (status, runs) = d.call(reqwest::Method::GET, "/v1/agents/alpha/runs", None).await;
    assert_eq!(status, StatusCode::OK);
    let runs = runs.as_array().expect("runs");
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0]["ended_by"], "stop");
    assert_eq!(runs[0]["exit"]["code"], 0);

    let response = d.req(reqwest::Method::DELETE, "/v1/agents/alpha").send().await.expect("delete");
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let (status, body) = d.call(reqwest::Method::GET, "/v1/agents/alpha", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(error_text(&body).contains("alpha"));
    d.stop().await;
}

#[tokio::test]
async fn bad_requests_get_clear_errors_with_the_right_status() {
    let d = TestDaemon::start(None).await;
    let post = |body: Value| d.call(reqwest::Method::POST, "/v1/agents", Some(body));

    let (status, body) = post(json!({ "name": "Not Valid" })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_text(&body).contains("name"), "{body}");

    let (status, body) = post(json!({ "name": "x", "colour": "blue" })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_text(&body).contains("colour"), "{body}");

    let response = d
        .req(reqwest::Method::POST, "/v1/agents")
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    let (status, body) = post(json!({ "name": "x", "restart": "sometimes" })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(error_text(&body).contains("never, on-failure, always"), "{body}");

    let (status, body) = post(json!({ "name": "noimg", "image": "nowhere:1" })).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(error_text(&body).contains("nowhere:1"), "{body}");

    d.spawn("taken").await;
    let (status, body) = post(json!({ "name": "taken" })).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(error_text(&body).contains("taken"), "{body}");

    d.engine.fail_next(1);
    let (status, body) = post(json!({ "name": "unlucky" })).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(error_text(&body).contains("unavailable"), "{body}");

    let (status, body) = d.call(reqwest::Method::POST, "/v1/agents/ghost/stop", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(error_text(&body).contains("ghost"), "{body}");

    let (status, body) =
        d.call(reqwest::Method::POST, "/v1/agents/taken/messages", Some(json!({ "text": "hi" }))).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(error_text(&body).contains("takes no messages"), "{body}");

    let (status, _) = d.call(reqwest::Method::GET, "/v2/nothing", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (status, body) = post(json!({ "name": "hosty", "network": "host" })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "host networking without an API token");
    assert!(error_text(&body).contains("server.token"), "{body}");

    let response = d.req(reqwest::Method::PUT, "/v1/agents").send().await.expect("send");
    assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
    let body: Value = response.json().await.expect("a JSON error body");
    assert!(error_text(&body).contains("method not allowed"), "{body}");
    d.stop().await;
}

#[tokio::test]
async fn a_spawn_whose_container_cannot_start_answers_with_the_failed_agent() {
    let d = TestDaemon::start(None).await;
    d.engine.fail_next_matching(1, |c| matches!(c, backend_mock::MockCall::Start(_)));
    // A scripted engine failure reads as unavailable: 503, the agent recorded as failed.
    let (status, body) = d.call(reqwest::Method::POST, "/v1/agents", Some(json!({ "name": "dud" }))).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let (status, agent) = d.call(reqwest::Method::GET, "/v1/agents/dud", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(agent["status"], "failed");
    assert!(agent["exit"]["error"].as_str().unwrap_or_default().starts_with("start failed"), "{agent}");
    d.stop().await;
}

#[tokio::test]
async fn with_a_token_the_api_and_metrics_require_it_and_healthz_does_not() {
    let d = TestDaemon::start(Some(TOKEN)).await;
    let anonymous = reqwest::Client::new();
    for path in ["/v1/agents", "/v1/events", "/metrics"] {
        let r = anonymous.get(format!("{}{path}", d.base)).send().await.expect("send");
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{path}");
        let body: Value = r.json().await.expect("json");
        assert!(error_text(&body).contains("bearer token"), "{body}");
        let r = anonymous
            .get(format!("{}{path}", d.base))
            .bearer_auth("wrong-token-0123456789")
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{path} with a wrong token");
    }
    let (status, _) = d.call(reqwest::Method::GET, "/v1/agents", None).await;
    assert_eq!(status, StatusCode::OK);
    let health: Value =
        anonymous.get(format!("{}/healthz", d.base)).send().await.expect("send").json().await.expect("json");
    assert_eq!(health["status"], "ok");
    assert_eq!(health["backend"], "mock");
    assert!(health["instance"].as_str().is_some_and(|i| !i.is_empty()));
    assert_eq!(health["version"], env!("CARGO_PKG_VERSION"));
    d.stop().await;
}

#[tokio::test]
async fn metrics_count_agents_by_status_and_health() {
    let d = TestDaemon::start(None).await;
    d.spawn("m1").await;
    d.spawn("m2").await;
    d.call(reqwest::Method::POST, "/v1/agents/m2/stop", None).await;
    let text = d.req(reqwest::Method::GET, "/metrics").send().await.expect("send").text().await.expect("text");
    for line in [
        "agentd_agents{status=\"running\"} 1",
        "agentd_agents{status=\"stopped\"} 1",
        "agentd_agents{status=\"failed\"} 0",
        "agentd_reconcile_pass_duration_seconds",
        "agentd_engine_errors_total",
        "agentd_restarts_total 0",
        "agentd_relists_after_dropped_events_total",
        "agentd_running_agents_health{health=",
    ] {
        assert!(text.contains(line), "metrics lack {line:?}:\n{text}");
    }
    d.stop().await;
}

/// A scrape counts from memory: it answers, and counts right, without the database.
#[tokio::test]
async fn metrics_are_counted_from_memory() {
    let d = TestDaemon::start(None).await;
    d.spawn("c1").await;
    d.spawn("c2").await;
    d.call(reqwest::Method::POST, "/v1/agents/c2/stop", None).await;
    d.store.close().await;
    let response = d.req(reqwest::Method::GET, "/metrics").send().await.expect("send");
    assert_eq!(response.status(), StatusCode::OK);
    let text = response.text().await.expect("text");
    for line in
        ["agentd_agents{status=\"running\"} 1", "agentd_agents{status=\"stopped\"} 1", "agentd_connected_agents 0"]
    {
        assert!(text.contains(line), "metrics lack {line:?}:\n{text}");
    }
    d.stop().await;
}

#[tokio::test]
async fn events_are_listed_filtered_and_streamed() {
    let d = TestDaemon::start(None).await;
    let stream = d.req(reqwest::Method::GET, "/v1/events/stream?agent=streamed").send().await.expect("stream");
    assert_eq!(stream.status(), StatusCode::OK);
    let mut body = stream.bytes_stream();
    d.spawn("quiet").await;
    d.spawn("streamed").await;
    let mut seen = String::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(chunk) = body.next().await {
            seen.push_str(&String::from_utf8_lossy(&chunk.expect("chunk")));
            if seen.contains("\"kind\":\"started\"") {
                break;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no started event streamed; got {seen:?}"));
    assert!(seen.contains("event: lifecycle"), "{seen}");
    assert!(!seen.contains("\"agent\":\"quiet\""), "the filter let another agent through: {seen}");

    let (status, events) = d.call(reqwest::Method::GET, "/v1/events?agent=streamed", None).await;
    assert_eq!(status, StatusCode::OK);
    let events = events.as_array().expect("events").clone();
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["kind"].as_str()).collect();
    assert_eq!(kinds, ["spawned", "started"]);
    for field in ["id", "agent_id", "kind", "from", "to", "detail", "at"] {
        assert!(events[1].get(field).is_some(), "event lacks {field}");
    }
    let first = events[0]["id"].as_i64().expect("id");
    let (_, later) = d.call(reqwest::Method::GET, &format!("/v1/events?agent=streamed&since={first}"), None).await;
    assert_eq!(later.as_array().map(Vec::len), Some(1));
    d.stop().await;
}

/// Waits until the manager's broadcasts have `want` receivers (lifecycle, conversation).
async fn wait_subscribers(d: &TestDaemon, want: (usize, usize), what: &str) {
    let waited = tokio::time::timeout(Duration::from_secs(2), async {
        while d.manager.subscribers() != want {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "{what}: subscribers are {:?}, expected {want:?}", d.manager.subscribers());
}

#[tokio::test]
async fn a_client_that_goes_away_takes_its_stream_subscription_with_it() {
    let d = TestDaemon::start(None).await;
    d.spawn("quiet").await;
    let (events, entries) = d.manager.subscribers();
    let event_stream = d.req(reqwest::Method::GET, "/v1/events/stream").send().await.expect("events stream");
    let conversation_stream =
        d.req(reqwest::Method::GET, "/v1/agents/quiet/conversation/stream").send().await.expect("conversation");
    assert_eq!((event_stream.status(), conversation_stream.status()), (StatusCode::OK, StatusCode::OK));
    wait_subscribers(&d, (events + 1, entries + 1), "with both streams open").await;
    // Nothing happens meanwhile: no event or entry would wake a task that waits for one.
    drop(event_stream);
    drop(conversation_stream);
    wait_subscribers(&d, (events, entries), "after both clients went away").await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_is_posted_listed_and_streamed_from_any_point() {
    let d = TestDaemon::start(Some(TOKEN)).await;
    let body =
        json!({ "name": "talker", "kind": "claude-code", "image": backend_mock::ECHO_IMAGE, "prompt": "start here" });
    let (status, agent) = d.call(reqwest::Method::POST, "/v1/agents", Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{agent}");
    for field in ["session_id", "turn", "cost_usd", "usage", "last_result", "connected", "paused"] {
        assert!(agent.get(field).is_some(), "agent JSON lacks {field}: {agent}");
    }
    let id = agent["id"].as_str().expect("id").to_owned();
    assert_eq!(agent["session_id"], id.as_str(), "the session id is the agent id");
    let answered = |text: &'static str| {
        move |entries: &Value| {
            entries.as_array().is_some_and(|a| a.iter().any(|e| e["kind"] == "result" && e["text"] == text))
        }
    };
    let entries = wait_conversation(&d, "talker", answered("echo: start here")).await;
    let first_result =
        entries.as_array().expect("array").iter().find(|e| e["kind"] == "result").expect("result").clone();
    for field in ["seq", "at", "kind", "text", "data"] {
        assert!(first_result.get(field).is_some(), "entry lacks {field}: {first_result}");
    }
    let agent = d.call(reqwest::Method::GET, "/v1/agents/talker", None).await.1;
    assert_eq!(agent["connected"], true);
    assert_eq!(agent["turn"], "idle");
    assert_eq!(agent["last_result"]["text"], "echo: start here");
    assert_eq!(agent["usage"]["output_tokens"], 5);
    assert!(agent["cost_usd"].as_f64().is_some_and(|c| c > 0.0), "{agent}");

    // POST answers 202 with the seq; the stream resumes after Last-Event-ID.
    let (status, queued) =
        d.call(reqwest::Method::POST, "/v1/agents/talker/messages", Some(json!({ "text": "hello" }))).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{queued}");
    let seq = queued["seq"].as_i64().expect("seq");
    let entries = wait_conversation(&d, "talker", answered("echo: hello")).await;
    let all: Vec<i64> = entries.as_array().expect("array").iter().filter_map(|e| e["seq"].as_i64()).collect();
    assert_eq!(all, (1..=all.len() as i64).collect::<Vec<_>>());
    let (_, page) =
        d.call(reqwest::Method::GET, &format!("/v1/agents/talker/conversation?after={seq}&limit=2"), None).await;
    let page: Vec<i64> = page.as_array().expect("array").iter().filter_map(|e| e["seq"].as_i64()).collect();
    assert_eq!(page, [seq + 1, seq + 2]);

    let stream = d
        .req(reqwest::Method::GET, "/v1/agents/talker/conversation/stream")
        .header("last-event-id", (seq - 1).to_string())
        .send()
        .await
        .expect("stream");
    assert_eq!(stream.status(), StatusCode::OK);
    let mut body = stream.bytes_stream();
    let mut text = String::new();
    let mut ids = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while ids.last().copied() != all.last().copied() {
        let chunk = tokio::time::timeout_at(deadline, body.next())
            .await
            .expect("stream data in time")
            .expect("chunk")
            .expect("bytes");
        text.push_str(&String::from_utf8_lossy(&chunk));
        ids = text.lines().filter_map(|l| l.strip_prefix("id:")).filter_map(|v| v.trim().parse::<i64>().ok()).collect();
    }
    assert_eq!(ids, all[(seq - 1) as usize..].to_vec(), "everything after Last-Event-ID, once, in order");
    drop(body);

    let (status, body) =
        d.call(reqwest::Method::POST, "/v1/agents/talker/messages", Some(json!({ "words": "hello" }))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = d.call(reqwest::Method::POST, "/v1/agents/talker/stop", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) =
        d.call(reqwest::Method::POST, "/v1/agents/talker/messages", Some(json!({ "text": "hello?" }))).await;
    assert_eq!(status, StatusCode::CONFLICT, "a stopped agent takes no message: {body}");
    assert!(error_text(&body).contains("not running"), "{body}");
    // The conversation task records `disconnected` once it sees the attach end, which
    // follows the stop's return.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, events) = d.call(reqwest::Method::GET, "/v1/events?agent=talker", None).await;
        let kinds: Vec<String> =
            events.as_array().expect("events").iter().filter_map(|e| e["kind"].as_str().map(str::to_owned)).collect();
        if kinds.iter().any(|k| k == "connected") && kinds.iter().any(|k| k == "disconnected") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no connected and disconnected events within 10 s: {kinds:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    d.stop().await;
}

async fn wait_conversation(d: &TestDaemon, name: &str, done: impl Fn(&Value) -> bool) -> Value {
    let mut entries = Value::Null;
    for _ in 0..500 {
        entries = d.call(reqwest::Method::GET, &format!("/v1/agents/{name}/conversation"), None).await.1;
        if done(&entries) {
            return entries;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the conversation of {name} never got there: {entries}");
}

/// A backend whose snapshot panics: the supervision loop dies on its first pass.
#[derive(Debug)]
struct PanickingBackend(MockBackend);

#[async_trait::async_trait]
impl ExecutionBackend for PanickingBackend {
    fn name(&self) -> &'static str {
        "panicking"
    }
    fn ownership(&self) -> &OwnershipLabels {
        self.0.ownership()
    }
    fn capabilities(&self) -> backend_core::Capabilities {
        self.0.capabilities()
    }
    async fn image_exists(&self, image: &str) -> backend_core::Result<bool> {
        self.0.image_exists(image).await
    }
    async fn image_user(&self, image: &str) -> backend_core::Result<Option<String>> {
        self.0.image_user(image).await
    }
    async fn create_session(&self, spec: &backend_core::SessionSpec) -> backend_core::Result<String> {
        self.0.create_session(spec).await
    }
    async fn start_session(&self, session: &str) -> backend_core::Result<()> {
        self.0.start_session(session).await
    }
    async fn session_exists(&self, session: &str) -> backend_core::Result<bool> {
        self.0.session_exists(session).await
    }
    async fn stop_session(&self, session: &str, grace: Duration) -> backend_core::Result<()> {
        self.0.stop_session(session, grace).await
    }
    async fn remove_session(&self, session: &str) -> backend_core::Result<()> {
        self.0.remove_session(session).await
    }
    async fn snapshot(&self) -> backend_core::Result<Vec<backend_core::SessionState>> {
        panic!("a bug in the supervision path");
    }
}

#[tokio::test]
async fn a_daemon_whose_supervisor_dies_exits_with_an_error() {
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".parse().expect("addr");
    let store = Store::in_memory().await.expect("store");
    let instance = store.instance_id().await.expect("instance");
    let owner = OwnershipLabels::new("agentd", instance.clone()).expect("labels");
    let backend: Arc<dyn ExecutionBackend> = Arc::new(PanickingBackend(MockBackend::new(MockEngine::new(), owner)));
    let daemon = Daemon::bind(&config, backend, store, instance).await.expect("bind");
    let outcome = tokio::time::timeout(Duration::from_secs(10), daemon.run(std::future::pending()))
        .await
        .expect("the daemon must not keep serving over a dead supervisor");
    let error = outcome.expect_err("a dead supervisor is an error").to_string();
    assert!(error.contains("supervision loop panicked"), "{error}");
}

// A2: metering and limits of the model gateway.

/// An agent's model limits come from its spawn (the API's `model_limits`, or the CLI's
/// flags) field by field over `[model]`; zero and unknown fields are refused; the agent JSON
/// and `/metrics` show the recorded usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_limits_are_set_at_spawn_and_model_usage_is_shown() {
    let d = TestDaemon::start(None).await;
    let post = |body: Value| d.call(reqwest::Method::POST, "/v1/agents", Some(body));
    let (status, body) = post(json!({ "name": "zero", "model_limits": { "requests_per_minute": 0 } })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(error_text(&body).contains("invalid model_limits.requests_per_minute: 0: at least 1"), "{body}");
    let (status, body) = post(json!({ "name": "typo", "model_limits": { "requests_per_minut": 2 } })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(error_text(&body).contains("requests_per_minut"), "{body}");

    let (status, agent) = post(json!({ "name": "api", "model_limits": { "max_concurrent_requests": 3 } })).await;
    assert_eq!(status, StatusCode::CREATED, "{agent}");
    assert_eq!(
        agent["model_limits"],
        json!({"requests_per_minute": null, "max_concurrent_requests": 3, "max_output_tokens_per_day": null})
    );
    assert_eq!(agent["model_usage"], json!({"requests": 0, "input_tokens": 0, "output_tokens": 0}));

    let base = d.base.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_agentd"))
            .args(["spawn", "cli", "--requests-per-minute", "2", "--max-output-tokens-per-day", "1000"])
            .env("AGENTD_URL", base)
            .env("XDG_CONFIG_HOME", std::env::temp_dir().join("agentd-api-test-no-config"))
            .output()
    })
    .await
    .expect("join")
    .expect("run agentd spawn");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (_, agent) = d.call(reqwest::Method::GET, "/v1/agents/cli", None).await;
    assert_eq!(
        agent["model_limits"],
        json!({"requests_per_minute": 2, "max_concurrent_requests": null, "max_output_tokens_per_day": 1000})
    );

    let id = agent["id"].as_str().expect("id").to_owned();
    let request = agent_manager::ModelRequest {
        agent_id: id,
        at: time::OffsetDateTime::now_utc(),
        model: Some("claude-stand-in".into()),
        status: 200,
        latency_ms: 5,
        input_tokens: 10,
        output_tokens: 5,
    };
    d.manager.record_model_requests(&[request.clone(), request]).await.expect("record");
    let (_, agent) = d.call(reqwest::Method::GET, "/v1/agents/cli", None).await;
    assert_eq!(agent["model_usage"], json!({"requests": 2, "input_tokens": 20, "output_tokens": 10}));
    let text = d.req(reqwest::Method::GET, "/metrics").send().await.expect("send").text().await.expect("text");
    for line in [
        "agentd_model_requests_total 2",
        "agentd_model_input_tokens_total 20",
        "agentd_model_output_tokens_total 10",
        "agentd_model_requests_refused_total 0",
    ] {
        assert!(text.lines().any(|l| l == line), "metrics lack {line:?}:\n{text}");
    }
    d.stop().await;
}

// ---- Identity and files (issue I, item 5) ----

/// Root and protected workdirs are 422 naming the rule (the daemon protects its data
/// directory); a malformed user is 400 naming the field.
#[tokio::test]
async fn identity_and_file_refusals_are_unprocessable_and_name_the_rule() {
    let data = std::env::temp_dir().join(format!("agentd-api-data-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&data).expect("data dir");
    let store_path = data.join("agentd.db");
    let d = TestDaemon::start_with(None, |c, _| c.store.path = Some(store_path)).await;
    let post = |body: Value| d.call(reqwest::Method::POST, "/v1/agents", Some(body));

    let (status, body) = post(json!({ "name": "root", "user": "0" })).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(error_text(&body).contains("agents.allow_root"), "{body}");
    let (status, body) = post(json!({ "name": "bad", "user": "1000:" })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(error_text(&body).starts_with("invalid user"), "{body}");
    for (dir, rule) in [("/", "root directory"), ("/etc", "a system directory"), ("relative", "absolute path")] {
        let (status, body) = post(json!({ "name": "wd", "workdir": dir })).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{dir}: {body}");
        assert!(error_text(&body).contains(rule), "{dir}: {body}");
    }
    let (status, body) = post(json!({ "name": "data", "workdir": data })).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(error_text(&body).contains("agentd's data directory"), "{body}");
    d.stop().await;
    let _ = std::fs::remove_dir_all(&data);
}

// ---- Host firewall (issue I, helper B) ----

/// An isolated network for the mock to report, on an interface no host has.
fn mock_isolated_network() -> backend_core::IsolatedNetwork {
    backend_core::IsolatedNetwork {
        name: "agentd-isolated".into(),
        interface: "agtnone0".into(),
        gateways: vec!["192.0.2.1".parse().expect("ip")],
        subnets: vec!["192.0.2.0/24".into()],
        on_this_host: true,
    }
}

/// When the firewall rules cannot be installed, the daemon starts, but isolated agents
/// (claude-code's default network) are refused with 503 and the reason; internet agents
/// still run; the refusal also covers restarts.
#[tokio::test]
async fn isolated_agents_are_refused_when_the_firewall_cannot_be_installed() {
    let daemon = TestDaemon::start_with(None, |config, engine| {
        // `false` fails like an iptables that may not change the rules.
        config.firewall.iptables_command = "false".into();
        config.firewall.ip6tables_command = "false".into();
        engine.set_isolated_network(Some(mock_isolated_network()));
    })
    .await;
    // The daemon serves: healthy once its first pass ran.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (status, health) = daemon.call(reqwest::Method::GET, "/healthz", None).await;
        if status == StatusCode::OK {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the daemon never became healthy: {status} {health}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let claude = json!({ "name": "coder", "kind": "claude-code", "image": backend_mock::ECHO_IMAGE });
    let (status, body) = daemon.call(reqwest::Method::POST, "/v1/agents", Some(claude)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let text = error_text(&body);
    for needle in ["not protected", "agtnone0", "`false", "exited with 1", "run agentd as root", "\"internet\""] {
        assert!(text.contains(needle), "the error says {needle:?}: {text}");
    }
    let (status, body) = daemon.call(reqwest::Method::GET, "/v1/agents/coder", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "a refused spawn leaves no agent: {body}");
    assert!(daemon.engine.calls().iter().all(|c| !matches!(c, backend_mock::MockCall::Create(_))), "nothing created");

    let explicit = json!({ "name": "iso", "network": "isolated" });
    let (status, body) = daemon.call(reqwest::Method::POST, "/v1/agents", Some(explicit)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "an image agent asking for isolated too: {body}");

    // Internet agents run.
    let web = daemon.spawn("web").await;
    assert_eq!(web["status"], "running", "{web}");
    assert_eq!(web["network"], "internet", "image agents default to internet: {web}");
    let open =
        json!({ "name": "open", "kind": "claude-code", "image": backend_mock::ECHO_IMAGE, "network": "internet" });
    let (status, body) = daemon.call(reqwest::Method::POST, "/v1/agents", Some(open)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    daemon.stop().await;
}

#[tokio::test]
async fn a_spawn_takes_its_egress_allow_list_and_refuses_a_bad_entry() {
    let d = TestDaemon::start(None).await;
    let post = |body: Value| d.call(reqwest::Method::POST, "/v1/agents", Some(body));
    let (status, agent) =
        post(json!({ "name": "egress", "egress_allow": ["GitHub.com", "git.corp.example:22"] })).await;
    assert_eq!(status, StatusCode::CREATED, "{agent}");
    assert_eq!(agent["egress_allow"], json!(["GitHub.com", "git.corp.example:22"]), "{agent}");
    let (status, agent) = post(json!({ "name": "default-egress" })).await;
    assert_eq!(status, StatusCode::CREATED, "{agent}");
    assert_eq!(agent["egress_allow"], json!([]), "{agent}");

    let (status, body) = post(json!({ "name": "bad-egress", "egress_allow": ["https://x.example/"] })).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let text = error_text(&body);
    assert!(
        text.contains("egress_allow") && text.contains("https://x.example/") && text.contains("not a URL"),
        "{text}"
    );
    d.stop().await;
}

// J: /healthz tells the truth.

async fn wait_health(d: &TestDaemon, what: &str, done: impl Fn(StatusCode, &Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (status, health) = d.call(reqwest::Method::GET, "/healthz", None).await;
        if done(status, &health) {
            return health;
        }
        assert!(tokio::time::Instant::now() < deadline, "/healthz never showed {what}; last: {status} {health}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `/healthz` reports the engine's and the supervisor's state: `200` and `ok` while the
/// engine answers and passes are recent; `503` and `degraded` during an engine outage, with
/// the error and since when; `ok` again once the engine answers.
#[tokio::test]
async fn healthz_reports_the_engine_and_the_supervisor_and_fails_during_an_outage() {
    let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = down.clone();
    let d = TestDaemon::start_with(None, move |config, engine| {
        config.reconcile.interval = Duration::from_secs(1);
        engine.fail_next_matching(u32::MAX, move |call| {
            matches!(call, backend_mock::MockCall::Snapshot) && flag.load(std::sync::atomic::Ordering::SeqCst)
        });
    })
    .await;
    let health = wait_health(&d, "ok", |status, h| status == StatusCode::OK && h["status"] == "ok").await;
    assert_eq!(health["engine"]["state"], "ok", "{health}");
    assert!(health["engine"]["last_error"].is_null(), "{health}");
    assert_eq!(health["supervisor"]["state"], "running", "{health}");
    assert!(health["supervisor"]["last_pass_at"].as_str().is_some_and(|t| t.ends_with('Z')), "{health}");
    assert!(health["supervisor"]["last_pass_age_secs"].as_u64().is_some_and(|age| age <= 2), "{health}");
    assert_eq!(health["supervisor"]["stale_after_secs"], 32, "{health}");

    down.store(true, std::sync::atomic::Ordering::SeqCst);
    let health = wait_health(&d, "an unavailable engine", |status, h| {
        status == StatusCode::SERVICE_UNAVAILABLE && h["engine"]["state"] == "unavailable"
    })
    .await;
    assert_eq!(health["status"], "degraded", "{health}");
    assert!(
        health["engine"]["last_error"].as_str().is_some_and(|e| e.contains("scripted failure")),
        "the engine's error is shown: {health}"
    );
    assert!(health["engine"]["since"].as_str().is_some(), "{health}");

    down.store(false, std::sync::atomic::Ordering::SeqCst);
    let health = wait_health(&d, "recovery", |status, h| status == StatusCode::OK && h["status"] == "ok").await;
    assert_eq!(health["engine"]["state"], "ok", "{health}");
    assert!(
        health["engine"]["last_error"].as_str().is_some_and(|e| e.contains("scripted failure")),
        "the last error stays shown: {health}"
    );
    d.stop().await;
}

// ---- The CLI's verbs and its configuration (issue J, items 11 and 3) ----

/// Runs the client binary against `base` with `xdg` as its configuration home and no
/// AGENTD_* variables but AGENTD_URL.
async fn agentd_cli(base: &str, xdg: &std::path::Path, args: &[&str]) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_agentd"));
    cmd.args(args).env("XDG_CONFIG_HOME", xdg);
    for (key, _) in std::env::vars() {
        if key.starts_with("AGENTD_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("AGENTD_URL", base);
    tokio::task::spawn_blocking(move || cmd.output()).await.expect("join").expect("run agentd")
}

fn no_config() -> std::path::PathBuf {
    std::env::temp_dir().join("agentd-api-test-no-config")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

async fn status_of(d: &TestDaemon, name: &str) -> Value {
    let (status, agent) = d.call(reqwest::Method::GET, &format!("/v1/agents/{name}"), None).await;
    if status == StatusCode::NOT_FOUND {
        return Value::Null;
    }
    agent["status"].clone()
}

/// `stop`, `restart`, `inspect` and `rm` take several names: each is handled, a name
/// that fails is reported with its name and the others still go ahead, and the exit is 1
/// if any failed. `rm` refuses a running agent unless `-f`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_verb_takes_several_names_and_rm_refuses_a_running_agent_without_force() {
    let d = TestDaemon::start(None).await;
    d.spawn("multi-a").await;
    d.spawn("multi-b").await;
    let xdg = no_config();

    let out = agentd_cli(&d.base, &xdg, &["stop", "multi-a", "multi-nope", "multi-b"]).await;
    assert_eq!(out.status.code(), Some(1), "stderr: {}", text(&out.stderr));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(stdout.contains("multi-a stopped") && stdout.contains("multi-b stopped"), "{stdout}");
    assert!(
        stderr.contains("agentd: multi-nope: ") && stderr.contains("1 of 3 agents could not be stopped"),
        "{stderr}"
    );
    assert_eq!(status_of(&d, "multi-a").await, "stopped");
    assert_eq!(status_of(&d, "multi-b").await, "stopped");

    let out = agentd_cli(&d.base, &xdg, &["restart", "multi-a", "multi-b"]).await;
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(status_of(&d, "multi-a").await, "running");
    assert_eq!(status_of(&d, "multi-b").await, "running");

    let out = agentd_cli(&d.base, &xdg, &["inspect", "multi-a", "multi-b"]).await;
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let inspected: Value = serde_json::from_slice(&out.stdout).expect("inspect prints JSON");
    let names: Vec<&str> = inspected.as_array().expect("an array").iter().filter_map(|a| a["name"].as_str()).collect();
    assert_eq!(names, ["multi-a", "multi-b"], "{inspected}");
    let out = agentd_cli(&d.base, &xdg, &["inspect", "multi-a"]).await;
    let one: Value = serde_json::from_slice(&out.stdout).expect("inspect prints JSON");
    assert_eq!(one["name"], "multi-a", "one name is one object: {one}");

    d.call(reqwest::Method::POST, "/v1/agents/multi-b/stop", None).await;
    let out = agentd_cli(&d.base, &xdg, &["rm", "multi-a", "multi-b"]).await;
    assert_eq!(out.status.code(), Some(1), "stderr: {}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("multi-a: agent multi-a is running")
            && stderr.contains("agentd stop multi-a")
            && stderr.contains("agentd rm -f multi-a"),
        "{stderr}"
    );
    assert_eq!(status_of(&d, "multi-a").await, "running", "a refused rm leaves the agent running");
    assert_eq!(status_of(&d, "multi-b").await, Value::Null, "the stopped one is removed");

    let out = agentd_cli(&d.base, &xdg, &["rm", "-f", "multi-a"]).await;
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert_eq!(status_of(&d, "multi-a").await, Value::Null);
    d.stop().await;
}

/// `stop -t SECS` overrides the agent's grace: an agent that ignores SIGTERM is killed
/// after 0 s instead of its 10 s. The API's `grace_secs` is bounded to 0..=3600.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_t_overrides_the_grace_and_the_api_bounds_it() {
    let d = TestDaemon::start(None).await;
    let body = json!({ "name": "stubborn", "env": { "ECHO_IGNORE_SIGTERM": "1" } });
    let (status, agent) = d.call(reqwest::Method::POST, "/v1/agents", Some(body)).await;
    assert_eq!(status, StatusCode::CREATED, "{agent}");

    let (status, body) = d.call(reqwest::Method::POST, "/v1/agents/stubborn/stop?grace_secs=3601", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(error_text(&body).contains("grace_secs: 3601 is out of range: give 0 to 3600 seconds"), "{body}");
    assert_eq!(status_of(&d, "stubborn").await, "running");
    let out = agentd_cli(&d.base, &no_config(), &["stop", "-t", "3601", "stubborn"]).await;
    assert_eq!(out.status.code(), Some(2), "clap refuses it: {}", text(&out.stderr));
    assert!(text(&out.stderr).contains("3601"), "{}", text(&out.stderr));

    let started = std::time::Instant::now();
    let out = agentd_cli(&d.base, &no_config(), &["stop", "-t", "0", "stubborn"]).await;
    let took = started.elapsed();
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert!(took < Duration::from_secs(5), "stop -t 0 took {took:?}: the 10 s grace was not overridden");
    assert!(text(&out.stdout).contains("stubborn stopped (exit 137)"), "killed: {}", text(&out.stdout));
    d.stop().await;
}

/// A client configuration that fails to load is said on stderr, naming the file and the
/// error, and the 401 hint says its token was not used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_config_that_fails_to_load_is_warned_about_and_named_in_the_401_hint() {
    let d = TestDaemon::start(Some(TOKEN)).await;
    let xdg = std::env::temp_dir().join(format!("agentd-api-test-broken-config-{}", std::process::id()));
    std::fs::create_dir_all(xdg.join("agentd")).expect("mkdir");
    let file = xdg.join("agentd/agentd.toml");
    std::fs::write(&file, format!("[server]\ntoken = \"{TOKEN}\"\nbogus_key = 1\n")).expect("write");

    let out = agentd_cli(&d.base, &xdg, &["ls"]).await;
    let _ = std::fs::remove_dir_all(&xdg);
    assert_eq!(out.status.code(), Some(1), "the token is not sent: {}", text(&out.stderr));
    let stderr = text(&out.stderr);
    let file = file.display().to_string();
    assert!(stderr.contains("warning") && stderr.contains(&file) && stderr.contains("bogus_key"), "{stderr}");
    let hint = stderr.lines().find(|l| l.contains("--token")).unwrap_or_else(|| panic!("no 401 hint: {stderr}"));
    assert!(hint.contains("could not be loaded") && hint.contains(&file), "{hint}");
    d.stop().await;
}

// jl: `GET /v1/agents/{id}/logs` streams (issue J, item 1).

/// A logs stream that follows across restarts ends its work when its client goes away,
/// also while it waits for the next run; bad input is a 400 saying what is accepted.
#[tokio::test]
async fn a_logs_follower_that_goes_away_ends_and_bad_since_is_a_400() {
    let d = TestDaemon::start(None).await;
    let (status, agent) =
        d.call(reqwest::Method::POST, "/v1/agents", Some(json!({ "name": "lf", "restart": "always" }))).await;
    assert_eq!(status, StatusCode::CREATED, "{agent}");
    let session = agent["session"].as_str().expect("session").to_owned();

    let (status, body) = d.call(reqwest::Method::GET, "/v1/agents/lf/logs?since=yesterday", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(error_text(&body).contains("RFC 3339") && error_text(&body).contains("10m"), "{body}");
    let (status, body) = d.call(reqwest::Method::GET, "/v1/agents/nobody/logs?follow=true", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");

    let baseline = d.manager.subscribers();
    let follower =
        d.req(reqwest::Method::GET, "/v1/agents/lf/logs?follow_restarts=true").send().await.expect("logs stream");
    assert_eq!(follower.status(), StatusCode::OK);
    assert_eq!(follower.headers()["content-type"], "text/plain; charset=utf-8");
    // The run ends; a restart is due in 10 s: the follower waits for it, subscribed to events.
    d.engine.exit(&session, 3);
    wait_subscribers(&d, (baseline.0 + 1, baseline.1), "a follower waiting for the next run").await;
    drop(follower);
    wait_subscribers(&d, baseline, "after the follower went away").await;
    d.stop().await;
}

/// `agentd logs -f` whose daemon shuts down under it says so and exits 1 (a run's end
/// exits 0; this is not one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_follow_exits_1_when_the_daemon_shuts_down_under_it() {
    let d = TestDaemon::start(None).await;
    let agent = d.spawn("lf2").await;
    let session = agent["session"].as_str().expect("session").to_owned();
    d.engine.clear_calls();
    let base = d.base.clone();
    let follower = tokio::spawn(async move { agentd_cli(&base, &no_config(), &["logs", "-f", "lf2"]).await });
    let opened = tokio::time::timeout(Duration::from_secs(10), async {
        while !d.engine.calls().contains(&backend_mock::MockCall::Output(session.clone())) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(opened.is_ok(), "the follower never opened the agent's output: {:?}", d.engine.calls());
    d.stop().await;
    let out = tokio::time::timeout(Duration::from_secs(20), follower).await.expect("the follower ends").expect("join");
    assert_eq!(out.status.code(), Some(1), "stdout:\n{}\nstderr:\n{}", text(&out.stdout), text(&out.stderr));
    assert!(text(&out.stdout).ends_with("--- agentd: the daemon is shutting down ---\n"), "{}", text(&out.stdout));
    assert!(text(&out.stderr).contains("the log stream broke off"), "{}", text(&out.stderr));
}

/// `follow_restarts` puts a marker before each new run and its output after it, and ends
/// (cleanly) when the agent is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_follow_restarts_marks_each_run_and_ends_when_the_agent_is_removed() {
    let d = TestDaemon::start_with(None, |config, _| {
        config.reconcile.restart_backoff.initial = Duration::from_secs(1);
        config.reconcile.restart_backoff.max = Duration::from_secs(1);
    })
    .await;
    let (status, agent) =
        d.call(reqwest::Method::POST, "/v1/agents", Some(json!({ "name": "lf3", "restart": "always" }))).await;
    assert_eq!(status, StatusCode::CREATED, "{agent}");
    let session = agent["session"].as_str().expect("session").to_owned();
    let response =
        d.req(reqwest::Method::GET, "/v1/agents/lf3/logs?follow_restarts=true").send().await.expect("logs stream");
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.bytes_stream();
    let mut text = String::new();
    // Reads on until `done` holds for what was read; `None` when the body ended first.
    async fn read_until(
        body: &mut (impl futures_util::Stream<Item = reqwest::Result<axum::body::Bytes>> + Unpin),
        text: &mut String,
        done: impl Fn(&str) -> bool,
    ) -> Option<()> {
        while !done(text) {
            let chunk =
                tokio::time::timeout(Duration::from_secs(20), body.next()).await.expect("a chunk within 20 s")?;
            text.push_str(std::str::from_utf8(&chunk.expect("chunk")).expect("UTF-8"));
        }
        Some(())
    }
    read_until(&mut body, &mut text, |t| !t.is_empty()).await.expect("the first run's output");
    d.engine.exit(&session, 3);
    let marker = "--- agentd: run 2 of lf3 started (container ";
    let found =
        read_until(&mut body, &mut text, |t| t.split_once(marker).is_some_and(|(_, rest)| rest.lines().count() >= 2))
            .await;
    assert!(found.is_some(), "the body ended before run 2's output:\n{text}");
    let (first, second) = text.split_once(marker).expect("marker");
    let second = second.split_once('\n').map_or("", |(_, lines)| lines);
    assert!(!first.is_empty() && first.lines().next() == second.lines().next(), "run 1:\n{first}\nrun 2:\n{second}");
    let (status, _) = d.call(reqwest::Method::DELETE, "/v1/agents/lf3", None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let ended = read_until(&mut body, &mut text, |_| false).await;
    assert!(ended.is_none() && !text.contains("reading the logs failed"), "{text}");
    d.stop().await;
}

// ---- The engine's answers to a client's mistakes (issue J, items 17 and 18) ----

/// A create the engine refuses as invalid (its 400, as Docker answers a CPU limit above
/// the host's) is the client's mistake: 422 with the engine's words, no agent left, never
/// 500. A CPU limit above the CPUs the engine reports is refused before the engine is
/// asked, naming the range.
#[tokio::test]
async fn engine_refusals_of_client_input_are_422_and_cpus_are_bounded_by_the_engine() {
    let d = TestDaemon::start(None).await;
    let answer = "Range of CPUs is from 0.01 to 2.00, as there are only 2 CPUs available";
    d.engine.reject_creates(Some(answer));
    let (status, body) = d.call(reqwest::Method::POST, "/v1/agents", Some(json!({ "name": "refused" }))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert!(error_text(&body).contains(answer), "the engine's words: {body}");
    let (status, body) = d.call(reqwest::Method::GET, "/v1/agents/refused", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "a refused spawn leaves no agent: {body}");
    d.engine.reject_creates(None);

    d.engine.set_cpus(Some(2));
    let creates = || d.engine.calls().iter().filter(|c| matches!(c, backend_mock::MockCall::Create(_))).count();
    let before = creates();
    let (status, body) = d.call(reqwest::Method::POST, "/v1/agents", Some(json!({ "name": "big", "cpus": 3 }))).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let text = error_text(&body);
    assert!(text.contains("invalid cpus") && text.contains("at most 2") && text.contains("0.01"), "{text}");
    assert_eq!(creates(), before, "refused before the engine is asked");
    let (status, body) = d.call(reqwest::Method::POST, "/v1/agents", Some(json!({ "name": "fits", "cpus": 2 }))).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    d.stop().await;

    // The agents.cpus default means "up to": above the host's CPUs, agents get the host's.
    let d = TestDaemon::start_with(None, |config, engine| {
        config.agents.cpus = Some(8.0);
        engine.set_cpus(Some(2));
    })
    .await;
    let agent = d.spawn("default").await;
    let session = agent["session"].as_str().expect("session");
    let spec = d.engine.created_spec(session).expect("created");
    assert_eq!(spec.resources.cpus, Some(2.0), "{spec:?}");
    d.stop().await;
}
