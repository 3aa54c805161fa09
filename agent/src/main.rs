//! tpbpf's node agent: one per node (a DaemonSet with hostNetwork; in the
//! lab, a process in each node's network namespace). It reports its node,
//! version and health over HTTP, hands the tunnel's credentials to
//! connections from the node itself (port-forwards), and serves tunnel
//! sessions: streams dialed from the node, datagrams, DNS through the
//! cluster's DNS.
mod intercept;
mod kube_api;
mod policy;
mod rights;
mod routes;
mod tunnel;

use std::{
    net::SocketAddr,
    process::ExitCode,
    sync::Arc,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use axum::{extract::State, routing::get, Json, Router};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};

/// The agent's port on every node.
pub const DEFAULT_PORT: u16 = tpbpf_agent_api::HTTP_PORT;
/// The agent's tunnel port (TLS).
pub const TUNNEL_PORT: u16 = tpbpf_agent_api::TUNNEL_PORT;

#[derive(Parser)]
#[command(name = "tpbpf-agent", version, about = "tpbpf's node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the agent's node, version and kernel health as JSON.
    Info {
        /// Node name (default: $NODE_NAME, else the hostname).
        #[arg(long)]
        node: Option<String>,
    },
    /// Intercept a pod's port: new TCP connections to it go to the agent
    /// (sk_lookup in the pod's network namespace, no restart, fail-open),
    /// which relays them to --to. Runs until SIGINT or SIGTERM.
    Intercept {
        /// The pod's network namespace: an `ip netns` name, or a path such as
        /// /proc/PID/ns/net of a process in the pod.
        #[arg(long)]
        netns: String,
        /// The intercepted address and port: the pod's own address
        /// (connections to the port on loopback stay with the app).
        #[arg(long)]
        target: SocketAddr,
        /// Where intercepted connections go, dialed from the agent.
        #[arg(long)]
        to: SocketAddr,
    },
    /// Serve: /healthz, /info and /credentials over HTTP, and tunnel
    /// sessions (TLS, token).
    Serve {
        /// HTTP (/healthz, /info, /credentials): the pod's loopback, which
        /// only port-forwards reach.
        #[arg(long, default_value_t = SocketAddr::from(([127, 0, 0, 1], DEFAULT_PORT)))]
        listen: SocketAddr,
        /// The tunnel's listening address.
        #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], TUNNEL_PORT)))]
        tunnel_listen: SocketAddr,
        /// The cluster's DNS server (default: the node's resolver).
        #[arg(long)]
        cluster_dns: Option<SocketAddr>,
        /// How long a session whose client is gone (tpbpfd killed, network
        /// lost) waits for it to resume; then its intercepts are removed.
        #[arg(long, default_value_t = 30)]
        resume_window_s: u64,
        #[arg(long)]
        node: Option<String>,
        /// A range of the cluster (service or pod CIDR; repeatable): tunnel
        /// peers may dial only these (and --allow-cidr).
        #[arg(long = "cluster-cidr", value_name = "CIDR")]
        cluster_cidrs: Vec<tpbpf_loader::Cidr>,
        /// A further range a cluster admin lets developers reach (repeatable).
        #[arg(long = "allow-cidr", value_name = "CIDR")]
        allow_cidrs: Vec<tpbpf_loader::Cidr>,
        /// The node's own address (repeatable; the downward API's
        /// status.hostIP as $NODE_IP): never dialed for a tunnel peer.
        #[arg(
            long = "node-ip",
            value_name = "IP",
            env = "NODE_IP",
            value_delimiter = ','
        )]
        node_ips: Vec<std::net::IpAddr>,
        /// What taking a pod's inbound traffic asks of the developer's
        /// Kubernetes identity, checked with the API server
        /// (`patch-pod`, `patch-workload`), or proven by a port-forward
        /// into the pod (`port-forward`).
        #[arg(long, value_enum, default_value = "patch-pod")]
        intercept_rights: rights::InterceptRights,
    },
}

fn node_name(node: Option<String>) -> String {
    node.or_else(|| std::env::var("NODE_NAME").ok())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Health from the doctor's rows the agent depends on: all but the cgroup
/// ones (the agent works in pods' network namespaces, not on cgroups; in a
/// pod or under `ip netns exec` the cgroup hierarchy may not be mounted).
fn info(node: &str, started: Option<Instant>) -> Value {
    let mut report = tpbpf_doctor::run();
    report.checks.retain(|c| !c.name.contains("cgroup"));
    let checks = serde_json::from_str::<Value>(&report.to_json())
        .map(|v| v["checks"].clone())
        .unwrap_or_default();
    json!({
        "node": node,
        "version": env!("CARGO_PKG_VERSION"),
        "healthy": report.ok(),
        "uptime_s": started.map(|s| s.elapsed().as_secs()),
        "time": SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
        "checks": checks,
        // The node's routes: where pods live, when nodes carry no podCIDR.
        "node_routes": match routes::routes_in(&routes::node_netns()) {
            Ok(r) => json!(r.iter().map(|(a, p)| format!("{a}/{p}")).collect::<Vec<_>>()),
            Err(e) => json!({"error": e}),
        },
    })
}

struct AgentState {
    node: String,
    started: Instant,
    creds: Arc<tunnel::Credentials>,
    /// `/info`, computed at most every [`INFO_TTL`]: its probes load
    /// programs into the kernel, which no caller may make the agent do at
    /// will.
    info: tokio::sync::Mutex<Option<(Instant, Value)>>,
}

/// How long a computed `/info` is served.
const INFO_TTL: std::time::Duration = std::time::Duration::from_secs(10);

impl AgentState {
    async fn info(self: &Arc<Self>) -> Value {
        let mut cached = self.info.lock().await;
        if let Some((at, v)) = cached.as_ref() {
            if at.elapsed() < INFO_TTL {
                let mut v = v.clone();
                v["uptime_s"] = json!(self.started.elapsed().as_secs());
                return v;
            }
        }
        let s = self.clone();
        let v = tokio::task::spawn_blocking(move || info(&s.node, Some(s.started)))
            .await
            .unwrap_or_default();
        *cached = Some((Instant::now(), v.clone()));
        v
    }
}

/// Both ends of an HTTP connection, to tell the node's own connections.
#[derive(Clone, Copy)]
struct Ends {
    peer: SocketAddr,
    local: Option<SocketAddr>,
}

impl
    axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, tokio::net::TcpListener>>
    for Ends
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        Ends {
            peer: *stream.remote_addr(),
            local: stream.io().local_addr().ok(),
        }
    }
}

fn main() -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TPBPF_AGENT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .try_init();
    match Cli::parse().command {
        Command::Info { node } => {
            let v = info(&node_name(node), None);
            println!("{v:#}");
            if v["healthy"] == true {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Command::Intercept { netns, target, to } => match intercept(&netns, target, to) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tpbpf-agent: intercept: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Serve {
            listen,
            tunnel_listen,
            cluster_dns,
            resume_window_s,
            node,
            cluster_cidrs,
            allow_cidrs,
            node_ips,
            intercept_rights,
        } => {
            let policy = Arc::new(policy::Policy::new(cluster_cidrs, allow_cidrs, node_ips));
            let api = kube_api::Api::in_cluster();
            if let Err(e) = &api {
                if intercept_rights != rights::InterceptRights::PortForward {
                    tracing::warn!("no API client, so no intercept can be checked: {e}");
                }
            }
            let rights = Arc::new(rights::Rights {
                mode: intercept_rights,
                api,
            });
            let creds = match tunnel::Credentials::generate(tunnel_listen) {
                Ok(c) => Arc::new(c),
                Err(e) => {
                    eprintln!("tpbpf-agent: making the tunnel's credentials: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let state = Arc::new(AgentState {
                node: node_name(node),
                started: Instant::now(),
                creds: creds.clone(),
                info: tokio::sync::Mutex::new(None),
            });
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("tpbpf-agent: starting the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let result: anyhow::Result<()> = rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
                    anyhow::anyhow!(
                        "binding {listen}: {e} (is another agent running on this node?)"
                    )
                })?;
                let tunnel_listener = tokio::net::TcpListener::bind(tunnel_listen).await.map_err(|e| {
                    anyhow::anyhow!(
                        "binding the tunnel's {tunnel_listen}: {e} (is another agent running on this node?)"
                    )
                })?;
                tunnel::warn_unreachable(tunnel_listen);
                tokio::spawn(async move {
                    if let Err(e) = tunnel::serve(
                        tunnel_listener,
                        creds,
                        cluster_dns,
                        std::time::Duration::from_secs(resume_window_s),
                        policy,
                        rights,
                    )
                    .await {
                        tracing::error!("the tunnel endpoint failed: {e}");
                        std::process::exit(1);
                    }
                });
                tracing::info!(%listen, %tunnel_listen, node = state.node, "tpbpf-agent serving");
                let app = Router::new()
                    .route("/healthz", get(|| async { "ok" }))
                    .route(
                        "/info",
                        get(|State(s): State<Arc<AgentState>>| async move { Json(s.info().await) }),
                    )
                    .route(
                        "/credentials",
                        get(
                            |State(s): State<Arc<AgentState>>,
                             axum::extract::ConnectInfo(ends): axum::extract::ConnectInfo<Ends>| async move {
                                let local = ends.local.map(|l| l.ip());
                                if !local.is_some_and(|l| tunnel::through_port_forward(ends.peer.ip(), l)) {
                                    tracing::warn!(peer = %ends.peer, "credentials refused: not through a port-forward");
                                    return Err((
                                        axum::http::StatusCode::FORBIDDEN,
                                        "the tunnel's credentials are given only through a Kubernetes port-forward into the agent's pod\n".to_string(),
                                    ));
                                }
                                s.creds.issue().map(Json).map_err(|e| {
                                    (axum::http::StatusCode::INTERNAL_SERVER_ERROR, format!("issuing credentials: {e}\n"))
                                })
                            },
                        ),
                    )
                    .with_state(state);
                axum::serve(
                    listener,
                    app.into_make_service_with_connect_info::<Ends>(),
                )
                .await?;
                Ok(())
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tpbpf-agent: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// A listening socket created inside the network namespace at `path`.
fn listener_in(path: &std::path::Path) -> anyhow::Result<std::net::TcpListener> {
    let ns = std::fs::File::open(path).map_err(|e| {
        anyhow::anyhow!(
            "opening the pod's network namespace {}: {e}",
            path.display()
        )
    })?;
    Ok(tpbpf_loader::netns::run_in(&ns, || {
        std::net::TcpListener::bind("127.0.0.1:0")
    })??)
}

fn intercept(netns: &str, target: SocketAddr, to: SocketAddr) -> anyhow::Result<()> {
    let path = tpbpf_loader::netns::path_of(netns);
    let listener = listener_in(&path)?;
    let ns = std::fs::File::open(&path)?;
    let interceptor = tpbpf_loader::Interceptor::attach(&ns, target, &listener)?;
    drop(ns);
    let ids = interceptor.attached().clone();
    println!(
        "{}",
        json!({"event": "ready", "target": target.to_string(), "to": to.to_string(), "program_ids": ids.program_ids, "link_ids": ids.link_ids})
    );
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        loop {
            tokio::select! {
                _ = sigint.recv() => break,
                _ = sigterm.recv() => break,
                accepted = listener.accept() => {
                    let (mut conn, peer) = match accepted {
                        Ok(c) => c,
                        Err(e) => {
                            tracing::warn!("accepting an intercepted connection: {e}");
                            continue;
                        }
                    };
                    tokio::spawn(async move {
                        match tokio::net::TcpStream::connect(to).await {
                            Ok(mut up) => {
                                tracing::info!(%peer, %to, "intercepted connection");
                                let _ = tpbpf_mux::relay(&mut conn, &mut up).await;
                            }
                            Err(e) => tracing::warn!(%peer, %to, "dialing the intercept's target: {e}"),
                        }
                    });
                }
            }
        }
        drop(interceptor);
        Ok::<_, anyhow::Error>(())
    })
}
