//! The egress proxy: an HTTP proxy on the engine networks' gateway addresses (at
//! `gateway.proxy_port`) through which agents reach the destinations of their allow-list
//! (`agents.egress_allow`, or the spawn's `egress_allow`), and nothing else.
//!
//! - The caller is the live agent whose container has the connection's peer address
//!   ([`AgentManager::agent_for_peer`]); any other peer is refused with 403. Host-network
//!   agents cannot be told apart from the host, so they cannot use the proxy (and get no
//!   proxy variables).
//! - `CONNECT host:port` opens a tunnel to an allowed destination (200, then bytes both
//!   ways until either side closes or [`IDLE_TIMEOUT`] passes without a byte).
//! - An absolute-form request (`GET http://host/path`, what clients send through
//!   `HTTP_PROXY`) is forwarded to an allowed destination over a connection of its own;
//!   the answer (a redirect too) is passed back as it is.
//! - A destination not on the list is refused with 403 and a body that names it and how
//!   to allow it, and an `egress_denied` event for the agent (at most one per agent and
//!   destination per [`DENIAL_EVENT_INTERVAL`]).
//! - The destination is matched as the client named it ([`agent_manager::egress`]) and
//!   resolved by the daemon. Whatever the list says, the daemon's own ports (the API's,
//!   the model gateway's, the proxy's) on any address of this host are never connected
//!   to.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use agent_manager::egress::{Destination, EgressList};
use agent_manager::{Agent, AgentManager, GatewayEndpoints};
use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderName, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use backend_core::ExecutionBackend;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

/// How long resolving and connecting to a destination may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a tunnel (or a forwarded request waiting for its answer) may go without a
/// byte in either direction before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// At most one `egress_denied` event per agent and destination in this time.
pub const DENIAL_EVENT_INTERVAL: Duration = Duration::from_secs(60);

/// The most (agent, destination) pairs remembered for [`DENIAL_EVENT_INTERVAL`]; past it,
/// refusals beyond are answered but not recorded until old ones expire.
const MAX_DENIALS_REMEMBERED: usize = 4096;

/// The proxy's state: the manager (who the caller is, its list, the events) and what is
/// never connected to.
pub struct EgressProxy {
    manager: Arc<AgentManager<dyn ExecutionBackend>>,
    /// The daemon's own ports: the API's, the model gateway's and the proxy's.
    protected_ports: Vec<u16>,
    /// The daemon's own addresses besides loopback and this host's interfaces: the API's
    /// and the gateways'.
    own_addresses: Vec<IpAddr>,
    /// The host's address on each network, where the engines' host aliases point.
    endpoints: GatewayEndpoints,
    denials: Mutex<HashMap<(String, String), Instant>>,
    connect_timeout: Duration,
    idle_timeout: Duration,
}

impl std::fmt::Debug for EgressProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EgressProxy")
            .field("protected_ports", &self.protected_ports)
            .field("own_addresses", &self.own_addresses)
            .finish_non_exhaustive()
    }
}

impl EgressProxy {
    /// A proxy for `manager`'s agents, which never connects to `api` or the ports of
    /// `endpoints` on this host.
    pub fn new(
        manager: Arc<AgentManager<dyn ExecutionBackend>>,
        api: SocketAddr,
        endpoints: &GatewayEndpoints,
    ) -> Self {
        let own_addresses = [Some(api.ip()), endpoints.addresses.internet, endpoints.addresses.isolated]
            .into_iter()
            .flatten()
            .collect();
        Self {
            manager,
            protected_ports: vec![api.port(), endpoints.model_port, endpoints.proxy_port],
            own_addresses,
            endpoints: *endpoints,
            denials: Mutex::new(HashMap::new()),
            connect_timeout: CONNECT_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
        }
    }

    /// Other timeouts (tests).
    pub fn with_timeouts(mut self, connect: Duration, idle: Duration) -> Self {
        self.connect_timeout = connect;
        self.idle_timeout = idle;
        self
    }

    /// Whether `addr` is one of the daemon's own listeners: a protected port on an
    /// address of this host.
    fn is_own(&self, addr: SocketAddr) -> bool {
        if !self.protected_ports.contains(&addr.port()) {
            return false;
        }
        let ip = addr.ip().to_canonical();
        ip.is_loopback()
            || ip.is_unspecified()
            || self.own_addresses.iter().any(|own| own.to_canonical() == ip)
            // An address this host has can be bound (without IP_FREEBIND).
            || std::net::UdpSocket::bind((ip, 0)).is_ok()
    }

    /// Whether this refusal should be recorded as an event (at most once per agent and
    /// destination per [`DENIAL_EVENT_INTERVAL`]).
    fn should_record(&self, agent: &Agent, destination: &str) -> bool {
        let mut denials = self.denials.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let key = (agent.id.clone(), destination.to_owned());
        if denials.get(&key).is_some_and(|at| now.duration_since(*at) < DENIAL_EVENT_INTERVAL) {
            return false;
        }
        if denials.len() >= MAX_DENIALS_REMEMBERED {
            denials.retain(|_, at| now.duration_since(*at) < DENIAL_EVENT_INTERVAL);
            if denials.len() >= MAX_DENIALS_REMEMBERED {
                return false;
            }
        }
        denials.insert(key, now);
        true
    }
}

/// The proxy's router: every request goes to its one handler.
pub fn router(proxy: Arc<EgressProxy>) -> Router {
    Router::new().fallback(handle).with_state(proxy)
}

/// Binds the proxy's port on every gateway address (each once).
pub fn bind(endpoints: &GatewayEndpoints) -> Result<Vec<TcpListener>> {
    let mut addresses: Vec<IpAddr> =
        [endpoints.addresses.internet, endpoints.addresses.isolated].into_iter().flatten().collect();
    addresses.dedup();
    addresses
        .into_iter()
        .map(|ip| {
            let addr = SocketAddr::new(ip, endpoints.proxy_port);
            crate::listen::bind_gateway(addr).with_context(|| {
                format!("cannot listen on {addr} for the egress proxy (gateway.proxy_port = {})", endpoints.proxy_port)
            })
        })
        .collect()
}

/// Serves the proxy on `listeners` in `servers` until `shutdown` turns true.
pub fn serve(
    listeners: Vec<TcpListener>,
    proxy: Arc<EgressProxy>,
    limits: crate::listen::ConnLimits,
    shutdown: &watch::Receiver<bool>,
    servers: &mut JoinSet<io::Result<()>>,
) {
    for listener in listeners {
        let address = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
        info!(address = %address, "Serving the egress proxy.");
        let mut shutdown = shutdown.clone();
        let server = crate::listen::serve(listener, limits, router(proxy.clone()), async move {
            let _ = shutdown.wait_for(|s| *s).await;
        });
        servers.spawn(server);
    }
}

fn text(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body + "\n").into_response()
}

async fn handle(
    State(proxy): State<Arc<EgressProxy>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    let peer_ip = peer.ip().to_canonical();
    let Some(agent) = proxy.manager.agent_for_peer(peer_ip).await else {
        debug!(peer = %peer, "Egress refused to a peer that is no agent.");
        return text(
            StatusCode::FORBIDDEN,
            format!(
                "agentd's egress proxy serves agents only: {peer_ip} is not the address of a running agent's container \
                 (agents on the host network cannot use the proxy)"
            ),
        );
    };
    let connect = request.method() == Method::CONNECT;
    let (host, port) = match target(request.uri(), connect) {
        Ok(target) => target,
        Err(why) => return text(StatusCode::BAD_REQUEST, format!("agentd's egress proxy: {why}")),
    };
    let destination = match Destination::new(&host, port) {
        Ok(destination) => destination,
        Err(why) => {
            return text(StatusCode::BAD_REQUEST, format!("agentd's egress proxy: {host:?} is no destination: {why}"))
        }
    };
    let list = EgressList::parse(&agent.spec.egress_allow).unwrap_or_default();
    if !list.allows(&destination) {
        return deny(&proxy, &agent, &destination);
    }
    let stream = match open(&proxy, &agent, &destination).await {
        Ok(stream) => stream,
        Err(refusal) => return refusal,
    };
    if connect {
        tunnel(proxy, agent, destination, stream, request)
    } else {
        forward(proxy, agent, destination, stream, request).await
    }
}

/// The destination of a request: the authority of a CONNECT, or the host of an
/// absolute `http://` URL (port 80 by default).
fn target(uri: &Uri, connect: bool) -> Result<(String, u16), String> {
    let authority = uri.authority().ok_or(if connect {
        "CONNECT needs a destination HOST:PORT"
    } else {
        "send CONNECT HOST:PORT, or a request for an absolute http:// URL; this is a proxy, not a web server"
    })?;
    if authority.as_str().contains('@') {
        return Err("a destination with user information is not accepted".into());
    }
    if connect {
        let port = authority.port_u16().ok_or("CONNECT needs a destination HOST:PORT, with the port")?;
        return Ok((authority.host().to_owned(), port));
    }
    match uri.scheme_str() {
        Some("http") => Ok((authority.host().to_owned(), authority.port_u16().unwrap_or(80))),
        Some("https") => Err("for https:// send CONNECT HOST:443 and speak TLS through the tunnel".into()),
        other => Err(format!("the scheme {other:?} is not proxied; use http:// or CONNECT")),
    }
}

/// The 403 for a destination off the list, with an event for the agent (rate-limited).
fn deny(proxy: &Arc<EgressProxy>, agent: &Agent, destination: &Destination) -> Response {
    let shown = destination.to_string();
    if proxy.should_record(agent, &shown) {
        let manager = proxy.manager.clone();
        let (agent, shown) = (agent.clone(), shown.clone());
        tokio::spawn(async move {
            if let Err(e) = manager.note_egress_denied(&agent, &shown).await {
                warn!(agent_id = %agent.id, destination = %shown, error = %e, "Cannot record the egress refusal.");
            }
        });
    }
    let entry = if agent_manager::egress::DEFAULT_PORTS.contains(&destination.port()) {
        destination.host()
    } else {
        shown.clone()
    };
    text(
        StatusCode::FORBIDDEN,
        format!(
            "agentd's egress proxy refused {shown}: it is not on the egress allow-list of agent {}. To allow it, \
             spawn the agent with `--egress-allow {entry}` (API: \"egress_allow\": [\"{entry}\"]) or add it to \
             agents.egress_allow in the daemon's configuration.",
            agent.name
        ),
    )
}

/// The names the engines give the host inside containers (Docker's `host-gateway`
/// alias, Podman's own): the proxy resolves them to the host's address on the agent's
/// network, as the container would.
pub const HOST_ALIASES: [&str; 2] = ["host.docker.internal", "host.containers.internal"];

/// Resolves the destination and connects to its first address that answers, never to
/// the daemon's own ports.
async fn open(proxy: &EgressProxy, agent: &Agent, destination: &Destination) -> Result<TcpStream, Response> {
    let shown = destination.to_string();
    let host_alias = HOST_ALIASES.contains(&destination.host().as_str());
    let work = async {
        let addresses: Vec<SocketAddr> = match destination.ip() {
            Some(ip) => vec![SocketAddr::new(ip, destination.port())],
            None if host_alias => match proxy.endpoints.address_for(agent.spec.network) {
                Some(ip) => vec![SocketAddr::new(ip, destination.port())],
                None => Vec::new(),
            },
            None => tokio::net::lookup_host((destination.host(), destination.port()))
                .await
                .map_err(|e| {
                    text(StatusCode::BAD_GATEWAY, format!("agentd's egress proxy cannot resolve {shown}: {e}"))
                })?
                .collect(),
        };
        let (own, usable): (Vec<SocketAddr>, Vec<SocketAddr>) = addresses.into_iter().partition(|a| proxy.is_own(*a));
        if usable.is_empty() {
            let why = if own.is_empty() {
                format!("agentd's egress proxy: {shown} has no address")
            } else {
                format!("agentd's egress proxy never connects to the daemon's own ports, whatever the allow-list says: {shown}")
            };
            return Err(text(if own.is_empty() { StatusCode::BAD_GATEWAY } else { StatusCode::FORBIDDEN }, why));
        }
        let mut last = None;
        for address in usable {
            match TcpStream::connect(address).await {
                Ok(stream) => return Ok(stream),
                Err(e) => last = Some(format!("{address}: {e}")),
            }
        }
        Err(text(
            StatusCode::BAD_GATEWAY,
            format!("agentd's egress proxy cannot connect to {shown}: {}", last.unwrap_or_default()),
        ))
    };
    match tokio::time::timeout(proxy.connect_timeout, work).await {
        Ok(outcome) => outcome,
        Err(_) => Err(text(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "agentd's egress proxy could not connect to {shown} within {} s",
                proxy.connect_timeout.as_secs_f64()
            ),
        )),
    }
}

/// Answers a CONNECT with 200 and carries bytes both ways once the client's connection
/// is handed over.
fn tunnel(
    proxy: Arc<EgressProxy>,
    agent: Agent,
    destination: Destination,
    stream: TcpStream,
    mut request: Request,
) -> Response {
    let upgrade = hyper::upgrade::on(&mut request);
    let idle = proxy.idle_timeout;
    tokio::spawn(async move {
        let upgraded = match upgrade.await {
            Ok(upgraded) => upgraded,
            Err(e) => {
                debug!(agent_id = %agent.id, destination = %destination, error = %e, "The client left before its tunnel opened.");
                return;
            }
        };
        debug!(agent_id = %agent.id, agent = %agent.name, destination = %destination, "Egress tunnel opened.");
        let activity = Activity::new();
        let mut client = Watched { inner: TokioIo::new(upgraded), activity: activity.clone() };
        let mut server = Watched { inner: stream, activity: activity.clone() };
        tokio::select! {
            outcome = tokio::io::copy_bidirectional(&mut client, &mut server) => match outcome {
                Ok((up, down)) => debug!(agent_id = %agent.id, destination = %destination, up, down, "Egress tunnel closed."),
                Err(e) => debug!(agent_id = %agent.id, destination = %destination, error = %e, "Egress tunnel broke."),
            },
            () = activity.idle(idle) => {
                debug!(agent_id = %agent.id, destination = %destination, idle_secs = idle.as_secs(), "Egress tunnel closed after its idle timeout.");
            }
        }
    });
    StatusCode::OK.into_response()
}

/// Headers that belong to one connection, never forwarded.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Forwards an absolute-form request over `stream` and passes the answer back.
async fn forward(
    proxy: Arc<EgressProxy>,
    agent: Agent,
    destination: Destination,
    stream: TcpStream,
    request: Request,
) -> Response {
    let shown = destination.to_string();
    let (sender, connection) = match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
        Ok(pair) => pair,
        Err(e) => return text(StatusCode::BAD_GATEWAY, format!("agentd's egress proxy: {shown}: {e}")),
    };
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!(error = %e, "A forwarded request's connection ended with an error.");
        }
    });
    let (mut parts, body) = request.into_parts();
    let authority = parts.uri.authority().map(|a| a.to_string()).unwrap_or_default();
    let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    parts.uri = match path.parse() {
        Ok(uri) => uri,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("agentd's egress proxy: bad path {path:?}: {e}")),
    };
    strip_hop_by_hop(&mut parts.headers);
    if !parts.headers.contains_key(header::HOST) {
        if let Ok(value) = authority.parse() {
            parts.headers.insert(header::HOST, value);
        }
    }
    parts.extensions = Default::default();
    let outgoing = axum::http::Request::from_parts(parts, body);
    let mut sender = sender;
    debug!(agent_id = %agent.id, destination = %shown, method = %outgoing.method(), "Egress request forwarded.");
    match tokio::time::timeout(proxy.idle_timeout, sender.send_request(outgoing)).await {
        Ok(Ok(response)) => {
            let (mut parts, body) = response.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, Body::new(body))
        }
        Ok(Err(e)) => text(StatusCode::BAD_GATEWAY, format!("agentd's egress proxy: {shown} did not answer: {e}")),
        Err(_) => text(
            StatusCode::GATEWAY_TIMEOUT,
            format!("agentd's egress proxy: {shown} did not answer within {} s", proxy.idle_timeout.as_secs()),
        ),
    }
}

/// When a tunnel last carried a byte, shared by both of its ends.
#[derive(Clone)]
struct Activity {
    start: Instant,
    /// Milliseconds after `start`.
    last: Arc<AtomicU64>,
}

impl Activity {
    fn new() -> Self {
        Self { start: Instant::now(), last: Arc::new(AtomicU64::new(0)) }
    }

    fn touch(&self) {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(now, Ordering::Relaxed);
    }

    /// Completes once `limit` passed without a byte.
    async fn idle(&self, limit: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last.load(Ordering::Relaxed));
            let quiet = last.elapsed();
            if quiet >= limit {
                return;
            }
            tokio::time::sleep(limit - quiet).await;
        }
    }
}

/// A stream whose reads and writes count as activity.
struct Watched<T> {
    inner: T,
    activity: Activity,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
