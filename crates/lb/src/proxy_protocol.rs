//! PROXY protocol v1 (text) and v2 (binary) headers, sent to a backend before the client's bytes
//! so it sees the real client address. Spec: <https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>.
//!
//! Both directions are implemented; portico only encodes on the wire, the decoder exists for the
//! hex-fixture tests and for test backends. Addresses of different families (an IPv4 client on
//! an IPv6 VIP) are first unmapped from `::ffff:a.b.c.d`; if they still differ, v1 sends
//! `PROXY UNKNOWN` and v2 sends the `LOCAL` command, as the spec prescribes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use model::{Protocol, ProxyProtocol};

/// The 12-byte v2 signature (spec §2.2).
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Errors decoding a header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// More bytes are needed.
    #[error("incomplete PROXY header")]
    Incomplete,
    /// Not a valid header.
    #[error("invalid PROXY header")]
    Invalid,
}

/// A decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// TCP or UDP (v1 is always TCP).
    pub protocol: Protocol,
    /// `(source, destination)`, or `None` for `UNKNOWN` / `LOCAL`.
    pub addrs: Option<(SocketAddr, SocketAddr)>,
}

fn unmap(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

fn same_family(src: SocketAddr, dst: SocketAddr) -> Option<(SocketAddr, SocketAddr)> {
    let (s, d) = (unmap(src), unmap(dst));
    (s.is_ipv4() == d.is_ipv4()).then_some((s, d))
}

/// Encodes a header of `version` for a connection from `src` to `dst`.
pub fn encode(
    version: ProxyProtocol,
    protocol: Protocol,
    src: SocketAddr,
    dst: SocketAddr,
) -> Vec<u8> {
    match version {
        ProxyProtocol::V1 => encode_v1(src, dst),
        ProxyProtocol::V2 => encode_v2(protocol, src, dst),
    }
}

/// `PROXY TCP4 <src> <dst> <sport> <dport>\r\n` (spec §2.1).
pub fn encode_v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    match same_family(src, dst) {
        Some((s, d)) => {
            let fam = if s.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {fam} {} {} {} {}\r\n",
                s.ip(),
                d.ip(),
                s.port(),
                d.port()
            )
            .into_bytes()
        }
        None => b"PROXY UNKNOWN\r\n".to_vec(),
    }
}

/// The binary header (spec §2.2): signature, version/command, family/transport, length, addresses.
pub fn encode_v2(protocol: Protocol, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + 36);
    out.extend_from_slice(&V2_SIGNATURE);
    let transport = match protocol {
        Protocol::Tcp => 0x1,
        Protocol::Udp => 0x2,
    };
    match same_family(src, dst) {
        Some((s, d)) => {
            out.push(0x21); // version 2, PROXY
            let (fam, addrs): (u8, Vec<u8>) = match (s.ip(), d.ip()) {
                (IpAddr::V4(a), IpAddr::V4(b)) => (0x10, [a.octets(), b.octets()].concat()),
                (IpAddr::V6(a), IpAddr::V6(b)) => (0x20, [a.octets(), b.octets()].concat()),
                _ => unreachable!("same_family checked"),
            };
            out.push(fam | transport);
            let len = addrs.len() + 4;
            out.extend_from_slice(&(len as u16).to_be_bytes());
            out.extend_from_slice(&addrs);
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
        None => {
            out.push(0x20); // version 2, LOCAL
            out.push(0x00);
            out.extend_from_slice(&0u16.to_be_bytes());
        }
    }
    out
}

/// Decodes a v1 or v2 header at the start of `buf`; returns it and its length in bytes.
pub fn decode(buf: &[u8]) -> Result<(Header, usize), DecodeError> {
    if buf.len() >= 12 && buf[..12] == V2_SIGNATURE {
        return decode_v2(buf);
    }
    if V2_SIGNATURE.starts_with(buf) && !buf.is_empty() {
        return Err(DecodeError::Incomplete);
    }
    decode_v1(buf)
}

fn decode_v1(buf: &[u8]) -> Result<(Header, usize), DecodeError> {
    let prefix = b"PROXY ";
    let n = prefix.len().min(buf.len());
    if buf[..n] != prefix[..n] {
        return Err(DecodeError::Invalid);
    }
    // Spec: at most 107 bytes including CRLF.
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        return Err(if buf.len() >= 107 {
            DecodeError::Invalid
        } else {
            DecodeError::Incomplete
        });
    };
    let line = std::str::from_utf8(&buf[6..end]).map_err(|_| DecodeError::Invalid)?;
    let parts: Vec<&str> = line.split(' ').collect();
    let addrs = match parts.as_slice() {
        ["UNKNOWN", ..] => None,
        [fam @ ("TCP4" | "TCP6"), s, d, sp, dp] => {
            let s: IpAddr = s.parse().map_err(|_| DecodeError::Invalid)?;
            let d: IpAddr = d.parse().map_err(|_| DecodeError::Invalid)?;
            if s.is_ipv4() != (*fam == "TCP4") || d.is_ipv4() != s.is_ipv4() {
                return Err(DecodeError::Invalid);
            }
            let sp: u16 = sp.parse().map_err(|_| DecodeError::Invalid)?;
            let dp: u16 = dp.parse().map_err(|_| DecodeError::Invalid)?;
            Some((SocketAddr::new(s, sp), SocketAddr::new(d, dp)))
        }
        _ => return Err(DecodeError::Invalid),
    };
    Ok((
        Header {
            protocol: Protocol::Tcp,
            addrs,
        },
        end + 2,
    ))
}

fn decode_v2(buf: &[u8]) -> Result<(Header, usize), DecodeError> {
    if buf.len() < 16 {
        return Err(DecodeError::Incomplete);
    }
    let ver_cmd = buf[12];
    let fam = buf[13];
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if buf.len() < 16 + len {
        return Err(DecodeError::Incomplete);
    }
    if ver_cmd >> 4 != 2 {
        return Err(DecodeError::Invalid);
    }
    let body = &buf[16..16 + len];
    let protocol = if fam & 0x0f == 0x2 {
        Protocol::Udp
    } else {
        Protocol::Tcp
    };
    let addrs = match (ver_cmd & 0x0f, fam >> 4) {
        (0x0, _) => None,
        (0x1, 0x1) if len >= 12 => {
            let s = Ipv4Addr::from(<[u8; 4]>::try_from(&body[0..4]).expect("length checked"));
            let d = Ipv4Addr::from(<[u8; 4]>::try_from(&body[4..8]).expect("length checked"));
            let sp = u16::from_be_bytes([body[8], body[9]]);
            let dp = u16::from_be_bytes([body[10], body[11]]);
            Some((SocketAddr::new(s.into(), sp), SocketAddr::new(d.into(), dp)))
        }
        (0x1, 0x2) if len >= 36 => {
            let s = Ipv6Addr::from(<[u8; 16]>::try_from(&body[0..16]).expect("length checked"));
            let d = Ipv6Addr::from(<[u8; 16]>::try_from(&body[16..32]).expect("length checked"));
            let sp = u16::from_be_bytes([body[32], body[33]]);
            let dp = u16::from_be_bytes([body[34], body[35]]);
            Some((SocketAddr::new(s.into(), sp), SocketAddr::new(d.into(), dp)))
        }
        (0x1, 0x0) => None,
        _ => return Err(DecodeError::Invalid),
    };
    Ok((Header { protocol, addrs }, 16 + len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    // The spec's own examples (§2.1) and a captured HAProxy v2 header.
    const V1_TCP4: &[u8] = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n";
    const V2_TCP4: &str = "0d0a0d0a000d0a515549540a 21 11 000c c0a80001 c0a8000b dc04 01bb";
    const V2_TCP6: &str = "0d0a0d0a000d0a515549540a 21 21 0024
        20010db8000000000000000000000001 20010db8000000000000000000000002 dc04 01bb";
    const V2_LOCAL: &str = "0d0a0d0a000d0a515549540a 20 00 0000";

    #[test]
    fn v1_encodes_to_the_spec_example() {
        assert_eq!(
            encode_v1(sa("192.168.0.1:56324"), sa("192.168.0.11:443")),
            V1_TCP4
        );
    }

    #[test]
    fn v1_decodes_from_the_spec_example() {
        let (h, n) = decode(V1_TCP4).unwrap();
        assert_eq!(n, V1_TCP4.len());
        assert_eq!(
            h.addrs,
            Some((sa("192.168.0.1:56324"), sa("192.168.0.11:443")))
        );
    }

    #[test]
    fn v1_ipv6_and_unknown() {
        let b = encode_v1(sa("[2001:db8::1]:1000"), sa("[2001:db8::2]:80"));
        assert_eq!(b, b"PROXY TCP6 2001:db8::1 2001:db8::2 1000 80\r\n");
        assert_eq!(
            encode_v1(sa("10.0.0.1:1"), sa("[2001:db8::2]:80")),
            b"PROXY UNKNOWN\r\n"
        );
        assert_eq!(decode(b"PROXY UNKNOWN\r\n").unwrap().0.addrs, None);
    }

    #[test]
    fn v2_encodes_to_captured_bytes() {
        assert_eq!(
            encode_v2(
                Protocol::Tcp,
                sa("192.168.0.1:56324"),
                sa("192.168.0.11:443")
            ),
            hex(V2_TCP4)
        );
        assert_eq!(
            encode_v2(
                Protocol::Tcp,
                sa("[2001:db8::1]:56324"),
                sa("[2001:db8::2]:443")
            ),
            hex(V2_TCP6)
        );
        assert_eq!(
            encode_v2(Protocol::Tcp, sa("10.0.0.1:1"), sa("[2001:db8::2]:80")),
            hex(V2_LOCAL)
        );
    }

    #[test]
    fn v2_decodes_from_captured_bytes() {
        let (h, n) = decode(&hex(V2_TCP4)).unwrap();
        assert_eq!(n, 28);
        assert_eq!(
            h.addrs,
            Some((sa("192.168.0.1:56324"), sa("192.168.0.11:443")))
        );
        let (h, n) = decode(&hex(V2_TCP6)).unwrap();
        assert_eq!(n, 52);
        assert_eq!(
            h.addrs,
            Some((sa("[2001:db8::1]:56324"), sa("[2001:db8::2]:443")))
        );
        assert_eq!(decode(&hex(V2_LOCAL)).unwrap().0.addrs, None);
    }

    #[test]
    fn mapped_ipv4_is_sent_as_ipv4() {
        let b = encode_v1(sa("[::ffff:10.0.0.1]:5"), sa("10.0.0.2:6"));
        assert_eq!(b, b"PROXY TCP4 10.0.0.1 10.0.0.2 5 6\r\n");
    }

    #[test]
    fn partial_headers_are_incomplete_and_garbage_is_invalid() {
        assert_eq!(decode(&V1_TCP4[..10]), Err(DecodeError::Incomplete));
        assert_eq!(decode(&hex(V2_TCP4)[..20]), Err(DecodeError::Incomplete));
        assert_eq!(decode(b"GET / HTTP/1.1\r\n"), Err(DecodeError::Invalid));
    }

    fn arb_pair() -> impl Strategy<Value = (SocketAddr, SocketAddr)> {
        prop_oneof![
            (
                any::<[u8; 4]>(),
                any::<u16>(),
                any::<[u8; 4]>(),
                any::<u16>()
            )
                .prop_map(|(a, p, b, q)| (
                    SocketAddr::new(Ipv4Addr::from(a).into(), p),
                    SocketAddr::new(Ipv4Addr::from(b).into(), q)
                )),
            (
                any::<[u8; 16]>(),
                any::<u16>(),
                any::<[u8; 16]>(),
                any::<u16>()
            )
                .prop_map(|(a, p, b, q)| (
                    SocketAddr::new(Ipv6Addr::from(a).into(), p),
                    SocketAddr::new(Ipv6Addr::from(b).into(), q)
                )),
        ]
    }

    proptest! {
        #[test]
        fn both_versions_roundtrip((s, d) in arb_pair(), udp in any::<bool>()) {
            let proto = if udp { Protocol::Udp } else { Protocol::Tcp };
            let want = same_family(s, d);
            let (h, n) = decode(&encode_v2(proto, s, d)).unwrap();
            prop_assert_eq!(h.addrs, want);
            prop_assert_eq!(n, encode_v2(proto, s, d).len());
            if want.is_some() { prop_assert_eq!(h.protocol, proto); }
            let (h, _) = decode(&encode_v1(s, d)).unwrap();
            prop_assert_eq!(h.addrs, want);
        }
    }
}
