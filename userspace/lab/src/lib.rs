//! The lab: a Kubernetes-like cluster on one machine, built from network
//! namespaces, for tpbpf's demo and tests (ARCHITECTURE.md, "The lab").
//!
//! - a fabric namespace with a bridge joins the node namespaces;
//! - each pod is a namespace with a veth to its node; nodes route their pod
//!   CIDRs to each other;
//! - ClusterIPs are nftables DNAT rules in every node, like kube-proxy's;
//! - real servers from Debian's packages run in the pods: dnsmasq as the
//!   cluster DNS, nginx, Redis, PostgreSQL.
//!
//! Nothing of it is reachable from the machine's own namespace: the lab has
//! no route in or out. tpbpf reaches it through an upstream dialing from a
//! node namespace. `up` is idempotent, `down` removes everything it made
//! and stops only the processes it started (by their pid files).
pub mod agent;
pub mod kubeconfig;
pub mod oci;
pub mod pki;
pub mod spec;

use std::{
    collections::BTreeMap,
    fs,
    io::{self, Write},
    net::{SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde::Serialize;
use spec::{App, Pod};
use thiserror::Error;
use tracing::{debug, info};

#[derive(Debug, Error)]
pub enum LabError {
    #[error("`{cmd}` failed: {stderr} ({hint})")]
    Command {
        cmd: String,
        stderr: String,
        hint: &'static str,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    NotReady(String),
    #[error("making the lab's certificates: {what}: {detail}")]
    Pki { what: String, detail: String },
    #[error(
        "the node agent binary {} is missing: the lab runs it on every node. Build it with \
         `cargo build -p tpbpf-agent` (it lands next to tpbpf, in target/<profile>/), or name \
         it with `tpbpf lab up --agent PATH`",
        path.display()
    )]
    AgentMissing { path: PathBuf },
    #[error("the agent on node {node} exited at start; the end of its log ({log}):\n{tail}")]
    AgentExited {
        node: String,
        log: String,
        tail: String,
    },
    #[error("--agent-runtime runc: runc is not installed (sudo apt-get install runc), or choose --agent-runtime process")]
    RuncMissing,
}

type Result<T, E = LabError> = std::result::Result<T, E>;

/// One lab instance. Its namespaces are named `<name>-...`, its state lives
/// in `/run/tpbpf-lab/<name>`.
#[derive(Clone, Debug)]
pub struct Lab {
    name: String,
    state: PathBuf,
    /// How to start the lab's Kubernetes API endpoint (argv, to which
    /// `--listen ADDR` and kube-apiserver's TLS and token flags are
    /// appended), if at all.
    api_command: Option<Vec<String>>,
    /// The node agent binary, started in every node (hostNetwork). `up`
    /// needs it; `status` and `down` do not.
    agent: Option<PathBuf>,
    /// How `up` makes the lab run the agent (default: runc where it is
    /// installed).
    agent_runtime: Option<agent::AgentRuntime>,
}

/// The node agent's port (tpbpf-agent's default).
pub const AGENT_PORT: u16 = tpbpf_agent_api::HTTP_PORT;
/// The size of `/blob`, which every nginx pod serves: the same
/// pseudo-random bytes everywhere ([`blob_bytes`]), for download tests.
pub const BLOB_LEN: usize = 24 << 20;

/// The content of every nginx pod's `/blob` (xorshift64*, fixed seed).
pub fn blob_bytes() -> Vec<u8> {
    let mut out = vec![0u8; BLOB_LEN];
    let mut x: u64 = 0x7470_6270_665f_6c61;
    for chunk in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    out
}

/// The node agent's tunnel port (tpbpf-agent's default).
pub const AGENT_TUNNEL_PORT: u16 = tpbpf_agent_api::TUNNEL_PORT;

/// Where the lab's second identity (`kubeconfig-restricted`, user
/// `lab-developer`) may port-forward: a developer allowed in `default` but
/// not in `cache` or `db`.
pub const RESTRICTED_NAMESPACES: &str = "default,tpbpf-system";

/// The identities the lab's API server knows, named as kubeadm and cloud
/// clusters name theirs. The API server maps a client certificate's
/// subject (CN = user, O = groups) or a token (its token file) to one.
pub mod identity {
    /// The default kubeconfig's user: a client certificate, as kubeadm's
    /// `admin.conf`.
    pub const ADMIN_USER: &str = "kubernetes-admin";
    /// The group bound to cluster-admin (kubeadm's, in the certificate's O).
    pub const ADMIN_GROUP: &str = "system:masters";
    /// `kubeconfig-restricted`: a token user who may port-forward only in
    /// [`super::RESTRICTED_NAMESPACES`] and write nothing.
    pub const DEVELOPER_USER: &str = "lab-developer";
    /// `kubeconfig-exec`: who the exec credential plugin's token stands
    /// for (an SSO admin, as a cloud's IAM maps one), in [`ADMIN_GROUP`].
    pub const EXEC_USER: &str = "lab-sso-admin";
}

/// Where the lab's API endpoint listens: on the fabric, like a control plane
/// that the developer machine reaches while pods and services stay out of
/// its reach.
pub const API_ADDR: &str = "172.31.0.1:6443";
/// The developer machine's address on the fabric (its namespace reaches the
/// API endpoint and nothing else of the lab).
pub const DEV_IP: &str = "172.31.0.100";

/// A pod `restart_pod` replaced: who it is now.
#[derive(Debug, Serialize, serde::Deserialize)]
struct Replaced {
    name: String,
    ip: String,
    generation: u32,
}

#[derive(Debug, Serialize)]
pub struct PodStatus {
    pub namespace: &'static str,
    pub name: String,
    pub node: &'static str,
    pub ip: String,
    pub netns: String,
    pub app: App,
    pub pid: Option<u32>,
    pub running: bool,
}

/// tpbpf's agent on one node: the process the lab started for it.
#[derive(Debug, Serialize)]
pub struct AgentStatus {
    pub node: &'static str,
    pub pid: Option<u32>,
    pub running: bool,
    /// Its readiness probe passed (and it runs).
    pub ready: bool,
    pub restarts: u32,
    /// The agent pod as the kubelet last saw it; `None`: no agent pod
    /// here (tpbpf is not installed).
    pub pod: Option<agent::AgentPodState>,
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub name: String,
    /// The pods as they are now (names and addresses after restarts).
    #[serde(skip)]
    pub pod_specs: Vec<Pod>,
    pub up: bool,
    pub nodes: Vec<(String, String)>,
    pub pods: Vec<PodStatus>,
    /// tpbpf's agents, one per node.
    pub agents: Vec<AgentStatus>,
    /// How the lab runs the agent: `runc` (the DaemonSet's security
    /// context, an OCI runtime) or `process`.
    pub agent_runtime: agent::AgentRuntime,
    pub services: Vec<spec::Service>,
    /// The developer machine's namespace: it reaches the API endpoint only.
    pub dev_netns: String,
    /// kubeconfig for the lab's API endpoint, when it runs: the admin's
    /// (client certificate).
    pub kubeconfig: Option<PathBuf>,
    /// The token user's (`lab-developer`, RBAC-limited).
    pub kubeconfig_restricted: Option<PathBuf>,
    /// The exec credential plugin's user.
    pub kubeconfig_exec: Option<PathBuf>,
    /// The API server's URL (HTTPS) and the cluster CA it chains to.
    pub api_server: Option<String>,
    pub ca_cert: Option<PathBuf>,
    pub api_running: bool,
    pub service_cidr: &'static str,
    pub pod_cidr: &'static str,
    /// Whether the nodes carry their podCIDR (`spec.podCIDR`); without it
    /// (`lab up --no-node-pod-cidrs`) the lab's IPAM is like Cilium's
    /// cluster-pool or EKS's VPC CNI.
    pub node_pod_cidrs: bool,
    pub cluster_domain: &'static str,
}

impl Lab {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            state: PathBuf::from("/run/tpbpf-lab").join(name),
            api_command: None,
            agent: None,
            agent_runtime: None,
        }
    }

    /// How the lab runs the agent (`up` only; fixed for the lab's life).
    pub fn with_agent_runtime(mut self, runtime: agent::AgentRuntime) -> Self {
        self.agent_runtime = Some(runtime);
        self
    }

    /// The node agent binary that `up` runs on every node.
    pub fn with_agent(mut self, binary: PathBuf) -> Self {
        self.agent = Some(binary);
        self
    }

    /// Also run a Kubernetes API endpoint for the lab, started with `argv`.
    pub fn with_api(mut self, argv: Vec<String>) -> Self {
        self.api_command = Some(argv);
        self
    }

    pub fn dev_netns(&self) -> String {
        format!("{}-dev", self.name)
    }

    /// The admin's kubeconfig (client certificate).
    pub fn kubeconfig_path(&self) -> PathBuf {
        self.state.join("kubeconfig")
    }

    /// The restricted developer's kubeconfig (bearer token).
    pub fn restricted_kubeconfig_path(&self) -> PathBuf {
        self.state.join("kubeconfig-restricted")
    }

    /// The kubeconfig whose user runs [`Self::exec_plugin_path`].
    pub fn exec_kubeconfig_path(&self) -> PathBuf {
        self.state.join("kubeconfig-exec")
    }

    /// The exec credential plugin: prints an ExecCredential with the exec
    /// identity's token, and appends a line to
    /// [`Self::exec_plugin_calls_path`] each time it runs.
    pub fn exec_plugin_path(&self) -> PathBuf {
        self.state.join("exec-credential")
    }

    pub fn exec_plugin_calls_path(&self) -> PathBuf {
        self.state.join("exec-credential.calls")
    }

    /// The API server's static tokens (kube-apiserver's
    /// `--token-auth-file` format: `token,user,uid,"group1,group2"`).
    pub fn tokens_path(&self) -> PathBuf {
        self.state.join("tokens.csv")
    }

    /// The cluster CA and the certificates it issued.
    pub fn pki(&self) -> pki::Pki {
        pki::Pki::new(self.state.join("pki"))
    }

    /// A kubeconfig for the lab's API server (its address and CA) with
    /// `credential` as user `user`.
    pub fn kubeconfig_for(
        &self,
        user: &str,
        credential: kubeconfig::Credential<'_>,
    ) -> Result<String> {
        let ca = self.pki().ca_pem()?;
        Ok(kubeconfig::render(&kubeconfig::Spec {
            server: &api_url(),
            ca_pem: &ca,
            cluster: &self.name,
            user,
            credential,
        }))
    }

    fn api_pid(&self) -> Option<i32> {
        fs::read_to_string(self.state.join("api.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn fabric_netns(&self) -> String {
        format!("{}-fabric", self.name)
    }

    pub fn node_netns(&self, node: &str) -> String {
        format!("{}-{}", self.name, node)
    }

    /// The network namespace of tpbpf's agent pod on `node`.
    pub fn agent_netns(&self, node: &str) -> String {
        format!("{}-tpbpf-system-tpbpf-agent-{node}", self.name)
    }

    pub fn pod_netns(&self, pod: &Pod) -> String {
        format!("{}-{}-{}", self.name, pod.namespace, pod.name)
    }

    fn pod_dir(&self, pod: &Pod) -> PathBuf {
        self.state.join(format!("{}-{}", pod.namespace, pod.name))
    }

    fn pid_file(&self, pod: &Pod) -> PathBuf {
        let dir = self.pod_dir(pod);
        match pod.app {
            App::Postgres => dir.join("data/postmaster.pid"),
            _ => dir.join("server.pid"),
        }
    }

    /// Brings the lab up; a lab that is already fully up is left as it is.
    pub fn up(&self) -> Result<Status> {
        // A lab never pretends: without its agent, it does not come up.
        match &self.agent {
            Some(a) if a.is_file() => {}
            other => {
                return Err(LabError::AgentMissing {
                    path: other.clone().unwrap_or_else(|| "tpbpf-agent".into()),
                })
            }
        }
        let status = self.status();
        if status.up {
            info!(lab = self.name, "lab already up");
            return Ok(status);
        }
        let runtime = self
            .agent_runtime
            .unwrap_or_else(agent::AgentRuntime::detect);
        if runtime == agent::AgentRuntime::Runc && !oci::runc_installed() {
            return Err(LabError::RuncMissing);
        }
        // Half up (a crash, an interrupted run): start from a clean slate.
        self.down()?;
        self.build_network()?;
        write(&self.state.join("agent-runtime"), runtime.as_str())?;
        for pod in self.pods() {
            self.start_app(&pod)?;
        }
        self.start_api()?;
        self.wait_ready(Duration::from_secs(30))?;
        let status = self.status();
        if !status.up {
            return Err(LabError::NotReady(format!(
                "lab {} did not come up: {}",
                self.name,
                serde_json::to_string(&status.pods).unwrap_or_default()
            )));
        }
        Ok(status)
    }

    fn build_network(&self) -> Result<()> {
        mkdir(&self.state)?;
        let fabric = self.fabric_netns();
        netns_add(&fabric)?;
        ip(&["-n", &fabric, "link", "add", "lab0", "type", "bridge"])?;
        ip(&["-n", &fabric, "link", "set", "lab0", "up"])?;
        let api_ip = API_ADDR.split(':').next().unwrap_or("172.31.0.1");
        ip(&[
            "-n",
            &fabric,
            "addr",
            "add",
            &format!("{api_ip}/{}", spec::FABRIC_CIDR_PREFIX),
            "dev",
            "lab0",
        ])?;
        // The developer machine: on the fabric, so it reaches the API
        // endpoint, with no route to pods or services.
        let dev = self.dev_netns();
        netns_add(&dev)?;
        ip(&[
            "link", "add", "eth0", "netns", &dev, "type", "veth", "peer", "name", "dev0", "netns",
            &fabric,
        ])?;
        ip(&["-n", &fabric, "link", "set", "dev0", "master", "lab0", "up"])?;
        ip(&[
            "-n",
            &dev,
            "addr",
            "add",
            &format!("{DEV_IP}/{}", spec::FABRIC_CIDR_PREFIX),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &dev, "link", "set", "eth0", "up"])?;
        let nodes = spec::nodes();
        for (i, node) in nodes.iter().enumerate() {
            let ns = self.node_netns(node.name);
            netns_add(&ns)?;
            let port = format!("n{i}");
            ip(&[
                "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port,
                "netns", &fabric,
            ])?;
            ip(&["-n", &fabric, "link", "set", &port, "master", "lab0", "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/{}", node.ip, spec::FABRIC_CIDR_PREFIX),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            sysctl(&ns, "net/ipv4/ip_forward", "1")?;
        }
        for node in &nodes {
            let ns = self.node_netns(node.name);
            for other in nodes.iter().filter(|o| o.name != node.name) {
                ip(&["-n", &ns, "route", "add", other.pod_cidr, "via", other.ip])?;
            }
            // A route for ClusterIPs, so a connect from the node gets as far
            // as the nat hook that rewrites it (real nodes have a default route).
            ip(&["-n", &ns, "route", "add", spec::SERVICE_CIDR, "dev", "eth0"])?;
            nft(&ns, &self.service_rules())?;
        }
        for (i, pod) in self.pods().iter().enumerate() {
            self.pod_network(&self.pod_netns(pod), pod.node, &pod.ip, &format!("vp{i}"))?;
        }
        // tpbpf's agents: pods of their own (not hostNetwork). The tunnel
        // port is published as a hostPort (the CNI portmap plugin's DNAT),
        // which the developer machine reaches on the node's address for
        // `--transport direct`, as a CI runner in the cluster's network would.
        for (i, node) in nodes.iter().enumerate() {
            self.pod_network(
                &self.agent_netns(node.name),
                node.name,
                node.agent_ip,
                &format!("va{i}"),
            )?;
            nft(
                &self.node_netns(node.name),
                &format!(
                    "table ip tpbpf_lab_hostports {{\n chain prerouting {{\n  type nat hook prerouting priority dstnat; policy accept;\n  ip daddr {} tcp dport {AGENT_TUNNEL_PORT} dnat ip to {}:{AGENT_TUNNEL_PORT}\n }}\n}}\n",
                    node.ip, node.agent_ip
                ),
            )?;
        }
        Ok(())
    }

    /// A pod's network namespace `ns` on `node`: a `/32` address, a veth to
    /// the node (`host_if` on the node's side), the node's link-local
    /// gateway, and the node's route back.
    fn pod_network(&self, ns: &str, node: &str, pod_ip: &str, host_if: &str) -> Result<()> {
        let node = self.node_netns(node);
        netns_add(ns)?;
        ip(&[
            "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", host_if, "netns",
            &node,
        ])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{pod_ip}/32"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            ns,
            "route",
            "add",
            "169.254.1.1",
            "dev",
            "eth0",
            "scope",
            "link",
        ])?;
        ip(&[
            "-n",
            ns,
            "route",
            "add",
            "default",
            "via",
            "169.254.1.1",
            "dev",
            "eth0",
        ])?;
        // The pod's gateway: the same link-local address on every pod's
        // veth in the node (as Calico does).
        ip(&["-n", &node, "addr", "add", "169.254.1.1/32", "dev", host_if])?;
        ip(&["-n", &node, "link", "set", host_if, "up"])?;
        ip(&[
            "-n",
            &node,
            "route",
            "add",
            &format!("{pod_ip}/32"),
            "dev",
            host_if,
        ])?;
        Ok(())
    }

    /// kube-proxy style DNAT for every ClusterIP, in a node's nat table.
    fn service_rules(&self) -> String {
        let mut rules = String::new();
        let pods = self.pods();
        for svc in spec::services() {
            let eps = spec::endpoints(&svc, &pods);
            let target = if eps.len() == 1 {
                eps[0].ip.to_string()
            } else {
                let map: Vec<String> = eps
                    .iter()
                    .enumerate()
                    .map(|(i, p)| format!("{i} : {}", p.ip))
                    .collect();
                format!(
                    "numgen random mod {} map {{ {} }}",
                    eps.len(),
                    map.join(", ")
                )
            };
            for (port, proto) in svc.ports {
                rules.push_str(&format!(
                    "  ip daddr {} {proto} dport {port} dnat ip to {target}\n",
                    svc.cluster_ip
                ));
            }
        }
        // Hairpin: a pod that reaches a service and is sent to itself is
        // masqueraded (as kube-proxy does), or it would get a packet from its
        // own address and answer it locally.
        let mut hairpin = String::new();
        for pod in self.pods() {
            hairpin.push_str(&format!(
                "  ct status dnat ip saddr {ip} ip daddr {ip} masquerade\n",
                ip = pod.ip
            ));
        }
        format!(
            "table ip tpbpf_lab {{\n chain services {{\n{rules} }}\n chain prerouting {{\n  type nat hook prerouting priority dstnat; policy accept;\n  jump services\n }}\n chain output {{\n  type nat hook output priority -100; policy accept;\n  jump services\n }}\n chain postrouting {{\n  type nat hook postrouting priority srcnat; policy accept;\n{hairpin} }}\n}}\n"
        )
    }

    fn start_app(&self, pod: &Pod) -> Result<()> {
        let dir = self.pod_dir(pod);
        mkdir(&dir)?;
        let ns = self.pod_netns(pod);
        let pid = self.pid_file(pod);
        // The pod's sandbox, as a container runtime's `pause`: the first
        // process of the pod's namespace, with an image's environment
        // (PATH) and none of the pod spec's.
        let mut pause = Command::new("ip");
        pause
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .args(["netns", "exec", &ns, "sleep", "infinity"]);
        let pause_pid = spawn_detached(&mut pause, &dir.join("pause.log"), "the pod's sandbox")?;
        write(&dir.join("pause.pid"), &pause_pid.to_string())?;
        match pod.app {
            App::Dns => {
                let mut args = vec![
                    "netns".to_string(),
                    "exec".into(),
                    ns,
                    "dnsmasq".into(),
                    "--conf-file=/dev/null".into(),
                    "--no-resolv".into(),
                    "--no-hosts".into(),
                    "--bind-interfaces".into(),
                    "--user=root".into(),
                    format!("--listen-address={}", pod.ip),
                    format!("--pid-file={}", pid.display()),
                    format!("--local=/{}/", spec::CLUSTER_DOMAIN),
                    format!("--log-facility={}", dir.join("dns.log").display()),
                ];
                for svc in spec::services() {
                    args.push(format!(
                        "--host-record={}.{}.svc.{},{}",
                        svc.name,
                        svc.namespace,
                        spec::CLUSTER_DOMAIN,
                        svc.cluster_ip
                    ));
                }
                for p in self.pods() {
                    args.push(format!(
                        "--host-record={}.{}.pod.{},{}",
                        p.ip.replace('.', "-"),
                        p.namespace,
                        spec::CLUSTER_DOMAIN,
                        p.ip
                    ));
                }
                run(
                    app_cmd(pod, &args[2]).args(&args[3..]),
                    "is dnsmasq installed? sudo bash xtask/setup.sh",
                )?;
            }
            App::Nginx => {
                let tmp = dir.join("tmp");
                mkdir(&tmp)?;
                let blob = dir.join("blob");
                if fs::metadata(&blob).map(|m| m.len()).ok() != Some(BLOB_LEN as u64) {
                    fs::write(&blob, blob_bytes()).map_err(|source| LabError::Io {
                        what: format!("writing {}", blob.display()),
                        source,
                    })?;
                }
                let conf = dir.join("nginx.conf");
                let body = format!(
                    "hello from {} ({} in {}), served by nginx\\n",
                    pod.name, pod.workload, pod.namespace
                );
                write(
                    &conf,
                    &format!(
                        "daemon on;\nmaster_process off;\nworker_processes 1;\npid {pid};\nerror_log {dir}/error.log;\nevents {{ worker_connections 256; }}\nhttp {{\n access_log {dir}/access.log;\n client_body_temp_path {tmp}/body;\n proxy_temp_path {tmp}/proxy;\n fastcgi_temp_path {tmp}/fastcgi;\n uwsgi_temp_path {tmp}/uwsgi;\n scgi_temp_path {tmp}/scgi;\n server {{\n  listen 80;\n  location = /blob {{ default_type application/octet-stream; alias {dir}/blob; }}\n  location / {{ default_type text/plain; return 200 \"{body}\"; }}\n }}\n}}\n",
                        pid = pid.display(),
                        dir = dir.display(),
                        tmp = tmp.display(),
                    ),
                )?;
                run(
                    app_cmd(pod, &ns).args(["nginx", "-c", &conf.display().to_string()]),
                    "is nginx installed? sudo bash xtask/setup.sh",
                )?;
            }
            App::Redis => {
                run(
                    app_cmd(pod, &ns).args([
                        "redis-server",
                        // The pod's address, and loopback, where
                        // port-forwards arrive (as in a container).
                        "--bind",
                        &pod.ip,
                        "127.0.0.1",
                        "--port",
                        "6379",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--protected-mode",
                        "no",
                        "--daemonize",
                        "yes",
                        "--pidfile",
                        &pid.display().to_string(),
                        "--dir",
                        &dir.display().to_string(),
                        "--logfile",
                        &dir.join("redis.log").display().to_string(),
                    ]),
                    "is redis-server installed? sudo bash xtask/setup.sh",
                )?;
            }
            App::Postgres => {
                // PostgreSQL refuses to run as root: its files belong to `postgres`.
                for d in [Path::new("/run/tpbpf-lab"), &self.state, &dir] {
                    let _ = fs::set_permissions(d, fs::Permissions::from_mode(0o755));
                }
                let data = dir.join("data");
                let user = pod
                    .env
                    .iter()
                    .find(|(k, _)| *k == "POSTGRES_USER")
                    .map_or("postgres", |(_, v)| *v);
                run(
                    Command::new("chown").args(["postgres:postgres", &dir.display().to_string()]),
                    "the postgresql package creates the postgres user",
                )?;
                run(
                    Command::new("runuser").args([
                        "-u",
                        "postgres",
                        "--",
                        &pg_bin("initdb"),
                        "-D",
                        &data.display().to_string(),
                        "-U",
                        user,
                        "--auth=trust",
                        "-E",
                        "UTF8",
                    ]),
                    "is PostgreSQL installed? sudo bash xtask/setup.sh",
                )?;
                // The lab's database trusts the lab's networks, like a dev cluster.
                let hba = data.join("pg_hba.conf");
                let mut text = fs::read_to_string(&hba).map_err(|source| LabError::Io {
                    what: format!("reading {}", hba.display()),
                    source,
                })?;
                text.push_str("host all all 0.0.0.0/0 trust\n");
                write(&hba, &text)?;
                run(
                    app_cmd(pod, &ns).args([
                        "runuser",
                        "-u",
                        "postgres",
                        "--",
                        &pg_bin("pg_ctl"),
                        "-D",
                        &data.display().to_string(),
                        "-l",
                        &dir.join("postgres.log").display().to_string(),
                        "-w",
                        "-o",
                        &format!(
                            "-c listen_addresses={},127.0.0.1 -c unix_socket_directories={}",
                            pod.ip,
                            dir.display()
                        ),
                        "start",
                    ]),
                    "see postgres.log in the lab's state directory",
                )?;
                // POSTGRES_DB, as the official image creates it.
                if let Some((_, db)) = pod.env.iter().find(|(k, _)| *k == "POSTGRES_DB") {
                    run(
                        Command::new("runuser").args([
                            "-u",
                            "postgres",
                            "--",
                            &pg_bin("createdb"),
                            "-h",
                            &dir.display().to_string(),
                            "-U",
                            user,
                            db,
                        ]),
                        "see postgres.log in the lab's state directory",
                    )?;
                }
            }
        }
        debug!(pod = pod.name, "started");
        Ok(())
    }

    fn start_api(&self) -> Result<()> {
        let Some(argv) = &self.api_command else {
            return Ok(());
        };
        use identity::*;
        let api_ip = API_ADDR
            .split(':')
            .next()
            .and_then(|ip| ip.parse().ok())
            .ok_or_else(|| LabError::NotReady(format!("{API_ADDR} is not an address")))?;
        let pki = self.pki();
        let admin = pki.create(api_ip, ADMIN_USER, ADMIN_GROUP)?;
        let restricted = format!("lab-dev-{:016x}{:016x}", random_u64(), random_u64());
        let exec = format!("lab-sso-{:016x}{:016x}", random_u64(), random_u64());
        pki::write_private(
            &self.tokens_path(),
            &format!(
                "{restricted},{DEVELOPER_USER},{DEVELOPER_USER}\n{exec},{EXEC_USER},{EXEC_USER},\"{ADMIN_GROUP}\"\n"
            ),
        )?;
        // Owner-only, as the credential it prints.
        pki::write_with_mode(
            &self.exec_plugin_path(),
            &format!(
                "#!/bin/sh\n# The lab's exec credential plugin (as `aws eks get-token`): one\n# ExecCredential with the token of user {EXEC_USER}.\necho \"$(date +%s) uid=$(id -u)\" >> {calls} 2>/dev/null\nprintf '%s\\n' '{{\"apiVersion\":\"client.authentication.k8s.io/v1\",\"kind\":\"ExecCredential\",\"status\":{{\"token\":\"{exec}\"}}}}'\n",
                calls = self.exec_plugin_calls_path().display(),
            ),
            0o700,
        )?;
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .args(["--listen", API_ADDR])
            .arg("--tls-cert-file")
            .arg(pki.server_cert())
            .arg("--tls-private-key-file")
            .arg(pki.server_key())
            .arg("--client-ca-file")
            .arg(pki.ca_cert())
            .arg("--token-auth-file")
            .arg(self.tokens_path())
            .args(["--restricted-namespaces", RESTRICTED_NAMESPACES]);
        let pid = spawn_detached(
            &mut cmd,
            &self.state.join("api.log"),
            &format!("the lab API endpoint ({})", argv[0]),
        )?;
        write(&self.state.join("api.pid"), &pid.to_string())?;
        // Each holds a credential: owner-only, as kubeadm's admin.conf.
        let plugin = self.exec_plugin_path();
        for (path, user, credential) in [
            (
                self.kubeconfig_path(),
                ADMIN_USER,
                kubeconfig::Credential::ClientCert(&admin),
            ),
            (
                self.restricted_kubeconfig_path(),
                DEVELOPER_USER,
                kubeconfig::Credential::Token(&restricted),
            ),
            (
                self.exec_kubeconfig_path(),
                EXEC_USER,
                kubeconfig::Credential::Exec(&plugin),
            ),
        ] {
            pki::write_private(&path, &self.kubeconfig_for(user, credential)?)?;
        }
        Ok(())
    }

    fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        if self.api_command.is_some() {
            let addr: SocketAddr = API_ADDR
                .parse()
                .map_err(|_| LabError::NotReady(API_ADDR.into()))?;
            let dev = self.dev_netns();
            while !in_netns(&dev, move || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
            }) {
                if Instant::now() > deadline {
                    return Err(LabError::NotReady(format!(
                        "the lab API endpoint is not answering on {API_ADDR} (see {})",
                        self.state.join("api.log").display()
                    )));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        for pod in self.pods() {
            self.wait_pod(&pod, deadline)?;
        }
        Ok(())
    }

    /// Whether the API shows the nodes' podCIDRs (real clusters differ:
    /// Cilium's cluster-pool, Calico's pools and EKS's VPC CNI leave them
    /// empty).
    pub fn set_node_pod_cidrs(&self, shown: bool) -> Result<()> {
        let marker = self.state.join("no-node-pod-cidrs");
        if shown {
            let _ = fs::remove_file(marker);
            Ok(())
        } else {
            write(&marker, "")
        }
    }

    /// Waits until `pod`'s server answers on its pod address, from its node.
    fn wait_pod(&self, pod: &Pod, deadline: Instant) -> Result<()> {
        let port = match pod.app {
            App::Dns => 53,
            App::Nginx => 80,
            App::Redis => 6379,
            App::Postgres => 5432,
        };
        let addr: SocketAddr = format!("{}:{port}", pod.ip)
            .parse()
            .map_err(|_| LabError::NotReady(pod.ip.clone()))?;
        let node = self.node_netns(pod.node);
        loop {
            if in_netns(&node, move || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
            }) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(LabError::NotReady(format!(
                    "{} in {} is not answering on {addr}",
                    pod.app_name(),
                    pod.name
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn replaced_path(&self) -> PathBuf {
        self.state.join("replaced.json")
    }

    /// Pods `tpbpf lab restart` replaced, by their place in the spec.
    fn replaced(&self) -> BTreeMap<usize, Replaced> {
        fs::read(self.replaced_path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// The lab's pods as they are now: the spec's, with the name and address
    /// of each replacement `restart_pod` made.
    pub fn pods(&self) -> Vec<Pod> {
        let replaced = self.replaced();
        spec::pods()
            .into_iter()
            .enumerate()
            .map(|(i, mut p)| {
                if let Some(r) = replaced.get(&i) {
                    p.name.clone_from(&r.name);
                    p.ip.clone_from(&r.ip);
                }
                p
            })
            .collect()
    }

    /// The node-side veth of the pod at place `i`, replacement `generation`.
    fn host_if(i: usize, generation: u32) -> String {
        if generation == 0 {
            format!("vp{i}")
        } else {
            format!("vp{i}r{generation}")
        }
    }

    /// Replaces a pod as its controller would after a delete: the old one's
    /// processes stop and its network goes (the CNI removes the veth); a new
    /// pod starts on the same node with a new address, and a new name unless
    /// it is a StatefulSet's (`name-N`). Services follow it. Returns the new
    /// pod.
    pub fn restart_pod(&self, namespace: Option<&str>, name: &str) -> Result<Pod> {
        let _lock = self.lock()?;
        let pods = self.pods();
        let Some((i, old)) = pods
            .iter()
            .enumerate()
            .find(|(_, p)| p.name == name && namespace.is_none_or(|n| n == p.namespace))
        else {
            return Err(LabError::NotReady(format!(
                "no pod {name} in lab {} (`tpbpf lab status` lists them)",
                self.name
            )));
        };
        let mut replaced = self.replaced();
        let generation = replaced.get(&i).map_or(0, |r| r.generation);
        self.stop_pod(old);
        let _ = ip(&[
            "-n",
            &self.node_netns(old.node),
            "link",
            "del",
            &Self::host_if(i, generation),
        ]);
        netns_del(&self.pod_netns(old));
        let _ = fs::remove_dir_all(self.pod_dir(old));

        let stateful = old
            .name
            .strip_prefix(old.workload)
            .and_then(|r| r.strip_prefix('-'))
            .is_some_and(|r| !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()));
        let new_name = if stateful {
            old.name.clone()
        } else {
            let prefix = old.name.rsplit_once('-').map_or(old.name.as_str(), |p| p.0);
            // The alphabet of Kubernetes' generated names.
            let alphabet = b"bcdfghjklmnpqrstvwxz2456789";
            let mut x = random_u64();
            let suffix: String = (0..5)
                .map(|_| {
                    let c = alphabet[(x % alphabet.len() as u64) as usize] as char;
                    x /= alphabet.len() as u64;
                    c
                })
                .collect();
            format!("{prefix}-{suffix}")
        };
        let node = spec::nodes()
            .into_iter()
            .find(|n| n.name == old.node)
            .ok_or_else(|| LabError::NotReady(format!("no node {}", old.node)))?;
        let base = node.pod_cidr.trim_end_matches("0/24");
        let new_ip = (100..250)
            .map(|n| format!("{base}{n}"))
            .find(|a| !pods.iter().any(|p| &p.ip == a))
            .ok_or_else(|| LabError::NotReady(format!("no free address on {}", node.name)))?;
        replaced.insert(
            i,
            Replaced {
                name: new_name,
                ip: new_ip,
                generation: generation + 1,
            },
        );
        write(
            &self.replaced_path(),
            &serde_json::to_string(&replaced).unwrap_or_default(),
        )?;
        let new = self.pods().swap_remove(i);
        self.pod_network(
            &self.pod_netns(&new),
            new.node,
            &new.ip,
            &Self::host_if(i, generation + 1),
        )?;
        let rules = format!("flush table ip tpbpf_lab\n{}", self.service_rules());
        for n in spec::nodes() {
            nft(&self.node_netns(n.name), &rules)?;
        }
        self.start_app(&new)?;
        self.wait_pod(&new, Instant::now() + Duration::from_secs(30))?;
        info!(
            lab = self.name,
            old = name,
            new = new.name,
            ip = new.ip,
            "pod replaced"
        );
        Ok(new)
    }

    /// One writer of the lab's pods at a time.
    fn lock(&self) -> Result<fs::File> {
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.state.join("pods.lock"))
            .map_err(|source| LabError::Io {
                what: format!(
                    "opening {}/pods.lock (is the lab up?)",
                    self.state.display()
                ),
                source,
            })?;
        // SAFETY: flock on an fd this function owns; released when it closes.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX) } != 0 {
            return Err(LabError::Io {
                what: "locking the lab's pods".into(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(f)
    }

    /// Stops a pod's processes: its server, then its sandbox.
    fn stop_pod(&self, pod: &Pod) {
        if pod.app == App::Postgres {
            let data = self.pod_dir(pod).join("data");
            if data.join("postmaster.pid").exists() {
                let _ = Command::new("runuser")
                    .args([
                        "-u",
                        "postgres",
                        "--",
                        &pg_bin("pg_ctl"),
                        "-D",
                        &data.display().to_string(),
                        "-m",
                        "immediate",
                        "-w",
                        "stop",
                    ])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        if let Some(pid) = fs::read_to_string(self.pid_file(pod))
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<i32>().ok()))
        {
            stop_pid(pid);
        }
        if let Some(pid) = fs::read_to_string(self.pod_dir(pod).join("pause.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            stop_pid(pid);
        }
    }

    pub fn status(&self) -> Status {
        let pod_specs = self.pods();
        let pods: Vec<PodStatus> = pod_specs
            .iter()
            .map(|p| {
                let pid = fs::read_to_string(self.pid_file(p))
                    .ok()
                    .and_then(|s| s.lines().next().and_then(|l| l.trim().parse().ok()));
                // SAFETY: kill with signal 0 only checks that the process exists.
                let running =
                    pid.is_some_and(|pid: u32| unsafe { libc::kill(pid as libc::pid_t, 0) } == 0);
                PodStatus {
                    namespace: p.namespace,
                    name: p.name.clone(),
                    node: p.node,
                    ip: p.ip.clone(),
                    netns: self.pod_netns(p),
                    app: p.app,
                    pid,
                    running: running && netns_exists(&self.pod_netns(p)),
                }
            })
            .collect();
        let nodes: Vec<(String, String)> = spec::nodes()
            .iter()
            .map(|n| (n.name.to_string(), self.node_netns(n.name)))
            .collect();
        let api_running = self.api_pid().is_some_and(alive);
        let agents: Vec<AgentStatus> = spec::nodes()
            .iter()
            .map(|n| {
                let pid = self.agent_pid(n.name);
                let running = pid.is_some_and(alive) && netns_exists(&self.agent_netns(n.name));
                let pod = self.agent_state(n.name);
                AgentStatus {
                    node: n.name,
                    pid: pid.map(|p| p as u32),
                    running,
                    ready: running && pod.as_ref().is_some_and(|p| p.ready),
                    restarts: pod.as_ref().map_or(0, |p| p.restart_count),
                    pod,
                }
            })
            .collect();
        let up = pods.iter().all(|p| p.running)
            && nodes.iter().all(|(_, ns)| netns_exists(ns))
            && (self.api_command.is_none() || api_running);
        Status {
            name: self.name.clone(),
            pod_specs,
            up,
            nodes,
            pods,
            agents,
            agent_runtime: self.agent_runtime(),
            services: spec::services(),
            dev_netns: self.dev_netns(),
            kubeconfig: api_running.then(|| self.kubeconfig_path()),
            kubeconfig_restricted: api_running.then(|| self.restricted_kubeconfig_path()),
            kubeconfig_exec: api_running.then(|| self.exec_kubeconfig_path()),
            api_server: api_running.then(api_url),
            ca_cert: api_running.then(|| self.pki().ca_cert()),
            api_running,
            service_cidr: spec::SERVICE_CIDR,
            pod_cidr: spec::POD_CIDR,
            node_pod_cidrs: !self.state.join("no-node-pod-cidrs").exists(),
            cluster_domain: spec::CLUSTER_DOMAIN,
        }
    }

    /// Stops the lab's servers (only the processes in its pid files) and
    /// removes its namespaces and state. Safe to run on a lab that is not up.
    pub fn down(&self) -> Result<()> {
        for pod in self.pods() {
            self.stop_pod(&pod);
        }
        if let Some(pid) = self.api_pid() {
            stop_pid(pid);
        }
        for node in spec::nodes() {
            self.stop_agent(node.name);
        }
        for pod in self.pods() {
            netns_del(&self.pod_netns(&pod));
        }
        for node in spec::nodes() {
            netns_del(&self.agent_netns(node.name));
        }
        netns_del(&self.dev_netns());
        for node in spec::nodes() {
            netns_del(&self.node_netns(node.name));
        }
        netns_del(&self.fabric_netns());
        if self.state.exists() {
            fs::remove_dir_all(&self.state).map_err(|source| LabError::Io {
                what: format!("removing {}", self.state.display()),
                source,
            })?;
        }
        Ok(())
    }
}

impl Pod {
    fn app_name(&self) -> &'static str {
        match self.app {
            App::Dns => "dnsmasq",
            App::Nginx => "nginx",
            App::Redis => "redis",
            App::Postgres => "postgres",
        }
    }
}

fn pg_bin(name: &str) -> String {
    // Debian keeps the server binaries per major version.
    let mut versions: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    versions.sort();
    versions
        .into_iter()
        .rev()
        .map(|v| v.join("bin").join(name))
        .find(|p| p.exists())
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| name.to_string())
}

/// SIGTERM, then SIGKILL after 3 s. Only for pids from the lab's pid files.
pub(crate) fn stop_pid(pid: i32) {
    // SAFETY: signals to a pid the lab recorded for a process it started.
    unsafe {
        if libc::kill(pid, libc::SIGTERM) != 0 {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        libc::kill(pid, libc::SIGKILL);
    }
}

/// The lab's API server, as kubeconfigs name it (HTTPS on the fabric).
pub fn api_url() -> String {
    format!("https://{API_ADDR}")
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if fs::File::open("/dev/urandom")
        .and_then(|mut f| io::Read::read_exact(&mut f, &mut b))
        .is_err()
    {
        return u64::from(std::process::id()) ^ Instant::now().elapsed().as_nanos() as u64;
    }
    u64::from_ne_bytes(b)
}

/// Whether a process exists and has not exited (a zombie has).
pub fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    if unsafe { libc::kill(pid, 0) } != 0 {
        return false;
    }
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .is_none_or(|zombie| !zombie)
}

/// Runs `f` on a thread that entered network namespace `name`.
pub fn in_netns<T>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T
where
    T: Default + Send + 'static,
{
    let path = PathBuf::from("/run/netns").join(name);
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let Ok(file) = fs::File::open(&path) else {
            return T::default();
        };
        // SAFETY: a valid namespace fd; affects only this short-lived thread.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return T::default();
        }
        f()
    })
    .join()
    .unwrap_or_default()
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

fn netns_add(name: &str) -> Result<()> {
    if !netns_exists(name) {
        ip(&["netns", "add", name])?;
    }
    ip(&["-n", name, "link", "set", "lo", "up"])
}

fn netns_del(name: &str) {
    if netns_exists(name) {
        let _ = Command::new("ip").args(["netns", "del", name]).status();
    }
}

fn sysctl(netns: &str, key: &str, value: &str) -> Result<()> {
    run(
        Command::new("ip").args([
            "netns",
            "exec",
            netns,
            "sh",
            "-c",
            &format!("echo {value} > /proc/sys/{key}"),
        ]),
        "needs root",
    )
}

fn nft(netns: &str, rules: &str) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| LabError::Io {
            what: "running nft (install nftables: sudo bash xtask/setup.sh)".into(),
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(rules.as_bytes());
    }
    let out = child.wait_with_output().map_err(|source| LabError::Io {
        what: "running nft".into(),
        source,
    })?;
    if !out.status.success() {
        return Err(LabError::Command {
            cmd: format!("nft -f - (in {netns})"),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            hint: "the kernel needs nf_tables with NAT",
        });
    }
    Ok(())
}

/// Starts `cmd` in a session of its own (it outlives `lab up` and the
/// terminal), its output appended to `log`. Returns its pid.
fn spawn_detached(cmd: &mut Command, log: &Path, what: &str) -> Result<u32> {
    Ok(spawn_child(cmd, log, what)?.id())
}

/// [`spawn_detached`], keeping the child to wait for (its exit status).
fn spawn_child(cmd: &mut Command, log: &Path, what: &str) -> Result<std::process::Child> {
    let out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|source| LabError::Io {
            what: format!("opening {}", log.display()),
            source,
        })?;
    let err = out.try_clone().map_err(|source| LabError::Io {
        what: format!("opening {}", log.display()),
        source,
    })?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, || {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn().map_err(|source| LabError::Io {
        what: format!("starting {what}"),
        source,
    })
}

/// A pod's process: `ip netns exec` into its namespace with the
/// environment a container would have (the pod spec's variables, PATH,
/// HOSTNAME) and nothing of the machine that runs the lab.
fn app_cmd(pod: &Pod, netns: &str) -> Command {
    let mut cmd = Command::new("ip");
    cmd.env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("HOSTNAME", &pod.name)
        .envs(pod.env.iter().copied())
        .args(["netns", "exec", netns]);
    cmd
}

fn ip(args: &[&str]) -> Result<()> {
    run(
        Command::new("ip").args(args),
        "iproute2 and root are needed",
    )
}

fn run(cmd: &mut Command, hint: &'static str) -> Result<()> {
    let out = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| LabError::Io {
            what: format!("running {cmd:?}"),
            source,
        })?;
    if !out.status.success() {
        return Err(LabError::Command {
            cmd: format!("{cmd:?}"),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            hint,
        });
    }
    Ok(())
}

fn mkdir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|source| LabError::Io {
        what: format!("creating {}", dir.display()),
        source,
    })
}

fn write(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).map_err(|source| LabError::Io {
        what: format!("writing {}", path.display()),
        source,
    })
}
