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

use super::recorded::{Process, Recorded};
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
pub const LOG_FILE: &str = "/var/log/tpbpfd.log";

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

/// Where `service install` and `service start` copy tpbpfd when the one
/// beside tpbpf could be changed by someone other than root.
const INSTALLED_DAEMON: &str = "/usr/local/libexec/tpbpf/tpbpfd";

/// Why root must not run `path`: it, or a directory above it, is not
/// root's, or group or others may write it (who may write there may
/// replace what root runs). `None`: only root can change it.
fn not_roots(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let mut at = Some(path);
    while let Some(p) = at {
        let meta = match std::fs::metadata(p) {
            Ok(m) => m,
            Err(e) => return Some(format!("{}: {e}", p.display())),
        };
        if meta.uid() != 0 {
            return Some(format!("{} belongs to uid {}", p.display(), meta.uid()));
        }
        // A sticky directory (/tmp) still lets others add entries.
        if meta.mode() & 0o022 != 0 {
            return Some(format!(
                "{} may be written by others (mode {:o})",
                p.display(),
                meta.mode() & 0o7777
            ));
        }
        at = p.parent();
    }
    None
}

/// The tpbpfd root will run: the one beside tpbpf where only root can
/// change it; else a copy at [`INSTALLED_DAEMON`] (made unless `dry_run`).
fn daemon_for_root(dry_run: bool) -> Result<PathBuf> {
    let daemon = tpbpfd_exe()?;
    let Some(why) = not_roots(&daemon) else {
        return Ok(daemon);
    };
    let to = PathBuf::from(INSTALLED_DAEMON);
    eprintln!(
        "tpbpf: {} is not root's to run ({why}): {} a root-owned copy at {INSTALLED_DAEMON}",
        daemon.display(),
        if dry_run {
            "the unit would run"
        } else {
            "running"
        }
    );
    if dry_run {
        return Ok(to);
    }
    copy_for_root(&daemon, &to)?;
    Ok(to)
}

/// Copies `from` to `to` as root's, 0755, made under a temporary name and
/// renamed into place; refuses a directory there that is not root's.
fn copy_for_root(from: &Path, to: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = to.parent().context("a file with no directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("making {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    if let Some(why) = not_roots(dir) {
        bail!("{why}: not copying tpbpfd there");
    }
    let tmp = to.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::copy(from, &tmp)
        .with_context(|| format!("copying {} to {}", from.display(), tmp.display()))?;
    std::os::unix::fs::chown(&tmp, Some(0), Some(0))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
    std::fs::rename(&tmp, to)?;
    Ok(())
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
         LimitNOFILE=65536\n\
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
            None => daemon_for_root(true)?,
        };
        print!("{}", unit(&exe, &args.group));
        return Ok(ExitCode::SUCCESS);
    }
    require_root("installing tpbpfd")?;
    let exe = daemon_for_root(false)?;
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

/// The tpbpfd that `PID_FILE` records, if it still runs: the same process
/// (pid and start time, see [`Recorded`]), and a `tpbpfd` by its command
/// line. A pid file of a process that is gone names nothing, whatever now
/// has its pid.
fn running() -> Option<(Recorded, Process)> {
    running_in(Path::new(PID_FILE))
}

fn running_in(pid_file: &Path) -> Option<(Recorded, Process)> {
    let recorded = Recorded::parse_line(&std::fs::read_to_string(pid_file).ok()?)?;
    let process = recorded.open()?;
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", recorded.pid)).ok()?;
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let ours = args
        .first()
        .is_some_and(|a| a.ends_with(b"/tpbpfd") || *a == b"tpbpfd");
    (ours && process.alive()).then_some((recorded, process))
}

/// Starts tpbpfd in the background (no systemd); returns its pid.
fn start(args: &RunArgs) -> Result<u32> {
    require_root("starting tpbpfd")?;
    group_id(&args.group)?;
    if let Some((recorded, _)) = running() {
        println!("tpbpfd is already running (pid {})", recorded.pid);
        return Ok(recorded.pid as u32);
    }
    let exe = daemon_for_root(false)?;
    std::fs::create_dir_all("/run/tpbpf")?;
    use std::os::unix::fs::OpenOptionsExt;
    // Not through a link someone planted there.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NOFOLLOW)
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
    let recorded = Recorded::of(child.id()).context("reading tpbpfd's start time")?;
    std::fs::write(PID_FILE, recorded.to_line())?;
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
    if let Some((recorded, process)) = running() {
        let _ = process.signal(libc::SIGTERM);
        println!("stopped tpbpfd (pid {})", recorded.pid);
    }
    let _ = std::fs::remove_file(PID_FILE);
    if Path::new(INSTALLED_DAEMON).exists() {
        std::fs::remove_file(INSTALLED_DAEMON)?;
        if let Some(dir) = Path::new(INSTALLED_DAEMON).parent() {
            let _ = std::fs::remove_dir(dir);
        }
        println!("removed {INSTALLED_DAEMON}");
    }
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
        assert!(text.contains("\nLimitNOFILE=65536\n"), "{text}");
    }

    #[test]
    fn root_runs_only_what_only_root_can_change() {
        assert_eq!(not_roots(Path::new("/usr/bin/env")), None);
        let tmp = std::env::temp_dir().join(format!("tpbpf-not-roots-{}", std::process::id()));
        std::fs::write(&tmp, b"").unwrap();
        let why = not_roots(&tmp);
        let _ = std::fs::remove_file(&tmp);
        let why = why.expect("a file in the shared temporary directory");
        assert!(
            why.contains("may be written by others") || why.contains("belongs to uid"),
            "{why}"
        );
        assert!(not_roots(Path::new("/no/such/tpbpfd")).is_some());
    }

    /// A pid file naming a live process called `tpbpfd` that is not the
    /// one recorded (its start time differs: the recorded one is gone and
    /// its pid was handed out again) names no running tpbpfd, so `start`
    /// starts one and `uninstall` signals nothing; with the process's own
    /// start time it is found. A pid file of a bare pid names nothing.
    #[test]
    fn a_stale_pid_file_does_not_name_a_process_that_looks_like_tpbpfd() {
        use std::os::unix::process::CommandExt;
        let mut impostor = Command::new("sleep")
            .arg0("/somewhere/tpbpfd")
            .arg("30")
            .spawn()
            .unwrap();
        // Until it has exec'd, its command line is this test's.
        let cmdline = format!("/proc/{}/cmdline", impostor.id());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !std::fs::read(&cmdline).is_ok_and(|c| c.starts_with(b"/somewhere/tpbpfd\0")) {
            assert!(
                std::time::Instant::now() < deadline,
                "the impostor did not start"
            );
            std::thread::yield_now();
        }
        let now = Recorded::of(impostor.id()).unwrap();
        let file = std::env::temp_dir().join(format!("tpbpf-pid-file-{}", std::process::id()));
        let stale = Recorded {
            start_time: now.start_time.wrapping_sub(1),
            ..now
        };
        let found = |text: String| {
            std::fs::write(&file, text).unwrap();
            running_in(&file).map(|(r, _)| r)
        };
        // The process itself first: its command line is tpbpfd's by now.
        let own_found = found(now.to_line());
        let stale_found = found(stale.to_line());
        let bare_found = found(format!("{}\n", now.pid));
        let _ = std::fs::remove_file(&file);
        let _ = impostor.kill();
        let _ = impostor.wait();
        assert_eq!(stale_found, None, "a stale pid file named a live process");
        assert_eq!(
            bare_found, None,
            "a pid file without a start time was trusted"
        );
        assert_eq!(own_found, Some(now));
    }
}
