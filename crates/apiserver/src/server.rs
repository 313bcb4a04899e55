//! HTTPS front end: authentication, routing of the REST paths, RBAC, the verbs, discovery,
//! and watch streams (chunked JSON lines with bookmarks and 410 Gone).

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::rbac::{self, Attributes, Policy, User};
use crate::resources::{self, Resource};
use crate::select::{Filter, Selector};
use crate::status::ApiError;
use crate::store::{Change, PatchKind, Store};

/// Largest request body taken (kube-apiserver's limit is 3 MiB).
const MAX_BODY: usize = 3 << 20;

type Body = BoxBody<Bytes, Infallible>;

/// What the front end and the test hooks share.
pub struct Shared {
    /// The objects.
    pub store: Mutex<Store>,
    /// The store's resourceVersion after each write (wakes watches).
    pub changed: watch::Sender<u64>,
    /// Bearer token → user.
    pub tokens: Mutex<HashMap<String, User>>,
    /// How often an idle watch gets a BOOKMARK.
    pub bookmark_interval: Duration,
    /// Requests served, by `"<user> <verb> <resource>"`.
    pub requests: Mutex<BTreeMap<String, u64>>,
    /// `https://host:port`.
    pub url: String,
    /// Refused requests (`"<code> <reason> <method> <path>: <message>"`), the first
    /// [`MAX_REFUSALS`] of them.
    pub refusals: Mutex<Vec<String>>,
    /// Watches ended with 410 Gone.
    pub expired: std::sync::atomic::AtomicU64,
}

/// Refused requests remembered for the tests.
pub const MAX_REFUSALS: usize = 1000;

impl Shared {
    /// Runs `f` on the store, then wakes the watches.
    pub fn with_store<R>(&self, f: impl FnOnce(&mut Store) -> R) -> R {
        let (r, rv) = {
            let mut s = self.store.lock().unwrap_or_else(|e| e.into_inner());
            let r = f(&mut s);
            (r, s.rv())
        };
        self.changed.send_if_modified(|v| {
            let moved = *v != rv;
            *v = rv;
            moved
        });
        r
    }
}

/// Accepts connections until the task is aborted (which drops every connection).
pub async fn serve(listener: TcpListener, tls: TlsAcceptor, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            r = listener.accept() => {
                let Ok((tcp, _)) = r else { continue };
                let (tls, shared) = (tls.clone(), shared.clone());
                conns.spawn(async move {
                    let Ok(stream) = tls.accept(tcp).await else { return };
                    let svc = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(shared, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

fn json_response(code: u16, v: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed()))
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    match route(&shared, req).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(%method, %path, code = e.code, reason = e.reason, "refused");
            let mut r = shared.refusals.lock().unwrap_or_else(|e| e.into_inner());
            if r.len() < MAX_REFUSALS {
                r.push(format!(
                    "{} {} {method} {path}: {}",
                    e.code, e.reason, e.message
                ));
            }
            drop(r);
            json_response(e.code, &e.to_status())
        }
    }
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(x) => {
                        out.push(x);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query(q: Option<&str>) -> HashMap<String, String> {
    q.unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

fn authenticate(shared: &Shared, req: &Request<Incoming>) -> Result<User, ApiError> {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .ok_or_else(ApiError::unauthorized)?;
    let user = shared
        .tokens
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(token.trim())
        .cloned()
        .ok_or_else(ApiError::unauthorized)?;
    // A ServiceAccount token is valid only while its ServiceAccount exists.
    if let Some((ns, name)) = &user.service_account {
        let store = shared.store.lock().unwrap_or_else(|e| e.into_inner());
        let sa = store
            .resource("", "v1", "serviceaccounts")
            .expect("built in");
        store
            .get(&sa, Some(ns), name)
            .map_err(|_| ApiError::unauthorized())?;
    }
    Ok(user)
}

/// A parsed resource request.
struct Target {
    res: Resource,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

fn parse_target(
    store: &Store,
    group: &str,
    version: &str,
    segs: &[&str],
) -> Result<Target, ApiError> {
    let not_found = || ApiError::no_route(&segs.join("/"));
    let (namespace, rest) = if segs.len() >= 3
        && segs[0] == "namespaces"
        && store
            .resource(group, version, segs[2])
            .is_some_and(|r| r.namespaced)
    {
        (Some(segs[1].to_string()), &segs[2..])
    } else {
        (None, segs)
    };
    if rest.is_empty() || rest.len() > 3 {
        return Err(not_found());
    }
    let res = store
        .resource(group, version, rest[0])
        .ok_or_else(not_found)?;
    if namespace.is_some() && !res.namespaced {
        return Err(not_found());
    }
    let sub = rest.get(2).map(|s| s.to_string());
    if let Some(s) = &sub
        && (s != "status" || !res.status)
    {
        return Err(not_found());
    }
    Ok(Target {
        res,
        namespace,
        name: rest.get(1).map(|s| s.to_string()),
        sub,
    })
}

async fn route(shared: &Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let user = authenticate(shared, &req)?;
    let path = req.uri().path().trim_end_matches('/').to_string();
    let q = query(req.uri().query());
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let method = req.method().clone();

    // Discovery: every authenticated user may read it (system:discovery).
    if method == Method::GET {
        let all = shared
            .store
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .resources();
        let doc = match segs.as_slice() {
            ["version"] => Some(json!({
                "major": "1", "minor": "33", "gitVersion": "v1.33.0-portico-test",
                "platform": "linux/amd64", "goVersion": "none", "compiler": "none",
                "buildDate": "2026-01-01T00:00:00Z", "gitCommit": "", "gitTreeState": "clean",
            })),
            ["api"] => Some(resources::core_versions(&shared.url)),
            ["apis"] => Some(resources::group_list(&all)),
            ["api", "v1"] => resources::resource_list(&all, "", "v1"),
            ["apis", g] => resources::group(&all, g),
            ["apis", g, v] => resources::resource_list(&all, g, v),
            _ => None,
        };
        if let Some(doc) = doc {
            return Ok(json_response(200, &doc));
        }
    }
    let (group, version, rest) = match segs.as_slice() {
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(ApiError::no_route(&path)),
    };
    let target = {
        let store = shared.store.lock().unwrap_or_else(|e| e.into_inner());
        parse_target(&store, group, version, rest)?
    };
    let watching = matches!(q.get("watch").map(String::as_str), Some("1" | "true"));
    let verb = match (&method, &target.name) {
        (&Method::GET, Some(_)) => "get",
        (&Method::GET, None) if watching => "watch",
        (&Method::GET, None) => "list",
        (&Method::POST, None) => "create",
        (&Method::PUT, Some(_)) => "update",
        (&Method::PATCH, Some(_)) => "patch",
        (&Method::DELETE, Some(_)) => "delete",
        (&Method::DELETE, None) => "deletecollection",
        _ => {
            return Err(ApiError::not_allowed(format!(
                "the server does not allow this method on the requested resource ({method} {path})"
            )));
        }
    };
    let attrs = Attributes {
        verb,
        group,
        resource: &target.res.plural,
        subresource: target.sub.as_deref(),
        namespace: target.namespace.as_deref(),
        name: target.name.as_deref(),
    };
    {
        let store = shared.store.lock().unwrap_or_else(|e| e.into_inner());
        let policy = Policy {
            roles: store.all("rbac.authorization.k8s.io", "roles").collect(),
            cluster_roles: store
                .all("rbac.authorization.k8s.io", "clusterroles")
                .collect(),
            role_bindings: store
                .all("rbac.authorization.k8s.io", "rolebindings")
                .collect(),
            cluster_role_bindings: store
                .all("rbac.authorization.k8s.io", "clusterrolebindings")
                .collect(),
        };
        if !policy.allows(&user, &attrs) {
            return Err(ApiError::forbidden(rbac::forbidden_message(&user, &attrs)));
        }
    }
    {
        let key = format!(
            "{} {verb} {}",
            user.name,
            match &target.sub {
                Some(s) => format!("{}/{s}", target.res.plural),
                None => target.res.plural.clone(),
            }
        );
        *shared
            .requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key)
            .or_default() += 1;
    }
    let manager = q
        .get("fieldManager")
        .cloned()
        .or_else(|| {
            req.headers()
                .get(header::USER_AGENT)
                .and_then(|h| h.to_str().ok())
                .map(|ua| ua.split('/').next().unwrap_or(ua).to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("application/json")
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| ApiError::bad_request(format!("reading the body: {e}")))?
        .to_bytes();
    let filter = Filter {
        labels: Selector::parse(
            q.get("labelSelector").map_or("", String::as_str),
            "labelSelector",
        )?,
        fields: Selector::parse(
            q.get("fieldSelector").map_or("", String::as_str),
            "fieldSelector",
        )?,
    };
    let (res, ns, name, sub) = (
        &target.res,
        target.namespace.as_deref(),
        target.name.as_deref().unwrap_or_default(),
        target.sub.as_deref(),
    );
    let parse_body = |b: &Bytes| -> Result<Value, ApiError> {
        serde_json::from_slice(b)
            .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))
    };
    match verb {
        "get" => {
            let v = shared.with_store(|s| s.get(res, ns, name))?;
            Ok(json_response(200, &v))
        }
        "list" => {
            let (items, rv) = shared.with_store(|s| (s.list(res, ns, &filter), s.rv()));
            Ok(json_response(200, &list_page(res, items, rv, &q)?))
        }
        "watch" => Ok(watch(shared.clone(), target, filter, &q)?),
        "create" => {
            let v = parse_body(&body)?;
            let v = shared.with_store(|s| s.create(res, ns, v, &manager))?;
            Ok(json_response(201, &v))
        }
        "update" => {
            let v = parse_body(&body)?;
            let v = shared.with_store(|s| s.update(res, ns, name, sub, v, &manager))?;
            Ok(json_response(200, &v))
        }
        "patch" => {
            let kind = match content_type.as_str() {
                "application/merge-patch+json" => PatchKind::Merge,
                "application/strategic-merge-patch+json"
                    if !res.group.contains('.') || res.group.ends_with(".k8s.io") =>
                {
                    PatchKind::Strategic
                }
                "application/apply-patch+yaml" | "application/apply-patch+json" => {
                    if !q.contains_key("fieldManager") {
                        return Err(ApiError::bad_request(
                            "PATCH requests of type apply must set the fieldManager parameter",
                        ));
                    }
                    PatchKind::Apply {
                        force: q.get("force").is_some_and(|f| f == "true"),
                    }
                }
                other => return Err(ApiError::unsupported_media(other)),
            };
            let v = match serde_json::from_slice::<Value>(&body) {
                Ok(v) => v,
                Err(_) if matches!(kind, PatchKind::Apply { .. }) => {
                    let text = String::from_utf8_lossy(&body);
                    serde_saphyr::from_str::<Value>(&text).map_err(|e| {
                        ApiError::bad_request(format!("the body is not valid YAML: {e}"))
                    })?
                }
                Err(e) => {
                    return Err(ApiError::bad_request(format!(
                        "the body is not valid JSON: {e}"
                    )));
                }
            };
            let (v, created) =
                shared.with_store(|s| s.patch(res, ns, name, sub, &kind, &v, &manager))?;
            Ok(json_response(if created { 201 } else { 200 }, &v))
        }
        "delete" => {
            let v = shared.with_store(|s| s.delete(res, ns, name))?;
            Ok(json_response(200, &v))
        }
        "deletecollection" => {
            let items = shared.with_store(|s| {
                let names: Vec<(Option<String>, String)> = s
                    .list(res, ns, &filter)
                    .iter()
                    .map(|o| {
                        (
                            o["metadata"]["namespace"].as_str().map(str::to_string),
                            o["metadata"]["name"]
                                .as_str()
                                .unwrap_or_default()
                                .to_string(),
                        )
                    })
                    .collect();
                names
                    .into_iter()
                    .filter_map(|(n, name)| s.delete(res, n.as_deref(), &name).ok())
                    .collect::<Vec<_>>()
            });
            let rv = shared.with_store(|s| s.rv());
            Ok(json_response(200, &list_doc(res, items, rv, None)))
        }
        _ => Err(ApiError::no_route(&path)),
    }
}

fn list_doc(res: &Resource, items: Vec<Value>, rv: u64, cont: Option<String>) -> Value {
    let mut meta = json!({"resourceVersion": rv.to_string()});
    if let Some(c) = cont {
        meta["continue"] = c.into();
    }
    json!({"kind": format!("{}List", res.kind), "apiVersion": res.api_version(), "metadata": meta, "items": items})
}

/// One page of a list (`limit`, `continue`); pages after the first come from the current state.
fn list_page(
    res: &Resource,
    items: Vec<Value>,
    rv: u64,
    q: &HashMap<String, String>,
) -> Result<Value, ApiError> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let (list_rv, offset) = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(c) => {
            let raw = b64
                .decode(c)
                .map_err(|_| ApiError::bad_request("invalid continue token"))?;
            let raw = String::from_utf8_lossy(&raw).into_owned();
            let (a, b) = raw
                .split_once(':')
                .ok_or_else(|| ApiError::bad_request("invalid continue token"))?;
            (
                a.parse()
                    .map_err(|_| ApiError::bad_request("invalid continue token"))?,
                b.parse::<usize>()
                    .map_err(|_| ApiError::bad_request("invalid continue token"))?,
            )
        }
        None => (rv, 0),
    };
    let limit = q
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|l| *l > 0);
    let total = items.len();
    let page: Vec<Value> = match limit {
        Some(l) => items.into_iter().skip(offset).take(l).collect(),
        None => items.into_iter().skip(offset).collect(),
    };
    let end = offset + page.len();
    let cont = (limit.is_some() && end < total).then(|| b64.encode(format!("{list_rv}:{end}")));
    Ok(list_doc(res, page, list_rv, cont))
}

fn event_line(ty: &str, object: &Value) -> Bytes {
    let mut s = json!({"type": ty, "object": object}).to_string();
    s.push('\n');
    Bytes::from(s)
}

fn watch(
    shared: Arc<Shared>,
    target: Target,
    filter: Filter,
    q: &HashMap<String, String>,
) -> Result<Response<Body>, ApiError> {
    let start: Option<u64> = match q.get("resourceVersion").map(String::as_str) {
        None | Some("") | Some("0") => None,
        Some(v) => Some(
            v.parse()
                .map_err(|_| ApiError::bad_request(format!("invalid resourceVersion {v:?}")))?,
        ),
    };
    let bookmarks = matches!(
        q.get("allowWatchBookmarks").map(String::as_str),
        Some("1" | "true")
    );
    let initial_end = matches!(q.get("sendInitialEvents").map(String::as_str), Some("true"));
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map_or(Duration::from_secs(1800), Duration::from_secs);
    let (tx, mut rx) = mpsc::channel::<Bytes>(256);
    tokio::spawn(watch_task(
        shared,
        target,
        filter,
        start,
        bookmarks,
        initial_end,
        timeout,
        tx,
    ));
    let stream = futures::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|o| o.map(|b| Ok::<_, Infallible>(Frame::data(b))))
    });
    Response::builder()
        .status(200)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::TRANSFER_ENCODING, "chunked")
        .body(StreamBody::new(stream).boxed())
        .map_err(|e| ApiError::bad_request(e.to_string()))
}

#[allow(clippy::too_many_arguments)]
async fn watch_task(
    shared: Arc<Shared>,
    t: Target,
    filter: Filter,
    start: Option<u64>,
    bookmarks: bool,
    initial_end: bool,
    timeout: Duration,
    tx: mpsc::Sender<Bytes>,
) {
    let mut changed = shared.changed.subscribe();
    let deadline = tokio::time::Instant::now() + timeout;
    let bookmark = |rv: u64, initial: bool| {
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if initial {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        event_line(
            "BOOKMARK",
            &json!({"kind": t.res.kind, "apiVersion": t.res.api_version(), "metadata": meta}),
        )
    };
    let mut last = match start {
        Some(rv) => rv,
        None => {
            // No resourceVersion: the current objects first, as ADDED events.
            let (items, rv) = {
                let s = shared.store.lock().unwrap_or_else(|e| e.into_inner());
                (s.list(&t.res, t.namespace.as_deref(), &filter), s.rv())
            };
            for o in items {
                if tx.send(event_line("ADDED", &o)).await.is_err() {
                    return;
                }
            }
            if initial_end && bookmarks && tx.send(bookmark(rv, true)).await.is_err() {
                return;
            }
            rv
        }
    };
    let mut last_sent = tokio::time::Instant::now();
    loop {
        let batch: Result<(Vec<Bytes>, u64), ApiError> = {
            let s = shared.store.lock().unwrap_or_else(|e| e.into_inner());
            s.changes_after(last).map(|changes| {
                let mut out = Vec::new();
                for c in changes {
                    if c.key.group != t.res.group
                        || c.key.plural != t.res.plural
                        || t.namespace.as_deref().is_some_and(|n| n != c.key.namespace)
                        || t.name.is_some()
                    {
                        continue;
                    }
                    let now = filter.matches(&c.object);
                    let before = c.prev.as_ref().map(|p| filter.matches(p));
                    let ty = match (c.change, before, now) {
                        (Change::Added, _, true) => "ADDED",
                        (Change::Deleted, _, true) => "DELETED",
                        (Change::Modified, Some(true), true) => "MODIFIED",
                        (Change::Modified, Some(false) | None, true) => "ADDED",
                        (Change::Modified, Some(true), false) => "DELETED",
                        _ => continue,
                    };
                    out.push(event_line(ty, &c.object));
                }
                (out, s.rv())
            })
        };
        match batch {
            Err(e) => {
                shared
                    .expired
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let _ = tx.send(event_line("ERROR", &e.to_status())).await;
                return;
            }
            Ok((lines, rv)) => {
                last = rv;
                for l in lines {
                    if tx.send(l).await.is_err() {
                        return;
                    }
                    last_sent = tokio::time::Instant::now();
                }
            }
        }
        let next_bookmark = last_sent + shared.bookmark_interval;
        if bookmarks && tokio::time::Instant::now() >= next_bookmark {
            if tx.send(bookmark(last, false)).await.is_err() {
                return;
            }
            last_sent = tokio::time::Instant::now();
        }
        let wake = if bookmarks {
            (last_sent + shared.bookmark_interval).min(deadline)
        } else {
            deadline
        };
        tokio::select! {
            r = changed.changed() => if r.is_err() { return },
            () = tokio::time::sleep_until(wake) => {}
            () = tx.closed() => return,
        }
        if tokio::time::Instant::now() >= deadline {
            return;
        }
    }
}
