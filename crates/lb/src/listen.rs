//! Opening the VIP listeners, through an injectable [`Binder`].
//!
//! Library code never binds fixed ports by itself: [`crate::LoadBalancer`] asks its binder for a
//! TCP listener or UDP socket on each `VIP:port`. The default [`FreebindBinder`] sets
//! `IP_FREEBIND` / `IPV6_FREEBIND` so a node can listen on a VIP before it owns it (a takeover then
//! needs no bind), `SO_REUSEADDR`, `IPV6_V6ONLY` for IPv6, and on TCP listeners `TCP_NODELAY` and
//! `SO_KEEPALIVE`, which Linux copies to every accepted socket (no per-connection setsockopt).
//! Tests inject a binder that listens on `127.0.0.1:0` and records what it bound.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol as SockProto, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, UdpSocket};

/// Opens listeners. Called inside the tokio runtime.
pub trait Binder: Send + Sync + 'static {
    /// A TCP listener for `addr` (a `VIP:port`).
    fn tcp(&self, addr: SocketAddr) -> io::Result<TcpListener>;
    /// A UDP socket for `addr` (a `VIP:port`); replies are sent from it.
    fn udp(&self, addr: SocketAddr) -> io::Result<UdpSocket>;
}

/// Keepalive on relayed connections: first probe after 60 s idle, every 10 s, 6 probes.
pub fn keepalive() -> TcpKeepalive {
    TcpKeepalive::new()
        .with_time(std::time::Duration::from_secs(60))
        .with_interval(std::time::Duration::from_secs(10))
        .with_retries(6)
}

/// The production binder: freebind, reuse-address, listen backlog 4096.
#[derive(Debug, Clone, Copy, Default)]
pub struct FreebindBinder;

fn socket(addr: SocketAddr, ty: Type, proto: SockProto) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
        s.set_freebind_v6(true)?;
    } else {
        s.set_freebind_v4(true)?;
    }
    s.set_nonblocking(true)?;
    Ok(s)
}

impl Binder for FreebindBinder {
    fn tcp(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        let s = socket(addr, Type::STREAM, SockProto::TCP)?;
        s.set_tcp_nodelay(true)?;
        s.set_tcp_keepalive(&keepalive())?;
        s.bind(&addr.into())?;
        s.listen(4096)?;
        TcpListener::from_std(s.into())
    }

    fn udp(&self, addr: SocketAddr) -> io::Result<UdpSocket> {
        let s = socket(addr, Type::DGRAM, SockProto::UDP)?;
        s.bind(&addr.into())?;
        UdpSocket::from_std(s.into())
    }
}

/// A test binder: binds `127.0.0.1:0` (or `[::1]:0` for IPv6 VIPs) and remembers which
/// listener stands for which `VIP:port`.
#[derive(Debug, Default)]
pub struct LoopbackBinder {
    bound: std::sync::Mutex<Vec<(SocketAddr, model::Protocol, SocketAddr)>>,
}

impl LoopbackBinder {
    /// The local address bound for `vip` and `protocol`, the latest if rebound.
    pub fn local(&self, vip: SocketAddr, protocol: model::Protocol) -> Option<SocketAddr> {
        let b = self.bound.lock().expect("binder lock");
        b.iter()
            .rev()
            .find(|(v, p, _)| *v == vip && *p == protocol)
            .map(|x| x.2)
    }

    /// How many listeners were opened in total (to prove a reload did not rebind).
    pub fn binds(&self) -> usize {
        self.bound.lock().expect("binder lock").len()
    }

    fn loopback(addr: SocketAddr) -> SocketAddr {
        if addr.is_ipv6() {
            "[::1]:0".parse().expect("literal")
        } else {
            "127.0.0.1:0".parse().expect("literal")
        }
    }
}

impl Binder for LoopbackBinder {
    fn tcp(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        let l = FreebindBinder.tcp(Self::loopback(addr))?;
        self.bound
            .lock()
            .expect("binder lock")
            .push((addr, model::Protocol::Tcp, l.local_addr()?));
        Ok(l)
    }

    fn udp(&self, addr: SocketAddr) -> io::Result<UdpSocket> {
        let s = FreebindBinder.udp(Self::loopback(addr))?;
        self.bound
            .lock()
            .expect("binder lock")
            .push((addr, model::Protocol::Udp, s.local_addr()?));
        Ok(s)
    }
}
