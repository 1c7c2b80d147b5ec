//! The manager's rules, on the mock engine.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use agent_manager::{
    AgentKind, AgentStatus, EndedBy, EventKind, ManagerError, ManualClock, NewAgent, RestartPolicy, Store,
    UnhealthyAction,
};
use backend_core::{ExecutionBackend, OwnershipLabels, SessionHealth, SessionSpec};
use backend_mock::{MockBackend, MockCall, MockEngine, PLAIN_IMAGE};
use common::{eventually, test_config, Fixture};

/// How a run ended, scripted on the engine.
#[derive(Debug, Clone, Copy)]
enum Ending {
    Exit(i64),
    Oom,
    KilledFromOutside,
    Vanished,
}

struct Expect {
    status: AgentStatus,
    code: Option<i64>,
    oom: bool,
    signal: Option<i32>,
    error: Option<&'static str>,
}

#[tokio::test]
async fn ended_runs_are_classified_by_how_they_ended() {
    let cases = [
        (
            Ending::Exit(0),
            Expect { status: AgentStatus::Stopped, code: Some(0), oom: false, signal: None, error: None },
        ),
        (Ending::Exit(2), Expect { status: AgentStatus::Failed, code: Some(2), oom: false, signal: None, error: None }),
        (Ending::Oom, Expect { status: AgentStatus::Failed, code: Some(137), oom: true, signal: Some(9), error: None }),
        (
            Ending::KilledFromOutside,
            Expect { status: AgentStatus::Failed, code: Some(137), oom: false, signal: Some(9), error: None },
        ),
        (
            Ending::Vanished,
            Expect {
                status: AgentStatus::Failed,
                code: None,
                oom: false,
                signal: None,
                error: Some("session disappeared"),
            },
        ),
    ];
    // Docker's listing carries no exit info (the manager must ask for it before anything
    // removes the container); the mock can behave either way.
    for snapshot_has_exit in [true, false] {
        for (ending, expect) in &cases {
            let fx = Fixture::new().await;
            fx.engine.set_snapshot_exit_info(snapshot_has_exit);
            let agent = fx.spawn("worker").await.agent;
            assert_eq!(agent.status, AgentStatus::Running);
            match ending {
                Ending::Exit(code) => fx.engine.exit(&agent.session, *code),
                Ending::Oom => fx.engine.oom_kill(&agent.session),
                Ending::KilledFromOutside => fx.engine.kill_from_outside(&agent.session),
                Ending::Vanished => fx.engine.vanish(&agent.session, false),
            }
            if matches!(ending, Ending::Exit(0)) {
                // A clean exit waits a moment, for a removal racing it to show.
                assert_eq!(fx.reconcile().await.changed, 0, "a clean exit is recorded at once");
                fx.clock.advance(Duration::from_secs(2));
            }
            let report = fx.reconcile().await;
            assert_eq!(report.changed, 1, "{ending:?}");
            let view = fx.get("worker").await;
            let case = format!("{ending:?} (snapshot carries exit: {snapshot_has_exit})");
            assert_eq!(view.agent.status, expect.status, "{case}");
            let exit = view.exit.unwrap_or_else(|| panic!("{case}: no exit recorded"));
            assert_eq!(exit.code, expect.code, "{case}");
            assert_eq!(exit.oom_killed, expect.oom, "{case}");
            assert_eq!(exit.signal, expect.signal, "{case}");
            assert_eq!(exit.error.as_deref(), expect.error, "{case}");
            assert!(exit.finished_at.is_some(), "{case}");
            let runs = fx.manager.runs("worker").await.expect("runs");
            assert_eq!(runs.len(), 1, "{case}");
            let outside = matches!(ending, Ending::Vanished | Ending::KilledFromOutside);
            let ended_by = if outside { EndedBy::Outside } else { EndedBy::Itself };
            assert_eq!(runs[0].ended_by, Some(ended_by), "{case}");
            if outside {
                assert_eq!(view.agent.reason.as_deref(), Some("stopped from outside"), "{case}");
            }
            // The container of an ended run is kept (logs stay readable) until restart or removal.
            if !matches!(ending, Ending::Vanished) {
                assert!(fx.engine.container_id(&agent.session).is_some(), "{case}: container was removed");
            }
            // A second pass changes nothing.
            assert_eq!(fx.reconcile().await.changed, 0, "{case}");
        }
    }
}

/// Runs the supervision loop of `fx` until the returned sender is told to stop.
fn supervise(fx: &Fixture) -> (tokio::sync::watch::Sender<bool>, tokio::task::JoinHandle<()>) {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    (stop_tx, tokio::spawn(fx.manager.clone().supervise(stop_rx)))
}

#[tokio::test]
async fn an_outside_stop_reads_failed_whatever_the_exit_code() {
    let mut config = test_config();
    config.reconcile.interval = Duration::from_secs(3600);
    let fx = Fixture::with_config(config).await;
    let agent = fx.spawn("graceful").await.agent;
    let (stop_tx, supervisor) = supervise(&fx);
    eventually("the supervisor to subscribe", || async { fx.engine.calls().contains(&MockCall::Subscribe) }).await;
    // `docker stop` from outside: the engine tells of SIGTERM, the agent exits 0 on it.
    fx.engine.stop_from_outside(&agent.session);
    eventually("the stop to be recorded", || async { fx.status("graceful").await != AgentStatus::Running }).await;
    let view = fx.get("graceful").await;
    assert_eq!(view.agent.status, AgentStatus::Failed, "{:?}", view.agent.reason);
    assert_eq!(view.agent.reason.as_deref(), Some("stopped from outside (signal 15)"));
    assert_eq!(view.exit.and_then(|e| e.code), Some(0), "the exit itself is kept as it was");
    let runs = fx.manager.runs("graceful").await.expect("runs");
    assert_eq!(runs[0].ended_by, Some(EndedBy::Outside));
    let events = fx.manager.events(Some("graceful"), 0, 100).await.expect("events");
    assert!(
        events.iter().any(|e| e.kind == EventKind::Failed && e.detail == "stopped from outside (signal 15); exit 0"),
        "{events:#?}"
    );

    // agentd's own stops and restarts signal too: those are not from outside, and the
    // signal of a replaced run is not held against the next one.
    fx.spawn("kept").await;
    fx.manager.restart("kept").await.expect("restart");
    let session = fx.get("kept").await.agent.session;
    let restarted = fx.get("kept").await.agent.container_id;
    fx.engine.exit(&session, 0);
    fx.manager.reconcile().await.expect("pass");
    fx.clock.advance(Duration::from_secs(2));
    fx.manager.reconcile().await.expect("pass");
    let view = fx.get("kept").await;
    assert_eq!(view.agent.status, AgentStatus::Stopped, "{:?} ({restarted:?})", view.agent.reason);
    assert_eq!(view.agent.reason.as_deref(), Some("exit 0"));
    fx.spawn("asked").await;
    let view = fx.manager.stop("asked").await.expect("stop");
    assert_eq!(view.agent.status, AgentStatus::Stopped);
    fx.manager.reconcile().await.expect("pass");
    let view = fx.get("asked").await;
    assert_eq!((view.agent.status, view.agent.reason.as_deref()), (AgentStatus::Stopped, Some("stopped on request")));

    stop_tx.send(true).expect("stop");
    tokio::time::timeout(Duration::from_secs(5), supervisor).await.expect("supervisor stops").expect("join");
}

/// Podman's `rm -f` sends SIGTERM and no event about it; the echo agent exits 0 and the
/// container is removed a moment later. Whichever a pass sees first, the record is the
/// same.
#[tokio::test]
async fn a_removal_racing_a_clean_exit_reads_stopped_from_outside() {
    let fx = Fixture::new().await;
    let agent = fx.spawn("raced").await.agent;
    fx.engine.exit(&agent.session, 0);
    assert_eq!(fx.reconcile().await.changed, 0);
    assert_eq!(fx.status("raced").await, AgentStatus::Running, "the clean exit waits");
    let due = fx.manager.next_wakeup().expect("a pass is due when the wait ends");
    assert_eq!((due - fx.manager_now()).whole_seconds(), 2);
    fx.engine.vanish(&agent.session, true);
    fx.clock.advance(Duration::from_secs(2));
    assert_eq!(fx.reconcile().await.changed, 1);
    let view = fx.get("raced").await;
    assert_eq!(view.agent.status, AgentStatus::Failed);
    assert_eq!(view.agent.reason.as_deref(), Some("stopped from outside"));
    assert_eq!(view.exit.and_then(|e| e.error).as_deref(), Some("session disappeared"));
    assert_eq!(fx.manager.runs("raced").await.expect("runs")[0].ended_by, Some(EndedBy::Outside));

    // Removed at once: the same record.
    let agent = fx.spawn("removed").await.agent;
    fx.engine.vanish(&agent.session, true);
    fx.reconcile().await;
    let view = fx.get("removed").await;
    assert_eq!((view.agent.status, view.agent.reason.as_deref()), (AgentStatus::Failed, Some("stopped from outside")));

    // A clean exit nobody raced reads stopped once the wait is over.
    let agent = fx.spawn("done").await.agent;
    fx.engine.exit(&agent.session, 0);
    fx.reconcile().await;
    fx.clock.advance(Duration::from_secs(1));
    fx.reconcile().await;
    assert_eq!(fx.status("done").await, AgentStatus::Running, "one second is not the whole wait");
    fx.clock.advance(Duration::from_secs(1));
    fx.reconcile().await;
    let view = fx.get("done").await;
    assert_eq!((view.agent.status, view.agent.reason.as_deref()), (AgentStatus::Stopped, Some("exit 0")));
    assert_eq!(fx.manager.runs("done").await.expect("runs")[0].ended_by, Some(EndedBy::Itself));
}

#[tokio::test]
async fn engine_unavailable_for_three_passes_changes_nothing() {
    let fx = Fixture::new().await;
    let agent = fx.spawn("steady").await.agent;
    fx.engine.exit(&agent.session, 3);
    fx.engine.fail_next(3);
    for pass in 1..=3 {
        let err = fx.manager.reconcile().await.expect_err("the engine is down");
        assert!(err.is_engine_unavailable(), "pass {pass}: {err}");
        let now = fx.get("steady").await;
        assert_eq!(now.agent.status, AgentStatus::Running, "pass {pass}: an unreachable engine is not a dead agent");
        assert_eq!(now.exit, None);
    }
    assert_eq!(fx.manager.metrics().snapshot().engine_errors, 3);
    fx.reconcile().await;
    let view = fx.get("steady").await;
    assert_eq!(view.agent.status, AgentStatus::Failed);
    assert_eq!(view.exit.and_then(|e| e.code), Some(3), "the real exit is recorded once the engine answers");
}

#[tokio::test]
async fn stopping_on_purpose_reads_stopped_whatever_the_exit_code() {
    let fx = Fixture::new().await;
    let mut new = NewAgent { name: "stubborn".into(), ..NewAgent::default() };
    new.env.insert("ECHO_IGNORE_SIGTERM".into(), "1".into());
    fx.spawn_with(new).await;
    let view = fx.manager.stop("stubborn").await.expect("stop");
    assert_eq!(view.agent.status, AgentStatus::Stopped);
    let exit = view.exit.expect("exit recorded");
    assert_eq!(exit.code, Some(137), "SIGKILL after the grace period");
    assert_eq!(view.agent.reason.as_deref(), Some("stopped on request"));
    let runs = fx.manager.runs("stubborn").await.expect("runs");
    assert_eq!(runs[0].ended_by, Some(EndedBy::Stop));
    assert_eq!(fx.reconcile().await.changed, 0, "a stopped agent stays stopped");
    // Stop is idempotent.
    assert_eq!(fx.manager.stop("stubborn").await.expect("second stop").agent.status, AgentStatus::Stopped);
}

#[tokio::test]
async fn remove_deletes_container_and_record_but_keeps_events() {
    let fx = Fixture::new().await;
    let agent = fx.spawn("doomed").await.agent;
    fx.manager.remove("doomed").await.expect("remove");
    assert!(matches!(fx.manager.get("doomed").await, Err(ManagerError::AgentNotFound(_))));
    assert_eq!(fx.engine.container_id(&agent.session), None);
    let events = fx.manager.events(Some(&agent.id), 0, 100).await.expect("events");
    let kinds: Vec<EventKind> = events.iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [EventKind::Spawned, EventKind::Started, EventKind::Stopped, EventKind::Removed]);
    assert!(matches!(fx.manager.remove("doomed").await, Err(ManagerError::AgentNotFound(_))));
}

#[tokio::test]
async fn restart_records_the_old_run_and_starts_a_new_container() {
    let fx = Fixture::new().await;
    let before = fx.spawn("again").await.agent;
    let after = fx.manager.restart("again").await.expect("restart").agent;
    assert_eq!(after.status, AgentStatus::Running);
    assert_eq!(after.restarts, 1);
    assert_ne!(after.container_id, before.container_id, "a restart never reuses the old container");
    let runs = fx.manager.runs("again").await.expect("runs");
    assert_eq!(runs.len(), 2);
    assert_eq!(runs[0].ended_by, Some(EndedBy::Restart));
    assert_eq!(runs[0].exit.as_ref().and_then(|e| e.code), Some(0));
    assert!(runs[1].exit.is_none(), "the new run is open");
}

#[tokio::test]
async fn spawn_refuses_bad_requests_clearly() {
    let fx = Fixture::new().await;
    match fx.manager.spawn(NewAgent { name: "Bad_Name".into(), ..NewAgent::default() }).await {
        Err(ManagerError::Invalid { field: "name", message }) => assert!(message.contains("a-z"), "{message}"),
        other => panic!("expected an invalid name, got {other:?}"),
    }
    let missing = NewAgent { name: "noimg".into(), image: Some("nowhere:1".into()), ..NewAgent::default() };
    match fx.manager.spawn(missing).await {
        Err(e @ ManagerError::ImageMissing { .. }) => assert!(e.to_string().contains("nowhere:1"), "{e}"),
        other => panic!("expected ImageMissing, got {other:?}"),
    }
    let echo = NewAgent { name: "echo".into(), image: Some("agentd-echo:missing".into()), ..NewAgent::default() };
    let err = fx.manager.spawn(echo).await.expect_err("missing echo image");
    assert!(err.to_string().contains("cargo xtask images"), "{err}");
    let mut reserved = NewAgent { name: "env".into(), ..NewAgent::default() };
    reserved.env.insert("AGENTD_AGENT_TOKEN".into(), "x".into());
    assert!(matches!(fx.manager.spawn(reserved).await, Err(ManagerError::Invalid { field: "env", .. })));
    let tiny = NewAgent { name: "tiny".into(), memory_mb: Some(1), ..NewAgent::default() };
    assert!(matches!(fx.manager.spawn(tiny).await, Err(ManagerError::Invalid { field: "memory_mb", .. })));

    fx.spawn("taken").await;
    assert!(matches!(
        fx.manager.spawn(NewAgent { name: "taken".into(), ..NewAgent::default() }).await,
        Err(ManagerError::NameTaken(_))
    ));
}

#[tokio::test]
async fn a_failed_create_leaves_no_record_behind() {
    let fx = Fixture::new().await;
    // The engine goes away between the image check and create.
    fx.engine.fail_next_matching(1, |call| matches!(call, MockCall::Create(_)));
    let err =
        fx.manager.spawn(NewAgent { name: "flaky".into(), ..NewAgent::default() }).await.expect_err("engine down");
    assert!(err.is_engine_unavailable(), "{err}");
    assert!(matches!(fx.manager.get("flaky").await, Err(ManagerError::AgentNotFound(_))), "no half-made record");
    assert_eq!(fx.engine.container_count(), 0);
    // The name is free again.
    fx.spawn("flaky").await;
}

#[tokio::test]
async fn a_failed_start_is_recorded_as_a_failed_run() {
    let fx = Fixture::new().await;
    fx.engine.fail_next_matching(1, |call| matches!(call, MockCall::Start(_)));
    let err =
        fx.manager.spawn(NewAgent { name: "nostart".into(), ..NewAgent::default() }).await.expect_err("start fails");
    assert!(matches!(err, ManagerError::StartFailed { .. }), "{err}");
    let view = fx.get("nostart").await;
    assert_eq!(view.agent.status, AgentStatus::Failed);
    let exit = view.exit.expect("the failed start is a finished run");
    assert!(exit.error.as_deref().unwrap_or_default().starts_with("start failed"), "{exit:?}");
    let runs = fx.manager.runs("nostart").await.expect("runs");
    assert_eq!(runs[0].ended_by, Some(EndedBy::StartError));
}

#[tokio::test]
async fn orphans_are_removed_only_when_ours_and_old_enough() {
    struct Case {
        what: &'static str,
        other_instance: bool,
        age: Duration,
        dry_run: bool,
        removed: bool,
    }
    let cases = [
        Case {
            what: "ours, older than the grace",
            other_instance: false,
            age: Duration::from_secs(301),
            dry_run: false,
            removed: true,
        },
        Case {
            what: "ours, younger than the grace",
            other_instance: false,
            age: Duration::from_secs(299),
            dry_run: false,
            removed: false,
        },
        Case {
            what: "another instance's",
            other_instance: true,
            age: Duration::from_secs(3600),
            dry_run: false,
            removed: false,
        },
        Case {
            what: "ours, dry run",
            other_instance: false,
            age: Duration::from_secs(3600),
            dry_run: true,
            removed: false,
        },
    ];
    for case in cases {
        let mut config = test_config();
        config.reconcile.orphan_dry_run = case.dry_run;
        let fx = Fixture::with_config(config).await;
        fx.spawn("kept").await;
        let owner = if case.other_instance {
            OwnershipLabels::new("agentd", "someone-else").expect("labels")
        } else {
            fx.owner.clone()
        };
        let stray = MockBackend::new(fx.engine.clone(), owner);
        let spec = SessionSpec::new("agentd-stray", "stray-id", PLAIN_IMAGE);
        stray.create_session(&spec).await.expect("create orphan");
        stray.start_session("agentd-stray").await.expect("start orphan");
        fx.engine.insert_foreign("agentd-foreign", BTreeMap::new());
        fx.clock.advance(case.age);
        for _ in 0..2 {
            fx.reconcile().await;
        }
        let present = fx.engine.container_id("agentd-stray").is_some();
        assert_eq!(!present, case.removed, "{}", case.what);
        assert!(
            fx.engine.container_id("agentd-foreign").is_some(),
            "{}: an unlabelled container was touched",
            case.what
        );
        assert_eq!(fx.status("kept").await, AgentStatus::Running, "{}", case.what);
        let events = fx.manager.events(None, 0, 1000).await.expect("events");
        let count = |kind| events.iter().filter(|e| e.kind == kind).count();
        assert_eq!(count(EventKind::OrphanRemoved), usize::from(case.removed), "{}", case.what);
        let found = usize::from(case.dry_run);
        assert_eq!(count(EventKind::OrphanFound), found, "{}: dry run reports each orphan once", case.what);
    }
}

#[tokio::test]
async fn reconcile_never_takes_a_spawn_in_flight_for_an_orphan() {
    let mut config = test_config();
    config.reconcile.orphan_grace = Duration::ZERO;
    let fx = Fixture::with_config(config).await;
    fx.engine.set_latency(Duration::from_millis(5));
    let spawns = {
        let manager = fx.manager.clone();
        tokio::spawn(async move {
            for i in 0..20 {
                manager.spawn(NewAgent { name: format!("race{i}"), ..NewAgent::default() }).await.expect("spawn");
            }
        })
    };
    let passes = {
        let manager = fx.manager.clone();
        tokio::spawn(async move {
            for _ in 0..40 {
                manager.reconcile().await.expect("pass");
            }
        })
    };
    spawns.await.expect("spawns");
    passes.await.expect("passes");
    fx.reconcile().await;
    let agents = fx.manager.list(None).await.expect("list");
    assert_eq!(agents.len(), 20);
    assert!(agents.iter().all(|a| a.agent.status == AgentStatus::Running), "{agents:?}");
    assert!(!fx.engine.calls().iter().any(|c| matches!(c, MockCall::Remove(_))), "a spawned session was removed");
}

#[tokio::test]
async fn leave_running_shutdown_then_a_new_manager_adopts_everything() {
    let path = std::env::temp_dir().join(format!("agentd-adopt-{}.db", uuid_like()));
    let engine = MockEngine::new();
    let clock = ManualClock::new();
    let (ids, names) = {
        let store = Store::open(&path).await.expect("open store");
        let fx = Fixture::on(engine.clone(), store.clone(), test_config(), clock.clone()).await;
        fx.spawn_many(3).await;
        let agents = fx.manager.list(None).await.expect("list");
        let summary = fx.manager.shutdown_all(true).await.expect("shutdown");
        assert_eq!(summary.left_running.len(), 3);
        assert!(summary.stopped.is_empty());
        store.close().await;
        (
            agents.iter().map(|a| a.agent.container_id.clone()).collect::<Vec<_>>(),
            agents.iter().map(|a| a.agent.name.clone()).collect::<Vec<_>>(),
        )
    };
    engine.clear_calls();
    let store = Store::open(&path).await.expect("reopen store");
    let fx = Fixture::on(engine.clone(), store, test_config(), clock).await;
    let report = fx.reconcile().await;
    assert_eq!(report.orphans_removed, 0);
    let calls = engine.calls();
    assert!(
        !calls
            .iter()
            .any(|c| matches!(c, MockCall::Remove(_) | MockCall::Stop(_) | MockCall::Create(_) | MockCall::Start(_))),
        "adoption must not touch the containers: {calls:?}"
    );
    for (name, id) in names.iter().zip(&ids) {
        let view = fx.get(name).await;
        assert_eq!(view.agent.status, AgentStatus::Running, "{name}");
        assert_eq!(&view.agent.container_id, id, "{name}: same container");
    }
    let adopted = fx
        .manager
        .events(None, 0, 1000)
        .await
        .expect("events")
        .into_iter()
        .filter(|e| e.kind == EventKind::Adopted)
        .count();
    assert_eq!(adopted, 3);
    fx.store.close().await;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

fn uuid_like() -> String {
    format!(
        "{}-{:?}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos()
    )
}

#[tokio::test]
async fn shutdown_stops_every_agent_concurrently_and_records_the_exits() {
    let fx = Fixture::new().await;
    for i in 0..10 {
        let mut new = NewAgent { name: format!("s{i}"), stop_grace_secs: Some(1), ..NewAgent::default() };
        new.env.insert("ECHO_IGNORE_SIGTERM".into(), "1".into());
        fx.spawn_with(new).await;
    }
    let started = std::time::Instant::now();
    let summary = fx.manager.shutdown_all(false).await.expect("shutdown");
    let took = started.elapsed();
    assert_eq!(summary.stopped.len(), 10, "{summary:?}");
    assert!(summary.failed.is_empty(), "{summary:?}");
    // One after another this takes 10 x 1 s.
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}: agents were not stopped concurrently");
    for view in fx.manager.list(None).await.expect("list") {
        assert_eq!(view.agent.status, AgentStatus::Stopped, "{}", view.agent.name);
        assert_eq!(view.exit.as_ref().and_then(|e| e.code), Some(137), "{}", view.agent.name);
        let runs = fx.manager.runs(&view.agent.name).await.expect("runs");
        assert_eq!(runs[0].ended_by, Some(EndedBy::Shutdown));
    }
    assert!(matches!(
        fx.manager.spawn(NewAgent { name: "late".into(), ..NewAgent::default() }).await,
        Err(ManagerError::ShuttingDown)
    ));
}

#[tokio::test]
async fn restart_always_brings_agents_back_after_a_daemon_shutdown() {
    let engine = MockEngine::new();
    let store = Store::in_memory().await.expect("store");
    let clock = ManualClock::new();
    {
        let fx = Fixture::on(engine.clone(), store.clone(), test_config(), clock.clone()).await;
        fx.spawn_with(NewAgent { name: "always".into(), restart: Some(RestartPolicy::Always), ..NewAgent::default() })
            .await;
        fx.spawn_with(NewAgent { name: "never".into(), ..NewAgent::default() }).await;
        fx.manager.shutdown_all(false).await.expect("shutdown");
    }
    let fx = Fixture::on(engine, store, test_config(), clock).await;
    fx.reconcile().await;
    assert_eq!(fx.status("always").await, AgentStatus::Running);
    assert_eq!(fx.status("never").await, AgentStatus::Stopped);
}

#[tokio::test]
async fn crash_loop_backoff_doubles_from_10s_to_a_300s_cap_and_resets_after_10_minutes() {
    let fx = Fixture::new().await;
    fx.spawn_with(NewAgent { name: "crashy".into(), restart: Some(RestartPolicy::OnFailure), ..NewAgent::default() })
        .await;
    let mut delays = Vec::new();
    for attempt in 1..=8u32 {
        let agent = fx.get("crashy").await.agent;
        assert_eq!(agent.status, AgentStatus::Running, "attempt {attempt}");
        fx.engine.exit(&agent.session, 1);
        fx.reconcile().await;
        let failed = fx.get("crashy").await.agent;
        assert_eq!(failed.status, AgentStatus::Failed);
        let due = failed.next_restart_at.expect("restart scheduled");
        let delay = (due - fx.manager_now()).whole_seconds();
        delays.push(delay);
        assert_eq!(fx.manager.next_wakeup(), Some(due), "the supervisor must wake for the restart");
        // One second early: nothing happens.
        fx.clock.advance(Duration::from_secs(delay as u64 - 1));
        fx.reconcile().await;
        assert_eq!(fx.status("crashy").await, AgentStatus::Failed, "attempt {attempt}: restarted early");
        fx.clock.advance(Duration::from_secs(1));
        fx.reconcile().await;
        let restarted = fx.get("crashy").await.agent;
        assert_eq!(restarted.status, AgentStatus::Running, "attempt {attempt}: not restarted when due");
        assert_eq!(restarted.restarts, attempt);
    }
    assert_eq!(delays, [10, 20, 40, 80, 160, 300, 300, 300]);
    // Ten minutes of running clears the streak.
    fx.clock.advance(Duration::from_secs(600));
    let agent = fx.get("crashy").await.agent;
    fx.engine.exit(&agent.session, 1);
    fx.reconcile().await;
    let due = fx.get("crashy").await.agent.next_restart_at.expect("scheduled");
    assert_eq!((due - fx.manager_now()).whole_seconds(), 10);
    // Exit 0 under on-failure is not restarted.
    fx.clock.advance(Duration::from_secs(10));
    fx.reconcile().await;
    let agent = fx.get("crashy").await.agent;
    fx.engine.exit(&agent.session, 0);
    fx.reconcile().await;
    fx.clock.advance(Duration::from_secs(2));
    fx.reconcile().await;
    let done = fx.get("crashy").await.agent;
    assert_eq!(done.status, AgentStatus::Stopped);
    assert_eq!(done.next_restart_at, None);
}

trait Now {
    fn manager_now(&self) -> time::OffsetDateTime;
}

impl Now for Fixture {
    fn manager_now(&self) -> time::OffsetDateTime {
        use agent_manager::Clock;
        self.clock.now()
    }
}

#[tokio::test]
async fn the_claude_code_command_speaks_stream_json_on_stdio() {
    let fx = Fixture::new().await;
    let new = NewAgent {
        name: "claude".into(),
        kind: Some(AgentKind::ClaudeCode),
        image: Some(backend_mock::ECHO_IMAGE.into()),
        model: Some("opus".into()),
        ..NewAgent::default()
    };
    let agent = fx.spawn_with(new).await.agent;
    let session_spec = fx.manager_spec(&agent.name).await;
    assert!(session_spec.stdin_open, "claude-code agents talk over stdin");
    let command = session_spec.command.expect("command");
    assert_eq!(
        command,
        [
            "claude",
            "-p",
            "--input-format",
            "stream-json",
            "--output-format",
            "stream-json",
            "--verbose",
            "--permission-prompt-tool",
            "stdio",
            "--session-id",
            &agent.id,
            "--model",
            "opus"
        ]
    );
    assert!(!command.iter().any(|a| a.starts_with("--sdk")), "no dial-in flag: the CLI refuses it");
    assert!(!session_spec.env.keys().any(|k| k == "AGENTD_WS_URL" || k == "AGENTD_AGENT_TOKEN"));
}

impl Fixture {
    async fn manager_spec(&self, name: &str) -> SessionSpec {
        let agent = self.manager.agent(name).await.expect("agent");
        self.manager.session_spec_for(&agent).expect("spec")
    }
}

#[tokio::test]
async fn health_is_recorded_and_sustained_unhealth_restarts_when_asked() {
    let fx = Fixture::new().await;
    let watched = fx.spawn("watched").await.agent;
    let medic = fx
        .spawn_with(NewAgent {
            name: "medic".into(),
            on_unhealthy: Some(UnhealthyAction::Restart),
            ..NewAgent::default()
        })
        .await
        .agent;
    fx.reconcile().await;
    assert_eq!(fx.get("watched").await.agent.health, SessionHealth::Healthy);
    fx.engine.set_health(&watched.session, SessionHealth::Unhealthy);
    fx.engine.set_health(&medic.session, SessionHealth::Unhealthy);
    fx.reconcile().await;
    assert_eq!(fx.get("watched").await.agent.health, SessionHealth::Unhealthy);
    let events = fx.manager.events(Some("watched"), 0, 100).await.expect("events");
    let health_event = events.iter().rev().find(|e| e.kind == EventKind::HealthChanged).expect("health event");
    assert_eq!(health_event.detail, "healthy -> unhealthy");
    fx.clock.advance(Duration::from_secs(31));
    fx.reconcile().await;
    assert_eq!(fx.get("watched").await.agent.restarts, 0, "on_unhealthy = record only records");
    let medic_now = fx.get("medic").await.agent;
    assert_eq!(medic_now.restarts, 1, "on_unhealthy = restart restarts after the grace");
    assert_eq!(medic_now.status, AgentStatus::Running);
}

#[tokio::test]
async fn pending_records_left_by_a_crash_are_resolved() {
    let fx = Fixture::new().await;
    // Three spawns interrupted at different points, as a crash would leave them.
    for name in ["created", "started", "nothing"] {
        fx.spawn(name).await;
    }
    for name in ["created", "started", "nothing"] {
        let mut agent = fx.manager.agent(name).await.expect("agent");
        agent.status = AgentStatus::Pending;
        fx.store.update_agent(&agent).await.expect("update");
        let backend = fx.manager.backend();
        match name {
            "created" => {
                backend.remove_session(&agent.session).await.expect("remove");
                let spec = fx.manager.session_spec_for(&agent).expect("spec");
                backend.create_session(&spec).await.expect("create");
            }
            "nothing" => backend.remove_session(&agent.session).await.expect("remove"),
            _ => {}
        }
    }
    // A new manager (this one's memory of running containers would otherwise count).
    let fx2 = Fixture::on(fx.engine.clone(), fx.store.clone(), test_config(), fx.clock.clone()).await;
    fx2.reconcile().await;
    assert_eq!(fx2.status("created").await, AgentStatus::Running);
    assert_eq!(fx2.status("started").await, AgentStatus::Running);
    let nothing = fx2.get("nothing").await;
    assert_eq!(nothing.agent.status, AgentStatus::Failed);
    assert!(
        nothing.agent.reason.as_deref().unwrap_or_default().contains("spawn interrupted"),
        "{:?}",
        nothing.agent.reason
    );
}

#[tokio::test]
async fn every_transition_is_stored_and_broadcast() {
    let fx = Fixture::new().await;
    let mut live = fx.manager.subscribe();
    let agent = fx.spawn("told").await.agent;
    fx.engine.exit(&agent.session, 4);
    fx.reconcile().await;
    let stored = fx.manager.events(Some("told"), 0, 100).await.expect("events");
    let mut broadcast = Vec::new();
    while let Ok(event) = live.try_recv() {
        broadcast.push(event);
    }
    assert_eq!(stored, broadcast, "the broadcast carries exactly the stored events");
    let kinds: Vec<EventKind> = stored.iter().map(|e| e.kind).collect();
    assert_eq!(kinds, [EventKind::Spawned, EventKind::Started, EventKind::Failed]);
    let failed = stored.last().expect("event");
    assert_eq!((failed.from, failed.to), (Some(AgentStatus::Running), Some(AgentStatus::Failed)));
    assert_eq!(failed.detail, "exit 4");
}

#[tokio::test]
async fn an_unchanged_pass_costs_one_snapshot_and_no_per_agent_calls() {
    let fx = Fixture::new().await;
    fx.spawn_many(10_000).await;
    fx.reconcile().await;
    fx.engine.clear_calls();
    let report = fx.reconcile().await;
    assert_eq!(report.agents, 10_000);
    assert_eq!(report.changed, 0);
    assert_eq!(fx.engine.calls(), [MockCall::Snapshot], "one snapshot, nothing per agent");
}

#[tokio::test]
async fn the_supervisor_learns_of_a_kill_from_events_without_a_relist() {
    let mut config = test_config();
    config.reconcile.interval = Duration::from_secs(3600);
    let fx = Fixture::with_config(config).await;
    let agent = fx.spawn("victim").await.agent;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let supervisor = tokio::spawn(fx.manager.clone().supervise(stop_rx));
    eventually("the supervisor to subscribe", || async { fx.engine.calls().contains(&MockCall::Subscribe) }).await;
    let passes = fx.manager.metrics().snapshot().reconcile_passes;
    fx.engine.kill_from_outside(&agent.session);
    eventually("the kill to be recorded", || async { fx.status("victim").await == AgentStatus::Failed }).await;
    assert_eq!(fx.manager.metrics().snapshot().reconcile_passes, passes, "it was the event, not a relist");
    assert_eq!(fx.get("victim").await.exit.and_then(|e| e.code), Some(137));

    // Events may be lost: a resync makes the supervisor relist.
    let other = fx.spawn("quiet").await.agent;
    fx.engine.vanish(&other.session, false);
    fx.engine.announce_resync("test");
    eventually("the relist after a resync", || async { fx.status("quiet").await == AgentStatus::Failed }).await;
    assert!(fx.manager.metrics().snapshot().relists_after_resync >= 1);

    stop_tx.send(true).expect("stop");
    tokio::time::timeout(Duration::from_secs(5), supervisor).await.expect("supervisor stops").expect("join");
}

#[tokio::test]
async fn liveness_restarts_back_off() {
    let fx = Fixture::new().await;
    let new = NewAgent { name: "sick".into(), on_unhealthy: Some(UnhealthyAction::Restart), ..NewAgent::default() };
    let agent = fx.spawn_with(new).await.agent;
    fx.engine.set_health(&agent.session, SessionHealth::Unhealthy);
    // First restart after the 30 s grace, then the grace plus 10 s, 20 s, 40 s.
    let mut waits = Vec::new();
    for expected_restarts in 1..=4u32 {
        let mut waited = 0;
        loop {
            fx.reconcile().await;
            if fx.get("sick").await.agent.restarts == expected_restarts {
                // The new run is unhealthy too.
                fx.engine.set_health(&agent.session, SessionHealth::Unhealthy);
                break;
            }
            fx.clock.advance(Duration::from_secs(1));
            waited += 1;
            assert!(waited < 1000, "no restart {expected_restarts}");
        }
        waits.push(waited);
    }
    assert_eq!(waits, [30, 40, 50, 70], "liveness restarts must back off");
}

#[tokio::test]
async fn a_failed_start_is_retried_by_the_restart_policy() {
    let fx = Fixture::new().await;
    fx.engine.fail_next_matching(1, |call| matches!(call, MockCall::Start(_)));
    let new = NewAgent { name: "retry".into(), restart: Some(RestartPolicy::OnFailure), ..NewAgent::default() };
    assert!(fx.manager.spawn(new).await.is_err());
    let failed = fx.get("retry").await.agent;
    assert_eq!(failed.status, AgentStatus::Failed);
    let due = failed.next_restart_at.expect("a retry is scheduled");
    fx.clock.advance(Duration::try_from(due - fx.manager_now()).expect("positive"));
    fx.reconcile().await;
    assert_eq!(fx.status("retry").await, AgentStatus::Running);
}

#[tokio::test]
async fn a_restart_whose_container_cannot_be_created_does_not_read_running() {
    let fx = Fixture::new().await;
    fx.spawn("fragile").await;
    fx.engine.fail_next_matching(1, |call| matches!(call, MockCall::Create(_)));
    assert!(fx.manager.restart("fragile").await.is_err());
    let agent = fx.get("fragile").await.agent;
    assert_eq!(agent.status, AgentStatus::Stopped, "{agent:?}");
    assert!(agent.reason.as_deref().unwrap_or_default().starts_with("restart failed"), "{:?}", agent.reason);
    // A second try works.
    assert_eq!(fx.manager.restart("fragile").await.expect("restart").agent.status, AgentStatus::Running);
}

#[tokio::test]
async fn a_pass_never_acts_on_a_record_an_operation_changed_after_its_snapshot() {
    let fx = Fixture::new().await;
    fx.engine.set_snapshot_exit_info(false);
    let slow = fx.spawn("slow").await.agent;
    fx.clock.advance(Duration::from_secs(1)); // "slow" comes first in the pass
    fx.spawn("target").await;
    fx.reconcile().await;
    // The pass will wait on the first agent's exit info while "target" is stopped.
    fx.engine.exit(&slow.session, 1);
    let slow_session = slow.session.clone();
    fx.engine.slow_calls(Duration::from_millis(300), move |c| *c == MockCall::ExitInfo(slow_session.clone()));
    let pass = {
        let manager = fx.manager.clone();
        tokio::spawn(async move { manager.reconcile().await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopped = fx.manager.stop("target").await.expect("stop").agent;
    assert_eq!(stopped.status, AgentStatus::Stopped);
    pass.await.expect("join").expect("pass");
    fx.reconcile().await;
    let target = fx.get("target").await.agent;
    assert_eq!(target.status, AgentStatus::Stopped, "a stale pass undid the stop: {target:?}");
    assert_eq!(target.desired, agent_manager::Desired::Stopped);
    let events = fx.manager.events(Some("target"), 0, 100).await.expect("events");
    assert!(!events.iter().any(|e| e.kind == EventKind::Adopted), "the stopped container was adopted: {events:#?}");
}

#[tokio::test]
async fn an_interrupted_liveness_restart_is_retried_when_the_engine_returns() {
    let fx = Fixture::new().await;
    let new = NewAgent { name: "sick".into(), on_unhealthy: Some(UnhealthyAction::Restart), ..NewAgent::default() };
    let agent = fx.spawn_with(new).await.agent;
    fx.engine.set_health(&agent.session, SessionHealth::Unhealthy);
    fx.reconcile().await;
    fx.clock.advance(Duration::from_secs(31));
    // The old run ends, then the engine goes away before the new container exists.
    fx.engine.fail_next_matching(1, |call| matches!(call, MockCall::Create(_)));
    fx.reconcile().await;
    let between = fx.get("sick").await.agent;
    assert_eq!(between.status, AgentStatus::Failed);
    assert!(between.next_restart_at.is_some(), "the owed restart was forgotten: {between:?}");
    fx.reconcile().await;
    assert_eq!(fx.status("sick").await, AgentStatus::Running);
}

#[tokio::test]
async fn a_failed_record_whose_container_runs_is_adopted_not_left_unsupervised() {
    let fx = Fixture::new().await;
    let agent = fx.spawn("timedout").await.agent;
    // As a start that timed out but happened leaves it.
    let mut record = fx.manager.agent("timedout").await.expect("agent");
    record.status = AgentStatus::Failed;
    record.spec.restart = RestartPolicy::OnFailure;
    record.next_restart_at = Some(fx.manager_now());
    fx.store.update_agent(&record).await.expect("update");
    let fx2 = Fixture::on(fx.engine.clone(), fx.store.clone(), test_config(), fx.clock.clone()).await;
    fx.engine.clear_calls();
    fx2.reconcile().await;
    let now = fx2.get("timedout").await.agent;
    assert_eq!(now.status, AgentStatus::Running);
    assert_eq!(now.container_id, agent.container_id, "the running container is kept");
    assert!(!fx.engine.calls().iter().any(|c| matches!(c, MockCall::Remove(_) | MockCall::Create(_))));
}

#[tokio::test]
async fn shutdown_waits_for_a_spawn_in_flight_and_stops_it_too() {
    let fx = Fixture::new().await;
    // The spawn has passed its checks but not yet recorded the agent when shutdown begins.
    fx.engine.slow_calls(Duration::from_millis(300), |c| matches!(c, MockCall::ImageExists(_)));
    let spawn = {
        let manager = fx.manager.clone();
        tokio::spawn(async move { manager.spawn(NewAgent { name: "late".into(), ..NewAgent::default() }).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let summary = fx.manager.shutdown_all(false).await.expect("shutdown");
    spawn.await.expect("join").expect("the spawn that was in flight completes");
    assert!(
        fx.manager.spawn(NewAgent { name: "later".into(), ..NewAgent::default() }).await.is_err(),
        "no spawn starts after shutdown"
    );
    assert_eq!(summary.stopped, ["late"], "{summary:?}");
    let late = fx.get("late").await.agent;
    assert_eq!(late.status, AgentStatus::Stopped);
    let state = fx.manager.backend().session_state(&late.session).await.expect("state");
    assert_ne!(state.status, backend_core::SessionStatus::Running, "an agent was left running after shutdown");
}

#[tokio::test]
async fn a_down_engine_is_not_hammered_by_the_supervisor() {
    let mut config = test_config();
    config.reconcile.interval = Duration::from_secs(2);
    let fx = Fixture::with_config(config).await;
    let new = NewAgent { name: "crashy".into(), restart: Some(RestartPolicy::OnFailure), ..NewAgent::default() };
    let agent = fx.spawn_with(new).await.agent;
    // A restart falls due while the engine is down.
    fx.engine.exit(&agent.session, 1);
    fx.reconcile().await;
    fx.clock.advance(Duration::from_secs(60));
    fx.engine.fail_next(100_000);
    fx.engine.clear_calls();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let supervisor = tokio::spawn(fx.manager.clone().supervise(stopped));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let calls = fx.engine.calls().len();
    stop.send(true).expect("stop");
    tokio::time::timeout(Duration::from_secs(5), supervisor).await.expect("stops").expect("join");
    // Backing off from 1 s, three seconds hold a handful of attempts, not thousands.
    assert!(calls < 20, "{calls} engine calls in 3 s while the engine was down");
    assert!(calls >= 2, "the supervisor stopped trying: {calls} calls");
}

#[tokio::test]
async fn a_spawn_interrupted_and_then_stopped_is_cleared_away() {
    let fx = Fixture::new().await;
    fx.spawn("halfway").await;
    let mut record = fx.manager.agent("halfway").await.expect("agent");
    let backend = fx.manager.backend();
    backend.remove_session(&record.session).await.expect("remove");
    backend.create_session(&fx.manager.session_spec_for(&record).expect("spec")).await.expect("create");
    record.status = AgentStatus::Pending;
    record.desired = agent_manager::Desired::Stopped;
    fx.store.update_agent(&record).await.expect("update");
    let fx2 = Fixture::on(fx.engine.clone(), fx.store.clone(), test_config(), fx.clock.clone()).await;
    fx2.reconcile().await;
    let after = fx2.get("halfway").await;
    assert_eq!(after.agent.status, AgentStatus::Stopped);
    assert_eq!(fx.engine.container_id(&record.session), None, "the never-started container stays");
}

#[tokio::test]
async fn an_orphan_that_cannot_be_removed_does_not_fail_the_pass() {
    let fx = Fixture::new().await;
    let victim = fx.spawn("victim").await.agent;
    let stray = MockBackend::new(fx.engine.clone(), fx.owner.clone());
    stray.create_session(&SessionSpec::new("agentd-stray", "stray-id", PLAIN_IMAGE)).await.expect("create orphan");
    stray.start_session("agentd-stray").await.expect("start orphan");
    fx.clock.advance(Duration::from_secs(301));
    // The agent died, and the engine refuses to remove the orphan.
    fx.engine.exit(&victim.session, 2);
    fx.engine.fail_next_matching(1, |call| *call == MockCall::Remove("agentd-stray".into()));
    let report = fx.manager.reconcile().await.expect("the pass succeeds despite the orphan");
    assert_eq!(report.errors, 1, "{report:?}");
    assert_eq!(fx.status("victim").await, AgentStatus::Failed, "the agent's change is applied");
    fx.reconcile().await;
    assert_eq!(fx.engine.container_id("agentd-stray"), None, "the next pass removes the orphan");
}

// ---- Network defaults and the firewall refusal (issue I, helper B) ----

/// `agents.network` unset: claude-code agents get `isolated`, image agents `internet`; a
/// set default or the agent's own choice wins.
#[tokio::test]
async fn the_default_network_follows_the_kind() {
    use backend_core::NetworkPolicy;
    let defaults = agent_manager::AgentDefaults::default();
    assert_eq!(defaults.network, None);
    assert_eq!(defaults.network_for(AgentKind::ClaudeCode), NetworkPolicy::Isolated);
    assert_eq!(defaults.network_for(AgentKind::Image), NetworkPolicy::Internet);
    let resolve = |defaults: &agent_manager::AgentDefaults, kind, network| {
        let new = NewAgent { name: "a".into(), kind: Some(kind), network, ..NewAgent::default() };
        defaults.resolve(new).expect("resolves").network
    };
    assert_eq!(resolve(&defaults, AgentKind::ClaudeCode, None), NetworkPolicy::Isolated);
    assert_eq!(resolve(&defaults, AgentKind::Image, None), NetworkPolicy::Internet);
    assert_eq!(resolve(&defaults, AgentKind::ClaudeCode, Some(NetworkPolicy::Internet)), NetworkPolicy::Internet);
    let set = agent_manager::AgentDefaults { network: Some(NetworkPolicy::Internet), ..defaults.clone() };
    assert_eq!(resolve(&set, AgentKind::ClaudeCode, None), NetworkPolicy::Internet);
    // The kind of the defaults decides for an agent that names no kind.
    let new = NewAgent { name: "b".into(), ..NewAgent::default() };
    assert_eq!(defaults.resolve(new).expect("resolves").network, NetworkPolicy::Isolated);
}

/// With `isolated_refusal` set (the daemon could not install its firewall), an isolated
/// agent is not spawned, a restart is refused before the running container is touched, and
/// a restart-policy restart does not start it; internet agents are untouched.
#[tokio::test]
async fn isolated_agents_do_not_start_while_their_network_is_unprotected() {
    use backend_core::NetworkPolicy;
    let engine = MockEngine::new();
    let store = Store::in_memory().await.expect("store");
    let clock = ManualClock::new();
    let isolated = |name: &str| NewAgent {
        name: name.into(),
        network: Some(NetworkPolicy::Isolated),
        restart: Some(RestartPolicy::Always),
        ..NewAgent::default()
    };
    let before = Fixture::on(engine.clone(), store.clone(), test_config(), clock.clone()).await;
    let running = before.spawn_with(isolated("kept")).await;
    let container = running.agent.container_id.clone().expect("container");

    // The next daemon adopts it, without its firewall.
    let mut config = test_config();
    config.isolated_refusal = Some("iptables said no".into());
    let fx = Fixture::on(engine.clone(), store, config, clock.clone()).await;
    fx.reconcile().await;
    let refused = fx.manager.spawn(isolated("new")).await.expect_err("refused");
    assert!(matches!(refused, ManagerError::NetworkUnprotected { .. }), "{refused:?}");
    assert!(refused.to_string().contains("iptables said no"), "{refused}");
    assert!(fx.manager.get("new").await.is_err(), "a refused spawn leaves no record");

    let restart = fx.manager.restart("kept").await.expect_err("restart refused");
    assert!(matches!(restart, ManagerError::NetworkUnprotected { .. }), "{restart:?}");
    let kept = fx.get("kept").await;
    assert_eq!(kept.agent.status, AgentStatus::Running, "the refused restart left it running");
    assert_eq!(kept.agent.container_id.as_deref(), Some(container.as_str()));
    assert_eq!(
        fx.engine.container_id(&kept.agent.session).as_deref(),
        Some(container.as_str()),
        "its container is still there"
    );

    // It exits: the restart policy does not bring it back unprotected.
    fx.engine.exit(&kept.agent.session, 1);
    fx.reconcile().await;
    clock.advance(Duration::from_secs(120));
    fx.reconcile().await;
    let after = fx.get("kept").await;
    assert_ne!(after.agent.status, AgentStatus::Running, "{:?}", after.agent);
    let reason = after.agent.reason.clone().unwrap_or_default();
    assert!(reason.contains("not protected"), "the record says why: {reason}");

    let web = fx.spawn_with(NewAgent { name: "web".into(), ..NewAgent::default() }).await;
    assert_eq!(web.agent.spec.network, NetworkPolicy::Internet);
    assert_eq!(web.agent.status, AgentStatus::Running);
}
