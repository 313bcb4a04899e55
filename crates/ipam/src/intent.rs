//! What a Service asks of portico: its mode, requested addresses, pool, sharing key, families.
//!
//! Reads portico's annotations and, for migration, MetalLB's and Cilium's. When two sources
//! disagree (say `portico.dev/ips` and `metallb.io/loadBalancerIPs` name different addresses)
//! the request is invalid rather than guessed.

use std::collections::BTreeSet;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Service, ServicePort};
use kube::ResourceExt;
use model::Protocol;

use crate::allocator::{Family, MAX_ADDRESS_COUNT, PortSpec, Request, ServiceKey};
use crate::selector::Labels;

/// Requested addresses (comma-separated).
pub const IPS: &str = "portico.dev/ips";
/// Pool to allocate from.
pub const POOL: &str = "portico.dev/pool";
/// `auto` or a list of addresses: the controller writes `spec.externalIPs` of a non-LoadBalancer Service.
pub const EXTERNAL_IP: &str = "portico.dev/external-ip";
/// Services with the same key may share addresses when their ports do not clash.
pub const SHARING_KEY: &str = "portico.dev/sharing-key";
/// Addresses per family.
pub const ADDRESS_COUNT: &str = "portico.dev/address-count";
/// DNS host name of the Service (default `<name>.<namespace>`).
pub const HOSTNAME: &str = "portico.dev/hostname";
/// `"true"`: keep announcing the Service's addresses while it has no ready endpoint (by default
/// they are withdrawn, reason `noHealthyEndpoints`, as MetalLB does).
pub const ANNOUNCE_WITHOUT_ENDPOINTS: &str = "portico.dev/announce-without-endpoints";
/// `kernel`, `proxy` or `auto` (default): the data path the agents run the Service on (the
/// standalone `forwarding` setting).
pub const FORWARDING: &str = "portico.dev/forwarding";
/// The addresses the controller wrote into `spec.externalIPs` (so it can take back only its own).
pub const ALLOCATED: &str = "portico.dev/allocated";
/// MetalLB: requested addresses.
pub const METALLB_IPS: &str = "metallb.io/loadBalancerIPs";
/// MetalLB: pool.
pub const METALLB_POOL: &str = "metallb.io/address-pool";
/// MetalLB: sharing key.
pub const METALLB_SHARED: &str = "metallb.io/allow-shared-ip";
/// MetalLB's older prefix, still read by MetalLB: requested addresses.
pub const METALLB_LEGACY_IPS: &str = "metallb.universe.tf/loadBalancerIPs";
/// MetalLB's older prefix: pool.
pub const METALLB_LEGACY_POOL: &str = "metallb.universe.tf/address-pool";
/// MetalLB's older prefix: sharing key.
pub const METALLB_LEGACY_SHARED: &str = "metallb.universe.tf/allow-shared-ip";
/// MetalLB's record of the pool it allocated from (written by MetalLB, meaningless to portico).
const METALLB_RECORDS: [&str; 2] = [
    "metallb.io/ip-allocated-from-pool",
    "metallb.universe.tf/ip-allocated-from-pool",
];
/// Cilium: requested addresses.
pub const CILIUM_IPS: &str = "lbipam.cilium.io/ips";
/// Cilium: sharing key.
pub const CILIUM_SHARING_KEY: &str = "lbipam.cilium.io/sharing-key";

/// The `spec.loadBalancerClass` portico serves.
pub const LB_CLASS: &str = "portico.dev/lb";

/// How portico gives a Service its addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `type: LoadBalancer`: addresses go to `status.loadBalancer.ingress`.
    LoadBalancer,
    /// Annotated with `portico.dev/external-ip`: addresses go to `spec.externalIPs`.
    ExternalIp,
}

/// What the controller makes of a Service.
// Short-lived values moved once through a channel or a match: boxing buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Intent {
    /// Not portico's (another class, no annotation, ExternalName…).
    NotOurs,
    /// Portico's, with a well-formed request.
    Want(Mode, Request),
    /// Portico's, but the request cannot be understood; the message says why.
    Invalid(Mode, String),
}

/// Which Services the controller serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// The `spec.loadBalancerClass` served.
    pub lb_class: String,
    /// Also serve LoadBalancer Services without a class (as the default implementation).
    pub classless: bool,
}

impl Default for Scope {
    fn default() -> Self {
        Self {
            lb_class: LB_CLASS.into(),
            classless: false,
        }
    }
}

/// The Service's key.
pub fn key(svc: &Service) -> ServiceKey {
    ServiceKey::new(svc.namespace().unwrap_or_default(), svc.name_any())
}

/// Which mode a Service is in, if portico serves it.
pub fn mode(svc: &Service, scope: &Scope) -> Option<Mode> {
    let spec = svc.spec.as_ref()?;
    match spec.type_.as_deref().unwrap_or("ClusterIP") {
        "LoadBalancer" => match spec.load_balancer_class.as_deref() {
            Some(c) if c == scope.lb_class => Some(Mode::LoadBalancer),
            None if scope.classless => Some(Mode::LoadBalancer),
            _ => None,
        },
        "ExternalName" => None,
        _ => svc
            .annotations()
            .contains_key(EXTERNAL_IP)
            .then_some(Mode::ExternalIp),
    }
}

/// Reads a Service's request.
pub fn intent(svc: &Service, scope: &Scope, namespace_labels: &Labels) -> Intent {
    let Some(mode) = mode(svc, scope) else {
        return Intent::NotOurs;
    };
    match request(svc, mode, namespace_labels) {
        Ok(r) => Intent::Want(mode, r),
        Err(msg) => Intent::Invalid(mode, msg),
    }
}

fn addresses(source: &str, value: &str) -> Result<Vec<IpAddr>, String> {
    value
        .split([',', ' '])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<IpAddr>()
                .map_err(|_| format!("{source}: `{s}` is not an IP address"))
        })
        .collect()
}

/// The data path a Service asks for with [`FORWARDING`] (default `auto`); the error names the
/// annotation and the values it takes.
pub fn forwarding(svc: &Service) -> Result<model::Forwarding, String> {
    match svc.annotations().get(FORWARDING).map(|v| v.trim()) {
        None | Some("auto") => Ok(model::Forwarding::Auto),
        Some("kernel") => Ok(model::Forwarding::Kernel),
        Some("proxy") => Ok(model::Forwarding::Proxy),
        Some(v) => Err(format!(
            "{FORWARDING}: `{v}` is not a data path; expected `kernel`, `proxy` or `auto`"
        )),
    }
}

/// One value from several sources that must agree.
fn agree<T: PartialEq + std::fmt::Debug>(found: Vec<(&str, T)>) -> Result<Option<T>, String> {
    let mut it = found.into_iter();
    let Some((first_src, first)) = it.next() else {
        return Ok(None);
    };
    for (src, v) in it {
        if v != first {
            return Err(format!(
                "{first_src} ({first:?}) and {src} ({v:?}) disagree"
            ));
        }
    }
    Ok(Some(first))
}

fn request(svc: &Service, mode: Mode, namespace_labels: &Labels) -> Result<Request, String> {
    let a = svc.annotations();
    let spec = svc.spec.clone().unwrap_or_default();
    let mut requested = Vec::new();
    if let Some(v) = a.get(IPS) {
        requested.push((IPS, addresses(IPS, v)?));
    }
    if let Some(v) = spec
        .load_balancer_ip
        .as_deref()
        .filter(|v| !v.is_empty() && mode == Mode::LoadBalancer)
    {
        requested.push(("spec.loadBalancerIP", addresses("spec.loadBalancerIP", v)?));
    }
    for k in [METALLB_IPS, METALLB_LEGACY_IPS] {
        if let Some(v) = a.get(k) {
            requested.push((k, addresses(k, v)?));
        }
    }
    if let Some(v) = a.get(CILIUM_IPS) {
        requested.push((CILIUM_IPS, addresses(CILIUM_IPS, v)?));
    }
    if mode == Mode::ExternalIp {
        let v = a.get(EXTERNAL_IP).map(|s| s.trim()).unwrap_or_default();
        if v != "auto" {
            let ips = addresses(EXTERNAL_IP, v).map_err(|e| {
                format!("{e}; expected `auto` or a comma-separated list of addresses")
            })?;
            if ips.is_empty() {
                return Err(format!(
                    "{EXTERNAL_IP}: expected `auto` or a comma-separated list of addresses"
                ));
            }
            requested.push((EXTERNAL_IP, ips));
        }
    }
    let requested: Vec<(&str, BTreeSet<IpAddr>)> = requested
        .into_iter()
        .map(|(s, v)| (s, v.into_iter().collect()))
        .collect();
    let addresses: Vec<IpAddr> = agree(requested)?.unwrap_or_default().into_iter().collect();

    let nonempty = |k: &'static str| {
        a.get(k)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .map(|v| (k, v))
    };
    let pool = agree(
        [
            nonempty(POOL),
            nonempty(METALLB_POOL),
            nonempty(METALLB_LEGACY_POOL),
        ]
        .into_iter()
        .flatten()
        .collect(),
    )?;
    let sharing_key = agree(
        [
            nonempty(SHARING_KEY),
            nonempty(METALLB_SHARED),
            nonempty(METALLB_LEGACY_SHARED),
            nonempty(CILIUM_SHARING_KEY),
        ]
        .into_iter()
        .flatten()
        .collect(),
    )?;
    let count = match a.get(ADDRESS_COUNT) {
        None => 1,
        Some(v) => match v.trim().parse::<usize>() {
            Ok(n) if (1..=MAX_ADDRESS_COUNT).contains(&n) => n,
            _ => {
                return Err(format!(
                    "{ADDRESS_COUNT}: `{v}` is not a number from 1 to {MAX_ADDRESS_COUNT}"
                ));
            }
        },
    };
    forwarding(svc)?;
    if count > 1 && !addresses.is_empty() {
        return Err(format!(
            "{ADDRESS_COUNT} cannot be combined with requested addresses"
        ));
    }

    let mut families = Vec::new();
    for f in spec.ip_families.iter().flatten() {
        families.push(match f.as_str() {
            "IPv4" => Family::V4,
            "IPv6" => Family::V6,
            other => return Err(format!("spec.ipFamilies: unknown family {other}")),
        });
    }
    if families.is_empty() {
        families = vec![addresses.first().map_or(Family::V4, |ip| Family::of(*ip))];
    }
    let policy = spec.ip_family_policy.as_deref().unwrap_or("SingleStack");
    if policy == "SingleStack" {
        families.truncate(1);
    }
    let ports = ports(svc);
    Ok(Request {
        service: key(svc),
        labels: svc.labels().clone(),
        namespace_labels: namespace_labels.clone(),
        families,
        require_all_families: policy != "PreferDualStack",
        addresses,
        pool: pool.map(|p| p.to_string()),
        sharing_key: sharing_key.map(|k| k.to_string()),
        ports,
        count,
    })
}

/// The request used to restore a Service's recorded addresses after a restart: its real request
/// when it parses, else one that carries just its sharing key and ports (a Service whose
/// annotations turned invalid still keeps what it holds).
pub fn restore_request(svc: &Service, namespace_labels: &Labels) -> Request {
    let mode = mode(
        svc,
        &Scope {
            lb_class: String::new(),
            classless: true,
        },
    )
    .unwrap_or(Mode::LoadBalancer);
    request(svc, mode, namespace_labels).unwrap_or_else(|_| {
        let a = svc.annotations();
        let sharing_key = [
            SHARING_KEY,
            METALLB_SHARED,
            METALLB_LEGACY_SHARED,
            CILIUM_SHARING_KEY,
        ]
        .iter()
        .find_map(|k| {
            a.get(*k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        });
        Request {
            service: key(svc),
            labels: svc.labels().clone(),
            namespace_labels: namespace_labels.clone(),
            families: vec![Family::V4],
            require_all_families: false,
            addresses: Vec::new(),
            pool: None,
            sharing_key,
            ports: ports(svc),
            count: 1,
        }
    })
}

/// The Event reason of a MetalLB or Cilium annotation that portico does not read.
pub const ANNOTATION_IGNORED: &str = "AnnotationIgnored";

/// Every annotation portico reads for migration; any other `metallb.io/`,
/// `metallb.universe.tf/` or `lbipam.cilium.io/` annotation is reported as ignored.
const MIGRATION_READ: [&str; 8] = [
    METALLB_IPS,
    METALLB_POOL,
    METALLB_SHARED,
    METALLB_LEGACY_IPS,
    METALLB_LEGACY_POOL,
    METALLB_LEGACY_SHARED,
    CILIUM_IPS,
    CILIUM_SHARING_KEY,
];

/// The Event reason on a Service served through `spec.externalIPs`.
pub const EXTERNAL_IPS_DEPRECATED: &str = "ExternalIPsDeprecated";

/// Things worth telling the owner of a Service portico serves, as (Event reason, note), each
/// sent once per change: annotations of another implementation that portico ignores (a silent
/// migration trap otherwise), and the deprecation of `spec.externalIPs`.
pub fn notices(svc: &Service, scope: &Scope) -> Vec<(&'static str, String)> {
    let Some(mode) = mode(svc, scope) else {
        return Vec::new();
    };
    let ignored: Vec<&str> = svc
        .annotations()
        .keys()
        .map(String::as_str)
        .filter(|k| {
            ["metallb.io/", "metallb.universe.tf/", "lbipam.cilium.io/"]
                .iter()
                .any(|p| k.starts_with(p))
        })
        .filter(|k| !MIGRATION_READ.contains(k) && !METALLB_RECORDS.contains(k))
        .collect();
    let mut out = Vec::new();
    if mode == Mode::ExternalIp {
        out.push((
            EXTERNAL_IPS_DEPRECATED,
            format!(
                "spec.externalIPs is deprecated since Kubernetes 1.36 (KEP-5707); portico keeps \
                 serving it. The LoadBalancer equivalent: type: LoadBalancer, \
                 loadBalancerClass: {LB_CLASS}, and the annotation {IPS} for fixed addresses \
                 (see docs/kubernetes.md)"
            ),
        ));
    }
    if !ignored.is_empty() {
        out.push((
            ANNOTATION_IGNORED,
            format!(
                "portico does not read {}; it reads {} (see docs/kubernetes.md, Annotations)",
                ignored.join(", "),
                MIGRATION_READ.join(", ")
            ),
        ));
    }
    out
}

fn ports(svc: &Service) -> Vec<PortSpec> {
    svc.spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some(PortSpec {
                protocol: protocol(p)?,
                port: u16::try_from(p.port).ok()?,
            })
        })
        .collect()
}

/// The model protocol of a Service port: TCP (also when unset) or UDP; `None` for any other
/// (SCTP), which portico does not serve.
pub fn protocol(port: &ServicePort) -> Option<Protocol> {
    match port.protocol.as_deref().unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        _ => None,
    }
}

/// The addresses a Service records as given by portico: `status.loadBalancer.ingress` for
/// LoadBalancer Services, the [`ALLOCATED`] annotation (still in `spec.externalIPs`) otherwise.
pub fn recorded(svc: &Service, mode: Mode) -> Vec<IpAddr> {
    match mode {
        Mode::LoadBalancer => svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|i| i.ip.as_deref()?.parse().ok())
            .collect(),
        Mode::ExternalIp => {
            let in_spec: Vec<String> = svc
                .spec
                .as_ref()
                .and_then(|s| s.external_ips.clone())
                .unwrap_or_default();
            recorded_annotation(svc)
                .into_iter()
                .filter(|ip| in_spec.contains(&ip.to_string()))
                .collect()
        }
    }
}

/// The addresses in the [`ALLOCATED`] annotation.
pub fn recorded_annotation(svc: &Service) -> Vec<IpAddr> {
    svc.annotations()
        .get(ALLOCATED)
        .map(|v| addresses(ALLOCATED, v).unwrap_or_default())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::ServiceExt as _;

    fn lb() -> Service {
        crate::fixtures::service("default", "web").load_balancer(LB_CLASS)
    }

    fn want(i: Intent) -> Request {
        match i {
            Intent::Want(_, r) => r,
            other => panic!("expected a request, got {other:?}"),
        }
    }

    #[test]
    fn only_the_portico_class_is_served_unless_classless_is_on() {
        let scope = Scope::default();
        assert_eq!(mode(&lb(), &scope), Some(Mode::LoadBalancer));
        let other = crate::fixtures::service("default", "web").load_balancer("example.com/other");
        assert_eq!(mode(&other, &scope), None);
        let none = crate::fixtures::service("default", "web").load_balancer_without_class();
        assert_eq!(mode(&none, &scope), None);
        let classless = Scope {
            classless: true,
            ..Scope::default()
        };
        assert_eq!(mode(&none, &classless), Some(Mode::LoadBalancer));
        assert_eq!(mode(&other, &classless), None);
    }

    #[test]
    fn metallb_and_cilium_annotations_are_read() {
        let scope = Scope::default();
        let s = lb()
            .annotate(METALLB_IPS, "192.0.2.7")
            .annotate(METALLB_POOL, "blue")
            .annotate(METALLB_SHARED, "k");
        let r = want(intent(&s, &scope, &Labels::new()));
        assert_eq!(r.addresses, vec!["192.0.2.7".parse::<IpAddr>().unwrap()]);
        assert_eq!(r.pool.as_deref(), Some("blue"));
        assert_eq!(r.sharing_key.as_deref(), Some("k"));
        let s = lb()
            .annotate(CILIUM_IPS, "2001:db8::7")
            .annotate(CILIUM_SHARING_KEY, "c");
        let r = want(intent(&s, &scope, &Labels::new()));
        assert_eq!(r.addresses, vec!["2001:db8::7".parse::<IpAddr>().unwrap()]);
        assert_eq!(r.sharing_key.as_deref(), Some("c"));
        assert_eq!(
            r.families,
            vec![Family::V6],
            "the family follows the requested address"
        );
    }

    #[test]
    fn the_forwarding_annotation_chooses_the_data_path_and_a_bad_value_is_refused() {
        let scope = Scope::default();
        assert_eq!(forwarding(&lb()), Ok(model::Forwarding::Auto));
        for (v, f) in [
            ("kernel", model::Forwarding::Kernel),
            (" proxy ", model::Forwarding::Proxy),
            ("auto", model::Forwarding::Auto),
        ] {
            let s = lb().annotate(FORWARDING, v);
            assert_eq!(forwarding(&s), Ok(f), "{v}");
            want(intent(&s, &scope, &Labels::new()));
        }
        let s = lb().annotate(FORWARDING, "ipvs");
        match intent(&s, &scope, &Labels::new()) {
            Intent::Invalid(_, msg) => {
                assert!(msg.contains(FORWARDING), "{msg}");
                assert!(msg.contains("`ipvs`") && msg.contains("`kernel`"), "{msg}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn metallbs_older_universe_tf_annotations_are_read_too() {
        let scope = Scope::default();
        let s = lb()
            .annotate(METALLB_LEGACY_IPS, "192.0.2.8")
            .annotate(METALLB_LEGACY_POOL, "green")
            .annotate(METALLB_LEGACY_SHARED, "s");
        let r = want(intent(&s, &scope, &Labels::new()));
        assert_eq!(r.addresses, vec!["192.0.2.8".parse::<IpAddr>().unwrap()]);
        assert_eq!(r.pool.as_deref(), Some("green"));
        assert_eq!(r.sharing_key.as_deref(), Some("s"));
        assert!(notices(&s, &scope).is_empty(), "all three are read");
        // Old and new prefix must agree, as any two sources.
        let s = lb()
            .annotate(METALLB_LEGACY_IPS, "192.0.2.8")
            .annotate(METALLB_IPS, "192.0.2.9");
        assert!(matches!(
            intent(&s, &scope, &Labels::new()),
            Intent::Invalid(..)
        ));
    }

    #[test]
    fn annotations_of_other_implementations_that_portico_ignores_are_reported() {
        let scope = Scope::default();
        let s = lb()
            .annotate("metallb.universe.tf/loadBalancerIPs", "192.0.2.8")
            .annotate("metallb.universe.tf/ip-allocated-from-pool", "old")
            .annotate("metallb.io/some-future-knob", "x")
            .annotate("lbipam.cilium.io/sharing-cross-namespace", "*");
        let n = notices(&s, &scope);
        assert_eq!(n.len(), 1, "{n:?}");
        assert_eq!(n[0].0, ANNOTATION_IGNORED);
        assert!(n[0].1.contains("metallb.io/some-future-knob"), "{}", n[0].1);
        assert!(n[0].1.contains("lbipam.cilium.io/sharing-cross-namespace"));
        assert!(
            !n[0]
                .1
                .starts_with("portico does not read metallb.universe.tf/loadBalancerIPs")
        );
        assert!(
            !n[0].1.contains("ip-allocated-from-pool"),
            "MetalLB's own record"
        );
        // Not portico's Service: nothing to say.
        let other = crate::fixtures::service("default", "web")
            .load_balancer("example.com/other")
            .annotate("metallb.io/some-future-knob", "x");
        assert!(notices(&other, &scope).is_empty());
    }

    #[test]
    fn a_service_served_through_external_ips_is_told_of_the_deprecation() {
        let s = crate::fixtures::service("default", "web").annotate(EXTERNAL_IP, "auto");
        let n = notices(&s, &Scope::default());
        assert_eq!(n.len(), 1, "{n:?}");
        assert_eq!(n[0].0, EXTERNAL_IPS_DEPRECATED);
        assert!(
            n[0].1.contains("KEP-5707") && n[0].1.contains("type: LoadBalancer"),
            "{}",
            n[0].1
        );
        assert!(notices(&lb(), &Scope::default()).is_empty());
    }

    #[test]
    fn disagreeing_sources_and_unknown_values_are_invalid() {
        let scope = Scope::default();
        for s in [
            lb().annotate(IPS, "192.0.2.1")
                .annotate(METALLB_IPS, "192.0.2.2"),
            lb().annotate(IPS, "banana"),
            lb().annotate(ADDRESS_COUNT, "0"),
            lb().annotate(ADDRESS_COUNT, "many"),
            lb().annotate(SHARING_KEY, "a")
                .annotate(CILIUM_SHARING_KEY, "b"),
            crate::fixtures::service("default", "web").annotate(EXTERNAL_IP, "sometimes"),
        ] {
            assert!(
                matches!(intent(&s, &scope, &Labels::new()), Intent::Invalid(..)),
                "{s:?}"
            );
        }
    }

    #[test]
    fn a_cluster_ip_service_with_external_ip_auto_is_served() {
        let s = crate::fixtures::service("default", "web").annotate(EXTERNAL_IP, "auto");
        assert!(matches!(
            intent(&s, &Scope::default(), &Labels::new()),
            Intent::Want(Mode::ExternalIp, _)
        ));
        let s = crate::fixtures::service("default", "web").annotate(EXTERNAL_IP, "192.0.2.9");
        let r = want(intent(&s, &Scope::default(), &Labels::new()));
        assert_eq!(r.addresses, vec!["192.0.2.9".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn families_follow_ip_families_and_the_policy() {
        let s = lb().dual_stack("PreferDualStack");
        let r = want(intent(&s, &Scope::default(), &Labels::new()));
        assert_eq!(r.families, vec![Family::V4, Family::V6]);
        assert!(!r.require_all_families);
        let s = lb().dual_stack("SingleStack");
        assert_eq!(
            want(intent(&s, &Scope::default(), &Labels::new())).families,
            vec![Family::V4]
        );
        let s = lb().dual_stack("RequireDualStack");
        assert!(want(intent(&s, &Scope::default(), &Labels::new())).require_all_families);
    }
}
