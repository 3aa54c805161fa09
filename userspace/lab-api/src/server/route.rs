//! A request's way through the server: authentication, `auth whoami`,
//! what an unbound user may see, then discovery, port-forward, or the
//! resource path taken apart into kind, namespace and name for a read or a
//! write.
use std::{collections::HashMap, sync::Arc};

use axum::{
    extract::{
        ws::{rejection::WebSocketUpgradeRejection, WebSocketUpgrade},
        Extension, Query, State,
    },
    http::{header, HeaderMap, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
};
use serde_json::json;
use tracing::debug;

use super::{
    authz::Peer,
    discovery, forward,
    kinds::kinds,
    rbac::{self, Attributes},
    read, reviews, status,
    write::write,
    ApiConfig,
};
use crate::{
    auth::{self, Authn},
    portforward_spdy::SpdyUpgrade,
};

// An axum handler takes its extractors as arguments.
#[allow(clippy::too_many_arguments)]
pub(super) async fn handle(
    State(cfg): State<Arc<ApiConfig>>,
    Extension(peer): Extension<Peer>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    spdy: SpdyUpgrade,
    body: axum::body::Bytes,
) -> Response {
    let path = uri.path().trim_end_matches('/').to_string();
    // As kube-apiserver: a bearer token no one has is a 401 on any path;
    // no credentials at all is system:anonymous, who may see health and
    // version only.
    let authorization = headers
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap_or("?"));
    let user = match auth::authenticate(peer.cert_user.as_ref(), authorization, &cfg.tokens) {
        Authn::User(u) => u,
        Authn::BadToken => {
            debug!(%method, %path, "request with an unknown token: 401");
            return status(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "Unauthorized".into(),
            );
        }
    };
    debug!(%method, %path, user = user.name, "request");
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    if let ["healthz" | "livez" | "readyz"] = segs.as_slice() {
        return "ok".into_response();
    }
    // `kubectl auth whoami`: who the server took this client for.
    let anonymous = user.in_group("system:unauthenticated");
    if let ["apis", "authentication.k8s.io", "v1", "selfsubjectreviews"] = segs.as_slice() {
        if method == Method::POST && !anonymous {
            let mut groups = user.groups.clone();
            groups.push("system:authenticated".into());
            return (
                StatusCode::CREATED,
                [(header::CONTENT_TYPE, "application/json")],
                json!({"kind": "SelfSubjectReview", "apiVersion": "authentication.k8s.io/v1", "metadata": {"creationTimestamp": null}, "status": {"userInfo": {"username": user.name, "groups": groups}}}).to_string(),
            )
                .into_response();
        }
    }
    // Token and access reviews: the caller's own rights are checked there
    // (any authenticated user may ask about itself).
    if method == Method::POST && !anonymous {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if let Some(resp) = reviews::answer(&cfg, &user, &segs, content_type, &body) {
            return resp;
        }
    }
    if !rbac::bound(&user) {
        // system:authenticated may discover (system:discovery); nothing
        // else is bound to these users.
        let discovery = matches!(
            segs.as_slice(),
            ["version"] | ["api"] | ["apis"] | ["api", _] | ["apis", _, _]
        );
        if !(discovery && (!anonymous || segs == ["version"])) {
            return status(
                StatusCode::FORBIDDEN,
                "Forbidden",
                format!(
                    "forbidden: User \"{}\" cannot {} path \"{path}\"",
                    user.name,
                    method.as_str().to_lowercase()
                ),
            );
        }
    }
    if let Some(resp) = discovery::answer(&segs) {
        return resp;
    }
    // Pod port-forward: the lab upgrades where the API server would have
    // the kubelet upgrade.
    if let ["api", "v1", "namespaces", ns, "pods", name, "portforward"] = segs.as_slice() {
        return forward::portforward(&cfg, &user, ns, name, &uri, &headers, ws, spdy);
    }
    if let ["api", "v1", "namespaces", ns, "pods", name, "log"] = segs.as_slice() {
        return forward::pod_log(&cfg, &user, ns, name, &uri);
    }
    let writing = method != Method::GET;
    // /api/v1/... or /apis/<g>/<v>/...
    let (group, version, rest): (&str, &str, &[&str]) = match segs.as_slice() {
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", g, v, rest @ ..] => (g, v, rest),
        _ => {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("the server could not find the requested resource: {path}"),
            )
        }
    };
    let (namespace, plural, name) = match rest {
        ["namespaces", ns, plural] => (Some(*ns), *plural, None),
        ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name)),
        ["namespaces", name] if group.is_empty() => (None, "namespaces", Some(*name)),
        [plural] => (None, *plural, None),
        [plural, name] => (None, *plural, Some(*name)),
        _ => {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("the server could not find the requested resource: {path}"),
            )
        }
    };
    let kinds = kinds();
    let Some(kind) = kinds
        .iter()
        .find(|k| k.group == group && k.version == version && k.plural == plural)
    else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("the server could not find the requested resource ({plural})"),
        );
    };
    if writing {
        // The lab speaks JSON only: 415 makes client-go (kubectl) send its
        // protobuf request again as JSON, as with a server without protobuf.
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if content_type.contains("protobuf") || content_type.contains("cbor") {
            return status(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaType",
                format!("the lab takes JSON bodies, not {content_type}: use `kubectl apply --server-side` (JSON) or curl"),
            );
        }
        return write(&cfg, &user, &method, kind, namespace, name, &body);
    }
    let verb = match (name, query.get("watch").map(String::as_str)) {
        (_, Some("true" | "1")) => "watch",
        (Some(_), _) => "get",
        (None, _) => "list",
    };
    let attrs = Attributes::new(verb, group, plural)
        .ns(namespace.unwrap_or(""))
        .named(name.unwrap_or(""));
    if !rbac::allowed(&user, &cfg.restricted_namespaces, &attrs) {
        return status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!("{plural} is forbidden: {}", attrs.forbidden(&user.name)),
        );
    }
    read::read(
        &cfg.lab, kind, group, version, namespace, name, &query, &headers,
    )
}
