//! The agent's container as a kubelet reads it from the DaemonSet's pod
//! template: the process, its environment, its resources and its security
//! context.
use std::path::PathBuf;

use serde_json::Value;

use super::pod_name;
use crate::{oci, spec};

/// `seccompProfile.type` of a container (or its pod).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Seccomp {
    /// The runtime's default profile (containers-common's here).
    RuntimeDefault,
    /// A profile file on the node (`localhostProfile`).
    Localhost(PathBuf),
    #[default]
    Unconfined,
}

/// What a container runtime needs of one container of a pod template: the
/// process, its environment (the downward API resolved for the node), and
/// its security context.
#[derive(Clone, Debug, Default)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    /// `command`; empty: the image's entrypoint (`/tpbpf-agent`).
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub privileged: bool,
    pub caps_add: Vec<String>,
    pub caps_drop: Vec<String>,
    pub read_only_root: bool,
    /// `allowPrivilegeEscalation: false`.
    pub no_new_privileges: bool,
    pub run_as_user: u32,
    pub seccomp: Seccomp,
    /// hostPID: the node's PID namespace, not one of the pod's own.
    pub host_pid: bool,
    /// `resources.limits`: CPU in millicores, memory in bytes.
    pub cpu_limit_millis: Option<u64>,
    pub memory_limit_bytes: Option<u64>,
    /// `automountServiceAccountToken` (Kubernetes' default: true): the
    /// service account's token, CA and namespace mounted, and the
    /// `kubernetes` service in the environment.
    pub service_account: bool,
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// A Kubernetes quantity of CPU in millicores (`500m`, `1`, `1.5`).
fn cpu_millis(q: &str) -> Option<u64> {
    match q.strip_suffix('m') {
        Some(m) => m.parse().ok(),
        None => q.parse::<f64>().ok().map(|c| (c * 1000.0) as u64),
    }
}

/// A Kubernetes quantity of memory in bytes (`512Mi`, `1G`, `1000`).
fn bytes(q: &str) -> Option<u64> {
    let units: [(&str, u64); 8] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    for (suffix, mult) in units {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<u64>().ok().map(|n| n * mult);
        }
    }
    q.parse().ok()
}

fn seccomp_of(v: &Value) -> Option<Seccomp> {
    match v["type"].as_str()? {
        "RuntimeDefault" => Some(Seccomp::RuntimeDefault),
        "Localhost" => Some(Seccomp::Localhost(
            v["localhostProfile"].as_str().unwrap_or_default().into(),
        )),
        _ => Some(Seccomp::Unconfined),
    }
}

impl ContainerSpec {
    /// The first container of pod template `template` (a DaemonSet's
    /// `spec.template`) as the kubelet on `node` runs it: `fieldRef`
    /// variables resolved for the node and the agent's pod.
    pub fn from_template(template: &Value, node: &spec::Node) -> Result<Self, String> {
        let pod = &template["spec"];
        let c = &pod["containers"][0];
        if !c.is_object() {
            return Err("the pod template has no container".into());
        }
        let mut env = Vec::new();
        for e in c["env"].as_array().into_iter().flatten() {
            let Some(name) = e["name"].as_str() else {
                continue;
            };
            let value = if let Some(v) = e["value"].as_str() {
                v.to_string()
            } else if let Some(path) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                match path {
                    "spec.nodeName" => node.name.into(),
                    "status.hostIP" | "status.hostIPs" => node.ip.into(),
                    "status.podIP" | "status.podIPs" => node.agent_ip.into(),
                    "metadata.name" => pod_name(node.name),
                    "metadata.namespace" => tpbpf_agent_api::NAMESPACE.into(),
                    other => {
                        return Err(format!("env {name}: fieldPath {other} is not in the lab"))
                    }
                }
            } else {
                return Err(format!(
                    "env {name}: only value and fieldRef are in the lab"
                ));
            };
            env.push((name.to_string(), value));
        }
        let sc = &c["securityContext"];
        let seccomp = seccomp_of(&sc["seccompProfile"])
            .or_else(|| seccomp_of(&pod["securityContext"]["seccompProfile"]))
            // The kubelet's default (SeccompDefault off): unconfined.
            .unwrap_or_default();
        let limits = &c["resources"]["limits"];
        Ok(ContainerSpec {
            name: c["name"].as_str().unwrap_or("agent").to_string(),
            image: c["image"].as_str().unwrap_or_default().to_string(),
            command: strings(&c["command"]),
            args: strings(&c["args"]),
            env,
            privileged: sc["privileged"].as_bool().unwrap_or(false),
            caps_add: strings(&sc["capabilities"]["add"]),
            caps_drop: strings(&sc["capabilities"]["drop"]),
            read_only_root: sc["readOnlyRootFilesystem"].as_bool().unwrap_or(false),
            no_new_privileges: sc["allowPrivilegeEscalation"].as_bool() == Some(false),
            run_as_user: sc["runAsUser"]
                .as_u64()
                .or_else(|| pod["securityContext"]["runAsUser"].as_u64())
                .unwrap_or(0) as u32,
            seccomp,
            host_pid: pod["hostPID"].as_bool().unwrap_or(false),
            cpu_limit_millis: limits["cpu"].as_str().and_then(cpu_millis),
            memory_limit_bytes: limits["memory"].as_str().and_then(bytes),
            service_account: pod["automountServiceAccountToken"]
                .as_bool()
                .unwrap_or(true),
        })
    }

    /// The capabilities the process gets, as containerd computes them:
    /// every one when privileged, else its default set minus `drop`
    /// (`ALL`: all) plus `add`; names as `CAP_X`.
    pub fn capabilities(&self) -> Vec<String> {
        let norm = |c: &str| {
            let c = c.to_ascii_uppercase();
            if c.starts_with("CAP_") {
                c
            } else {
                format!("CAP_{c}")
            }
        };
        if self.privileged {
            return oci::ALL_CAPS.iter().map(|c| c.to_string()).collect();
        }
        let drop_all = self.caps_drop.iter().any(|c| c.eq_ignore_ascii_case("ALL"));
        let dropped: Vec<String> = self.caps_drop.iter().map(|c| norm(c.as_str())).collect();
        let mut caps: Vec<String> = if drop_all {
            Vec::new()
        } else {
            oci::DEFAULT_CAPS
                .iter()
                .map(|c| c.to_string())
                .filter(|c| !dropped.contains(c))
                .collect()
        };
        for c in &self.caps_add {
            let c = norm(c);
            if c == "CAP_ALL" {
                return oci::ALL_CAPS.iter().map(|c| c.to_string()).collect();
            }
            if !caps.contains(&c) {
                caps.push(c);
            }
        }
        caps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> spec::Node {
        spec::nodes().remove(0)
    }

    #[test]
    fn a_container_spec_is_read_from_the_daemonset_template_as_a_kubelet_reads_it() {
        let t = serde_json::json!({"spec": {"hostPID": true,
            "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "agent", "image": "x/agent:1", "args": ["serve", "--listen", "127.0.0.1:4390"],
              "env": [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                      {"name": "NODE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
                      {"name": "PLAIN", "value": "v"}],
              "resources": {"limits": {"cpu": "1", "memory": "512Mi"}},
              "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "runAsUser": 0,
                "capabilities": {"drop": ["ALL"], "add": ["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"]}}}]}});
        let c = ContainerSpec::from_template(&t, &node()).unwrap();
        assert_eq!(c.args, ["serve", "--listen", "127.0.0.1:4390"]);
        assert_eq!(
            c.env,
            [
                ("NODE_NAME".to_string(), "node1".to_string()),
                ("NODE_IP".into(), "172.31.0.11".into()),
                ("PLAIN".into(), "v".into())
            ]
        );
        assert!(c.host_pid && c.read_only_root && c.no_new_privileges);
        assert_eq!(c.seccomp, Seccomp::RuntimeDefault);
        assert_eq!(c.cpu_limit_millis, Some(1000));
        assert_eq!(c.memory_limit_bytes, Some(512 << 20));
        assert_eq!(
            c.capabilities(),
            [
                "CAP_BPF",
                "CAP_NET_ADMIN",
                "CAP_SYS_ADMIN",
                "CAP_SYS_PTRACE"
            ]
        );
    }

    #[test]
    fn capabilities_start_from_containerds_default_set() {
        let c = ContainerSpec {
            caps_drop: vec!["NET_RAW".into()],
            caps_add: vec!["NET_ADMIN".into()],
            ..Default::default()
        };
        let caps = c.capabilities();
        assert!(caps.contains(&"CAP_CHOWN".to_string()));
        assert!(caps.contains(&"CAP_NET_ADMIN".to_string()));
        assert!(!caps.contains(&"CAP_NET_RAW".to_string()));
        assert!(!caps.contains(&"CAP_SYS_ADMIN".to_string()));
    }

    #[test]
    fn quantities() {
        assert_eq!(cpu_millis("50m"), Some(50));
        assert_eq!(cpu_millis("1.5"), Some(1500));
        assert_eq!(bytes("64Mi"), Some(64 << 20));
        assert_eq!(bytes("1G"), Some(1_000_000_000));
    }
}
