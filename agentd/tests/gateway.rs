//! The model gateway in process, on the mock backend, with the stand-in model as its
//! upstream: the secret each agent gets, the credential swap, streaming, and every refusal.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_manager::{AgentKind, AgentManager, GatewayEndpoints, ManagerConfig, ManagerError, NewAgent, Store};
use agentd::config::ModelConfig;
use agentd::gateway::{router, Credential, CredentialKind, ModelGateway, OAUTH_BETA};
use backend_core::{ExecutionBackend, NetworkGateways, NetworkPolicy, OwnershipLabels};
use backend_mock::{MockBackend, MockEngine};
use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::{json, Value};
use support::model::{Reply, StandIn};

mod support;

/// The daemon's (fake) credential in these tests.
const CREDENTIAL: &str = "sk-ant-daemon-credential-7c1e";

struct Harness {
    manager: Arc<AgentManager<dyn ExecutionBackend>>,
    /// `http://127.0.0.1:<gateway port>`.
    base: String,
    model: StandIn,
    engine: MockEngine,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Harness {
    /// A manager on the mock backend whose agents reach the gateway at 127.0.0.1, and the
    /// gateway serving there with `credential`, forwarding to `upstream` (default: the
    /// stand-in).
    async fn start(credential: Option<Credential>, upstream: Option<String>) -> Self {
        let model = StandIn::start_loopback().await;
        let listener = agentd::listen::bind_gateway("127.0.0.1:0".parse().expect("addr")).expect("bind gateway");
        let port = listener.local_addr().expect("addr").port();
        let store = Store::in_memory().await.expect("store");
        let owner = OwnershipLabels::new("agentd", "gw-test").expect("labels");
        let engine = MockEngine::new();
        let backend: Arc<dyn ExecutionBackend> = Arc::new(MockBackend::new(engine.clone(), owner));
        let mut config = ManagerConfig::default();
        config.defaults.image = backend_mock::ECHO_IMAGE.into();
        config.gateway = Some(GatewayEndpoints {
            addresses: NetworkGateways {
                internet: Some("127.0.0.1".parse().expect("ip")),
                isolated: Some("127.0.0.2".parse().expect("ip")),
            },
            model_port: port,
            proxy_port: port + 1,
        });
        let manager: Arc<AgentManager<dyn ExecutionBackend>> = Arc::new(AgentManager::new(backend, store, config));
        let model_config = ModelConfig { upstream: upstream.unwrap_or_else(|| model.base_url()), ..Default::default() };
        let gateway = Arc::new(ModelGateway::new(manager.clone(), &model_config, credential).expect("gateway"));
        let app = router(gateway).into_make_service_with_connect_info::<SocketAddr>();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { manager, base: format!("http://127.0.0.1:{port}"), model, engine, server }
    }

    async fn with_api_key() -> Self {
        Self::start(Some(Credential::new(CredentialKind::ApiKey, "ANTHROPIC_API_KEY", CREDENTIAL).expect("key")), None)
            .await
    }

    /// Spawns a claude-code agent and returns its id and its environment as agentd builds it.
    async fn agent(&self, name: &str) -> (String, BTreeMap<String, String>) {
        // On the internet network, whose gateway address (127.0.0.1) `base` is.
        let new = NewAgent {
            name: name.into(),
            kind: Some(AgentKind::ClaudeCode),
            network: Some(NetworkPolicy::Internet),
            ..NewAgent::default()
        };
        let view = self.manager.spawn(new).await.expect("spawn");
        let spec = self.manager.session_spec_for(&view.agent).expect("spec");
        (view.agent.id, spec.env)
    }

    /// The mock address of the agent `secret` belongs to (the gateway knows its callers by
    /// their address), or 127.0.0.1 for a secret of no agent.
    fn address_of(&self, secret: &str) -> std::net::IpAddr {
        let id = self.manager.store().gateway_secrets().verify(secret);
        id.and_then(|id| self.manager.store().cached_agent(&id))
            .and_then(|agent| self.engine.session_address(&agent.session))
            .unwrap_or_else(|| "127.0.0.1".parse().expect("ip"))
    }

    /// A model request with `secret`, sent from the address of its agent's container.
    fn messages(&self, secret: &str) -> reqwest::RequestBuilder {
        self.messages_from(self.address_of(secret), secret)
    }

    /// A model request with `secret`, sent from `from`.
    fn messages_from(&self, from: std::net::IpAddr, secret: &str) -> reqwest::RequestBuilder {
        reqwest::Client::builder()
            .local_address(from)
            .build()
            .expect("client")
            .post(format!("{}/v1/messages?beta=true", self.base))
            .header("x-api-key", secret)
            .header("anthropic-version", "2023-06-01")
            .json(&json!({ "model": "claude-test", "max_tokens": 16, "stream": true,
                           "messages": [{ "role": "user", "content": "hello" }] }))
    }
}

fn assert_anthropic_error(
    status: StatusCode,
    headers: &reqwest::header::HeaderMap,
    body: &Value,
    want: u16,
    kind: &str,
) {
    assert_eq!(status.as_u16(), want, "{body}");
    assert_eq!(body["type"], "error", "{body}");
    assert_eq!(body["error"]["type"], kind, "{body}");
    assert!(body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    if want != 502 {
        assert_eq!(headers.get("x-should-retry").map(|v| v.as_bytes()), Some(&b"false"[..]), "{want}");
    }
}

async fn send(request: reqwest::RequestBuilder) -> (StatusCode, reqwest::header::HeaderMap, Value) {
    let response = request.send().await.expect("request");
    let status = response.status();
    let headers = response.headers().clone();
    let text = response.text().await.expect("body");
    (status, headers, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_gets_its_own_secret_and_the_gateway_swaps_in_the_api_key() {
    let h = Harness::with_api_key().await;
    let (id, env) = h.agent("alpha").await;
    assert_eq!(env.get("ANTHROPIC_BASE_URL"), Some(&h.base), "{:?}", env.keys());
    let secret = env.get("ANTHROPIC_API_KEY").expect("the agent's secret").clone();
    assert!(secret.starts_with("agentd-gw-") && secret.contains(&id), "a secret of the agent's own");
    assert!(!env.values().any(|v| v.contains(CREDENTIAL)), "the credential is not in the agent's env");

    let response = h.messages(&secret).header("anthropic-beta", "claude-code-20250219").send().await.expect("send");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let text = response.text().await.expect("stream");
    assert!(text.contains("message_start") && text.contains("message_stop"), "{text}");

    let got = h.model.wait_for_messages(1, Duration::from_secs(10)).await.remove(0);
    assert_eq!(got.header("x-api-key"), Some(CREDENTIAL), "the stand-in receives the daemon's credential");
    assert_eq!(got.header("authorization"), None);
    assert_eq!(got.query.as_deref(), Some("beta=true"));
    assert_eq!(got.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(got.header("anthropic-beta"), Some("claude-code-20250219"), "no OAuth flag with an API key");
    assert!(got.header("host").is_some_and(|h| h.starts_with("127.0.0.1:")), "the upstream's host");
    assert_eq!(got.body.as_ref().and_then(|b| b["messages"][0]["content"].as_str()), Some("hello"));
    for (name, value) in &got.headers {
        assert!(!value.contains("agentd-gw-"), "the agent's secret went upstream in {name}");
    }

    // A bearer token works as well as x-api-key.
    let from = reqwest::Client::builder().local_address(h.address_of(&secret)).build().expect("client");
    let bearer = from.head(format!("{}/api/hello", h.base)).bearer_auth(&secret).send().await.expect("head");
    assert_eq!(bearer.status(), StatusCode::OK);
    let hello = h.model.requests().into_iter().find(|r| r.path == "/api/hello").expect("forwarded");
    assert_eq!(hello.header("x-api-key"), Some(CREDENTIAL));
    assert_eq!(hello.header("authorization"), None, "the agent's bearer never goes upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oauth_token_goes_upstream_as_a_bearer_with_the_oauth_beta() {
    let token = "sk-ant-oat01-daemon-token";
    let credential = Credential::new(CredentialKind::OAuthToken, "CLAUDE_CODE_OAUTH_TOKEN", token).expect("token");
    let h = Harness::start(Some(credential), None).await;
    let (_, env) = h.agent("oauth").await;
    let secret = &env["ANTHROPIC_API_KEY"];
    let (status, _, body) = send(h.messages(secret).header("anthropic-beta", "claude-code-20250219")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let got = h.model.wait_for_messages(1, Duration::from_secs(10)).await.remove(0);
    assert_eq!(got.header("authorization"), Some(format!("Bearer {token}").as_str()));
    assert_eq!(got.header("x-api-key"), None, "the agent's secret does not go upstream");
    assert_eq!(got.header("anthropic-beta"), Some(format!("claude-code-20250219,{OAUTH_BETA}").as_str()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_passes_through_as_the_model_writes_it() {
    let h = Harness::with_api_key().await;
    let (_, env) = h.agent("stream").await;
    let delay = Duration::from_millis(700);
    h.model.push(Reply::Slow { text: "one two three four".into(), chunk_delay: delay });
    let started = Instant::now();
    let response = h.messages(&env["ANTHROPIC_API_KEY"]).send().await.expect("send");
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.bytes_stream();
    let mut seen = String::new();
    while !seen.contains("message_start") {
        let chunk = tokio::time::timeout(Duration::from_secs(5), body.next())
            .await
            .expect("the first event within 5 s")
            .expect("a chunk")
            .expect("bytes");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    let first = started.elapsed();
    assert!(!seen.contains("message_stop"), "the first event came alone: {seen}");
    while let Some(chunk) = body.next().await {
        seen.push_str(&String::from_utf8_lossy(&chunk.expect("bytes")));
    }
    let total = started.elapsed();
    assert!(seen.contains("message_stop"), "{seen}");
    // The stand-in waits `delay` before each of its 4 deltas: the first event must arrive
    // before the first delay is over, the whole stream only after all of them.
    assert!(first < delay, "first event after {first:?}: the gateway buffered the stream");
    assert!(total >= delay * 4, "whole stream in {total:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_missing_unknown_and_removed_secrets_get_401() {
    let h = Harness::with_api_key().await;
    let (id, env) = h.agent("keeper").await;
    let secret = env["ANTHROPIC_API_KEY"].clone();
    let mut tampered = secret.clone();
    let last = tampered.pop().expect("char");
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    // A secret made with another daemon's key.
    let foreign = agent_manager::GatewaySecrets::from_key([9; 32]).secret_for(&id);
    for (what, presented) in [
        ("tampered", Some(tampered.as_str())),
        ("another key", Some(foreign.expose())),
        ("the real credential", Some(CREDENTIAL)),
        ("missing", None),
    ] {
        let from = reqwest::Client::builder().local_address(h.address_of(&secret)).build().expect("client");
        let mut request = from.post(format!("{}/v1/messages", h.base)).json(&json!({}));
        if let Some(p) = presented {
            request = request.header("x-api-key", p);
        }
        let (status, headers, body) = send(request).await;
        assert_anthropic_error(status, &headers, &body, 401, "authentication_error");
        assert!(!body.to_string().contains(CREDENTIAL), "{what}: {body}");
    }
    // Another agent's secret, from this agent's container (and from no agent's): 401.
    let (_, other_env) = h.agent("other").await;
    let other = other_env["ANTHROPIC_API_KEY"].clone();
    for (what, from) in
        [("keeper's container", h.address_of(&secret)), ("no agent's address", "127.0.0.1".parse().expect("ip"))]
    {
        let (status, headers, body) = send(h.messages_from(from, &other)).await;
        assert_anthropic_error(status, &headers, &body, 401, "authentication_error");
        assert!(body.to_string().contains("another agent"), "{what}: {body}");
    }
    // Its own container may use it.
    let (status, _, body) = send(h.messages(&other)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    h.manager.remove("other").await.expect("remove other");
    // Removed: its secret is still well-formed, but there is no agent to serve.
    h.manager.remove(&id).await.expect("remove");
    let (status, headers, body) = send(h.messages(&secret)).await;
    assert_anthropic_error(status, &headers, &body, 401, "authentication_error");
    assert_eq!(
        h.model.requests().len(),
        1,
        "only the own-container request reached the model: {:?}",
        h.model.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_credential_the_gateway_says_what_to_configure() {
    let h = Harness::start(None, None).await;
    let (_, env) = h.agent("nokey").await;
    let (status, headers, body) = send(h.messages(&env["ANTHROPIC_API_KEY"])).await;
    assert_anthropic_error(status, &headers, &body, 503, "api_error");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("model.api_key_file") && message.contains("ANTHROPIC_API_KEY"), "{message}");
    assert!(h.model.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_upstream_is_502_without_the_credential() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").port();
    let credential = Credential::new(CredentialKind::ApiKey, "ANTHROPIC_API_KEY", CREDENTIAL).expect("key");
    let h = Harness::start(Some(credential), Some(format!("http://127.0.0.1:{port}"))).await;
    let (_, env) = h.agent("lost").await;
    let (status, headers, body) = send(h.messages(&env["ANTHROPIC_API_KEY"])).await;
    assert_anthropic_error(status, &headers, &body, 502, "api_error");
    let text = body.to_string();
    assert!(text.contains(&format!("127.0.0.1:{port}")), "names the upstream: {text}");
    assert!(text.contains("cannot connect") && text.contains("refused"), "says why: {text}");
    assert!(!text.contains(CREDENTIAL) && !text.contains("agentd-gw-"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_code_spawns_may_not_bring_model_variables_and_stored_ones_are_dropped() {
    let h = Harness::with_api_key().await;
    for key in agent_manager::MODEL_ENV {
        let mut env = BTreeMap::new();
        env.insert((*key).to_owned(), "sk-ant-user-supplied".to_owned());
        let new = NewAgent { name: "refused".into(), kind: Some(AgentKind::ClaudeCode), env, ..NewAgent::default() };
        match h.manager.spawn(new).await {
            Err(ManagerError::Invalid { field, message }) => {
                assert_eq!(field, "env");
                assert!(message.contains(key) && message.contains("[model]"), "{message}");
                assert!(!message.contains("sk-ant-user-supplied"), "{message}");
            }
            other => panic!("{key}: expected a refusal, got {other:?}"),
        }
    }
    // An image agent may carry them (it never gets the gateway's).
    let mut env = BTreeMap::new();
    env.insert("ANTHROPIC_API_KEY".to_owned(), "its-own".to_owned());
    let image = NewAgent { name: "image".into(), kind: Some(AgentKind::Image), env, ..NewAgent::default() };
    let view = h.manager.spawn(image).await.expect("an image agent keeps its env");
    let spec = h.manager.session_spec_for(&view.agent).expect("spec");
    assert_eq!(spec.env.get("ANTHROPIC_API_KEY").map(String::as_str), Some("its-own"));
    assert!(!spec.env.contains_key("ANTHROPIC_BASE_URL"));

    // An agent stored before the gateway, with the old variables in its env, still starts:
    // the stored values are dropped, agentd's own set.
    let (id, _) = h.agent("legacy").await;
    let mut agent = h.manager.agent(&id).await.expect("agent");
    for key in agent_manager::MODEL_ENV {
        agent.spec.env.insert((*key).to_owned(), "sk-ant-stored-long-ago".to_owned());
    }
    let spec = h.manager.session_spec_for(&agent).expect("spec");
    assert!(!spec.env.values().any(|v| v.contains("sk-ant-stored-long-ago")), "{:?}", spec.env.keys());
    assert_eq!(spec.env.get("ANTHROPIC_BASE_URL"), Some(&h.base));
    assert!(spec.env["ANTHROPIC_API_KEY"].starts_with("agentd-gw-"));
    assert!(!spec.env.contains_key("CLAUDE_CODE_OAUTH_TOKEN") && !spec.env.contains_key("ANTHROPIC_AUTH_TOKEN"));
}

#[tokio::test]
async fn secrets_survive_a_restart_and_differ_between_databases() {
    let dir = std::env::temp_dir().join(format!("agentd-gw-{}-{:?}", std::process::id(), Instant::now()));
    std::fs::create_dir_all(&dir).expect("dir");
    let (a, b) = (dir.join("a.db"), dir.join("b.db"));
    let first = Store::open(&a).await.expect("open").gateway_secrets().secret_for("agent-1");
    let again = Store::open(&a).await.expect("reopen").gateway_secrets();
    assert_eq!(again.verify(first.expose()).as_deref(), Some("agent-1"), "the key is kept in the store");
    let other = Store::open(&b).await.expect("open").gateway_secrets();
    assert_eq!(other.verify(first.expose()), None, "each database has its own key");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn nothing_prints_the_credential() {
    let credential = Credential::new(CredentialKind::ApiKey, "ANTHROPIC_API_KEY", CREDENTIAL).expect("key");
    let h = Harness::start(Some(credential.clone()), None).await;
    assert!(!format!("{credential:?}").contains(CREDENTIAL));
    let model = ModelConfig::default();
    let gateway = ModelGateway::new(h.manager.clone(), &model, Some(credential)).expect("gateway");
    assert!(!format!("{gateway:?}").contains(CREDENTIAL));
    assert!(!format!("{:?}", h.manager.store().gateway_secrets()).contains("agentd-gw-"));
}

#[tokio::test]
async fn an_agent_reaches_the_gateway_on_its_own_network() {
    let h = Harness::with_api_key().await;
    let port = h.base.rsplit(':').next().expect("port").to_owned();
    let new = NewAgent {
        name: "iso".into(),
        kind: Some(AgentKind::ClaudeCode),
        network: Some(NetworkPolicy::Isolated),
        ..NewAgent::default()
    };
    let view = h.manager.spawn(new).await.expect("spawn");
    let spec = h.manager.session_spec_for(&view.agent).expect("spec");
    assert_eq!(spec.env["ANTHROPIC_BASE_URL"], format!("http://127.0.0.2:{port}"));
}
