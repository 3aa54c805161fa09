//! The machine's routes, read from the kernel over rtnetlink (the main
//! table), for `tpbpf up`'s overlap check.
use std::io;

use tpbpf_daemon::netlink;
use tpbpf_loader::Cidr;

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
