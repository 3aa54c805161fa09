//! Routing, lists, gets, watches and tables.
use std::{collections::HashMap, sync::Arc, time::Duration};

use axum::{
    body::Body,
    extract::{ws::WebSocketUpgrade, Extension, Query, State},
    http::{header, HeaderMap, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
    Router,
};
use serde_json::{json, Value};
use tracing::{debug, info};

use tpbpf_lab::{identity, Status};

use crate::{
    auth::{self, Authn, Tokens, User},
    store::Store,
    tls::TlsFiles,
};

/// What the lab is now: its processes, and the objects applied to it.
pub struct Live {
    pub status: Status,
    pub store: Store,
}

use crate::{
    objects,
    portforward_spdy::{self, SpdyUpgrade},
};

#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// The lab instance (its node namespaces are `<lab>-<node>`).
    pub lab: String,
    /// The serving certificate and the CA client certificates must chain to.
    pub tls: TlsFiles,
    /// Static bearer tokens and whom they stand for.
    pub tokens: Tokens,
    /// Where `lab-developer` may port-forward (RBAC's `pods/portforward`,
    /// as a real cluster would grant it per namespace).
    pub restricted_namespaces: Vec<String>,
    /// The agent binary the lab's nodes run for tpbpf's DaemonSet.
    pub agent: Option<std::path::PathBuf>,
}

/// What a connection proved in its TLS handshake.
#[derive(Clone, Debug)]
struct Peer {
    /// The user of a client certificate the CA signed.
    cert_user: Option<User>,
}

/// What a request's user may do (the lab's stand-in for RBAC).
enum Who {
    /// Group `system:masters`: cluster-admin.
    Admin(String),
    /// `lab-developer`: reads everything, port-forwards in these
    /// namespaces, writes nothing.
    Restricted(String, Vec<String>),
    /// Anyone else (and `system:anonymous`): discovery at most.
    Unbound(User),
}

impl Who {
    fn of(user: User, cfg: &ApiConfig) -> Self {
        if user.in_group(identity::ADMIN_GROUP) {
            Who::Admin(user.name)
        } else if user.name == identity::DEVELOPER_USER {
            Who::Restricted(user.name, cfg.restricted_namespaces.clone())
        } else {
            Who::Unbound(user)
        }
    }

    fn name(&self) -> &str {
        match self {
            Who::Admin(name) | Who::Restricted(name, _) => name,
            Who::Unbound(u) => &u.name,
        }
    }
}

/// One resource kind the endpoint serves.
struct Kind {
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    short: &'static [&'static str],
    /// The objects of this kind, given what runs and what was applied.
    objects: fn(&Live) -> Vec<Value>,
}

fn to_values<T: serde::Serialize>(items: Vec<T>) -> Vec<Value> {
    items
        .into_iter()
        .filter_map(|i| serde_json::to_value(i).ok())
        .collect()
}

fn kinds() -> Vec<Kind> {
    vec![
        Kind {
            group: "",
            version: "v1",
            plural: "namespaces",
            kind: "Namespace",
            namespaced: false,
            short: &["ns"],
            objects: |live| {
                let mut all = to_values(objects::namespaces());
                all.extend(live.store.list("namespaces"));
                all
            },
        },
        Kind {
            group: "",
            version: "v1",
            plural: "nodes",
            kind: "Node",
            namespaced: false,
            short: &["no"],
            objects: |l| to_values(objects::nodes(&l.status)),
        },
        Kind {
            group: "",
            version: "v1",
            plural: "pods",
            kind: "Pod",
            namespaced: true,
            short: &["po"],
            objects: |live| to_values(objects::pods(live)),
        },
        Kind {
            group: "",
            version: "v1",
            plural: "services",
            kind: "Service",
            namespaced: true,
            short: &["svc"],
            objects: |_| to_values(objects::services()),
        },
        Kind {
            group: "apps",
            version: "v1",
            plural: "deployments",
            kind: "Deployment",
            namespaced: true,
            short: &["deploy"],
            objects: |live| to_values(objects::deployments(&live.status)),
        },
        Kind {
            group: "apps",
            version: "v1",
            plural: "replicasets",
            kind: "ReplicaSet",
            namespaced: true,
            short: &["rs"],
            objects: |live| to_values(objects::replica_sets(&live.status)),
        },
        Kind {
            group: "apps",
            version: "v1",
            plural: "daemonsets",
            kind: "DaemonSet",
            namespaced: true,
            short: &["ds"],
            objects: |live| objects::daemon_sets(live),
        },
        Kind {
            group: "",
            version: "v1",
            plural: "serviceaccounts",
            kind: "ServiceAccount",
            namespaced: true,
            short: &["sa"],
            objects: |live| live.store.list("serviceaccounts"),
        },
        Kind {
            group: "rbac.authorization.k8s.io",
            version: "v1",
            plural: "clusterroles",
            kind: "ClusterRole",
            namespaced: false,
            short: &[],
            objects: |live| live.store.list("clusterroles"),
        },
        Kind {
            group: "rbac.authorization.k8s.io",
            version: "v1",
            plural: "roles",
            kind: "Role",
            namespaced: true,
            short: &[],
            objects: |live| live.store.list("roles"),
        },
        Kind {
            group: "discovery.k8s.io",
            version: "v1",
            plural: "endpointslices",
            kind: "EndpointSlice",
            namespaced: true,
            short: &[],
            objects: |l| to_values(objects::endpoint_slices(&l.status)),
        },
        Kind {
            group: "networking.k8s.io",
            version: "v1",
            plural: "servicecidrs",
            kind: "ServiceCIDR",
            namespaced: false,
            short: &[],
            objects: |_| to_values(objects::service_cidrs()),
        },
    ]
}

/// How long a client has for its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the API over HTTPS on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, cfg: ApiConfig) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(crate::tls::server_config(&cfg.tls)?);
    info!(addr = ?listener.local_addr().ok(), lab = cfg.lab, "lab API listening (HTTPS)");
    tokio::spawn(crate::kubelet::run(cfg.lab.clone(), cfg.agent.clone()));
    let app = Router::new().fallback(handle).with_state(Arc::new(cfg));
    loop {
        let (tcp, from) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors and the like: the listener stays.
                tracing::warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // As a real API server (Go sets TCP_NODELAY on every connection):
        // a port-forward carries a tunnel, and Nagle's algorithm on either
        // hop would add delayed-ACK waits the real one does not have.
        let _ = tcp.set_nodelay(true);
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                // A readiness probe connects and closes.
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return,
                Ok(Err(e)) => {
                    info!(%from, "TLS handshake refused: {e}");
                    return;
                }
                Err(_) => {
                    info!(%from, "TLS handshake timed out");
                    return;
                }
            };
            let cert_user = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(auth::user_of_cert);
            debug!(%from, user = ?cert_user, "TLS connection");
            let service = hyper_util::service::TowerToHyperService::new(
                app.layer(Extension(Peer { cert_user })),
            );
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .with_upgrades()
                .await
            {
                debug!(%from, "connection: {e}");
            }
        });
    }
}

fn status(code: StatusCode, reason: &str, message: String) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code.as_u16(),
    });
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn ok_json(v: Value) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

// An axum handler takes its extractors as arguments.
#[allow(clippy::too_many_arguments)]
async fn handle(
    State(cfg): State<Arc<ApiConfig>>,
    Extension(peer): Extension<Peer>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
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
    let who = Who::of(user, &cfg);
    if let Who::Unbound(user) = &who {
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
    match segs.as_slice() {
        ["version"] => {
            return ok_json(
                json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-tpbpf-lab", "platform": "linux/amd64"}),
            )
        }
        ["api"] => {
            return ok_json(
                json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}),
            )
        }
        ["apis"] => {
            let groups: Vec<Value> = [
                "apps",
                "discovery.k8s.io",
                "networking.k8s.io",
                "rbac.authorization.k8s.io",
            ]
                .iter()
                .map(|g| json!({"name": g, "versions": [{"groupVersion": format!("{g}/v1"), "version": "v1"}], "preferredVersion": {"groupVersion": format!("{g}/v1"), "version": "v1"}}))
                .collect();
            return ok_json(json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}));
        }
        ["api", "v1"] => return resource_list("", "v1"),
        ["apis", g, v] => return resource_list(g, v),
        _ => {}
    }
    // Pod port-forward: the lab upgrades where the API server would have
    // the kubelet upgrade.
    if let ["api", "v1", "namespaces", ns, "pods", name, "portforward"] = segs.as_slice() {
        if let Who::Restricted(user, allowed) = &who {
            if !allowed.iter().any(|a| a == ns) {
                return status(
                    StatusCode::FORBIDDEN,
                    "Forbidden",
                    format!("pods \"{name}\" is forbidden: User \"{user}\" cannot create resource \"pods/portforward\" in API group \"\" in the namespace \"{ns}\""),
                );
            }
        }
        // Like the API server, find the pod before looking at the upgrade.
        let Some(target) = crate::portforward::target(&cfg.lab, ns, name) else {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("pods \"{name}\" not found"),
            );
        };
        let pod =
            || portforward_spdy::Pod::in_lab(name, objects::uid("Pod", ns, name), target.clone());
        return match (ws, spdy) {
            // kubectl: SPDY/3.1 tunneled in WebSocket.
            (Ok(ws), _) if portforward_spdy::wants_tunnel(&ws) => {
                portforward_spdy::tunnel(ws, pod())
            }
            // kube-rs: v4.channel.k8s.io.
            (Ok(ws), _) => crate::portforward::upgrade(ws, target.clone(), &uri),
            // kubectl's fallback: Upgrade: SPDY/3.1.
            (Err(_), SpdyUpgrade(Some(on_upgrade))) => {
                portforward_spdy::upgrade(on_upgrade, &headers, pod())
            }
            (Err(_), SpdyUpgrade(None)) => status(
                StatusCode::BAD_REQUEST,
                "BadRequest",
                "Upgrade request required".into(),
            ),
        };
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
        return write(&cfg, &who, &method, kind, namespace, name, &body);
    }
    let objects = kind.objects;
    let (lab, ns, q) = (
        cfg.lab.clone(),
        namespace.map(str::to_string),
        query.clone(),
    );
    let poll = move || -> Vec<Value> {
        let live = Live {
            status: tpbpf_lab::Lab::new(&lab).status(),
            store: Store::new(&lab),
        };
        objects(&live)
            .into_iter()
            .filter(|o| ns.is_none() || o["metadata"]["namespace"].as_str() == ns.as_deref())
            .filter(|o| matches_selectors(o, &q))
            .collect()
    };
    let items = poll();
    if let Some(name) = name {
        return match items.into_iter().find(|o| o["metadata"]["name"] == name) {
            Some(o) => respond_one(o, kind, &headers),
            None => status(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{} \"{name}\" not found", kind.plural),
            ),
        };
    }
    let watching = query.get("watch").is_some_and(|w| w == "1" || w == "true");
    if watching {
        // From the start (no resourceVersion, or 0): every object as ADDED
        // first. From a list's version: only what changes after it.
        let initial = query
            .get("resourceVersion")
            .is_none_or(|rv| rv.is_empty() || rv == "0");
        let timeout = query
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .unwrap_or(300u64)
            .min(1800);
        return watch(items, initial, poll, timeout);
    }
    if wants_table(&headers) {
        return ok_json(table(kind, &items));
    }
    let api_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    ok_json(json!({
        "kind": format!("{}List", kind.kind),
        "apiVersion": api_version,
        "metadata": {"resourceVersion": "1"},
        "items": items,
    }))
}

/// A write: server-side apply (PATCH), create (POST) or delete, of the kinds
/// an install applies; the admin identity only, as cluster-admin.
fn write(
    cfg: &ApiConfig,
    who: &Who,
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
    if !matches!(who, Who::Admin(_)) {
        return status(
            StatusCode::FORBIDDEN,
            "Forbidden",
            format!("{} is forbidden: User \"{}\" cannot {} resource \"{}\" (installing takes cluster-admin)", kind.plural, who.name(), method.as_str().to_lowercase(), kind.plural),
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

fn respond_one(o: Value, kind: &Kind, headers: &HeaderMap) -> Response {
    if wants_table(headers) {
        return ok_json(table(kind, &[o]));
    }
    ok_json(o)
}

fn resource_list(group: &str, version: &str) -> Response {
    let kinds = kinds();
    let mut resources: Vec<Value> = kinds
        .iter()
        .filter(|k| k.group == group && k.version == version)
        .map(|k| json!({"name": k.plural, "singularName": k.kind.to_lowercase(), "namespaced": k.namespaced, "kind": k.kind, "verbs": ["get", "list", "watch"], "shortNames": k.short}))
        .collect();
    if resources.is_empty() {
        return status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("no API group {group}/{version}"),
        );
    }
    if group.is_empty() {
        resources.push(json!({"name": "pods/portforward", "singularName": "", "namespaced": true, "kind": "PodPortForwardOptions", "verbs": ["create", "get"]}));
    }
    let gv = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    ok_json(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources}),
    )
}

/// `labelSelector=a=b,c=d` and `fieldSelector=metadata.name=x,spec.nodeName=y`
/// (equality only, which is what tpbpf and kubectl's common uses need).
fn matches_selectors(o: &Value, query: &HashMap<String, String>) -> bool {
    if let Some(sel) = query.get("labelSelector").filter(|s| !s.is_empty()) {
        let labels = &o["metadata"]["labels"];
        if !selector_terms(sel).iter().all(|t| label_term(t, labels)) {
            return false;
        }
    }
    if let Some(sel) = query.get("fieldSelector").filter(|s| !s.is_empty()) {
        for term in sel.split(',') {
            let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) else {
                continue;
            };
            let mut cur = o;
            for part in k.trim().split('.') {
                cur = &cur[part];
            }
            if cur.as_str() != Some(v.trim()) {
                return false;
            }
        }
    }
    true
}

/// A label selector's terms: split at commas outside `( )`.
fn selector_terms(sel: &str) -> Vec<String> {
    let (mut terms, mut cur, mut depth) = (Vec::new(), String::new(), 0u32);
    for c in sel.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                terms.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    terms.push(cur);
    terms
        .into_iter()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect()
}

/// One term, equality- or set-based, as the API server reads it:
/// `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`, `k`, `!k`.
fn label_term(term: &str, labels: &Value) -> bool {
    let get = |k: &str| labels[k.trim()].as_str();
    let set = |rest: &str| -> Vec<String> {
        rest.trim()
            .trim_start_matches('(')
            .trim_end_matches(')')
            .split(',')
            .map(|v| v.trim().to_string())
            .collect()
    };
    if let Some((k, rest)) = term.split_once(" notin ") {
        return get(k).is_none_or(|v| !set(rest).iter().any(|s| s == v));
    }
    if let Some((k, rest)) = term.split_once(" in ") {
        return get(k).is_some_and(|v| set(rest).iter().any(|s| s == v));
    }
    if let Some((k, v)) = term.split_once("!=") {
        return get(k) != Some(v.trim());
    }
    if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
        return get(k) == Some(v.trim());
    }
    match term.strip_prefix('!') {
        Some(k) => get(k).is_none(),
        None => get(term).is_some(),
    }
}

fn wants_table(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=Table"))
}

/// Computes a table row's cells from an object.
type CellsFn = Box<dyn Fn(&Value) -> Vec<Value>>;

/// A server-side table (meta.k8s.io/v1), as kubectl asks for.
fn table(kind: &Kind, items: &[Value]) -> Value {
    let col = |name: &str, ty: &str| json!({"name": name, "type": ty, "format": if name == "Name" {"name"} else {""}, "description": name, "priority": 0});
    let (columns, cells): (Vec<Value>, CellsFn) = match kind.plural {
        "pods" => (
            vec![
                col("Name", "string"),
                col("Ready", "string"),
                col("Status", "string"),
                col("Restarts", "integer"),
                col("Age", "string"),
                col("IP", "string"),
                col("Node", "string"),
            ],
            Box::new(|o: &Value| {
                let statuses = o["status"]["containerStatuses"].as_array();
                let total = o["spec"]["containers"].as_array().map_or(0, Vec::len);
                let ready = statuses
                    .into_iter()
                    .flatten()
                    .filter(|c| c["ready"] == true)
                    .count();
                let restarts: i64 = statuses
                    .into_iter()
                    .flatten()
                    .filter_map(|c| c["restartCount"].as_i64())
                    .sum();
                // kubectl's STATUS: a waiting container's reason, else the phase.
                let shown = statuses
                    .into_iter()
                    .flatten()
                    .find_map(|c| c["state"]["waiting"]["reason"].as_str().map(|r| json!(r)))
                    .unwrap_or_else(|| o["status"]["phase"].clone());
                vec![
                    o["metadata"]["name"].clone(),
                    json!(format!("{ready}/{total}")),
                    shown,
                    json!(restarts),
                    json!("lab"),
                    o["status"]["podIP"].clone(),
                    o["spec"]["nodeName"].clone(),
                ]
            }),
        ),
        "services" => (
            vec![
                col("Name", "string"),
                col("Type", "string"),
                col("Cluster-IP", "string"),
                col("Ports", "string"),
                col("Age", "string"),
            ],
            Box::new(|o: &Value| {
                let ports: Vec<String> = o["spec"]["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|p| format!("{}/{}", p["port"], p["protocol"].as_str().unwrap_or("TCP")))
                    .collect();
                vec![
                    o["metadata"]["name"].clone(),
                    o["spec"]["type"].clone(),
                    o["spec"]["clusterIP"].clone(),
                    json!(ports.join(",")),
                    json!("lab"),
                ]
            }),
        ),
        _ => (
            vec![col("Name", "string"), col("Age", "string")],
            Box::new(|o: &Value| vec![o["metadata"]["name"].clone(), json!("lab")]),
        ),
    };
    let rows: Vec<Value> = items
        .iter()
        .map(|o| json!({"cells": cells(o), "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]}}))
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": "1"}, "columnDefinitions": columns, "rows": rows})
}

/// A watch: ADDED events for the current objects (when `initial`), then
/// the changes as they happen (the lab's state is read every 200 ms and
/// compared by uid): ADDED, MODIFIED, DELETED, until the timeout.
fn watch(
    items: Vec<Value>,
    initial: bool,
    poll: impl Fn() -> Vec<Value> + Send + 'static,
    timeout_s: u64,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<String, std::io::Error>>(16);
    let key = |o: &Value| {
        o["metadata"]["uid"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| format!("{}/{}", o["metadata"]["namespace"], o["metadata"]["name"]))
    };
    tokio::spawn(async move {
        let event = |t: &str, o: &Value| format!("{}\n", json!({"type": t, "object": o}));
        let mut known: HashMap<String, Value> = HashMap::new();
        for o in items {
            if initial && tx.send(Ok(event("ADDED", &o))).await.is_err() {
                return;
            }
            known.insert(key(&o), o);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(timeout_s);
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return,
                _ = tx.closed() => return,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            let now: HashMap<String, Value> = poll().into_iter().map(|o| (key(&o), o)).collect();
            let mut events = Vec::new();
            for (k, o) in &known {
                if !now.contains_key(k) {
                    events.push(event("DELETED", o));
                }
            }
            for (k, o) in &now {
                match known.get(k) {
                    None => events.push(event("ADDED", o)),
                    Some(old) if old != o => events.push(event("MODIFIED", o)),
                    Some(_) => {}
                }
            }
            known = now;
            for e in events {
                if tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
        }
    });
    let body = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}
