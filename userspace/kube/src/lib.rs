//! tpbpf's view of a cluster, through the user's kubeconfig like kubectl:
//! which ranges to bridge (service CIDR, pod CIDRs), the cluster DNS and
//! domain, and the namespaces names resolve in.
pub mod access;

use std::{net::IpAddr, path::Path};

use k8s_openapi::api::{
    core::v1::{Node, Pod, Service},
    networking::v1::ServiceCIDR,
};
use kube::{
    api::{ListParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    Api, Client, Config,
};
use serde::Serialize;
use thiserror::Error;
use tpbpf_loader::Cidr;

pub use kube::Client as KubeClient;
use tracing::debug;

#[derive(Debug, Error)]
pub enum KubeError {
    #[error("reading kubeconfig {path}: {source} (set KUBECONFIG or pass --kubeconfig)")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no usable kubeconfig: {0} (set KUBECONFIG, pass --kubeconfig, or check ~/.kube/config)"
    )]
    Infer(String),
    #[error("connecting to the cluster: {0}")]
    Client(#[source] kube::Error),
    /// The API server would not talk to this kubeconfig's identity (TLS,
    /// credentials): one line with what and where, and the fix.
    #[error(
        "{problem} (API server {server}, context {context} of kubeconfig {kubeconfig}): {fix}"
    )]
    Refused {
        kubeconfig: String,
        context: String,
        server: String,
        problem: String,
        fix: String,
    },
    #[error("the API server {server} (context {context} of kubeconfig {kubeconfig}) did not answer: {source} (is it up, and reachable from here?)")]
    Unanswered {
        kubeconfig: String,
        context: String,
        server: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error(
        "{what}: {source} (is the API server at {server} reachable, and may you list {what}?)"
    )]
    Api {
        what: &'static str,
        server: String,
        #[source]
        source: kube::Error,
    },
    #[error("could not find the cluster's service range: {0} (give the ranges with --cidr)")]
    ServiceCidr(String),
    #[error("found nothing to bridge: {0}")]
    NothingToBridge(String),
}

/// What tpbpf needs to know about a cluster.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterInfo {
    pub context: String,
    pub server: String,
    pub service_cidrs: Vec<String>,
    pub pod_cidrs: Vec<String>,
    pub cluster_domain: String,
    /// The cluster DNS service's ClusterIP (kube-system/kube-dns).
    pub dns: Option<IpAddr>,
    /// The context's namespace (where bare names resolve); `up -n` adds more.
    pub namespaces: Vec<String>,
    /// Where the pod ranges come from, said to the user.
    pub pod_ranges_from: String,
    /// What could not be found, and what was done instead.
    pub warnings: Vec<String>,
}

/// What the user already gave, so discovery neither looks for it nor fails
/// without it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Given {
    /// `--cidr`: the ranges to bridge.
    pub ranges: bool,
    /// `--cluster-dns`.
    pub dns: bool,
}

/// A client for the kubeconfig at `path` (or the usual places, like
/// kubectl), in `context` (or the current one). It asks the server its
/// version first, as kubectl's discovery does, so that a certificate or
/// credential the server refuses is said here, in one line naming the
/// kubeconfig, the context and the fix ([`KubeError::Refused`]).
pub async fn client(
    path: Option<&Path>,
    context: Option<&str>,
) -> Result<(Client, String, String, String), KubeError> {
    let options = KubeConfigOptions {
        context: context.map(str::to_string),
        ..Default::default()
    };
    let config = match path {
        Some(p) => {
            let kc = Kubeconfig::read_from(p).map_err(|source| KubeError::Kubeconfig {
                path: p.display().to_string(),
                source,
            })?;
            Config::from_custom_kubeconfig(kc, &options)
                .await
                .map_err(|source| KubeError::Kubeconfig {
                    path: p.display().to_string(),
                    source,
                })?
        }
        None => Config::from_kubeconfig(&options)
            .await
            .map_err(|e| KubeError::Infer(e.to_string()))?,
    };
    let server = config.cluster_url.to_string();
    let namespace = config.default_namespace.clone();
    let kc = match path {
        Some(p) => Kubeconfig::read_from(p).ok(),
        None => Kubeconfig::read().ok(),
    };
    let ctx = context
        .map(str::to_string)
        .or_else(|| kc.as_ref().and_then(|k| k.current_context.clone()))
        .unwrap_or_default();
    let entry = kc
        .as_ref()
        .and_then(|k| k.contexts.iter().find(|c| c.name == ctx))
        .and_then(|c| c.context.clone());
    let target = access::Target {
        kubeconfig: match path {
            Some(p) => p.display().to_string(),
            None => std::env::var("KUBECONFIG")
                .ok()
                .filter(|k| !k.is_empty())
                .unwrap_or_else(|| "~/.kube/config".into()),
        },
        context: ctx.clone(),
        cluster: entry
            .as_ref()
            .map(|c| c.cluster.clone())
            .unwrap_or_default(),
        user: entry.and_then(|c| c.user).unwrap_or_default(),
        server: server.clone(),
    };
    let client = build_client(config)?;
    if let Err(e) = client.apiserver_version().await {
        debug!("the API server's version: {e:?}");
        if let Some(cause) = access::cause(&e) {
            let (problem, fix) = access::explain(&cause, &target);
            return Err(KubeError::Refused {
                kubeconfig: target.kubeconfig,
                context: target.context,
                server: target.server,
                problem,
                fix,
            });
        }
        return Err(KubeError::Unanswered {
            kubeconfig: target.kubeconfig,
            context: target.context,
            server: target.server,
            source: Box::new(e),
        });
    }
    Ok((client, ctx, server, namespace))
}

/// Called with every socket the kube client makes, before it connects
/// (tpbpfd exempts its own connections to the API server from its own
/// redirection this way).
type SocketHook = Box<dyn Fn(&socket2::Socket) + Send + Sync>;
static SOCKET_HOOK: std::sync::OnceLock<SocketHook> = std::sync::OnceLock::new();

/// Sets the hook every socket of the kube client goes through before it
/// connects (once per process).
pub fn on_new_socket(hook: impl Fn(&socket2::Socket) + Send + Sync + 'static) {
    let _ = SOCKET_HOOK.set(Box::new(hook));
}

/// The kube client's stack (as kube's own: base URI, auth, TLS), over a
/// connector of tpbpf's: TCP_NODELAY on (a port-forward carries a tunnel,
/// and Nagle's algorithm meeting delayed ACKs costs 40 ms a round trip),
/// and [`on_new_socket`] before each connect. Proxies in the kubeconfig go
/// through kube's default stack.
fn build_client(config: Config) -> Result<Client, KubeError> {
    use kube::client::ConfigExt;
    use tower::{BoxError, ServiceBuilder};
    if config.proxy_url.is_some() {
        return Client::try_from(config).map_err(KubeError::Client);
    }
    let https = config
        .rustls_https_connector_with_connector(Connector)
        .map_err(KubeError::Client)?;
    let hyper = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(https);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(config.auth_layer().map_err(KubeError::Client)?)
        .map_err(BoxError::from)
        .service(hyper);
    Ok(Client::new(service, config.default_namespace))
}

/// Plain TCP to the API server, made by tpbpf (see [`build_client`]).
#[derive(Clone, Copy, Debug)]
struct Connector;

impl tower::Service<http::Uri> for Connector {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| std::io::Error::other(format!("no host in {uri}")))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
                Some("http") => 80,
                _ => 443,
            });
            let mut last = None;
            for addr in tokio::net::lookup_host((host.as_str(), port)).await? {
                match connect_one(addr).await {
                    Ok(s) => return Ok(hyper_util::rt::TokioIo::new(s)),
                    Err(e) => last = Some(e),
                }
            }
            Err(last
                .unwrap_or_else(|| std::io::Error::other(format!("{host}:{port} has no address"))))
        })
    }
}

async fn connect_one(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    if let Some(hook) = SOCKET_HOOK.get() {
        hook(&sock);
    }
    sock.set_tcp_nodelay(true)?;
    sock.set_nonblocking(true)?;
    let std: std::net::TcpStream = sock.into();
    let stream = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        tokio::net::TcpSocket::from_std_stream(std).connect(addr),
    )
    .await
    .map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("connecting to {addr}"),
        )
    })??;
    Ok(stream)
}

/// Discovers what to bridge. A probe that fails becomes a warning (in
/// `warnings`) and the rest goes on; only a cluster where nothing at all
/// could be found to bridge, with no `--cidr` given, is an error.
pub async fn discover(
    client: &Client,
    context: &str,
    server: &str,
    namespace: &str,
    cluster_domain: &str,
    given: Given,
) -> Result<ClusterInfo, KubeError> {
    let mut warnings = Vec::new();
    let mut service_cidrs = Vec::new();
    let mut pod_cidrs: Vec<String> = Vec::new();
    let mut pod_ranges_from = String::from("given with --cidr");
    if !given.ranges {
        match service_cidrs_of(client).await {
            Ok(c) => service_cidrs = c,
            Err(e) => warnings.push(format!(
                "{e}; ClusterIPs are not bridged unless given with --cidr"
            )),
        }
        let (cidrs, from) = pod_ranges(client, &mut warnings).await;
        pod_cidrs = cidrs;
        pod_ranges_from = from;
        if service_cidrs.is_empty() && pod_cidrs.is_empty() {
            return Err(KubeError::NothingToBridge(format!(
                "no service range and no pod range could be found on {server} ({}): give them with --cidr CIDR",
                warnings.join("; ")
            )));
        }
    }
    let dns = if given.dns {
        None
    } else {
        match cluster_dns(client).await {
            Ok(Some(ip)) => Some(ip),
            Ok(None) => {
                warnings.push("no cluster DNS service (label k8s-app=kube-dns in kube-system): cluster names do not resolve unless given with --cluster-dns".into());
                None
            }
            Err(e) => {
                warnings.push(format!(
                    "looking for the cluster DNS: {e}; give it with --cluster-dns"
                ));
                None
            }
        }
    };
    // The context's namespace only: connecting every namespace of the
    // cluster would let one named `dev` take `pkg.go.dev`. More come from
    // `up -n NS`.
    let namespaces = vec![namespace.to_string()];
    Ok(ClusterInfo {
        context: context.to_string(),
        server: server.to_string(),
        service_cidrs,
        pod_cidrs,
        cluster_domain: cluster_domain.to_string(),
        dns,
        namespaces,
        pod_ranges_from,
        warnings,
    })
}

/// The cluster DNS service's ClusterIP: the service labelled
/// `k8s-app=kube-dns` in kube-system (kube-dns, CoreDNS, and the names
/// distributions give it, e.g. `rke2-coredns`), else `kube-dns` by name.
async fn cluster_dns(client: &Client) -> Result<Option<IpAddr>, kube::Error> {
    let services = Api::<Service>::namespaced(client.clone(), "kube-system");
    let by_label = services
        .list(&ListParams::default().labels("k8s-app=kube-dns"))
        .await?
        .items;
    let by_name = if by_label.is_empty() {
        services.get_opt("kube-dns").await?.into_iter().collect()
    } else {
        by_label
    };
    Ok(by_name
        .into_iter()
        .filter_map(|s| s.spec?.cluster_ip?.parse().ok())
        .next())
}

/// The pod ranges: the nodes' podCIDRs; without them (Cilium's
/// cluster-pool, Calico's pools, EKS's VPC CNI), the routes of the nodes
/// (as the agents see them) that hold the pods' addresses, else narrow
/// ranges around those addresses. hostNetwork pods, whose addresses are
/// their nodes', never count. Returns the ranges and where they came from.
async fn pod_ranges(client: &Client, warnings: &mut Vec<String>) -> (Vec<String>, String) {
    let mut node_ips: Vec<IpAddr> = Vec::new();
    let mut cidrs: Vec<String> = Vec::new();
    match Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
    {
        Ok(nodes) => {
            for n in &nodes.items {
                let spec = n.spec.clone().unwrap_or_default();
                for c in spec
                    .pod_cidrs
                    .unwrap_or_default()
                    .into_iter()
                    .chain(spec.pod_cidr)
                {
                    if !cidrs.contains(&c) {
                        cidrs.push(c);
                    }
                }
                for a in n.status.iter().flat_map(|s| s.addresses.iter().flatten()) {
                    if let Ok(ip) = a.address.parse() {
                        node_ips.push(ip);
                    }
                }
            }
        }
        Err(e) => warnings.push(format!(
            "listing nodes (for their podCIDRs): {e}; finding the pod ranges from the pods instead"
        )),
    }
    if !cidrs.is_empty() {
        return (cidrs, "the nodes' podCIDRs".into());
    }
    let pods = match Api::<Pod>::all(client.clone())
        .list(&ListParams::default())
        .await
    {
        Ok(p) => p.items,
        Err(e) => {
            warnings.push(format!(
                "listing pods (to find the pod ranges): {e}; pods are not bridged unless given with --cidr"
            ));
            return (Vec::new(), "none found".into());
        }
    };
    let mut pod_ips = Vec::new();
    for p in &pods {
        let status = p.status.as_ref();
        if let Some(ip) = status
            .and_then(|s| s.host_ip.as_deref())
            .and_then(|i| i.parse().ok())
        {
            if !node_ips.contains(&ip) {
                node_ips.push(ip);
            }
        }
        if p.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
            continue;
        }
        if let Some(ip) = status
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|i| i.parse().ok())
        {
            pod_ips.push(ip);
        }
    }
    let routes = agent_routes(client).await;
    let (ranges, from) = pick_pod_ranges(&pod_ips, &routes, &node_ips);
    (ranges.iter().map(ToString::to_string).collect(), from)
}

/// The node routes the agents report (`/info`'s `node_routes`), from a few
/// agents: each node routes to the others' pod ranges.
async fn agent_routes(client: &Client) -> Vec<Cidr> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    let mut out: Vec<Cidr> = Vec::new();
    for pod in agent_pods(client)
        .await
        .unwrap_or_default()
        .into_iter()
        .take(4)
    {
        let Some(name) = pod.metadata.name else {
            continue;
        };
        let Ok(body) = agent_get(&pods, &name, "/info").await else {
            continue;
        };
        let Ok(v) = k8s_openapi::serde_json::from_str::<k8s_openapi::serde_json::Value>(&body)
        else {
            continue;
        };
        for r in v["node_routes"].as_array().into_iter().flatten() {
            if let Some(c) = r.as_str().and_then(|r| r.parse::<Cidr>().ok()) {
                if !out.contains(&c) {
                    out.push(c);
                }
            }
        }
    }
    out
}

/// Ranges that cover `pod_ips`: for each address, the widest node route
/// holding it that holds no node address (and is no wider than a /8, or
/// a /32 in IPv6); without one, its /24 (IPv6: /64), or only the address
/// itself where that would hold a node's address (pods and nodes in one
/// subnet, as with EKS's VPC CNI). Returns them and where they came from.
pub fn pick_pod_ranges(
    pod_ips: &[IpAddr],
    routes: &[Cidr],
    node_ips: &[IpAddr],
) -> (Vec<Cidr>, String) {
    let mut out: Vec<Cidr> = Vec::new();
    let (mut from_routes, mut around, mut single) = (0, 0, 0);
    let free_of_nodes = |c: &Cidr| !node_ips.iter().any(|n| c.contains(*n));
    for ip in pod_ips {
        if out.iter().any(|c| c.contains(*ip)) {
            continue;
        }
        let widest = if ip.is_ipv4() { 8 } else { 32 };
        let route = routes
            .iter()
            .filter(|r| r.contains(*ip) && r.prefix_len() >= widest && free_of_nodes(r))
            .min_by_key(|r| r.prefix_len());
        let pick = match route {
            Some(r) => {
                from_routes += 1;
                *r
            }
            None => {
                let near = Cidr::new(*ip, if ip.is_ipv4() { 24 } else { 64 });
                match near.filter(free_of_nodes) {
                    Some(c) => {
                        around += 1;
                        c
                    }
                    None => {
                        single += 1;
                        match Cidr::new(*ip, if ip.is_ipv4() { 32 } else { 128 }) {
                            Some(c) => c,
                            None => continue,
                        }
                    }
                }
            }
        };
        out.retain(|c| !pick.contains(c.addr()) || c.prefix_len() < pick.prefix_len());
        out.push(pick);
    }
    let mut from = Vec::new();
    if out.is_empty() {
        from.push("none found (no pod outside the host network)".to_string());
    }
    if from_routes > 0 {
        from.push("the nodes' routes to the pods (no podCIDR on the nodes)".into());
    }
    if around > 0 {
        from.push("/24 (IPv6 /64) around pod addresses (no podCIDR, no node route)".into());
    }
    if single > 0 {
        from.push("single pod addresses (pods share a subnet with the nodes; new pods need `tpbpf up` again or --cidr)".into());
    }
    (out, from.join("; "))
}

/// The ServiceCIDR API (Kubernetes 1.33+); else the range named in the
/// error a dry-run Service with an impossible ClusterIP gets back.
async fn service_cidrs_of(client: &Client) -> Result<Vec<String>, KubeError> {
    match Api::<ServiceCIDR>::all(client.clone())
        .list(&ListParams::default())
        .await
    {
        Ok(list) => {
            let cidrs: Vec<String> = list
                .items
                .into_iter()
                .filter_map(|s| s.spec)
                .flat_map(|s| s.cidrs.unwrap_or_default())
                .collect();
            if !cidrs.is_empty() {
                return Ok(cidrs);
            }
        }
        Err(e) => debug!("ServiceCIDR API unavailable: {e}"),
    }
    let svc: Service = serde_json_value(r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"tpbpf-cidr-probe"},"spec":{"clusterIP":"1.1.1.1","ports":[{"port":443}]}}"#)
        .map_err(KubeError::ServiceCidr)?;
    let api: Api<Service> = Api::namespaced(client.clone(), "default");
    let pp = PostParams {
        dry_run: true,
        ..Default::default()
    };
    match api.create(&pp, &svc).await {
        Ok(_) => Err(KubeError::ServiceCidr(
            "the API server accepted ClusterIP 1.1.1.1".into(),
        )),
        Err(e) => parse_range_error(&e.to_string())
            .map(|c| vec![c])
            .ok_or_else(|| KubeError::ServiceCidr(e.to_string())),
    }
}

fn serde_json_value(text: &str) -> Result<Service, String> {
    k8s_openapi::serde_json::from_str(text).map_err(|e| e.to_string())
}

/// "... The range of valid IPs is 10.96.0.0/12" -> "10.96.0.0/12".
pub fn parse_range_error(message: &str) -> Option<String> {
    let rest = message.split("range of valid IPs is ").nth(1)?;
    let cidr: String = rest
        .chars()
        .take_while(|c| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '/'))
        .collect();
    cidr.parse::<Cidr>().ok().map(|c| c.to_string())
}

/// A tpbpf agent found in the cluster, and what it says of itself.
#[derive(Clone, Debug, Serialize)]
pub struct AgentInfo {
    pub pod: String,
    pub node: String,
    pub version: String,
    pub healthy: bool,
    /// Where `--transport direct` dials: the node's address when the agent
    /// publishes its tunnel as a hostPort, else the pod's.
    pub address: Option<String>,
    /// The published hostPort, if any (else the tunnel port the agent's
    /// credentials name).
    pub host_port: Option<u16>,
}

/// The namespace and label of tpbpf's agent DaemonSet.
pub const AGENT_NAMESPACE: &str = tpbpf_agent_api::NAMESPACE;
pub const AGENT_PORT: u16 = tpbpf_agent_api::HTTP_PORT;
/// What `up` and `run` say when the cluster has no agent to open a tunnel
/// with, and the exit status they end with then.
pub const NO_AGENT: &str = "no tpbpf agent in this cluster: run `tpbpf install` (cluster-admin) \
                            or ask your platform team to install it";
pub const NO_AGENT_EXIT: u8 = 4;

/// `app=tpbpf-agent`: the agent pods' label, as a selector.
fn agent_selector() -> String {
    let (k, v) = tpbpf_agent_api::APP_LABEL;
    format!("{k}={v}")
}

/// The agent DaemonSet's name.
pub const AGENT_DAEMONSET: &str = tpbpf_agent_api::DAEMONSET;

/// GET `path` from the agent pod `name` through a port-forward via the API
/// server; returns the body.
async fn agent_get(pods: &Api<Pod>, name: &str, path: &str) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut pf = pods
        .portforward(name, &[AGENT_PORT])
        .await
        .map_err(|e| format!("port-forward to {name}: {e}"))?;
    let mut stream = pf.take_stream(AGENT_PORT).ok_or("no stream")?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: tpbpf-agent\r\n\r\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut buf),
    )
    .await
    .map_err(|_| "the agent did not answer in 10 s".to_string())?
    .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(format!(
            "agent {path}: {} {}",
            head.lines().next().unwrap_or("no answer"),
            body.trim()
        ));
    }
    Ok(body.to_string())
}

/// Running agent pods, on the nodes of the cluster.
async fn agent_pods(client: &Client) -> Result<Vec<Pod>, String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    let list = pods
        .list(&ListParams::default().labels(&agent_selector()))
        .await
        .map_err(|e| format!("listing agent pods in {AGENT_NAMESPACE}: {e}"))?;
    Ok(list
        .items
        .into_iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        // A label anyone with `create pods` in the namespace can set: only
        // pods the agent DaemonSet controls are agents.
        .filter(owned_by_the_agent_daemonset)
        .collect())
}

/// Whether the DaemonSet `tpbpf-agent` controls pod `p`.
fn owned_by_the_agent_daemonset(p: &Pod) -> bool {
    p.metadata.owner_references.iter().flatten().any(|o| {
        o.controller == Some(true)
            && o.kind == "DaemonSet"
            && o.name == AGENT_DAEMONSET
            && o.api_version.starts_with("apps/")
    })
}

/// Finds a running agent and asks it, through a port-forward via the API
/// server (the path the tunnel takes), who it is.
pub async fn find_agent(client: &Client) -> Result<Option<AgentInfo>, String> {
    find_agent_on(client, None).await
}

/// Like [`find_agent`], on one node only (the node of a pod to intercept).
pub async fn find_agent_on(
    client: &Client,
    node: Option<&str>,
) -> Result<Option<AgentInfo>, String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    let mut last_err = None;
    for pod in agent_pods(client).await? {
        let on = pod.spec.as_ref().and_then(|s| s.node_name.as_deref());
        if node.is_some() && on != node {
            continue;
        }
        let Some(name) = pod.metadata.name.clone() else {
            continue;
        };
        let host_port = pod
            .spec
            .iter()
            .flat_map(|s| &s.containers)
            .flat_map(|c| c.ports.iter().flatten())
            .find_map(|p| p.host_port.and_then(|h| u16::try_from(h).ok()));
        let address = match host_port {
            Some(_) => pod.status.as_ref().and_then(|s| s.host_ip.clone()),
            None => pod.status.as_ref().and_then(|s| s.pod_ip.clone()),
        };
        let attempt = async {
            let body = agent_get(&pods, &name, "/info").await?;
            let v: k8s_openapi::serde_json::Value = k8s_openapi::serde_json::from_str(&body)
                .map_err(|e| format!("agent /info: {e}"))?;
            Ok::<_, String>(AgentInfo {
                pod: name.clone(),
                node: v["node"].as_str().unwrap_or("?").to_string(),
                version: v["version"].as_str().unwrap_or("?").to_string(),
                healthy: v["healthy"] == true,
                address: address.clone(),
                host_port,
            })
        };
        match attempt.await {
            Ok(info) => return Ok(Some(info)),
            Err(e) => last_err = Some(format!("{name}: {e}")),
        }
    }
    match last_err {
        Some(e) => Err(format!("no agent answered: {e}")),
        None => Ok(None),
    }
}

/// A pod of a workload: where it runs.
#[derive(Clone, Debug, Serialize)]
pub struct WorkloadPod {
    pub name: String,
    #[serde(rename = "pod_ip")]
    pub ip: IpAddr,
    pub node: String,
}

/// A workload's selector as the API's `labelSelector` query: `matchLabels`
/// and `matchExpressions` (In, NotIn, Exists, DoesNotExist). A selector
/// that selects nothing in particular would select every pod: refused.
pub fn label_selector(
    sel: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
) -> Result<String, String> {
    let mut terms: Vec<String> = Vec::new();
    let Some(sel) = sel else {
        return Err("it has no selector".into());
    };
    for (k, v) in sel.match_labels.iter().flatten() {
        terms.push(format!("{k}={v}"));
    }
    for e in sel.match_expressions.iter().flatten() {
        let values = e.values.clone().unwrap_or_default().join(",");
        terms.push(match e.operator.as_str() {
            "In" => format!("{} in ({values})", e.key),
            "NotIn" => format!("{} notin ({values})", e.key),
            "Exists" => e.key.clone(),
            "DoesNotExist" => format!("!{}", e.key),
            other => return Err(format!("its selector has an unknown operator {other}")),
        });
    }
    if terms.is_empty() {
        return Err("its selector is empty, which would select every pod".into());
    }
    Ok(terms.join(","))
}

/// A workload `tpbpf intercept` takes, and how to find its pods.
#[derive(Clone, Debug, Serialize)]
pub struct Workload {
    /// deployment, statefulset, daemonset, replicaset or pod.
    pub kind: &'static str,
    pub name: String,
    pub namespace: String,
    /// Its pods' label selector (`labelSelector` syntax); none for a bare
    /// pod, which is found by name.
    pub selector: Option<String>,
}

impl Workload {
    fn list_params(&self) -> ListParams {
        match &self.selector {
            Some(sel) => ListParams::default().labels(sel),
            None => ListParams::default().fields(&format!("metadata.name={}", self.name)),
        }
    }

    fn watch_params(&self) -> kube::api::WatchParams {
        let wp = kube::api::WatchParams::default().timeout(290);
        match &self.selector {
            Some(sel) => wp.labels(sel),
            None => wp.fields(&format!("metadata.name={}", self.name)),
        }
    }
}

/// The kinds `tpbpf intercept` takes, in the order a bare name is looked
/// up, with the names `KIND/NAME` may use for them.
const WORKLOAD_KINDS: [(&str, &[&str]); 5] = [
    ("deployment", &["deployment", "deployments", "deploy"]),
    ("statefulset", &["statefulset", "statefulsets", "sts"]),
    ("daemonset", &["daemonset", "daemonsets", "ds"]),
    ("replicaset", &["replicaset", "replicasets", "rs"]),
    ("pod", &["pod", "pods", "po"]),
];

/// Finds `target` in `namespace`: `KIND/NAME`, or a bare name tried as a
/// deployment, statefulset, daemonset, replicaset, then pod.
pub async fn resolve_workload(
    client: &Client,
    namespace: &str,
    target: &str,
) -> Result<Workload, String> {
    use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
    let (kinds, name): (Vec<&'static str>, &str) = match target.split_once('/') {
        Some((k, n)) => {
            let k = k.to_ascii_lowercase();
            let Some((kind, _)) = WORKLOAD_KINDS
                .iter()
                .find(|(_, names)| names.contains(&k.as_str()))
            else {
                return Err(format!(
                    "`{target}`: tpbpf intercepts deployments, statefulsets, daemonsets, replicasets and pods, not `{k}`"
                ));
            };
            (vec![*kind], n)
        }
        None => (WORKLOAD_KINDS.iter().map(|(k, _)| *k).collect(), target),
    };
    let c = client.clone();
    for kind in kinds {
        let get_err = |e: kube::Error| format!("getting {kind} {namespace}/{name}: {e}");
        let selector = match kind {
            "deployment" => Api::<Deployment>::namespaced(c.clone(), namespace)
                .get_opt(name)
                .await
                .map_err(get_err)?
                .map(|o| o.spec.map(|s| s.selector)),
            "statefulset" => Api::<StatefulSet>::namespaced(c.clone(), namespace)
                .get_opt(name)
                .await
                .map_err(get_err)?
                .map(|o| o.spec.map(|s| s.selector)),
            "daemonset" => Api::<DaemonSet>::namespaced(c.clone(), namespace)
                .get_opt(name)
                .await
                .map_err(get_err)?
                .map(|o| o.spec.map(|s| s.selector)),
            "replicaset" => Api::<ReplicaSet>::namespaced(c.clone(), namespace)
                .get_opt(name)
                .await
                .map_err(get_err)?
                .map(|o| o.spec.map(|s| s.selector)),
            _ => {
                if Api::<Pod>::namespaced(c.clone(), namespace)
                    .get_opt(name)
                    .await
                    .map_err(get_err)?
                    .is_some()
                {
                    return Ok(Workload {
                        kind: "pod",
                        name: name.to_string(),
                        namespace: namespace.to_string(),
                        selector: None,
                    });
                }
                None
            }
        };
        if let Some(sel) = selector {
            let selector = label_selector(sel.as_ref())
                .map_err(|e| format!("{kind} {namespace}/{name}: {e}"))?;
            return Ok(Workload {
                kind,
                name: name.to_string(),
                namespace: namespace.to_string(),
                selector: Some(selector),
            });
        }
    }
    Err(format!(
        "no deployment, statefulset, daemonset, replicaset or pod named {name} in namespace {namespace} (`tpbpf list -n {namespace}` lists them)"
    ))
}

/// A pod an intercept takes: running, ready, with an address and a node,
/// not being deleted, and in its own network (a hostNetwork pod's address
/// is its node's).
pub fn interceptable(p: &Pod) -> Option<WorkloadPod> {
    if p.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let spec = p.spec.as_ref()?;
    if spec.host_network == Some(true) {
        return None;
    }
    let status = p.status.as_ref()?;
    if status.phase.as_deref() != Some("Running") {
        return None;
    }
    let ready = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Ready")
        .is_none_or(|c| c.status == "True");
    if !ready {
        return None;
    }
    Some(WorkloadPod {
        name: p.metadata.name.clone()?,
        ip: status.pod_ip.as_deref()?.parse().ok()?,
        node: spec.node_name.clone()?,
    })
}

/// The pods of `w` an intercept takes now ([`interceptable`]).
pub async fn workload_pods(client: &Client, w: &Workload) -> Result<Vec<WorkloadPod>, String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &w.namespace);
    let list = pods
        .list(&w.list_params())
        .await
        .map_err(|e| format!("listing the pods of {} {}: {e}", w.kind, w.name))?;
    Ok(list.items.iter().filter_map(interceptable).collect())
}

/// Follows `w`'s pods as they come and go: the receiver holds the pods an
/// intercept takes now, updated on every change a watch reports (and on a
/// fresh list after every watch ends or fails). The task ends when the
/// receiver is dropped.
pub fn follow(client: &Client, w: Workload) -> tokio::sync::watch::Receiver<Vec<WorkloadPod>> {
    use futures_util::StreamExt;
    use kube::api::WatchEvent;
    let (tx, rx) = tokio::sync::watch::channel(Vec::<WorkloadPod>::new());
    let pods: Api<Pod> = Api::namespaced(client.clone(), &w.namespace);
    tokio::spawn(async move {
        let publish = |seen: &std::collections::BTreeMap<String, Pod>| {
            let now: Vec<WorkloadPod> = seen.values().filter_map(interceptable).collect();
            tx.send_if_modified(|old| {
                let same = old.len() == now.len()
                    && old
                        .iter()
                        .zip(&now)
                        .all(|(a, b)| a.name == b.name && a.ip == b.ip && a.node == b.node);
                if !same {
                    old.clone_from(&now);
                }
                !same
            });
        };
        loop {
            let round = async {
                let list = pods
                    .list(&w.list_params())
                    .await
                    .map_err(|e| e.to_string())?;
                let mut seen: std::collections::BTreeMap<String, Pod> = list
                    .items
                    .into_iter()
                    .filter_map(|p| Some((p.metadata.name.clone()?, p)))
                    .collect();
                publish(&seen);
                let rv = list.metadata.resource_version.unwrap_or_default();
                let mut events = pods
                    .watch(&w.watch_params(), &rv)
                    .await
                    .map_err(|e| e.to_string())?
                    .boxed();
                while let Some(ev) = events.next().await {
                    match ev.map_err(|e| e.to_string())? {
                        WatchEvent::Added(p) | WatchEvent::Modified(p) => {
                            if let Some(n) = p.metadata.name.clone() {
                                seen.insert(n, p);
                            }
                        }
                        WatchEvent::Deleted(p) => {
                            if let Some(n) = &p.metadata.name {
                                seen.remove(n);
                            }
                        }
                        WatchEvent::Bookmark(_) => {}
                        WatchEvent::Error(e) => return Err(e.to_string()),
                    }
                    publish(&seen);
                }
                Ok::<(), String>(())
            };
            tokio::select! {
                r = round => {
                    if let Err(e) = r {
                        debug!(workload = w.name, "watching its pods: {e}; listing again");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                }
                _ = tx.closed() => return,
            }
        }
    });
    rx
}

/// The workloads of a namespace that `tpbpf intercept` takes:
/// deployments, statefulsets and daemonsets, with their replicas.
pub async fn workloads(
    client: &Client,
    namespace: &str,
) -> Result<Vec<(String, String, i32)>, String> {
    use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
    let mut out = Vec::new();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    for d in deployments
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("listing deployments in {namespace}: {e}"))?
        .items
    {
        let replicas = d.spec.and_then(|s| s.replicas).unwrap_or(1);
        out.push((
            "deployment".into(),
            d.metadata.name.unwrap_or_default(),
            replicas,
        ));
    }
    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), namespace);
    if let Ok(list) = statefulsets.list(&ListParams::default()).await {
        for st in list.items {
            let replicas = st.spec.and_then(|s| s.replicas).unwrap_or(1);
            out.push((
                "statefulset".into(),
                st.metadata.name.unwrap_or_default(),
                replicas,
            ));
        }
    }
    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), namespace);
    if let Ok(list) = daemonsets.list(&ListParams::default()).await {
        for ds in list.items {
            let replicas = ds.status.map_or(0, |s| s.desired_number_scheduled);
            out.push((
                "daemonset".into(),
                ds.metadata.name.unwrap_or_default(),
                replicas,
            ));
        }
    }
    Ok(out)
}

/// What opening a tunnel session with an agent takes.
pub use tpbpf_agent_api::Credentials as AgentCredentials;

/// Asks the agent `pod` for the tunnel's credentials, through a
/// port-forward: the agent gives them only to connections from its node,
/// so whoever may port-forward into tpbpf's namespace may open sessions.
pub async fn agent_credentials(client: &Client, pod: &str) -> Result<AgentCredentials, String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    let body = agent_get(&pods, pod, "/credentials").await?;
    k8s_openapi::serde_json::from_str(&body).map_err(|e| format!("agent /credentials: {e}"))
}

/// Proves to an agent that this identity may port-forward into pod
/// `namespace/pod`: port-forwards to the pod's `port` through the API
/// server (which checks `pods/portforward`) and sends `nonce` there.
pub async fn prove_port_forward(
    client: &Client,
    namespace: &str,
    pod: &str,
    port: u16,
    nonce: [u8; 16],
) -> Result<(), String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let mut pf = pods.portforward(pod, &[port]).await.map_err(|e| {
        format!(
            "your Kubernetes identity may not port-forward into pod {namespace}/{pod}, which an intercept needs: {e}"
        )
    })?;
    let mut stream = pf
        .take_stream(port)
        .ok_or("the port-forward gave no stream")?;
    stream
        .write_all(&nonce)
        .await
        .map_err(|e| format!("port-forward to {namespace}/{pod}: {e}"))?;
    stream
        .shutdown()
        .await
        .map_err(|e| format!("port-forward to {namespace}/{pod}: {e}"))?;
    // The agent closes once it has the nonce.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stream.read_to_end(&mut rest),
    )
    .await;
    Ok(())
}

/// A tunnel transport through the API server: every connection is a new
/// port-forward to the agent pod's tunnel port.
pub struct PortForward {
    pods: Api<Pod>,
    pod: String,
    port: u16,
}

impl PortForward {
    pub fn new(client: &Client, pod: &str, port: u16) -> PortForward {
        PortForward {
            pods: Api::namespaced(client.clone(), AGENT_NAMESPACE),
            pod: pod.to_string(),
            port,
        }
    }
}

impl tpbpf_mux::transport::Connector for PortForward {
    fn connect(&self) -> tpbpf_mux::transport::ConnectFuture<'_> {
        Box::pin(async move {
            let mut pf = self
                .pods
                .portforward(&self.pod, &[self.port])
                .await
                .map_err(|e| std::io::Error::other(format!("port-forward to {}: {e}", self.pod)))?;
            let stream = pf
                .take_stream(self.port)
                .ok_or_else(|| std::io::Error::other("port-forward gave no stream"))?;
            Ok(Box::new(stream) as tpbpf_mux::transport::BoxIo)
        })
    }

    fn describe(&self) -> String {
        format!(
            "port-forward to {AGENT_NAMESPACE}/{}:{}",
            self.pod, self.port
        )
    }
}

/// The API resource of an object built by `tpbpf-deploy` (its
/// `apiVersion` and `kind`), and whether it lives in a namespace.
fn resource_of(
    o: &k8s_openapi::serde_json::Value,
) -> Result<(kube::api::ApiResource, bool), String> {
    let api_version = o["apiVersion"].as_str().unwrap_or("");
    let kind = o["kind"].as_str().unwrap_or("");
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let (plural, namespaced) = match kind {
        "Namespace" => ("namespaces", false),
        "ServiceAccount" => ("serviceaccounts", true),
        "ClusterRole" => ("clusterroles", false),
        "Role" => ("roles", true),
        "DaemonSet" => ("daemonsets", true),
        other => return Err(format!("tpbpf does not install {other} objects")),
    };
    let gvk = kube::api::GroupVersionKind::gvk(group, version, kind);
    Ok((
        kube::api::ApiResource::from_gvk_with_plural(&gvk, plural),
        namespaced,
    ))
}

fn dynamic_api(
    client: &Client,
    o: &k8s_openapi::serde_json::Value,
) -> Result<(Api<kube::api::DynamicObject>, String), String> {
    let (ar, namespaced) = resource_of(o)?;
    let name = o["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let api = match (namespaced, o["metadata"]["namespace"].as_str()) {
        (true, Some(ns)) => Api::namespaced_with(client.clone(), ns, &ar),
        _ => Api::all_with(client.clone(), &ar),
    };
    Ok((api, name))
}

/// Applies `objects` (server-side apply, field manager `tpbpf`, taking
/// over fields another manager set): creating what is missing, changing
/// what differs, idempotent.
pub async fn apply(
    client: &Client,
    objects: &[k8s_openapi::serde_json::Value],
) -> Result<(), String> {
    use kube::api::{Patch, PatchParams};
    let params = PatchParams::apply("tpbpf").force();
    for o in objects {
        let (api, name) = dynamic_api(client, o)?;
        api.patch(&name, &params, &Patch::Apply(o))
            .await
            .map_err(|e| format!("applying {} {name}: {e}", o["kind"].as_str().unwrap_or("?")))?;
    }
    Ok(())
}

/// Deletes `objects` (in reverse order), those already gone included.
pub async fn delete(
    client: &Client,
    objects: &[k8s_openapi::serde_json::Value],
) -> Result<(), String> {
    use kube::api::DeleteParams;
    for o in objects.iter().rev() {
        let (api, name) = dynamic_api(client, o)?;
        match api.delete(&name, &DeleteParams::foreground()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => {
                return Err(format!(
                    "deleting {} {name}: {e}",
                    o["kind"].as_str().unwrap_or("?")
                ))
            }
        }
    }
    Ok(())
}

/// How the agent DaemonSet stands: (ready, desired), and for each agent pod
/// that is not ready, its node and why.
pub async fn agents_ready(client: &Client) -> Result<(i32, i32, Vec<String>), String> {
    use k8s_openapi::api::apps::v1::DaemonSet;
    let ds: Api<DaemonSet> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    let Some(d) = ds
        .get_opt(AGENT_DAEMONSET)
        .await
        .map_err(|e| format!("getting the agent DaemonSet: {e}"))?
    else {
        return Ok((0, 0, vec!["the agent DaemonSet is not there".into()]));
    };
    let status = d.status.unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    let list = pods
        .list(&ListParams::default().labels(&agent_selector()))
        .await
        .map_err(|e| format!("listing agent pods: {e}"))?;
    let mut waiting = Vec::new();
    for p in list.items {
        let node = p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or("?".into());
        let st = p.status.unwrap_or_default();
        let ready = st
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        if !ready {
            let why = st
                .container_statuses
                .iter()
                .flatten()
                .find_map(|c| {
                    // The last exit, when it crashed: what a platform team
                    // looks at first.
                    let last = c
                        .last_state
                        .as_ref()
                        .and_then(|l| l.terminated.as_ref())
                        .map(|t| {
                            format!(
                                "; last exit code {}{}",
                                t.exit_code,
                                t.message
                                    .as_ref()
                                    .map(|m| format!(": {}", m.trim()))
                                    .unwrap_or_default()
                            )
                        })
                        .unwrap_or_default();
                    let restarts = format!(", {} restarts", c.restart_count);
                    if let Some(w) = c.state.as_ref()?.waiting.as_ref() {
                        return Some(format!(
                            "{}{}{restarts}{last}",
                            w.reason.clone().unwrap_or_default(),
                            w.message
                                .as_ref()
                                .map(|m| format!(": {m}"))
                                .unwrap_or_default()
                        ));
                    }
                    c.state.as_ref()?.running.as_ref()?;
                    Some(format!(
                        "container {} running but not ready (its readinessProbe does not pass){restarts}{last}",
                        c.name
                    ))
                })
                .unwrap_or_else(|| st.phase.clone().unwrap_or_else(|| "starting".into()));
            waiting.push(format!("node {node}: {why}"));
        }
    }
    // As `kubectl rollout status`: ready pods count once the controller
    // has seen this version of the DaemonSet and made its pods from it;
    // until then the ready pods may be the ones it replaces.
    let observed = status.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0);
    let updated = status.updated_number_scheduled.unwrap_or(0);
    let ready = if observed {
        status.number_ready.min(updated)
    } else {
        0
    };
    if updated < status.desired_number_scheduled {
        waiting.push(format!(
            "{updated} of {} agent pods are from the DaemonSet as applied (a rollout in progress)",
            status.desired_number_scheduled
        ));
    }
    Ok((ready, status.desired_number_scheduled, waiting))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_with_expressions_become_set_based_queries() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
            LabelSelector, LabelSelectorRequirement,
        };
        let req = |key: &str, op: &str, values: &[&str]| LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        };
        let sel = LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![
                req("app", "In", &["postgres", "pg"]),
                req("tier", "NotIn", &["cache"]),
                req("team", "Exists", &[]),
                req("legacy", "DoesNotExist", &[]),
            ]),
        };
        assert_eq!(
            label_selector(Some(&sel)).unwrap(),
            "app in (postgres,pg),tier notin (cache),team,!legacy"
        );
        let empty = LabelSelector::default();
        assert!(label_selector(Some(&empty))
            .unwrap_err()
            .contains("every pod"));
        assert!(label_selector(None).is_err());
    }

    #[test]
    fn only_pods_the_agent_daemonset_controls_are_agents() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
        let pod = |owner: Option<(&str, &str, bool)>| Pod {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                labels: Some([("app".to_string(), "tpbpf-agent".to_string())].into()),
                owner_references: owner.map(|(kind, name, controller)| {
                    vec![OwnerReference {
                        api_version: "apps/v1".into(),
                        kind: kind.into(),
                        name: name.into(),
                        controller: Some(controller),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(owned_by_the_agent_daemonset(&pod(Some((
            "DaemonSet",
            "tpbpf-agent",
            true
        )))));
        // The label alone, another owner, or not the controller: not an agent.
        assert!(!owned_by_the_agent_daemonset(&pod(None)));
        assert!(!owned_by_the_agent_daemonset(&pod(Some((
            "ReplicaSet",
            "tpbpf-agent",
            true
        )))));
        assert!(!owned_by_the_agent_daemonset(&pod(Some((
            "DaemonSet",
            "tpbpf-agent",
            false
        )))));
        assert!(!owned_by_the_agent_daemonset(&pod(Some((
            "DaemonSet",
            "evil",
            true
        )))));
    }

    #[test]
    fn pod_ranges_come_from_node_routes_never_hold_a_node_and_skip_host_network() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let cidr = |s: &str| s.parse::<Cidr>().unwrap();
        let nodes = [ip("172.31.0.11"), ip("172.31.0.12")];
        // Cilium cluster-pool: each node routes the others' /24s.
        let routes = [
            cidr("10.0.1.0/24"),
            cidr("10.0.2.0/24"),
            cidr("10.0.1.7/32"),
            cidr("172.31.0.0/24"),
            cidr("0.0.0.0/1"),
        ];
        let (r, from) = pick_pod_ranges(
            &[ip("10.0.1.7"), ip("10.0.2.9"), ip("10.0.2.10")],
            &routes,
            &nodes,
        );
        assert_eq!(r, [cidr("10.0.1.0/24"), cidr("10.0.2.0/24")]);
        assert!(from.contains("routes"), "{from}");
        // No route: a /24 around the address.
        let (r, _) = pick_pod_ranges(&[ip("10.9.8.7")], &[], &nodes);
        assert_eq!(r, [cidr("10.9.8.0/24")]);
        // EKS VPC CNI: pods in the nodes' subnet: never the node, only the pod.
        let (r, from) = pick_pod_ranges(&[ip("172.31.0.50")], &routes, &nodes);
        assert_eq!(r, [cidr("172.31.0.50/32")]);
        assert!(from.contains("single"), "{from}");
        // A wider route found later swallows the narrower ones.
        let (r, _) = pick_pod_ranges(
            &[ip("10.0.1.7")],
            &[cidr("10.0.1.7/32"), cidr("10.0.0.0/16")],
            &nodes,
        );
        assert_eq!(r, [cidr("10.0.0.0/16")]);
    }

    #[test]
    fn reads_the_service_range_from_the_api_servers_error() {
        let msg = r#"Service "tpbpf-cidr-probe" is invalid: spec.clusterIPs: Invalid value: []string{"1.1.1.1"}: failed to allocate IP 1.1.1.1: the provided IP (1.1.1.1) is not in the valid range. The range of valid IPs is 10.43.0.0/16"#;
        assert_eq!(parse_range_error(msg).as_deref(), Some("10.43.0.0/16"));
        assert_eq!(parse_range_error("something else"), None);
    }
}
