//! The stdio mode's stream-json protocol, without a process: a [`Session`] takes one line
//! read from stdin and returns the [`Step`]s to take (lines to write, a pause, an exit).
//!
//! The lines are written by hand, field by field, so that their bytes (key order
//! included) are exactly what README.md shows, whatever features serde_json is built
//! with. Strings are escaped by serde_json.

use std::collections::VecDeque;
use std::time::Duration;

use serde_json::Value;

/// The session id when the arguments name none (`--session-id X` or `--resume X`).
pub const DEFAULT_SESSION_ID: &str = "00000000-0000-4000-8000-000000000000";

/// What the agent does for an input line, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Write this line (and a newline) to stdout, flushed.
    Stdout(String),
    /// Write this line (and a newline) to stderr.
    Stderr(String),
    /// Write a JSON line of exactly `bytes` bytes (and a newline) to stdout, streamed:
    /// `{"type":"big","n":N,"pad":"xxx…"}`.
    Big { n: u64, bytes: usize },
    /// Wait this long before the next step.
    Sleep(Duration),
    /// Exit the process with this code at once.
    Exit(i32),
}

/// Whether the stdio mode is on: `ECHO_STDIO=1`, or arguments that contain
/// `--input-format stream-json` (as agentd runs `claude`).
pub fn stdio_requested(args: &[String], echo_stdio: Option<&str>) -> bool {
    echo_stdio == Some("1")
        || args.windows(2).any(|w| w[0] == "--input-format" && w[1] == "stream-json")
        || args.iter().any(|a| a == "--input-format=stream-json")
}

/// The session id the arguments name: `--session-id X`, else `--resume X`, else
/// [`DEFAULT_SESSION_ID`].
pub fn session_id(args: &[String]) -> String {
    let value = |flag: &str| {
        let prefixed = format!("{flag}=");
        args.iter().enumerate().find_map(|(i, a)| {
            if a == flag {
                args.get(i + 1).cloned()
            } else {
                a.strip_prefix(&prefixed).map(str::to_owned)
            }
        })
    };
    value("--session-id").or_else(|| value("--resume")).unwrap_or_else(|| DEFAULT_SESSION_ID.to_owned())
}

/// Where the current turn is.
#[derive(Debug)]
enum Turn {
    /// No turn runs: a user message starts one at once.
    Idle,
    /// `!stall`: the turn ends only with an interrupt.
    Stalled,
    /// `!hang`: the turn never ends, interrupts or not (a CLI that is stuck for good).
    Hung,
    /// `!tool`: waiting for the `control_response` to `request_id`.
    Tool { request_id: String, name: String, input: String },
}

/// One simulated Claude Code session: the stream-json conversation of one process.
#[derive(Debug)]
pub struct Session {
    session_id: String,
    /// Turns that ended with a result (the cost is 0.001 USD per turn).
    turns: u64,
    /// The last assistant message number (`msg_<k>`).
    messages: u64,
    /// The last tool request number (`tool-<k>`, `toolu_<k>`).
    tools: u64,
    turn: Turn,
    /// User messages that came while a turn ran, handled after it in order.
    queued: VecDeque<String>,
}

impl Session {
    /// A session that answers as `session_id`.
    pub fn new(session_id: impl Into<String>) -> Self {
        Self {
            session_id: session_id.into(),
            turns: 0,
            messages: 0,
            tools: 0,
            turn: Turn::Idle,
            queued: VecDeque::new(),
        }
    }

    /// Handles one line read from stdin (without its newline).
    pub fn handle(&mut self, line: &str) -> Vec<Step> {
        let mut out = Vec::new();
        if line.trim().is_empty() {
            return out;
        }
        let Ok(value) = serde_json::from_str::<Value>(line) else {
            out.push(Step::Stdout(echo_error("input is not JSON")));
            return out;
        };
        match value["type"].as_str() {
            Some("user") => match user_text(&value) {
                Some(text) if self.busy() => self.queued.push_back(text),
                Some(text) => {
                    self.start_turn(&text, &mut out);
                    self.drain(&mut out);
                }
                None => out.push(Step::Stdout(echo_error("user message without content"))),
            },
            Some("control_request") => self.control_request(&value, &mut out),
            Some("control_response") => self.control_response(&value, &mut out),
            _ => {}
        }
        out
    }

    fn busy(&self) -> bool {
        !matches!(self.turn, Turn::Idle)
    }

    /// Starts the queued turns while no turn runs.
    fn drain(&mut self, out: &mut Vec<Step>) {
        while !self.busy() && !matches!(out.last(), Some(Step::Exit(_))) {
            let Some(text) = self.queued.pop_front() else { break };
            self.start_turn(&text, out);
        }
    }

    fn control_request(&mut self, value: &Value, out: &mut Vec<Step>) {
        let id = value["request_id"].to_string();
        match value["request"]["subtype"].as_str() {
            Some("initialize") => out.push(Step::Stdout(format!(
                r#"{{"type":"control_response","response":{{"subtype":"success","request_id":{id},"response":{{"commands":[],"models":[],"output_style":"default"}}}}}}"#
            ))),
            Some("interrupt") => {
                out.push(Step::Stdout(format!(
                    r#"{{"type":"control_response","response":{{"subtype":"success","request_id":{id}}}}}"#
                )));
                if self.busy() && !matches!(self.turn, Turn::Hung) {
                    self.turn = Turn::Idle;
                    out.push(Step::Stdout(self.result("error_during_execution", "")));
                    self.drain(out);
                }
            }
            other => {
                let error = json_str(&format!("unsupported control request: {}", other.unwrap_or("")));
                out.push(Step::Stdout(format!(
                    r#"{{"type":"control_response","response":{{"subtype":"error","request_id":{id},"error":{error}}}}}"#
                )));
            }
        }
    }

    fn control_response(&mut self, value: &Value, out: &mut Vec<Step>) {
        let response = &value["response"];
        let Turn::Tool { request_id, name, input } = &self.turn else { return };
        if response["request_id"].as_str() != Some(request_id.as_str()) {
            return;
        }
        let decision = &response["response"];
        let text = if response["subtype"] == "success" && decision["behavior"] == "allow" {
            let input = decision["updatedInput"]["command"].as_str().unwrap_or(input);
            format!("tool {name} allowed: {input}")
        } else {
            let message = decision["message"].as_str().or(response["error"].as_str()).unwrap_or("");
            format!("tool {name} denied: {message}")
        };
        self.turn = Turn::Idle;
        self.answer(&text, out);
        self.drain(out);
    }

    /// One user turn: the init line, then what the text asks for.
    fn start_turn(&mut self, text: &str, out: &mut Vec<Step>) {
        let sid = json_str(&self.session_id);
        out.push(Step::Stdout(format!(
            r#"{{"type":"system","subtype":"init","session_id":{sid},"tools":["Bash"],"model":"echo","cwd":"/workspace","permissionMode":"default"}}"#
        )));
        match Command::parse(text) {
            Some(Command::Emit { lines, delay }) => {
                if !delay.is_zero() {
                    out.push(Step::Sleep(delay));
                }
                out.extend((0..lines).map(|i| Step::Stdout(format!("line {i}"))));
                out.push(Step::Stdout(format!("emitted {lines}")));
                out.push(Step::Stdout(self.result("success", "")));
            }
            Some(Command::Big { first_mib, then_mib, count }) => {
                const MIB: usize = 1024 * 1024;
                out.push(Step::Big { n: 0, bytes: first_mib as usize * MIB });
                out.extend((1..=count).map(|n| Step::Big { n, bytes: then_mib as usize * MIB }));
                out.push(Step::Stdout(format!("big lines written: {}", count + 1)));
                out.push(Step::Stdout(self.result("success", "")));
            }
            Some(Command::Stderr(line)) => {
                out.push(Step::Stderr(line.to_owned()));
                out.push(Step::Stdout(self.result("success", "")));
            }
            Some(Command::Tool { name, input }) => {
                self.tools += 1;
                let k = self.tools;
                let request_id = format!("tool-{k}");
                out.push(Step::Stdout(format!(
                    r#"{{"type":"control_request","request_id":"{request_id}","request":{{"subtype":"can_use_tool","tool_name":{},"input":{{"command":{}}},"permission_suggestions":[],"tool_use_id":"toolu_{k}"}}}}"#,
                    json_str(name),
                    json_str(input)
                )));
                self.turn = Turn::Tool { request_id, name: name.to_owned(), input: input.to_owned() };
            }
            Some(Command::Stall) => self.turn = Turn::Stalled,
            Some(Command::Hang) => self.turn = Turn::Hung,
            Some(Command::Exit(code)) => out.push(Step::Exit(code)),
            None => self.answer(&format!("echo: {text}"), out),
        }
    }

    /// An assistant message with `text`, then the turn's result.
    fn answer(&mut self, text: &str, out: &mut Vec<Step>) {
        self.messages += 1;
        out.push(Step::Stdout(format!(
            r#"{{"type":"assistant","message":{{"id":"msg_{}","type":"message","role":"assistant","model":"echo","content":[{{"type":"text","text":{}}}],"stop_reason":"end_turn","usage":{{"input_tokens":10,"output_tokens":5}}}},"parent_tool_use_id":null,"session_id":{}}}"#,
            self.messages,
            json_str(text),
            json_str(&self.session_id)
        )));
        out.push(Step::Stdout(self.result("success", text)));
    }

    /// The result line that ends a turn; the cost is cumulative for the process.
    fn result(&mut self, subtype: &str, text: &str) -> String {
        self.turns += 1;
        let cost = Value::from(self.turns as f64 / 1000.0);
        let is_error = subtype != "success";
        format!(
            r#"{{"type":"result","subtype":"{subtype}","is_error":{is_error},"duration_ms":1,"num_turns":1,"result":{},"session_id":{},"total_cost_usd":{cost},"usage":{{"input_tokens":10,"output_tokens":5}}}}"#,
            json_str(text),
            json_str(&self.session_id)
        )
    }
}

/// What a user message's text asks for; `None` is "echo it".
#[derive(Debug, PartialEq, Eq)]
enum Command<'a> {
    Emit { lines: u64, delay: Duration },
    Big { first_mib: u64, then_mib: u64, count: u64 },
    Stderr(&'a str),
    Tool { name: &'a str, input: &'a str },
    Stall,
    Hang,
    Exit(i32),
}

impl<'a> Command<'a> {
    /// A command whose arguments do not parse is no command: it is echoed.
    fn parse(text: &'a str) -> Option<Self> {
        let (word, rest) = text.split_once(' ').unwrap_or((text, ""));
        match word {
            "!emit" => {
                let numbers: Vec<u64> = rest.split_whitespace().map(str::parse).collect::<Result<_, _>>().ok()?;
                match numbers[..] {
                    [lines] => Some(Self::Emit { lines, delay: Duration::ZERO }),
                    [lines, ms] => Some(Self::Emit { lines, delay: Duration::from_millis(ms) }),
                    _ => None,
                }
            }
            "!big" => {
                let numbers: Vec<u64> = rest.split_whitespace().map(str::parse).collect::<Result<_, _>>().ok()?;
                match numbers[..] {
                    [first_mib, then_mib, count] if first_mib <= 1024 && then_mib <= 1024 && count <= 1024 => {
                        Some(Self::Big { first_mib, then_mib, count })
                    }
                    _ => None,
                }
            }
            "!stderr" => Some(Self::Stderr(rest)),
            "!tool" => {
                let (name, input) = rest.split_once(' ').unwrap_or((rest, ""));
                (!name.is_empty()).then_some(Self::Tool { name, input })
            }
            "!stall" if rest.trim().is_empty() => Some(Self::Stall),
            "!hang" if rest.trim().is_empty() => Some(Self::Hang),
            "!exit" if rest.trim().is_empty() => Some(Self::Exit(0)),
            "!exit" => rest.trim().parse().ok().map(Self::Exit),
            _ => None,
        }
    }
}

/// The text of a stream-json user message, `{"type":"user","message":{"content":...}}`,
/// whose content is a string or a list of blocks (the text blocks are joined).
fn user_text(value: &Value) -> Option<String> {
    let content = &value["message"]["content"];
    if let Some(text) = content.as_str() {
        return Some(text.to_owned());
    }
    let parts: Vec<&str> = content.as_array()?.iter().filter_map(|b| b["text"].as_str()).collect();
    Some(parts.concat())
}

fn echo_error(error: &str) -> String {
    format!(r#"{{"type":"system","subtype":"echo_error","error":{}}}"#, json_str(error))
}

/// `text` as a JSON string.
fn json_str(text: &str) -> String {
    Value::from(text).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SID: &str = "11111111-2222-4333-8444-555555555555";

    fn user(text: &str) -> String {
        serde_json::json!({"type": "user", "message": {"role": "user", "content": text}, "parent_tool_use_id": null, "session_id": ""})
            .to_string()
    }

    fn stdout(steps: &[Step]) -> Vec<&str> {
        steps
            .iter()
            .filter_map(|s| match s {
                Step::Stdout(line) => Some(line.as_str()),
                _ => None,
            })
            .collect()
    }

    fn json(line: &str) -> Value {
        serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?} is not JSON: {e}"))
    }

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn the_mode_and_session_id_come_from_the_environment_or_claudes_arguments() {
        let claude = args(&[
            "claude",
            "-p",
            "--input-format",
            "stream-json",
            "--output-format",
            "stream-json",
            "--session-id",
            SID,
        ]);
        assert!(stdio_requested(&claude, None));
        assert_eq!(session_id(&claude), SID);
        assert!(stdio_requested(&[], Some("1")));
        assert!(!stdio_requested(&[], Some("0")));
        assert!(!stdio_requested(&args(&["--output-format", "stream-json"]), None));
        assert_eq!(session_id(&args(&["--resume", "abc"])), "abc");
        assert_eq!(session_id(&args(&["--resume", "abc", "--session-id", "def"])), "def");
        assert_eq!(session_id(&[]), DEFAULT_SESSION_ID);
    }

    #[test]
    fn a_message_is_answered_with_init_assistant_and_result_byte_for_byte() {
        let mut session = Session::new(SID);
        let steps = session.handle(&user("hi"));
        assert_eq!(
            stdout(&steps),
            [
                r#"{"type":"system","subtype":"init","session_id":"11111111-2222-4333-8444-555555555555","tools":["Bash"],"model":"echo","cwd":"/workspace","permissionMode":"default"}"#,
                r#"{"type":"assistant","message":{"id":"msg_1","type":"message","role":"assistant","model":"echo","content":[{"type":"text","text":"echo: hi"}],"stop_reason":"end_turn","usage":{"input_tokens":10,"output_tokens":5}},"parent_tool_use_id":null,"session_id":"11111111-2222-4333-8444-555555555555"}"#,
                r#"{"type":"result","subtype":"success","is_error":false,"duration_ms":1,"num_turns":1,"result":"echo: hi","session_id":"11111111-2222-4333-8444-555555555555","total_cost_usd":0.001,"usage":{"input_tokens":10,"output_tokens":5}}"#,
            ]
        );
        let second = session.handle(
            r#"{"type":"user","message":{"content":[{"type":"text","text":"a"},{"type":"text","text":"\"b\""}]}}"#,
        );
        let lines = stdout(&second);
        assert_eq!(json(lines[1])["message"]["id"], "msg_2");
        assert_eq!(json(lines[1])["message"]["content"][0]["text"], "echo: a\"b\"");
        assert_eq!(json(lines[2])["total_cost_usd"], 0.002, "the cost is cumulative");
    }

    #[test]
    fn bad_input_and_the_handshake() {
        let mut session = Session::new(SID);
        assert_eq!(
            stdout(&session.handle("not json")),
            [r#"{"type":"system","subtype":"echo_error","error":"input is not JSON"}"#]
        );
        assert!(session.handle("").is_empty());
        assert!(session.handle(r#"{"type":"keep_alive"}"#).is_empty());
        assert_eq!(
            stdout(
                &session
                    .handle(r#"{"type":"control_request","request_id":"init-1","request":{"subtype":"initialize"}}"#)
            ),
            [
                r#"{"type":"control_response","response":{"subtype":"success","request_id":"init-1","response":{"commands":[],"models":[],"output_style":"default"}}}"#
            ]
        );
        let unknown = session.handle(r#"{"type":"control_request","request_id":7,"request":{"subtype":"set_model"}}"#);
        assert_eq!(json(stdout(&unknown)[0])["response"]["subtype"], "error");
        assert_eq!(json(stdout(&unknown)[0])["response"]["request_id"], 7);
    }

    #[test]
    fn emit_stderr_stall_and_exit() {
        let mut session = Session::new(SID);
        let steps = session.handle(&user("!emit 3 250"));
        assert_eq!(steps[1], Step::Sleep(Duration::from_millis(250)));
        let lines = stdout(&steps);
        assert_eq!(lines[1..5], ["line 0", "line 1", "line 2", "emitted 3"]);
        assert_eq!(json(lines[5])["result"], "");
        assert_eq!(stdout(&session.handle(&user("!emit 1")))[1..3], ["line 0", "emitted 1"]);
        assert_eq!(json(stdout(&session.handle(&user("!emit x")))[2])["result"], "echo: !emit x");

        let steps = session.handle(&user("!big 2 1 3"));
        let bigs: Vec<(u64, usize)> = steps
            .iter()
            .filter_map(|s| if let Step::Big { n, bytes } = s { Some((*n, *bytes)) } else { None })
            .collect();
        assert_eq!(bigs, [(0, 2 << 20), (1, 1 << 20), (2, 1 << 20), (3, 1 << 20)]);
        let steps = session.handle(&user("!stderr oops on stderr"));
        assert_eq!(steps[1], Step::Stderr("oops on stderr".into()));
        assert_eq!(json(stdout(&steps)[1])["type"], "result");

        assert_eq!(session.handle(&user("!exit 3")).last(), Some(&Step::Exit(3)));

        let steps = session.handle(&user("!stall"));
        assert_eq!(stdout(&steps).len(), 1, "only the init line: {steps:?}");
        assert!(session.handle(&user("queued")).is_empty(), "a user line waits for the stalled turn");
        let steps = session.handle(r#"{"type":"control_request","request_id":"i1","request":{"subtype":"interrupt"}}"#);
        let lines = stdout(&steps);
        assert_eq!(lines[0], r#"{"type":"control_response","response":{"subtype":"success","request_id":"i1"}}"#);
        let result = json(lines[1]);
        assert_eq!(
            (result["subtype"].as_str(), result["is_error"].as_bool()),
            (Some("error_during_execution"), Some(true))
        );
        assert_eq!(json(lines[4])["result"], "echo: queued", "the queued line runs after the interrupt");
        let idle = session.handle(r#"{"type":"control_request","request_id":"i2","request":{"subtype":"interrupt"}}"#);
        assert_eq!(stdout(&idle).len(), 1, "an interrupt without a turn is only answered");
    }

    #[test]
    fn tool_requests_wait_for_the_decision_and_queue_user_lines() {
        let mut session = Session::new(SID);
        let steps = session.handle(&user("!tool Bash touch x"));
        assert_eq!(
            stdout(&steps)[1],
            r#"{"type":"control_request","request_id":"tool-1","request":{"subtype":"can_use_tool","tool_name":"Bash","input":{"command":"touch x"},"permission_suggestions":[],"tool_use_id":"toolu_1"}}"#
        );
        assert!(session.handle(&user("later")).is_empty(), "queued while the tool waits");
        let wrong = r#"{"type":"control_response","response":{"subtype":"success","request_id":"tool-9","response":{"behavior":"allow"}}}"#;
        assert!(session.handle(wrong).is_empty(), "a decision for another request is ignored");
        let allow = r#"{"type":"control_response","response":{"subtype":"success","request_id":"tool-1","response":{"behavior":"allow","updatedInput":{"command":"touch y"}}}}"#;
        let lines: Vec<Value> = stdout(&session.handle(allow)).into_iter().map(json).collect();
        assert_eq!(lines[0]["message"]["content"][0]["text"], "tool Bash allowed: touch y");
        assert_eq!(lines[1]["result"], "tool Bash allowed: touch y");
        assert_eq!(lines[3]["message"]["content"][0]["text"], "echo: later");

        session.handle(&user("!tool Bash rm -rf /"));
        let deny = r#"{"type":"control_response","response":{"subtype":"success","request_id":"tool-2","response":{"behavior":"deny","message":"no"}}}"#;
        let steps = session.handle(deny);
        let lines = stdout(&steps);
        assert_eq!(json(lines[1])["result"], "tool Bash denied: no");
        assert_eq!(json(lines[1])["total_cost_usd"], 0.003);
    }
}
