//! The lab's API server: its configuration and the HTTPS accept loop, and
//! the `Status` answers every handler shares. The request's way through it
//! is in `route`; the handlers by family in `discovery`, `forward`
//! (port-forward), `read` (gets and lists, with `selectors`, `table` and
//! `watch`) and `write`; what a user may do in `authz`; the resource kinds
//! in `kinds`.
mod authz;
mod discovery;
mod forward;
mod kinds;
pub mod rbac;
mod read;
mod reviews;
mod route;
mod selectors;
mod table;
mod watch;
mod write;

use std::{sync::Arc, time::Duration};

use axum::{
    extract::Extension,
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    Router,
};
use serde_json::{json, Value};
use tracing::{debug, info};

use tpbpf_lab::Status;

use crate::{
    auth::{self, Tokens},
    store::Store,
    tls::TlsFiles,
};
use authz::Peer;
use route::handle;

/// What the lab is now: its processes, and the objects applied to it.
pub struct Live {
    pub status: Status,
    pub store: Store,
}

impl Live {
    /// `kube-system/extension-apiserver-authentication`: the cluster's
    /// client CA, as kube-apiserver publishes it for aggregated servers
    /// (and tpbpf's agent) to check client certificates against.
    pub fn client_ca_configmap(&self) -> Vec<Value> {
        let ca = std::fs::read_to_string(tpbpf_lab::Lab::new(&self.status.name).pki().ca_cert())
            .unwrap_or_default();
        vec![json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "extension-apiserver-authentication", "namespace": "kube-system",
                         "uid": crate::objects::uid("ConfigMap", "kube-system", "extension-apiserver-authentication")},
            "data": {"client-ca-file": ca},
        })]
    }
}

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

/// A group and version as an object's `apiVersion` names them (`v1` for
/// the core group).
fn group_version(group: &str, version: &str) -> String {
    if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    }
}
