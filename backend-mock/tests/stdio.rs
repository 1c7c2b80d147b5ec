//! The mock's simulation of the echo agent's stdio mode, attach and pause, beyond what
//! the conformance suite checks.

use std::time::Duration;

use backend_core::{
    BackendError, BackendEvent, ExecutionBackend, OutputLine, OutputLines, OwnershipLabels, SessionHealth, SessionSpec,
    SessionStatus,
};
use backend_mock::{MockBackend, MockCall, MockEngine, MAX_CALLS, PLAIN_IMAGE};
use futures_util::StreamExt;

fn backend() -> MockBackend {
    MockBackend::new(MockEngine::new(), OwnershipLabels::new("st", "inst").expect("labels"))
}

fn stdio_spec(name: &str) -> SessionSpec {
    let mut spec = SessionSpec::new(format!("st-{name}"), format!("agent-{name}"), PLAIN_IMAGE);
    spec.stdin_open = true;
    spec.env.insert("ECHO_STDIO".into(), "1".into());
    spec
}

async fn start(b: &MockBackend, spec: &SessionSpec) {
    b.create_session(spec).await.expect("create");
    b.start_session(&spec.session).await.expect("start");
}

fn user(text: &str) -> String {
    serde_json::json!({"type": "user", "message": {"role": "user", "content": text}}).to_string()
}

/// Reads lines until one contains `want`; panics after 10 s of (tokio) time.
async fn until(output: &mut OutputLines, want: &str) -> Vec<OutputLine> {
    let mut lines = Vec::new();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), output.next()).await;
        let line =
            next.unwrap_or_else(|_| panic!("no {want:?} in time; got {lines:?}")).expect("not ended").expect("ok");
        let done = line.text.contains(want);
        lines.push(line);
        if done {
            return lines;
        }
    }
}

#[tokio::test]
async fn pause_freezes_the_agent_and_input_waits_for_unpause() {
    let b = backend();
    let mut events = b.subscribe_events().await.expect("subscribe").expect("events");
    let spec = stdio_spec("pause");
    start(&b, &spec).await;
    let mut attach = b.attach_session(&spec.session, None).await.expect("attach");
    until(&mut attach.output, "echo-agent started").await;

    b.engine().pause(&spec.session);
    let state = b.session_state(&spec.session).await.expect("state");
    assert_eq!((state.status, state.health), (SessionStatus::Paused, SessionHealth::Unknown));
    assert_eq!(b.snapshot().await.expect("snapshot")[0].status, SessionStatus::Paused);
    attach.input.send_line(&user("first")).await.expect("input is accepted while paused");
    attach.input.send_line(&user("second")).await.expect("input is accepted while paused");
    let quiet = tokio::time::timeout(Duration::from_millis(300), attach.output.next()).await;
    assert!(quiet.is_err(), "a paused agent writes nothing: {quiet:?}");
    let again = b.attach_session(&spec.session, None).await;
    assert!(again.is_ok(), "a paused session can be attached to, as on the engines");

    b.engine().unpause(&spec.session);
    let lines = until(&mut attach.output, "echo: second").await;
    let texts: Vec<_> = lines.iter().map(|l| l.text.as_str()).collect();
    assert!(texts[1].contains("echo: first"), "input is handled in order after the pause: {texts:?}");
    assert_eq!(b.session_state(&spec.session).await.expect("state").status, SessionStatus::Running);

    let mut health = Vec::new();
    while let Ok(event) = events.try_recv() {
        if let BackendEvent::HealthChanged { health: h, .. } = event {
            health.push(h);
        }
    }
    assert_eq!(health, [SessionHealth::Unknown, SessionHealth::Healthy], "pause and unpause are announced");
}

#[tokio::test]
async fn a_paused_agent_exits_by_itself_only_once_unpaused() {
    let b = backend();
    let mut spec = stdio_spec("frozen-exit");
    spec.env.insert("ECHO_EXIT_AFTER_MS".into(), "100".into());
    spec.env.insert("ECHO_EXIT_CODE".into(), "6".into());
    start(&b, &spec).await;
    b.engine().pause(&spec.session);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(b.session_state(&spec.session).await.expect("state").status, SessionStatus::Paused);
    b.engine().unpause(&spec.session);
    let out: Vec<_> = b.session_output(&spec.session, None, true).await.expect("output").collect().await;
    assert_eq!(out.last().expect("a line").as_ref().expect("ok").text, "echo-agent exiting with code 6");
    let exit = b.session_exit_info(&spec.session).await.expect("exit info").expect("exited");
    assert_eq!(exit.exit_code, Some(6));
}

#[tokio::test]
async fn attach_needs_a_live_session_with_an_open_stdin() {
    let b = backend();
    let missing = b.attach_session("st-nosuch", None).await.expect_err("missing");
    assert!(missing.is_not_found(), "{missing}");

    let created = stdio_spec("created");
    b.create_session(&created).await.expect("create");
    let err = b.attach_session(&created.session, None).await.expect_err("not running");
    assert!(matches!(err, BackendError::Engine { .. }), "{err}");
    let out: Vec<_> = b.session_output(&created.session, None, true).await.expect("output").collect().await;
    assert!(out.is_empty(), "a session that never ran has no output, and following it ends");

    let mut closed = stdio_spec("closed");
    closed.stdin_open = false;
    closed.env.clear();
    start(&b, &closed).await;
    match b.attach_session(&closed.session, None).await {
        Err(BackendError::InvalidSpec { field, .. }) => assert_eq!(field, "stdin_open"),
        other => panic!("expected InvalidSpec(stdin_open), got {:?}", other.err()),
    }

    b.engine().fail_next_matching(1, |c| matches!(c, MockCall::Attach(_)));
    let err = b.attach_session(&created.session, None).await.expect_err("scripted");
    assert!(err.is_retryable(), "{err}");
    b.engine().fail_next_matching(1, |c| matches!(c, MockCall::Output(_)));
    assert!(b.session_output(&closed.session, None, false).await.err().expect("scripted").is_retryable());
    let calls = b.engine().calls();
    assert!(calls.contains(&MockCall::Attach(created.session.clone())));
    assert!(calls.contains(&MockCall::Output(closed.session.clone())));
}

#[tokio::test]
async fn stdin_stays_open_across_attaches_and_the_logs_show_the_conversation() {
    let b = backend();
    let mut spec = stdio_spec("claude");
    spec.env.clear();
    spec.command = Some(
        ["claude", "-p", "--input-format", "stream-json", "--output-format", "stream-json", "--session-id", "sid-1"]
            .map(String::from)
            .to_vec(),
    );
    start(&b, &spec).await;
    let mut first = b.attach_session(&spec.session, None).await.expect("attach");
    first.input.send_line(&user("one")).await.expect("send");
    let lines = until(&mut first.output, "\"result\"").await;
    assert!(lines[1].text.contains(r#""session_id":"sid-1""#), "{:?}", lines[1]);
    let cursor = lines.last().map(|l| l.cursor);
    drop(first);

    let mut second = b.attach_session(&spec.session, cursor).await.expect("attach again");
    second.input.send_line(&user("two")).await.expect("stdin is still open");
    let lines = until(&mut second.output, "\"result\"").await;
    assert!(lines[0].text.contains("\"init\""), "nothing read before is read again: {lines:?}");
    assert!(lines[2].text.contains(r#""total_cost_usd":0.002"#), "the same process answers: {lines:?}");

    second.input.send_line(&user("!stderr on stderr")).await.expect("send");
    until(&mut second.output, "on stderr").await;
    let logs = b.session_logs(&spec.session, None).await.expect("logs");
    assert!(logs.starts_with("echo-agent started\n"), "{logs}");
    assert!(logs.contains("echo: one") && logs.contains("echo: two") && logs.contains("\non stderr\n"), "{logs}");
    let tail = b.session_logs(&spec.session, Some(2)).await.expect("tail");
    assert!(tail.starts_with("on stderr\n{\"type\":\"result\"") && tail.lines().count() == 2, "{tail}");
    assert!(second.input.send_line("two\nlines").await.is_err(), "a line must not hold a newline");
}

#[tokio::test]
async fn a_stop_ends_followers_and_exit_ends_the_run_with_its_code() {
    let b = backend();
    let mut events = b.subscribe_events().await.expect("subscribe").expect("events");
    let spec = stdio_spec("stop");
    start(&b, &spec).await;
    let mut follower = b.session_output(&spec.session, None, true).await.expect("output");
    until(&mut follower, "echo-agent started").await;
    let mut attach = b.attach_session(&spec.session, None).await.expect("attach");
    b.stop_session(&spec.session, Duration::from_secs(1)).await.expect("stop");
    let rest: Vec<_> = tokio::time::timeout(Duration::from_secs(5), follower.collect::<Vec<_>>()).await.expect("ends");
    let rest: Vec<_> = rest.into_iter().map(|l| l.expect("ok").text).collect();
    assert_eq!(rest, ["echo-agent received SIGTERM; exiting 0"]);
    assert!(attach.input.send_line(&user("late")).await.is_err(), "the stdin of an ended run is closed");

    let exits = stdio_spec("exits");
    start(&b, &exits).await;
    let mut attach = b.attach_session(&exits.session, None).await.expect("attach");
    attach.input.send_line(&user("!exit 260")).await.expect("send");
    let lines: Vec<_> = attach.output.collect().await;
    assert!(lines.last().expect("a line").as_ref().expect("ok").text.contains("\"init\""));
    let exit = b.session_exit_info(&exits.session).await.expect("exit info").expect("exited");
    assert_eq!(exit.exit_code, Some(4), "exit codes are taken modulo 256, as a process's are");
    let died = std::iter::from_fn(|| events.try_recv().ok()).find_map(|e| match e {
        BackendEvent::Died { session, exit } if session == exits.session => exit.exit_code,
        _ => None,
    });
    assert_eq!(died, Some(4));

    // Restarted, the container writes a new run into the same log.
    b.start_session(&exits.session).await.expect("restart");
    let mut attach = b.attach_session(&exits.session, None).await.expect("attach");
    let lines = until(&mut attach.output, "echo-agent started").await;
    assert!(lines[0].text.contains("echo-agent started") && lines.len() == 1, "{lines:?}");
    let lines = until(&mut attach.output, "echo-agent started").await;
    assert_eq!(lines.len(), 2, "the first run's init line, then the second run's start-up line: {lines:?}");
}

#[tokio::test]
async fn dropped_attachments_fail_and_a_new_attach_goes_on() {
    let b = backend();
    let spec = stdio_spec("dropped");
    start(&b, &spec).await;
    let mut attach = b.attach_session(&spec.session, None).await.expect("attach");
    let mut follower = b.session_output(&spec.session, None, true).await.expect("output");
    let seen = until(&mut attach.output, "echo-agent started").await;
    b.engine().drop_attachments(&spec.session);
    let lost = tokio::time::timeout(Duration::from_secs(5), attach.output.next()).await.expect("in time");
    assert!(matches!(lost, Some(Err(BackendError::Unavailable { .. }))), "{lost:?}");
    assert!(attach.output.next().await.is_none(), "a lost attach ends");
    assert!(attach.input.send_line(&user("lost")).await.expect_err("dropped").is_retryable());
    let mut again = b.attach_session(&spec.session, seen.last().map(|l| l.cursor)).await.expect("attach again");
    again.input.send_line(&user("back")).await.expect("send");
    until(&mut again.output, "echo: back").await;
    until(&mut follower, "echo: back").await;
}

#[tokio::test]
async fn a_stdio_agent_without_an_open_stdin_reads_eof_and_exits_0() {
    let b = backend();
    let mut spec = stdio_spec("eof");
    spec.stdin_open = false;
    start(&b, &spec).await;
    let out: Vec<_> = b.session_output(&spec.session, None, true).await.expect("output").collect().await;
    let texts: Vec<_> = out.into_iter().map(|l| l.expect("ok").text).collect();
    assert_eq!(texts, ["echo-agent started", "echo-agent stdin closed; exiting 0"]);
    let exit = b.session_exit_info(&spec.session).await.expect("exit info").expect("exited");
    assert_eq!(exit.exit_code, Some(0));
}

#[tokio::test]
async fn a_process_that_does_not_read_stdin_accepts_lines() {
    let b = backend();
    let mut spec = stdio_spec("deaf");
    spec.env.clear();
    start(&b, &spec).await;
    let mut attach = b.attach_session(&spec.session, None).await.expect("attach");
    for _ in 0..3 {
        attach.input.send_line(&user("hello?")).await.expect("accepted");
    }
    until(&mut attach.output, "echo-agent started").await;
    let quiet = tokio::time::timeout(Duration::from_millis(200), attach.output.next()).await;
    assert!(quiet.is_err(), "nothing answers: {quiet:?}");
}

#[tokio::test(start_paused = true)]
async fn emit_delays_run_on_tokios_clock() {
    let b = backend();
    let spec = stdio_spec("clock");
    start(&b, &spec).await;
    let mut attach = b.attach_session(&spec.session, None).await.expect("attach");
    let wall = std::time::Instant::now();
    let before = tokio::time::Instant::now();
    attach.input.send_line(&user("!emit 3 8000")).await.expect("send");
    let lines = until(&mut attach.output, "emitted 3").await;
    assert!(tokio::time::Instant::now() - before >= Duration::from_secs(8), "the delay passed on tokio's clock");
    assert!(wall.elapsed() < Duration::from_secs(5), "and not on the wall clock");
    let texts: Vec<_> = lines.iter().map(|l| l.text.as_str()).collect();
    assert_eq!(texts[texts.len() - 4..], ["line 0", "line 1", "line 2", "emitted 3"]);
}

#[tokio::test]
async fn the_call_log_keeps_the_last_calls() {
    let b = backend();
    for _ in 0..MAX_CALLS + 10 {
        b.session_exists("st-x").await.expect("exists");
    }
    b.snapshot().await.expect("snapshot");
    let calls = b.engine().calls();
    assert_eq!(calls.len(), MAX_CALLS);
    assert_eq!(calls.last(), Some(&MockCall::Snapshot));
}
