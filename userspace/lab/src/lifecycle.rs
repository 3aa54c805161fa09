//! `up` and `down`: bringing the whole lab up in order and waiting until it
//! answers, and removing everything it made.
use std::{
    fs,
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use tracing::info;

use crate::{
    agent,
    netns::{in_netns, netns_del},
    oci,
    process::{stop_pid, write},
    spec, Lab, LabError, Result, Status, API_ADDR,
};

impl Lab {
    /// Brings the lab up; a lab that is already fully up is left as it is.
    pub fn up(&self) -> Result<Status> {
        self.up_with(&mut |_| {})
    }

    /// [`Lab::up`], saying each step to `step` as it starts.
    pub fn up_with(&self, step: &mut dyn FnMut(&str)) -> Result<Status> {
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
            let wanted = self.link.as_ref().map(|(l, _)| l.to_string());
            if wanted.is_some() && status.link != wanted {
                return Err(LabError::NotReady(format!(
                    "lab {} is up with link {}: `tpbpf lab down --name {}` first to give it link {}",
                    self.name,
                    status.link.as_deref().unwrap_or("none"),
                    self.name,
                    wanted.unwrap_or_default()
                )));
            }
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
        step("clearing what an earlier run left");
        self.down()?;
        step("building the network (namespaces, links, routes, DNAT)");
        self.build_network()?;
        if let Some((spec, _)) = &self.link {
            step(&format!(
                "starting the link between the developer machine and the cluster ({spec})"
            ));
            self.start_link()?;
        }
        write(&self.state.join("agent-runtime"), runtime.as_str())?;
        for pod in self.pods() {
            step(&format!("starting pod {}/{}", pod.namespace, pod.name));
            self.start_app(&pod)?;
        }
        step("starting the API server and the agents");
        self.start_api()?;
        step("waiting for the API server and the pods");
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
        if let Some(pid) = std::fs::read_to_string(self.state.join("link.pid"))
            .ok()
            .and_then(|p| p.trim().parse().ok())
        {
            stop_pid(pid);
        }
        netns_del(&self.wan_netns());
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
