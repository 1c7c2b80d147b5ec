//! The listeners agentd offers its containers (the model gateway, the egress proxy): bound
//! on the engine networks' gateway addresses, never on the API's; and [`serve`], which
//! serves them (and the API) within [`ConnLimits`], so that whatever a container can reach
//! it cannot exhaust.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioIo, TokioTimer};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};
use tower_service::Service;
use tracing::{debug, info, warn};

/// The listen backlog of every listener (the kernel caps it at `net.core.somaxconn`):
/// deep enough that a burst of connections does not overflow the accept queue (a dropped
/// SYN costs a client a 1 s retransmit) before the accept loop closes the ones over the
/// caps.
const BACKLOG: i32 = 4096;

/// Binds the API's `addr` (with `SO_REUSEADDR` and the listeners' backlog).
pub fn bind_api(addr: SocketAddr) -> io::Result<TcpListener> {
    let domain = if addr.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
    let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Binds `addr` with `IP_FREEBIND`, so that an address the host does not have yet can be
/// bound: Podman (netavark) creates a network's bridge, and the host's address on it, only
/// while a container is attached, and deletes it with the last one. Connections arrive
/// once the address exists.
pub fn bind_gateway(addr: SocketAddr) -> io::Result<TcpListener> {
    let domain = if addr.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
    let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    match addr.ip() {
        IpAddr::V4(_) => socket.set_freebind_v4(true)?,
        IpAddr::V6(_) => socket.set_freebind_v6(true)?,
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// The limits one listener is served within.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    /// Connections open at once, from everyone. Past it, a new connection is accepted and
    /// closed at once (so the listen backlog never fills).
    pub max_connections: usize,
    /// Connections open at once from one peer address.
    pub max_connections_per_peer: usize,
    /// How long a connection may take to send a whole request head, counted from when the
    /// server waits for one: a new connection, or a kept-alive one after its last response
    /// (so it is also how long a kept-alive connection may sit idle between requests).
    pub header_timeout: Duration,
    /// How long a connection with no request in flight (a tunnel after its `CONNECT`, for
    /// one) may move no byte in either direction before it is closed.
    pub idle_timeout: Duration,
    /// The most bytes of a request head (start line and headers) buffered; a longer head
    /// gets 431 and the connection is closed.
    pub max_header_bytes: usize,
    /// The most bytes of a request body; a longer one gets 413 (`Content-Length`) or ends
    /// in an error where it crosses the limit (chunked). `None`: no limit here.
    pub max_request_body_bytes: Option<u64>,
    /// How long a shutdown waits for requests in flight before it closes their connections.
    pub shutdown_grace: Duration,
}

impl ConnLimits {
    /// The defaults of a listener containers reach (the model gateway, the egress proxy).
    pub const GATEWAY: ConnLimits = ConnLimits {
        max_connections: 1024,
        max_connections_per_peer: 64,
        header_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(300),
        max_header_bytes: 64 * 1024,
        max_request_body_bytes: Some(32 * 1024 * 1024),
        shutdown_grace: Duration::from_secs(5),
    };

    /// The defaults of the management API: higher, its clients are the operator's.
    pub const API: ConnLimits = ConnLimits {
        max_connections: 4096,
        max_connections_per_peer: 1024,
        header_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(300),
        max_header_bytes: 64 * 1024,
        max_request_body_bytes: Some(16 * 1024 * 1024),
        shutdown_grace: Duration::from_secs(5),
    };
}

/// The smallest read buffer hyper accepts (`max_buf_size` panics below it).
const MIN_BUF: usize = 8192;

/// Serves `app` on `listener` within `limits` until `shutdown` completes, then lets the
/// requests in flight finish (at most [`ConnLimits::shutdown_grace`]) and returns.
///
/// Every request carries `ConnectInfo<SocketAddr>` (the peer) in its extensions, as
/// `axum::serve(…into_make_service_with_connect_info::<SocketAddr>())` would insert it.
/// HTTP/1.1 only, with upgrades (`CONNECT` tunnels work: the tunnel keeps its
/// connection's slot until it closes).
pub async fn serve(
    listener: TcpListener,
    limits: ConnLimits,
    app: axum::Router,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let local = listener.local_addr()?;
    let counts = Arc::new(Counts::default());
    let (closing_tx, closing) = watch::channel(false);
    let mut refusals = Refusals::default();
    let mut accept_errors_logged: Option<Instant> = None;
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(pair) => pair,
            Err(e) => {
                // Out of fds (EMFILE/ENFILE) or a connection reset before it was accepted:
                // wait a little rather than spin, and say so at most once a minute.
                if accept_errors_logged.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
                    warn!(address = %local, error = %e, "Accepting a connection failed; retrying in 100 ms.");
                    accept_errors_logged = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(permit) = counts.admit(peer.ip(), &limits) else {
            // Closed at once: the backlog keeps moving, the peer learns at once.
            drop(stream);
            if refusals.should_log(peer.ip()) {
                let (total, from_peer) = counts.current(peer.ip());
                warn!(
                    address = %local,
                    peer = %peer.ip(),
                    open = total,
                    open_from_peer = from_peer,
                    max_connections = limits.max_connections,
                    max_connections_per_peer = limits.max_connections_per_peer,
                    "Connection refused: over the connection cap (logged once a minute per peer)."
                );
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(stream, peer, permit, limits, app.clone(), closing.clone()));
    }
    drop(listener);
    drop(closing);
    let _ = closing_tx.send(true);
    let open = counts.current_total();
    if open > 0 {
        debug!(address = %local, open, "Waiting for requests in flight.");
    }
    // Every connection task holds a receiver: all gone means every connection ended.
    let drained = tokio::time::timeout(limits.shutdown_grace, closing_tx.closed()).await;
    if drained.is_err() {
        info!(
            address = %local,
            open = counts.current_total(),
            grace_secs = limits.shutdown_grace.as_secs(),
            "Connections still open after the shutdown grace; closing them."
        );
    }
    Ok(())
}

/// One connection: HTTP/1.1 with upgrades, closed gracefully when the server shuts down.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    permit: Permit,
    limits: ConnLimits,
    app: axum::Router,
    mut closing: watch::Receiver<bool>,
) {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let io = TokioIo::new(Guarded::new(stream, permit, limits.idle_timeout, in_flight.clone()));
    let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
        let app = app.clone();
        let in_flight = in_flight.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(app, peer, limits, in_flight, request).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes.max(MIN_BUF));
    let conn = builder.serve_connection(io, service).with_upgrades();
    tokio::pin!(conn);
    let outcome = tokio::select! {
        outcome = conn.as_mut() => outcome,
        () = async { let _ = closing.wait_for(|c| *c).await; } => {
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(limits.shutdown_grace, conn.as_mut()).await {
                Ok(outcome) => outcome,
                Err(_) => return,
            }
        }
    };
    if let Err(e) = outcome {
        debug!(peer = %peer, error = %e, "Connection ended with an error.");
    }
}

/// One request: the peer in its extensions, the body limit, and the in-flight count
/// (held until the response body has been sent or dropped).
async fn handle(
    mut app: axum::Router,
    peer: SocketAddr,
    limits: ConnLimits,
    in_flight: Arc<AtomicUsize>,
    request: Request<hyper::body::Incoming>,
) -> Response<Body> {
    let guard = InFlight::new(in_flight);
    let mut request = match limits.max_request_body_bytes {
        Some(max) => {
            let declared = request
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|n| n > max) {
                return too_large(max);
            }
            let cap = usize::try_from(max).unwrap_or(usize::MAX);
            request.map(|body| Body::new(http_body_util::Limited::new(body, cap)))
        }
        None => request.map(Body::new),
    };
    request.extensions_mut().insert(ConnectInfo(peer));
    let response = match app.call(request).await {
        Ok(response) => response,
        Err(never) => match never {},
    };
    response.map(move |body| {
        Body::new(body.map_frame(move |frame| {
            let _held = &guard;
            frame
        }))
    })
}

fn too_large(max: u64) -> Response<Body> {
    let body = serde_json::json!({
        "error": format!("the request body is larger than this listener's limit of {max} bytes")
    });
    let mut response = Response::new(Body::from(body.to_string()));
    *response.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    response.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
    response
}

/// Counts a request in flight on its connection while alive.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn new(count: Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(count)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Open connections, in total and per peer address.
#[derive(Debug, Default)]
struct Counts {
    inner: Mutex<CountsInner>,
}

#[derive(Debug, Default)]
struct CountsInner {
    total: usize,
    per_peer: HashMap<IpAddr, usize>,
}

impl Counts {
    fn lock(&self) -> std::sync::MutexGuard<'_, CountsInner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A slot for a new connection from `peer`, unless a cap is reached.
    fn admit(self: &Arc<Self>, peer: IpAddr, limits: &ConnLimits) -> Option<Permit> {
        let mut inner = self.lock();
        let from_peer = inner.per_peer.get(&peer).copied().unwrap_or(0);
        if inner.total >= limits.max_connections || from_peer >= limits.max_connections_per_peer {
            return None;
        }
        inner.total += 1;
        inner.per_peer.insert(peer, from_peer + 1);
        Some(Permit { counts: self.clone(), peer })
    }

    fn current(&self, peer: IpAddr) -> (usize, usize) {
        let inner = self.lock();
        (inner.total, inner.per_peer.get(&peer).copied().unwrap_or(0))
    }

    fn current_total(&self) -> usize {
        self.lock().total
    }
}

/// A connection's slot; given back when the connection (or its upgraded tunnel) closes.
#[derive(Debug)]
struct Permit {
    counts: Arc<Counts>,
    peer: IpAddr,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut inner = self.counts.lock();
        inner.total = inner.total.saturating_sub(1);
        if let Some(n) = inner.per_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                inner.per_peer.remove(&self.peer);
            }
        }
    }
}

/// When each refused peer was last logged: at most once a minute each.
#[derive(Debug, Default)]
struct Refusals {
    logged: HashMap<IpAddr, Instant>,
}

impl Refusals {
    const EVERY: Duration = Duration::from_secs(60);
    /// Peers remembered at most; past it, the ones logged over a minute ago are forgotten.
    const MAX_PEERS: usize = 4096;

    fn should_log(&mut self, peer: IpAddr) -> bool {
        let now = Instant::now();
        if self.logged.get(&peer).is_some_and(|at| now.duration_since(*at) < Self::EVERY) {
            return false;
        }
        if self.logged.len() >= Self::MAX_PEERS {
            self.logged.retain(|_, at| now.duration_since(*at) < Self::EVERY);
            if self.logged.len() >= Self::MAX_PEERS {
                return false;
            }
        }
        self.logged.insert(peer, now);
        true
    }
}

/// A connection's socket with its slot, and the idle timeout: a read that waits while no
/// request is in flight fails once nothing moved for `idle` (hyper then closes it).
struct Guarded {
    stream: TcpStream,
    _permit: Permit,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    in_flight: Arc<AtomicUsize>,
}

impl Guarded {
    fn new(stream: TcpStream, permit: Permit, idle: Duration, in_flight: Arc<AtomicUsize>) -> Self {
        let deadline = Box::pin(tokio::time::sleep(idle));
        Self { stream, _permit: permit, idle, deadline, in_flight }
    }

    fn moved(&mut self) {
        let next = Instant::now() + self.idle;
        // Resetting costs a timer-wheel update: only when it moves by a second or more.
        if next.duration_since(self.deadline.deadline()) >= Duration::from_secs(1) {
            self.deadline.as_mut().reset(next);
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(outcome) => {
                if buf.filled().len() > before {
                    this.moved();
                }
                Poll::Ready(outcome)
            }
            Poll::Pending => {
                if this.deadline.as_mut().poll(cx).is_ready() {
                    if this.in_flight.load(Ordering::SeqCst) == 0 {
                        return Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "idle connection")));
                    }
                    // A request is being answered: look again one idle period later.
                    this.deadline.as_mut().reset(Instant::now() + this.idle);
                    let _ = this.deadline.as_mut().poll(cx);
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = ready!(Pin::new(&mut this.stream).poll_write(cx, data));
        if matches!(written, Ok(n) if n > 0) {
            this.moved();
        }
        Poll::Ready(written)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = ready!(Pin::new(&mut this.stream).poll_write_vectored(cx, bufs));
        if matches!(written, Ok(n) if n > 0) {
            this.moved();
        }
        Poll::Ready(written)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, so that the caps above, not the
/// process's fd limit, decide how many connections are open; logs both. Returns the
/// limits (soft, hard) after the change.
pub fn raise_fd_limit() -> io::Result<(u64, u64)> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(io::Error::from)?;
    }
    let (now_soft, now_hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    info!(soft_before = soft, soft = now_soft, hard = now_hard, "Open-file limit (RLIMIT_NOFILE) set.");
    Ok((now_soft, now_hard))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::{get, post};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn limits() -> ConnLimits {
        ConnLimits {
            max_connections: 6,
            max_connections_per_peer: 3,
            header_timeout: Duration::from_millis(500),
            idle_timeout: Duration::from_secs(1),
            max_header_bytes: 8192,
            max_request_body_bytes: Some(1024),
            shutdown_grace: Duration::from_secs(2),
        }
    }

    /// Serves a small app (`/peer`, `/slow`, `/echo`, and `CONNECT` tunnels that echo).
    async fn start(limits: ConnLimits) -> (SocketAddr, watch::Sender<bool>, tokio::task::JoinHandle<io::Result<()>>) {
        let app = axum::Router::new()
            .route("/peer", get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.ip().to_string() }))
            .route(
                "/slow",
                get(|| async {
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    "done"
                }),
            )
            .route("/echo", post(|body: axum::body::Bytes| async move { body.len().to_string() }))
            .fallback(|request: Request<Body>| async move {
                if request.method() != axum::http::Method::CONNECT {
                    return Response::builder().status(404).body(Body::empty()).expect("response");
                }
                tokio::spawn(async move {
                    if let Ok(upgraded) = hyper::upgrade::on(request).await {
                        let mut io = TokioIo::new(upgraded);
                        let mut buf = [0u8; 64];
                        while let Ok(n) = io.read(&mut buf).await {
                            if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                });
                Response::new(Body::empty())
            });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, mut stopped) = watch::channel(false);
        let server = tokio::spawn(serve(listener, limits, app, async move {
            let _ = stopped.wait_for(|s| *s).await;
        }));
        (addr, stop, server)
    }

    /// Reads until the peer closes (`None` when it did not within `within`).
    async fn closed_within(stream: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
        let mut got = Vec::new();
        let read = tokio::time::timeout(within, stream.read_to_end(&mut got)).await;
        match read {
            Ok(_) => Some(got),
            Err(_) => None,
        }
    }

    async fn request(addr: SocketAddr, raw: &str) -> String {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(raw.as_bytes()).await.expect("write");
        let got = closed_within(&mut stream, Duration::from_secs(5)).await.expect("answer and close");
        String::from_utf8_lossy(&got).into_owned()
    }

    #[tokio::test]
    async fn the_peer_is_in_the_extensions_and_the_body_is_limited() {
        let (addr, _stop, _server) = start(limits()).await;
        let answer = request(addr, "GET /peer HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("127.0.0.1"), "{answer}");
        let big = "x".repeat(2000);
        let answer = request(
            addr,
            &format!("POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 2000\r\nconnection: close\r\n\r\n{big}"),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
        let chunked = format!("POST /echo HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n7d0\r\n{big}\r\n0\r\n\r\n");
        let answer = request(addr, &chunked).await;
        assert!(answer.starts_with("HTTP/1.1 413"), "a chunked body past the limit: {answer}");
        let small =
            request(addr, "POST /echo HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello")
                .await;
        assert!(small.starts_with("HTTP/1.1 200") && small.ends_with('5'), "{small}");
    }

    #[tokio::test]
    async fn connections_past_the_per_peer_cap_are_closed_at_once_and_slots_come_back() {
        let (addr, _stop, _server) = start(limits()).await;
        let mut held = Vec::new();
        for _ in 0..3 {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            // A request answered proves the slot is taken (accepted and served).
            s.write_all(b"GET /peer HTTP/1.1\r\nhost: x\r\n\r\n").await.expect("write");
            let mut buf = [0u8; 12];
            s.read_exact(&mut buf).await.expect("answer");
            assert_eq!(&buf, b"HTTP/1.1 200");
            held.push(s);
        }
        let mut over = TcpStream::connect(addr).await.expect("connect is accepted");
        let got = closed_within(&mut over, Duration::from_secs(2)).await.expect("closed at once");
        assert!(got.is_empty(), "nothing is served past the cap: {got:?}");
        drop(held);
        // Slots come back when connections close.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.write_all(b"GET /peer HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await.expect("write");
            let got = closed_within(&mut s, Duration::from_secs(2)).await.unwrap_or_default();
            if got.starts_with(b"HTTP/1.1 200") {
                break;
            }
            assert!(Instant::now() < deadline, "slots never came back");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn half_sent_headers_and_idle_connections_are_closed() {
        let (addr, _stop, _server) = start(limits()).await;
        let mut half = TcpStream::connect(addr).await.expect("connect");
        half.write_all(b"GET /peer HTTP/1.1\r\nhost: x\r\nx-slow: ").await.expect("write");
        let started = Instant::now();
        closed_within(&mut half, Duration::from_secs(5)).await.expect("a half-sent head is closed");
        assert!(started.elapsed() >= Duration::from_millis(400), "closed before the header timeout");
        let mut silent = TcpStream::connect(addr).await.expect("connect");
        closed_within(&mut silent, Duration::from_secs(5)).await.expect("a silent connection is closed");
        // A slow answer is not idle: the request in flight keeps its connection.
        let answer = request(addr, "GET /slow HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").await;
        assert!(answer.ends_with("done"), "{answer}");
    }

    #[tokio::test]
    async fn connect_tunnels_work_and_close_when_idle() {
        let (addr, _stop, _server) = start(limits()).await;
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"CONNECT example.test:443 HTTP/1.1\r\nhost: example.test:443\r\n\r\n").await.expect("write");
        let mut head = vec![0u8; 12];
        s.read_exact(&mut head).await.expect("answer");
        assert_eq!(&head, b"HTTP/1.1 200");
        let mut rest = [0u8; 256];
        let n = s.read(&mut rest).await.expect("head");
        assert!(String::from_utf8_lossy(&rest[..n]).ends_with("\r\n\r\n"));
        s.write_all(b"ping").await.expect("tunnel write");
        let mut echo = [0u8; 4];
        s.read_exact(&mut echo).await.expect("tunnel read");
        assert_eq!(&echo, b"ping");
        closed_within(&mut s, Duration::from_secs(5)).await.expect("an idle tunnel is closed");
    }

    #[tokio::test]
    async fn shutdown_lets_requests_in_flight_finish() {
        let (addr, stop, server) = start(limits()).await;
        let slow = tokio::spawn(request(addr, "GET /slow HTTP/1.1\r\nhost: x\r\n\r\n"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.send(true).expect("stop");
        let answer = slow.await.expect("join");
        assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("done"), "{answer}");
        tokio::time::timeout(Duration::from_secs(3), server).await.expect("server ends").expect("join").expect("ok");
        assert!(TcpStream::connect(addr).await.is_err(), "the listener is closed");
    }

    #[tokio::test]
    async fn binds_an_address_the_host_does_not_have() {
        // TEST-NET-2: never a local address here.
        let listener = bind_gateway("198.51.100.7:0".parse().expect("addr")).expect("freebind bind");
        let local = listener.local_addr().expect("local addr");
        assert_eq!(local.ip().to_string(), "198.51.100.7");
        assert_ne!(local.port(), 0);
    }

    #[tokio::test]
    async fn accepts_on_a_local_address() {
        let listener = bind_gateway("127.0.0.1:0".parse().expect("addr")).expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (accepted, connected) = tokio::join!(listener.accept(), tokio::net::TcpStream::connect(addr));
        accepted.expect("accept");
        connected.expect("connect");
    }
}
