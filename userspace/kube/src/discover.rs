//! Discovery: what to bridge (the service range, the pod ranges), the
//! cluster DNS, and the namespaces names resolve in.
use std::net::IpAddr;

use k8s_openapi::api::{
    core::v1::{Node, Pod, Service},
    networking::v1::ServiceCIDR,
};
use kube::{
    api::{ListParams, PostParams},
    Api, Client,
};
use serde::Serialize;
use tracing::debug;

use crate::{
    agent::{agent_get, agent_pods},
    Cidr, KubeError, AGENT_NAMESPACE,
};

/// What tpbpf needs to know about a cluster.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct ClusterInfo {
    pub context: String,
    pub server: String,
    pub service_cidrs: Vec<String>,
    pub pod_cidrs: Vec<String>,
    pub cluster_domain: String,
    /// The cluster DNS service's ClusterIP (kube-system/kube-dns).
    pub dns: Option<IpAddr>,
    /// The context's namespace (where bare names resolve); `up -n` adds more.
    pub namespaces: Vec<String>,
    /// Where the pod ranges come from, said to the user.
    pub pod_ranges_from: String,
    /// What could not be found, and what was done instead.
    pub warnings: Vec<String>,
}

/// What the user already gave, so discovery neither looks for it nor fails
/// without it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Given {
    /// `--cidr`: the ranges to bridge.
    pub ranges: bool,
    /// `--cluster-dns`.
    pub dns: bool,
}

/// Discovers what to bridge. A probe that fails becomes a warning (in
/// `warnings`) and the rest goes on; only a cluster where nothing at all
/// could be found to bridge, with no `--cidr` given, is an error.
pub async fn discover(
    client: &Client,
    context: &str,
    server: &str,
    namespace: &str,
    cluster_domain: &str,
    given: Given,
) -> Result<ClusterInfo, KubeError> {
    let mut warnings = Vec::new();
    let mut service_cidrs = Vec::new();
    let mut pod_cidrs: Vec<String> = Vec::new();
    let mut pod_ranges_from = String::from("given with --cidr");
    if !given.ranges {
        match service_cidrs_of(client).await {
            Ok(c) => service_cidrs = c,
            Err(e) => warnings.push(format!(
                "{e}; ClusterIPs are not bridged unless given with --cidr"
            )),
        }
        let (cidrs, from) = pod_ranges(client, &mut warnings).await;
        pod_cidrs = cidrs;
        pod_ranges_from = from;
        if service_cidrs.is_empty() && pod_cidrs.is_empty() {
            return Err(KubeError::NothingToBridge(format!(
                "no service range and no pod range could be found on {server} ({}): give them with --cidr CIDR",
                warnings.join("; ")
            )));
        }
    }
    let dns = if given.dns {
        None
    } else {
        match cluster_dns(client).await {
            Ok(Some(ip)) => Some(ip),
            Ok(None) => {
                warnings.push("no cluster DNS service (label k8s-app=kube-dns in kube-system): cluster names do not resolve unless given with --cluster-dns".into());
                None
            }
            Err(e) => {
                warnings.push(format!(
                    "looking for the cluster DNS: {e}; give it with --cluster-dns"
                ));
                None
            }
        }
    };
    // The context's namespace only: connecting every namespace of the
    // cluster would let one named `dev` take `pkg.go.dev`. More come from
    // `up -n NS`.
    let namespaces = vec![namespace.to_string()];
    Ok(ClusterInfo {
        context: context.to_string(),
        server: server.to_string(),
        service_cidrs,
        pod_cidrs,
        cluster_domain: cluster_domain.to_string(),
        dns,
        namespaces,
        pod_ranges_from,
        warnings,
    })
}

/// The cluster DNS service's ClusterIP: the service labelled
/// `k8s-app=kube-dns` in kube-system (kube-dns, CoreDNS, and the names
/// distributions give it, e.g. `rke2-coredns`), else `kube-dns` by name.
async fn cluster_dns(client: &Client) -> Result<Option<IpAddr>, kube::Error> {
    let services = Api::<Service>::namespaced(client.clone(), "kube-system");
    let by_label = services
        .list(&ListParams::default().labels("k8s-app=kube-dns"))
        .await?
        .items;
    let by_name = if by_label.is_empty() {
        services.get_opt("kube-dns").await?.into_iter().collect()
    } else {
        by_label
    };
    Ok(by_name
        .into_iter()
        .filter_map(|s| s.spec?.cluster_ip?.parse().ok())
        .next())
}

/// The pod ranges: the nodes' podCIDRs; without them (Cilium's
/// cluster-pool, Calico's pools, EKS's VPC CNI), the routes of the nodes
/// (as the agents see them) that hold the pods' addresses, else narrow
/// ranges around those addresses. hostNetwork pods, whose addresses are
/// their nodes', never count. Returns the ranges and where they came from.
async fn pod_ranges(client: &Client, warnings: &mut Vec<String>) -> (Vec<String>, String) {
    let mut node_ips: Vec<IpAddr> = Vec::new();
    let mut cidrs: Vec<String> = Vec::new();
    match Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .await
    {
        Ok(nodes) => {
            for n in &nodes.items {
                let spec = n.spec.clone().unwrap_or_default();
                for c in spec
                    .pod_cidrs
                    .unwrap_or_default()
                    .into_iter()
                    .chain(spec.pod_cidr)
                {
                    if !cidrs.contains(&c) {
                        cidrs.push(c);
                    }
                }
                for a in n.status.iter().flat_map(|s| s.addresses.iter().flatten()) {
                    if let Ok(ip) = a.address.parse() {
                        node_ips.push(ip);
                    }
                }
            }
        }
        Err(e) => warnings.push(format!(
            "listing nodes (for their podCIDRs): {e}; finding the pod ranges from the pods instead"
        )),
    }
    if !cidrs.is_empty() {
        return (cidrs, "the nodes' podCIDRs".into());
    }
    let pods = match Api::<Pod>::all(client.clone())
        .list(&ListParams::default())
        .await
    {
        Ok(p) => p.items,
        Err(e) => {
            warnings.push(format!(
                "listing pods (to find the pod ranges): {e}; pods are not bridged unless given with --cidr"
            ));
            return (Vec::new(), "none found".into());
        }
    };
    let mut pod_ips = Vec::new();
    for p in &pods {
        let status = p.status.as_ref();
        if let Some(ip) = status
            .and_then(|s| s.host_ip.as_deref())
            .and_then(|i| i.parse().ok())
        {
            if !node_ips.contains(&ip) {
                node_ips.push(ip);
            }
        }
        if p.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
            continue;
        }
        if let Some(ip) = status
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|i| i.parse().ok())
        {
            pod_ips.push(ip);
        }
    }
    let routes = agent_routes(client).await;
    let (ranges, from) = pick_pod_ranges(&pod_ips, &routes, &node_ips);
    (ranges.iter().map(ToString::to_string).collect(), from)
}

/// The node routes the agents report (`/info`'s `node_routes`), from a few
/// agents: each node routes to the others' pod ranges.
async fn agent_routes(client: &Client) -> Vec<Cidr> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), AGENT_NAMESPACE);
    let mut out: Vec<Cidr> = Vec::new();
    for pod in agent_pods(client)
        .await
        .unwrap_or_default()
        .into_iter()
        .take(4)
    {
        let Some(name) = pod.metadata.name else {
            continue;
        };
        let Ok(body) = agent_get(&pods, &name, "/info").await else {
            continue;
        };
        let Ok(v) = k8s_openapi::serde_json::from_str::<k8s_openapi::serde_json::Value>(&body)
        else {
            continue;
        };
        for r in v["node_routes"].as_array().into_iter().flatten() {
            if let Some(c) = r.as_str().and_then(|r| r.parse::<Cidr>().ok()) {
                if !out.contains(&c) {
                    out.push(c);
                }
            }
        }
    }
    out
}

/// Ranges that cover `pod_ips`: for each address, the widest node route
/// holding it that holds no node address (and is no wider than a /8, or
/// a /32 in IPv6); without one, its /24 (IPv6: /64), or only the address
/// itself where that would hold a node's address (pods and nodes in one
/// subnet, as with EKS's VPC CNI). Returns them and where they came from.
pub fn pick_pod_ranges(
    pod_ips: &[IpAddr],
    routes: &[Cidr],
    node_ips: &[IpAddr],
) -> (Vec<Cidr>, String) {
    let mut out: Vec<Cidr> = Vec::new();
    let (mut from_routes, mut around, mut single) = (0, 0, 0);
    let free_of_nodes = |c: &Cidr| !node_ips.iter().any(|n| c.contains(*n));
    for ip in pod_ips {
        if out.iter().any(|c| c.contains(*ip)) {
            continue;
        }
        let widest = if ip.is_ipv4() { 8 } else { 32 };
        let route = routes
            .iter()
            .filter(|r| r.contains(*ip) && r.prefix_len() >= widest && free_of_nodes(r))
            .min_by_key(|r| r.prefix_len());
        let pick = match route {
            Some(r) => {
                from_routes += 1;
                *r
            }
            None => {
                let near = Cidr::new(*ip, if ip.is_ipv4() { 24 } else { 64 });
                match near.filter(free_of_nodes) {
                    Some(c) => {
                        around += 1;
                        c
                    }
                    None => {
                        single += 1;
                        match Cidr::new(*ip, if ip.is_ipv4() { 32 } else { 128 }) {
                            Some(c) => c,
                            None => continue,
                        }
                    }
                }
            }
        };
        out.retain(|c| !pick.contains(c.addr()) || c.prefix_len() < pick.prefix_len());
        out.push(pick);
    }
    let mut from = Vec::new();
    if out.is_empty() {
        from.push("none found (no pod outside the host network)".to_string());
    }
    if from_routes > 0 {
        from.push("the nodes' routes to the pods (no podCIDR on the nodes)".into());
    }
    if around > 0 {
        from.push("/24 (IPv6 /64) around pod addresses (no podCIDR, no node route)".into());
    }
    if single > 0 {
        from.push("single pod addresses (pods share a subnet with the nodes; new pods need `tpbpf up` again or --cidr)".into());
    }
    (out, from.join("; "))
}

/// The ServiceCIDR API (Kubernetes 1.33+); else the range named in the
/// error a dry-run Service with an impossible ClusterIP gets back.
async fn service_cidrs_of(client: &Client) -> Result<Vec<String>, KubeError> {
    match Api::<ServiceCIDR>::all(client.clone())
        .list(&ListParams::default())
        .await
    {
        Ok(list) => {
            let cidrs: Vec<String> = list
                .items
                .into_iter()
                .filter_map(|s| s.spec)
                .flat_map(|s| s.cidrs.unwrap_or_default())
                .collect();
            if !cidrs.is_empty() {
                return Ok(cidrs);
            }
        }
        Err(e) => debug!("ServiceCIDR API unavailable: {e}"),
    }
    let svc: Service = serde_json_value(r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"tpbpf-cidr-probe"},"spec":{"clusterIP":"1.1.1.1","ports":[{"port":443}]}}"#)
        .map_err(KubeError::ServiceCidr)?;
    let api: Api<Service> = Api::namespaced(client.clone(), "default");
    let pp = PostParams {
        dry_run: true,
        ..Default::default()
    };
    match api.create(&pp, &svc).await {
        Ok(_) => Err(KubeError::ServiceCidr(
            "the API server accepted ClusterIP 1.1.1.1".into(),
        )),
        Err(e) => parse_range_error(&e.to_string())
            .map(|c| vec![c])
            .ok_or_else(|| KubeError::ServiceCidr(e.to_string())),
    }
}

fn serde_json_value(text: &str) -> Result<Service, String> {
    k8s_openapi::serde_json::from_str(text).map_err(|e| e.to_string())
}

/// "... The range of valid IPs is 10.96.0.0/12" -> "10.96.0.0/12".
pub fn parse_range_error(message: &str) -> Option<String> {
    let rest = message.split("range of valid IPs is ").nth(1)?;
    let cidr: String = rest
        .chars()
        .take_while(|c| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '/'))
        .collect();
    cidr.parse::<Cidr>().ok().map(|c| c.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_ranges_come_from_node_routes_never_hold_a_node_and_skip_host_network() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let cidr = |s: &str| s.parse::<Cidr>().unwrap();
        let nodes = [ip("172.31.0.11"), ip("172.31.0.12")];
        // Cilium cluster-pool: each node routes the others' /24s.
        let routes = [
            cidr("10.0.1.0/24"),
            cidr("10.0.2.0/24"),
            cidr("10.0.1.7/32"),
            cidr("172.31.0.0/24"),
            cidr("0.0.0.0/1"),
        ];
        let (r, from) = pick_pod_ranges(
            &[ip("10.0.1.7"), ip("10.0.2.9"), ip("10.0.2.10")],
            &routes,
            &nodes,
        );
        assert_eq!(r, [cidr("10.0.1.0/24"), cidr("10.0.2.0/24")]);
        assert!(from.contains("routes"), "{from}");
        // No route: a /24 around the address.
        let (r, _) = pick_pod_ranges(&[ip("10.9.8.7")], &[], &nodes);
        assert_eq!(r, [cidr("10.9.8.0/24")]);
        // EKS VPC CNI: pods in the nodes' subnet: never the node, only the pod.
        let (r, from) = pick_pod_ranges(&[ip("172.31.0.50")], &routes, &nodes);
        assert_eq!(r, [cidr("172.31.0.50/32")]);
        assert!(from.contains("single"), "{from}");
        // A wider route found later swallows the narrower ones.
        let (r, _) = pick_pod_ranges(
            &[ip("10.0.1.7")],
            &[cidr("10.0.1.7/32"), cidr("10.0.0.0/16")],
            &nodes,
        );
        assert_eq!(r, [cidr("10.0.0.0/16")]);
    }

    #[test]
    fn reads_the_service_range_from_the_api_servers_error() {
        let msg = r#"Service "tpbpf-cidr-probe" is invalid: spec.clusterIPs: Invalid value: []string{"1.1.1.1"}: failed to allocate IP 1.1.1.1: the provided IP (1.1.1.1) is not in the valid range. The range of valid IPs is 10.43.0.0/16"#;
        assert_eq!(parse_range_error(msg).as_deref(), Some("10.43.0.0/16"));
        assert_eq!(parse_range_error("something else"), None);
    }
}
