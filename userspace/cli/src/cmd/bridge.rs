//! `tpbpf run` (one command, in a cgroup of its own) and `tpbpf daemon`
//! (the user's side in the foreground, bridging a whole cgroup subtree):
//! arguments and composition. The user's side (`tpbpf-userside`) does the
//! work, with tpbpfd's service in this process for root, or the system's
//! tpbpfd for a user.
use std::{path::PathBuf, process::ExitCode, sync::Arc};

use anyhow::Result;
use tpbpf_userside::{args::BridgeArgs, Mode, Tpbpfd};

pub use tpbpf_userside::control::NoAgent;

#[derive(clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    bridge: BridgeArgs,
    /// Create the command's cgroup under this cgroup (default: the
    /// command's own, which is tpbpf's).
    #[arg(long)]
    cgroup_parent: Option<PathBuf>,
    /// Under sudo, run the command as root. By default it runs as the user
    /// who ran sudo (SUDO_UID/SUDO_GID, that user's groups and HOME): only
    /// tpbpf itself needs root.
    #[arg(long)]
    as_root: bool,
    /// The command to run, bridged, and its arguments.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

#[derive(clap::Args)]
pub struct DaemonArgs {
    #[command(flatten)]
    bridge: BridgeArgs,
    /// Bridge this cgroup and everything below it (default: the root of the
    /// cgroup v2 hierarchy, i.e. the whole machine).
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// Serve `tpbpf intercept`, `leave` and `list` on this unix socket.
    #[arg(long, value_name = "PATH")]
    control_socket: Option<PathBuf>,
}

/// Root's bridges are made by tpbpfd's service in this process; a user's
/// by the system's tpbpfd.
fn tpbpfd() -> Tpbpfd {
    if !nix::unistd::geteuid().is_root() {
        return Tpbpfd::Service(tpbpf_bridge_api::socket_path());
    }
    let service = tpbpfd::service::Service::new(tpbpfd::service::Policy { group: 0 });
    Tpbpfd::InProcess(Box::new(move |sock| {
        let service = Arc::clone(&service);
        Box::pin(async move {
            if let Err(e) = service.session(sock).await {
                tracing::warn!("tpbpfd in this process: {e}");
            }
        })
    }))
}

/// `tpbpf run -- CMD`: bridges CMD's process tree only, passes its exit
/// status through, removes everything afterwards.
pub fn run(args: RunArgs) -> Result<ExitCode> {
    let mode = Mode::Run {
        cgroup_parent: args.cgroup_parent,
        as_root: args.as_root,
        command: args.command,
    };
    tpbpf_userside::start(args.bridge, mode, tpbpfd())
}

/// `tpbpf daemon`: bridges a whole cgroup subtree until SIGINT or SIGTERM.
pub fn daemon(args: DaemonArgs) -> Result<ExitCode> {
    let mode = Mode::Daemon {
        cgroup: args.cgroup,
        control_socket: args.control_socket,
    };
    tpbpf_userside::start(args.bridge, mode, tpbpfd())
}
