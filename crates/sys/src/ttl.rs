//! TTL rules of the BGP speaker: the TTL (hop limit) sent (`IP_TTL` / `IPV6_UNICAST_HOPS`), a
//! minimum TTL on TCP reception (`IP_MINTTL` / `IPV6_MINHOPCOUNT`: the Generalized TTL Security
//! Mechanism of RFC 5082), and the TTL of each received UDP datagram (`IP_RECVTTL` /
//! `IPV6_RECVHOPLIMIT` with `recvmsg`), which BFD single hop checks (RFC 5881 §5: "MUST have
//! ... TTL or Hop Limit ... of 255"): Linux applies `IP_MINTTL` to TCP only.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd};

use socket2::SockRef;

fn set_int(socket: &impl AsFd, level: libc::c_int, name: libc::c_int, v: i32) -> io::Result<()> {
    // SAFETY: the option value is a live `c_int` and its size is passed.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            level,
            name,
            std::ptr::addr_of!(v).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets the TTL (hop limit) of what `socket` sends, for its family (`v6`).
pub fn set_ttl(socket: &impl AsFd, v6: bool, ttl: u8) -> io::Result<()> {
    let sock = SockRef::from(socket);
    if v6 {
        sock.set_unicast_hops_v6(u32::from(ttl))
    } else {
        sock.set_ttl_v4(u32::from(ttl))
    }
}

/// Makes the kernel drop received packets whose TTL (hop limit) is below `min` (`IP_MINTTL` /
/// `IPV6_MINHOPCOUNT`): with 255, only a directly connected peer that sends with TTL 255 gets
/// through (GTSM, RFC 5082; BFD single hop, RFC 5881 §5). TCP and UDP sockets.
pub fn set_min_ttl(socket: &impl AsFd, v6: bool, min: u8) -> io::Result<()> {
    if v6 {
        set_int(
            socket,
            libc::IPPROTO_IPV6,
            libc::IPV6_MINHOPCOUNT,
            i32::from(min),
        )
    } else {
        set_int(socket, libc::IPPROTO_IP, libc::IP_MINTTL, i32::from(min))
    }
}

/// Asks the kernel to report the TTL (hop limit) of each datagram [`recv_from_ttl`] reads.
pub fn set_recv_ttl(socket: &impl AsFd, v6: bool) -> io::Result<()> {
    if v6 {
        set_int(socket, libc::IPPROTO_IPV6, libc::IPV6_RECVHOPLIMIT, 1)
    } else {
        set_int(socket, libc::IPPROTO_IP, libc::IP_RECVTTL, 1)
    }
}

/// Reads one datagram without blocking (`WouldBlock` when none is queued): its length, its
/// source, and its TTL or hop limit when [`set_recv_ttl`] asked for it.
pub fn recv_from_ttl(
    socket: &impl AsFd,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddr, Option<u8>)> {
    // SAFETY: all-zero is a valid `sockaddr_storage`, `msghdr` and `iovec`.
    #[allow(unsafe_code)]
    let mut from: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut control = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: as above.
    #[allow(unsafe_code)]
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = std::ptr::addr_of_mut!(from).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: `msg` points to live buffers of the sizes it states (`buf`, `from`, `control`),
    // all of which outlive the call.
    #[allow(unsafe_code)]
    let n = unsafe { libc::recvmsg(socket.as_fd().as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut ttl = None;
    // SAFETY: the CMSG_* macros walk the control buffer the kernel filled, within the length
    // it set in `msg.msg_controllen`; each data read is of the type the level and type name.
    #[allow(unsafe_code)]
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            let h = &*c;
            if (h.cmsg_level == libc::IPPROTO_IP && h.cmsg_type == libc::IP_TTL)
                || (h.cmsg_level == libc::IPPROTO_IPV6 && h.cmsg_type == libc::IPV6_HOPLIMIT)
            {
                let v = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                ttl = u8::try_from(v).ok();
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let addr = match libc::c_int::from(from.ss_family) {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a `sockaddr_in` for an AF_INET source.
            #[allow(unsafe_code)]
            let a: libc::sockaddr_in = unsafe { std::ptr::read(std::ptr::addr_of!(from).cast()) };
            SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            ))
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel wrote a `sockaddr_in6` for an AF_INET6 source.
            #[allow(unsafe_code)]
            let a: libc::sockaddr_in6 = unsafe { std::ptr::read(std::ptr::addr_of!(from).cast()) };
            SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            ))
        }
        f => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("datagram from address family {f}"),
            ));
        }
    };
    Ok((n as usize, addr, ttl))
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;

    use super::*;

    #[test]
    fn the_ttl_of_each_datagram_is_reported() {
        let r = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        set_recv_ttl(&r, false).unwrap();
        let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        set_ttl(&s, false, 64).unwrap();
        s.send_to(b"low", r.local_addr().unwrap()).unwrap();
        set_ttl(&s, false, 255).unwrap();
        s.send_to(b"high", r.local_addr().unwrap()).unwrap();
        r.set_read_timeout(Some(std::time::Duration::from_secs(1)))
            .unwrap();
        let mut buf = [0u8; 16];
        let mut got = Vec::new();
        for _ in 0..2 {
            // Wait for a datagram with a blocking peek, then read it with its TTL.
            r.peek_from(&mut buf).unwrap();
            let (n, from, ttl) = recv_from_ttl(&r, &mut buf).unwrap();
            assert_eq!(from, s.local_addr().unwrap());
            got.push((buf[..n].to_vec(), ttl));
        }
        assert_eq!(
            got,
            [(b"low".to_vec(), Some(64)), (b"high".to_vec(), Some(255))]
        );
        set_min_ttl(&r, false, 255).unwrap();
        assert_eq!(SockRef::from(&s).ttl_v4().unwrap(), 255);
        assert!(
            matches!(recv_from_ttl(&r, &mut buf), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
        );
    }
}
