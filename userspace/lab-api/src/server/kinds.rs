//! The resource kinds the endpoint serves, and where each kind's objects
//! come from.
use serde_json::Value;

use super::Live;
use crate::objects;

/// One resource kind the endpoint serves.
pub(super) struct Kind {
    pub(super) group: &'static str,
    pub(super) version: &'static str,
    pub(super) plural: &'static str,
    pub(super) kind: &'static str,
    pub(super) namespaced: bool,
    pub(super) short: &'static [&'static str],
    /// The objects of this kind, given what runs and what was applied.
    pub(super) objects: fn(&Live) -> Vec<Value>,
}

fn to_values<T: serde::Serialize>(items: Vec<T>) -> Vec<Value> {
    items
        .into_iter()
        .filter_map(|i| serde_json::to_value(i).ok())
        .collect()
}

pub(super) fn kinds() -> Vec<Kind> {
    vec![
        Kind {
            group: "",
            version: "v1",
            plural: "namespaces",
            kind: "Namespace",
            namespaced: false,
            short: &["ns"],
            objects: |live| {
                let mut all = to_values(objects::namespaces());
                all.extend(live.store.list("namespaces"));
                all
            },
        },
        Kind {
            group: "",
            version: "v1",
            plural: "nodes",
            kind: "Node",
            namespaced: false,
            short: &["no"],
            objects: |l| to_values(objects::nodes(&l.status)),
        },
        Kind {
            group: "",
            version: "v1",
            plural: "pods",
            kind: "Pod",
            namespaced: true,
            short: &["po"],
            objects: |live| to_values(objects::pods(live)),
        },
        Kind {
            group: "",
            version: "v1",
            plural: "services",
            kind: "Service",
            namespaced: true,
            short: &["svc"],
            objects: |_| to_values(objects::services()),
        },
        Kind {
            group: "apps",
            version: "v1",
            plural: "deployments",
            kind: "Deployment",
            namespaced: true,
            short: &["deploy"],
            objects: |live| to_values(objects::deployments(&live.status)),
        },
        Kind {
            group: "apps",
            version: "v1",
            plural: "replicasets",
            kind: "ReplicaSet",
            namespaced: true,
            short: &["rs"],
            objects: |live| to_values(objects::replica_sets(&live.status)),
        },
        Kind {
            group: "apps",
            version: "v1",
            plural: "daemonsets",
            kind: "DaemonSet",
            namespaced: true,
            short: &["ds"],
            objects: |live| objects::daemon_sets(live),
        },
        Kind {
            group: "",
            version: "v1",
            plural: "serviceaccounts",
            kind: "ServiceAccount",
            namespaced: true,
            short: &["sa"],
            objects: |live| live.store.list("serviceaccounts"),
        },
        Kind {
            group: "rbac.authorization.k8s.io",
            version: "v1",
            plural: "clusterroles",
            kind: "ClusterRole",
            namespaced: false,
            short: &[],
            objects: |live| live.store.list("clusterroles"),
        },
        Kind {
            group: "rbac.authorization.k8s.io",
            version: "v1",
            plural: "roles",
            kind: "Role",
            namespaced: true,
            short: &[],
            objects: |live| live.store.list("roles"),
        },
        Kind {
            group: "rbac.authorization.k8s.io",
            version: "v1",
            plural: "clusterrolebindings",
            kind: "ClusterRoleBinding",
            namespaced: false,
            short: &[],
            objects: |live| live.store.list("clusterrolebindings"),
        },
        Kind {
            group: "rbac.authorization.k8s.io",
            version: "v1",
            plural: "rolebindings",
            kind: "RoleBinding",
            namespaced: true,
            short: &[],
            objects: |live| live.store.list("rolebindings"),
        },
        Kind {
            group: "",
            version: "v1",
            plural: "configmaps",
            kind: "ConfigMap",
            namespaced: true,
            short: &["cm"],
            objects: |live| live.client_ca_configmap(),
        },
        Kind {
            group: "",
            version: "v1",
            plural: "secrets",
            kind: "Secret",
            namespaced: true,
            short: &[],
            objects: |_| to_values(objects::secrets()),
        },
        Kind {
            group: "discovery.k8s.io",
            version: "v1",
            plural: "endpointslices",
            kind: "EndpointSlice",
            namespaced: true,
            short: &[],
            objects: |l| to_values(objects::endpoint_slices(&l.status)),
        },
        Kind {
            group: "networking.k8s.io",
            version: "v1",
            plural: "servicecidrs",
            kind: "ServiceCIDR",
            namespaced: false,
            short: &[],
            objects: |_| to_values(objects::service_cidrs()),
        },
    ]
}
