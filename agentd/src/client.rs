//! The command-line client: talks to a running daemon over the HTTP API.

use std::time::Duration;

use agent_manager::{AgentStatus, Approval, ConversationEntry, Delivery, Direction, ExitView, Run};
use anyhow::{anyhow, bail, Context, Result};
use futures_util::StreamExt;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use time::OffsetDateTime;

use crate::api::{AgentJson, EventJson};

/// A connection to the daemon's API.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    /// Said with a 401: why the configured token may be missing.
    auth_hint: Option<String>,
    http: reqwest::Client,
}

impl Client {
    /// A client for the API at `base` (`http://127.0.0.1:7006`).
    pub fn new(base: &str, token: Option<String>) -> Result<Self> {
        let base = if base.contains("://") { base.to_owned() } else { format!("http://{base}") };
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .context("building the HTTP client")?;
        Ok(Self { base: base.trim_end_matches('/').to_owned(), token, auth_hint: None, http })
    }

    /// The client, with a reason the configured token may be missing (a configuration
    /// that could not be loaded), told with every 401.
    pub fn with_auth_hint(mut self, hint: Option<String>) -> Self {
        self.auth_hint = hint;
        self
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        request
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let response = request.send().await.map_err(|e| {
            if e.is_connect() || e.is_timeout() {
                anyhow!(
                    "agentd is not running at {} ({e}).\nStart it with `agentd serve` (or `cargo run --release -p agentd -- serve`), \
                     or point --url / AGENTD_URL at a running daemon",
                    self.base
                )
            } else {
                anyhow!("request to {} failed: {e}", self.base)
            }
        })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or(body);
        if status == StatusCode::UNAUTHORIZED {
            match &self.auth_hint {
                Some(hint) => bail!("{message} (set --token or AGENTD_TOKEN; {hint})"),
                None => bail!("{message} (set --token or AGENTD_TOKEN)"),
            }
        }
        bail!("{message} (HTTP {})", status.as_u16())
    }

    /// GETs JSON, read as `R` (one of the API's response types, `api::AgentJson`, …).
    pub async fn get<R: DeserializeOwned>(&self, path: &str) -> Result<R> {
        let response = self.send(self.request(Method::GET, path)).await?;
        response.json().await.with_context(|| format!("reading the answer to GET {path}"))
    }

    /// GETs JSON with a query (one of the API's query types, `api::ListQuery`, …), read
    /// as `R` (one of its response types).
    pub async fn get_query<Q: Serialize + ?Sized, R: DeserializeOwned>(&self, path: &str, query: &Q) -> Result<R> {
        let response = self.send(self.request(Method::GET, path).query(query)).await?;
        response.json().await.with_context(|| format!("reading the answer to GET {path}"))
    }

    /// GETs every page of a paged list (`GET /v1/agents`, `GET /v1/events`) with a query,
    /// following the daemon's `X-Next-Cursor` (sent back as `cursor_param`) until the last
    /// page, and returns all the items in order.
    pub async fn get_all_pages<Q: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        query: &Q,
        cursor_param: &str,
    ) -> Result<Vec<T>> {
        let mut all = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut request = self.request(Method::GET, path).query(query);
            if let Some(cursor) = &cursor {
                request = request.query(&[(cursor_param, cursor)]);
            }
            let response = self.send(request).await?;
            let next = response.headers().get(crate::api::NEXT_CURSOR).and_then(|v| v.to_str().ok()).map(str::to_owned);
            let page: Vec<T> = response.json().await.with_context(|| format!("reading the answer to GET {path}"))?;
            all.extend(page);
            match next {
                // A daemon that names the same page again would loop forever: stop.
                Some(next) if cursor.as_ref() != Some(&next) => cursor = Some(next),
                _ => return Ok(all),
            }
        }
    }

    /// Sends `method` without a body and reads the answer as `R` (`()` for no content).
    pub async fn call<R: DeserializeOwned>(&self, method: Method, path: &str) -> Result<R> {
        self.call_with::<(), R>(method, path, None).await
    }

    /// Sends `method` with an optional JSON body (one of the API's request types) and
    /// reads the answer as `R` (one of its response types; `()` for no content).
    pub async fn call_with<B: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<R> {
        let mut request = self.request(method.clone(), path);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = self.send(request).await?;
        if response.status() == StatusCode::NO_CONTENT {
            return serde_json::from_value(Value::Null).with_context(|| format!("{method} {path} answered no content"));
        }
        response.json().await.with_context(|| format!("reading the answer to {method} {path}"))
    }

    /// GETs text, with a query.
    pub async fn get_text<Q: Serialize + ?Sized>(&self, path: &str, query: &Q) -> Result<String> {
        Ok(self.send(self.request(Method::GET, path).query(query)).await?.text().await?)
    }

    /// Opens a server-sent event stream, with a query (the subscription starts when this
    /// returns).
    pub async fn open_stream<Q: Serialize + ?Sized>(&self, path: &str, query: &Q) -> Result<reqwest::Response> {
        self.send(self.request(Method::GET, path).query(query)).await
    }

    /// Reads lifecycle events from an open stream, calling `each` with every event.
    pub async fn follow_events(&self, response: reqwest::Response, mut each: impl FnMut(EventJson)) -> Result<()> {
        follow_sse(response, |event, data| {
            if event == "lifecycle" {
                if let Ok(value) = serde_json::from_str(data) {
                    each(value);
                }
            }
            true
        })
        .await
    }

    /// Reads conversation entries from an open stream until `each` returns false or the
    /// stream ends; returns whether `each` ended it.
    pub async fn follow_conversation(
        &self,
        response: reqwest::Response,
        mut each: impl FnMut(ConversationEntry) -> bool,
    ) -> Result<bool> {
        let mut ended = false;
        follow_sse(response, |event, data| {
            if event == "error" {
                return true;
            }
            match serde_json::from_str(data) {
                Ok(value) => {
                    ended = !each(value);
                    !ended
                }
                Err(_) => true,
            }
        })
        .await?;
        Ok(ended)
    }
}

/// Reads server-sent events, calling `each(event name, data)` until it returns false or
/// the stream ends. Frames are split on blank lines; multi-line data is joined.
async fn follow_sse(response: reqwest::Response, mut each: impl FnMut(&str, &str) -> bool) -> Result<()> {
    let mut stream = response.bytes_stream();
    let mut frames = FrameSplitter::default();
    while let Some(chunk) = stream.next().await {
        frames.push(&chunk.context("reading the event stream")?);
        while let Some(frame) = frames.next_frame() {
            let frame = String::from_utf8_lossy(&frame);
            let data: Vec<&str> = frame
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|l| l.strip_prefix(' ').unwrap_or(l))
                .collect();
            let event = frame.lines().find_map(|l| l.strip_prefix("event:")).map_or("message", str::trim);
            if !data.is_empty() && !each(event, &data.join("\n")) {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Splits a byte stream into server-sent event frames (ended by a blank line). Each byte
/// is scanned once, however many chunks a long frame arrives in.
#[derive(Debug, Default)]
struct FrameSplitter {
    buffer: Vec<u8>,
    /// How far the buffer was searched for the end of a frame.
    scanned: usize,
}

impl FrameSplitter {
    fn push(&mut self, chunk: &[u8]) {
        self.buffer.extend_from_slice(chunk);
    }

    /// The next complete frame, with its blank line.
    fn next_frame(&mut self) -> Option<Vec<u8>> {
        let from = self.scanned.saturating_sub(1);
        match self.buffer[from..].windows(2).position(|w| w == b"\n\n") {
            Some(at) => {
                let end = from + at + 2;
                self.scanned = 0;
                Some(self.buffer.drain(..end).collect())
            }
            None => {
                self.scanned = self.buffer.len();
                None
            }
        }
    }
}

/// Whether a `result` entry ends the turn of the user message with `uuid`. Claude Code
/// names the messages a result answers (`user_message_uuids`); a result that names none
/// is taken as the next turn's end.
pub fn ends_turn(result: &ConversationEntry, uuid: Option<&str>) -> bool {
    let Some(uuid) = uuid else {
        return true;
    };
    let data = &result.data;
    match (data.get("user_message_uuids"), data.get("user_message_uuid")) {
        (Some(Value::Array(ids)), _) if !ids.is_empty() => ids.iter().any(|id| id == uuid),
        (_, Some(Value::String(id))) => id == uuid,
        _ => true,
    }
}

impl Client {
    /// Returns once the agent no longer runs (polling every 2 s), with its status; a
    /// turn being followed will then never end.
    pub async fn until_agent_stops(&self, name: &str) -> String {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            match self.get::<AgentJson>(&format!("/v1/agents/{}", encode(name))).await {
                Ok(agent) if agent.status == AgentStatus::Running => {}
                Ok(agent) => return agent.status.to_string(),
                Err(e) if e.to_string().contains("404") || e.to_string().contains("no agent") => {
                    return "removed".into()
                }
                Err(_) => {}
            }
        }
    }
}

/// The approvals table: ID, AGENT, TOOL, INPUT (cut short), AGE, DECISION.
pub fn approvals_table(approvals: &[Approval]) -> String {
    let mut rows =
        vec![["ID".to_owned(), "AGENT".into(), "TOOL".into(), "INPUT".into(), "AGE".into(), "DECISION".into()]];
    for a in approvals {
        let input =
            a.input.get("command").and_then(Value::as_str).map(str::to_owned).unwrap_or_else(|| a.input.to_string());
        let input: String = input.replace('\n', " ").chars().take(48).collect();
        let decision = match a.decision {
            Some(d) => format!("{} ({})", d.as_str(), a.decided_by.map_or("-", |by| by.as_str())),
            None => "pending".to_owned(),
        };
        rows.push([
            a.id.clone(),
            a.agent.clone().unwrap_or_else(|| a.agent_id.clone()),
            a.tool.clone(),
            input,
            age(a.requested_at),
            decision,
        ]);
    }
    let widths: Vec<usize> = (0..6).map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// One conversation entry as a line: `SEQ TIME → KIND TEXT` (→ to the agent, ← from it).
pub fn conversation_line(e: &ConversationEntry) -> String {
    let arrow = if e.direction == Direction::ToAgent { "→" } else { "←" };
    let queued = if e.delivery == Some(Delivery::Queued) { " (queued)" } else { "" };
    let body: String = e.text.chars().take(400).collect::<String>().replace('\n', " ");
    format!("{:>6} {} {arrow} {:<16} {body}{queued}", e.seq, rfc3339(e.at), e.kind)
}

/// A time as the API writes it.
fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| at.to_string())
}

/// A short age: `45s`, `12m`, `3h`, `2d`.
pub fn age(at: OffsetDateTime) -> String {
    let secs = (OffsetDateTime::now_utc() - at).whole_seconds().max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// The EXIT column: `-`, `0`, `3`, `oom(137)`, or the error.
pub fn exit_column(exit: Option<&ExitView>) -> String {
    let Some(exit) = exit else {
        return "-".into();
    };
    if exit.oom_killed {
        return format!("oom({})", exit.code.map_or("?".into(), |c| c.to_string()));
    }
    match exit.code {
        Some(code) => code.to_string(),
        None => exit.error.clone().unwrap_or_else(|| "?".to_owned()),
    }
}

/// The `ls` table.
pub fn agents_table(agents: &[AgentJson]) -> String {
    let mut rows = vec![[
        "NAME".to_owned(),
        "STATUS".to_owned(),
        "HEALTH".to_owned(),
        "RESTARTS".to_owned(),
        "EXIT".to_owned(),
        "AGE".to_owned(),
    ]];
    for a in agents {
        rows.push([
            a.name.clone(),
            a.status.to_string(),
            a.health.to_string(),
            a.restarts.to_string(),
            exit_column(a.exit.as_ref()),
            age(a.created_at),
        ]);
    }
    let widths: Vec<usize> = (0..6).map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0)).collect();
    rows.iter()
        .map(|r| {
            let cells: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
            cells.join("  ").trim_end().to_owned()
        })
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// One event as a line.
pub fn event_line(e: &EventJson) -> String {
    let change = match (e.from, e.to) {
        (Some(f), Some(t)) if f != t => format!("{f} -> {t}"),
        (_, Some(t)) => t.to_string(),
        _ => "-".to_owned(),
    };
    format!(
        "{}  {:<20}  {:<18}  {:<20}  {}",
        rfc3339(e.at),
        e.agent.as_deref().unwrap_or(&e.agent_id),
        e.kind.as_str(),
        change,
        e.detail
    )
}

/// `agentd inspect`: an agent with its runs.
#[derive(Debug, Serialize)]
pub struct AgentWithRuns {
    #[serde(flatten)]
    pub agent: AgentJson,
    pub runs: Vec<Run>,
}

/// A typed answer as `--json` prints it: the API's JSON, with its keys in sorted order
/// (as the client always printed them).
pub fn printable<T: Serialize>(value: &T) -> Result<Value> {
    serde_json::to_value(value).context("turning the answer back into JSON")
}

/// Percent-encodes a path segment or query value.
pub fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// How much of what it printed a [`LogsFollower`] remembers, to find its place again.
const FOLLOW_TAIL: usize = 4096;

/// What `agentd logs -f` prints of each new read of an agent's logs: what came after
/// what it printed before. The logs are capped ([`backend_core::SESSION_LOGS_MAX_BYTES`]),
/// so a long log no longer grows at the front; the follower then finds its place by the
/// end of what it printed, and when it cannot (more than the cap was written between two
/// reads, or the container was replaced), prints what the logs hold now.
#[derive(Debug, Default)]
pub struct LogsFollower {
    /// The length of the last read.
    seen: usize,
    /// The end of what was printed.
    tail: String,
}

impl LogsFollower {
    /// The part of `now`, the logs as read now, that was not printed yet; it counts as
    /// printed from here on.
    pub fn news(&mut self, now: &str) -> String {
        let truncated = now.starts_with(backend_core::LOGS_TRUNCATED);
        let grown = !truncated
            && now.len() >= self.seen
            && now.is_char_boundary(self.seen)
            && now[..self.seen].ends_with(self.tail.as_str());
        let body = if truncated { now.split_once('\n').map_or("", |(_, body)| body) } else { now };
        let new = if grown {
            &now[self.seen..]
        } else {
            match body.rfind(self.tail.as_str()) {
                Some(at) if !self.tail.is_empty() => &body[at + self.tail.len()..],
                _ => body,
            }
        };
        // What is printed now ends where the logs end.
        self.seen = now.len();
        let mut cut = body.len().saturating_sub(FOLLOW_TAIL);
        while !body.is_char_boundary(cut) {
            cut += 1;
        }
        self.tail = body[cut..].to_owned();
        new.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_follower_prints_what_is_new_also_once_the_logs_are_capped() {
        let mut follow = LogsFollower::default();
        assert_eq!(follow.news("one\n"), "one\n");
        assert_eq!(follow.news("one\ntwo\n"), "two\n");
        assert_eq!(follow.news("one\ntwo\n"), "");
        let long = "x".repeat(2 * FOLLOW_TAIL);
        assert_eq!(follow.news(&format!("one\ntwo\n{long}\nA\n")), format!("{long}\nA\n"));
        // Capped: the front is gone, the follower finds its place by the end it printed.
        let marker = format!("{} the first 9000 bytes are left out; …]\n", backend_core::LOGS_TRUNCATED);
        let kept = &long[FOLLOW_TAIL / 2..];
        assert_eq!(follow.news(&format!("{marker}{kept}\nA\nB\n")), "B\n");
        assert_eq!(follow.news(&format!("{marker}{kept}\nA\nB\nC\n")), "C\n");
        // Lost track (a new container): everything the logs hold now.
        assert_eq!(follow.news("fresh\n"), "fresh\n");
        assert_eq!(follow.news("fresh\nmore\n"), "more\n");
    }

    fn exit(code: Option<i64>, oom_killed: bool, error: Option<&str>) -> ExitView {
        ExitView { code, oom_killed, signal: None, error: error.map(str::to_owned), finished_at: None }
    }

    #[test]
    fn the_exit_column_says_how_it_ended() {
        assert_eq!(exit_column(None), "-");
        assert_eq!(exit_column(Some(&exit(Some(3), false, None))), "3");
        assert_eq!(exit_column(Some(&exit(Some(137), true, None))), "oom(137)");
        assert_eq!(exit_column(Some(&exit(None, false, Some("session disappeared")))), "session disappeared");
    }

    #[test]
    fn the_table_aligns_columns() {
        let agent: AgentJson = serde_json::from_value(serde_json::json!({
            "id": "a1", "name": "a", "kind": "image", "status": "running", "health": "healthy",
            "connected": false, "session": "s", "image": "i", "network": "none", "restart": "never",
            "restarts": 0, "reason": null, "next_restart_at": null, "exit": null, "paused": false,
            "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z"
        }))
        .expect("an agent");
        let table = agents_table(&[agent]);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "NAME  STATUS   HEALTH   RESTARTS  EXIT  AGE");
        assert!(lines[1].starts_with("a     running  healthy  0         -     "), "{}", lines[1]);
        assert!(lines[1].ends_with('d'), "an age in days: {}", lines[1]);
    }

    #[test]
    fn frames_split_on_blank_lines_across_chunks() {
        let mut frames = FrameSplitter::default();
        for chunk in [&b"data: a"[..], b"b\n", b"\ndata: c\n\nda", b"ta: d\n"] {
            frames.push(chunk);
        }
        assert_eq!(frames.next_frame().as_deref(), Some(&b"data: ab\n\n"[..]));
        assert_eq!(frames.next_frame().as_deref(), Some(&b"data: c\n\n"[..]));
        assert_eq!(frames.next_frame(), None);
        frames.push(b"\n");
        assert_eq!(frames.next_frame().as_deref(), Some(&b"data: d\n\n"[..]));
    }

    #[test]
    fn encoding_keeps_safe_characters() {
        assert_eq!(encode("a-b_c.d"), "a-b_c.d");
        assert_eq!(encode("a b/c"), "a%20b%2Fc");
    }
}
