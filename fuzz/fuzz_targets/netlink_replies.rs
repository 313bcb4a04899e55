//! Fuzzes the netlink reply decoders that share `sys`'s netlink module: conntrack dumps
//! (`sys::conntrack::parse_dump`), address dumps (`sys::parse_addr_dump`) and nf_tables batch
//! acknowledgements (`sys::nft_set::parse_acks`). Arbitrary bytes must decode, end the parse or
//! give an error — never panic (an `NLMSG_ERROR` code of `i32::MIN` once overflowed its
//! negation) — and never yield more items than there are 16-byte message headers in the input.
//!
//! ```text
//! RUSTC_BOOTSTRAP=1 cargo fuzz run netlink_replies /tmp/nl-corpus fuzz/seeds/netlink_replies -- -max_total_time=60
//! ```

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let most = data.len() / 16;
    if let Ok((entries, _)) = sys::conntrack::parse_dump(data) {
        assert!(entries.len() <= most);
    }
    if let Ok((addrs, _)) = sys::parse_addr_dump(data) {
        assert!(addrs.len() <= most);
    }
    assert!(sys::nft_set::parse_acks(data).len() <= most);
});
