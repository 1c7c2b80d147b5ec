//! `agentd chat` under a pseudo-terminal, through the real binary, on the mock backend
//! (whose simulated echo agent speaks stream-json): a message and its reply, a
//! permission request answered `y`, and Ctrl-D.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Drives a command on a pty: writes each input after its expected text appeared, fails
/// after a deadline with what the screen showed. Python's `pty` module does the terminal.
const DRIVER: &str = r#"
import os, pty, select, sys, time, json
steps = json.loads(sys.argv[1])
pid, fd = pty.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
seen = b""
pos = 0
def wait_for(text, deadline):
    global seen, pos
    while seen.find(text.encode(), pos) < 0:
        left = deadline - time.time()
        if left <= 0:
            sys.stderr.write("timed out waiting for %r; screen so far:\n%s\n" % (text, seen.decode(errors="replace")))
            sys.exit(3)
        r, _, _ = select.select([fd], [], [], min(left, 0.2))
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                chunk = b""
            if not chunk:
                sys.stderr.write("the program ended waiting for %r; screen:\n%s\n" % (text, seen.decode(errors="replace")))
                sys.exit(4)
            seen += chunk
    pos = seen.find(text.encode(), pos) + len(text.encode())
for expect, send in steps:
    wait_for(expect, time.time() + 30)
    os.write(fd, send.encode())
deadline = time.time() + 30
while True:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        break
    if time.time() > deadline:
        sys.stderr.write("the program did not exit; screen:\n%s\n" % seen.decode(errors="replace"))
        sys.exit(5)
    r, _, _ = select.select([fd], [], [], 0.2)
    if r:
        try:
            seen += os.read(fd, 4096)
        except OSError:
            pass
sys.stdout.write(seen.decode(errors="replace"))
sys.exit(os.waitstatus_to_exitcode(status))
"#;

struct Daemon {
    child: Child,
    dir: PathBuf,
    url: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn agentd(daemon: &Daemon) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_agentd"));
    for (key, _) in std::env::vars() {
        if key.starts_with("AGENTD_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("XDG_CONFIG_HOME", daemon.dir.join("xdg")).env("AGENTD_URL", &daemon.url);
    cmd
}

fn start_mock_daemon() -> Daemon {
    let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
    let dir = std::env::temp_dir().join(format!("agentd-chat-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_agentd"));
    for (key, _) in std::env::vars() {
        if key.starts_with("AGENTD_") {
            cmd.env_remove(key);
        }
    }
    let child = cmd
        .arg("serve")
        .env("XDG_CONFIG_HOME", dir.join("xdg"))
        .env("AGENTD_BACKEND", "mock")
        .env("AGENTD_SERVER__LISTEN", format!("127.0.0.1:{port}"))
        .env("AGENTD_STORE__PATH", dir.join("agentd.db"))
        .env("AGENTD_AGENTS__IMAGE", "agentd-echo:latest")
        // A model credential, without which claude-code spawns are refused (none is used).
        .env("ANTHROPIC_API_KEY", "sk-ant-chat-test-unused")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start agentd serve");
    let daemon = Daemon { child, dir, url: format!("http://127.0.0.1:{port}") };
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "agentd serve did not listen within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    daemon
}

#[test]
fn chat_on_a_terminal_sends_streams_asks_and_leaves_on_ctrl_d() {
    if Command::new("python3").arg("--version").output().is_err() {
        panic!("python3 is needed to drive a pseudo-terminal in this test");
    }
    let daemon = start_mock_daemon();
    let spawned = agentd(&daemon).args(["spawn", "coder"]).output().expect("spawn");
    assert!(spawned.status.success(), "spawn: {}", String::from_utf8_lossy(&spawned.stderr));
    let steps = serde_json::json!([
        ["coder> ", "hello there\r"],
        ["echo: hello there", ""],
        ["coder> ", "!tool Bash touch /workspace/x\r"],
        ["allow? [y/N]", "y\r"],
        ["tool Bash allowed: touch /workspace/x", ""],
        ["coder> ", "\u{4}"],
    ]);
    let out = Command::new("python3")
        .args(["-c", DRIVER, &steps.to_string()])
        .arg(env!("CARGO_BIN_EXE_agentd"))
        .args(["--url", &daemon.url, "chat", "coder"])
        .env("XDG_CONFIG_HOME", daemon.dir.join("xdg"))
        .output()
        .expect("run the pty driver");
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "chat under a pty failed: {}\n{screen}", String::from_utf8_lossy(&out.stderr));
    assert!(screen.contains("coder wants to use Bash"), "{screen}");
    let approvals = agentd(&daemon).args(["approvals", "--all"]).output().expect("approvals");
    let table = String::from_utf8_lossy(&approvals.stdout);
    assert!(table.contains("allow (user)"), "{table}");
}

#[test]
fn chat_without_a_terminal_reads_one_message_per_line() {
    let daemon = start_mock_daemon();
    let spawned = agentd(&daemon).args(["spawn", "piped"]).output().expect("spawn");
    assert!(spawned.status.success(), "spawn: {}", String::from_utf8_lossy(&spawned.stderr));
    let mut child =
        agentd(&daemon).args(["chat", "piped"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("chat");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(b"one\ntwo\n").expect("write");
    }
    let out = child.wait_with_output().expect("wait");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let one = text.find("echo: one").unwrap_or_else(|| panic!("no first reply: {text}"));
    let two = text.find("echo: two").unwrap_or_else(|| panic!("no second reply: {text}"));
    assert!(one < two, "{text}");
}
