//! Keeping a session's stdin open across attaches and daemon restarts: the stdin keeper.
//!
//! Podman 4.3's conmon closes a container's stdin as soon as an attach connection that
//! carries stdin ends (closed, half-closed, or detached with the detach keys; conmon has
//! `--leave-stdin-open`, but libpod never passes it), so the agent reads EOF and exits
//! when the first attach is dropped. Docker keeps stdin open. The backend therefore never
//! attaches with stdin itself. Per container it starts one *keeper*: a detached
//! `podman attach` whose stdin is a FIFO on this host, opened read-write (a FIFO that its
//! reader also holds open for writing never reads EOF), attached for the container's
//! whole run. Every [`SessionInput`] writes its lines into that FIFO.
//!
//! - The FIFO is `<stdin_dir>/<container id>.stdin` (mode 0600); the keeper's stderr goes
//!   to `<container id>.log` next to it.
//! - A keeper is alive exactly when the FIFO has a reader: opening it write-only and
//!   non-blocking succeeds (`ENXIO` means no reader).
//! - Starting one is serialized across processes and tasks by an exclusive `flock` on
//!   the directory, so one FIFO never gets two keepers (two readers would split lines).
//! - The keeper runs in a process group of its own and holds no descriptor of the
//!   daemon's, so it outlives the daemon; it ends when the container's main process does
//!   (conmon closes the attach). The backend reaps it while it lives.
//! - Where the service is on this host the keeper attaches *directly* (`podman
//!   --remote=false attach`: straight to conmon's attach socket), so it also outlives a
//!   restart of the Podman service. Where that fails (a remote service, another user's or
//!   another storage's containers) it attaches *through the service* (`podman --url
//!   <service> attach`), which a service restart ends.
//! - A new keeper counts as attached when libpod's `attach` event for the container
//!   arrives; a keeper that exits first failed, and its stderr says why.
//! - Lines are written whole under an exclusive `flock` on the FIFO, so lines of
//!   several inputs (of this process or another) never interleave.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use backend_core::{BackendError, Result, SessionInput};
use futures_util::StreamExt;
use podman_api::opts::{ContainerListOpts, EventsOpts};
use podman_api::Podman;
use rustix::fs::{FlockOperation, OFlags};
use time::OffsetDateTime;
use tracing::{debug, info, warn};

use crate::error::NAME;
use crate::events::since_param;

/// The keeper's detach sequence. `podman attach` always has one (an empty one is refused:
/// "invalid detach keys"), and a detach would close the container's stdin. libpod
/// matches the keys only against reads of exactly one byte each (eight NULs written one
/// at a time do detach a direct keeper); [`FifoInput`] writes each line with its newline
/// in one write, so no read is a lone NUL (and a JSON line has no raw NUL).
const DETACH_KEYS: &str = "ctrl-@,ctrl-@,ctrl-@,ctrl-@,ctrl-@,ctrl-@,ctrl-@,ctrl-@";

/// How long a new keeper may take to attach. libpod's `attach` event comes about 0.2 s
/// after the keeper starts (the file event logger is polled); a keeper still running
/// when this has passed without the event is taken as attached (an engine whose events
/// do not reach the service's stream, such as `events_logger = "none"`).
const ATTACH_WAIT: Duration = Duration::from_secs(5);

/// How much of a failed keeper's stderr an error quotes.
const LOG_QUOTE: usize = 2000;

/// How a keeper reaches the container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    /// `podman --remote=false attach`: straight to conmon, no service in between.
    Direct,
    /// `podman --url <service> attach`: through the service the backend talks to.
    Service,
}

impl fmt::Display for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Route::Direct => "direct",
            Route::Service => "through the service",
        })
    }
}

/// The stdin keepers of one backend.
#[derive(Debug)]
pub(crate) struct Keepers {
    dir: PathBuf,
    command: PathBuf,
    /// The service's address as the podman client spells it.
    url: String,
    /// Whether keepers try the direct route first: the service is on this host and no
    /// direct keeper has failed where one through the service then worked.
    direct: AtomicBool,
    wait: Duration,
}

/// What starting a keeper came to.
enum Started {
    /// A keeper is attached (this one, or one another process started meanwhile); the
    /// file writes to its FIFO.
    Attached(File),
    /// The keeper exited before it attached; why.
    Failed(String),
}

impl Keepers {
    pub(crate) fn new(dir: PathBuf, command: PathBuf, address: &str, local: bool, request_timeout: Duration) -> Self {
        let url = match address.strip_prefix("http://") {
            Some(host) => format!("tcp://{host}"),
            None => address.to_owned(),
        };
        Self { dir, command, url, direct: AtomicBool::new(local), wait: ATTACH_WAIT.min(request_timeout) }
    }

    fn fifo(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.stdin"))
    }

    fn log(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.log"))
    }

    /// An input to the stdin of container `id` (session `session`), through its keeper;
    /// one is started (and awaited, within a few seconds) when none is alive.
    pub(crate) async fn input(&self, podman: &Podman, session: &str, id: &str) -> Result<FifoInput> {
        check_id(id)?;
        let fifo = self.fifo(id);
        if let Some(file) = open_writer(&fifo).map_err(|e| self.fs_error("open", &fifo, e))? {
            debug!(session = %session, "The session's stdin keeper is alive; reusing it.");
            return Ok(FifoInput::new(file, session));
        }
        let routes: &[Route] =
            if self.direct.load(Ordering::Relaxed) { &[Route::Direct, Route::Service] } else { &[Route::Service] };
        let mut failures = Vec::new();
        for &route in routes {
            match self.start(podman, session, id, route).await? {
                Started::Attached(file) => {
                    if route == Route::Service && !failures.is_empty() {
                        info!(
                            failure = %failures.join("; "),
                            "Direct stdin keepers fail here; later keepers attach through the Podman service (a \
                             service restart then closes the sessions' stdin)."
                        );
                        self.direct.store(false, Ordering::Relaxed);
                    }
                    return Ok(FifoInput::new(file, session));
                }
                Started::Failed(why) => failures.push(format!("{route}: {why}")),
            }
        }
        Err(BackendError::engine(
            NAME,
            format!(
                "the stdin keeper of session {session} (`podman attach`) could not attach: {}",
                failures.join("; ")
            ),
        ))
    }

    /// Starts a keeper for `id` by `route` unless one is alive, and waits until it has
    /// attached or failed.
    async fn start(&self, podman: &Podman, session: &str, id: &str, route: Route) -> Result<Started> {
        let fifo = self.fifo(id);
        let dir = self.dir.clone();
        let lock = tokio::task::spawn_blocking(move || lock_dir(&dir))
            .await
            .map_err(|e| BackendError::engine(NAME, format!("locking the stdin directory: {e}")))?
            .map_err(|e| self.fs_error("create and lock", &self.dir, e))?;
        // Another task or process may have started one while this one waited.
        if let Some(file) = open_writer(&fifo).map_err(|e| self.fs_error("open", &fifo, e))? {
            return Ok(Started::Attached(file));
        }
        self.sweep(podman, id).await;
        make_fifo(&fifo).map_err(|e| self.fs_error("create the FIFO", &fifo, e))?;
        // O_RDWR: opening never blocks, and the FIFO never reads EOF while the keeper lives.
        let reader =
            OpenOptions::new().read(true).write(true).open(&fifo).map_err(|e| self.fs_error("open", &fifo, e))?;
        if !reader.metadata().map_err(|e| self.fs_error("inspect", &fifo, e))?.file_type().is_fifo() {
            return Err(self.fs_error("use", &fifo, io::Error::other("it exists and is not a FIFO")));
        }
        let log_path = self.log(id);
        let log = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&log_path)
            .map_err(|e| self.fs_error("create", &log_path, e))?;

        let mut command = tokio::process::Command::new(&self.command);
        command.env_remove("CONTAINER_CONNECTION");
        match route {
            Route::Direct => {
                command.env_remove("CONTAINER_HOST").arg("--remote=false");
            }
            Route::Service => {
                command.arg("--url").arg(&self.url);
            }
        }
        command
            .args(["attach", "--sig-proxy=false", &format!("--detach-keys={DETACH_KEYS}"), id])
            .stdin(Stdio::from(reader))
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            // Its own process group: signals to the daemon's group (a terminal's ^C, a
            // supervisor stopping the daemon) do not reach it.
            .process_group(0)
            .kill_on_drop(false);
        // Events from a second before the start, in case the service's clock is behind.
        let since = OffsetDateTime::now_utc() - Duration::from_secs(1);
        let began = Instant::now();
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(self.missing_cli(session, e)),
            Err(e) => {
                return Err(BackendError::Engine {
                    backend: NAME,
                    message: format!(
                        "starting the stdin keeper of session {session} ({}): {e}",
                        self.command.display()
                    ),
                    source: Some(Box::new(e)),
                })
            }
        };
        // The command still holds this daemon's read end of the FIFO: without dropping it,
        // the FIFO would have a reader whatever the keeper does, and the check below that
        // the keeper still holds it could not fail.
        drop(command);
        // The keeper holds the FIFO open now: later callers see it alive.
        drop(lock);
        let pid = child.id();
        let (exited_tx, exited) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            // Reaps the keeper whenever it ends, and tells the wait below if that is first.
            let status = child.wait().await;
            let _ = exited_tx.send(status);
        });
        let outcome = tokio::select! {
            () = attach_event(podman.clone(), id.to_owned(), since) => Ok(()),
            status = exited => Err(status),
            () = tokio::time::sleep(self.wait) => {
                warn!(
                    session = %session,
                    pid,
                    "No attach event from Podman within {:?}; the stdin keeper is running, so it is taken as attached.",
                    self.wait
                );
                Ok(())
            }
        };
        match outcome {
            Ok(()) => {
                info!(session = %session, pid, route = %route, took_ms = began.elapsed().as_millis() as u64, "Started the session's stdin keeper.");
                match open_writer(&fifo).map_err(|e| self.fs_error("open", &fifo, e))? {
                    Some(file) => Ok(Started::Attached(file)),
                    None => Ok(Started::Failed("it exited right after it attached".into())),
                }
            }
            Err(status) => {
                let status = match status {
                    Ok(Ok(status)) => status.to_string(),
                    Ok(Err(e)) => format!("unknown exit ({e})"),
                    Err(_) => "unknown exit".to_owned(),
                };
                let said = read_quote(&log_path);
                debug!(session = %session, route = %route, status = %status, stderr = %said, "A stdin keeper exited before it attached.");
                Ok(Started::Failed(if said.is_empty() { status } else { format!("{status}: {said}") }))
            }
        }
    }

    /// Removes the FIFOs and logs of containers that no longer exist and whose keeper is
    /// gone (a session removed while no daemon ran). One container listing, only when
    /// there is something to check.
    async fn sweep(&self, podman: &Podman, keep: &str) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        let mut candidates: Vec<String> = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(id) = name.strip_suffix(".stdin").or_else(|| name.strip_suffix(".log")) else { continue };
            if id == keep || check_id(id).is_err() || candidates.iter().any(|c| c == id) {
                continue;
            }
            if matches!(open_writer(&self.fifo(id)), Ok(Some(_))) {
                continue; // its keeper lives
            }
            candidates.push(id.to_owned());
        }
        if candidates.is_empty() {
            return;
        }
        let containers = podman.containers();
        let opts = ContainerListOpts::builder().all(true).build();
        let existing: Vec<String> = match tokio::time::timeout(self.wait, containers.list(&opts)).await {
            Ok(Ok(list)) => list.into_iter().filter_map(|c| c.id).collect(),
            Ok(Err(e)) => {
                debug!(error = %e, "Cannot list containers; stale stdin FIFOs stay for now.");
                return;
            }
            Err(_) => {
                debug!("The container listing timed out; stale stdin FIFOs stay for now.");
                return;
            }
        };
        for id in candidates.iter().filter(|id| !existing.contains(id)) {
            debug!(container = %id, "Removing the stdin FIFO of a container that no longer exists.");
            self.forget(id);
        }
    }

    /// Removes the FIFO and log of container `id` (it was removed: its keeper has ended
    /// or is ending).
    pub(crate) fn forget(&self, id: &str) {
        if check_id(id).is_err() {
            return;
        }
        for path in [self.fifo(id), self.log(id)] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => warn!(path = %path.display(), error = %e, "Cannot remove a stdin keeper file."),
            }
        }
    }

    fn fs_error(&self, what: &str, path: &Path, e: io::Error) -> BackendError {
        BackendError::Engine {
            backend: NAME,
            message: format!(
                "cannot {what} {}: {e} (the stdin keepers' directory, PodmanConfig::stdin_dir, is {}; agentd must be \
                 able to create it and write there)",
                path.display(),
                self.dir.display()
            ),
            source: Some(Box::new(e)),
        }
    }

    fn missing_cli(&self, session: &str, e: io::Error) -> BackendError {
        BackendError::Engine {
            backend: NAME,
            message: format!(
                "cannot attach to session {session}: the Podman command-line client `{}` is not installed here ({e}). \
                 Podman closes a container's stdin when an attach ends, so agentd keeps each session's stdin open \
                 with a `podman attach` of its own: install the `podman` package (the client, the service's version) \
                 on this host, or set PodmanConfig::podman_command to its path",
                self.command.display()
            ),
            source: Some(Box::new(e)),
        }
    }
}

/// Container ids are hex; anything else is not made into a path.
fn check_id(id: &str) -> Result<()> {
    if !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(BackendError::engine(NAME, format!("unexpected container id {id:?}")))
    }
}

/// Creates the directory (0700) if needed and takes its exclusive lock, held while the
/// returned file is open.
fn lock_dir(dir: &Path) -> io::Result<File> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let file = File::open(dir)?;
    rustix::fs::flock(&file, FlockOperation::LockExclusive)?;
    Ok(file)
}

fn make_fifo(path: &Path) -> io::Result<()> {
    match rustix::fs::mkfifoat(rustix::fs::CWD, path, rustix::fs::Mode::from_raw_mode(0o600)) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::EXIST) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The FIFO opened for writing (blocking) when it has a reader (a keeper); `None` when
/// it has none or does not exist.
fn open_writer(path: &Path) -> io::Result<Option<File>> {
    match OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(path) {
        Ok(file) => {
            if !file.metadata()?.file_type().is_fifo() {
                return Err(io::Error::other("it exists and is not a FIFO"));
            }
            let flags = rustix::fs::fcntl_getfl(&file)?;
            rustix::fs::fcntl_setfl(&file, flags - OFlags::NONBLOCK)?;
            Ok(Some(file))
        }
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) || e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Resolves when libpod reports an attach to container `id` since `since`; never when
/// the event stream fails (the caller's deadline decides then).
async fn attach_event(podman: Podman, id: String, since: OffsetDateTime) {
    let filters = [("container".to_owned(), vec![id.clone()]), ("event".to_owned(), vec!["attach".to_owned()])];
    let opts = EventsOpts::builder().stream(true).since(since_param(since)).filters(filters).build();
    let mut events = podman.events(&opts);
    while let Some(event) = events.next().await {
        match event {
            Ok(event) if event.action == "attach" && event.actor.id == id => return,
            Ok(_) => {}
            Err(e) => {
                debug!(error = %e, "The event stream failed while waiting for a stdin keeper to attach.");
                break;
            }
        }
    }
    std::future::pending::<()>().await
}

/// The end of a keeper's stderr, on one line.
fn read_quote(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(file) = File::open(path) {
        let mut bytes = Vec::new();
        let _ = file.take(64 * 1024).read_to_end(&mut bytes);
        text = String::from_utf8_lossy(&bytes).split_whitespace().collect::<Vec<_>>().join(" ");
    }
    if text.len() > LOG_QUOTE {
        let mut cut = text.len() - LOG_QUOTE;
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        text = format!("...{}", &text[cut..]);
    }
    text
}

/// Writes lines to a session's stdin FIFO, each whole under an exclusive lock on the
/// FIFO, in a blocking task: a line is written entirely even when the caller stops
/// waiting, and while the session does not read its stdin the write waits.
pub(crate) struct FifoInput {
    file: Arc<File>,
    session: String,
}

impl FifoInput {
    fn new(file: File, session: &str) -> Self {
        Self { file: Arc::new(file), session: session.to_owned() }
    }
}

impl fmt::Debug for FifoInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FifoInput").field("session", &self.session).finish_non_exhaustive()
    }
}

fn write_line(file: &File, bytes: &[u8]) -> io::Result<()> {
    rustix::fs::flock(file, FlockOperation::LockExclusive)?;
    let written = (&*file).write_all(bytes);
    let _ = rustix::fs::flock(file, FlockOperation::Unlock);
    written
}

#[async_trait]
impl SessionInput for FifoInput {
    async fn send_line(&mut self, line: &str) -> Result<()> {
        if line.contains('\n') {
            return Err(BackendError::InvalidSpec {
                field: "line",
                message: "a line written to a session must not contain a newline".into(),
            });
        }
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        let file = Arc::clone(&self.file);
        match tokio::task::spawn_blocking(move || write_line(&file, &bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(BackendError::Unavailable {
                backend: NAME,
                message: format!(
                    "writing to the stdin of session {} failed: {e} (its stdin keeper has ended: the session ended or \
                     the keeper was killed; attach again)",
                    self.session
                ),
                source: Some(Box::new(e)),
            }),
            Err(e) => {
                Err(BackendError::engine(NAME, format!("the stdin writer of session {} failed: {e}", self.session)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("agentd-stdin-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_fifo_without_a_reader_has_no_keeper_and_one_with_a_reader_has() {
        let dir = scratch("reader");
        let _lock = lock_dir(&dir).expect("lock");
        let fifo = dir.join("abc.stdin");
        assert!(open_writer(&fifo).expect("missing").is_none(), "no FIFO: no keeper");
        make_fifo(&fifo).expect("mkfifo");
        make_fifo(&fifo).expect("an existing FIFO is fine");
        assert!(open_writer(&fifo).expect("no reader").is_none(), "ENXIO: no keeper");
        let reader = OpenOptions::new().read(true).write(true).open(&fifo).expect("reader");
        let writer = open_writer(&fifo).expect("open").expect("a reader: a keeper");
        write_line(&writer, b"hello\n").expect("write");
        let mut got = [0u8; 6];
        (&reader).read_exact(&mut got).expect("read");
        assert_eq!(&got, b"hello\n");
        drop(reader);
        let regular = dir.join("def.stdin");
        std::fs::write(&regular, b"").expect("file");
        assert!(open_writer(&regular).is_err(), "a regular file is never written to as stdin");
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn the_directory_lock_excludes_a_second_holder() {
        let dir = scratch("lock");
        let first = lock_dir(&dir).expect("lock");
        let second = File::open(&dir).expect("open");
        assert!(rustix::fs::flock(&second, FlockOperation::NonBlockingLockExclusive).is_err());
        drop(first);
        rustix::fs::flock(&second, FlockOperation::NonBlockingLockExclusive).expect("free again");
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[test]
    fn only_hex_ids_become_paths() {
        assert!(check_id("0123abcdef").is_ok());
        assert!(check_id("../etc/passwd").is_err());
        assert!(check_id("").is_err());
    }

    #[test]
    fn an_http_address_is_spelt_tcp_for_the_client() {
        let k = Keepers::new("/x".into(), "podman".into(), "http://h:8080", false, Duration::from_secs(30));
        assert_eq!(k.url, "tcp://h:8080");
        let k =
            Keepers::new("/x".into(), "podman".into(), "unix:///run/podman/podman.sock", true, Duration::from_secs(1));
        assert_eq!(k.url, "unix:///run/podman/podman.sock");
        assert_eq!(k.wait, Duration::from_secs(1));
    }
}
