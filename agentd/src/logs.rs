//! `GET /v1/agents/{id}/logs` as a stream: an agent's output read from the engine's log
//! and passed on line by line as it is written, as `docker logs -f` does.
//!
//! The stream ends when the run ends; with `follow_restarts` it goes on with each new run
//! (after a marker line) and ends when the agent ends for good (it ended and no restart
//! is scheduled, it was stopped, or it was removed).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use agent_manager::{Agent, AgentManager, AgentStatus, ManagerError, RunOutput};
use axum::body::Bytes;
use backend_core::{ExecutionBackend, OutputCursor, OutputLine, OutputLines};
use futures_util::StreamExt;
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::debug;

/// The most bytes of lines a `tail` keeps while it reads to the end of the log (the cap
/// of the log without `follow`): a larger `tail` of long lines gives fewer lines.
pub const TAIL_MAX_BYTES: usize = backend_core::SESSION_LOGS_MAX_BYTES;

/// The lines a stream holds for a client that reads slower than the agent writes (the
/// engine's log waits meanwhile): at most this many lines of at most
/// [`backend_core::MAX_LINE_BYTES`] each per stream.
pub const QUEUED_LINES: usize = 4;

/// How often a follower between two runs looks at the agent again when no event of it
/// came (events wake it at once).
const RECHECK: Duration = Duration::from_secs(2);

/// What a logs request asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LogsOptions {
    /// Go on until the run ends.
    pub follow: bool,
    /// Go on across runs (implies `follow`).
    pub follow_restarts: bool,
    /// Only lines written at or after this time.
    pub since: Option<OffsetDateTime>,
    /// Only the last N lines written so far (then what follows).
    pub tail: Option<usize>,
    /// Each line prefixed with its engine time.
    pub timestamps: bool,
}

impl LogsOptions {
    fn follows(&self) -> bool {
        self.follow || self.follow_restarts
    }
}

/// The cursor that skips everything written before `since`.
fn since_cursor(since: Option<OffsetDateTime>) -> Option<OutputCursor> {
    since.map(|at| OutputCursor { at_nanos: at.unix_timestamp_nanos() - 1, skip: u32::MAX })
}

/// The time in front of a line with `timestamps`: UTC, nanoseconds, fixed width.
fn stamp(at: OffsetDateTime) -> String {
    crate::times::utc_fixed(at, 9)
}

/// One line of the body: the line's text (with its time first with `timestamps`) and a
/// newline.
pub fn format_line(line: &OutputLine, timestamps: bool) -> String {
    if timestamps {
        format!("{} {}\n", stamp(line.at()), line.text)
    } else {
        format!("{}\n", line.text)
    }
}

/// The line between two runs.
pub fn run_marker(agent: &Agent, run: usize) -> String {
    let container = agent.container_id.as_deref().map_or("-", |c| &c[..c.len().min(12)]);
    format!("--- agentd: run {run} of {} started (container {container}) ---\n", agent.name)
}

/// A chunk of the body, or the error that breaks it off.
pub type Chunk = Result<Bytes, std::io::Error>;

/// Opens the agent's logs as `options` say. Errors that come before any output (no such
/// agent, no container, the engine unreachable) are returned, for the answer's status;
/// after that the body carries the lines, and an error later breaks it off after a line
/// saying what went wrong.
pub async fn open(
    manager: Arc<AgentManager<dyn ExecutionBackend>>,
    id: &str,
    options: LogsOptions,
    shutdown: watch::Receiver<bool>,
) -> Result<ReceiverStream<Chunk>, ManagerError> {
    // With a tail, the log is read to its end first (to find the last lines), then followed.
    let follow_now = options.follows() && options.tail.is_none();
    let since = options.since;
    let first = manager.run_output(id, |_| since_cursor(since), follow_now).await?;
    let Some(lines) = first.lines else {
        return Err(ManagerError::Conflict(format!(
            "agent {} has no container (it is {}); logs are kept only while its container exists",
            first.agent.name, first.agent.status
        )));
    };
    let (tx, rx) = mpsc::channel(QUEUED_LINES);
    let pump = Pump {
        manager,
        agent_id: first.agent.id.clone(),
        followed: first.agent.container_id.clone(),
        cursor: since_cursor(since),
        options,
        tx,
        shutdown,
    };
    tokio::spawn(pump.run(lines));
    Ok(ReceiverStream::new(rx))
}

/// Completes when the daemon shuts down.
async fn shut_down(mut shutdown: watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|down| *down).await;
}

/// How a pass over one run's lines ended.
enum Ended {
    /// The run's stream ended.
    Run,
    /// The reader went away or the daemon shuts down: nothing more to send.
    Gone,
}

struct Pump {
    manager: Arc<AgentManager<dyn ExecutionBackend>>,
    agent_id: String,
    /// The container whose output is being read.
    followed: Option<String>,
    /// The position after the last line sent (or the `since` cursor).
    cursor: Option<OutputCursor>,
    options: LogsOptions,
    tx: mpsc::Sender<Chunk>,
    shutdown: watch::Receiver<bool>,
}

impl Pump {
    async fn run(mut self, lines: OutputLines) {
        if let Err(e) = self.pump(lines).await {
            if !matches!(e, ManagerError::ShuttingDown) {
                let _ = self.tx.send(Ok(Bytes::from(format!("--- agentd: reading the logs failed: {e} ---\n")))).await;
            }
            // Hyper drops what it has not written yet when a body fails: let it take (and
            // so write out) the last lines before the body is broken off.
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while self.tx.capacity() < self.tx.max_capacity() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            })
            .await;
            let _ = self.tx.send(Err(std::io::Error::other(e.to_string()))).await;
        }
    }

    async fn pump(&mut self, mut lines: OutputLines) -> Result<(), ManagerError> {
        if let Some(n) = self.options.tail {
            if matches!(self.tail(lines, n).await?, Ended::Gone) || !self.options.follows() {
                return Ok(());
            }
            let (followed, cursor, since) = (self.followed.clone(), self.cursor, since_cursor(self.options.since));
            let again = self
                .manager
                .run_output(&self.agent_id, |agent| if agent.container_id == followed { cursor } else { since }, true)
                .await?;
            match self.next_run(again).await? {
                Some(next) => lines = next,
                None => return Ok(()),
            }
        }
        loop {
            if matches!(self.forward(lines).await?, Ended::Gone) || !self.options.follow_restarts {
                return Ok(());
            }
            match self.wait_next_run().await? {
                Some(next) => lines = next,
                None => return Ok(()),
            }
        }
    }

    /// Sends a chunk; false when the reader went away.
    async fn send(&self, text: String) -> bool {
        self.tx.send(Ok(Bytes::from(text))).await.is_ok()
    }

    /// Reads `lines` to their end and sends the last `n`.
    async fn tail(&mut self, mut lines: OutputLines, n: usize) -> Result<Ended, ManagerError> {
        let mut kept: VecDeque<String> = VecDeque::new();
        let mut bytes = 0;
        while let Some(line) = lines.next().await {
            let line = line?;
            self.cursor = Some(line.cursor);
            let text = format_line(&line, self.options.timestamps);
            bytes += text.len();
            kept.push_back(text);
            while kept.len() > n || (bytes > TAIL_MAX_BYTES && kept.len() > 1) {
                bytes -= kept.pop_front().map_or(0, |t| t.len());
            }
            if self.tx.is_closed() {
                return Ok(Ended::Gone);
            }
        }
        for text in kept {
            if !self.send(text).await {
                return Ok(Ended::Gone);
            }
        }
        Ok(Ended::Run)
    }

    /// Sends every line of `lines` until they end, the reader goes away or the daemon
    /// shuts down.
    async fn forward(&mut self, mut lines: OutputLines) -> Result<Ended, ManagerError> {
        let tx = self.tx.clone();
        let shutdown = shut_down(self.shutdown.clone());
        tokio::pin!(shutdown);
        loop {
            let item = tokio::select! {
                biased;
                () = tx.closed() => return Ok(Ended::Gone),
                () = &mut shutdown => {
                    self.send("--- agentd: the daemon is shutting down ---\n".into()).await;
                    return Err(ManagerError::ShuttingDown);
                }
                item = lines.next() => item,
            };
            match item {
                None => return Ok(Ended::Run),
                // The container went away under the stream (a restart replaced it).
                Some(Err(e)) if e.is_not_found() => return Ok(Ended::Run),
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(line)) => {
                    self.cursor = Some(line.cursor);
                    if !self.send(format_line(&line, self.options.timestamps)).await {
                        return Ok(Ended::Gone);
                    }
                }
            }
        }
    }

    /// After a run's stream ended: the next run's lines once it starts, or `None` when
    /// the agent ended for good (or the reader went away).
    async fn wait_next_run(&mut self) -> Result<Option<OutputLines>, ManagerError> {
        let mut waited = false;
        loop {
            // Subscribed before the record is read: no change falls between the two.
            let mut events = self.manager.subscribe();
            let (followed, cursor, since) = (self.followed.clone(), self.cursor, since_cursor(self.options.since));
            let found = self
                .manager
                .run_output(&self.agent_id, |agent| if agent.container_id == followed { cursor } else { since }, true)
                .await;
            let found = match found {
                Err(ManagerError::AgentNotFound(_)) => return Ok(None),
                other => other?,
            };
            let agent = &found.agent;
            let live = matches!(agent.status, AgentStatus::Running | AgentStatus::Pending);
            let same = agent.container_id == self.followed;
            if !same && found.lines.is_some() {
                return self.next_run(found).await;
            }
            if same && live {
                // The stream ended before the record did (the exit is not recorded yet, or
                // the engine ended the stream early): after a wait for news, read on from
                // where it stopped.
                if waited && found.lines.is_some() {
                    debug!(agent_id = %agent.id, "Log stream ended while the run is live; resuming.");
                    return self.next_run(found).await;
                }
            } else if agent.next_restart_at.is_none() && !live {
                // Ended, and no restart is due: the agent ended for good.
                return Ok(None);
            }
            drop(found);
            waited = true;
            let id = self.agent_id.clone();
            let woke = tokio::time::timeout(RECHECK, async {
                loop {
                    match events.recv().await {
                        Ok(event) if event.agent_id == id => return,
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                            std::future::pending::<()>().await;
                        }
                    }
                }
            });
            let tx = self.tx.clone();
            tokio::select! {
                () = tx.closed() => return Ok(None),
                () = shut_down(self.shutdown.clone()) => {
                    self.send("--- agentd: the daemon is shutting down ---\n".into()).await;
                    return Err(ManagerError::ShuttingDown);
                }
                _ = woke => {}
            }
        }
    }

    /// Takes `found` as the run to follow: a new run gets its marker line first.
    async fn next_run(&mut self, found: RunOutput) -> Result<Option<OutputLines>, ManagerError> {
        let Some(lines) = found.lines else {
            return Ok(None);
        };
        if found.agent.container_id != self.followed {
            if !self.send(run_marker(&found.agent, found.run)).await {
                return Ok(None);
            }
            self.followed = found.agent.container_id.clone();
            self.cursor = since_cursor(self.options.since);
        }
        Ok(Some(lines))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn timestamps_are_fixed_width_utc() {
        assert_eq!(stamp(datetime!(2026-12-01 20:00:00.5 +01:00)), "2026-12-01T19:00:00.500000000Z");
        assert_eq!(stamp(datetime!(2026-01-02 03:04:05 UTC)), "2026-01-02T03:04:05.000000000Z");
    }

    #[test]
    fn since_skips_only_what_came_before() {
        let at = datetime!(2026-12-01 19:00:00 UTC);
        let cursor = since_cursor(Some(at)).expect("cursor");
        let line_at = |nanos: i128| OutputCursor { at_nanos: nanos, skip: 1 };
        assert!(line_at(at.unix_timestamp_nanos()) > cursor, "a line at `since` is kept");
        assert!(line_at(at.unix_timestamp_nanos() - 1) <= cursor, "a line before it is skipped");
    }
}
