//! Fuzzes the conntrack event decoder (every read of the kernel path's ctnetlink event socket):
//! arbitrary bytes must decode or be skipped, never panic, and never yield more events than
//! there are 20-byte message headers in the input.
//!
//! ```text
//! RUSTC_BOOTSTRAP=1 cargo fuzz run conntrack_events /tmp/ct-corpus fuzz/seeds/conntrack_events -- -max_total_time=60
//! ```

#![no_main]

use libfuzzer_sys::fuzz_target;
use sys::conntrack::events::parse_events;

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    let malformed = parse_events(data, &mut out);
    assert!((out.len() + malformed) * 16 <= data.len() + 16);
});
