//! The lab's cluster state as Kubernetes API objects (k8s-openapi types),
//! built from the same description that builds the namespaces and servers.
//!
//! Here: what every object is made with, and the namespaces and nodes;
//! the pods in `pods`, the services and their endpoints in `services`, the
//! workloads (deployments, replica sets, daemon sets) in `workloads`.
mod pods;
mod services;
mod workloads;

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{
        Namespace, NamespaceStatus, Node, NodeAddress, NodeCondition, NodeSpec, NodeStatus,
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    jiff::Timestamp,
};
use tpbpf_lab::{spec, Status};

pub use pods::{agent_pods, pods, secrets};
pub use services::{endpoint_slices, service_cidrs, services};
pub use workloads::{daemon_sets, deployments, replica_sets};

fn meta(name: &str, namespace: Option<&str>, uid: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: namespace.map(str::to_string),
        uid: Some(uid.to_string()),
        resource_version: Some("1".into()),
        creation_timestamp: Some(Time(created())),
        ..Default::default()
    }
}

/// When the lab "cluster" was created: fixed, so objects are stable.
fn created() -> Timestamp {
    Timestamp::from_second(1_767_225_600).unwrap_or(Timestamp::UNIX_EPOCH)
}

pub(crate) fn uid(kind: &str, ns: &str, name: &str) -> String {
    // Stable, unique per object; shaped like a UUID.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in format!("{kind}/{ns}/{name}").bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100000001b3);
    }
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        h >> 32,
        (h >> 16) & 0xffff,
        h & 0xfff,
        (h >> 20) & 0xfff,
        h & 0xffff_ffff_ffff
    )
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// tpbpf's own namespace, where its agent DaemonSet runs.
pub const AGENT_NAMESPACE: &str = tpbpf_agent_api::NAMESPACE;

pub fn namespaces() -> Vec<Namespace> {
    // tpbpf's own namespace comes with `tpbpf install` (the store).
    let mut names: Vec<&str> = vec!["default", "kube-system"];
    for p in spec::pods() {
        if !names.contains(&p.namespace) {
            names.push(p.namespace);
        }
    }
    names
        .into_iter()
        .map(|n| Namespace {
            metadata: ObjectMeta {
                labels: Some(labels(&[("kubernetes.io/metadata.name", n)])),
                ..meta(n, None, &uid("Namespace", "", n))
            },
            status: Some(NamespaceStatus {
                phase: Some("Active".into()),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect()
}

pub fn nodes(live: &Status) -> Vec<Node> {
    spec::nodes()
        .into_iter()
        .map(|n| Node {
            metadata: ObjectMeta {
                labels: Some(labels(&[
                    ("kubernetes.io/hostname", n.name),
                    ("kubernetes.io/os", "linux"),
                ])),
                ..meta(n.name, None, &uid("Node", "", n.name))
            },
            spec: Some(NodeSpec {
                pod_cidr: live.node_pod_cidrs.then(|| n.pod_cidr.into()),
                pod_cidrs: live.node_pod_cidrs.then(|| vec![n.pod_cidr.into()]),
                ..Default::default()
            }),
            status: Some(NodeStatus {
                addresses: Some(vec![
                    NodeAddress {
                        type_: "InternalIP".into(),
                        address: n.ip.into(),
                    },
                    NodeAddress {
                        type_: "Hostname".into(),
                        address: n.name.into(),
                    },
                ]),
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        })
        .collect()
}

/// Deployments own their pods through a ReplicaSet; stateful apps
/// (postgres, redis, coredns here) are owned by a ReplicaSet too, to keep
/// the lab small: what matters to tpbpf is workload -> pods.
fn replicaset_name(workload: &str) -> String {
    format!("{workload}-7d4b9c")
}

fn running(live: &Status, namespace: &str, name: &str) -> bool {
    live.pods
        .iter()
        .any(|p| p.namespace == namespace && p.name == name && p.running)
}
