//! Tests of `deploy/`: every manifest parses, references only resources that exist, and keeps
//! the security promises (separate accounts, agents with NET_ADMIN, NET_RAW, NET_BIND_SERVICE and SYS_NICE only).

use std::collections::BTreeSet;

use serde_json::Value;

use crate::rbac;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy");

fn docs() -> Vec<(String, Value)> {
    let files: Vec<String> = serde_saphyr::from_str::<Value>(
        &std::fs::read_to_string(format!("{DEPLOY}/kustomization.yaml")).unwrap(),
    )
    .unwrap()["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let mut out = Vec::new();
    for f in files {
        let text =
            std::fs::read_to_string(format!("{DEPLOY}/{f}")).unwrap_or_else(|e| panic!("{f}: {e}"));
        for doc in text.split("\n---").filter(|d| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.starts_with('#') && l.trim() != "---")
        }) {
            let v: Value = serde_saphyr::from_str(doc).unwrap_or_else(|e| panic!("{f}: {e}"));
            out.push((f.clone(), v));
        }
    }
    out
}

fn named(docs: &[(String, Value)], kind: &str) -> BTreeSet<String> {
    docs.iter()
        .filter(|(_, d)| d["kind"] == kind)
        .map(|(_, d)| d["metadata"]["name"].as_str().unwrap().to_string())
        .collect()
}

fn workload<'a>(docs: &'a [(String, Value)], kind: &str) -> &'a Value {
    &docs.iter().find(|(_, d)| d["kind"] == kind).unwrap().1
}

#[test]
fn every_manifest_parses_and_names_its_kind() {
    let docs = docs();
    assert!(docs.len() >= 12, "{}", docs.len());
    for (f, d) in &docs {
        assert!(
            d["apiVersion"].is_string() && d["kind"].is_string(),
            "{f}: {d}"
        );
        assert!(d["metadata"]["name"].is_string(), "{f}: {d}");
    }
}

#[test]
fn namespaced_objects_live_in_the_portico_namespace_which_exists() {
    let docs = docs();
    assert!(named(&docs, "Namespace").contains(rbac::NAMESPACE));
    for (f, d) in &docs {
        let kind = d["kind"].as_str().unwrap();
        let cluster_scoped = [
            "Namespace",
            "CustomResourceDefinition",
            "ClusterRole",
            "ClusterRoleBinding",
        ]
        .contains(&kind);
        assert_eq!(
            d["metadata"]["namespace"].is_null(),
            cluster_scoped,
            "{f}: {kind}"
        );
        if !cluster_scoped {
            assert_eq!(d["metadata"]["namespace"], rbac::NAMESPACE, "{f}: {kind}");
        }
    }
}

#[test]
fn workloads_reference_only_existing_accounts_and_subcommands() {
    let docs = docs();
    let accounts = named(&docs, "ServiceAccount");
    let controller = workload(&docs, "Deployment");
    let agent = workload(&docs, "DaemonSet");
    assert_eq!(controller["spec"]["replicas"], 2);
    for (w, account, cmd) in [
        (controller, rbac::CONTROLLER_ACCOUNT, "controller"),
        (agent, rbac::AGENT_ACCOUNT, "agent"),
    ] {
        let pod = &w["spec"]["template"]["spec"];
        assert_eq!(pod["serviceAccountName"], account);
        assert!(accounts.contains(account));
        assert_eq!(pod["containers"][0]["args"][0], cmd);
        assert_eq!(
            w["spec"]["selector"]["matchLabels"],
            w["spec"]["template"]["metadata"]["labels"]
        );
    }
    assert_ne!(
        rbac::CONTROLLER_ACCOUNT,
        rbac::AGENT_ACCOUNT,
        "separate accounts"
    );
    // The agent's node name comes from the downward API.
    let env = &agent["spec"]["template"]["spec"]["containers"][0]["env"];
    assert!(
        env.as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "NODE_NAME"
                && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName")
    );
    // The gossip Secret the agent reads exists.
    assert!(named(&docs, "Secret").contains(rbac::GOSSIP_SECRET));
}

#[test]
fn both_workloads_have_probes_and_the_controller_a_metrics_service() {
    let docs = docs();
    let controller = &workload(&docs, "Deployment")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(controller["ports"][0]["containerPort"], 7472);
    assert_eq!(controller["ports"][0]["name"], "metrics");
    assert_eq!(controller["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(controller["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(controller["readinessProbe"]["httpGet"]["port"], "metrics");
    // The agent (host network) serves its probes on the node address from the downward API.
    let agent = &workload(&docs, "DaemonSet")["spec"]["template"]["spec"]["containers"][0];
    let metrics_port = agent["ports"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "metrics"))
        .expect("the agent names a metrics port");
    assert_eq!(metrics_port["containerPort"], 7473);
    assert_eq!(agent["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(agent["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(agent["readinessProbe"]["httpGet"]["port"], "metrics");
    assert!(
        agent["env"].as_array().is_some_and(|e| e.iter().any(|e| {
            e["name"] == "PORTICO_METRICS_HOST"
                && e["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
        })),
        "the agent's metrics host comes from status.hostIP"
    );
    // A Service in front of each metrics port, selecting its pods.
    for (name, kind) in [
        ("portico-controller-metrics", "Deployment"),
        ("portico-agent-metrics", "DaemonSet"),
    ] {
        let svc = docs
            .iter()
            .map(|(_, d)| d)
            .find(|d| d["kind"] == "Service" && d["metadata"]["name"] == name)
            .expect("the metrics Service");
        assert_eq!(
            svc["spec"]["selector"],
            workload(&docs, kind)["spec"]["selector"]["matchLabels"]
        );
        assert_eq!(svc["spec"]["ports"][0]["targetPort"], "metrics");
    }
}

#[test]
fn the_agent_runs_on_the_host_network_with_net_admin_net_raw_net_bind_service_and_sys_nice_only() {
    let docs = docs();
    let pod = &workload(&docs, "DaemonSet")["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    let sc = &pod["containers"][0]["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(
        sc["capabilities"]["add"],
        serde_json::json!(["NET_ADMIN", "NET_RAW", "NET_BIND_SERVICE", "SYS_NICE"])
    );
}

#[test]
fn role_bindings_point_at_roles_and_accounts_that_exist() {
    let docs = docs();
    let accounts = named(&docs, "ServiceAccount");
    for (binding, role) in [
        ("ClusterRoleBinding", "ClusterRole"),
        ("RoleBinding", "Role"),
    ] {
        let roles = named(&docs, role);
        for (f, d) in docs.iter().filter(|(_, d)| d["kind"] == binding) {
            assert_eq!(d["roleRef"]["kind"], role, "{f}");
            assert!(
                roles.contains(d["roleRef"]["name"].as_str().unwrap()),
                "{f}: {d}"
            );
            for s in d["subjects"].as_array().unwrap() {
                assert!(accounts.contains(s["name"].as_str().unwrap()), "{f}: {s}");
            }
        }
    }
}

#[test]
fn rbac_names_only_resources_the_crds_or_kubernetes_define() {
    let docs = docs();
    let crds: BTreeSet<String> = docs
        .iter()
        .filter(|(_, d)| d["kind"] == "CustomResourceDefinition")
        .map(|(_, d)| d["spec"]["names"]["plural"].as_str().unwrap().to_string())
        .collect();
    let builtin = [
        "services",
        "services/status",
        "namespaces",
        "nodes",
        "secrets",
        "events",
        "leases",
        "endpointslices",
    ];
    for r in rbac::CONTROLLER.iter().chain(rbac::AGENT) {
        let base = r.resource.split('/').next().unwrap();
        if r.group == crate::crd::GROUP {
            assert!(crds.contains(base), "{}", r.resource);
        } else {
            assert!(builtin.contains(&r.resource), "{}", r.resource);
        }
    }
}
