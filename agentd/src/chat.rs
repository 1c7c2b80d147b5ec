//! `agentd chat NAME`: an interactive conversation with a claude-code agent.
//!
//! On a terminal: a prompt line with history (rustyline), replies printed as they
//! stream, every tool-permission request shown with its input and asked as
//! `allow? [y/N]`, Ctrl-C interrupts the current turn, Ctrl-D leaves. Without a terminal,
//! each line of stdin is one message, and permission requests are left to `agentd
//! approve`/`deny`.

use std::io::{BufRead, IsTerminal, Write};

use agent_manager::{AgentKind, Approval, ConversationEntry, Decision, Direction};
use anyhow::{Context, Result};
use reqwest::Method;

use crate::api::{
    AgentJson, ApprovalsQuery, ConversationQuery, DecisionRequest, InterruptAccepted, MessageAccepted, MessageRequest,
};
use crate::client::{encode, Client};

/// How a permission request is answered.
enum Asker {
    /// Ask on the terminal, with the prompt's editor.
    Terminal(Option<Box<rustyline::DefaultEditor>>),
    /// Leave it pending and say how to decide it.
    Nobody,
}

impl Asker {
    /// Reads one line with the editor, off the async runtime. `None` at Ctrl-D.
    async fn read_line(&mut self, prompt: &str) -> Result<Option<String>> {
        let Asker::Terminal(slot) = self else {
            return Ok(None);
        };
        let mut editor = slot.take().context("the line editor is gone")?;
        let prompt = prompt.to_owned();
        let (editor, line) = tokio::task::spawn_blocking(move || {
            let line = loop {
                match editor.readline(&prompt) {
                    Ok(line) => break Ok(Some(line)),
                    // Ctrl-C at the prompt only clears the line.
                    Err(rustyline::error::ReadlineError::Interrupted) => continue,
                    Err(rustyline::error::ReadlineError::Eof) => break Ok(None),
                    Err(e) => break Err(anyhow::anyhow!("reading the terminal: {e}")),
                }
            };
            (editor, line)
        })
        .await
        .context("the terminal reader failed")?;
        *slot = Some(editor);
        line
    }

    fn remember(&mut self, line: &str) {
        if let Asker::Terminal(Some(editor)) = self {
            let _ = editor.add_history_entry(line);
        }
    }
}

/// Runs the chat until Ctrl-D or the end of stdin.
pub async fn run(client: &Client, name: &str) -> Result<()> {
    let agent: AgentJson = client.get(&format!("/v1/agents/{}", encode(name))).await?;
    if agent.kind != AgentKind::ClaudeCode {
        let kind = agent.kind;
        anyhow::bail!("agent {name} is of kind {kind}; only claude-code agents hold a conversation");
    }
    if std::io::stdin().is_terminal() {
        let editor = Box::new(rustyline::DefaultEditor::new().context("setting up the terminal")?);
        let mut asker = Asker::Terminal(Some(editor));
        println!("Chatting with {name}. Ctrl-C interrupts a turn, Ctrl-D leaves.");
        while let Some(line) = asker.read_line(&format!("{name}> ")).await? {
            let text = line.trim();
            if text.is_empty() {
                continue;
            }
            asker.remember(text);
            turn(client, name, text, &mut asker).await?;
        }
        println!();
    } else {
        let mut asker = Asker::Nobody;
        let lines: Vec<String> =
            std::io::stdin().lock().lines().collect::<std::io::Result<_>>().context("reading stdin")?;
        for line in lines {
            let text = line.trim();
            if !text.is_empty() {
                turn(client, name, text, &mut asker).await?;
            }
        }
    }
    Ok(())
}

/// Sends one message and follows its turn to the result.
async fn turn(client: &Client, name: &str, text: &str, asker: &mut Asker) -> Result<()> {
    let agent_path = format!("/v1/agents/{}", encode(name));
    let message = MessageRequest { text: text.to_owned() };
    let queued: MessageAccepted =
        client.call_with(Method::POST, &format!("{agent_path}/messages"), Some(&message)).await?;
    let mut after = queued.seq;
    let uuid = queued.uuid;
    loop {
        let query = ConversationQuery { after: Some(after), limit: None };
        let stream = client.open_stream(&format!("{agent_path}/conversation/stream"), &query).await?;
        let mut next: Option<ConversationEntry> = None;
        let interrupted = tokio::select! {
            followed = client.follow_conversation(stream, |entry| {
                after = entry.seq;
                let from_agent = entry.direction == Direction::FromAgent;
                match entry.kind.as_str() {
                    "assistant" if from_agent => {
                        if !entry.text.is_empty() {
                            println!("{}", entry.text);
                        }
                        true
                    }
                    "result" | "control_request" if from_agent => {
                        let ask = if entry.kind == "result" {
                            crate::client::ends_turn(&entry, uuid.as_deref())
                        } else {
                            // `data` is the agent's own line, untyped.
                            entry.data["request"]["subtype"] == "can_use_tool"
                        };
                        if ask {
                            next = Some(entry);
                        }
                        !ask
                    }
                    _ => true,
                }
            }) => {
                followed?;
                false
            }
            _ = tokio::signal::ctrl_c() => true,
            status = client.until_agent_stops(name) => {
                anyhow::bail!("agent {name} is {status}: the turn ended without a result");
            }
        };
        if interrupted {
            client.call::<InterruptAccepted>(Method::POST, &format!("{agent_path}/interrupt")).await?;
            println!("^C (interrupting the turn)");
            continue;
        }
        let Some(entry) = next else {
            anyhow::bail!("the conversation stream ended before the turn's result (is the daemon stopping?)");
        };
        if entry.kind == "result" {
            if entry.data["is_error"].as_bool() == Some(true) {
                println!("[turn ended with an error: {}]", entry.text);
            }
            let _ = std::io::stdout().flush();
            return Ok(());
        }
        ask_permission(client, name, &entry, asker).await?;
    }
}

/// Shows a permission request and answers it (on a terminal), or says how to.
async fn ask_permission(client: &Client, name: &str, entry: &ConversationEntry, asker: &mut Asker) -> Result<()> {
    let request = &entry.data["request"];
    let request_id = entry.data["request_id"].as_str().unwrap_or_default();
    let query = ApprovalsQuery { agent: Some(name.to_owned()), pending: Some(true) };
    let approvals: Vec<Approval> = client.get_query("/v1/approvals", &query).await?;
    let Some(approval) = approvals.into_iter().find(|a| a.request_id == request_id) else {
        // Decided already (by the agent's policy, or elsewhere).
        return Ok(());
    };
    let id = approval.id;
    let tool = request["tool_name"].as_str().unwrap_or("?");
    println!("{name} wants to use {tool}: {}", request["input"]);
    if let Asker::Nobody = asker {
        println!("approval {id} is pending: decide with `agentd approve {id}` or `agentd deny {id}`");
        return Ok(());
    }
    let answer = asker.read_line("allow? [y/N] ").await?.unwrap_or_default();
    let decision = if matches!(answer.trim(), "y" | "Y" | "yes") { Decision::Allow } else { Decision::Deny };
    let body =
        DecisionRequest { decision, message: (decision == Decision::Deny).then(|| "denied in agentd chat".to_owned()) };
    let path = format!("/v1/approvals/{}", encode(&id));
    match client.call_with::<_, Approval>(Method::POST, &path, Some(&body)).await {
        Ok(_) => println!("{id} {}", if decision == Decision::Allow { "allowed" } else { "denied" }),
        Err(e) => println!("{id}: {e:#}"),
    }
    Ok(())
}
