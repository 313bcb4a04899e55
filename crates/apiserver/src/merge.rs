//! Patches and field ownership: JSON merge patch (RFC 7386), strategic merge patch for the
//! built-in types, and server-side apply with per-manager field sets kept in
//! `metadata.managedFields` (FieldsV1), as kube-apiserver's structured-merge-diff does for
//! maps, list-maps (`x-kubernetes-list-type: map`) and atomic lists.

use std::collections::BTreeSet;

use serde_json::{Map, Value};

use crate::resources::Resource;

/// One step of a field path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    /// A field of a map (`f:<name>`).
    F(String),
    /// An item of a list-map, by its key fields as JSON (`k:{"type":"Ready"}`).
    K(String),
    /// The list item itself (`.`).
    Dot,
}

/// A path to a field.
pub type Path = Vec<Step>;
/// The fields one manager owns.
pub type FieldSet = BTreeSet<Path>;

/// RFC 7386 JSON merge patch.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().expect("made an object above");
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

fn spath(path: &[String], k: &str) -> Vec<String> {
    let mut p = path.to_vec();
    p.push(k.to_string());
    p
}

fn item_matches(item: &Value, probe: &Value, keys: &[String]) -> bool {
    keys.iter().all(|k| item.get(k) == probe.get(k))
}

/// Strategic merge patch as kube-apiserver applies it to built-in types: like a merge patch,
/// except that lists with a merge key (`conditions` by `type`, `ports` by `port`+`protocol`, …)
/// are merged item by item, `$patch: delete` removes an item, and other `$` directives are dropped.
pub fn strategic(target: &mut Value, patch: &Value, res: &Resource, path: &[String]) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let t = target.as_object_mut().expect("made an object above");
    for (k, v) in p {
        if k.starts_with('$') {
            continue;
        }
        let sp = spath(path, k);
        if v.is_null() {
            t.remove(k);
            continue;
        }
        match (v, res.list_map_keys(&sp)) {
            (Value::Array(items), Some(keys)) => {
                let cur = t.entry(k.clone()).or_insert(Value::Array(Vec::new()));
                if !cur.is_array() {
                    *cur = Value::Array(Vec::new());
                }
                let list = cur.as_array_mut().expect("made an array above");
                let item_path = spath(&sp, "*");
                for item in items {
                    if item.get("$patch").and_then(Value::as_str) == Some("delete") {
                        list.retain(|x| !item_matches(x, item, keys));
                    } else if let Some(x) = list.iter_mut().find(|x| item_matches(x, item, keys)) {
                        strategic(x, item, res, &item_path);
                    } else {
                        let mut fresh = Value::Object(Map::new());
                        strategic(&mut fresh, item, res, &item_path);
                        list.push(fresh);
                    }
                }
            }
            (Value::Object(_), _) => {
                strategic(t.entry(k.clone()).or_insert(Value::Null), v, res, &sp);
            }
            _ => {
                t.insert(k.clone(), v.clone());
            }
        }
    }
}

/// Metadata fields that are owned like any other field; the rest of `metadata` is the server's.
const OWNED_METADATA: &[&str] = &["labels", "annotations", "ownerReferences", "finalizers"];

fn key_of(item: &Value, keys: &[String]) -> String {
    let mut m = Map::new();
    for k in keys {
        m.insert(k.clone(), item.get(k).cloned().unwrap_or(Value::Null));
    }
    Value::Object(m).to_string()
}

/// The fields set in `obj` (its leaves, and the items of list-maps).
pub fn fields(obj: &Value, res: &Resource) -> FieldSet {
    let mut out = FieldSet::new();
    let Some(m) = obj.as_object() else {
        return out;
    };
    for (k, v) in m {
        match k.as_str() {
            "apiVersion" | "kind" => {}
            "metadata" => {
                for f in OWNED_METADATA {
                    if let Some(x) = v.get(*f) {
                        let path = vec![Step::F("metadata".into()), Step::F((*f).into())];
                        let sp = vec!["metadata".to_string(), (*f).to_string()];
                        walk(x, res, &mut path.clone(), &sp, &mut out);
                    }
                }
            }
            _ => walk(
                v,
                res,
                &mut vec![Step::F(k.clone())],
                std::slice::from_ref(k),
                &mut out,
            ),
        }
    }
    out
}

fn walk(v: &Value, res: &Resource, path: &mut Path, sp: &[String], out: &mut FieldSet) {
    match v {
        Value::Object(m) if !m.is_empty() => {
            for (k, x) in m {
                path.push(Step::F(k.clone()));
                walk(x, res, path, &spath(sp, k), out);
                path.pop();
            }
        }
        Value::Array(items) if res.list_map_keys(sp).is_some() => {
            let keys = res.list_map_keys(sp).unwrap_or_default();
            let isp = spath(sp, "*");
            for item in items {
                path.push(Step::K(key_of(item, keys)));
                path.push(Step::Dot);
                out.insert(path.clone());
                path.pop();
                if let Some(m) = item.as_object() {
                    for (k, x) in m {
                        path.push(Step::F(k.clone()));
                        walk(x, res, path, &spath(&isp, k), out);
                        path.pop();
                    }
                }
                path.pop();
            }
        }
        _ => {
            out.insert(path.clone());
        }
    }
}

fn find_item(list: &[Value], key: &str) -> Option<usize> {
    let probe: Value = serde_json::from_str(key).ok()?;
    let keys: Vec<String> = probe.as_object()?.keys().cloned().collect();
    list.iter().position(|x| item_matches(x, &probe, &keys))
}

/// The value at `path` (a `.` step yields the list item itself).
pub fn get<'a>(obj: &'a Value, path: &[Step]) -> Option<&'a Value> {
    let mut cur = obj;
    for s in path {
        cur = match s {
            Step::F(f) => cur.get(f)?,
            Step::K(k) => {
                let list = cur.as_array()?;
                &list[find_item(list, k)?]
            }
            Step::Dot => cur,
        };
    }
    Some(cur)
}

/// Removes the field at `path` (a path ending in `.` removes the list item).
pub fn remove(obj: &mut Value, path: &[Step]) {
    let Some((last, parent)) = path.split_last() else {
        return;
    };
    if *last == Step::Dot {
        if let Some((Step::K(k), pp)) = parent.split_last()
            && let Some(Value::Array(list)) = get_mut(obj, pp)
            && let Some(i) = find_item(list, k)
        {
            list.remove(i);
        }
        return;
    }
    if let (Step::F(f), Some(Value::Object(m))) = (last, get_mut(obj, parent)) {
        m.remove(f);
    }
}

fn get_mut<'a>(obj: &'a mut Value, path: &[Step]) -> Option<&'a mut Value> {
    let mut cur = obj;
    for s in path {
        cur = match s {
            Step::F(f) => cur.get_mut(f)?,
            Step::K(k) => {
                let list = cur.as_array_mut()?;
                let i = find_item(list, k)?;
                &mut list[i]
            }
            Step::Dot => cur,
        };
    }
    Some(cur)
}

/// Merges an applied configuration into the live object: maps field by field, list-maps item
/// by item, everything else replaced.
pub fn apply_merge(live: &mut Value, applied: &Value, res: &Resource, sp: &[String]) {
    let Value::Object(a) = applied else {
        *live = applied.clone();
        return;
    };
    if !live.is_object() {
        *live = Value::Object(Map::new());
    }
    let l = live.as_object_mut().expect("made an object above");
    for (k, v) in a {
        let p = spath(sp, k);
        match (v, res.list_map_keys(&p)) {
            (Value::Array(items), Some(keys)) => {
                let cur = l.entry(k.clone()).or_insert(Value::Array(Vec::new()));
                if !cur.is_array() {
                    *cur = Value::Array(Vec::new());
                }
                let list = cur.as_array_mut().expect("made an array above");
                let ip = spath(&p, "*");
                for item in items {
                    if let Some(x) = list.iter_mut().find(|x| item_matches(x, item, keys)) {
                        apply_merge(x, item, res, &ip);
                    } else {
                        list.push(item.clone());
                    }
                }
            }
            (Value::Object(m), _) if !m.is_empty() => {
                apply_merge(l.entry(k.clone()).or_insert(Value::Null), v, res, &p);
            }
            _ => {
                l.insert(k.clone(), v.clone());
            }
        }
    }
}

/// One `metadata.managedFields` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Managed {
    /// Field manager.
    pub manager: String,
    /// `Apply` or `Update`.
    pub operation: String,
    /// `status` for writes to the status subresource.
    pub subresource: Option<String>,
    /// apiVersion of the write.
    pub api_version: String,
    /// When (RFC 3339).
    pub time: String,
    /// The fields owned.
    pub fields: FieldSet,
}

impl Managed {
    fn same_slot(&self, o: &Managed) -> bool {
        self.manager == o.manager
            && self.operation == o.operation
            && self.subresource == o.subresource
    }
}

fn step_key(s: &Step) -> String {
    match s {
        Step::F(f) => format!("f:{f}"),
        Step::K(k) => format!("k:{k}"),
        Step::Dot => ".".into(),
    }
}

/// FieldsV1 form of a set.
pub fn to_tree(set: &FieldSet) -> Value {
    let mut root = Value::Object(Map::new());
    for path in set {
        let mut cur = &mut root;
        for s in path {
            cur = cur
                .as_object_mut()
                .expect("tree nodes are objects")
                .entry(step_key(s))
                .or_insert(Value::Object(Map::new()));
        }
    }
    root
}

/// A set from its FieldsV1 form.
pub fn from_tree(tree: &Value) -> FieldSet {
    fn go(v: &Value, path: &mut Path, out: &mut FieldSet) {
        let Some(m) = v.as_object() else { return };
        if m.is_empty() && !path.is_empty() {
            out.insert(path.clone());
            return;
        }
        for (k, x) in m {
            let step = if k == "." {
                Step::Dot
            } else if let Some(f) = k.strip_prefix("f:") {
                Step::F(f.into())
            } else if let Some(f) = k.strip_prefix("k:") {
                Step::K(f.into())
            } else {
                continue;
            };
            path.push(step);
            go(x, path, out);
            path.pop();
        }
    }
    let mut out = FieldSet::new();
    go(tree, &mut Vec::new(), &mut out);
    out
}

/// The entries of `obj`'s `metadata.managedFields`.
pub fn read_managed(obj: &Value) -> Vec<Managed> {
    obj["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| Managed {
            manager: e["manager"].as_str().unwrap_or_default().into(),
            operation: e["operation"].as_str().unwrap_or("Update").into(),
            subresource: e["subresource"].as_str().map(str::to_string),
            api_version: e["apiVersion"].as_str().unwrap_or_default().into(),
            time: e["time"].as_str().unwrap_or_default().into(),
            fields: from_tree(&e["fieldsV1"]),
        })
        .collect()
}

/// Stores `entries` (empty sets dropped) as `obj`'s `metadata.managedFields`.
pub fn write_managed(obj: &mut Value, entries: &[Managed]) {
    let list: Vec<Value> = entries
        .iter()
        .filter(|e| !e.fields.is_empty())
        .map(|e| {
            let mut v = serde_json::json!({
                "manager": e.manager, "operation": e.operation, "apiVersion": e.api_version,
                "time": e.time, "fieldsType": "FieldsV1", "fieldsV1": to_tree(&e.fields),
            });
            if let Some(s) = &e.subresource {
                v["subresource"] = Value::String(s.clone());
            }
            v
        })
        .collect();
    if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        if list.is_empty() {
            m.remove("managedFields");
        } else {
            m.insert("managedFields".into(), Value::Array(list));
        }
    }
}

/// A conflict of server-side apply: the field and the manager owning it.
#[derive(Debug, Clone, PartialEq)]
pub struct Conflict {
    /// The field, in dotted form.
    pub field: String,
    /// Who owns it.
    pub manager: String,
}

fn dotted(path: &[Step]) -> String {
    let mut s = String::new();
    for step in path {
        match step {
            Step::F(f) => {
                s.push('.');
                s.push_str(f);
            }
            Step::K(k) => {
                s.push('[');
                s.push_str(k);
                s.push(']');
            }
            Step::Dot => {}
        }
    }
    s
}

/// Whether `path` names a key field of a list-map item (`…[k:{"node":"a"}].node`).
fn is_key_field(path: &[Step]) -> bool {
    let [.., Step::K(k), Step::F(f)] = path else {
        return false;
    };
    serde_json::from_str::<Value>(k).is_ok_and(|key| key.get(f).is_some())
}

/// Server-side apply of `applied` by `me` onto `live` (in place), updating the managers in
/// `entries`. Without `force`, a field owned by another manager with a different value is a
/// conflict and nothing changes.
pub fn apply(
    live: &mut Value,
    applied: &Value,
    me: &Managed,
    force: bool,
    entries: &mut Vec<Managed>,
    res: &Resource,
) -> Result<(), Vec<Conflict>> {
    let mine = fields(applied, res);
    let mut conflicts = Vec::new();
    for e in entries.iter().filter(|e| e.manager != me.manager) {
        for p in e.fields.intersection(&mine) {
            if p.last() == Some(&Step::Dot) {
                continue;
            }
            if get(live, p) != get(applied, p) {
                conflicts.push(Conflict {
                    field: dotted(p),
                    manager: e.manager.clone(),
                });
            }
        }
    }
    if !conflicts.is_empty() && !force {
        return Err(conflicts);
    }
    for e in entries.iter_mut().filter(|e| e.manager != me.manager) {
        e.fields.retain(|p| {
            p.last() == Some(&Step::Dot) || !mine.contains(p) || get(live, p) == get(applied, p)
        });
    }
    // Fields this manager applied before and no longer applies go, unless someone else owns them.
    let before: FieldSet = entries
        .iter()
        .filter(|e| e.same_slot(me))
        .flat_map(|e| e.fields.iter().cloned())
        .collect();
    let others: FieldSet = entries
        .iter()
        .filter(|e| !e.same_slot(me))
        .flat_map(|e| e.fields.iter().cloned())
        .collect();
    let mut gone: Vec<&Path> = before
        .iter()
        .filter(|p| !mine.contains(*p) && !others.contains(*p))
        .filter(|p| {
            // A list item stays while anyone owns a field inside it.
            p.last() != Some(&Step::Dot) || !others.iter().any(|o| o.starts_with(&p[..p.len() - 1]))
        })
        // The key fields of a list item go with the item (removing them first would leave the
        // item unfindable, its other fields behind).
        .filter(|p| !is_key_field(p))
        .collect();
    // Deepest first, so that items are removed after their fields.
    gone.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for p in gone {
        remove(live, p);
    }
    apply_merge(live, applied, res, &[]);
    entries.retain(|e| !e.same_slot(me));
    entries.push(Managed {
        fields: mine,
        ..me.clone()
    });
    Ok(())
}

/// Ownership after a non-apply write (`Update` operation) from `old` to `new` by `me`: the
/// manager takes every field it changed, and fields that no longer exist are owned by nobody.
pub fn update(old: &Value, new: &Value, me: &Managed, entries: &mut Vec<Managed>, res: &Resource) {
    let now = fields(new, res);
    let changed: FieldSet = now
        .iter()
        .filter(|p| get(old, p) != get(new, p))
        .cloned()
        .collect();
    for e in entries.iter_mut() {
        e.fields.retain(|p| now.contains(p) && !changed.contains(p));
    }
    if changed.is_empty() {
        return;
    }
    if let Some(e) = entries.iter_mut().find(|e| e.same_slot(me)) {
        e.fields.extend(changed);
        e.time.clone_from(&me.time);
    } else {
        entries.push(Managed {
            fields: changed,
            ..me.clone()
        });
    }
}

/// Drops from every manager the fields `obj` no longer has.
pub fn prune(obj: &Value, entries: &mut [Managed], res: &Resource) {
    let now = fields(obj, res);
    for e in entries {
        e.fields.retain(|p| now.contains(p));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn res() -> Resource {
        crate::resources::builtins()
            .into_iter()
            .find(|r| r.plural == "services")
            .unwrap()
    }

    #[test]
    fn field_sets_round_trip_through_fields_v1() {
        let obj = json!({"metadata": {"labels": {"a": "b"}, "name": "x"},
                         "spec": {"ports": [{"port": 80, "protocol": "TCP"}], "selector": {}},
                         "status": {"conditions": [{"type": "Ready", "status": "True"}]}});
        let set = fields(&obj, &res());
        assert!(set.contains(&vec![
            Step::F("metadata".into()),
            Step::F("labels".into()),
            Step::F("a".into())
        ]));
        assert!(!set.iter().any(|p| p.contains(&Step::F("name".into()))));
        assert_eq!(from_tree(&to_tree(&set)), set);
        let tree = to_tree(&set);
        assert!(
            tree["f:spec"]["f:ports"]["k:{\"port\":80,\"protocol\":\"TCP\"}"]
                .get(".")
                .is_some(),
            "{tree}"
        );
    }

    #[test]
    fn applying_an_empty_list_map_removes_the_managers_items_whole() {
        let r = Resource {
            list_maps: vec![
                (vec!["status".into(), "nodes".into()], vec!["node".into()]),
                (
                    vec![
                        "status".into(),
                        "nodes".into(),
                        "*".into(),
                        "addresses".into(),
                    ],
                    vec!["address".into()],
                ),
            ],
            ..res()
        };
        let me = |m: &str| Managed {
            manager: m.into(),
            operation: "Apply".into(),
            subresource: Some("status".into()),
            api_version: "v1".into(),
            time: String::new(),
            fields: FieldSet::new(),
        };
        let entry = |n: &str| {
            json!({"node": n, "owns": ["10.0.0.1"],
                   "addresses": [{"address": "10.0.0.1", "reason": "owner"}]})
        };
        let mut live = json!({});
        let mut entries = Vec::new();
        for n in ["a", "b"] {
            let body = json!({"status": {"nodes": [entry(n)]}});
            apply(&mut live, &body, &me(n), true, &mut entries, &r).unwrap();
        }
        let empty = json!({"status": {"nodes": []}});
        apply(&mut live, &empty, &me("a"), true, &mut entries, &r).unwrap();
        assert_eq!(live, json!({"status": {"nodes": [entry("b")]}}));
    }

    #[test]
    fn merge_patch_removes_nulls_and_replaces_lists() {
        let mut t = json!({"a": {"b": 1, "c": 2}, "l": [1, 2]});
        merge_patch(&mut t, &json!({"a": {"b": null}, "l": [3]}));
        assert_eq!(t, json!({"a": {"c": 2}, "l": [3]}));
    }

    #[test]
    fn an_update_takes_the_fields_it_changed() {
        let r = res();
        let old = json!({"spec": {"type": "ClusterIP"}});
        let new = json!({"spec": {"type": "LoadBalancer"}});
        let applier = Managed {
            manager: "a".into(),
            operation: "Apply".into(),
            subresource: None,
            api_version: "v1".into(),
            time: String::new(),
            fields: fields(&old, &r),
        };
        let mut entries = vec![applier];
        let me = Managed {
            manager: "b".into(),
            operation: "Update".into(),
            fields: FieldSet::new(),
            ..entries[0].clone()
        };
        update(&old, &new, &me, &mut entries, &r);
        assert!(
            entries
                .iter()
                .find(|e| e.manager == "a")
                .unwrap()
                .fields
                .is_empty()
        );
        assert_eq!(
            entries
                .iter()
                .find(|e| e.manager == "b")
                .unwrap()
                .fields
                .len(),
            1
        );
    }
}
