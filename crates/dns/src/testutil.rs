//! Fixtures shared by the unit tests: a config with two zones and three services, and a
//! query builder.

use std::sync::Arc;

use model::{BackendKey, Config, Health, HealthView, OwnershipView, VipOwnership};

use crate::wire::{CLASS_IN, Header, Message, Question, Record, name_to_wire, rtype};

/// Two zones; `web` (3 VIPs, port http/tcp), `db` (node mode, fail closed, TTL 30 s), `api`
/// in the second zone, `big` with 40 IPv4 and 40 IPv6 VIPs, `hidden` (DNS disabled).
pub const YAML: &str = r#"
dns:
  listen: 127.0.0.1:0
  zones:
    - name: lb.example.com
      negative_ttl: 30s
      serial: 7
    - name: Other.Test.
      ttl: 60s
      ns: [ns1.other.test, ns2.example.net]
services:
  - name: web
    vips: [192.0.2.1, 192.0.2.2, "2001:db8::1"]
    ports:
      - {name: http, port: 80}
      - {name: dns, port: 53, protocol: udp}
    backends:
      - {address: 10.0.1.1, name: b1}
      - {address: 10.0.1.2, name: b2}
  - name: db
    vips: [192.0.2.10]
    ports: [{name: mysql, port: 3306, target_port: 3307}]
    backends:
      - {address: 10.0.2.1, name: n1}
      - {address: 10.0.2.2, name: n2}
      - {address: "2001:db8::2:3", name: n3}
    dns: {mode: nodes, fail_closed: true, ttl: 30s}
  - name: api
    vips: [192.0.2.20]
    ports: [{name: https, port: 443}]
    backends: [{address: 10.0.3.1}]
    dns: {zone: other.test, hostname: www}
  - name: big
    vips: [BIG]
    ports: [{name: http, port: 80}]
    backends: [{address: 10.0.4.1}]
  - name: hidden
    vips: [192.0.2.30]
    ports: [{name: http, port: 80}]
    backends: [{address: 10.0.5.1}]
    dns: {enabled: false}
"#;

/// The fixture config.
pub fn config() -> Arc<Config> {
    let big: Vec<String> = (1..=40)
        .map(|i| format!("198.51.100.{i}"))
        .chain((1..=40).map(|i| format!("\"2001:db8:40::{i:x}\"")))
        .collect();
    let yaml = YAML.replace("BIG", &big.join(", "));
    match model::config::parse(&yaml, &model::config::Environment::default()) {
        Ok(c) => Arc::new(c),
        Err(e) => panic!("fixture config: {e:?}"),
    }
}

/// Health with the given backends down.
pub fn health_down(down: &[(&str, &str)]) -> HealthView {
    down.iter()
        .map(|(s, b)| (BackendKey::new(*s, *b), Health::Down))
        .collect()
}

/// Ownership with the given VIPs unowned.
pub fn unowned(vips: &[&str]) -> OwnershipView {
    vips.iter()
        .map(|v| {
            (
                v.parse().expect("ip"),
                VipOwnership {
                    owner: None,
                    reason: "noEligibleNode".into(),
                },
            )
        })
        .collect()
}

/// A query for `name`/`qtype` with RD set and, if `edns` is given, an OPT record with that
/// UDP payload size.
pub fn query(id: u16, name: &str, qtype: u16, edns: Option<u16>) -> Vec<u8> {
    let mut m = Message {
        header: Header {
            id,
            ..Default::default()
        },
        questions: vec![Question {
            name: name_to_wire_case(name),
            qtype,
            qclass: CLASS_IN,
        }],
        ..Default::default()
    };
    m.header.flags.rd = true;
    if let Some(size) = edns {
        m.additional.push(Record {
            name: vec![0],
            rtype: rtype::OPT,
            class: size,
            ttl: 0,
            rdata: vec![],
        });
    }
    m.encode()
}

/// Like [`name_to_wire`] but keeping the case as written.
pub fn name_to_wire_case(name: &str) -> Vec<u8> {
    let lower = name_to_wire(name).expect("name");
    let mut out = lower.clone();
    let mut i = 0;
    let src: Vec<u8> = name
        .trim_end_matches('.')
        .bytes()
        .filter(|&b| b != b'.')
        .collect();
    let mut k = 0;
    while out[i] != 0 {
        let l = out[i] as usize;
        out[i + 1..i + 1 + l].copy_from_slice(&src[k..k + l]);
        k += l;
        i += 1 + l;
    }
    out
}
