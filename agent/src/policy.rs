//! Where the agent may dial for a tunnel peer: the cluster's service and pod
//! ranges (and ranges a cluster admin adds), never loopback, link-local
//! (cloud metadata at 169.254.169.254), the node's own addresses or the
//! agent's own. A developer with a tunnel reaches what a pod could reach,
//! nothing of the node (ARCHITECTURE.md, "Security model").
use std::net::{IpAddr, SocketAddr, UdpSocket};

use tpbpf_loader::Cidr;

/// The agent's dial policy.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// The cluster's service and pod ranges.
    cluster: Vec<Cidr>,
    /// Ranges a cluster admin allows beyond them (`--allow-cidr`).
    extra: Vec<Cidr>,
    /// The node's own addresses (`--node-ip`, from the downward API).
    node: Vec<IpAddr>,
}

impl Policy {
    pub fn new(cluster: Vec<Cidr>, extra: Vec<Cidr>, node: Vec<IpAddr>) -> Self {
        Self {
            cluster,
            extra,
            node: node.into_iter().map(canonical).collect(),
        }
    }

    /// Whether the agent may dial `addr` for a tunnel peer; the refusal
    /// says why, for the developer.
    pub fn check(&self, addr: SocketAddr) -> Result<(), String> {
        let ip = canonical(addr.ip());
        let refuse = |why: &str| {
            Err(format!(
                "the agent may not dial {ip}: {why} (this cluster's tpbpf policy)"
            ))
        };
        if ip.is_loopback() {
            return refuse("loopback addresses are refused");
        }
        if link_local(ip) {
            return refuse("link-local addresses (cloud metadata among them) are refused");
        }
        if ip.is_unspecified() || ip.is_multicast() || ip == IpAddr::from([255, 255, 255, 255]) {
            return refuse("not a unicast address");
        }
        if self.node.contains(&ip) {
            return refuse("the node's own addresses are refused");
        }
        if !self
            .cluster
            .iter()
            .chain(&self.extra)
            .any(|c| c.contains(ip))
        {
            return if self.cluster.is_empty() {
                refuse("the agent knows no cluster ranges (it runs without --cluster-cidr)")
            } else {
                refuse(&format!(
                    "outside the cluster's ranges ({}); a cluster admin may allow more with \
                     the agent's --allow-cidr",
                    self.ranges()
                ))
            };
        }
        if local(ip) {
            return refuse("the agent's own addresses are refused");
        }
        Ok(())
    }

    fn ranges(&self) -> String {
        self.cluster
            .iter()
            .chain(&self.extra)
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// IPv4-mapped IPv6 addresses are their IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => (a.segments()[0] & 0xffc0) == 0xfe80,
    }
}

/// Whether `ip` is an address of the agent's own network namespace: it can
/// be bound.
fn local(ip: IpAddr) -> bool {
    UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy::new(
            vec![
                "10.96.0.0/12".parse().unwrap(),
                "10.244.0.0/16".parse().unwrap(),
            ],
            vec!["192.0.2.0/24".parse().unwrap()],
            vec!["172.31.0.11".parse().unwrap()],
        )
    }

    fn check(addr: &str) -> Result<(), String> {
        policy().check(addr.parse().unwrap())
    }

    #[test]
    fn cluster_ranges_and_allowed_extras_pass() {
        assert_eq!(check("10.96.0.10:80"), Ok(()));
        assert_eq!(check("10.244.2.7:6379"), Ok(()));
        assert_eq!(check("192.0.2.9:443"), Ok(()));
        assert_eq!(check("[::ffff:10.96.0.10]:80"), Ok(()));
    }

    #[test]
    fn the_node_and_its_loopback_and_metadata_are_refused() {
        for (addr, why) in [
            ("169.254.169.254:80", "link-local"),
            ("[fe80::1]:80", "link-local"),
            ("127.0.0.1:10250", "loopback"),
            ("[::1]:4391", "loopback"),
            ("[::ffff:127.0.0.1]:22", "loopback"),
            ("172.31.0.11:10250", "node's own"),
            ("0.0.0.0:80", "unicast"),
            ("224.0.0.1:80", "unicast"),
        ] {
            let e = check(addr).unwrap_err();
            assert!(e.contains(why), "{addr}: {e}");
            assert!(e.contains("may not dial"), "{e}");
        }
    }

    #[test]
    fn outside_the_cluster_is_refused_with_the_ranges() {
        let e = check("8.8.8.8:53").unwrap_err();
        assert!(e.contains("outside the cluster's ranges"), "{e}");
        assert!(e.contains("10.96.0.0/12"), "{e}");
        let none = Policy::default().check("10.96.0.10:80".parse().unwrap());
        assert!(none.unwrap_err().contains("--cluster-cidr"));
    }
}
