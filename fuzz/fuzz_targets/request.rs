//! Fuzzes the DNS request path: arbitrary bytes as a UDP and a TCP query against a snapshot
//! with two zones, address records, SRV and a 40-record RRset. Every reply must decode, be a
//! response, carry the query's id, and fit the UDP limit; nothing may panic.
//!
//! ```text
//! cargo +nightly fuzz run request /tmp/dns-fuzz-corpus fuzz/seeds/request -- -max_total_time=60
//! ```

#![no_main]

use std::sync::LazyLock;

use dns::wire::{Header, Message};
use dns::{Limits, Snapshot, Transport, respond};
use libfuzzer_sys::fuzz_target;
use model::{HealthView, OwnershipView};

const YAML: &str = r#"
dns:
  zones:
    - name: lb.example.com
    - name: other.test
      ns: [ns1.other.test, ns2.example.net]
services:
  - name: web
    vips: [192.0.2.1, 192.0.2.2, "2001:db8::1"]
    ports: [{name: http, port: 80}, {name: dns, port: 53, protocol: udp}]
    backends: [{address: 10.0.1.1}]
  - name: db
    vips: [192.0.2.10]
    ports: [{name: mysql, port: 3306}]
    backends: [{address: 10.0.2.1}, {address: 10.0.2.2}]
    dns: {mode: nodes, fail_closed: true}
  - name: big
    vips: [BIG]
    ports: [{name: http, port: 80}]
    backends: [{address: 10.0.4.1}]
"#;

static SNAPSHOT: LazyLock<Snapshot> = LazyLock::new(|| {
    let big: Vec<String> = (1..=40).map(|i| format!("198.51.100.{i}")).collect();
    let yaml = YAML.replace("BIG", &big.join(", "));
    let cfg = model::config::parse(&yaml, &model::config::Environment::default()).expect("fuzz config");
    Snapshot::build(1, &cfg, &HealthView::new(), &OwnershipView::new())
});

fuzz_target!(|data: &[u8]| {
    let _ = Message::decode(data);
    let mut out = Vec::new();
    for t in [Transport::Udp, Transport::Tcp] {
        if respond(&SNAPSHOT, data, t, Limits::default(), &mut out).is_some() {
            let h = Header::decode(&out).expect("reply has a header");
            assert!(h.flags.qr);
            assert_eq!(out[..2], data[..2]);
            Message::decode(&out).expect("reply decodes");
            if t == Transport::Udp {
                assert!(out.len() <= 1232);
            }
        }
    }
});
