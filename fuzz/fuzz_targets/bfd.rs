//! Fuzzes the BFD control packet decoder (every UDP datagram to port 3784/4784): arbitrary bytes
//! must decode or be discarded, never panic, and a decoded packet must encode and decode back.
//!
//! ```text
//! RUSTC_BOOTSTRAP=1 cargo fuzz run bfd /tmp/bfd-corpus fuzz/seeds/bfd -- -max_total_time=60
//! ```

#![no_main]

use bgp::bfd::Control;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = Control::decode(data) {
        assert_eq!(Control::decode(&c.encode()), Ok(c));
    }
});
