//! Opening the VIP listeners, through an injectable [`Binder`].
//!
//! Library code never binds fixed ports by itself: [`crate::LoadBalancer`] asks its binder for a
//! TCP listener or UDP socket on each `VIP:port`. The default [`FreebindBinder`] sets
//! `IP_FREEBIND` / `IPV6_FREEBIND` so a node can listen on a VIP before it owns it (a takeover then
//! needs no bind), `SO_REUSEADDR`, `IPV6_V6ONLY` for IPv6, and on TCP listeners `TCP_NODELAY` and
//! `SO_KEEPALIVE`, which Linux copies to every accepted socket (no per-connection setsockopt).
//! With several proxy workers each TCP `VIP:port` gets one listener per worker, all bound with
//! `SO_REUSEPORT` (the kernel spreads new connections over them by their addresses and ports);
//! a single listener does not set it, so a port another process holds is still refused.
//! Tests inject a binder that listens on `127.0.0.1:0` and records what it bound.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol as SockProto, Socket, TcpKeepalive, Type};
use tokio::net::UdpSocket;

/// Opens listeners. Called inside the tokio runtime.
pub trait Binder: Send + Sync + 'static {
    /// `count` (≥ 1) non-blocking TCP listeners for `addr` (a `VIP:port`), sharing it with
    /// `SO_REUSEPORT` when there are several; each is registered on the worker that accepts
    /// from it.
    fn tcp(&self, addr: SocketAddr, count: usize) -> io::Result<Vec<std::net::TcpListener>>;
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

fn tcp_one(addr: SocketAddr, reuse_port: bool) -> io::Result<std::net::TcpListener> {
    let s = socket(addr, Type::STREAM, SockProto::TCP)?;
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    s.set_tcp_nodelay(true)?;
    s.set_tcp_keepalive(&keepalive())?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s.into())
}

impl Binder for FreebindBinder {
    fn tcp(&self, addr: SocketAddr, count: usize) -> io::Result<Vec<std::net::TcpListener>> {
        let reuse_port = count > 1;
        let first = tcp_one(addr, reuse_port)?;
        // port 0: the others share the port the first one got
        let addr = first.local_addr()?;
        let mut all = vec![first];
        for _ in 1..count {
            all.push(tcp_one(addr, reuse_port)?);
        }
        Ok(all)
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
    fn tcp(&self, addr: SocketAddr, count: usize) -> io::Result<Vec<std::net::TcpListener>> {
        let l = FreebindBinder.tcp(Self::loopback(addr), count)?;
        let local = l[0].local_addr()?;
        self.bound
            .lock()
            .expect("binder lock")
            .push((addr, model::Protocol::Tcp, local));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_listeners_share_one_port_and_a_single_one_keeps_it_to_itself() {
        let any: SocketAddr = "127.0.0.1:0".parse().expect("literal");
        let group = FreebindBinder.tcp(any, 3).expect("three listeners");
        let port = group[0].local_addr().expect("bound").port();
        assert_ne!(port, 0);
        assert!(
            group
                .iter()
                .all(|l| l.local_addr().expect("bound").port() == port)
        );
        // A single listener does not set SO_REUSEPORT: its port stays its own, also against
        // a later group.
        let one = FreebindBinder.tcp(any, 1).expect("one listener");
        let taken = one[0].local_addr().expect("bound");
        let e = FreebindBinder.tcp(taken, 2).expect_err("port is taken");
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        let e = FreebindBinder.tcp(taken, 1).expect_err("port is taken");
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
    }
}
