//! `agentd chat NAME`: an interactive conversation with a claude-code agent.
//!
//! On a terminal: a prompt line with history (rustyline), replies printed as they
//! stream, every tool-permission request shown with its input and asked as
//! `allow? [y/N]`, Ctrl-C interrupts the current turn, Ctrl-D leaves. Without a terminal,
//! each line of stdin is one message, and permission requests are left to `agentd
//! approve`/`deny`.

use std::io::{BufRead, IsTerminal, Write};

use anyhow::{Context, Result};
use reqwest::Method;
use serde_json::{json, Value};

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
    let agent = client.get_json(&format!("/v1/agents/{}", encode(name))).await?;
    if agent["kind"] != "claude-code" {
        let kind = agent["kind"].as_str().unwrap_or("unknown");
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
    let queued = client.call(Method::POST, &format!("{agent_path}/messages"), Some(json!({ "text": text }))).await?;
    let mut after = queued["seq"].as_i64().context("the daemon answered without a seq")?;
    let uuid = queued["uuid"].as_str().map(str::to_owned);
    loop {
        let stream = client.open_stream(&format!("{agent_path}/conversation/stream?after={after}")).await?;
        let mut next: Option<Value> = None;
        let interrupted = tokio::select! {
            followed = client.follow_conversation(stream, |entry| {
                after = entry["seq"].as_i64().unwrap_or(after);
                let from_agent = entry["direction"] == "from_agent";
                match entry["kind"].as_str() {
                    Some("assistant") if from_agent => {
                        let text = entry["text"].as_str().unwrap_or_default();
                        if !text.is_empty() {
                            println!("{text}");
                        }
                        true
                    }
                    Some("result") | Some("control_request") if from_agent => {
                        let ask = if entry["kind"] == "result" {
                            crate::client::ends_turn(&entry, uuid.as_deref())
                        } else {
                            entry["data"]["request"]["subtype"] == "can_use_tool"
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
            client.call(Method::POST, &format!("{agent_path}/interrupt"), None).await?;
            println!("^C (interrupting the turn)");
            continue;
        }
        let Some(entry) = next else {
            anyhow::bail!("the conversation stream ended before the turn's result (is the daemon stopping?)");
        };
        if entry["kind"] == "result" {
            if entry["data"]["is_error"].as_bool() == Some(true) {
                println!("[turn ended with an error: {}]", entry["text"].as_str().unwrap_or_default());
            }
            let _ = std::io::stdout().flush();
            return Ok(());
        }
        ask_permission(client, name, &entry, asker).await?;
    }
}

/// Shows a permission request and answers it (on a terminal), or says how to.
async fn ask_permission(client: &Client, name: &str, entry: &Value, asker: &mut Asker) -> Result<()> {
    let request = &entry["data"]["request"];
    let request_id = entry["data"]["request_id"].as_str().unwrap_or_default();
    let approvals = client.get_json(&format!("/v1/approvals?agent={}&pending=true", encode(name))).await?;
    let approval = approvals.as_array().into_iter().flatten().find(|a| a["request_id"] == request_id).cloned();
    let Some(approval) = approval else {
        // Decided already (by the agent's policy, or elsewhere).
        return Ok(());
    };
    let id = approval["id"].as_str().unwrap_or_default().to_owned();
    let tool = request["tool_name"].as_str().unwrap_or("?");
    println!("{name} wants to use {tool}: {}", request["input"]);
    if let Asker::Nobody = asker {
        println!("approval {id} is pending: decide with `agentd approve {id}` or `agentd deny {id}`");
        return Ok(());
    }
    let answer = asker.read_line("allow? [y/N] ").await?.unwrap_or_default();
    let decision = if matches!(answer.trim(), "y" | "Y" | "yes") { "allow" } else { "deny" };
    let body = json!({ "decision": decision, "message": (decision == "deny").then_some("denied in agentd chat") });
    match client.call(Method::POST, &format!("/v1/approvals/{}", encode(&id)), Some(body)).await {
        Ok(_) => println!("{id} {}", if decision == "allow" { "allowed" } else { "denied" }),
        Err(e) => println!("{id}: {e:#}"),
    }
    Ok(())
}
