//! Fuzzes the BGP message decoder a session runs on every octet a peer sends: arbitrary bytes
//! must decode or fail with a NOTIFICATION, never panic, and a decoded message must encode and
//! decode back to itself.
//!
//! ```text
//! RUSTC_BOOTSTRAP=1 cargo fuzz run bgp /tmp/bgp-corpus fuzz/seeds/bgp -- -max_total_time=60
//! ```

#![no_main]

use bgp::message::{Context, Error, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first octet picks the session's AS width; the rest is the stream.
    let Some((&mode, stream)) = data.split_first() else {
        return;
    };
    let cx = Context {
        four_octet_as: mode & 1 == 1,
    };
    match Message::decode(stream, cx) {
        Ok((m, used)) => {
            assert!(used <= stream.len());
            let wire = m.encode(cx);
            let (again, n) = Message::decode(&wire, cx).expect("our own encoding decodes");
            assert_eq!(again, m);
            assert_eq!(n, wire.len());
        }
        Err(Error::Incomplete { needed }) => assert!(needed > stream.len()),
        Err(e) => assert!(e.notification().is_some(), "{e}"),
    }
});
