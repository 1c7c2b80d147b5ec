//! The model gateway: the Anthropic Messages API as agentd's containers see it.
//!
//! Served on the engine networks' gateway addresses at `gateway.port` (never with the
//! management API). Each claude-code agent's environment points `ANTHROPIC_BASE_URL` here
//! and holds, as `ANTHROPIC_API_KEY`, a secret of its own
//! ([`agent_manager::GatewaySecrets`]). The gateway checks that secret (`x-api-key`, or
//! `Authorization: Bearer`), replaces it with the daemon's real credential ([`Credential`])
//! and forwards the request to `model.upstream`, streaming both bodies through. A wrong,
//! missing or unknown secret gets 401, no credential 503, an unreachable upstream 502, all
//! in the Anthropic error format. One log line per request; never a header.

mod credential;
pub mod meter;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_manager::{AgentManager, GatewaySecrets};
use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use axum::Router;
use backend_core::ExecutionBackend;
use futures_util::TryStreamExt;
use tracing::{info, warn};

pub use credential::{Credential, CredentialKind, OAUTH_BETA};

use crate::config::ModelConfig;

/// Whether the gateway checks that a secret comes from its own agent's container (by the
/// caller's address; see [`ModelGateway::caller_is_agent`]).
pub const CHECKS_CALLER_ADDRESS: bool = true;

/// How long the upstream may take to accept a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the upstream may send nothing while a response is read (streams have no total
/// timeout: a long turn streams for many minutes).
pub const IDLE_READ_TIMEOUT: Duration = Duration::from_secs(600);

/// Hop-by-hop headers (RFC 9110 section 7.6.1) and their old spellings: never forwarded.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The model gateway's state.
pub struct ModelGateway {
    manager: Arc<AgentManager<dyn ExecutionBackend>>,
    secrets: Arc<GatewaySecrets>,
    credential: Option<Credential>,
    /// `model.upstream` without a trailing `/`; request paths are appended.
    upstream: String,
    /// The upstream's origin (scheme, host, port), for messages: never its user info.
    upstream_origin: String,
    client: reqwest::Client,
    /// Usage records and limits.
    meter: meter::Meter,
}

impl std::fmt::Debug for ModelGateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelGateway")
            .field("upstream", &self.upstream_origin)
            .field("credential", &self.credential)
            .finish_non_exhaustive()
    }
}

impl ModelGateway {
    /// A gateway for the agents of `manager`, forwarding to `model.upstream` with
    /// `credential` (none: every request gets 503 saying what to configure).
    pub fn new(
        manager: Arc<AgentManager<dyn ExecutionBackend>>,
        model: &ModelConfig,
        credential: Option<Credential>,
    ) -> Result<Self> {
        let url = reqwest::Url::parse(&model.upstream)
            .with_context(|| format!("model.upstream = {:?}: not a URL", model.upstream))?;
        let upstream_origin = url.origin().ascii_serialization();
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(IDLE_READ_TIMEOUT)
            // A redirect would carry the credential to wherever it points: the agent gets it.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .context("building the model gateway's HTTP client")?;
        let secrets = manager.store().gateway_secrets();
        let meter = meter::Meter::new(manager.clone());
        Ok(Self {
            meter,
            manager,
            secrets,
            credential,
            upstream: model.upstream.trim_end_matches('/').to_owned(),
            upstream_origin,
            client,
        })
    }

    /// The meter of this gateway's requests.
    pub fn meter(&self) -> &meter::Meter {
        &self.meter
    }

    /// The credential requests are sent with, if any.
    pub fn credential(&self) -> Option<&Credential> {
        self.credential.as_ref()
    }

    /// The agent whose secret `headers` carry, if it is a valid secret of an agent that
    /// exists.
    fn authenticate(&self, headers: &HeaderMap) -> Option<agent_manager::Agent> {
        let presented = headers.get("x-api-key").and_then(|v| v.to_str().ok()).or_else(|| {
            let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
            let (scheme, token) = value.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(token.trim())
        })?;
        let agent_id = self.secrets.verify(presented)?;
        self.manager.store().cached_agent(&agent_id)
    }

    /// Whether the caller at `peer` is the agent whose secret it presented: the live agent
    /// whose current container has that address ([`AgentManager::agent_for_peer`]). So
    /// another agent's secret, read from its container, does not work from a different
    /// one. Host-network agents share the host's addresses and cannot be told apart: their
    /// secret alone identifies them.
    async fn caller_is_agent(&self, agent: &agent_manager::Agent, peer: IpAddr) -> bool {
        if agent.spec.network == backend_core::NetworkPolicy::Host {
            return true;
        }
        self.manager.agent_for_peer(peer.to_canonical()).await.is_some_and(|caller| caller.id == agent.id)
    }
}

/// The gateway's routes: every method and path is forwarded once authenticated. Serve it
/// with `into_make_service_with_connect_info::<SocketAddr>()`: the caller's address is
/// checked.
pub fn router(gateway: Arc<ModelGateway>) -> Router {
    Router::new().fallback(forward).with_state(gateway)
}

/// An error in the Anthropic format, `{"type":"error","error":{"type":..,"message":..}}`;
/// `retry: false` adds `x-should-retry: false` (Claude Code then fails the turn at once
/// instead of retrying for minutes).
pub fn anthropic_error(status: StatusCode, error_type: &str, message: &str, retry: bool) -> Response {
    let body = serde_json::json!({ "type": "error", "error": { "type": error_type, "message": message } });
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if !retry {
        response.headers_mut().insert("x-should-retry", HeaderValue::from_static("false"));
    }
    response
}

/// The headers of `headers` that may travel on: no hop-by-hop header (nor one that
/// `Connection` names), none of `also`.
fn end_to_end(headers: &HeaderMap, also: &[HeaderName]) -> HeaderMap {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n) || named.iter().any(|c| c == n) || also.contains(name) {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

async fn forward(
    State(gateway): State<Arc<ModelGateway>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    let started = Instant::now();
    let (parts, body) = request.into_parts();
    let method = parts.method.clone();
    let path = parts.uri.path().to_owned();
    let Some(agent) = gateway.authenticate(&parts.headers) else {
        warn!(peer = %peer.ip(), %method, path, status = 401, "Model request refused: no valid gateway secret.");
        return anthropic_error(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "agentd model gateway: invalid or missing agent secret (send the ANTHROPIC_API_KEY agentd set for this \
             agent, as x-api-key or a bearer token)",
            false,
        );
    };
    let agent_id = agent.id.clone();
    if !gateway.caller_is_agent(&agent, peer.ip()).await {
        warn!(
            %agent_id,
            peer = %peer.ip(),
            %method,
            path,
            status = 401,
            "Model request refused: the secret is another agent's."
        );
        return anthropic_error(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "agentd model gateway: this secret belongs to another agent",
            false,
        );
    }
    let Some(credential) = gateway.credential.as_ref() else {
        warn!(%agent_id, %method, path, status = 503, "Model request refused: agentd has no model credential.");
        return anthropic_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "api_error",
            "agentd model gateway: the daemon has no model credential; set model.api_key_file, or ANTHROPIC_API_KEY \
             or CLAUDE_CODE_OAUTH_TOKEN in agentd's environment, and restart agentd",
            false,
        );
    };

    let admission = match gateway.meter.admit(&agent) {
        Ok(admission) => admission,
        Err(refusal) => return refusal.into_response(),
    };

    // The agent's secret stays here, and so does `Expect` (hyper answers it; the upstream
    // gets the body at once). `Accept-Encoding` too: the meter reads usage from the body
    // as it passes, so it must arrive uncompressed.
    let stay = [
        header::HOST,
        header::AUTHORIZATION,
        header::EXPECT,
        header::ACCEPT_ENCODING,
        HeaderName::from_static("x-api-key"),
    ];
    let mut headers = end_to_end(&parts.headers, &stay);
    let (name, value) = credential.header();
    headers.insert(name, value);
    if credential.kind() == CredentialKind::OAuthToken {
        add_beta(&mut headers, OAUTH_BETA);
    }
    let target = format!("{}{}", gateway.upstream, parts.uri.path_and_query().map_or("/", |p| p.as_str()));
    let mut upstream = gateway.client.request(method.clone(), target).headers(headers);
    let has_body =
        parts.headers.contains_key(header::CONTENT_LENGTH) || parts.headers.contains_key(header::TRANSFER_ENCODING);
    if has_body {
        upstream = upstream.body(reqwest::Body::wrap_stream(body.into_data_stream()));
    }
    let reply = match upstream.send().await {
        Ok(reply) => reply,
        Err(e) => {
            let why = if e.is_connect() {
                "cannot connect"
            } else if e.is_timeout() {
                "timed out"
            } else {
                "the request failed"
            };
            let error = error_chain(&e.without_url());
            warn!(
                %agent_id,
                %method,
                path,
                status = 502,
                upstream = %gateway.upstream_origin,
                error,
                latency_ms = started.elapsed().as_millis() as u64,
                "Model request failed upstream."
            );
            admission.record_without_body(None, 502, started);
            return anthropic_error(
                StatusCode::BAD_GATEWAY,
                "api_error",
                &format!("agentd model gateway: the upstream model API {} {why}: {error}", gateway.upstream_origin),
                true,
            );
        }
    };
    let status = reply.status();
    info!(
        %agent_id,
        %method,
        path,
        status = status.as_u16(),
        latency_ms = started.elapsed().as_millis() as u64,
        "Model request forwarded."
    );
    let headers = end_to_end(reply.headers(), &[]);
    let sse = reply
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("text/event-stream"));
    let stream = reply.bytes_stream().map_err(std::io::Error::other);
    let metered = admission.meter_body(None, status.as_u16(), started, sse, stream);
    let mut response = Response::new(Body::from_stream(metered));
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// An error with its sources, `a: b: c` (a request error without its URL: no part of it
/// holds a header).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Adds `flag` to the request's `anthropic-beta` list unless it is there.
fn add_beta(headers: &mut HeaderMap, flag: &str) {
    let name = HeaderName::from_static("anthropic-beta");
    let mut flags: Vec<String> = headers
        .get_all(&name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|f| f.trim().to_owned())
        .filter(|f| !f.is_empty())
        .collect();
    if !flags.iter().any(|f| f == flag) {
        flags.push(flag.to_owned());
    }
    if let Ok(value) = HeaderValue::from_str(&flags.join(",")) {
        headers.insert(name, value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_named_headers_stay_behind() {
        let mut headers = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-private"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("host", "gateway"),
            ("x-api-key", "agentd-gw-secret"),
            ("anthropic-version", "2023-06-01"),
            ("content-type", "application/json"),
        ] {
            headers.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let out = end_to_end(&headers, &[header::HOST, HeaderName::from_static("x-api-key")]);
        let mut names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["anthropic-version", "content-type"]);
    }

    #[test]
    fn the_oauth_flag_joins_the_betas_once() {
        let mut headers = HeaderMap::new();
        headers.insert("anthropic-beta", HeaderValue::from_static("claude-code-20250219, fine-grained"));
        add_beta(&mut headers, OAUTH_BETA);
        add_beta(&mut headers, OAUTH_BETA);
        assert_eq!(headers["anthropic-beta"], "claude-code-20250219,fine-grained,oauth-2025-04-20");
        let mut empty = HeaderMap::new();
        add_beta(&mut empty, OAUTH_BETA);
        assert_eq!(empty["anthropic-beta"], OAUTH_BETA);
    }
}
