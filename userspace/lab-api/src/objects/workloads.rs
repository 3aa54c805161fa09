//! The workloads: deployments and the replica sets that own their pods,
//! and the daemon sets applied to the lab with the status of their pods.
use k8s_openapi::{
    api::{
        apps::v1::{
            Deployment, DeploymentSpec, DeploymentStatus, ReplicaSet, ReplicaSetSpec,
            ReplicaSetStatus,
        },
        core::v1::{PodSpec, PodTemplateSpec},
    },
    apimachinery::pkg::apis::meta::v1::{
        LabelSelector, LabelSelectorRequirement, ObjectMeta, OwnerReference,
    },
};
use tpbpf_lab::{spec, Status};

use super::{labels, meta, replicaset_name, running, uid, AGENT_NAMESPACE};

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
