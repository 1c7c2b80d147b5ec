//! The conversation task of one stream-json agent's container.
//!
//! It lives as long as the container's main process: it attaches (again and again, with
//! backoff, when the attach is lost or the engine is away), sends the handshake once per
//! container, delivers the queued lines to the agent unless the container is frozen,
//! stores every line the agent writes with the cursor after it, and, once the process
//! has ended, reads what is left of its output and ends.

use std::sync::Arc;
use std::time::Duration;

use backend_core::{ExecutionBackend, OutputLine, OutputStream, SessionAttach, SessionInput, SessionStatus};
use futures_util::StreamExt;
use tokio::sync::Notify;
use tracing::{debug, warn};

use super::protocol::{self, apply_from_agent, apply_to_agent, parse_line};
use super::{Delivery, Direction, Hub, NewEntry, SessionRecord, Turn};
use crate::manager::Lifecycle;
use crate::model::EventKind;

/// The first wait before attaching again; it doubles up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// How often delivery to a frozen agent is tried again.
const FROZEN_RETRY: Duration = Duration::from_secs(1);
/// How many output lines are stored in one transaction at most.
const BATCH: usize = 256;

/// What a conversation task needs, all owned.
pub(crate) struct TaskContext<B: ?Sized> {
    pub backend: Arc<B>,
    pub hub: Arc<Hub>,
    pub lifecycle: Lifecycle,
}

/// The agent a task talks to.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub agent_id: String,
    pub agent_name: String,
    pub session: String,
    pub container: String,
}

/// Why a drive of one attach ended.
enum Ended {
    /// The output ended: the main process has ended, or the engine closed the stream.
    Output,
    /// The attach failed (engine away, connection lost).
    Lost(String),
}

/// Runs the conversation with `target` until its container's main process has ended and
/// its output is read. `previous`, the task of the agent's previous container, is let
/// finish first (bounded), so the two never write the same record.
pub(crate) async fn run<B: ExecutionBackend + ?Sized>(
    ctx: TaskContext<B>,
    target: Target,
    wake: Arc<Notify>,
    previous: tokio::sync::oneshot::Receiver<Option<tokio::task::JoinHandle<()>>>,
) {
    if let Ok(Some(previous)) = previous.await {
        let abort = previous.abort_handle();
        if tokio::time::timeout(Duration::from_secs(10), previous).await.is_err() {
            abort.abort();
        }
    }
    let mut record = match ctx.hub.record(&target.agent_id).await {
        Ok(record) => record,
        Err(e) => {
            warn!(agent_id = %target.agent_id, error = %e, "Cannot load the conversation; it is not followed.");
            return;
        }
    };
    if record.container_id.as_deref() != Some(target.container.as_str()) {
        record.enter_container(&target.container);
        if let Err(e) = ctx.hub.save(&record).await {
            warn!(agent_id = %target.agent_id, error = %e, "Cannot save the conversation state.");
            return;
        }
    }
    let mut retry = RETRY_MIN;
    loop {
        let state = match ctx.backend.session_state(&target.session).await {
            Ok(state) => state,
            Err(e) => {
                debug!(agent_id = %target.agent_id, error = %e, "Engine unavailable; attaching later.");
                retry = pause(retry).await;
                continue;
            }
        };
        if state.status == SessionStatus::Missing || state.id != target.container {
            break;
        }
        if !state.status.is_alive() {
            // The process has ended: read what it wrote since the cursor, and end.
            match ctx.backend.session_output(&target.session, record.output_cursor, false).await {
                Ok(output) => {
                    let _ = drain(&ctx, &target, &mut record, output).await;
                }
                Err(e) => debug!(agent_id = %target.agent_id, error = %e, "Could not read the last output."),
            }
            break;
        }
        let attach = match ctx.backend.attach_session(&target.session, record.output_cursor).await {
            Ok(attach) => attach,
            Err(e) if e.is_not_found() => break,
            Err(e) => {
                debug!(agent_id = %target.agent_id, error = %e, "Could not attach; trying again.");
                retry = pause(retry).await;
                continue;
            }
        };
        retry = RETRY_MIN;
        announce(&ctx, &target, true, "attached to the agent's stdin and output".into()).await;
        let ended = drive(&ctx, &target, &mut record, attach, &wake).await;
        let why = match &ended {
            Ended::Output => "the agent's output ended".to_owned(),
            Ended::Lost(e) => format!("the attach was lost: {e}"),
        };
        announce(&ctx, &target, false, why).await;
        if let Ended::Lost(_) = ended {
            retry = pause(retry).await;
        }
    }
    if record.turn != Turn::Idle {
        // The process is gone, and its turn with it.
        record.turn = Turn::Idle;
        let _ = ctx.hub.save(&record).await;
    }
    if ctx.hub.set_connected(&target.agent_id, false) {
        debug!(agent_id = %target.agent_id, "Conversation task ended.");
    }
}

async fn pause(retry: Duration) -> Duration {
    tokio::time::sleep(retry).await;
    (retry * 2).min(RETRY_MAX)
}

async fn announce<B: ExecutionBackend + ?Sized>(ctx: &TaskContext<B>, target: &Target, connected: bool, why: String) {
    if !ctx.hub.set_connected(&target.agent_id, connected) {
        return;
    }
    let kind = if connected { EventKind::Connected } else { EventKind::Disconnected };
    if let Err(e) = ctx.lifecycle.record(&target.agent_id, &target.agent_name, &target.session, kind, why).await {
        debug!(agent_id = %target.agent_id, error = %e, "Could not record the attach event.");
    }
}

/// Holds one attach: delivers queued lines and stores the agent's output until the
/// output ends or the attach fails.
async fn drive<B: ExecutionBackend + ?Sized>(
    ctx: &TaskContext<B>,
    target: &Target,
    record: &mut SessionRecord,
    attach: SessionAttach,
    wake: &Notify,
) -> Ended {
    let SessionAttach { mut input, output } = attach;
    let mut output = output.ready_chunks(BATCH);
    if record.handshake_container.as_deref() != Some(target.container.as_str()) {
        record.handshake_container = Some(target.container.clone());
        let data = protocol::initialize_request(&format!(
            "agentd-init-{}",
            &target.container[..target.container.len().min(12)]
        ));
        let entry = NewEntry {
            direction: Direction::ToAgent,
            kind: "control_request".into(),
            text: "initialize".into(),
            data,
            delivery: Some(Delivery::Queued),
            at: ctx.lifecycle.now(),
        };
        if let Err(e) = ctx.hub.append(&target.agent_id, vec![entry], Some(record)).await {
            return Ended::Lost(format!("storing the handshake failed: {e}"));
        }
    }
    let mut pending = true;
    let mut frozen_until: Option<tokio::time::Instant> = None;
    loop {
        if pending && frozen_until.is_none() {
            match deliver(ctx, target, record, input.as_mut()).await {
                Ok(Delivered::All) => pending = false,
                Ok(Delivered::Frozen) => frozen_until = Some(tokio::time::Instant::now() + FROZEN_RETRY),
                Err(e) => return Ended::Lost(e),
            }
        }
        let retry_frozen = async {
            match frozen_until {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            chunk = output.next() => match chunk {
                None => return Ended::Output,
                Some(lines) => {
                    let (lines, failure) = split_failure(lines);
                    if let Err(e) = store_lines(ctx, target, record, lines).await {
                        return Ended::Lost(e);
                    }
                    if let Some(e) = failure {
                        return Ended::Lost(e);
                    }
                }
            },
            _ = wake.notified() => pending = true,
            _ = retry_frozen => frozen_until = None,
        }
    }
}

fn split_failure(items: Vec<backend_core::Result<OutputLine>>) -> (Vec<OutputLine>, Option<String>) {
    let mut lines = Vec::with_capacity(items.len());
    for item in items {
        match item {
            Ok(line) => lines.push(line),
            Err(e) => return (lines, Some(e.to_string())),
        }
    }
    (lines, None)
}

/// Reads a finished output to its end.
async fn drain<B: ExecutionBackend + ?Sized>(
    ctx: &TaskContext<B>,
    target: &Target,
    record: &mut SessionRecord,
    output: backend_core::OutputLines,
) -> Result<(), String> {
    let mut output = output.ready_chunks(BATCH);
    while let Some(items) = output.next().await {
        let (lines, failure) = split_failure(items);
        store_lines(ctx, target, record, lines).await?;
        if let Some(e) = failure {
            return Err(e);
        }
    }
    Ok(())
}

/// Stores the agent's lines with the cursor after the last, in one transaction.
async fn store_lines<B: ExecutionBackend + ?Sized>(
    ctx: &TaskContext<B>,
    target: &Target,
    record: &mut SessionRecord,
    lines: Vec<OutputLine>,
) -> Result<(), String> {
    let Some(last) = lines.last().map(|l| l.cursor) else {
        return Ok(());
    };
    let mut next = record.clone();
    let mut entries = Vec::with_capacity(lines.len());
    for line in lines {
        let parsed = parse_line(&line.text, line.stream == OutputStream::Stderr);
        let at = line.at();
        apply_from_agent(&mut next, &parsed, at);
        entries.push(NewEntry {
            direction: Direction::FromAgent,
            kind: parsed.kind,
            text: parsed.text,
            data: parsed.data,
            delivery: None,
            at,
        });
    }
    next.output_cursor = Some(last);
    ctx.hub.append(&target.agent_id, entries, Some(&next)).await.map_err(|e| format!("storing output failed: {e}"))?;
    *record = next;
    Ok(())
}

fn is_handshake(entry: &super::ConversationEntry) -> bool {
    entry.kind == "control_request" && entry.data["request"]["subtype"] == "initialize"
}

enum Delivered {
    All,
    Frozen,
}

/// Writes the queued lines to the agent, oldest first, unless its container is frozen.
async fn deliver<B: ExecutionBackend + ?Sized>(
    ctx: &TaskContext<B>,
    target: &Target,
    record: &mut SessionRecord,
    input: &mut dyn SessionInput,
) -> Result<Delivered, String> {
    let mut queued = ctx.hub.store.queued_for(&target.agent_id).await.map_err(|e| e.to_string())?;
    // The handshake goes first, even when messages were queued before it (a prompt at
    // spawn, messages sent before the attach).
    queued.sort_by_key(|e| (!is_handshake(e), e.seq));
    if queued.is_empty() {
        return Ok(Delivered::All);
    }
    // A frozen process reads nothing: what is written now would only sit in a pipe and
    // read as delivered.
    match ctx.backend.session_state(&target.session).await {
        Ok(state) if state.status == SessionStatus::Paused => return Ok(Delivered::Frozen),
        Ok(_) => {}
        Err(e) => return Err(e.to_string()),
    }
    for entry in queued {
        let line = match &entry.data {
            serde_json::Value::String(raw) => raw.clone(),
            other => other.to_string(),
        };
        input.send_line(&line).await.map_err(|e| e.to_string())?;
        ctx.hub.delivered(&target.agent_id, entry.seq).await.map_err(|e| e.to_string())?;
        if apply_to_agent(record, &entry.kind, &entry.data) {
            ctx.hub.save(record).await.map_err(|e| e.to_string())?;
        }
    }
    Ok(Delivered::All)
}
