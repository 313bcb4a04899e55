//! Fuzzes the PROXY protocol v1/v2 decoder: arbitrary bytes decode or fail, never panic; a
//! decoded header never claims more bytes than it was given, and re-encoding its addresses
//! decodes to the same addresses.
//!
//! ```text
//! RUSTC_BOOTSTRAP=1 cargo fuzz run proxy_header /tmp/proxy-corpus fuzz/seeds/proxy_header -- -max_total_time=60
//! ```

#![no_main]

use std::net::{IpAddr, SocketAddr};

use lb::proxy_protocol::{decode, encode_v1, encode_v2};
use libfuzzer_sys::fuzz_target;

/// The encoder writes IPv4-mapped IPv6 addresses as IPv4 (as the kernel reports them on a
/// dual-stack socket); compare in that form.
fn unmap(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map_or(a, |v4| SocketAddr::new(IpAddr::V4(v4), a.port())),
        IpAddr::V4(_) => a,
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok((h, used)) = decode(data) {
        assert!(used <= data.len());
        if let Some((src, dst)) = h.addrs.map(|(s, d)| (unmap(s), unmap(d)))
            && src.is_ipv4() == dst.is_ipv4()
        {
            let v2 = encode_v2(h.protocol, src, dst);
            assert_eq!(
                decode(&v2).map(|(h, n)| (h.addrs, n)).ok(),
                Some((Some((src, dst)), v2.len()))
            );
            let v1 = encode_v1(src, dst);
            assert_eq!(
                decode(&v1).ok().and_then(|(h, _)| h.addrs),
                Some((src, dst))
            );
        }
    }
});
