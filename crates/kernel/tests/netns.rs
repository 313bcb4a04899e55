//! The kernel path for real, in network namespaces this test creates (root, `nft`,
//! `conntrack`): a client namespace, a node namespace running the driver, backend namespaces
//! with a small TCP/UDP server that answers its name. Read back over nft (`nft -j`).

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use kernel::nft;
use kernel::{Kernel, Options};
use model::config::{Environment, parse};
use model::{BackendKey, Config, Health, HealthView};
use prometheus_client::registry::Registry;

const VIP4: &str = "10.77.100.1";
const VIP6: &str = "fd77:100::1";

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The namespaces of one test; deleted on drop, also when the test fails.
struct Lab {
    client: String,
    node: String,
    backends: Vec<String>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in [&self.client, &self.node].into_iter().chain(&self.backends) {
            let _ = Command::new("ip").args(["netns", "delete", ns]).status();
        }
    }
}

fn usable() -> bool {
    if !sys::is_root() {
        sys::skip_test("needs root (network namespaces, nftables)");
        return false;
    }
    for tool in ["nft", "conntrack", "ip"] {
        if Command::new(tool).arg("--version").output().is_err() {
            sys::skip_test(&format!("needs `{tool}`"));
            return false;
        }
    }
    true
}

impl Lab {
    /// Client `10.77.0.2`/`fd77::2` → node (forwarding) → backends `10.77.K.2`/`fd77:K::2`.
    fn new(tag: &str, backends: usize) -> Lab {
        let pid = std::process::id();
        let lab = Lab {
            client: format!("pk-{pid}-{tag}-c"),
            node: format!("pk-{pid}-{tag}-n"),
            backends: (1..=backends)
                .map(|k| format!("pk-{pid}-{tag}-b{k}"))
                .collect(),
        };
        for ns in [&lab.client, &lab.node].into_iter().chain(&lab.backends) {
            sh(&["ip", "netns", "add", ns]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        let n = lab.node.as_str();
        for (k, peer, gw4, gw6, me4, me6) in std::iter::once((
            0usize,
            lab.client.as_str(),
            "10.77.0.1".to_string(),
            "fd77::1".to_string(),
            "10.77.0.2".to_string(),
            "fd77::2".to_string(),
        ))
        .chain(lab.backends.iter().enumerate().map(|(i, b)| {
            let k = i + 1;
            (
                k,
                b.as_str(),
                format!("10.77.{k}.1"),
                format!("fd77:{k}::1"),
                format!("10.77.{k}.2"),
                format!("fd77:{k}::2"),
            )
        })) {
            let dev = format!("v{k}");
            sh(&[
                "ip", "-n", n, "link", "add", &dev, "type", "veth", "peer", "name", "eth0",
                "netns", peer,
            ]);
            sh(&[
                "ip",
                "-n",
                n,
                "addr",
                "add",
                &format!("{gw4}/24"),
                "dev",
                &dev,
            ]);
            sh(&[
                "ip",
                "-n",
                n,
                "addr",
                "add",
                &format!("{gw6}/64"),
                "dev",
                &dev,
                "nodad",
            ]);
            sh(&["ip", "-n", n, "link", "set", &dev, "up"]);
            sh(&[
                "ip",
                "-n",
                peer,
                "addr",
                "add",
                &format!("{me4}/24"),
                "dev",
                "eth0",
            ]);
            sh(&[
                "ip",
                "-n",
                peer,
                "addr",
                "add",
                &format!("{me6}/64"),
                "dev",
                "eth0",
                "nodad",
            ]);
            sh(&["ip", "-n", peer, "link", "set", "eth0", "up"]);
            sh(&["ip", "-n", peer, "route", "add", "default", "via", &gw4]);
            sh(&[
                "ip", "-n", peer, "-6", "route", "add", "default", "via", &gw6,
            ]);
        }
        sh(&[
            "ip",
            "netns",
            "exec",
            n,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
        sh(&[
            "ip",
            "netns",
            "exec",
            n,
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.forwarding=1",
        ]);
        // the VIPs are local addresses of the node, as the agent makes them on the owner (a
        // client on the node needs the route before the output hook DNATs)
        sh(&[
            "ip",
            "-n",
            n,
            "addr",
            "add",
            &format!("{VIP4}/32"),
            "dev",
            "lo",
        ]);
        sh(&[
            "ip",
            "-n",
            n,
            "addr",
            "add",
            &format!("{VIP6}/128"),
            "dev",
            "lo",
            "nodad",
        ]);
        for (i, b) in lab.backends.iter().enumerate() {
            serve(b, format!("b{}", i + 1));
        }
        lab
    }

    fn nft(&self, script: &str) -> String {
        sh(&["ip", "netns", "exec", &self.node, "nft", script])
    }
}

/// Runs `f` on a thread inside namespace `ns` (sockets it makes stay there).
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        sys::setns_net(&path).expect("setns");
        f()
    })
    .join()
    .expect("thread in namespace")
}

/// A backend: TCP `:8080` says its name then echoes lines; UDP `:8080` answers its name.
fn serve(ns: &str, name: String) {
    let path = format!("/run/netns/{ns}");
    let (tcp, udp) = in_ns(ns, || {
        (
            TcpListener::bind("[::]:8080").expect("bind tcp"),
            UdpSocket::bind("[::]:8080").expect("bind udp"),
        )
    });
    let _ = path;
    let n = name.clone();
    std::thread::spawn(move || {
        for s in tcp.incoming().flatten() {
            let n = n.clone();
            std::thread::spawn(move || {
                let mut w = s.try_clone().expect("clone");
                let _ = w.write_all(format!("{n}\n").as_bytes());
                let peer = s.peer_addr().map(|a| match a.ip() {
                    IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
                    v4 => v4,
                });
                for line in BufReader::new(s).lines() {
                    let Ok(mut line) = line else { break };
                    if line == "peer" {
                        line = peer
                            .as_ref()
                            .map_or_else(|e| e.to_string(), ToString::to_string);
                    }
                    if w.write_all(format!("{line}\n").as_bytes()).is_err() {
                        break;
                    }
                }
            });
        }
    });
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((_, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(name.as_bytes(), from);
        }
    });
}

/// A TCP connection from the client namespace; returns it and the backend's name.
fn connect(lab: &Lab, vip: IpAddr) -> (BufReader<TcpStream>, String) {
    let s = in_ns(&lab.client, move || {
        TcpStream::connect_timeout(&SocketAddr::new(vip, 80), Duration::from_secs(3))
    })
    .unwrap_or_else(|e| panic!("connect {vip}:80: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut r = BufReader::new(s);
    let mut name = String::new();
    r.read_line(&mut name).expect("backend name");
    (r, name.trim().to_string())
}

/// Whether an established connection still echoes.
fn echoes(c: &mut BufReader<TcpStream>) -> bool {
    if c.get_mut().write_all(b"ping\n").is_err() {
        return false;
    }
    let mut line = String::new();
    matches!(c.read_line(&mut line), Ok(n) if n > 0 && line == "ping\n")
}

/// The client address the backend sees on this connection.
fn peer(c: &mut BufReader<TcpStream>) -> String {
    c.get_mut().write_all(b"peer\n").expect("write");
    let mut line = String::new();
    c.read_line(&mut line).expect("peer");
    line.trim().to_string()
}

/// One UDP datagram from client port `sport` to the VIP; the answering backend.
fn udp_from(lab: &Lab, vip: IpAddr, sport: u16) -> Option<String> {
    in_ns(&lab.client, move || {
        let any: IpAddr = if vip.is_ipv4() {
            "0.0.0.0".parse().unwrap()
        } else {
            "::".parse().unwrap()
        };
        let s = UdpSocket::bind(SocketAddr::new(any, sport)).ok()?;
        s.set_read_timeout(Some(Duration::from_millis(1500))).ok()?;
        s.send_to(b"who", SocketAddr::new(vip, 53)).ok()?;
        let mut buf = [0u8; 64];
        let n = s.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
}

fn config(backends: &[usize], drain: &str) -> Arc<Config> {
    config_with(backends, drain, "")
}

fn config_with(backends: &[usize], drain: &str, extra: &str) -> Arc<Config> {
    let list: Vec<String> = backends
        .iter()
        .flat_map(|k| {
            [
                format!("{{name: b{k}, address: 10.77.{k}.2}}"),
                format!("{{name: b{k}-6, address: 'fd77:{k}::2'}}"),
            ]
        })
        .collect();
    let src = format!(
        "services:\n  - name: web\n    vips: [{VIP4}, '{VIP6}']\n    forwarding: kernel\n    ports: [{{port: 80, target_port: 8080}}, {{port: 53, protocol: udp, target_port: 8080}}]\n    health_check: {{type: none}}\n    connection: {{drain_timeout: {drain}}}\n    backends: [{}]\n{extra}",
        list.join(", ")
    );
    Arc::new(parse(&src, &Environment::default()).unwrap_or_else(|e| panic!("{e}")))
}

/// Runs `body` on a current-thread runtime inside the node namespace (nft runs there).
fn on_node<F: std::future::Future<Output = ()>>(
    lab: &Lab,
    body: impl FnOnce() -> F + Send + 'static,
) {
    let path = format!("/run/netns/{}", lab.node);
    std::thread::spawn(move || {
        sys::setns_net(&path).expect("setns node");
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(body());
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e));
}

/// Every slot of every map read back equals the plan for `cfg` under `h` (the element batches
/// go to the kernel as raw netlink: this reads back what nft sees).
fn assert_maps_as_planned(t: &nft::Table, cfg: &Config, h: &HealthView) {
    let rs = kernel::plan(cfg, h, kernel::plan::DEFAULT_TABLE_SIZE).unwrap();
    assert_eq!(
        t.maps.keys().collect::<Vec<_>>(),
        rs.maps.keys().collect::<Vec<_>>()
    );
    for (name, slots) in &rs.maps {
        let want: std::collections::BTreeMap<u32, SocketAddr> = slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.map(|s| (i as u32, s)))
            .collect();
        assert_eq!(t.maps[name], want, "map {name}");
    }
}

fn backends_in(t: &nft::Table, map: &str) -> std::collections::BTreeSet<IpAddr> {
    t.maps[map].values().map(SocketAddr::ip).collect()
}

#[test]
fn start_reload_health_drain_stop_over_real_traffic() {
    if !usable() {
        return;
    }
    let lab = Arc::new(Lab::new("k1", 3));
    // a foreign table, a second portico-like name, and stale state of a "crashed" run
    lab.nft("add table inet other; add chain inet other c { type filter hook input priority 0; }; add rule inet other c counter");
    lab.nft("add table inet portico2; add chain inet portico2 c; add rule inet portico2 c counter");
    lab.nft(
        "add table inet portico; add chain inet portico stale; add rule inet portico stale counter",
    );
    let foreign = || {
        (
            sh(&[
                "ip", "netns", "exec", &lab.node, "nft", "-s", "list", "table", "inet", "other",
            ]),
            sh(&[
                "ip", "netns", "exec", &lab.node, "nft", "-s", "list", "table", "inet", "portico2",
            ]),
        )
    };
    let before = foreign();
    let lab2 = lab.clone();
    on_node(&lab, move || async move {
        let lab = lab2;
        let k = Kernel::new(&mut Registry::default(), Options::default());
        k.start().await.expect("start");
        let t = nft::read().await.unwrap().expect("table after start");
        assert!(
            !t.chains.contains(&"stale".to_string()),
            "crash state repaired: {t:?}"
        );

        // start: two backends of each family
        let cfg = config(&[1, 2], "2s");
        let a = k
            .apply(cfg.clone(), Arc::new(HealthView::new()))
            .await
            .unwrap();
        assert_eq!(a.kind, "replace");
        let t = nft::read().await.unwrap().unwrap();
        assert_eq!(t.maps["s0p0v4"].len(), 1021);
        assert_eq!(backends_in(&t, "s0p0v4").len(), 2);
        assert_eq!(backends_in(&t, "s0p0v6").len(), 2);
        for chain in [
            "services",
            "prerouting",
            "output",
            "postrouting",
            "counters",
        ] {
            assert!(t.chains.contains(&chain.to_string()), "{chain}: {t:?}");
        }
        assert_eq!(t.counters.len(), 4);

        // TCP v4 and v6, UDP v4 and v6, through the kernel path; both backends get flows
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..16 {
            seen.insert(connect(&lab, VIP4.parse().unwrap()).1);
        }
        assert_eq!(seen.len(), 2, "{seen:?}");
        let (_c6, name6) = connect(&lab, VIP6.parse().unwrap());
        assert!(name6 == "b1" || name6 == "b2", "{name6}");
        assert!(
            udp_from(&lab, VIP4.parse().unwrap(), 31000).is_some(),
            "UDP v4"
        );
        assert!(
            udp_from(&lab, VIP6.parse().unwrap(), 31001).is_some(),
            "UDP v6"
        );

        // return path: SNAT to the node by default; keep_client_address keeps the client's
        let (mut c, on) = connect(&lab, VIP4.parse().unwrap());
        assert_eq!(
            peer(&mut c),
            format!("10.77.{}.1", &on[1..]),
            "masqueraded to the node"
        );
        let keep = config_with(&[1, 2], "2s", "    keep_client_address: true\n");
        k.apply(keep, Arc::new(HealthView::new())).await.unwrap();
        let (mut c, _) = connect(&lab, VIP4.parse().unwrap());
        assert_eq!(peer(&mut c), "10.77.0.2", "keep_client_address: no SNAT");
        k.apply(cfg.clone(), Arc::new(HealthView::new()))
            .await
            .unwrap();
        // a client on the node itself (output hook)
        let mut local = BufReader::new(
            TcpStream::connect_timeout(
                &SocketAddr::new(VIP4.parse().unwrap(), 80),
                Duration::from_secs(3),
            )
            .expect("local client through the output hook"),
        );
        local
            .get_mut()
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let mut name = String::new();
        local.read_line(&mut name).unwrap();
        assert!(name.starts_with('b'), "{name}");

        // the counters count those flows
        k.read_counters().await.unwrap();
        let c = nft::counters().await.unwrap();
        assert!(c.values().map(|v| v.0).sum::<u64>() > 0, "{c:?}");
        // each backend counts its own flows (b1 is c0b0, b2 c0b2), and only those
        let before = nft::counters().await.unwrap();
        let mut flows = std::collections::BTreeMap::<String, u64>::new();
        for _ in 0..16 {
            *flows
                .entry(connect(&lab, VIP4.parse().unwrap()).1)
                .or_default() += 1;
        }
        let after = nft::counters().await.unwrap();
        for (b, name) in [("b1", "c0b0"), ("b2", "c0b2")] {
            let counted = after[name].0 - before[name].0;
            assert_eq!(
                counted > 0,
                flows.contains_key(b),
                "{b}: {flows:?} {before:?} {after:?}"
            );
        }

        // an established connection, kept through the changes below
        let (mut kept, on) = connect(&lab, VIP4.parse().unwrap());
        let other = if on == "b1" { 2 } else { 1 };
        let mine: usize = on[1..].parse().unwrap();

        // health: the other backend down → only elements change, measured
        let mut took = Vec::new();
        for round in 0..10 {
            let mut h = HealthView::new();
            h.insert(BackendKey::new("web", format!("b{other}")), Health::Down);
            let t0 = tokio::time::Instant::now();
            let a = k.apply(cfg.clone(), Arc::new(h.clone())).await.unwrap();
            took.push(t0.elapsed());
            assert_eq!(a.kind, "elements", "round {round}");
            assert_eq!(
                a.engine,
                if nft::elements_by_netlink() {
                    "netlink"
                } else {
                    nft::engine().0.as_str()
                }
            );
            let t = nft::read().await.unwrap().unwrap();
            assert_maps_as_planned(&t, &cfg, &h);
            assert_eq!(
                backends_in(&t, "s0p0v4"),
                [format!("10.77.{mine}.2").parse().unwrap()].into()
            );
            assert_eq!(t.maps["s0p0v4"].len(), 1021);
            let t0 = tokio::time::Instant::now();
            k.apply(cfg.clone(), Arc::new(HealthView::new()))
                .await
                .unwrap();
            took.push(t0.elapsed());
            let t = nft::read().await.unwrap().unwrap();
            assert_eq!(backends_in(&t, "s0p0v4").len(), 2);
            assert_maps_as_planned(&t, &cfg, &HealthView::new());
        }
        took.sort();
        println!(
            "health change → map applied (plan + diff + nft batch), {} changes: min {:?} median {:?} max {:?}",
            took.len(),
            took[0],
            took[took.len() / 2],
            took[took.len() - 1]
        );
        // The 50 ms requirement is asserted end to end (check result → batch applied) in
        // crates/portico/tests/kernel_path.rs; here two ports' maps change per batch, so this
        // only guards against a regression to whole-table batches or worse.
        assert!(
            took[took.len() / 2] < Duration::from_millis(100),
            "{took:?}"
        );
        assert!(
            echoes(&mut kept),
            "established flow survives health changes"
        );

        // reload: a third backend added; the established flow stays
        let a = k
            .apply(config(&[1, 2, 3], "2s"), Arc::new(HealthView::new()))
            .await
            .unwrap();
        assert_eq!(a.kind, "replace");
        assert_eq!(
            backends_in(&nft::read().await.unwrap().unwrap(), "s0p0v4").len(),
            3
        );
        assert!(
            echoes(&mut kept),
            "established flow survives a backend added"
        );
        // the other backend removed: still
        let keep: Vec<usize> = [1, 2, 3].into_iter().filter(|b| *b != other).collect();
        k.apply(config(&keep, "2s"), Arc::new(HealthView::new()))
            .await
            .unwrap();
        assert!(
            echoes(&mut kept),
            "established flow survives another backend removed"
        );
        // its own backend removed: it drains, keeps working, and is cut after drain_timeout
        let rest: Vec<usize> = keep.iter().copied().filter(|b| *b != mine).collect();
        k.apply(config(&rest, "2s"), Arc::new(HealthView::new()))
            .await
            .unwrap();
        assert!(
            !backends_in(&nft::read().await.unwrap().unwrap(), "s0p0v4")
                .contains(&format!("10.77.{mine}.2").parse::<IpAddr>().unwrap())
        );
        assert!(
            k.draining()
                .await
                .contains(&BackendKey::new("web", format!("b{mine}")))
        );
        assert!(
            echoes(&mut kept),
            "a draining backend keeps its established flows"
        );
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert_eq!(k.expire_drains().await, None);
        assert!(k.draining().await.is_empty());
        assert!(!echoes(&mut kept), "after drain_timeout the flow is cut");

        // stop: the table is gone
        k.stop().await.unwrap();
        assert!(nft::read().await.unwrap().is_none());
    });
    assert_eq!(foreign(), before, "other tables untouched");
}

#[test]
fn a_backend_change_moves_at_most_its_share_of_udp_flows() {
    if !usable() {
        return;
    }
    let lab = Arc::new(Lab::new("k2", 3));
    let lab2 = lab.clone();
    on_node(&lab, move || async move {
        let lab = lab2;
        let k = Kernel::new(&mut Registry::default(), Options::default());
        k.start().await.expect("start");
        k.apply(config(&[1, 2, 3], "1s"), Arc::new(HealthView::new()))
            .await
            .unwrap();
        let flows: Vec<u16> = (32000..32150).collect();
        let before: Vec<Option<String>> = flows
            .iter()
            .map(|p| udp_from(&lab, VIP4.parse().unwrap(), *p))
            .collect();
        assert!(before.iter().all(Option::is_some), "{before:?}");
        // b3 removed; forget the flows so that every one is balanced anew
        k.apply(config(&[1, 2], "1s"), Arc::new(HealthView::new()))
            .await
            .unwrap();
        sh(&["ip", "netns", "exec", &lab.node, "conntrack", "-F"]);
        let after: Vec<Option<String>> = flows
            .iter()
            .map(|p| udp_from(&lab, VIP4.parse().unwrap(), *p))
            .collect();
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        let on_b3 = before.iter().filter(|b| b.as_deref() == Some("b3")).count();
        let share = moved as f64 / flows.len() as f64;
        println!(
            "backend 3 of 3 removed: {moved} of {} UDP flows moved ({share:.3}; bound 1/3 + 0.05); {on_b3} were on b3, {} moved between the others",
            flows.len(),
            moved.saturating_sub(on_b3)
        );
        assert!(share <= 1.0 / 3.0 + 0.05, "{share}");
        assert!(
            after.iter().all(|b| b.as_deref() != Some("b3")),
            "b3 gets no flow"
        );
        k.stop().await.unwrap();
    });
}

/// The probe refuses the kernel path while IPv4 forwarding is off in the node's namespace (a
/// new namespace starts with it off) and accepts it once on; it changes no table either way.
#[test]
fn the_probe_needs_ipv4_forwarding() {
    if !usable() {
        return;
    }
    let lab = Lab::new("pr", 0);
    sh(&[
        "ip",
        "netns",
        "exec",
        &lab.node,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=0",
    ]);
    on_node(&lab, || async {
        let k = Kernel::new(&mut Registry::default(), Options::default());
        let e = k.probe().await.expect_err("forwarding is off");
        assert!(matches!(e, kernel::driver::Error::Forwarding(_)), "{e}");
        assert!(e.to_string().contains("net.ipv4.ip_forward=1"), "{e}");
        assert!(
            nft::read().await.unwrap().is_none(),
            "a probe creates no table"
        );
    });
    sh(&[
        "ip",
        "netns",
        "exec",
        &lab.node,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
    ]);
    on_node(&lab, || async {
        let k = Kernel::new(&mut Registry::default(), Options::default());
        k.probe().await.expect("forwarding on");
        assert!(
            nft::read().await.unwrap().is_none(),
            "a probe creates no table"
        );
    });
}
