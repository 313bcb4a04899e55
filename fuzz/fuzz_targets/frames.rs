//! Fuzzes the ARP and neighbour-discovery frame parsers the announcer runs on every frame its
//! raw socket receives: arbitrary bytes must parse or fail, never panic, and an answer built
//! from a parsed request must parse back as the answer to it.
//!
//! ```text
//! RUSTC_BOOTSTRAP=1 cargo fuzz run frames /tmp/frames-corpus fuzz/seeds/frames -- -max_total_time=60
//! ```

#![no_main]

use agent::frames::{arp_reply, na_reply, parse_arp, parse_nd};
use libfuzzer_sys::fuzz_target;

const MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = parse_arp(data) {
        let reply = arp_reply(MAC, &req);
        assert!(parse_arp(&reply).is_ok(), "our own reply parses");
    }
    if let Ok(ns) = parse_nd(data) {
        let reply = na_reply(MAC, &ns);
        assert!(parse_nd(&reply).is_ok(), "our own advertisement parses");
    }
});
