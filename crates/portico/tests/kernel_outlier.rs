//! Passive outlier detection on the kernel path, end to end (root, `nft`): `portico run` in a
//! node namespace this test creates, a kernel-path service with two backends whose health check
//! targets another port. Backend b2 closes its service listener (its check still passes): the
//! client's connections through the VIP that land on b2 are refused, conntrack reports them,
//! and after `consecutive_failures` refusals b2 leaves the nft map (read back), `/status` says
//! it is ejected, and every connection succeeds; once the ejection time is over b2 is back in
//! the map, half-open, and its next flow closes the breaker. Without the conntrack event feed
//! nothing ejects b2 and the test fails. A second test black-holes b2 (its SYNs dropped): it is
//! ejected after `consecutive_failures` flows unanswered for `connection.connect_timeout`.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::kernellab::{
    Lab, Portico, can_run, first_line, get, in_ns, map_backends, sh, stamp, wait_for,
};
use tokio::time::Instant;

const VIP: &str = "10.79.100.1";
const EJECTION: Duration = Duration::from_secs(3);

/// A listener in namespace `ns` answering its name on each connection until `stop`; closing
/// it (drop) makes the backend's kernel refuse the port with a RST.
fn serve(ns: &str, port: u16, name: &'static str) -> Arc<AtomicBool> {
    let l = in_ns(ns, move || {
        TcpListener::bind(("0.0.0.0", port)).expect("bind backend")
    });
    l.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
        let deadline = std::time::SystemTime::now() + Duration::from_secs(300);
        while !flag.load(Ordering::Relaxed) && std::time::SystemTime::now() < deadline {
            match l.accept() {
                Ok((mut s, _)) => {
                    let _ = s.write_all(format!("{name}\n").as_bytes());
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    stop
}

/// One connection through the VIP from the client: the backend's name, or the error.
fn via_vip(client: &str) -> Result<String, String> {
    first_line(
        client,
        SocketAddr::new(VIP.parse().unwrap(), 80),
        Duration::from_secs(2),
    )
}

/// Connects through the VIP from the client, `at_once` connections at a time, until b2 has
/// left the map (only b1's address in it); after `max_rounds` rounds panics with
/// `b2 was not ejected after <n> <failed>`. The failed connections and the rounds it took.
fn until_b2_ejected(
    client: &str,
    node: &str,
    at_once: usize,
    max_rounds: usize,
    failed: &str,
) -> (usize, usize) {
    let mut failures = 0;
    let mut round = 0;
    while map_backends(node) != Some(["10.79.1.2".to_string()].into()) {
        round += 1;
        assert!(
            round <= max_rounds,
            "b2 was not ejected after {failures} {failed}"
        );
        let clients: Vec<_> = (0..at_once)
            .map(|_| {
                let c = client.to_string();
                std::thread::spawn(move || via_vip(&c))
            })
            .collect();
        failures += clients
            .into_iter()
            .map(|c| c.join().map_or(true, |r| r.is_err()))
            .filter(|&failed| failed)
            .count();
    }
    (failures, round)
}

/// b2's row in `/status`.
fn b2_status(node: &str) -> Option<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_str(&get(node, "/status")?).ok()?;
    v["services"][0]["backends"]
        .as_array()?
        .iter()
        .find(|b| b["name"] == "b2")
        .cloned()
}

fn metric(node: &str, prefix: &str) -> f64 {
    get(node, "/metrics")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn a_refusing_backend_is_ejected_from_the_kernel_map_and_readmitted() {
    if !can_run("network namespaces, nftables, conntrack events") {
        return;
    }
    let lab = Lab::new("ko", "10.79");
    let (client, node) = (lab.names[0].clone(), lab.names[1].clone());
    let _b1 = serve(&lab.names[2], 8080, "b1");
    let _b1_check = serve(&lab.names[2], 9090, "b1");
    let b2 = serve(&lab.names[3], 8080, "b2");
    let _b2_check = serve(&lab.names[3], 9090, "b2");
    let (p, dir) = start(&lab, "ko");
    let mut seen = BTreeSet::new();
    for _ in 0..20 {
        seen.insert(via_vip(&client).expect("both backends serve"));
    }
    assert_eq!(seen.len(), 2, "both backends reached: {seen:?}");

    // b2 closes its service port; its health check port stays open
    b2.store(true, Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(50));
    while p.logs.try_recv().is_ok() {}
    let (refused, attempts) = until_b2_ejected(
        &client,
        &node,
        1,
        200,
        "refused connections (no conntrack feed?)",
    );
    let ejected_at = Instant::now();
    assert!(
        refused >= 3,
        "ejected after {refused} refusals, consecutive_failures is 3"
    );
    // the decision and its batch, from portico's log stamps
    let lines: Vec<String> = p.logs.try_iter().collect();
    let decided = lines
        .iter()
        .find(|l| l.contains("backend ejected") && l.contains("outlierEjected"))
        .and_then(|l| stamp(l))
        .unwrap_or_else(|| panic!("no ejection logged: {lines:#?}"));
    let applied = lines
        .iter()
        .filter(|l| l.contains("kernel path applied") && l.contains("kind=\"elements\""))
        .filter_map(|l| stamp(l))
        .find(|&t| t >= decided)
        .unwrap_or_else(|| panic!("no batch after the ejection: {lines:#?}"));
    let took = applied - decided;
    println!(
        "b2 ejected after {refused} refused connections ({attempts} attempts); ejection decision → nft batch applied: {:.1} ms",
        took * 1e3
    );
    assert!(took < 0.150, "ejection to batch took {took} s");

    let st = b2_status(&node).expect("b2 in /status");
    assert_eq!(st["ejected"], true, "{st}");
    assert_eq!(st["breaker"], "open", "{st}");
    assert_eq!(st["health"], "up", "its check still passes: {st}");
    assert!(st["connect_failures"].as_u64() >= Some(3), "{st}");
    assert!(
        metric(
            &node,
            "portico_kernel_backend_flow_outcomes_total{service=\"web\",backend=\"b2\",outcome=\"refused\"}"
        ) >= 3.0
    );
    assert_eq!(
        metric(
            &node,
            "portico_kernel_backend_ejections_total{service=\"web\",backend=\"b2\"}"
        ),
        1.0
    );
    for _ in 0..20 {
        assert_eq!(
            via_vip(&client).as_deref(),
            Ok("b1"),
            "all traffic succeeds"
        );
    }

    // b2 listens again; the ejection ends after base_ejection_time: back in the map
    let _b2_again = serve(&lab.names[3], 8080, "b2");
    wait_for("b2 back in the map", 15, || {
        (map_backends(&node)?.len() == 2).then_some(())
    });
    let back = ejected_at.elapsed();
    println!("b2 back in the map {back:?} after its ejection");
    assert!(
        back >= EJECTION - Duration::from_millis(500),
        "re-admitted after {back:?}, ejection time {EJECTION:?}"
    );
    let st = b2_status(&node).expect("b2 in /status");
    assert_eq!(st["ejected"], false, "{st}");
    assert_eq!(st["breaker"], "half-open", "{st}");
    // its next flow connects: the breaker closes
    wait_for("a flow on b2", 10, || {
        (via_vip(&client).ok()? == "b2").then_some(())
    });
    wait_for("b2's breaker closed", 5, || {
        (b2_status(&node)?["breaker"] == "closed").then_some(())
    });

    sys::kill(p.child.id(), sys::SIGTERM).unwrap();
    let mut p = p;
    wait_for("graceful exit", 20, || p.child.try_wait().ok().flatten());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Starts portico in the node namespace on the test's configuration, waits until it is ready
/// with both backends in the map and its conntrack event feed running.
fn start(lab: &Lab, tag: &str) -> (Portico, std::path::PathBuf) {
    let node = lab.names[1].clone();
    let dir = std::env::temp_dir().join(format!("pk-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("portico.yaml");
    std::fs::write(
        &config,
        format!(
            "node: {{name: n1}}\nservices:\n  - name: web\n    vips: [{VIP}]\n    \
             ports: [{{port: 80, target_port: 8080}}]\n    forwarding: kernel\n    \
             health_check: {{type: tcp, port: 9090, interval: 200ms, timeout: 100ms, rise: 1, fall: 1}}\n    \
             connection: {{connect_timeout: 1s}}\n    \
             outlier: {{conntrack_events: true, consecutive_failures: 3, base_ejection_time: {}s, max_ejection_percent: 50}}\n    \
             backends: [{{name: b1, address: 10.79.1.2}}, {{name: b2, address: 10.79.2.2}}]\n",
            EJECTION.as_secs()
        ),
    )
    .unwrap();
    let p = Portico::spawn(&node, &config, "info");
    wait_for("/status ready", 20, || {
        let v: serde_json::Value = serde_json::from_str(&get(&node, "/status")?).ok()?;
        v["ready"].as_bool()?.then_some(())
    });
    wait_for("both backends in the map", 10, || {
        (map_backends(&node)?.len() == 2).then_some(())
    });
    assert_eq!(
        metric(&node, "portico_kernel_passive_detection "),
        1.0,
        "the conntrack event feed runs"
    );
    (p, dir)
}

#[test]
fn a_black_holed_backend_is_ejected_after_connect_timeouts() {
    if !can_run("network namespaces, nftables, conntrack events") {
        return;
    }
    let lab = Lab::new("kb", "10.79");
    let (client, node) = (lab.names[0].clone(), lab.names[1].clone());
    let _b1 = serve(&lab.names[2], 8080, "b1");
    let _b1_check = serve(&lab.names[2], 9090, "b1");
    let _b2 = serve(&lab.names[3], 8080, "b2");
    let _b2_check = serve(&lab.names[3], 9090, "b2");
    let (p, dir) = start(&lab, "kb");
    // b2 drops every SYN to its service port (no answer at all); its check port answers
    sh(&[
        "ip",
        "netns",
        "exec",
        &lab.names[3],
        "nft",
        "add table inet pkdrop; add chain inet pkdrop in { type filter hook input priority 0; }; add rule inet pkdrop in tcp dport 8080 drop",
    ]);
    // 6 clients at once: those hashed to b2 wait for their 2 s connect timeout
    let (timed_out, rounds) = until_b2_ejected(&client, &node, 6, 10, "unanswered connections");
    assert!(timed_out >= 3, "ejected after {timed_out} timeouts");
    let st = b2_status(&node).expect("b2 in /status");
    assert_eq!(st["ejected"], true, "{st}");
    assert_eq!(st["health"], "up", "its check still passes: {st}");
    assert!(
        metric(
            &node,
            "portico_kernel_backend_flow_outcomes_total{service=\"web\",backend=\"b2\",outcome=\"timeout\"}"
        ) >= 3.0
    );
    println!("b2 ejected after {timed_out} unanswered connections ({rounds} rounds of 6)");
    for _ in 0..10 {
        assert_eq!(
            via_vip(&client).as_deref(),
            Ok("b1"),
            "all traffic succeeds"
        );
    }
    sys::kill(p.child.id(), sys::SIGTERM).unwrap();
    let mut p = p;
    wait_for("graceful exit", 20, || p.child.try_wait().ok().flatten());
    let _ = std::fs::remove_dir_all(&dir);
}
