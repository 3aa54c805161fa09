//! What `lab status` reports: the pods, nodes and agents as they are now,
//! read from the lab's namespaces and pid files.
use std::{fs, path::PathBuf};

use serde::Serialize;

use crate::{
    agent, api_url,
    netns::netns_exists,
    process::alive,
    spec::{self, App, Pod},
    Lab,
};

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
    /// The link between the developer machine and the cluster
    /// (DELAY,RATE,LOSS), if the lab has one, and whether it runs.
    pub link: Option<String>,
    pub link_running: bool,
}

impl Lab {
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
            link: std::fs::read_to_string(self.state.join("link")).ok(),
            link_running: std::fs::read_to_string(self.state.join("link.pid"))
                .ok()
                .and_then(|p| p.trim().parse().ok())
                .is_some_and(alive),
        }
    }
}
