//! `TokenReview`, `SubjectAccessReview` and `SelfSubjectAccessReview`, as
//! kube-apiserver answers them: who a bearer token stands for, and whether
//! a user may do something, from the lab's own authenticator and
//! [`rbac`]. A caller needs `create` on the review kind (the agent's
//! service account has it); anyone authenticated may ask about itself.
use axum::{
    http::{header, StatusCode},
    response::{IntoResponse, Response},
};
use serde_json::{json, Value};
use tracing::info;

use super::{
    rbac::{self, Attributes},
    status, ApiConfig,
};
use crate::auth::User;

/// The answer to a POST of a review at `segs`, or `None` when `segs` is
/// not a review.
pub(super) fn answer(
    cfg: &ApiConfig,
    caller: &User,
    segs: &[&str],
    content_type: &str,
    body: &[u8],
) -> Option<Response> {
    let (group, plural) = match segs {
        ["apis", g @ ("authentication.k8s.io" | "authorization.k8s.io"), "v1", p] => (*g, *p),
        _ => return None,
    };
    let kind = match (group, plural) {
        ("authentication.k8s.io", "tokenreviews") => "TokenReview",
        ("authorization.k8s.io", "subjectaccessreviews") => "SubjectAccessReview",
        ("authorization.k8s.io", "selfsubjectaccessreviews") => "SelfSubjectAccessReview",
        _ => return None,
    };
    if kind != "SelfSubjectAccessReview" {
        let may = Attributes::new("create", group, plural);
        if !rbac::allowed(caller, &cfg.restricted_namespaces, &may) {
            return Some(status(
                StatusCode::FORBIDDEN,
                "Forbidden",
                format!(
                    "{plural}.{group} is forbidden: {}",
                    may.forbidden(&caller.name)
                ),
            ));
        }
    }
    // `kubectl auth can-i` sends its review as protobuf only; the answer
    // is JSON, which client-go accepts too.
    let decoded = if content_type.contains("protobuf") {
        match proto::access_review(body) {
            Some(v) => Ok(v),
            None => {
                return Some(status(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "UnsupportedMediaType",
                    format!(
                        "the lab reads a protobuf {kind} only as `kubectl auth can-i` sends it"
                    ),
                ))
            }
        }
    } else {
        serde_json::from_slice(body)
    };
    let review: Value = match decoded {
        Ok(v) => v,
        Err(e) => {
            return Some(status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!("the {kind} is not JSON: {e}"),
            ))
        }
    };
    let spec = review.get("spec").cloned().unwrap_or(Value::Null);
    let result = match kind {
        "TokenReview" => token_review(cfg, &spec),
        "SubjectAccessReview" => {
            let user = User {
                name: str_of(&spec, "user"),
                groups: spec
                    .get("groups")
                    .and_then(Value::as_array)
                    .map(|g| {
                        g.iter()
                            .filter_map(Value::as_str)
                            .map(String::from)
                            .collect()
                    })
                    .unwrap_or_default(),
            };
            access_review(cfg, &user, &spec)
        }
        _ => access_review(cfg, caller, &spec),
    };
    let apiversion = format!("{group}/v1");
    info!(caller = caller.name, kind, answer = %result, "review");
    Some(
        (
            StatusCode::CREATED,
            [(header::CONTENT_TYPE, "application/json")],
            json!({"kind": kind, "apiVersion": apiversion, "metadata": {"creationTimestamp": null}, "spec": spec, "status": result}).to_string(),
        )
            .into_response(),
    )
}

fn str_of(v: &Value, key: &str) -> String {
    v.get(key).and_then(Value::as_str).unwrap_or("").to_string()
}

/// Who `spec.token` stands for, as the lab's token file says (a
/// certificate is not a token: it is never reviewed).
fn token_review(cfg: &ApiConfig, spec: &Value) -> Value {
    let token = str_of(spec, "token");
    match cfg.tokens.user(token.trim()) {
        Some(u) => {
            let mut groups = u.groups.clone();
            groups.push("system:authenticated".into());
            json!({"authenticated": true, "user": {"username": u.name, "uid": u.name, "groups": groups}})
        }
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
    }
}

/// Whether `user` may do `spec.resourceAttributes`.
fn access_review(cfg: &ApiConfig, user: &User, spec: &Value) -> Value {
    let Some(ra) = spec.get("resourceAttributes") else {
        return json!({"allowed": false, "reason": "the lab reviews resourceAttributes only"});
    };
    let attrs = Attributes {
        verb: str_of(ra, "verb"),
        group: str_of(ra, "group"),
        resource: str_of(ra, "resource"),
        subresource: str_of(ra, "subresource"),
        namespace: str_of(ra, "namespace"),
        name: str_of(ra, "name"),
    };
    if rbac::allowed(user, &cfg.restricted_namespaces, &attrs) {
        json!({"allowed": true, "reason": "allowed by the lab's RBAC"})
    } else {
        json!({"allowed": false, "reason": attrs.forbidden(&user.name)})
    }
}

/// Just enough of Kubernetes' protobuf encoding to read an access review:
/// the `k8s\0` envelope (`runtime.Unknown`), then the review's
/// `spec.resourceAttributes` (field numbers from `authorization/v1`).
mod proto {
    use serde_json::{json, Map, Value};

    /// `(field, bytes)` of each length-delimited field of `msg`; varints
    /// and fixed fields are skipped. `None` on a malformed message.
    fn fields(mut msg: &[u8]) -> Option<Vec<(u64, &[u8])>> {
        let mut out = Vec::new();
        while !msg.is_empty() {
            let key = varint(&mut msg)?;
            match key & 7 {
                0 => {
                    varint(&mut msg)?;
                }
                1 => msg = msg.get(8..)?,
                5 => msg = msg.get(4..)?,
                2 => {
                    let len = usize::try_from(varint(&mut msg)?).ok()?;
                    let (v, rest) = (msg.get(..len)?, msg.get(len..)?);
                    out.push((key >> 3, v));
                    msg = rest;
                }
                _ => return None,
            }
        }
        Some(out)
    }

    fn varint(msg: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for i in 0..10 {
            let (b, rest) = msg.split_first()?;
            *msg = rest;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    fn field(msg: &[u8], n: u64) -> Option<&[u8]> {
        fields(msg)?
            .into_iter()
            .find(|(f, _)| *f == n)
            .map(|(_, v)| v)
    }

    /// The review as JSON, with `spec.resourceAttributes` (or `None`).
    pub(super) fn access_review(body: &[u8]) -> Option<Value> {
        let unknown = body.strip_prefix(b"k8s\0")?;
        let raw = field(unknown, 2)?;
        let spec = field(raw, 2)?;
        let mut attrs = Map::new();
        if let Some(ra) = field(spec, 1) {
            let names = [
                "",
                "namespace",
                "verb",
                "group",
                "version",
                "resource",
                "subresource",
                "name",
            ];
            for (n, v) in fields(ra)? {
                if let Some(name) = names
                    .get(usize::try_from(n).ok()?)
                    .filter(|s| !s.is_empty())
                {
                    attrs.insert(name.to_string(), json!(String::from_utf8_lossy(v)));
                }
            }
        }
        Some(json!({"spec": {"resourceAttributes": attrs}}))
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn an_access_review_is_read_from_its_envelope() {
            // resourceAttributes {namespace: "ns", verb: "patch", resource: "pods"}
            let ra = [
                &[0x0a, 2][..],
                b"ns",
                &[0x12, 5],
                b"patch",
                &[0x2a, 4],
                b"pods",
            ]
            .concat();
            let spec = [&[0x0a, ra.len() as u8][..], &ra].concat();
            let raw = [&[0x12, spec.len() as u8][..], &spec].concat();
            let unknown = [&[0x12, raw.len() as u8][..], &raw].concat();
            let body = [&b"k8s\0"[..], &unknown].concat();
            let v = super::access_review(&body).unwrap();
            let ra = &v["spec"]["resourceAttributes"];
            assert_eq!(ra["namespace"], "ns");
            assert_eq!(ra["verb"], "patch");
            assert_eq!(ra["resource"], "pods");
            assert!(super::access_review(b"k8s\0\x12\x7f").is_none());
            assert!(super::access_review(b"not protobuf").is_none());
        }
    }
}
