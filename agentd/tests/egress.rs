//! The egress proxy on the mock backend: callers are told apart by their peer address
//! (the mock gives each container a loopback address of its own, which a test connects
//! from), allowed destinations are tunnelled or forwarded, others refused with 403 and an
//! `egress_denied` event, and the daemon's own ports are never reached.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agent_manager::{AgentKind, AgentManager, EventKind, GatewayEndpoints, ManagerConfig, NewAgent, Store};
use agentd::egress::{router, EgressProxy};
use backend_core::{ExecutionBackend, NetworkGateways, NetworkPolicy, OwnershipLabels};
use backend_mock::{MockBackend, MockEngine, PLAIN_IMAGE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

const PATIENCE: Duration = Duration::from_secs(10);

struct World {
    engine: MockEngine,
    manager: Arc<AgentManager<dyn ExecutionBackend>>,
    proxy: SocketAddr,
    /// A listener that stands for the daemon's API; it must never be connected to.
    api: TcpListener,
}

/// A test server on 127.0.0.1 that greets each connection, then echoes lines back, and
/// counts its connections.
async fn echo_server(greeting: &'static str) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let _ = stream.write_all(greeting.as_bytes()).await;
                let mut buf = [0u8; 1024];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    let mut reply = b"echo: ".to_vec();
                    reply.extend_from_slice(&buf[..n]);
                    if stream.write_all(&reply).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (port, accepted)
}

/// A plain HTTP server: `/hello` answers a body, `/moved` a redirect.
async fn http_server() -> u16 {
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/hello",
            get(|headers: axum::http::HeaderMap| async move {
                let host = headers.get("host").and_then(|h| h.to_str().ok()).unwrap_or("").to_owned();
                let proxy_auth = headers.contains_key("proxy-authorization");
                format!("hello via proxy; host {host}; proxy-authorization forwarded: {proxy_auth}")
            }),
        )
        .route(
            "/moved",
            get(|| async { (axum::http::StatusCode::FOUND, [("location", "http://elsewhere.example/")], "moved") }),
        );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    port
}

impl World {
    async fn new() -> Self {
        Self::with_gateways(NetworkGateways::default()).await
    }

    /// A world whose networks have these gateway addresses.
    async fn with_gateways(addresses: NetworkGateways) -> Self {
        let engine = MockEngine::new();
        let store = Store::in_memory().await.expect("store");
        let owner = OwnershipLabels::new("agentd", "egress-test").expect("labels");
        let backend: Arc<dyn ExecutionBackend> = Arc::new(MockBackend::new(engine.clone(), owner));
        let mut config = ManagerConfig::default();
        config.defaults.kind = AgentKind::Image;
        config.defaults.image = PLAIN_IMAGE.into();
        let manager: Arc<AgentManager<dyn ExecutionBackend>> = Arc::new(AgentManager::new(backend, store, config));
        let api = TcpListener::bind("127.0.0.1:0").await.expect("api");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy");
        let proxy = listener.local_addr().expect("addr");
        let endpoints = GatewayEndpoints { addresses, model_port: 1, proxy_port: proxy.port() };
        let state = EgressProxy::new(manager.clone(), api.local_addr().expect("addr"), &endpoints)
            .with_timeouts(Duration::from_secs(2), Duration::from_millis(500));
        let app = router(Arc::new(state)).into_make_service_with_connect_info::<SocketAddr>();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self { engine, manager, proxy, api }
    }

    /// Spawns an agent allowed `allow`; returns its container's address.
    async fn agent(&self, name: &str, allow: &[String]) -> IpAddr {
        let new = NewAgent {
            name: name.into(),
            network: Some(NetworkPolicy::Internet),
            egress_allow: Some(allow.to_vec()),
            ..NewAgent::default()
        };
        let agent = self.manager.spawn(new).await.expect("spawn").agent;
        self.engine.session_address(&agent.session).expect("the mock gives the container an address")
    }

    /// A connection to the proxy from `from`.
    async fn connect_from(&self, from: IpAddr) -> TcpStream {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.bind(SocketAddr::new(from, 0)).expect("bind the agent's address");
        socket.connect(self.proxy).await.expect("connect to the proxy")
    }
}

/// Reads an HTTP response head (and its body, by Content-Length): status, head, body.
async fn read_response(stream: &mut TcpStream) -> (u16, String, String) {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await.expect("answer in time").expect("read");
        assert!(n > 0, "the proxy closed before answering: {:?}", String::from_utf8_lossy(&data));
        data.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&data[..head_end]).into_owned();
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("status");
    let length: usize = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
        .unwrap_or(0);
    let mut body = data[head_end..].to_vec();
    while body.len() < length {
        let n = tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await.expect("body in time").expect("read");
        assert!(n > 0, "the body ended early");
        body.extend_from_slice(&buf[..n]);
    }
    (status, head, String::from_utf8_lossy(&body).into_owned())
}

async fn connect_request(stream: &mut TcpStream, target: &str) -> (u16, String, String) {
    let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send CONNECT");
    read_response(stream).await
}

async fn read_exactly(stream: &mut TcpStream, want: &str) {
    let mut got = vec![0u8; want.len()];
    tokio::time::timeout(PATIENCE, stream.read_exact(&mut got)).await.expect("bytes in time").expect("read");
    assert_eq!(String::from_utf8_lossy(&got), want);
}

async fn denials(world: &World, agent: &str) -> Vec<String> {
    let agent = world.manager.store().find_agent(agent).expect("agent");
    let events = world.manager.store().list_events(Some(&agent.id), 0, 1000).await.expect("events");
    events.into_iter().filter(|e| e.kind == EventKind::EgressDenied).map(|e| e.detail).collect()
}

#[tokio::test]
async fn an_allowed_destination_is_tunnelled_both_ways() {
    let world = World::new().await;
    let (port, accepted) = echo_server("hello from the allowed server\n").await;
    let from = world.agent("tunneller", &[format!("127.0.0.1:{port}")]).await;
    let mut stream = world.connect_from(from).await;
    let (status, head, _) = connect_request(&mut stream, &format!("127.0.0.1:{port}")).await;
    assert_eq!(status, 200, "{head}");
    read_exactly(&mut stream, "hello from the allowed server\n").await;
    stream.write_all(b"ping\n").await.expect("write");
    read_exactly(&mut stream, "echo: ping\n").await;
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    assert!(denials(&world, "tunneller").await.is_empty());
}

#[tokio::test]
async fn names_match_case_insensitively_with_a_trailing_dot() {
    let world = World::new().await;
    let (port, _) = echo_server("hi\n").await;
    let from = world.agent("named", &[format!("localhost:{port}")]).await;
    for target in [format!("LocalHost:{port}"), format!("localhost.:{port}")] {
        let mut stream = world.connect_from(from).await;
        let (status, head, body) = connect_request(&mut stream, &target).await;
        assert_eq!(status, 200, "{target}: {head}{body}");
        read_exactly(&mut stream, "hi\n").await;
    }
}

#[tokio::test]
async fn another_destination_is_refused_with_403_and_one_event() {
    let world = World::new().await;
    let (allowed, _) = echo_server("allowed\n").await;
    let (other, other_accepted) = echo_server("other\n").await;
    let from = world.agent("refused", &[format!("127.0.0.1:{allowed}")]).await;
    for _ in 0..3 {
        let mut stream = world.connect_from(from).await;
        let (status, head, body) = connect_request(&mut stream, &format!("127.0.0.1:{other}")).await;
        assert_eq!(status, 403, "{head}{body}");
        assert!(body.contains(&format!("127.0.0.1:{other}")), "the refusal names the host: {body}");
        assert!(body.contains("--egress-allow") && body.contains("agents.egress_allow"), "{body}");
    }
    // A host on the default ports is refused too, and suggested without a port.
    let mut stream = world.connect_from(from).await;
    let (status, _, body) = connect_request(&mut stream, "example.com:443").await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("--egress-allow example.com`"), "{body}");
    // The event is stored once per destination and minute, whatever the number of tries.
    let mut found = Vec::new();
    for _ in 0..100 {
        found = denials(&world, "refused").await;
        if found.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let found_after = denials(&world, "refused").await;
    assert_eq!(found_after.len(), 2, "{found_after:?}");
    assert!(found.iter().any(|d| d.contains(&format!("127.0.0.1:{other}"))), "{found:?}");
    assert!(found.iter().any(|d| d.contains("example.com:443")), "{found:?}");
    assert_eq!(other_accepted.load(Ordering::SeqCst), 0, "the refused server was connected to");
}

#[tokio::test]
async fn an_unknown_peer_is_refused() {
    let world = World::new().await;
    let (port, accepted) = echo_server("x\n").await;
    world.agent("someone", &[format!("127.0.0.1:{port}")]).await;
    // 127.0.0.1 is no container's address (the host, or a host-network agent).
    let mut stream = TcpStream::connect(world.proxy).await.expect("connect");
    let (status, head, body) = connect_request(&mut stream, &format!("127.0.0.1:{port}")).await;
    assert_eq!(status, 403, "{head}{body}");
    assert!(body.contains("serves agents only") && body.contains("127.0.0.1"), "{body}");
    assert!(body.contains("host network"), "{body}");
    assert_eq!(accepted.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_ended_agent_is_refused() {
    let world = World::new().await;
    let (port, accepted) = echo_server("x\n").await;
    let from = world.agent("ended", &[format!("127.0.0.1:{port}")]).await;
    world.manager.stop("ended").await.expect("stop");
    let mut stream = world.connect_from(from).await;
    let (status, _, body) = connect_request(&mut stream, &format!("127.0.0.1:{port}")).await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(accepted.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn the_daemons_own_ports_are_never_connected_to() {
    let world = World::new().await;
    let api = world.api.local_addr().expect("addr").port();
    let proxy = world.proxy.port();
    let from = world
        .agent(
            "greedy",
            &[
                format!("127.0.0.1:{api}"),
                format!("localhost:{api}"),
                format!("127.0.0.1:{proxy}"),
                "127.0.0.1:1".into(),
            ],
        )
        .await;
    for target in
        [format!("127.0.0.1:{api}"), format!("localhost:{api}"), format!("127.0.0.1:{proxy}"), "127.0.0.1:1".into()]
    {
        let mut stream = world.connect_from(from).await;
        let (status, head, body) = connect_request(&mut stream, &target).await;
        assert_eq!(status, 403, "{target}: {head}{body}");
        assert!(body.contains("never connects to the daemon's own ports"), "{target}: {body}");
    }
    // Nothing reached the API's listener.
    let accepted = tokio::time::timeout(Duration::from_millis(200), world.api.accept()).await;
    assert!(accepted.is_err(), "the API's listener was connected to through the proxy");
}

#[tokio::test]
async fn absolute_form_requests_are_forwarded_without_following_redirects() {
    let world = World::new().await;
    let port = http_server().await;
    let from = world.agent("browser", &[format!("127.0.0.1:{port}")]).await;
    let mut stream = world.connect_from(from).await;
    let request = format!(
        "GET http://127.0.0.1:{port}/hello HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nProxy-Authorization: Basic eDp5\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("send");
    let (status, head, body) = read_response(&mut stream).await;
    assert_eq!(status, 200, "{head}{body}");
    assert!(body.contains(&format!("host 127.0.0.1:{port}")), "{body}");
    assert!(body.contains("proxy-authorization forwarded: false"), "{body}");
    // The same connection, keep-alive: a redirect comes back as it is.
    let request = format!("GET http://127.0.0.1:{port}/moved HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let (status, head, _) = read_response(&mut stream).await;
    assert_eq!(status, 302, "{head}");
    assert!(head.to_ascii_lowercase().contains("location: http://elsewhere.example/"), "{head}");

    // Refused the same way as a CONNECT.
    let mut stream = world.connect_from(from).await;
    stream.write_all(b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n").await.expect("send");
    let (status, _, body) = read_response(&mut stream).await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("example.com:80"), "{body}");
    // An origin-form request is no proxy request.
    let mut stream = world.connect_from(from).await;
    stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("send");
    let (status, _, body) = read_response(&mut stream).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("CONNECT"), "{body}");
}

#[tokio::test]
async fn an_idle_tunnel_is_closed() {
    let world = World::new().await;
    let (port, _) = echo_server("").await;
    let from = world.agent("idler", &[format!("127.0.0.1:{port}")]).await;
    let mut stream = world.connect_from(from).await;
    let (status, _, _) = connect_request(&mut stream, &format!("127.0.0.1:{port}")).await;
    assert_eq!(status, 200);
    // Traffic keeps it open past the idle timeout (500 ms here).
    for i in 0..4 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        stream.write_all(format!("{i}\n").as_bytes()).await.expect("write");
        read_exactly(&mut stream, &format!("echo: {i}\n")).await;
    }
    // Silence closes it.
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "an idle tunnel stayed open: {read:?}");
}

#[tokio::test]
async fn the_engines_host_aliases_are_the_gateway_of_the_agents_network() {
    // The host's address on the agent's (internet) network, as a container sees it.
    let gateway: IpAddr = "127.0.0.1".parse().expect("ip");
    let world = World::with_gateways(NetworkGateways { internet: Some(gateway), isolated: None }).await;
    let (port, accepted) = echo_server("hello from the host\n").await;
    let from = world
        .agent("aliased", &[format!("host.docker.internal:{port}"), format!("host.containers.internal:{port}")])
        .await;
    for alias in ["host.docker.internal", "Host.Containers.Internal"] {
        let mut stream = world.connect_from(from).await;
        let (status, head, body) = connect_request(&mut stream, &format!("{alias}:{port}")).await;
        assert_eq!(status, 200, "{alias}: {head}{body}");
        read_exactly(&mut stream, "hello from the host\n").await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    // The daemon's own ports stay out of reach under the alias too.
    let api = world.api.local_addr().expect("addr").port();
    let from = world.agent("aliased-api", &[format!("host.docker.internal:{api}")]).await;
    let mut stream = world.connect_from(from).await;
    let (status, _, body) = connect_request(&mut stream, &format!("host.docker.internal:{api}")).await;
    assert_eq!(status, 403, "{body}");
}
