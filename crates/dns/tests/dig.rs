//! End-to-end tests with the real `dig` (Debian's dnsutils) against the server on
//! 127.0.0.1:<ephemeral>: every record type, rotation, health and ownership changes measured
//! with real queries, negative answers, TCP, truncation and EDNS0 buffer sizes.

mod common;

use std::collections::BTreeSet;

use common::{Harness, count, dig_available, flags, status};
use model::Health;
use tokio::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_type() {
    if !dig_available() {
        return;
    }
    let h = Harness::start().await;
    let mut a = h.short(&["web.lb.example.com", "A"]).await;
    a.sort();
    assert_eq!(a, ["192.0.2.1", "192.0.2.2"]);
    assert_eq!(
        h.short(&["web.lb.example.com", "AAAA"]).await,
        ["2001:db8::1"]
    );
    assert_eq!(
        h.short(&["_http._tcp.web.lb.example.com", "SRV"]).await,
        ["0 0 80 web.lb.example.com."]
    );
    assert_eq!(
        h.short(&["_dns._udp.web.lb.example.com", "SRV"]).await,
        ["0 0 53 web.lb.example.com."]
    );
    assert_eq!(
        h.short(&["_mysql._tcp.db.lb.example.com", "SRV"]).await,
        ["0 0 3307 db.lb.example.com."]
    );
    assert_eq!(
        h.short(&["lb.example.com", "SOA"]).await,
        ["ns1.lb.example.com. hostmaster.lb.example.com. 7 3600 600 604800 30"]
    );
    assert_eq!(
        h.short(&["other.test", "NS"]).await,
        ["ns1.other.test.", "ns2.example.net."]
    );
    assert_eq!(h.short(&["www.other.test", "A"]).await, ["192.0.2.20"]);
    // Node mode: the backends' addresses.
    let mut db = h.short(&["db.lb.example.com", "A"]).await;
    db.sort();
    assert_eq!(db, ["10.0.2.1", "10.0.2.2"]);
    // ANY: one synthesized HINFO (RFC 8482).
    assert_eq!(
        h.short(&["web.lb.example.com", "ANY"]).await,
        ["\"RFC8482\" \"\""]
    );
    // TTLs: zone default 5 s, service override 30 s, second zone 60 s.
    let ttl = |out: String| {
        out.split_whitespace()
            .nth(1)
            .and_then(|t| t.parse::<u32>().ok())
    };
    assert_eq!(
        ttl(h
            .dig(&["+noall", "+answer", "web.lb.example.com", "A"])
            .await),
        Some(5)
    );
    assert_eq!(
        ttl(h
            .dig(&["+noall", "+answer", "db.lb.example.com", "A"])
            .await),
        Some(30)
    );
    assert_eq!(
        ttl(h.dig(&["+noall", "+answer", "www.other.test", "A"]).await),
        Some(60)
    );
    // Authoritative, recursion desired is ignored and not offered.
    let full = h.dig(&["web.lb.example.com", "A"]).await;
    assert_eq!(status(&full), "NOERROR");
    let f = flags(&full);
    assert!(
        f.contains(&"aa") && f.contains(&"rd") && !f.contains(&"ra"),
        "{f:?}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_across_queries() {
    if !dig_available() {
        return;
    }
    let h = Harness::start().await;
    let mut firsts = BTreeSet::new();
    let mut orders = BTreeSet::new();
    for _ in 0..12 {
        let a = h.short(&["big.lb.example.com", "A", "+tcp"]).await;
        assert_eq!(a.len(), 40);
        firsts.insert(a[0].clone());
        orders.insert(a);
    }
    // Every query advances the rotation by one record: 12 queries, 12 different orders.
    assert_eq!(firsts.len(), 12, "{firsts:?}");
    assert_eq!(orders.len(), 12);
    let mut seen = BTreeSet::new();
    for _ in 0..4 {
        seen.insert(h.short(&["web.lb.example.com", "A"]).await.join(","));
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    h.stop().await;
}

/// Queries every 20 ms until `done(answer)` holds; returns the time it took.
async fn until(h: &Harness, args: &[&str], done: impl Fn(&[String]) -> bool) -> Duration {
    let start = Instant::now();
    loop {
        let a = h.short(args).await;
        if done(&a) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "still {a:?} after 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_change_removes_and_returns_within_a_second() {
    if !dig_available() {
        return;
    }
    let h = Harness::start().await;
    let db = ["db.lb.example.com", "A"];
    assert_eq!(h.short(&db).await.len(), 2);

    h.set_health("db", &["n1"], Health::Down);
    let took = until(&h, &db, |a| a == ["10.0.2.2"]).await;
    println!("node removed after {took:?}");
    assert!(took < Duration::from_secs(1), "removal took {took:?}");

    h.set_health("db", &["n1"], Health::Up);
    let took = until(&h, &db, |a| a.len() == 2).await;
    println!("node returned after {took:?}");
    assert!(took < Duration::from_secs(1), "return took {took:?}");

    // Everything down: fail closed gives NODATA, and status says so.
    h.set_health("db", &["n1", "n2"], Health::Down);
    until(&h, &db, <[String]>::is_empty).await;
    let full = h.dig(&db).await;
    assert_eq!((status(&full), count(&full, "ANSWER")), ("NOERROR", 0));
    let st = h.server.status();
    let s = st.iter().find(|s| s.service == "db").expect("db status");
    assert_eq!(s.state, model::DnsAnswerState::FailClosed);

    // VIP mode: all backends down fails open (every VIP), then a lost owner removes its VIP.
    let web = ["web.lb.example.com", "A"];
    let web_state = || {
        h.server
            .status()
            .iter()
            .find(|s| s.service == "web")
            .expect("web status")
            .state
    };
    assert_eq!(web_state(), model::DnsAnswerState::Healthy);
    h.set_health("web", &["b1", "b2"], Health::Down);
    // Wait for the snapshot built from "all down" (answers and status come from the same one).
    let start = Instant::now();
    while web_state() != model::DnsAnswerState::FailOpen {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "web never failed open with every backend down: {:?}",
            web_state()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(h.metrics().contains("portico_dns_services_fail_open 1"));
    assert_eq!(h.short(&web).await.len(), 2, "fail open answers every VIP");
    h.set_health("web", &["b1"], Health::Up);
    h.set_owner("192.0.2.1", None);
    let took = until(&h, &web, |a| a == ["192.0.2.2"]).await;
    println!("unowned VIP removed after {took:?}");
    assert!(took < Duration::from_secs(1), "removal took {took:?}");
    h.set_owner("192.0.2.1", Some("node-b"));
    let took = until(&h, &web, |a| a.len() == 2).await;
    assert!(took < Duration::from_secs(1), "return took {took:?}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nxdomain_nodata_refused() {
    if !dig_available() {
        return;
    }
    let h = Harness::start().await;
    let soa_ttl = |out: &str| {
        out.lines()
            .find(|l| l.contains("\tSOA\t") && !l.starts_with(';'))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|t| t.parse::<u32>().ok())
    };
    // NXDOMAIN: authoritative, SOA in authority with the negative TTL (min(SOA TTL, minimum)).
    let out = h.dig(&["nope.lb.example.com", "A"]).await;
    assert_eq!(status(&out), "NXDOMAIN");
    assert!(flags(&out).contains(&"aa"));
    assert_eq!((count(&out, "ANSWER"), count(&out, "AUTHORITY")), (0, 1));
    assert_eq!(soa_ttl(&out), Some(5));
    // NODATA: existing name, other type; and an empty non-terminal.
    for q in [
        ["web.lb.example.com", "TXT"],
        ["_tcp.web.lb.example.com", "A"],
        ["web.lb.example.com", "MX"],
    ] {
        let out = h.dig(&q).await;
        assert_eq!(status(&out), "NOERROR", "{q:?}");
        assert_eq!(
            (count(&out, "ANSWER"), count(&out, "AUTHORITY")),
            (0, 1),
            "{q:?}"
        );
        assert!(flags(&out).contains(&"aa"));
    }
    // Second zone: its own SOA, TTL min(60, 5).
    let out = h.dig(&["nope.other.test", "A"]).await;
    assert_eq!(status(&out), "NXDOMAIN");
    assert!(
        out.contains("other.test.\t\t5\tIN\tSOA\tns1.other.test."),
        "{out}"
    );
    // Outside the zones: REFUSED, not authoritative.
    let out = h.dig(&["example.org", "A"]).await;
    assert_eq!(status(&out), "REFUSED");
    assert!(!flags(&out).contains(&"aa"));
    // Other opcodes: NOTIMP.
    let out = h.dig(&["+opcode=status", "web.lb.example.com"]).await;
    assert_eq!(status(&out), "NOTIMP", "{out}");
    // The question is echoed as sent.
    let out = h.dig(&["WeB.lB.example.COM", "A"]).await;
    assert!(out.contains(";WeB.lB.example.COM.\t\tIN\tA"), "{out}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_truncation_and_edns_sizes() {
    if !dig_available() {
        return;
    }
    let h = Harness::start().await;
    // TCP.
    let mut a = h.short(&["+tcp", "web.lb.example.com", "A"]).await;
    a.sort();
    assert_eq!(a, ["192.0.2.1", "192.0.2.2"]);
    let out = h.dig(&["+tcp", "nope.lb.example.com"]).await;
    assert_eq!(status(&out), "NXDOMAIN");

    // 40 A records (687 bytes with OPT) do not fit 512: TC, nothing in the answer.
    for args in [
        &["+bufsize=512", "+ignore"][..],
        &["+noedns", "+ignore"][..],
    ] {
        let mut q = args.to_vec();
        q.extend(["big.lb.example.com", "A"]);
        let out = h.dig(&q).await;
        assert!(flags(&out).contains(&"tc"), "{args:?}: {out}");
        assert_eq!(count(&out, "ANSWER"), 0);
    }
    // dig retries over TCP on its own after TC.
    let out = h.dig(&["+bufsize=512", "big.lb.example.com", "A"]).await;
    assert!(out.contains("Truncated, retrying in TCP mode"), "{out}");
    assert_eq!(count(&out, "ANSWER"), 40);
    assert_eq!(
        h.short(&["+tcp", "big.lb.example.com", "A"]).await.len(),
        40
    );
    // EDNS0 sizes: 1232 fits 40 A and 40 AAAA (1167 bytes); 1024 fits A but not AAAA.
    for (size, qtype, fits) in [
        ("1232", "A", true),
        ("1232", "AAAA", true),
        ("1024", "A", true),
        ("1024", "AAAA", false),
        ("4096", "AAAA", true),
    ] {
        let out = h
            .dig(&[
                &format!("+bufsize={size}"),
                "+ignore",
                "big.lb.example.com",
                qtype,
            ])
            .await;
        assert_eq!(
            !flags(&out).contains(&"tc"),
            fits,
            "bufsize {size} {qtype}: {out}"
        );
        assert_eq!(count(&out, "ANSWER"), if fits { 40 } else { 0 });
        // The OPT record is echoed with this server's own payload size.
        assert!(
            out.contains("; EDNS: version: 0, flags:; udp: 1232"),
            "{out}"
        );
    }
    let out = h.dig(&["+noedns", "web.lb.example.com"]).await;
    assert!(!out.contains("OPT PSEUDOSECTION"), "{out}");
    // EDNS version 1: BADVERS.
    let out = h
        .dig(&["+edns=1", "+noednsnegotiation", "web.lb.example.com"])
        .await;
    assert_eq!(status(&out), "BADVERS", "{out}");
    h.stop().await;
}
