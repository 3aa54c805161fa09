//! The pods: the workloads' pods whose servers run, and tpbpf's agent
//! pods with the status the lab's kubelet keeps.
use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1::{
        Container, ContainerPort, ContainerState, ContainerStateRunning, ContainerStateTerminated,
        ContainerStateWaiting, ContainerStatus, EnvVar, EnvVarSource, Pod, PodCondition, PodIP,
        PodSpec, PodStatus, SecretKeySelector,
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time},
    jiff::Timestamp,
};
use tpbpf_lab::{
    spec::{self, App},
    Status,
};

use super::{created, labels, meta, replicaset_name, running, uid, AGENT_NAMESPACE};

fn image(app: App) -> &'static str {
    match app {
        App::Dns => "debian/dnsmasq",
        App::Nginx => "debian/nginx-light",
        App::Redis => "debian/redis-server",
        App::Postgres => "debian/postgresql",
    }
}

/// The ports an app's container declares (each named, as its service's
/// `targetPort` names it).
fn ports(app: App) -> Vec<ContainerPort> {
    let ports: &[(u16, &str)] = match app {
        App::Dns => &[(53, "UDP"), (53, "TCP")],
        App::Nginx => &[(80, "TCP")],
        App::Redis => &[(6379, "TCP")],
        App::Postgres => &[(5432, "TCP")],
    };
    ports
        .iter()
        .map(|(port, proto)| ContainerPort {
            name: Some(spec::port_name(*port, proto).into()),
            container_port: i32::from(*port),
            protocol: Some((*proto).into()),
            ..Default::default()
        })
        .collect()
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

fn workload_pods(live: &Status) -> Vec<Pod> {
    live.pod_specs
        .iter()
        .filter(|p| running(live, p.namespace, &p.name))
        .map(|p| {
            let rs = replicaset_name(p.workload);
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
                        ports: Some(ports(p.app)),
                        env: Some(
                            p.env
                                .iter()
                                .map(|(k, v)| EnvVar {
                                    name: k.to_string(),
                                    value: Some(v.to_string()),
                                    ..Default::default()
                                })
                                .chain(p.secret_env.iter().map(|s| EnvVar {
                                    name: s.name.into(),
                                    value_from: Some(EnvVarSource {
                                        secret_key_ref: Some(SecretKeySelector {
                                            name: s.secret.into(),
                                            key: s.key.into(),
                                            ..Default::default()
                                        }),
                                        ..Default::default()
                                    }),
                                    ..Default::default()
                                }))
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

/// The Secrets the lab's pods take variables from (`valueFrom.secretKeyRef`),
/// one per name and namespace, holding each key the pods read.
pub fn secrets() -> Vec<k8s_openapi::api::core::v1::Secret> {
    use k8s_openapi::{api::core::v1::Secret, ByteString};
    let mut by_name: BTreeMap<(&str, &str), BTreeMap<String, ByteString>> = BTreeMap::new();
    for p in spec::pods() {
        for s in p.secret_env {
            by_name
                .entry((p.namespace, s.secret))
                .or_default()
                .insert(s.key.into(), ByteString(s.value.as_bytes().to_vec()));
        }
    }
    by_name
        .into_iter()
        .map(|((namespace, name), data)| Secret {
            metadata: meta(name, Some(namespace), &uid("Secret", namespace, name)),
            data: Some(data),
            type_: Some("Opaque".into()),
            ..Default::default()
        })
        .collect()
}
