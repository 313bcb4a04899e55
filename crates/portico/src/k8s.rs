//! Kubernetes subcommands: `portico controller`, `portico agent`, `portico crds`.
//!
//! The logic lives in the `ipam` crate; this file only reads flags and the environment
//! (the Deployment and DaemonSet in `deploy/` set `POD_NAME`, `POD_NAMESPACE`, `NODE_NAME`).
//!
//! Wiring in `main.rs` (`Command` variants): `Controller(k8s::ControllerArgs)`,
//! `Agent(k8s::AgentArgs)`, `Crds(k8s::CrdsArgs)`, dispatched to [`controller`], [`agent`], [`crds`].

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use ipam::intent::{LB_CLASS, Scope};
use tokio::sync::watch;

/// Flags shared by the controller and the agent: which Services portico serves.
#[derive(clap::Args, Debug, Clone)]
pub struct ScopeArgs {
    /// The `spec.loadBalancerClass` portico serves.
    #[arg(long, env = "PORTICO_LB_CLASS", default_value = LB_CLASS)]
    pub lb_class: String,
    /// Also serve LoadBalancer Services without a class (portico as the cluster's default).
    #[arg(long, env = "PORTICO_SERVE_CLASSLESS")]
    pub serve_classless: bool,
}

impl ScopeArgs {
    fn scope(&self) -> Scope {
        Scope {
            lb_class: self.lb_class.clone(),
            classless: self.serve_classless,
        }
    }
}

/// `portico controller`: the IPAM controller (one active replica through a Lease).
#[derive(clap::Args, Debug)]
pub struct ControllerArgs {
    #[command(flatten)]
    scope: ScopeArgs,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = ipam::rbac::NAMESPACE)]
    namespace: String,
    /// This replica's identity in the Lease.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Where to serve `/metrics`, `/healthz` and `/readyz` (MetalLB's controller uses 7472 too).
    #[arg(long, env = "PORTICO_METRICS_LISTEN", default_value = "0.0.0.0:7472")]
    metrics_listen: std::net::SocketAddr,
}

/// `portico agent`: one per node, announcing and balancing what the cluster says.
#[derive(clap::Args, Debug)]
pub struct AgentArgs {
    #[command(flatten)]
    scope: ScopeArgs,
    /// This node's name (downward API `spec.nodeName`).
    #[arg(long, env = "NODE_NAME")]
    node: String,
    /// The agent's namespace, where the gossip Secret lives.
    #[arg(long, env = "POD_NAMESPACE", default_value = ipam::rbac::NAMESPACE)]
    namespace: String,
    /// Name of the Secret holding the gossip key(s) (`key`, or `key-<id>` during rotation).
    #[arg(long, default_value = ipam::rbac::GOSSIP_SECRET)]
    gossip_secret: String,
    /// Gossip UDP port on every node.
    #[arg(long, default_value_t = 7946)]
    gossip_port: u16,
    /// Node-local settings in the standalone format (interfaces, admin, dns, cluster timing);
    /// services in it are ignored: they come from the cluster.
    #[arg(long, env = "PORTICO_CONFIG")]
    config: Option<PathBuf>,
    /// The node address on which to serve `/metrics`, `/healthz` and `/readyz` for kubelet's
    /// probes and Prometheus (the DaemonSet sets it from `status.hostIP`); without it they are
    /// served only by the admin server (`admin.listen`, node-local).
    #[arg(long, env = "PORTICO_METRICS_HOST")]
    metrics_host: Option<std::net::IpAddr>,
    /// The port of `--metrics-host` (7472 is the controller's, as MetalLB's).
    #[arg(long, env = "PORTICO_METRICS_PORT", default_value_t = 7473)]
    metrics_port: u16,
}

/// `portico crds`: prints the CRDs as YAML.
#[derive(clap::Args, Debug)]
pub struct CrdsArgs {}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "portico".into())
}

/// Runs the IPAM controller.
pub async fn controller(args: ControllerArgs) -> anyhow::Result<()> {
    let identity = args.identity.unwrap_or_else(hostname);
    let opts = ipam::entry::ControllerOptions {
        scope: args.scope.scope(),
        namespace: args.namespace,
        identity: identity.clone(),
    };
    let shutdown = crate::shutdown_on_signal();
    // Metrics and probes: /healthz while the process runs, /readyz once the API is reached.
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = ipam::metrics::ControllerMetrics::register(&mut registry);
    let (ready_tx, ready) = watch::channel(false);
    let listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("cannot listen on --metrics-listen {}", args.metrics_listen))?;
    let ready_now = ready.clone();
    let state = admin::AdminState {
        registry: Arc::new(registry),
        status: Arc::new(move || model::StatusReport {
            node: identity.clone(),
            ready: *ready_now.borrow(),
            ..model::StatusReport::default()
        }),
        ready,
        events: model::events::EventLog::default(),
    };
    tokio::spawn(admin::serve(listener, state, shutdown.clone()));
    ipam::entry::controller(opts, metrics, ready_tx, shutdown).await?;
    Ok(())
}

/// Runs the agent: the Kubernetes source feeding the balancer, agent, DNS and admin server.
pub async fn agent(args: AgentArgs) -> anyhow::Result<()> {
    let env = model::config::Environment {
        hostname: args.node.clone(),
        ..model::config::Environment::default()
    };
    let base = match &args.config {
        Some(path) => model::config::load(&path.to_string_lossy(), &env)?,
        None => model::config::parse("", &env).context("the built-in defaults")?,
    };
    let host_interfaces = if base.node.interfaces.is_empty() {
        host_interfaces().context("cannot read the host's interfaces (netlink RTM_GETADDR)")?
    } else {
        Vec::new()
    };
    // Bound before anything else starts, so that a wrong address fails start-up clearly.
    let probes = match args.metrics_host {
        Some(host) => {
            let addr = std::net::SocketAddr::new(host, args.metrics_port);
            Some(tokio::net::TcpListener::bind(addr).await.with_context(|| {
                format!(
                    "cannot listen on --metrics-host {host} --metrics-port {}: is it an address of this node?",
                    args.metrics_port
                )
            })?)
        }
        None => None,
    };
    let shutdown = crate::shutdown_on_signal();
    let opts = ipam::entry::AgentOptions {
        scope: args.scope.scope(),
        node: args.node,
        namespace: args.namespace,
        gossip_secret: args.gossip_secret,
        gossip_port: args.gossip_port,
        base,
        host_interfaces,
    };
    let node = opts.node.clone();
    let receivers = ipam::entry::agent_source(opts, shutdown.clone()).await?;
    // Per-address status for kubectl (`ServiceAnnouncement`) follows the agent's ownership view.
    let (own_tx, own_rx) = watch::channel(Arc::new(model::OwnershipView::new()));
    let (alive_tx, alive_rx) = watch::channel(None);
    let (bgp_tx, bgp_rx) = watch::channel(ipam::announce::BgpView::default());
    {
        let (receivers, stop) = (receivers.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) =
                ipam::entry::announcer(node, &receivers, own_rx, alive_rx, bgp_rx, stop).await
            {
                tracing::error!(
                    "ServiceAnnouncement writer stopped: {:#}",
                    anyhow::Error::from(e)
                );
            }
        });
    }
    // Kubernetes objects are validated one by one as they are read; there is no whole-file reload to reject.
    let (_reload_tx, reload_error) = watch::channel(None);
    crate::run::serve(
        receivers.desired.clone(),
        reload_error,
        own_tx,
        crate::run::Hooks {
            probes,
            alive: Some(alive_tx),
            bgp: Some(bgp_tx),
        },
        shutdown,
    )
    .await
}

/// This node's BGP sessions and route decisions as the `ServiceAnnouncement` entries show
/// them.
pub fn bgp_view(
    speaker: &bgp::Speaker,
    routes: Arc<model::bgp::RouteDecisions>,
) -> ipam::announce::BgpView {
    ipam::announce::BgpView {
        sessions: speaker
            .sessions()
            .into_iter()
            .map(|s| ipam::crd::BgpSession {
                peer: s.peer,
                address: s.address.to_string(),
                state: s.state.to_string(),
                since: s.since.and_then(ipam::crd::bgp::time),
                prefixes_sent: s.prefixes_sent as u64,
                last_error: s.last_error,
                bfd: s.bfd.map(str::to_string),
            })
            .collect(),
        routes,
    }
}

/// The host's interfaces other than loopback, with their addresses: without `--config` the
/// agent announces on the ones that carry the Node's `InternalIP`.
fn host_interfaces() -> anyhow::Result<Vec<model::Interface>> {
    let mut by_name: std::collections::BTreeMap<String, Vec<ipnet::IpNet>> = Default::default();
    for (name, ip, prefix) in sys::host_addresses()? {
        if name == "lo" {
            continue;
        }
        let net = ipnet::IpNet::new(ip, prefix)
            .with_context(|| format!("interface {name}: {ip}/{prefix}"))?;
        by_name.entry(name).or_default().push(net);
    }
    Ok(by_name
        .into_iter()
        .map(|(name, addresses)| model::Interface { name, addresses })
        .collect())
}

/// Prints the CRDs.
pub fn crds(_args: CrdsArgs) -> anyhow::Result<()> {
    print!("{}", ipam::crd::yaml());
    Ok(())
}

#[cfg(test)]
mod tests {
    use model::config::{Environment, parse};

    /// What the agent's source produces for a Service of an advertisement with
    /// `aggregationLength: 24` and a `BGPPeer` with its own `myASN`, through the binary's
    /// wiring: one route for two VIPs of one /24, and the peer's local AS on its session.
    #[test]
    fn aggregated_vips_make_one_route_and_each_peer_keeps_its_local_asn() {
        let src = "node: {name: n1, interfaces: [{name: eth0, addresses: [192.0.2.10/24]}]}\n\
                   bgp:\n  asn: 64512\n  peers:\n    - {name: a, address: 192.0.2.1, asn: 64500, local_asn: 65001}\n    - {name: b, address: 192.0.2.2, asn: 64500}\n\
                   services:\n  - name: web\n    vips: [198.51.100.7, 198.51.100.200, 2001:db8::7]\n    ports: [{port: 80}]\n    backends: [{name: a, address: 10.0.0.1}]\n    announce: bgp\n    bgp: {aggregation_length: 24}\n";
        let cfg = parse(src, &Environment::default()).unwrap();
        let peers = crate::bgp::peers_of(&cfg);
        let asns: Vec<(u32, u32)> = peers.iter().map(|p| (p.local_asn, p.remote_asn)).collect();
        assert_eq!(asns, [(65001, 64500), (64512, 64500)]);
        let d = model::bgp::decide(
            &cfg,
            &cfg.node.name,
            &model::HealthView::new(),
            &model::OwnershipView::new(),
            false,
        );
        let routes: Vec<String> = crate::bgp::routes_of(&d)
            .keys()
            .map(ToString::to_string)
            .collect();
        assert_eq!(routes, ["198.51.100.0/24", "2001:db8::7/128"]);
    }
}
