//! Metering and limits of the model gateway.
//!
//! Before the gateway forwards a request of an agent, [`Meter::admit`] holds it to the
//! agent's limits (its own `model_limits`, else `[model]`'s): requests admitted in any 60 s
//! window (`requests_per_minute`), requests in flight (`max_concurrent_requests`), and
//! output tokens recorded since 00:00 UTC (`max_output_tokens_per_day`). A request past a
//! limit gets a [`Refusal`]: 429 in the Anthropic error format with `retry-after`.
//!
//! An admitted request's response body goes through [`Admission::meter_body`], which passes
//! every chunk on as it comes and reads the usage on the way ([`UsageParser`]: the
//! `message_start` and `message_delta` events of a stream, or the top-level `usage` of a
//! JSON body), keeping only the bytes of the current event (at most
//! [`MAX_EVENT_BYTES`]). When the body ends or is dropped, the request is recorded: handed
//! to the meter's writer task, which stores it with the agent's sums through
//! [`AgentManager::record_model_requests`] (batched, off the response path).
//!
//! The meter reads the body as it is on the wire: the gateway must hand it an
//! identity-encoded body (no `content-encoding`), or the usage reads as zero. At shutdown,
//! [`Meter::flush`] waits until the records handed over so far are stored: call it after the
//! gateway stopped serving and before the store is closed.

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use agent_manager::{Agent, AgentManager, Clock, ModelRequest};
use axum::body::Bytes;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use backend_core::ExecutionBackend;
use futures_util::Stream;
use serde::Deserialize;
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

/// The most bytes of one SSE event (or one top-level JSON value) the parser keeps; a
/// larger one is skipped (usage events are a few hundred bytes).
pub const MAX_EVENT_BYTES: usize = 64 * 1024;

/// The window of `requests_per_minute`.
const WINDOW: Duration = Duration::from_secs(60);

/// The most requests the writer stores in one transaction.
const WRITE_BATCH: usize = 256;

/// The gateway's meter: one per daemon, shared by every request (cheap to clone).
#[derive(Clone)]
pub struct Meter {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Meter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meter").finish_non_exhaustive()
    }
}

struct Inner {
    manager: Arc<AgentManager<dyn ExecutionBackend>>,
    clock: Arc<dyn Clock>,
    limiters: Mutex<Limiters>,
    writes: mpsc::UnboundedSender<Write>,
}

/// The limit state of the agents that made requests lately.
struct Limiters {
    agents: HashMap<String, AgentLimiter>,
    /// When agents with nothing in flight and nothing in the window were last forgotten.
    last_sweep: OffsetDateTime,
}

#[derive(Debug, Default)]
struct AgentLimiter {
    /// When each request of the last 60 s was admitted, oldest first.
    admitted: VecDeque<OffsetDateTime>,
    in_flight: u32,
}

enum Write {
    Record(ModelRequest),
    Flush(oneshot::Sender<()>),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whole seconds until `later`, at least 1 (for `retry-after`).
fn whole_seconds(from: OffsetDateTime, later: OffsetDateTime) -> Duration {
    let nanos = (later - from).whole_nanoseconds().max(0);
    let secs = (nanos + 999_999_999) / 1_000_000_000;
    Duration::from_secs(u64::try_from(secs).unwrap_or(u64::MAX).max(1))
}

impl Meter {
    /// A meter recording through `manager`, on the manager's clock. Starts its writer task:
    /// call it within a Tokio runtime.
    pub fn new(manager: Arc<AgentManager<dyn ExecutionBackend>>) -> Self {
        let clock = manager.clock();
        let (writes, rx) = mpsc::unbounded_channel();
        tokio::spawn(writer(manager.clone(), rx));
        let limiters = Limiters { agents: HashMap::new(), last_sweep: clock.now() };
        Self { inner: Arc::new(Inner { manager, clock, limiters: Mutex::new(limiters), writes }) }
    }

    /// Before forwarding one request of `agent`: `Ok` = admitted (it holds its concurrency
    /// slot until the [`Admission`], or the body it meters, is dropped), `Err` = refused
    /// under the agent's limits (and counted on `/metrics`).
    pub fn admit(&self, agent: &Agent) -> Result<Admission, Refusal> {
        let limits = self.inner.manager.model_limits(agent);
        let now = self.inner.clock.now().to_offset(time::UtcOffset::UTC);
        let refusal = {
            let mut limiters = lock(&self.inner.limiters);
            limiters.sweep(now);
            let state = limiters.agents.entry(agent.id.clone()).or_default();
            while state.admitted.front().is_some_and(|at| *at + WINDOW <= now) {
                state.admitted.pop_front();
            }
            let refusal = self.check(agent, limits, state, now);
            if refusal.is_none() {
                state.admitted.push_back(now);
                state.in_flight += 1;
            }
            refusal
        };
        if let Some(refusal) = refusal {
            self.inner.manager.count_model_refusal();
            info!(
                agent_id = %agent.id,
                agent = %agent.name,
                limit = refusal.limit,
                retry_after_secs = refusal.retry_after.as_secs(),
                "Model request refused: the agent is over a limit."
            );
            return Err(refusal);
        }
        Ok(Admission {
            slot: Slot { inner: self.inner.clone(), agent_id: agent.id.clone() },
            admitted_at: now,
            agent_id: agent.id.clone(),
        })
    }

    /// The first limit the request would break, in the order of the longest wait.
    fn check(
        &self,
        agent: &Agent,
        limits: agent_manager::ModelLimits,
        state: &AgentLimiter,
        now: OffsetDateTime,
    ) -> Option<Refusal> {
        if let Some(max) = limits.max_output_tokens_per_day {
            let used = self.inner.manager.model_output_tokens_today(&agent.id);
            if used >= max {
                let midnight = (now.date().next_day().unwrap_or(now.date())).midnight().assume_utc();
                let retry_after = whole_seconds(now, midnight);
                return Some(Refusal {
                    limit: "max_output_tokens_per_day",
                    message: format!(
                        "max_output_tokens_per_day: agent {} has used {used} output tokens today (UTC), its limit \
                         is {max}; it frees at 00:00 UTC, in {} s",
                        agent.name,
                        retry_after.as_secs()
                    ),
                    retry_after,
                });
            }
        }
        if let Some(rpm) = limits.requests_per_minute {
            let rpm = rpm as usize;
            if state.admitted.len() >= rpm {
                // The next slot frees when the request `rpm` places from the end leaves.
                let frees = state.admitted[state.admitted.len() - rpm] + WINDOW;
                let retry_after = whole_seconds(now, frees);
                return Some(Refusal {
                    limit: "requests_per_minute",
                    message: format!(
                        "requests_per_minute: agent {} started {} model requests in the last 60 s, its limit is \
                         {rpm}; the next one is allowed in {} s",
                        agent.name,
                        state.admitted.len(),
                        retry_after.as_secs()
                    ),
                    retry_after,
                });
            }
        }
        if let Some(max) = limits.max_concurrent_requests {
            if state.in_flight >= max {
                return Some(Refusal {
                    limit: "max_concurrent_requests",
                    message: format!(
                        "max_concurrent_requests: agent {} has {} model requests in flight, its limit is {max}; \
                         retry when one ends",
                        agent.name, state.in_flight
                    ),
                    retry_after: Duration::from_secs(1),
                });
            }
        }
        None
    }

    /// Waits until every request recorded before this call is stored.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.inner.writes.send(Write::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

impl Limiters {
    /// Forgets, at most once a minute, the agents with nothing in flight and nothing in the
    /// window (removed agents among them), so the map holds only agents active lately.
    fn sweep(&mut self, now: OffsetDateTime) {
        if self.last_sweep + WINDOW > now {
            return;
        }
        self.last_sweep = now;
        self.agents.retain(|_, s| s.in_flight > 0 || s.admitted.back().is_some_and(|at| *at + WINDOW > now));
    }
}

/// Stores recorded requests, in batches, until every sender is gone.
async fn writer(manager: Arc<AgentManager<dyn ExecutionBackend>>, mut rx: mpsc::UnboundedReceiver<Write>) {
    let mut batch = Vec::new();
    let mut flushes = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(write) = next.take() {
            match write {
                Write::Record(request) => batch.push(request),
                Write::Flush(done) => flushes.push(done),
            }
            if batch.len() < WRITE_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            if let Err(e) = manager.record_model_requests(&batch).await {
                warn!(requests = batch.len(), error = %e, "Model requests could not be recorded.");
            }
            batch.clear();
        }
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
    }
}

/// A request past one of its agent's limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// When to try again (whole seconds, at least 1).
    pub retry_after: Duration,
    /// Which limit, its value, and when it frees.
    pub message: String,
    /// The limit's key: `requests_per_minute`, `max_concurrent_requests` or
    /// `max_output_tokens_per_day`.
    pub limit: &'static str,
}

impl Refusal {
    /// 429 in the Anthropic error format, with `retry-after` and `x-should-retry: false`
    /// (so that Claude Code reports the error in the turn instead of retrying for minutes).
    pub fn into_response(self) -> Response {
        let body = serde_json::json!({
            "type": "error",
            "error": { "type": "rate_limit_error", "message": self.message },
        });
        let mut response = (StatusCode::TOO_MANY_REQUESTS, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        headers.insert(header::RETRY_AFTER, HeaderValue::from(self.retry_after.as_secs().max(1)));
        headers.insert("x-should-retry", HeaderValue::from_static("false"));
        response
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        Refusal::into_response(self)
    }
}

/// Gives an admitted request's concurrency slot back when dropped.
struct Slot {
    inner: Arc<Inner>,
    agent_id: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(state) = lock(&self.inner.limiters).agents.get_mut(&self.agent_id) {
            state.in_flight = state.in_flight.saturating_sub(1);
        }
    }
}

/// An admitted request: it holds its agent's concurrency slot until it is dropped or its
/// body ends.
pub struct Admission {
    slot: Slot,
    agent_id: String,
    admitted_at: OffsetDateTime,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission").field("agent_id", &self.agent_id).field("admitted_at", &self.admitted_at).finish()
    }
}

impl Admission {
    /// Wraps the upstream response body: passes chunks through as they come, reads the
    /// usage on the way (`sse`: a `text/event-stream` body; else a JSON body), and when the
    /// body ends or is dropped records the request (agent, model, status, latency since
    /// `started`, input and output tokens). `model` is the one the request asked for; the
    /// one the response names wins.
    pub fn meter_body<S, E>(
        self,
        model: Option<String>,
        status: u16,
        started: Instant,
        sse: bool,
        body: S,
    ) -> MeteredBody<S>
    where
        S: Stream<Item = Result<Bytes, E>>,
    {
        let parser = if sse { UsageParser::sse() } else { UsageParser::json() };
        MeteredBody { body: Box::pin(body), parser, pending: Some(Pending { admission: self, model, status, started }) }
    }

    /// Records a request that never reached upstream or failed before a body (no tokens).
    pub fn record_without_body(self, model: Option<String>, status: u16, started: Instant) {
        Pending { admission: self, model, status, started }.record(Usage::default());
    }
}

/// What a request's record waits for: the end of its body.
struct Pending {
    admission: Admission,
    model: Option<String>,
    status: u16,
    started: Instant,
}

impl Pending {
    fn record(self, usage: Usage) {
        let Pending { admission, model, status, started } = self;
        let request = ModelRequest {
            agent_id: admission.agent_id.clone(),
            at: admission.admitted_at,
            model: usage.model.or(model),
            status,
            latency_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            input_tokens: usage.input_tokens,
            output_tokens: usage.output_tokens,
        };
        if admission.slot.inner.writes.send(Write::Record(request)).is_err() {
            warn!(agent_id = %admission.agent_id, "Model request not recorded: the meter's writer has ended.");
        }
        // The slot goes with the admission, now.
    }
}

/// A response body on its way to the agent, metered; see [`Admission::meter_body`].
pub struct MeteredBody<S> {
    body: Pin<Box<S>>,
    parser: UsageParser,
    pending: Option<Pending>,
}

impl<S> std::fmt::Debug for MeteredBody<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeteredBody").field("usage", &self.parser.usage).finish_non_exhaustive()
    }
}

impl<S> MeteredBody<S> {
    fn finish(&mut self) {
        if let Some(pending) = self.pending.take() {
            pending.record(self.parser.usage.clone());
        }
    }
}

impl<S, E> Stream for MeteredBody<S>
where
    S: Stream<Item = Result<Bytes, E>>,
{
    type Item = Result<Bytes, E>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        match this.body.as_mut().poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                this.parser.feed(&chunk);
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(None) => {
                this.finish();
                Poll::Ready(None)
            }
            other => other,
        }
    }
}

impl<S> Drop for MeteredBody<S> {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The usage a response reported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// The model the response names.
    pub model: Option<String>,
}

/// Reads the usage of a Messages API response from its bytes, split anywhere, keeping at
/// most [`MAX_EVENT_BYTES`] of them.
#[derive(Debug)]
pub struct UsageParser {
    scanner: Scanner,
    usage: Usage,
}

#[derive(Debug)]
enum Scanner {
    Sse(SseScanner),
    Json(JsonScanner),
}

impl UsageParser {
    /// For a streamed (`text/event-stream`) body: `message_start` gives the input tokens
    /// (and the output so far), `message_delta` the cumulative output tokens.
    pub fn sse() -> Self {
        Self { scanner: Scanner::Sse(SseScanner::default()), usage: Usage::default() }
    }

    /// For a JSON body: its top-level `usage` and `model`.
    pub fn json() -> Self {
        Self { scanner: Scanner::Json(JsonScanner::default()), usage: Usage::default() }
    }

    /// Reads the next bytes of the body.
    pub fn feed(&mut self, bytes: &[u8]) {
        match &mut self.scanner {
            Scanner::Sse(s) => s.feed(bytes, &mut self.usage),
            Scanner::Json(s) => s.feed(bytes, &mut self.usage),
        }
    }

    /// The usage read so far.
    pub fn usage(&self) -> &Usage {
        &self.usage
    }

    /// How many bytes of the body the parser holds now.
    pub fn held(&self) -> usize {
        match &self.scanner {
            Scanner::Sse(s) => s.line.len() + s.data.len(),
            Scanner::Json(s) => s.capture.as_ref().map_or(0, |(_, b)| b.len()) + s.key.len(),
        }
    }
}

#[derive(Debug, Deserialize)]
struct EventJson {
    #[serde(rename = "type")]
    kind: String,
    message: Option<MessageJson>,
    usage: Option<UsageJson>,
}

#[derive(Debug, Deserialize)]
struct MessageJson {
    model: Option<String>,
    usage: Option<UsageJson>,
}

#[derive(Debug, Deserialize)]
struct UsageJson {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
}

impl UsageJson {
    fn apply(&self, usage: &mut Usage) {
        if let Some(n) = self.input_tokens {
            usage.input_tokens = n;
        }
        if let Some(n) = self.output_tokens {
            usage.output_tokens = n;
        }
    }
}

/// Server-sent events, line by line: only the current line and event's data are kept.
#[derive(Debug, Default)]
struct SseScanner {
    /// The current line's bytes so far (not kept while the event is skipped).
    line: Vec<u8>,
    /// How many bytes the current line has had, kept or not.
    line_len: usize,
    /// Its last byte.
    last: u8,
    /// The current event's data lines, joined by `\n`.
    data: Vec<u8>,
    /// The current event is of no interest, or larger than [`MAX_EVENT_BYTES`].
    skip: bool,
}

impl SseScanner {
    fn feed(&mut self, mut bytes: &[u8], usage: &mut Usage) {
        while !bytes.is_empty() {
            match bytes.iter().position(|b| *b == b'\n') {
                Some(end) => {
                    self.push(&bytes[..end]);
                    self.end_line(usage);
                    bytes = &bytes[end + 1..];
                }
                None => {
                    self.push(bytes);
                    break;
                }
            }
        }
    }

    fn push(&mut self, part: &[u8]) {
        let Some(last) = part.last() else {
            return;
        };
        self.line_len += part.len();
        self.last = *last;
        if self.skip {
            return;
        }
        if self.line.len() + self.data.len() + part.len() > MAX_EVENT_BYTES {
            self.skip_event();
        } else {
            self.line.extend_from_slice(part);
        }
    }

    fn skip_event(&mut self) {
        self.skip = true;
        self.line = Vec::new();
        self.data = Vec::new();
    }

    fn end_line(&mut self, usage: &mut Usage) {
        let blank = self.line_len == 0 || (self.line_len == 1 && self.last == b'\r');
        if blank {
            if !self.skip && !self.data.is_empty() {
                if let Ok(event) = serde_json::from_slice::<EventJson>(&self.data) {
                    match event.kind.as_str() {
                        "message_start" => {
                            if let Some(message) = event.message {
                                if let Some(u) = message.usage {
                                    u.apply(usage);
                                }
                                if message.model.is_some() {
                                    usage.model = message.model;
                                }
                            }
                        }
                        "message_delta" => {
                            if let Some(u) = event.usage {
                                u.apply(usage);
                            }
                        }
                        _ => {}
                    }
                }
            }
            self.data.clear();
            self.skip = false;
        } else if !self.skip {
            let line = self.line.strip_suffix(b"\r").unwrap_or(&self.line);
            if let Some(value) = line.strip_prefix(b"data:") {
                let value = value.strip_prefix(b" ").unwrap_or(value);
                if !self.data.is_empty() {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
            } else if let Some(name) = line.strip_prefix(b"event:") {
                let name = name.trim_ascii();
                if name != b"message_start" && name != b"message_delta" {
                    self.skip_event();
                }
            }
        }
        self.line.clear();
        self.line_len = 0;
        self.last = 0;
    }
}

/// What a top-level key of a JSON body is captured for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Usage,
    Model,
}

/// A JSON object read byte by byte: only the values of its top-level `usage` and `model`
/// keys are kept, each up to [`MAX_EVENT_BYTES`].
#[derive(Debug, Default)]
struct JsonScanner {
    depth: u32,
    in_string: bool,
    escape: bool,
    /// A top-level key is being read into `key`.
    reading_key: bool,
    /// The next string at the top level is a key.
    expect_key: bool,
    /// The last top-level key (up to 16 bytes).
    key: Vec<u8>,
    capture: Option<(Field, Vec<u8>)>,
}

impl JsonScanner {
    fn keep(&mut self, b: u8) {
        if let Some((_, buf)) = &mut self.capture {
            if buf.len() < MAX_EVENT_BYTES {
                buf.push(b);
            } else {
                self.capture = None;
            }
        }
    }

    fn end_value(&mut self, usage: &mut Usage) {
        match self.capture.take() {
            Some((Field::Usage, buf)) => {
                if let Ok(u) = serde_json::from_slice::<UsageJson>(&buf) {
                    u.apply(usage);
                }
            }
            Some((Field::Model, buf)) => {
                if let Ok(model) = serde_json::from_slice::<String>(&buf) {
                    usage.model = Some(model);
                }
            }
            None => {}
        }
    }

    fn feed(&mut self, bytes: &[u8], usage: &mut Usage) {
        for &b in bytes {
            if self.in_string {
                self.keep(b);
                if self.escape {
                    self.escape = false;
                } else if b == b'\\' {
                    self.escape = true;
                } else if b == b'"' {
                    self.in_string = false;
                    self.reading_key = false;
                    continue;
                }
                if self.reading_key && self.key.len() < 16 {
                    self.key.push(b);
                }
                continue;
            }
            match b {
                b'"' => {
                    self.in_string = true;
                    if self.depth == 1 && self.expect_key {
                        self.reading_key = true;
                        self.key.clear();
                    }
                    self.keep(b);
                }
                b'{' | b'[' => {
                    self.keep(b);
                    self.depth += 1;
                    if self.depth == 1 {
                        self.expect_key = b == b'{';
                    }
                }
                b'}' | b']' => {
                    if self.depth == 1 {
                        self.end_value(usage);
                    } else {
                        self.keep(b);
                    }
                    self.depth = self.depth.saturating_sub(1);
                }
                b',' if self.depth == 1 => {
                    self.end_value(usage);
                    self.expect_key = true;
                }
                b':' if self.depth == 1 => {
                    self.expect_key = false;
                    self.capture = match self.key.as_slice() {
                        b"usage" => Some((Field::Usage, Vec::new())),
                        b"model" => Some((Field::Model, Vec::new())),
                        _ => None,
                    };
                }
                _ => self.keep(b),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use agent_manager::{AgentKind, ManagerConfig, ManualClock, ModelLimits, NewAgent, Store};
    use backend_core::OwnershipLabels;
    use backend_mock::{MockBackend, MockEngine, PLAIN_IMAGE};
    use futures_util::StreamExt;

    use super::*;

    /// A streamed reply as the stand-in model (`tests/support/model.rs`) sends it: usage
    /// input 10 / output 1 in `message_start`, output 5 in `message_delta`.
    fn stand_in_stream() -> String {
        let events = [
            r#"{"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant","model":"claude-stand-in","content":[],"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":10,"output_tokens":1}}}"#,
            r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"ok"}}"#,
            r#"{"type":"content_block_stop","index":0}"#,
            r#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":5}}"#,
            r#"{"type":"message_stop"}"#,
        ];
        events
            .iter()
            .map(|e| {
                let name = serde_json::from_str::<serde_json::Value>(e).expect("JSON")["type"]
                    .as_str()
                    .expect("type")
                    .to_owned();
                format!("event: {name}\ndata: {e}\n\n")
            })
            .collect()
    }

    fn parse(mut parser: UsageParser, chunks: &[&[u8]]) -> Usage {
        for chunk in chunks {
            parser.feed(chunk);
        }
        parser.usage().clone()
    }

    fn stand_in_usage() -> Usage {
        Usage { input_tokens: 10, output_tokens: 5, model: Some("claude-stand-in".into()) }
    }

    #[test]
    fn a_stream_split_anywhere_reads_the_stand_ins_usage() {
        let body = stand_in_stream();
        let bytes = body.as_bytes();
        assert_eq!(parse(UsageParser::sse(), &[bytes]), stand_in_usage());
        // Every split into two chunks, events split across them included.
        for at in 0..=bytes.len() {
            let (a, b) = bytes.split_at(at);
            assert_eq!(parse(UsageParser::sse(), &[a, b]), stand_in_usage(), "split at {at}");
        }
        // One byte at a time.
        let bytes: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(parse(UsageParser::sse(), &bytes), stand_in_usage());
        // CRLF line ends, and no `event:` lines.
        let crlf = body.replace("\n", "\r\n");
        assert_eq!(parse(UsageParser::sse(), &[crlf.as_bytes()]), stand_in_usage());
        let bare: String = body.lines().filter(|l| !l.starts_with("event:")).map(|l| format!("{l}\n")).collect();
        assert_eq!(parse(UsageParser::sse(), &[bare.as_bytes()]), stand_in_usage());
    }

    #[test]
    fn an_event_larger_than_the_cap_is_skipped_and_the_parser_holds_at_most_the_cap() {
        let huge = format!(
            "data: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"{}\"}}}}\n\n",
            "x".repeat(3 * MAX_EVENT_BYTES)
        );
        let named_huge = format!("event: content_block_delta\n{huge}");
        let oversized_usage = format!(
            "event: message_delta\ndata: {{\"type\":\"message_delta\",\"pad\":\"{}\",\"usage\":{{\"output_tokens\":999}}}}\n\n",
            "y".repeat(MAX_EVENT_BYTES)
        );
        let body = stand_in_stream();
        let (start, rest) = body.split_at(body.find("event: content_block_start").expect("a block"));
        let full = format!("{start}{huge}{named_huge}{oversized_usage}{rest}");
        let mut parser = UsageParser::sse();
        let mut most = 0;
        for chunk in full.as_bytes().chunks(1000) {
            parser.feed(chunk);
            most = most.max(parser.held());
        }
        assert_eq!(parser.usage(), &stand_in_usage(), "the oversized events were skipped, the rest read");
        assert!(most <= MAX_EVENT_BYTES, "the parser held {most} bytes");
    }

    #[test]
    fn a_json_body_split_anywhere_reads_its_top_level_usage_only() {
        let body = r#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-stand-in","content":[{"type":"text","text":"a \"usage\": {\"output_tokens\": 7} and } ] braces"},{"type":"tool_use","input":{"usage":{"input_tokens":99},"model":"inner"}}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":10,"output_tokens":5}}"#;
        let bytes = body.as_bytes();
        for at in 0..=bytes.len() {
            let (a, b) = bytes.split_at(at);
            assert_eq!(parse(UsageParser::json(), &[a, b]), stand_in_usage(), "split at {at}");
        }
        let first = r#"{ "usage" : { "input_tokens" : 3, "output_tokens" : 4 } , "model" : "m" , "content" : [] }"#;
        let usage = parse(UsageParser::json(), &[first.as_bytes()]);
        assert_eq!(usage, Usage { input_tokens: 3, output_tokens: 4, model: Some("m".into()) });
        // An error body has no usage.
        let error = r#"{"type":"error","error":{"type":"overloaded_error","message":"usage"}}"#;
        assert_eq!(parse(UsageParser::json(), &[error.as_bytes()]), Usage::default());
    }

    #[test]
    fn the_model_section_gives_every_agent_its_default_limits() {
        let mut config = crate::config::Config::default();
        assert_eq!(config.manager_config().model_limits, ModelLimits::default(), "no limits by default");
        config.model.requests_per_minute = Some(2);
        config.model.max_concurrent_requests = Some(3);
        config.model.max_output_tokens_per_day = Some(4);
        assert_eq!(
            config.manager_config().model_limits,
            ModelLimits {
                requests_per_minute: Some(2),
                max_concurrent_requests: Some(3),
                max_output_tokens_per_day: Some(4)
            }
        );
    }

    struct Fixture {
        clock: ManualClock,
        manager: Arc<AgentManager<dyn ExecutionBackend>>,
        meter: Meter,
    }

    async fn fixture(defaults: ModelLimits) -> Fixture {
        let store = Store::in_memory().await.expect("store");
        let owner = OwnershipLabels::new("agentd", "meter-test").expect("labels");
        let backend: Arc<dyn ExecutionBackend> = Arc::new(MockBackend::new(MockEngine::new(), owner));
        let mut config = ManagerConfig::default();
        config.defaults.kind = AgentKind::Image;
        config.defaults.image = PLAIN_IMAGE.into();
        config.model_limits = defaults;
        let clock = ManualClock::new();
        let manager = Arc::new(AgentManager::new(backend, store, config).with_clock(Arc::new(clock.clone())));
        let meter = Meter::new(manager.clone());
        Fixture { clock, manager, meter }
    }

    impl Fixture {
        async fn spawn(&self, name: &str, limits: Option<ModelLimits>) -> Agent {
            let new = NewAgent { name: name.into(), model_limits: limits, ..NewAgent::default() };
            self.manager.spawn(new).await.expect("spawn").agent
        }
    }

    #[tokio::test]
    async fn requests_per_minute_is_a_sliding_window_of_admitted_requests() {
        let fx = fixture(ModelLimits { requests_per_minute: Some(5), ..ModelLimits::default() }).await;
        let own = fx.spawn("own", Some(ModelLimits { requests_per_minute: Some(2), ..ModelLimits::default() })).await;
        let first = fx.meter.admit(&own).expect("first");
        drop(first);
        fx.clock.advance(Duration::from_secs(20));
        let _second = fx.meter.admit(&own).expect("second");
        let refused = fx.meter.admit(&own).expect_err("the third within a minute");
        assert_eq!(refused.limit, "requests_per_minute");
        // The first leaves the window 60 s after it was admitted: 40 s from now.
        assert_eq!(refused.retry_after, Duration::from_secs(40));
        assert!(refused.message.contains("its limit is 2") && refused.message.contains("40 s"), "{}", refused.message);
        fx.clock.advance(Duration::from_millis(39_500));
        assert_eq!(fx.meter.admit(&own).expect_err("still within").retry_after, Duration::from_secs(1));
        fx.clock.advance(Duration::from_millis(500));
        fx.meter.admit(&own).expect("the first left the window");
        // Refusals are not admitted requests: they take no place in the window.
        assert_eq!(fx.meter.admit(&own).expect_err("full again").retry_after, Duration::from_secs(20));

        // An agent without limits of its own gets [model]'s.
        let other = fx.spawn("other", None).await;
        for _ in 0..5 {
            fx.meter.admit(&other).expect("within the default");
        }
        assert!(fx.meter.admit(&other).expect_err("sixth").message.contains("its limit is 5"));
        assert_eq!(fx.manager.metrics().snapshot().model_refusals, 4);
    }

    #[tokio::test]
    async fn concurrency_counts_the_requests_in_flight_until_their_body_ends() {
        let fx = fixture(ModelLimits { max_concurrent_requests: Some(1), ..ModelLimits::default() }).await;
        let agent = fx.spawn("busy", None).await;
        let held = fx.meter.admit(&agent).expect("first");
        let refused = fx.meter.admit(&agent).expect_err("second while the first is in flight");
        assert_eq!((refused.limit, refused.retry_after), ("max_concurrent_requests", Duration::from_secs(1)));
        let chunks: Vec<Result<Bytes, std::io::Error>> = vec![Ok(Bytes::from(stand_in_stream()))];
        let mut body = held.meter_body(None, 200, Instant::now(), true, futures_util::stream::iter(chunks));
        fx.meter.admit(&agent).expect_err("still in flight while its body is read");
        while body.next().await.is_some() {}
        fx.meter.admit(&agent).expect("the body ended: the slot is free");
    }

    #[tokio::test]
    async fn output_tokens_per_day_count_from_midnight_utc() {
        let fx = fixture(ModelLimits::default()).await;
        let limits = ModelLimits { max_output_tokens_per_day: Some(10), ..ModelLimits::default() };
        let agent = fx.spawn("thrifty", Some(limits)).await;
        for _ in 0..2 {
            let chunks: Vec<Result<Bytes, std::io::Error>> = vec![Ok(Bytes::from(stand_in_stream()))];
            let admitted = fx.meter.admit(&agent).expect("within the day's tokens");
            let body = admitted.meter_body(None, 200, Instant::now(), true, futures_util::stream::iter(chunks));
            body.collect::<Vec<_>>().await;
        }
        fx.meter.flush().await;
        let refused = fx.meter.admit(&agent).expect_err("10 output tokens used");
        assert_eq!(refused.limit, "max_output_tokens_per_day");
        let now = fx.clock.now();
        let midnight = now.date().next_day().expect("tomorrow").midnight().assume_utc();
        assert_eq!(refused.retry_after, whole_seconds(now, midnight));
        assert!(refused.message.contains("used 10 output tokens today"), "{}", refused.message);
        fx.clock.advance(refused.retry_after);
        fx.meter.admit(&agent).expect("a new UTC day");
    }

    #[tokio::test]
    async fn a_metered_body_passes_chunks_through_and_records_the_request_when_it_ends_or_is_dropped() {
        let fx = fixture(ModelLimits::default()).await;
        let agent = fx.spawn("metered", None).await;
        let text = stand_in_stream();
        let chunks: Vec<Result<Bytes, std::io::Error>> =
            text.as_bytes().chunks(7).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        let admitted = fx.meter.admit(&agent).expect("admitted");
        let body = admitted.meter_body(
            Some("asked-for".into()),
            200,
            Instant::now(),
            true,
            futures_util::stream::iter(chunks),
        );
        // As the gateway serves it: an axum body (Send, 'static).
        let out = axum::body::to_bytes(axum::body::Body::from_stream(body), 1 << 20).await.expect("the body");
        assert_eq!(out, text.as_bytes(), "the body passes through unchanged");
        fx.meter.flush().await;
        let usage = fx.manager.model_usage(&agent.id);
        assert_eq!((usage.requests, usage.input_tokens, usage.output_tokens), (1, 10, 5));

        // Dropped after message_start: recorded with what was read.
        let (start, _) = text.split_at(text.find("event: content_block_start").expect("block"));
        let chunks: Vec<Result<Bytes, std::io::Error>> = vec![Ok(Bytes::from(start.to_owned()))];
        let admitted = fx.meter.admit(&agent).expect("admitted");
        let mut body = admitted.meter_body(
            None,
            200,
            Instant::now(),
            true,
            futures_util::stream::iter(chunks).chain(futures_util::stream::pending()),
        );
        body.next().await.expect("the first chunk").expect("ok");
        drop(body);
        fx.meter.admit(&agent).expect("the dropped body gave its slot back").record_without_body(
            None,
            502,
            Instant::now(),
        );
        fx.meter.flush().await;
        let usage = fx.manager.model_usage(&agent.id);
        assert_eq!((usage.requests, usage.input_tokens, usage.output_tokens), (3, 20, 6));
        let records = fx.manager.model_requests("metered", 10).await.expect("records");
        let rows: Vec<(Option<&str>, u16, u64, u64)> =
            records.iter().map(|r| (r.model.as_deref(), r.status, r.input_tokens, r.output_tokens)).collect();
        assert_eq!(
            rows,
            [(Some("claude-stand-in"), 200, 10, 5), (Some("claude-stand-in"), 200, 10, 1), (None, 502, 0, 0)]
        );
        let totals = fx.manager.metrics().snapshot();
        assert_eq!((totals.model_requests, totals.model_input_tokens, totals.model_output_tokens), (3, 20, 6));
    }

    /// As the gateway uses it: an upstream response read with reqwest, metered, and served
    /// as an axum body.
    #[tokio::test]
    async fn an_upstream_reqwest_body_is_metered_on_its_way_through() {
        let fx = fixture(ModelLimits::default()).await;
        let agent = fx.spawn("proxied", None).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let upstream = axum::Router::new().fallback(|| async {
            let text = stand_in_stream();
            let (a, b) = text.split_at(text.len() / 2);
            let chunks: Vec<Result<Bytes, std::io::Error>> =
                vec![Ok(Bytes::from(a.to_owned())), Ok(Bytes::from(b.to_owned()))];
            (
                [(header::CONTENT_TYPE, "text/event-stream")],
                axum::body::Body::from_stream(futures_util::stream::iter(chunks)),
            )
        });
        let server = tokio::spawn(async move { axum::serve(listener, upstream).await });
        let started = Instant::now();
        let admitted = fx.meter.admit(&agent).expect("admitted");
        let response = reqwest::get(format!("http://{addr}/v1/messages")).await.expect("upstream answers");
        let status = response.status().as_u16();
        let body = admitted.meter_body(None, status, started, true, response.bytes_stream());
        let served = axum::body::to_bytes(axum::body::Body::from_stream(body), 1 << 20).await.expect("served");
        assert_eq!(served, stand_in_stream().as_bytes());
        fx.meter.flush().await;
        let usage = fx.manager.model_usage(&agent.id);
        assert_eq!((usage.requests, usage.input_tokens, usage.output_tokens), (1, 10, 5));
        server.abort();
    }

    #[tokio::test]
    async fn a_refusal_is_a_429_in_the_anthropic_error_format_that_claude_code_does_not_retry() {
        let refusal = Refusal {
            retry_after: Duration::from_secs(40),
            message: "requests_per_minute: ...".into(),
            limit: "requests_per_minute",
        };
        let response = refusal.into_response();
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()["retry-after"], "40");
        assert_eq!(response.headers()["x-should-retry"], "false");
        assert_eq!(response.headers()["content-type"], "application/json");
        let body = axum::body::to_bytes(response.into_body(), 1 << 16).await.expect("body");
        let body: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(
            body,
            serde_json::json!({"type": "error", "error": {"type": "rate_limit_error", "message": "requests_per_minute: ..."}})
        );
    }
}
