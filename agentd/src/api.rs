//! The HTTP API: agents, their conversations, events, health and metrics.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use agent_manager::{
    AgentManager, AgentStatus, AgentView, ExitView, LifecycleEvent, LiveEntry, ManagerError, NewAgent,
};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
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

/// The full API: `/v1/*`, `/healthz` and `/metrics`.
pub fn router(app: AppState) -> Router {
    let v1 = Router::new()
        .route("/v1/agents", post(spawn).get(list))
        .route("/v1/agents/{id}", get(get_agent).delete(remove))
        .route("/v1/agents/{id}/stop", post(stop))
        .route("/v1/agents/{id}/restart", post(restart))
        .route("/v1/agents/{id}/runs", get(runs))
        .route("/v1/agents/{id}/logs", get(logs))
        .route("/v1/agents/{id}/messages", post(send_message))
        .route("/v1/agents/{id}/interrupt", post(interrupt))
        .route("/v1/approvals", get(approvals))
        .route("/v1/approvals/{id}", get(get_approval).post(decide))
        .route("/v1/agents/{id}/conversation", get(conversation))
        .route("/v1/agents/{id}/conversation/stream", get(conversation_stream))
        .route("/v1/events", get(events))
        .route("/v1/events/stream", get(event_stream))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(app.clone(), require_token));
    Router::new()
        .merge(v1)
        .route("/healthz", get(healthz))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such endpoint; see docs/api.md".into()) })
        .method_not_allowed_fallback(|| async {
            ApiError(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this endpoint; see docs/api.md".into())
        })
        .with_state(app)
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// Whether the engine has the container frozen.
    pub paused: bool,
    /// The conversation of a claude-code agent; absent for other kinds.
    #[serde(flatten)]
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

/// A claude-code agent's session, in the agent JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConversationJson {
    pub session_id: String,
    pub turn: agent_manager::Turn,
    pub cost_usd: f64,
    pub usage: agent_manager::Usage,
    pub last_result: Option<agent_manager::LastResult>,
}

fn agent_json(view: AgentView) -> AgentJson {
    let a = view.agent;
    AgentJson {
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
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

async fn list(
    State(app): State<AppState>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<Vec<AgentJson>>, ApiError> {
    let status = query
        .status
        .map(|s| s.parse::<AgentStatus>())
        .transpose()
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("status: {e}")))?;
    let views = app.manager.list(status).await?;
    Ok(Json(views.into_iter().map(agent_json).collect()))
}

async fn get_agent(State(app): State<AppState>, Path(id): Path<String>) -> Result<Json<AgentJson>, ApiError> {
    let view = app.manager.get(&id).await?;
    Ok(Json(agent_json(view)))
}

/// `POST /v1/agents/{id}/stop` query.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopQuery {
    /// Seconds between SIGTERM and SIGKILL for this stop, 0 to 3600, instead of the
    /// agent's own grace period (`agents.stop_grace_secs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grace_secs: Option<u64>,
}

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

async fn restart(State(app): State<AppState>, Path(id): Path<String>) -> Result<Json<AgentJson>, ApiError> {
    let view = app.manager.restart(&id).await?;
    Ok(Json(agent_json(view)))
}

async fn remove(State(app): State<AppState>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    app.manager.remove(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn runs(State(app): State<AppState>, Path(id): Path<String>) -> Result<Json<Vec<agent_manager::Run>>, ApiError> {
    Ok(Json(app.manager.runs(&id).await?))
}

/// `GET /v1/agents/{id}/logs` query.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tail: Option<usize>,
}

async fn logs(
    State(app): State<AppState>,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<LogsQuery>,
) -> Result<Response, ApiError> {
    let text = app.manager.logs(&id, query.tail).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

/// `POST /v1/agents/{id}/messages` body.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageRequest {
    pub text: String,
}

/// The answer to a message: its entry's `seq`, and the `uuid` the agent's `result`
/// names when it answers it.
#[derive(Debug, Serialize, Deserialize)]
pub struct MessageAccepted {
    pub seq: i64,
    pub uuid: Option<String>,
}

/// The answer to an interrupt: its entry's `seq`.
#[derive(Debug, Serialize, Deserialize)]
pub struct InterruptAccepted {
    pub seq: i64,
}

async fn send_message(
    State(app): State<AppState>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<MessageRequest>,
) -> Result<Response, ApiError> {
    let entry = app.manager.send_message(&id, &body.text).await?;
    let uuid = entry.data.get("uuid").and_then(serde_json::Value::as_str).map(str::to_owned);
    Ok((StatusCode::ACCEPTED, Json(MessageAccepted { seq: entry.seq, uuid })).into_response())
}

async fn interrupt(State(app): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let entry = app.manager.interrupt(&id).await?;
    Ok((StatusCode::ACCEPTED, Json(InterruptAccepted { seq: entry.seq })).into_response())
}

/// `GET /v1/approvals` query.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalsQuery {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending: Option<bool>,
}

async fn approvals(
    State(app): State<AppState>,
    ApiQuery(q): ApiQuery<ApprovalsQuery>,
) -> Result<Json<Vec<agent_manager::Approval>>, ApiError> {
    Ok(Json(app.manager.approvals(q.agent.as_deref(), q.pending.unwrap_or(false)).await?))
}

async fn get_approval(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<agent_manager::Approval>, ApiError> {
    Ok(Json(app.manager.approval(&id).await?))
}

/// `POST /v1/approvals/{id}` body.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecisionRequest {
    pub decision: agent_manager::Decision,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

async fn decide(
    State(app): State<AppState>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<DecisionRequest>,
) -> Result<Json<agent_manager::Approval>, ApiError> {
    Ok(Json(app.manager.decide(&id, body.decision, body.message).await?))
}

/// `GET /v1/agents/{id}/conversation` (and `/stream`) query.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConversationQuery {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<i64>,
}

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
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<i64>,
}

/// A lifecycle event as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

async fn events(
    State(app): State<AppState>,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> Result<Json<Vec<EventJson>>, ApiError> {
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    let events = app.manager.events(q.agent.as_deref(), q.since.unwrap_or(0), limit).await?;
    Ok(Json(events.into_iter().map(EventJson::from).collect()))
}

/// `GET /v1/events/stream` query.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
}

/// `GET /v1/events/stream`: lifecycle events as they happen. The stream is the response
/// body itself: a client that goes away takes its subscription with it.
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
