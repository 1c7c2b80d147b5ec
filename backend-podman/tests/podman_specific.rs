//! Podman behaviour beyond the shared suite: the backend's own health-check driver, OOM
//! evidence, the real stop grace period, hardening as libpod applied it, and the start-up
//! error.

mod common;

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use backend_core::conformance::{wait_for, Harness};
use backend_core::{
    BackendError, BackendEvent, ExecutionBackend, HealthCheck, HealthCheckSpec, OwnershipLabels, SessionHealth,
    SessionSpec, SessionStatus,
};
use backend_podman::{HealthScheduling, PodmanBackend, PodmanConfig, START_SERVICE};
use common::PodmanHarness;
use futures_util::FutureExt;

const PATIENCE: Duration = Duration::from_secs(60);

/// One test's world: a unique ownership, its backend, and cleanup whether the test
/// passes or panics.
struct Scene<'h> {
    h: &'h PodmanHarness,
    backend: PodmanBackend,
}

impl<'h> Scene<'h> {
    async fn run<F>(h: &'h PodmanHarness, body: F)
    where
        F: AsyncFnOnce(&mut Scene<'h>),
    {
        let run = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
        let owner = OwnershipLabels::new(format!("pt{run}"), format!("inst-{run}")).expect("labels");
        let mut scene = Scene { h, backend: h.podman_backend(owner).await };
        let outcome = {
            let fut = body(&mut scene);
            AssertUnwindSafe(fut).catch_unwind().await
        };
        if let Err(e) = scene.backend.shutdown_all_sessions(Duration::ZERO).await {
            eprintln!("cleanup: {e}");
        }
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
    }

    fn spec(&self, name: &str) -> SessionSpec {
        let mut spec = SessionSpec::new(format!("{}-{name}", self.backend.prefix()), name, common::IMAGE);
        spec.stop_grace = Duration::from_secs(2);
        spec
    }

    async fn start(&self, spec: &SessionSpec) -> String {
        let id = self.backend.create_session(spec).await.expect("create");
        self.backend.start_session(&spec.session).await.expect("start");
        id
    }

    async fn wait_status(&self, session: &str, want: SessionStatus) {
        let backend = &self.backend;
        wait_for(PATIENCE, &format!("{session} to be {want}"), || async move {
            match backend.session_state(session).await {
                Ok(state) if state.status == want => Ok(()),
                Ok(state) => Err(format!("status {}", state.status)),
                Err(e) => Err(e.to_string()),
            }
        })
        .await
    }

    async fn wait_health(&self, session: &str, want: SessionHealth) {
        let backend = &self.backend;
        wait_for(PATIENCE, &format!("{session} to be {want}"), || async move {
            match backend.session_health(session).await {
                Ok(health) if health == want => Ok(()),
                Ok(health) => Err(format!("health {health}")),
                Err(e) => Err(e.to_string()),
            }
        })
        .await
    }

    /// Waits for a `HealthChanged` event of the session with this health.
    async fn health_event(&self, events: &mut backend_core::EventReceiver, session: &str, want: SessionHealth) {
        tokio::time::timeout(PATIENCE, async {
            while let Some(event) = events.recv().await {
                if event == (BackendEvent::HealthChanged { session: session.to_owned(), health: want }) {
                    return;
                }
            }
            panic!("the event stream ended");
        })
        .await
        .unwrap_or_else(|_| panic!("no HealthChanged({want}) event for {session} within {PATIENCE:?}"))
    }

    async fn inspect(&self, session: &str) -> podman_api::models::InspectContainerData {
        self.h.client().containers().get(session).inspect().await.expect("inspect")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_driven_by_the_backend_without_systemd_from_starting_to_healthy_to_unhealthy() {
    let Some(h) = common::harness().await else { return };
    Scene::run(&h, async |s| {
        // Without systemd Podman cannot schedule checks, so the backend must drive them
        // (this project's CI hosts have none); with systemd it must leave them to Podman.
        let systemd = std::path::Path::new("/run/systemd/system").is_dir();
        let expected = if systemd { HealthScheduling::Engine } else { HealthScheduling::Backend };
        assert_eq!(s.backend.health_scheduling(), expected);
        assert_eq!(s.backend.drives_health_checks(), !systemd, "the backend must report whether it drives the checks");
        eprintln!("systemd: {systemd}; the backend drives health checks: {}", s.backend.drives_health_checks());

        let mut events = s.backend.subscribe_events().await.expect("subscribe").expect("events");
        // The image's own check: /agent --health every second, 2 retries.
        let mut spec = s.spec("driven");
        spec.env.insert("ECHO_UNHEALTHY_AFTER_MS".into(), "5000".into());
        s.start(&spec).await;
        assert_eq!(s.backend.session_health(&spec.session).await.expect("health"), SessionHealth::Starting);
        s.wait_health(&spec.session, SessionHealth::Healthy).await;
        s.health_event(&mut events, &spec.session, SessionHealth::Healthy).await;
        s.wait_health(&spec.session, SessionHealth::Unhealthy).await;
        s.health_event(&mut events, &spec.session, SessionHealth::Unhealthy).await;

        // The checks ran through libpod, which recorded them: its own state agrees.
        let inspect = s.inspect(&spec.session).await;
        let health = inspect.state.and_then(|s| s.health).expect("libpod health");
        assert_eq!(health.status.as_deref(), Some("unhealthy"));
        assert!(health.failing_streak.unwrap_or(0) >= 2, "{health:?}");
        assert!(!health.log.unwrap_or_default().is_empty(), "libpod logged the checks");
        let listed = s.backend.snapshot().await.expect("snapshot");
        assert_eq!(
            listed.iter().find(|st| st.session == spec.session).map(|st| st.health),
            Some(SessionHealth::Unhealthy)
        );
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_health_check_hanging_past_its_timeout_reads_unhealthy() {
    let Some(h) = common::harness().await else { return };
    Scene::run(&h, async |s| {
        let mut events = s.backend.subscribe_events().await.expect("subscribe").expect("events");
        let mut spec = s.spec("hangs");
        // `/agent` without arguments runs a second agent, which never exits: the check
        // hangs, and libpod 4.3 does not end it at the timeout.
        spec.health_check = HealthCheckSpec::Override(HealthCheck {
            command: vec!["/agent".into()],
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            retries: 2,
            start_period: Duration::ZERO,
        });
        s.start(&spec).await;
        let started = Instant::now();
        s.wait_health(&spec.session, SessionHealth::Unhealthy).await;
        // First check at 1 s, hung at 2 s (one failure), a second failure at 3 s.
        assert!(started.elapsed() >= Duration::from_millis(2500), "unhealthy too early: {:?}", started.elapsed());
        s.health_event(&mut events, &spec.session, SessionHealth::Unhealthy).await;
        let libpod = s.inspect(&spec.session).await.state.and_then(|s| s.health).and_then(|h| h.status);
        assert_eq!(libpod.as_deref(), Some("starting"), "libpod itself still waits for the hung check");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_podman_kill_is_not_an_oom_and_a_real_oom_names_its_evidence() {
    let Some(h) = common::harness().await else { return };
    Scene::run(&h, async |s| {
        assert!(s.backend.capabilities().oom_detection, "the kernel log is readable on this host");
        let mut hog = s.spec("hog");
        hog.resources.memory_bytes = Some(64 * 1024 * 1024);
        hog.env.insert("ECHO_ALLOC_MB".into(), "256".into());
        let hog_id = s.start(&hog).await;
        let mut victim = s.spec("victim");
        victim.resources.memory_bytes = Some(64 * 1024 * 1024);
        s.start(&victim).await;
        s.wait_status(&hog.session, SessionStatus::Exited).await;
        s.wait_status(&victim.session, SessionStatus::Running).await;
        h.kill_from_outside(&victim.session).await;
        s.wait_status(&victim.session, SessionStatus::Exited).await;

        let oom = s.backend.session_exit_info(&hog.session).await.expect("exit info").expect("exit");
        assert_eq!(oom.exit_code, Some(137), "{oom:?}");
        assert!(oom.oom_killed, "a real OOM kill must be reported: {oom:?}");
        let evidence = oom.error.clone().unwrap_or_default();
        assert!(evidence.contains("kernel log") && evidence.contains(&hog_id), "the evidence is named: {evidence}");
        assert!(evidence.contains("containers/podman#13102"), "{evidence}");
        let libpod = s.inspect(&hog.session).await.state.and_then(|st| st.oom_killed);
        assert_eq!(libpod, Some(false), "Podman 4.3 itself does not set OOMKilled (containers/podman#13102)");

        let killed = s.backend.session_exit_info(&victim.session).await.expect("exit info").expect("exit");
        assert_eq!(killed.exit_code, Some(137), "{killed:?}");
        assert!(!killed.oom_killed, "a `podman kill` of a memory-limited session is not an OOM: {killed:?}");
        assert_eq!(killed.error, None, "{killed:?}");

        // The snapshot agrees with the single-session calls.
        let snapshot = s.backend.snapshot().await.expect("snapshot");
        let exit_of = |name: &str| snapshot.iter().find(|st| st.session == name).and_then(|st| st.exit.clone());
        assert_eq!(exit_of(&hog.session).map(|e| e.oom_killed), Some(true));
        assert_eq!(exit_of(&victim.session).map(|e| e.oom_killed), Some(false));
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_honours_a_2s_grace_not_libpods_10s_default() {
    let Some(h) = common::harness().await else { return };
    Scene::run(&h, async |s| {
        let mut spec = s.spec("stubborn");
        spec.env.insert("ECHO_IGNORE_SIGTERM".into(), "1".into());
        // The container's own stop timeout is the default 10 s: the call's grace must win.
        spec.stop_grace = Duration::from_secs(10);
        s.start(&spec).await;
        s.wait_status(&spec.session, SessionStatus::Running).await;
        let started = Instant::now();
        s.backend.stop_session(&spec.session, Duration::from_secs(2)).await.expect("stop");
        let took = started.elapsed();
        eprintln!("stop with a 2 s grace took {took:?}");
        assert!(took >= Duration::from_millis(1700) && took < Duration::from_secs(5), "took {took:?}");
        let exit = s.backend.session_exit_info(&spec.session).await.expect("exit info").expect("exit");
        assert_eq!(exit.exit_code, Some(137), "{exit:?}");
        assert!(!exit.oom_killed, "{exit:?}");
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hardening_limits_and_env_are_applied_as_libpod_reads_them() {
    let Some(h) = common::harness().await else { return };
    Scene::run(&h, async |s| {
        let mut spec = s.spec("hardened");
        spec.resources.memory_bytes = Some(128 * 1024 * 1024);
        spec.resources.pids_limit = Some(64);
        spec.resources.cpus = Some(0.5);
        spec.read_only_rootfs = true;
        spec.env.insert("ONLY".into(), "this".into());
        spec.health_check = HealthCheckSpec::Disabled;
        s.start(&spec).await;
        s.wait_status(&spec.session, SessionStatus::Running).await;
        assert_eq!(s.backend.session_health(&spec.session).await.expect("health"), SessionHealth::Healthy);

        let inspect = s.inspect(&spec.session).await;
        let host = inspect.host_config.clone().expect("host config");
        assert!(
            host.security_opt.unwrap_or_default().iter().any(|o| o.contains("no-new-privileges")),
            "no-new-privileges must reach libpod"
        );
        assert!(inspect.effective_caps.unwrap_or_default().is_empty(), "all capabilities dropped");
        assert_eq!(host.memory, Some(128 * 1024 * 1024));
        assert_eq!(host.memory_swap, Some(128 * 1024 * 1024), "no swap beyond the limit");
        assert_eq!(host.pids_limit, Some(64));
        assert_eq!(host.readonly_rootfs, Some(true));
        let ulimits: Vec<_> = host.ulimits.unwrap_or_default().into_iter().filter_map(|u| u.name).collect();
        assert!(
            ulimits.contains(&"RLIMIT_NOFILE".to_owned()) && ulimits.contains(&"RLIMIT_NPROC".to_owned()),
            "{ulimits:?}"
        );
        let config = inspect.config.expect("config");
        assert_eq!(config.stop_timeout, Some(2));
        assert!(config
            .healthcheck
            .is_none_or(|c| c.test.unwrap_or_default().first().map(String::as_str) == Some("NONE")));
        let env = config.env.unwrap_or_default();
        assert!(env.contains(&"ONLY=this".to_owned()), "{env:?}");
        // Podman adds only these of its own (documented in the README).
        for var in &env {
            let key = var.split('=').next().unwrap_or_default();
            assert!(["ONLY", "PATH", "TERM", "HOSTNAME", "HOME", "container"].contains(&key), "unexpected {var}");
        }
    })
    .await
}

#[tokio::test]
async fn an_unreachable_service_is_unavailable_naming_the_paths_tried_and_the_fix() {
    let config =
        PodmanConfig { socket: Some("unix:///nonexistent/agentd-test/podman.sock".into()), ..PodmanConfig::default() };
    let owner = OwnershipLabels::new("agentd", "i1").expect("labels");
    match PodmanBackend::connect(config, owner).await {
        Err(e @ BackendError::Unavailable { .. }) => {
            let text = e.to_string();
            assert!(text.contains("/nonexistent/agentd-test/podman.sock"), "{text}");
            assert!(text.contains(START_SERVICE), "{text}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

/// The isolated network as the host firewall sees it: the bridge netavark names for it,
/// the host's address on it, on this host.
#[tokio::test]
async fn the_isolated_network_names_its_bridge_and_gateway() {
    let Some(_h) = common::harness().await else { return };
    let owner = OwnershipLabels::new("agentd-netinfo", "i1").expect("labels");
    let backend = PodmanBackend::connect(PodmanConfig::default(), owner).await.expect("connect");
    let network = backend.isolated_network().await.expect("read").expect("an isolated network");
    let mut cli = std::process::Command::new("podman");
    if let Ok(url) = std::env::var("CONTAINER_HOST") {
        cli.args(["--url", &url]);
    }
    let out = cli
        .args(["network", "inspect", "--format", "{{.NetworkInterface}}", &network.name])
        .output()
        .expect("podman network inspect");
    assert_eq!(network.interface, String::from_utf8_lossy(&out.stdout).trim(), "{network:?}");
    let gateway = backend.gateway_addresses().await.expect("gateways").isolated.expect("isolated gateway");
    assert!(network.gateways.contains(&gateway), "{network:?}");
    assert!(network.on_this_host);
    assert_eq!(network.subnets.len(), 1, "{network:?}");
}
