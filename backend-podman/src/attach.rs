//! Attach and output for Podman: stdin through the session's stdin keeper (`stdin.rs`),
//! output from libpod's log endpoint with timestamps, decoded by backend-core's shared
//! decoder.
//!
//! libpod's log (k8s-file) as read here, measured on 4.3.1:
//! - timestamps have whole seconds only (`2026-12-01T11:17:02Z `), so many entries share
//!   one; the decoder counts them with the cursor's `skip`;
//! - conmon writes a line longer than its 8 KiB buffer as several partial entries, and the
//!   API sends one frame per entry (a partial one without, a full one with a trailing
//!   `\n`, which may be a frame of its own). The entries are written once, so two reads
//!   of the same log split it alike and entry counts are stable;
//! - `since` is exclusive at its exact time. The decoder asks from a second before the
//!   cursor's second, so every entry stamped like the cursor is replayed and counted.

use backend_core::{timestamped_lines, BackendError, OutputCursor, OutputDecoder, OutputLines, OutputStream, Result};
use futures_util::StreamExt;
use podman_api::conn::TtyChunk;
use podman_api::opts::ContainerLogsOpts;
use podman_api::Podman;
use time::OffsetDateTime;

use crate::error::{map_err, Subject};

/// How many log entries may wait for a slow reader before the engine read pauses.
const OUTPUT_BUFFER: usize = 256;

/// The session's log after `from`, as a stream that owns its engine connection. The
/// reading runs in a task of its own (podman-api's log stream borrows its container
/// handle) and ends when the reader is dropped.
pub(crate) fn output(podman: &Podman, session: &str, from: Option<OutputCursor>, follow: bool) -> OutputLines {
    let since = OutputDecoder::new(from).since_secs().unwrap_or(0).max(0);
    let mut builder = ContainerLogsOpts::builder().stdout(true).stderr(true).timestamps(true).follow(follow);
    if since > 0 {
        // libpod parses `since` as a time; RFC 3339 is what it documents.
        let at = OffsetDateTime::from_unix_timestamp(since).unwrap_or(OffsetDateTime::UNIX_EPOCH);
        builder = builder.since(backend_core::format_time(at));
    }
    let opts = builder.build();
    let container = podman.containers().get(session);
    let session = session.to_owned();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<(OutputStream, Vec<u8>)>>(OUTPUT_BUFFER);
    tokio::spawn(async move {
        let mut logs = container.logs(&opts);
        while let Some(chunk) = logs.next().await {
            let entry = match chunk {
                Ok(TtyChunk::StdOut(bytes)) => Ok((OutputStream::Stdout, bytes)),
                Ok(TtyChunk::StdErr(bytes)) => Ok((OutputStream::Stderr, bytes)),
                Ok(TtyChunk::StdIn(_)) => continue,
                Err(e) => Err(map_err(e, Subject::Session(&session))),
            };
            let failed = entry.is_err();
            if tx.send(entry).await.is_err() || failed {
                return;
            }
        }
    });
    let entries = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    timestamped_lines(entries, from)
}

/// The error for an attach to a session that is not running.
pub(crate) fn not_running(session: &str) -> BackendError {
    BackendError::engine(crate::error::NAME, format!("session {session} is not running; cannot attach"))
}
