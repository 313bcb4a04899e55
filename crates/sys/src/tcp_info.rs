//! Segment counters of one TCP socket from `TCP_INFO` (`tcpi_segs_in` / `tcpi_segs_out`,
//! Linux 4.2+): what a test or a diagnostic reads to tell how many packets a connection took.

use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// Segments a TCP socket received and sent so far, pure ACKs and the handshake included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segments {
    /// `tcpi_segs_in`.
    pub received: u32,
    /// `tcpi_segs_out`.
    pub sent: u32,
}

/// Reads `socket`'s segment counters (`getsockopt(TCP_INFO)`).
pub fn segments(socket: &impl AsFd) -> io::Result<Segments> {
    // SAFETY: `tcp_info` is plain data (all-zero is a valid value).
    #[allow(unsafe_code)]
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into `info`, a live value of that size.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            std::ptr::addr_of_mut!(info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Segments {
        received: info.tcpi_segs_in,
        sent: info.tcpi_segs_out,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loopback_connection_counts_its_handshake() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (_s, _) = l.accept().unwrap();
        let seg = segments(&c).unwrap();
        // SYN out, SYN-ACK in, ACK out
        assert_eq!(
            seg,
            Segments {
                received: 1,
                sent: 2
            }
        );
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(segments(&u).is_err(), "TCP_INFO on a UDP socket is refused");
    }
}
