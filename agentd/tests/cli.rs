//! The binary as a user and a service manager meet it (issue J, items 10, 11, 13, 16 and
//! 22): completion scripts and the man page, the client flags kept off the local verbs,
//! `version`, systemd readiness, SIGHUP, `events`, progress, and the restart wait as
//! `events` tells it. A daemon here is `agentd serve` on the mock backend (an engine adds
//! nothing to these).

#![allow(unsafe_code)] // kill(2) to send SIGHUP and SIGTERM to the daemon

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use serde_json::Value;

fn agentd() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_agentd"));
    for (key, _) in std::env::vars() {
        if key.starts_with("AGENTD_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("XDG_CONFIG_HOME", std::env::temp_dir().join("agentd-cli-test-no-config"))
        .env_remove("RUST_LOG")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null());
    cmd
}

fn run(args: &[&str]) -> Output {
    agentd().args(args).output().unwrap_or_else(|e| panic!("agentd {args:?}: {e}"))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port()
}

/// The status line of `GET /healthz`, or None when nothing answers.
fn health_status(port: u16) -> Option<String> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.lines().next().map(str::to_owned)
}

/// Lines a child writes to a pipe, as they come.
fn lines_of(pipe: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits for a line holding `needle`; returns every line read meanwhile.
fn wait_line(lines: &Receiver<String>, needle: &str, within: Duration, seen: &mut Vec<String>) -> String {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) => {
                seen.push(line.clone());
                if line.contains(needle) {
                    return line;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("no line with {needle:?} within {within:?}; read:\n{}", seen.join("\n"))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!(
                    "the output ended (the process exited?) without a line with {needle:?}; read:\n{}",
                    seen.join("\n")
                )
            }
        }
    }
}

/// `agentd serve` on the mock backend with its own data directory; killed on drop.
struct Daemon {
    child: Child,
    port: u16,
    dir: PathBuf,
    log: Receiver<String>,
    logged: Vec<String>,
}

impl Daemon {
    fn start(name: &str, env: &[(&str, &str)]) -> Self {
        let dir = std::env::temp_dir().join(format!("agentd-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let port = free_port();
        let mut child = agentd()
            .arg("serve")
            .env("XDG_DATA_HOME", dir.join("data"))
            .env("AGENTD_BACKEND", "mock")
            .env("AGENTD_SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .env("AGENTD_LOG__FORMAT", "json")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start agentd serve");
        let log = lines_of(child.stderr.take().expect("stderr"));
        let mut daemon = Self { child, port, dir, log, logged: Vec::new() };
        let deadline = Instant::now() + Duration::from_secs(30);
        while health_status(port).is_none_or(|s| !s.contains(" 200 ")) {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                daemon.logged.extend(daemon.log.try_iter());
                panic!("agentd serve exited with {status}:\n{}", daemon.logged.join("\n"));
            }
            assert!(Instant::now() < deadline, "agentd serve did not answer /healthz with 200 within 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        daemon
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A client command against this daemon.
    fn cli(&self, args: &[&str]) -> Command {
        let mut cmd = agentd();
        cmd.args(args).env("AGENTD_URL", self.url());
        cmd
    }

    /// Runs a client command that must succeed; its stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args).output().expect("run agentd");
        assert!(out.status.success(), "agentd {args:?} failed: {}", text(&out.stderr));
        text(&out.stdout)
    }

    /// Waits for a log line holding `needle`.
    fn wait_log(&mut self, needle: &str) -> String {
        wait_line(&self.log, needle, Duration::from_secs(30), &mut self.logged)
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "kill {signal}");
    }

    /// Waits for the daemon to exit; its status.
    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "agentd serve did not exit within {within:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---- Item 13: discoverability ----

#[test]
fn completion_scripts_and_the_man_page_are_printed() {
    for shell in ["bash", "zsh", "fish"] {
        let out = run(&["completion", shell]);
        assert!(out.status.success(), "completion {shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        for word in ["spawn", "inspect", "follow", "completion"] {
            assert!(script.contains(word), "the {shell} script lacks {word:?}");
        }
    }
    // The client flags are completed on client verbs only.
    let fish = text(&run(&["completion", "fish"]).stdout);
    let url_on = |verb: &str| {
        fish.lines().any(|l| l.contains(&format!("__fish_agentd_using_subcommand {verb}\"")) && l.contains("-l url"))
    };
    assert!(url_on("ls"), "fish does not complete ls --url:\n{fish}");
    for verb in ["serve", "config", "man", "completion"] {
        assert!(!url_on(verb), "fish completes {verb} --url");
    }
    let out = run(&["completion", "tcsh"]);
    assert_eq!(out.status.code(), Some(2), "an unknown shell is a usage error");
    assert!(text(&out.stderr).contains("bash"), "the error lists the shells: {}", text(&out.stderr));

    let out = run(&["man"]);
    assert!(out.status.success(), "man: {}", text(&out.stderr));
    let page = text(&out.stdout);
    assert!(page.contains(".TH agentd 1"), "not a section 1 roff page:\n{page}");
    for word in ["SUBCOMMANDS", "spawn", "events", "version"] {
        assert!(page.contains(word), "the man page lacks {word:?}");
    }
    let out = run(&["man", "spawn"]);
    assert!(out.status.success(), "man spawn: {}", text(&out.stderr));
    let page = text(&out.stdout);
    assert!(page.contains(".TH agentd-spawn 1"), "not agentd-spawn(1):\n{page}");
    for flag in ["memory\\-mb", "egress\\-allow", "url"] {
        assert!(page.contains(&format!("\\fB\\-\\-{flag}\\fR")), "agentd-spawn(1) lacks --{flag}:\n{page}");
    }
    let out = run(&["man", "serve"]);
    assert!(!text(&out.stdout).contains("\\-\\-url"), "agentd-serve(1) names --url");
    let out = run(&["man", "nonsense"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("no such verb; one of: serve"), "{}", text(&out.stderr));
}

#[test]
fn serve_and_config_take_no_client_flags() {
    for args in [
        &["serve", "--url", "http://127.0.0.1:9"][..],
        &["--url", "http://127.0.0.1:9", "serve"],
        &["config", "check", "--token", "t"],
        &["config", "--url", "http://127.0.0.1:9", "show"],
    ] {
        let out = run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out.stderr));
        assert!(text(&out.stderr).contains("does not talk to a daemon"), "{args:?}: {}", text(&out.stderr));
    }
    for args in [&["serve", "--help"][..], &["config", "check", "--help"], &["config", "--help"]] {
        let help = text(&run(args).stdout);
        assert!(!help.contains("--url") && !help.contains("--token"), "{args:?} offers client flags:\n{help}");
        assert!(help.contains("--config"), "{args:?} does not offer --config:\n{help}");
    }
    let help = text(&run(&["ls", "--help"]).stdout);
    assert!(help.contains("--url") && help.contains("--token") && help.contains("[default:"), "{help}");
    // The daemon's environment may name the API for the clients it runs: serve ignores it.
    let out = agentd().args(["config", "check"]).env("AGENTD_URL", "http://127.0.0.1:9").output().expect("run");
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn version_prints_the_client_and_the_server_or_says_it_cannot_ask() {
    let daemon = Daemon::start("version", &[]);
    let out = daemon.ok(&["version"]);
    let version = env!("CARGO_PKG_VERSION");
    assert!(out.contains(&format!("client: agentd {version}")), "{out}");
    assert!(out.contains(&format!("server: agentd {version} (mock backend, {})", daemon.url())), "{out}");

    let out = agentd().args(["version", "--url", "http://127.0.0.1:9"]).output().expect("run");
    assert_eq!(out.status.code(), Some(1), "an unreachable daemon is exit 1");
    assert!(text(&out.stdout).contains(&format!("client: agentd {version}")), "{}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(err.contains("cannot ask the daemon at http://127.0.0.1:9") && err.contains("not running"), "{err}");
}

// ---- Item 16: running as a service ----

#[test]
fn sighup_is_logged_and_ignored() {
    let mut daemon = Daemon::start("sighup", &[]);
    daemon.signal(libc::SIGHUP);
    let line = daemon.wait_log("SIGHUP");
    assert!(line.contains("ignored"), "{line}");
    assert!(daemon.child.try_wait().expect("try_wait").is_none(), "SIGHUP ended the daemon");
    assert!(health_status(daemon.port).is_some_and(|s| s.contains(" 200 ")), "not serving after SIGHUP");
    // A second one too.
    daemon.signal(libc::SIGHUP);
    daemon.ok(&["ls"]);
    assert!(daemon.child.try_wait().expect("try_wait").is_none(), "a second SIGHUP ended the daemon");
}

#[test]
fn systemd_is_told_ready_once_the_api_serves_and_stopping_at_shutdown() {
    let dir = std::env::temp_dir().join(format!("agentd-cli-notify-socket-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
    socket.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let notify = path.to_str().expect("utf-8 path");
    let mut daemon = Daemon::start("notify", &[("NOTIFY_SOCKET", notify)]);
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf).expect("READY=1 within 30 s");
    let message = text(&buf[..n]);
    assert!(message.lines().any(|l| l == "READY=1"), "{message:?}");
    daemon.signal(libc::SIGTERM);
    let n = socket.recv(&mut buf).expect("STOPPING=1 within 30 s");
    let message = text(&buf[..n]);
    assert!(message.lines().any(|l| l == "STOPPING=1"), "{message:?}");
    assert!(daemon.wait_exit(Duration::from_secs(30)).success());
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- Item 10: events ----

fn spawn(daemon: &Daemon, name: &str, extra: &[&str]) {
    let mut args = vec!["spawn", name, "--kind", "image", "--image", "agentd-echo:latest"];
    args.extend_from_slice(extra);
    daemon.ok(&args);
}

#[test]
fn events_prints_past_ones_only_when_asked() {
    let daemon = Daemon::start("events-past", &[]);
    spawn(&daemon, "old-one", &[]);
    spawn(&daemon, "old-two", &[]);

    let all = daemon.ok(&["events", "--since", "0"]);
    let lines: Vec<&str> = all.lines().collect();
    assert!(lines[0].starts_with("TIME ") && lines[0].contains("AGENT") && lines[0].contains("DETAIL"), "{all}");
    assert!(all.contains("old-one") && all.contains("old-two"), "{all}");
    // Fixed-width times: every line's agent column starts where the header's does.
    let agent_at = lines[0].find("AGENT").expect("AGENT");
    for line in &lines[1..] {
        assert!(line[agent_at..].starts_with("old-"), "misaligned:\n{all}");
    }

    let tail = daemon.ok(&["events", "--tail", "1"]);
    assert_eq!(tail.lines().count(), 2, "a header and one event:\n{tail}");
    assert_eq!(tail.lines().last(), lines.last().copied(), "the last event:\n{tail}\n{all}");

    let json = daemon.ok(&["events", "--since", "10m", "--json", "--agent", "old-one"]);
    let events: Vec<Value> = json.lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    assert!(!events.is_empty() && events.iter().all(|e| e["agent"] == "old-one"), "{json}");
    assert!(events.iter().any(|e| e["kind"] == "spawned"), "{json}");

    // The output flags every listing verb takes (issue J, item 8).
    let json_o = daemon.ok(&["events", "--since", "10m", "-o", "json", "--agent", "old-one"]);
    assert_eq!(json_o, json, "-o json is --json");
    let names = daemon.ok(&["events", "--since", "0", "-o", "name"]);
    let ids: Vec<i64> = events.iter().filter_map(|e| e["id"].as_i64()).collect();
    assert!(ids.iter().all(|id| names.lines().any(|l| l == id.to_string())), "-o name prints ids:\n{names}");
    assert!(!names.contains("TIME"), "-o name has no header:\n{names}");
    let wide = daemon.ok(&["events", "--since", "0", "-o", "wide"]);
    assert!(wide.lines().next().is_some_and(|h| h.trim_start().starts_with("ID ")), "{wide}");
    let template = daemon.ok(&["events", "--since", "0", "--agent", "old-two", "--format", "{{.kind}}/{{.agent}}"]);
    assert!(template.lines().any(|l| l == "spawned/old-two"), "{template}");
    let both = daemon.cli(&["events", "--since", "0", "--json", "-o", "wide"]).output().expect("run");
    assert_eq!(both.status.code(), Some(2), "--json with -o: {}", text(&both.stderr));

    let future = daemon.ok(&["events", "--since", "2999-01-01T00:00:00Z"]);
    assert_eq!(future.lines().count(), 1, "only the header:\n{future}");

    let out = daemon.cli(&["events", "--since", "yesterday"]).output().expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("RFC 3339"), "{}", text(&out.stderr));
}

#[test]
fn events_follows_only_new_ones_and_fails_when_the_daemon_goes_away() {
    let mut daemon = Daemon::start("events-follow", &[]);
    spawn(&daemon, "before", &[]);
    for args in [&["events"][..], &["events", "-f", "--tail", "1"]] {
        let mut child = daemon.cli(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("events");
        let out = lines_of(child.stdout.take().expect("stdout"));
        let err = lines_of(child.stderr.take().expect("stderr"));
        let mut seen_err = Vec::new();
        wait_line(&err, "following new events", Duration::from_secs(30), &mut seen_err);
        let name = if args.len() == 1 { "after" } else { "later" };
        spawn(&daemon, name, &[]);
        let mut seen = Vec::new();
        wait_line(&out, name, Duration::from_secs(30), &mut seen);
        // The header, the past events asked for (none, or the last one), the new one.
        assert!(seen[0].starts_with("TIME "), "no header:\n{}", seen.join("\n"));
        let past = seen.len() - 2;
        assert_eq!(past, usize::from(args.len() > 1), "{args:?} printed past events:\n{}", seen.join("\n"));
        if args.len() > 1 {
            daemon.child.kill().expect("kill the daemon");
            let deadline = Instant::now() + Duration::from_secs(20);
            let status = loop {
                if let Some(status) = child.try_wait().expect("try_wait") {
                    break status;
                }
                assert!(Instant::now() < deadline, "events -f did not end within 20 s of the daemon's death");
                std::thread::sleep(Duration::from_millis(50));
            };
            assert_eq!(status.code(), Some(1), "events -f after the daemon died");
            seen_err.extend(err.iter());
            let said = seen_err.join("\n");
            assert!(said.contains("went away"), "{said}");
        } else {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---- Item 11: progress ----

#[test]
fn stop_restart_and_rm_print_no_progress_without_a_terminal() {
    let daemon = Daemon::start("progress", &[]);
    spawn(&daemon, "quiet", &[]);
    for (args, said) in [
        (&["restart", "quiet"][..], "quiet running"),
        (&["stop", "-t", "1", "quiet"], "quiet stopped"),
        (&["rm", "quiet"], "quiet removed"),
    ] {
        let out = daemon.cli(args).output().expect("run");
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        assert!(text(&out.stderr).is_empty(), "{args:?} wrote to stderr: {:?}", text(&out.stderr));
        assert!(text(&out.stdout).starts_with(said), "{args:?}: {}", text(&out.stdout));
    }
}

// ---- Item 22: the restart wait as the event tells it ----

#[test]
fn a_ten_second_restart_wait_reads_restarting_in_10s() {
    let daemon = Daemon::start("backoff", &[("AGENTD_RECONCILE__RESTART_BACKOFF__INITIAL_SECS", "10")]);
    spawn(
        &daemon,
        "crashy",
        &["--restart", "on-failure", "--env", "ECHO_EXIT_AFTER_MS=100", "--env", "ECHO_EXIT_CODE=3"],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let detail = loop {
        let json = daemon.ok(&["events", "--since", "0", "--json", "--agent", "crashy"]);
        let scheduled = json
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|e| e["kind"] == "restart_scheduled");
        if let Some(event) = scheduled {
            break event["detail"].as_str().unwrap_or_default().to_owned();
        }
        assert!(Instant::now() < deadline, "no restart_scheduled event within 30 s:\n{json}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(detail, "restart policy on-failure: restarting in 10s (attempt 1)");
}

/// On a terminal (a pty from util-linux's `script`), `stop` says what it waits for, then
/// clears the line before its answer.
#[test]
fn stop_shows_progress_on_a_terminal() {
    if Command::new("script").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI is set and there is no `script` (util-linux) to give agentd a terminal"
        );
        eprintln!("skipped: no `script` (util-linux) to give agentd a terminal");
        return;
    }
    let daemon = Daemon::start("progress-tty", &[]);
    spawn(&daemon, "loud", &[]);
    let out = Command::new("script")
        .args(["-qec", &format!("{} stop -t 7 loud", env!("CARGO_BIN_EXE_agentd")), "/dev/null"])
        .env("AGENTD_URL", daemon.url())
        .env("XDG_CONFIG_HOME", std::env::temp_dir().join("agentd-cli-test-no-config"))
        .stdin(Stdio::null())
        .output()
        .expect("run script");
    let said = text(&out.stdout);
    assert!(out.status.success(), "{said}{}", text(&out.stderr));
    assert!(said.starts_with("stopping loud… (SIGTERM sent, 7 s grace)\r\x1b[2Kloud stopped"), "{said:?}");
}

/// The shipped unit is what the docs say (`Type=notify`, `agentd serve`), and systemd
/// accepts it (`systemd-analyze verify`, where installed).
#[test]
fn the_systemd_unit_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../contrib/agentd.service");
    let unit = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    for line in ["Type=notify", "ExecStart=/usr/local/bin/agentd serve", "Restart=on-failure", "StateDirectory=agentd"]
    {
        assert!(unit.lines().any(|l| l == line), "{path} lacks {line:?}");
    }
    if Command::new("systemd-analyze").arg("--version").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "CI is set and systemd-analyze is not installed (Debian: systemd)");
        eprintln!("skipped systemd-analyze verify: systemd-analyze is not installed");
        return;
    }
    let dir = std::env::temp_dir().join(format!("agentd-cli-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let copy = dir.join("agentd.service");
    std::fs::write(&copy, unit.replace("/usr/local/bin/agentd", env!("CARGO_BIN_EXE_agentd"))).expect("write");
    // The man page need not be installed here (--man=no); anything it says is a defect.
    let out =
        Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&copy).output().expect("systemd-analyze");
    let _ = std::fs::remove_dir_all(&dir);
    let said = text(&out.stderr);
    assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify: {said}");
}
