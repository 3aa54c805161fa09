//! The lab's cluster state as Kubernetes API objects (k8s-openapi types),
//! built from the same description that builds the namespaces and servers.
use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        apps::v1::{
            Deployment, DeploymentSpec, DeploymentStatus, ReplicaSet, ReplicaSetSpec,
            ReplicaSetStatus,
        },
        core::v1::{
            Container, ContainerPort, ContainerState, ContainerStateRunning,
            ContainerStateTerminated, ContainerStateWaiting, ContainerStatus, EnvVar, Namespace,
            NamespaceStatus, Node, NodeAddress, NodeCondition, NodeSpec, NodeStatus, Pod,
            PodCondition, PodIP, PodSpec, PodStatus, PodTemplateSpec, Service, ServicePort,
            ServiceSpec,
        },
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::{
        LabelSelector, LabelSelectorRequirement, ObjectMeta, OwnerReference, Time,
    },
    jiff::Timestamp,
};
use tpbpf_lab::{
    spec::{self, App},
    Status,
};

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

fn image(app: App) -> &'static str {
    match app {
        App::Dns => "debian/dnsmasq",
        App::Nginx => "debian/nginx-light",
        App::Redis => "debian/redis-server",
        App::Postgres => "debian/postgresql",
    }
}

fn port(app: App) -> (i32, &'static str) {
    match app {
        App::Dns => (53, "UDP"),
        App::Nginx => (80, "TCP"),
        App::Redis => (6379, "TCP"),
        App::Postgres => (5432, "TCP"),
    }
}

/// Deployments own their pods through a ReplicaSet; stateful apps
/// (postgres, redis, coredns here) are owned by a ReplicaSet too, to keep
/// the lab small: what matters to tpbpf is workload -> pods.
fn replicaset_name(workload: &str) -> String {
    format!("{workload}-7d4b9c")
}

fn time(secs: u64) -> Time {
    Time(Timestamp::from_second(secs as i64).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// The agent's pods: one per node the lab's kubelet runs the DaemonSet's
/// pod on, each in a pod network namespace of its own (not hostNetwork):
/// the template's spec, and the status the kubelet keeps (Ready from the
/// readiness probe, restarts, why the container waits).
pub fn agent_pods(live: &crate::server::Live) -> Vec<Pod> {
    let Some(ds) = live.store.get(
        "daemonsets",
        Some(AGENT_NAMESPACE),
        tpbpf_agent_api::DAEMONSET,
    ) else {
        return Vec::new();
    };
    let template_spec: PodSpec =
        serde_json::from_value(ds["spec"]["template"]["spec"].clone()).unwrap_or_default();
    let template_labels: Option<BTreeMap<String, String>> =
        serde_json::from_value(ds["spec"]["template"]["metadata"]["labels"].clone()).ok();
    spec::nodes()
        .into_iter()
        .filter_map(|n| {
            let a = live.status.agents.iter().find(|a| a.node == n.name)?;
            let st = a.pod.as_ref()?;
            let name = tpbpf_lab::agent::pod_name(n.name);
            let mut pod_spec = template_spec.clone();
            pod_spec.node_name = Some(n.name.into());
            let container = pod_spec
                .containers
                .first()
                .map(|c| c.name.clone())
                .unwrap_or_else(|| "agent".into());
            let ready = a.ready;
            let state = if a.running {
                ContainerState {
                    running: Some(ContainerStateRunning {
                        started_at: st.started_at.map(time),
                    }),
                    ..Default::default()
                }
            } else {
                ContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: st.waiting.as_ref().map(|w| w.reason.clone()),
                        message: st
                            .waiting
                            .as_ref()
                            .map(|w| w.message.clone())
                            .filter(|m| !m.is_empty()),
                    }),
                    ..Default::default()
                }
            };
            let last_state = st.last_terminated.as_ref().map(|t| ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code: t.exit_code,
                    reason: Some(t.reason.clone()),
                    message: Some(t.message.clone()).filter(|m| !m.is_empty()),
                    started_at: Some(time(t.started_at)),
                    finished_at: Some(time(t.finished_at)),
                    ..Default::default()
                }),
                ..Default::default()
            });
            let condition = |type_: &str, ok: bool| PodCondition {
                type_: type_.into(),
                status: if ok { "True" } else { "False" }.into(),
                last_transition_time: Some(time(
                    if type_ == "Ready" || type_ == "ContainersReady" {
                        st.ready_changed_at
                    } else {
                        st.created_at
                    },
                )),
                reason: (!ok).then(|| "ContainersNotReady".into()),
                message: (!ok).then(|| format!("containers with unready status: [{container}]")),
                ..Default::default()
            };
            let mut labels = template_labels.clone().unwrap_or_default();
            let (k, v) = tpbpf_agent_api::APP_LABEL;
            labels.insert(k.into(), v.into());
            Some(Pod {
                metadata: ObjectMeta {
                    labels: Some(labels),
                    owner_references: Some(vec![OwnerReference {
                        api_version: "apps/v1".into(),
                        kind: "DaemonSet".into(),
                        name: tpbpf_agent_api::DAEMONSET.into(),
                        uid: uid("DaemonSet", AGENT_NAMESPACE, tpbpf_agent_api::DAEMONSET),
                        controller: Some(true),
                        ..Default::default()
                    }]),
                    // A DaemonSet change makes new pods: a new uid.
                    resource_version: Some(st.version.to_string()),
                    creation_timestamp: Some(time(st.created_at)),
                    ..meta(
                        &name,
                        Some(AGENT_NAMESPACE),
                        &uid("Pod", AGENT_NAMESPACE, &format!("{name}/{}", st.created_at)),
                    )
                },
                spec: Some(pod_spec),
                status: Some(PodStatus {
                    // restartPolicy Always: Running once a container has
                    // started, crashing or not.
                    phase: Some(
                        if st.ever_started {
                            "Running"
                        } else {
                            "Pending"
                        }
                        .into(),
                    ),
                    conditions: Some(vec![
                        condition("PodScheduled", true),
                        condition("Initialized", true),
                        condition("ContainersReady", ready),
                        condition("Ready", ready),
                    ]),
                    container_statuses: Some(vec![ContainerStatus {
                        name: container,
                        image: st.image.clone(),
                        image_id: String::new(),
                        ready,
                        restart_count: st.restart_count as i32,
                        started: Some(a.running),
                        state: Some(state),
                        last_state,
                        ..Default::default()
                    }]),
                    pod_ip: Some(n.agent_ip.into()),
                    pod_ips: Some(vec![PodIP {
                        ip: n.agent_ip.into(),
                    }]),
                    host_ip: Some(n.ip.into()),
                    start_time: Some(time(st.created_at)),
                    ..Default::default()
                }),
            })
        })
        .collect()
}

/// The pods whose processes run: a pod whose server died is gone from the
/// API, as a real cluster's would be until its replacement runs; and the
/// agent's pods, while its DaemonSet is applied.
pub fn pods(live: &crate::server::Live) -> Vec<Pod> {
    let mut all = workload_pods(&live.status);
    all.extend(agent_pods(live));
    all
}

fn running(live: &Status, namespace: &str, name: &str) -> bool {
    live.pods
        .iter()
        .any(|p| p.namespace == namespace && p.name == name && p.running)
}

fn workload_pods(live: &Status) -> Vec<Pod> {
    live.pod_specs
        .iter()
        .filter(|p| running(live, p.namespace, &p.name))
        .map(|p| {
            let rs = replicaset_name(p.workload);
            let (port, proto) = port(p.app);
            Pod {
                metadata: ObjectMeta {
                    labels: Some(labels(&[("app", p.label)])),
                    owner_references: Some(vec![OwnerReference {
                        api_version: "apps/v1".into(),
                        kind: "ReplicaSet".into(),
                        name: rs.clone(),
                        uid: uid("ReplicaSet", p.namespace, &rs),
                        controller: Some(true),
                        ..Default::default()
                    }]),
                    // A replacement is a new object: a new uid, even with
                    // the same name (a StatefulSet's pod).
                    ..meta(
                        &p.name,
                        Some(p.namespace),
                        &uid("Pod", p.namespace, &format!("{}/{}", p.name, p.ip)),
                    )
                },
                spec: Some(PodSpec {
                    node_name: Some(p.node.into()),
                    containers: vec![Container {
                        name: p.label.into(),
                        image: Some(image(p.app).into()),
                        ports: Some(vec![ContainerPort {
                            container_port: port,
                            protocol: Some(proto.into()),
                            ..Default::default()
                        }]),
                        env: Some(
                            p.env
                                .iter()
                                .map(|(k, v)| EnvVar {
                                    name: k.to_string(),
                                    value: Some(v.to_string()),
                                    ..Default::default()
                                })
                                .collect(),
                        ),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                status: Some(PodStatus {
                    phase: Some("Running".into()),
                    pod_ip: Some(p.ip.clone()),
                    pod_ips: Some(vec![PodIP { ip: p.ip.clone() }]),
                    host_ip: spec::nodes()
                        .iter()
                        .find(|n| n.name == p.node)
                        .map(|n| n.ip.into()),
                    start_time: Some(Time(created())),
                    conditions: Some(vec![PodCondition {
                        type_: "Ready".into(),
                        status: "True".into(),
                        ..Default::default()
                    }]),
                    container_statuses: Some(vec![ContainerStatus {
                        name: p.label.into(),
                        image: image(p.app).into(),
                        image_id: String::new(),
                        ready: true,
                        restart_count: 0,
                        started: Some(true),
                        ..Default::default()
                    }]),
                    ..Default::default()
                }),
            }
        })
        .collect()
}

pub fn services() -> Vec<Service> {
    spec::services()
        .into_iter()
        .map(|s| Service {
            metadata: meta(
                s.name,
                Some(s.namespace),
                &uid("Service", s.namespace, s.name),
            ),
            spec: Some(ServiceSpec {
                type_: Some("ClusterIP".into()),
                cluster_ip: Some(s.cluster_ip.into()),
                cluster_ips: Some(vec![s.cluster_ip.into()]),
                selector: Some(labels(&[("app", s.selector)])),
                ports: Some(
                    s.ports
                        .iter()
                        .map(|(port, proto)| ServicePort {
                            name: Some(format!("{}-{port}", proto)),
                            port: i32::from(*port),
                            protocol: Some(proto.to_uppercase()),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect()
}

pub fn endpoint_slices(live: &Status) -> Vec<EndpointSlice> {
    spec::services()
        .into_iter()
        .map(|s| {
            let name = format!("{}-abcde", s.name);
            EndpointSlice {
                metadata: ObjectMeta {
                    labels: Some(labels(&[("kubernetes.io/service-name", s.name)])),
                    ..meta(
                        &name,
                        Some(s.namespace),
                        &uid("EndpointSlice", s.namespace, &name),
                    )
                },
                address_type: "IPv4".into(),
                endpoints: spec::endpoints(&s, &live.pod_specs)
                    .into_iter()
                    .map(|p| Endpoint {
                        addresses: vec![p.ip.clone()],
                        conditions: Some(EndpointConditions {
                            ready: Some(true),
                            ..Default::default()
                        }),
                        node_name: Some(p.node.into()),
                        ..Default::default()
                    })
                    .collect(),
                ports: Some(
                    s.ports
                        .iter()
                        .map(|(port, proto)| EndpointPort {
                            name: Some(format!("{}-{port}", proto)),
                            port: Some(i32::from(*port)),
                            protocol: Some(proto.to_uppercase()),
                            ..Default::default()
                        })
                        .collect(),
                ),
            }
        })
        .collect()
}

/// A workload of the lab: its pods, and how many of them run.
struct Workload {
    namespace: &'static str,
    name: &'static str,
    label: &'static str,
    replicas: i32,
    ready: i32,
}

fn workloads(live: &Status) -> Vec<Workload> {
    let mut out: Vec<Workload> = Vec::new();
    for p in &live.pod_specs {
        let ready = i32::from(running(live, p.namespace, &p.name));
        if let Some(w) = out
            .iter_mut()
            .find(|w| w.namespace == p.namespace && w.name == p.workload)
        {
            w.replicas += 1;
            w.ready += ready;
        } else {
            out.push(Workload {
                namespace: p.namespace,
                name: p.workload,
                label: p.label,
                replicas: 1,
                ready,
            });
        }
    }
    out
}

fn template(label: &str) -> PodTemplateSpec {
    PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels(&[("app", label)])),
            ..Default::default()
        }),
        spec: Some(PodSpec::default()),
    }
}

/// A workload's selector. PostgreSQL's uses only `matchExpressions`, as
/// charts often do, so clients must read both forms.
fn selector(label: &str) -> LabelSelector {
    if label == "postgres" {
        LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "app".into(),
                operator: "In".into(),
                values: Some(vec![label.into()]),
            }]),
            ..Default::default()
        }
    } else {
        LabelSelector {
            match_labels: Some(labels(&[("app", label)])),
            ..Default::default()
        }
    }
}

pub fn deployments(live: &Status) -> Vec<Deployment> {
    workloads(live)
        .into_iter()
        .map(|w| Deployment {
            metadata: meta(
                w.name,
                Some(w.namespace),
                &uid("Deployment", w.namespace, w.name),
            ),
            spec: Some(DeploymentSpec {
                replicas: Some(w.replicas),
                selector: selector(w.label),
                template: template(w.label),
                ..Default::default()
            }),
            status: Some(DeploymentStatus {
                replicas: Some(w.ready),
                ready_replicas: Some(w.ready),
                available_replicas: Some(w.ready),
                updated_replicas: Some(w.replicas),
                ..Default::default()
            }),
        })
        .collect()
}

pub fn replica_sets(live: &Status) -> Vec<ReplicaSet> {
    workloads(live)
        .into_iter()
        .map(|w| {
            let (ns, name, label, replicas) = (w.namespace, w.name, w.label, w.replicas);
            let rs = replicaset_name(name);
            ReplicaSet {
                metadata: ObjectMeta {
                    owner_references: Some(vec![OwnerReference {
                        api_version: "apps/v1".into(),
                        kind: "Deployment".into(),
                        name: name.into(),
                        uid: uid("Deployment", ns, name),
                        controller: Some(true),
                        ..Default::default()
                    }]),
                    ..meta(&rs, Some(ns), &uid("ReplicaSet", ns, &rs))
                },
                spec: Some(ReplicaSetSpec {
                    replicas: Some(replicas),
                    selector: selector(label),
                    template: Some(template(label)),
                    ..Default::default()
                }),
                status: Some(ReplicaSetStatus {
                    replicas: w.ready,
                    ready_replicas: Some(w.ready),
                    available_replicas: Some(w.ready),
                    ..Default::default()
                }),
            }
        })
        .collect()
}

/// The ServiceCIDR API (networking.k8s.io/v1, Kubernetes 1.33): how clients
/// discover the service range.
pub fn service_cidrs() -> Vec<k8s_openapi::api::networking::v1::ServiceCIDR> {
    use k8s_openapi::api::networking::v1::{ServiceCIDR, ServiceCIDRSpec};
    vec![ServiceCIDR {
        metadata: meta("kubernetes", None, &uid("ServiceCIDR", "", "kubernetes")),
        spec: Some(ServiceCIDRSpec {
            cidrs: Some(vec![spec::SERVICE_CIDR.into()]),
        }),
        status: None,
    }]
}

/// The DaemonSets applied to the lab (tpbpf's agent, once installed), with
/// the status of the processes the lab runs for them.
pub fn daemon_sets(live: &crate::server::Live) -> Vec<serde_json::Value> {
    let n = spec::nodes().len() as i64;
    // Ready: the readiness probe passed, as the DaemonSet controller counts.
    let ready = live.status.agents.iter().filter(|a| a.ready).count() as i64;
    let scheduled = live
        .status
        .agents
        .iter()
        .filter(|a| a.pod.is_some())
        .count() as i64;
    let updated = |version: &serde_json::Value| {
        live.status
            .agents
            .iter()
            .filter(|a| {
                a.pod
                    .as_ref()
                    .is_some_and(|p| *version == p.generation.as_str())
            })
            .count() as i64
    };
    live.store
        .list("daemonsets")
        .into_iter()
        .map(|mut d| {
            let agent = d["metadata"]["name"] == tpbpf_agent_api::DAEMONSET
                && d["metadata"]["namespace"] == AGENT_NAMESPACE;
            let (ready, scheduled, updated) = if agent {
                (ready, scheduled, updated(&d["metadata"]["resourceVersion"]))
            } else {
                (0, 0, 0)
            };
            d["status"] = serde_json::json!({
                "currentNumberScheduled": scheduled,
                // Pods made from this version of the DaemonSet.
                "updatedNumberScheduled": updated,
                "desiredNumberScheduled": n,
                "numberReady": ready,
                "numberAvailable": ready,
                "numberUnavailable": n - ready,
                "numberMisscheduled": 0,
                "observedGeneration": d["metadata"]["generation"],
            });
            d
        })
        .collect()
}
