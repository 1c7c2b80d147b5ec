//! Configuration layering and validation, through the real binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

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
        cmd.output().expect("run agentd")
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
    let exposed = s.write("exposed.toml", "[server]\nlisten = \"0.0.0.0:7006\"\n");
    let bad_enum = s.write("enum.toml", "backend = \"kubernetes\"\n");
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
            what: "wrong type in a file",
            args: vec!["--config", path_str(&wrong_type)],
            env: vec![],
            expect: vec!["reconcile.interval_secs", "often", path_str(&wrong_type)],
        },
        Case {
            what: "impossible value in a file",
            args: vec!["--config", path_str(&impossible)],
            env: vec![],
            expect: vec!["agents.memory_mb = 2", path_str(&impossible), "at least 6"],
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
            expect: vec!["reconcile.interval_secs = 0", "AGENTD_RECONCILE__INTERVAL_SECS", "at least 1"],
        },
        Case {
            what: "missing --config file",
            args: vec!["--config", "/nonexistent/agentd.toml"],
            env: vec![],
            expect: vec!["/nonexistent/agentd.toml", "no such file"],
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
fn the_client_says_when_the_daemon_is_not_running() {
    let s = Scratch::new("client");
    let out = s.agentd(&["ls"], &[("AGENTD_URL", "http://127.0.0.1:9")]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("agentd is not running at http://127.0.0.1:9") && err.contains("agentd serve"), "{err}");
}
