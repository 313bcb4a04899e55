//! Test harness: the DNS server on 127.0.0.1:<ephemeral> with live health and ownership
//! channels, and a `dig` runner.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use model::{BackendKey, Desired, Health, HealthView, OwnershipView, VipOwnership};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Two zones; `web` (2 IPv4 + 1 IPv6 VIPs), `db` (node mode, fail closed), `big` (40 IPv4 and
/// 40 IPv6 VIPs), `api` in the second zone.
pub const YAML: &str = r#"
dns:
  listen: 127.0.0.1:0
  zones:
    - name: lb.example.com
      negative_ttl: 30s
      serial: 7
    - name: other.test
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
"#;

/// The fixture config text.
pub fn yaml() -> String {
    let big: Vec<String> = (1..=40)
        .map(|i| format!("198.51.100.{i}"))
        .chain((1..=40).map(|i| format!("\"2001:db8:40::{i:x}\"")))
        .collect();
    YAML.replace("BIG", &big.join(", "))
}

/// A running server.
pub struct Harness {
    /// Where it listens (UDP and TCP).
    pub addr: SocketAddr,
    /// Desired state.
    pub desired: watch::Sender<Arc<Desired>>,
    /// Health observations.
    pub health: watch::Sender<Arc<HealthView>>,
    /// Ownership observations.
    pub ownership: watch::Sender<Arc<OwnershipView>>,
    /// The server (for `status()`).
    pub server: dns::DnsServer,
    /// Its metrics.
    pub registry: prometheus_client::registry::Registry,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), dns::Error>>,
}

impl Harness {
    /// Starts the server with the fixture config.
    pub async fn start() -> Self {
        let cfg = model::config::parse(&yaml(), &model::config::Environment::default())
            .expect("fixture config");
        let (udp, tcp) = dns::bind("127.0.0.1:0".parse().expect("addr"), 2).expect("bind");
        let addr = tcp.local_addr().expect("addr");
        let mut registry = prometheus_client::registry::Registry::default();
        let server = dns::DnsServer::new(&mut registry);
        let (desired, d_rx) = watch::channel(Arc::new(Desired {
            generation: 1,
            config: Arc::new(cfg),
        }));
        let (health, h_rx) = watch::channel(Arc::new(HealthView::new()));
        let (ownership, o_rx) = watch::channel(Arc::new(OwnershipView::new()));
        let shutdown = CancellationToken::new();
        let s = server.clone();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move { s.run(udp, tcp, d_rx, h_rx, o_rx, stop).await });
        Self {
            addr,
            desired,
            health,
            ownership,
            server,
            registry,
            shutdown,
            task,
        }
    }

    /// Marks backends of `service` as `health`.
    pub fn set_health(&self, service: &str, backends: &[&str], health: Health) {
        self.health.send_modify(|h| {
            let mut v = (**h).clone();
            for b in backends {
                v.insert(BackendKey::new(service, *b), health);
            }
            *h = Arc::new(v);
        });
    }

    /// Sets the owner of a VIP (`None`: no eligible node).
    pub fn set_owner(&self, vip: &str, owner: Option<&str>) {
        self.ownership.send_modify(|o| {
            let mut v = (**o).clone();
            v.insert(
                vip.parse().expect("ip"),
                VipOwnership {
                    owner: owner.map(str::to_string),
                    reason: if owner.is_some() {
                        "owner"
                    } else {
                        "noEligibleNode"
                    }
                    .into(),
                },
            );
            *o = Arc::new(v);
        });
    }

    /// Runs `dig @127.0.0.1 -p PORT +time=2 +tries=1 ARGS…` and returns its stdout.
    pub async fn dig(&self, args: &[&str]) -> String {
        let out = tokio::process::Command::new("dig")
            .arg("@127.0.0.1")
            .arg("-p")
            .arg(self.addr.port().to_string())
            .args(["+time=2", "+tries=1"])
            .args(args)
            .output()
            .await
            .expect("run dig");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `dig +short` lines.
    pub async fn short(&self, args: &[&str]) -> Vec<String> {
        let mut a = vec!["+short"];
        a.extend_from_slice(args);
        self.dig(&a).await.lines().map(str::to_string).collect()
    }

    /// The metrics in the text exposition format.
    pub fn metrics(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("encode");
        out
    }

    /// Stops the server and checks it ended cleanly.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("join").expect("server result");
    }
}

/// Whether `dig` can run; prints the skip notice when it cannot.
pub fn dig_available() -> bool {
    let ok = std::process::Command::new("dig")
        .arg("-v")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        // CI (`.ci/run` sets PORTICO_CI) must run it: fail there instead of skipping
        assert!(
            std::env::var_os("PORTICO_CI").is_none(),
            "this test must run in CI but dig is not installed"
        );
        println!("skipped: dig not installed");
    }
    ok
}

/// The `status:` word of a full dig answer.
pub fn status(out: &str) -> &str {
    out.split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or("none")
}

/// The header flags of a full dig answer (`qr aa rd`).
pub fn flags(out: &str) -> Vec<&str> {
    out.split(";; flags: ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .map(|s| s.split_whitespace().collect())
        .unwrap_or_default()
}

/// The count dig prints for a section (`ANSWER`, `AUTHORITY`, …).
pub fn count(out: &str, section: &str) -> usize {
    out.split(&format!("{section}: "))
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(usize::MAX)
}
