//! A test double of kube-apiserver for portico's end-to-end tests (test-only code).
//!
//! It is stateful and in memory, speaks HTTPS with a generated CA, and writes kubeconfig files
//! with bearer tokens, so that kube-rs's client and runtime (what the `portico` binaries use)
//! work against it as against a real API server, for what portico uses:
//!
//! - a JSON object store keyed by (group, version, resource, namespace, name) with one global,
//!   monotonically increasing resourceVersion, and discovery (`/api`, `/apis`, `/api/v1`,
//!   `/apis/<group>/<version>`, `/version`);
//! - list (resourceVersion in the list metadata, `labelSelector`, `fieldSelector`,
//!   `limit`/`continue`), get, create (201; 409 AlreadyExists), update (409 Conflict on a stale
//!   `metadata.resourceVersion`, also inside patches), delete (finalizers, owner references and
//!   namespace contents followed at once), JSON merge patch, strategic merge patch (built-in
//!   types; merge keys for `conditions`, `ports`, `addresses`, `ownerReferences`), and
//!   server-side apply with field managers (`metadata.managedFields`, FieldsV1; maps, list-maps
//!   from the CRD schema, atomic lists; 409 on a conflict without `force`);
//! - the `status` subresource (status writes ignore the rest, other writes ignore status),
//!   `metadata.generation`, Secrets' `stringData`, Service defaults (cluster IP, families,
//!   protocols), namespaces' `kubernetes.io/metadata.name` label, and the namespaces and the
//!   `default/kubernetes` Service every cluster starts with;
//! - CRDs: a stored `CustomResourceDefinition` serves its resources (scope, status
//!   subresource, list-map keys from the schema);
//! - watches: chunked JSON lines ADDED/MODIFIED/DELETED/BOOKMARK (`allowWatchBookmarks`),
//!   replayed from a bounded history after the given resourceVersion; older than the history →
//!   an ERROR event with a 410 `Expired` Status; `timeoutSeconds`; `sendInitialEvents`;
//! - errors as `Status` objects; RBAC: ServiceAccount bearer tokens checked against the stored
//!   Roles, ClusterRoles and bindings (403 Forbidden otherwise), and an admin token;
//! - test hooks: [`ApiServer::stop`] / [`ApiServer::restart`] on the same port keeping the
//!   state, [`ApiServer::compact`] (forces 410), [`ApiServer::apply_yaml`] and
//!   [`ApiServer::inject`] of any object, request counts.
//!
//! What it does NOT do (a real kube-apiserver does):
//! - validation: no OpenAPI schema or CEL rules (CRD `x-kubernetes-validations`), no defaults
//!   from CRD schemas, no pruning of unknown fields, no name (DNS-1123) or immutable-field
//!   checks, no Service validation (ingress `ip`/`ipMode`, port ranges), no NodePort allocation;
//! - admission: no webhooks, quotas, Pod Security, `DenyServiceExternalIPs`;
//! - patches: no JSON patch (RFC 6902); strategic merge knows only the merge keys listed in
//!   `resources.rs` and ignores `$retainKeys`, `$setElementOrder`, `$deleteFromPrimitiveList`;
//!   server-side apply treats `x-kubernetes-list-type: set` and `map-type: atomic` fields as
//!   plain lists/maps, and `Update` managers simply own the fields they last changed;
//! - reads: lists are always served from the current state (`resourceVersionMatch` and
//!   `resourceVersion` on lists are ignored; `continue` pages are not one snapshot); a watch
//!   from a resourceVersion newer than the store is not refused (no "too large" error);
//!   bookmarks come every `bookmark_interval`, not about once a minute; no watch cache;
//! - no Protobuf, no HTTP/2, no `dryRun`, no Table output for printer columns, no `scale`
//!   subresource, no API aggregation, one served version per resource (no conversion);
//! - lifecycle: dependents are deleted at once (no foreground/orphan propagation), deleted
//!   namespaces vanish at once with their contents (no Terminating phase), no graceful Pod
//!   deletion, Events never expire, and deleting a CRD stops serving its resources but keeps
//!   their objects in the store;
//! - security: bearer tokens only (no client certificates, no TokenReview, tokens never
//!   expire), RBAC without ClusterRole aggregation, without escalation checks and without the
//!   default `system:*` roles (discovery is open to every authenticated user);
//! - no flow control (no 429 / Retry-After), no audit log, and no controllers: no
//!   EndpointSlice controller, kubelet, scheduler or kube-proxy (tests write Nodes and
//!   EndpointSlices themselves).

mod defaults;
pub mod merge;
pub mod rbac;
pub mod resources;
pub mod select;
mod server;
pub mod status;
pub mod store;
pub mod tls;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use status::ApiError;
pub use store::Store;

use rbac::User;
use server::Shared;

/// Errors of the server's lifecycle.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The address could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Certificates could not be made.
    #[error(transparent)]
    Tls(#[from] tls::Error),
    /// A YAML document could not be read.
    #[error("YAML: {0}")]
    Yaml(String),
    /// The API refused an object.
    #[error("{what}: {source}")]
    Api {
        /// Which object.
        what: String,
        /// The refusal.
        #[source]
        source: ApiError,
    },
}

/// How to run the server.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where to listen (port 0: any free port).
    pub bind: SocketAddr,
    /// Changes kept for watches; a watch from before them gets 410 Gone.
    pub history: usize,
    /// An idle watch gets a BOOKMARK this often.
    pub bookmark_interval: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            history: 10_000,
            bookmark_interval: Duration::from_secs(5),
        }
    }
}

/// A running (or stopped) test API server.
pub struct ApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    pki: tls::Pki,
    admin_token: String,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

fn random_token() -> String {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut out = String::new();
    for i in 0..4u64 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(i);
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}

impl ApiServer {
    /// Starts a server with an empty store.
    pub async fn start(opts: Options) -> Result<Self, Error> {
        let listener = TcpListener::bind(opts.bind)
            .await
            .map_err(|source| Error::Bind {
                addr: opts.bind,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| Error::Bind {
            addr: opts.bind,
            source,
        })?;
        let mut ips: Vec<IpAddr> = vec![IpAddr::from([127, 0, 0, 1])];
        if !ips.contains(&addr.ip()) {
            ips.push(addr.ip());
        }
        let pki = tls::generate(&ips)?;
        let admin_token = random_token();
        let seed = u32::from_str_radix(&admin_token[..8], 16).unwrap_or(1);
        let mut tokens = HashMap::new();
        tokens.insert(admin_token.clone(), User::admin());
        let store = Store::new(opts.history, seed);
        let rv = store.rv();
        let shared = Arc::new(Shared {
            store: Mutex::new(store),
            changed: tokio::sync::watch::Sender::new(rv),
            tokens: Mutex::new(tokens),
            bookmark_interval: opts.bookmark_interval,
            requests: Mutex::new(BTreeMap::new()),
            url: format!("https://{addr}"),
            refusals: Mutex::new(Vec::new()),
            expired: std::sync::atomic::AtomicU64::new(0),
        });
        let mut s = Self {
            shared,
            addr,
            pki,
            admin_token,
            task: None,
        };
        s.spawn(listener);
        Ok(s)
    }

    fn spawn(&mut self, listener: TcpListener) {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.pki.server.clone());
        self.task = Some(tokio::spawn(server::serve(
            listener,
            acceptor,
            self.shared.clone(),
        )));
    }

    /// `https://<ip>:<port>`.
    pub fn url(&self) -> String {
        self.shared.url.clone()
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin's bearer token (group `system:masters`).
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// A kubeconfig for the admin.
    pub fn admin_kubeconfig(&self) -> String {
        tls::kubeconfig(&self.url(), &self.pki.ca_pem, &self.admin_token)
    }

    /// A new bearer token for ServiceAccount `namespace/name` (valid while it exists).
    pub fn service_account_token(&self, namespace: &str, name: &str) -> String {
        let t = random_token();
        self.shared
            .tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(t.clone(), User::service_account(namespace, name));
        t
    }

    /// A kubeconfig authenticating as ServiceAccount `namespace/name`.
    pub fn service_account_kubeconfig(&self, namespace: &str, name: &str) -> String {
        let t = self.service_account_token(namespace, name);
        tls::kubeconfig(&self.url(), &self.pki.ca_pem, &t)
    }

    /// Stops serving: the port is closed and every connection (watches too) is dropped.
    pub async fn stop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    /// Serves again on the same address, with the same state and certificates.
    pub async fn restart(&mut self) -> Result<(), Error> {
        self.stop().await;
        let listener = TcpListener::bind(self.addr)
            .await
            .map_err(|source| Error::Bind {
                addr: self.addr,
                source,
            })?;
        self.spawn(listener);
        Ok(())
    }

    /// Forgets the watch history: every watch resuming from before now gets 410 Gone.
    pub fn compact(&self) {
        self.shared.with_store(Store::compact);
    }

    /// Runs `f` on the store (for hooks and assertions), then wakes the watches.
    pub fn with_store<R>(&self, f: impl FnOnce(&mut Store) -> R) -> R {
        self.shared.with_store(f)
    }

    /// Creates `obj`, or replaces it (status included) when it exists, as the admin.
    pub fn inject(&self, obj: Value) -> Result<Value, Error> {
        let what = format!(
            "{} {}/{}",
            obj["kind"].as_str().unwrap_or("?"),
            obj["metadata"]["namespace"].as_str().unwrap_or(""),
            obj["metadata"]["name"].as_str().unwrap_or("?")
        );
        self.shared
            .with_store(|s| {
                let res = s
                    .resource_of_kind(
                        obj["apiVersion"].as_str().unwrap_or_default(),
                        obj["kind"].as_str().unwrap_or_default(),
                    )
                    .ok_or_else(|| ApiError::no_route(&what))?;
                let ns = obj["metadata"]["namespace"].as_str();
                let name = obj["metadata"]["name"].as_str().unwrap_or_default();
                match s.get(&res, ns, name) {
                    Err(_) => s.create(&res, ns, obj.clone(), "test"),
                    Ok(_) => {
                        let mut o = obj.clone();
                        if let Some(m) = o["metadata"].as_object_mut() {
                            m.remove("resourceVersion");
                        }
                        let v = s.update(&res, ns, name, None, o.clone(), "test")?;
                        if res.status && o.get("status").is_some() {
                            s.update(&res, ns, name, Some("status"), o, "test")
                        } else {
                            Ok(v)
                        }
                    }
                }
            })
            .map_err(|source| Error::Api { what, source })
    }

    /// Injects every document of a multi-document YAML file (like `kubectl apply -f`).
    pub fn apply_yaml(&self, yaml: &str) -> Result<Vec<Value>, Error> {
        yaml_documents(yaml)?
            .into_iter()
            .filter(|d| d.is_object())
            .map(|d| self.inject(d))
            .collect()
    }

    /// The object of `api_version`/`kind` named `namespace`/`name`, if it exists.
    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        self.shared.with_store(|s| {
            let res = s.resource_of_kind(api_version, kind)?;
            s.get(&res, namespace, name).ok()
        })
    }

    /// Every object of `api_version`/`kind`.
    pub fn list(&self, api_version: &str, kind: &str) -> Vec<Value> {
        self.shared.with_store(|s| {
            s.resource_of_kind(api_version, kind)
                .map(|res| s.list(&res, None, &select::Filter::default()))
                .unwrap_or_default()
        })
    }

    /// Deletes an object as the admin (owned objects follow).
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, Error> {
        let what = format!("{kind} {}/{name}", namespace.unwrap_or_default());
        self.shared
            .with_store(|s| {
                let res = s
                    .resource_of_kind(api_version, kind)
                    .ok_or_else(|| ApiError::no_route(&what))?;
                s.delete(&res, namespace, name)
            })
            .map_err(|source| Error::Api { what, source })
    }

    /// Requests refused so far (`"<code> <reason> <method> <path>: <message>"`, the first 1000).
    pub fn refusals(&self) -> Vec<String> {
        self.shared
            .refusals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Watches answered with 410 Gone so far.
    pub fn expired_watches(&self) -> u64 {
        self.shared
            .expired
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Requests served so far, by `"<user> <verb> <resource>"`.
    pub fn requests(&self) -> BTreeMap<String, u64> {
        self.shared
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The documents of a multi-document YAML file (empty ones as `null`).
pub fn yaml_documents(yaml: &str) -> Result<Vec<Value>, Error> {
    serde_saphyr::from_multiple(yaml).map_err(|e| Error::Yaml(e.to_string()))
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}
