//! The one list of API verbs and resources the code uses, from which `deploy/rbac.yaml` is generated.
//!
//! Change a call in [`crate::controller`], [`crate::lease`] or [`crate::source`], change the list
//! here, and run `PORTICO_BLESS=1 cargo test -p ipam` to regenerate the manifest. The fake-API
//! tests check every request they see against these lists ([`allows`]), so a call the list
//! lacks fails a test; the manifest test fails when `deploy/rbac.yaml` is stale.

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// The namespace portico is installed in.
pub const NAMESPACE: &str = "portico-system";
/// The controller's ServiceAccount (and role names).
pub const CONTROLLER_ACCOUNT: &str = "portico-controller";
/// The agent's ServiceAccount (and role names).
pub const AGENT_ACCOUNT: &str = "portico-agent";
/// The controller's Lease.
pub const LEASE_NAME: &str = "portico-controller";
/// The gossip key Secret.
pub const GOSSIP_SECRET: &str = "portico-gossip";

/// Permission on one resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// API group (`""` for core).
    pub group: &'static str,
    /// Resource, with `/status` for the status subresource.
    pub resource: &'static str,
    /// Verbs.
    pub verbs: &'static [&'static str],
    /// Cluster-wide (`ClusterRole`) or only in [`NAMESPACE`] (`Role`).
    pub cluster_wide: bool,
}

const fn rule(
    group: &'static str,
    resource: &'static str,
    verbs: &'static [&'static str],
    cluster_wide: bool,
) -> Rule {
    Rule {
        group,
        resource,
        verbs,
        cluster_wide,
    }
}

/// What the controller does: watch Services, IPPools and Namespaces; write Service status,
/// `spec.externalIPs`, Events and pool status; hold its Lease.
pub const CONTROLLER: &[Rule] = &[
    // get: re-read after a 409; patch: spec.externalIPs and the allocated annotation.
    rule("", "services", &["get", "list", "watch", "patch"], true),
    rule("", "services/status", &["patch"], true),
    rule("", "namespaces", &["list", "watch"], true),
    rule("portico.dev", "ippools", &["list", "watch"], true),
    rule("portico.dev", "ippools/status", &["patch"], true),
    rule("events.k8s.io", "events", &["create", "patch"], true),
    rule(
        "coordination.k8s.io",
        "leases",
        &["get", "create", "update"],
        false,
    ),
];

/// What the agent does: reads, and applies its view of who announces what into
/// `ServiceAnnouncement`s. It cannot write Services.
pub const AGENT: &[Rule] = &[
    rule("", "services", &["list", "watch"], true),
    // Server-side apply is a PATCH; the API server also checks `create` when it creates the object.
    rule(
        "portico.dev",
        "serviceannouncements",
        // list: once at start, to update or remove entries left by an earlier run.
        &["list", "create", "patch"],
        true,
    ),
    rule(
        "portico.dev",
        "serviceannouncements/status",
        &["patch"],
        true,
    ),
    rule(
        "discovery.k8s.io",
        "endpointslices",
        &["list", "watch"],
        true,
    ),
    rule("", "nodes", &["list", "watch"], true),
    rule("portico.dev", "ippools", &["list", "watch"], true),
    rule("portico.dev", "l2announcements", &["list", "watch"], true),
    rule("portico.dev", "bgppeers", &["list", "watch"], true),
    rule("portico.dev", "bgpadvertisements", &["list", "watch"], true),
    rule("portico.dev", "bfdprofiles", &["list", "watch"], true),
    // In portico's namespace only: the gossip key Secret and the Secrets that BGPPeers'
    // `passwordSecret` name.
    rule("", "secrets", &["list", "watch"], false),
];

/// The Kubernetes verb, group, resource (with subresource) and namespace of a request.
pub fn classify(method: &str, uri: &str) -> (String, String, String, Option<String>) {
    let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match parts.as_slice() {
        ["api", _version, rest @ ..] => (String::new(), rest),
        ["apis", group, _version, rest @ ..] => (group.to_string(), rest),
        _ => (String::new(), &parts[..0]),
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let (resource, named) = match rest {
        [res] => (res.to_string(), false),
        [res, _name] => (res.to_string(), true),
        [res, _name, sub] => (format!("{res}/{sub}"), true),
        _ => (String::new(), false),
    };
    let watch = query.split('&').any(|q| q == "watch=true");
    let verb = match (method, named) {
        ("GET", _) if watch => "watch",
        ("GET", true) => "get",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => "unknown",
    };
    (verb.into(), group, resource, namespace)
}

/// Whether `rules` allow a request (used by the fake-API tests on every request).
pub fn allows(rules: &[Rule], method: &str, uri: &str) -> bool {
    let (verb, group, resource, namespace) = classify(method, uri);
    rules.iter().any(|r| {
        r.group == group
            && r.resource == resource
            && r.verbs.contains(&verb.as_str())
            && (r.cluster_wide || namespace.as_deref() == Some(NAMESPACE))
    })
}

fn policy(rules: &[Rule], cluster_wide: bool) -> Vec<PolicyRule> {
    rules
        .iter()
        .filter(|r| r.cluster_wide == cluster_wide)
        .map(|r| PolicyRule {
            api_groups: Some(vec![r.group.into()]),
            resources: Some(vec![r.resource.into()]),
            verbs: r.verbs.iter().map(|v| v.to_string()).collect(),
            ..PolicyRule::default()
        })
        .collect()
}

fn meta(name: &str, namespace: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: namespace.map(Into::into),
        labels: Some([("app.kubernetes.io/name".to_string(), "portico".to_string())].into()),
        ..ObjectMeta::default()
    }
}

fn doc<T: serde::Serialize>(api_version: &str, kind: &str, obj: &T) -> String {
    let mut v = serde_json::to_value(obj).expect("RBAC objects serialise");
    if let Some(m) = v.as_object_mut() {
        let mut out = serde_json::Map::new();
        out.insert("apiVersion".into(), api_version.into());
        out.insert("kind".into(), kind.into());
        out.extend(std::mem::take(m));
        *m = out;
    }
    format!(
        "---\n{}",
        serde_saphyr::to_string(&v).expect("RBAC objects serialise")
    )
}

/// `deploy/rbac.yaml`: ServiceAccounts, roles and bindings for the controller and the agent.
pub fn yaml() -> String {
    let mut out = String::from(
        "# Generated from crates/ipam/src/rbac.rs; do not edit. `cargo test -p ipam` fails when stale.\n",
    );
    for (account, rules) in [(CONTROLLER_ACCOUNT, CONTROLLER), (AGENT_ACCOUNT, AGENT)] {
        let subject = Subject {
            kind: "ServiceAccount".into(),
            name: account.into(),
            namespace: Some(NAMESPACE.into()),
            api_group: None,
        };
        out.push_str(&doc(
            "v1",
            "ServiceAccount",
            &ServiceAccount {
                metadata: meta(account, Some(NAMESPACE)),
                ..ServiceAccount::default()
            },
        ));
        out.push_str(&doc(
            "rbac.authorization.k8s.io/v1",
            "ClusterRole",
            &ClusterRole {
                metadata: meta(account, None),
                rules: Some(policy(rules, true)),
                aggregation_rule: None,
            },
        ));
        out.push_str(&doc(
            "rbac.authorization.k8s.io/v1",
            "ClusterRoleBinding",
            &ClusterRoleBinding {
                metadata: meta(account, None),
                role_ref: RoleRef {
                    api_group: "rbac.authorization.k8s.io".into(),
                    kind: "ClusterRole".into(),
                    name: account.into(),
                },
                subjects: Some(vec![subject.clone()]),
            },
        ));
        let local = policy(rules, false);
        if !local.is_empty() {
            out.push_str(&doc(
                "rbac.authorization.k8s.io/v1",
                "Role",
                &Role {
                    metadata: meta(account, Some(NAMESPACE)),
                    rules: Some(local),
                },
            ));
            out.push_str(&doc(
                "rbac.authorization.k8s.io/v1",
                "RoleBinding",
                &RoleBinding {
                    metadata: meta(account, Some(NAMESPACE)),
                    role_ref: RoleRef {
                        api_group: "rbac.authorization.k8s.io".into(),
                        kind: "Role".into(),
                        name: account.into(),
                    },
                    subjects: Some(vec![subject]),
                },
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_committed_rbac_matches_the_list_of_calls() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/rbac.yaml");
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        if committed != yaml() {
            if std::env::var_os("PORTICO_BLESS").is_some() {
                std::fs::write(path, yaml()).expect("write deploy/rbac.yaml");
            } else {
                panic!("deploy/rbac.yaml is stale: run `PORTICO_BLESS=1 cargo test -p ipam rbac`");
            }
        }
    }

    #[test]
    fn the_agent_writes_nothing_but_its_announcements() {
        for r in AGENT {
            if !r.resource.starts_with("serviceannouncements") {
                for v in r.verbs {
                    assert!(
                        ["get", "list", "watch"].contains(v),
                        "agent may {v} {}",
                        r.resource
                    );
                }
            }
        }
        assert!(!allows(
            AGENT,
            "PATCH",
            "/api/v1/namespaces/default/services/web"
        ));
        assert!(!allows(
            AGENT,
            "PATCH",
            "/api/v1/namespaces/default/services/web/status"
        ));
    }

    #[test]
    fn requests_are_classified_like_the_api_server_does() {
        assert_eq!(
            classify("PATCH", "/api/v1/namespaces/default/services/web/status?"),
            (
                "patch".into(),
                String::new(),
                "services/status".into(),
                Some("default".into())
            )
        );
        assert_eq!(
            classify(
                "GET",
                "/apis/portico.dev/v1alpha1/ippools?&watch=true&resourceVersion=1"
            )
            .0,
            "watch"
        );
        assert_eq!(classify("GET", "/api/v1/services?limit=500").0, "list");
        assert!(allows(
            CONTROLLER,
            "PUT",
            "/apis/coordination.k8s.io/v1/namespaces/portico-system/leases/x"
        ));
        assert!(!allows(
            CONTROLLER,
            "PUT",
            "/apis/coordination.k8s.io/v1/namespaces/default/leases/x"
        ));
    }
}
