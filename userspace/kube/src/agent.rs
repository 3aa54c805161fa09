//! tpbpf's agents in the cluster: where they run, what they say of
//! themselves (through a port-forward via the API server, the path the
//! tunnel takes), their credentials, and how their DaemonSet stands.
use k8s_openapi::api::core::v1::Pod;
use kube::{api::ListParams, Api, Client};
use serde::Serialize;

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
pub(crate) fn agent_selector() -> String {
    let (k, v) = tpbpf_agent_api::APP_LABEL;
    format!("{k}={v}")
}

/// The agent DaemonSet's name.
pub const AGENT_DAEMONSET: &str = tpbpf_agent_api::DAEMONSET;

/// GET `path` from the agent pod `name` through a port-forward via the API
/// server; returns the body.
pub(crate) async fn agent_get(pods: &Api<Pod>, name: &str, path: &str) -> Result<String, String> {
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
pub(crate) async fn agent_pods(client: &Client) -> Result<Vec<Pod>, String> {
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

/// Each agent pod's name and its log (or why it could not be read).
pub type AgentLogs = Vec<(String, Result<String, String>)>;

/// The last `tail_lines` lines of every agent pod's log (`pods/log`), by
/// pod name; an error for a pod whose log could not be read, or for all.
pub async fn agent_logs(client: &Client, tail_lines: i64) -> Result<AgentLogs, String> {
    use kube::api::LogParams;
    let pods: Api<Pod> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    let list = pods
        .list(&ListParams::default().labels(&agent_selector()))
        .await
        .map_err(|e| format!("listing the agents in {AGENT_NAMESPACE}: {e}"))?;
    let mut out = Vec::new();
    for p in list.items {
        let Some(name) = p.metadata.name else {
            continue;
        };
        let lp = LogParams {
            tail_lines: Some(tail_lines),
            ..LogParams::default()
        };
        let log = pods
            .logs(&name, &lp)
            .await
            .map_err(|e| format!("reading {AGENT_NAMESPACE}/{name}'s log: {e}"));
        out.push((name, log));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
