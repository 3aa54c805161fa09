//! tpbpfd's control side: tunnel sessions with the agents, the intercept
//! manager that keeps each workload's pods intercepted, and the control
//! socket (`/run/tpbpf/BRIDGE/control.sock`) the CLI talks to, with its
//! typed requests. The CLI is a client of this module.
mod listing;
mod manager;
mod names;
mod request;

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::{json, Value};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpStream, UnixListener},
};
use tpbpf_kube::KubeClient;
use tpbpf_mux::{
    transport::{Connector, TlsConnector},
    Client, Config as MuxConfig, Intercept, InterceptMode, Session,
};
use tracing::{debug, info, warn};

const INTERCEPT_TIMEOUT: Duration = Duration::from_secs(20);

/// The answer to an agent's access check, under way.
type Proof = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Option<tpbpf_mux::IdentityProof>, String>> + Send>,
>;

/// The control socket of a bridge started by `tpbpf up`.
pub fn control_socket(instance: &str) -> PathBuf {
    state_dir(instance).join("control.sock")
}

/// Where bridge `instance` of the user running this keeps its state:
/// root's in `/run/tpbpf/NAME`, a user's in `/run/tpbpf/uid-UID/NAME`
/// (made by tpbpfd, the user's, 0700).
pub fn state_dir(instance: &str) -> PathBuf {
    states_dir().join(instance)
}

/// Where the bridges of the user running this keep their states, one
/// directory each: `/run/tpbpf` for root, `/run/tpbpf/uid-UID` for a user.
pub fn states_dir() -> PathBuf {
    let uid = nix::unistd::geteuid().as_raw();
    if uid == 0 {
        PathBuf::from(tpbpf_bridge_api::RUN_DIR)
    } else {
        tpbpf_bridge_api::user_dir(uid)
    }
}

/// How the tunnel reaches an agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Portforward,
    Direct,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Portforward => "port-forward",
            Transport::Direct => "direct TLS",
        }
    }
}

/// The cluster has no agent: `tpbpf` exits with
/// [`tpbpf_kube::NO_AGENT_EXIT`].
#[derive(Debug)]
pub struct NoAgent;

impl std::fmt::Display for NoAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(tpbpf_kube::NO_AGENT)
    }
}

impl std::error::Error for NoAgent {}

/// Opens a tunnel session with an agent (on `node`, or any): finds it,
/// asks it for credentials through a port-forward, dials the transport.
pub async fn connect_agent(
    client: &tpbpf_kube::KubeClient,
    transport: Transport,
    agent_address: Option<std::net::SocketAddr>,
    node: Option<&str>,
) -> std::result::Result<(tpbpf_mux::Session, String), String> {
    let agent = tpbpf_kube::find_agent_on(client, node)
        .await?
        .ok_or_else(|| match node {
            None => tpbpf_kube::NO_AGENT.to_string(),
            Some(n) => format!(
                "no running tpbpf agent on node {n} (`kubectl -n {} get pods -o wide`): the \
                 DaemonSet runs one per schedulable node",
                tpbpf_kube::AGENT_NAMESPACE
            ),
        })?;
    let creds = tpbpf_kube::agent_credentials(client, &agent.pod).await?;
    let fingerprint = &creds.fingerprint;
    let tls = match transport {
        Transport::Portforward => TlsConnector::over(
            Arc::new(tpbpf_kube::PortForward::new(
                client,
                &agent.pod,
                creds.tunnel_port,
            )),
            fingerprint,
        ),
        Transport::Direct => {
            let addr = match agent_address.filter(|_| node.is_none()) {
                Some(a) => a,
                None => {
                    let ip: std::net::IpAddr = agent
                        .address
                        .as_deref()
                        .and_then(|a| a.parse().ok())
                        .ok_or_else(|| {
                            format!(
                                "agent {} has no address for a direct transport: give --agent-address",
                                agent.pod
                            )
                        })?;
                    (ip, agent.host_port.unwrap_or(creds.tunnel_port)).into()
                }
            };
            // Over TCP of its own: the kernel may take the TLS keys.
            TlsConnector::pinned(addr, fingerprint)
        }
    }
    .map_err(|e| e.to_string())?;
    let describe = format!("{} (agent {} on {})", tls.describe(), agent.pod, agent.node);
    let session = Client::connect(
        Arc::new(tls),
        creds.token.into_bytes(),
        MuxConfig::default(),
    )
    .await
    .map_err(|e| e.to_string())?;
    Ok((session, describe))
}

/// Binds the control socket at `path`: made under a temporary name, given
/// its mode (0600, or 0660 and group `tpbpf` where that group exists), then
/// renamed into place, so it is never reachable with another mode.
pub fn listen(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = std::os::unix::net::UnixListener::bind(&tmp)?;
    let group = nix::unistd::Group::from_name("tpbpf").ok().flatten();
    let mode = if group.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    if let Some(g) = group {
        std::os::unix::fs::chown(&tmp, None, Some(g.gid.as_raw()))?;
    }
    std::fs::rename(&tmp, path)?;
    listener.set_nonblocking(true)?;
    UnixListener::from_std(listener)
}

use listing::*;
pub use manager::Manager;
use manager::*;
use names::*;
use request::*;
pub use request::{InterceptRequest, ModeRequest, Request, MAX_REQUEST};
