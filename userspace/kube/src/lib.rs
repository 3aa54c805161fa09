//! tpbpf's view of a cluster, through the user's kubeconfig like kubectl:
//! which ranges to bridge (service CIDR, pod CIDRs), the cluster DNS and
//! domain, and the namespaces names resolve in.
//!
//! One module a job: the client ([`client`](fn@client)), discovery
//! ([`discover`](fn@discover)), the agents ([`find_agent`]), workloads
//! ([`resolve_workload`]) and their watch ([`follow`](fn@follow)),
//! port-forwards ([`PortForward`]), apply ([`apply`](fn@apply)); all of it
//! is re-exported here.
pub mod access;
mod agent;
mod apply;
mod client;
mod discover;
mod error;
mod follow;
pub mod identity;
mod port_forward;
mod workload;

// The range type the modules share (`crate::Cidr`).
use tpbpf_sys::Cidr;

pub use kube::Client as KubeClient;

pub use agent::{
    agent_credentials, agent_logs, agents_ready, find_agent, find_agent_on, AgentCredentials,
    AgentInfo, AgentLogs, AGENT_DAEMONSET, AGENT_NAMESPACE, AGENT_PORT, NO_AGENT, NO_AGENT_EXIT,
};
pub use apply::{apply, delete};
pub use client::{client, on_new_socket, SocketHookFuture};
pub use discover::{discover, parse_range_error, pick_pod_ranges, ClusterInfo, Given};
pub use error::KubeError;
pub use follow::{follow, follow_namespaces, Namespaces};
pub use port_forward::{prove_port_forward, PortForward};
pub use workload::{
    interceptable, label_selector, resolve_port, resolve_workload, workload_pods, workloads,
    PortRef, Workload, WorkloadPod,
};
