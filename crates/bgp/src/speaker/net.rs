//! The sockets of the speaker, opened through an injectable [`Binder`]: library code never
//! binds fixed addresses by itself. [`SystemBinder`] is the production one: TCP to the peer
//! from its source address with its MD5 password and TTL rules, the listener for passive peers
//! (port 179 on every address), and BFD's sockets (RFC 5881: to port 3784 from a port in
//! 49152–65535 with TTL 255; RFC 5883 multihop: port 4784). Tests use other ports.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, UdpSocket};

use super::PeerConfig;

pub use crate::driver::Connecting;

/// Opens the speaker's sockets. Called inside the tokio runtime.
pub trait Binder: Send + Sync + 'static {
    /// Opens a TCP connection to `peer` (its source address, password and TTL applied): the
    /// stream and this side's address.
    fn connect(&self, peer: &PeerConfig) -> Connecting;
    /// The listener for passive peers of one family (opened when the first such peer
    /// appears).
    fn listen(&self, v6: bool) -> io::Result<TcpListener>;
    /// The socket BFD control packets of one family and mode arrive on (RFC 5881 port 3784,
    /// RFC 5883 port 4784); it reports each datagram's TTL.
    fn bfd_listen(&self, v6: bool, multihop: bool) -> io::Result<UdpSocket>;
    /// The socket BFD control packets to `peer` leave from (TTL 255, a source port in
    /// 49152–65535).
    fn bfd_source(&self, peer: &PeerConfig) -> io::Result<UdpSocket>;
    /// The destination port of BFD control packets.
    fn bfd_port(&self, multihop: bool) -> u16;
}

/// The production binder.
#[derive(Debug, Clone)]
pub struct SystemBinder {
    /// Port the passive listener binds (179).
    pub bgp_port: u16,
    /// BFD single-hop port (3784).
    pub bfd_port: u16,
    /// BFD multihop port (4784).
    pub bfd_multihop_port: u16,
    /// How long a connect may take.
    pub connect_timeout: Duration,
    /// Address the listeners bind for IPv4 (0.0.0.0).
    pub listen_v4: Ipv4Addr,
    /// Address the listeners bind for IPv6 (::).
    pub listen_v6: Ipv6Addr,
}

impl Default for SystemBinder {
    fn default() -> Self {
        Self {
            bgp_port: super::BGP_PORT,
            bfd_port: 3784,
            bfd_multihop_port: 4784,
            connect_timeout: Duration::from_secs(10),
            listen_v4: Ipv4Addr::UNSPECIFIED,
            listen_v6: Ipv6Addr::UNSPECIFIED,
        }
    }
}

fn socket(v6: bool, ty: Type, proto: Protocol) -> io::Result<Socket> {
    let s = Socket::new(
        if v6 { Domain::IPV6 } else { Domain::IPV4 },
        ty,
        Some(proto),
    )?;
    if v6 {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    Ok(s)
}

/// What TTL a session sends with: 255 single hop (so a peer checking GTSM accepts it), the
/// configured TTL multihop.
fn ttl_of(peer: &PeerConfig) -> u8 {
    peer.multihop.unwrap_or(255)
}

impl Binder for SystemBinder {
    fn connect(&self, peer: &PeerConfig) -> Connecting {
        let peer = peer.clone();
        let timeout = self.connect_timeout;
        Box::pin(async move {
            let v6 = peer.address.is_ipv6();
            let s = socket(v6, Type::STREAM, Protocol::TCP)?;
            if let Some(src) = peer.source {
                s.bind(&SocketAddr::new(src, 0).into())?;
            }
            if let Some(pw) = &peer.password {
                sys::tcp_md5::set_tcp_md5(&s, peer.address, pw.as_bytes())?;
            }
            sys::ttl::set_ttl(&s, v6, ttl_of(&peer))?;
            s.set_tcp_nodelay(true)?;
            let s = TcpSocket::from_std_stream(s.into());
            let to = SocketAddr::new(peer.address, peer.port);
            match tokio::time::timeout(timeout, s.connect(to)).await {
                Ok(r) => {
                    let s = r?;
                    let local = s.local_addr().ok().map(|a| a.ip());
                    Ok((Box::new(s) as Box<dyn crate::driver::Stream>, local))
                }
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    if peer.password.is_some() {
                        format!(
                            "no answer from {to} within {timeout:?} (a TCP MD5 password is set: \
                             the peer drops segments whose signature does not match, so a \
                             password mismatch looks like this; check both passwords)"
                        )
                    } else {
                        format!("no answer from {to} within {timeout:?}")
                    },
                )),
            }
        })
    }

    fn listen(&self, v6: bool) -> io::Result<TcpListener> {
        let s = socket(v6, Type::STREAM, Protocol::TCP)?;
        s.set_reuse_address(true)?;
        let ip: IpAddr = if v6 {
            self.listen_v6.into()
        } else {
            self.listen_v4.into()
        };
        s.bind(&SocketAddr::new(ip, self.bgp_port).into())?;
        s.listen(64)?;
        TcpListener::from_std(s.into())
    }

    fn bfd_listen(&self, v6: bool, multihop: bool) -> io::Result<UdpSocket> {
        let s = socket(v6, Type::DGRAM, Protocol::UDP)?;
        s.set_reuse_address(true)?;
        let ip: IpAddr = if v6 {
            self.listen_v6.into()
        } else {
            self.listen_v4.into()
        };
        s.bind(&SocketAddr::new(ip, self.bfd_port(multihop)).into())?;
        sys::ttl::set_recv_ttl(&s, v6)?;
        UdpSocket::from_std(s.into())
    }

    fn bfd_source(&self, peer: &PeerConfig) -> io::Result<UdpSocket> {
        let v6 = peer.address.is_ipv6();
        let s = socket(v6, Type::DGRAM, Protocol::UDP)?;
        sys::ttl::set_ttl(&s, v6, 255)?;
        let ip = peer.source.unwrap_or(if v6 {
            Ipv6Addr::UNSPECIFIED.into()
        } else {
            Ipv4Addr::UNSPECIFIED.into()
        });
        // RFC 5881 §4: "The source port MUST be in the range 49152 through 65535"; start at a
        // port derived from the peer and walk on when taken.
        let seed = peer
            .name
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
        let mut last = None;
        for i in 0..64u32 {
            let port = 49152 + ((seed.wrapping_add(i * 613)) % 16384) as u16;
            match s.bind(&SocketAddr::new(ip, port).into()) {
                Ok(()) => return UdpSocket::from_std(s.into()),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no free BFD source port")))
    }

    fn bfd_port(&self, multihop: bool) -> u16 {
        if multihop {
            self.bfd_multihop_port
        } else {
            self.bfd_port
        }
    }
}
