//! `tpbpf service`: tpbpfd as a service of its own, so that members of group
//! `tpbpf` run `tpbpf up`, `intercept`, `list`, `leave`, `status` and `down`
//! without sudo (see docs/privileges.md).
use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context, Result};
use serde_json::json;
use tpbpf_bridge_api as service;
use tpbpf_userside::args::emit;

use crate::Output;

#[derive(clap::Subcommand)]
pub enum ServiceCommand {
    /// Set tpbpfd up once: creates group `tpbpf`, then installs and starts a
    /// systemd unit (or, without systemd, e.g. WSL2, starts tpbpfd now:
    /// `tpbpf service start` after each boot).
    Install(InstallArgs),
    /// Stop tpbpfd and remove its unit (the group stays).
    Uninstall,
    /// Start tpbpfd in the background, where there is no systemd.
    Start(RunArgs),
    /// tpbpfd in the foreground (what the unit runs).
    Run(RunArgs),
}

#[derive(clap::Args)]
pub struct InstallArgs {
    /// The group whose members may use tpbpfd.
    #[arg(long, default_value = service::GROUP)]
    group: String,
    /// Print the unit instead of installing it.
    #[arg(long)]
    dry_run: bool,
    /// With --dry-run: the tpbpfd binary the unit runs (a package's
    /// /usr/bin/tpbpfd), instead of the one beside this tpbpf.
    #[arg(long, value_name = "PATH", requires = "dry_run")]
    exe: Option<PathBuf>,
}

#[derive(clap::Args, Clone)]
pub struct RunArgs {
    /// The socket to serve (default: $TPBPF_SERVICE_SOCKET or /run/tpbpf/tpbpfd.sock).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The group whose members may use tpbpfd: a name or a gid.
    #[arg(long, default_value = service::GROUP)]
    group: String,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

const UNIT_PATH: &str = "/etc/systemd/system/tpbpfd.service";
const PID_FILE: &str = "/run/tpbpf/tpbpfd.pid";
const LOG_FILE: &str = "/var/log/tpbpfd.log";

pub fn run(command: ServiceCommand) -> Result<ExitCode> {
    match command {
        ServiceCommand::Install(args) => install(args),
        ServiceCommand::Uninstall => uninstall(),
        ServiceCommand::Start(args) => start(&args).map(|_| ExitCode::SUCCESS),
        ServiceCommand::Run(args) => serve(args),
    }
}

fn require_root(what: &str) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("{what} needs root: sudo tpbpf service ...");
    }
    Ok(())
}

/// A group by name or number.
fn group_id(group: &str) -> Result<u32> {
    tpbpfd::service::group_id(group).map_err(anyhow::Error::msg)
}

/// The tpbpfd binary installed beside this tpbpf (`/usr/bin/tpbpfd` next to
/// `/usr/bin/tpbpf`; `target/*/tpbpfd` in a build).
fn tpbpfd_exe() -> Result<PathBuf> {
    let exe = std::env::current_exe()
        .and_then(|e| e.canonicalize())
        .context("finding tpbpf's own executable")?;
    let daemon = exe.with_file_name("tpbpfd");
    if !daemon.is_file() {
        bail!(
            "there is no tpbpfd beside {} ({}): install tpbpf's package, or build it (cargo build -p tpbpfd)",
            exe.display(),
            daemon.display()
        );
    }
    Ok(daemon)
}

/// tpbpfd's service in this process (`tpbpf service run`): what the
/// `tpbpfd` binary does, for a machine with tpbpf alone.
fn serve(args: RunArgs) -> Result<ExitCode> {
    require_root("tpbpfd")?;
    let gid = group_id(&args.group)?;
    let path = args.socket.clone().unwrap_or_else(service::socket_path);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(tpbpfd::service::run(&path, gid, || {
        emit(
            args.output,
            json!({"event": "ready", "pid": std::process::id(), "socket": path, "gid": gid}),
            format!(
                "tpbpfd serving {} for root and group {} (gid {gid})",
                path.display(),
                args.group
            ),
        );
    }))
    .context("tpbpfd's socket failed")?;
    Ok(ExitCode::SUCCESS)
}

/// The systemd unit running the tpbpfd binary `exe`.
fn unit(exe: &Path, group: &str) -> String {
    format!(
        "[Unit]\n\
         Description=tpbpfd: bridges this machine to Kubernetes clusters for group {group} (tpbpf service)\n\
         After=network.target\n\
         \n\
         [Service]\n\
         ExecStart={} --group {group}\n\
         Restart=on-failure\n\
         RuntimeDirectory=tpbpf\n\
         RuntimeDirectoryPreserve=yes\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n",
        exe.display()
    )
}

fn has_systemd() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

fn install(args: InstallArgs) -> Result<ExitCode> {
    if args.dry_run {
        let exe = match &args.exe {
            Some(e) => e.clone(),
            None => tpbpfd_exe()?,
        };
        print!("{}", unit(&exe, &args.group));
        return Ok(ExitCode::SUCCESS);
    }
    let exe = tpbpfd_exe()?;
    require_root("installing tpbpfd")?;
    if nix::unistd::Group::from_name(&args.group)?.is_none() {
        println!("creating group {}", args.group);
        let ok = Command::new("groupadd")
            .args(["--system", &args.group])
            .status()
            .context("running groupadd")?
            .success();
        if !ok {
            bail!("groupadd --system {} failed", args.group);
        }
    }
    if has_systemd() {
        println!("installing {UNIT_PATH} (runs {})", exe.display());
        std::fs::write(UNIT_PATH, unit(&exe, &args.group))
            .with_context(|| format!("writing {UNIT_PATH}"))?;
        for a in [
            &["daemon-reload"][..],
            &["enable", "--now", "tpbpfd.service"],
        ] {
            let ok = Command::new("systemctl").args(a).status()?.success();
            if !ok {
                bail!("systemctl {} failed", a.join(" "));
            }
        }
    } else {
        println!("no systemd here: starting tpbpfd in the background now; after each boot run `sudo tpbpf service start`");
        start(&RunArgs {
            socket: None,
            group: args.group.clone(),
            output: Output::Table,
        })?;
    }
    println!(
        "tpbpfd is running. Let a user bridge without sudo: `sudo usermod -aG {} USER` (then log in again)",
        args.group
    );
    Ok(ExitCode::SUCCESS)
}

fn running_pid() -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(PID_FILE)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let ours = args
        .first()
        .is_some_and(|a| a.ends_with(b"/tpbpfd") || *a == b"tpbpfd");
    ours.then_some(pid)
}

/// Starts tpbpfd in the background (no systemd); returns its pid.
fn start(args: &RunArgs) -> Result<u32> {
    require_root("starting tpbpfd")?;
    group_id(&args.group)?;
    if let Some(pid) = running_pid() {
        println!("tpbpfd is already running (pid {pid})");
        return Ok(pid as u32);
    }
    let exe = tpbpfd_exe()?;
    std::fs::create_dir_all("/run/tpbpf")?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(LOG_FILE)
        .with_context(|| format!("opening {LOG_FILE}"))?;
    let mut cmd = Command::new(exe);
    cmd.args(["--json", "--group", &args.group]);
    if let Some(s) = &args.socket {
        cmd.arg("--socket").arg(s);
    }
    let (mut child, stdout) = super::up::spawn_in_background(&mut cmd, log)?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
    if !line.contains("\"ready\"") {
        let _ = child.kill();
        let _ = child.wait();
        bail!("tpbpfd did not start: see {LOG_FILE}");
    }
    std::fs::write(PID_FILE, child.id().to_string())?;
    println!("tpbpfd started (pid {}, log {LOG_FILE})", child.id());
    Ok(child.id())
}

fn uninstall() -> Result<ExitCode> {
    require_root("removing tpbpfd")?;
    if Path::new(UNIT_PATH).exists() {
        let _ = Command::new("systemctl")
            .args(["disable", "--now", "tpbpfd.service"])
            .status();
        std::fs::remove_file(UNIT_PATH)?;
        let _ = Command::new("systemctl").arg("daemon-reload").status();
        println!("removed {UNIT_PATH}");
    }
    if let Some(pid) = running_pid() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
        println!("stopped tpbpfd (pid {pid})");
    }
    let _ = std::fs::remove_file(PID_FILE);
    println!(
        "tpbpfd is gone; every bridge it held is detached (group {} stays)",
        service::GROUP
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unit_runs_the_tpbpfd_binary_for_the_group() {
        let text = unit(Path::new("/usr/bin/tpbpfd"), "tpbpf");
        assert!(
            text.contains("\nExecStart=/usr/bin/tpbpfd --group tpbpf\n"),
            "{text}"
        );
        assert!(text.contains("RuntimeDirectory=tpbpf"), "{text}");
    }
}
