//! The echo agent: a stand-in for Claude Code in agentd's tests and quickstart.
//!
//! It runs as a container's main process and does what its environment says (see
//! README.md): exit with a code after a time, allocate memory, ignore SIGTERM, turn
//! unhealthy. In stdio mode (`ECHO_STDIO=1`, or arguments that contain
//! `--input-format stream-json`, as agentd runs `claude`) it also speaks Claude Code's
//! stream-json protocol on stdin and stdout ([`session`]). `--health` is its container
//! health check; `--version` prints its version.
#![allow(unsafe_code)] // signal handlers need libc

mod flood;
mod session;

use std::io::{BufRead, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use session::{Session, Step};

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
    let args: Vec<String> = std::env::args().skip(1).collect();
    let stdio = session::stdio_requested(&args, std::env::var("ECHO_STDIO").ok().as_deref());
    match args.first().map(String::as_str) {
        Some("--version") => {
            say(concat!("echo-agent ", env!("CARGO_PKG_VERSION")));
        }
        Some("--health") => std::process::exit(health()),
        Some("flood") => std::process::exit(flood::main(&args[1..])),
        Some(other) if other.starts_with("--") && !stdio => {
            eprintln!("echo-agent: unknown option {other}; use --version or --health");
            std::process::exit(2);
        }
        _ => run(stdio.then(|| session::session_id(&args))),
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

/// Runs until signalled or `ECHO_EXIT_AFTER_MS`; with `stdio` (the session id), also
/// answers stream-json on stdin until its EOF.
fn run(stdio: Option<String>) {
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

    if let Ok(target) = std::env::var("ECHO_CONNECT_TO") {
        std::thread::spawn(move || connect_loop(&target));
    }

    if let Some(session_id) = stdio {
        std::thread::spawn(move || stdio_loop(Session::new(session_id)));
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

/// Tries to open a TCP connection to `target` (`HOST:PORT`) every 500 ms, logging each
/// outcome (network tests use it as a client); attempts time out after 5 s, so a network
/// that drops packets silently is reported too.
fn connect_loop(target: &str) {
    loop {
        let outcome = std::net::ToSocketAddrs::to_socket_addrs(target)
            .map_err(|e| e.to_string())
            .and_then(|mut addrs| addrs.next().ok_or_else(|| "the name resolves to no address".to_owned()))
            .and_then(|addr| {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())
            });
        match outcome {
            Ok(_) => say(&format!("connected to {target}")),
            Err(e) => say(&format!("cannot connect to {target}: {e}")),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Reads stdin line by line (any length) and answers every line; exits 0 at EOF.
fn stdio_loop(mut session: Session) {
    let mut stdin = std::io::stdin().lock();
    let mut line = Vec::new();
    loop {
        line.clear();
        match stdin.read_until(b'\n', &mut line) {
            Ok(0) => {
                say("echo-agent stdin closed; exiting 0");
                std::process::exit(0);
            }
            Ok(_) => {}
            Err(e) => {
                say(&format!("echo-agent cannot read stdin: {e}; exiting 1"));
                std::process::exit(1);
            }
        }
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        for step in session.handle(&String::from_utf8_lossy(&line)) {
            match step {
                Step::Stdout(text) => say(&text),
                Step::Stderr(text) => {
                    let mut err = std::io::stderr().lock();
                    let _ = writeln!(err, "{text}");
                    let _ = err.flush();
                }
                Step::Big { n, bytes } => big_line(n, bytes),
                Step::Sleep(pause) => std::thread::sleep(pause),
                Step::Exit(code) => std::process::exit(code),
            }
        }
    }
}

/// Writes `{"type":"big","n":N,"pad":"xxx…"}` of exactly `bytes` bytes and a newline to
/// stdout, in 64 KiB pieces (never held whole).
fn big_line(n: u64, bytes: usize) {
    let head = format!(r#"{{"type":"big","n":{n},"pad":""#);
    let tail = "\"}";
    let mut pad = bytes.saturating_sub(head.len() + tail.len());
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(head.as_bytes());
    let chunk = [b'x'; 64 * 1024];
    while pad > 0 {
        let k = pad.min(chunk.len());
        if out.write_all(&chunk[..k]).is_err() {
            return;
        }
        pad -= k;
    }
    let _ = out.write_all(tail.as_bytes());
    let _ = out.write_all(b"\n");
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_a_readable_age() {
        // In tests PID 1 is the host's init, which is older than zero.
        assert!(agent_age().is_some());
    }
}
