//! API errors as `Status` objects (kind `Status`, `reason`, `code`), as the API conventions say.

use serde_json::{Value, json};

use crate::resources::Resource;

/// An error answered to the client.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code} {reason}: {message}")]
pub struct ApiError {
    /// HTTP status code.
    pub code: u16,
    /// Machine-readable reason (`NotFound`, `Conflict`, …).
    pub reason: &'static str,
    /// Human-readable message.
    pub message: String,
    /// `details` (name, group, kind, causes).
    pub details: Option<Value>,
}

impl ApiError {
    /// A Status object for the error.
    pub fn to_status(&self) -> Value {
        let mut v = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "code": self.code,
        });
        if let Some(d) = &self.details {
            v["details"] = d.clone();
        }
        v
    }

    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn about(mut self, res: &Resource, name: &str) -> Self {
        self.details = Some(json!({"name": name, "group": res.group, "kind": res.plural}));
        self
    }

    /// 404 for an object.
    pub fn not_found(res: &Resource, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", qual(res)),
        )
        .about(res, name)
    }

    /// 404 for a path that names nothing served.
    pub fn no_route(path: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        )
    }

    /// 409 on create of an existing object.
    pub fn exists(res: &Resource, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", qual(res)),
        )
        .about(res, name)
    }

    /// 409 on a stale `metadata.resourceVersion`.
    pub fn conflict(res: &Resource, name: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                qual(res)
            ),
        )
        .about(res, name)
    }

    /// 409 on a server-side apply conflict.
    pub fn apply_conflict(res: &Resource, name: &str, fields: &[(String, String)]) -> Self {
        let causes: Vec<Value> = fields
            .iter()
            .map(|(f, m)| json!({"reason": "FieldManagerConflict", "message": format!("conflict with \"{m}\""), "field": f}))
            .collect();
        let list: Vec<String> = fields
            .iter()
            .map(|(f, m)| format!("conflict with \"{m}\": {f}"))
            .collect();
        let mut e = Self::new(
            409,
            "Conflict",
            format!(
                "Apply failed with {} conflict(s): {}",
                fields.len(),
                list.join("; ")
            ),
        )
        .about(res, name);
        if let Some(d) = e.details.as_mut() {
            d["causes"] = Value::Array(causes);
        }
        e
    }

    /// 422 for an invalid object.
    pub fn invalid(res: &Resource, name: &str, why: impl Into<String>) -> Self {
        Self::new(
            422,
            "Invalid",
            format!("{} \"{name}\" is invalid: {}", res.kind, why.into()),
        )
        .about(res, name)
    }

    /// 400 for a request that cannot be understood.
    pub fn bad_request(why: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", why)
    }

    /// 401 without valid credentials.
    pub fn unauthorized() -> Self {
        Self::new(401, "Unauthorized", "Unauthorized")
    }

    /// 403 when RBAC does not allow the request.
    pub fn forbidden(message: String) -> Self {
        Self::new(403, "Forbidden", message)
    }

    /// 405 for a verb the resource does not support.
    pub fn not_allowed(why: impl Into<String>) -> Self {
        Self::new(405, "MethodNotAllowed", why)
    }

    /// 410 Gone: a watch's resourceVersion is older than the retained history.
    pub fn expired(rv: u64, oldest: u64) -> Self {
        Self::new(
            410,
            "Expired",
            format!("too old resource version: {rv} ({oldest})"),
        )
    }

    /// 415 for a patch type the resource does not take.
    pub fn unsupported_media(ct: &str) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {ct})"
            ),
        )
    }
}

fn qual(res: &Resource) -> String {
    if res.group.is_empty() {
        res.plural.clone()
    } else {
        format!("{}.{}", res.plural, res.group)
    }
}
