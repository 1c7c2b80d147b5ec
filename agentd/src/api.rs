//! The HTTP API: agents, their conversations, events, health and metrics.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use agent_manager::{AgentManager, AgentStatus, AgentView, ExitView, LifecycleEvent, ManagerError, NewAgent};
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use backend_core::{BackendError, ExecutionBackend};
use futures_util::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::watch;
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
            ManagerError::ImageMissing { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ManagerError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            e if e.is_engine_unavailable() => StatusCode::SERVICE_UNAVAILABLE,
            ManagerError::Backend(BackendError::InvalidSpec { .. }) => StatusCode::BAD_REQUEST,
            ManagerError::Backend(BackendError::ImageNotFound { .. }) => StatusCode::UNPROCESSABLE_ENTITY,
            ManagerError::Backend(BackendError::AlreadyExists { .. }) => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            warn!(error = %e, "Request failed.");
        }
        ApiError(status, e.to_string())
    }
}

fn bad_json(rejection: JsonRejection) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, format!("invalid request body: {}", rejection.body_text()))
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

/// An agent as the API shows it.
#[derive(Debug, Serialize)]
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
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

/// A claude-code agent's session, in the agent JSON.
#[derive(Debug, Serialize)]
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
        id: a.id,
        name: a.name,
        kind: a.spec.kind,
        status: a.status,
        health: a.health,
        session: a.session,
        image: a.spec.image,
        network: a.spec.network,
        restart: a.spec.restart,
        restarts: a.restarts,
        reason: a.reason,
        next_restart_at: a.next_restart_at,
        exit: view.exit,
        created_at: a.created_at,
        updated_at: a.updated_at,
    }
}

async fn spawn(State(app): State<AppState>, body: Result<Json<NewAgent>, JsonRejection>) -> Result<Response, ApiError> {
    let Json(new) = body.map_err(bad_json)?;
    let network = new.network.unwrap_or(app.manager.config().defaults.network);
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    status: Option<String>,
}

async fn list(
    State(app): State<AppState>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<AgentJson>>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
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

async fn stop(State(app): State<AppState>, Path(id): Path<String>) -> Result<Json<AgentJson>, ApiError> {
    let view = app.manager.stop(&id).await?;
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogsQuery {
    tail: Option<usize>,
}

async fn logs(
    State(app): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<LogsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let text = app.manager.logs(&id, query.tail).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageBody {
    text: String,
}

async fn send_message(
    State(app): State<AppState>,
    Path(id): Path<String>,
    body: Result<Json<MessageBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body.map_err(bad_json)?;
    let entry = app.manager.send_message(&id, &body.text).await?;
    let uuid = entry.data.get("uuid").cloned().unwrap_or(serde_json::Value::Null);
    Ok((StatusCode::ACCEPTED, Json(serde_json::json!({ "seq": entry.seq, "uuid": uuid }))).into_response())
}

async fn interrupt(State(app): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let entry = app.manager.interrupt(&id).await?;
    Ok((StatusCode::ACCEPTED, Json(serde_json::json!({ "seq": entry.seq }))).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApprovalsQuery {
    agent: Option<String>,
    pending: Option<bool>,
}

async fn approvals(
    State(app): State<AppState>,
    query: Result<Query<ApprovalsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<agent_manager::Approval>>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    Ok(Json(app.manager.approvals(q.agent.as_deref(), q.pending.unwrap_or(false)).await?))
}

async fn get_approval(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<agent_manager::Approval>, ApiError> {
    Ok(Json(app.manager.approval(&id).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DecisionBody {
    decision: agent_manager::Decision,
    message: Option<String>,
}

async fn decide(
    State(app): State<AppState>,
    Path(id): Path<String>,
    body: Result<Json<DecisionBody>, JsonRejection>,
) -> Result<Json<agent_manager::Approval>, ApiError> {
    let Json(body) = body.map_err(bad_json)?;
    Ok(Json(app.manager.decide(&id, body.decision, body.message).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConversationQuery {
    after: Option<i64>,
    limit: Option<i64>,
}

async fn conversation(
    State(app): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<ConversationQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<agent_manager::ConversationEntry>>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    Ok(Json(app.manager.conversation(&id, q.after.unwrap_or(0), limit).await?))
}

/// `GET /v1/agents/{id}/conversation/stream`: the conversation as server-sent events,
/// each with its `seq` as the event id. A client that reconnects with `Last-Event-ID`
/// (or `?after=`) gets everything after it: the stored entries first, then live ones,
/// with nothing lost or doubled between the two.
async fn conversation_stream(
    State(app): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    query: Result<Query<ConversationQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let last_id = match headers.get("last-event-id") {
        Some(value) => Some(value.to_str().ok().and_then(|v| v.trim().parse::<i64>().ok()).ok_or_else(|| {
            ApiError(StatusCode::BAD_REQUEST, "Last-Event-ID must be the seq of a conversation entry".into())
        })?),
        None => None,
    };
    let agent = app.manager.agent(&id).await?;
    // Subscribe before reading the store, so no entry falls between the two.
    let mut live = app.manager.subscribe_conversations();
    let mut after = last_id.or(q.after).unwrap_or(0);
    let manager = app.manager.clone();
    let mut shutdown = app.shutdown.clone();
    let stream = async_stream(move |tx| async move {
        let event = |entry: &agent_manager::ConversationEntry| {
            let json = serde_json::to_string(entry).unwrap_or_default();
            Event::default().id(entry.seq.to_string()).event(entry.kind.clone()).data(json)
        };
        // The stored backlog, in pages.
        loop {
            let page = match manager.conversation(&agent.id, after, 500).await {
                Ok(page) => page,
                Err(e) => {
                    let _ = tx.send(Event::default().event("error").data(e.to_string())).await;
                    return;
                }
            };
            let done = page.len() < 500;
            for entry in &page {
                if tx.send(event(entry)).await.is_err() {
                    return;
                }
                after = entry.seq;
            }
            if done {
                break;
            }
        }
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                entry = live.recv() => match entry {
                    Ok(entry) if entry.agent_id == agent.id && entry.seq > after => {
                        after = entry.seq;
                        if tx.send(event(&entry)).await.is_err() { break; }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        // Read what was missed from the store instead, page by page.
                        loop {
                            let Ok(page) = manager.conversation(&agent.id, after, 500).await else { return };
                            let done = page.len() < 500;
                            for entry in page {
                                after = entry.seq;
                                if tx.send(event(&entry)).await.is_err() { return; }
                            }
                            if done { break; }
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        }
    });
    Ok(Sse::new(stream.map(Ok)).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    agent: Option<String>,
    since: Option<i64>,
    limit: Option<i64>,
}

#[derive(Debug, Serialize)]
struct EventJson {
    id: i64,
    agent_id: String,
    agent: Option<String>,
    kind: agent_manager::EventKind,
    from: Option<AgentStatus>,
    to: Option<AgentStatus>,
    detail: String,
    #[serde(with = "time::serde::rfc3339")]
    at: OffsetDateTime,
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
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<EventJson>>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    let events = app.manager.events(q.agent.as_deref(), q.since.unwrap_or(0), limit).await?;
    Ok(Json(events.into_iter().map(EventJson::from).collect()))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamQuery {
    agent: Option<String>,
}

async fn event_stream(
    State(app): State<AppState>,
    query: Result<Query<StreamQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let Query(q) = query.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let mut events = app.manager.subscribe();
    let mut shutdown = app.shutdown.clone();
    let stream = async_stream(move |tx| async move {
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                event = events.recv() => match event {
                    Ok(event) => {
                        let wanted = q.agent.as_deref().is_none_or(|a| a == event.agent_id || event.agent_name.as_deref() == Some(a));
                        if !wanted { continue; }
                        let json = serde_json::to_string(&EventJson::from(event)).unwrap_or_default();
                        if tx.send(Event::default().event("lifecycle").data(json)).await.is_err() { break; }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let note = Event::default().event("lagged").data(format!("{n} events were dropped; fetch /v1/events to catch up"));
                        if tx.send(note).await.is_err() { break; }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        }
    });
    Ok(Sse::new(stream.map(Ok)).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// A stream fed by a task through a channel.
fn async_stream<T, F, Fut>(body: F) -> impl Stream<Item = T>
where
    T: Send + 'static,
    F: FnOnce(tokio::sync::mpsc::Sender<T>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(body(tx));
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) })
}

async fn healthz(State(app): State<AppState>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "status": "ok",
        "backend": app.manager.backend().name(),
        "instance": app.instance,
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

/// Counted from memory: a scrape costs no database query, however many agents there are.
async fn metrics(State(app): State<AppState>) -> Response {
    let text = crate::metrics::render(&app.manager.agent_counts(), &app.manager.metrics().snapshot());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}
