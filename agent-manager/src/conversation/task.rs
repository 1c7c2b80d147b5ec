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

use super::approvals::{Approval, ApprovalChange, DecidedBy, Decision};
use super::protocol::{self, apply_from_agent, apply_to_agent, parse_line};
use super::{Delivery, Direction, Hub, NewEntry, SessionRecord, Turn};
use crate::manager::Lifecycle;
use crate::model::{ApprovalPolicy, EventKind};

/// The first wait before attaching again; it doubles up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// How often delivery to a frozen agent is tried again.
const FROZEN_RETRY: Duration = Duration::from_secs(1);
/// How many output lines are stored in one transaction at most.
const BATCH: usize = 256;
/// How many bytes of output lines are stored in one transaction at most (a single line
/// up to [`backend_core::MAX_LINE_BYTES`] makes a batch of its own).
const BATCH_BYTES: usize = 8 * 1024 * 1024;

/// The lines of an output that are ready now, in batches of at most [`BATCH`] lines and
/// [`BATCH_BYTES`] bytes, so that a burst of long lines is never held all at once.
struct Batches {
    inner: backend_core::OutputLines,
    carry: Option<backend_core::Result<OutputLine>>,
    done: bool,
}

impl Batches {
    fn new(inner: backend_core::OutputLines) -> Self {
        Self { inner, carry: None, done: false }
    }
}

impl futures_util::Stream for Batches {
    type Item = Vec<backend_core::Result<OutputLine>>;

    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        let this = self.get_mut();
        let size = |item: &backend_core::Result<OutputLine>| item.as_ref().map_or(0, |l| l.text.len());
        let mut batch = Vec::new();
        let mut bytes = 0;
        if let Some(item) = this.carry.take() {
            bytes += size(&item);
            batch.push(item);
        }
        while !this.done && batch.len() < BATCH && bytes < BATCH_BYTES && !batch.last().is_some_and(Result::is_err) {
            match this.inner.poll_next_unpin(cx) {
                Poll::Ready(Some(item)) => {
                    let n = size(&item);
                    if !batch.is_empty() && bytes + n > BATCH_BYTES {
                        this.carry = Some(item);
                        break;
                    }
                    bytes += n;
                    batch.push(item);
                }
                Poll::Ready(None) => this.done = true,
                Poll::Pending => break,
            }
        }
        if !batch.is_empty() {
            Poll::Ready(Some(batch))
        } else if this.done {
            Poll::Ready(None)
        } else {
            Poll::Pending
        }
    }
}

/// What a conversation task needs, all owned.
pub(crate) struct TaskContext<B: ?Sized> {
    pub backend: Arc<B>,
    pub hub: Arc<Hub>,
    pub lifecycle: Lifecycle,
    /// Where a task asks the supervisor to restart its agent (a turn that would not end).
    pub restarts: tokio::sync::mpsc::UnboundedSender<RestartRequest>,
}

/// A conversation task's request to restart its agent's run.
#[derive(Debug, Clone)]
pub(crate) struct RestartRequest {
    pub agent_id: String,
    pub container: String,
    pub why: String,
}

/// The agent a task talks to, and its conversation rules.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub agent_id: String,
    pub agent_name: String,
    pub session: String,
    pub container: String,
    pub approvals: ApprovalPolicy,
    pub approval_timeout: Duration,
    pub turn_idle_timeout: Duration,
    pub interrupt_grace: Duration,
}

/// The timers of one attach: the stuck-turn rule.
struct Watch {
    /// The last time the agent wrote, or a turn began.
    last_activity: tokio::time::Instant,
    /// When an interrupt for a stuck turn was sent, while that turn has not ended.
    interrupted_at: Option<tokio::time::Instant>,
    /// When each pending approval of this run times out.
    deadlines: std::collections::HashMap<String, tokio::time::Instant>,
}

impl Watch {
    /// Reloads the pending approvals of this run: a new one gets its deadline (less the
    /// time it already waited, for one that survived a daemon restart), a decided one
    /// drops out.
    async fn refresh<B: ExecutionBackend + ?Sized>(&mut self, ctx: &TaskContext<B>, target: &Target) {
        let Ok(pending) = ctx.hub.store.list_approvals(Some(&target.agent_id), true).await else {
            return;
        };
        let now = tokio::time::Instant::now();
        let mut deadlines = std::collections::HashMap::new();
        for approval in pending.into_iter().filter(|a| a.container_id == target.container) {
            let at = self.deadlines.get(&approval.id).copied().unwrap_or_else(|| {
                let waited = Duration::try_from(ctx.lifecycle.now() - approval.requested_at).unwrap_or(Duration::ZERO);
                now + target.approval_timeout.saturating_sub(waited)
            });
            deadlines.insert(approval.id, at);
        }
        self.deadlines = deadlines;
    }

    fn next_approval_deadline(&self) -> Option<tokio::time::Instant> {
        self.deadlines.values().min().copied()
    }
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
        // Aborted with this task too, should it be aborted while it waits: an older
        // task must never outlive a newer one.
        let _guard = AbortOnDrop(previous.abort_handle());
        let _ = tokio::time::timeout(Duration::from_secs(10), previous).await;
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
        // Answers and interrupts queued for an earlier run meant nothing to this one,
        // and its pending requests can no longer be answered.
        if let Err(e) = ctx.hub.store.expire_queued_controls(&target.agent_id).await {
            debug!(agent_id = %target.agent_id, error = %e, "Could not expire earlier control lines.");
        }
        let pending = ctx.hub.store.list_approvals(Some(&target.agent_id), true).await.unwrap_or_default();
        for approval in pending.iter().filter(|a| a.container_id != target.container) {
            let message = Some("the agent's run ended before a decision".to_owned());
            let _ = decide(&ctx, &target, approval, Decision::Deny, message, DecidedBy::RunEnded).await;
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
        // Either way, not at once: an engine whose log stream ends at once must not spin.
        retry = match ended {
            Ended::Lost(_) => pause(retry).await,
            Ended::Output => pause(RETRY_MIN).await.min(RETRY_MIN * 2),
        };
    }
    if record.turn != Turn::Idle {
        // The process is gone, and its turn with it.
        record.turn = Turn::Idle;
        let _ = ctx.hub.save(&record).await;
    }
    // Requests of this run can no longer be answered.
    expire_approvals(&ctx, &target).await;
    if ctx.hub.set_connected(&target.agent_id, false) {
        debug!(agent_id = %target.agent_id, "Conversation task ended.");
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
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
    let mut output = Batches::new(output);
    if record.handshake_container.as_deref() != Some(target.container.as_str()) {
        let mut next = record.clone();
        next.handshake_container = Some(target.container.clone());
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
        if let Err(e) = ctx.hub.append(&target.agent_id, vec![entry], Some(&next)).await {
            return Ended::Lost(format!("storing the handshake failed: {e}"));
        }
        *record = next;
    }
    let mut pending = true;
    let mut frozen_until: Option<tokio::time::Instant> = None;
    let mut watch =
        Watch { last_activity: tokio::time::Instant::now(), interrupted_at: None, deadlines: Default::default() };
    watch.refresh(ctx, target).await;
    loop {
        if pending && frozen_until.is_none() {
            match deliver(ctx, target, record, input.as_mut()).await {
                Ok(Delivered::All { started_turn }) => {
                    pending = false;
                    if started_turn {
                        watch.last_activity = tokio::time::Instant::now();
                    }
                }
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
        let due = next_due(target, record, &watch, frozen_until.is_some());
        let timer = async {
            match due {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            chunk = output.next() => match chunk {
                None => return Ended::Output,
                Some(lines) => {
                    let (lines, failure) = split_failure(lines);
                    if !lines.is_empty() {
                        watch.last_activity = tokio::time::Instant::now();
                    }
                    match store_lines(ctx, target, record, lines).await {
                        Ok(queued) => pending |= queued,
                        Err(e) => return Ended::Lost(e),
                    }
                    if record.turn == Turn::Idle {
                        watch.interrupted_at = None;
                    }
                    watch.refresh(ctx, target).await;
                    if let Some(e) = failure {
                        return Ended::Lost(e);
                    }
                }
            },
            _ = wake.notified() => {
                pending = true;
                watch.refresh(ctx, target).await;
            }
            _ = retry_frozen => frozen_until = None,
            _ = timer => {
                if run_timers(ctx, target, record, &mut watch).await {
                    pending = true;
                }
            }
        }
    }
}

/// The next time a timer of this attach falls due: a pending approval's timeout, a
/// busy turn's idle timeout, an interrupted turn's grace. A frozen agent's turn is not
/// timed: it cannot write.
fn next_due(target: &Target, record: &SessionRecord, watch: &Watch, frozen: bool) -> Option<tokio::time::Instant> {
    let mut due = watch.next_approval_deadline();
    let mut earlier = |at: tokio::time::Instant| due = Some(due.map_or(at, |d| d.min(at)));
    // A turn that waits for a person is timed by the approval timeout, not the idle one.
    if record.turn == Turn::Busy && !frozen && watch.deadlines.is_empty() {
        match watch.interrupted_at {
            None => earlier(watch.last_activity + target.turn_idle_timeout),
            Some(at) => earlier(at + target.interrupt_grace),
        }
    }
    due
}

/// Runs the timers that fell due. Returns whether lines were queued for the agent.
async fn run_timers<B: ExecutionBackend + ?Sized>(
    ctx: &TaskContext<B>,
    target: &Target,
    record: &mut SessionRecord,
    watch: &mut Watch,
) -> bool {
    let now = tokio::time::Instant::now();
    let mut queued = false;
    if watch.next_approval_deadline().is_some_and(|at| at <= now) {
        let timeout = target.approval_timeout.as_secs_f64();
        let pending = ctx.hub.store.list_approvals(Some(&target.agent_id), true).await.unwrap_or_default();
        for approval in pending.into_iter().filter(|a| watch.deadlines.get(&a.id).is_some_and(|at| *at <= now)) {
            let message = format!("no decision within {timeout} s; agentd denied the request");
            match decide(ctx, target, &approval, Decision::Deny, Some(message), DecidedBy::Timeout).await {
                Ok(()) => queued = true,
                Err(e) => debug!(agent_id = %target.agent_id, error = %e, "Could not time out an approval."),
            }
        }
        watch.refresh(ctx, target).await;
    }
    if record.turn != Turn::Busy || !watch.deadlines.is_empty() {
        return queued;
    }
    // A frozen agent writes nothing through no fault of its turn: its clock restarts.
    if matches!(ctx.backend.session_state(&target.session).await, Ok(s) if s.status == SessionStatus::Paused) {
        watch.last_activity = now;
        watch.interrupted_at = None;
        return queued;
    }
    match watch.interrupted_at {
        None if now >= watch.last_activity + target.turn_idle_timeout => {
            let idle = target.turn_idle_timeout.as_secs();
            let entry = NewEntry {
                direction: Direction::ToAgent,
                kind: "control_request".into(),
                text: "interrupt".into(),
                data: protocol::interrupt_request(&format!("agentd-interrupt-{}", uuid::Uuid::new_v4().simple())),
                delivery: Some(Delivery::Queued),
                at: ctx.lifecycle.now(),
            };
            if ctx.hub.append(&target.agent_id, vec![entry], None).await.is_ok() {
                queued = true;
                watch.interrupted_at = Some(now);
                let why = format!(
                    "the turn wrote nothing for {idle} s; interrupt sent (the agent is restarted if the turn does not end within {} s)",
                    target.interrupt_grace.as_secs()
                );
                let _ = ctx
                    .lifecycle
                    .record(&target.agent_id, &target.agent_name, &target.session, EventKind::TurnInterrupted, why)
                    .await;
            }
        }
        Some(at) if now >= at + target.interrupt_grace => {
            watch.interrupted_at = None;
            watch.last_activity = now;
            let why = format!(
                "the interrupted turn did not end within {} s; restarting the agent",
                target.interrupt_grace.as_secs()
            );
            warn!(agent_id = %target.agent_id, agent = %target.agent_name, "{why}");
            let request =
                RestartRequest { agent_id: target.agent_id.clone(), container: target.container.clone(), why };
            let _ = ctx.restarts.send(request);
        }
        _ => {}
    }
    queued
}

/// Decides an approval and queues its answer for the agent, in one transaction.
pub(crate) async fn decide<B: ExecutionBackend + ?Sized>(
    ctx: &TaskContext<B>,
    target: &Target,
    approval: &Approval,
    decision: Decision,
    message: Option<String>,
    by: DecidedBy,
) -> Result<(), crate::store::StoreError> {
    decide_in(&ctx.hub, &ctx.lifecycle, &target.agent_name, &target.session, approval, decision, message, by).await
}

/// Decides an approval and queues its answer, then announces it.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn decide_in(
    hub: &Hub,
    lifecycle: &Lifecycle,
    agent_name: &str,
    session: &str,
    approval: &Approval,
    decision: Decision,
    message: Option<String>,
    by: DecidedBy,
) -> Result<(), crate::store::StoreError> {
    let at = lifecycle.now();
    let change = ApprovalChange::Decide { id: approval.id.clone(), decision, message: message.clone(), by, at };
    // A request the agent withdrew, or whose run ended, is answered to nobody: the
    // CLI that asked no longer waits.
    let answered = !matches!(by, DecidedBy::Agent | DecidedBy::RunEnded);
    let entries = if answered {
        vec![NewEntry {
            direction: Direction::ToAgent,
            kind: "control_response".into(),
            text: decision.as_str().into(),
            data: approval.response(decision, message.as_deref()),
            delivery: Some(Delivery::Queued),
            at,
        }]
    } else {
        Vec::new()
    };
    hub.append_with(&approval.agent_id, entries, None, &[change]).await?;
    if answered {
        hub.wake(&approval.agent_id);
    }
    let detail = format!(
        "{} {} for {} ({}){}",
        approval.id,
        decision.as_str(),
        approval.tool,
        by_text(by),
        message.map(|m| format!(": {m}")).unwrap_or_default()
    );
    let _ = lifecycle.record(&approval.agent_id, agent_name, session, EventKind::ApprovalDecided, detail).await;
    Ok(())
}

fn by_text(by: DecidedBy) -> &'static str {
    match by {
        DecidedBy::User => "by a user",
        DecidedBy::Policy => "by the approvals policy",
        DecidedBy::Timeout => "timed out",
        DecidedBy::Agent => "withdrawn by the agent",
        DecidedBy::RunEnded => "the run ended",
    }
}

/// Denies the pending approvals of a run that ended; their answers expire with it.
async fn expire_approvals<B: ExecutionBackend + ?Sized>(ctx: &TaskContext<B>, target: &Target) {
    let pending = ctx.hub.store.list_approvals(Some(&target.agent_id), true).await.unwrap_or_default();
    for approval in pending.into_iter().filter(|a| a.container_id == target.container) {
        let message = Some("the agent's run ended before a decision".to_owned());
        let _ = decide(ctx, target, &approval, Decision::Deny, message, DecidedBy::RunEnded).await;
    }
    let _ = ctx.hub.store.expire_queued_controls(&target.agent_id).await;
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
    let mut output = Batches::new(output);
    while let Some(items) = output.next().await {
        let (lines, failure) = split_failure(items);
        store_lines(ctx, target, record, lines).await?;
        if let Some(e) = failure {
            return Err(e);
        }
    }
    Ok(())
}

/// Stores the agent's lines with the cursor after the last, and the approvals they ask
/// for (answered at once under an `allow` or `deny` policy), in one transaction. Returns
/// whether lines were queued for the agent.
async fn store_lines<B: ExecutionBackend + ?Sized>(
    ctx: &TaskContext<B>,
    target: &Target,
    record: &mut SessionRecord,
    lines: Vec<OutputLine>,
) -> Result<bool, String> {
    let Some(last) = lines.last().map(|l| l.cursor) else {
        return Ok(false);
    };
    let mut next = record.clone();
    let mut entries = Vec::with_capacity(lines.len());
    let mut changes = Vec::new();
    let mut requested = Vec::new();
    let mut withdrawn = Vec::new();
    for line in lines {
        let parsed = if line.truncated {
            protocol::truncated_line(&line.text, line.stream == OutputStream::Stderr)
        } else {
            parse_line(&line.text, line.stream == OutputStream::Stderr)
        };
        let at = line.at();
        // The entry holds what it needs; the raw line goes now, not with the batch.
        drop(line);
        apply_from_agent(&mut next, &parsed, at);
        if let Some(approval) =
            Approval::from_request(&target.agent_id, &target.container, &parsed.data, ctx.lifecycle.now())
        {
            changes.push(ApprovalChange::Create(approval.clone()));
            requested.push(approval);
        }
        if parsed.kind == "control_cancel_request" {
            withdrawn.extend(parsed.data["request_id"].as_str().map(str::to_owned));
        }
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
    ctx.hub
        .append_with(&target.agent_id, entries, Some(&next), &changes)
        .await
        .map_err(|e| format!("storing output failed: {e}"))?;
    *record = next;
    let mut queued = false;
    for approval in &requested {
        let detail = format!("{} {}: {}", approval.id, approval.tool, cut(&approval.input.to_string(), 200));
        let _ = ctx
            .lifecycle
            .record(&target.agent_id, &target.agent_name, &target.session, EventKind::ApprovalRequested, detail)
            .await;
        let decision = match target.approvals {
            ApprovalPolicy::Ask => continue,
            ApprovalPolicy::Allow => Decision::Allow,
            ApprovalPolicy::Deny => Decision::Deny,
        };
        let message = (decision == Decision::Deny).then(|| "denied by the agent's approvals policy".to_owned());
        decide(ctx, target, approval, decision, message, DecidedBy::Policy).await.map_err(|e| e.to_string())?;
        queued = true;
    }
    if !withdrawn.is_empty() {
        let pending = ctx.hub.store.list_approvals(Some(&target.agent_id), true).await.map_err(|e| e.to_string())?;
        for approval in
            pending.iter().filter(|a| a.container_id == target.container && withdrawn.contains(&a.request_id))
        {
            let message = Some("the agent withdrew the request (the turn was interrupted)".to_owned());
            let _ = decide(ctx, target, approval, Decision::Deny, message, DecidedBy::Agent).await;
        }
    }
    Ok(queued)
}

fn cut(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

fn is_handshake(entry: &super::ConversationEntry) -> bool {
    entry.kind == "control_request" && entry.data["request"]["subtype"] == "initialize"
}

enum Delivered {
    All { started_turn: bool },
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
        return Ok(Delivered::All { started_turn: false });
    }
    // A frozen process reads nothing: what is written now would only sit in a pipe and
    // read as delivered.
    match ctx.backend.session_state(&target.session).await {
        Ok(state) if state.status == SessionStatus::Paused => return Ok(Delivered::Frozen),
        Ok(_) => {}
        Err(e) => return Err(e.to_string()),
    }
    let mut started_turn = false;
    for entry in queued {
        // A message, or an answered permission request, sets the turn going again.
        started_turn |= entry.kind == "user" || entry.kind == "control_response";
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
    Ok(Delivered::All { started_turn })
}

#[cfg(test)]
mod tests {
    use super::*;
    use backend_core::OutputCursor;

    fn line(bytes: usize) -> backend_core::Result<OutputLine> {
        Ok(OutputLine {
            stream: OutputStream::Stdout,
            text: "x".repeat(bytes),
            truncated: false,
            cursor: OutputCursor { at_nanos: 1, skip: 1 },
        })
    }

    #[tokio::test]
    async fn batches_hold_at_most_batch_bytes_of_ready_lines() {
        const MIB: usize = 1024 * 1024;
        let items: Vec<_> =
            [4, 4, 4, 1, 9, 1].iter().map(|mib| line(mib * MIB)).chain((0..300).map(|_| line(10))).collect();
        let sizes: Vec<Vec<usize>> = Batches::new(futures_util::stream::iter(items).boxed())
            .map(|batch| batch.iter().map(|l| l.as_ref().map_or(0, |l| l.text.len())).collect())
            .collect()
            .await;
        let mib = |v: &[usize]| v.iter().map(|n| n / MIB).collect::<Vec<_>>();
        // Two 4 MiB lines fill a batch; the third waits for the next one; a line over the
        // byte budget makes a batch of its own.
        assert_eq!(mib(&sizes[0]), [4, 4]);
        assert_eq!(mib(&sizes[1]), [4, 1]);
        assert_eq!(mib(&sizes[2]), [9]);
        assert!(sizes.iter().all(|b| b.len() <= BATCH), "{:?}", sizes.iter().map(Vec::len).collect::<Vec<_>>());
        assert!(sizes.iter().all(|b| b.len() == 1 || b.iter().sum::<usize>() <= BATCH_BYTES));
        assert_eq!(sizes.iter().map(Vec::len).sum::<usize>(), 306, "every line once");
    }
}
