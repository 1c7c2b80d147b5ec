//! Conversations with stream-json agents, on the mock engine's simulated echo agent.

mod common;

use std::time::Duration;

use agent_manager::{AgentKind, ConversationEntry, Delivery, Direction, ManagerError, NewAgent, Turn};
use backend_mock::{MockCall, ECHO_IMAGE};
use common::{test_config, Fixture};

fn claude(name: &str, prompt: Option<&str>) -> NewAgent {
    NewAgent {
        name: name.into(),
        kind: Some(AgentKind::ClaudeCode),
        image: Some(ECHO_IMAGE.into()),
        prompt: prompt.map(str::to_owned),
        ..NewAgent::default()
    }
}

/// Waits (bounded, in real time) until the agent's conversation holds an entry that
/// `want` accepts; returns the whole conversation.
async fn wait_for_entry(
    fx: &Fixture,
    agent: &str,
    what: &str,
    want: impl Fn(&ConversationEntry) -> bool,
) -> Vec<ConversationEntry> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let entries = all_entries(fx, agent).await;
        if entries.iter().any(&want) {
            return entries;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}; conversation: {:#?}",
            entries.iter().map(|e| (e.seq, e.direction, e.kind.clone(), e.text.clone())).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The whole conversation, page by page (a page holds at most
/// `CONVERSATION_PAGE_BYTES` of entries).
async fn all_entries(fx: &Fixture, agent: &str) -> Vec<ConversationEntry> {
    let mut entries: Vec<ConversationEntry> = Vec::new();
    loop {
        let after = entries.last().map_or(0, |e| e.seq);
        let page = fx.manager.conversation(agent, after, 100_000).await.expect("conversation");
        if page.is_empty() {
            return entries;
        }
        entries.extend(page);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_of_the_conversation_holds_at_most_its_byte_budget() {
    use agent_manager::conversation::CONVERSATION_PAGE_BYTES;
    let fx = Fixture::new().await;
    fx.spawn_with(claude("coder", None)).await;
    let big = "x".repeat(3 * 1024 * 1024);
    for i in 0..4 {
        fx.manager.send_message("coder", &format!("{i}{big}")).await.expect("send 3 MB");
    }
    // Each message makes three entries of about 3 MiB (the message, the assistant's echo,
    // the result): 36 MiB in all.
    let entries =
        wait_for_entry(&fx, "coder", "the fourth answer", |e| e.kind == "result" && e.text.starts_with("echo: 3"))
            .await;
    assert_gapless(&entries);
    let first = fx.manager.conversation("coder", 0, 100_000).await.expect("page");
    let bytes: usize = first.iter().map(|e| e.data.to_string().len() + e.text.len()).sum();
    assert!(first.len() < entries.len(), "one page held all {} entries ({bytes} bytes)", entries.len());
    assert!(bytes <= CONVERSATION_PAGE_BYTES, "a page of {bytes} bytes");
    assert!(bytes > CONVERSATION_PAGE_BYTES / 2, "the page is not filled: {bytes} bytes");
}

fn result_with(text: &'static str) -> impl Fn(&ConversationEntry) -> bool {
    move |e| e.kind == "result" && e.text == text
}

fn assert_gapless(entries: &[ConversationEntry]) {
    let seqs: Vec<i64> = entries.iter().map(|e| e.seq).collect();
    let expected: Vec<i64> = (1..=entries.len() as i64).collect();
    assert_eq!(seqs, expected, "seq must count from 1 without gaps or doubles");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prompt_is_the_first_message_and_every_line_is_stored_in_order() {
    let fx = Fixture::new().await;
    fx.spawn_with(claude("coder", Some("say hi"))).await;
    let entries = wait_for_entry(&fx, "coder", "the answer to the prompt", result_with("echo: say hi")).await;
    assert_gapless(&entries);
    let to_agent: Vec<(&str, &str)> = entries
        .iter()
        .filter(|e| e.direction == Direction::ToAgent)
        .map(|e| (e.kind.as_str(), e.text.as_str()))
        .collect();
    assert_eq!(to_agent, [("user", "say hi"), ("control_request", "initialize")]);
    let handshake = entries.iter().find(|e| e.text == "initialize").expect("handshake");
    let prompt = entries.iter().find(|e| e.kind == "user").expect("prompt");
    assert!(entries
        .iter()
        .filter(|e| e.direction == Direction::ToAgent)
        .all(|e| e.delivery == Some(Delivery::Delivered)));
    let kinds: Vec<&str> =
        entries.iter().filter(|e| e.direction == Direction::FromAgent).map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["raw", "control_response", "system", "assistant", "result"], "{entries:#?}");
    assert!(prompt.seq < handshake.seq, "the prompt was queued at spawn, before the container ran");
    let assistant = entries.iter().find(|e| e.kind == "assistant").expect("assistant");
    assert_eq!(assistant.text, "echo: say hi");
    assert_eq!(assistant.data["message"]["content"][0]["text"], "echo: say hi", "the whole JSON is kept");

    let view = fx.get("coder").await;
    assert!(view.connected, "agentd holds the attach");
    let session = view.session.expect("a claude-code agent has a session");
    assert_eq!(session.session_id, view.agent.id);
    assert_eq!(session.turn, Turn::Idle);
    assert!((session.cost_usd - 0.001).abs() < 1e-9, "{}", session.cost_usd);
    assert_eq!((session.usage.input_tokens, session.usage.output_tokens), (10, 5));
    let last = session.last_result.expect("last result");
    assert_eq!((last.subtype.as_str(), last.is_error, last.text.as_str()), ("success", false, "echo: say hi"));

    // A second message is answered by the same session; the broadcast carries stored
    // entries only.
    let mut live = fx.manager.subscribe_conversations();
    let queued = fx.manager.send_message("coder", "again").await.expect("send");
    assert_eq!(queued.delivery, Some(Delivery::Queued));
    let entries = wait_for_entry(&fx, "coder", "the second answer", result_with("echo: again")).await;
    assert_gapless(&entries);
    let mut seen = Vec::new();
    while let Ok(live) = live.try_recv() {
        match live {
            agent_manager::LiveEntry::Entry(entry) => seen.push(entry.seq),
            other => panic!("a small entry is broadcast whole: {other:?}"),
        }
    }
    let stored: Vec<i64> = entries.iter().filter(|e| e.seq >= queued.seq).map(|e| e.seq).collect();
    assert_eq!(seen, stored, "every stored entry is broadcast once, in order");
    let session = fx.get("coder").await.session.expect("session");
    assert!((session.cost_usd - 0.002).abs() < 1e-9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_need_a_running_claude_code_agent() {
    let fx = Fixture::new().await;
    fx.spawn("plain").await;
    match fx.manager.send_message("plain", "hi").await {
        Err(ManagerError::Conflict(message)) => assert!(message.contains("kind image"), "{message}"),
        other => panic!("expected a conflict, got {other:?}"),
    }
    fx.spawn_with(claude("coder", None)).await;
    fx.manager.stop("coder").await.expect("stop");
    assert!(matches!(fx.manager.send_message("coder", "hi").await, Err(ManagerError::NotRunning { .. })));
    match fx.manager.spawn(NewAgent { name: "x".into(), prompt: Some("hi".into()), ..NewAgent::default() }).await {
        Err(ManagerError::Invalid { field: "prompt", .. }) => {}
        other => panic!("a prompt for an image agent must be refused, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopting_restart_catches_up_without_loss_or_double() {
    let fx = Fixture::new().await;
    let agent = fx.spawn_with(claude("coder", Some("first"))).await.agent;
    wait_for_entry(&fx, "coder", "the first answer", result_with("echo: first")).await;
    let summary = fx.manager.shutdown_all(true).await.expect("leave running");
    assert_eq!(summary.left_running, ["coder"]);
    // While no daemon listens, the agent writes on: a message the old daemon delivered
    // just before it went down.
    let backend = fx.manager.backend().clone();
    {
        let mut attach = backend.attach_session(&agent.session, None).await.expect("attach");
        attach
            .input
            .send_line(r#"{"type":"user","message":{"role":"user","content":"!emit 500"}}"#)
            .await
            .expect("write");
    }
    let fx2 = Fixture::on(fx.engine.clone(), fx.store.clone(), test_config(), fx.clock.clone()).await;
    fx2.reconcile().await;
    let after = fx2.get("coder").await.agent;
    assert_eq!(after.container_id, agent.container_id, "the same container, adopted");
    let entries =
        wait_for_entry(&fx2, "coder", "the lines written while no daemon ran", |e| e.text == "emitted 500").await;
    assert_gapless(&entries);
    let numbered: Vec<usize> = entries.iter().filter_map(|e| e.text.strip_prefix("line ")?.parse().ok()).collect();
    assert_eq!(numbered, (0..500).collect::<Vec<_>>(), "each line exactly once");
    assert_eq!(entries.iter().filter(|e| e.text == "echo-agent started").count(), 1, "nothing read twice");
    assert_eq!(entries.iter().filter(|e| e.text == "initialize").count(), 1, "one handshake per container");
    fx2.manager.send_message("coder", "second").await.expect("send");
    let entries = wait_for_entry(&fx2, "coder", "the second answer", result_with("echo: second")).await;
    assert_gapless(&entries);
    let session = fx2.get("coder").await.session.expect("session");
    assert_eq!(session.session_id, agent.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_agent_keeps_its_messages_queued_until_it_thaws() {
    let fx = Fixture::new().await;
    let agent = fx.spawn_with(claude("coder", Some("warm up"))).await.agent;
    wait_for_entry(&fx, "coder", "the first answer", result_with("echo: warm up")).await;
    fx.engine.pause(&agent.session);
    fx.reconcile().await;
    let view = fx.get("coder").await;
    assert!(view.paused, "a paused container reads paused");
    let queued = fx.manager.send_message("coder", "are you there").await.expect("send");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let entries = fx.manager.conversation("coder", queued.seq - 1, 10).await.expect("conversation");
    assert_eq!(entries[0].delivery, Some(Delivery::Queued), "not reported delivered to a frozen agent");
    assert!(!entries.iter().any(|e| e.kind == "result"));
    fx.engine.unpause(&agent.session);
    fx.reconcile().await;
    assert!(!fx.get("coder").await.paused);
    let entries = wait_for_entry(&fx, "coder", "the answer after thawing", result_with("echo: are you there")).await;
    assert_eq!(entries.iter().find(|e| e.seq == queued.seq).and_then(|e| e.delivery), Some(Delivery::Delivered));
    let kinds: Vec<_> =
        fx.manager.events(Some("coder"), 0, 100).await.expect("events").into_iter().map(|e| e.kind).collect();
    assert!(kinds.contains(&agent_manager::EventKind::Paused) && kinds.contains(&agent_manager::EventKind::Unpaused));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_huge_lines_and_a_lost_attach_never_stop_the_conversation() {
    let fx = Fixture::new().await;
    fx.spawn_with(claude("coder", Some("!emit 3"))).await;
    let entries = wait_for_entry(&fx, "coder", "plain lines", |e| e.text == "emitted 3").await;
    assert!(entries.iter().any(|e| e.kind == "raw" && e.text == "line 0" && e.data == "line 0"));
    let big = "x".repeat(5 * 1024 * 1024);
    fx.manager.send_message("coder", &big).await.expect("send 5 MB");
    let entries = wait_for_entry(&fx, "coder", "the 5 MB answer", |e| e.kind == "result" && e.text.len() > 1000).await;
    let assistant = entries.iter().rev().find(|e| e.kind == "assistant").expect("assistant");
    assert!(assistant.text.len() <= agent_manager::conversation::MAX_ENTRY_TEXT + 4, "the short text is cut");
    assert_eq!(
        assistant.data["message"]["content"][0]["text"].as_str().map(str::len),
        Some(big.len() + "echo: ".len()),
        "the whole line is kept"
    );
    // The engine drops the attach, and refuses the next two: the conversation comes back,
    // and the agent is not restarted for it.
    fx.engine.fail_next_matching(2, |c| matches!(c, MockCall::Attach(_)));
    fx.engine.drop_attachments(&fx.get("coder").await.agent.session);
    fx.clock.advance(Duration::from_secs(3600));
    fx.reconcile().await;
    fx.manager.send_message("coder", "still there?").await.expect("send");
    wait_for_entry(&fx, "coder", "the answer after the attach came back", result_with("echo: still there?")).await;
    let agent = fx.get("coder").await;
    assert_eq!(agent.agent.restarts, 0, "losing agentd's side of the stream never restarts an agent");
    assert!(agent.connected);
}

async fn wait_for_pending(fx: &Fixture, agent: &str) -> agent_manager::Approval {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let pending = fx.manager.approvals(Some(agent), true).await.expect("approvals");
        if let Some(first) = pending.into_iter().next() {
            return first;
        }
        assert!(tokio::time::Instant::now() < deadline, "no pending approval for {agent}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_request_waits_for_a_person_and_the_answer_reaches_the_run() {
    use agent_manager::{Decision, EventKind};
    let fx = Fixture::new().await;
    fx.spawn_with(claude("coder", Some("!tool Bash touch x"))).await;
    let approval = wait_for_pending(&fx, "coder").await;
    assert_eq!((approval.tool.as_str(), approval.agent.as_deref()), ("Bash", Some("coder")));
    assert_eq!(approval.input["command"], "touch x");
    assert_eq!(approval.decision, None);
    assert_eq!(fx.get("coder").await.session.expect("session").turn, Turn::AwaitingApproval);
    let decided = fx.manager.decide(&approval.id, Decision::Allow, None).await.expect("allow");
    assert_eq!(decided.decision, Some(Decision::Allow));
    wait_for_entry(&fx, "coder", "the allowed tool's answer", |e| e.text == "tool Bash allowed: touch x").await;
    match fx.manager.decide(&approval.id, Decision::Deny, None).await {
        Err(ManagerError::Conflict(m)) => assert!(m.contains("decided already"), "{m}"),
        other => panic!("deciding twice must conflict, got {other:?}"),
    }
    fx.manager.send_message("coder", "!tool Bash rm -rf /").await.expect("send");
    let second = wait_for_pending(&fx, "coder").await;
    fx.manager.decide(&second.id, Decision::Deny, Some("no thanks".into())).await.expect("deny");
    let entries = wait_for_entry(&fx, "coder", "the denial", |e| e.text == "tool Bash denied: no thanks").await;
    assert!(entries
        .iter()
        .any(|e| e.kind == "control_response" && e.direction == Direction::ToAgent && e.text == "deny"));
    let kinds: Vec<_> =
        fx.manager.events(Some("coder"), 0, 100).await.expect("events").into_iter().map(|e| e.kind).collect();
    assert_eq!(kinds.iter().filter(|k| **k == EventKind::ApprovalRequested).count(), 2);
    assert_eq!(kinds.iter().filter(|k| **k == EventKind::ApprovalDecided).count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_and_the_timeout_answer_without_a_person() {
    let mut config = test_config();
    config.defaults.approval_timeout = Duration::from_millis(500);
    let fx = Fixture::with_config(config).await;
    let mut allow = claude("yes", Some("!tool Bash ls"));
    allow.approvals = Some(agent_manager::ApprovalPolicy::Allow);
    fx.spawn_with(allow).await;
    let mut deny = claude("no", Some("!tool Bash ls"));
    deny.approvals = Some(agent_manager::ApprovalPolicy::Deny);
    fx.spawn_with(deny).await;
    fx.spawn_with(claude("late", Some("!tool Bash ls"))).await;
    wait_for_entry(&fx, "yes", "the policy's allow", |e| e.text == "tool Bash allowed: ls").await;
    wait_for_entry(&fx, "no", "the policy's deny", |e| {
        e.text.starts_with("tool Bash denied: denied by the agent's approvals policy")
    })
    .await;
    let entries = wait_for_entry(&fx, "late", "the timeout's deny", |e| {
        e.text.starts_with("tool Bash denied: no decision within")
    })
    .await;
    assert!(entries.iter().any(|e| e.kind == "result"));
    let decided = fx.manager.approvals(Some("late"), false).await.expect("approvals");
    assert_eq!(decided[0].decided_by, Some(agent_manager::DecidedBy::Timeout));
    assert!(fx.manager.approvals(None, true).await.expect("pending").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_approval_survives_a_leave_running_restart() {
    let fx = Fixture::new().await;
    let agent = fx.spawn_with(claude("coder", Some("!tool Bash make"))).await.agent;
    let approval = wait_for_pending(&fx, "coder").await;
    fx.manager.shutdown_all(true).await.expect("leave running");
    let fx2 = Fixture::on(fx.engine.clone(), fx.store.clone(), test_config(), fx.clock.clone()).await;
    fx2.reconcile().await;
    let pending = fx2.manager.approvals(Some("coder"), true).await.expect("approvals");
    assert_eq!(pending.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(), [approval.id.as_str()]);
    fx2.manager.decide(&approval.id, agent_manager::Decision::Allow, None).await.expect("allow");
    wait_for_entry(&fx2, "coder", "the answer after the restart", |e| e.text == "tool Bash allowed: make").await;
    assert_eq!(fx2.get("coder").await.agent.container_id, agent.container_id, "the same run got the answer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_turn_is_interrupted_and_the_agent_answers_again() {
    let mut config = test_config();
    config.defaults.turn_idle_timeout = Duration::from_millis(500);
    let fx = Fixture::with_config(config).await;
    fx.spawn_with(claude("coder", Some("!stall"))).await;
    let entries = wait_for_entry(&fx, "coder", "the interrupted turn's result", |e| e.kind == "result").await;
    assert!(entries.iter().any(|e| e.direction == Direction::ToAgent && e.text == "interrupt"));
    let kinds: Vec<_> =
        fx.manager.events(Some("coder"), 0, 100).await.expect("events").into_iter().map(|e| e.kind).collect();
    assert!(kinds.contains(&agent_manager::EventKind::TurnInterrupted), "{kinds:?}");
    fx.manager.send_message("coder", "back?").await.expect("send");
    wait_for_entry(&fx, "coder", "the next answer", result_with("echo: back?")).await;
    assert_eq!(fx.get("coder").await.agent.restarts, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn later_runs_resume_the_session_and_rm_leaves_no_volume() {
    let fx = Fixture::new().await;
    let agent = fx.spawn_with(claude("coder", None)).await.agent;
    let spec = fx.manager.session_spec_for(&fx.manager.agent("coder").await.expect("agent")).expect("spec");
    assert!(spec.command.as_ref().expect("command").contains(&"--session-id".to_owned()), "no turn yet: a new session");
    let home = format!("{}-home", agent.session);
    assert_eq!(
        spec.volumes.iter().map(|v| (v.name.as_str(), v.target.to_str())).collect::<Vec<_>>(),
        [(home.as_str(), Some("/home/agent"))]
    );
    fx.manager.send_message("coder", "hi").await.expect("send");
    wait_for_entry(&fx, "coder", "the first answer", result_with("echo: hi")).await;
    fx.manager.restart("coder").await.expect("restart");
    let spec = fx.manager.session_spec_for(&fx.manager.agent("coder").await.expect("agent")).expect("spec");
    let command = spec.command.expect("command");
    let at = command.iter().position(|a| a == "--resume").expect("a run after a recorded turn resumes");
    assert_eq!(command[at + 1], agent.id);
    let volumes = fx.manager.backend().list_volumes().await.expect("volumes");
    assert_eq!(volumes.iter().filter(|v| v.name == home).count(), 1, "one HOME volume across runs");
    fx.manager.remove("coder").await.expect("rm");
    assert!(fx.manager.backend().list_volumes().await.expect("volumes").is_empty(), "rm leaves no volume behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_orphaned_volume_is_removed_after_the_grace() {
    let fx = Fixture::new().await;
    let agent = fx.spawn_with(claude("gone", None)).await.agent;
    // The record goes away behind the manager's back (a crash between the two).
    fx.store.delete_agent(&agent.id).await.expect("delete record");
    fx.manager.backend().kill_session(&agent.session, Duration::ZERO).await.expect("remove container");
    fx.reconcile().await;
    assert_eq!(fx.manager.backend().list_volumes().await.expect("volumes").len(), 1, "kept within the grace");
    fx.clock.advance(Duration::from_secs(301));
    let report = fx.reconcile().await;
    assert_eq!(report.orphans_removed, 1, "{report:?}");
    assert!(fx.manager.backend().list_volumes().await.expect("volumes").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_that_ignores_the_interrupt_gets_the_agent_restarted() {
    let mut config = test_config();
    config.defaults.turn_idle_timeout = Duration::from_millis(300);
    config.defaults.interrupt_grace = Duration::from_millis(500);
    let fx = Fixture::with_config(config).await;
    let before = fx.spawn_with(claude("stuck", Some("!hang"))).await.agent;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let supervisor = tokio::spawn(fx.manager.clone().supervise(stopped));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let agent = fx.get("stuck").await.agent;
        if agent.restarts == 1 && agent.status == agent_manager::AgentStatus::Running {
            assert_ne!(agent.container_id, before.container_id, "a new run");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the stuck agent was not restarted: {agent:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let events = fx.manager.events(Some("stuck"), 0, 100).await.expect("events");
    assert!(events.iter().any(|e| e.kind == agent_manager::EventKind::TurnInterrupted));
    let restarted = events.iter().find(|e| e.kind == agent_manager::EventKind::Restarted).expect("restarted event");
    assert!(restarted.detail.contains("did not end"), "the event says why: {}", restarted.detail);
    stop.send(true).expect("stop");
    tokio::time::timeout(Duration::from_secs(5), supervisor).await.expect("stops").expect("join");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_run_records_what_claude_said_on_stderr() {
    let fx = Fixture::new().await;
    fx.spawn_with(claude("refused", Some("!stderr No conversation found with session ID: x"))).await;
    wait_for_entry(&fx, "refused", "the stderr line", |e| e.kind == "stderr").await;
    fx.manager.send_message("refused", "!exit 1").await.expect("send");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        fx.reconcile().await;
        let view = fx.get("refused").await;
        if view.agent.status == agent_manager::AgentStatus::Failed {
            let error = view.exit.and_then(|e| e.error).unwrap_or_default();
            assert!(error.contains("claude said: No conversation found"), "{error}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the run did not end");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_of_an_ended_run_is_closed_and_never_answered_into_the_next() {
    let fx = Fixture::new().await;
    fx.spawn_with(claude("coder", Some("!tool Bash make"))).await;
    let approval = wait_for_pending(&fx, "coder").await;
    fx.manager.restart("coder").await.expect("restart");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let decided = fx.manager.approval(&approval.id).await.expect("approval");
        if decided.decision.is_some() {
            assert_eq!(decided.decided_by, Some(agent_manager::DecidedBy::RunEnded), "{decided:?}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the old run's request stayed pending");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    match fx.manager.decide(&approval.id, agent_manager::Decision::Allow, None).await {
        Err(ManagerError::Conflict(m)) => assert!(m.contains("decided already") || m.contains("has ended"), "{m}"),
        other => panic!("deciding a closed request must conflict, got {other:?}"),
    }
    let entries = fx.manager.conversation("coder", 0, 1000).await.expect("conversation");
    assert!(
        !entries.iter().any(|e| e.kind == "control_response" && e.direction == Direction::ToAgent),
        "no answer was queued for a request nobody waits for"
    );
}
