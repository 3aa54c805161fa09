//! The machine's routes, read from the kernel over rtnetlink (the main
//! table), for `tpbpf up`'s overlap check.
use std::io;

use tpbpf_sys::{netlink, Cidr};

/// A route of the main table: destination and outgoing interface.
#[derive(Debug, Clone)]
pub struct Route {
    pub dst: Cidr,
    pub dev: String,
}

/// Unicast routes of the main table with a destination (not the default),
/// IPv4 and IPv6.
pub fn main_table() -> io::Result<Vec<Route>> {
    let (routes, links) = netlink::in_netns(None, |h| async move {
        Ok((
            netlink::main_routes(h.clone()).await?,
            netlink::links(h).await?,
        ))
    })?;
    Ok(routes
        .into_iter()
        .filter_map(|r| {
            let dev = r
                .oif
                .and_then(|i| links.iter().find(|l| l.index == i))
                .map_or_else(String::new, |l| l.name.clone());
            Some(Route {
                dst: Cidr::new(r.dst, r.prefix_len)?,
                dev,
            })
        })
        .collect())
}

/// Routes this machine already has that overlap a range to bridge (not
/// excluded by a `never` range): a VPN or a local network that tpbpf must
/// not silently take over. Each is (range, route, device).
pub fn overlapping(cidrs: &[Cidr], never: &[Cidr]) -> Vec<(String, String, String)> {
    let routes = match main_table() {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(
                "reading the routing table over rtnetlink: {e}; not checking for overlaps"
            );
            return Vec::new();
        }
    };
    let mut found = Vec::new();
    for r in routes {
        let route = r.dst;
        for cidr in cidrs {
            let overlap = cidr.contains(route.addr()) || route.contains(cidr.addr());
            let excluded = never
                .iter()
                .any(|n| n.contains(route.addr()) && n.prefix_len() <= route.prefix_len());
            if overlap && !excluded {
                found.push((cidr.to_string(), route.to_string(), r.dev.clone()));
            }
        }
    }
    found
}

/// The error for [`overlapping`] routes, saying how to exclude them.
pub fn refuse_overlaps(cidrs: &[Cidr], never: &[Cidr]) -> anyhow::Result<()> {
    let overlaps = overlapping(cidrs, never);
    if overlaps.is_empty() {
        return Ok(());
    }
    let lines: Vec<String> = overlaps
        .iter()
        .map(|(c, r, d)| format!("  cluster range {c} overlaps route {r} (dev {d})"))
        .collect();
    anyhow::bail!(
        "the cluster's ranges overlap routes this machine already has:\n{}\nbridging them would take that traffic; exclude them with --never-proxy {} (or fix the overlap)",
        lines.join("\n"),
        overlaps.iter().map(|o| o.1.clone()).collect::<Vec<_>>().join(" --never-proxy ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every machine has a route for its loopback's network in some table;
    /// the main table read here parses, and names devices.
    #[test]
    fn reads_the_routes_of_this_namespace() {
        let routes = main_table().expect("reading routes over rtnetlink");
        for r in &routes {
            assert!(r.dst.prefix_len() > 0, "{r:?}");
        }
    }
}
