//! The command-line client: talks to a running daemon over the HTTP API.

use std::time::Duration;

use agent_manager::{AgentStatus, Approval, ConversationEntry, Delivery, Direction, ExitView, Run};
use anyhow::{anyhow, bail, Context, Result};
use backend_core::SessionHealth;
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

    /// A request that got no answer, said with what to do.
    fn transport_error(&self, e: reqwest::Error) -> anyhow::Error {
        if e.is_connect() || e.is_timeout() {
            anyhow!(
                "agentd is not running at {} ({e}).\nStart it with `agentd serve` (or `cargo run --release -p agentd -- serve`), \
                 or point --url / AGENTD_URL at a running daemon",
                self.base
            )
        } else {
            anyhow!("request to {} failed: {e}", self.base)
        }
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let response = request.send().await.map_err(|e| self.transport_error(e))?;
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

    /// The daemon's `/healthz` answer, whatever its status says (it answers 503 with the
    /// same body when it is not healthy).
    pub async fn health(&self) -> Result<Value> {
        let request = self.request(Method::GET, "/healthz");
        let response = request.send().await.map_err(|e| self.transport_error(e))?;
        if response.status() != StatusCode::SERVICE_UNAVAILABLE && !response.status().is_success() {
            bail!("GET /healthz answered HTTP {}", response.status().as_u16());
        }
        response.json().await.context("reading the answer to GET /healthz")
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
            } else if event == "lagged" {
                eprintln!("agentd: warning: {data}");
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

/// The approvals table: ID, AGENT, TOOL, INPUT (cut to 48 characters), AGE, DECISION;
/// wide: the whole INPUT, REQUESTED (RFC 3339) and the deny MESSAGE too.
pub fn approvals_table(approvals: &[Approval], wide: bool) -> String {
    let mut header: Vec<String> = ["ID", "AGENT", "TOOL", "INPUT", "AGE", "DECISION"].map(str::to_owned).to_vec();
    if wide {
        header.extend(["REQUESTED", "MESSAGE"].map(str::to_owned));
    }
    let mut rows = vec![header];
    for a in approvals {
        let input =
            a.input.get("command").and_then(Value::as_str).map(str::to_owned).unwrap_or_else(|| a.input.to_string());
        let input = input.replace('\n', " ");
        let input: String = if wide { input } else { input.chars().take(48).collect() };
        let decision = match a.decision {
            Some(d) => format!("{} ({})", d.as_str(), a.decided_by.map_or("-", |by| by.as_str())),
            None => "pending".to_owned(),
        };
        let mut row = vec![
            a.id.clone(),
            a.agent.clone().unwrap_or_else(|| a.agent_id.clone()),
            a.tool.clone(),
            input,
            age(a.requested_at),
            decision,
        ];
        if wide {
            row.push(rfc3339(a.requested_at));
            row.push(a.message.clone().unwrap_or_else(|| "-".into()));
        }
        rows.push(row);
    }
    crate::output::table(&rows)
}

/// One conversation entry as a line: `SEQ TIME → KIND TEXT` (→ to the agent, ← from it),
/// the text cut to 400 characters unless `wide`.
pub fn conversation_line(e: &ConversationEntry, wide: bool) -> String {
    let arrow = if e.direction == Direction::ToAgent { "→" } else { "←" };
    let queued = if e.delivery == Some(Delivery::Queued) { " (queued)" } else { "" };
    let body: String = if wide { e.text.clone() } else { e.text.chars().take(400).collect() };
    let body = body.replace('\n', " ");
    format!("{:>6} {} {arrow} {:<16} {body}{queued}", e.seq, fixed_time(e.at), e.kind)
}

/// A time as the API writes it.
fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339).unwrap_or_else(|_| at.to_string())
}

/// A short age: `45s`, `12m`, `3h`, `2d`.
pub fn age(at: OffsetDateTime) -> String {
    crate::output::short_duration((OffsetDateTime::now_utc() - at).whole_seconds())
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

/// Whole seconds from `now` to `at`, rounded up (a restart due in 9.2 s is in 10s).
fn secs_until(now: OffsetDateTime, at: OffsetDateTime) -> i64 {
    let millis = (at - now).whole_milliseconds();
    i64::try_from((millis + 999).div_euclid(1000)).unwrap_or(i64::MAX)
}

/// The STATUS column, as docker's: `Up 3m (healthy)`, `Exited (3) 2m ago`,
/// `Restarting in 40s (attempt 3)`, `Awaiting approval`, `Pending`.
pub fn status_column(a: &AgentJson, now: OffsetDateTime) -> String {
    use crate::output::short_duration;
    let ago = |at: OffsetDateTime| format!("{} ago", short_duration((now - at).whole_seconds()));
    match a.status {
        AgentStatus::Running => {
            if a.conversation.as_ref().is_some_and(|c| c.turn == agent_manager::Turn::AwaitingApproval) {
                return "Awaiting approval".to_owned();
            }
            let up = match a.started_at {
                Some(at) => format!("Up {}", short_duration((now - at).whole_seconds())),
                None => "Up".to_owned(),
            };
            let note = if a.paused {
                " (paused)"
            } else {
                match a.health {
                    SessionHealth::Healthy => " (healthy)",
                    SessionHealth::Unhealthy => " (unhealthy)",
                    SessionHealth::Starting => " (health: starting)",
                    SessionHealth::Unknown => "",
                }
            };
            format!("{up}{note}")
        }
        AgentStatus::Pending => "Pending".to_owned(),
        AgentStatus::Stopped | AgentStatus::Failed => {
            if let Some(at) = a.next_restart_at {
                let attempt = u64::from(a.restarts) + 1;
                return match secs_until(now, at) {
                    secs if secs > 0 => {
                        format!("Restarting in {} (attempt {attempt})", crate::output::short_duration(secs))
                    }
                    _ => format!("Restarting (attempt {attempt})"),
                };
            }
            let word = if a.status == AgentStatus::Failed { "Failed" } else { "Stopped" };
            match &a.exit {
                Some(exit) => {
                    let when = exit.finished_at.map(|at| format!(" {}", ago(at))).unwrap_or_default();
                    match exit.code {
                        Some(code) if exit.oom_killed => format!("OOM-killed ({code}){when}"),
                        Some(code) => format!("Exited ({code}){when}"),
                        None => format!("{word}{when}"),
                    }
                }
                None => word.to_owned(),
            }
        }
    }
}

/// Whether `ls` shows the agent without `-a`: it runs, is starting, or will restart
/// (as `docker ps` shows running and restarting containers).
pub fn is_live(a: &AgentJson) -> bool {
    matches!(a.status, AgentStatus::Running | AgentStatus::Pending) || a.next_restart_at.is_some()
}

/// The `ls` table: NAME, IMAGE, STATUS, RESTARTS, AGE (of the current run); wide: also
/// ID, KIND, HEALTH, EXIT, NETWORK, RESTART (the policy) and COMMAND.
pub fn agents_table(agents: &[AgentJson], wide: bool) -> String {
    let now = OffsetDateTime::now_utc();
    let header: &[&str] = if wide {
        &["NAME", "ID", "KIND", "IMAGE", "STATUS", "HEALTH", "EXIT", "RESTARTS", "AGE", "NETWORK", "RESTART", "COMMAND"]
    } else {
        &["NAME", "IMAGE", "STATUS", "RESTARTS", "AGE"]
    };
    let mut rows = vec![header.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>()];
    for a in agents {
        let run_age = age(a.started_at.unwrap_or(a.created_at));
        let status = status_column(a, now);
        if wide {
            let command = a.command.as_ref().map_or_else(|| "-".to_owned(), |c| c.join(" "));
            rows.push(vec![
                a.name.clone(),
                a.id.clone(),
                a.kind.to_string(),
                a.image.clone(),
                status,
                a.health.to_string(),
                exit_column(a.exit.as_ref()),
                a.restarts.to_string(),
                run_age,
                a.network.to_string(),
                a.restart.to_string(),
                command,
            ]);
        } else {
            rows.push(vec![a.name.clone(), a.image.clone(), status, a.restarts.to_string(), run_age]);
        }
    }
    crate::output::table(&rows)
}

/// The `runs` table: RUN, STARTED (ago), DURATION, EXIT, ENDED BY; wide: also
/// STARTED AT and FINISHED AT (RFC 3339) and CONTAINER (its full id).
pub fn runs_table(runs: &[Run], wide: bool) -> String {
    let now = OffsetDateTime::now_utc();
    let mut header: Vec<String> = ["RUN", "STARTED", "DURATION", "EXIT", "ENDED BY"].map(str::to_owned).to_vec();
    if wide {
        header.extend(["STARTED AT", "FINISHED AT", "CONTAINER"].map(str::to_owned));
    }
    let mut rows = vec![header];
    for r in runs {
        let duration = crate::output::short_duration((r.finished_at.unwrap_or(now) - r.started_at).whole_seconds());
        let duration = if r.finished_at.is_some() { duration } else { format!("{duration} (running)") };
        let mut row = vec![
            r.id.to_string(),
            format!("{} ago", age(r.started_at)),
            duration,
            exit_column(r.exit.as_ref()),
            r.ended_by.map_or_else(|| "-".to_owned(), |e| e.to_string()),
        ];
        if wide {
            row.push(rfc3339(r.started_at));
            row.push(r.finished_at.map_or_else(|| "-".to_owned(), rfc3339));
            row.push(r.container_id.clone().unwrap_or_else(|| "-".into()));
        }
        rows.push(row);
    }
    crate::output::table(&rows)
}

/// What a slow verb (`stop`, `restart`, `rm`) says on a terminal while it waits:
/// `stopping coder… (SIGTERM sent, 10 s grace)`. `grace` is the seconds between SIGTERM and
/// SIGKILL when known; an agent that is not running gets no signal.
pub fn progress_line(doing: &str, name: &str, running: bool, grace: Option<u64>) -> String {
    match (running, grace) {
        (false, _) => format!("{doing} {name}…"),
        (true, Some(secs)) => format!("{doing} {name}… (SIGTERM sent, {secs} s grace)"),
        (true, None) => format!("{doing} {name}… (SIGTERM sent, SIGKILL after the agent's grace)"),
    }
}

/// Progress on stderr for a slow verb, only when stderr is a terminal (nothing at all
/// otherwise, so scripts and logs stay clean); the line is cleared when the verb is done.
#[derive(Debug)]
pub struct Progress {
    shown: bool,
}

impl Progress {
    /// Says what `doing` does to `name` (`"stopping"`), on a terminal: asks the daemon
    /// whether the agent runs and its grace (`grace`, from `stop -t`, wins).
    pub async fn start(client: &Client, doing: &str, name: &str, grace: Option<u64>) -> Self {
        use std::io::{IsTerminal, Write};
        if !std::io::stderr().is_terminal() {
            return Self { shown: false };
        }
        let agent: Option<Value> = client.get(&format!("/v1/agents/{}", encode(name))).await.ok();
        let running = agent.as_ref().is_some_and(|a| a["status"] == "running");
        let grace = grace.or_else(|| {
            let agent = agent.as_ref()?;
            agent["stop_grace_secs"].as_u64().or_else(|| agent["spec"]["stop_grace_secs"].as_u64())
        });
        let mut stderr = std::io::stderr();
        let _ = write!(stderr, "{}", progress_line(doing, name, running, grace));
        let _ = stderr.flush();
        Self { shown: true }
    }

    /// Clears the line.
    pub fn done(self) {
        if self.shown {
            eprint!("\r\x1b[2K");
        }
    }
}

/// The header of the `events` lines, aligned with [`event_line`].
pub const EVENTS_HEADER: &str =
    "TIME                      AGENT                 EVENT               CHANGE                DETAIL";

/// The header of [`event_line`]'s lines; `wide` puts the event id first.
pub fn events_header(wide: bool) -> String {
    if wide {
        format!("{:>8}  {EVENTS_HEADER}", "ID")
    } else {
        EVENTS_HEADER.to_owned()
    }
}

/// One event as a line: `TIME  AGENT  EVENT  CHANGE  DETAIL`, the time in UTC to the
/// millisecond so that every line's columns start at the same place (an agent name over
/// 20 characters pushes its line's later columns along). `wide` puts the event's id first
/// and names the agent by name and id.
pub fn event_line(e: &EventJson, wide: bool) -> String {
    let change = match (e.from, e.to) {
        (Some(f), Some(t)) if f != t => format!("{f} -> {t}"),
        (_, Some(t)) => t.to_string(),
        _ => "-".to_owned(),
    };
    let agent = match (&e.agent, wide) {
        (Some(name), true) => format!("{name} ({})", e.agent_id),
        (Some(name), false) => name.clone(),
        (None, _) => e.agent_id.clone(),
    };
    let line = format!("{}  {:<20}  {:<18}  {:<20}  {}", fixed_time(e.at), agent, e.kind.as_str(), change, e.detail);
    if wide {
        format!("{:>8}  {line}", e.id)
    } else {
        line
    }
}

/// A time in UTC to the millisecond, always 24 characters: `2026-12-01T18:00:00.250Z`.
pub fn fixed_time(at: OffsetDateTime) -> String {
    crate::times::utc_fixed(at, 3)
}

/// A `--since` value, read as the daemon reads the logs' `since` ([`crate::times::parse_since`]):
/// RFC 3339 (`2026-12-01T18:00:00Z`), Unix seconds (`0`, `1764612000`), or an age before now
/// (`90s`, `10m`, `1h30m`, `500ms`).
pub fn parse_since(text: &str) -> std::result::Result<OffsetDateTime, String> {
    crate::times::parse_since(text, OffsetDateTime::now_utc())
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

/// Copies a text body to stdout as it arrives (bytes as they come: a character split
/// between two chunks is never cut); returns at its end. A body broken off (the daemon
/// went away, or it ended the stream with an error) is an error; a closed stdout (`| head`)
/// ends it quietly.
pub async fn print_body(response: reqwest::Response) -> Result<()> {
    use std::io::Write;
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| anyhow!("the log stream broke off: {e}"))?;
        let mut stdout = std::io::stdout().lock();
        match stdout.write_all(&chunk).and_then(|()| stdout.flush()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(e).context("writing to stdout"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(code: Option<i64>, oom_killed: bool, error: Option<&str>) -> ExitView {
        ExitView { code, oom_killed, signal: None, error: error.map(str::to_owned), finished_at: None }
    }

    #[test]
    fn progress_says_what_is_sent_and_the_grace() {
        assert_eq!(progress_line("stopping", "coder", true, Some(10)), "stopping coder… (SIGTERM sent, 10 s grace)");
        assert_eq!(
            progress_line("restarting", "coder", true, None),
            "restarting coder… (SIGTERM sent, SIGKILL after the agent's grace)"
        );
        assert_eq!(progress_line("removing", "coder", false, Some(10)), "removing coder…");
    }

    #[test]
    fn since_reads_times_unix_seconds_and_ages() {
        let at = parse_since("2026-12-01T18:00:00.5+01:00").expect("rfc 3339");
        assert_eq!(fixed_time(at), "2026-12-01T17:00:00.500Z");
        assert_eq!(parse_since("0").expect("unix"), OffsetDateTime::UNIX_EPOCH);
        let age = |text: &str| (OffsetDateTime::now_utc() - parse_since(text).expect(text)).whole_seconds();
        assert!((5399..=5401).contains(&age("1h30m")), "{}", age("1h30m"));
        assert!((89..=91).contains(&age("90s")));
        assert!((86_399..=86_401).contains(&age("1d")));
        for bad in ["", "10x", "m", "1h30", "yesterday", "99999999999999999999"] {
            let e = parse_since(bad).expect_err(bad);
            assert!(e.contains("RFC 3339") || e.contains("too long ago") || e.contains("out of range"), "{bad}: {e}");
        }
    }

    #[test]
    fn conversation_lines_have_fixed_width_times() {
        let entry = |nanos: i64| -> ConversationEntry {
            serde_json::from_value(serde_json::json!({
                "seq": 7, "at": (OffsetDateTime::UNIX_EPOCH + time::Duration::nanoseconds(nanos))
                    .format(&time::format_description::well_known::Rfc3339).expect("format"),
                "direction": "from_agent", "kind": "result", "text": "done", "data": {}
            }))
            .expect("an entry")
        };
        // 10 ms reads .010, not .01: every line's arrow is in the same column.
        let lines: Vec<String> = [10_000_000, 0, 123_456_789].map(|n| conversation_line(&entry(n), false)).into();
        assert_eq!(lines[0], "     7 1970-01-01T00:00:00.010Z ← result           done");
        assert!(lines.iter().all(|l| l.find('←') == lines[0].find('←')), "{lines:#?}");
    }

    #[test]
    fn event_lines_have_fixed_width_times_under_the_header() {
        let event = |nanos: i64| EventJson {
            id: 1,
            agent_id: "id".into(),
            agent: Some("coder".into()),
            kind: agent_manager::EventKind::Started,
            from: None,
            to: Some(AgentStatus::Running),
            detail: "container started".into(),
            at: OffsetDateTime::UNIX_EPOCH + time::Duration::nanoseconds(nanos),
        };
        let whole = event_line(&event(0), false);
        let fraction = event_line(&event(123_456_789), false);
        assert!(whole.starts_with("1970-01-01T00:00:00.000Z  coder "), "{whole}");
        assert!(fraction.starts_with("1970-01-01T00:00:00.123Z  coder "), "{fraction}");
        for column in ["AGENT", "EVENT", "CHANGE", "DETAIL"] {
            let at = EVENTS_HEADER.find(column).expect(column);
            assert_ne!(whole.as_bytes()[at], b' ', "{column} starts at {at}:\n{EVENTS_HEADER}\n{whole}");
            assert_eq!(whole.as_bytes()[at - 1], b' ', "{column} starts at {at}:\n{EVENTS_HEADER}\n{whole}");
        }
        // Wide: the id first, the agent by name and id, under a header with ID.
        let wide = event_line(&event(0), true);
        let header = events_header(true);
        assert!(wide.starts_with("       1  1970-01-01T00:00:00.000Z  coder (id) "), "{wide}");
        assert!(header.starts_with("      ID  TIME "), "{header}");
        assert_eq!(header.find("AGENT"), wide.find("coder"), "{header}\n{wide}");
    }

    #[test]
    fn the_exit_column_says_how_it_ended() {
        assert_eq!(exit_column(None), "-");
        assert_eq!(exit_column(Some(&exit(Some(3), false, None))), "3");
        assert_eq!(exit_column(Some(&exit(Some(137), true, None))), "oom(137)");
        assert_eq!(exit_column(Some(&exit(None, false, Some("session disappeared")))), "session disappeared");
    }

    fn agent(extra: Value) -> AgentJson {
        let mut json = serde_json::json!({
            "id": "a1", "name": "a", "kind": "image", "status": "running", "health": "healthy",
            "connected": false, "session": "s", "image": "i", "network": "none", "restart": "never",
            "restarts": 0, "reason": null, "next_restart_at": null, "exit": null, "paused": false,
            "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z"
        });
        if let (Some(json), Value::Object(extra)) = (json.as_object_mut(), extra) {
            json.extend(extra);
        }
        serde_json::from_value(json).expect("an agent")
    }

    #[test]
    fn the_table_aligns_columns_and_ages_the_current_run() {
        let started = rfc3339(OffsetDateTime::now_utc() - Duration::from_secs(185));
        let table = agents_table(&[agent(serde_json::json!({ "started_at": started }))], false);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines[0], "NAME  IMAGE  STATUS           RESTARTS  AGE");
        assert_eq!(lines[1], "a     i      Up 3m (healthy)  0         3m");
        // Never started: the age is the agent's.
        let table = agents_table(&[agent(serde_json::json!({ "status": "pending" }))], true);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("NAME  ID  KIND   IMAGE  STATUS   HEALTH   EXIT  RESTARTS  AGE"), "{table}");
        assert!(lines[1].contains("Pending") && lines[1].contains("d  "), "an age in days: {}", lines[1]);
    }

    #[test]
    fn the_status_reads_like_dockers() {
        let now = OffsetDateTime::now_utc();
        let at = |secs: i64| rfc3339(now + time::Duration::seconds(secs));
        let status = |extra: Value| status_column(&agent(extra), now);
        assert_eq!(status(serde_json::json!({ "started_at": at(-180) })), "Up 3m (healthy)");
        assert_eq!(status(serde_json::json!({ "started_at": at(-5), "health": "unhealthy" })), "Up 5s (unhealthy)");
        assert_eq!(status(serde_json::json!({ "started_at": at(-5), "paused": true })), "Up 5s (paused)");
        assert_eq!(status(serde_json::json!({ "health": "unknown" })), "Up");
        let exited = |code: i64, oom: bool| {
            serde_json::json!({ "status": "failed", "health": "unknown", "exit": {
                "code": code, "oom_killed": oom, "signal": null, "error": null, "finished_at": at(-120) } })
        };
        assert_eq!(status(exited(3, false)), "Exited (3) 2m ago");
        assert_eq!(status(exited(137, true)), "OOM-killed (137) 2m ago");
        let mut restarting = exited(3, false);
        restarting["next_restart_at"] = Value::String(at(40));
        restarting["restarts"] = 2.into();
        assert_eq!(status(restarting.clone()), "Restarting in 40s (attempt 3)");
        restarting["next_restart_at"] = Value::String(at(-1));
        assert_eq!(status(restarting), "Restarting (attempt 3)");
        assert_eq!(status(serde_json::json!({ "status": "stopped", "health": "unknown" })), "Stopped");
        assert_eq!(status(serde_json::json!({ "status": "pending" })), "Pending");
        let awaiting = serde_json::json!({
            "kind": "claude-code", "session_id": "x", "turn": "awaiting_approval", "cost_usd": 0.0,
            "usage": {"input_tokens": 0, "output_tokens": 0}, "last_result": null
        });
        assert_eq!(status(awaiting), "Awaiting approval");
    }

    #[test]
    fn a_restart_in_just_under_ten_seconds_reads_10s() {
        let now = OffsetDateTime::now_utc();
        assert_eq!(secs_until(now, now + time::Duration::milliseconds(9_200)), 10);
        assert_eq!(secs_until(now, now + time::Duration::seconds(10)), 10);
        assert_eq!(secs_until(now, now - time::Duration::milliseconds(300)), 0);
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
