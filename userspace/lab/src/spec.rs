//! What the lab cluster contains. One description drives the network
//! namespaces, the servers, the DNS records, the nftables ClusterIPs and
//! (later) the Kubernetes API objects, so they always agree.
use serde::Serialize;

pub const CLUSTER_DOMAIN: &str = "cluster.local";
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
pub const POD_CIDR: &str = "10.244.0.0/16";
pub const FABRIC_CIDR_PREFIX: u8 = 24;

#[derive(Clone, Debug, Serialize)]
pub struct Node {
    pub name: &'static str,
    /// Address on the node fabric.
    pub ip: &'static str,
    pub pod_cidr: &'static str,
    /// The pod address of tpbpf's agent on this node (its own pod network
    /// namespace, not hostNetwork).
    pub agent_ip: &'static str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum App {
    /// dnsmasq answering `*.svc.cluster.local` (the cluster DNS).
    Dns,
    Nginx,
    Redis,
    Postgres,
}

#[derive(Clone, Debug, Serialize)]
pub struct Pod {
    /// Its name now: `tpbpf lab restart` gives a deployment's pod a new one.
    pub name: String,
    pub namespace: &'static str,
    pub node: &'static str,
    /// Its address now: a restarted pod gets a new one.
    pub ip: String,
    pub app: App,
    /// The `app` label; services select on it.
    pub label: &'static str,
    /// The owning workload (deployment or statefulset) name.
    pub workload: &'static str,
    pub env: &'static [(&'static str, &'static str)],
    /// Variables from a Secret (`valueFrom.secretKeyRef`): the pod spec
    /// names the secret and key, the process has the value.
    pub secret_env: &'static [SecretEnv],
}

/// An environment variable a pod takes from a Secret's key.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct SecretEnv {
    pub name: &'static str,
    pub secret: &'static str,
    pub key: &'static str,
    pub value: &'static str,
}

/// The web pods' API token, from Secret `default/web-api`: what a pod's
/// environment must not give to someone who may not read it.
pub const WEB_API_TOKEN: SecretEnv = SecretEnv {
    name: "WEB_API_TOKEN",
    secret: "web-api",
    key: "token",
    value: "lab-web-api-token-0f3c9a",
};

#[derive(Clone, Debug, Serialize)]
pub struct Service {
    pub name: &'static str,
    pub namespace: &'static str,
    pub cluster_ip: &'static str,
    /// (port, protocol) pairs; the target port is the same.
    pub ports: &'static [(u16, &'static str)],
    /// The `app` label value it selects.
    pub selector: &'static str,
}

/// The name a port of the lab's services and containers goes by, as their
/// charts name them (CoreDNS's `dns` and `dns-tcp`, `http`, `redis`,
/// `postgres`): services refer to their pods' ports by these names.
pub fn port_name(port: u16, proto: &str) -> &'static str {
    match (port, proto.to_ascii_lowercase().as_str()) {
        (53, "udp") => "dns",
        (53, _) => "dns-tcp",
        (80, _) => "http",
        (6379, _) => "redis",
        (5432, _) => "postgres",
        _ => "port",
    }
}

pub fn nodes() -> Vec<Node> {
    vec![
        Node {
            name: "node1",
            ip: "172.31.0.11",
            pod_cidr: "10.244.1.0/24",
            agent_ip: "10.244.1.250",
        },
        Node {
            name: "node2",
            ip: "172.31.0.12",
            pod_cidr: "10.244.2.0/24",
            agent_ip: "10.244.2.250",
        },
    ]
}

pub fn pods() -> Vec<Pod> {
    vec![
        Pod {
            name: "coredns-0".into(),
            namespace: "kube-system",
            node: "node1",
            ip: "10.244.1.2".into(),
            app: App::Dns,
            label: "kube-dns",
            workload: "coredns",
            env: &[],
            secret_env: &[],
        },
        Pod {
            name: "web-7d4b9c-a1".into(),
            namespace: "default",
            node: "node1",
            ip: "10.244.1.10".into(),
            app: App::Nginx,
            label: "web",
            workload: "web",
            env: &[
                ("WEB_GREETING", "hello from the lab"),
                ("WEB_COLOR", "blue"),
            ],
            secret_env: &[WEB_API_TOKEN],
        },
        Pod {
            name: "web-7d4b9c-b2".into(),
            namespace: "default",
            node: "node2",
            ip: "10.244.2.10".into(),
            app: App::Nginx,
            label: "web",
            workload: "web",
            env: &[
                ("WEB_GREETING", "hello from the lab"),
                ("WEB_COLOR", "blue"),
            ],
            secret_env: &[WEB_API_TOKEN],
        },
        Pod {
            name: "redis-0".into(),
            namespace: "cache",
            node: "node2",
            ip: "10.244.2.20".into(),
            app: App::Redis,
            label: "redis",
            workload: "redis",
            env: &[],
            secret_env: &[],
        },
        Pod {
            name: "postgres-0".into(),
            namespace: "db",
            node: "node1",
            ip: "10.244.1.30".into(),
            app: App::Postgres,
            label: "postgres",
            workload: "postgres",
            env: &[("POSTGRES_USER", "lab"), ("POSTGRES_DB", "lab")],
            secret_env: &[],
        },
    ]
}

pub fn services() -> Vec<Service> {
    vec![
        Service {
            name: "kube-dns",
            namespace: "kube-system",
            cluster_ip: "10.96.0.10",
            ports: &[(53, "udp"), (53, "tcp")],
            selector: "kube-dns",
        },
        Service {
            name: "web",
            namespace: "default",
            cluster_ip: "10.96.0.20",
            ports: &[(80, "tcp")],
            selector: "web",
        },
        Service {
            name: "redis",
            namespace: "cache",
            cluster_ip: "10.96.0.30",
            ports: &[(6379, "tcp")],
            selector: "redis",
        },
        Service {
            name: "postgres",
            namespace: "db",
            cluster_ip: "10.96.0.40",
            ports: &[(5432, "tcp")],
            selector: "postgres",
        },
    ]
}

/// The pods of `pods` a service selects, in the same namespace.
pub fn endpoints<'a>(svc: &Service, pods: &'a [Pod]) -> Vec<&'a Pod> {
    pods.iter()
        .filter(|p| p.namespace == svc.namespace && p.label == svc.selector)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_service_has_endpoints_and_every_pod_a_node() {
        for s in services() {
            assert!(
                !endpoints(&s, &pods()).is_empty(),
                "{} selects no pod",
                s.name
            );
        }
        let nodes = nodes();
        for p in pods() {
            let node = nodes
                .iter()
                .find(|n| n.name == p.node)
                .expect("pod on a known node");
            let prefix = node.pod_cidr.trim_end_matches("0/24");
            assert!(
                p.ip.starts_with(prefix),
                "{} outside its node's pod CIDR",
                p.name
            );
        }
    }
}
