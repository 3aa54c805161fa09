//! tpbpf's agent pod on a lab node, as a kubelet and its container runtime
//! run it: the container spec read from the DaemonSet's pod template, the
//! runtime that runs it (runc with the spec's security context where runc
//! is installed, a plain process otherwise), and the pod's state as the
//! kubelet last saw it (ready, restarts, why it waits), kept in the lab's
//! state directory so `lab status` and the API report the same thing.
//!
//! Here: how the agent runs, and a started container. The container spec
//! is in `container`, the pod's state in `state`, starting and stopping the
//! agent in `run`.
mod container;
mod run;
mod state;

use std::process::Child;

use serde::{Deserialize, Serialize};

use crate::oci;

pub use container::{ContainerSpec, Seccomp};
pub use state::{now_s, AgentPodState, Terminated, Waiting};

/// How the lab runs the agent's container.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentRuntime {
    /// An OCI runtime (runc) with the container's security context: its
    /// capabilities, seccomp profile, no-new-privileges, a read-only root.
    Runc,
    /// A plain process in the pod's network namespace, as root with every
    /// capability (no runc on the machine).
    #[default]
    Process,
}

impl AgentRuntime {
    /// runc where it is installed, a plain process otherwise.
    pub fn detect() -> Self {
        if oci::runc_installed() {
            AgentRuntime::Runc
        } else {
            AgentRuntime::Process
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AgentRuntime::Runc => "runc",
            AgentRuntime::Process => "process",
        }
    }
}

/// The pod name of the agent on `node`.
pub fn pod_name(node: &str) -> String {
    format!("tpbpf-agent-{node}")
}

/// A started agent container: the process the lab waits for (the agent
/// itself, or `runc run`, which exits with the container's status) and the
/// agent's pid.
pub struct AgentProcess {
    pub child: Child,
    pub pid: u32,
}
