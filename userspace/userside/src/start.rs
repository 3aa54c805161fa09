//! The one start-up path of a bridge's user's side, for root and for a
//! user alike: one kube client, discovery, the upstream, the bridge asked
//! of tpbpfd (the service for a user; for root, tpbpfd's service in this
//! same process), then either serving until a signal (`tpbpf daemon`) or
//! running one command (`tpbpf run`). Shutdown is the same everywhere: the
//! intercepts end, the tunnel says goodbye, and tpbpfd detaches the
//! bridge when this side's connection closes.
use std::{
    os::fd::{AsFd, FromRawFd, OwnedFd},
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, OnceLock},
};

use anyhow::{bail, Context, Result};
use socket2::{Domain, Socket, Type};
use tokio::signal::unix::{signal, SignalKind};
use tracing::info;

use crate::{
    args::{emit, BridgeArgs, Cluster},
    client::{self, ServiceAt},
    control,
    handover::{self, BridgeChannel},
    process::{self, Forwarded, Invoker},
    upstream::{BoxFuture, Upstream},
    Output,
};

/// How long ending a bridge waits for tpbpfd to have detached it.
const FINISH_WITHIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Where this bridge's tpbpfd is.
pub enum Tpbpfd {
    /// The service, for a user (or root, asked to use it).
    Service(PathBuf),
    /// Root's own: tpbpfd's service runs in this process and serves this
    /// function's end of a socket pair.
    InProcess(Box<dyn FnOnce(Socket) -> BoxFuture<'static, ()> + Send>),
}

impl Tpbpfd {
    fn connect(self) -> Result<ServiceAt> {
        match self {
            Self::Service(p) => Ok(ServiceAt::Socket(p)),
            Self::InProcess(serve) => {
                let (ours, theirs) = Socket::pair(Domain::UNIX, Type::SEQPACKET, None)
                    .context("making the socket pair to tpbpfd")?;
                tokio::spawn(serve(theirs));
                Ok(ServiceAt::Connected(ours))
            }
        }
    }

    fn in_process(&self) -> bool {
        matches!(self, Self::InProcess(_))
    }
}

/// What the user's side does once its bridge is up.
pub enum Mode {
    /// Serve until SIGINT or SIGTERM (`tpbpf daemon`, behind `tpbpf up`).
    Daemon {
        /// The cgroup subtree to bridge (default: the whole machine).
        cgroup: Option<PathBuf>,
        /// Serve `intercept`, `leave` and `list` here.
        control_socket: Option<PathBuf>,
    },
    /// Run one command, bridged, and pass its status through.
    Run {
        /// Make the command's cgroup below this one (default: its own).
        cgroup_parent: Option<PathBuf>,
        /// Under sudo, run the command as root (by default as the user who
        /// ran sudo).
        as_root: bool,
        command: Vec<String>,
    },
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

/// The bridge's name, from its control socket's directory (`tpbpf up`
/// passes `--control-socket /run/tpbpf/.../NAME/control.sock`).
fn instance_of(control_socket: Option<&std::path::Path>) -> String {
    control_socket
        .and_then(|p| p.parent())
        .and_then(|d| d.file_name())
        .map_or_else(
            || format!("daemon-{}", std::process::id()),
            |n| n.to_string_lossy().into_owned(),
        )
}

/// Exempts this process's connections to the API server from its own
/// bridge once it exists (before that, nothing is redirected): each socket
/// goes to tpbpfd over the bridge's connection before it connects.
fn exempt_kube_sockets() -> Arc<OnceLock<Arc<BridgeChannel>>> {
    let bridge: Arc<OnceLock<Arc<BridgeChannel>>> = Arc::new(OnceLock::new());
    let b = bridge.clone();
    tpbpf_kube::on_new_socket(move |sock: OwnedFd| -> tpbpf_kube::SocketHookFuture {
        let b = b.clone();
        Box::pin(async move {
            match b.get() {
                Some(bridge) => bridge.exempt(sock).await,
                None => Ok(()),
            }
        })
    });
    bridge
}

/// Brings a bridge up and runs `mode` with it.
pub fn start(mut args: BridgeArgs, mode: Mode, tpbpfd: Tpbpfd) -> Result<ExitCode> {
    args.refuse_root_only()?;
    let in_process = tpbpfd.in_process();
    // Behind `tpbpf up` (a daemon with machine output) each step is an
    // event, which `up` shows as progress.
    let steps = matches!(mode, Mode::Daemon { .. }) && args.output != Output::Table;
    let output = args.output;
    let step = move |what: &str| {
        if steps {
            emit(
                output,
                serde_json::json!({"event": "step", "step": what}),
                String::new(),
            );
        }
    };
    runtime()?.block_on(async move {
        let exempting = exempt_kube_sockets();
        step("reading the kubeconfig");
        let cluster = args.cluster().await?;
        step("discovering the cluster's ranges and DNS");
        let info = args.discover_if_needed(cluster.as_ref()).await?;
        if args.check_routes {
            let ranges: Vec<_> = args.cidrs.iter().chain(&args.also_proxy).copied().collect();
            crate::routes::refuse_overlaps(&ranges, &args.never_proxy)?;
        }
        let agent = match (&cluster, args.discover, args.upstream.as_str()) {
            (Some(c), true, "agent") => {
                step("finding tpbpf's agent");
                Some(tpbpf_kube::find_agent(&c.client).await)
            }
            _ => None,
        };
        if matches!(agent, Some(Ok(None))) {
            return Err(anyhow::Error::new(control::NoAgent));
        }
        step("opening the tunnel");
        let upstream = args.upstream(cluster.as_ref()).await?;
        args.write_status(upstream.clone());
        let extra = serde_json::json!({
            "cluster": info,
            "agent": agent.as_ref().and_then(|a| a.as_ref().ok().cloned().flatten()),
            "agent_error": agent.as_ref().and_then(|a| a.as_ref().err().cloned()),
        });
        let at = tpbpfd.connect()?;
        let result = match mode {
            Mode::Daemon {
                cgroup,
                control_socket,
            } => {
                let instance = instance_of(control_socket.as_deref());
                let request = args.up_request(&instance, cgroup, false)?;
                step("attaching the eBPF programs (tpbpfd)");
                let (chan, ready) = client::up(at, request, None).await?;
                let bridge = BridgeChannel::new(chan);
                let _ = exempting.set(bridge.clone());
                let _namespaces = report_namespaces(&bridge, cluster.as_ref(), &args);
                let owner = if nix::unistd::geteuid().is_root() {
                    Invoker::from_sudo().ok().flatten().map(|i| i.uid)
                } else {
                    Some(nix::unistd::getuid().as_raw())
                };
                let intercepts = serve_control(&args, cluster.as_ref(), control_socket, owner)?;
                args.ready_event(&ready, upstream.as_ref(), !in_process, extra);
                let mut sigint = signal(SignalKind::interrupt())?;
                let mut sigterm = signal(SignalKind::terminate())?;
                let ended = tokio::select! {
                    _ = sigint.recv() => None,
                    _ = sigterm.recv() => None,
                    e = handover::serve(bridge.clone(), upstream.clone()) => Some(e),
                };
                info!("detaching");
                if let Some(m) = intercepts {
                    m.shutdown().await;
                }
                bridge.finish(FINISH_WITHIN).await;
                match ended {
                    None => Ok(ExitCode::SUCCESS),
                    Some(e) => Err(anyhow::Error::new(e).context("the bridge ended")),
                }
            }
            Mode::Run {
                cgroup_parent,
                as_root,
                command,
            } => {
                run(
                    &args,
                    cluster.as_ref(),
                    at,
                    &upstream,
                    &exempting,
                    cgroup_parent,
                    as_root,
                    &command,
                    !in_process,
                    extra,
                )
                .await
            }
        };
        upstream.close("tpbpf down").await;
        result
    })
}

/// `tpbpf run`: the command starts paused; tpbpfd moves it into a cgroup
/// of its own and attaches the bridge there; then it runs.
#[allow(clippy::too_many_arguments)]
async fn run(
    args: &BridgeArgs,
    cluster: Option<&Cluster>,
    at: ServiceAt,
    upstream: &Arc<dyn Upstream>,
    exempting: &OnceLock<Arc<BridgeChannel>>,
    cgroup_parent: Option<PathBuf>,
    as_root: bool,
    command: &[String],
    service: bool,
    extra: serde_json::Value,
) -> Result<ExitCode> {
    let instance = format!("run-{}", std::process::id());
    let request = args.up_request(&instance, cgroup_parent, true)?;
    let user = if as_root { None } else { Invoker::from_sudo()? };
    let signals = Forwarded::listen()?;
    let (mut child, go) = process::spawn_paused(command, user.as_ref())?;
    let Some(raw_pid) = child.id() else {
        bail!("{} exited at once", command[0]);
    };
    // SAFETY: pidfd_open takes no memory; the result is checked.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw_pid as libc::pid_t, 0) };
    if pidfd < 0 {
        let e = std::io::Error::last_os_error();
        let _ = child.start_kill();
        bail!("pidfd_open: {e} (tpbpf run needs Linux 5.3 or later)");
    }
    // SAFETY: a descriptor this process just got and alone owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    let (chan, ready) = match client::up(at, request, Some(pidfd.as_fd())).await {
        Ok(r) => r,
        Err(e) => {
            // The paused shell reads EOF and exits without running CMD.
            drop(go);
            let _ = child.wait().await;
            return Err(e.into());
        }
    };
    drop(pidfd);
    let bridge = BridgeChannel::new(chan);
    let _ = exempting.set(bridge.clone());
    let _namespaces = report_namespaces(&bridge, cluster, args);
    args.ready_event(&ready, upstream.as_ref(), service, extra);
    {
        use std::io::Write;
        let mut go = go;
        go.write_all(b"\n").context("releasing the command")?;
    }
    let serve = handover::serve(bridge.clone(), upstream.clone());
    let (status, ended) = process::wait_forwarding(&mut child, signals, serve).await?;
    // The command's cgroup is gone when `tpbpf run` returns.
    bridge.finish(FINISH_WITHIN).await;
    if let Some(e) = ended {
        return Err(anyhow::Error::new(e).context("the bridge ended before the command"));
    }
    Ok(process::exit_code(status))
}

/// Keeps the bridge's DNS told which namespaces' `svc.NS` names are the
/// cluster's: `--mapped-namespaces` once, else every namespace the identity
/// may list, through a watch (listed again after errors). Without the right
/// to list them only the connected namespaces resolve so, and the log says
/// why, once. The task ends with the returned guard (or the bridge).
fn report_namespaces(
    bridge: &Arc<BridgeChannel>,
    cluster: Option<&Cluster>,
    args: &BridgeArgs,
) -> Option<AbortOnDrop> {
    let cluster = cluster.filter(|_| !args.no_dns)?;
    let bridge = bridge.clone();
    let fixed = args.mapped_namespaces.clone();
    let client = cluster.client.clone();
    Some(AbortOnDrop(tokio::spawn(async move {
        if !fixed.is_empty() {
            if let Err(e) = bridge.report_namespaces(&fixed).await {
                tracing::warn!("telling tpbpfd the mapped namespaces: {e}");
            }
            return;
        }
        let mut seen = tpbpf_kube::follow_namespaces(&client);
        let mut warned = false;
        loop {
            let now = seen.borrow_and_update().clone();
            match &now.error {
                Some(e) if !warned => {
                    warned = true;
                    tracing::warn!(
                        "listing the cluster's namespaces: {e}; `svc.NS` names resolve for the connected namespaces only (`tpbpf up -n NS` connects one)"
                    );
                }
                Some(_) => {}
                None => {
                    warned = false;
                    let names: Vec<String> = now.names.into_iter().collect();
                    if let Err(e) = bridge.report_namespaces(&names).await {
                        tracing::debug!("telling tpbpfd the cluster's namespaces: {e}");
                        return;
                    }
                }
            }
            if seen.changed().await.is_err() {
                return;
            }
        }
    })))
}

/// A task that ends when this is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves `tpbpf intercept`, `leave` and `list` on the control socket, for
/// `owner` and root, with the process's one kube client.
fn serve_control(
    args: &BridgeArgs,
    cluster: Option<&Cluster>,
    path: Option<PathBuf>,
    owner: Option<u32>,
) -> Result<Option<Arc<control::Manager>>> {
    let (Some(path), Some(cluster), "agent") = (path, cluster, args.upstream.as_str()) else {
        return Ok(None);
    };
    let m = control::Manager::new(
        cluster.client.clone(),
        args.transport.into(),
        args.namespaces
            .first()
            .cloned()
            .unwrap_or_else(|| "default".into()),
    );
    let listener = control::listen(&path)
        .with_context(|| format!("making the control socket {}", path.display()))?;
    let m2 = m.clone();
    tokio::spawn(async move {
        if let Err(e) = m2.serve(listener, owner).await {
            tracing::error!("the control socket {} failed: {e}", path.display());
        }
    });
    Ok(Some(m))
}
