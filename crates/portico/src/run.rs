//! The spine: wires a source of desired state to the balancer, agent, DNS and admin server.
//!
//! ```text
//!  source (file | Kubernetes) ──Desired──┬──> LoadBalancer ──HealthView──┬──> Agent ──OwnershipView──┐
//!                                        ├──> Agent                      ├──> DNS <──────────────────┤
//!                                        ├──> DNS                        └──> admin /status <────────┘
//!                                        └──> admin /status
//! ```
//! Every arrow is a `tokio::sync::watch` channel of an immutable `Arc` snapshot; consumers never
//! reach back into a source. Shutdown is make-before-break: the agent hands its VIPs over
//! first, then the data path stops accepting and drains.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use admin::AdminState;
use anyhow::Context;
use model::{
    BackendStatus, BreakerState, Desired, HealthView, OwnershipView, PortStatus, ServiceStatus,
    StatusReport, VipStatus,
};
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::metrics::ConfigMetrics;
use crate::supervise::{Components as Supervised, supervise};

/// Beyond `shutdown.drain_timeout`: the balancer's own wait for cancelled connections to end.
const DRAIN_MARGIN: Duration = Duration::from_secs(6);

/// On a graceful stop, the longest wait for the BGP withdrawals to be written.
const BGP_WITHDRAW_WAIT: Duration = Duration::from_secs(5);

/// Extras of [`serve`] for the Kubernetes agent.
#[derive(Default)]
pub struct Hooks {
    /// A second listener (`--metrics-host`/`--metrics-port`) serving `/metrics`, `/healthz`
    /// and `/readyz` only.
    pub probes: Option<tokio::net::TcpListener>,
    /// Receives the names of the nodes the gossip sees up (states other than `down`, this
    /// node included), for `ServiceAnnouncement` clean-up.
    pub alive: Option<watch::Sender<ipam::announce::Alive>>,
    /// Receives this node's BGP sessions and route decisions (on change, sessions checked
    /// every second), for `ServiceAnnouncement` status.
    pub bgp: Option<watch::Sender<ipam::announce::BgpView>>,
}

/// Serves everything from `desired` until `shutdown`. Listen addresses come from the first
/// desired config; `reload_error` carries the last rejected reload for `/status`.
///
/// The caller owns the ownership channel (`own_tx`), so it can follow the agent's decisions
/// too (the Kubernetes agent writes them to `ServiceAnnouncement` status); `hooks` carries what
/// only the Kubernetes agent needs.
pub async fn serve(
    desired: watch::Receiver<Arc<Desired>>,
    reload_error: watch::Receiver<Option<String>>,
    own_tx: watch::Sender<Arc<OwnershipView>>,
    hooks: Hooks,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let Hooks {
        probes,
        alive,
        bgp: bgp_view,
    } = hooks;
    let first = desired.borrow().clone();
    let cfg = &first.config;

    // Raise the soft descriptor limit to the hard one before the balancer derives its
    // connection budget from it (docs/config.md, "Connection budget").
    match sys::limits::raise_nofile_limit() {
        Ok(n) => info!(nofile = n, "file descriptor limit"),
        Err(e) => tracing::warn!("cannot raise the file descriptor limit: {e}"),
    }
    // VIPs a crashed predecessor left on lo go now, before the agent or the BGP task puts
    // this process's own there with the same mark.
    agent::announce::clear_stale();
    let mut registry = Registry::default();
    let config_metrics = ConfigMetrics::register(&mut registry);
    // The kernel path (nftables) runs when this node can program it; otherwise every service
    // is proxied and `/status` says `kernelUnavailable`.
    let kernel = kernel::Kernel::new(&mut registry, kernel::Options::default());
    // The probe checks nftables and IPv4 forwarding (kernel::Kernel::probe).
    let kernel_path = match kernel.probe().await {
        Ok(support) => support,
        Err(e) => {
            info!(
                reason = "kernelUnavailable",
                "kernel path unavailable, services use the proxy: {e}"
            );
            model::KernelSupport::default()
        }
    };
    // One proxy worker thread per CPU unless `proxy.workers` says otherwise (read at start:
    // changing it needs a restart).
    let workers = cfg.proxy.workers.map_or_else(
        || std::thread::available_parallelism().map_or(1, usize::from),
        |n| n as usize,
    );
    let uring = cfg.proxy.io == model::ProxyIo::Uring;
    // Each worker's io_uring pool, sized from the memory the process may use (read at start).
    let uring_buffers = lb::uring::pool_buffers(workers, sys::limits::memory_limit());
    info!(
        workers,
        io = ?cfg.proxy.io,
        uring_pool_mib = (u32::from(uring_buffers) * lb::uring::BUFFER_SIZE) >> 20,
        "proxy workers"
    );
    let lb = lb::LoadBalancer::with_options(
        &mut registry,
        lb::Options {
            kernel_path,
            workers,
            uring,
            uring_buffers,
            ..lb::Options::default()
        },
    );
    let agent = agent::Agent::new(&mut registry)
        .with_binder(agent::udp_binder())
        .with_listeners(lb.closed_listeners())
        .with_own_thread(cfg.cluster.priority);
    let dns = dns::DnsServer::new(&mut registry);
    let speaker = bgp::Speaker::new(&mut registry);
    let ecmp_metrics = crate::ecmp::EcmpMetrics::register(&mut registry);
    let admin_metrics = admin::AdminMetrics::register(&mut registry);
    let observe_metrics = crate::observe::ObserveMetrics::register(&mut registry);
    let events = model::events::EventLog::new(model::events::DEFAULT_CAPACITY);

    // Bind everything up front so that a bad address fails start-up with a clear error.
    let admin_listener = tokio::net::TcpListener::bind(cfg.admin.listen)
        .await
        .with_context(|| format!("cannot listen on admin.listen {}", cfg.admin.listen))?;
    let admin_addr = admin_listener.local_addr()?;
    let gossip = if cfg.cluster.peers.is_empty() {
        None
    } else {
        let s = tokio::net::UdpSocket::bind(cfg.cluster.bind)
            .await
            .with_context(|| {
                format!(
                    "cannot bind the gossip socket cluster.bind {}",
                    cfg.cluster.bind
                )
            })?;
        Some(s)
    };
    let dns_sockets = match &cfg.dns {
        Some(d) => Some(
            dns::bind(d.listen, 2)
                .with_context(|| format!("cannot listen on dns.listen {}", d.listen))?,
        ),
        None => None,
    };

    let (health_tx, health_rx) = watch::channel(Arc::new(HealthView::new()));
    let own_rx = own_tx.subscribe();
    // BGP (crate::bgp): the agent sees no `bgp`-only service; the decision task feeds the
    // speaker and the `lo` addresses; `stopping` withdraws every route on a graceful stop.
    let (l2_tx, l2_rx) = watch::channel(crate::bgp::l2_desired(&first));
    let (peers_tx, peers_rx) = watch::channel(Arc::new(Vec::new()));
    let (routes_tx, routes_rx) = watch::channel(Arc::new(bgp::Routes::new()));
    let routes_rx_stop = routes_rx.clone();
    let (decisions_tx, decisions_rx) = watch::channel(Arc::new(model::bgp::RouteDecisions::new()));
    let (stopping_tx, stopping_rx) = watch::channel(false);
    let (first_applied_tx, first_applied) = watch::channel(false);
    let (ready_tx, ready_rx) = watch::channel(false);

    // Shutdown order: agent first (hand VIPs over), then data path, DNS and admin.
    let agent_stop = CancellationToken::new();
    let rest_stop = CancellationToken::new();
    // Cancelled by a supervisor whose component keeps failing: the process exits non-zero.
    let fatal = CancellationToken::new();
    let supervised = Supervised::new();
    let mut tasks = tokio::task::JoinSet::new();

    tasks.spawn(config_metrics.follow(
        desired.clone(),
        lb.watch_applied_generation(),
        reload_error.clone(),
        rest_stop.clone(),
    ));
    tasks.spawn(crate::bgp::follow_l2(
        desired.clone(),
        l2_tx,
        first.clone(),
        rest_stop.clone(),
    ));
    tasks.spawn(crate::bgp::decide(
        desired.clone(),
        health_rx.clone(),
        own_rx.clone(),
        stopping_rx,
        crate::bgp::Outputs {
            peers: peers_tx,
            routes: routes_tx,
            decisions: decisions_tx,
        },
        rest_stop.clone(),
    ));
    // the VIPs stay on lo while the balancer drains: connections to them end here
    let lo_stop = CancellationToken::new();
    let lo_task = tokio::spawn(crate::bgp::local_delivery(
        decisions_rx.clone(),
        own_rx.clone(),
        lo_stop.clone(),
    ));
    // the ECMP rescue copies segments of connections held elsewhere until the drain ends
    // (the speaker starts once its first tables are in place)
    let (ecmp_ready_tx, ecmp_ready) = watch::channel(false);
    let (ecmp_status_tx, ecmp_status) = watch::channel(None);
    let ecmp_task = {
        let agent = agent.clone();
        tokio::spawn(crate::ecmp::run(
            desired.clone(),
            move || agent.members(),
            ecmp_metrics,
            crate::ecmp::Outputs {
                ready: ecmp_ready_tx,
                status: ecmp_status_tx,
            },
            lo_stop.clone(),
        ))
    };
    {
        let (speaker, stop) = (speaker.clone(), rest_stop.clone());
        tasks.spawn(supervise(
            "bgp",
            supervised.clone(),
            stop.clone(),
            fatal.clone(),
            move |_| {
                let (speaker, p, r, stop, mut ready) = (
                    speaker.clone(),
                    peers_rx.clone(),
                    routes_rx.clone(),
                    stop.clone(),
                    ecmp_ready.clone(),
                );
                async move {
                    // a closed channel (the rescue task ended) does not hold the speaker
                    let _ = ready.wait_for(|r| *r).await;
                    speaker.run(p, r, stop).await.map_err(|e| e.to_string())
                }
            },
        ));
    }
    let lb_task = {
        let (lb, d, stop) = (lb.clone(), desired.clone(), rest_stop.clone());
        tokio::spawn(supervise(
            "balancer",
            supervised.clone(),
            stop.clone(),
            fatal.clone(),
            move |_| {
                let (lb, d, h, stop) = (lb.clone(), d.clone(), health_tx.clone(), stop.clone());
                async move {
                    lb.run(d, h, stop)
                        .await
                        .map_err(|e| format!("{:#}", anyhow::Error::from(e)))
                }
            },
        ))
    };
    // The kernel path follows desired state and health; on a graceful stop it removes its
    // table after the agent handed the VIPs over. Readiness waits for its first batch.
    // passive outlier state of kernel-path backends (conntrack flow outcomes), for /status
    let kernel_outliers = kernel.outliers();
    let kernel_synced = if kernel_path.available {
        kernel.synced()
    } else {
        watch::channel(true).1
    };
    let kernel_task = kernel_path.available.then(|| {
        let (k, d, h, stop) = (
            kernel,
            desired.clone(),
            health_rx.clone(),
            rest_stop.clone(),
        );
        tokio::spawn(supervise(
            "kernel",
            supervised.clone(),
            stop.clone(),
            fatal.clone(),
            move |_| {
                let (k, d, h, stop) = (k.clone(), d.clone(), h.clone(), stop.clone());
                async move {
                    k.run(d, h, stop)
                        .await
                        .map_err(|e| format!("{:#}", anyhow::Error::from(e)))
                }
            },
        ))
    });
    let agent_task = {
        let (agent, d, h, stop) = (agent.clone(), l2_rx, health_rx.clone(), agent_stop.clone());
        // the first run gets the socket bound above (so a bad cluster.bind fails start-up);
        // a restarted agent opens its own through the binder
        let mut gossip = gossip;
        tokio::spawn(supervise(
            "agent",
            supervised.clone(),
            stop.clone(),
            fatal.clone(),
            move |_| {
                let (agent, d, h, o, stop) = (
                    agent.clone(),
                    d.clone(),
                    h.clone(),
                    own_tx.clone(),
                    stop.clone(),
                );
                let socket = gossip.take();
                async move {
                    agent
                        .run(socket, d, h, o, stop)
                        .await
                        .map_err(|e| format!("{:#}", anyhow::Error::from(e)))
                }
            },
        ))
    };
    if let Some((udp, tcp)) = dns_sockets {
        let (dns, d, h, o, stop) = (
            dns.clone(),
            desired.clone(),
            health_rx.clone(),
            own_rx.clone(),
            rest_stop.clone(),
        );
        let mut sockets = Some((udp, tcp));
        tasks.spawn(supervise(
            "dns",
            supervised.clone(),
            stop.clone(),
            fatal.clone(),
            move |_| {
                let (dns, d, h, o, stop) =
                    (dns.clone(), d.clone(), h.clone(), o.clone(), stop.clone());
                let first = sockets.take();
                async move {
                    let (udp, tcp) = match first {
                        Some(s) => s,
                        None => {
                            let listen = d.borrow().config.dns.as_ref().map(|c| c.listen);
                            let listen = listen.ok_or("dns removed from the configuration")?;
                            dns::bind(listen, 2)
                                .map_err(|e| format!("cannot listen on dns.listen {listen}: {e}"))?
                        }
                    };
                    dns.run(udp, tcp, d, h, o, stop)
                        .await
                        .map_err(|e| format!("{:#}", anyhow::Error::from(e)))
                }
            },
        ));
    }
    let status = status_provider(
        desired.clone(),
        reload_error,
        health_rx,
        own_rx,
        Components {
            lb: lb.clone(),
            agent: agent.clone(),
            dns: dns.clone(),
            kernel_path,
            kernel_outliers,
            speaker: speaker.clone(),
            decisions: decisions_rx.clone(),
            ecmp: ecmp_status,
        },
        ready_rx.clone(),
    );
    tasks.spawn(crate::observe::observe(
        status.clone(),
        events.clone(),
        observe_metrics,
        rest_stop.clone(),
    ));
    let state = AdminState {
        registry: Arc::new(registry),
        status,
        ready: ready_rx,
        events,
    };
    if let Some(tx) = bgp_view {
        let (speaker, mut decisions, stop) =
            (speaker.clone(), decisions_rx.clone(), rest_stop.clone());
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                let view = crate::k8s::bgp_view(&speaker, decisions.borrow_and_update().clone());
                tx.send_if_modified(|cur| {
                    let changed = *cur != view;
                    if changed {
                        *cur = view;
                    }
                    changed
                });
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {}
                    r = decisions.changed() => if r.is_err() { return },
                }
            }
        });
    }
    if let Some(tx) = alive {
        // The agent keeps its member list behind a lock; a coarse poll is enough for clean-up.
        let (agent, stop) = (agent.clone(), rest_stop.clone());
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let members = agent.members();
                if members.is_empty() {
                    continue;
                }
                let up: std::collections::BTreeSet<String> = members
                    .into_iter()
                    .filter(|m| m.state != "down")
                    .map(|m| m.name)
                    .collect();
                tx.send_if_modified(|cur| {
                    if cur.as_deref() == Some(&up) {
                        false
                    } else {
                        *cur = Some(Arc::new(up));
                        true
                    }
                });
            }
        });
    }
    if let Some(listener) = probes {
        // The same state and limits as the admin server, with the probe routes only.
        let stop = rest_stop.clone();
        let listen = listener.local_addr()?;
        let (state, metrics) = (state.clone(), admin_metrics.clone());
        let mut first = Some(listener);
        tasks.spawn(supervise(
            "metrics",
            supervised.clone(),
            stop.clone(),
            fatal.clone(),
            move |_| {
                let (state, stop, first, metrics) =
                    (state.clone(), stop.clone(), first.take(), metrics.clone());
                async move {
                    let listener = match first {
                        Some(l) => l,
                        None => tokio::net::TcpListener::bind(listen).await.map_err(|e| {
                            format!("cannot listen on --metrics-host {listen}: {e}")
                        })?,
                    };
                    admin::serve_routes(
                        listener,
                        admin::probe_router(state),
                        admin::AdminLimits::default(),
                        metrics,
                        stop,
                    )
                    .await
                    .map_err(|e| e.to_string())
                }
            },
        ));
    }
    {
        let stop = rest_stop.clone();
        let listen = cfg.admin.listen;
        let mut first = Some(admin_listener);
        tasks.spawn(supervise(
            "admin",
            supervised.clone(),
            stop.clone(),
            fatal.clone(),
            move |_| {
                let (state, stop, first, metrics) = (
                    state.clone(),
                    stop.clone(),
                    first.take(),
                    admin_metrics.clone(),
                );
                async move {
                    let listener = match first {
                        Some(l) => l,
                        None => tokio::net::TcpListener::bind(listen)
                            .await
                            .map_err(|e| format!("cannot listen on admin.listen {listen}: {e}"))?,
                    };
                    admin::serve_with(
                        listener,
                        state,
                        admin::AdminLimits::default(),
                        metrics,
                        stop,
                    )
                    .await
                    .map_err(|e| e.to_string())
                }
            },
        ));
    }
    // Ready once the first configuration is applied (and, with the kernel path, its batch is
    // in the kernel) and while no component is down.
    {
        let (applied, healthy, synced, stop) = (
            first_applied,
            supervised.healthy(),
            kernel_synced,
            rest_stop.clone(),
        );
        tasks.spawn(readiness(applied, healthy, synced, ready_tx, stop));
    }
    info!(node = %cfg.node.name, services = cfg.services.len(), "admin listening on {admin_addr}");
    // Ready once the data path runs every service of the first generation: the balancer has
    // applied it (the generation `/status` reports, so a ready node never shows generation 0).
    {
        let (mut applied, stop) = (lb.watch_applied_generation(), rest_stop.clone());
        tasks.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                r = applied.wait_for(|g| *g > 0) => if r.is_ok() {
                    info!("first configuration applied");
                    first_applied_tx.send_replace(true);
                }
            }
        });
    }
    let failed = tokio::select! {
        () = shutdown.cancelled() => false,
        () = fatal.cancelled() => true,
    };
    if let Some(grace) = desired
        .borrow()
        .config
        .bgp
        .as_ref()
        .map(|b| b.graceful_stop_grace)
    {
        let routes = routes_rx_stop;
        crate::bgp::withdraw(&speaker, &stopping_tx, &routes, grace, BGP_WITHDRAW_WAIT).await;
    }
    info!("shutting down: handing VIPs over first");
    agent_stop.cancel();
    if tokio::time::timeout(Duration::from_secs(5), agent_task)
        .await
        .is_err()
    {
        error!("agent did not hand over within 5s; stopping anyway");
    }
    // The balancer drains (up to shutdown.drain_timeout) what this node can still serve and
    // closes connections to VIPs handed over; admin and DNS stop now, so their ports are free
    // for a restart while it drains.
    let drain = desired.borrow().config.shutdown.drain_timeout;
    info!(
        "draining connections (up to {})",
        model::duration::format(drain)
    );
    rest_stop.cancel();
    if tokio::time::timeout(drain + DRAIN_MARGIN, lb_task)
        .await
        .is_err()
    {
        error!(
            "connections still open after {}; exiting",
            model::duration::format(drain + DRAIN_MARGIN)
        );
    }
    if let Some(task) = kernel_task
        && tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .is_err()
    {
        error!("the kernel path did not remove its table within 5s");
    }
    lo_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), lo_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(11), ecmp_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    info!("stopped");
    if failed {
        let down: Vec<String> = supervised
            .down()
            .into_iter()
            .map(|(c, why)| format!("{c} {why}"))
            .collect();
        anyhow::bail!("a component kept failing: {}", down.join("; "));
    }
    Ok(())
}

/// The running components whose live state `/status` shows.
struct Components {
    lb: lb::LoadBalancer,
    agent: agent::Agent,
    dns: dns::DnsServer,
    /// Whether the kernel path runs on this node, and for IPv6.
    kernel_path: model::KernelSupport,
    /// Passive outlier state of kernel-path backends.
    kernel_outliers: watch::Receiver<Arc<kernel::driver::Outliers>>,
    speaker: bgp::Speaker,
    decisions: watch::Receiver<Arc<model::bgp::RouteDecisions>>,
    ecmp: watch::Receiver<Option<model::EcmpRescueStatus>>,
}

/// Assembles `/status` from the spine's snapshots and the components' live counters.
fn status_provider(
    desired: watch::Receiver<Arc<Desired>>,
    reload_error: watch::Receiver<Option<String>>,
    health: watch::Receiver<Arc<HealthView>>,
    ownership: watch::Receiver<Arc<OwnershipView>>,
    Components {
        lb,
        agent,
        dns,
        kernel_path,
        kernel_outliers,
        speaker,
        decisions,
        ecmp,
    }: Components,
    ready: watch::Receiver<bool>,
) -> admin::StatusProvider {
    Arc::new(move || {
        // the balancer's generation, not the published one: the rows below come from the
        // balancer, and the two differ while it applies a new generation
        let generation = lb.applied_generation();
        let d = desired.borrow().clone();
        let health = health.borrow().clone();
        let own = ownership.borrow().clone();
        let services = d
            .config
            .services
            .iter()
            .map(|s| {
                let mut st = lb.service_status(&s.name).unwrap_or_else(|| ServiceStatus {
                    name: s.name.clone(),
                    ports: s
                        .ports
                        .iter()
                        .map(|p| PortStatus {
                            name: p.name.clone(),
                            port: p.port,
                            protocol: p.protocol,
                        })
                        .collect(),
                    vips: Vec::new(),
                    backends: s
                        .backends
                        .iter()
                        .map(|b| BackendStatus {
                            name: b.name.clone(),
                            address: b.address,
                            weight: b.weight,
                            health: health
                                .get(&model::BackendKey::new(&s.name, &b.name))
                                .copied()
                                .unwrap_or_default(),
                            breaker: BreakerState::Closed,
                            ejected: false,
                            draining: false,
                            active_connections: 0,
                            total_connections: 0,
                            connect_failures: 0,
                            bytes_to_backend: 0,
                            bytes_to_client: 0,
                        })
                        .collect(),
                    panic_mode: false,
                    path: Default::default(),
                    path_reason: String::new(),
                });
                let (path, why) = s.path(kernel_path);
                st.path = path;
                st.path_reason = why.to_string();
                if path == model::Path::Kernel {
                    // the kernel path's ejections come from conntrack, not from the proxy
                    let outliers = kernel_outliers.borrow().clone();
                    for b in &mut st.backends {
                        if let Some(o) = outliers.get(&model::BackendKey::new(&s.name, &b.name)) {
                            b.ejected = o.ejected;
                            b.breaker = o.breaker;
                            b.connect_failures = o.failures;
                        }
                    }
                }
                let routes = decisions.borrow().clone();
                st.vips = s
                    .vips
                    .iter()
                    .map(|v| {
                        let o = own.get(v);
                        // a `bgp`-only VIP has no L2 owner: its row says the route decision
                        let reason = match (o, routes.get(v)) {
                            (Some(o), _) => o.reason.clone(),
                            (None, Some(r)) if !s.announce.l2() => r.reason.as_str().to_string(),
                            (None, _) => "pending".to_string(),
                        };
                        VipStatus {
                            address: *v,
                            owner: o.and_then(|o| o.owner.clone()),
                            reason,
                            conflicts: agent.conflicts(*v),
                        }
                    })
                    .collect();
                st
            })
            .collect();
        StatusReport {
            node: d.config.node.name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            generation,
            // read after the generation: the source clears the error before it publishes a
            // new generation (which the balancer applies after), so the two never disagree
            last_reload_error: reload_error.borrow().clone(),
            ready: *ready.borrow(),
            members: agent.members(),
            services,
            dns: dns.status(),
            bgp: crate::bgp::status(&d.config, &speaker, &decisions.borrow()).map(|mut b| {
                b.ecmp_rescue = ecmp.borrow().clone();
                b
            }),
        }
    })
}

/// Parses `--admin` for `portico status`: `127.0.0.1:9440`, `http://127.0.0.1:9440`, or a port.
pub fn parse_admin_url(s: &str) -> Result<SocketAddr, String> {
    let t = s.trim().trim_start_matches("http://").trim_end_matches('/');
    if let Ok(port) = t.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    t.parse().map_err(|_| {
        format!("`{s}` is not an admin address; write e.g. 127.0.0.1:9440 or http://127.0.0.1:9440")
    })
}

/// Publishes readiness: the first configuration applied, no component down, and the kernel
/// path (if any) holding what it should. A closed input keeps its last value (the
/// first-applied flag closes once set): readiness still follows the others.
async fn readiness(
    mut applied: watch::Receiver<bool>,
    mut healthy: watch::Receiver<bool>,
    mut synced: watch::Receiver<bool>,
    ready_tx: watch::Sender<bool>,
    stop: CancellationToken,
) {
    let (mut applied_open, mut healthy_open, mut synced_open) = (true, true, true);
    loop {
        let (a, h, k) = (
            *applied.borrow_and_update(),
            *healthy.borrow_and_update(),
            *synced.borrow_and_update(),
        );
        let ready = a && h && k;
        if ready_tx.send_replace(ready) != ready {
            info!(ready, "readiness changed");
        }
        tokio::select! {
            () = stop.cancelled() => return,
            r = applied.changed(), if applied_open => if r.is_err() { applied_open = false },
            r = healthy.changed(), if healthy_open => if r.is_err() { healthy_open = false },
            r = synced.changed(), if synced_open => if r.is_err() { synced_open = false },
        }
    }
}

#[cfg(test)]
mod readiness_tests {
    use super::*;

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    /// Readiness kept following the components after the first-applied flag, which closes
    /// once set, had closed: it used to stop there, so a node whose balancer then failed still
    /// said it was ready.
    #[tokio::test]
    async fn a_component_down_after_start_fails_readiness() {
        let (applied_tx, applied) = watch::channel(false);
        let (healthy_tx, healthy) = watch::channel(true);
        let (synced_tx, synced) = watch::channel(false);
        let (ready_tx, ready) = watch::channel(false);
        let stop = CancellationToken::new();
        let task = tokio::spawn(readiness(applied, healthy, synced, ready_tx, stop.clone()));
        applied_tx.send_replace(true);
        drop(applied_tx);
        settle().await;
        assert!(
            !*ready.borrow(),
            "the kernel path has not applied its batch yet"
        );
        synced_tx.send_replace(true);
        settle().await;
        assert!(*ready.borrow());
        healthy_tx.send_replace(false);
        settle().await;
        assert!(!*ready.borrow(), "a component is down");
        healthy_tx.send_replace(true);
        settle().await;
        assert!(*ready.borrow());
        stop.cancel();
        task.await.unwrap();
    }
}
