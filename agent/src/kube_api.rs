//! The agent's own client of the API server, in-cluster as client-go's:
//! the `kubernetes` service from the environment, the service account's
//! token and CA from where the kubelet mounts them. It asks only what
//! checking a developer's rights needs (reviews, a pod, its owner, the
//! cluster's client CA), and its service account may do nothing else.
use std::{net::IpAddr, path::PathBuf, sync::Arc, time::Duration};

use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Bytes, Method, Request};
use rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
use serde_json::Value;

/// The largest answer read from the API server.
const MAX_ANSWER: usize = 1 << 20;
/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Api {
    host: IpAddr,
    port: u16,
    token_path: PathBuf,
    tls: tokio_rustls::TlsConnector,
}

impl Api {
    /// The API server as a pod sees it, or why the agent has none (no
    /// `KUBERNETES_SERVICE_HOST`, no token mounted).
    pub fn in_cluster() -> Result<Self, String> {
        let dir = PathBuf::from(
            std::env::var_os(tpbpf_agent_api::SERVICE_ACCOUNT_DIR_ENV)
                .unwrap_or_else(|| tpbpf_agent_api::SERVICE_ACCOUNT_DIR.into()),
        );
        let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| {
            "KUBERNETES_SERVICE_HOST is not set (the pod has no service account)".to_string()
        })?;
        let host: IpAddr = host
            .parse()
            .map_err(|_| format!("KUBERNETES_SERVICE_HOST {host} is not an address"))?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT")
            .ok()
            .and_then(|p| p.parse().ok())
            .unwrap_or(443);
        let ca_path = dir.join("ca.crt");
        let ca = std::fs::read(&ca_path).map_err(|e| {
            format!(
                "{}: {e} (is automountServiceAccountToken on for the agent's pod?)",
                ca_path.display()
            )
        })?;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(&ca).filter_map(Result::ok) {
            roots
                .add(c)
                .map_err(|e| format!("{}: {e}", ca_path.display()))?;
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let token_path = dir.join("token");
        if !token_path.exists() {
            return Err(format!("{} does not exist", token_path.display()));
        }
        Ok(Self {
            host,
            port,
            token_path,
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
        })
    }

    /// A GET of `path`: its status and JSON body.
    pub async fn get(&self, path: &str) -> Result<(u16, Value), String> {
        self.request(Method::GET, path, None).await
    }

    /// A POST of `body` to `path`: its status and JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> Result<(u16, Value), String> {
        self.request(Method::POST, path, Some(body)).await
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), String> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.request_once(method, path, body))
            .await
            .map_err(|_| {
                format!("the API server did not answer {path} within {REQUEST_TIMEOUT:?}")
            })?
    }

    async fn request_once(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value), String> {
        let what = |e: &dyn std::fmt::Display| format!("asking the API server ({path}): {e}");
        // The token is read each time: the kubelet rotates it.
        let token = std::fs::read_to_string(&self.token_path).map_err(|e| what(&e))?;
        let tcp = tokio::net::TcpStream::connect((self.host, self.port))
            .await
            .map_err(|e| what(&e))?;
        let tls = self
            .tls
            .connect(ServerName::IpAddress(self.host.into()), tcp)
            .await
            .map_err(|e| what(&e))?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| what(&e))?;
        tokio::spawn(conn);
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", self.host.to_string())
            .header("authorization", format!("Bearer {}", token.trim()))
            .header("content-type", "application/json")
            .header("accept", "application/json")
            .body(Full::new(Bytes::from(bytes)))
            .map_err(|e| what(&e))?;
        let resp = send.send_request(req).await.map_err(|e| what(&e))?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| what(&*e))?
            .to_bytes();
        let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        Ok((status, value))
    }
}
