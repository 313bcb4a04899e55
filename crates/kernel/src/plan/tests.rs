//! Golden tests of the plan and the diff, without root.

use super::*;
use model::config::{Environment, parse};
use model::{BackendKey, Health};

fn config(services: &str) -> Config {
    parse(&format!("services:\n{services}"), &Environment::default())
        .unwrap_or_else(|e| panic!("{e}"))
}

const WEB: &str = "  - name: web
    vips: [10.9.0.1, fd00::1]
    ports: [{port: 80, target_port: 8080}, {port: 53, protocol: udp}]
    backends:
      - {name: a, address: 10.0.1.1}
      - {name: b, address: 10.0.1.2, weight: 3}
      - {name: c, address: fd01::3}
  - name: legacy
    vips: [10.9.0.2]
    ports: [{port: 80}]
    proxy_protocol: v2
    backends: [{address: 10.0.1.9}]
";

#[test]
fn the_table_is_rendered_as_expected() {
    let rs = plan(&config(WEB), &HealthView::new(), 7).unwrap();
    let want = r#"table inet portico {
	counter c0b0 {
	}
	counter c0b1 {
	}
	counter c0b2 {
	}
	map s0p0v4 {
		typeof numgen inc mod 7 : ip daddr . tcp dport
	}
	map s0p1v4 {
		typeof numgen inc mod 7 : ip daddr . udp dport
	}
	map s0p0v6 {
		typeof numgen inc mod 7 : ip6 daddr . tcp dport
	}
	map s0p1v6 {
		typeof numgen inc mod 7 : ip6 daddr . udp dport
	}
	chain services {
		ip daddr 10.9.0.1 tcp dport 80 dnat ip to jhash ip saddr . tcp sport . ip daddr . tcp dport mod 7 seed 0x706f7274 map @s0p0v4
		ip daddr 10.9.0.1 udp dport 53 dnat ip to jhash ip saddr . udp sport . ip daddr . udp dport mod 7 seed 0x706f7274 map @s0p1v4
		ip6 daddr fd00::1 tcp dport 80 dnat ip6 to jhash ip6 saddr . tcp sport . ip6 daddr . tcp dport mod 7 seed 0x706f7274 map @s0p0v6
		ip6 daddr fd00::1 udp dport 53 dnat ip6 to jhash ip6 saddr . udp sport . ip6 daddr . udp dport mod 7 seed 0x706f7274 map @s0p1v6
	}
	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		jump services
	}
	chain output {
		type nat hook output priority -100; policy accept;
		jump services
	}
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		meta l4proto tcp ct status dnat ct original ip daddr 10.9.0.1 ct original proto-dst 80 masquerade
		meta l4proto udp ct status dnat ct original ip daddr 10.9.0.1 ct original proto-dst 53 masquerade
		meta l4proto tcp ct status dnat ct original ip6 daddr fd00::1 ct original proto-dst 80 masquerade
		meta l4proto udp ct status dnat ct original ip6 daddr fd00::1 ct original proto-dst 53 masquerade
	}
	chain counters {
		meta l4proto tcp ct reply ip saddr 10.0.1.1 ct reply proto-src 8080 ct original ip daddr 10.9.0.1 ct original proto-dst 80 counter name "c0b0" return
		meta l4proto tcp ct reply ip saddr 10.0.1.2 ct reply proto-src 8080 ct original ip daddr 10.9.0.1 ct original proto-dst 80 counter name "c0b1" return
		meta l4proto udp ct reply ip saddr 10.0.1.1 ct reply proto-src 53 ct original ip daddr 10.9.0.1 ct original proto-dst 53 counter name "c0b0" return
		meta l4proto udp ct reply ip saddr 10.0.1.2 ct reply proto-src 53 ct original ip daddr 10.9.0.1 ct original proto-dst 53 counter name "c0b1" return
		meta l4proto tcp ct reply ip6 saddr fd01::3 ct reply proto-src 8080 ct original ip6 daddr fd00::1 ct original proto-dst 80 counter name "c0b2" return
		meta l4proto udp ct reply ip6 saddr fd01::3 ct reply proto-src 53 ct original ip6 daddr fd00::1 ct original proto-dst 53 counter name "c0b2" return
	}
	chain count_forward {
		type filter hook postrouting priority filter; policy accept;
		ct status dnat jump counters
	}
	chain count_local {
		type filter hook input priority filter; policy accept;
		ct status dnat jump counters
	}
}
"#;
    assert_eq!(rs.structure, want, "got:\n{}", rs.structure);
    // the proxy-only service is not in the table
    assert!(!rs.structure.contains("10.9.0.2"));
    assert_eq!(rs.counters["c0b1"], BackendKey::new("web", "b"));
    // weights as in the proxy: b (3) owns about three times a's slots; v6 has only c
    let v4 = &rs.maps["s0p0v4"];
    let b = v4
        .iter()
        .filter(|s| s.unwrap().ip().to_string() == "10.0.1.2")
        .count();
    assert!(b >= 4, "{v4:?}");
    assert!(
        rs.maps["s0p0v6"]
            .iter()
            .all(|s| s.unwrap().to_string() == "[fd01::3]:8080")
    );
}

#[test]
fn start_replaces_the_whole_table_in_one_transaction() {
    let rs = plan(&config(WEB), &HealthView::new(), 7).unwrap();
    let Some(Batch::Replace(text)) = diff(None, &rs) else {
        panic!("start must replace")
    };
    assert!(
        text.starts_with(
            "add table inet portico\ndelete table inet portico\ntable inet portico {\n"
        )
    );
    assert!(
        text.contains(
            "add element inet portico s0p0v6 { 0 : [fd01::3] . 8080, 1 : [fd01::3] . 8080,"
        )
    );
    // only ever names its own table
    for line in text.lines().filter(|l| l.contains("table ")) {
        assert!(line.contains("table inet portico"), "{line}");
    }
}

#[test]
fn a_health_change_sends_only_the_moved_slots() {
    let cfg = config(WEB);
    let up = plan(&cfg, &HealthView::new(), 1021).unwrap();
    assert_eq!(diff(Some(&up), &up), None, "no change, no batch");
    let mut down = HealthView::new();
    down.insert(BackendKey::new("web", "a"), Health::Down);
    let new = plan(&cfg, &down, 1021).unwrap();
    let Some(Batch::Elements {
        text,
        slots,
        changes,
    }) = diff(Some(&up), &new)
    else {
        panic!("a health change must be an element batch")
    };
    // a owned a quarter of each v4 map; only those slots move (two v4 maps)
    let a_slots = up.maps["s0p0v4"]
        .iter()
        .filter(|s| s.unwrap().ip().to_string() == "10.0.1.1")
        .count();
    assert_eq!(slots, 2 * a_slots);
    assert!(!text.contains("table inet portico {"));
    assert!(!text.contains("s0p0v6"), "the v6 map did not change");
    assert!(text.contains("delete element inet portico s0p0v4 {"));
    // the same change as data: each of a's slots deleted and added again with another backend
    assert_eq!(
        changes.iter().map(|c| c.map.as_str()).collect::<Vec<_>>(),
        ["s0p0v4", "s0p1v4"]
    );
    for c in &changes {
        assert_eq!(c.delete.len(), a_slots);
        let added: Vec<u32> = c.add.iter().map(|(i, _)| *i).collect();
        assert_eq!(added, c.delete);
        for (i, to) in &c.add {
            assert_eq!(Some(*to), new.maps[&c.map][*i as usize]);
            assert_ne!(to.ip().to_string(), "10.0.1.1");
        }
    }
}

#[test]
fn panic_mode_balances_over_all_when_too_few_are_up() {
    let cfg = config(
        "  - name: web\n    vips: [10.9.0.1]\n    ports: [{port: 80}]\n    backends: [{name: a, address: 10.0.1.1}, {name: b, address: 10.0.1.2}, {name: c, address: 10.0.1.3}]\n",
    );
    let mut h = HealthView::new();
    h.insert(BackendKey::new("web", "a"), Health::Down);
    h.insert(BackendKey::new("web", "b"), Health::Down);
    // 1 of 3 up is below the default 50 %: all three keep their slots
    let rs = plan(&cfg, &h, 1021).unwrap();
    let distinct: std::collections::BTreeSet<_> = rs.maps["s0p0v4"].iter().collect();
    assert_eq!(distinct.len(), 3);
    h.insert(BackendKey::new("web", "b"), Health::Up);
    let rs = plan(&cfg, &h, 1021).unwrap();
    let distinct: std::collections::BTreeSet<_> = rs.maps["s0p0v4"].iter().collect();
    assert_eq!(distinct.len(), 2, "2 of 3 up: only those");
}

#[test]
fn consistent_hashing_moves_at_most_its_share_plus_5_percent() {
    for n in [2usize, 3, 5, 10] {
        let backends: Vec<String> = (1..=n)
            .map(|i| format!("{{name: b{i}, address: 10.0.1.{i}}}"))
            .collect();
        let yaml = |list: &[String]| {
            config(&format!(
                "  - name: web\n    vips: [10.9.0.1]\n    ports: [{{port: 80}}]\n    backends: [{}]\n",
                list.join(", ")
            ))
        };
        let before = plan(&yaml(&backends), &HealthView::new(), DEFAULT_TABLE_SIZE).unwrap();
        // removing one: 1/N of the slots move; adding one more: 1/(N+1)
        let removed = plan(
            &yaml(&backends[1..]),
            &HealthView::new(),
            DEFAULT_TABLE_SIZE,
        )
        .unwrap();
        let mut more = backends.clone();
        more.push(format!("{{name: b{}, address: 10.0.1.{}}}", n + 1, n + 1));
        let added = plan(&yaml(&more), &HealthView::new(), DEFAULT_TABLE_SIZE).unwrap();
        for (after, share) in [(&removed, 1.0 / n as f64), (&added, 1.0 / (n + 1) as f64)] {
            let moved = before.maps["s0p0v4"]
                .iter()
                .zip(&after.maps["s0p0v4"])
                .filter(|(a, b)| a != b)
                .count() as f64
                / DEFAULT_TABLE_SIZE as f64;
            assert!(
                moved <= share + 0.05,
                "n={n}: moved {moved:.3} > {share:.3} + 0.05"
            );
        }
    }
}

#[test]
fn an_empty_backend_set_leaves_an_empty_map() {
    let cfg = config(
        "  - name: web\n    vips: [fd00::1]\n    ports: [{port: 80}]\n    backends: [{address: 10.0.1.1}]\n",
    );
    let rs = plan(&cfg, &HealthView::new(), 7).unwrap();
    assert!(rs.maps["s0p0v6"].iter().all(Option::is_none));
    let Some(Batch::Replace(text)) = diff(None, &rs) else {
        panic!()
    };
    assert!(!text.contains("add element"));
    let err = plan(&cfg, &HealthView::new(), 8).unwrap_err();
    assert!(
        err.to_string().contains("use a prime kernel table size"),
        "{err}"
    );
}

#[test]
fn without_kernel_services_there_is_no_table() {
    let cfg = config(
        "  - name: web\n    vips: [10.9.0.1]\n    ports: [{port: 80}]\n    forwarding: proxy\n    backends: [{address: 10.0.1.1}]\n",
    );
    let rs = plan(&cfg, &HealthView::new(), 7).unwrap();
    assert!(rs.is_empty());
    // at start a stale table is removed; afterwards nothing is sent
    assert_eq!(
        diff(None, &rs),
        Some(Batch::Replace(
            "add table inet portico\ndelete table inet portico\n".into()
        ))
    );
    assert_eq!(diff(Some(&rs), &rs), None);
    // a kernel service leaving removes the table
    let k = plan(&config(WEB), &HealthView::new(), 7).unwrap();
    assert!(
        matches!(diff(Some(&k), &rs), Some(Batch::Replace(t)) if t.ends_with("delete table inet portico\n"))
    );
}

#[test]
fn keep_client_address_drops_only_the_snat() {
    let plain = plan(&config(WEB), &HealthView::new(), 7).unwrap();
    let kept = plan(
        &config(&WEB.replacen(
            "    ports: [{port: 80, target_port: 8080}",
            "    keep_client_address: true\n    ports: [{port: 80, target_port: 8080}",
            1,
        )),
        &HealthView::new(),
        7,
    )
    .unwrap();
    assert_eq!(plain.structure.matches("masquerade").count(), 4);
    assert_eq!(kept.structure.matches("masquerade").count(), 0);
    assert_eq!(
        plain
            .structure
            .replace("masquerade", "")
            .lines()
            .filter(|l| !l.contains("ct status dnat ct original") || l.contains("counter"))
            .count(),
        kept.structure
            .lines()
            .filter(|l| !l.contains("ct status dnat ct original") || l.contains("counter"))
            .count(),
    );
}
