//! The resource types served: a fixed table of built-in types and those of stored CRDs,
//! with what merging needs to know about their lists, and the discovery documents.

use serde_json::{Value, json};

/// One served resource type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resource {
    /// API group (`""` for the core group).
    pub group: String,
    /// The one served version.
    pub version: String,
    /// Plural name (the URL segment).
    pub plural: String,
    /// Singular name.
    pub singular: String,
    /// Kind.
    pub kind: String,
    /// Namespaced or cluster-scoped.
    pub namespaced: bool,
    /// Whether `status` is a subresource (main writes ignore it, status writes ignore the rest).
    pub status: bool,
    /// Short names (discovery).
    pub short_names: Vec<String>,
    /// Lists merged by key in server-side apply and strategic merge: path (fields, `*` for
    /// list items) → key fields. Every other list is atomic.
    pub list_maps: Vec<(Vec<String>, Vec<String>)>,
}

impl Resource {
    /// `apiVersion` of its objects.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The key fields of the list at `path`, when it is a list-map.
    pub fn list_map_keys(&self, path: &[String]) -> Option<&[String]> {
        self.list_maps
            .iter()
            .find(|(p, _)| p.as_slice() == path)
            .map(|(_, k)| k.as_slice())
    }

    fn discovery(&self) -> Vec<Value> {
        let verbs = json!([
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch"
        ]);
        let mut out = vec![json!({
            "name": self.plural, "singularName": self.singular, "namespaced": self.namespaced,
            "kind": self.kind, "verbs": verbs, "shortNames": self.short_names,
        })];
        if self.status {
            out.push(json!({
                "name": format!("{}/status", self.plural), "singularName": "",
                "namespaced": self.namespaced, "kind": self.kind, "verbs": ["get", "patch", "update"],
            }));
        }
        out
    }
}

fn p(s: &str) -> Vec<String> {
    s.split('.').map(str::to_string).collect()
}

fn k(s: &[&str]) -> Vec<String> {
    s.iter().map(|x| x.to_string()).collect()
}

fn builtin(
    group: &str,
    plural: &str,
    kind: &str,
    namespaced: bool,
    status: bool,
    list_maps: Vec<(Vec<String>, Vec<String>)>,
) -> Resource {
    let mut maps = vec![(p("metadata.ownerReferences"), k(&["uid"]))];
    maps.extend(list_maps);
    Resource {
        group: group.into(),
        version: "v1".into(),
        plural: plural.into(),
        singular: kind.to_lowercase(),
        kind: kind.into(),
        namespaced,
        status,
        short_names: Vec::new(),
        list_maps: maps,
    }
}

/// The built-in types this server knows (a subset of Kubernetes 1.33's).
pub fn builtins() -> Vec<Resource> {
    let cond = || (p("status.conditions"), k(&["type"]));
    vec![
        builtin("", "namespaces", "Namespace", false, true, vec![cond()]),
        builtin(
            "",
            "nodes",
            "Node",
            false,
            true,
            vec![cond(), (p("status.addresses"), k(&["type"]))],
        ),
        builtin(
            "",
            "services",
            "Service",
            true,
            true,
            vec![cond(), (p("spec.ports"), k(&["port", "protocol"]))],
        ),
        builtin("", "secrets", "Secret", true, false, vec![]),
        builtin("", "configmaps", "ConfigMap", true, false, vec![]),
        builtin("", "serviceaccounts", "ServiceAccount", true, false, vec![]),
        builtin("", "events", "Event", true, false, vec![]),
        builtin("", "pods", "Pod", true, true, vec![cond()]),
        builtin(
            "discovery.k8s.io",
            "endpointslices",
            "EndpointSlice",
            true,
            false,
            vec![],
        ),
        builtin(
            "coordination.k8s.io",
            "leases",
            "Lease",
            true,
            false,
            vec![],
        ),
        builtin("events.k8s.io", "events", "Event", true, false, vec![]),
        builtin(
            "rbac.authorization.k8s.io",
            "roles",
            "Role",
            true,
            false,
            vec![],
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "clusterroles",
            "ClusterRole",
            false,
            false,
            vec![],
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "rolebindings",
            "RoleBinding",
            true,
            false,
            vec![],
        ),
        builtin(
            "rbac.authorization.k8s.io",
            "clusterrolebindings",
            "ClusterRoleBinding",
            false,
            false,
            vec![],
        ),
        builtin(
            "apiextensions.k8s.io",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            false,
            true,
            vec![cond()],
        ),
    ]
}

/// The resource types a CRD object defines (its served versions), or `None` when it is not one.
pub fn from_crd(crd: &Value) -> Vec<Resource> {
    let spec = &crd["spec"];
    let (Some(group), Some(plural), Some(kind)) = (
        spec["group"].as_str(),
        spec["names"]["plural"].as_str(),
        spec["names"]["kind"].as_str(),
    ) else {
        return Vec::new();
    };
    let singular = spec["names"]["singular"]
        .as_str()
        .map_or_else(|| kind.to_lowercase(), str::to_string);
    let short_names: Vec<String> = spec["names"]["shortNames"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let namespaced = spec["scope"].as_str() != Some("Cluster");
    let mut out = Vec::new();
    for v in spec["versions"].as_array().into_iter().flatten() {
        if v["served"].as_bool() == Some(false) {
            continue;
        }
        let Some(version) = v["name"].as_str() else {
            continue;
        };
        let mut list_maps = vec![(p("metadata.ownerReferences"), k(&["uid"]))];
        schema_list_maps(
            &v["schema"]["openAPIV3Schema"],
            &mut Vec::new(),
            &mut list_maps,
        );
        out.push(Resource {
            group: group.into(),
            version: version.into(),
            plural: plural.into(),
            singular: singular.clone(),
            kind: kind.into(),
            namespaced,
            status: v["subresources"].get("status").is_some(),
            short_names: short_names.clone(),
            list_maps,
        });
    }
    out
}

fn schema_list_maps(
    schema: &Value,
    path: &mut Vec<String>,
    out: &mut Vec<(Vec<String>, Vec<String>)>,
) {
    if schema["x-kubernetes-list-type"].as_str() == Some("map") {
        let keys = schema["x-kubernetes-list-map-keys"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        out.push((path.clone(), keys));
    }
    if let Some(props) = schema["properties"].as_object() {
        for (name, s) in props {
            path.push(name.clone());
            schema_list_maps(s, path, out);
            path.pop();
        }
    }
    if schema.get("items").is_some() {
        path.push("*".into());
        schema_list_maps(&schema["items"], path, out);
        path.pop();
    }
}

/// `/api`.
pub fn core_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions", "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

fn groups_of(all: &[Resource]) -> Vec<(String, String)> {
    let mut gv: Vec<(String, String)> = Vec::new();
    for r in all.iter().filter(|r| !r.group.is_empty()) {
        let e = (r.group.clone(), r.version.clone());
        if !gv.contains(&e) {
            gv.push(e);
        }
    }
    gv
}

fn group_doc(group: &str, versions: &[String]) -> Value {
    let vs: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
        .collect();
    json!({
        "kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": vs,
        "preferredVersion": vs.first().cloned().unwrap_or(Value::Null),
    })
}

/// `/apis`.
pub fn group_list(all: &[Resource]) -> Value {
    let gv = groups_of(all);
    let mut names: Vec<&String> = gv.iter().map(|(g, _)| g).collect();
    names.dedup();
    let groups: Vec<Value> = names
        .iter()
        .map(|g| {
            let versions: Vec<String> = gv
                .iter()
                .filter(|(x, _)| x == *g)
                .map(|(_, v)| v.clone())
                .collect();
            let mut d = group_doc(g, &versions);
            d.as_object_mut().map(|o| {
                o.remove("kind");
                o.remove("apiVersion")
            });
            d
        })
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `/apis/<group>`, or `None` when no resource has that group.
pub fn group(all: &[Resource], group: &str) -> Option<Value> {
    let versions: Vec<String> = groups_of(all)
        .into_iter()
        .filter(|(g, _)| g == group)
        .map(|(_, v)| v)
        .collect();
    (!versions.is_empty()).then(|| group_doc(group, &versions))
}

/// `/api/v1` or `/apis/<group>/<version>`, or `None` when nothing is served there.
pub fn resource_list(all: &[Resource], group: &str, version: &str) -> Option<Value> {
    let rs: Vec<Value> = all
        .iter()
        .filter(|r| r.group == group && r.version == version)
        .flat_map(Resource::discovery)
        .collect();
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    (!rs.is_empty()).then(|| {
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": rs})
    })
}
