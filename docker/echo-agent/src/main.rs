//! The echo agent: a stand-in for Claude Code in agentd's tests and quickstart.
//!
//! It runs as a container's main process and does what its environment says (see
//! README.md): connect to the daemon's agent channel and echo every user message, exit
//! with a code after a time, allocate memory, ignore SIGTERM, turn unhealthy. `--health`
//! is its container health check; `--version` prints its version.
#![allow(unsafe_code)] // signal handlers need libc

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

static TERMINATE: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigterm(_: libc::c_int) {
    TERMINATE.store(true, Ordering::SeqCst);
}

fn env_u64(key: &str) -> Option<u64> {
    std::env::var(key).ok().and_then(|v| v.trim().parse().ok())
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn main() {
    let arg = std::env::args().nth(1);
    match arg.as_deref() {
        Some("--version") => {
            say(concat!("echo-agent ", env!("CARGO_PKG_VERSION")));
        }
        Some("--health") => std::process::exit(health()),
        Some(other) if other.starts_with("--") => {
            eprintln!("echo-agent: unknown option {other}; use --version or --health");
            std::process::exit(2);
        }
        _ => run(),
    }
}

/// The health check: healthy while PID 1 (the agent) has run for less than
/// `ECHO_UNHEALTHY_AFTER_MS`, or always when that is unset. Exit 0 healthy, 1 not.
fn health() -> i32 {
    let Some(limit_ms) = env_u64("ECHO_UNHEALTHY_AFTER_MS") else {
        return 0;
    };
    match agent_age() {
        Some(age) if age.as_millis() < u128::from(limit_ms) => 0,
        Some(age) => {
            say(&format!("unhealthy: running for {} ms, limit {limit_ms} ms", age.as_millis()));
            1
        }
        None => {
            say("unhealthy: cannot read the agent's start time");
            1
        }
    }
}

/// How long PID 1 has been running, from /proc.
fn agent_age() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/1/stat").ok()?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')')? + 2..];
    let start_ticks: u64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    let uptime: f64 = std::fs::read_to_string("/proc/uptime").ok()?.split_whitespace().next()?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks_per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let age = uptime - start_ticks as f64 / ticks_per_sec;
    Some(Duration::from_secs_f64(age.max(0.0)))
}

fn run() {
    let ignore_sigterm = std::env::var("ECHO_IGNORE_SIGTERM").is_ok_and(|v| v == "1");
    // SAFETY: installing a handler that only stores to an atomic, or ignoring the signal.
    unsafe {
        let handler =
            if ignore_sigterm { libc::SIG_IGN } else { on_sigterm as extern "C" fn(libc::c_int) as libc::sighandler_t };
        libc::signal(libc::SIGTERM, handler);
        libc::signal(libc::SIGINT, handler);
    }
    say("echo-agent started");

    let _memory = env_u64("ECHO_ALLOC_MB").map(|mb| {
        let bytes = (mb as usize) * 1024 * 1024;
        say(&format!("allocating {mb} MB"));
        let mut block = vec![0u8; bytes];
        for i in (0..bytes).step_by(4096) {
            block[i] = 1;
        }
        say(&format!("allocated {mb} MB"));
        std::hint::black_box(block)
    });

    if let Some(port) = env_u64("ECHO_LISTEN_PORT") {
        std::thread::spawn(move || listen(port));
    }

    if let Ok(url) = std::env::var("AGENTD_WS_URL") {
        let token = std::env::var("AGENTD_AGENT_TOKEN").unwrap_or_default();
        std::thread::spawn(move || channel_loop(&url, &token));
    }

    let exit_at = env_u64("ECHO_EXIT_AFTER_MS").map(|ms| Instant::now() + Duration::from_millis(ms));
    let exit_code = env_u64("ECHO_EXIT_CODE").unwrap_or(0) as i32;
    loop {
        if TERMINATE.load(Ordering::SeqCst) {
            say("echo-agent received SIGTERM; exiting 0");
            std::process::exit(0);
        }
        if exit_at.is_some_and(|at| Instant::now() >= at) {
            say(&format!("echo-agent exiting with code {exit_code}"));
            std::process::exit(exit_code);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Accepts TCP connections on `port` and logs each (network tests use it as a target).
fn listen(port: u64) {
    let Ok(port) = u16::try_from(port) else {
        say(&format!("ECHO_LISTEN_PORT {port} is not a port"));
        return;
    };
    match std::net::TcpListener::bind(("0.0.0.0", port)) {
        Ok(listener) => {
            say(&format!("listening on port {port}"));
            for stream in listener.incoming().flatten() {
                let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                say(&format!("accepted connection from {peer}"));
            }
        }
        Err(e) => say(&format!("cannot listen on port {port}: {e}")),
    }
}

/// Keeps a connection to the agent channel, reconnecting with backoff.
fn channel_loop(url: &str, token: &str) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match connect(url, token) {
            Ok(mut socket) => {
                say(&format!("connected to {url}"));
                backoff = Duration::from_millis(200);
                if let Err(e) = echo(&mut socket) {
                    say(&format!("channel closed: {e}"));
                }
            }
            Err(e) => say(&format!("cannot connect to {url}: {e}")),
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

fn connect(url: &str, token: &str) -> Result<WebSocket<TcpStream>, String> {
    let mut request = url.into_client_request().map_err(|e| e.to_string())?;
    let bearer = format!("Bearer {token}").parse().map_err(|_| "token is not a valid header value".to_owned())?;
    request.headers_mut().insert("authorization", bearer);
    let uri = request.uri();
    let host = uri.host().ok_or("URL has no host")?.trim_matches(['[', ']']).to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let address = std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
        .map_err(|e| e.to_string())?
        .next()
        .ok_or("the host name resolves to no address")?;
    // A network that drops packets silently must not stall the agent for minutes.
    let stream = TcpStream::connect_timeout(&address, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    stream.set_read_timeout(None).map_err(|e| e.to_string())?;
    let (socket, _) = tungstenite::client(request, stream).map_err(|e| e.to_string())?;
    Ok(socket)
}

/// Echoes every user message back as an assistant message until the socket closes.
fn echo(socket: &mut WebSocket<TcpStream>) -> Result<(), tungstenite::Error> {
    loop {
        let text = match socket.read()? {
            Message::Text(text) => text.to_string(),
            Message::Close(_) => return Ok(()),
            _ => continue,
        };
        let content = user_text(&text).unwrap_or(text);
        say(&format!("received: {content}"));
        let reply = serde_json::json!({
            "type": "assistant",
            "message": {"role": "assistant", "content": [{"type": "text", "text": format!("echo: {content}")}]},
        });
        socket.send(Message::text(reply.to_string()))?;
    }
}

/// The text of a stream-json user message, `{"type":"user","message":{"content":...}}`,
/// whose content is a string or a list of text blocks.
fn user_text(frame: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(frame).ok()?;
    if value.get("type")?.as_str()? != "user" {
        return None;
    }
    let content = value.get("message")?.get("content")?;
    if let Some(text) = content.as_str() {
        return Some(text.to_owned());
    }
    let parts: Vec<&str> = content.as_array()?.iter().filter_map(|b| b.get("text")?.as_str()).collect();
    Some(parts.join(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_messages_are_read_in_both_content_forms() {
        assert_eq!(user_text(r#"{"type":"user","message":{"role":"user","content":"hi"}}"#).as_deref(), Some("hi"));
        assert_eq!(
            user_text(
                r#"{"type":"user","message":{"content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}}"#
            )
            .as_deref(),
            Some("ab")
        );
        assert_eq!(user_text(r#"{"type":"system"}"#), None);
        assert_eq!(user_text("plain"), None);
    }

    #[test]
    fn this_process_has_a_readable_age() {
        // In tests PID 1 is the host's init, which is older than zero.
        assert!(agent_age().is_some());
    }
}
