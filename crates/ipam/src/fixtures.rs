//! Test fixtures: object builders and a scripted fake API server (controller-rs style).

use std::collections::BTreeMap;

use http::{Request, Response};
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::client::Body;
use kube::{Client, ResourceExt};

use crate::crd::{IPPool, IPPoolSpec};

/// A ClusterIP Service with one TCP port 80.
pub fn service(namespace: &str, name: &str) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            uid: Some(format!("uid-{namespace}-{name}")),
            resource_version: Some("1".into()),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            ports: Some(vec![ServicePort {
                port: 80,
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// An IPPool.
pub fn pool(name: &str, addresses: &[&str]) -> IPPool {
    let mut p = IPPool::new(
        name,
        IPPoolSpec {
            addresses: addresses.iter().map(|s| s.to_string()).collect(),
            auto_assign: true,
            avoid_buggy_ips: false,
            service_allocation: None,
        },
    );
    p.metadata.resource_version = Some("1".into());
    p
}

/// Builder methods on Services.
pub trait ServiceExt: Sized {
    /// `type: LoadBalancer` with a class.
    fn load_balancer(self, class: &str) -> Self;
    /// `type: LoadBalancer` without a class.
    fn load_balancer_without_class(self) -> Self;
    /// Adds an annotation.
    fn annotate(self, k: &str, v: &str) -> Self;
    /// Both families with a policy.
    fn dual_stack(self, policy: &str) -> Self;
    /// Replaces the ports with TCP ones.
    fn tcp_ports(self, ports: &[i32]) -> Self;
    /// Sets the resource version.
    fn version(self, rv: &str) -> Self;
    /// Sets `status.loadBalancer.ingress`.
    fn ingress(self, ips: &[&str]) -> Self;
}

impl ServiceExt for Service {
    fn load_balancer(mut self, class: &str) -> Self {
        let spec = self.spec.get_or_insert_with(Default::default);
        spec.type_ = Some("LoadBalancer".into());
        spec.load_balancer_class = Some(class.into());
        self
    }

    fn load_balancer_without_class(mut self) -> Self {
        self.spec.get_or_insert_with(Default::default).type_ = Some("LoadBalancer".into());
        self
    }

    fn annotate(mut self, k: &str, v: &str) -> Self {
        self.annotations_mut().insert(k.into(), v.into());
        self
    }

    fn dual_stack(mut self, policy: &str) -> Self {
        let spec = self.spec.get_or_insert_with(Default::default);
        spec.ip_families = Some(vec!["IPv4".into(), "IPv6".into()]);
        spec.ip_family_policy = Some(policy.into());
        self
    }

    fn tcp_ports(mut self, ports: &[i32]) -> Self {
        self.spec.get_or_insert_with(Default::default).ports = Some(
            ports
                .iter()
                .map(|p| ServicePort {
                    port: *p,
                    protocol: Some("TCP".into()),
                    ..ServicePort::default()
                })
                .collect(),
        );
        self
    }

    fn version(mut self, rv: &str) -> Self {
        self.metadata.resource_version = Some(rv.into());
        self
    }

    fn ingress(mut self, ips: &[&str]) -> Self {
        let status = self.status.get_or_insert_with(Default::default);
        status.load_balancer = Some(k8s_openapi::api::core::v1::LoadBalancerStatus {
            ingress: Some(
                ips.iter()
                    .map(|ip| k8s_openapi::api::core::v1::LoadBalancerIngress {
                        ip: Some(ip.to_string()),
                        ip_mode: Some(crate::reconcile::IP_MODE.into()),
                        ..Default::default()
                    })
                    .collect(),
            ),
        });
        self
    }
}

/// The fake API server's side of a mock client.
pub type ApiServerHandle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// A client of the controller talking to a scripted fake API server.
pub fn mock_client() -> (Client, ApiServerVerifier) {
    mock_client_for(crate::rbac::CONTROLLER)
}

/// A client talking to a scripted fake API server that checks requests against `rules`.
pub fn mock_client_for(rules: &'static [crate::rbac::Rule]) -> (Client, ApiServerVerifier) {
    let (svc, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    (
        Client::new(svc, "default"),
        ApiServerVerifier(handle, rules),
    )
}

/// Answers the client's requests one by one, asserting each request's method and path, and
/// that the component's RBAC rules ([`crate::rbac`]) allow it.
pub struct ApiServerVerifier(pub ApiServerHandle, pub &'static [crate::rbac::Rule]);

/// One request as the fake API server saw it.
#[derive(Debug)]
pub struct Seen {
    /// `GET`, `PATCH`, …
    pub method: String,
    /// Path and query.
    pub uri: String,
    /// The JSON body (Null when empty).
    pub body: serde_json::Value,
}

impl ApiServerVerifier {
    /// Waits for the next request, checks its method and that its path starts with `path`,
    /// and answers `status` with `reply`.
    pub async fn expect(
        &mut self,
        method: &str,
        path: &str,
        status: u16,
        reply: serde_json::Value,
    ) -> Seen {
        let (request, send) = self
            .0
            .next_request()
            .await
            .expect("the client sent a request");
        let seen = Seen {
            method: request.method().to_string(),
            uri: request.uri().to_string(),
            body: {
                let bytes = request.into_body().collect_bytes().await.unwrap();
                if bytes.is_empty() {
                    serde_json::Value::Null
                } else {
                    serde_json::from_slice(&bytes).unwrap()
                }
            },
        };
        assert_eq!(seen.method, method, "unexpected request {seen:?}");
        assert!(
            crate::rbac::allows(self.1, &seen.method, &seen.uri),
            "RBAC (crates/ipam/src/rbac.rs) does not allow {seen:?}"
        );
        assert!(
            seen.uri.starts_with(path),
            "expected {method} {path}, got {seen:?}"
        );
        send.send_response(
            Response::builder()
                .status(status)
                .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                .unwrap(),
        );
        seen
    }
}

/// A Kubernetes `Status` error body.
pub fn status_error(code: u16, reason: &str) -> serde_json::Value {
    serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("{reason} (fake)"), "reason": reason, "code": code
    })
}

/// A list response of objects.
pub fn list<T: serde::Serialize>(kind: &str, items: &[T], rv: &str) -> serde_json::Value {
    serde_json::json!({
        "kind": format!("{kind}List"), "apiVersion": "v1",
        "metadata": {"resourceVersion": rv},
        "items": items,
    })
}

/// Labels from pairs.
pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Fails the test when the scripted exchange does not finish within a second.
pub async fn timeout_after_1s(handle: tokio::task::JoinHandle<()>) {
    tokio::time::timeout(std::time::Duration::from_secs(1), handle)
        .await
        .expect("timeout on mock apiserver")
        .expect("scenario succeeded")
}
