//! `GET /v1/openapi.json`: the document is served, and it lists every route the daemon
//! serves, with its methods, and no route it does not serve.

use std::collections::BTreeSet;
use std::time::Duration;

use backend_mock::MockEngine;
use reqwest::{Method, StatusCode};
use serde_json::Value;

#[path = "support/in_process.rs"]
mod in_process;
use in_process::{test_config, InProcess};

const TOKEN: &str = "openapi-test-token-0123456789";

/// The methods a route can have (axum has no CONNECT/TRACE routes here).
const METHODS: [&str; 7] = ["get", "post", "put", "patch", "delete", "head", "options"];

struct TestDaemon {
    base: String,
    http: reqwest::Client,
    daemon: InProcess,
}

impl TestDaemon {
    async fn start() -> Self {
        let daemon = InProcess::start(&test_config(Some(TOKEN)), MockEngine::new()).await;
        Self { base: daemon.base.clone(), http: reqwest::Client::new(), daemon }
    }

    async fn stop(self) {
        self.daemon.stop(Duration::from_secs(10)).await;
    }
}

/// The paths and methods of a document.
fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let paths = doc["paths"].as_object().unwrap_or_else(|| panic!("the document has no paths: {doc}"));
    let mut ops = BTreeSet::new();
    for (path, item) in paths {
        for method in METHODS {
            if item.get(method).is_some() {
                ops.insert((path.clone(), method.to_owned()));
            }
        }
    }
    ops
}

/// What the router does with a request: `None` when no route has this path (the
/// fallback's 404) or this method (405), else the status of a served route.
async fn served(d: &TestDaemon, method: &str, path: &str) -> Option<StatusCode> {
    let url = format!("{}{}", d.base, path.replace("{id}", "openapi-probe"));
    let method = Method::from_bytes(method.to_ascii_uppercase().as_bytes()).expect("method");
    let response =
        tokio::time::timeout(Duration::from_secs(10), d.http.request(method.clone(), &url).bearer_auth(TOKEN).send())
            .await
            .unwrap_or_else(|_| panic!("{method} {url} did not answer within 10 s"))
            .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = response.status();
    if status == StatusCode::METHOD_NOT_ALLOWED {
        return None;
    }
    if status == StatusCode::NOT_FOUND {
        // The fallback says "no such endpoint"; a served route's 404 names the agent or
        // approval that does not exist. (Streams are not read: they answer 200 first.)
        let body = tokio::time::timeout(Duration::from_secs(10), response.text())
            .await
            .unwrap_or_else(|_| panic!("{method} {url}: the 404 body did not come within 10 s"))
            .unwrap_or_default();
        if body.contains("no such endpoint") {
            return None;
        }
    }
    Some(status)
}

#[tokio::test]
async fn the_openapi_document_is_served_without_a_token_and_describes_the_api() {
    let d = TestDaemon::start().await;
    let response = d.http.get(format!("{}/v1/openapi.json", d.base)).send().await.expect("request");
    assert_eq!(response.status(), StatusCode::OK, "GET /v1/openapi.json without a token");
    let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
    assert!(content_type.starts_with("application/json"), "content-type {content_type:?}");
    let doc: Value = response.json().await.expect("the document is JSON");
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")), "openapi version: {}", doc["openapi"]);
    assert_eq!(doc["info"]["title"], "agentd");
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    // The generated schemas of the handlers' types are in it, with their fields.
    let schemas = &doc["components"]["schemas"];
    for (schema, field) in [
        ("AgentJson", "status"),
        ("NewAgent", "image"),
        ("Run", "ended_by"),
        ("EventJson", "kind"),
        ("Approval", "decision"),
        ("ConversationEntry", "seq"),
    ] {
        // A struct with a flattened field is an `allOf` of its parts.
        let parts = schemas[schema]["allOf"].as_array().cloned().unwrap_or_else(|| vec![schemas[schema].clone()]);
        assert!(
            parts.iter().any(|part| part["properties"].get(field).is_some()),
            "schema {schema} lacks {field}: {}",
            schemas[schema]
        );
    }
    // An image agent's JSON has no conversation fields: the flattened part requires none
    // (and is not "null or a conversation", which no object would match).
    let agent_parts = schemas["AgentJson"]["allOf"].as_array().expect("AgentJson flattens its conversation");
    for part in agent_parts {
        assert!(part.get("oneOf").is_none(), "a flattened part is an object, not a choice with null: {part}");
        let fields = match part.get("$ref").and_then(Value::as_str) {
            Some(r) => &schemas[r.rsplit('/').next().expect("ref")],
            None => part,
        };
        if fields["properties"].get("session_id").is_some() {
            assert!(fields["required"].as_array().is_none_or(Vec::is_empty), "{fields}");
        }
    }
    assert_eq!(
        schemas["AgentStatus"]["enum"],
        serde_json::json!(["pending", "running", "stopped", "failed"]),
        "a text enum is a string with its names"
    );
    // Every operation documents the parameters of its path template, and its query.
    for (path, method) in operations(&doc) {
        let params = doc["paths"][&path][&method]["parameters"].as_array().cloned().unwrap_or_default();
        let named = |name: &str, place: &str| params.iter().any(|p| p["name"] == name && p["in"] == place);
        for segment in path.split('/').filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}'))) {
            assert!(named(segment, "path"), "{method} {path} does not document its path parameter {segment}");
        }
        let query: &[&str] = match (path.as_str(), method.as_str()) {
            ("/v1/agents/{id}/stop", "post") => &["grace_secs"],
            ("/v1/agents/{id}/conversation/stream", "get") => &["after", "limit"],
            ("/v1/agents", "get") => &["status", "limit", "cursor"],
            _ => &[],
        };
        for name in query {
            assert!(named(name, "query"), "{method} {path} does not document its query parameter {name}");
        }
    }
    let spawn = &doc["paths"]["/v1/agents"]["post"];
    assert!(spawn["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        .as_str()
        .is_some_and(|r| r.ends_with("/NewAgent")));
    assert!(spawn["responses"].get("201").is_some(), "spawn documents its 201: {spawn}");
    // The token is a bearer scheme, and the open endpoints say they need none.
    assert_eq!(doc["components"]["securitySchemes"]["token"]["scheme"], "bearer");
    assert_eq!(doc["paths"]["/healthz"]["get"]["security"], serde_json::json!([{}]));
    d.stop().await;
}

#[tokio::test]
async fn every_route_the_daemon_serves_is_in_the_openapi_document_and_no_other() {
    let d = TestDaemon::start().await;
    let doc: Value =
        d.http.get(format!("{}/v1/openapi.json", d.base)).send().await.expect("request").json().await.expect("JSON");
    let documented = operations(&doc);
    assert!(documented.len() >= 20, "too few operations documented: {documented:?}");

    // Each documented path answers each documented method, and no other method.
    let paths: BTreeSet<&String> = documented.iter().map(|(path, _)| path).collect();
    let mut missing = Vec::new();
    let mut undocumented = Vec::new();
    for path in paths {
        for method in METHODS {
            let in_doc = documented.contains(&(path.clone(), method.to_owned()));
            let status = served(&d, method, path).await;
            match (in_doc, status) {
                (true, None) => missing.push(format!("{method} {path}")),
                // axum answers HEAD for a GET route by itself, and OPTIONS nowhere.
                (false, Some(_)) if method == "head" && documented.contains(&(path.clone(), "get".into())) => {}
                (false, Some(status)) => undocumented.push(format!("{method} {path} ({status})")),
                _ => {}
            }
        }
    }
    assert!(missing.is_empty(), "documented but not served: {missing:?}");
    assert!(undocumented.is_empty(), "served but not in the document: {undocumented:?}");

    // Paths the document does not name are not served: every route is added through
    // `routes!` (which documents it); a plain `.route(...)` would add an undocumented one.
    let source = include_str!("../src/api.rs");
    for adds_a_route in [".route(", ".route_service(", ".nest(", ".nest_service(", ".fallback_service("] {
        assert!(
            !source.contains(adds_a_route),
            "agentd/src/api.rs adds a route with `{adds_a_route}`, which the OpenAPI document does not \
             show: add the handler with #[utoipa::path] to `routes()` instead"
        );
    }
    for path in ["/v1", "/v1/agents/openapi-probe/nope", "/v1/openapi", "/openapi.json", "/v1/health"] {
        for method in ["get", "post"] {
            assert_eq!(served(&d, method, path).await, None, "{method} {path} is served but not documented");
        }
    }
    d.stop().await;
}
