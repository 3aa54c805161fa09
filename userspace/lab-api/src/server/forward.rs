//! The `pods/portforward` subresource: the lab upgrades where the API
//! server would have the kubelet upgrade, to SPDY/3.1 (tunneled in
//! WebSocket, or a plain upgrade) as kubectl asks, or to
//! `v4.channel.k8s.io` as kube-rs asks.
use axum::{
    extract::ws::{rejection::WebSocketUpgradeRejection, WebSocketUpgrade},
    http::{HeaderMap, StatusCode, Uri},
    response::{IntoResponse, Response},
};

use super::{
    rbac::{self, Attributes},
    status, ApiConfig,
};
use crate::{
    auth::User,
    objects,
    portforward_spdy::{self, SpdyUpgrade},
};

/// A port-forward to pod `name` in `ns`, for `user`: the RBAC check, the
/// pod, then the upgrade the client asked for.
// The request's parts, as the router took them apart.
#[allow(clippy::too_many_arguments)]
pub(super) fn portforward(
    cfg: &ApiConfig,
    user: &User,
    ns: &str,
    name: &str,
    uri: &Uri,
    headers: &HeaderMap,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
    spdy: SpdyUpgrade,
) -> Response {
    let attrs = Attributes::new("create", "", "pods")
        .sub("portforward")
        .ns(ns)
        .named(name);
    if !rbac::allowed(user, &cfg.restricted_namespaces, &attrs) {
        return status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!(
                "pods \"{name}\" is forbidden: {}",
                attrs.forbidden(&user.name)
            ),
        );
    }
    // Like the API server, find the pod before looking at the upgrade.
    let Some(target) = crate::portforward::target(&cfg.lab, ns, name) else {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("pods \"{name}\" not found"),
        );
    };
    let pod = || portforward_spdy::Pod::in_lab(name, objects::uid("Pod", ns, name), target.clone());
    match (ws, spdy) {
        // kubectl: SPDY/3.1 tunneled in WebSocket.
        (Ok(ws), _) if portforward_spdy::wants_tunnel(&ws) => portforward_spdy::tunnel(ws, pod()),
        // kube-rs: v4.channel.k8s.io.
        (Ok(ws), _) => crate::portforward::upgrade(ws, target.clone(), uri),
        // kubectl's fallback: Upgrade: SPDY/3.1.
        (Err(_), SpdyUpgrade(Some(on_upgrade))) => {
            portforward_spdy::upgrade(on_upgrade, headers, pod())
        }
        (Err(_), SpdyUpgrade(None)) => status(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "Upgrade request required".into(),
        ),
    }
}

/// `GET pods/NAME/log` (`?tailLines=N`): an agent pod's log, as the
/// kubelet stand-in keeps it (the lab's servers log elsewhere: their pods
/// answer that they have none here).
pub(super) fn pod_log(cfg: &ApiConfig, user: &User, ns: &str, name: &str, uri: &Uri) -> Response {
    let attrs = Attributes::new("get", "", "pods")
        .sub("log")
        .ns(ns)
        .named(name);
    if !rbac::allowed(user, &cfg.restricted_namespaces, &attrs) {
        return status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!(
                "pods \"{name}\" is forbidden: {}",
                attrs.forbidden(&user.name)
            ),
        );
    }
    let tail = uri
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("tailLines="))
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(usize::MAX)
        .min(100_000);
    let node = name
        .strip_prefix("tpbpf-agent-")
        .filter(|_| ns == objects::AGENT_NAMESPACE);
    match node.and_then(|n| tpbpf_lab::Lab::new(&cfg.lab).agent_log(n, tail)) {
        Some(log) => (StatusCode::OK, format!("{log}\n")).into_response(),
        None => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("pods \"{name}\" has no log in the lab"),
        ),
    }
}
