//! Authentication by bearer token and authorization by the stored Roles, ClusterRoles and
//! their bindings (RBAC), answering 403 Forbidden like kube-apiserver.

use serde_json::Value;

/// Who sent a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// `system:serviceaccount:<ns>:<name>`, or the admin's name.
    pub name: String,
    /// Groups (`system:masters` for the admin, `system:serviceaccounts` … for ServiceAccounts).
    pub groups: Vec<String>,
    /// For a ServiceAccount: (namespace, name).
    pub service_account: Option<(String, String)>,
}

impl User {
    /// The all-powerful test user.
    pub fn admin() -> Self {
        Self {
            name: "kubernetes-admin".into(),
            groups: vec!["system:masters".into(), "system:authenticated".into()],
            service_account: None,
        }
    }

    /// A ServiceAccount's user.
    pub fn service_account(ns: &str, name: &str) -> Self {
        Self {
            name: format!("system:serviceaccount:{ns}:{name}"),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{ns}"),
                "system:authenticated".into(),
            ],
            service_account: Some((ns.into(), name.into())),
        }
    }
}

/// What a request wants to do.
#[derive(Debug, Clone)]
pub struct Attributes<'a> {
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, `deletecollection`.
    pub verb: &'a str,
    /// API group.
    pub group: &'a str,
    /// Resource plural.
    pub resource: &'a str,
    /// Subresource (`status`).
    pub subresource: Option<&'a str>,
    /// Namespace, for namespaced requests.
    pub namespace: Option<&'a str>,
    /// Object name, when the request names one.
    pub name: Option<&'a str>,
}

fn has(list: &Value, x: &str) -> bool {
    list.as_array().is_some_and(|a| {
        a.iter()
            .any(|v| v.as_str() == Some(x) || v.as_str() == Some("*"))
    })
}

fn rule_allows(rule: &Value, a: &Attributes<'_>) -> bool {
    let res = match a.subresource {
        Some(s) => format!("{}/{s}", a.resource),
        None => a.resource.to_string(),
    };
    let names_ok = match rule["resourceNames"].as_array() {
        None => true,
        Some(n) if n.is_empty() => true,
        Some(n) => a
            .name
            .is_some_and(|x| n.iter().any(|v| v.as_str() == Some(x))),
    };
    has(&rule["apiGroups"], a.group)
        && has(&rule["resources"], &res)
        && has(&rule["verbs"], a.verb)
        && names_ok
}

fn subject_matches(s: &Value, u: &User) -> bool {
    match s["kind"].as_str() {
        Some("ServiceAccount") => u.service_account.as_ref().is_some_and(|(ns, n)| {
            s["name"].as_str() == Some(n) && s["namespace"].as_str() == Some(ns)
        }),
        Some("User") => s["name"].as_str() == Some(u.name.as_str()),
        Some("Group") => s["name"]
            .as_str()
            .is_some_and(|g| u.groups.iter().any(|x| x == g)),
        _ => false,
    }
}

/// The RBAC objects an authorization looks at.
pub struct Policy<'a> {
    /// `(namespace, Role)`.
    pub roles: Vec<&'a Value>,
    /// ClusterRoles.
    pub cluster_roles: Vec<&'a Value>,
    /// RoleBindings.
    pub role_bindings: Vec<&'a Value>,
    /// ClusterRoleBindings.
    pub cluster_role_bindings: Vec<&'a Value>,
}

impl Policy<'_> {
    fn rules(&self, kind: &str, name: &str, ns: Option<&str>) -> Vec<&Value> {
        let pool = if kind == "ClusterRole" {
            &self.cluster_roles
        } else {
            &self.roles
        };
        pool.iter()
            .filter(|r| {
                r["metadata"]["name"].as_str() == Some(name)
                    && (kind == "ClusterRole" || r["metadata"]["namespace"].as_str() == ns)
            })
            .flat_map(|r| r["rules"].as_array().into_iter().flatten())
            .collect()
    }

    /// Whether `u` may do `a`.
    pub fn allows(&self, u: &User, a: &Attributes<'_>) -> bool {
        if u.groups.iter().any(|g| g == "system:masters") {
            return true;
        }
        let bound = |b: &&&Value| {
            b["subjects"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| subject_matches(s, u)))
        };
        for b in self.cluster_role_bindings.iter().filter(bound) {
            let name = b["roleRef"]["name"].as_str().unwrap_or_default();
            if self
                .rules("ClusterRole", name, None)
                .iter()
                .any(|r| rule_allows(r, a))
            {
                return true;
            }
        }
        let Some(ns) = a.namespace else { return false };
        for b in self
            .role_bindings
            .iter()
            .filter(|b| b["metadata"]["namespace"].as_str() == Some(ns))
            .filter(bound)
        {
            let kind = b["roleRef"]["kind"].as_str().unwrap_or("Role");
            let name = b["roleRef"]["name"].as_str().unwrap_or_default();
            if self
                .rules(kind, name, Some(ns))
                .iter()
                .any(|r| rule_allows(r, a))
            {
                return true;
            }
        }
        false
    }
}

/// kube-apiserver's 403 message.
pub fn forbidden_message(u: &User, a: &Attributes<'_>) -> String {
    let res = match a.subresource {
        Some(s) => format!("{}/{s}", a.resource),
        None => a.resource.to_string(),
    };
    let what = match a.name {
        Some(n) => format!("{res} \"{n}\""),
        None => res.clone(),
    };
    let scope = match a.namespace {
        Some(ns) => format!(" in the namespace \"{ns}\""),
        None => " at the cluster scope".into(),
    };
    format!(
        "{what} is forbidden: User \"{}\" cannot {} resource \"{res}\" in API group \"{}\"{scope}",
        u.name, a.verb, a.group
    )
}
