//! The workloads `tpbpf intercept` takes: finding one by name, its
//! selector, and the pods of it an intercept takes.
use std::net::IpAddr;

use k8s_openapi::{
    api::core::v1::{Pod, Service, ServicePort},
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};
use kube::{api::ListParams, Api, Client};
use serde::{Deserialize, Serialize};

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
    /// deployment, statefulset, daemonset, replicaset, pod or service.
    pub kind: &'static str,
    pub name: String,
    pub namespace: String,
    /// Its pods' label selector (`labelSelector` syntax); none for a bare
    /// pod, which is found by name.
    pub selector: Option<String>,
    /// A service's ports (its port numbers and names map to its pods'
    /// target ports).
    #[serde(skip)]
    pub service_ports: Vec<ServicePort>,
}

/// A port as a user names it: its number, or its name (a container port's
/// name, or a service port's).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

impl std::fmt::Display for PortRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PortRef::Number(n) => write!(f, "{n}"),
            PortRef::Name(n) => write!(f, "{n}"),
        }
    }
}

impl PortRef {
    /// A port name as Kubernetes takes one (IANA_SVC_NAME: at most 15
    /// lower case letters, digits and `-`, with a letter, no `--`, not at
    /// either end).
    pub fn check(&self) -> Result<(), String> {
        match self {
            PortRef::Number(0) => Err("port 0 is no port".into()),
            PortRef::Number(_) => Ok(()),
            PortRef::Name(n) => {
                let ok = (1..=15).contains(&n.len())
                    && n.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && n.bytes().any(|b| b.is_ascii_lowercase())
                    && !n.starts_with('-')
                    && !n.ends_with('-')
                    && !n.contains("--");
                if ok {
                    Ok(())
                } else {
                    Err(format!("`{n}` is not a port number or a port name (lower case letters, digits and `-`, at most 15)"))
                }
            }
        }
    }
}

/// The port of `w`'s pods that `port` names: for a service, its port (by
/// number or name) mapped to its target port; otherwise the number itself,
/// or the container port of that name in `w`'s pods.
pub async fn resolve_port(client: &Client, w: &Workload, port: &PortRef) -> Result<u16, String> {
    port.check()?;
    let target = if w.kind == "service" {
        let sp = w
            .service_ports
            .iter()
            .find(|sp| match port {
                PortRef::Number(n) => sp.port == i32::from(*n),
                PortRef::Name(name) => sp.name.as_deref() == Some(name),
            })
            .ok_or_else(|| {
                let have: Vec<String> = w
                    .service_ports
                    .iter()
                    .map(|sp| match &sp.name {
                        Some(n) => format!("{n} ({})", sp.port),
                        None => sp.port.to_string(),
                    })
                    .collect();
                format!(
                    "service {}/{} has no port {port} (it has {})",
                    w.namespace,
                    w.name,
                    have.join(", ")
                )
            })?;
        match &sp.target_port {
            None => PortRef::Number(u16::try_from(sp.port).map_err(|_| "a bad port".to_string())?),
            Some(IntOrString::Int(n)) => PortRef::Number(
                u16::try_from(*n).map_err(|_| format!("service {}: target port {n}", w.name))?,
            ),
            Some(IntOrString::String(name)) => match name.parse::<u16>() {
                Ok(n) => PortRef::Number(n),
                Err(_) => PortRef::Name(name.clone()),
            },
        }
    } else {
        port.clone()
    };
    match target {
        PortRef::Number(n) => Ok(n),
        PortRef::Name(name) => container_port(client, w, &name).await,
    }
}

/// The container port named `name` in `w`'s pods (the first pod that
/// declares it; every replica has the same spec).
async fn container_port(client: &Client, w: &Workload, name: &str) -> Result<u16, String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &w.namespace);
    let list = pods
        .list(&w.list_params().limit(20))
        .await
        .map_err(|e| format!("listing the pods of {} {}: {e}", w.kind, w.name))?;
    list.items
        .iter()
        .filter_map(|p| p.spec.as_ref())
        .flat_map(|s| s.containers.iter())
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(name))
        .and_then(|p| u16::try_from(p.container_port).ok())
        .ok_or_else(|| {
            format!(
                "no container of {} {}/{} has a port named {name} (`kubectl get pods -n {} -o yaml` shows their ports)",
                w.kind, w.namespace, w.name, w.namespace
            )
        })
}

impl Workload {
    pub(crate) fn list_params(&self) -> ListParams {
        match &self.selector {
            Some(sel) => ListParams::default().labels(sel),
            None => ListParams::default().fields(&format!("metadata.name={}", self.name)),
        }
    }

    pub(crate) fn watch_params(&self) -> kube::api::WatchParams {
        let wp = kube::api::WatchParams::default().timeout(290);
        match &self.selector {
            Some(sel) => wp.labels(sel),
            None => wp.fields(&format!("metadata.name={}", self.name)),
        }
    }
}

/// The kinds `tpbpf intercept` takes, in the order a bare name is looked
/// up, with the names `KIND/NAME` may use for them.
const WORKLOAD_KINDS: [(&str, &[&str]); 6] = [
    ("deployment", &["deployment", "deployments", "deploy"]),
    ("statefulset", &["statefulset", "statefulsets", "sts"]),
    ("daemonset", &["daemonset", "daemonsets", "ds"]),
    ("replicaset", &["replicaset", "replicasets", "rs"]),
    ("pod", &["pod", "pods", "po"]),
    // Last: a bare name is a workload's before a service's of that name.
    ("service", &["service", "services", "svc"]),
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
                    "`{target}`: tpbpf intercepts deployments, statefulsets, daemonsets, replicasets, pods and services (their selectors' pods), not `{k}`"
                ));
            };
            (vec![*kind], n)
        }
        None => (WORKLOAD_KINDS.iter().map(|(k, _)| *k).collect(), target),
    };
    let c = client.clone();
    let mut service_ports = Vec::new();
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
            "service" => Api::<Service>::namespaced(c.clone(), namespace)
                .get_opt(name)
                .await
                .map_err(get_err)?
                .map(|o| {
                    let spec = o.spec.unwrap_or_default();
                    service_ports = spec.ports.unwrap_or_default();
                    // A service without a selector (its endpoints kept by
                    // hand) selects no pod: refused below.
                    spec.selector
                        .filter(|m| !m.is_empty())
                        .map(|m| LabelSelector {
                            match_labels: Some(m),
                            match_expressions: None,
                        })
                }),
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
                        service_ports: Vec::new(),
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
                service_ports,
            });
        }
    }
    Err(format!(
        "no deployment, statefulset, daemonset, replicaset, pod or service named {name} in namespace {namespace} (`tpbpf list -n {namespace}` lists them)"
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
}
