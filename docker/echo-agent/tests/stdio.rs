//! The echo agent's stdio mode as a process, run the way agentd runs `claude`.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

const SID: &str = "0b7c2a4e-1d3f-4a5b-8c6d-7e8f9a0b1c2d";

fn user(text: &str) -> String {
    serde_json::json!({"type": "user", "message": {"role": "user", "content": text}, "parent_tool_use_id": null, "session_id": ""})
        .to_string()
}

#[test]
fn claudes_command_line_speaks_stream_json_until_stdin_closes() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_echo-agent"))
        .args(["claude", "-p", "--input-format", "stream-json", "--output-format", "stream-json", "--verbose"])
        .args(["--permission-prompt-tool", "stdio", "--session-id", SID])
        .env_remove("ECHO_STDIO")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the echo agent");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut next = || {
        let mut line = String::new();
        stdout.read_line(&mut line).expect("read stdout");
        assert!(line.ends_with('\n'), "stdout ended early: {line:?}");
        line.pop();
        line
    };
    assert_eq!(next(), "echo-agent started");

    let big: String = (0..5 * 1024 * 1024).map(|i| char::from(b'a' + (i % 26) as u8)).collect();
    writeln!(stdin, "{}", user(&big)).expect("write 5 MB");
    writeln!(stdin, "{}", user("!emit 10000")).expect("write");
    writeln!(stdin, "{}", user("!stderr to stderr")).expect("write");
    stdin.flush().expect("flush");

    let init: serde_json::Value = serde_json::from_str(&next()).expect("init is JSON");
    assert_eq!((init["subtype"].as_str(), init["session_id"].as_str()), (Some("init"), Some(SID)));
    let assistant: serde_json::Value = serde_json::from_str(&next()).expect("assistant is JSON");
    assert_eq!(assistant["message"]["content"][0]["text"].as_str().map(str::len), Some(big.len() + "echo: ".len()));
    let result: serde_json::Value = serde_json::from_str(&next()).expect("result is JSON");
    assert_eq!(result["total_cost_usd"], 0.001);

    assert!(next().contains("\"init\""));
    for i in 0..10_000 {
        assert_eq!(next(), format!("line {i}"));
    }
    assert_eq!(next(), "emitted 10000");
    assert!(next().contains("\"result\""));
    assert!(next().contains("\"init\""));
    assert!(next().contains("\"total_cost_usd\":0.003"));

    drop(stdin);
    assert_eq!(next(), "echo-agent stdin closed; exiting 0");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(0), "EOF on stdin exits 0");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr).expect("read stderr");
    assert_eq!(stderr, "to stderr\n");
}

#[test]
fn exit_ends_the_process_with_the_code() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_echo-agent"))
        .env("ECHO_STDIO", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the echo agent");
    let mut stdin = child.stdin.take().expect("stdin");
    writeln!(stdin, "not json").expect("write");
    writeln!(stdin, "{}", user("!exit 3")).expect("write");
    let output = child.wait_with_output().expect("wait");
    assert_eq!(output.status.code(), Some(3));
    let text = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "echo-agent started");
    assert_eq!(lines[1], r#"{"type":"system","subtype":"echo_error","error":"input is not JSON"}"#);
    assert!(lines[2].contains("\"init\"") && lines[2].contains("00000000-0000-4000-8000-000000000000"), "{lines:?}");
    assert_eq!(lines.len(), 3, "{lines:?}");
}
