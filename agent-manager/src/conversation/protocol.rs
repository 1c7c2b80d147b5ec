//! Claude Code's stream-json protocol, as far as the conversation needs it: what a line
//! is, its short human text, the lines agentd writes, and how a line moves the session's
//! state.

use serde_json::{json, Value};
use time::OffsetDateTime;

use super::{LastResult, SessionRecord, Turn};

/// The longest `text` an entry keeps; the whole line stays in `data`.
pub const MAX_ENTRY_TEXT: usize = 4096;

/// A line, classified.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Parsed {
    /// The line's `type`, `raw` for a line that is not a JSON object with one, or
    /// `stderr` for a line on the agent's stderr.
    pub kind: String,
    /// A short human text.
    pub text: String,
    /// The whole line: the JSON object, or the raw text as a JSON string.
    pub data: Value,
}

/// Classifies a line the agent wrote on stdout (or on stderr, with `stderr`).
pub(crate) fn parse_line(line: &str, stderr: bool) -> Parsed {
    if stderr {
        return Parsed { kind: "stderr".into(), text: cut(line), data: Value::String(line.to_owned()) };
    }
    match serde_json::from_str::<Value>(line) {
        Ok(data @ Value::Object(_)) => match data.get("type").and_then(Value::as_str) {
            Some(kind) => Parsed { kind: kind.to_owned(), text: cut(&human_text(kind, &data)), data },
            None => Parsed { kind: "raw".into(), text: cut(line), data: Value::String(line.to_owned()) },
        },
        _ => Parsed { kind: "raw".into(), text: cut(line), data: Value::String(line.to_owned()) },
    }
}

/// How much of a line cut at [`backend_core::MAX_LINE_BYTES`] its entry keeps.
pub const TRUNCATED_HEAD_BYTES: usize = 4096;

/// The entry of a line longer than [`backend_core::MAX_LINE_BYTES`], which the decoder
/// cut there: kind `truncated`, and in `data` the limit and the line's first
/// [`TRUNCATED_HEAD_BYTES`] bytes; the rest of the line is dropped (a cut JSON line is no
/// JSON, and the whole line is never buffered).
pub(crate) fn truncated_line(line: &str, stderr: bool) -> Parsed {
    let head = cut_to(line, TRUNCATED_HEAD_BYTES);
    let limit = backend_core::MAX_LINE_BYTES;
    Parsed {
        kind: "truncated".into(),
        text: format!(
            "[the agent wrote a line longer than {} MiB on {}; it was dropped, its first {TRUNCATED_HEAD_BYTES} bytes are in data.head]",
            limit / (1024 * 1024),
            if stderr { "stderr" } else { "stdout" },
        ),
        data: json!({
            "type": "truncated",
            "stream": if stderr { "stderr" } else { "stdout" },
            "limit_bytes": limit,
            "head": head,
        }),
    }
}

/// The short text of a stream-json line: an assistant's text blocks, a result's result,
/// a user message's text (or its tool results), a control message's subject.
fn human_text(kind: &str, data: &Value) -> String {
    match kind {
        "assistant" => {
            let content = &data["message"]["content"];
            let mut parts: Vec<String> = Vec::new();
            for block in content.as_array().into_iter().flatten() {
                match block["type"].as_str() {
                    Some("text") => parts.extend(block["text"].as_str().map(str::to_owned)),
                    Some("tool_use") => parts.push(format!(
                        "[tool_use {}: {}]",
                        block["name"].as_str().unwrap_or("?"),
                        cut_to(&block["input"].to_string(), 200)
                    )),
                    _ => {}
                }
            }
            parts.join("")
        }
        "result" => data["result"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| format!("{} ({})", data["subtype"].as_str().unwrap_or("result"), error_text(data))),
        "user" => user_text(&data["message"]["content"]),
        "system" => data["subtype"].as_str().unwrap_or("system").to_owned(),
        // Claude Code's acknowledgment of a user message: queued, started, completed…
        "command_lifecycle" => data["state"].as_str().unwrap_or("command_lifecycle").to_owned(),
        "control_request" => {
            let request = &data["request"];
            match request["subtype"].as_str() {
                Some("can_use_tool") => format!(
                    "can_use_tool {}: {}",
                    request["tool_name"].as_str().unwrap_or("?"),
                    cut_to(&request["input"].to_string(), 200)
                ),
                Some(subtype) => subtype.to_owned(),
                None => "control_request".to_owned(),
            }
        }
        "control_response" => {
            let response = &data["response"];
            match response["response"]["behavior"].as_str() {
                Some(behavior) => behavior.to_owned(),
                None => response["subtype"].as_str().unwrap_or("control_response").to_owned(),
            }
        }
        other => other.to_owned(),
    }
}

fn error_text(data: &Value) -> String {
    match &data["errors"] {
        Value::Array(errors) if !errors.is_empty() => errors
            .iter()
            .map(|e| e.as_str().map(str::to_owned).unwrap_or_else(|| e.to_string()))
            .collect::<Vec<_>>()
            .join("; "),
        _ => if data["is_error"].as_bool() == Some(true) { "error" } else { "ok" }.to_owned(),
    }
}

/// The text of a user message's content: a string, or text blocks and tool results.
fn user_text(content: &Value) -> String {
    if let Some(text) = content.as_str() {
        return text.to_owned();
    }
    let mut parts = Vec::new();
    for block in content.as_array().into_iter().flatten() {
        match block["type"].as_str() {
            Some("text") => parts.extend(block["text"].as_str().map(str::to_owned)),
            Some("tool_result") => parts.push(format!("[tool_result: {}]", user_text(&block["content"]))),
            _ => {}
        }
    }
    parts.join("")
}

pub(crate) fn cut(text: &str) -> String {
    cut_to(text, MAX_ENTRY_TEXT)
}

fn cut_to(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// A user message in stream-json. Its `uuid` makes Claude Code acknowledge it with
/// `command_lifecycle` lines (`queued`, `started`, `completed` or `cancelled`).
pub(crate) fn user_message(text: &str) -> Value {
    json!({
        "type": "user",
        "message": {"role": "user", "content": text},
        "parent_tool_use_id": null,
        "session_id": "",
        "uuid": uuid::Uuid::new_v4().to_string(),
    })
}

/// The `initialize` handshake the Agent SDKs send first.
pub(crate) fn initialize_request(request_id: &str) -> Value {
    json!({"type": "control_request", "request_id": request_id, "request": {"subtype": "initialize"}})
}

/// The `interrupt` control request: ends the current turn.
pub(crate) fn interrupt_request(request_id: &str) -> Value {
    json!({"type": "control_request", "request_id": request_id, "request": {"subtype": "interrupt"}})
}

/// Applies what a line the agent wrote says about the session. Returns whether the
/// record changed.
pub(crate) fn apply_from_agent(record: &mut SessionRecord, parsed: &Parsed, at: OffsetDateTime) -> bool {
    let data = &parsed.data;
    match parsed.kind.as_str() {
        "system" if data["subtype"] == "init" => {
            // The CLI began the session: its files exist from here on.
            let mut changed = !record.started;
            record.started = true;
            if let Some(id) = data["session_id"].as_str().filter(|id| *id != record.session_id && !id.is_empty()) {
                record.session_id = id.to_owned();
                changed = true;
            }
            changed
        }
        "assistant" | "user" | "stream_event" if record.turn == Turn::Idle => {
            record.turn = Turn::Busy;
            true
        }
        "control_request" if data["request"]["subtype"] == "can_use_tool" => {
            record.turn = Turn::AwaitingApproval;
            true
        }
        "result" => {
            record.turn = Turn::Idle;
            record.results += 1;
            if let Some(cost) = data["total_cost_usd"].as_f64() {
                // Cumulative for the process: the latest is this run's total.
                record.run_cost_usd = cost;
            }
            let usage = &data["usage"];
            let tokens = |key: &str| usage[key].as_u64().unwrap_or(0);
            record.input_tokens += tokens("input_tokens");
            record.output_tokens += tokens("output_tokens");
            record.last_result = Some(LastResult {
                subtype: data["subtype"].as_str().unwrap_or("unknown").to_owned(),
                is_error: data["is_error"].as_bool().unwrap_or(false),
                text: parsed.text.clone(),
                at,
            });
            true
        }
        _ => false,
    }
}

/// Applies what a line agentd wrote to the agent says about the session.
pub(crate) fn apply_to_agent(record: &mut SessionRecord, kind: &str, data: &Value) -> bool {
    match kind {
        "user" => {
            record.turn = Turn::Busy;
            true
        }
        // An answered permission prompt lets the turn go on.
        "control_response" if data["response"]["response"]["behavior"].is_string() => {
            record.turn = Turn::Busy;
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_cut_line_becomes_a_marker_entry_with_its_head() {
        let line = format!("{{\"type\":\"user\",\"pad\":\"{}", "é".repeat(5000));
        let parsed = truncated_line(&line, false);
        assert_eq!(parsed.kind, "truncated");
        assert_eq!(parsed.data["limit_bytes"], backend_core::MAX_LINE_BYTES);
        assert_eq!(parsed.data["stream"], "stdout");
        let head = parsed.data["head"].as_str().expect("head");
        assert!(head.len() <= TRUNCATED_HEAD_BYTES + '…'.len_utf8() && head.starts_with("{\"type\":\"user\""));
        assert!(parsed.text.contains("longer than 8 MiB"), "{}", parsed.text);
    }

    use super::*;

    #[test]
    fn lines_are_classified_with_a_short_text() {
        let assistant =
            r#"{"type":"assistant","message":{"content":[{"type":"text","text":"Hel"},{"type":"text","text":"lo"}]}}"#;
        let p = parse_line(assistant, false);
        assert_eq!((p.kind.as_str(), p.text.as_str()), ("assistant", "Hello"));
        let result = r#"{"type":"result","subtype":"success","is_error":false,"result":"done","total_cost_usd":0.5}"#;
        assert_eq!(parse_line(result, false).text, "done");
        let raw = parse_line("not json ✓", false);
        assert_eq!((raw.kind.as_str(), raw.data.as_str()), ("raw", Some("not json ✓")));
        assert_eq!(parse_line("[1,2]", false).kind, "raw");
        assert_eq!(parse_line("oops", true).kind, "stderr");
        let long = "é".repeat(MAX_ENTRY_TEXT);
        let cut = parse_line(&long, false).text;
        assert!(cut.len() <= MAX_ENTRY_TEXT + "…".len() && cut.ends_with('…'));
    }

    #[test]
    fn results_end_the_turn_and_add_up_tokens() {
        let mut record = SessionRecord::new("a");
        assert!(apply_to_agent(&mut record, "user", &user_message("hi")));
        assert_eq!(record.turn, Turn::Busy);
        let ask = parse_line(
            r#"{"type":"control_request","request_id":"r","request":{"subtype":"can_use_tool","tool_name":"Bash","input":{}}}"#,
            false,
        );
        apply_from_agent(&mut record, &ask, OffsetDateTime::UNIX_EPOCH);
        assert_eq!(record.turn, Turn::AwaitingApproval);
        for cost in [0.25, 0.75] {
            let line = format!(
                r#"{{"type":"result","subtype":"success","is_error":false,"result":"ok","total_cost_usd":{cost},"usage":{{"input_tokens":10,"output_tokens":5}}}}"#
            );
            apply_from_agent(&mut record, &parse_line(&line, false), OffsetDateTime::UNIX_EPOCH);
        }
        assert_eq!(record.turn, Turn::Idle);
        assert_eq!((record.input_tokens, record.output_tokens, record.results), (20, 10, 2));
        assert_eq!(record.cost_usd(), 0.75);
        assert_eq!(record.last_result.as_ref().map(|r| r.text.as_str()), Some("ok"));
    }
}
