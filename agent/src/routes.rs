//! The node's routes, as the agent reports them in `/info`: where pods live
//! when nodes carry no podCIDR (Cilium's cluster-pool, Calico's IP pools,
//! EKS's VPC CNI), tpbpf's `up` reads the ranges from them.
use std::{net::IpAddr, path::Path};

/// The node's network namespace: PID 1's (the agent has hostPID), or
/// `NODE_NETNS` where the node is not the host's root namespace (the lab).
pub fn node_netns() -> std::path::PathBuf {
    std::env::var_os("NODE_NETNS")
        .map(Into::into)
        .unwrap_or_else(|| "/proc/1/ns/net".into())
}

/// The destinations of the routes in the network namespace at `netns`
/// (main table, IPv4 and IPv6), without the default routes.
pub fn routes_in(netns: &Path) -> Result<Vec<(IpAddr, u8)>, String> {
    let ns = std::fs::File::open(netns).map_err(|e| {
        format!(
            "opening the node's network namespace {}: {e}",
            netns.display()
        )
    })?;
    tpbpf_loader::netns::run_in(&ns, || {
        // /proc/thread-self/net: this thread's namespace, not the process's.
        let v4 = std::fs::read_to_string("/proc/thread-self/net/route")
            .map_err(|e| format!("reading the node's IPv4 routes: {e}"))?;
        let v6 = std::fs::read_to_string("/proc/thread-self/net/ipv6_route").unwrap_or_default();
        Ok(parse_v4(&v4).into_iter().chain(parse_v6(&v6)).collect())
    })
    .map_err(|e| format!("the node's network namespace: {e}"))?
}

/// `/proc/net/route`: Iface Destination Gateway Flags RefCnt Use Metric
/// Mask ..., addresses in hex, in memory order.
fn parse_v4(text: &str) -> Vec<(IpAddr, u8)> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        let (Ok(dst), Ok(mask)) = (u32::from_str_radix(f[1], 16), u32::from_str_radix(f[7], 16))
        else {
            continue;
        };
        let prefix = mask.count_ones() as u8;
        if prefix == 0 {
            continue;
        }
        let addr = std::net::Ipv4Addr::from(dst.to_le_bytes());
        if !out.contains(&(addr.into(), prefix)) {
            out.push((addr.into(), prefix));
        }
    }
    out
}

/// `/proc/net/ipv6_route`: destination (32 hex digits), prefix (2), ...
fn parse_v6(text: &str) -> Vec<(IpAddr, u8)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 || f[0].len() != 32 {
            continue;
        }
        let (Ok(dst), Ok(prefix)) = (u128::from_str_radix(f[0], 16), u8::from_str_radix(f[1], 16))
        else {
            continue;
        };
        let addr = std::net::Ipv6Addr::from(dst);
        // Not the default route, local (fe80::/10, ff00::/8) or loopback.
        if prefix == 0
            || prefix > 128
            || addr.is_loopback()
            || (addr.segments()[0] & 0xffc0) == 0xfe80
            || addr.is_multicast()
        {
            continue;
        }
        if !out.contains(&(addr.into(), prefix)) {
            out.push((addr.into(), prefix));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_kernels_route_tables() {
        let v4 =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                  eth0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                  eth0\t0002F40A\t0C001FAC\t0003\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                  vp1\t0A01F40A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n";
        assert_eq!(
            parse_v4(v4),
            vec![
                ("10.244.2.0".parse().unwrap(), 24),
                ("10.244.1.10".parse().unwrap(), 32)
            ]
        );
        let v6 = "fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00000001     eth0\n\
                  00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003     eth0\n\
                  fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n";
        assert_eq!(parse_v6(v6), vec![("fd00::".parse().unwrap(), 64)]);
    }
}
