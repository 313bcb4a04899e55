//! Label and field selectors as list and watch requests give them.

use serde_json::Value;

use crate::status::ApiError;

#[derive(Debug, Clone, PartialEq)]
enum Req {
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed selector (all requirements must hold).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Selector(Vec<Req>);

fn split_top(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn set(s: &str) -> Option<Vec<String>> {
    let inner = s.trim().strip_prefix('(')?.strip_suffix(')')?;
    Some(inner.split(',').map(|x| x.trim().to_string()).collect())
}

impl Selector {
    /// Parses `a=b,c!=d,e in (f,g),h notin (i),j,!k`.
    pub fn parse(s: &str, what: &str) -> Result<Self, ApiError> {
        let mut out = Vec::new();
        for part in split_top(s) {
            let part = part.trim();
            if part.is_empty() {
                continue;
            }
            let bad =
                || ApiError::bad_request(format!("unable to parse {what} requirement {part:?}"));
            let r = if let Some((k, v)) = part.split_once("!=") {
                Req::Ne(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once("==") {
                Req::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once('=') {
                Req::Eq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once(" notin ") {
                Req::NotIn(k.trim().into(), set(v).ok_or_else(bad)?)
            } else if let Some((k, v)) = part.split_once(" in ") {
                Req::In(k.trim().into(), set(v).ok_or_else(bad)?)
            } else if let Some(k) = part.strip_prefix('!') {
                Req::NotExists(k.trim().into())
            } else if part.contains(' ') || part.contains('(') {
                return Err(bad());
            } else {
                Req::Exists(part.into())
            };
            out.push(r);
        }
        Ok(Self(out))
    }

    /// Whether `lookup` (key → value) satisfies every requirement.
    pub fn matches(&self, lookup: impl Fn(&str) -> Option<String>) -> bool {
        self.0.iter().all(|r| match r {
            Req::Eq(k, v) => lookup(k).as_deref() == Some(v),
            Req::Ne(k, v) => lookup(k).as_deref() != Some(v),
            Req::In(k, vs) => lookup(k).is_some_and(|x| vs.contains(&x)),
            Req::NotIn(k, vs) => lookup(k).is_none_or(|x| !vs.contains(&x)),
            Req::Exists(k) => lookup(k).is_some(),
            Req::NotExists(k) => lookup(k).is_none(),
        })
    }
}

/// Both selectors of a request.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// `labelSelector`.
    pub labels: Selector,
    /// `fieldSelector` (dotted paths into the object, `metadata.name` and the like).
    pub fields: Selector,
}

impl Filter {
    /// Whether `obj` passes.
    pub fn matches(&self, obj: &Value) -> bool {
        let labels = &obj["metadata"]["labels"];
        self.labels
            .matches(|k| labels.get(k).and_then(Value::as_str).map(str::to_string))
            && self.fields.matches(|k| {
                let mut cur = obj;
                for seg in k.split('.') {
                    cur = cur.get(seg)?;
                }
                match cur {
                    Value::String(s) => Some(s.clone()),
                    Value::Null => None,
                    v => Some(v.to_string()),
                }
            })
    }
}
