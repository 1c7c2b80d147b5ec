//! A small, deterministic stand-in for the Anthropic Messages API, for tests that run the
//! real Claude Code CLI (or anything else that speaks the Messages API) against it.
//!
//! What Claude Code 2.1.328 was measured to need from it:
//! - `HEAD /api/hello` once at start-up (not sent when `CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1`);
//! - `POST /v1/messages?beta=true` with `"stream": true` for every model call, and after a
//!   stalled stream (no bytes for 300 s) one retry with `"stream": false`;
//! - nothing else (no `count_tokens`, no other host when non-essential traffic is off).
//!
//! Replies are queued with [`StandIn::push`] and consumed one per `POST /v1/messages`, in
//! order; with an empty queue the answer is `Reply::text("ok")`. A CLI turn with a tool call
//! makes two requests (the `tool_use`, then the answer to the `tool_result`), so push two
//! replies for it.
//!
//! Usage is the same in every reply: `message_start` carries
//! `{input_tokens: INPUT_TOKENS, output_tokens: START_OUTPUT_TOKENS}` and `message_delta`
//! `{output_tokens: OUTPUT_TOKENS}`; a non-streamed reply carries
//! `{input_tokens: INPUT_TOKENS, output_tokens: OUTPUT_TOKENS}`. Claude Code's `result` then
//! reports `usage.input_tokens == INPUT_TOKENS * k` and `usage.output_tokens == OUTPUT_TOKENS * k`
//! for a turn of k model requests.
//!
//! Error replies carry `x-should-retry: false`, which Claude Code honours: one
//! [`Reply::Error`] is one failed turn (`result` with `is_error: true`). Without that header
//! the CLI retries 401 and 529 up to 10 times with backoff (about 3 minutes).
#![allow(dead_code)]

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::Response;
use axum::Router;
use serde_json::{json, Value};
use tokio::sync::{watch, Notify};

/// `usage.input_tokens` of every reply (in `message_start`, and in non-streamed replies).
pub const INPUT_TOKENS: u64 = 10;
/// `usage.output_tokens` in `message_start` (streamed replies; superseded by `message_delta`).
pub const START_OUTPUT_TOKENS: u64 = 1;
/// `usage.output_tokens` in `message_delta` (streamed) and in non-streamed replies.
pub const OUTPUT_TOKENS: u64 = 5;
/// What Claude Code 2.1.328 reports as the cost of one completed model request to this
/// stand-in with its default model `claude-opus-5-5` ($4 / $20 per million tokens):
/// 10 × 4e-6 + 5 × 20e-6. Compare with a tolerance; other models price differently.
pub const COST_PER_REQUEST_USD_DEFAULT_MODEL: f64 = 0.00014;
/// The model named in replies when the request names none.
pub const DEFAULT_MODEL: &str = "claude-stand-in";

/// One scripted answer to a `POST /v1/messages`.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// One text block, `stop_reason: end_turn`.
    Text(String),
    /// One `tool_use` block (id `toolu_<n>`, n the 1-based number of the request), `stop_reason: tool_use`.
    ToolUse { name: String, input: Value },
    /// An HTTP error with the Anthropic error body `{"type":"error","error":{"type":..,"message":..}}`
    /// and `x-should-retry: false`.
    Error { status: u16, error_type: String, message: String },
    /// Starts the stream (`message_start`, then the text block's start and one delta if `text`
    /// is given) and never finishes it: the connection is cut when the [`StandIn`] is dropped.
    /// A non-streamed request gets its headers and then nothing until then.
    Stall { text: Option<String> },
    /// `text` streamed in up to 4 deltas, waiting `chunk_delay` before each one. A non-streamed
    /// request is answered after the same total delay.
    Slow { text: String, chunk_delay: Duration },
}

impl Reply {
    pub fn text(s: impl Into<String>) -> Reply {
        Reply::Text(s.into())
    }

    pub fn tool_use(name: impl Into<String>, input: Value) -> Reply {
        Reply::ToolUse { name: name.into(), input }
    }

    pub fn error(status: u16, error_type: impl Into<String>, message: impl Into<String>) -> Reply {
        Reply::Error { status, error_type: error_type.into(), message: message.into() }
    }
}

/// One request the stand-in received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// The path without the query: `/v1/messages` (Claude Code sends `/v1/messages?beta=true`).
    pub path: String,
    /// The query string, if any (`beta=true`).
    pub query: Option<String>,
    /// Header names in lower case, in the order received.
    pub headers: Vec<(String, String)>,
    /// The body parsed as JSON; a body that is not JSON is kept as a JSON string; `None` when empty.
    pub body: Option<Value>,
}

impl Recorded {
    /// The first value of a header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Whether this is a model call (`POST /v1/messages`).
    pub fn is_message(&self) -> bool {
        self.method == "POST" && self.path == "/v1/messages"
    }

    /// The texts of every message in `body.messages`, in order and flattened: string
    /// contents, `text` blocks, and the contents of `tool_result` blocks (string or text
    /// blocks). Every role counts: Claude Code also puts `system` messages and
    /// `<system-reminder>` text blocks there.
    pub fn message_texts(&self) -> Vec<String> {
        let mut texts = Vec::new();
        let Some(messages) = self.body.as_ref().and_then(|b| b.get("messages")).and_then(Value::as_array) else {
            return texts;
        };
        for message in messages {
            collect_texts(message.get("content"), &mut texts);
        }
        texts
    }

    /// The `tool_result` blocks in `body.messages`, in order.
    pub fn tool_results(&self) -> Vec<Value> {
        let Some(messages) = self.body.as_ref().and_then(|b| b.get("messages")).and_then(Value::as_array) else {
            return Vec::new();
        };
        messages
            .iter()
            .filter_map(|m| m.get("content").and_then(Value::as_array))
            .flatten()
            .filter(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
            .cloned()
            .collect()
    }
}

fn collect_texts(content: Option<&Value>, texts: &mut Vec<String>) {
    match content {
        Some(Value::String(s)) => texts.push(s.clone()),
        Some(Value::Array(blocks)) => {
            for block in blocks {
                match block.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        if let Some(t) = block.get("text").and_then(Value::as_str) {
                            texts.push(t.to_owned());
                        }
                    }
                    Some("tool_result") => collect_texts(block.get("content"), texts),
                    _ => {}
                }
            }
        }
        _ => {}
    }
}

#[derive(Default)]
struct Shared {
    queue: VecDeque<Reply>,
    requests: Vec<Recorded>,
    messages: usize,
}

struct Inner {
    shared: Mutex<Shared>,
    arrived: Notify,
    /// Never sent on: dropping the sender (with the [`StandIn`]) ends stalled replies.
    shutdown: watch::Receiver<()>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panicking test thread must not hide the requests from the next assertion.
        self.shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The stand-in server. It serves until dropped.
pub struct StandIn {
    port: u16,
    inner: Arc<Inner>,
    server: tokio::task::JoinHandle<()>,
    _shutdown: watch::Sender<()>,
}

impl fmt::Debug for StandIn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shared = self.inner.lock();
        f.debug_struct("StandIn")
            .field("port", &self.port)
            .field("queued", &shared.queue.len())
            .field("requests", &shared.requests.len())
            .finish()
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        // Stops accepting; stalled replies end because the shutdown sender goes with us.
        self.server.abort();
    }
}

impl StandIn {
    /// Binds 0.0.0.0 on a free port (containers reach it through the engine's host gateway)
    /// and serves until dropped. Must be called within a Tokio runtime, which must keep
    /// running (a multi-threaded one when the test blocks its thread in between).
    pub async fn start() -> StandIn {
        Self::start_on("0.0.0.0").await
    }

    /// Binds 127.0.0.1 only: containers cannot reach it, agentd's model gateway (which
    /// forwards to it as `model.upstream`) can.
    pub async fn start_loopback() -> StandIn {
        Self::start_on("127.0.0.1").await
    }

    async fn start_on(host: &str) -> StandIn {
        let listener = tokio::net::TcpListener::bind((host, 0))
            .await
            .unwrap_or_else(|e| panic!("stand-in model: bind {host}:0: {e}"));
        let port = listener.local_addr().expect("stand-in model: local address").port();
        let (shutdown_tx, shutdown_rx) = watch::channel(());
        let inner =
            Arc::new(Inner { shared: Mutex::new(Shared::default()), arrived: Notify::new(), shutdown: shutdown_rx });
        let app = Router::new().fallback(handle).with_state(inner.clone());
        let server = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("stand-in model: server ended: {e}");
            }
        });
        StandIn { port, inner, server, _shutdown: shutdown_tx }
    }

    /// Cuts every stalled reply's connection now (as a model endpoint that gives up would).
    pub fn cut_stalled(&self) {
        self._shutdown.send_replace(());
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:<port>`, for a client on this host.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Queues the reply for the next `POST /v1/messages`; replies are consumed in order; with
    /// an empty queue the answer is `Reply::text("ok")`.
    pub fn push(&self, reply: Reply) {
        self.inner.lock().queue.push_back(reply);
    }

    /// How many pushed replies are still waiting for a request.
    pub fn queued(&self) -> usize {
        self.inner.lock().queue.len()
    }

    /// Every request received so far (`HEAD /api/hello` included), in order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.inner.lock().requests.clone()
    }

    /// The `POST /v1/messages` requests received so far, in order.
    pub fn messages(&self) -> Vec<Recorded> {
        self.inner.lock().requests.iter().filter(|r| r.is_message()).cloned().collect()
    }

    /// Waits (bounded by `timeout`, panicking with a clear message) until at least `n`
    /// `POST /v1/messages` requests arrived; returns all of them so far, in order.
    pub async fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<Recorded> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let mut arrived = pin!(self.inner.arrived.notified());
            arrived.as_mut().enable();
            let messages = self.messages();
            if messages.len() >= n {
                return messages;
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                let seen: Vec<String> = self.requests().iter().map(|r| format!("{} {}", r.method, r.path)).collect();
                panic!(
                    "stand-in model: waited {timeout:?} for {n} POST /v1/messages, got {}; all requests: {seen:?}",
                    messages.len()
                );
            }
        }
    }
}

async fn handle(State(inner): State<Arc<Inner>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX).await.unwrap_or_default();
    let body = if bytes.is_empty() {
        None
    } else {
        Some(
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned())),
        )
    };
    let recorded = Recorded {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: headers_of(&parts.headers),
        body,
    };
    let method = parts.method;
    let path = recorded.path.clone();
    let is_message = recorded.is_message();
    let stream = recorded.body.as_ref().and_then(|b| b.get("stream")).and_then(Value::as_bool).unwrap_or(false);
    let model =
        recorded.body.as_ref().and_then(|b| b.get("model")).and_then(Value::as_str).unwrap_or(DEFAULT_MODEL).to_owned();

    let (reply, n) = {
        let mut shared = inner.lock();
        shared.requests.push(recorded);
        if is_message {
            shared.messages += 1;
            (shared.queue.pop_front().unwrap_or_else(|| Reply::text("ok")), shared.messages)
        } else {
            (Reply::text("unused"), 0)
        }
    };
    inner.arrived.notify_waiters();

    match (&method, path.as_str()) {
        (&Method::HEAD | &Method::GET, "/api/hello") => empty(StatusCode::OK),
        (&Method::POST, "/v1/messages") => {
            let mut shutdown = inner.shutdown.clone();
            // Only a cut from now on ends this reply's stall.
            shutdown.borrow_and_update();
            if stream {
                streamed(reply, n, &model, shutdown)
            } else {
                whole(reply, n, &model, shutdown).await
            }
        }
        (&Method::POST, "/v1/messages/count_tokens") => {
            json_response(StatusCode::OK, &json!({ "input_tokens": INPUT_TOKENS }))
        }
        _ => error_response(404, "not_found_error", &format!("stand-in model: no route for {method} {path}")),
    }
}

fn headers_of(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(name, value)| {
            (name.as_str().to_ascii_lowercase(), String::from_utf8_lossy(value.as_bytes()).into_owned())
        })
        .collect()
}

fn empty(status: StatusCode) -> Response {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = status;
    response
}

fn json_response(status: StatusCode, value: &Value) -> Response {
    let mut response = Response::new(Body::from(value.to_string()));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error_response(status: u16, error_type: &str, message: &str) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response =
        json_response(status, &json!({ "type": "error", "error": { "type": error_type, "message": message } }));
    response.headers_mut().insert("x-should-retry", HeaderValue::from_static("false"));
    response
}

fn message_id(n: usize) -> String {
    format!("msg_{n}")
}

fn tool_use_id(n: usize) -> String {
    format!("toolu_{n}")
}

/// Up to 4 pieces of about equal length (by characters), for [`Reply::Slow`].
fn pieces(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    if chars.is_empty() {
        return vec![String::new()];
    }
    let size = chars.len().div_ceil(4);
    chars.chunks(size).map(|c| c.iter().collect()).collect()
}

/// A non-streamed reply.
async fn whole(reply: Reply, n: usize, model: &str, mut shutdown: watch::Receiver<()>) -> Response {
    let (content, stop_reason) = match reply {
        Reply::Error { status, error_type, message } => return error_response(status, &error_type, &message),
        Reply::Stall { .. } => {
            // Headers now, then nothing until the stand-in is dropped; then the connection is cut.
            let body = futures_util::stream::once(async move {
                // Cut by `cut_stalled`, or when the stand-in is dropped.
                let _ = shutdown.changed().await;
                Err::<Bytes, _>(io::Error::other("stand-in model dropped"))
            });
            let mut response = Response::new(Body::from_stream(body));
            response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
            return response;
        }
        Reply::Slow { text, chunk_delay } => {
            let count = u32::try_from(pieces(&text).len()).unwrap_or(u32::MAX);
            tokio::time::sleep(chunk_delay.saturating_mul(count)).await;
            (json!([{ "type": "text", "text": text }]), "end_turn")
        }
        Reply::Text(text) => (json!([{ "type": "text", "text": text }]), "end_turn"),
        Reply::ToolUse { name, input } => {
            (json!([{ "type": "tool_use", "id": tool_use_id(n), "name": name, "input": input }]), "tool_use")
        }
    };
    json_response(
        StatusCode::OK,
        &json!({
            "id": message_id(n),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": null,
            "usage": { "input_tokens": INPUT_TOKENS, "output_tokens": OUTPUT_TOKENS },
        }),
    )
}

fn sse(event: &Value) -> Bytes {
    let name = event.get("type").and_then(Value::as_str).unwrap_or("message");
    Bytes::from(format!("event: {name}\ndata: {event}\n\n"))
}

/// What a streamed reply does once its events are out.
enum Tail {
    End,
    StallUntilDropped,
}

/// A streamed (SSE) reply; every event is flushed on its own.
fn streamed(reply: Reply, n: usize, model: &str, shutdown: watch::Receiver<()>) -> Response {
    let start = json!({
        "type": "message_start",
        "message": {
            "id": message_id(n),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": null,
            "stop_sequence": null,
            "usage": { "input_tokens": INPUT_TOKENS, "output_tokens": START_OUTPUT_TOKENS },
        },
    });
    let text_start =
        json!({ "type": "content_block_start", "index": 0, "content_block": { "type": "text", "text": "" } });
    let text_delta =
        |t: &str| json!({ "type": "content_block_delta", "index": 0, "delta": { "type": "text_delta", "text": t } });
    let block_stop = json!({ "type": "content_block_stop", "index": 0 });
    let finish = |stop_reason: &str| {
        [
            json!({
                "type": "message_delta",
                "delta": { "stop_reason": stop_reason, "stop_sequence": null },
                "usage": { "output_tokens": OUTPUT_TOKENS },
            }),
            json!({ "type": "message_stop" }),
        ]
    };

    let mut events: Vec<(Duration, Value)> = vec![(Duration::ZERO, start)];
    let mut tail = Tail::End;
    match reply {
        Reply::Error { status, error_type, message } => return error_response(status, &error_type, &message),
        Reply::Text(text) => {
            events.extend([text_start, text_delta(&text), block_stop].map(|e| (Duration::ZERO, e)));
            events.extend(finish("end_turn").map(|e| (Duration::ZERO, e)));
        }
        Reply::ToolUse { name, input } => {
            events.push((
                Duration::ZERO,
                json!({
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": { "type": "tool_use", "id": tool_use_id(n), "name": name, "input": {} },
                }),
            ));
            events.push((
                Duration::ZERO,
                json!({
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": { "type": "input_json_delta", "partial_json": input.to_string() },
                }),
            ));
            events.push((Duration::ZERO, block_stop));
            events.extend(finish("tool_use").map(|e| (Duration::ZERO, e)));
        }
        Reply::Stall { text } => {
            if let Some(text) = text {
                events.push((Duration::ZERO, text_start));
                events.push((Duration::ZERO, text_delta(&text)));
            }
            tail = Tail::StallUntilDropped;
        }
        Reply::Slow { text, chunk_delay } => {
            events.push((Duration::ZERO, text_start));
            events.extend(pieces(&text).iter().map(|p| (chunk_delay, text_delta(p))));
            events.push((Duration::ZERO, block_stop));
            events.extend(finish("end_turn").map(|e| (Duration::ZERO, e)));
        }
    }

    let state = (VecDeque::from(events), Some(tail), shutdown, true);
    let body = futures_util::stream::unfold(state, |(mut events, mut tail, mut shutdown, first)| async move {
        if let Some((delay, event)) = events.pop_front() {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            } else if !first {
                // Pending once, so that hyper writes out what it has: one event per flush.
                tokio::task::yield_now().await;
            }
            return Some((Ok(sse(&event)), (events, tail, shutdown, false)));
        }
        match tail.take() {
            Some(Tail::StallUntilDropped) => {
                // Cut by `cut_stalled`, or when the stand-in is dropped.
                let _ = shutdown.changed().await;
                Some((Err(io::Error::other("stand-in model dropped")), (events, None, shutdown, false)))
            }
            Some(Tail::End) | None => None,
        }
    });
    let mut response = Response::new(Body::from_stream(body));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(id) = HeaderValue::from_str(&format!("req_standin_{n}")) {
        headers.insert("request-id", id);
    }
    response
}
