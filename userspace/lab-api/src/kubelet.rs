//! The lab's nodes doing what a kubelet does for tpbpf's DaemonSet: while
//! `tpbpf-system/tpbpf-agent` is applied, every node runs the agent with
//! the container's arguments (restarted when it dies, with a back-off, and
//! when the DaemonSet changes: a rolling update); when it is deleted, the
//! agents stop.
use std::{
    collections::HashMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use tpbpf_lab::{spec, Lab};
use tracing::{info, warn};

use crate::{objects::AGENT_NAMESPACE, store::Store};

/// Between two starts of one node's agent, at least.
const BACKOFF: Duration = Duration::from_secs(2);

pub async fn run(lab: String, agent: Option<PathBuf>) {
    let Some(agent) = agent else {
        return;
    };
    let l = Lab::new(&lab).with_agent(agent);
    let store = Store::new(&lab);
    // Per node: when its agent was last started, for which generation.
    let mut started: HashMap<&'static str, (Instant, String)> = HashMap::new();
    loop {
        let ds = store.get(
            "daemonsets",
            Some(AGENT_NAMESPACE),
            tpbpf_agent_api::DAEMONSET,
        );
        for node in spec::nodes() {
            match &ds {
                None => {
                    if l.agent_running(node.name) || started.contains_key(node.name) {
                        info!(
                            node = node.name,
                            "the agent DaemonSet is gone: stopping the agent"
                        );
                        let l = l.clone();
                        let _ = tokio::task::spawn_blocking(move || l.stop_agent(node.name)).await;
                        started.remove(node.name);
                    }
                }
                Some(d) => {
                    let generation = d["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string();
                    let last = started.get(node.name);
                    let outdated = last.is_some_and(|(_, g)| *g != generation);
                    let running = l.agent_running(node.name);
                    if running && !outdated {
                        continue;
                    }
                    if last.is_some_and(|(at, _)| at.elapsed() < BACKOFF) {
                        continue;
                    }
                    let args: Vec<String> = d["spec"]["template"]["spec"]["containers"][0]["args"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|x| x.as_str().map(str::to_string))
                                .collect()
                        })
                        .unwrap_or_default();
                    if running {
                        info!(
                            node = node.name,
                            "the agent DaemonSet changed: replacing the agent"
                        );
                        let l = l.clone();
                        let _ = tokio::task::spawn_blocking(move || l.stop_agent(node.name)).await;
                    } else if last.is_some() {
                        warn!(node = node.name, "the agent exited: starting it again");
                    }
                    let l2 = l.clone();
                    let n2 = node.clone();
                    match tokio::task::spawn_blocking(move || l2.start_agent(&n2, &args)).await {
                        Ok(Ok(pid)) => info!(node = node.name, pid, "agent started"),
                        Ok(Err(e)) => warn!(node = node.name, "starting the agent: {e}"),
                        Err(e) => warn!(node = node.name, "starting the agent: {e}"),
                    }
                    started.insert(node.name, (Instant::now(), generation));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
