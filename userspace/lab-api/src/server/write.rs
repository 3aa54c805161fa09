//! Writes: what `tpbpf install` applies (server-side apply, create,
//! delete), kept in the lab's store; cluster-admin only.
use axum::{
    http::{Method, StatusCode},
    response::Response,
};
use serde_json::Value;
use tracing::info;

use super::{
    kinds::Kind,
    ok_json,
    rbac::{self, Attributes},
    status, ApiConfig,
};
use crate::auth::User;
use crate::store::Store;

/// A write: server-side apply (PATCH), create (POST) or delete, of the kinds
/// an install applies; the admin identity only, as cluster-admin.
pub(super) fn write(
    cfg: &ApiConfig,
    user: &User,
    method: &Method,
    kind: &Kind,
    namespace: Option<&str>,
    name: Option<&str>,
    body: &[u8],
) -> Response {
    let what = format!("{} {}", method, kind.plural);
    if !crate::store::WRITABLE
        .iter()
        .any(|(p, ns)| *p == kind.plural && *ns == kind.namespaced)
    {
        return status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("the lab's API accepts writes of what `tpbpf install` applies only: {what}"),
        );
    }
    let verb = match *method {
        Method::POST => "create",
        Method::PUT => "update",
        Method::DELETE => "delete",
        _ => "patch",
    };
    let attrs = Attributes::new(verb, kind.group, kind.plural)
        .ns(namespace.unwrap_or(""))
        .named(name.unwrap_or(""));
    if !rbac::allowed(user, &cfg.restricted_namespaces, &attrs) {
        return status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!(
                "{} is forbidden: {} (installing takes cluster-admin)",
                kind.plural,
                attrs.forbidden(&user.name)
            ),
        );
    }
    let store = Store::new(&cfg.lab);
    let ns = if kind.namespaced { namespace } else { None };
    if *method == Method::DELETE {
        let Some(name) = name else {
            return status(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "delete a collection: not in the lab".into(),
            );
        };
        return match store.delete(kind.plural, ns, name) {
            Some(o) => ok_json(o),
            None => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{} \"{name}\" not found", kind.plural),
            ),
        };
    }
    let parsed: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                format!("the lab takes JSON bodies (apply-patch+yaml in its JSON form): {e}"),
            )
        }
    };
    if parsed["kind"].as_str() != Some(kind.kind) {
        return status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("the body's kind is not {}", kind.kind),
        );
    }
    let name = match (method, name) {
        (&Method::PATCH, Some(n)) => n.to_string(),
        (&Method::POST, None) => parsed["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        _ => {
            return status(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                format!("not in the lab: {what}"),
            )
        }
    };
    if *method == Method::POST && store.get(kind.plural, ns, &name).is_some() {
        return status(
            StatusCode::CONFLICT,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", kind.plural),
        );
    }
    match store.apply(kind.plural, ns, &name, parsed) {
        Ok(o) => {
            info!(kind = kind.kind, name, "applied");
            ok_json(o)
        }
        Err(e) => status(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", e),
    }
}
