//! Configuration layering and validation, through the real binary.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A scratch directory with a user config dir, removed on drop.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("agentd-config-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("xdg/agentd")).expect("mkdir");
        Self { dir }
    }

    fn write(&self, relative: &str, text: &str) -> PathBuf {
        let path = self.dir.join(relative);
        std::fs::write(&path, text).expect("write");
        path
    }

    fn agentd(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        self.command(args, env).output().expect("run agentd")
    }

    fn command(&self, args: &[&str], env: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_agentd"));
        cmd.args(args).env("XDG_CONFIG_HOME", self.dir.join("xdg")).env("XDG_DATA_HOME", self.dir.join("data"));
        for (key, _) in std::env::vars() {
            if key.starts_with("AGENTD_") {
                cmd.env_remove(key);
            }
        }
        cmd.env_remove("RUST_LOG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn bad_configurations_exit_2_naming_key_value_source_and_what_is_allowed() {
    let s = Scratch::new("bad");
    let unknown = s.write("unknown.toml", "[agents]\nmemroy_mb = 512\n");
    let wrong_type = s.write("type.toml", "[reconcile]\ninterval_secs = \"often\"\n");
    let impossible = s.write("impossible.toml", "[agents]\nmemory_mb = 2\n");
    let huge_memory = s.write("huge-memory.toml", "[agents]\nmemory_mb = 17592186044416\n");
    let bad_image = s.write("bad-image.toml", "[agents]\nimage = \"AGENTD-ECHO:LATEST\"\n");
    let exposed = s.write("exposed.toml", "[server]\nlisten = \"0.0.0.0:7006\"\n");
    let bad_enum = s.write("enum.toml", "backend = \"kubernetes\"\n");
    let backend_key = s.write("backend-key.toml", "[docker]\nsockt = \"unix:///x.sock\"\n");
    let backend_value = s.write("backend-value.toml", "[podman]\nrequest_timeout_secs = 0\n");
    let top_level = s.write("top.toml", "[kubernetes]\nnamespace = \"x\"\n");
    let egress = s.write("egress.toml", "[agents]\negress_allow = [\"ok.example\", \"https://x.example/\"]\n");
    struct Case<'a> {
        what: &'a str,
        args: Vec<&'a str>,
        env: Vec<(&'a str, &'a str)>,
        expect: Vec<&'a str>,
    }
    let cases = [
        Case {
            what: "unknown key in a file",
            args: vec!["--config", path_str(&unknown)],
            env: vec![],
            expect: vec!["agents.memroy_mb", "unknown key", "memory_mb", path_str(&unknown)],
        },
        Case {
            what: "connection limits out of range",
            args: vec![],
            env: vec![
                ("AGENTD_GATEWAY__MAX_CONNECTIONS_PER_PEER", "2000"),
                ("AGENTD_SERVER__HEADER_TIMEOUT_SECS", "0"),
            ],
            expect: vec![
                "gateway.max_connections_per_peer = 2000 (from environment variable AGENTD_GATEWAY__MAX_CONNECTIONS_PER_PEER): from 1 to gateway.max_connections (1024)",
                "server.header_timeout_secs = 0",
                "from 1 to 3600 seconds",
            ],
        },
        Case {
            what: "wrong type in a file",
            args: vec!["--config", path_str(&wrong_type)],
            env: vec![],
            expect: vec!["reconcile.interval_secs", "often", path_str(&wrong_type)],
        },
        Case {
            what: "impossible value in a file",
            args: vec!["--config", path_str(&impossible)],
            env: vec![],
            expect: vec!["agents.memory_mb = 2", path_str(&impossible), "from 6 to 1099511627776"],
        },
        Case {
            what: "a memory limit of 2^44 MiB in a file (its bytes would not fit)",
            args: vec!["--config", path_str(&huge_memory)],
            env: vec![],
            expect: vec!["agents.memory_mb = 17592186044416", path_str(&huge_memory), "from 6 to 1099511627776"],
        },
        Case {
            what: "a CPU limit below what the kernel can enforce",
            args: vec![],
            env: vec![("AGENTD_AGENTS__CPUS", "0.001")],
            expect: vec!["agents.cpus", "AGENTD_AGENTS__CPUS", "from 0.01 to 1024"],
        },
        Case {
            what: "an image reference outside the grammar",
            args: vec!["--config", path_str(&bad_image)],
            env: vec![],
            expect: vec!["agents.image", "AGENTD-ECHO:LATEST", "lower-case", path_str(&bad_image)],
        },
        Case {
            what: "non-loopback listen without a token",
            args: vec!["--config", path_str(&exposed)],
            env: vec![],
            expect: vec!["server.listen = 0.0.0.0:7006", "server.token"],
        },
        Case {
            what: "unknown backend",
            args: vec!["--config", path_str(&bad_enum)],
            env: vec![],
            expect: vec!["backend", "kubernetes", "auto", "docker", "podman", "mock"],
        },
        Case {
            what: "unknown key in a backend's section",
            args: vec!["--config", path_str(&backend_key)],
            env: vec![],
            expect: vec!["docker.sockt", "socket", "request_timeout_secs", path_str(&backend_key)],
        },
        Case {
            what: "impossible value in a backend's section",
            args: vec!["--config", path_str(&backend_value)],
            env: vec![],
            expect: vec!["podman.request_timeout_secs = 0", path_str(&backend_value), "1 to 3600"],
        },
        Case {
            what: "a section of no registered backend",
            args: vec!["--config", path_str(&top_level)],
            env: vec![],
            expect: vec![
                "kubernetes",
                "unknown key",
                "docker, firewall, gateway, instance_id",
                "mock",
                path_str(&top_level),
            ],
        },
        Case {
            what: "wrong type in a backend's section in the environment",
            args: vec![],
            env: vec![("AGENTD_DOCKER__REQUEST_TIMEOUT_SECS", "soon")],
            expect: vec!["docker.request_timeout_secs", "soon", "AGENTD_DOCKER__REQUEST_TIMEOUT_SECS"],
        },
        Case {
            what: "wrong type in the environment",
            args: vec![],
            env: vec![("AGENTD_AGENTS__CPUS", "lots")],
            expect: vec!["agents.cpus", "lots", "AGENTD_AGENTS__CPUS"],
        },
        Case {
            what: "unknown key in the environment",
            args: vec![],
            env: vec![("AGENTD_SERVER__LISTENING", "x")],
            expect: vec!["server.listening", "AGENTD_SERVER__LISTENING", "listen"],
        },
        Case {
            what: "impossible value in the environment",
            args: vec![],
            env: vec![("AGENTD_RECONCILE__INTERVAL_SECS", "0")],
            expect: vec!["reconcile.interval_secs = 0", "AGENTD_RECONCILE__INTERVAL_SECS", "1 to 86400"],
        },
        Case {
            what: "a bad egress allow-list entry",
            args: vec!["--config", path_str(&egress)],
            env: vec![],
            expect: vec!["agents.egress_allow", "https://x.example/", "not a URL", "HOST:PORT", path_str(&egress)],
        },
        Case {
            what: "missing --config file",
            args: vec!["--config", "/nonexistent/agentd.toml"],
            env: vec![],
            expect: vec!["/nonexistent/agentd.toml", "no such file"],
        },
        Case {
            what: "--config naming a directory",
            args: vec!["--config", path_str(&s.dir)],
            env: vec![],
            expect: vec![path_str(&s.dir), "a directory, not a file"],
        },
        Case {
            what: "a log level that is no level (it would parse as a target and silence the daemon)",
            args: vec![],
            env: vec![("AGENTD_LOG__LEVEL", "verbose")],
            expect: vec!["log.level = \"verbose\"", "AGENTD_LOG__LEVEL", "every directive names one"],
        },
        Case {
            what: "the legacy leave-running variable disagreeing with the current one",
            args: vec![],
            env: vec![("AGENTD_SHUTDOWN__LEAVE_RUNNING", "true"), ("AGENTD_SHUTDOWN_LEAVE_RUNNING", "false")],
            expect: vec!["AGENTD_SHUTDOWN__LEAVE_RUNNING", "AGENTD_SHUTDOWN_LEAVE_RUNNING", "disagree"],
        },
        Case {
            what: "a firewall command with arguments and no timeout",
            args: vec![],
            env: vec![
                ("AGENTD_FIREWALL__IPTABLES_COMMAND", "iptables -w"),
                ("AGENTD_FIREWALL__COMMAND_TIMEOUT_SECS", "0"),
            ],
            expect: vec![
                "firewall.iptables_command",
                "without arguments or spaces",
                "firewall.command_timeout_secs = 0",
                "1 to 300",
            ],
        },
    ];
    for case in cases {
        let mut args = case.args.clone();
        args.extend(["config", "check"]);
        let out = s.agentd(&args, &case.env);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{}: exit status; stderr: {err}", case.what);
        for needle in &case.expect {
            assert!(err.contains(needle), "{}: the error lacks {needle:?}:\n{err}", case.what);
        }
    }
}

#[test]
fn serve_with_a_bad_configuration_exits_2_before_touching_anything() {
    let s = Scratch::new("serve");
    let db = s.dir.join("never.db");
    let out = s.agentd(
        &["serve"],
        &[("AGENTD_STORE__PATH", path_str(&db)), ("AGENTD_AGENTS__PIDS_LIMIT", "0"), ("AGENTD_BACKEND", "mock")],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("agents.pids_limit = 0"), "{}", stderr(&out));
    assert!(!db.exists(), "the database was created although the configuration is invalid");
}

#[test]
fn layers_apply_in_order_and_show_names_each_source() {
    let s = Scratch::new("layers");
    s.write(
        "xdg/agentd/agentd.toml",
        "[agents]\nprefix = \"from-user\"\nmemory_mb = 1024\n\n[server]\ntoken = \"user-secret-0123456789\"\n",
    );
    let explicit = s.write("explicit.toml", "[agents]\nmemory_mb = 512\ncpus = 1.5\n");
    let out = s.agentd(
        &["--config", path_str(&explicit), "config", "show"],
        &[("AGENTD_AGENTS__CPUS", "0.5"), ("AGENTD_SHUTDOWN_LEAVE_RUNNING", "true")],
    );
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let line = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("no {key} in:\n{text}"))
            .to_owned()
    };
    let user_file = s.dir.join("xdg/agentd/agentd.toml");
    assert!(line("agents.prefix").contains("\"from-user\"") && line("agents.prefix").contains(path_str(&user_file)));
    assert!(line("agents.memory_mb").contains("512") && line("agents.memory_mb").contains(path_str(&explicit)));
    assert!(line("agents.cpus").contains("0.5") && line("agents.cpus").contains("AGENTD_AGENTS__CPUS"));
    assert!(
        line("shutdown.leave_running").contains("true")
            && line("shutdown.leave_running").contains("AGENTD_SHUTDOWN_LEAVE_RUNNING")
    );
    assert!(line("reconcile.interval_secs").contains("10") && line("reconcile.interval_secs").contains("# default"));
    assert!(line("server.token").contains("<redacted>"), "{}", line("server.token"));
    assert!(!text.contains("user-secret"), "the token leaked:\n{text}");

    let out = s.agentd(&["--config", path_str(&explicit), "config", "check"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn settings_of_the_libraries_are_keys_with_their_defaults_and_sources() {
    let s = Scratch::new("library-keys");
    let file = s.write(
        "keys.toml",
        "[docker]\nrequest_timeout_secs = 5\nisolated_network = \"k-b-isolated\"\n\n\
         [podman]\nstdin_dir = \"/run/k-b-stdin\"\n\n[reconcile.restart_backoff]\nmax_secs = 120\n",
    );
    let env = [("AGENTD_AGENTS__INTERRUPT_GRACE_SECS", "45"), ("AGENTD_PODMAN__REQUEST_TIMEOUT_SECS", "7")];
    let out = s.agentd(&["--config", path_str(&file), "config", "show"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = stdout(&out);
    for (key, value, source) in [
        ("docker.request_timeout_secs", "5", path_str(&file)),
        ("docker.isolated_network", "\"k-b-isolated\"", path_str(&file)),
        ("docker.socket", "(unset)", "# default"),
        ("podman.stdin_dir", "\"/run/k-b-stdin\"", path_str(&file)),
        ("podman.request_timeout_secs", "7", "AGENTD_PODMAN__REQUEST_TIMEOUT_SECS"),
        ("podman.podman_command", "\"podman\"", "# default"),
        ("agents.interrupt_grace_secs", "45", "AGENTD_AGENTS__INTERRUPT_GRACE_SECS"),
        ("reconcile.restart_backoff.max_secs", "120", path_str(&file)),
        ("reconcile.restart_backoff.initial_secs", "10", "# default"),
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("{key} = ")))
            .unwrap_or_else(|| panic!("no {key} in:\n{text}"));
        assert!(line.contains(&format!("= {value} ")) && line.contains(source), "{key}: {line}");
    }
    let out = s.agentd(&["--config", path_str(&file), "config", "check"], &env);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

/// `GET path` on a loopback port: the status line and the body, or `None` while nothing
/// answers.
fn get(port: u16, path: &str) -> Option<(String, String)> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    Some((head.lines().next().unwrap_or_default().to_owned(), body.to_owned()))
}

#[test]
fn the_real_binary_runs_the_backend_the_configuration_names_from_the_registry() {
    let s = Scratch::new("registry");
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
    let file = s.write(
        "mock.toml",
        &format!(
            "backend = \"mock\"\ninstance_id = \"k-b-registry\"\n\n[server]\nlisten = \"127.0.0.1:{port}\"\n\n\
             [store]\npath = \"{}\"\n\n[mock]\n",
            s.dir.join("registry.db").display()
        ),
    );
    let mut child = s
        .command(&["--config", path_str(&file), "serve"], &[])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start agentd serve");
    let deadline = Instant::now() + Duration::from_secs(30);
    let answer = loop {
        // `503` (`starting`) until the supervisor's first pass, which comes at once.
        if let Some(answer) = get(port, "/healthz").filter(|a| a.0.contains("200")) {
            break answer;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            let _ = child.stderr.take().map(|mut e| e.read_to_string(&mut err));
            panic!("agentd serve exited with {status} before answering:\n{err}");
        }
        assert!(Instant::now() < deadline, "agentd serve did not answer /healthz with 200 within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = child.kill();
    let _ = child.wait();
    let health: serde_json::Value = serde_json::from_str(&answer.1).unwrap_or_else(|e| panic!("{e}: {answer:?}"));
    assert!(answer.0.contains("200"), "{answer:?}");
    assert_eq!(health["backend"], "mock", "{health}");
    assert_eq!(health["instance"], "k-b-registry", "{health}");
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["engine"]["state"], "ok", "{health}");
    assert_eq!(health["supervisor"]["state"], "running", "{health}");
}

#[test]
fn the_client_says_when_the_daemon_is_not_running() {
    let s = Scratch::new("client");
    let out = s.agentd(&["ls"], &[("AGENTD_URL", "http://127.0.0.1:9")]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("agentd is not running at http://127.0.0.1:9") && err.contains("agentd serve"), "{err}");
}

/// Pretty logs written to a pipe (a file, journald) carry no ANSI colour codes.
#[test]
fn pretty_logs_are_plain_text_off_a_terminal() {
    let s = Scratch::new("colour");
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("port").port();
    let listen = format!("127.0.0.1:{port}");
    let db = s.dir.join("colour.db");
    let mut child = s
        .command(
            &["serve"],
            &[
                ("AGENTD_BACKEND", "mock"),
                ("AGENTD_SERVER__LISTEN", &listen),
                ("AGENTD_STORE__PATH", path_str(&db)),
                ("AGENTD_LOG__FORMAT", "pretty"),
            ],
        )
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start agentd serve");
    let mut stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            text.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&text).contains("agentd is running.") {
                let _ = tx.send(text.clone());
            }
        }
    });
    let text = rx.recv_timeout(Duration::from_secs(30));
    let _ = child.kill();
    let _ = child.wait();
    let text = String::from_utf8_lossy(&text.expect("agentd serve did not log that it runs within 30 s")).into_owned();
    assert!(!text.contains('\u{1b}'), "ANSI escape codes in logs written to a pipe:\n{text:?}");
}

/// No duration that passes `config check` can overflow a deadline: each is bounded, and a
/// value past the bound is refused naming the key and the range (it used to pass, then
/// panicked the supervisor with "overflow when adding duration to instant").
#[test]
fn every_duration_is_bounded() {
    let s = Scratch::new("durations");
    let huge = "9223372036854775807";
    let keys = [
        ("reconcile.interval_secs", "1 to 86400"),
        ("reconcile.orphan_grace_secs", "0 to 2592000"),
        ("reconcile.unhealthy_grace_secs", "0 to 86400"),
        ("reconcile.restart_backoff.initial_secs", "1 to 86400"),
        ("reconcile.restart_backoff.max_secs", "1 to 86400"),
        ("reconcile.restart_backoff.reset_after_secs", "0 to 2592000"),
        ("agents.stop_grace_secs", "at most 3600"),
        ("agents.approval_timeout_secs", "1 to 86400"),
        ("agents.turn_idle_timeout_secs", "1 to 86400"),
        ("agents.interrupt_grace_secs", "1 to 86400"),
    ];
    for (key, range) in keys {
        let var = format!("AGENTD_{}", key.to_uppercase().replace('.', "__"));
        let out = s.agentd(&["config", "check"], &[(&var, huge)]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{key} = {huge} must be refused; stderr: {err}");
        assert!(err.contains(&format!("{key} = {huge}")), "names {key}: {err}");
        assert!(err.contains(range), "{key} gives the range {range:?}: {err}");
    }
    // The maxima themselves pass.
    let file = s.write(
        "max.toml",
        "[reconcile]\ninterval_secs = 86400\norphan_grace_secs = 2592000\nunhealthy_grace_secs = 86400\n\
         [reconcile.restart_backoff]\ninitial_secs = 86400\nmax_secs = 86400\nreset_after_secs = 2592000\n",
    );
    let out = s.agentd(&["--config", file.to_str().expect("utf-8"), "config", "check"], &[]);
    assert!(out.status.success(), "the maxima pass: {}", stderr(&out));
}
