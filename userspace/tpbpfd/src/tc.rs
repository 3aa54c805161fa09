//! The tc path's state outside the process (root's bridges only): the
//! policy route, tpbpf's filters and, before Linux 6.6, the clsact qdiscs
//! it made; removed when the bridge ends, or by a helper if tpbpfd dies.
use std::ffi::OsStr;

use tpbpf_cgroup::reaper::Reaper;
use tracing::{info, warn};

use crate::{policy, Bridge, BridgeError};

/// What the clean-up helper is told for each clsact qdisc tpbpf made.
const MADE_CLSACT: &str = "made-clsact ";

pub struct TcPath {
    route: policy::PolicyRoute,
    helper: Reaper,
    pub ifaces: Vec<String>,
    /// Interfaces whose clsact qdisc the tc path made (before Linux 6.6).
    made_clsact: Vec<String>,
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> String {
    move |e| format!("{what}: {e}")
}

impl TcPath {
    /// Attaches the tc path to `ifaces` and those leading to `netns`, with
    /// the policy route it needs and a helper that removes that route if
    /// tpbpfd dies.
    pub fn start(bridge: &mut Bridge, ifaces: &[String], netns: &[String]) -> Result<Self, String> {
        let mut ifaces = ifaces.to_vec();
        for ns in netns {
            ifaces.extend(
                policy::ifaces_leading_to(ns)
                    .map_err(io_err(format!("finding the interfaces leading to {ns}")))?,
            );
        }
        // The running binary itself, whatever its path now holds.
        let exe = std::path::Path::new("/proc/self/exe");
        let (mark, table) = (
            policy::DEFAULT_MARK.to_string(),
            policy::DEFAULT_TABLE.to_string(),
        );
        let mut argv: Vec<&OsStr> = vec!["__undo-on-exit".as_ref(), mark.as_ref(), table.as_ref()];
        argv.extend(ifaces.iter().map(|i| OsStr::new(i.as_str())));
        let mut helper = Reaper::spawn_with(exe, &argv)
            .map_err(io_err("starting the clean-up helper".into()))?;
        let route = policy::PolicyRoute::install(policy::DEFAULT_MARK, policy::DEFAULT_TABLE)
            .map_err(io_err("installing the policy route for the tc path".into()))?;
        for iface in &ifaces {
            bridge
                .attach_iface(iface)
                .map_err(|e: BridgeError| format!("attaching to interface {iface}: {e}"))?;
        }
        let made_clsact = bridge.made_clsact();
        for iface in &made_clsact {
            helper
                .tell(&format!("{MADE_CLSACT}{iface}"))
                .map_err(io_err(
                    "telling the clean-up helper about a clsact qdisc".into(),
                ))?;
        }
        info!(?ifaces, "tc path attached");
        Ok(Self {
            route,
            helper,
            ifaces,
            made_clsact,
        })
    }

    /// Called after the bridge is dropped (its filters detached).
    pub fn finish(self) {
        drop(self.route);
        for iface in &self.made_clsact {
            if let Err(e) = tpbpf_sys::netlink::remove_clsact_if_unused(iface) {
                warn!("{e}");
            }
        }
        self.helper.done();
    }
}

/// The clean-up helper's work when tpbpfd died with the tc path attached:
/// the policy route, and before Linux 6.6 (netlink filters, no tcx links
/// that end with the process) tpbpf's filter on each interface and the
/// clsact qdiscs it made, unless another program's filters are on them.
pub fn undo(mark: u32, table: u32, ifaces: &[String], told: &[u8]) {
    let _ = policy::PolicyRoute::remove(mark, table);
    for iface in ifaces {
        if let Err(e) = tpbpf_loader::remove_leftover_tc_filter(iface) {
            eprintln!("tpbpf: clean-up: {e}");
        }
    }
    for line in String::from_utf8_lossy(told).lines() {
        if let Some(iface) = line.strip_prefix(MADE_CLSACT) {
            if let Err(e) = tpbpf_sys::netlink::remove_clsact_if_unused(iface) {
                eprintln!("tpbpf: clean-up: {e}");
            }
        }
    }
}

/// What a process does when started as a clean-up helper (`__reap-cgroup
/// PATH`, `__undo-on-exit MARK TABLE IFACE...`): `None` if it was not.
pub fn run_helper(args: &[String]) -> Option<std::process::ExitCode> {
    match args {
        [cmd, path] if cmd == "__reap-cgroup" => {
            Some(match tpbpf_cgroup::reaper::run_reaper(path.into()) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tpbpf: clean-up: {e}");
                    std::process::ExitCode::FAILURE
                }
            })
        }
        [cmd, mark, table, ifaces @ ..] if cmd == "__undo-on-exit" => {
            let (Ok(mark), Ok(table)) = (mark.parse(), table.parse()) else {
                eprintln!("tpbpf: clean-up: `{mark} {table}` is not a mark and a table");
                return Some(std::process::ExitCode::FAILURE);
            };
            let told = tpbpf_cgroup::reaper::wait_for_creator_input();
            if !told.starts_with(b"done") {
                undo(mark, table, ifaces, &told);
            }
            Some(std::process::ExitCode::SUCCESS)
        }
        _ => None,
    }
}
