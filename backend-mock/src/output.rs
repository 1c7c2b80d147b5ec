//! A container's output log: every line its main process wrote, stamped by the engine,
//! in one log that `session_logs`, `session_output` and attaches all read.
//!
//! The log lives in a [`tokio::sync::watch`] channel, so that followers wake on every
//! change (a new line, the end of the run, a pause) without holding the engine's lock.
//! Its lines go through [`OutputDecoder`], the decoder the engine backends use, so cursors
//! mean exactly what they mean there.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;

use backend_core::{BackendError, OutputCursor, OutputDecoder, OutputLines, OutputStream, SessionInput};
use futures_util::StreamExt;
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};

/// The most entries a container's log keeps; older ones are dropped first.
pub const MAX_LOG_ENTRIES: usize = 200_000;
/// The most bytes a container's log keeps (64 MiB); older entries are dropped first.
/// The newest entry is always kept, however long.
pub const MAX_LOG_BYTES: usize = 64 * 1024 * 1024;
/// How many entries a reader copies out of the log at once.
const READ_BATCH: usize = 1024;

/// One line the container wrote, with its newline.
#[derive(Debug, Clone)]
struct Entry {
    stream: OutputStream,
    at: OffsetDateTime,
    line: Arc<str>,
}

/// A container's log and the state of the process that writes it.
#[derive(Default)]
pub(crate) struct Log {
    entries: VecDeque<Entry>,
    /// How many entries were dropped from the front (the cap).
    dropped: u64,
    bytes: usize,
    last_at: Option<OffsetDateTime>,
    /// The run (the container's generation) whose main process is alive; `None` when it
    /// is not running. Only that run's agent may write.
    pub(crate) run: Option<u64>,
    /// The main process is paused: it reads and writes nothing.
    pub(crate) frozen: bool,
    /// Bumped when the engine drops every attach ([`crate::MockEngine::drop_attachments`]):
    /// an attach made before is lost.
    pub(crate) attach_epoch: u64,
}

impl fmt::Debug for Log {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Log")
            .field("entries", &self.entries.len())
            .field("dropped", &self.dropped)
            .field("bytes", &self.bytes)
            .field("run", &self.run)
            .field("frozen", &self.frozen)
            .finish()
    }
}

impl Log {
    /// Appends lines (each without its newline), stamped now, never earlier than the
    /// entry before; then drops the oldest entries beyond the caps.
    pub(crate) fn append(&mut self, lines: impl IntoIterator<Item = (OutputStream, String)>) {
        for (stream, mut line) in lines {
            let now = OffsetDateTime::now_utc();
            let at = self.last_at.map_or(now, |last| now.max(last));
            self.last_at = Some(at);
            line.push('\n');
            self.bytes += line.len();
            self.entries.push_back(Entry { stream, at, line: line.into() });
        }
        while self.entries.len() > 1 && (self.entries.len() > MAX_LOG_ENTRIES || self.bytes > MAX_LOG_BYTES) {
            if let Some(old) = self.entries.pop_front() {
                self.bytes -= old.line.len();
                self.dropped += 1;
            }
        }
    }

    /// The last `tail` lines (all when `None`), stdout and stderr, as one text.
    pub(crate) fn text(&self, tail: Option<usize>) -> String {
        let skip = tail.map_or(0, |t| self.entries.len().saturating_sub(t));
        self.entries.iter().skip(skip).map(|e| &*e.line).collect()
    }
}

/// The log of one container, shared by the engine, the simulated agent and readers.
pub(crate) type Output = Arc<watch::Sender<Log>>;

pub(crate) fn new_output() -> Output {
    Arc::new(watch::Sender::new(Log::default()))
}

/// What an agent's write came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Write {
    Done,
    /// The process is paused; write again once it is not.
    Frozen,
    /// The run is over; nothing more is written.
    Ended,
}

/// Appends `lines` for the agent of `run`, unless that run is over or paused. On
/// [`Write::Frozen`] the lines are left in `lines`.
pub(crate) fn write_for_run(output: &Output, run: u64, lines: &mut Vec<(OutputStream, String)>) -> Write {
    let mut outcome = Write::Ended;
    output.send_if_modified(|log| {
        outcome = if log.run != Some(run) {
            Write::Ended
        } else if log.frozen {
            Write::Frozen
        } else {
            Write::Done
        };
        let write = outcome == Write::Done && !lines.is_empty();
        if write {
            log.append(lines.drain(..));
        }
        write
    });
    outcome
}

/// Waits until the process of `run` is not paused; false when the run is over.
pub(crate) async fn thawed(rx: &mut watch::Receiver<Log>, run: u64) -> bool {
    match rx.wait_for(|log| !log.frozen || log.run != Some(run)).await {
        Ok(log) => log.run == Some(run),
        Err(_) => false,
    }
}

/// The lines of `output` after `from`. Without `follow` the stream ends at what was
/// written so far; with it, once the main process is no longer running and every line is
/// read. A follower that falls behind the log's cap skips what was dropped. The output
/// of an attach (`attach` is the epoch it was made in) ends with an `Unavailable` error
/// when the engine drops attaches.
pub(crate) fn lines(output: &Output, from: Option<OutputCursor>, follow: bool, attach: Option<u64>) -> OutputLines {
    struct Reader {
        rx: watch::Receiver<Log>,
        from: Option<OutputCursor>,
        /// The index (counting dropped entries) of the next entry to read.
        next: Option<u64>,
        decoder: OutputDecoder,
        ready: VecDeque<backend_core::Result<backend_core::OutputLine>>,
        follow: bool,
        attach: Option<u64>,
        done: bool,
    }
    let reader = Reader {
        rx: output.subscribe(),
        from,
        next: None,
        decoder: OutputDecoder::new(from),
        ready: VecDeque::new(),
        follow,
        attach,
        done: false,
    };
    futures_util::stream::unfold(reader, |mut r| async move {
        loop {
            if let Some(line) = r.ready.pop_front() {
                return Some((line, r));
            }
            if r.done {
                return None;
            }
            let (batch, caught_up, alive) = {
                let log = r.rx.borrow_and_update();
                if r.attach.is_some_and(|epoch| epoch != log.attach_epoch) {
                    r.done = true;
                    r.ready.push_back(Err(dropped()));
                    continue;
                }
                let start = match r.next {
                    Some(next) => next.max(log.dropped),
                    // Start at the first entry stamped like the cursor: the decoder
                    // counts those to skip the ones read before.
                    None => {
                        let first = r.from.map_or(0, |from| {
                            log.entries.partition_point(|e| e.at.unix_timestamp_nanos() < from.at_nanos)
                        });
                        log.dropped + first as u64
                    }
                };
                let index = usize::try_from(start - log.dropped).unwrap_or(usize::MAX).min(log.entries.len());
                let end = (index + READ_BATCH).min(log.entries.len());
                let batch: Vec<Entry> = log.entries.range(index..end).cloned().collect();
                r.next = Some(log.dropped + end as u64);
                (batch, end == log.entries.len(), log.run.is_some())
            };
            let had_batch = !batch.is_empty();
            for entry in batch {
                let lines = r.decoder.push(entry.stream, entry.at, entry.line.as_bytes(), true);
                r.ready.extend(lines.into_iter().map(Ok));
            }
            if !caught_up || had_batch {
                continue;
            }
            if !r.follow || !alive || r.rx.changed().await.is_err() {
                r.done = true;
                let rest = r.decoder.finish();
                r.ready.extend(rest.into_iter().map(Ok));
            }
        }
    })
    .boxed()
}

fn dropped() -> BackendError {
    BackendError::unavailable(crate::engine::NAME, "scripted: the engine dropped the attach")
}

/// The stdin of a container run, as an attach writes to it. Lines go to the simulated
/// agent when it reads stdin (stdio mode), and are accepted and dropped otherwise.
#[derive(Debug)]
pub(crate) struct Stdin {
    pub(crate) output: Output,
    pub(crate) run: u64,
    /// The epoch of the attach: once the engine drops attaches, writes fail.
    pub(crate) epoch: u64,
    pub(crate) agent: Option<mpsc::UnboundedSender<String>>,
}

#[async_trait::async_trait]
impl SessionInput for Stdin {
    async fn send_line(&mut self, line: &str) -> backend_core::Result<()> {
        if line.contains('\n') {
            return Err(BackendError::InvalidSpec {
                field: "line",
                message: "a line written to a session must not contain a newline".into(),
            });
        }
        let closed = || {
            BackendError::unavailable(
                crate::engine::NAME,
                "writing to the session's stdin failed: its main process ended",
            )
        };
        {
            let log = self.output.borrow();
            if log.attach_epoch != self.epoch {
                return Err(dropped());
            }
            if log.run != Some(self.run) {
                return Err(closed());
            }
        }
        match &self.agent {
            Some(agent) => agent.send(line.to_owned()).map_err(|_| closed()),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(log: &Log) -> Vec<&str> {
        log.entries.iter().map(|e| &*e.line).collect()
    }

    #[test]
    fn stamps_never_go_back_and_the_caps_drop_the_oldest() {
        let mut log = Log::default();
        log.append((0..MAX_LOG_ENTRIES + 5).map(|i| (OutputStream::Stdout, format!("{i}"))));
        assert_eq!(log.entries.len(), MAX_LOG_ENTRIES);
        assert_eq!(log.dropped, 5);
        assert_eq!(texts(&log)[0], "5\n");
        assert!(log.entries.iter().zip(log.entries.iter().skip(1)).all(|(a, b)| a.at <= b.at));
        log.append([(OutputStream::Stderr, "x".repeat(MAX_LOG_BYTES))]);
        assert_eq!(log.entries.len(), 1, "a line as large as the byte cap pushes out every older one");
        assert_eq!(log.bytes, MAX_LOG_BYTES + 1);
        assert_eq!(log.text(Some(5)).len(), MAX_LOG_BYTES + 1);
    }

    #[tokio::test]
    async fn readers_resume_after_the_cursor_and_followers_end_with_the_run() {
        let output = new_output();
        output.send_modify(|log| {
            log.run = Some(1);
            log.append([(OutputStream::Stdout, "a".into()), (OutputStream::Stderr, "b".into())]);
        });
        let all: Vec<_> = lines(&output, None, false, None).collect().await;
        let all: Vec<_> = all.into_iter().map(|l| l.expect("line")).collect();
        assert_eq!(all.iter().map(|l| l.text.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(all[1].stream, OutputStream::Stderr);

        let mut follower = lines(&output, Some(all[0].cursor), true, None);
        assert_eq!(follower.next().await.expect("line").expect("ok").text, "b");
        let mut pending = vec![(OutputStream::Stdout, "c".to_owned())];
        output.send_modify(|log| log.frozen = true);
        assert_eq!(write_for_run(&output, 1, &mut pending), Write::Frozen);
        assert_eq!(pending.len(), 1, "a paused process writes nothing");
        output.send_modify(|log| log.frozen = false);
        assert_eq!(write_for_run(&output, 2, &mut pending), Write::Ended, "another run's agent writes nothing");
        assert_eq!(write_for_run(&output, 1, &mut pending), Write::Done);
        assert_eq!(follower.next().await.expect("line").expect("ok").text, "c");
        output.send_modify(|log| log.run = None);
        assert!(follower.next().await.is_none(), "the follower ends with the run");
    }
}
