//! The stdin keeper (see `src/stdin.rs`): Podman 4.3 closes a container's stdin when an
//! attach ends, so the backend holds it open with one detached `podman attach` per
//! session. These tests show that the session's stdin (and the same agent process)
//! survives a dropped attach, the death of the process that attached, and a restart of
//! the Podman service; that keepers are reused and cleaned up; that lines of two inputs
//! never interleave; and that a missing podman client is a clear error.

mod common;

use std::io::{BufRead, BufReader};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use backend_core::conformance::wait_for;
use backend_core::{BackendError, ExecutionBackend, OwnershipLabels, SessionSpec, SessionStatus};
use backend_podman::{PodmanBackend, PodmanConfig, DEFAULT_STDIN_DIR};
use futures_util::{FutureExt, StreamExt};

const PATIENCE: Duration = Duration::from_secs(60);

/// Set in the environment of this binary when it runs as the helper that attaches and is
/// killed: `SESSION PREFIX INSTANCE`.
const HELPER_ENV: &str = "AGENTD_PODMAN_STDIN_HELPER";
const HELPER_TEST: &str = "helper_attaches_sends_and_waits_to_be_killed";
const HELPER_SENT: &str = "HELPER-SENT";

fn owner_for_run() -> OwnershipLabels {
    let run = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
    OwnershipLabels::new(format!("sk{run}"), format!("inst-{run}")).expect("labels")
}

async fn connect(owner: &OwnershipLabels, config: PodmanConfig) -> PodmanBackend {
    PodmanBackend::connect(config, owner.clone()).await.expect("connect to Podman")
}

/// Runs `body` with a backend of a fresh owner, then removes every session of that owner.
async fn scene<F>(body: F)
where
    F: AsyncFnOnce(&PodmanBackend),
{
    let Some(_harness) = common::harness().await else { return };
    let owner = owner_for_run();
    let backend = connect(&owner, PodmanConfig::default()).await;
    let outcome = AssertUnwindSafe(body(&backend)).catch_unwind().await;
    if let Err(e) = backend.shutdown_all_sessions(Duration::ZERO).await {
        eprintln!("cleanup: {e}");
    }
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

fn stdio_spec(backend: &PodmanBackend, name: &str) -> SessionSpec {
    let mut spec = SessionSpec::new(format!("{}-{name}", backend.prefix()), name, common::IMAGE);
    spec.stdin_open = true;
    spec.env.insert("ECHO_STDIO".into(), "1".into());
    spec.stop_grace = Duration::from_secs(1);
    spec
}

async fn start(backend: &PodmanBackend, spec: &SessionSpec) -> String {
    let id = backend.create_session(spec).await.expect("create");
    backend.start_session(&spec.session).await.expect("start");
    id
}

fn user_line(text: &str) -> String {
    serde_json::json!({"type": "user", "message": {"role": "user", "content": text}, "parent_tool_use_id": null, "session_id": ""})
        .to_string()
}

/// The session's whole output so far, one string per line.
async fn output_lines(backend: &PodmanBackend, session: &str) -> Vec<String> {
    let out = backend.session_output(session, None, false).await.expect("output");
    out.filter_map(|l| async move { l.ok().map(|l| l.text) }).collect().await
}

/// Waits until a line of the session's output contains `needle`, and returns that line.
async fn wait_line(backend: &PodmanBackend, session: &str, needle: &str) -> String {
    wait_for(PATIENCE, &format!("{needle:?} in the output of {session}"), || async {
        let lines = output_lines(backend, session).await;
        lines.into_iter().find(|l| l.contains(needle)).ok_or_else(|| "not yet".to_owned())
    })
    .await
}

/// The `msg_N` id of an echo agent's answer: the agent process counts its messages, so
/// consecutive numbers prove one process answered both.
fn message_number(answer: &str) -> u64 {
    let value: serde_json::Value = serde_json::from_str(answer).expect("an answer is JSON");
    let id = value["message"]["id"].as_str().expect("message id");
    id.strip_prefix("msg_").and_then(|n| n.parse().ok()).expect("msg_N")
}

fn fifo(id: &str) -> PathBuf {
    Path::new(DEFAULT_STDIN_DIR).join(format!("{id}.stdin"))
}

/// The pids of the keeper processes attached to container `id`.
fn keepers_of(id: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.contains(&b"attach".as_slice()) && args.contains(&id.as_bytes()) {
            pids.push(pid);
        }
    }
    pids
}

/// Whether the keeper `pid` attaches straight to conmon (not through the service).
fn is_direct(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == b"--remote=false"))
}

async fn running(backend: &PodmanBackend, session: &str) -> bool {
    backend.session_state(session).await.is_ok_and(|s| s.status == SessionStatus::Running)
}

/// The helper process, killed when the test ends however it ends.
struct Helper(std::process::Child);

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Not a test of its own: the process the next test starts and kills. Without its
/// environment variable it does nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helper_attaches_sends_and_waits_to_be_killed() {
    let Ok(args) = std::env::var(HELPER_ENV) else { return };
    let [session, prefix, instance]: [&str; 3] =
        args.split(' ').collect::<Vec<_>>().try_into().expect("SESSION PREFIX INSTANCE");
    let owner = OwnershipLabels::new(prefix, instance).expect("labels");
    let backend = connect(&owner, PodmanConfig::default()).await;
    let mut attach = backend.attach_session(session, None).await.expect("helper: attach");
    attach.input.send_line(&user_line("from-the-helper")).await.expect("helper: send");
    println!("{HELPER_SENT}");
    // Killed here, attached, with SIGKILL: nothing of it gets to clean up.
    tokio::time::sleep(Duration::from_secs(600)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_outlives_the_process_that_attached_and_the_same_agent_answers_again() {
    scene(async |backend| {
        let spec = stdio_spec(backend, "survive");
        let id = start(backend, &spec).await;
        let owner = backend.ownership();
        // Another process attaches, writes a line and is killed while attached.
        let mut helper = Helper(
            Command::new(std::env::current_exe().expect("test binary"))
                .args([HELPER_TEST, "--exact", "--nocapture", "--test-threads=1"])
                .env(HELPER_ENV, format!("{} {} {}", spec.session, owner.prefix(), owner.instance()))
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("start the helper"),
        );
        let stdout = helper.0.stdout.take().expect("helper stdout");
        // libtest prints the test's name and then, on the same line, what it prints.
        let sent = tokio::task::spawn_blocking(move || {
            BufReader::new(stdout).lines().map_while(Result::ok).any(|l| l.contains(HELPER_SENT))
        });
        let sent = tokio::time::timeout(PATIENCE, sent).await.expect("the helper sends in time").expect("reader");
        assert!(sent, "the helper ended without sending");
        let first = wait_line(backend, &spec.session, "echo: from-the-helper").await;
        let keepers = keepers_of(&id);
        assert_eq!(keepers.len(), 1, "one keeper per session: {keepers:?}");
        helper.0.kill().expect("kill the helper");
        helper.0.wait().expect("reap the helper");

        // The agent still runs with its stdin open, and its keeper outlived the helper.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(running(backend, &spec.session).await, "the agent exited when the attaching process died");
        assert_eq!(keepers_of(&id), keepers, "the keeper died with the process that started it");

        // A new attach (another process) reuses the keeper and reaches the same agent.
        let began = Instant::now();
        let mut again = backend.attach_session(&spec.session, None).await.expect("attach again");
        let reused = began.elapsed();
        again.input.send_line(&user_line("after-the-helper-died")).await.expect("send again");
        let second = wait_line(backend, &spec.session, "echo: after-the-helper-died").await;
        assert_eq!(message_number(&second), message_number(&first) + 1, "another agent process answered");
        assert_eq!(keepers_of(&id), keepers, "the keeper was not reused");
        eprintln!("attach with a reused keeper: {reused:?}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepers_are_reused_then_end_with_their_session_and_leave_no_files() {
    scene(async |backend| {
        let spec = stdio_spec(backend, "reuse");
        let id = start(backend, &spec).await;
        let mut fresh = Vec::new();
        let mut reused = Vec::new();
        let began = Instant::now();
        let mut attach = backend.attach_session(&spec.session, None).await.expect("attach");
        fresh.push(began.elapsed());
        let keeper = keepers_of(&id);
        assert_eq!(keeper.len(), 1, "{keeper:?}");
        assert!(fifo(&id).exists());
        for round in 0..5 {
            attach.input.send_line(&user_line(&format!("round-{round}"))).await.expect("send");
            wait_line(backend, &spec.session, &format!("echo: round-{round}")).await;
            drop(attach);
            let began = Instant::now();
            attach = backend.attach_session(&spec.session, None).await.expect("attach again");
            reused.push(began.elapsed());
            assert_eq!(keepers_of(&id), keeper, "round {round}: the keeper was replaced");
        }
        drop(attach);
        // Fresh keepers for a few more sessions, for the numbers.
        for n in 0..3 {
            let other = stdio_spec(backend, &format!("fresh{n}"));
            start(backend, &other).await;
            let began = Instant::now();
            let _attach = backend.attach_session(&other.session, None).await.expect("attach");
            fresh.push(began.elapsed());
        }
        eprintln!("attach with a fresh keeper: {fresh:?}");
        eprintln!("attach with a reused keeper: {reused:?}");
        assert!(reused.iter().all(|t| *t < Duration::from_secs(2)), "{reused:?}");

        // A stopped session's keeper ends with it; removal takes its files.
        backend.stop_session(&spec.session, Duration::from_secs(1)).await.expect("stop");
        wait_for(PATIENCE, "the keeper to end with its session", || async {
            if keepers_of(&id).is_empty() {
                Ok(())
            } else {
                Err("still running".to_owned())
            }
        })
        .await;
        match backend.attach_session(&spec.session, None).await {
            Err(BackendError::Engine { message, .. }) => assert!(message.contains("not running"), "{message}"),
            other => panic!("attach to a stopped session: {:?}", other.map(|_| ())),
        }
        backend.remove_session(&spec.session).await.expect("remove");
        assert!(!fifo(&id).exists(), "the FIFO outlived its session");
        assert!(!Path::new(DEFAULT_STDIN_DIR).join(format!("{id}.log")).exists(), "the log outlived its session");

        // Files of a container removed while no backend ran go when a keeper starts.
        let ghost = "f".repeat(64);
        let ghost_fifo = fifo(&ghost);
        let ghost_log = Path::new(DEFAULT_STDIN_DIR).join(format!("{ghost}.log"));
        let status = Command::new("mkfifo").arg(&ghost_fifo).status().expect("mkfifo");
        assert!(status.success());
        std::fs::write(&ghost_log, b"").expect("ghost log");
        let next = stdio_spec(backend, "sweep");
        start(backend, &next).await;
        let _attach = backend.attach_session(&next.session, None).await.expect("attach");
        assert!(!ghost_fifo.exists() && !ghost_log.exists(), "stale files were kept");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_of_two_inputs_never_interleave() {
    scene(async |backend| {
        let spec = stdio_spec(backend, "two");
        start(backend, &spec).await;
        let mut a = backend.attach_session(&spec.session, None).await.expect("attach a");
        let mut b = backend.attach_session(&spec.session, None).await.expect("attach b");
        // Lines far above the pipe's atomic size (4 KiB), written at the same time.
        let line_a = user_line(&format!("a-{}", "a".repeat(1024 * 1024)));
        let line_b = user_line(&format!("b-{}", "b".repeat(1024 * 1024)));
        let (sent_a, sent_b) = tokio::join!(
            async {
                for _ in 0..3 {
                    a.input.send_line(&line_a).await?;
                }
                Ok::<_, BackendError>(())
            },
            async {
                for _ in 0..3 {
                    b.input.send_line(&line_b).await?;
                }
                Ok::<_, BackendError>(())
            }
        );
        sent_a.expect("send a");
        sent_b.expect("send b");
        let lines = wait_for(PATIENCE, "six answers", || async {
            let lines = output_lines(backend, &spec.session).await;
            let answers = lines.iter().filter(|l| l.contains("\"assistant\"")).count();
            if answers >= 6 {
                Ok(lines)
            } else {
                Err(format!("{answers} answers"))
            }
        })
        .await;
        assert!(!lines.iter().any(|l| l.contains("echo_error")), "a line arrived torn");
        let answers: Vec<&String> = lines.iter().filter(|l| l.contains("\"assistant\"")).collect();
        assert_eq!(answers.iter().filter(|l| l.contains("echo: a-aaa")).count(), 3);
        assert_eq!(answers.iter().filter(|l| l.contains("echo: b-bbb")).count(), 3);
    })
    .await
}

/// A second Podman service on a socket of its own, killed on drop.
struct ScratchService {
    child: std::process::Child,
    dir: PathBuf,
}

impl ScratchService {
    fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("agentd-podman-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("socket dir");
        let child = Command::new("podman")
            .args(["system", "service", "--time=0"])
            .arg(format!("unix://{}/podman.sock", dir.display()))
            .env_remove("CONTAINER_HOST")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("podman system service");
        Self { child, dir }
    }

    fn address(&self) -> String {
        format!("unix://{}/podman.sock", self.dir.display())
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ScratchService {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_keeper_outlives_a_restart_of_the_podman_service() {
    scene(async |backend| {
        let mut service = ScratchService::start();
        let config = PodmanConfig { socket: Some(service.address()), ..PodmanConfig::default() };
        let scratch = wait_for(PATIENCE, "the scratch service to answer", || async {
            PodmanBackend::connect(config.clone(), backend.ownership().clone()).await.map_err(|e| e.to_string())
        })
        .await;
        let spec = stdio_spec(backend, "restart");
        let id = start(&scratch, &spec).await;
        let mut attach = scratch.attach_session(&spec.session, None).await.expect("attach through the scratch service");
        attach.input.send_line(&user_line("before-the-restart")).await.expect("send");
        let first = wait_line(backend, &spec.session, "echo: before-the-restart").await;
        let keepers = keepers_of(&id);
        assert_eq!(keepers.len(), 1, "{keepers:?}");
        if !is_direct(keepers[0]) {
            eprintln!("skipped: this host's keepers attach through the service, which a service restart ends");
            return;
        }
        drop(attach);
        drop(scratch);
        service.kill();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(running(backend, &spec.session).await, "the agent exited with the service");
        let mut again = backend.attach_session(&spec.session, None).await.expect("attach through the main service");
        again.input.send_line(&user_line("after-the-restart")).await.expect("send");
        let second = wait_line(backend, &spec.session, "echo: after-the-restart").await;
        assert_eq!(message_number(&second), message_number(&first) + 1, "another agent process answered");
        assert_eq!(keepers_of(&id), keepers);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_podman_client_attach_says_what_to_install() {
    scene(async |backend| {
        let spec = stdio_spec(backend, "nocli");
        start(backend, &spec).await;
        let dir = std::env::temp_dir().join(format!("agentd-stdin-{}", uuid::Uuid::new_v4().simple()));
        let config = PodmanConfig {
            podman_command: "/nonexistent/agentd-test/podman".into(),
            stdin_dir: dir.clone(),
            ..PodmanConfig::default()
        };
        let no_cli = connect(backend.ownership(), config).await;
        match no_cli.attach_session(&spec.session, None).await {
            Err(e @ BackendError::Engine { .. }) => {
                let text = e.to_string();
                assert!(text.contains("/nonexistent/agentd-test/podman"), "{text}");
                assert!(text.contains("install the `podman` package"), "{text}");
            }
            other => panic!("expected an engine error, got {:?}", other.map(|_| ())),
        }
        assert!(running(backend, &spec.session).await);
        let _ = std::fs::remove_dir_all(&dir);
    })
    .await
}
