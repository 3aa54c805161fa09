//! `tpbpf run` (one command, in a cgroup of its own) and `tpbpf daemon`
//! (tpbpfd in the foreground, attached to a whole cgroup subtree).
use std::{os::fd::AsFd, path::PathBuf, process::ExitCode, sync::Arc};

use anyhow::{bail, Context, Result};
use serde_json::json;
use tokio::signal::unix::{signal, SignalKind};
use tpbpf_cgroup::{reaper::Reaper, ChildCgroup};
use tpbpf_daemon::{
    control, policy, service, tunnel, Bridge, BridgeOptions, DnsConfig, NetnsUpstream,
    TunnelUpstream, Upstream,
};
use tpbpf_loader::Cidr;
use tracing::{info, warn};

use super::scope::{exit_code, forward, spawn_in_cgroup};
use crate::Output;

/// How the tunnel reaches the agent (`--transport`).
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Transport {
    Portforward,
    Direct,
}

impl From<Transport> for control::Transport {
    fn from(t: Transport) -> Self {
        match t {
            Transport::Portforward => control::Transport::Portforward,
            Transport::Direct => control::Transport::Direct,
        }
    }
}

pub use control::NoAgent;

/// tpbpfd's own connections to the API server (port-forwards, watches)
/// are exempt from its redirection, even when the server's address is in a
/// bridged range (an in-cluster runner reaching `kubernetes.default`).
fn exempt_kube_sockets(bridge: &Bridge) {
    let bypass = bridge.bypass();
    tpbpf_kube::on_new_socket(move |sock| {
        if let Err(e) = bypass.register(sock) {
            tracing::warn!("exempting a connection to the API server from redirection: {e}");
        }
    });
}

/// What to bridge and where to, shared by `run` and `daemon`.
#[derive(clap::Args, Clone)]
pub struct BridgeArgs {
    /// Where bridged traffic goes: `agent` (the default) is a tunnel to
    /// tpbpf's agent in the kubeconfig's cluster; `netns:NAME` dials every
    /// original destination from inside network namespace NAME (no cluster
    /// needed).
    #[arg(long, value_name = "UPSTREAM", default_value = "agent")]
    upstream: String,
    /// How the tunnel reaches the agent: `portforward` (through the API
    /// server, works wherever kubectl does) or `direct` (TLS straight to the
    /// agent's node address, or --agent-address).
    #[arg(long, value_enum, default_value_t = Transport::Portforward)]
    transport: Transport,
    /// With --transport direct: the agent's tunnel address (default: its
    /// node's address and tunnel port).
    #[arg(long, value_name = "ADDR")]
    agent_address: Option<std::net::SocketAddr>,
    /// Write the bridge's live state (tunnel, RTT, bytes) here every second.
    #[arg(long, value_name = "PATH")]
    status_file: Option<PathBuf>,
    /// A cluster range to bridge (repeatable), e.g. the service and pod CIDRs.
    #[arg(long = "cidr", value_name = "CIDR")]
    cidrs: Vec<Cidr>,
    /// Another range to bridge (repeatable).
    #[arg(long = "also-proxy", value_name = "CIDR")]
    also_proxy: Vec<Cidr>,
    /// A range never to bridge, even inside a bridged one (repeatable).
    #[arg(long = "never-proxy", value_name = "CIDR")]
    never_proxy: Vec<Cidr>,
    /// The cluster's DNS server, as reached from the upstream (e.g. the
    /// kube-dns ClusterIP).
    #[arg(long, value_name = "ADDR")]
    cluster_dns: Option<String>,
    /// The cluster domain.
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    /// Another DNS suffix the cluster answers (repeatable).
    #[arg(long = "dns-suffix")]
    dns_suffixes: Vec<String>,
    /// A connected namespace (repeatable); bare names resolve in the first.
    #[arg(long = "namespace", default_value = "default")]
    namespaces: Vec<String>,
    /// Do not capture DNS.
    #[arg(long)]
    no_dns: bool,
    /// Also bridge TCP connections arriving on this interface from another
    /// network namespace (a container's or VM's veth; tc ingress). Repeatable.
    #[arg(long = "attach-iface", value_name = "IFACE")]
    attach_ifaces: Vec<String>,
    /// Also bridge TCP connections from network namespace NAME, through the
    /// veth interfaces here that lead to it. Repeatable.
    #[arg(long = "attach-netns", value_name = "NAME")]
    attach_netns: Vec<String>,
    /// Event format on stdout.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Without --cidr: discover the ranges, cluster DNS and namespaces from
    /// this kubeconfig (default: $KUBECONFIG or ~/.kube/config).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// kubeconfig context for discovery (default: the current one).
    #[arg(long)]
    context: Option<String>,
}

impl BridgeArgs {
    /// With no --cidr given, asks the cluster of the kubeconfig what to
    /// bridge, like `tpbpf up`.
    async fn discover_if_needed(&mut self) -> Result<()> {
        if !self.cidrs.is_empty() {
            return Ok(());
        }
        let home_config = std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".kube/config"))
            .is_some_and(|p| p.exists());
        if self.kubeconfig.is_none() && std::env::var_os("KUBECONFIG").is_none() && !home_config {
            return Ok(());
        }
        let (client, ctx, server, ns) =
            tpbpf_kube::client(self.kubeconfig.as_deref(), self.context.as_deref())
                .await
                .context(
                    "no --cidr given, so tpbpf asked the kubeconfig's cluster what to bridge",
                )?;
        let given = tpbpf_kube::Given {
            ranges: false,
            dns: self.cluster_dns.is_some(),
        };
        let info =
            tpbpf_kube::discover(&client, &ctx, &server, &ns, &self.cluster_domain, given).await?;
        for w in &info.warnings {
            tracing::warn!("{w}");
        }
        for c in info.service_cidrs.iter().chain(&info.pod_cidrs) {
            self.cidrs.push(c.parse()?);
        }
        if self.cluster_dns.is_none() {
            self.cluster_dns = info.dns.map(|d| d.to_string());
        }
        if self.namespaces == ["default"] {
            self.namespaces = info.namespaces;
        }
        Ok(())
    }

    async fn upstream(&self) -> Result<Arc<dyn Upstream>> {
        if self.upstream == "agent" {
            return self.tunnel().await;
        }
        let Some(name) = self.upstream.strip_prefix("netns:") else {
            bail!(
                "unknown upstream `{}`: use `agent` (the tunnel to tpbpf's agent) or `netns:NAME` (a network namespace to dial from)",
                self.upstream
            );
        };
        let cluster_dns = match &self.cluster_dns {
            None => None,
            Some(s) => Some(
                s.parse()
                    .or_else(|_| s.parse::<std::net::IpAddr>().map(|ip| (ip, 53).into()))
                    .with_context(|| {
                        format!("--cluster-dns `{s}` is not an address (e.g. 10.96.0.10)")
                    })?,
            ),
        };
        Ok(NetnsUpstream::new(name, cluster_dns)?)
    }

    /// The tunnel to an agent of the kubeconfig's cluster.
    async fn tunnel(&self) -> Result<Arc<dyn Upstream>> {
        let (client, _, _, _) =
            tpbpf_kube::client(self.kubeconfig.as_deref(), self.context.as_deref())
                .await
                .context("the tunnel to tpbpf's agent needs the cluster's kubeconfig")?;
        let transport = control::Transport::from(self.transport);
        let agent_address = self.agent_address;
        let factory: tunnel::Factory = Arc::new(move || {
            let client = client.clone();
            Box::pin(async move {
                control::connect_agent(&client, transport, agent_address, None).await
            })
        });
        let describe = format!("agent via {}", transport.name());
        let up = TunnelUpstream::start(factory, describe)
            .await
            .map_err(|e| {
                if e == tpbpf_kube::NO_AGENT {
                    anyhow::Error::new(NoAgent)
                } else {
                    anyhow::anyhow!("opening the tunnel to tpbpf's agent: {e}")
                }
            })?;
        Ok(up)
    }

    /// Writes the live state every second, for `tpbpf status`.
    fn write_status(&self, upstream: Arc<dyn Upstream>) {
        let Some(path) = self.status_file.clone() else {
            return;
        };
        tokio::spawn(async move {
            let tmp = path.with_extension("tmp");
            loop {
                let v = json!({"upstream": upstream.describe(), "tunnel": upstream.status(), "time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)});
                if std::fs::write(&tmp, v.to_string()).is_ok() {
                    let _ = std::fs::rename(&tmp, &path);
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
        });
    }

    fn options(&self) -> Result<BridgeOptions> {
        let cidrs: Vec<Cidr> = self.cidrs.iter().chain(&self.also_proxy).copied().collect();
        if cidrs.is_empty() && self.no_dns {
            bail!("nothing to bridge: give --cidr ranges, or leave DNS capture on");
        }
        Ok(BridgeOptions {
            cidrs,
            tc_mark: self.wants_tc().then_some(policy::DEFAULT_MARK),
            never_proxy: self.never_proxy.clone(),
            dns: (!self.no_dns).then(|| DnsConfig {
                cluster_domain: self.cluster_domain.clone(),
                suffixes: self.dns_suffixes.clone(),
                namespaces: self.namespaces.clone(),
            }),
        })
    }

    fn wants_tc(&self) -> bool {
        !self.attach_ifaces.is_empty() || !self.attach_netns.is_empty()
    }

    /// Attaches the tc path to the requested interfaces, with the policy
    /// route it needs and a helper that removes that route if tpbpf dies.
    fn start_tc(&self, bridge: &mut Bridge) -> Result<Option<TcPath>> {
        if !self.wants_tc() {
            return Ok(None);
        }
        let mut ifaces = self.attach_ifaces.clone();
        for ns in &self.attach_netns {
            ifaces.extend(policy::ifaces_leading_to(ns)?);
        }
        let exe = std::env::current_exe().context("finding tpbpf's own executable")?;
        let (mark, table) = (
            policy::DEFAULT_MARK.to_string(),
            policy::DEFAULT_TABLE.to_string(),
        );
        let mut argv: Vec<&std::ffi::OsStr> =
            vec!["__undo-on-exit".as_ref(), mark.as_ref(), table.as_ref()];
        argv.extend(ifaces.iter().map(|i| std::ffi::OsStr::new(i.as_str())));
        let mut helper = Reaper::spawn_with(&exe, &argv).context("starting the clean-up helper")?;
        let route = policy::PolicyRoute::install(policy::DEFAULT_MARK, policy::DEFAULT_TABLE)
            .context("installing the policy route for the tc path")?;
        for iface in &ifaces {
            bridge
                .attach_iface(iface)
                .with_context(|| format!("attaching to interface {iface}"))?;
        }
        let made_clsact = bridge.made_clsact();
        for iface in &made_clsact {
            helper
                .tell(&format!("{MADE_CLSACT}{iface}"))
                .context("telling the clean-up helper about a clsact qdisc")?;
        }
        info!(?ifaces, "tc path attached");
        Ok(Some(TcPath {
            route,
            helper,
            ifaces,
            made_clsact,
        }))
    }

    fn ready_event(&self, facts: &Facts, upstream: &dyn Upstream) {
        let cidrs: Vec<String> = self
            .cidrs
            .iter()
            .chain(&self.also_proxy)
            .map(ToString::to_string)
            .collect();
        let event = json!({
            "event": "ready",
            "pid": std::process::id(),
            "cgroup": facts.cgroup,
            "upstream": upstream.describe(),
            "cidrs": cidrs,
            "never_proxy": self.never_proxy.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "dns": !self.no_dns,
            "tcp4": facts.tcp4,
            "tcp6": facts.tcp6,
            "udp_port": facts.udp_port,
            "program_ids": facts.program_ids,
            "link_ids": facts.link_ids,
            "attached_ifaces": facts.ifaces,
            "service": facts.service,
        });
        let text = format!(
            "bridging {} (dns: {}) from cgroup {} via {}",
            if cidrs.is_empty() {
                "no ranges".to_string()
            } else {
                cidrs.join(", ")
            },
            if self.no_dns { "off" } else { "on" },
            facts.cgroup.display(),
            upstream.describe()
        );
        emit(self.output, event, text);
    }

    /// What only root may ask for, refused at once for a user.
    fn refuse_root_only(&self) -> Result<()> {
        if self.upstream != "agent" {
            bail!(
                "--upstream {} enters another network namespace and needs root: sudo tpbpf ...",
                self.upstream
            );
        }
        if self.wants_tc() {
            bail!("--attach-iface/--attach-netns reach other network namespaces and need root: sudo tpbpf ...");
        }
        Ok(())
    }

    /// The user's side before tpbpfd is asked for the bridge: the kube
    /// client's exemptions (on once the returned flag is set), discovery,
    /// the tunnel.
    async fn start_user_side(
        &mut self,
        socket: &std::path::Path,
        instance: &str,
    ) -> Result<(Arc<std::sync::atomic::AtomicBool>, Arc<dyn Upstream>)> {
        let exempting = exempt_through_service(socket, instance);
        self.discover_if_needed().await?;
        let upstream = self.upstream().await?;
        self.write_status(upstream.clone());
        Ok((exempting, upstream))
    }

    /// What tpbpfd is asked for, as a user (through the service).
    fn up_request(&self, instance: &str, cgroup: Option<PathBuf>) -> Result<service::UpRequest> {
        let options = self.options()?;
        Ok(service::UpRequest {
            instance: instance.to_string(),
            cidrs: options.cidrs.iter().map(ToString::to_string).collect(),
            never_proxy: options
                .never_proxy
                .iter()
                .map(ToString::to_string)
                .collect(),
            dns: options.dns.map(|d| service::DnsRequest {
                cluster_domain: d.cluster_domain,
                suffixes: d.suffixes,
                namespaces: d.namespaces,
            }),
            cgroup,
            run: false,
        })
    }
}

/// A bridge as attached: for the ready event.
struct Facts {
    cgroup: PathBuf,
    tcp4: String,
    tcp6: Option<String>,
    udp_port: u16,
    program_ids: Vec<u32>,
    link_ids: Vec<u32>,
    ifaces: Vec<String>,
    /// Made by the tpbpfd service (a user's bridge), not in this process.
    service: bool,
}

impl Facts {
    fn local(bridge: &Bridge, cgroup: &std::path::Path, tc: Option<&TcPath>) -> Self {
        let ids = bridge.attached();
        let proxy = bridge.proxy();
        Self {
            cgroup: cgroup.to_path_buf(),
            tcp4: proxy.tcp4.to_string(),
            tcp6: proxy.tcp6.map(|a| a.to_string()),
            udp_port: proxy.udp_port,
            program_ids: ids.program_ids,
            link_ids: ids.link_ids,
            ifaces: tc.map(|t| t.ifaces.clone()).unwrap_or_default(),
            service: false,
        }
    }

    fn remote(ready: service::Ready) -> Self {
        Self {
            cgroup: ready.cgroup,
            tcp4: ready.tcp4,
            tcp6: ready.tcp6,
            udp_port: ready.udp_port,
            program_ids: ready.program_ids,
            link_ids: ready.link_ids,
            ifaces: Vec::new(),
            service: true,
        }
    }
}

/// The tc path's state outside the process: removed by `finish`, or by the
/// helper if tpbpf dies.
pub struct TcPath {
    route: policy::PolicyRoute,
    helper: Reaper,
    ifaces: Vec<String>,
    /// Interfaces whose clsact qdisc the tc path made (before Linux 6.6).
    made_clsact: Vec<String>,
}

/// What the clean-up helper is told for each clsact qdisc tpbpf made.
const MADE_CLSACT: &str = "made-clsact ";

impl TcPath {
    /// Called after the bridge is dropped (its filters detached).
    fn finish(self) {
        drop(self.route);
        for iface in &self.made_clsact {
            if let Err(e) = tpbpf_daemon::netlink::remove_clsact_if_unused(iface) {
                warn!("{e}");
            }
        }
        self.helper.done();
    }
}

/// The clean-up helper's work when tpbpf died with the tc path attached:
/// the policy route, and before Linux 6.6 (netlink filters, no tcx links
/// that end with the process) tpbpf's filter on each interface and the
/// clsact qdiscs it made, unless another program's filters are on them.
pub fn undo_tc_path(mark: u32, table: u32, ifaces: &[String], told: &[u8]) {
    let _ = policy::PolicyRoute::remove(mark, table);
    for iface in ifaces {
        if let Err(e) = tpbpf_loader::remove_leftover_tc_filter(iface) {
            eprintln!("tpbpf: clean-up: {e}");
        }
    }
    for line in String::from_utf8_lossy(told).lines() {
        if let Some(iface) = line.strip_prefix(MADE_CLSACT) {
            if let Err(e) = tpbpf_daemon::netlink::remove_clsact_if_unused(iface) {
                eprintln!("tpbpf: clean-up: {e}");
            }
        }
    }
}

pub fn emit(out: Output, event: serde_json::Value, text: String) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = match out {
        Output::Json => writeln!(stdout, "{event}"),
        Output::Table => writeln!(stdout, "{text}"),
    };
    let _ = stdout.flush();
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

#[derive(clap::Args)]
pub struct RunArgs {
    #[command(flatten)]
    bridge: BridgeArgs,
    /// Create the command's cgroup under this cgroup (default: tpbpf's own).
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

/// `tpbpf run -- CMD`: bridges CMD's process tree only, passes its exit
/// status through, removes everything afterwards.
pub fn run(mut args: RunArgs) -> Result<ExitCode> {
    if !nix::unistd::geteuid().is_root() {
        return user_run(args);
    }
    runtime()?.block_on(async move {
        args.bridge.discover_if_needed().await?;
        let upstream = args.bridge.upstream().await?;
        args.bridge.write_status(upstream.clone());
        let parent = match &args.cgroup_parent {
            Some(p) => p.clone(),
            None => tpbpf_cgroup::current_cgroup_dir()?,
        };
        let cgroup = ChildCgroup::create(&parent, &format!("tpbpf-run-{}", std::process::id()))?;
        let exe = std::env::current_exe().context("finding tpbpf's own executable")?;
        let reaper = Reaper::spawn(&exe, &["__reap-cgroup"], cgroup.path())
            .context("starting the cgroup clean-up helper")?;
        let mut bridge = Bridge::start(args.bridge.options()?, upstream.clone()).await?;
        exempt_kube_sockets(&bridge);
        let dir = cgroup.open()?;
        bridge.attach(&dir, &cgroup.path().display().to_string())?;
        drop(dir);
        let tc = args.bridge.start_tc(&mut bridge)?;
        args.bridge.ready_event(
            &Facts::local(&bridge, cgroup.path(), tc.as_ref()),
            upstream.as_ref(),
        );

        let user = if args.as_root {
            None
        } else {
            super::scope::Invoker::from_sudo()?
        };
        let signals = Forwarded::listen()?;
        let mut child = spawn_in_cgroup(&args.command, cgroup.path(), user.as_ref())?;
        let (status, _) =
            wait_forwarding(&mut child, signals, std::future::pending::<()>()).await?;
        drop(bridge);
        if let Some(tc) = tc {
            tc.finish();
        }
        cgroup.remove()?;
        reaper.finish();
        Ok(exit_code(status))
    })
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

/// tpbpfd in the foreground: bridges a whole cgroup subtree until SIGINT or
/// SIGTERM. Its own sockets are exempt through the bypass map.
pub fn daemon(mut args: DaemonArgs) -> Result<ExitCode> {
    if !nix::unistd::geteuid().is_root() {
        return user_daemon(args);
    }
    runtime()?.block_on(async move {
        args.bridge.discover_if_needed().await?;
        let upstream = args.bridge.upstream().await?;
        args.bridge.write_status(upstream.clone());
        let cgroup = match &args.cgroup {
            Some(p) => p.clone(),
            None => tpbpf_cgroup::cgroup2_mount()?,
        };
        let dir = std::fs::File::open(&cgroup)
            .with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        let mut bridge = Bridge::start(args.bridge.options()?, upstream.clone()).await?;
        exempt_kube_sockets(&bridge);
        bridge.attach(&dir, &cgroup.display().to_string())?;
        drop(dir);
        let tc = args.bridge.start_tc(&mut bridge)?;
        // The user the bridge is for (who ran `sudo tpbpf up`).
        let owner = super::scope::Invoker::from_sudo()
            .ok()
            .flatten()
            .map(|i| i.uid);
        let intercepts = args.serve_control(owner).await?;
        args.bridge.ready_event(
            &Facts::local(&bridge, &cgroup, tc.as_ref()),
            upstream.as_ref(),
        );
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sigterm = signal(SignalKind::terminate())?;
        tokio::select! {
            _ = sigint.recv() => {}
            _ = sigterm.recv() => {}
        }
        info!("signal received: detaching");
        if let Some(m) = intercepts {
            m.shutdown().await;
        }
        upstream.close("tpbpf down");
        // Let the go-aways leave.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        drop(bridge);
        if let Some(tc) = tc {
            tc.finish();
        }
        Ok(ExitCode::SUCCESS)
    })
}

impl DaemonArgs {
    /// Serves `tpbpf intercept`, `leave` and `list` on the control socket,
    /// for `owner` and root.
    async fn serve_control(&self, owner: Option<u32>) -> Result<Option<Arc<control::Manager>>> {
        let (Some(path), "agent") = (&self.control_socket, self.bridge.upstream.as_str()) else {
            return Ok(None);
        };
        let (client, _, _, _) = tpbpf_kube::client(
            self.bridge.kubeconfig.as_deref(),
            self.bridge.context.as_deref(),
        )
        .await?;
        let m = control::Manager::new(
            client,
            self.bridge.transport.into(),
            self.bridge
                .namespaces
                .first()
                .cloned()
                .unwrap_or_else(|| "default".into()),
        );
        let (m2, path) = (m.clone(), path.clone());
        let listener = control::listen(&path)
            .with_context(|| format!("making the control socket {}", path.display()))?;
        tokio::spawn(async move {
            if let Err(e) = m2.serve(listener, owner).await {
                tracing::error!("the control socket {} failed: {e}", path.display());
            }
        });
        Ok(Some(m))
    }
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

/// The user's side of a bridge: tpbpfd (the service, root) loads, attaches
/// and hands each redirected connection over; this process, running as the
/// user, holds the kubeconfig, its exec plugins' tokens, the tunnel and the
/// intercepts.
fn user_daemon(mut args: DaemonArgs) -> Result<ExitCode> {
    args.bridge.refuse_root_only()?;
    let socket = service::socket_path();
    let instance = instance_of(args.control_socket.as_deref());
    runtime()?.block_on(async move {
        let (exempting, upstream) = args.bridge.start_user_side(&socket, &instance).await?;
        let request = args.bridge.up_request(&instance, args.cgroup.clone())?;
        let (chan, ready) = service::up(&socket, request, None).await?;
        exempting.store(true, std::sync::atomic::Ordering::Relaxed);
        let owner = Some(nix::unistd::getuid().as_raw());
        let intercepts = args.serve_control(owner).await?;
        args.bridge
            .ready_event(&Facts::remote(ready), upstream.as_ref());
        let mut sigint = signal(SignalKind::interrupt())?;
        let mut sigterm = signal(SignalKind::terminate())?;
        let ended = tokio::select! {
            _ = sigint.recv() => None,
            _ = sigterm.recv() => None,
            e = service::serve_user_side(chan, upstream.clone()) => Some(e),
        };
        exempting.store(false, std::sync::atomic::Ordering::Relaxed);
        if let Some(m) = intercepts {
            m.shutdown().await;
        }
        upstream.close("tpbpf down");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        match ended {
            None => Ok(ExitCode::SUCCESS),
            Some(e) => Err(anyhow::Error::new(e).context("the bridge ended")),
        }
    })
}

/// The kube client's sockets are exempt from the user's bridge `instance`
/// by tpbpfd while the returned flag is set (the bridge exists).
fn exempt_through_service(
    socket: &std::path::Path,
    instance: &str,
) -> Arc<std::sync::atomic::AtomicBool> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let exempting = Arc::new(AtomicBool::new(false));
    let (flag, socket, instance) = (
        exempting.clone(),
        socket.to_path_buf(),
        instance.to_string(),
    );
    tpbpf_kube::on_new_socket(move |sock| {
        if flag.load(Ordering::Relaxed) {
            if let Err(e) = service::exempt(&socket, &instance, sock.as_fd()) {
                tracing::warn!("exempting a connection to the API server from redirection: {e}");
            }
        }
    });
    exempting
}

/// Starts `argv` paused: a shell waits for one byte on fd 3 (the returned
/// pipe's write end releases it) before it becomes the command, so tpbpfd
/// can move it into its cgroup first.
fn spawn_paused(argv: &[String]) -> Result<(tokio::process::Child, std::fs::File)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`; close-on-exec, so
    // only the dup2 below reaches the child (the write end never does, and
    // the shell sees the end of the pipe when this process lets go).
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("making a pipe: {}", std::io::Error::last_os_error());
    }
    let go_rd = fds[0];
    // SAFETY: the write end, just made, owned here alone.
    let go_wr = unsafe { std::os::fd::OwnedFd::from_raw_fd(fds[1]) };
    let mut cmd = tokio::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg("read -r _ <&3 || exit 126; exec 3<&-; exec \"$@\"")
        .arg("tpbpf-run")
        .args(argv);
    // SAFETY: dup2 is async-signal-safe; go_rd stays open in this process
    // until spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(go_rd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn();
    // SAFETY: go_rd is this process's copy, closed once, here.
    unsafe { libc::close(go_rd) };
    let child = child.with_context(|| format!("starting {}", argv[0]))?;
    Ok((child, std::fs::File::from(go_wr)))
}

/// `tpbpf run -- CMD` as a user: tpbpfd bridges CMD's process tree only,
/// in a cgroup it makes below CMD's own; the tunnel and the kubeconfig stay
/// with the user.
fn user_run(mut args: RunArgs) -> Result<ExitCode> {
    args.bridge.refuse_root_only()?;
    let socket = service::socket_path();
    let instance = format!("run-{}", std::process::id());
    runtime()?.block_on(async move {
        let (exempting, upstream) = args.bridge.start_user_side(&socket, &instance).await?;
        let request = service::UpRequest {
            run: true,
            ..args.bridge.up_request(&instance, None)?
        };
        let signals = Forwarded::listen()?;
        let (mut child, go) = spawn_paused(&args.command)?;
        let pid = child.id();
        let Some(raw_pid) = pid else {
            bail!("{} exited at once", args.command[0]);
        };
        // SAFETY: pidfd_open takes no memory; the result is checked.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw_pid as libc::pid_t, 0) };
        if pidfd < 0 {
            let e = std::io::Error::last_os_error();
            let _ = child.start_kill();
            bail!("pidfd_open: {e} (tpbpf run as a user needs Linux 5.3 or later)");
        }
        // SAFETY: a descriptor this process just got and alone owns.
        let pidfd =
            unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(pidfd as i32) };
        let (chan, ready) = match service::up(&socket, request, Some(pidfd.as_fd())).await {
            Ok(r) => r,
            Err(e) => {
                // The paused shell reads EOF and exits without running CMD.
                drop(go);
                let _ = child.wait().await;
                return Err(e.into());
            }
        };
        exempting.store(true, std::sync::atomic::Ordering::Relaxed);
        args.bridge
            .ready_event(&Facts::remote(ready), upstream.as_ref());
        {
            use std::io::Write;
            let mut go = go;
            go.write_all(b"\n").context("releasing the command")?;
        }
        let serve = service::serve_user_side(chan, upstream.clone());
        let (status, ended) = wait_forwarding(&mut child, signals, serve).await?;
        exempting.store(false, std::sync::atomic::Ordering::Relaxed);
        upstream.close("tpbpf run ended");
        if let Some(e) = ended {
            return Err(anyhow::Error::new(e).context("the bridge ended before the command"));
        }
        Ok(exit_code(status))
    })
}

/// Waits for the bridged command, passing SIGINT, SIGTERM and SIGHUP on to
/// it. If `bridge_end` completes first (the bridge is gone), the command
/// gets SIGTERM: it would otherwise reach the cluster's ranges unbridged.
/// The signals `tpbpf run` passes on to its command. Listened for before
/// the command starts: one that arrives in between is then held for the
/// command, instead of ending tpbpf (the default action) and leaving the
/// command running unbridged.
struct Forwarded {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Forwarded {
    fn listen() -> Result<Self> {
        Ok(Self {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

async fn wait_forwarding<E>(
    child: &mut tokio::process::Child,
    signals: Forwarded,
    bridge_end: impl std::future::Future<Output = E>,
) -> Result<(std::process::ExitStatus, Option<E>)> {
    let pid = child.id();
    let Forwarded {
        int: mut sigint,
        term: mut sigterm,
        hup: mut sighup,
    } = signals;
    tokio::pin!(bridge_end);
    let mut ended = None;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status?,
            _ = sigint.recv() => forward(pid, libc::SIGINT),
            _ = sigterm.recv() => forward(pid, libc::SIGTERM),
            _ = sighup.recv() => forward(pid, libc::SIGHUP),
            e = &mut bridge_end, if ended.is_none() => {
                forward(pid, libc::SIGTERM);
                ended = Some(e);
            }
        }
    };
    Ok((status, ended))
}
