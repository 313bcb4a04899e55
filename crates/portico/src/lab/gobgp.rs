//! GoBGP as the routed lab's router (`--router gobgp`): gobgpd decides the routes, and a copy
//! of its RIB goes into the router namespace's FIB.
//!
//! gobgpd installs routes only through FRR's zebra, and the gobgpd 3.10 Debian ships cannot
//! talk to the zebra of FRR 8.4 (it panics decoding zebra's interface messages). So the lab
//! does zebra's job: `gobgp monitor global rib` prints every change of gobgpd's RIB; each one
//! triggers a dump of the IPv4 RIB (`gobgp global rib -j`), and every prefix gets a route
//! with one next hop per path gobgpd holds for it (`ip route replace … nexthop via …`,
//! `proto bgp`; the lab's paths differ only in their next hop, so they are all equal and all
//! used, as `use-multiple-paths` would choose them). A prefix with no path left loses its
//! route. GoBGP has no BFD: only the systems without BFD run against it.

use std::collections::BTreeMap;

use tokio::io::AsyncBufReadExt;

use super::bgp::{BgpSystem, NODE_ASN, ROUTER_ASN, ROUTER_IP, node_ip};
use super::*;

/// gobgpd's configuration: every node a neighbour with the system's hold time, and nothing
/// exported to them.
pub(super) fn config(nodes: usize, s: &BgpSystem) -> String {
    let mut c = format!(
        "[global.config]\n  as = {ROUTER_ASN}\n  router-id = \"{ROUTER_IP}\"\n\
         [global.use-multiple-paths.config]\n  enabled = true\n\
         [global.apply-policy.config]\n  default-export-policy = \"reject-route\"\n"
    );
    for i in 1..=nodes {
        c.push_str(&format!(
            "[[neighbors]]\n  [neighbors.config]\n    neighbor-address = \"{ip}\"\n    peer-as = {NODE_ASN}\n\
             \x20 [neighbors.timers.config]\n    connect-retry = 1\n    hold-time = {hold}\n    keepalive-interval = {ka}\n\
             \x20 [[neighbors.afi-safis]]\n    [neighbors.afi-safis.config]\n      afi-safi-name = \"ipv4-unicast\"\n",
            ip = node_ip(i),
            hold = s.hold_s,
            ka = (s.hold_s / 3).max(1),
        ));
    }
    c
}

/// Starts gobgpd in the router namespace and the task that copies its RIB into the FIB; the
/// task ends when gobgpd does (its monitor stream closes) and then removes its routes.
pub(super) async fn start(lab: &Lab, s: &BgpSystem) -> anyhow::Result<()> {
    let r = lab.ns_router();
    let path = lab.dir.join("gobgpd.toml");
    std::fs::write(&path, config(lab.nodes, s))?;
    // a killed predecessor's copies
    let _ = sh_in(&r, &["ip", "route", "flush", "proto", "bgp"]);
    lab.spawn_exe(
        &r,
        "gobgpd.log",
        "gobgpd",
        &["-t", "toml", "-f", path.to_str().unwrap_or_default()],
    )?;
    // the API answers once gobgpd is up
    let until = Instant::now() + Duration::from_secs(20);
    while gobgp(&r, &["global"]).await.is_none() {
        if Instant::now() >= until {
            bail!("gobgpd did not answer on its API within 20 s (see gobgpd.log)");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut monitor = tokio::process::Command::new("ip")
        .args([
            "netns", "exec", &r, "gobgp", "monitor", "global", "rib", "-j",
        ])
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting gobgp monitor global rib")?;
    let stdout = monitor.stdout.take().context("the monitor's output")?;
    tokio::spawn(async move {
        let _monitor = monitor;
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let mut installed: BTreeMap<String, Vec<String>> = BTreeMap::new();
        sync(&r, &mut installed).await;
        // bounded: gobgpd stops with the system, long before
        for _ in 0..10_000_000u64 {
            match lines.next_line().await {
                Ok(Some(_)) => sync(&r, &mut installed).await,
                _ => break,
            }
        }
        for prefix in installed.keys() {
            let _ = sh_in(&r, &["ip", "route", "del", prefix, "proto", "bgp"]);
        }
    });
    Ok(())
}

/// Runs the `gobgp` client in `ns`; its output, or `None` when it failed.
async fn gobgp(ns: &str, args: &[&str]) -> Option<String> {
    let o = tokio::process::Command::new("ip")
        .args(["netns", "exec", ns, "gobgp"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Every prefix of a `gobgp global rib -j` dump with the next hops of its paths (sorted).
fn next_hops(dump: &str) -> BTreeMap<String, Vec<String>> {
    let v: serde_json::Value = serde_json::from_str(dump).unwrap_or_default();
    let mut out = BTreeMap::new();
    let Some(prefixes) = v.as_object() else {
        return out;
    };
    for (prefix, paths) in prefixes {
        let mut hops: Vec<String> = paths
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p.get("withdrawal").and_then(|w| w.as_bool()) != Some(true))
            .filter_map(|p| {
                p.get("attrs")?
                    .as_array()?
                    .iter()
                    .find_map(|a| a.get("nexthop")?.as_str().map(String::from))
            })
            .collect();
        hops.sort();
        hops.dedup();
        if !hops.is_empty() {
            out.insert(prefix.clone(), hops);
        }
    }
    out
}

/// Makes the FIB match gobgpd's RIB.
async fn sync(ns: &str, installed: &mut BTreeMap<String, Vec<String>>) {
    let Some(dump) = gobgp(ns, &["global", "rib", "-a", "ipv4", "-j"]).await else {
        return;
    };
    let want = next_hops(&dump);
    for (prefix, hops) in &want {
        if installed.get(prefix) == Some(hops) {
            continue;
        }
        let mut cmd = vec!["ip", "route", "replace", prefix.as_str(), "proto", "bgp"];
        if let [one] = hops.as_slice() {
            cmd.extend(["via", one.as_str()]);
        } else {
            for h in hops {
                cmd.extend(["nexthop", "via", h.as_str()]);
            }
        }
        if sh_in(ns, &cmd).is_ok() {
            installed.insert(prefix.clone(), hops.clone());
        }
    }
    let gone: Vec<String> = installed
        .keys()
        .filter(|p| !want.contains_key(*p))
        .cloned()
        .collect();
    for prefix in gone {
        let _ = sh_in(ns, &["ip", "route", "del", &prefix, "proto", "bgp"]);
        installed.remove(&prefix);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_hops_of_a_dump_skip_withdrawals() {
        let dump = r#"{"10.77.100.1/32":[
            {"nlri":{"prefix":"10.77.100.1/32"},"best":true,"attrs":[{"type":1,"value":0},{"type":3,"nexthop":"10.77.0.12"}]},
            {"nlri":{"prefix":"10.77.100.1/32"},"best":false,"attrs":[{"type":3,"nexthop":"10.77.0.11"}]},
            {"nlri":{"prefix":"10.77.100.1/32"},"attrs":[{"type":3,"nexthop":"10.77.0.13"}],"withdrawal":true}],
            "10.9.0.0/24":[{"attrs":[{"type":1,"value":0}]}]}"#;
        let h = next_hops(dump);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["10.77.100.1/32"], ["10.77.0.11", "10.77.0.12"]);
        assert!(next_hops("not json").is_empty());
        assert!(next_hops("[]").is_empty());
    }
}
