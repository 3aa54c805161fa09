//! `tpbpfd`: the privileged service of tpbpf, what its systemd unit runs.
//! It links no Kubernetes, HTTP or TLS code: the user's side of each bridge
//! (`tpbpf up`, `tpbpf run` as a member of group `tpbpf`) holds those.
use std::{path::PathBuf, process::ExitCode};

use clap::Parser;

/// tpbpfd: loads and attaches tpbpf's eBPF programs for root and the
/// members of a group, and hands each bridge's traffic to its user's side.
#[derive(Parser)]
#[command(name = "tpbpfd", version)]
struct Args {
    /// The socket to serve (default: $TPBPF_SERVICE_SOCKET or /run/tpbpf/tpbpfd.sock).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The group whose members may use tpbpfd: a name or a gid.
    #[arg(long, default_value = tpbpf_bridge_api::GROUP)]
    group: String,
    /// Log filter (tracing's EnvFilter syntax).
    #[arg(long, env = "TPBPF_LOG", default_value = "info")]
    log: String,
    /// Print the ready event as JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if let Some(code) = tpbpfd::tc::run_helper(&argv) {
        return code;
    }
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    match serve(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tpbpfd: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: Args) -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err(
            "tpbpfd loads eBPF programs and needs root: sudo tpbpf service install sets it up"
                .into(),
        );
    }
    let gid = tpbpfd::service::group_id(&args.group)?;
    raise_open_files();
    let path = args.socket.unwrap_or_else(tpbpf_bridge_api::socket_path);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    rt.block_on(tpbpfd::service::run(&path, gid, || {
        if args.json {
            println!(
                "{}",
                serde_json::json!({"event": "ready", "pid": std::process::id(), "socket": path, "gid": gid})
            );
        } else {
            println!(
                "tpbpfd serving {} for root and group {} (gid {gid})",
                path.display(),
                args.group
            );
        }
    }))
    .map_err(|e| e.to_string())
}

/// Every bridge holds descriptors (programs, links, listeners, handed-over
/// and forwarding sockets): the soft limit goes up to the hard one, as the
/// unit's `LimitNOFILE` does where systemd starts tpbpfd.
fn raise_open_files() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit write and read the one struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
