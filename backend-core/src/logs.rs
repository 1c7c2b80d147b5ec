//! The cap on [`ExecutionBackend::session_logs`](crate::ExecutionBackend::session_logs):
//! one `String` in memory, however long the session's output.

/// The most bytes of output `session_logs` returns (4 MiB), besides its
/// [`LOGS_TRUNCATED`] line.
pub const SESSION_LOGS_MAX_BYTES: usize = 4 * 1024 * 1024;

/// How the line that replaces the left-out start of a capped log begins. The whole line
/// reads `[agentd: logs truncated: the first N bytes are left out; at most 4194304 bytes
/// are returned; ask for fewer lines with tail, or read the engine's own logs]`.
pub const LOGS_TRUNCATED: &str = "[agentd: logs truncated:";

/// How far into the kept bytes a cut may look for the end of the partial first line.
const ALIGN_WINDOW: usize = 64 * 1024;

/// Collects a session's output for `session_logs`, keeping only the last
/// [`SESSION_LOGS_MAX_BYTES`] in memory (at most twice that while collecting), so a long
/// log is never held whole.
///
/// [`LogsCollector::finish`] decodes the bytes as UTF-8 (lossily, once, so a character
/// split between two engine chunks stays whole) and, when bytes were left out, starts the
/// text at a line boundary after a line beginning with [`LOGS_TRUNCATED`] that says how
/// many.
#[derive(Debug)]
pub struct LogsCollector {
    cap: usize,
    kept: Vec<u8>,
    dropped: u64,
}

impl Default for LogsCollector {
    fn default() -> Self {
        Self::new()
    }
}

impl LogsCollector {
    /// A collector with the contract's cap, [`SESSION_LOGS_MAX_BYTES`].
    pub fn new() -> Self {
        Self::with_cap(SESSION_LOGS_MAX_BYTES)
    }

    /// A collector that keeps at most `cap` bytes (at least 1).
    pub fn with_cap(cap: usize) -> Self {
        Self { cap: cap.max(1), kept: Vec::new(), dropped: 0 }
    }

    /// Appends a chunk of output.
    pub fn push(&mut self, chunk: &[u8]) {
        if chunk.len() >= self.cap {
            self.dropped += (self.kept.len() + chunk.len() - self.cap) as u64;
            self.kept.clear();
            self.kept.extend_from_slice(&chunk[chunk.len() - self.cap..]);
            return;
        }
        self.kept.extend_from_slice(chunk);
        if self.kept.len() > 2 * self.cap {
            self.trim();
        }
    }

    fn trim(&mut self) {
        let excess = self.kept.len().saturating_sub(self.cap);
        if excess > 0 {
            self.kept.drain(..excess);
            self.dropped += excess as u64;
        }
    }

    /// The collected text: all of it, or its last bytes after the truncation line.
    pub fn finish(mut self) -> String {
        self.trim();
        if self.dropped == 0 {
            return String::from_utf8_lossy(&self.kept).into_owned();
        }
        // Start at a line boundary when the partial first line is short, and never in the
        // middle of a character.
        let window = &self.kept[..self.kept.len().saturating_sub(1).min(ALIGN_WINDOW)];
        let mut start = window.iter().position(|&b| b == b'\n').map_or(0, |i| i + 1);
        while self.kept.get(start).is_some_and(|b| b & 0b1100_0000 == 0b1000_0000) {
            start += 1;
        }
        let dropped = self.dropped + start as u64;
        let mut text = format!(
            "{LOGS_TRUNCATED} the first {dropped} bytes are left out; at most {} bytes are returned; ask for fewer \
             lines with tail, or read the engine's own logs]\n",
            self.cap
        );
        text.push_str(&String::from_utf8_lossy(&self.kept[start..]));
        text
    }
}

/// Caps a text that is already in memory as [`LogsCollector`] would.
pub fn cap_logs(text: &str) -> String {
    if text.len() <= SESSION_LOGS_MAX_BYTES {
        return text.to_owned();
    }
    let mut logs = LogsCollector::new();
    logs.push(text.as_bytes());
    logs.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_output_is_returned_whole() {
        let mut logs = LogsCollector::with_cap(100);
        logs.push(b"one\n");
        logs.push(b"two\n");
        assert_eq!(logs.finish(), "one\ntwo\n");
    }

    #[test]
    fn long_output_keeps_its_end_from_a_line_boundary_after_the_marker() {
        let mut logs = LogsCollector::with_cap(20);
        for i in 0..100 {
            logs.push(format!("line {i:03}\n").as_bytes());
        }
        let text = logs.finish();
        let (marker, rest) = text.split_once('\n').expect("a marker line");
        assert!(marker.starts_with(LOGS_TRUNCATED), "{marker}");
        assert_eq!(rest, "line 098\nline 099\n", "whole lines only");
        // 900 bytes written, 18 kept: 882 left out, counted exactly.
        assert!(marker.contains("the first 882 bytes are left out"), "{marker}");
        assert!(marker.contains("at most 20 bytes"), "{marker}");
    }

    #[test]
    fn one_line_longer_than_the_cap_keeps_its_end() {
        let mut logs = LogsCollector::with_cap(10);
        logs.push(b"start\n");
        logs.push(&[b'x'; 50]);
        logs.push(b"end\n");
        let text = logs.finish();
        assert_eq!(text.split_once('\n').map(|(_, rest)| rest), Some("xxxxxxend\n"));
    }

    #[test]
    fn a_character_split_between_chunks_stays_whole_and_a_cut_never_splits_one() {
        let mut logs = LogsCollector::with_cap(100);
        let text = "grüße\n".as_bytes();
        logs.push(&text[..3]);
        logs.push(&text[3..]);
        assert_eq!(logs.finish(), "grüße\n");

        // The last 5 bytes of 10 start inside an "é".
        let mut logs = LogsCollector::with_cap(5);
        logs.push("ééééé".as_bytes());
        let text = logs.finish();
        assert_eq!(text.split_once('\n').map(|(_, rest)| rest), Some("éé"));
    }

    #[test]
    fn memory_stays_within_twice_the_cap() {
        let mut logs = LogsCollector::with_cap(1000);
        for _ in 0..10_000 {
            logs.push(&[b'a'; 99]);
            assert!(logs.kept.len() <= 2000);
        }
    }
}
