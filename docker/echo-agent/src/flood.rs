//! `echo-agent flood ADDR [--connections N] [--half-open] [--hold-secs S]`: opens N TCP
//! connections to ADDR (`HOST:PORT`) and holds them, to test that a listener cannot be
//! exhausted. With `--half-open` each sends the start of a request (a request line and a
//! header, never the blank line that ends the head) and waits. It raises its own
//! open-file limit to the hard limit first. Every second, and at the end, it prints one
//! line: `flood: opened=O failed=F open=K closed_by_peer=C`. It exits 0 after S seconds
//! (default 60), or at once when every connection was closed by the peer.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

struct Options {
    addr: SocketAddr,
    connections: usize,
    half_open: bool,
    hold: Duration,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let target = args.first().ok_or("usage: echo-agent flood HOST:PORT [--connections N] [--half-open] [--hold-secs S]")?;
    let addr = target
        .to_socket_addrs()
        .map_err(|e| format!("{target}: {e}"))?
        .next()
        .ok_or_else(|| format!("{target} resolves to no address"))?;
    let mut options = Options { addr, connections: 1000, half_open: false, hold: Duration::from_secs(60) };
    let mut rest = args[1..].iter();
    while let Some(arg) = rest.next() {
        let mut value = |name: &str| {
            rest.next().and_then(|v| v.parse::<u64>().ok()).ok_or_else(|| format!("{name} takes a number"))
        };
        match arg.as_str() {
            "--connections" => options.connections = value("--connections")? as usize,
            "--hold-secs" => options.hold = Duration::from_secs(value("--hold-secs")?),
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
