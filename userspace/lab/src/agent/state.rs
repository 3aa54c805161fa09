//! The agent pod's state as the lab's kubelet keeps it, in the lab's state
//! directory: ready, restarts, why it waits, how it last ended.
use std::{
    fs,
    path::PathBuf,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

use super::AgentRuntime;
use crate::{write, Lab, LabError, Result};

/// Why a container is not running, as `containerStatuses[].state.waiting`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Waiting {
    pub reason: String,
    pub message: String,
}

/// How a container's last run ended (`lastState.terminated`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Terminated {
    pub exit_code: i32,
    pub reason: String,
    pub message: String,
    pub started_at: u64,
    pub finished_at: u64,
}

/// The agent pod on one node as the lab's kubelet keeps it: written by the
/// kubelet on every change, read by `status` (and so by the API). Times
/// are Unix seconds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentPodState {
    /// Bumped on every change: the pod's resourceVersion.
    pub version: u64,
    /// When this pod was made (a DaemonSet change makes a new one).
    pub created_at: u64,
    /// The DaemonSet's resourceVersion it was made from (up to date or
    /// not, for `updatedNumberScheduled`).
    pub generation: String,
    pub image: String,
    pub runtime: AgentRuntime,
    /// The readiness probe passed (or there is none and the container runs).
    pub ready: bool,
    /// When `ready` last changed (the Ready condition's lastTransitionTime).
    pub ready_changed_at: u64,
    /// The last readiness probe failure, while not ready.
    pub probe_failure: Option<String>,
    pub restart_count: u32,
    /// When the running container started; `None` while it waits.
    pub started_at: Option<u64>,
    pub waiting: Option<Waiting>,
    pub last_terminated: Option<Terminated>,
    /// Whether it has run once (the pod is Running, not Pending).
    pub ever_started: bool,
}

pub fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Lab {
    fn agent_state_path(&self, node: &str) -> PathBuf {
        self.state.join(format!("agent-{node}.json"))
    }

    /// The agent pod on `node` as the kubelet last wrote it; `None` when
    /// there is none (no DaemonSet, or the kubelet has not seen it yet).
    pub fn agent_state(&self, node: &str) -> Option<AgentPodState> {
        fs::read(self.agent_state_path(node))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    }

    /// Writes the agent pod's state (atomically: readers never see half).
    pub fn set_agent_state(&self, node: &str, state: &AgentPodState) -> Result<()> {
        let path = self.agent_state_path(node);
        let tmp = path.with_extension("json.tmp");
        write(&tmp, &serde_json::to_string(state).unwrap_or_default())?;
        fs::rename(&tmp, &path).map_err(|source| LabError::Io {
            what: format!("writing {}", path.display()),
            source,
        })
    }

    /// The agent pod on `node` is gone (its DaemonSet was deleted).
    pub fn remove_agent_state(&self, node: &str) {
        let _ = fs::remove_file(self.agent_state_path(node));
    }
}
