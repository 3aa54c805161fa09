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
//!
//! The crate's files, one job each: the lab's processes and files
//! (`process`), network namespaces and the commands run in them (`netns`),
//! the fabric, nodes and pod links with kube-proxy's rules (`network`), the
//! servers in the pods, cluster DNS included (`apps`), pods replaced by
//! `lab restart` (`restart`), the API endpoint and its credentials (`api`),
//! `up` and `down` (`lifecycle`), and what `lab status` reports (`status`).
pub mod agent;
mod api;
mod apps;
pub mod kubeconfig;
mod lifecycle;
pub mod link;
mod netns;
mod network;
pub mod oci;
pub mod pki;
mod process;
mod restart;
pub mod spec;
mod status;

use std::{io, path::PathBuf};

use spec::Pod;
use thiserror::Error;

pub use netns::in_netns;
pub use process::alive;
pub(crate) use process::{mkdir, spawn_child, stop_pid, write};
pub use status::{AgentStatus, PodStatus, Status};

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
    /// A WAN between the developer machine and the cluster (`up` only),
    /// and how to start the process that is it (argv; the link's spec and
    /// interfaces are appended).
    link: Option<(link::LinkSpec, Vec<String>)>,
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
    /// `kubeconfig-restricted`: a token user who reads all but secrets and,
    /// in [`super::RESTRICTED_NAMESPACES`] only, port-forwards into, execs
    /// into and patches pods (what an intercept and a pod's environment
    /// ask); it installs nothing.
    pub const DEVELOPER_USER: &str = "lab-developer";
    /// `kubeconfig-forwarder`: a token user with a bridge's reads and
    /// `pods/portforward` in [`super::RESTRICTED_NAMESPACES`], nothing more.
    pub const FORWARDER_USER: &str = "lab-forwarder";
    /// `kubeconfig-exec`: who the exec credential plugin's token stands
    /// for (an SSO admin, as a cloud's IAM maps one), in [`ADMIN_GROUP`].
    pub const EXEC_USER: &str = "lab-sso-admin";
}

/// Where the lab's API endpoint listens: on the fabric, like a control plane
/// that the developer machine reaches while pods and services stay out of
/// its reach.
pub const API_ADDR: &str = "172.31.0.1:6443";
/// The `kubernetes` service's ClusterIP (port 443), which pods (the agent)
/// reach the API endpoint by.
pub const API_SERVICE_IP: &str = "10.96.0.1";
/// The developer machine's address on the fabric (its namespace reaches the
/// API endpoint and nothing else of the lab).
pub const DEV_IP: &str = "172.31.0.100";

impl Lab {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            state: PathBuf::from("/run/tpbpf-lab").join(name),
            api_command: None,
            agent: None,
            agent_runtime: None,
            link: None,
        }
    }

    /// A link with `spec`'s delay, rate and loss between the developer
    /// machine and the cluster, run by `argv` (in the WAN namespace).
    pub fn with_link(mut self, spec: link::LinkSpec, argv: Vec<String>) -> Self {
        self.link = Some((spec, argv));
        self
    }

    /// The namespace between the developer machine and the fabric, when
    /// the lab has a link.
    pub fn wan_netns(&self) -> String {
        format!("{}-wan", self.name)
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
}

/// The lab's API server, as kubeconfigs name it (HTTPS on the fabric).
pub fn api_url() -> String {
    format!("https://{API_ADDR}")
}
