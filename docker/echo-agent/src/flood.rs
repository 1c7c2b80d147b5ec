//! `echo-agent flood ADDR [--connections N] [--half-open] [--hold-secs S] [--processes P]`:
//! opens N TCP connections to ADDR (`HOST:PORT`) and holds them, to test that a listener
//! cannot be exhausted. With `--half-open` each sends the start of a request (a request
//! line and a header, never the blank line that ends the head) and waits. It raises its
//! own open-file limit to the hard limit first; with P processes (default 1) the N
//! connections are split between P child processes, each with an fd table and limit of
//! its own (for N above the hard limit). Every second, and at the end, it prints one line:
//! `flood: opened=O failed=F open=K closed_by_peer=C` (summed over the processes). It
//! exits 0 after S seconds (default 60), or at once when every connection was closed by
//! the peer.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

struct Options {
    addr: SocketAddr,
    connections: usize,
    half_open: bool,
    hold: Duration,
    processes: usize,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let target =
        args.first().ok_or("usage: echo-agent flood HOST:PORT [--connections N] [--half-open] [--hold-secs S]")?;
    let addr = target
        .to_socket_addrs()
        .map_err(|e| format!("{target}: {e}"))?
        .next()
        .ok_or_else(|| format!("{target} resolves to no address"))?;
    let mut options =
        Options { addr, connections: 1000, half_open: false, hold: Duration::from_secs(60), processes: 1 };
    let mut rest = args[1..].iter();
    while let Some(arg) = rest.next() {
        let mut value = |name: &str| {
            rest.next().and_then(|v| v.parse::<u64>().ok()).ok_or_else(|| format!("{name} takes a number"))
        };
        match arg.as_str() {
            "--connections" => options.connections = value("--connections")? as usize,
            "--hold-secs" => options.hold = Duration::from_secs(value("--hold-secs")?),
            "--processes" => options.processes = (value("--processes")? as usize).max(1),
            "--half-open" => options.half_open = true,
            other => return Err(format!("unknown flood option {other}")),
        }
    }
    Ok(options)
}

/// Raises the soft open-file limit to the hard one; returns the soft limit now.
fn raise_nofile() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
    }
    limit.rlim_cur
}

pub fn main(args: &[String]) -> i32 {
    let options = match parse(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("echo-agent flood: {e}");
            return 2;
        }
    };
    if options.processes > 1 {
        return split(&options);
    }
    let nofile = raise_nofile();
    println!(
        "flood: target={} connections={} half_open={} nofile={nofile}",
        options.addr, options.connections, options.half_open
    );
    let partial = format!("GET / HTTP/1.1\r\nhost: {}\r\nx-flood: ", options.addr);
    let mut open: Vec<TcpStream> = Vec::with_capacity(options.connections);
    let mut failed = 0usize;
    let mut closed = 0usize;
    let mut first_error: Option<String> = None;
    let started = Instant::now();
    for _ in 0..options.connections {
        match TcpStream::connect_timeout(&options.addr, Duration::from_secs(5)) {
            Ok(mut stream) => {
                if options.half_open && stream.write_all(partial.as_bytes()).is_err() {
                    closed += 1;
                    continue;
                }
                let _ = stream.set_nonblocking(true);
                open.push(stream);
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    let opened = open.len() + closed;
    println!(
        "flood: connected in {} ms; opened={opened} failed={failed}{}",
        started.elapsed().as_millis(),
        first_error.map(|e| format!(" first_error={e:?}")).unwrap_or_default()
    );
    let until = Instant::now() + options.hold;
    let mut buf = [0u8; 4096];
    loop {
        // A connection the peer closed reads 0 (or fails with a reset).
        open.retain_mut(|stream| loop {
            match stream.read(&mut buf) {
                Ok(0) => {
                    closed += 1;
                    return false;
                }
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => {
                    closed += 1;
                    return false;
                }
            }
        });
        println!("flood: opened={opened} failed={failed} open={} closed_by_peer={closed}", open.len());
        let _ = std::io::stdout().flush();
        if open.is_empty() || Instant::now() >= until {
            return 0;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Runs the flood in `options.processes` child processes and prints their summed counts.
fn split(options: &Options) -> i32 {
    use std::io::BufRead;
    use std::sync::{Arc, Mutex};
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("echo-agent flood: cannot find its own binary: {e}");
            return 1;
        }
    };
    let latest: Arc<Mutex<Vec<Option<String>>>> = Arc::new(Mutex::new(vec![None; options.processes]));
    let mut children = Vec::new();
    for k in 0..options.processes {
        let share = options.connections / options.processes + usize::from(k < options.connections % options.processes);
        let mut cmd = std::process::Command::new(&exe);
        cmd.arg("flood")
            .arg(options.addr.to_string())
            .args(["--connections", &share.to_string(), "--hold-secs", &options.hold.as_secs().to_string()])
            .stdout(std::process::Stdio::piped());
        if options.half_open {
            cmd.arg("--half-open");
        }
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                eprintln!("echo-agent flood: cannot start process {k}: {e}");
                return 1;
            }
        };
        if let Some(out) = child.stdout.take() {
            let latest = latest.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                    if line.starts_with("flood: opened=") && line.contains(" open=") {
                        latest.lock().unwrap_or_else(std::sync::PoisonError::into_inner)[k] = Some(line);
                    } else {
                        println!("flood[{k}]: {}", line.trim_start_matches("flood: "));
                    }
                }
            });
        }
        children.push(child);
    }
    loop {
        let done = children.iter_mut().all(|c| matches!(c.try_wait(), Ok(Some(_))));
        let lines = latest.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        if lines.iter().all(Option::is_some) {
            let mut sums = [0u64; 4];
            for line in lines.iter().flatten() {
                for (i, key) in ["opened", "failed", "open", "closed_by_peer"].iter().enumerate() {
                    sums[i] += line
                        .split_whitespace()
                        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0);
                }
            }
            println!("flood: opened={} failed={} open={} closed_by_peer={}", sums[0], sums[1], sums[2], sums[3]);
            let _ = std::io::stdout().flush();
        }
        if done {
            return 0;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}
