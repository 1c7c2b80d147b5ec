//! The store on disk, through the real binary: private files, and one daemon per database.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A scratch directory, removed on drop.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("agentd-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("xdg")).expect("mkdir");
        Self { dir }
    }

    /// `agentd serve` on the mock backend at `port`, with `XDG_DATA_HOME` in the scratch
    /// directory (so the database is at its default path under it).
    fn serve(&self, port: u16) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_agentd"));
        cmd.arg("serve")
            .env("XDG_CONFIG_HOME", self.dir.join("xdg"))
            .env("XDG_DATA_HOME", self.dir.join("data"))
            .env_remove("RUST_LOG");
        for (key, _) in std::env::vars() {
            if key.starts_with("AGENTD_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("AGENTD_BACKEND", "mock")
            .env("AGENTD_SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .env("AGENTD_LOG__FORMAT", "json")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd
    }

    fn db(&self) -> PathBuf {
        self.dir.join("data/agentd/agentd.db")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port()
}

fn healthy(port: u16) -> bool {
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    if write!(stream, "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").is_err() {
        return false;
    }
    let mut response = String::new();
    stream.read_to_string(&mut response).is_ok() && response.starts_with("HTTP/1.1 200")
}

/// A running daemon; killed on drop. Its stderr is read on a thread.
struct Daemon {
    child: Child,
    stderr: std::sync::mpsc::Receiver<Vec<u8>>,
}

impl Daemon {
    fn start(s: &Scratch, port: u16) -> Self {
        let mut child = s.serve(port).spawn().expect("start agentd serve");
        let stderr = read_stderr(&mut child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !healthy(port) {
            if let Ok(Some(status)) = child.try_wait() {
                let err = String::from_utf8_lossy(&stderr.recv_timeout(Duration::from_secs(5)).unwrap_or_default())
                    .into_owned();
                panic!("agentd serve exited with {status} before answering /healthz:\n{err}");
            }
            assert!(Instant::now() < deadline, "agentd serve did not answer /healthz within 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, stderr }
    }

    /// Kills the daemon (SIGKILL: its -wal and -shm stay) and returns what it logged.
    fn kill(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        String::from_utf8_lossy(&self.stderr.recv_timeout(Duration::from_secs(10)).expect("stderr")).into_owned()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// All of the child's stderr, sent once it closes.
fn read_stderr(child: &mut Child) -> std::sync::mpsc::Receiver<Vec<u8>> {
    let mut stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = stderr.read_to_end(&mut text);
        let _ = tx.send(text);
    });
    rx
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).mode() & 0o777
}

fn sibling(db: &Path, suffix: &str) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// The directory is 0700, the database, -wal and -shm 0600 (they hold env values and
/// agent secrets); looser ones left by an older daemon are tightened, each named in a
/// warning.
#[test]
fn the_store_is_private_and_a_loose_one_is_tightened_with_a_warning() {
    let s = Scratch::new("modes");
    let port = free_port();
    let db = s.db();
    let dir = db.parent().expect("dir").to_path_buf();
    let files = [db.clone(), sibling(&db, "-wal"), sibling(&db, "-shm")];

    let daemon = Daemon::start(&s, port);
    assert_eq!(mode(&dir), 0o700, "the data directory {}", dir.display());
    for file in &files {
        assert_eq!(mode(file), 0o600, "{} must be 0600", file.display());
    }
    daemon.kill();

    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    for file in &files {
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o644)).expect("chmod file");
    }
    let daemon = Daemon::start(&s, port);
    assert_eq!(mode(&dir), 0o700, "the data directory {} was not tightened", dir.display());
    for file in &files {
        assert_eq!(mode(file), 0o600, "{} was not tightened", file.display());
    }
    let log = daemon.kill();
    let warning = |needle: &str| {
        log.lines().any(|l| l.contains("\"WARN\"") && l.contains("tightened") && l.contains(&format!("\"{needle}\"")))
    };
    assert!(warning(&dir.display().to_string()), "no warning naming {}:\n{log}", dir.display());
    for file in &files {
        assert!(warning(&file.display().to_string()), "no warning naming {}:\n{log}", file.display());
    }
}

/// A second daemon on the same database exits 1 with a message naming the database and
/// the first daemon's pid; the first goes on serving.
#[test]
fn a_second_daemon_on_the_same_database_exits_1_naming_the_first_ones_pid() {
    let s = Scratch::new("lock");
    let first_port = free_port();
    let first = Daemon::start(&s, first_port);
    let pid = first.child.id();

    let mut second = s.serve(free_port()).spawn().expect("start the second agentd serve");
    let stderr = read_stderr(&mut second);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = second.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            let _ = second.wait();
            panic!("the second daemon on the same database was still running after 30 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let err = String::from_utf8_lossy(&stderr.recv_timeout(Duration::from_secs(10)).expect("stderr")).into_owned();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("pid {pid}")), "the message does not name the first daemon's pid {pid}:\n{err}");
    assert!(err.contains(&s.db().display().to_string()), "the message does not name the database:\n{err}");
    assert!(healthy(first_port), "the first daemon stopped serving");
    drop(first);
}
