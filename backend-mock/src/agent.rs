//! The echo agent's stdio mode, simulated: Claude Code's stream-json on stdin and stdout,
//! answered with the lines `docker/echo-agent` writes (its README lists them), byte for
//! byte. The protocol is duplicated here on purpose: the echo agent is a separate binary
//! crate, and this copy is the mock's own.

use std::collections::VecDeque;
use std::time::Duration;

use backend_core::{OutputStream, SessionSpec};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::engine::MockEngine;
use crate::output::{self, Output, Write};

/// The session id when the command names none.
pub(crate) const DEFAULT_SESSION_ID: &str = "00000000-0000-4000-8000-000000000000";

/// The echo agent's arguments: the image's entrypoint is the echo agent (`/agent`), so an
/// `entrypoint` of the spec is taken for it, with its further elements as the first
/// arguments, and the command follows.
pub(crate) fn agent_args(spec: &SessionSpec) -> Vec<String> {
    let leading = spec.entrypoint.as_deref().map_or(&[][..], |e| e.get(1..).unwrap_or_default());
    leading.iter().chain(spec.command.as_deref().unwrap_or_default()).cloned().collect()
}

/// The session id of a container whose agent speaks stream-json: `ECHO_STDIO=1`, or a
/// command with `--input-format stream-json` (as agentd runs `claude`). The id is the
/// command's `--session-id X`, else `--resume X`, else [`DEFAULT_SESSION_ID`].
pub(crate) fn stdio_session_id(spec: &SessionSpec) -> Option<String> {
    let args = agent_args(spec);
    let flag = |name: &str| {
        let prefixed = format!("{name}=");
        args.iter().enumerate().find_map(|(i, a)| {
            if a == name {
                args.get(i + 1).cloned()
            } else {
                a.strip_prefix(&prefixed).map(str::to_owned)
            }
        })
    };
    let stdio = spec.env.get("ECHO_STDIO").is_some_and(|v| v == "1")
        || flag("--input-format").is_some_and(|f| f == "stream-json");
    stdio.then(|| flag("--session-id").or_else(|| flag("--resume")).unwrap_or_else(|| DEFAULT_SESSION_ID.into()))
}

/// What the agent does for an input line, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    Write(OutputStream, String),
    Sleep(Duration),
    Exit(i64),
}

fn out(line: String) -> Step {
    Step::Write(OutputStream::Stdout, line)
}

#[derive(Debug)]
enum Turn {
    Idle,
    Stalled,
    /// `!hang`: never ends, interrupts or not.
    Hung,
    Tool {
        request_id: String,
        name: String,
        input: String,
    },
}

/// One simulated session: the echo agent's `Session`.
#[derive(Debug)]
pub(crate) struct EchoSession {
    sid: String,
    turns: u64,
    messages: u64,
    tools: u64,
    turn: Turn,
    queued: VecDeque<String>,
}

impl EchoSession {
    pub(crate) fn new(session_id: String) -> Self {
        Self {
            sid: Value::from(session_id).to_string(),
            turns: 0,
            messages: 0,
            tools: 0,
            turn: Turn::Idle,
            queued: VecDeque::new(),
        }
    }

    /// Handles one stdin line (without its newline).
    pub(crate) fn handle(&mut self, line: &str) -> Vec<Step> {
        let mut steps = Vec::new();
        if line.trim().is_empty() {
            return steps;
        }
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            steps.push(out(echo_error("input is not JSON")));
            return steps;
        };
        match v["type"].as_str() {
            Some("user") => match text_of(&v) {
                Some(text) if !matches!(self.turn, Turn::Idle) => self.queued.push_back(text),
                Some(text) => self.start_turn(&text, &mut steps),
                None => steps.push(out(echo_error("user message without content"))),
            },
            Some("control_request") => {
                let id = v["request_id"].to_string();
                match v["request"]["subtype"].as_str() {
                    Some("initialize") => steps.push(out(format!(
                        r#"{{"type":"control_response","response":{{"subtype":"success","request_id":{id},"response":{{"commands":[],"models":[],"output_style":"default"}}}}}}"#
                    ))),
                    Some("interrupt") => {
                        steps.push(out(format!(
                            r#"{{"type":"control_response","response":{{"subtype":"success","request_id":{id}}}}}"#
                        )));
                        if !matches!(self.turn, Turn::Idle | Turn::Hung) {
                            self.turn = Turn::Idle;
                            let result = self.result("error_during_execution", "");
                            steps.push(out(result));
                        }
                    }
                    other => {
                        let error = json_str(&format!("unsupported control request: {}", other.unwrap_or("")));
                        steps.push(out(format!(
                            r#"{{"type":"control_response","response":{{"subtype":"error","request_id":{id},"error":{error}}}}}"#
                        )));
                    }
                }
            }
            Some("control_response") => {
                let (r, decision) = (&v["response"], &v["response"]["response"]);
                let Turn::Tool { request_id, name, input } = &self.turn else { return steps };
                if r["request_id"].as_str() != Some(request_id.as_str()) {
                    return steps;
                }
                let text = if r["subtype"] == "success" && decision["behavior"] == "allow" {
                    format!("tool {name} allowed: {}", decision["updatedInput"]["command"].as_str().unwrap_or(input))
                } else {
                    let message = decision["message"].as_str().or(r["error"].as_str()).unwrap_or("");
                    format!("tool {name} denied: {message}")
                };
                self.turn = Turn::Idle;
                self.answer(&text, &mut steps);
            }
            _ => {}
        }
        // Queued user lines run once no turn does (unless the agent exits).
        while matches!(self.turn, Turn::Idle) && !matches!(steps.last(), Some(Step::Exit(_))) {
            let Some(text) = self.queued.pop_front() else { break };
            self.start_turn(&text, &mut steps);
        }
        steps
    }

    fn start_turn(&mut self, text: &str, steps: &mut Vec<Step>) {
        steps.push(out(format!(
            r#"{{"type":"system","subtype":"init","session_id":{},"tools":["Bash"],"model":"echo","cwd":"/workspace","permissionMode":"default"}}"#,
            self.sid
        )));
        let (word, rest) = text.split_once(' ').unwrap_or((text, ""));
        let numbers: Option<Vec<u64>> = rest.split_whitespace().map(|n| n.parse().ok()).collect();
        match (word, numbers.as_deref()) {
            ("!emit", Some(&[lines])) | ("!emit", Some(&[lines, _])) => {
                let delay = numbers.as_deref().and_then(|n| n.get(1)).copied().unwrap_or(0);
                if delay > 0 {
                    steps.push(Step::Sleep(Duration::from_millis(delay)));
                }
                steps.extend((0..lines).map(|i| out(format!("line {i}"))));
                steps.push(out(format!("emitted {lines}")));
                let result = self.result("success", "");
                steps.push(out(result));
            }
            ("!stderr", _) => {
                steps.push(Step::Write(OutputStream::Stderr, rest.to_owned()));
                let result = self.result("success", "");
                steps.push(out(result));
            }
            ("!tool", _) if !rest.split_once(' ').map_or(rest, |(n, _)| n).is_empty() => {
                let (name, input) = rest.split_once(' ').unwrap_or((rest, ""));
                self.tools += 1;
                let k = self.tools;
                steps.push(out(format!(
                    r#"{{"type":"control_request","request_id":"tool-{k}","request":{{"subtype":"can_use_tool","tool_name":{},"input":{{"command":{}}},"permission_suggestions":[],"tool_use_id":"toolu_{k}"}}}}"#,
                    json_str(name),
                    json_str(input)
                )));
                self.turn = Turn::Tool { request_id: format!("tool-{k}"), name: name.into(), input: input.into() };
            }
            ("!stall", _) if rest.trim().is_empty() => self.turn = Turn::Stalled,
            ("!hang", _) if rest.trim().is_empty() => self.turn = Turn::Hung,
            ("!exit", _) if rest.trim().is_empty() => steps.push(Step::Exit(0)),
            ("!exit", _) if rest.trim().parse::<i32>().is_ok() => {
                steps.push(Step::Exit(rest.trim().parse::<i32>().map_or(0, i64::from)));
            }
            _ => self.answer(&format!("echo: {text}"), steps),
        }
    }

    fn answer(&mut self, text: &str, steps: &mut Vec<Step>) {
        self.messages += 1;
        steps.push(out(format!(
            r#"{{"type":"assistant","message":{{"id":"msg_{}","type":"message","role":"assistant","model":"echo","content":[{{"type":"text","text":{}}}],"stop_reason":"end_turn","usage":{{"input_tokens":10,"output_tokens":5}}}},"parent_tool_use_id":null,"session_id":{}}}"#,
            self.messages,
            json_str(text),
            self.sid
        )));
        let result = self.result("success", text);
        steps.push(out(result));
    }

    fn result(&mut self, subtype: &str, text: &str) -> String {
        self.turns += 1;
        format!(
            r#"{{"type":"result","subtype":"{subtype}","is_error":{},"duration_ms":1,"num_turns":1,"result":{},"session_id":{},"total_cost_usd":{},"usage":{{"input_tokens":10,"output_tokens":5}}}}"#,
            subtype != "success",
            json_str(text),
            self.sid,
            Value::from(self.turns as f64 / 1000.0)
        )
    }
}

fn text_of(v: &Value) -> Option<String> {
    let content = &v["message"]["content"];
    if let Some(text) = content.as_str() {
        return Some(text.to_owned());
    }
    Some(content.as_array()?.iter().filter_map(|b| b["text"].as_str()).collect())
}

fn echo_error(error: &str) -> String {
    format!(r#"{{"type":"system","subtype":"echo_error","error":{}}}"#, json_str(error))
}

fn json_str(text: &str) -> String {
    Value::from(text).to_string()
}

/// Runs the agent of one container run: reads `stdin` until it closes and writes the
/// answers to `output`, on tokio's clock, reading and writing nothing while the
/// container is paused. A stdin that closes while the run is alive is EOF: the agent
/// exits 0, as the echo agent (and `claude`) do.
pub(crate) async fn run(
    engine: MockEngine,
    session: String,
    run: u64,
    output: Output,
    mut stdin: mpsc::UnboundedReceiver<String>,
    mut agent: EchoSession,
) {
    let mut rx = output.subscribe();
    loop {
        let Some(line) = stdin.recv().await else {
            let mut eof = vec![(OutputStream::Stdout, "echo-agent stdin closed; exiting 0".to_owned())];
            if write(&output, &mut rx, run, &mut eof).await {
                engine.exit_run(&session, run, 0);
            }
            return;
        };
        if !output::thawed(&mut rx, run).await {
            return;
        }
        let mut pending = Vec::new();
        for step in agent.handle(&line) {
            match step {
                Step::Write(stream, text) => pending.push((stream, text)),
                Step::Sleep(pause) => {
                    if !write(&output, &mut rx, run, &mut pending).await {
                        return;
                    }
                    tokio::time::sleep(pause).await;
                }
                Step::Exit(code) => {
                    if write(&output, &mut rx, run, &mut pending).await {
                        engine.exit_run(&session, run, code.rem_euclid(256));
                    }
                    return;
                }
            }
        }
        if !write(&output, &mut rx, run, &mut pending).await {
            return;
        }
    }
}

/// Writes `lines` for `run`, waiting out a pause; false when the run is over.
async fn write(
    output: &Output,
    rx: &mut tokio::sync::watch::Receiver<crate::output::Log>,
    run: u64,
    lines: &mut Vec<(OutputStream, String)>,
) -> bool {
    loop {
        match output::write_for_run(output, run, lines) {
            Write::Done => return true,
            Write::Ended => return false,
            Write::Frozen => {
                if !output::thawed(rx, run).await {
                    return false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(text: &str) -> String {
        serde_json::json!({"type": "user", "message": {"role": "user", "content": text}}).to_string()
    }

    fn lines(steps: &[Step]) -> Vec<&str> {
        steps
            .iter()
            .filter_map(|s| match s {
                Step::Write(OutputStream::Stdout, line) => Some(line.as_str()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn stdio_mode_comes_from_the_env_or_claudes_command() {
        let mut spec = SessionSpec::new("s", "a", "img");
        assert_eq!(stdio_session_id(&spec), None);
        spec.command = Some(
            ["claude", "-p", "--input-format", "stream-json", "--resume", "r-id", "--session-id", "s-id"]
                .map(String::from)
                .to_vec(),
        );
        assert_eq!(stdio_session_id(&spec).as_deref(), Some("s-id"));
        spec.command = None;
        spec.env.insert("ECHO_STDIO".into(), "1".into());
        assert_eq!(stdio_session_id(&spec).as_deref(), Some(DEFAULT_SESSION_ID));
    }

    /// The same bytes as the echo agent's own unit test.
    #[test]
    fn answers_match_the_echo_agent_byte_for_byte() {
        let mut s = EchoSession::new("11111111-2222-4333-8444-555555555555".into());
        assert_eq!(
            lines(&s.handle(&user("hi"))),
            [
                r#"{"type":"system","subtype":"init","session_id":"11111111-2222-4333-8444-555555555555","tools":["Bash"],"model":"echo","cwd":"/workspace","permissionMode":"default"}"#,
                r#"{"type":"assistant","message":{"id":"msg_1","type":"message","role":"assistant","model":"echo","content":[{"type":"text","text":"echo: hi"}],"stop_reason":"end_turn","usage":{"input_tokens":10,"output_tokens":5}},"parent_tool_use_id":null,"session_id":"11111111-2222-4333-8444-555555555555"}"#,
                r#"{"type":"result","subtype":"success","is_error":false,"duration_ms":1,"num_turns":1,"result":"echo: hi","session_id":"11111111-2222-4333-8444-555555555555","total_cost_usd":0.001,"usage":{"input_tokens":10,"output_tokens":5}}"#,
            ]
        );
        assert_eq!(
            lines(&s.handle("nope")),
            [r#"{"type":"system","subtype":"echo_error","error":"input is not JSON"}"#]
        );
        assert_eq!(
            lines(&s.handle(r#"{"type":"control_request","request_id":"init-1","request":{"subtype":"initialize"}}"#)),
            [
                r#"{"type":"control_response","response":{"subtype":"success","request_id":"init-1","response":{"commands":[],"models":[],"output_style":"default"}}}"#
            ]
        );
        assert_eq!(
            lines(&s.handle(&user("!tool Bash touch x")))[1],
            r#"{"type":"control_request","request_id":"tool-1","request":{"subtype":"can_use_tool","tool_name":"Bash","input":{"command":"touch x"},"permission_suggestions":[],"tool_use_id":"toolu_1"}}"#
        );
    }

    #[test]
    fn turns_queue_behind_tools_and_stalls_and_interrupts_end_them() {
        let mut s = EchoSession::new("sid".into());
        s.handle(&user("!tool Bash ls"));
        assert!(s.handle(&user("queued")).is_empty());
        let allow = r#"{"type":"control_response","response":{"subtype":"success","request_id":"tool-1","response":{"behavior":"allow"}}}"#;
        let steps = s.handle(allow);
        let got = lines(&steps);
        assert!(got[0].contains("tool Bash allowed: ls"), "{got:?}");
        assert!(got[3].contains("echo: queued"), "the queued line follows: {got:?}");

        s.handle(&user("!stall"));
        let steps = s.handle(r#"{"type":"control_request","request_id":"x","request":{"subtype":"interrupt"}}"#);
        let got = lines(&steps);
        assert_eq!(got[0], r#"{"type":"control_response","response":{"subtype":"success","request_id":"x"}}"#);
        assert!(got[1].contains(r#""subtype":"error_during_execution","is_error":true"#), "{got:?}");
        assert!(got[1].contains(r#""total_cost_usd":0.003"#), "{got:?}");

        let steps = s.handle(&user("!emit 2 40"));
        assert_eq!(steps[1], Step::Sleep(Duration::from_millis(40)));
        assert_eq!(lines(&steps)[1..4], ["line 0", "line 1", "emitted 2"]);
        assert_eq!(s.handle(&user("!exit 300")).last(), Some(&Step::Exit(300)));
        assert!(lines(&s.handle(&user("!exit now")))[1].contains("echo: !exit now"));
        assert_eq!(s.handle(&user("!stderr boom"))[1], Step::Write(OutputStream::Stderr, "boom".into()));
    }
}
