//! The policy route the tc path needs: packets the tc program steered carry
//! a mark, and `fwmark MARK -> table TABLE: local 0.0.0.0/0 dev lo` makes the
//! kernel deliver them locally (to the transparent listener) although their
//! destination is a cluster address. Only marked packets are affected.
//! Installed with iproute2; removed on drop, and by an undo helper if tpbpfd
//! dies (see `undo_commands`).
use std::{io, process::Command};

use tracing::warn;

/// The mark, table and rule priority tpbpf uses by default.
pub const DEFAULT_MARK: u32 = 0x7470_0000;
pub const DEFAULT_TABLE: u32 = 7470;

pub struct PolicyRoute {
    mark: u32,
    table: u32,
}

impl PolicyRoute {
    pub fn install(mark: u32, table: u32) -> io::Result<Self> {
        let me = Self { mark, table };
        let rules = output(&["ip", "rule", "show"])?;
        let wanted = format!("fwmark {:#x} lookup {table}", mark);
        if !rules.lines().any(|l| l.contains(&wanted)) {
            run(&[
                "ip",
                "rule",
                "add",
                "fwmark",
                &format!("{mark:#x}"),
                "lookup",
                &table.to_string(),
                "pref",
                &table.to_string(),
            ])?;
        }
        run(&[
            "ip",
            "route",
            "replace",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            &table.to_string(),
        ])?;
        Ok(me)
    }

    /// The commands that undo [`PolicyRoute::install`].
    pub fn undo_commands(mark: u32, table: u32) -> Vec<Vec<String>> {
        let t = table.to_string();
        vec![
            [
                "ip",
                "rule",
                "del",
                "fwmark",
                &format!("{mark:#x}"),
                "lookup",
                &t,
                "pref",
                &t,
            ]
            .map(String::from)
            .to_vec(),
            [
                "ip",
                "route",
                "del",
                "local",
                "0.0.0.0/0",
                "dev",
                "lo",
                "table",
                &t,
            ]
            .map(String::from)
            .to_vec(),
        ]
    }
}

impl Drop for PolicyRoute {
    fn drop(&mut self) {
        for argv in Self::undo_commands(self.mark, self.table) {
            let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
            if let Err(e) = run(&refs) {
                warn!("removing tpbpf's policy route: {e}");
            }
        }
    }
}

fn output(argv: &[&str]) -> io::Result<String> {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .output()
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "running {}: {e} (tpbpf needs iproute2 for the tc path)",
                    argv.join(" ")
                ),
            )
        })?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "`{}` failed: {}",
            argv.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run(argv: &[&str]) -> io::Result<()> {
    output(argv).map(|_| ())
}

/// The interfaces in this namespace whose veth peer lives in network
/// namespace `netns` (an `ip netns` name).
pub fn ifaces_leading_to(netns: &str) -> io::Result<Vec<String>> {
    let theirs: serde_json::Value =
        serde_json::from_str(&output(&["ip", "-j", "-n", netns, "link", "show"])?)
            .map_err(io::Error::other)?;
    let ours: serde_json::Value =
        serde_json::from_str(&output(&["ip", "-j", "link", "show"])?).map_err(io::Error::other)?;
    let mut found = Vec::new();
    for link in theirs.as_array().into_iter().flatten() {
        let (Some(peer), true) = (
            link["link_index"].as_u64(),
            link.get("link_netnsid").is_some(),
        ) else {
            continue;
        };
        if let Some(name) = ours
            .as_array()
            .into_iter()
            .flatten()
            .find(|l| l["ifindex"].as_u64() == Some(peer))
            .and_then(|l| l["ifname"].as_str())
        {
            found.push(name.to_string());
        }
    }
    if found.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no interface here leads to network namespace {netns} (expected a veth pair); use --attach-iface"),
        ));
    }
    Ok(found)
}
