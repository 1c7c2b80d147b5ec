//! The HTTP API: agents, their conversations, events, health and metrics.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use agent_manager::{
    AgentManager, AgentStatus, AgentView, ExitView, LifecycleEvent, LiveEntry, ManagerError, NewAgent,
};
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use backend_core::{BackendError, ExecutionBackend};
use futures_util::{stream, Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;
use tracing::warn;
use utoipa::{IntoParams, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

/// Everything the handlers share.
pub struct App {
    pub manager: Arc<AgentManager<dyn ExecutionBackend>>,
    /// The API bearer token; `None` disables auth.
    pub token: Option<String>,
    pub instance: String,
    /// Turns true when the daemon shuts down: streams and channels end.
    pub shutdown: watch::Receiver<bool>,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").field("instance", &self.instance).finish_non_exhaustive()
    }
}

type AppState = Arc<App>;

/// The full API: `/v1/*`, `/healthz`, `/metrics` and `/v1/openapi.json`.
pub fn router(app: AppState) -> Router {
    let (router, _) = routes(Some(&app)).split_for_parts();
    router
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such endpoint; see docs/api.md".into()) })
        .method_not_allowed_fallback(|| async {
            ApiError(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this endpoint; see docs/api.md".into())
        })
        .with_state(app)
}

/// Every route with its OpenAPI operation: the router and the document come from one
/// list, so neither has a route the other lacks. With `app`, the token check guards
/// every route but `/healthz` and `/v1/openapi.json`; without, only the document is wanted.
fn routes(app: Option<&AppState>) -> OpenApiRouter<AppState> {
    let mut authenticated = OpenApiRouter::new()
        .routes(routes!(spawn, list))
        .routes(routes!(get_agent, remove))
        .routes(routes!(stop))
        .routes(routes!(restart))
        .routes(routes!(runs))
        .routes(routes!(logs))
        .routes(routes!(send_message))
        .routes(routes!(interrupt))
        .routes(routes!(approvals))
        .routes(routes!(get_approval, decide))
        .routes(routes!(conversation))
        .routes(routes!(conversation_stream))
        .routes(routes!(events))
        .routes(routes!(event_stream))
        .routes(routes!(metrics));
    if let Some(app) = app {
        authenticated = authenticated.route_layer(middleware::from_fn_with_state(app.clone(), require_token));
    }
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(authenticated)
        .routes(routes!(healthz))
        .routes(routes!(openapi_json))
}

/// The OpenAPI document of this API, as `GET /v1/openapi.json` serves it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    routes(None).split_for_parts().1
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "agentd",
        description = "The agentd daemon's HTTP API: agents, their runs, logs and conversations, \
                       approvals, lifecycle events, health and metrics. Every path but `/healthz` and \
                       `/v1/openapi.json` needs `Authorization: Bearer <server.token>` when the daemon has a \
                       token. Errors are `{\"error\": \"...\"}` with a 4xx or 5xx status. See docs/api.md."
    ),
    modifiers(&BearerToken),
    security(("token" = []))
)]
struct ApiDoc;

/// The `token` security scheme: `Authorization: Bearer <server.token>`.
struct BearerToken;

impl utoipa::Modify for BearerToken {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("token", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
    }
}

/// `GET /v1/openapi.json`: this document, generated from the handlers and their types.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "meta",
    security(()),
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", content_type = "application/json"))
)]
async fn openapi_json() -> Response {
    static DOCUMENT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let json = DOCUMENT.get_or_init(|| openapi().to_json().unwrap_or_default());
    ([(header::CONTENT_TYPE, "application/json")], json.as_str()).into_response()
}

/// An error body.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorJson {
    /// What was wrong, and how to fix it where the client can.
    pub error: String,
}

/// An error response: `{"error": "..."}` with a status.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<ManagerError> for ApiError {
    fn from(e: ManagerError) -> Self {
        let status = match &e {
            ManagerError::AgentNotFound(_) | ManagerError::ApprovalNotFound(_) => StatusCode::NOT_FOUND,
            ManagerError::NameTaken(_) | ManagerError::Conflict(_) | ManagerError::NotRunning { .. } => {
                StatusCode::CONFLICT
            }
            ManagerError::Invalid { .. } => StatusCode::BAD_REQUEST,
            ManagerError::ImageMissing { .. } | ManagerError::Refused { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ManagerError::ShuttingDown | ManagerError::NetworkUnprotected { .. } => StatusCode::SERVICE_UNAVAILABLE,
            e if e.is_engine_unavailable() => StatusCode::SERVICE_UNAVAILABLE,
            ManagerError::Backend(BackendError::InvalidSpec { .. }) => StatusCode::BAD_REQUEST,
            ManagerError::Backend(BackendError::ImageNotFound { .. } | BackendError::Rejected { .. }) => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            ManagerError::Backend(BackendError::AlreadyExists { .. }) => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            warn!(error = %e, "Request failed.");
        }
        ApiError(status, e.to_string())
    }
}

/// A JSON request body; a body that does not parse is a `400` [`ApiError`] saying why.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(Self(value)),
            Err(rejection) => {
                Err(ApiError(StatusCode::BAD_REQUEST, format!("invalid request body: {}", rejection.body_text())))
            }
        }
    }
}

/// A query string; one that does not parse is a `400` [`ApiError`] saying why.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(Self(value)),
            Err(rejection) => Err(ApiError(StatusCode::BAD_REQUEST, rejection.body_text())),
        }
    }
}

/// Compares secrets in time independent of where they differ.
fn same_secret(given: &str, expected: &str) -> bool {
    let (a, b) = (given.as_bytes(), expected.as_bytes());
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0));
    }
    diff == 0
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ")
}

async fn require_token(State(app): State<AppState>, request: Request, next: Next) -> Response {
    if let Some(expected) = &app.token {
        match bearer(request.headers()) {
            Some(given) if same_secret(given, expected) => {}
            _ => {
                return ApiError(
                    StatusCode::UNAUTHORIZED,
                    "missing or wrong bearer token: send Authorization: Bearer <server.token>".into(),
                )
                .into_response()
            }
        }
    }
    next.run(request).await
}

/// An agent as the API shows it (and as the client reads it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AgentJson {
    pub id: String,
    pub name: String,
    pub kind: agent_manager::AgentKind,
    pub status: AgentStatus,
    pub health: backend_core::SessionHealth,
    pub connected: bool,
    pub session: String,
    pub image: String,
    pub network: backend_core::NetworkPolicy,
    pub restart: agent_manager::RestartPolicy,
    /// The destinations the egress proxy allows the agent.
    #[serde(default)]
    pub egress_allow: Vec<String>,
    pub restarts: u32,
    pub reason: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub next_restart_at: Option<OffsetDateTime>,
    pub exit: Option<ExitView>,
    /// When the current run (or, when none runs, the last one) started; null before the
    /// first.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub started_at: Option<OffsetDateTime>,
    /// Whether the engine has the container frozen.
    pub paused: bool,
    /// The command given at spawn, run instead of the image's (null: the image's own).
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// The entrypoint given at spawn, run instead of the image's (null: the image's own,
    /// or the command's first word when only a command was given).
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    /// The environment given at spawn: every name, each value [`MASKED`] unless
    /// `show_secrets` was asked for (and allowed).
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// The host directory mounted at /workspace.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub workdir: Option<std::path::PathBuf>,
    /// Memory limit in MiB (null: none).
    #[serde(default)]
    pub memory_mb: Option<u64>,
    /// CPU limit in cores (null: none).
    #[serde(default)]
    pub cpus: Option<f64>,
    /// Process limit (null: none).
    #[serde(default)]
    pub pids_limit: Option<i64>,
    /// The user the container runs as (null: the image's).
    #[serde(default)]
    pub user: Option<String>,
    /// Seconds between SIGTERM and SIGKILL when the agent is stopped.
    #[serde(default)]
    pub stop_grace_secs: u64,
    /// Whether the container's root filesystem is read-only.
    #[serde(default)]
    pub read_only_rootfs: bool,
    /// What an unhealthy run leads to: `record` or `restart`.
    #[serde(default = "default_on_unhealthy")]
    pub on_unhealthy: agent_manager::UnhealthyAction,
    /// Claude Code's `--model` (null: the CLI's own).
    #[serde(default)]
    pub model: Option<String>,
    /// How tool-permission requests are answered: `ask`, `allow` or `deny`.
    #[serde(default = "default_approvals")]
    pub approvals: agent_manager::ApprovalPolicy,
    /// Claude Code's `--permission-mode` (null: the CLI's own).
    #[serde(default)]
    pub permission_mode: Option<String>,
    /// Claude Code's `--max-turns` (null: none).
    #[serde(default)]
    pub max_turns: Option<u32>,
    /// Claude Code's `--max-budget-usd` (null: none).
    #[serde(default)]
    pub max_budget_usd: Option<f64>,
    /// The conversation of a claude-code agent; absent for other kinds.
    #[serde(flatten)]
    #[schema(value_type = ConversationFields)]
    pub conversation: Option<ConversationJson>,
    /// Its requests through the model gateway, summed.
    #[serde(default)]
    pub model_usage: agent_manager::ModelUsage,
    /// The limits its model requests are held to now (`null`: no limit).
    #[serde(default)]
    pub model_limits: agent_manager::ModelLimits,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

fn default_on_unhealthy() -> agent_manager::UnhealthyAction {
    agent_manager::UnhealthyAction::Record
}

fn default_approvals() -> agent_manager::ApprovalPolicy {
    agent_manager::ApprovalPolicy::Ask
}

/// A claude-code agent's session, in the agent JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ConversationJson {
    pub session_id: String,
    pub turn: agent_manager::Turn,
    pub cost_usd: f64,
    pub usage: agent_manager::Usage,
    pub last_result: Option<agent_manager::LastResult>,
}

/// The schema of the fields [`ConversationJson`] adds to a claude-code agent's JSON: all
/// absent for other kinds.
#[derive(ToSchema)]
#[allow(dead_code)] // Only its schema is used.
struct ConversationFields {
    /// Claude Code's session id (claude-code only).
    session_id: Option<String>,
    turn: Option<agent_manager::Turn>,
    cost_usd: Option<f64>,
    usage: Option<agent_manager::Usage>,
    last_result: Option<agent_manager::LastResult>,
}

/// What an env value reads in the agent JSON unless `show_secrets` is allowed.
pub const MASKED: &str = "<masked>";

/// The agent JSON, env values masked.
fn agent_json(view: AgentView) -> AgentJson {
    agent_json_with(view, false)
}

/// The agent JSON; env values only with `show_secrets`.
fn agent_json_with(view: AgentView, show_secrets: bool) -> AgentJson {
    let a = view.agent;
    let env = if show_secrets { a.spec.env } else { a.spec.env.into_keys().map(|k| (k, MASKED.to_owned())).collect() };
    AgentJson {
        started_at: view.started_at,
        command: a.spec.command,
        entrypoint: a.spec.entrypoint,
        env,
        workdir: a.spec.workdir,
        memory_mb: a.spec.memory_mb,
        cpus: a.spec.cpus,
        pids_limit: a.spec.pids_limit,
        user: a.spec.user,
        stop_grace_secs: a.spec.stop_grace_secs,
        read_only_rootfs: a.spec.read_only_rootfs,
        on_unhealthy: a.spec.on_unhealthy,
        model: a.spec.model,
        approvals: a.spec.approvals,
        permission_mode: a.spec.permission_mode,
        max_turns: a.spec.max_turns,
        max_budget_usd: a.spec.max_budget_usd,
        connected: view.connected,
        paused: view.paused,
        conversation: view.session.map(|s| ConversationJson {
            session_id: s.session_id,
            turn: s.turn,
            cost_usd: s.cost_usd,
            usage: s.usage,
            last_result: s.last_result,
        }),
        model_usage: view.model_usage,
        model_limits: view.model_limits,
        id: a.id,
        name: a.name,
        kind: a.spec.kind,
        status: a.status,
        health: a.health,
        session: a.session,
        image: a.spec.image,
        network: a.spec.network,
        restart: a.spec.restart,
        egress_allow: a.spec.egress_allow,
        restarts: a.restarts,
        reason: a.reason,
        next_restart_at: a.next_restart_at,
        exit: view.exit,
        created_at: a.created_at,
        updated_at: a.updated_at,
    }
}

#[utoipa::path(
    post, path = "/v1/agents", tag = "agents",
    request_body = NewAgent,
    responses(
        (status = 201, description = "The agent, created (its `exit` says why when it could not start)", body = AgentJson),
        (status = 400, description = "Invalid spec", body = ErrorJson), (status = 409, description = "The name is taken", body = ErrorJson), (status = 422, description = "The image is missing, or the spawn is refused", body = ErrorJson),
        (status = 503, description = "The engine is unavailable, or the daemon shuts down", body = ErrorJson),
    )
)]
async fn spawn(State(app): State<AppState>, ApiJson(new): ApiJson<NewAgent>) -> Result<Response, ApiError> {
    let defaults = &app.manager.config().defaults;
    let network = new.network.unwrap_or_else(|| defaults.network_for(new.kind.unwrap_or(defaults.kind)));
    if network == backend_core::NetworkPolicy::Host && app.token.is_none() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "network \"host\" shares the host's loopback, where this API answers without a token; \
             set server.token (or server.token_file) to allow host-network agents"
                .into(),
        ));
    }
    let name = new.name.clone();
    match app.manager.spawn(new).await {
        Ok(view) => Ok((StatusCode::CREATED, Json(agent_json(view))).into_response()),
        // The agent exists, failed, with the reason in its exit: say so with the record.
        Err(ManagerError::StartFailed { source, .. }) if !source.is_retryable() => {
            let view = app.manager.get(&name).await?;
            Ok((StatusCode::CREATED, Json(agent_json(view))).into_response())
        }
        Err(e) => Err(e.into()),
    }
}

/// `GET /v1/agents` query.
#[derive(Debug, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only agents with this status: `pending`, `running`, `stopped` or `failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// Agents in the page: 1 to 1000 (default 500).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
    /// Where the page starts: the `X-Next-Cursor` of the previous page (opaque); unset,
    /// the first page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// The header that carries the cursor of the next page, on a page that has one.
pub const NEXT_CURSOR: &str = "x-next-cursor";

#[utoipa::path(
    get, path = "/v1/agents", tag = "agents",
    params(ListQuery),
    responses(
        (status = 200, description = "A page of agents, oldest first; when more follow, `X-Next-Cursor` names the next page", body = Vec<AgentJson>,
            headers(("X-Next-Cursor" = String, description = "Give as `cursor` for the next page; absent on the last page"))),
        (status = 400, description = "Bad status, limit or cursor", body = ErrorJson),
    )
)]
async fn list(State(app): State<AppState>, ApiQuery(query): ApiQuery<ListQuery>) -> Result<Response, ApiError> {
    let status = query
        .status
        .map(|s| s.parse::<AgentStatus>())
        .transpose()
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("status: {e}")))?;
    let limit = match query.limit {
        None => agent_manager::DEFAULT_AGENT_PAGE,
        Some(limit @ 1..=agent_manager::MAX_AGENT_PAGE) => limit,
        Some(limit) => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("limit: {limit} is out of range: give 1 to {} agents a page", agent_manager::MAX_AGENT_PAGE),
            ))
        }
    };
    let cursor = query
        .cursor
        .map(|c| c.parse::<agent_manager::AgentCursor>())
        .transpose()
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("cursor: {e}")))?;
    let (views, next) = app.manager.list_page(status, cursor.as_ref(), limit).await?;
    let page: Vec<AgentJson> = views.into_iter().map(agent_json).collect();
    Ok(paged(Json(page), next.map(|c| c.to_string())))
}

/// `GET /v1/agents/{id}` query.
#[derive(Debug, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AgentQuery {
    /// Show the env values (see [`may_show_secrets`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub show_secrets: bool,
}

/// Whether a request may see secrets: only one that presented the API token (so a token
/// is configured) from a loopback peer; else a `403` saying why.
pub fn may_show_secrets(token_configured: bool, peer: std::net::IpAddr) -> Result<(), ApiError> {
    if !token_configured {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            "show_secrets needs a token-authenticated request, and this daemon has no API token: set server.token \
             (or server.token_file) to read env values"
                .into(),
        ));
    }
    let loopback = match peer {
        std::net::IpAddr::V4(ip) => ip.is_loopback(),
        std::net::IpAddr::V6(ip) => ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|ip| ip.is_loopback()),
    };
    if !loopback {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "show_secrets is honoured only from a loopback peer (127.0.0.1 or ::1), and this request came from \
                 {peer}: ask on the daemon's host, or leave show_secrets out to see the env names"
            ),
        ));
    }
    Ok(())
}

/// A page, with the cursor of the next one in [`NEXT_CURSOR`] when more follow.
fn paged(page: impl IntoResponse, next: Option<String>) -> Response {
    let mut response = page.into_response();
    if let Some(value) = next.and_then(|next| header::HeaderValue::from_str(&next).ok()) {
        response.headers_mut().insert(NEXT_CURSOR, value);
    }
    response
}

#[utoipa::path(
    get, path = "/v1/agents/{id}", tag = "agents",
    params(("id" = String, Path, description = "The agent's id or name"), AgentQuery),
    responses(
        (status = 200, description = "The agent", body = AgentJson),
        (status = 403, description = "show_secrets asked for without a token, or not from a loopback peer", body = ErrorJson),
        (status = 404, description = "No such agent", body = ErrorJson)
    )
)]
async fn get_agent(
    State(app): State<AppState>,
    ConnectInfo(peer): ConnectInfo<std::net::SocketAddr>,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<AgentQuery>,
) -> Result<Json<AgentJson>, ApiError> {
    if query.show_secrets {
        // The token itself was checked by `require_token`.
        may_show_secrets(app.token.is_some(), peer.ip())?;
    }
    let view = app.manager.get(&id).await?;
    Ok(Json(agent_json_with(view, query.show_secrets)))
}

/// `POST /v1/agents/{id}/stop` query.
#[derive(Debug, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct StopQuery {
    /// Seconds between SIGTERM and SIGKILL for this stop, 0 to 3600, instead of the
    /// agent's own grace period (`agents.stop_grace_secs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grace_secs: Option<u64>,
}

#[utoipa::path(
    post, path = "/v1/agents/{id}/stop", tag = "agents",
    params(("id" = String, Path, description = "The agent's id or name"), StopQuery),
    responses((status = 200, description = "The agent, stopped", body = AgentJson), (status = 400, description = "Bad grace_secs", body = ErrorJson), (status = 404, description = "No such agent", body = ErrorJson))
)]
async fn stop(
    State(app): State<AppState>,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<StopQuery>,
) -> Result<Json<AgentJson>, ApiError> {
    let grace = match query.grace_secs {
        Some(secs) if secs > agent_manager::MAX_STOP_GRACE_SECS => {
            return Err(ApiError(
                StatusCode::BAD_REQUEST,
                format!("grace_secs: {secs} is out of range: give 0 to {} seconds", agent_manager::MAX_STOP_GRACE_SECS),
            ))
        }
        secs => secs.map(Duration::from_secs),
    };
    let view = app.manager.stop_with_grace(&id, grace).await?;
    Ok(Json(agent_json(view)))
}

#[utoipa::path(
    post, path = "/v1/agents/{id}/restart", tag = "agents",
    params(("id" = String, Path, description = "The agent's id or name")),
    responses((status = 200, description = "The agent, in its new run", body = AgentJson), (status = 404, description = "No such agent", body = ErrorJson))
)]
async fn restart(State(app): State<AppState>, Path(id): Path<String>) -> Result<Json<AgentJson>, ApiError> {
    let view = app.manager.restart(&id).await?;
    Ok(Json(agent_json(view)))
}

#[utoipa::path(
    delete, path = "/v1/agents/{id}", tag = "agents",
    params(("id" = String, Path, description = "The agent's id or name")),
    responses((status = 204, description = "Removed (stopped first)"), (status = 404, description = "No such agent", body = ErrorJson), (status = 409, description = "Busy", body = ErrorJson))
)]
async fn remove(State(app): State<AppState>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    app.manager.remove(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    get, path = "/v1/agents/{id}/runs", tag = "agents",
    params(("id" = String, Path, description = "The agent's id or name")),
    responses((status = 200, description = "Its runs, oldest first", body = Vec<agent_manager::Run>), (status = 404, description = "No such agent", body = ErrorJson))
)]
async fn runs(State(app): State<AppState>, Path(id): Path<String>) -> Result<Json<Vec<agent_manager::Run>>, ApiError> {
    Ok(Json(app.manager.runs(&id).await?))
}

/// `GET /v1/agents/{id}/logs` query.
#[derive(Debug, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    /// Only the last N lines (then, with `follow`, what follows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tail: Option<usize>,
    /// Stream on until the run ends.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub follow: bool,
    /// Stream on across restarts, with a marker line before each new run, until the agent
    /// ends for good (implies `follow`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub follow_restarts: bool,
    /// Only lines written since then: RFC 3339, Unix seconds, or a duration back (`10m`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// Each line prefixed with its engine time (RFC 3339, UTC, nanoseconds).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub timestamps: bool,
}

#[utoipa::path(
    get, path = "/v1/agents/{id}/logs", tag = "agents",
    params(("id" = String, Path, description = "The agent's id or name"), LogsQuery),
    responses((status = 200, description = "The current run's output", body = String, content_type = "text/plain"), (status = 404, description = "No such agent", body = ErrorJson))
)]
async fn logs(
    State(app): State<AppState>,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<LogsQuery>,
) -> Result<Response, ApiError> {
    let text_plain = [(header::CONTENT_TYPE, "text/plain; charset=utf-8")];
    if !query.follow && !query.follow_restarts && query.since.is_none() && !query.timestamps {
        // The log as it is, capped (see `ExecutionBackend::session_logs`).
        let text = app.manager.logs(&id, query.tail).await?;
        return Ok((text_plain, text).into_response());
    }
    let since = match &query.since {
        Some(text) => Some(
            crate::times::parse_since(text, OffsetDateTime::now_utc())
                .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?,
        ),
        None => None,
    };
    let options = crate::logs::LogsOptions {
        follow: query.follow,
        follow_restarts: query.follow_restarts,
        since,
        tail: query.tail,
        timestamps: query.timestamps,
    };
    let lines = crate::logs::open(app.manager.clone(), &id, options, app.shutdown.clone()).await?;
    Ok((text_plain, axum::body::Body::from_stream(lines)).into_response())
}

/// `POST /v1/agents/{id}/messages` body.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MessageRequest {
    pub text: String,
}

/// The answer to a message: its entry's `seq`, and the `uuid` the agent's `result`
/// names when it answers it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct MessageAccepted {
    pub seq: i64,
    pub uuid: Option<String>,
}

/// The answer to an interrupt: its entry's `seq`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct InterruptAccepted {
    pub seq: i64,
}

#[utoipa::path(
    post, path = "/v1/agents/{id}/messages", tag = "conversations",
    params(("id" = String, Path, description = "The agent's id or name")),
    request_body = MessageRequest,
    responses((status = 202, description = "Queued for the agent", body = MessageAccepted), (status = 404, description = "No such agent", body = ErrorJson), (status = 409, description = "Not running, or not a claude-code agent", body = ErrorJson))
)]
async fn send_message(
    State(app): State<AppState>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<MessageRequest>,
) -> Result<Response, ApiError> {
    let entry = app.manager.send_message(&id, &body.text).await?;
    let uuid = entry.data.get("uuid").and_then(serde_json::Value::as_str).map(str::to_owned);
    Ok((StatusCode::ACCEPTED, Json(MessageAccepted { seq: entry.seq, uuid })).into_response())
}

#[utoipa::path(
    post, path = "/v1/agents/{id}/interrupt", tag = "conversations",
    params(("id" = String, Path, description = "The agent's id or name")),
    responses((status = 202, description = "The interrupt, queued", body = InterruptAccepted), (status = 404, description = "No such agent", body = ErrorJson), (status = 409, description = "Not running", body = ErrorJson))
)]
async fn interrupt(State(app): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let entry = app.manager.interrupt(&id).await?;
    Ok((StatusCode::ACCEPTED, Json(InterruptAccepted { seq: entry.seq })).into_response())
}

/// `GET /v1/approvals` query.
#[derive(Debug, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ApprovalsQuery {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending: Option<bool>,
}

#[utoipa::path(
    get, path = "/v1/approvals", tag = "approvals",
    params(ApprovalsQuery),
    responses((status = 200, description = "Tool-permission requests, oldest first", body = Vec<agent_manager::Approval>))
)]
async fn approvals(
    State(app): State<AppState>,
    ApiQuery(q): ApiQuery<ApprovalsQuery>,
) -> Result<Json<Vec<agent_manager::Approval>>, ApiError> {
    Ok(Json(app.manager.approvals(q.agent.as_deref(), q.pending.unwrap_or(false)).await?))
}

#[utoipa::path(
    get, path = "/v1/approvals/{id}", tag = "approvals",
    params(("id" = String, Path, description = "The approval's id")),
    responses((status = 200, description = "The approval", body = agent_manager::Approval), (status = 404, description = "No such approval", body = ErrorJson))
)]
async fn get_approval(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<agent_manager::Approval>, ApiError> {
    Ok(Json(app.manager.approval(&id).await?))
}

/// `POST /v1/approvals/{id}` body.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DecisionRequest {
    pub decision: agent_manager::Decision,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[utoipa::path(
    post, path = "/v1/approvals/{id}", tag = "approvals",
    params(("id" = String, Path, description = "The approval's id")),
    request_body = DecisionRequest,
    responses((status = 200, description = "The approval, decided", body = agent_manager::Approval), (status = 404, description = "No such approval", body = ErrorJson), (status = 409, description = "Already decided, or its run ended", body = ErrorJson))
)]
async fn decide(
    State(app): State<AppState>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<DecisionRequest>,
) -> Result<Json<agent_manager::Approval>, ApiError> {
    Ok(Json(app.manager.decide(&id, body.decision, body.message).await?))
}

/// `GET /v1/agents/{id}/conversation` (and `/stream`) query.
#[derive(Debug, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ConversationQuery {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<i64>,
}

#[utoipa::path(
    get, path = "/v1/agents/{id}/conversation", tag = "conversations",
    params(("id" = String, Path, description = "The agent's id or name"), ConversationQuery),
    responses((status = 200, description = "Entries after `after`, by seq", body = Vec<agent_manager::ConversationEntry>), (status = 404, description = "No such agent", body = ErrorJson))
)]
async fn conversation(
    State(app): State<AppState>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<ConversationQuery>,
) -> Result<Json<Vec<agent_manager::ConversationEntry>>, ApiError> {
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    Ok(Json(app.manager.conversation(&id, q.after.unwrap_or(0), limit).await?))
}

/// `GET /v1/agents/{id}/conversation/stream`: the conversation as server-sent events,
/// each with its `seq` as the event id. A client that reconnects with `Last-Event-ID`
/// (or `?after=`) gets everything after it: the stored entries first, then live ones,
/// with nothing lost or doubled between the two.
///
/// The stream is the response body itself (no task of its own): when the client goes
/// away, the body is dropped, and with it the subscription.
#[utoipa::path(
    get, path = "/v1/agents/{id}/conversation/stream", tag = "conversations",
    params(("id" = String, Path, description = "The agent's id or name"), ConversationQuery, ("Last-Event-ID" = Option<i64>, Header, description = "Resume after this seq")),
    responses((status = 200, description = "Server-sent events, one per entry (`data` is a ConversationEntry, `id` its seq)", content_type = "text/event-stream", body = String), (status = 404, description = "No such agent", body = ErrorJson))
)]
async fn conversation_stream(
    State(app): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<ConversationQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let last_id = match headers.get("last-event-id") {
        Some(value) => Some(value.to_str().ok().and_then(|v| v.trim().parse::<i64>().ok()).ok_or_else(|| {
            ApiError(StatusCode::BAD_REQUEST, "Last-Event-ID must be the seq of a conversation entry".into())
        })?),
        None => None,
    };
    let agent = app.manager.agent(&id).await?;
    // Subscribe before reading the store, so no entry falls between the two.
    let live = BroadcastStream::new(app.manager.subscribe_conversations());
    let state = ConversationFeed {
        manager: app.manager.clone(),
        agent_id: agent.id,
        after: last_id.or(q.after).unwrap_or(0),
        live,
        from_store: true,
        ready: std::collections::VecDeque::new(),
        failed: false,
    };
    let stream = stream::unfold(state, ConversationFeed::next).take_until(shut_down(app.shutdown.clone()));
    Ok(Sse::new(stream.map(Ok)).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// Completes when the daemon shuts down: streams end then.
async fn shut_down(mut shutdown: watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|down| *down).await;
}

/// The state of one conversation stream: the store is read page by page (at the start,
/// and again after the live feed lagged), then live entries follow.
struct ConversationFeed {
    manager: Arc<AgentManager<dyn ExecutionBackend>>,
    agent_id: String,
    /// The last seq sent.
    after: i64,
    live: BroadcastStream<agent_manager::LiveEntry>,
    /// Read the store until a page is not full.
    from_store: bool,
    ready: std::collections::VecDeque<Event>,
    /// The store failed: the stream ends after saying so.
    failed: bool,
}

/// A page of the store.
const PAGE: i64 = 500;

impl ConversationFeed {
    fn event(entry: &agent_manager::ConversationEntry) -> Event {
        let json = serde_json::to_string(entry).unwrap_or_default();
        Event::default().id(entry.seq.to_string()).event(entry.kind.clone()).data(json)
    }

    async fn next(mut self) -> Option<(Event, Self)> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Some((event, self));
            }
            if self.failed {
                return None;
            }
            if self.from_store {
                match self.manager.conversation(&self.agent_id, self.after, PAGE).await {
                    Ok(page) => {
                        // A page may be short because of its byte budget: read on
                        // until one is empty.
                        self.from_store = !page.is_empty();
                        for entry in &page {
                            self.after = entry.seq;
                            self.ready.push_back(Self::event(entry));
                        }
                    }
                    Err(e) => {
                        // Say why, then end.
                        self.failed = true;
                        return Some((Event::default().event("error").data(e.to_string()), self));
                    }
                }
                continue;
            }
            match self.live.next().await? {
                Ok(LiveEntry::Entry(entry)) if entry.agent_id == self.agent_id && entry.seq > self.after => {
                    self.after = entry.seq;
                    return Some((Self::event(&entry), self));
                }
                // Too large to be broadcast whole: read it from the store.
                Ok(LiveEntry::Elided { agent_id, seq }) if agent_id == self.agent_id && seq > self.after => {
                    self.from_store = true
                }
                Ok(_) => {}
                // Read what was missed from the store instead.
                Err(BroadcastStreamRecvError::Lagged(_)) => self.from_store = true,
            }
        }
    }
}

/// `GET /v1/events` query.
#[derive(Debug, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// Only events whose `agent_id` or `agent` (name) is this.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// Only events with an `id` greater than this: the `X-Next-Cursor` of the previous
    /// page. Also accepted as `after`.
    #[serde(skip_serializing_if = "Option::is_none", alias = "after")]
    pub since: Option<i64>,
    /// Events in the page, 1 to 10000 (default 1000); a value out of range is clamped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<i64>,
}

/// A lifecycle event as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EventJson {
    pub id: i64,
    pub agent_id: String,
    pub agent: Option<String>,
    pub kind: agent_manager::EventKind,
    pub from: Option<AgentStatus>,
    pub to: Option<AgentStatus>,
    pub detail: String,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

impl From<LifecycleEvent> for EventJson {
    fn from(e: LifecycleEvent) -> Self {
        Self {
            id: e.id,
            agent_id: e.agent_id,
            agent: e.agent_name,
            kind: e.kind,
            from: e.from,
            to: e.to,
            detail: e.detail,
            at: e.at,
        }
    }
}

#[utoipa::path(
    get, path = "/v1/events", tag = "events",
    params(EventsQuery),
    responses(
        (status = 200, description = "A page of lifecycle events, by id; when more follow, `X-Next-Cursor` names the next page", body = Vec<EventJson>,
            headers(("X-Next-Cursor" = String, description = "Give as `after` (or `since`) for the next page; absent on the last page"))),
        (status = 400, description = "Bad query", body = ErrorJson),
    )
)]
async fn events(State(app): State<AppState>, ApiQuery(q): ApiQuery<EventsQuery>) -> Result<Response, ApiError> {
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    // One more than the page tells whether another follows (an SQL keyset on the id).
    let mut events = app.manager.events(q.agent.as_deref(), q.since.unwrap_or(0), limit + 1).await?;
    let more = events.len() > limit as usize;
    events.truncate(limit as usize);
    let next = more.then(|| events.last().map(|e| e.id.to_string())).flatten();
    Ok(paged(Json(events.into_iter().map(EventJson::from).collect::<Vec<_>>()), next))
}

/// `GET /v1/events/stream` query.
#[derive(Debug, Default, Serialize, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
}

/// `GET /v1/events/stream`: lifecycle events as they happen. The stream is the response
/// body itself: a client that goes away takes its subscription with it.
#[utoipa::path(
    get, path = "/v1/events/stream", tag = "events",
    params(StreamQuery),
    responses((status = 200, description = "Server-sent events: `lifecycle` (data: an EventJson) and `lagged`", content_type = "text/event-stream", body = String))
)]
async fn event_stream(
    State(app): State<AppState>,
    ApiQuery(q): ApiQuery<StreamQuery>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let stream = BroadcastStream::new(app.manager.subscribe())
        .filter_map(move |event| {
            let event = match event {
                Ok(event) => {
                    let wanted = q
                        .agent
                        .as_deref()
                        .is_none_or(|a| a == event.agent_id || event.agent_name.as_deref() == Some(a));
                    wanted.then(|| {
                        let json = serde_json::to_string(&EventJson::from(event)).unwrap_or_default();
                        Event::default().event("lifecycle").data(json)
                    })
                }
                Err(BroadcastStreamRecvError::Lagged(n)) => Some(
                    Event::default()
                        .event("lagged")
                        .data(format!("{n} events were dropped; fetch /v1/events to catch up")),
                ),
            };
            std::future::ready(event)
        })
        .take_until(shut_down(app.shutdown.clone()));
    Ok(Sse::new(stream.map(Ok)).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// The daemon's health, from memory (no engine call): `200` only when `status` is `ok`,
/// `503` when `degraded` or `failing`.
#[utoipa::path(
    get, path = "/healthz", tag = "meta",
    security(()),
    responses(
        (status = 200, description = "`status` is `ok`: the engine answers and the supervisor runs (see docs/api.md for the fields)", body = Object),
        (status = 503, description = "`status` is `degraded` or `failing`", body = Object),
    )
)]
async fn healthz(State(app): State<AppState>) -> Response {
    use agent_manager::{EngineState, HealthStatus, SupervisorState};
    let h = app.manager.health();
    let rfc3339 = |at: time::OffsetDateTime| at.format(&time::format_description::well_known::Rfc3339).ok();
    let status = match h.status {
        HealthStatus::Ok => "ok",
        HealthStatus::Degraded => "degraded",
        HealthStatus::Failing => "failing",
    };
    let engine = match h.engine {
        EngineState::Ok => "ok",
        EngineState::Unavailable => "unavailable",
    };
    let supervisor = match h.supervisor {
        SupervisorState::Starting => "starting",
        SupervisorState::Running => "running",
        SupervisorState::Stale => "stale",
        SupervisorState::Dead => "dead",
    };
    let body = serde_json::json!({
        "status": status,
        "backend": app.manager.backend().name(),
        "instance": app.instance,
        "version": env!("CARGO_PKG_VERSION"),
        "engine": {
            "state": engine,
            "since": rfc3339(h.engine_since),
            "last_error": h.last_engine_error.as_ref().map(|(_, e)| e),
            "last_error_at": h.last_engine_error.as_ref().and_then(|(at, _)| rfc3339(*at)),
        },
        "supervisor": {
            "state": supervisor,
            "last_pass_at": h.last_pass_at.and_then(rfc3339),
            "last_pass_age_secs": h.last_pass_age.map(|age| age.as_secs()),
            "stale_after_secs": h.stale_after.as_secs(),
        },
    });
    let code = if h.status == HealthStatus::Ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(body)).into_response()
}

/// Counted from memory: a scrape costs no database query, however many agents there are.
#[utoipa::path(
    get, path = "/metrics", tag = "meta",
    responses((status = 200, description = "Prometheus text exposition", body = String, content_type = "text/plain; version=0.0.4"))
)]
async fn metrics(State(app): State<AppState>) -> Response {
    let text = crate::metrics::render(&app.manager.agent_counts(), &app.manager.metrics().snapshot());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

#[cfg(test)]
mod tests {
    use agent_manager::{
        Agent, AgentKind, AgentSpec, Approval, ApprovalPolicy, ConversationEntry, DecidedBy, Decision, Delivery,
        Desired, Direction, LastResult, RestartPolicy, SessionView, Turn, UnhealthyAction, Usage,
    };
    use backend_core::{NetworkPolicy, SessionHealth};

    use super::*;

    fn at(nanos: i128) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp_nanos(1_790_000_000_000_000_000 + nanos).expect("a valid time")
    }

    /// What the server sends, read back as the client reads it, equal field by field.
    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(value: &T) {
        let json = serde_json::to_string(value).expect("serializes");
        let back: T = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{json} does not read back: {e}"));
        assert_eq!(&back, value, "{json}");
        // And what `--json` prints of it is what the server sent.
        let sent: serde_json::Value = serde_json::from_str(&json).expect("JSON");
        assert_eq!(crate::client::printable(&back).expect("printable"), sent);
    }

    fn view(kind: AgentKind) -> AgentView {
        let spec = AgentSpec {
            kind,
            image: "agentd-claude:latest".into(),
            entrypoint: None,
            command: None,
            env: std::collections::BTreeMap::new(),
            workdir: None,
            memory_mb: Some(2048),
            cpus: Some(1.5),
            pids_limit: None,
            network: NetworkPolicy::Isolated,
            restart: RestartPolicy::OnFailure,
            on_unhealthy: UnhealthyAction::Record,
            stop_grace_secs: 10,
            model: None,
            prompt: None,
            user: None,
            read_only_rootfs: false,
            approvals: ApprovalPolicy::Ask,
            permission_mode: None,
            max_turns: None,
            max_budget_usd: None,
            model_limits: agent_manager::ModelLimits { requests_per_minute: Some(2), ..Default::default() },
            egress_allow: vec!["example.com".into()],
        };
        let agent = Agent {
            id: "a1b2c3".into(),
            name: "round-trip".into(),
            status: AgentStatus::Failed,
            desired: Desired::Running,
            health: SessionHealth::Unhealthy,
            session: "agentd-test-round-trip".into(),
            container_id: Some("c0ffee".into()),
            spec,
            restarts: 3,
            crash_streak: 2,
            next_restart_at: Some(at(123_456_789)),
            reason: Some("exited with code 3".into()),
            created_at: at(0),
            updated_at: at(1_000_000),
        };
        let session = (kind == AgentKind::ClaudeCode).then(|| SessionView {
            session_id: "5e55".into(),
            turn: Turn::AwaitingApproval,
            cost_usd: 0.123_456_7,
            usage: Usage { input_tokens: 12, output_tokens: 34 },
            last_result: Some(LastResult {
                subtype: "success".into(),
                is_error: false,
                text: "done".into(),
                at: at(5),
            }),
            turns: 4,
            started: true,
        });
        AgentView {
            agent,
            started_at: Some(at(6)),
            exit: Some(ExitView {
                code: Some(3),
                oom_killed: false,
                signal: None,
                error: None,
                finished_at: Some(at(7)),
            }),
            connected: true,
            paused: false,
            session,
            model_usage: agent_manager::ModelUsage { requests: 3, input_tokens: 30, output_tokens: 15 },
            model_limits: agent_manager::ModelLimits {
                requests_per_minute: Some(2),
                max_concurrent_requests: None,
                max_output_tokens_per_day: Some(100_000),
            },
        }
    }

    #[test]
    fn the_agent_json_the_server_builds_reads_back_the_same() {
        for kind in [AgentKind::ClaudeCode, AgentKind::Image] {
            let agent = agent_json(view(kind));
            assert_eq!(agent.conversation.is_some(), kind == AgentKind::ClaudeCode);
            let json = serde_json::to_value(&agent).expect("JSON");
            assert_eq!(
                json["model_usage"],
                serde_json::json!({"requests": 3, "input_tokens": 30, "output_tokens": 15})
            );
            assert_eq!(
                json["model_limits"],
                serde_json::json!({
                    "requests_per_minute": 2, "max_concurrent_requests": null, "max_output_tokens_per_day": 100_000
                })
            );
            round_trip(&agent);
            round_trip(&vec![agent]);
        }
    }

    #[test]
    fn env_values_are_masked_unless_secrets_are_shown() {
        let mut v = view(AgentKind::Image);
        v.agent.spec.env.insert("GITHUB_TOKEN".into(), "ghp_secret".into());
        let masked = serde_json::to_string(&agent_json(v.clone())).expect("JSON");
        assert!(masked.contains(r#""env":{"GITHUB_TOKEN":"<masked>"}"#) && !masked.contains("ghp_secret"), "{masked}");
        assert_eq!(agent_json_with(v, true).env["GITHUB_TOKEN"], "ghp_secret");
    }

    #[test]
    fn secrets_are_shown_only_to_a_token_from_loopback() {
        let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("ip");
        assert!(may_show_secrets(true, ip("127.0.0.1")).is_ok());
        assert!(may_show_secrets(true, ip("::1")).is_ok());
        assert!(may_show_secrets(true, ip("::ffff:127.0.0.1")).is_ok());
        for (token, peer, says) in [
            (false, "127.0.0.1", "server.token"),
            (true, "10.0.0.5", "10.0.0.5"),
            (true, "::ffff:10.0.0.5", "loopback"),
        ] {
            let e = may_show_secrets(token, ip(peer)).expect_err("refused");
            assert_eq!(e.0, StatusCode::FORBIDDEN);
            assert!(e.1.contains(says), "{}", e.1);
        }
    }

    #[test]
    fn entries_approvals_and_events_read_back_the_same() {
        round_trip(&ConversationEntry {
            agent_id: String::new(),
            seq: 7,
            at: at(42),
            direction: Direction::ToAgent,
            kind: "user".into(),
            text: "hello".into(),
            data: serde_json::json!({"type": "user", "message": {"content": "hello"}}),
            delivery: Some(Delivery::Queued),
        });
        round_trip(&Approval {
            id: "ap1".into(),
            agent_id: "a1b2c3".into(),
            agent: Some("round-trip".into()),
            container_id: String::new(),
            request_id: "req-1".into(),
            tool: "Bash".into(),
            input: serde_json::json!({"command": "ls"}),
            requested_at: at(1),
            decision: Some(Decision::Deny),
            message: Some("no".into()),
            decided_by: Some(DecidedBy::RunEnded),
            decided_at: Some(at(2)),
        });
        round_trip(&agent_manager::Run {
            id: 2,
            agent_id: "a1b2c3".into(),
            session: "agentd-test-round-trip".into(),
            container_id: Some("c0ffee".into()),
            started_at: at(10),
            finished_at: Some(at(20)),
            exit: Some(ExitView {
                code: None,
                oom_killed: true,
                signal: Some(9),
                error: None,
                finished_at: Some(at(20)),
            }),
            ended_by: Some(agent_manager::EndedBy::StartError),
        });
        round_trip(&EventJson {
            id: 9,
            agent_id: "a1b2c3".into(),
            agent: None,
            kind: agent_manager::EventKind::RestartScheduled,
            from: Some(AgentStatus::Running),
            to: Some(AgentStatus::Failed),
            detail: "exit 3".into(),
            at: at(3),
        });
    }
}
