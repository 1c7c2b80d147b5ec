//! The conformance suite: one async function per promised behaviour of
//! [`ExecutionBackend`], run by every backend crate against its engine.
//!
//! Every function takes a [`Harness`], which builds backends for given ownership on the
//! engine under test and supplies fixtures (a foreign container, a kill from outside).
//! Each call uses its own random prefix and instance id, and removes what it created,
//! also when an assertion fails.
//!
//! The agent under test is the echo agent (`docker/echo-agent`), driven by environment
//! variables: `ECHO_EXIT_AFTER_MS`, `ECHO_EXIT_CODE`, `ECHO_ALLOC_MB`,
//! `ECHO_IGNORE_SIGTERM`, `ECHO_UNHEALTHY_AFTER_MS`, `ECHO_STDIO` (stream-json on stdin
//! and stdout, with the `!emit`, `!stderr` and `!tool` commands of its README), and
//! `ECHO_CONNECT_TO`/`ECHO_LISTEN_PORT` (network tests). The mock backend simulates the
//! same variables, except the network ones.
//!
//! [`cases`] lists every function once, with the [`Capability`]s it needs (built with
//! [`conformance_case!`](crate::conformance_case)). Backend crates run the list with
//! [`main`], a test harness of its own (`harness = false`, on libtest-mimic): each case is
//! one test, reported as passed, failed, or ignored with the reason (the capability the
//! backend lacks, or the engine that cannot be reached). The lifecycle capabilities
//! (`two_phase_start`, `exit_info_after_stop`, `image_errors_at_create`) choose what a
//! case asserts instead. With `CI` set, an engine that cannot be reached fails every case.

use std::collections::BTreeMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::FutureExt;

use crate::{
    BackendError, BackendEvent, Capabilities, Capability, ExecutionBackend, HealthCheck, HealthCheckSpec,
    NetworkPolicy, OutputLine, OutputStream, OwnershipLabels, SessionHealth, SessionSpec, SessionStatus,
};

mod runner;

pub use runner::main;

/// Builds backends and fixtures on the engine under test.
#[async_trait]
pub trait Harness: Send + Sync {
    /// A backend on the engine under test with this ownership.
    async fn backend(&self, owner: OwnershipLabels) -> Arc<dyn ExecutionBackend>;

    /// The echo-agent image as this engine names it.
    fn image(&self) -> String;

    /// The longest any expected transition may take before a test fails.
    fn patience(&self) -> Duration {
        Duration::from_secs(60)
    }

    /// Creates and starts a running container named `name` that carries `labels` but was
    /// not created by any backend (an unlabelled or foreign container). Returns a handle
    /// to remove it with [`Harness::remove_fixture`].
    async fn start_fixture(&self, name: &str, labels: BTreeMap<String, String>) -> String;

    /// Removes a fixture container.
    async fn remove_fixture(&self, handle: &str);

    /// Kills the session's main process with SIGKILL from outside the backend (as
    /// `docker kill` would).
    async fn kill_from_outside(&self, session: &str);

    /// Removes the session's container forcibly from outside the backend, as the
    /// engine's own `rm -f` would (Docker kills with SIGKILL; Podman stops with SIGTERM
    /// first).
    async fn remove_from_outside(&self, session: &str);

    /// Stops the session's container from outside the backend with the engine's default
    /// grace (as `docker stop` would: SIGTERM, then SIGKILL).
    async fn stop_from_outside(&self, session: &str);

    /// The session's address on the network of [`NetworkPolicy::Internet`] sessions, as
    /// the engine reports it; what the isolation test needs of a backend with
    /// [`Capabilities::network_isolation`].
    async fn internet_address(&self, session: &str) -> Option<std::net::IpAddr> {
        let _ = session;
        None
    }

    /// An image without a `USER` as this engine names it, for
    /// [`image_user_reports_the_images_user`]; `None` skips that part of it.
    fn image_without_user(&self) -> Option<String> {
        None
    }

    /// What the suite left behind on the engine, checked after a run: only a harness
    /// that owns its engine (the mock's) can tell.
    async fn leftovers(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Removes every session the backends own, then the fixtures: the end of every test
/// world, whether the test passed or not.
pub async fn clean_up(harness: &dyn Harness, backends: &[Arc<dyn ExecutionBackend>], fixtures: &[String]) {
    for backend in backends {
        if let Ok(sessions) = backend.list_sessions().await {
            for session in sessions {
                if let Err(e) = backend.kill_session(&session, Duration::ZERO).await {
                    eprintln!("test cleanup: could not remove {session}: {e}");
                }
            }
        }
    }
    for fixture in fixtures {
        harness.remove_fixture(fixture).await;
    }
}

/// Whether tests must have their engine: under `cargo xtask ci`, or whenever `CI` is set.
pub fn engines_required() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// Skips an engine test with a printed reason, or fails it when engines are required.
///
/// The reason goes straight to the process's standard error, past the test harness's
/// output capture, once per engine and test binary, so a plain `cargo test` shows why the
/// engine tests did nothing.
pub fn skip_or_fail<T>(engine: &str, why: impl std::fmt::Display) -> Option<T> {
    use std::io::Write as _;
    static TOLD: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    if engines_required() {
        panic!("{engine} is required (CI is set) but unusable: {why}");
    }
    let mut told = TOLD.lock().unwrap_or_else(|p| p.into_inner());
    if !told.iter().any(|e| e == engine) {
        told.push(engine.to_owned());
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: {engine} tests need a running {engine} engine: {why} (set CI=1 to make this a failure)"
        );
    }
    None
}

/// One test's world: a unique ownership, its backend, and cleanup.
struct World<'h> {
    harness: &'h dyn Harness,
    backend: Arc<dyn ExecutionBackend>,
    run: String,
    extra: Vec<Arc<dyn ExecutionBackend>>,
    fixtures: Vec<String>,
}

fn random_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..10].to_owned()
}

impl<'h> World<'h> {
    async fn new(harness: &'h dyn Harness) -> World<'h> {
        let run = random_id();
        let owner = OwnershipLabels::new(format!("ct{run}"), format!("inst-{run}")).expect("valid labels");
        let backend = harness.backend(owner).await;
        World { harness, backend, run, extra: Vec::new(), fixtures: Vec::new() }
    }

    fn caps(&self) -> Capabilities {
        self.backend.capabilities()
    }

    /// A backend with a different prefix or instance on the same engine.
    async fn other_backend(&mut self, prefix: &str, instance: &str) -> Arc<dyn ExecutionBackend> {
        let owner = OwnershipLabels::new(prefix, instance).expect("valid labels");
        let backend = self.harness.backend(owner).await;
        self.extra.push(backend.clone());
        backend
    }

    fn spec(&self, name: &str) -> SessionSpec {
        self.spec_for(&self.backend, name)
    }

    fn spec_for(&self, backend: &Arc<dyn ExecutionBackend>, name: &str) -> SessionSpec {
        let mut spec = SessionSpec::new(
            format!("{}-{name}", backend.prefix()),
            format!("agent-{name}-{}", self.run),
            self.harness.image(),
        );
        spec.stop_grace = Duration::from_secs(2);
        spec.labels.insert("agentd.test".into(), "conformance".into());
        spec
    }

    async fn start(&self, spec: &SessionSpec) {
        start_on(&self.backend, spec).await;
    }

    async fn cleanup(&self) {
        let backends: Vec<_> = std::iter::once(&self.backend).chain(&self.extra).cloned().collect();
        clean_up(self.harness, &backends, &self.fixtures).await;
        for backend in &backends {
            for volume in backend.list_volumes().await.unwrap_or_default() {
                let _ = backend.remove_volume(&volume.name).await;
            }
        }
    }

    /// Runs `body`, then cleans up whether it passed or panicked.
    async fn run<F>(mut self, body: F)
    where
        F: AsyncFnOnce(&mut World<'h>),
    {
        let outcome = {
            let fut = body(&mut self);
            AssertUnwindSafe(fut).catch_unwind().await
        };
        self.cleanup().await;
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }
}

async fn start_on(backend: &Arc<dyn ExecutionBackend>, spec: &SessionSpec) {
    backend.create_session(spec).await.unwrap_or_else(|e| panic!("create_session({}) failed: {e}", spec.session));
    backend
        .start_session(&spec.session)
        .await
        .unwrap_or_else(|e| panic!("start_session({}) failed: {e}", spec.session));
}

/// Polls `check` every 100 ms until it returns `Some`, or panics after `patience` with
/// `what` and the last observation.
pub async fn wait_for<T, F, Fut>(patience: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + patience;
    loop {
        let last = match check().await {
            Ok(value) => return value,
            Err(last) => last,
        };
        if Instant::now() >= deadline {
            panic!("timed out after {patience:?} waiting for {what}; last seen: {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_status(w: &World<'_>, session: &str, want: SessionStatus) {
    let backend = w.backend.clone();
    wait_for(w.harness.patience(), &format!("{session} to be {want}"), || {
        let backend = backend.clone();
        async move {
            match backend.session_state(session).await {
                Ok(state) if state.status == want => Ok(()),
                Ok(state) => Err(format!("status {}", state.status)),
                Err(e) => Err(format!("error {e}")),
            }
        }
    })
    .await
}

async fn wait_health(w: &World<'_>, session: &str, want: SessionHealth) {
    let backend = w.backend.clone();
    wait_for(w.harness.patience(), &format!("{session} to be {want}"), || {
        let backend = backend.clone();
        async move {
            match backend.session_health(session).await {
                Ok(health) if health == want => Ok(()),
                Ok(health) => Err(format!("health {health}")),
                Err(e) => Err(format!("error {e}")),
            }
        }
    })
    .await
}

fn fast_health_check(interval_ms: u64) -> HealthCheckSpec {
    HealthCheckSpec::Override(HealthCheck {
        command: vec!["/agent".into(), "--health".into()],
        interval: Duration::from_millis(interval_ms),
        timeout: Duration::from_secs(2),
        retries: 1,
        start_period: Duration::ZERO,
    })
}

/// A spec with every field a backend maps into its create call set: limits (64 MiB,
/// 1.5 CPUs, 100 pids), a workdir, a read-only mount `/a` at `/b`, `A=1`, a 2.5 s stop
/// grace, a read-only root filesystem, and a health check (`/agent --health` every
/// second, 2 s timeout, 3 retries), for the engine crates' tests of that mapping.
pub fn full_spec() -> SessionSpec {
    let mut spec = SessionSpec::new("agentd-a", "id-1", "img:1");
    spec.resources.memory_bytes = Some(64 << 20);
    spec.resources.cpus = Some(1.5);
    spec.resources.pids_limit = Some(100);
    spec.workdir = Some("/tmp/work".into());
    spec.mounts.push(crate::Mount { source: "/a".into(), target: "/b".into(), read_only: true });
    spec.env.insert("A".into(), "1".into());
    spec.stop_grace = Duration::from_millis(2500);
    spec.read_only_rootfs = true;
    spec.health_check = HealthCheckSpec::Override(HealthCheck {
        command: vec!["/agent".into(), "--health".into()],
        interval: Duration::from_secs(1),
        timeout: Duration::from_secs(2),
        retries: 3,
        start_period: Duration::ZERO,
    });
    spec
}

/// A created session exists and reads `created` (with `two_phase_start`; else it may
/// run already); started, it reads `running`; a name never created reads `missing` and
/// does not exist.
pub async fn create_start_exists(h: &dyn Harness) {
    World::new(h)
        .await
        .run(async |w| {
            let spec = w.spec("basic");
            let id = w.backend.create_session(&spec).await.expect("create");
            assert!(!id.is_empty(), "create_session must return the engine's id");
            assert!(w.backend.session_exists(&spec.session).await.expect("exists"));
            let state = w.backend.session_state(&spec.session).await.expect("state");
            if w.caps().two_phase_start {
                assert_eq!(state.status, SessionStatus::Created, "{state:?}");
            } else {
                assert!(matches!(state.status, SessionStatus::Created | SessionStatus::Running), "{state:?}");
            }
            assert_eq!(state.id, id);
            w.backend.start_session(&spec.session).await.expect("start");
            wait_status(w, &spec.session, SessionStatus::Running).await;
            assert_eq!(w.backend.session_exit_info(&spec.session).await.expect("exit info"), None);

            let ghost = format!("{}-never-created", w.backend.prefix());
            assert!(!w.backend.session_exists(&ghost).await.expect("exists on a missing session"));
            let state = w.backend.session_state(&ghost).await.expect("state of a missing session");
            assert_eq!(state.status, SessionStatus::Missing);
            assert_eq!(w.backend.session_exit_info(&ghost).await.expect("exit info"), None);
        })
        .await
}

/// Creating a session whose name is taken never reuses the old container.
pub async fn create_conflict_never_reuses_the_old_container(h: &dyn Harness) {
    World::new(h)
        .await
        .run(async |w| {
            let spec = w.spec("conflict");
            let first = w.backend.create_session(&spec).await.expect("first create");
            match w.backend.create_session(&spec).await {
                Ok(second) => {
                    assert_ne!(first, second, "a second create returned the stale container");
                    let state = w.backend.session_state(&spec.session).await.expect("state");
                    assert_eq!(state.id, second, "the session must be the new container");
                }
                Err(BackendError::AlreadyExists { .. }) => {}
                Err(e) => panic!("expected a new container or AlreadyExists, got {e}"),
            }
        })
        .await
}

/// `image_user` reports an image's `USER` as the image says it: the echo image's
/// `65534:65534`; `None` for an image without one; `ImageNotFound` for a missing image.
pub async fn image_user_reports_the_images_user(h: &dyn Harness) {
    World::new(h)
        .await
        .run(async |w| {
            let user = w.backend.image_user(&w.harness.image()).await.expect("image_user of the echo image");
            assert_eq!(user.as_deref(), Some("65534:65534"), "the echo image's USER");
            if let Some(image) = w.harness.image_without_user() {
                let user = w.backend.image_user(&image).await.expect("image_user of an image without USER");
                assert_eq!(user, None, "{image} has no USER");
            }
            let missing = format!("agentd-missing-{}:none", w.run);
            match w.backend.image_user(&missing).await {
                Err(BackendError::ImageNotFound { image, .. }) => assert_eq!(image, missing),
                other => panic!("expected ImageNotFound for {missing}, got {other:?}"),
            }
        })
        .await
}

/// A missing image is `ImageNotFound` (nothing is pulled): from the create with
/// `image_errors_at_create`, else from the start or as the session's end. An invalid
/// spec, or a session name without the backend's prefix, is `InvalidSpec` naming the
/// field.
pub async fn bad_specs_are_refused_clearly(h: &dyn Harness) {
    World::new(h)
        .await
        .run(async |w| {
            let mut spec = w.spec("noimage");
            spec.image = format!("agentd-missing-{}:none", w.run);
            assert!(!w.backend.image_exists(&spec.image).await.expect("image_exists"));
            assert!(w.backend.image_exists(&w.harness.image()).await.expect("image_exists"));
            match w.backend.create_session(&spec).await {
                Err(BackendError::ImageNotFound { image, .. }) => assert_eq!(image, spec.image),
                Ok(_) if !w.caps().image_errors_at_create => missing_image_surfaces_later(w, &spec).await,
                other => panic!("expected ImageNotFound, got {other:?}"),
            }
            let mut spec = w.spec("badmem");
            spec.resources.memory_bytes = Some(1);
            match w.backend.create_session(&spec).await {
                Err(BackendError::InvalidSpec { field, .. }) => assert_eq!(field, "resources.memory_bytes"),
                other => panic!("expected InvalidSpec, got {other:?}"),
            }
            let mut spec = w.spec("unprefixed");
            spec.session = format!("x{}", spec.session);
            match w.backend.create_session(&spec).await {
                Err(BackendError::InvalidSpec { field, .. }) => assert_eq!(field, "session"),
                other => panic!("a session name without the prefix must be InvalidSpec, got {other:?}"),
            }
            assert!(!w.backend.session_exists(&spec.session).await.expect("exists"));
        })
        .await
}

/// Without `image_errors_at_create`: the start of a session whose image is missing fails
/// with `ImageNotFound`, or the session ends with an error that names the image.
async fn missing_image_surfaces_later(w: &World<'_>, spec: &SessionSpec) {
    match w.backend.start_session(&spec.session).await {
        Err(BackendError::ImageNotFound { image, .. }) => return assert_eq!(image, spec.image),
        Err(e) => panic!("start with a missing image: expected ImageNotFound, got {e}"),
        Ok(()) => {}
    }
    let backend = w.backend.clone();
    wait_for(w.harness.patience(), "the missing image to end the session", || {
        let backend = backend.clone();
        async move {
            let state = backend.session_state(&spec.session).await.map_err(|e| e.to_string())?;
            match &state.exit {
                Some(exit) if exit.error.as_deref().is_some_and(|e| e.contains(&spec.image)) => Ok(()),
                _ => Err(format!("{state:?}")),
            }
        }
    })
    .await
}

async fn exits_with(h: &dyn Harness, code: i64) {
    World::new(h)
        .await
        .run(async |w| {
            let mut spec = w.spec(&format!("exit{code}"));
            spec.env.insert("ECHO_EXIT_AFTER_MS".into(), "300".into());
            spec.env.insert("ECHO_EXIT_CODE".into(), code.to_string());
            w.start(&spec).await;
            wait_status(w, &spec.session, SessionStatus::Exited).await;
            let exit = w
                .backend
                .session_exit_info(&spec.session)
                .await
                .expect("exit info")
                .expect("an exited session has exit info");
            assert_eq!(exit.exit_code, Some(code), "{exit:?}");
            assert!(!exit.oom_killed, "{exit:?}");
            assert!(exit.finished_at.is_some(), "finished_at must be recorded: {exit:?}");
            assert_eq!(
                w.backend.session_health(&spec.session).await.expect("health"),
                SessionHealth::Unknown,
                "health of a session that is not running is unknown"
            );
        })
        .await
}

/// A session whose agent exits 0 reads exited with code 0.
pub async fn exit_code_zero_is_reported(h: &dyn Harness) {
    exits_with(h, 0).await
}

/// A session whose agent exits 3 reads exited with code 3.
pub async fn nonzero_exit_code_is_reported(h: &dyn Harness) {
    exits_with(h, 3).await
}

/// Exit info stays readable, unchanged, until the session is removed; then it is gone.
pub async fn exit_info_is_kept_until_removed(h: &dyn Harness) {
    World::new(h)
        .await
        .run(async |w| {
            let mut spec = w.spec("keep");
            spec.env.insert("ECHO_EXIT_AFTER_MS".into(), "100".into());
            spec.env.insert("ECHO_EXIT_CODE".into(), "7".into());
            w.start(&spec).await;
            wait_status(w, &spec.session, SessionStatus::Exited).await;
            let first = w.backend.session_exit_info(&spec.session).await.expect("exit info");
            let second = w.backend.session_exit_info(&spec.session).await.expect("exit info");
            assert_eq!(first, second);
            assert_eq!(first.as_ref().and_then(|e| e.exit_code), Some(7));
            w.backend.remove_session(&spec.session).await.expect("remove");
            assert!(!w.backend.session_exists(&spec.session).await.expect("exists"));
            assert_eq!(w.backend.session_exit_info(&spec.session).await.expect("exit info"), None);
        })
        .await
}

/// Kill stops and removes; killing a missing or already killed session succeeds.
pub async fn kill_is_idempotent(h: &dyn Harness) {
    World::new(h)
        .await
        .run(async |w| {
            let ghost = format!("{}-ghost", w.backend.prefix());
            w.backend.kill_session(&ghost, Duration::from_secs(1)).await.expect("kill of a missing session");
            w.backend.remove_session(&ghost).await.expect("remove of a missing session");
            match w.backend.stop_session(&ghost, Duration::from_secs(1)).await {
                Err(e) if e.is_not_found() => {}
                other => panic!("stop of a missing session must be NotFound, got {other:?}"),
            }
            let spec = w.spec("kill");
            w.start(&spec).await;
            wait_status(w, &spec.session, SessionStatus::Running).await;
            w.backend.kill_session(&spec.session, Duration::from_secs(2)).await.expect("kill");
            assert!(!w.backend.session_exists(&spec.session).await.expect("exists"));
            w.backend.kill_session(&spec.session, Duration::from_secs(2)).await.expect("second kill");
        })
        .await
}

/// Stop sends SIGTERM: an agent that handles it exits 0 at once; one that ignores it is
/// killed (137) after the grace period, not the engine's default. With
/// `exit_info_after_stop`, both keep their exit info; without, a stopped session may be
/// gone, but never reads running.
pub async fn stop_honours_the_grace_period(h: &dyn Harness) {
    World::new(h)
        .await
        .run(async |w| {
            let polite = w.spec("polite");
            let mut stubborn = w.spec("stubborn");
            stubborn.env.insert("ECHO_IGNORE_SIGTERM".into(), "1".into());
            w.start(&polite).await;
            w.start(&stubborn).await;
            wait_status(w, &polite.session, SessionStatus::Running).await;
            wait_status(w, &stubborn.session, SessionStatus::Running).await;

            let kept = w.caps().exit_info_after_stop;
            w.backend.stop_session(&polite.session, Duration::from_secs(10)).await.expect("stop");
            let exit = stopped_exit(w, &polite.session, kept).await;
            if let Some(exit) = &exit {
                assert_eq!(exit.exit_code, Some(0), "SIGTERM handled: {exit:?}");
            }

            let grace = Duration::from_secs(2);
            let started = Instant::now();
            w.backend.stop_session(&stubborn.session, grace).await.expect("stop");
            let took = started.elapsed();
            let exit = stopped_exit(w, &stubborn.session, kept).await;
            if let Some(exit) = &exit {
                assert_eq!(exit.exit_code, Some(137), "killed after grace: {exit:?}");
                assert!(!exit.oom_killed, "a stop is not an OOM: {exit:?}");
            }
            assert!(
                took >= grace - Duration::from_millis(300) && took < grace + Duration::from_secs(6),
                "stop with a {grace:?} grace took {took:?}: the grace period was not honoured"
            );
            // Stopping a session that is no longer running succeeds (one that a stop took
            // away is not found).
            match w.backend.stop_session(&stubborn.session, grace).await {
                Ok(()) => {}
                Err(e) if e.is_not_found() && !kept => {}
                Err(e) => panic!("a second stop failed: {e}"),
            }
        })
        .await
}

/// The exit info of a session just stopped: required when the backend keeps it
/// (`kept`); otherwise whatever is left, and the session must not read running.
async fn stopped_exit(w: &World<'_>, session: &str, kept: bool) -> Option<crate::SessionExitInfo> {
    let state = w.backend.session_state(session).await.expect("state");
    assert!(!state.status.is_alive(), "{session} still reads {} after its stop returned", state.status);
    let exit = w.backend.session_exit_info(session).await.expect("exit info");
    assert!(!kept || exit.is_some(), "{session}: the exit info must survive the stop ({state:?})");
    exit
}

/// With a health check, health reads starting before the first check passes and healthy
/// after it.
pub async fn health_goes_from_starting_to_healthy(h: &dyn Harness) {
    World::new(h)
        .await
        .run(async |w| {
            let mut spec = w.spec("healthy");
            spec.health_check = fast_health_check(3000);
            w.start(&spec).await;
            let first = w.backend.session_health(&spec.session).await.expect("health");
            assert_eq!(first, SessionHealth::Starting, "before the first check ran");
            wait_health(w, &spec.session, SessionHealth::Healthy).await;
        })
        .await
}

/// An agent whose health check starts failing reads unhealthy.
pub async fn health_turns_unhealthy(h: &dyn Harness) {
    World::new(h)
        .await
        .run(async |w| {
            let mut spec = w.spec("unhealthy");
            spec.health_check = fast_health_check(500);
            spec.env.insert("ECHO_UNHEALTHY_AFTER_MS".into(), "1500".into());
            w.start(&spec).await;
            wait_health(w, &spec.session, SessionHealth::Healthy).await;
            wait_health(w, &spec.session, SessionHealth::Unhealthy).await;
        })
        .await
}

/// Without a health check, a running session reads healthy.
pub async fn no_health_check_reads_healthy_while_running(h: &dyn Harness) {
    World::new(h)
        .await
        .run(async |w| {
            let mut spec = w.spec("nocheck");
            spec.health_check = HealthCheckSpec::Disabled;
            w.start(&spec).await;
            wait_status(w, &spec.session, SessionStatus::Running).await;
            assert_eq!(w.backend.session_health(&spec.session).await.expect("health"), SessionHealth::Healthy);
        })
        .await
}

/// An agent that outgrows its memory limit is reported OOM-killed with exit 137.
pub async fn oom_kill_is_reported(h: &dyn Harness) {
    World::new(h)
        .await
        .run(async |w| {
            let mut spec = w.spec("oom");
            spec.resources.memory_bytes = Some(64 * 1024 * 1024);
            spec.env.insert("ECHO_ALLOC_MB".into(), "256".into());
            w.start(&spec).await;
            wait_status(w, &spec.session, SessionStatus::Exited).await;
            let exit = w.backend.session_exit_info(&spec.session).await.expect("exit info").expect("exit");
            assert!(exit.oom_killed, "expected an OOM kill: {exit:?}");
            assert_eq!(exit.exit_code, Some(137), "{exit:?}");
        })
        .await
}

/// A SIGKILL from outside a memory-limited session is not reported as an OOM kill.
pub async fn external_kill_is_not_an_oom(h: &dyn Harness) {
    World::new(h)
        .await
        .run(async |w| {
            let mut spec = w.spec("extkill");
            spec.resources.memory_bytes = Some(64 * 1024 * 1024);
            w.start(&spec).await;
            wait_status(w, &spec.session, SessionStatus::Running).await;
            w.harness.kill_from_outside(&spec.session).await;
            wait_status(w, &spec.session, SessionStatus::Exited).await;
            let exit = w.backend.session_exit_info(&spec.session).await.expect("exit info").expect("exit");
            assert_eq!(exit.exit_code, Some(137), "{exit:?}");
            assert!(!exit.oom_killed, "a kill from outside is not an OOM: {exit:?}");
        })
        .await
}

/// Listings show only sessions with this prefix and this instance id; foreign
/// containers, other instances and other prefixes are invisible.
pub async fn list_shows_only_owned_sessions(h: &dyn Harness) {
    World::new(h)
        .await
        .run(async |w| {
            let prefix = w.backend.prefix().to_owned();
            let other_instance = w.other_backend(&prefix, &format!("other-{}", w.run)).await;
            let instance = w.backend.ownership().instance().to_owned();
            let other_prefix = w.other_backend(&format!("op{}", w.run), &instance).await;

            let ours = w.spec("ours");
            w.start(&ours).await;
            let theirs = w.spec_for(&other_instance, "theirs");
            start_on(&other_instance, &theirs).await;
            let elsewhere = w.spec_for(&other_prefix, "elsewhere");
            start_on(&other_prefix, &elsewhere).await;
            let foreign_name = format!("{prefix}-foreign");
            let fixture = w.harness.start_fixture(&foreign_name, BTreeMap::new()).await;
            w.fixtures.push(fixture);

            let listed = w.backend.list_sessions().await.expect("list");
            assert_eq!(listed, vec![ours.session.clone()], "only our own session is listed");
            let snapshot = w.backend.snapshot().await.expect("snapshot");
            let names: Vec<_> = snapshot.iter().map(|s| s.session.as_str()).collect();
            assert_eq!(names, vec![ours.session.as_str()]);
            assert_eq!(other_instance.list_sessions().await.expect("list"), vec![theirs.session.clone()]);
            assert_eq!(other_prefix.list_sessions().await.expect("list"), vec![elsewhere.session.clone()]);
        })
        .await
}

/// `shutdown_all_sessions` stops and removes every owned session concurrently, and
/// nothing of another instance.
pub async fn shutdown_all_stops_every_owned_session(h: &dyn Harness) {
    World::new(h)
        .await
        .run(async |w| {
            let prefix = w.backend.prefix().to_owned();
            let other = w.other_backend(&prefix, &format!("other-{}", w.run)).await;
            let grace = Duration::from_secs(2);
            let count = 4;
            for i in 0..count {
                let mut spec = w.spec(&format!("down{i}"));
                spec.env.insert("ECHO_IGNORE_SIGTERM".into(), "1".into());
                w.start(&spec).await;
            }
            let survivor = w.spec_for(&other, "survivor");
            start_on(&other, &survivor).await;
            for i in 0..count {
                wait_status(w, &format!("{prefix}-down{i}"), SessionStatus::Running).await;
            }

            let started = Instant::now();
            let report = w.backend.shutdown_all_sessions(grace).await.expect("shutdown");
            let took = started.elapsed();
            assert!(report.failed.is_empty(), "{:?}", report.failed);
            assert_eq!(report.stopped.len(), count);
            assert!(w.backend.list_sessions().await.expect("list").is_empty());
            // Serially, four sessions that ignore SIGTERM take at least 4 x 2 s.
            assert!(took < grace * 3, "shutdown of {count} sessions took {took:?}: not concurrent");
            assert!(
                other.session_exists(&survivor.session).await.expect("exists"),
                "another instance's session was touched"
            );
        })
        .await
}

/// The snapshot agrees with the single-session calls for created, running and exited
/// sessions.
pub async fn snapshot_agrees_with_single_session_calls(h: &dyn Harness) {
    World::new(h)
        .await
        .run(async |w| {
            let created = w.spec("created");
            w.backend.create_session(&created).await.expect("create");
            let mut running = w.spec("running");
            running.health_check = HealthCheckSpec::Disabled;
            w.start(&running).await;
            let mut exited = w.spec("exited");
            exited.env.insert("ECHO_EXIT_AFTER_MS".into(), "100".into());
            exited.env.insert("ECHO_EXIT_CODE".into(), "4".into());
            w.start(&exited).await;
            wait_status(w, &running.session, SessionStatus::Running).await;
            wait_status(w, &exited.session, SessionStatus::Exited).await;

            let snapshot = w.backend.snapshot().await.expect("snapshot");
            assert_eq!(snapshot.len(), 3, "{snapshot:#?}");
            let two_phase = w.caps().two_phase_start;
            for state in snapshot {
                let single = w.backend.session_state(&state.session).await.expect("state");
                assert_eq!(state.status, single.status, "{}", state.session);
                assert_eq!(state.id, single.id, "{}", state.session);
                assert_eq!(state.health, w.backend.session_health(&state.session).await.expect("health"));
                assert!(state.created_at.is_some(), "created_at missing for {}", state.session);
                assert_eq!(
                    state.agent_id(),
                    Some(format!("agent-{}-{}", state.session.rsplit('-').next().unwrap_or(""), w.run).as_str())
                );
                if let Some(exit) = &state.exit {
                    let single_exit = w.backend.session_exit_info(&state.session).await.expect("exit info");
                    assert_eq!(Some(exit.exit_code), single_exit.map(|e| e.exit_code), "{}", state.session);
                }
                let expected = if state.session == created.session {
                    if !two_phase {
                        // An engine without two-phase start may run it already.
                        continue;
                    }
                    SessionStatus::Created
                } else if state.session == running.session {
                    SessionStatus::Running
                } else {
                    SessionStatus::Exited
                };
                assert_eq!(state.status, expected, "{}", state.session);
            }
        })
        .await
}

/// Waits for the `Died` event of `session`, skipping other events.
async fn next_death(events: &mut crate::EventReceiver, session: &str, patience: Duration) -> crate::SessionExitInfo {
    let died = tokio::time::timeout(patience, async {
        while let Some(event) = events.recv().await {
            if let BackendEvent::Died { session: s, exit } = event {
                if s == session {
                    return Some(exit);
                }
            }
        }
        None
    })
    .await;
    died.unwrap_or_else(|_| panic!("no Died event for {session} within {patience:?}")).expect("the event stream ended")
}

/// The event stream (where supported) reports a session's death with its exit code, and
/// a kill from outside.
pub async fn events_report_a_death(h: &dyn Harness) {
    World::new(h)
        .await
        .run(async |w| {
            let mut events = w.backend.subscribe_events().await.expect("subscribe").expect("events capability");
            let mut spec = w.spec("dies");
            spec.env.insert("ECHO_EXIT_AFTER_MS".into(), "500".into());
            spec.env.insert("ECHO_EXIT_CODE".into(), "5".into());
            w.start(&spec).await;
            let patience = w.harness.patience();
            let died = next_death(&mut events, &spec.session, patience).await;
            assert_eq!(died.exit_code, Some(5), "{died:?}");

            // A kill from outside is reported too.
            let victim = w.spec("killed");
            w.start(&victim).await;
            wait_status(w, &victim.session, SessionStatus::Running).await;
            w.harness.kill_from_outside(&victim.session).await;
            let died = next_death(&mut events, &victim.session, patience).await;
            assert_eq!(died.exit_code, Some(137), "{died:?}");
        })
        .await
}

/// A command run in a session returns its output and exit code.
pub async fn send_command_runs_in_the_session(h: &dyn Harness) {
    World::new(h)
        .await
        .run(async |w| {
            let spec = w.spec("exec");
            w.start(&spec).await;
            wait_status(w, &spec.session, SessionStatus::Running).await;
            let out = w
                .backend
                .send_command(&spec.session, &["/agent".into(), "--version".into()])
                .await
                .expect("send_command");
            assert_eq!(out.exit_code, Some(0), "{out:?}");
            assert!(out.output.contains("echo-agent"), "{out:?}");
        })
        .await
}

/// The session's output can be read back.
pub async fn logs_return_the_agent_output(h: &dyn Harness) {
    World::new(h)
        .await
        .run(async |w| {
            let spec = w.spec("logs");
            w.start(&spec).await;
            let backend = w.backend.clone();
            let session = spec.session.clone();
            wait_for(w.harness.patience(), "the start-up line in the logs", || {
                let (backend, session) = (backend.clone(), session.clone());
                async move {
                    let logs = backend.session_logs(&session, Some(50)).await.map_err(|e| e.to_string())?;
                    if logs.contains("echo-agent started") {
                        Ok(())
                    } else {
                        Err(format!("{logs:?}"))
                    }
                }
            })
            .await;
        })
        .await
}

/// Waits for the session to exit 0 with `needle` in its logs, and checks `absent` is not.
async fn exits_zero_saying(w: &World<'_>, session: &str, needle: &str, absent: &str) {
    wait_status(w, session, SessionStatus::Exited).await;
    let exit = w.backend.session_exit_info(session).await.expect("exit info").expect("exit info of an exited session");
    let logs = w.backend.session_logs(session, Some(50)).await.expect("logs");
    assert_eq!(exit.exit_code, Some(0), "{session}: {exit:?}; logs: {logs:?}");
    assert!(logs.contains(needle), "{session}: {needle:?} not in the logs: {logs:?}");
    assert!(!logs.contains(absent), "{session}: {absent:?} in the logs: {logs:?}");
}

/// An `entrypoint` replaces the image's `ENTRYPOINT` (the echo image's is `/agent`, which
/// would run on forever): alone, it runs as given; with a `command`, the command is its
/// arguments.
pub async fn the_entrypoint_replaces_the_images(h: &dyn Harness) {
    World::new(h)
        .await
        .run(async |w| {
            // Under the image's entrypoint this would run `/agent /agent --version`, an
            // agent that never exits.
            let mut alone = w.spec("entry1");
            alone.entrypoint = Some(vec!["/agent".into(), "--version".into()]);
            w.start(&alone).await;
            let mut with_args = w.spec("entry2");
            with_args.entrypoint = Some(vec!["/agent".into()]);
            with_args.command = Some(vec!["--version".into()]);
            w.start(&with_args).await;
            exits_zero_saying(w, &alone.session, "echo-agent ", "echo-agent started").await;
            exits_zero_saying(w, &with_args.session, "echo-agent ", "echo-agent started").await;
        })
        .await
}

/// The engine reports its host's CPUs; a CPU limit above them is refused at create as
/// the client's mistake ([`BackendError::Rejected`] or [`BackendError::InvalidSpec`]),
/// and one of exactly that many is created.
pub async fn cpus_beyond_the_engines_are_refused(h: &dyn Harness) {
    World::new(h)
        .await
        .run(async |w| {
            let Some(host) = w.backend.engine_cpus().await.expect("engine_cpus") else {
                eprintln!("{}: the backend cannot tell its host's CPUs; nothing to check", w.backend.name());
                return;
            };
            assert!(host >= 1, "engine_cpus {host}");
            let mut over = w.spec("cpuover");
            over.resources.cpus = Some(f64::from(host) + 1.0);
            match w.backend.create_session(&over).await {
                Err(BackendError::Rejected { message, .. } | BackendError::InvalidSpec { message, .. }) => {
                    assert!(!message.is_empty())
                }
                other => panic!("{} CPUs on a {host}-CPU engine: expected Rejected, got {other:?}", host + 1),
            }
            assert!(!w.backend.session_exists(&over.session).await.expect("exists"), "nothing is left behind");
            let mut all = w.spec("cpuall");
            all.resources.cpus = Some(f64::from(host));
            w.start(&all).await;
        })
        .await
}

/// A spec for an echo agent in stdio mode: stdin open, speaking stream-json.
fn stdio_spec(w: &World<'_>, name: &str) -> SessionSpec {
    let mut spec = w.spec(name);
    spec.stdin_open = true;
    spec.env.insert("ECHO_STDIO".into(), "1".into());
    spec
}

/// Starts a stdio echo agent `name`, attaches from its first line, and reads up to its
/// start-up line: the spec, the attach, and the lines read.
async fn start_attached(w: &World<'_>, name: &str) -> (SessionSpec, crate::SessionAttach, Vec<OutputLine>) {
    let spec = stdio_spec(w, name);
    w.start(&spec).await;
    let mut attach = w.backend.attach_session(&spec.session, None).await.expect("attach");
    let lines = read_until(&mut attach.output, w.harness.patience(), "the start-up line", |l| {
        l.text.contains("echo-agent started")
    })
    .await;
    (spec, attach, lines)
}

/// A stream-json user message.
fn user_line(text: &str) -> String {
    serde_json::json!({"type": "user", "message": {"role": "user", "content": text}, "parent_tool_use_id": null, "session_id": ""})
        .to_string()
}

/// Reads `output` until a line satisfies `want`, returning every line read, or panics
/// after `patience` with the last lines seen.
async fn read_until(
    output: &mut crate::OutputLines,
    patience: Duration,
    what: &str,
    mut want: impl FnMut(&OutputLine) -> bool,
) -> Vec<OutputLine> {
    use futures_util::StreamExt;
    let mut lines = Vec::new();
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        let next = tokio::time::timeout_at(deadline, output.next()).await;
        let last = || lines.iter().rev().take(3).map(|l: &OutputLine| short_text(&l.text)).collect::<Vec<_>>();
        match next {
            Err(_) => panic!("timed out after {patience:?} waiting for {what}; last lines: {:?}", last()),
            Ok(None) => panic!("the output ended while waiting for {what}; last lines: {:?}", last()),
            Ok(Some(Err(e))) => panic!("the output failed while waiting for {what}: {e}"),
            Ok(Some(Ok(line))) => {
                let done = want(&line);
                lines.push(line);
                if done {
                    return lines;
                }
            }
        }
    }
}

fn short_text(text: &str) -> String {
    text.chars().take(120).collect()
}

/// A line written to an attached session's stdin is answered on its stdout; stderr is
/// tagged as such.
pub async fn attached_line_is_answered(h: &dyn Harness) {
    World::new(h)
        .await
        .run(async |w| {
            let (_, mut attach, first) = start_attached(w, "attach").await;
            let patience = w.harness.patience();
            assert_eq!(first.last().map(|l| l.stream), Some(OutputStream::Stdout));
            attach.input.send_line(&user_line("ping-1")).await.expect("send");
            let lines = read_until(&mut attach.output, patience, "the answer to ping-1", |l| {
                l.text.contains("\"result\"") && l.text.contains("echo: ping-1")
            })
            .await;
            assert!(lines.iter().any(|l| l.text.contains("\"assistant\"") && l.text.contains("echo: ping-1")));
            attach.input.send_line(&user_line("!stderr oops-on-stderr")).await.expect("send");
            let lines =
                read_until(&mut attach.output, patience, "the stderr line", |l| l.text == "oops-on-stderr").await;
            assert_eq!(lines.last().map(|l| l.stream), Some(OutputStream::Stderr));
            // Cursors only move forwards.
            let cursors: Vec<_> = first.iter().chain(&lines).map(|l| l.cursor).collect();
            assert!(cursors.windows(2).all(|p| p[0] < p[1]), "cursors must increase: {cursors:?}");
        })
        .await
}

/// What a session writes while nobody is attached is read exactly once by the next
/// attach from the last cursor, and stdin stays open across attaches.
pub async fn reattach_reads_every_line_once(h: &dyn Harness) {
    World::new(h)
        .await
        .run(async |w| {
            const LINES: usize = 10_000;
            let (spec, mut attach, seen) = start_attached(w, "reattach").await;
            let patience = w.harness.patience();
            let cursor = seen.last().map(|l| l.cursor);
            // Ask for the lines, and detach before they come.
            attach.input.send_line(&user_line(&format!("!emit {LINES} 500"))).await.expect("send");
            drop(attach);
            let backend = w.backend.clone();
            let session = spec.session.clone();
            wait_for(patience, "the lines to be written while detached", || {
                let (backend, session) = (backend.clone(), session.clone());
                async move {
                    use futures_util::StreamExt;
                    let out = backend.session_output(&session, cursor, false).await.map_err(|e| e.to_string())?;
                    let lines: Vec<_> = out.collect().await;
                    // The result line follows the marker.
                    let done = lines
                        .iter()
                        .rev()
                        .take(3)
                        .any(|l| l.as_ref().is_ok_and(|l| l.text == format!("emitted {LINES}")));
                    if done {
                        Ok(())
                    } else {
                        Err(format!("{} lines so far", lines.len()))
                    }
                }
            })
            .await;
            let mut again = w.backend.attach_session(&spec.session, cursor).await.expect("attach again");
            let lines = read_until(&mut again.output, patience, "the end of the emitted lines", |l| {
                l.text.contains(&format!("emitted {LINES}"))
            })
            .await;
            let numbered: Vec<usize> =
                lines.iter().filter_map(|l| l.text.strip_prefix("line ")?.parse().ok()).collect();
            assert_eq!(numbered.len(), LINES, "every line once: got {} numbered lines", numbered.len());
            assert!(numbered.iter().enumerate().all(|(i, n)| i == *n), "lines out of order or doubled");
            assert!(!lines.iter().any(|l| l.text.contains("echo-agent started")), "a line read before was read again");
            // The second attach can still write: stdin stayed open.
            again.input.send_line(&user_line("after-reattach")).await.expect("send");
            read_until(&mut again.output, patience, "the answer after re-attaching", |l| {
                l.text.contains("\"result\"") && l.text.contains("echo: after-reattach")
            })
            .await;
        })
        .await
}

/// A line of 5 MB passes both ways whole.
pub async fn a_five_megabyte_line_passes(h: &dyn Harness) {
    World::new(h)
        .await
        .run(async |w| {
            let (_, mut attach, _) = start_attached(w, "bigline").await;
            let patience = w.harness.patience();
            let big: String = (0..5 * 1024 * 1024).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
            attach.input.send_line(&user_line(&big)).await.expect("send 5 MB");
            let lines = read_until(&mut attach.output, patience, "the 5 MB answer", |l| {
                l.text.len() > big.len() && l.text.contains("\"assistant\"")
            })
            .await;
            let answer = lines.last().expect("a line");
            assert!(!answer.truncated);
            let value: serde_json::Value = serde_json::from_str(&answer.text).expect("the answer is one JSON line");
            let text = value["message"]["content"][0]["text"].as_str().expect("text block");
            assert_eq!(text.len(), big.len() + "echo: ".len());
            assert!(text.ends_with(&big[big.len() - 100..]));
        })
        .await
}

/// Attaching to, or reading the output of, a session that does not exist is `NotFound`;
/// the output of a session that ended can still be read.
pub async fn attach_to_a_missing_session_is_not_found(h: &dyn Harness) {
    World::new(h)
        .await
        .run(async |w| {
            let missing = format!("{}-nosuch", w.backend.prefix());
            match w.backend.attach_session(&missing, None).await {
                Err(e) if e.is_not_found() => {}
                Err(e) => panic!("attach to a missing session: expected NotFound, got {e}"),
                Ok(_) => panic!("attach to a missing session succeeded"),
            }
            match w.backend.session_output(&missing, None, false).await {
                Err(e) if e.is_not_found() => {}
                Err(e) => panic!("output of a missing session: expected NotFound, got {e}"),
                Ok(_) => panic!("output of a missing session succeeded"),
            }
            let mut spec = stdio_spec(w, "ended");
            spec.env.insert("ECHO_EXIT_AFTER_MS".into(), "300".into());
            w.start(&spec).await;
            wait_status(w, &spec.session, SessionStatus::Exited).await;
            use futures_util::StreamExt;
            let out = w.backend.session_output(&spec.session, None, true).await.expect("output of an ended session");
            let lines: Vec<_> = tokio::time::timeout(w.harness.patience(), out.collect::<Vec<_>>())
                .await
                .expect("a followed ended session's output ends");
            assert!(lines.iter().any(|l| l.as_ref().is_ok_and(|l| l.text.contains("echo-agent started"))), "{lines:?}");
        })
        .await
}

/// A named volume in a spec is created with the ownership labels, outlives the session,
/// is listed only by its owner, and is removed on request.
pub async fn volumes_outlive_sessions_and_are_removed_on_request(h: &dyn Harness) {
    World::new(h)
        .await
        .run(async |w| {
            let mut spec = w.spec("vol");
            let volume = format!("{}-vol-home", w.backend.prefix());
            spec.volumes.push(crate::VolumeMount { name: volume.clone(), target: "/data".into() });
            w.start(&spec).await;
            wait_status(w, &spec.session, SessionStatus::Running).await;
            let listed = w.backend.list_volumes().await.expect("list volumes");
            let found =
                listed.iter().find(|v| v.name == volume).unwrap_or_else(|| panic!("{volume} not listed: {listed:?}"));
            assert_eq!(found.agent_id(), Some(spec.agent_id.as_str()), "the volume carries the ownership labels");
            let other = w.other_backend(&format!("{}x", w.backend.prefix()), "other-instance").await;
            assert!(
                !other.list_volumes().await.expect("list").iter().any(|v| v.name == volume),
                "listed by another owner"
            );
            // A container that uses it cannot lose it; gone with the session, it stays.
            w.backend.kill_session(&spec.session, Duration::ZERO).await.expect("kill");
            assert!(
                w.backend.list_volumes().await.expect("list").iter().any(|v| v.name == volume),
                "removed with its session"
            );
            w.start(&spec).await;
            wait_status(w, &spec.session, SessionStatus::Running).await;
            w.backend.kill_session(&spec.session, Duration::ZERO).await.expect("kill");
            w.backend.remove_volume(&volume).await.expect("remove volume");
            assert!(
                !w.backend.list_volumes().await.expect("list").iter().any(|v| v.name == volume),
                "still listed after removal"
            );
            w.backend.remove_volume(&volume).await.expect("removing a missing volume succeeds");
        })
        .await
}

/// A session that owns no container of the backend's but carries its labels (a
/// container a crashed daemon of this instance left behind) is replaced by a create,
/// never reused; a foreign container of the name is invisible, left alone, and the
/// create fails.
pub async fn a_stale_container_is_replaced_and_a_foreign_one_left_alone(h: &dyn Harness) {
    World::new(h)
        .await
        .run(async |w| {
            let stale = w.spec("stale");
            let labels = w.backend.ownership().labels_for(&stale.session, "old");
            // Not a fixture to remove: it carries our labels, so the cleanup removes it.
            w.harness.start_fixture(&stale.session, labels).await;
            let old = w.backend.session_state(&stale.session).await.expect("state");
            assert!(old.status.is_alive(), "the stale container reads as ours: {old:?}");
            let new_id = w.backend.create_session(&stale).await.expect("create over a stale container of ours");
            assert_ne!(old.id, new_id, "the stale container was reused");
            assert_eq!(w.backend.session_state(&stale.session).await.expect("state").id, new_id);

            let foreign = w.spec("foreign");
            let fixture = w.harness.start_fixture(&foreign.session, BTreeMap::new()).await;
            w.fixtures.push(fixture);
            assert!(
                !w.backend.session_exists(&foreign.session).await.expect("exists"),
                "a foreign container is invisible"
            );
            w.backend.remove_session(&foreign.session).await.expect("removing a foreign name is a no-op");
            for attempt in ["create", "create after a remove"] {
                match w.backend.create_session(&foreign).await {
                    Err(BackendError::AlreadyExists { detail, .. }) => {
                        assert!(detail.contains("not owned"), "{detail}")
                    }
                    other => panic!("{attempt}: a foreign container must not be replaced: {other:?}"),
                }
            }
        })
        .await
}

/// Starts an echo agent under `policy` that keeps trying to connect to `target:port`.
async fn start_client(w: &World<'_>, name: &str, policy: NetworkPolicy, target: std::net::IpAddr, port: u16) -> String {
    let mut spec = w.spec(name);
    spec.network = policy;
    spec.env.insert("ECHO_CONNECT_TO".into(), format!("{target}:{port}"));
    w.start(&spec).await;
    spec.session
}

async fn logs_contain(w: &World<'_>, session: &str, needle: &str) -> bool {
    w.backend.session_logs(session, None).await.is_ok_and(|logs| logs.contains(needle))
}

async fn wait_for_log(w: &World<'_>, session: &str, needle: &str, what: &str) {
    wait_for(w.harness.patience(), what, || async {
        if logs_contain(w, session, needle).await {
            Ok(())
        } else {
            Err(format!("no {needle:?} in the logs of {session} yet"))
        }
    })
    .await
}

/// An `isolated` agent reaches the host's side of its network (where the daemon would
/// serve it) and nothing routed beyond it: a peer on the `internet` network, one
/// forwarding hop away as the internet would be, is out of reach, while an `internet`
/// agent reaches the same peer (so the test can tell).
pub async fn isolated_agents_reach_the_host_and_nothing_routed_beyond_it(h: &dyn Harness) {
    World::new(h)
        .await
        .run(async |w| {
            use std::net::TcpListener;
            let gateways = w.backend.gateway_addresses().await.expect("gateway addresses");
            assert!(gateways.internet.is_some(), "no host address on the internet network: {gateways:?}");
            let isolated =
                gateways.isolated.unwrap_or_else(|| panic!("no host address on the isolated network: {gateways:?}"));
            let patience = w.harness.patience();

            // Half one: the host's side of the isolated network is reachable. Some
            // engines bring the network's bridge (and so the address) up with its first
            // container, so the listener binds once the client runs; the agent retries.
            let port = TcpListener::bind(("127.0.0.1", 0)).expect("a free port").local_addr().expect("addr").port();
            let client = start_client(w, "iso-host", NetworkPolicy::Isolated, isolated, port).await;
            wait_status(w, &client, SessionStatus::Running).await;
            let listener = wait_for(patience, "the isolated network's host address to be up", || async move {
                TcpListener::bind((isolated, port)).map_err(|e| e.to_string())
            })
            .await;
            listener.set_nonblocking(true).expect("nonblocking");
            wait_for(patience, "the isolated agent to reach the host", || {
                let accepted = listener.accept().map(|_| ()).map_err(|e| e.to_string());
                async move { accepted }
            })
            .await;

            // Half two: a peer beyond the isolated network is not reachable.
            let mut target = w.spec("target");
            target.env.insert("ECHO_LISTEN_PORT".into(), "8080".into());
            w.start(&target).await;
            wait_for_log(w, &target.session, "listening on port 8080", "the peer to listen").await;
            let peer = w
                .harness
                .internet_address(&target.session)
                .await
                .expect("the harness names the peer's address on the internet network");
            let blocked = start_client(w, "iso-out", NetworkPolicy::Isolated, peer, 8080).await;
            wait_for_log(w, &blocked, "cannot connect", "the isolated agent's connection attempt to fail").await;
            assert!(
                !logs_contain(w, &target.session, "accepted connection").await,
                "an isolated agent reached a peer outside its network"
            );
            // The control: the same peer is reachable under `internet`.
            start_client(w, "net-out", NetworkPolicy::Internet, peer, 8080).await;
            wait_for_log(w, &target.session, "accepted connection", "the internet agent to reach the peer").await;
        })
        .await
}

/// `session_logs` holds at most [`SESSION_LOGS_MAX_BYTES`](crate::SESSION_LOGS_MAX_BYTES):
/// of a longer output, its end, after one line that says how much was left out.
pub async fn long_logs_are_capped_with_a_marker(h: &dyn Harness) {
    World::new(h)
        .await
        .run(async |w| {
            let (spec, mut attach, _) = start_attached(w, "biglogs").await;
            let patience = w.harness.patience();
            // Answered in full, this is more than the cap on its own.
            let big = "z".repeat(crate::SESSION_LOGS_MAX_BYTES + 1024 * 1024);
            attach.input.send_line(&user_line(&big)).await.expect("send");
            // The turn's result line (which repeats the answer) is its last: then the log
            // is complete.
            read_until(&mut attach.output, patience, "the big answer's result line", |l| {
                l.text.len() > big.len() && l.text.starts_with("{\"type\":\"result\"")
            })
            .await;
            let logs = w.backend.session_logs(&spec.session, None).await.expect("logs");
            let (marker, kept) = logs.split_once('\n').expect("more than one line");
            assert!(marker.starts_with(crate::LOGS_TRUNCATED), "no truncation line: {}", short_text(marker));
            assert!(kept.len() <= crate::SESSION_LOGS_MAX_BYTES, "{} bytes kept", kept.len());
            assert!(kept.len() >= crate::SESSION_LOGS_MAX_BYTES / 2, "only {} bytes kept", kept.len());
            assert!(!logs.contains("echo-agent started"), "the start of the output was kept");
            let end: String = kept.chars().rev().take(80).collect::<Vec<_>>().into_iter().rev().collect();
            assert!(kept.ends_with('\n') && kept.contains("zzzz"), "the end of the output was not kept: …{end:?}");
            let dropped: u64 = marker
                .split_whitespace()
                .find_map(|word| word.parse().ok())
                .unwrap_or_else(|| panic!("the truncation line counts what was left out: {marker}"));
            assert!(dropped >= 1024 * 1024, "{marker}");
        })
        .await
}

/// `session_addresses` names each running session's own addresses (the engine's, where
/// the harness can tell), distinct between sessions; none for a `none` network or once
/// the session ended; a missing session is `NotFound`. The daemon tells its callers
/// apart by these.
pub async fn session_addresses_tell_running_sessions_apart(h: &dyn Harness) {
    World::new(h)
        .await
        .run(async |w| {
            let (one, two) = (w.spec("addr-one"), w.spec("addr-two"));
            let mut offline = w.spec("addr-none");
            offline.network = NetworkPolicy::None;
            for spec in [&one, &two, &offline] {
                w.start(spec).await;
                wait_status(w, &spec.session, SessionStatus::Running).await;
            }
            let addresses = async |session: &str| {
                w.backend
                    .session_addresses(session)
                    .await
                    .unwrap_or_else(|e| panic!("session_addresses({session}): {e}"))
            };
            let (first, second) = (addresses(&one.session).await, addresses(&two.session).await);
            assert!(!first.is_empty(), "a running internet session has no address");
            assert!(!second.is_empty(), "a running internet session has no address");
            assert!(first.iter().all(|a| !second.contains(a)), "two sessions share an address: {first:?} {second:?}");
            if let Some(engine_says) = w.harness.internet_address(&one.session).await {
                assert!(first.contains(&engine_says), "{first:?} lacks the engine's {engine_says}");
            }
            for address in first.iter().chain(&second) {
                assert!(!address.is_unspecified(), "{address} is no address");
            }
            let none = addresses(&offline.session).await;
            assert!(none.is_empty(), "a session on no network has addresses: {none:?}");

            w.backend.stop_session(&one.session, Duration::from_secs(5)).await.expect("stop");
            match w.backend.session_addresses(&one.session).await {
                Ok(left) => assert!(left.is_empty(), "a stopped session still has addresses: {left:?}"),
                // Without exit_info_after_stop, a stop may take the session away (a pod).
                Err(e) if e.is_not_found() && !w.caps().exit_info_after_stop => {}
                Err(e) => panic!("session_addresses of a stopped session: {e}"),
            }
            let ghost = format!("{}-never-created", w.backend.prefix());
            match w.backend.session_addresses(&ghost).await {
                Err(e) if e.is_not_found() => {}
                other => panic!("session_addresses of a missing session: {other:?}, expected NotFound"),
            }
        })
        .await
}

/// One conformance function, as [`Case`] holds it.
pub type ConformanceTest = fn(&dyn Harness) -> futures_util::future::LocalBoxFuture<'_, ()>;

/// One test of a suite: its name, what it needs of the backend, and its body.
#[derive(Clone, Copy)]
pub struct Case {
    /// The test's name, as the harness reports and filters it.
    pub name: &'static str,
    /// The capabilities without which the test is reported as ignored.
    pub needs: &'static [Capability],
    /// The test.
    pub run: ConformanceTest,
}

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Case").field("name", &self.name).field("needs", &self.needs).finish_non_exhaustive()
    }
}

impl Case {
    /// The first capability this case needs that `caps` lacks.
    pub fn missing(&self, caps: &Capabilities) -> Option<Capability> {
        self.needs.iter().copied().find(|need| !caps.has(*need))
    }
}

/// A [`Case`] for the async function `$name(&dyn Harness)`, named after it, optionally
/// with the capabilities it needs: `conformance_case!(attach_works, needs: [Attach])`.
#[macro_export]
macro_rules! conformance_case {
    ($name:ident $(, needs: [$($need:ident),* $(,)?])? $(,)?) => {
        $crate::conformance::Case {
            name: stringify!($name),
            needs: &[$($($crate::Capability::$need),*)?],
            run: |h| ::std::boxed::Box::pin($name(h)),
        }
    };
}

/// Every conformance test, once, in a stable order.
pub fn cases() -> Vec<Case> {
    use crate::conformance_case as case;
    vec![
        case!(create_start_exists),
        case!(create_conflict_never_reuses_the_old_container),
        case!(a_stale_container_is_replaced_and_a_foreign_one_left_alone),
        case!(bad_specs_are_refused_clearly),
        case!(image_user_reports_the_images_user),
        case!(exit_code_zero_is_reported),
        case!(nonzero_exit_code_is_reported),
        case!(exit_info_is_kept_until_removed),
        case!(kill_is_idempotent),
        case!(stop_honours_the_grace_period),
        case!(health_goes_from_starting_to_healthy, needs: [HealthChecks]),
        case!(health_turns_unhealthy, needs: [HealthChecks]),
        case!(no_health_check_reads_healthy_while_running),
        case!(oom_kill_is_reported, needs: [OomDetection]),
        case!(external_kill_is_not_an_oom),
        case!(list_shows_only_owned_sessions),
        case!(shutdown_all_stops_every_owned_session),
        case!(snapshot_agrees_with_single_session_calls),
        case!(events_report_a_death, needs: [Events]),
        case!(send_command_runs_in_the_session, needs: [Exec]),
        case!(logs_return_the_agent_output, needs: [Logs]),
        case!(long_logs_are_capped_with_a_marker, needs: [Logs, Attach]),
        case!(attached_line_is_answered, needs: [Attach]),
        case!(reattach_reads_every_line_once, needs: [Attach]),
        case!(a_five_megabyte_line_passes, needs: [Attach]),
        case!(attach_to_a_missing_session_is_not_found, needs: [Attach]),
        case!(volumes_outlive_sessions_and_are_removed_on_request, needs: [Volumes]),
        case!(isolated_agents_reach_the_host_and_nothing_routed_beyond_it, needs: [NetworkIsolation, Logs]),
        case!(session_addresses_tell_running_sessions_apart),
        case!(the_entrypoint_replaces_the_images, needs: [Logs]),
        case!(cpus_beyond_the_engines_are_refused),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_case_names_the_first_capability_the_backend_lacks() {
        let case = crate::conformance_case!(create_start_exists, needs: [Attach, NetworkIsolation]);
        assert_eq!(case.name, "create_start_exists");
        assert_eq!(case.missing(&Capabilities::ALL), None);
        let no_network = Capabilities { network_isolation: false, ..Capabilities::ALL };
        assert_eq!(case.missing(&no_network), Some(Capability::NetworkIsolation));
        let nothing = Capabilities { attach: false, ..no_network };
        assert_eq!(case.missing(&nothing), Some(Capability::Attach));
    }

    #[test]
    fn every_case_is_listed_once() {
        let names: Vec<_> = cases().iter().map(|c| c.name).collect();
        let unique: std::collections::BTreeSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "{names:?}");
    }
}
