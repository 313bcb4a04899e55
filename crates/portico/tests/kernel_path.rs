//! `portico run` on the kernel path, in network namespaces this test creates (root, `nft`):
//! client → node (portico, `forwarding: auto`) → two backends. `/status` names the path and
//! its reason; traffic flows through the nft maps; a failing health check is reflected in the
//! map (the time from the check result to the applied batch is read from portico's own log
//! lines and printed, split into stages); the per-backend counters reach `/metrics`; a SIGKILL
//! leaves the table, the next start repairs it; SIGTERM removes it. A node that does not
//! forward IPv6 serves its IPv6 services through the proxy (`ipv6ForwardingOff`).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::kernellab::{
    Lab, Portico, can_run, first_line, get, in_ns, map_backends, sh, stamp, wait_for,
};

const VIP: &str = "10.78.100.1";

/// Client 10.78.0.2 → node → backends 10.78.K.2 (TCP :8080 answers the backend's name);
/// `tag` tells the namespaces of tests running at once apart.
fn lab(tag: &str) -> Lab {
    let lab = Lab::new(tag, "10.78");
    for k in 1..=2 {
        let l = in_ns(&lab.names[k + 1], || {
            TcpListener::bind("0.0.0.0:8080").expect("bind")
        });
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let mut s = s;
                let _ = s.write_all(format!("b{k}\n").as_bytes());
            }
        });
    }
    lab
}

fn start(lab: &Lab, config: &std::path::Path) -> Portico {
    // lb=debug: the stamp of each published health view (splits the latency)
    Portico::spawn(lab.node(), config, "info,lb=debug,kernel=debug")
}

/// The backend answering one connection through the VIP from the client.
fn backend_via_vip(lab: &Lab) -> Option<String> {
    first_line(
        lab.client(),
        SocketAddr::new(VIP.parse().unwrap(), 80),
        Duration::from_secs(1),
    )
    .ok()
}

/// The median the test asserts for check result → batch applied with libnftables in place
/// of netlink (`PORTICO_NFT=library`), in seconds.
const ASSERTED_MEDIAN: f64 = 0.050;
/// The maximum the test asserts for check result → batch applied (issue 11's target: the
/// element batch goes straight to netlink; see the assertion for the figures).
const ASSERTED_MAX: f64 = 0.050;

/// A numeric `key=value` field of a log line.
fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))?
        .parse()
        .ok()
}

/// One health change's latency split into its stages (milliseconds): before the kernel
/// driver took the change (the check task, the balancer publishing `HealthView`, the watch,
/// the driver's loop), planning, waiting for the nft thread, libnftables, and the driver's
/// wake-up after the answer.
struct Stages {
    total: f64,
    /// Check result → `HealthView` published by the balancer (its debug log line).
    publish: Option<f64>,
    upstream: f64,
    plan: f64,
    queue: f64,
    nft: f64,
    resume: f64,
}

impl Stages {
    fn of(total: f64, publish: Option<f64>, line: &str) -> Self {
        let ms = |k: &str| field(line, k).unwrap_or(0) as f64 / 1e3;
        Self {
            total: total * 1e3,
            publish,
            upstream: total * 1e3 - ms("total_us"),
            plan: ms("plan_us"),
            queue: ms("queue_us"),
            nft: ms("nft_us"),
            resume: ms("resume_us"),
        }
    }
}

impl std::fmt::Display for Stages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let publish = self
            .publish
            .map_or_else(|| "?".to_string(), |p| format!("{p:.1}"));
        write!(
            f,
            "{:.1} ms = before the driver {:.1} (of which published after {publish}) + plan {:.1} + queue {:.1} + nft {:.1} + resume {:.1}",
            self.total, self.upstream, self.plan, self.queue, self.nft, self.resume
        )
    }
}

#[test]
fn a_service_runs_on_the_kernel_path_end_to_end() {
    if !can_run("network namespaces, nftables") {
        return;
    }
    let lab = lab("kp");
    let dir = std::env::temp_dir().join(format!("pk-{}-kernel-path", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("portico.yaml");
    std::fs::write(
        &config,
        format!(
            "node: {{name: n1}}\nservices:\n  - name: web\n    vips: [{VIP}]\n    ports: [{{port: 80, target_port: 8080}}]\n    \
             health_check: {{type: tcp, interval: 100ms, timeout: 50ms, rise: 1, fall: 1}}\n    \
             backends: [{{name: b1, address: 10.78.1.2}}, {{name: b2, address: 10.78.2.2}}]\n  \
             - name: legacy\n    vips: [10.78.100.2]\n    ports: [{{port: 80, target_port: 8080}}]\n    proxy_protocol: v1\n    \
             backends: [{{address: 10.78.1.2}}]\n"
        ),
    )
    .unwrap();

    // a crash of an earlier run left a table behind
    sh(&[
        "ip",
        "netns",
        "exec",
        lab.node(),
        "nft",
        "add table inet portico; add chain inet portico stale",
    ]);
    let p = start(&lab, &config);
    let status: serde_json::Value = wait_for("/status", 20, || {
        let v: serde_json::Value = serde_json::from_str(&get(lab.node(), "/status")?).ok()?;
        v["ready"].as_bool()?.then_some(v)
    });
    let web = &status["services"][0];
    assert_eq!(web["path"], "kernel", "{status:#}");
    assert_eq!(web["path_reason"], "auto");
    assert_eq!(status["services"][1]["path"], "proxy");
    assert_eq!(status["services"][1]["path_reason"], "proxyProtocol");
    // the first batch replaces the stale table (it may land just after /status says ready)
    wait_for("crash state repaired", 10, || {
        let chains = sh(&[
            "ip",
            "netns",
            "exec",
            lab.node(),
            "nft",
            "list",
            "table",
            "inet",
            "portico",
        ]);
        (!chains.contains("stale") && chains.contains("map")).then_some(())
    });

    wait_for("both backends in the map", 10, || {
        (map_backends(lab.node())?.len() == 2).then_some(())
    });
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        if let Some(b) = backend_via_vip(&lab) {
            seen.insert(b);
        }
    }
    assert_eq!(
        seen.len(),
        2,
        "both backends reached through the kernel: {seen:?}"
    );

    // b2's checks fail (its port drops the node's packets), then pass again: each change is
    // one batch; the time from the check result to the applied batch comes from the log
    let b2 = lab.names[3].clone();
    let mut figures = Vec::new();
    let mut nft_us = Vec::new();
    let mut stages = Vec::new();
    let mut engines = std::collections::BTreeSet::new();
    for round in 0..10 {
        while p.logs.try_recv().is_ok() {}
        sh(&[
            "ip",
            "netns",
            "exec",
            &b2,
            "nft",
            "add table inet pkdrop; add chain inet pkdrop in { type filter hook input priority 0; }; add rule inet pkdrop in tcp dport 8080 drop",
        ]);
        wait_for("b2 out of the map", 10, || {
            (map_backends(lab.node())? == ["10.78.1.2".to_string()].into()).then_some(())
        });
        sh(&[
            "ip",
            "netns",
            "exec",
            &b2,
            "nft",
            "delete table inet pkdrop",
        ]);
        wait_for("b2 back in the map", 10, || {
            (map_backends(lab.node())?.len() == 2).then_some(())
        });
        // pair each kernel batch with the first health change it carries (a batch applies
        // every change since the previous one: the first waited longest)
        let lines: Vec<String> = p.logs.try_iter().collect();
        let mut checked: Option<f64> = None;
        let mut published: Option<f64> = None;
        for l in &lines {
            // b2's changes only, and not a first verdict `Unknown → Up`: unknown already
            // counts as serving, so it changes no map (pairing it with the next batch once
            // gave a false 89-160 ms "latency" in round 0, when b1's first check came late)
            if l.contains("backend health changed")
                && l.contains("service=web")
                && l.contains("backend=b2")
                && !l.contains("from=Unknown to=Up")
            {
                checked = checked.or_else(|| stamp(l));
            } else if l.contains("health view published") && checked.is_some() {
                published = published.or_else(|| stamp(l));
            } else if l.contains("kernel path applied")
                && l.contains("kind=\"elements\"")
                && let (Some(c), Some(a)) = (checked.take(), stamp(l))
            {
                figures.push(a - c);
                if let Some(us) = field(l, "nft_us") {
                    nft_us.push(us);
                }
                let p = published.take().map(|p| (p - c) * 1e3);
                if a - c > ASSERTED_MEDIAN {
                    println!(
                        "slow change in round {round}; its log lines:\n{}",
                        lines.join("\n")
                    );
                }
                stages.push(Stages::of(a - c, p, l));
                if let Some(e) = l.split("engine=").nth(1) {
                    engines.insert(e.split_whitespace().next().unwrap_or("").to_string());
                }
            }
        }
        assert!(
            !figures.is_empty(),
            "round {round}: no paired log lines in {lines:#?}"
        );
    }
    figures.sort_by(f64::total_cmp);
    nft_us.sort_unstable();
    println!(
        "check result → nft batch applied (portico's log stamps), {} changes, engine {engines:?}: \
         min {:.1} ms, median {:.1} ms, max {:.1} ms; of which the nft call: median {:.1} ms, max {:.1} ms",
        figures.len(),
        figures[0] * 1e3,
        figures[figures.len() / 2] * 1e3,
        figures[figures.len() - 1] * 1e3,
        nft_us.get(nft_us.len() / 2).copied().unwrap_or(0) as f64 / 1e3,
        nft_us.last().copied().unwrap_or(0) as f64 / 1e3,
    );
    // where the slowest changes spent their time
    stages.sort_by(|a: &Stages, b| b.total.total_cmp(&a.total));
    for s in stages.iter().take(5) {
        println!("  {s}");
    }
    // Element batches go straight to netlink unless PORTICO_NFT names an nft engine to
    // compare with: `library` (libnftables in-process) or `command` (the nft binary).
    let want = match std::env::var("PORTICO_NFT").as_deref() {
        Ok("command") => "\"command\"",
        Ok("library") if sys::nftables::available().is_ok() => "\"library\"",
        Ok("library") => "\"command\"",
        _ => "\"netlink\"",
    };
    assert_eq!(engines, [want.to_string()].into(), "engine used");
    // Issue 11: within 50 ms of the check result, asserted for the worst of the changes.
    // Measured here (shared 2-core VM, 20 changes per run, debug build), netlink element
    // batches: 12 runs at load 3.7-4.8, median 3.1-5.8 ms, max 4.1-28.8 ms; 12 runs while
    // `cargo build --release -p portico` ran beside them (load 2.9-6.1), median 2.1-5.1 ms,
    // max 3.7-18.8 ms, the netlink call itself at most 9.3 ms. Interleaved with those,
    // libnftables (`PORTICO_NFT=library`): median 4.3-11.1 ms, max 8.0-39.2 ms; before this
    // change (a socket per batch, libnftables' parse) the worst seen was 68 ms.
    let (median, max) = (figures[figures.len() / 2], figures[figures.len() - 1]);
    match want {
        "\"netlink\"" => assert!(max < ASSERTED_MAX, "{figures:?}"),
        "\"library\"" => assert!(median < ASSERTED_MEDIAN && max < 0.100, "{figures:?}"),
        _ => assert!(median < 0.100, "{figures:?}"),
    }

    // the per-backend counters reach /metrics (read every 5 s)
    wait_for("kernel counters in /metrics", 15, || {
        let m = get(lab.node(), "/metrics")?;
        m.lines()
            .any(|l| {
                l.starts_with("portico_kernel_backend_packets_total{")
                    && l.contains("service=\"web\"")
                    && !l.ends_with(" 0")
            })
            .then_some(())
    });

    // SIGKILL leaves the table; SIGTERM of the next run removes it
    let mut p = p;
    p.child.kill().unwrap();
    p.child.wait().unwrap();
    assert!(
        map_backends(lab.node()).is_some(),
        "a crash leaves the table"
    );
    let p2 = start(&lab, &config);
    wait_for("second run ready", 20, || {
        let v: serde_json::Value = serde_json::from_str(&get(lab.node(), "/status")?).ok()?;
        v["ready"].as_bool()?.then_some(())
    });
    wait_for("map repaired", 10, || {
        (map_backends(lab.node())?.len() == 2).then_some(())
    });
    assert!(backend_via_vip(&lab).is_some());
    sys::kill(p2.child.id(), sys::SIGTERM).unwrap();
    let mut p2 = p2;
    wait_for("graceful exit", 20, || p2.child.try_wait().ok().flatten());
    assert!(
        map_backends(lab.node()).is_none(),
        "a graceful stop removes the table"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Adds IPv6 to [`lab`]: fd78:K::1 on the node's links, fd78:K::2 on the peers (default
/// routes through the node), and a listener on [fd78:K::2]:8080 in each backend.
fn add_ipv6(lab: &Lab) {
    let n = lab.node().to_string();
    for (k, peer) in [lab.client(), &lab.names[2], &lab.names[3]]
        .into_iter()
        .enumerate()
    {
        let dev = format!("v{k}");
        let (node_ip, peer_ip) = (format!("fd78:{k}::1/64"), format!("fd78:{k}::2/64"));
        sh(&[
            "ip", "-n", &n, "addr", "add", &node_ip, "dev", &dev, "nodad",
        ]);
        sh(&[
            "ip", "-n", peer, "addr", "add", &peer_ip, "dev", "eth0", "nodad",
        ]);
        sh(&[
            "ip",
            "-n",
            peer,
            "-6",
            "route",
            "add",
            "default",
            "via",
            &format!("fd78:{k}::1"),
        ]);
    }
    for k in 1..=2 {
        // [::] would clash with the IPv4 listener on 0.0.0.0 (dual-stack socket)
        let l = in_ns(&lab.names[k + 1], move || {
            TcpListener::bind(format!("[fd78:{k}::2]:8080")).expect("bind [fd78:K::2]:8080")
        });
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let mut s = s;
                let _ = s.write_all(format!("b{k}\n").as_bytes());
            }
        });
    }
}

/// The names of the maps in the node's table (empty without the table).
fn map_names(lab: &Lab) -> Vec<String> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            lab.node(),
            "nft",
            "-j",
            "list",
            "table",
            "inet",
            "portico",
        ])
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
    v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| Some(i["map"]["name"].as_str()?.to_string()))
        .collect()
}

#[test]
fn ipv6_services_use_the_proxy_when_the_node_does_not_forward_ipv6() {
    if !can_run("network namespaces, nftables") {
        return;
    }
    let lab = lab("v6");
    add_ipv6(&lab);
    // a new namespace forwards no IPv6; say so explicitly (the lab forwards IPv4)
    sh(&[
        "ip",
        "netns",
        "exec",
        lab.node(),
        "sysctl",
        "-qw",
        "net.ipv6.conf.all.forwarding=0",
    ]);
    let dir = std::env::temp_dir().join(format!("pk-{}-kernel-v6", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("portico.yaml");
    std::fs::write(
        &config,
        "node: {name: n1}\nservices:\n  - name: web4\n    vips: [10.78.100.1]\n    ports: [{port: 80, target_port: 8080}]\n    \
         backends: [{name: b1, address: 10.78.1.2}]\n  \
         - name: web6\n    vips: [\"fd78:100::1\"]\n    ports: [{port: 80, target_port: 8080}]\n    \
         backends: [{name: b1, address: \"fd78:1::2\"}]\n  \
         - name: web6k\n    forwarding: kernel\n    vips: [\"fd78:100::2\"]\n    ports: [{port: 80, target_port: 8080}]\n    \
         backends: [{name: b2, address: \"fd78:2::2\"}]\n",
    )
    .unwrap();
    let p = start(&lab, &config);
    let status: serde_json::Value = wait_for("/status", 20, || {
        let v: serde_json::Value = serde_json::from_str(&get(lab.node(), "/status")?).ok()?;
        v["ready"].as_bool()?.then_some(v)
    });
    let path = |i: usize| {
        (
            status["services"][i]["path"].as_str().unwrap_or_default(),
            status["services"][i]["path_reason"]
                .as_str()
                .unwrap_or_default(),
        )
    };
    assert_eq!(path(0), ("kernel", "auto"), "{status:#}");
    assert_eq!(path(1), ("proxy", "ipv6ForwardingOff"), "{status:#}");
    assert_eq!(path(2), ("proxy", "ipv6ForwardingOff"), "{status:#}");
    // only the IPv4 service has a map; the IPv6 ones are served by the proxy
    wait_for("the IPv4 map", 10, || {
        let maps = map_names(&lab);
        (!maps.is_empty()).then_some(maps)
    });
    let maps = map_names(&lab);
    assert!(
        maps.iter().all(|m| m.ends_with("v4")),
        "no IPv6 map: {maps:?}"
    );
    // a standalone node without announcing interfaces announces nothing: the host delivers
    // the proxied VIPs locally (the kernel path's DNAT needs no address)
    for vip in ["fd78:100::1/128", "fd78:100::2/128"] {
        sh(&[
            "ip",
            "-n",
            lab.node(),
            "addr",
            "add",
            vip,
            "dev",
            "lo",
            "nodad",
        ]);
    }
    for (vip, want) in [("fd78:100::1", "b1"), ("fd78:100::2", "b2")] {
        let got = wait_for(&format!("[{vip}]:80 answers through the proxy"), 10, || {
            let vip: std::net::IpAddr = vip.parse().unwrap();
            in_ns(lab.client(), move || {
                let s =
                    TcpStream::connect_timeout(&SocketAddr::new(vip, 80), Duration::from_secs(1))
                        .ok()?;
                s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
                let mut line = String::new();
                BufReader::new(s).read_line(&mut line).ok()?;
                Some(line.trim().to_string()).filter(|l| !l.is_empty())
            })
        });
        assert_eq!(got, want, "{vip}");
    }
    assert_eq!(
        backend_via_vip(&lab).as_deref(),
        Some("b1"),
        "IPv4 on the kernel path"
    );
    let logs: Vec<String> = p.logs.try_iter().collect();
    assert!(
        logs.iter().any(
            |l| l.contains("ipv6ForwardingOff") && l.contains("net.ipv6.conf.all.forwarding=1")
        ),
        "the log says how to turn IPv6 forwarding on"
    );
    drop(p);
    let _ = std::fs::remove_dir_all(&dir);
}
