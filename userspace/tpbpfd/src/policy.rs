//! The policy route the tc path needs: packets the tc program steered carry
//! a mark, and `fwmark MARK -> table TABLE: local 0.0.0.0/0 dev lo` makes the
//! kernel deliver them locally (to the transparent listener) although their
//! destination is a cluster address. Only marked packets are affected.
//! Installed over rtnetlink; removed on drop, and by a helper if tpbpfd dies
//! ([`PolicyRoute::remove`]).
use std::io;

use tracing::warn;

use tpbpf_sys::netlink;

/// The mark, table and rule priority tpbpf uses by default.
pub const DEFAULT_MARK: u32 = 0x7470_0000;
pub const DEFAULT_TABLE: u32 = 7470;

pub struct PolicyRoute {
    mark: u32,
    table: u32,
}

impl PolicyRoute {
    pub fn install(mark: u32, table: u32) -> io::Result<Self> {
        netlink::in_netns(None, |h| async move {
            if netlink::fwmark_rule(h.clone(), mark, table)
                .await?
                .is_none()
            {
                netlink::add_fwmark_rule(h.clone(), mark, table, table).await?;
            }
            netlink::replace_local_default(h, table).await
        })?;
        Ok(Self { mark, table })
    }

    /// Undoes [`PolicyRoute::install`] (what is already gone is fine).
    pub fn remove(mark: u32, table: u32) -> io::Result<()> {
        netlink::in_netns(None, |h| async move {
            if let Some(rule) = netlink::fwmark_rule(h.clone(), mark, table).await? {
                netlink::del_rule(h.clone(), rule).await?;
            }
            match netlink::del_local_default(h, table).await {
                Err(e) if e.to_string().contains("No such process") => Ok(()),
                r => r,
            }
        })
    }
}

impl Drop for PolicyRoute {
    fn drop(&mut self) {
        if let Err(e) = Self::remove(self.mark, self.table) {
            warn!("removing tpbpf's policy route: {e}");
        }
    }
}

/// The interfaces in this namespace whose veth peer lives in network
/// namespace `netns` (an `ip netns` name).
pub fn ifaces_leading_to(netns: &str) -> io::Result<Vec<String>> {
    let theirs = netlink::in_netns(Some(netns), netlink::links)?;
    let ours = netlink::in_netns(None, netlink::links)?;
    let found: Vec<String> = theirs
        .iter()
        .filter(|l| l.peer_netnsid.is_some())
        .filter_map(|l| ours.iter().find(|o| Some(o.index) == l.peer))
        .map(|o| o.name.clone())
        .collect();
    if found.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no interface here leads to network namespace {netns} (expected a veth pair); use --attach-iface"),
        ));
    }
    Ok(found)
}
