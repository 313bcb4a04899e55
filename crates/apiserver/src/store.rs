//! The object store: JSON objects keyed by resource, namespace and name, one global
//! resourceVersion, a bounded history of changes for watches, and the write rules
//! (preconditions, status subresource, generation, field managers, owner garbage collection).

use std::collections::{BTreeMap, VecDeque};

use serde_json::{Map, Value, json};

use crate::merge::{self, Managed};
use crate::resources::{self, Resource};
use crate::select::Filter;
use crate::status::ApiError;

/// Where an object lives.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    /// API group.
    pub group: String,
    /// Resource plural.
    pub plural: String,
    /// Namespace (`""` for cluster-scoped objects).
    pub namespace: String,
    /// Name.
    pub name: String,
}

/// `ADDED`, `MODIFIED` or `DELETED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Created.
    Added,
    /// Changed.
    Modified,
    /// Deleted (the object as it was last, with the deletion's resourceVersion).
    Deleted,
}

impl Change {
    /// The watch event type.
    pub fn word(self) -> &'static str {
        match self {
            Self::Added => "ADDED",
            Self::Modified => "MODIFIED",
            Self::Deleted => "DELETED",
        }
    }
}

/// One change, as watches see it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Its resourceVersion.
    pub rv: u64,
    /// What happened.
    pub change: Change,
    /// To which object.
    pub key: Key,
    /// The object after the change (before it, for deletions).
    pub object: Value,
    /// The object before a modification (watches with selectors turn changes in and out of
    /// the selection into ADDED and DELETED).
    pub prev: Option<Value>,
}

/// How a PATCH body is to be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatchKind {
    /// `application/merge-patch+json`.
    Merge,
    /// `application/strategic-merge-patch+json` (built-in types only).
    Strategic,
    /// `application/apply-patch+yaml`, with `force`.
    Apply {
        /// `force=true`.
        force: bool,
    },
}

/// The in-memory state of the API server.
#[derive(Debug)]
pub struct Store {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<Recorded>,
    history_limit: usize,
    /// Changes up to this resourceVersion are no longer in `history`.
    compacted: u64,
    builtins: Vec<Resource>,
    crds: BTreeMap<String, Vec<Resource>>,
    uid_seed: u32,
    next_uid: u64,
    next_cluster_ip: u32,
    writes: u64,
}

/// Seconds since the epoch as RFC 3339 (UTC).
pub fn rfc3339_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

fn strip(v: &Value, keep_status: bool) -> Value {
    let mut v = v.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("metadata");
        if !keep_status {
            m.remove("status");
        }
    }
    v
}

/// The object without what changes on every write (resourceVersion, managers' timestamps).
fn without_managed(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v["metadata"].as_object_mut() {
        m.remove("resourceVersion");
        if let Some(Value::Array(entries)) = m.get_mut("managedFields") {
            for e in entries {
                if let Some(e) = e.as_object_mut() {
                    e.remove("time");
                }
            }
        }
    }
    v
}

impl Store {
    /// An empty store (namespaces `default`, `kube-system`, `kube-public` exist) keeping
    /// `history_limit` changes for watches.
    pub fn new(history_limit: usize, uid_seed: u32) -> Self {
        let mut s = Self {
            rv: 1,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            compacted: 1,
            builtins: resources::builtins(),
            crds: BTreeMap::new(),
            uid_seed,
            next_uid: 0,
            next_cluster_ip: 10,
            writes: 0,
        };
        let ns = s.resource("", "v1", "namespaces").expect("built in");
        for n in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            let _ = s.create(
                &ns,
                None,
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n}}),
                "kube-apiserver",
            );
        }
        // Every cluster has the API server's own Service.
        let svc = s.resource("", "v1", "services").expect("built in");
        let _ = s.create(
            &svc,
            Some("default"),
            json!({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": "kubernetes", "labels": {"component": "apiserver", "provider": "kubernetes"}},
                   "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1"],
                            "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}]}}),
            "kube-apiserver",
        );
        s
    }

    /// Every served resource type.
    pub fn resources(&self) -> Vec<Resource> {
        let mut all = self.builtins.clone();
        all.extend(self.crds.values().flatten().cloned());
        all
    }

    /// The resource type at `group`/`version`/`plural`.
    pub fn resource(&self, group: &str, version: &str, plural: &str) -> Option<Resource> {
        self.builtins
            .iter()
            .chain(self.crds.values().flatten())
            .find(|r| r.group == group && r.version == version && r.plural == plural)
            .cloned()
    }

    /// The resource type of objects with `api_version` and `kind`.
    pub fn resource_of_kind(&self, api_version: &str, kind: &str) -> Option<Resource> {
        self.builtins
            .iter()
            .chain(self.crds.values().flatten())
            .find(|r| r.api_version() == api_version && r.kind == kind)
            .cloned()
    }

    /// The current resourceVersion.
    pub fn rv(&self) -> u64 {
        self.rv
    }

    /// Writes that changed something, since the start.
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// Forgets the watch history: every watch from an earlier resourceVersion gets 410 Gone.
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.rv;
    }

    /// The changes after `rv`, or 410 when some of them are no longer kept.
    pub fn changes_after(&self, rv: u64) -> Result<impl Iterator<Item = &Recorded>, ApiError> {
        if rv < self.compacted {
            return Err(ApiError::expired(rv, self.compacted));
        }
        Ok(self.history.iter().filter(move |e| e.rv > rv))
    }

    fn key(res: &Resource, ns: Option<&str>, name: &str) -> Key {
        Key {
            group: res.group.clone(),
            plural: res.plural.clone(),
            namespace: if res.namespaced {
                ns.unwrap_or_default().to_string()
            } else {
                String::new()
            },
            name: name.to_string(),
        }
    }

    /// One object.
    pub fn get(&self, res: &Resource, ns: Option<&str>, name: &str) -> Result<Value, ApiError> {
        self.objects
            .get(&Self::key(res, ns, name))
            .cloned()
            .ok_or_else(|| ApiError::not_found(res, name))
    }

    /// Objects of a type (in `ns`, or everywhere) passing `filter`, in key order.
    pub fn list(&self, res: &Resource, ns: Option<&str>, filter: &Filter) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|(k, _)| k.group == res.group && k.plural == res.plural)
            .filter(|(k, _)| ns.is_none_or(|n| k.namespace == n))
            .filter(|(_, v)| filter.matches(v))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// All objects of a type, with their keys (for RBAC and hooks).
    pub fn all<'a>(&'a self, group: &'a str, plural: &'a str) -> impl Iterator<Item = &'a Value> {
        self.objects
            .iter()
            .filter(move |(k, _)| k.group == group && k.plural == plural)
            .map(|(_, v)| v)
    }

    fn record(&mut self, change: Change, key: Key, object: Value, prev: Option<Value>) {
        self.history.push_back(Recorded {
            rv: self.rv,
            change,
            key,
            object,
            prev,
        });
        while self.history.len() > self.history_limit {
            if let Some(e) = self.history.pop_front() {
                self.compacted = e.rv;
            }
        }
    }

    fn bump(&mut self, obj: &mut Value) {
        self.rv += 1;
        self.writes += 1;
        obj["metadata"]["resourceVersion"] = Value::String(self.rv.to_string());
    }

    fn namespace_exists(&self, ns: &str) -> bool {
        self.objects.contains_key(&Key {
            group: String::new(),
            plural: "namespaces".into(),
            namespace: String::new(),
            name: ns.into(),
        })
    }

    fn check_target(
        &self,
        res: &Resource,
        ns: Option<&str>,
        obj: &Value,
    ) -> Result<(String, Option<String>), ApiError> {
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if !obj.is_object() {
            return Err(ApiError::bad_request("the body is not a JSON object"));
        }
        if obj["kind"].as_str().is_some_and(|k| k != res.kind) {
            return Err(ApiError::bad_request(format!(
                "the kind {:?} of the body does not match the resource {}",
                obj["kind"], res.plural
            )));
        }
        if !res.namespaced {
            return Ok((name, None));
        }
        let ns = ns
            .map(str::to_string)
            .or_else(|| obj["metadata"]["namespace"].as_str().map(str::to_string))
            .unwrap_or_else(|| "default".into());
        if obj["metadata"]["namespace"]
            .as_str()
            .is_some_and(|n| n != ns)
        {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        Ok((name, Some(ns)))
    }

    /// Creates an object (201); 409 AlreadyExists when it exists.
    pub fn create(
        &mut self,
        res: &Resource,
        ns: Option<&str>,
        mut obj: Value,
        manager: &str,
    ) -> Result<Value, ApiError> {
        let (mut name, ns) = self.check_target(res, ns, &obj)?;
        if name.is_empty() {
            match obj["metadata"]["generateName"].as_str() {
                Some(prefix) => name = format!("{prefix}{:05x}", self.next_uid % 0xfffff),
                None => {
                    return Err(ApiError::invalid(
                        res,
                        "",
                        "metadata.name: Required value: name or generateName is required",
                    ));
                }
            }
        }
        if let Some(ns) = &ns
            && !self.namespace_exists(ns)
        {
            let nsr = self.resource("", "v1", "namespaces").expect("built in");
            return Err(ApiError::not_found(&nsr, ns));
        }
        let key = Self::key(res, ns.as_deref(), &name);
        if self.objects.contains_key(&key) {
            return Err(ApiError::exists(res, &name));
        }
        self.next_uid += 1;
        obj["apiVersion"] = Value::String(res.api_version());
        obj["kind"] = Value::String(res.kind.clone());
        let meta = obj["metadata"]
            .as_object_mut()
            .map(std::mem::take)
            .unwrap_or_default();
        let mut m: Map<String, Value> = meta;
        m.insert("name".into(), name.clone().into());
        if let Some(ns) = &ns {
            m.insert("namespace".into(), ns.clone().into());
        }
        m.insert(
            "uid".into(),
            format!(
                "{:08x}-0000-4000-8000-{:012x}",
                self.uid_seed, self.next_uid
            )
            .into(),
        );
        m.insert("creationTimestamp".into(), rfc3339_now().into());
        m.insert("generation".into(), 1.into());
        for k in [
            "resourceVersion",
            "managedFields",
            "deletionTimestamp",
            "selfLink",
        ] {
            m.remove(k);
        }
        obj["metadata"] = Value::Object(m);
        if res.status
            && (res.group.contains('.') && !res.group.ends_with("k8s.io") || res.kind == "Service")
        {
            // Custom resources and Services start without status.
            if let Some(o) = obj.as_object_mut() {
                o.remove("status");
            }
        }
        // The creator owns what it set; defaults are owned by nobody.
        let mut entries = Vec::new();
        merge::update(
            &json!({}),
            &obj,
            &self.manager(res, manager, None),
            &mut entries,
            res,
        );
        self.defaults(res, &mut obj, None);
        merge::write_managed(&mut obj, &entries);
        self.bump(&mut obj);
        self.after_write(res, &obj, false)?;
        self.objects.insert(key.clone(), obj.clone());
        self.record(Change::Added, key, obj.clone(), None);
        Ok(obj)
    }

    fn manager(&self, res: &Resource, name: &str, sub: Option<&str>) -> Managed {
        Managed {
            manager: name.into(),
            operation: "Update".into(),
            subresource: sub.map(str::to_string),
            api_version: res.api_version(),
            time: rfc3339_now(),
            fields: Default::default(),
        }
    }

    /// Replaces an object (PUT); 409 when `metadata.resourceVersion` is stale.
    pub fn update(
        &mut self,
        res: &Resource,
        ns: Option<&str>,
        name: &str,
        sub: Option<&str>,
        obj: Value,
        manager: &str,
    ) -> Result<Value, ApiError> {
        let (body_name, ns) = self.check_target(res, ns, &obj)?;
        if body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let old = self.get(res, ns.as_deref(), name)?;
        let me = self.manager(res, manager, sub);
        self.write(res, ns.as_deref(), name, sub, old, obj, Some(me))
    }

    /// Patches an object; server-side apply creates it when missing.
    #[allow(clippy::too_many_arguments)]
    pub fn patch(
        &mut self,
        res: &Resource,
        ns: Option<&str>,
        name: &str,
        sub: Option<&str>,
        kind: &PatchKind,
        body: &Value,
        manager: &str,
    ) -> Result<(Value, bool), ApiError> {
        let ns = if res.namespaced {
            Some(ns.unwrap_or("default"))
        } else {
            None
        };
        let old = match self.get(res, ns, name) {
            Ok(o) => Some(o),
            Err(e) if matches!(kind, PatchKind::Apply { .. }) && sub.is_none() => {
                let _ = e;
                None
            }
            Err(e) => return Err(e),
        };
        match kind {
            PatchKind::Merge | PatchKind::Strategic => {
                let old = old.expect("not found handled above");
                let mut new = old.clone();
                if *kind == PatchKind::Merge {
                    merge::merge_patch(&mut new, body);
                } else {
                    merge::strategic(&mut new, body, res, &[]);
                }
                let me = self.manager(res, manager, sub);
                Ok((self.write(res, ns, name, sub, old, new, Some(me))?, false))
            }
            PatchKind::Apply { force } => {
                if body["metadata"]["name"].as_str().is_some_and(|n| n != name) {
                    return Err(ApiError::bad_request(format!(
                        "the name of the object ({}) does not match the name on the URL ({name})",
                        body["metadata"]["name"]
                    )));
                }
                if body["apiVersion"].as_str().is_none() || body["kind"].as_str().is_none() {
                    return Err(ApiError::bad_request(
                        "apiVersion and kind must be set in an applied configuration",
                    ));
                }
                let mut applied = body.clone();
                if res.status
                    && let Some(o) = applied.as_object_mut()
                {
                    if sub == Some("status") {
                        let status = o.remove("status");
                        let meta = o.remove("metadata");
                        o.clear();
                        if let Some(s) = status {
                            o.insert("status".into(), s);
                        }
                        if let Some(m) = meta {
                            o.insert("metadata".into(), m);
                        }
                    } else {
                        o.remove("status");
                    }
                }
                let me = Managed {
                    operation: "Apply".into(),
                    ..self.manager(res, manager, sub)
                };
                let created = old.is_none();
                let base = match &old {
                    Some(o) => o.clone(),
                    None => {
                        let mut skeleton = json!({"apiVersion": res.api_version(), "kind": res.kind, "metadata": {"name": name}});
                        if let Some(ns) = ns {
                            skeleton["metadata"]["namespace"] = ns.into();
                        }
                        skeleton = self.create_skeleton(res, ns, skeleton)?;
                        skeleton
                    }
                };
                if let Some(rv) = applied["metadata"]["resourceVersion"].as_str()
                    && Some(rv) != base["metadata"]["resourceVersion"].as_str()
                {
                    return Err(ApiError::conflict(res, name));
                }
                let mut live = base.clone();
                let mut entries = merge::read_managed(&live);
                merge::apply(&mut live, &applied, &me, *force, &mut entries, res).map_err(|c| {
                    let fields: Vec<(String, String)> =
                        c.into_iter().map(|c| (c.field, c.manager)).collect();
                    ApiError::apply_conflict(res, name, &fields)
                })?;
                merge::write_managed(&mut live, &entries);
                let out = self.write(res, ns, name, sub, base, live, None)?;
                Ok((out, created))
            }
        }
    }

    /// The object server-side apply starts from when it creates one: created empty, then written.
    fn create_skeleton(
        &mut self,
        res: &Resource,
        ns: Option<&str>,
        skeleton: Value,
    ) -> Result<Value, ApiError> {
        // Created for real (ADDED), then the apply is an update of it; a real server sends one
        // ADDED event with everything. To keep one event, build the object without storing it.
        let (name, ns) = self.check_target(res, ns, &skeleton)?;
        if let Some(ns) = &ns
            && !self.namespace_exists(ns)
        {
            let nsr = self.resource("", "v1", "namespaces").expect("built in");
            return Err(ApiError::not_found(&nsr, ns));
        }
        self.next_uid += 1;
        let mut obj = skeleton;
        obj["metadata"]["name"] = name.into();
        obj["metadata"]["uid"] = format!(
            "{:08x}-0000-4000-8000-{:012x}",
            self.uid_seed, self.next_uid
        )
        .into();
        obj["metadata"]["creationTimestamp"] = rfc3339_now().into();
        obj["metadata"]["generation"] = 1.into();
        Ok(obj)
    }

    /// The common write path: precondition, status subresource, generation, managers, commit.
    #[allow(clippy::too_many_arguments)]
    fn write(
        &mut self,
        res: &Resource,
        ns: Option<&str>,
        name: &str,
        sub: Option<&str>,
        old: Value,
        mut new: Value,
        update_by: Option<Managed>,
    ) -> Result<Value, ApiError> {
        let key = Self::key(res, ns, name);
        let exists = self.objects.contains_key(&key);
        let old_rv = old["metadata"]["resourceVersion"]
            .as_str()
            .map(str::to_string);
        if exists
            && let Some(rv) = new["metadata"]["resourceVersion"].as_str()
            && Some(rv) != old_rv.as_deref()
        {
            return Err(ApiError::conflict(res, name));
        }
        if !new.is_object() {
            return Err(ApiError::bad_request("the body is not a JSON object"));
        }
        // Server-owned metadata stays.
        for k in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "generation",
            "deletionTimestamp",
        ] {
            match old["metadata"].get(k) {
                Some(v) => new["metadata"][k] = v.clone(),
                None => {
                    if let Some(m) = new["metadata"].as_object_mut() {
                        m.remove(k);
                    }
                }
            }
        }
        new["apiVersion"] = Value::String(res.api_version());
        new["kind"] = Value::String(res.kind.clone());
        if res.status {
            if sub == Some("status") {
                // A status write changes only status (and the managers).
                let mut keep = old.clone();
                match new.get("status") {
                    Some(s) => keep["status"] = s.clone(),
                    None => {
                        if let Some(o) = keep.as_object_mut() {
                            o.remove("status");
                        }
                    }
                }
                keep["metadata"]["managedFields"] = new["metadata"]["managedFields"].clone();
                new = keep;
            } else {
                match old.get("status") {
                    Some(s) => new["status"] = s.clone(),
                    None => {
                        if let Some(o) = new.as_object_mut() {
                            o.remove("status");
                        }
                    }
                }
            }
        }
        self.defaults(res, &mut new, Some(&old));
        if strip(&new, !res.status) != strip(&old, !res.status) {
            let g = old["metadata"]["generation"].as_i64().unwrap_or(1);
            new["metadata"]["generation"] = (g + 1).into();
        }
        let mut entries = merge::read_managed(&new);
        if let Some(me) = &update_by {
            entries = merge::read_managed(&old);
            merge::update(&old, &new, me, &mut entries, res);
        }
        merge::prune(&new, &mut entries, res);
        merge::write_managed(&mut new, &entries);
        if exists && without_managed(&new) == without_managed(&old) {
            // A no-op write changes nothing, not even the resourceVersion.
            return Ok(old);
        }
        // The last finalizer gone from an object being deleted: it goes.
        if new["metadata"].get("deletionTimestamp").is_some()
            && new["metadata"]["finalizers"]
                .as_array()
                .is_none_or(Vec::is_empty)
        {
            self.remove(&key)?;
            return Ok(new);
        }
        self.bump(&mut new);
        self.after_write(res, &new, false)?;
        self.objects.insert(key.clone(), new.clone());
        let change = if exists {
            Change::Modified
        } else {
            Change::Added
        };
        self.record(change, key, new.clone(), exists.then_some(old));
        Ok(new)
    }

    fn defaults(&mut self, res: &Resource, obj: &mut Value, old: Option<&Value>) {
        crate::defaults::apply(res, obj, old, &mut self.next_cluster_ip);
    }

    /// Bookkeeping after a write: CRDs register (or re-register) their resource types.
    fn after_write(&mut self, res: &Resource, obj: &Value, deleted: bool) -> Result<(), ApiError> {
        if res.group == "apiextensions.k8s.io" && res.plural == "customresourcedefinitions" {
            let name = obj["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if deleted {
                self.crds.remove(&name);
            } else {
                let rs = resources::from_crd(obj);
                if rs.is_empty() {
                    return Err(ApiError::invalid(
                        res,
                        &name,
                        "spec.group, spec.names.plural, spec.names.kind and a served version are required",
                    ));
                }
                self.crds.insert(name, rs);
            }
        }
        Ok(())
    }

    /// Deletes an object (200 with the object); objects it owns go with it (background
    /// propagation done at once). With finalizers, it is only marked for deletion.
    pub fn delete(
        &mut self,
        res: &Resource,
        ns: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiError> {
        let key = Self::key(res, ns, name);
        let Some(old) = self.objects.get(&key).cloned() else {
            return Err(ApiError::not_found(res, name));
        };
        if old["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty())
        {
            if old["metadata"].get("deletionTimestamp").is_some() {
                return Ok(old);
            }
            let mut new = old.clone();
            new["metadata"]["deletionTimestamp"] = rfc3339_now().into();
            self.bump(&mut new);
            self.objects.insert(key.clone(), new.clone());
            self.record(Change::Modified, key, new.clone(), Some(old));
            return Ok(new);
        }
        self.remove(&key)
    }

    fn remove(&mut self, key: &Key) -> Result<Value, ApiError> {
        let Some(mut old) = self.objects.remove(key) else {
            return Err(ApiError::no_route(&key.name));
        };
        self.bump(&mut old);
        let res = self
            .resources()
            .into_iter()
            .find(|r| r.group == key.group && r.plural == key.plural);
        if let Some(res) = &res {
            self.after_write(res, &old, true)?;
        }
        self.record(Change::Deleted, key.clone(), old.clone(), None);
        // Owned objects, and everything in a deleted namespace, follow.
        let uid = old["metadata"]["uid"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let is_ns = key.group.is_empty() && key.plural == "namespaces";
        let dependents: Vec<Key> = self
            .objects
            .iter()
            .filter(|(k, v)| {
                (is_ns && k.namespace == key.name)
                    || v["metadata"]["ownerReferences"]
                        .as_array()
                        .is_some_and(|o| o.iter().any(|r| r["uid"].as_str() == Some(uid.as_str())))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for d in dependents {
            if self.objects.contains_key(&d) {
                let _ = self.remove(&d);
            }
        }
        Ok(old)
    }
}
