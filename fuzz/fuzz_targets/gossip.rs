//! Fuzzes the gossip receive path: arbitrary bytes through the sealed envelope's opener (with
//! a configured key) and through the heartbeat body decoder, and sealed arbitrary bodies back
//! through the opener. Nothing may panic; what one side seals, the other opens unchanged, once.
//!
//! ```text
//! RUSTC_BOOTSTRAP=1 cargo fuzz run gossip /tmp/gossip-corpus fuzz/seeds/gossip -- -max_total_time=60
//! ```

#![no_main]

use agent::seal::{Kind, Opener, Sealer};
use agent::wire::Heartbeat;
use libfuzzer_sys::fuzz_target;
use model::ClusterKey;

fuzz_target!(|data: &[u8]| {
    let keys = [ClusterKey {
        id: 1,
        secret: [7; 32],
    }];
    let mut opener = Opener::new(&keys);
    // raw bytes from the network: an unauthenticated packet, never trusted
    if let Ok(o) = opener.open(data) {
        let _ = Heartbeat::decode(&o.body);
    }
    // a peer's authenticated body is still parsed defensively
    if let Ok(hb) = Heartbeat::decode(data) {
        assert_eq!(Heartbeat::decode(&hb.encode()).ok(), Some(hb));
    }
    // sealing then opening returns the body, and a second copy is a replay
    let mut sealer = Sealer::new(&keys, "fuzz", 1);
    let packet = sealer.seal(Kind::Heartbeat, data).expect("a key is configured");
    let opened = opener.open(&packet).expect("sealed with the configured key");
    assert_eq!(opened.body, data);
    assert!(opener.open(&packet).is_err());
});
