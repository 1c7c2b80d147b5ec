//! The supervision loop and the daemon's long-run housekeeping, on the mock engine: slow
//! work off the loop, the event stream after an outage, event retention, the orphan
//! reports and the sweep at shutdown.

mod common;

use std::time::Duration;

use agent_manager::{AgentStatus, EventKind, LifecycleEvent, NewAgent, UnhealthyAction};
use backend_core::{ExecutionBackend, SessionHealth, SessionSpec, SessionStatus};
use backend_mock::{MockBackend, MockCall, PLAIN_IMAGE};
use common::{eventually, test_config, Fixture};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A running supervision loop, stopped (bounded) by [`Supervisor::stop`].
struct Supervisor {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Supervisor {
    async fn start(fx: &Fixture) -> Self {
        let before = subscribes(fx);
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(fx.manager.clone().supervise(stopped));
        eventually("the supervisor to subscribe", || async { subscribes(fx) > before }).await;
        Self { stop, task }
    }

    async fn stop(self) {
        self.stop.send(true).expect("stop the supervisor");
        tokio::time::timeout(Duration::from_secs(5), self.task).await.expect("the supervisor stops").expect("join");
    }
}

fn subscribes(fx: &Fixture) -> usize {
    fx.engine.calls().iter().filter(|c| **c == MockCall::Subscribe).count()
}

/// Waits at most `bound` for `check`, polling every 10 ms; `false` if it never held.
async fn within<F, Fut>(bound: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_waiting_out_a_long_stop_grace_does_not_hold_up_events() {
    let mut config = test_config();
    // No relist helps: whatever is noticed is noticed from events.
    config.reconcile.interval = Duration::from_secs(3600);
    config.reconcile.unhealthy_grace = Duration::ZERO;
    let fx = Fixture::with_config(config).await;
    // An agent that ignores SIGTERM, so its stop waits out the whole 60 s grace.
    let slow = fx
        .spawn_with(NewAgent {
            name: "slow".into(),
            on_unhealthy: Some(UnhealthyAction::Restart),
            stop_grace_secs: Some(60),
            env: [("ECHO_IGNORE_SIGTERM".to_owned(), "1".to_owned())].into(),
            ..NewAgent::default()
        })
        .await
        .agent;
    let victim = fx.spawn("victim").await.agent;
    let supervisor = Supervisor::start(&fx).await;

    // The unhealthy event makes the supervisor restart "slow": its stop takes 60 s.
    fx.engine.set_health(&slow.session, SessionHealth::Unhealthy);
    let stopping = MockCall::Stop(slow.session.clone());
    eventually("the liveness restart to begin its stop", || async { fx.engine.calls().contains(&stopping) }).await;

    fx.engine.kill_from_outside(&victim.session);
    let noticed = within(Duration::from_secs(1), || async { fx.status("victim").await == AgentStatus::Failed }).await;
    assert!(noticed, "an outside kill was not noticed within 1 s while another agent's 60 s stop was in flight");
    let slow_now = fx.get("slow").await.agent;
    assert_eq!((slow_now.status, slow_now.restarts), (AgentStatus::Running, 0), "the restart is still in flight");
    supervisor.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_is_back_within_a_second_of_the_engine_answering_after_an_outage() {
    let mut config = test_config();
    config.reconcile.interval = Duration::from_secs(1);
    let fx = Fixture::with_config(config).await;
    fx.spawn("steady").await;
    let supervisor = Supervisor::start(&fx).await;
    let before = subscribes(&fx);

    // The engine goes away, taking the event stream with it; resubscribing fails, with
    // a backoff that doubles: after four tries (at 0.5 s, 1 s, 2 s and 4 s) the next is
    // 4 s away.
    fx.engine.fail_next(u32::MAX);
    fx.engine.end_event_streams();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while subscribes(&fx) < before + 4 {
        assert!(tokio::time::Instant::now() < deadline, "the supervisor stopped trying to resubscribe");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(fx.engine.open_event_streams(), 0);

    // The engine is back: the first pass that gets an answer brings the stream back.
    let passes = fx.manager.metrics().snapshot().reconcile_passes;
    fx.engine.fail_next(0);
    eventually("a pass that the engine answers", || async {
        fx.manager.metrics().snapshot().reconcile_passes > passes
    })
    .await;
    let back = within(Duration::from_secs(1), || async { fx.engine.open_event_streams() == 1 }).await;
    assert!(back, "the event stream was not resubscribed within 1 s of the engine answering again");
    supervisor.stop().await;
}

/// An event of `kind` dated `at`, stored directly.
async fn stored_event(fx: &Fixture, detail: &str, at: time::OffsetDateTime) {
    let event = LifecycleEvent {
        id: 0,
        agent_id: "retention-test".into(),
        agent_name: None,
        kind: EventKind::OrphanFound,
        from: None,
        to: None,
        detail: detail.into(),
        at,
    };
    fx.store.insert_event(&event).await.expect("insert event");
}

async fn details(fx: &Fixture) -> Vec<String> {
    let events = fx.manager.events(Some("retention-test"), 0, 1000).await.expect("events");
    events.into_iter().map(|e| e.detail).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_older_than_the_retention_are_pruned_at_start_and_hourly() {
    use agent_manager::Clock;
    let mut config = test_config();
    config.events_retention = Some(Duration::from_secs(30 * 86_400));
    let fx = Fixture::with_config(config).await;
    let now = fx.clock.now();
    stored_event(&fx, "31 days old", now - time::Duration::days(31)).await;
    stored_event(&fx, "29 days old", now - time::Duration::days(29)).await;
    stored_event(&fx, "new", now).await;

    let supervisor = Supervisor::start(&fx).await;
    eventually("the prune at start", || async { details(&fx).await == ["29 days old", "new"] }).await;

    // Two days and an hour later (by the manager's clock), the hourly prune takes the next.
    fx.clock.advance(Duration::from_secs(2 * 86_400 + 3600));
    fx.engine.announce_resync("wake the loop");
    eventually("the hourly prune", || async { details(&fx).await == ["new"] }).await;
    supervisor.stop().await;

    // Without a retention nothing goes.
    let mut config = test_config();
    config.events_retention = None;
    let keep = Fixture::with_config(config).await;
    stored_event(&keep, "ancient", keep.clock.now() - time::Duration::days(3650)).await;
    assert_eq!(keep.manager.prune_events().await.expect("prune"), 0);
    assert_eq!(details(&keep).await, ["ancient"]);
}

#[tokio::test]
async fn an_orphan_reported_in_dry_run_that_went_away_is_reported_again_when_it_returns() {
    let mut config = test_config();
    config.reconcile.orphan_dry_run = true;
    let fx = Fixture::with_config(config).await;
    let stray = MockBackend::new(fx.engine.clone(), fx.owner.clone());
    let create = || async {
        stray.create_session(&SessionSpec::new("agentd-stray", "stray-id", PLAIN_IMAGE)).await.expect("create orphan");
        stray.start_session("agentd-stray").await.expect("start orphan");
    };
    let found = || async {
        let events = fx.manager.events(Some("stray-id"), 0, 100).await.expect("events");
        events.iter().filter(|e| e.kind == EventKind::OrphanFound).count()
    };
    create().await;
    fx.clock.advance(Duration::from_secs(301));
    fx.reconcile().await;
    fx.reconcile().await;
    assert_eq!(found().await, 1, "an orphan is reported once, not every pass");

    // It goes away (its report with it), and one of the same name turns up later.
    fx.engine.vanish("agentd-stray", true);
    fx.reconcile().await;
    create().await;
    fx.engine.set_created_at("agentd-stray", time::OffsetDateTime::now_utc() - time::Duration::minutes(10));
    fx.reconcile().await;
    assert_eq!(found().await, 2, "the returning orphan was not reported: the old report was never pruned");
}

#[tokio::test]
async fn a_shutdown_that_stops_the_agents_leaves_no_container_of_this_instance() {
    let fx = Fixture::new().await;
    fx.spawn("running").await;
    let stopped = fx.spawn("stopped").await.agent;
    fx.manager.stop("stopped").await.expect("stop");
    assert!(fx.engine.container_id(&stopped.session).is_some(), "a stopped agent keeps its container");
    // A container of this instance without a record (a crash between create and record,
    // or a record removed by hand), and one of another instance.
    let stray = MockBackend::new(fx.engine.clone(), fx.owner.clone());
    stray.create_session(&SessionSpec::new("agentd-stray", "stray-id", PLAIN_IMAGE)).await.expect("create orphan");
    stray.start_session("agentd-stray").await.expect("start orphan");
    let other_owner = backend_core::OwnershipLabels::new("agentd", "another-instance").expect("labels");
    let other = MockBackend::new(fx.engine.clone(), other_owner);
    other.create_session(&SessionSpec::new("agentd-theirs", "theirs", PLAIN_IMAGE)).await.expect("create theirs");
    other.start_session("agentd-theirs").await.expect("start theirs");

    let summary = fx.manager.shutdown_all(false).await.expect("shutdown");
    assert_eq!(summary.stopped, ["running"], "{summary:?}");
    let mut removed = summary.removed.clone();
    removed.sort();
    let running = fx.manager.agent("running").await.expect("agent").session;
    let mut expected = vec![running, stopped.session.clone(), "agentd-stray".to_owned()];
    expected.sort();
    assert_eq!(removed, expected, "{summary:?}");
    assert!(summary.not_removed.is_empty() && summary.sweep_error.is_none(), "{summary:?}");
    let backend = fx.manager.backend();
    assert!(backend.snapshot().await.expect("snapshot").is_empty(), "a container of this instance survived");
    let theirs = other.session_state("agentd-theirs").await.expect("state");
    assert_eq!(theirs.status, SessionStatus::Running, "another instance's container was touched");
    // The records keep how their runs ended.
    let running = fx.get("running").await;
    assert_eq!(running.agent.status, AgentStatus::Stopped);
    assert!(running.exit.is_some(), "the exit was recorded before the container went");
}

#[tokio::test]
async fn a_leave_running_shutdown_sweeps_nothing() {
    let fx = Fixture::new().await;
    let agent = fx.spawn("kept").await.agent;
    let summary = fx.manager.shutdown_all(true).await.expect("shutdown");
    assert!(summary.removed.is_empty(), "{summary:?}");
    let state = fx.manager.backend().session_state(&agent.session).await.expect("state");
    assert_eq!(state.status, SessionStatus::Running);
}
