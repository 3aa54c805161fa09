//! The lab's network: the fabric bridge, the developer machine's and the
//! nodes' namespaces, each pod's veth to its node, and kube-proxy's DNAT
//! rules for the ClusterIPs.
use crate::{
    netns::{ip, netns_add, nft, sysctl},
    process::mkdir,
    spec, Lab, Result, AGENT_TUNNEL_PORT, API_ADDR, API_SERVICE_IP, DEV_IP,
};

impl Lab {
    /// Segmentation and receive offloads off on `iface` in `netns`, so
    /// frames through the link are at most the MTU.
    fn no_offloads(&self, netns: &str, iface: &str) -> Result<()> {
        let i = iface.to_string();
        // None: the namespace could not be entered.
        crate::netns::in_netns(netns, move || Some(crate::link::disable_offloads(&i)))
            .unwrap_or_else(|| Err(std::io::Error::other("cannot enter the namespace")))
            .map_err(|source| crate::LabError::Io {
                what: format!("turning offloads off on {iface} in {netns}"),
                source,
            })
    }

    /// Starts the link process (pid file `link.pid`), if the lab has one.
    pub(crate) fn start_link(&self) -> Result<()> {
        let Some((spec, argv)) = &self.link else {
            return Ok(());
        };
        let mut cmd = std::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .arg(spec.to_string())
            .args(["w0", "w1"]);
        let pid = crate::process::spawn_detached(
            &mut cmd,
            &self.state.join("link.log"),
            "the lab's link",
        )?;
        crate::process::write(&self.state.join("link.pid"), &pid.to_string())?;
        crate::process::write(&self.state.join("link"), &spec.to_string())
    }

    pub(crate) fn build_network(&self) -> Result<()> {
        mkdir(&self.state)?;
        let fabric = self.fabric_netns();
        netns_add(&fabric)?;
        ip(&["-n", &fabric, "link", "add", "lab0", "type", "bridge"])?;
        ip(&["-n", &fabric, "link", "set", "lab0", "up"])?;
        let api_ip = API_ADDR.split(':').next().unwrap_or("172.31.0.1");
        ip(&[
            "-n",
            &fabric,
            "addr",
            "add",
            &format!("{api_ip}/{}", spec::FABRIC_CIDR_PREFIX),
            "dev",
            "lab0",
        ])?;
        // The developer machine: on the fabric, so it reaches the API
        // endpoint, with no route to pods or services.
        let dev = self.dev_netns();
        netns_add(&dev)?;
        match &self.link {
            None => ip(&[
                "link", "add", "eth0", "netns", &dev, "type", "veth", "peer", "name", "dev0",
                "netns", &fabric,
            ])?,
            // The developer machine's cable goes through the WAN: eth0 to
            // w0, w1 to the fabric's dev0, the link process between.
            Some(_) => {
                let wan = self.wan_netns();
                netns_add(&wan)?;
                ip(&[
                    "link", "add", "eth0", "netns", &dev, "type", "veth", "peer", "name", "w0",
                    "netns", &wan,
                ])?;
                ip(&[
                    "link", "add", "w1", "netns", &wan, "type", "veth", "peer", "name", "dev0",
                    "netns", &fabric,
                ])?;
                for end in ["w0", "w1"] {
                    ip(&["-n", &wan, "link", "set", end, "up"])?;
                }
                self.no_offloads(&dev, "eth0")?;
                self.no_offloads(&fabric, "dev0")?;
                for end in ["w0", "w1"] {
                    self.no_offloads(&wan, end)?;
                }
            }
        }
        ip(&["-n", &fabric, "link", "set", "dev0", "master", "lab0", "up"])?;
        ip(&[
            "-n",
            &dev,
            "addr",
            "add",
            &format!("{DEV_IP}/{}", spec::FABRIC_CIDR_PREFIX),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &dev, "link", "set", "eth0", "up"])?;
        let nodes = spec::nodes();
        for (i, node) in nodes.iter().enumerate() {
            let ns = self.node_netns(node.name);
            netns_add(&ns)?;
            let port = format!("n{i}");
            ip(&[
                "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port,
                "netns", &fabric,
            ])?;
            ip(&["-n", &fabric, "link", "set", &port, "master", "lab0", "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{}/{}", node.ip, spec::FABRIC_CIDR_PREFIX),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            sysctl(&ns, "net/ipv4/ip_forward", "1")?;
        }
        // The fabric routes each node's pods through it (as a control
        // plane's network does), so pods reach the API endpoint.
        for node in &nodes {
            ip(&["-n", &fabric, "route", "add", node.pod_cidr, "via", node.ip])?;
        }
        for node in &nodes {
            let ns = self.node_netns(node.name);
            for other in nodes.iter().filter(|o| o.name != node.name) {
                ip(&["-n", &ns, "route", "add", other.pod_cidr, "via", other.ip])?;
            }
            // A route for ClusterIPs, so a connect from the node gets as far
            // as the nat hook that rewrites it (real nodes have a default route).
            ip(&["-n", &ns, "route", "add", spec::SERVICE_CIDR, "dev", "eth0"])?;
            nft(&ns, &self.service_rules())?;
        }
        for (i, pod) in self.pods().iter().enumerate() {
            self.pod_network(&self.pod_netns(pod), pod.node, &pod.ip, &format!("vp{i}"))?;
        }
        // tpbpf's agents: pods of their own (not hostNetwork). The tunnel
        // port is published as a hostPort (the CNI portmap plugin's DNAT),
        // which the developer machine reaches on the node's address for
        // `--transport direct`, as a CI runner in the cluster's network would.
        for (i, node) in nodes.iter().enumerate() {
            self.pod_network(
                &self.agent_netns(node.name),
                node.name,
                node.agent_ip,
                &format!("va{i}"),
            )?;
            nft(
                &self.node_netns(node.name),
                &format!(
                    "table ip tpbpf_lab_hostports {{\n chain prerouting {{\n  type nat hook prerouting priority dstnat; policy accept;\n  ip daddr {} tcp dport {AGENT_TUNNEL_PORT} dnat ip to {}:{AGENT_TUNNEL_PORT}\n }}\n}}\n",
                    node.ip, node.agent_ip
                ),
            )?;
        }
        Ok(())
    }

    /// A pod's network namespace `ns` on `node`: a `/32` address, a veth to
    /// the node (`host_if` on the node's side), the node's link-local
    /// gateway, and the node's route back.
    pub(crate) fn pod_network(
        &self,
        ns: &str,
        node: &str,
        pod_ip: &str,
        host_if: &str,
    ) -> Result<()> {
        let node = self.node_netns(node);
        netns_add(ns)?;
        ip(&[
            "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", host_if, "netns",
            &node,
        ])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{pod_ip}/32"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            ns,
            "route",
            "add",
            "169.254.1.1",
            "dev",
            "eth0",
            "scope",
            "link",
        ])?;
        ip(&[
            "-n",
            ns,
            "route",
            "add",
            "default",
            "via",
            "169.254.1.1",
            "dev",
            "eth0",
        ])?;
        // The pod's gateway: the same link-local address on every pod's
        // veth in the node (as Calico does).
        ip(&["-n", &node, "addr", "add", "169.254.1.1/32", "dev", host_if])?;
        ip(&["-n", &node, "link", "set", host_if, "up"])?;
        ip(&[
            "-n",
            &node,
            "route",
            "add",
            &format!("{pod_ip}/32"),
            "dev",
            host_if,
        ])?;
        Ok(())
    }

    /// kube-proxy style DNAT for every ClusterIP, in a node's nat table.
    pub(crate) fn service_rules(&self) -> String {
        let mut rules = String::new();
        let pods = self.pods();
        for svc in spec::services() {
            let eps = spec::endpoints(&svc, &pods);
            let target = if eps.len() == 1 {
                eps[0].ip.to_string()
            } else {
                let map: Vec<String> = eps
                    .iter()
                    .enumerate()
                    .map(|(i, p)| format!("{i} : {}", p.ip))
                    .collect();
                format!(
                    "numgen random mod {} map {{ {} }}",
                    eps.len(),
                    map.join(", ")
                )
            };
            for (port, proto) in svc.ports {
                rules.push_str(&format!(
                    "  ip daddr {} {proto} dport {port} dnat ip to {target}\n",
                    svc.cluster_ip
                ));
            }
        }
        // The `kubernetes` service: the API endpoint, as pods reach it.
        let api_port = API_ADDR.rsplit(':').next().unwrap_or("6443");
        rules.push_str(&format!(
            "  ip daddr {API_SERVICE_IP} tcp dport 443 dnat ip to {}:{api_port}\n",
            API_ADDR.split(':').next().unwrap_or("172.31.0.1")
        ));
        // Hairpin: a pod that reaches a service and is sent to itself is
        // masqueraded (as kube-proxy does), or it would get a packet from its
        // own address and answer it locally.
        let mut hairpin = String::new();
        for pod in self.pods() {
            hairpin.push_str(&format!(
                "  ct status dnat ip saddr {ip} ip daddr {ip} masquerade\n",
                ip = pod.ip
            ));
        }
        format!(
            "table ip tpbpf_lab {{\n chain services {{\n{rules} }}\n chain prerouting {{\n  type nat hook prerouting priority dstnat; policy accept;\n  jump services\n }}\n chain output {{\n  type nat hook output priority -100; policy accept;\n  jump services\n }}\n chain postrouting {{\n  type nat hook postrouting priority srcnat; policy accept;\n{hairpin} }}\n}}\n"
        )
    }
}
