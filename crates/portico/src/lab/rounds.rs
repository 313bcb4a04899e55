//! One round of each scenario: inject the fault, measure what the client saw, repair, check
//! the rules after the repair.

use super::*;

#[allow(clippy::too_many_arguments)]
pub(super) async fn round_once(
    lab: &Lab,
    args: &LabArgs,
    run: &mut Running,
    obs: &Arc<Mutex<Observed>>,
    sys_name: &str,
    scenario: &str,
    round: usize,
) -> anyhow::Result<Round> {
    if scenario == "conflict" {
        return conflict_round(lab, obs, sys_name, round).await;
    }
    let old = wait_stable(obs, Duration::from_millis(1500), Duration::from_secs(30)).await?;
    let i: usize = old
        .trim_start_matches("node-")
        .parse()
        .context("owner name")?;
    let old_mac = node_mac(i);
    let ns = lab.ns_node(i);
    let inflight = if scenario == "graceful" {
        Some(Inflight::open(lab).await)
    } else {
        None
    };
    let mut t0 = Instant::now();
    let mut stopped = None;
    let mut exited = None;
    match scenario {
        "hard" => {
            sh_in(&ns, &["ip", "link", "set", "eth0", "down"])?;
            // The fault is the link going down, which happens inside that command, after its
            // process start-up (a few ms, more under load) and just before it exits: time runs
            // from its exit, not from its spawn.
            let spawned = t0;
            t0 = Instant::now();
            println!(
                "  link down: `ip link set down` ran {:.1} ms; times below are from its exit",
                ms(t0 - spawned)
            );
            stopped = run.kill_node(lab, i, sys::SIGKILL);
        }
        "graceful" => {
            stopped = run.kill_node(lab, i, sys::SIGTERM);
            // watched from now, so the exit time is exact even while the round measures
            exited = stopped.map(|pid| {
                tokio::spawn(async move {
                    wait_gone(pid, Duration::from_secs(40))
                        .await
                        .then(|| t0.elapsed())
                })
            });
        }
        "partition" => {
            sh_in(&ns, &["ip", "link", "set", "eth0", "down"])?;
            t0 = Instant::now();
        }
        "backends" | "backends-tuned" => {
            if let Some(pid) = run.backend_pids.remove(&i) {
                let _ = sys::kill(pid, sys::SIGKILL);
            }
        }
        _ => bail!("unknown scenario"),
    }
    // the connection opened before the stop, used once the client has moved to the new owner
    let inflight_survived = match inflight {
        Some(Ok(c)) => {
            let until = t0 + Duration::from_secs(2);
            while Instant::now() < until {
                let moved = obs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .arp
                    .iter()
                    .any(|(t, m)| *t >= t0 && m.is_some_and(|m| m != old_mac));
                if moved {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            Some(c.use_now().await)
        }
        Some(Err(e)) => {
            println!("  in-flight check not set up: {e:#}");
            None
        }
        None => None,
    };
    // recovered: probes answered by another node for 500 ms (bounded by 15 s)
    let mut recovered_at = None;
    let until = t0 + Duration::from_secs(15);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let o = obs.lock().unwrap_or_else(|e| e.into_inner());
        let first_new = o
            .probes
            .iter()
            .filter(|p| p.start >= t0 && p.node.as_ref().is_some_and(|n| *n != old))
            .map(|p| p.start)
            .min();
        if let Some(t) = first_new
            && Instant::now().saturating_duration_since(t)
                > Duration::from_millis(500) + CONNECT_TIMEOUT * 4
        {
            recovered_at = Some(t);
            break;
        }
    }
    let settle = Instant::now();
    let (failed, failed_in_window, takeover, arp, new_owner, failed_at) = {
        let o = obs.lock().unwrap_or_else(|e| e.into_inner());
        let mut window: Vec<&Probe> = o
            .probes
            .iter()
            .filter(|p| p.start + PROBE_EVERY >= t0 && p.start <= settle - CONNECT_TIMEOUT * 4)
            .collect();
        window.sort_by_key(|p| p.start);
        let fails: Vec<Instant> = window
            .iter()
            .filter(|p| p.node.is_none())
            .map(|p| p.start)
            .collect();
        // the window ends at the first success on the new owner (or, without one, at settle)
        let end = recovered_at.unwrap_or(settle);
        let in_window = fails.iter().filter(|f| **f < end).count();
        let new_owner = window.iter().rev().find_map(|p| p.node.clone());
        let arp = o
            .arp
            .iter()
            .find(|(t, m)| *t >= t0 && m.is_some_and(|m| m != old_mac))
            .map(|(t, _)| t.saturating_duration_since(t0));
        (
            fails.len(),
            in_window,
            recovered_at.map(|t| t.saturating_duration_since(t0)),
            arp,
            new_owner,
            fails
                .iter()
                .map(|f| {
                    if *f >= t0 {
                        ms(f.saturating_duration_since(t0))
                    } else {
                        -ms(t0.saturating_duration_since(*f))
                    }
                })
                .collect::<Vec<f64>>(),
        )
    };
    // repair
    let before_repair = Instant::now();
    let (mut stop_ms, mut sysctls_after) = (None, None);
    match scenario {
        "hard" => {
            if let Some(pid) = stopped {
                wait_gone(pid, Duration::from_secs(5)).await;
            }
            // a power loss ends in a reboot: addresses a crashed keepalived left on eth0 are
            // gone (portico's agent clears stale VIPs from lo itself when it starts)
            let _ = sh_in(
                &ns,
                &["ip", "addr", "del", &format!("{VIP}/32"), "dev", "eth0"],
            );
            // …and the interface sysctls a killed agent could not put back are at their
            // boot values again
            if let Some((ignore, announce)) = run.sysctls_before.get(&i) {
                let _ = sh_in(
                    &ns,
                    &[
                        "sysctl",
                        "-qw",
                        &format!("net.ipv4.conf.eth0.arp_ignore={ignore}"),
                        &format!("net.ipv4.conf.eth0.arp_announce={announce}"),
                    ],
                );
            }
            sh_in(&ns, &["ip", "link", "set", "eth0", "up"])?;
            run.start_node(lab, i, args)?;
        }
        "graceful" => {
            if let Some(w) = exited
                && let Ok(Some(took)) = w.await
            {
                stop_ms = Some(ms(took));
                sysctls_after = iface_sysctls(lab, i);
            }
            run.start_node(lab, i, args)?;
        }
        "partition" => sh_in(&ns, &["ip", "link", "set", "eth0", "up"])?,
        "backends" | "backends-tuned" => run.start_backend(lab, i)?,
        _ => {}
    }
    // let the cluster settle (hold-down, keepalived preemption), then check the rules
    let hold = model::duration::parse(&args.hold_down).unwrap_or(Duration::from_secs(1));
    tokio::time::sleep(hold + Duration::from_secs(2)).await;
    let owner_after = wait_stable(obs, Duration::from_millis(1000), Duration::from_secs(20))
        .await
        .ok();
    let return_failed_at_ms: Vec<f64> = {
        let o = obs.lock().unwrap_or_else(|e| e.into_inner());
        o.probes
            .iter()
            .filter(|p| p.start >= before_repair && p.node.is_none())
            .map(|p| ms(p.start.saturating_duration_since(before_repair)))
            .collect()
    };
    let return_failed = return_failed_at_ms.len();
    let owners = arp_owners(lab)?;
    Ok(Round {
        system: sys_name.to_string(),
        scenario: scenario.to_string(),
        round,
        checks: run.checks().to_string(),
        old_owner: old,
        new_owner,
        failed,
        failed_in_window,
        failed_after_window: failed - failed_in_window,
        takeover_ms: takeover.map(ms),
        arp_ms: arp.map(ms),
        stop_ms,
        sysctls_restored: None,
        sysctls_after,
        arp_owners_after: owners.len(),
        owner_after,
        return_failed,
        failed_at_ms: failed_at,
        return_failed_at_ms,
        conflicts_counted: None,
        inflight_survived,
    })
}

/// A connection to the VIP's echo port (81), opened from the client before a graceful stop and
/// held by a thread in the client namespace until [`Inflight::use_now`], then kept open for
/// [`INFLIGHT_HOLD`] more, past the handover's release grace: the stopped node's exit must not
/// wait for a connection whose packets now reach the new owner.
struct Inflight {
    go: tokio::sync::oneshot::Sender<()>,
    result: tokio::sync::oneshot::Receiver<bool>,
}

/// How long the in-flight connection stays open after its last round trip.
const INFLIGHT_HOLD: Duration = Duration::from_secs(3);

impl Inflight {
    /// Connects and checks one echo round trip; returns once the connection is established.
    async fn open(lab: &Lab) -> anyhow::Result<Self> {
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<anyhow::Result<()>>();
        let (go, go_rx) = tokio::sync::oneshot::channel::<()>();
        let (result_tx, result) = tokio::sync::oneshot::channel::<bool>();
        // detached: the thread ends INFLIGHT_HOLD after the round trip (bounded)
        let _thread = in_netns(&lab.ns_client(), move || {
            Box::pin(async move {
                let setup = async {
                    let mut s = tokio::time::timeout(
                        Duration::from_secs(1),
                        tokio::net::TcpStream::connect((VIP, 81)),
                    )
                    .await
                    .context("connect to the echo port timed out")??;
                    s.write_all(b"before\n").await?;
                    let mut buf = [0u8; 7];
                    tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut buf))
                        .await
                        .context("no echo before the stop")??;
                    anyhow::ensure!(&buf == b"before\n", "wrong echo before the stop");
                    Ok(s)
                };
                let mut s = match setup.await {
                    Ok(s) => {
                        let _ = ready_tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let msg = format!("{e:#}");
                        let _ = ready_tx.send(Err(e));
                        anyhow::bail!(msg);
                    }
                };
                // bounded: the round goes on after at most a few seconds
                let _ = tokio::time::timeout(Duration::from_secs(10), go_rx).await;
                let mut buf = [0u8; 7];
                let survived = s.write_all(b"after!\n").await.is_ok()
                    && matches!(
                        tokio::time::timeout(Duration::from_secs(1), s.read_exact(&mut buf)).await,
                        Ok(Ok(_)) if &buf == b"after!\n"
                    );
                let _ = result_tx.send(survived);
                tokio::time::sleep(INFLIGHT_HOLD).await;
                drop(s);
                Ok(survived)
            })
        });
        match tokio::time::timeout(Duration::from_secs(3), ready_rx).await {
            Ok(Ok(Ok(()))) => Ok(Self { go, result }),
            Ok(Ok(Err(e))) => Err(e),
            _ => Err(anyhow::anyhow!(
                "the in-flight connection thread did not report"
            )),
        }
    }

    /// Sends one more round trip on the held connection: did it survive?
    async fn use_now(self) -> bool {
        let _ = self.go.send(());
        matches!(
            tokio::time::timeout(Duration::from_secs(5), self.result).await,
            Ok(Ok(true))
        )
    }
}

const FAKE_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0xee];

/// A forged gratuitous ARP from the bridge claims the VIP for a MAC nobody has: the owner must
/// count the conflict and announce again, and the client must end up at the owner.
async fn conflict_round(
    lab: &Lab,
    obs: &Arc<Mutex<Observed>>,
    sys_name: &str,
    round: usize,
) -> anyhow::Result<Round> {
    let old = wait_stable(obs, Duration::from_millis(1500), Duration::from_secs(30)).await?;
    let i: usize = old
        .trim_start_matches("node-")
        .parse()
        .context("owner name")?;
    let t0 = Instant::now();
    let h = in_netns(&lab.ns_br(), || {
        Box::pin(async {
            let s = sys::PacketSocket::open(sys::if_index("br0")?, sys::ETH_P_ARP, None)?;
            s.send(&agent::frames::garp(FAKE_MAC, VIP)).await?;
            Ok::<_, anyhow::Error>(())
        })
    });
    tokio::task::spawn_blocking(move || h.join())
        .await?
        .map_err(|_| anyhow::anyhow!("forging thread panicked"))???;
    // bounded wait for the client's ARP to be back at the owner (or never to have moved)
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (failed, arp_back) = {
        let o = obs.lock().unwrap_or_else(|e| e.into_inner());
        let fails: Vec<Instant> = o
            .probes
            .iter()
            .filter(|p| p.start >= t0 && p.node.is_none())
            .map(|p| p.start)
            .collect();
        let poisoned = o
            .arp
            .iter()
            .find(|(t, m)| *t >= t0 && *m == Some(FAKE_MAC))
            .map(|(t, _)| *t);
        let back = poisoned.and_then(|p| {
            o.arp
                .iter()
                .find(|(t, m)| *t > p && *m == Some(node_mac(i)))
                .map(|(t, _)| t.saturating_duration_since(t0))
        });
        (fails.len(), back)
    };
    let conflicts = status_conflicts(lab, i).await;
    let owner_after = wait_stable(obs, Duration::from_millis(500), Duration::from_secs(10))
        .await
        .ok();
    let owners = arp_owners(lab)?;
    Ok(Round {
        system: sys_name.to_string(),
        scenario: "conflict".into(),
        round,
        old_owner: old.clone(),
        new_owner: Some(old),
        failed,
        failed_in_window: failed,
        arp_ms: arp_back.map(ms),
        arp_owners_after: owners.len(),
        owner_after,
        conflicts_counted: conflicts,
        ..Round::default()
    })
}

/// Sum of the `conflicts` fields in node `i`'s /status.
async fn status_conflicts(lab: &Lab, i: usize) -> Option<u64> {
    let h = in_netns(&lab.ns_node(i), || {
        Box::pin(async {
            let mut s = tokio::net::TcpStream::connect("127.0.0.1:9440").await?;
            s.write_all(b"GET /status HTTP/1.0\r\nHost: x\r\n\r\n")
                .await?;
            let mut body = String::new();
            tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut body)).await??;
            Ok::<_, anyhow::Error>(body)
        })
    });
    let body = tokio::task::spawn_blocking(move || h.join())
        .await
        .ok()?
        .ok()?
        .ok()?
        .ok()?;
    let json: serde_json::Value = serde_json::from_str(body.split("\r\n\r\n").nth(1)?).ok()?;
    fn sum(v: &serde_json::Value) -> u64 {
        match v {
            serde_json::Value::Object(m) => m
                .iter()
                .map(|(k, v)| {
                    if k == "conflicts" {
                        v.as_u64().unwrap_or(0)
                    } else {
                        sum(v)
                    }
                })
                .sum(),
            serde_json::Value::Array(a) => a.iter().map(sum).sum(),
            _ => 0,
        }
    }
    Some(sum(&json))
}

/// Checks the IPv6 VIP: every MAC answering a neighbour solicitation from the client, and which
/// node answers TCP on it.
pub(super) async fn ipv6_round(lab: &Lab, sys_name: &str) -> anyhow::Result<Round> {
    let h = in_netns(&lab.ns_client(), || {
        Box::pin(async {
            let s = sys::PacketSocket::open(sys::if_index("eth0")?, sys::ETH_P_IPV6, None)?;
            let mut macs = BTreeSet::new();
            let mut buf = [0u8; 2048];
            for _ in 0..3 {
                s.send(&agent::frames::ns(CLIENT_MAC, CLIENT_IP6, VIP6))
                    .await?;
                let until = Instant::now() + Duration::from_millis(150);
                for _ in 0..1000 {
                    match tokio::time::timeout_at(until, s.recv(&mut buf)).await {
                        Ok(Ok(n)) => {
                            if let Ok(nd) = agent::frames::parse_nd(&buf[..n])
                                && nd.kind == 136
                                && nd.target == VIP6
                                && let Some(m) = nd.lla
                            {
                                macs.insert(m);
                            }
                        }
                        _ => break,
                    }
                }
            }
            let tcp = probe(SocketAddr::from((VIP6, 80))).await;
            Ok::<_, anyhow::Error>((macs, tcp))
        })
    });
    let (macs, tcp) = tokio::task::spawn_blocking(move || h.join())
        .await?
        .map_err(|_| anyhow::anyhow!("IPv6 check thread panicked"))???;
    Ok(Round {
        system: sys_name.to_string(),
        scenario: "ipv6".into(),
        round: 1,
        arp_owners_after: macs.len(),
        owner_after: tcp,
        ..Round::default()
    })
}
