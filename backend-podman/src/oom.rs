//! Telling OOM kills on engines that do not report them.
//!
//! Podman before 5.0 never sets `State.OOMKilled` and emits no `oom` event
//! (containers/podman#13102): an OOM-killed container reads exit 137 like any SIGKILL.
//! Exit 137 alone proves nothing (`podman kill` gives the same), so the backend looks for
//! the kernel's own record instead: every memory-cgroup OOM kill writes a line
//!
//! ```text
//! oom-kill:constraint=CONSTRAINT_MEMCG,...,oom_memcg=/libpod_parent/libpod-<id>,task_memcg=/libpod_parent/libpod-<id>,task=agent,pid=1254,uid=65534
//! ```
//!
//! to the kernel log (`/dev/kmsg`), naming the container's cgroup. A container is
//! reported OOM-killed when it exited 137 and the kernel log holds such a record for its
//! cgroup written after it started; the exit's `error` names the record. Where the log
//! cannot be read (a remote engine, `dmesg_restrict` without the right privileges) the
//! backend cannot tell and declares `oom_detection: false`. Where the engine sets the
//! flag (Podman 5.0 and later) the flag is used as is.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use backend_core::{format_time, SessionExitInfo};
use time::OffsetDateTime;
use tracing::{debug, info};

/// The kernel log device.
const KMSG: &str = "/dev/kmsg";

/// How many OOM records are kept (the oldest are dropped first).
const KEEP_RECORDS: usize = 4096;

/// How many verdicts are cached before the cache is cleared.
const KEEP_VERDICTS: usize = 4096;

/// A record counts for a container only if it was written after the container started,
/// give or take this much (plus the drift allowance of [`clock_slack`]).
const CLOCK_SLACK: Duration = Duration::from_secs(2);

/// The exit code of a SIGKILLed main process, which an OOM kill is.
const SIGKILL_EXIT: i64 = 137;

/// One `oom-kill:` record of the kernel log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OomRecord {
    /// Microseconds since boot.
    pub at_us: u64,
    /// The memory cgroup whose limit was hit (`oom_memcg`).
    pub oom_memcg: String,
    /// The cgroup of the killed task (`task_memcg`).
    pub task_memcg: String,
    /// The killed task's name and pid.
    pub task: String,
    pub pid: String,
}

impl OomRecord {
    /// Whether the record is about the container with this id (its cgroup under
    /// cgroupfs is `.../libpod-<id>`, under systemd `.../libpod-<id>.scope`).
    fn is_about(&self, container_id: &str) -> bool {
        let needle = format!("libpod-{container_id}");
        let names = |memcg: &str| {
            memcg.split('/').any(|part| part == needle || part.strip_prefix(needle.as_str()) == Some(".scope"))
        };
        !container_id.is_empty() && (names(&self.oom_memcg) || names(&self.task_memcg))
    }
}

/// Parses one `/dev/kmsg` record (`prio,seq,usec,flags;message`) into an OOM record.
pub(crate) fn parse_record(record: &str) -> Option<OomRecord> {
    let (header, message) = record.split_once(';')?;
    let message = message.lines().next()?.trim();
    let fields = message.strip_prefix("oom-kill:")?;
    let at_us = header.split(',').nth(2)?.trim().parse().ok()?;
    let mut found = HashMap::new();
    for field in fields.split(',') {
        if let Some((key, value)) = field.split_once('=') {
            found.insert(key.trim(), value.trim());
        }
    }
    let get = |key: &str| found.get(key).map(|v| (*v).to_owned()).unwrap_or_default();
    Some(OomRecord {
        at_us,
        oom_memcg: get("oom_memcg"),
        task_memcg: get("task_memcg"),
        task: get("task"),
        pid: get("pid"),
    })
}

/// The kernel log, read incrementally through one non-blocking descriptor shared by every
/// backend in the process; only OOM records are kept.
#[derive(Debug)]
struct KernelLog {
    state: Mutex<LogState>,
}

#[derive(Debug)]
struct LogState {
    file: File,
    records: VecDeque<OomRecord>,
}

fn open_kmsg(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)
}

impl KernelLog {
    /// The process's kernel log reader, or why it cannot read the log.
    fn shared() -> Result<&'static KernelLog, String> {
        static LOG: OnceLock<Result<KernelLog, String>> = OnceLock::new();
        LOG.get_or_init(|| {
            let file = open_kmsg(Path::new(KMSG)).map_err(|e| format!("cannot open {KMSG}: {e}"))?;
            let log = KernelLog { state: Mutex::new(LogState { file, records: VecDeque::new() }) };
            log.refresh().map_err(|e| format!("cannot read {KMSG}: {e}"))?;
            Ok(log)
        })
        .as_ref()
        .map_err(Clone::clone)
    }

    /// Reads every record written since the last call (all the kernel still has, the
    /// first time) and keeps the OOM records.
    fn refresh(&self) -> std::io::Result<()> {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match state.file.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => {
                    if let Some(record) = parse_record(&String::from_utf8_lossy(&buf[..n])) {
                        debug!(memcg = %record.oom_memcg, task = %record.task, "Kernel OOM record.");
                        if state.records.len() == KEEP_RECORDS {
                            state.records.pop_front();
                        }
                        state.records.push_back(record);
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                // The kernel overwrote records before they were read: skip them.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The newest OOM record about the container, written after `since` (boot-relative
    /// microseconds).
    fn find(&self, container_id: &str, since_us: Option<u64>) -> std::io::Result<Option<OomRecord>> {
        self.refresh()?;
        let state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        Ok(state
            .records
            .iter()
            .rev()
            .find(|r| r.is_about(container_id) && since_us.is_none_or(|since| r.at_us >= since))
            .cloned())
    }
}

/// The kernel stamps log records with its scheduler clock, which like `CLOCK_MONOTONIC`
/// (and unlike `/proc/uptime`'s boot time) stops while the host is suspended: the wall
/// time at which that clock read zero, and how long it has run.
fn monotonic_origin() -> (OffsetDateTime, Duration) {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let running = Duration::new(u64::try_from(now.tv_sec).unwrap_or(0), u32::try_from(now.tv_nsec).unwrap_or(0));
    (OffsetDateTime::now_utc() - running, running)
}

/// The scheduler clock drifts from `CLOCK_MONOTONIC` by some parts per million; a record
/// still counts if it is this much older than the container's start.
fn clock_slack(running: Duration) -> Duration {
    CLOCK_SLACK + running / 10_000
}

/// Microseconds on the kernel log's clock of a wall-clock time, less the slack (before
/// the clock started reads as 0).
fn log_clock_us(at: OffsetDateTime) -> u64 {
    let (origin, running) = monotonic_origin();
    let since = at - origin - clock_slack(running);
    u64::try_from(since.whole_microseconds()).unwrap_or(0)
}

/// How OOM kills are told on this engine.
#[derive(Debug)]
pub(crate) struct OomJudge {
    /// The engine sets `OOMKilled` itself (Podman 5.0 and later).
    engine_sets_flag: bool,
    /// The engine's kernel log, when it is readable here.
    kernel_log: Option<&'static KernelLog>,
    /// Verdicts by container id and start time: exit info stays the same however often
    /// it is read, even after the kernel's ring buffer has moved on.
    verdicts: Mutex<HashMap<(String, i64), Option<String>>>,
}

impl OomJudge {
    /// A judge for an engine of `major` version, at an address on this host or not.
    pub(crate) fn new(engine_major: u64, engine_is_local: bool) -> Self {
        let engine_sets_flag = engine_major >= 5;
        let kernel_log = if engine_sets_flag {
            None
        } else if !engine_is_local {
            info!("The Podman service is remote: its kernel log is not readable here, so OOM kills cannot be told.");
            None
        } else {
            match KernelLog::shared() {
                Ok(log) => Some(log),
                Err(why) => {
                    info!(reason = %why, "The kernel log is not readable: OOM kills cannot be told on this Podman.");
                    None
                }
            }
        };
        Self { engine_sets_flag, kernel_log, verdicts: Mutex::new(HashMap::new()) }
    }

    /// Whether OOM kills are reported truthfully: by the engine's flag, or from the
    /// kernel log.
    pub(crate) fn can_detect(&self) -> bool {
        self.engine_sets_flag || self.kernel_log.is_some()
    }

    /// Whether `refine` may need to read the kernel log for this exit.
    pub(crate) fn needs_evidence(&self, exit: &SessionExitInfo) -> bool {
        !exit.oom_killed && !self.engine_sets_flag && exit.exit_code == Some(SIGKILL_EXIT)
    }

    /// Whether a listed exit (the listing has no OOM flag) must be left to an inspection:
    /// a SIGKILL exit on an engine whose flag is the only evidence.
    pub(crate) fn listing_cannot_tell(&self, exit: &SessionExitInfo) -> bool {
        self.engine_sets_flag && exit.exit_code == Some(SIGKILL_EXIT)
    }

    /// Sets `exit.oom_killed` (and says in `exit.error` what the verdict rests on) for
    /// the container `id` started at `started_at`.
    pub(crate) async fn refine(&self, id: &str, started_at: Option<OffsetDateTime>, exit: &mut SessionExitInfo) {
        if exit.oom_killed {
            exit.error.get_or_insert_with(|| "OOM kill reported by the engine (State.OOMKilled)".to_owned());
            return;
        }
        if !self.needs_evidence(exit) {
            return;
        }
        let Some(log) = self.kernel_log else {
            return;
        };
        let key = (id.to_owned(), started_at.map_or(0, OffsetDateTime::unix_timestamp));
        let cached = self.verdicts.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&key).cloned();
        let evidence = match cached {
            Some(evidence) => evidence,
            None => {
                let id_owned = id.to_owned();
                let since = started_at.map(log_clock_us);
                let found = tokio::task::spawn_blocking(move || log.find(&id_owned, since)).await;
                let evidence = match found {
                    Ok(Ok(record)) => record.map(|r| describe(&r)),
                    // Unreadable this time: no verdict, none cached; the next read retries.
                    Ok(Err(e)) => {
                        debug!(error = %e, "Could not read the kernel log.");
                        return;
                    }
                    Err(_) => return,
                };
                let mut verdicts = self.verdicts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if verdicts.len() >= KEEP_VERDICTS {
                    verdicts.clear();
                }
                verdicts.insert(key, evidence.clone());
                evidence
            }
        };
        if let Some(evidence) = evidence {
            exit.oom_killed = true;
            exit.error = Some(match exit.error.take() {
                Some(engine) => format!("{evidence}; engine error: {engine}"),
                None => evidence,
            });
        }
    }
}

/// The evidence an OOM verdict rests on, for `SessionExitInfo::error`.
fn describe(record: &OomRecord) -> String {
    let (origin, _) = monotonic_origin();
    let at = origin
        .checked_add(time::Duration::microseconds(i64::try_from(record.at_us).unwrap_or(i64::MAX)))
        .map_or_else(|| format!("{} us after boot", record.at_us), format_time);
    format!(
        "OOM kill told from the kernel log ({KMSG}): oom-kill of task {} (pid {}) in memory cgroup {} at {at}; \
         Podman < 5.0 does not set OOMKilled (containers/podman#13102)",
        record.task, record.pid, record.oom_memcg
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "2aa014b7b56995554e3c60ef333693556788c9f31fbd33705bc7676d60cd574b";

    fn record(memcg: &str) -> String {
        format!(
            "6,1427,2308174119,-;oom-kill:constraint=CONSTRAINT_MEMCG,nodemask=(null),cpuset=libpod-{ID},mems_allowed=0,\
             oom_memcg={memcg},task_memcg={memcg},task=agent,pid=1254,uid=65534\n"
        )
    }

    #[test]
    fn the_clock_slack_grows_with_the_time_the_clock_has_run() {
        assert_eq!(clock_slack(Duration::ZERO), CLOCK_SLACK);
        assert_eq!(clock_slack(Duration::from_secs(10 * 86_400)), CLOCK_SLACK + Duration::from_millis(86_400));
        let (origin, running) = monotonic_origin();
        assert!(origin <= OffsetDateTime::now_utc() && running > Duration::ZERO);
        assert_eq!(log_clock_us(origin - Duration::from_secs(60)), 0, "before the clock started");
    }

    #[test]
    fn kernel_oom_records_are_parsed() {
        let parsed = parse_record(&record(&format!("/libpod_parent/libpod-{ID}"))).expect("an OOM record");
        assert_eq!(parsed.at_us, 2_308_174_119);
        assert_eq!(parsed.task, "agent");
        assert_eq!(parsed.pid, "1254");
        assert!(parsed.is_about(ID));
        assert!(!parsed.is_about("2aa014b7b569"), "a prefix of the id is not the container");
        assert!(!parsed.is_about(""));
        let scope = parse_record(&record(&format!("/machine.slice/libpod-{ID}.scope"))).expect("record");
        assert!(scope.is_about(ID), "the systemd cgroup manager's scope");
        let conmon = parse_record(&record(&format!("/libpod_parent/libpod-conmon-{ID}"))).expect("record");
        assert!(!conmon.is_about(ID), "conmon's cgroup is not the container's");
        assert_eq!(parse_record("4,1348,2308173712,-;agent invoked oom-killer: gfp_mask=0xcc0"), None);
        assert_eq!(parse_record("garbage"), None);
    }

    #[tokio::test]
    async fn only_a_sigkill_exit_is_looked_into() {
        let judge = OomJudge { engine_sets_flag: false, kernel_log: None, verdicts: Mutex::new(HashMap::new()) };
        assert!(!judge.can_detect());
        assert!(!judge.needs_evidence(&SessionExitInfo::exited(3, None)));
        assert!(judge.needs_evidence(&SessionExitInfo::exited(137, None)));
        let mut exit = SessionExitInfo::exited(137, None);
        judge.refine(ID, None, &mut exit).await;
        assert!(!exit.oom_killed, "no evidence, no OOM");
        let mut flagged = SessionExitInfo { oom_killed: true, ..SessionExitInfo::exited(137, None) };
        judge.refine(ID, None, &mut flagged).await;
        assert!(flagged.oom_killed);
        assert!(flagged.error.as_deref().is_some_and(|e| e.contains("OOMKilled")), "{flagged:?}");
    }
}
