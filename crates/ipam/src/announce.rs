//! Per-address announcement status: each agent writes its own view into `ServiceAnnouncement`s.
//!
//! Every agent server-side-applies, with its own field manager (`portico-agent/<node>`), one
//! entry per address of every Service it serves: its reason word under `nodes.<node>`, and
//! `node: <node>` where it is the owner. Entries are a list-map keyed by address and `nodes` is a
//! map, so each agent owns only its own keys and the API server merges the views; the new owner
//! of an address takes the `node` field over with `force`. The object is owned by its Service,
//! so it is deleted with it. [`patches`] is pure; [`run`] applies what changed.

use std::collections::BTreeMap;
use std::sync::Arc;

use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use model::{Config, OwnershipView};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::crd::ServiceAnnouncement;

/// Where a model service came from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Origin {
    /// Namespace of the Service.
    pub namespace: String,
    /// Name of the Service.
    pub name: String,
    /// Its uid (for the owner reference).
    pub uid: String,
}

/// Model service name → its Kubernetes Service.
pub type Origins = BTreeMap<String, Origin>;

/// One object to apply: the resource (spec and owner) and its status.
#[derive(Debug, Clone, PartialEq)]
pub struct Apply {
    /// The Service it reports on.
    pub origin: Origin,
    /// Server-side apply body of the resource.
    pub object: Value,
    /// Server-side apply body of the status subresource.
    pub status: Value,
}

/// The field manager of one node's agent.
pub fn manager(node: &str) -> String {
    format!("portico-agent/{node}")
}

/// What this node applies, given what it serves and its ownership view (pure).
pub fn patches(
    config: &Config,
    ownership: &OwnershipView,
    origins: &Origins,
    me: &str,
) -> Vec<Apply> {
    let mut out = Vec::new();
    for svc in &config.services {
        let Some(origin) = origins.get(&svc.name) else {
            continue;
        };
        let addresses: Vec<Value> = svc
            .vips
            .iter()
            .map(|ip| {
                let view = ownership.get(ip);
                let reason = view.map_or("unknown", |v| v.reason.as_str());
                let mut entry = json!({
                    "address": ip.to_string(),
                    "nodes": { me: reason },
                });
                if view.and_then(|v| v.owner.as_deref()) == Some(me) {
                    entry["node"] = json!(me);
                    entry["reason"] = json!(reason);
                }
                entry
            })
            .collect();
        let meta = json!({
            "name": origin.name,
            "namespace": origin.namespace,
            "ownerReferences": [{
                "apiVersion": "v1", "kind": "Service", "name": origin.name, "uid": origin.uid,
            }],
        });
        out.push(Apply {
            origin: origin.clone(),
            object: json!({
                "apiVersion": "portico.dev/v1alpha1", "kind": "ServiceAnnouncement",
                "metadata": meta,
                "spec": { "service": origin.name },
            }),
            status: json!({
                "apiVersion": "portico.dev/v1alpha1", "kind": "ServiceAnnouncement",
                "metadata": { "name": origin.name, "namespace": origin.namespace },
                "status": { "addresses": addresses },
            }),
        });
    }
    out
}

/// Applies this node's view whenever the config or the ownership changes, skipping objects
/// whose body did not change since the last successful apply.
pub async fn run(
    client: Client,
    me: String,
    mut desired: watch::Receiver<Arc<model::Desired>>,
    mut origins: watch::Receiver<Arc<Origins>>,
    mut ownership: watch::Receiver<Arc<OwnershipView>>,
    shutdown: CancellationToken,
) {
    let pp = PatchParams::apply(&manager(&me)).force();
    let mut written: BTreeMap<Origin, Apply> = BTreeMap::new();
    loop {
        let todo = patches(
            &desired.borrow().config,
            &ownership.borrow(),
            &origins.borrow(),
            &me,
        );
        for a in todo {
            if written.get(&a.origin) == Some(&a) {
                continue;
            }
            let api: Api<ServiceAnnouncement> =
                Api::namespaced(client.clone(), &a.origin.namespace);
            let r = match api
                .patch(&a.origin.name, &pp, &Patch::Apply(&a.object))
                .await
            {
                Ok(_) => {
                    api.patch_status(&a.origin.name, &pp, &Patch::Apply(&a.status))
                        .await
                }
                Err(e) => Err(e),
            };
            match r {
                Ok(_) => {
                    written.insert(a.origin.clone(), a);
                }
                Err(e) => {
                    tracing::debug!(service = %a.origin.name, error = %e, "cannot write ServiceAnnouncement; retrying on the next change")
                }
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            r = desired.changed() => if r.is_err() { return },
            r = origins.changed() => if r.is_err() { return },
            r = ownership.changed() => if r.is_err() { return },
            () = tokio::time::sleep(std::time::Duration::from_secs(30)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use model::VipOwnership;

    use super::*;

    fn config() -> Config {
        let mut c = model::config::parse("", &model::config::Environment::default()).unwrap();
        let mut s = crate::source::template().unwrap();
        s.name = "shop/web".into();
        s.vips = vec!["192.0.2.10".parse().unwrap(), "192.0.2.11".parse().unwrap()];
        c.services = vec![s];
        c
    }

    #[test]
    fn the_owner_names_itself_and_every_node_gives_its_reason() {
        let origins: Origins = [(
            "shop/web".to_string(),
            Origin {
                namespace: "shop".into(),
                name: "web".into(),
                uid: "u1".into(),
            },
        )]
        .into();
        let ownership: OwnershipView = [
            (
                "192.0.2.10".parse().unwrap(),
                VipOwnership {
                    owner: Some("n1".into()),
                    reason: "owner".into(),
                },
            ),
            (
                "192.0.2.11".parse().unwrap(),
                VipOwnership {
                    owner: Some("n2".into()),
                    reason: "notOwner".into(),
                },
            ),
        ]
        .into();
        let p = patches(&config(), &ownership, &origins, "n1");
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].object["metadata"]["ownerReferences"][0]["uid"], "u1");
        let a = &p[0].status["status"]["addresses"];
        assert_eq!(
            a[0],
            json!({"address": "192.0.2.10", "node": "n1", "reason": "owner", "nodes": {"n1": "owner"}})
        );
        assert_eq!(
            a[1],
            json!({"address": "192.0.2.11", "nodes": {"n1": "notOwner"}})
        );
    }
}

#[cfg(test)]
mod fake_api_tests {
    use model::{Desired, VipOwnership};

    use super::*;
    use crate::fixtures::{mock_client_for, timeout_after_1s};

    #[tokio::test]
    async fn each_agent_applies_its_view_with_its_own_field_manager() {
        let (client, mut api) = mock_client_for(crate::rbac::AGENT);
        let path = "/apis/portico.dev/v1alpha1/namespaces/shop/serviceannouncements/web";
        let server = tokio::spawn(async move {
            let obj = api.expect("PATCH", path, 200, json!({"apiVersion": "portico.dev/v1alpha1", "kind": "ServiceAnnouncement", "metadata": {"name": "web", "namespace": "shop"}, "spec": {"service": "web"}})).await;
            assert!(
                obj.uri.contains("fieldManager=portico-agent%2Fn1"),
                "{}",
                obj.uri
            );
            assert!(obj.uri.contains("force=true"), "{}", obj.uri);
            assert_eq!(
                obj.body["metadata"]["ownerReferences"][0]["kind"],
                "Service"
            );
            let status = api
                .expect("PATCH", &format!("{path}/status"), 200, json!({"apiVersion": "portico.dev/v1alpha1", "kind": "ServiceAnnouncement", "metadata": {"name": "web", "namespace": "shop"}, "spec": {"service": "web"}}))
                .await;
            assert_eq!(status.body["status"]["addresses"][0]["node"], "n1");
        });
        let mut config = model::config::parse("", &model::config::Environment::default()).unwrap();
        let mut svc = crate::source::template().unwrap();
        svc.name = "shop/web".into();
        svc.vips = vec!["192.0.2.10".parse().unwrap()];
        config.services = vec![svc];
        let (_d, desired) = watch::channel(Arc::new(Desired {
            generation: 1,
            config: Arc::new(config),
        }));
        let origins: Origins = [(
            "shop/web".to_string(),
            Origin {
                namespace: "shop".into(),
                name: "web".into(),
                uid: "u1".into(),
            },
        )]
        .into();
        let (_o, origins) = watch::channel(Arc::new(origins));
        let ownership: OwnershipView = [(
            "192.0.2.10".parse().unwrap(),
            VipOwnership {
                owner: Some("n1".into()),
                reason: "owner".into(),
            },
        )]
        .into();
        let (_w, ownership) = watch::channel(Arc::new(ownership));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(
            client,
            "n1".into(),
            desired,
            origins,
            ownership,
            shutdown.clone(),
        ));
        timeout_after_1s(server).await;
        shutdown.cancel();
        task.await.unwrap();
    }
}
