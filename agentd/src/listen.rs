//! The listeners agentd offers its containers (the model gateway, the egress proxy): bound
//! on the engine networks' gateway addresses, never on the API's.

use std::io;
use std::net::{IpAddr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

/// The listen backlog of a gateway listener.
const BACKLOG: i32 = 1024;

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

#[cfg(test)]
mod tests {
    use super::*;

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
