//! The TCP MD5 signature option of a BGP session (RFC 2385, `TCP_MD5SIG`); its structure is not
//! in `libc`, so it is declared here.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};

use socket2::{SockAddr, SockRef};

/// The longest key the kernel takes (`TCP_MD5SIG_MAXKEYLEN`).
pub const MD5_MAX_KEY_LEN: usize = 80;

/// `struct tcp_md5sig` of `<linux/tcp.h>`.
#[repr(C)]
struct TcpMd5Sig {
    addr: libc::sockaddr_storage,
    flags: u8,
    prefixlen: u8,
    keylen: u16,
    ifindex: libc::c_int,
    key: [u8; MD5_MAX_KEY_LEN],
}

/// Sets (or with an empty `key`, removes) the TCP MD5 signature key for segments to and from
/// `peer` on `socket`: on a connecting socket before `connect`, on a listener for each peer
/// whose connections it accepts (accepted sockets inherit it). An IPv4 peer on an IPv6 socket
/// is keyed by its v4-mapped address, as the kernel sees it.
pub fn set_tcp_md5(socket: &impl AsFd, peer: IpAddr, key: &[u8]) -> io::Result<()> {
    if key.len() > MD5_MAX_KEY_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "TCP MD5 password of {} octets: the kernel takes at most {MD5_MAX_KEY_LEN}",
                key.len()
            ),
        ));
    }
    let sock = SockRef::from(socket);
    let v6_socket = sock.local_addr()?.is_ipv6();
    let peer = match peer {
        IpAddr::V4(a) if v6_socket => IpAddr::V6(a.to_ipv6_mapped()),
        p => p,
    };
    let addr = SockAddr::from(SocketAddr::new(peer, 0));
    // SAFETY: an all-zero `sockaddr_storage` and byte array are valid values of these plain C
    // types.
    #[allow(unsafe_code)]
    let mut sig: TcpMd5Sig = unsafe { std::mem::zeroed() };
    let len = (addr.len() as usize).min(std::mem::size_of::<libc::sockaddr_storage>());
    // SAFETY: `addr.as_ptr()` points to `addr.len()` initialised octets of a socket address,
    // and `sig.addr` has room for `len` ≤ its size; the regions do not overlap.
    #[allow(unsafe_code)]
    unsafe {
        std::ptr::copy_nonoverlapping(
            addr.as_ptr().cast::<u8>(),
            std::ptr::addr_of_mut!(sig.addr).cast::<u8>(),
            len,
        );
    }
    sig.keylen = key.len() as u16;
    sig.key[..key.len()].copy_from_slice(key);
    // SAFETY: `sig` is a valid `struct tcp_md5sig` that outlives the call, and the length
    // passed is its size.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_MD5SIG,
            std::ptr::addr_of!(sig).cast(),
            std::mem::size_of::<TcpMd5Sig>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, TcpListener, TcpStream};
    use std::time::Duration;

    use socket2::{Domain, Socket, Type};

    use super::*;

    /// A client with `client_key` to a listener with `server_key` on loopback: whether the
    /// connection is accepted within half a second.
    fn connects(server_key: Option<&[u8]>, client_key: Option<&[u8]>) -> bool {
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let l = TcpListener::bind((lo, 0)).unwrap();
        if let Some(k) = server_key {
            set_tcp_md5(&l, lo, k).unwrap();
        }
        l.set_nonblocking(true).unwrap();
        let c = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        c.bind(&SocketAddr::new(lo, 0).into()).unwrap();
        if let Some(k) = client_key {
            set_tcp_md5(&c, lo, k).unwrap();
        }
        let addr = l.local_addr().unwrap();
        let r = c.connect_timeout(&addr.into(), Duration::from_millis(500));
        if r.is_err() {
            return false;
        }
        let _keep: TcpStream = c.into();
        std::thread::sleep(Duration::from_millis(50));
        l.accept().is_ok()
    }

    #[test]
    fn md5_keys_that_match_connect_and_a_mismatch_or_a_missing_key_does_not() {
        assert!(connects(None, None));
        assert!(connects(Some(b"s3cret"), Some(b"s3cret")));
        assert!(
            !connects(Some(b"s3cret"), Some(b"other")),
            "mismatch refused"
        );
        assert!(!connects(Some(b"s3cret"), None), "missing key refused");
    }

    #[test]
    fn a_key_longer_than_the_kernel_takes_is_refused_with_its_length() {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let e = set_tcp_md5(&l, Ipv4Addr::LOCALHOST.into(), &[b'x'; 81]).unwrap_err();
        assert!(e.to_string().contains("81 octets"), "{e}");
    }
}
