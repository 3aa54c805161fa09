//! `tpbpf`: the command line.
mod cmd;
mod netns;
mod progress;
mod reference;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
pub use tpbpf_userside::Output;

#[derive(Parser)]
#[command(
    name = "tpbpf",
    version,
    about = "Bridge this machine and a Kubernetes cluster with eBPF"
)]
struct Cli {
    /// Log filter (tracing's EnvFilter syntax), e.g. `debug` or `tpbpf_loader=trace`.
    #[arg(long, global = true, env = "TPBPF_LOG", default_value = "info")]
    log: String,
    /// Run in this network namespace (an `ip netns` name or a path), like
    /// `ip netns exec` but keeping this mount namespace (and its cgroup v2
    /// mount).
    #[arg(long, global = true, value_name = "NAME")]
    netns: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check that this machine can run tpbpf: kernel, program types, BTF, cgroup v2, privileges.
    Doctor {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Bridge this machine to the cluster of the current kubeconfig context
    /// (tpbpfd in the background).
    Up(cmd::up::UpArgs),
    /// Show the bridge started by `tpbpf up`.
    Status(cmd::up::StateArgs),
    /// Stop the bridge started by `tpbpf up`; nothing stays attached.
    Down(cmd::up::StateArgs),
    /// Run one command with the bridge active for its process tree only;
    /// exits with the command's status and leaves nothing behind.
    Run(cmd::bridge::RunArgs),
    /// Run a bridge in the foreground (what `tpbpf up` starts), bridging a whole cgroup subtree.
    Daemon(cmd::bridge::DaemonArgs),
    /// Install tpbpf's agent into the kubeconfig's cluster (server-side
    /// apply; cluster-admin), and wait until every node has one ready.
    /// `--dry-run -o yaml` prints what it would apply.
    Install(cmd::install::InstallArgs),
    /// Remove everything `tpbpf install` applied, and wait for it to go.
    Uninstall(cmd::install::UninstallArgs),
    /// Send a workload's incoming connections to a local port (no sidecar,
    /// no restart; the pod gets them back when the intercept ends).
    Intercept(cmd::intercept::InterceptArgs),
    /// End an intercept.
    Leave(cmd::intercept::LeaveArgs),
    /// The workloads of a namespace and their intercepts.
    List(cmd::intercept::ListArgs),
    /// The lab: a Kubernetes-like cluster out of network namespaces on this
    /// machine, with real nginx, Redis, PostgreSQL and DNS.
    Lab(cmd::lab::LabArgs),
    /// tpbpfd as a system service, so members of group `tpbpf` bridge
    /// without sudo.
    #[command(subcommand)]
    Service(cmd::service::ServiceCommand),
    /// One tarball for a bug report: the bridge's and tpbpfd's logs, the
    /// agents' logs, status, doctor, version and the kubeconfig context,
    /// with tokens, keys and certificates taken out.
    GatherLogs(cmd::gather::GatherArgs),
    /// The project file (tpbpf.yaml) and kubeconfig extension: `show` the
    /// settings in force and where each comes from, `check` them, the
    /// `schema`.
    Config(cmd::config::ConfigArgs),
    /// This tpbpf's version and tunnel protocol, and the cluster's agent's.
    Version(cmd::version::VersionArgs),
    /// A shell completion script: `source <(tpbpf completion bash)`, or
    /// into the shell's completion directory.
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Debugging tools.
    #[command(subcommand)]
    Debug(DebugCommand),
    /// Internal: writes the manual pages (tpbpf.1, tpbpf-up.1, ...) into DIR.
    #[command(name = "__man", hide = true)]
    Man { dir: std::path::PathBuf },
    /// Internal: writes the book's generated reference pages into DIR.
    #[command(name = "__reference", hide = true)]
    Reference { dir: std::path::PathBuf },
    /// Internal: removes a cgroup once its creator is gone.
    #[command(name = "__reap-cgroup", hide = true)]
    ReapCgroup { path: std::path::PathBuf },
    /// Internal: removes the tc path's policy route (fwmark MARK, table
    /// TABLE), and before Linux 6.6 its netlink-attached filters on IFACEs
    /// and the clsact qdiscs it made, once its creator is gone.
    #[command(name = "__undo-on-exit", hide = true)]
    UndoOnExit {
        mark: u32,
        table: u32,
        ifaces: Vec<String>,
    },
}

#[derive(Subcommand)]
enum DebugCommand {
    /// Redirect TCP connections to the given ranges, made by processes in a
    /// fresh child cgroup, to a local listener that answers each with the
    /// original destination it recovered (HTTP, so curl can show it).
    Redirect(cmd::redirect::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(&cli.log);
    if let Some(ns) = &cli.netns {
        if let Err(e) = netns::enter(ns) {
            eprintln!("tpbpf: error: {}", error_chain(&e));
            return ExitCode::FAILURE;
        }
    }
    if matches!(
        cli.command,
        Command::Doctor { .. }
            | Command::Status(_)
            | Command::List(_)
            | Command::Version(_)
            | Command::Config(_)
            | Command::Completion { .. }
    ) {
        // A command that only prints ends quietly when its reader goes
        // (`tpbpf config schema | head`), as other Unix tools do.
        // SAFETY: before any thread; restores the default disposition.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    let result = match cli.command {
        Command::Doctor { output } => Ok(cmd::doctor::run(output)),
        Command::Up(args) => cmd::up::up(args, cli.netns.as_deref()),
        Command::Status(args) => cmd::up::status(args),
        Command::Down(args) => cmd::up::down(args),
        Command::Run(args) => cmd::bridge::run(args),
        Command::Lab(args) => cmd::lab::run(args),
        Command::Daemon(args) => cmd::bridge::daemon(args),
        Command::Install(args) => cmd::install::install(args),
        Command::Uninstall(args) => cmd::install::uninstall(args),
        Command::Intercept(args) => cmd::intercept::intercept(args),
        Command::Leave(args) => cmd::intercept::leave(args),
        Command::List(args) => cmd::intercept::list(args),
        Command::Service(c) => cmd::service::run(c),
        Command::Debug(DebugCommand::Redirect(args)) => cmd::redirect::run(args),
        Command::Version(args) => cmd::version::run(args),
        Command::Config(args) => cmd::config::run(args),
        Command::GatherLogs(args) => cmd::gather::run(args),
        Command::Completion { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "tpbpf", &mut script);
            // A closed pipe (`| head`) is the reader's choice, not an error.
            let _ = std::io::Write::write_all(&mut std::io::stdout(), &script);
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { dir } => man_pages(&dir).map(|()| ExitCode::SUCCESS),
        Command::Reference { dir } => {
            reference::write(Cli::command(), &cmd::config::schema(), &dir)
                .map(|()| ExitCode::SUCCESS)
        }
        Command::ReapCgroup { path } => tpbpf_cgroup::reaper::run_reaper(path)
            .map(|()| ExitCode::SUCCESS)
            .map_err(anyhow::Error::from),
        Command::UndoOnExit {
            mark,
            table,
            ifaces,
        } => {
            let told = tpbpf_cgroup::reaper::wait_for_creator_input();
            if !told.starts_with(b"done") {
                tpbpfd::tc::undo(mark, table, &ifaces, &told);
            }
            Ok(ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) if e.downcast_ref::<cmd::bridge::NoAgent>().is_some() => {
            eprintln!("tpbpf: {e}");
            ExitCode::from(tpbpf_kube::NO_AGENT_EXIT)
        }
        Err(e) => {
            eprintln!("tpbpf: error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(filter: &str) {
    use tracing_subscriber::EnvFilter;
    let _ = tracing_log::LogTracer::init();
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(true)
        .try_init();
}

/// The error and its causes, each cause shown only if the message before it
/// does not already include it.
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

/// The manual pages of `tpbpf` and each of its visible subcommands, one
/// file each (`tpbpf.1`, `tpbpf-up.1`, `tpbpf-lab-up.1`...), into `dir`.
fn man_pages(dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::create_dir_all(dir).with_context(|| format!("making {}", dir.display()))?;
    let mut cmd = Cli::command();
    cmd.build();
    let mut stack = vec![("tpbpf".to_string(), cmd)];
    while let Some((name, cmd)) = stack.pop() {
        for sub in cmd
            .get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        {
            stack.push((format!("{name}-{}", sub.get_name()), sub.clone()));
        }
        let mut page = Vec::new();
        // clap names are 'static; a few pages, once per process.
        let title: &'static str = Box::leak(name.clone().into_boxed_str());
        clap_mangen::Man::new(cmd.clone().name(title))
            .render(&mut page)
            .with_context(|| format!("rendering {name}'s manual page"))?;
        let path = dir.join(format!("{name}.1"));
        std::fs::write(&path, page).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
