//! Talking to a session's main process: lines to its stdin, and every line it writes,
//! read back from the engine's log from a cursor on.
//!
//! The output of an attach is the engine's log of the session, followed. The log is the
//! one record of the output that carries a position (each entry's engine timestamp), so
//! a consumer that keeps the [`OutputCursor`] of the last line it handled resumes after a
//! lost attach, a detach or a daemon restart exactly where it stopped: nothing written
//! while nobody was attached is lost, and nothing is read twice.

use std::fmt;
use std::str::FromStr;

use async_trait::async_trait;
use futures_util::stream::BoxStream;
use time::OffsetDateTime;

use crate::Result;

/// The longest line an attach yields whole (8 MiB: Claude Code's lines carry tool results
/// and can be megabytes long). A longer line is cut there and yielded with
/// [`OutputLine::truncated`] set; the rest of it is dropped as it arrives, never
/// buffered, so one runaway line cannot exhaust the reader's memory.
pub const MAX_LINE_BYTES: usize = 8 * 1024 * 1024;

/// Which of the session's streams a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputStream {
    Stdout,
    Stderr,
}

/// A position in a session's output: everything up to and including it has been read.
///
/// Engines stamp every log entry with a time; entries are ordered by it. `skip` counts
/// the entries stamped exactly `at` that were already read, because an engine may stamp
/// several entries alike (coarse clocks, second-precision APIs). The text form
/// (`<unix nanoseconds>:<skip>`) is what stores keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OutputCursor {
    /// The engine timestamp of the last entry read, in Unix nanoseconds.
    pub at_nanos: i128,
    /// How many entries stamped exactly `at_nanos` were read.
    pub skip: u32,
}

impl OutputCursor {
    /// The cursor's time.
    pub fn at(&self) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp_nanos(self.at_nanos).unwrap_or(OffsetDateTime::UNIX_EPOCH)
    }
}

impl fmt::Display for OutputCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.at_nanos, self.skip)
    }
}

impl FromStr for OutputCursor {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (at, skip) = s.split_once(':').ok_or_else(|| format!("{s:?} is not an output cursor (NANOS:SKIP)"))?;
        Ok(Self {
            at_nanos: at.parse().map_err(|_| format!("{s:?}: bad timestamp"))?,
            skip: skip.parse().map_err(|_| format!("{s:?}: bad skip count"))?,
        })
    }
}

/// One line the session wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputLine {
    /// The stream it was written to.
    pub stream: OutputStream,
    /// The line without its newline; invalid UTF-8 is replaced.
    pub text: String,
    /// Whether the line was longer than [`MAX_LINE_BYTES`] and cut.
    pub truncated: bool,
    /// The position just after this line: resume from here to read what follows it.
    pub cursor: OutputCursor,
}

impl OutputLine {
    /// The engine's time for the line.
    pub fn at(&self) -> OffsetDateTime {
        self.cursor.at()
    }
}

/// The stdin of an attached session.
#[async_trait]
pub trait SessionInput: Send {
    /// Writes `line` and a newline to the session's stdin and flushes it. The line must
    /// not contain a newline itself.
    async fn send_line(&mut self, line: &str) -> Result<()>;
}

/// A [`SessionInput`] over any byte writer (an engine's hijacked attach connection).
pub struct LineWriter<W> {
    backend: &'static str,
    writer: W,
}

impl<W> LineWriter<W> {
    /// Writes lines to `writer`; errors name `backend`.
    pub fn new(backend: &'static str, writer: W) -> Self {
        Self { backend, writer }
    }
}

impl<W> fmt::Debug for LineWriter<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LineWriter").field("backend", &self.backend).finish_non_exhaustive()
    }
}

#[async_trait]
impl<W: tokio::io::AsyncWrite + Send + Unpin> SessionInput for LineWriter<W> {
    async fn send_line(&mut self, line: &str) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        if line.contains('\n') {
            return Err(crate::BackendError::InvalidSpec {
                field: "line",
                message: "a line written to a session must not contain a newline".into(),
            });
        }
        let lost = |e: std::io::Error| crate::BackendError::Unavailable {
            backend: self.backend,
            message: format!("writing to the session's stdin failed: {e}"),
            source: Some(Box::new(e)),
        };
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        self.writer.write_all(&bytes).await.map_err(lost)?;
        self.writer.flush().await.map_err(lost)
    }
}

/// A stream of a session's output lines.
pub type OutputLines = BoxStream<'static, Result<OutputLine>>;

/// A live attach: the session's stdin, and its output followed from a cursor.
///
/// Dropping it detaches; the session runs on, with its stdin still open, and a later
/// attach can go on writing to it.
pub struct SessionAttach {
    /// Writes lines to the session's stdin.
    pub input: Box<dyn SessionInput>,
    /// Every line the session writes after the cursor the attach started from, stdout and
    /// stderr tagged, in the engine's order. It ends when the session's main process has
    /// ended and its output is read; an `Err` item means the attach was lost (for example
    /// [`crate::BackendError::Unavailable`]) and the caller may attach again from the
    /// cursor of the last line it got.
    pub output: OutputLines,
}

impl fmt::Debug for SessionAttach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionAttach").finish_non_exhaustive()
    }
}

/// Turns an engine's timestamped log entries into [`OutputLine`]s: skips what the start
/// cursor says was read, joins the partial entries engines split long lines into, cuts
/// runaway lines, and keeps the cursor. Every engine backend feeds its log through one.
#[derive(Debug)]
pub struct OutputDecoder {
    /// Entries at or before this were read before.
    from: Option<OutputCursor>,
    /// The position after the last entry seen.
    cursor: Option<OutputCursor>,
    /// A line still being assembled, per stream.
    partial: [Partial; 2],
}

#[derive(Debug, Default)]
struct Partial {
    bytes: Vec<u8>,
    truncated: bool,
}

impl OutputDecoder {
    /// A decoder that yields what comes after `from` (everything when `None`).
    pub fn new(from: Option<OutputCursor>) -> Self {
        Self { from, cursor: None, partial: Default::default() }
    }

    /// The Unix second to ask the engine for entries from (`since`): a second before the
    /// start cursor's, so that every entry stamped like the cursor is replayed (and
    /// counted) whether the engine's `since` is inclusive or not, and whatever precision
    /// its stamps have.
    pub fn since_secs(&self) -> Option<i64> {
        self.from.map(|c| c.at_nanos.div_euclid(1_000_000_000) as i64 - 1)
    }

    /// Feeds one log entry: its stream, engine time and bytes. `complete` says the entry
    /// ends a line (engines mark the pieces of a split line as partial); an entry that is
    /// not complete but ends in a newline counts as complete too. Returns the lines it
    /// completed.
    pub fn push(&mut self, stream: OutputStream, at: OffsetDateTime, bytes: &[u8], complete: bool) -> Vec<OutputLine> {
        let at_nanos = at.unix_timestamp_nanos();
        // Position of this entry: the n-th entry stamped `at_nanos`.
        let position = match self.cursor {
            Some(c) if c.at_nanos == at_nanos => OutputCursor { at_nanos, skip: c.skip + 1 },
            Some(c) if c.at_nanos > at_nanos => {
                // An engine clock step backwards: keep the order the engine gave, never
                // move the cursor back.
                OutputCursor { at_nanos: c.at_nanos, skip: c.skip + 1 }
            }
            _ => OutputCursor { at_nanos, skip: 1 },
        };
        self.cursor = Some(position);
        if self.from.is_some_and(|from| position <= from) {
            return Vec::new();
        }
        let partial = &mut self.partial[stream as usize];
        let mut lines = Vec::new();
        let mut rest = bytes;
        loop {
            match rest.iter().position(|&b| b == b'\n') {
                Some(end) => {
                    append(partial, &rest[..end]);
                    lines.push(finish(partial, stream, position));
                    rest = &rest[end + 1..];
                }
                None => {
                    append(partial, rest);
                    if complete && !rest.is_empty() {
                        lines.push(finish(partial, stream, position));
                    }
                    break;
                }
            }
        }
        lines
    }

    /// Ends the output: a line still being assembled (the session ended without a final
    /// newline) is yielded.
    pub fn finish(&mut self) -> Vec<OutputLine> {
        let Some(cursor) = self.cursor.filter(|c| self.from.is_none_or(|from| *c > from)) else {
            return Vec::new();
        };
        let mut lines = Vec::new();
        for stream in [OutputStream::Stdout, OutputStream::Stderr] {
            let partial = &mut self.partial[stream as usize];
            if !partial.bytes.is_empty() || partial.truncated {
                lines.push(finish(partial, stream, cursor));
            }
        }
        lines
    }
}

fn append(partial: &mut Partial, bytes: &[u8]) {
    let room = MAX_LINE_BYTES.saturating_sub(partial.bytes.len());
    if bytes.len() > room {
        partial.truncated = true;
    }
    partial.bytes.extend_from_slice(&bytes[..bytes.len().min(room)]);
}

fn finish(partial: &mut Partial, stream: OutputStream, cursor: OutputCursor) -> OutputLine {
    let bytes = std::mem::take(&mut partial.bytes);
    let truncated = std::mem::take(&mut partial.truncated);
    let mut text = match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    };
    if text.ends_with('\r') {
        text.pop();
    }
    OutputLine { stream, text, truncated, cursor }
}

/// Turns an engine's stream of timestamped log entries (each `<RFC 3339 time> <bytes>`,
/// tagged with its stream) into output lines after `from`. An entry without a time is
/// taken as written at the time of the entry before it. The stream ends when `entries`
/// does; an error item is passed on and ends it.
pub fn timestamped_lines<S, B>(entries: S, from: Option<OutputCursor>) -> OutputLines
where
    S: futures_util::Stream<Item = Result<(OutputStream, B)>> + Send + 'static,
    B: AsRef<[u8]> + Send + 'static,
{
    use futures_util::StreamExt;
    struct State<S> {
        entries: std::pin::Pin<Box<S>>,
        decoder: OutputDecoder,
        ready: std::collections::VecDeque<Result<OutputLine>>,
        last_at: OffsetDateTime,
        done: bool,
    }
    let state = State {
        entries: Box::pin(entries),
        decoder: OutputDecoder::new(from),
        ready: Default::default(),
        last_at: from.map_or(OffsetDateTime::UNIX_EPOCH, |c| c.at()),
        done: false,
    };
    futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(item) = st.ready.pop_front() {
                return Some((item, st));
            }
            if st.done {
                return None;
            }
            match st.entries.next().await {
                Some(Ok((stream, entry))) => {
                    let entry = entry.as_ref();
                    let (at, bytes) = split_timestamp(entry).unwrap_or((st.last_at, entry));
                    st.last_at = at;
                    let complete = bytes.ends_with(b"\n");
                    st.ready.extend(st.decoder.push(stream, at, bytes, complete).into_iter().map(Ok));
                }
                Some(Err(e)) => {
                    st.done = true;
                    st.ready.push_back(Err(e));
                }
                None => {
                    st.done = true;
                    st.ready.extend(st.decoder.finish().into_iter().map(Ok));
                }
            }
        }
    })
    .boxed()
}

/// Splits an engine log entry written with timestamps (`<RFC 3339 time> <bytes>`) into
/// its time and bytes; `None` when it does not start with a time.
pub fn split_timestamp(entry: &[u8]) -> Option<(OffsetDateTime, &[u8])> {
    let space = entry.iter().take(64).position(|&b| b == b' ')?;
    let stamp = std::str::from_utf8(&entry[..space]).ok()?;
    let at = OffsetDateTime::parse(stamp, &time::format_description::well_known::Rfc3339).ok()?;
    Some((at, &entry[space + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(nanos: i128) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp_nanos(1_700_000_000_000_000_000 + nanos).expect("time")
    }

    fn texts(lines: &[OutputLine]) -> Vec<&str> {
        lines.iter().map(|l| l.text.as_str()).collect()
    }

    #[test]
    fn a_resumed_decoder_yields_each_entry_once_even_with_equal_stamps() {
        let entries = [(0, "a\n"), (0, "b\n"), (1, "c\n"), (1, "d\n"), (2, "e\n")];
        let mut first = OutputDecoder::new(None);
        let mut seen = Vec::new();
        for (at, text) in &entries[..3] {
            seen.extend(first.push(OutputStream::Stdout, t(*at), text.as_bytes(), true));
        }
        let cursor = seen.last().expect("line").cursor;
        assert_eq!(cursor.to_string().parse::<OutputCursor>(), Ok(cursor));
        // The engine replays from the cursor's second: everything again.
        let mut second = OutputDecoder::new(Some(cursor));
        for (at, text) in &entries {
            seen.extend(second.push(OutputStream::Stdout, t(*at), text.as_bytes(), true));
        }
        assert_eq!(texts(&seen), ["a", "b", "c", "d", "e"]);
    }

    #[test]
    fn partial_entries_join_per_stream_and_runaway_lines_are_cut() {
        let mut d = OutputDecoder::new(None);
        assert!(d.push(OutputStream::Stdout, t(0), b"hel", false).is_empty());
        assert!(d.push(OutputStream::Stderr, t(1), b"warn", false).is_empty());
        let out = d.push(OutputStream::Stdout, t(2), b"lo\n", true);
        assert_eq!(texts(&out), ["hello"]);
        let err = d.push(OutputStream::Stderr, t(3), b"ing", true);
        assert_eq!(err[0].stream, OutputStream::Stderr);
        assert_eq!(texts(&err), ["warning"]);
        let big = vec![b'x'; MAX_LINE_BYTES + 10];
        let cut = d.push(OutputStream::Stdout, t(4), &big, true);
        assert!(cut[0].truncated);
        assert_eq!(cut[0].text.len(), MAX_LINE_BYTES);
        assert!(d.push(OutputStream::Stdout, t(5), b"tail", false).is_empty());
        assert_eq!(texts(&d.finish()), ["tail"]);
    }

    #[test]
    fn timestamps_split_off_entries() {
        let (at, rest) = split_timestamp(b"2024-05-06T07:08:09.123456789Z hello world").expect("split");
        assert_eq!(at.nanosecond(), 123_456_789);
        assert_eq!(rest, b"hello world");
        assert!(split_timestamp(b"no stamp here").is_none());
    }
}
