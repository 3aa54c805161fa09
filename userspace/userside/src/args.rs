//! What to bridge and where to: the flags `tpbpf run` and `tpbpf daemon`
//! share, and what the user's side makes of them (discovery, the upstream,
//! the request to tpbpfd, the ready event).
use std::{path::PathBuf, sync::Arc};

use anyhow::{bail, Context, Result};
use serde_json::json;
use tpbpf_bridge_api::{DnsRequest, Ready, UpRequest};
use tpbpf_kube::KubeClient;
use tpbpf_sys::Cidr;

use crate::{
    control,
    tunnel::{self, TunnelUpstream},
    upstream::{NetnsUpstream, Upstream},
    Output,
};

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

/// What to bridge and where to, shared by `run` and `daemon`.
#[derive(clap::Args, Clone)]
pub struct BridgeArgs {
    /// Where bridged traffic goes: `agent` (the default) is a tunnel to
    /// tpbpf's agent in the kubeconfig's cluster; `netns:NAME` dials every
    /// original destination from inside network namespace NAME (no cluster
    /// needed; root only).
    #[arg(long, value_name = "UPSTREAM", default_value = "agent")]
    pub upstream: String,
    /// How the tunnel reaches the agent: `portforward` (through the API
    /// server, works wherever kubectl does) or `direct` (TLS straight to the
    /// agent's node address, or --agent-address).
    #[arg(long, value_enum, default_value_t = Transport::Portforward)]
    pub transport: Transport,
    /// With --transport direct: the agent's tunnel address (default: its
    /// node's address and tunnel port).
    #[arg(long, value_name = "ADDR")]
    pub agent_address: Option<std::net::SocketAddr>,
    /// Write the bridge's live state (tunnel, RTT, bytes) here every second.
    #[arg(long, value_name = "PATH")]
    pub status_file: Option<PathBuf>,
    /// A cluster range to bridge (repeatable), e.g. the service and pod
    /// CIDRs. Without one, the kubeconfig's cluster is asked.
    #[arg(long = "cidr", value_name = "CIDR")]
    pub cidrs: Vec<Cidr>,
    /// Another range to bridge (repeatable).
    #[arg(long = "also-proxy", value_name = "CIDR")]
    pub also_proxy: Vec<Cidr>,
    /// A range never to bridge, even inside a bridged one (repeatable).
    #[arg(long = "never-proxy", value_name = "CIDR")]
    pub never_proxy: Vec<Cidr>,
    /// The cluster's DNS server, as reached from the upstream (e.g. the
    /// kube-dns ClusterIP).
    #[arg(long, value_name = "ADDR")]
    pub cluster_dns: Option<String>,
    /// The cluster domain.
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// Another DNS suffix the cluster answers (repeatable).
    #[arg(long = "dns-suffix")]
    pub dns_suffixes: Vec<String>,
    /// A connected namespace (repeatable); bare names resolve in the first
    /// (default: the context's namespace, which is always connected, or
    /// `default` without a cluster).
    #[arg(long = "namespace")]
    pub namespaces: Vec<String>,
    /// Only these namespaces' `svc.NS` names go to the cluster (comma-
    /// separated or repeated); default: every namespace the identity may
    /// list, kept current by a watch.
    #[arg(long = "mapped-namespaces", value_name = "NS", value_delimiter = ',')]
    pub mapped_namespaces: Vec<String>,
    /// Do not capture DNS.
    #[arg(long)]
    pub no_dns: bool,
    /// Also bridge TCP connections arriving on this interface from another
    /// network namespace (a container's or VM's veth; tc ingress).
    /// Repeatable; root only.
    #[arg(long = "attach-iface", value_name = "IFACE")]
    pub attach_ifaces: Vec<String>,
    /// Also bridge TCP connections from network namespace NAME, through the
    /// veth interfaces here that lead to it. Repeatable; root only.
    #[arg(long = "attach-netns", value_name = "NAME")]
    pub attach_netns: Vec<String>,
    /// Event format on stdout.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// The kubeconfig for discovery and the tunnel (default: $KUBECONFIG or
    /// ~/.kube/config).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// kubeconfig context (default: the current one).
    #[arg(long)]
    pub context: Option<String>,
    /// Ask the cluster what to bridge even with --cidr given (its DNS, its
    /// namespaces), and report it in the ready event, as `tpbpf up` does.
    #[arg(long)]
    pub discover: bool,
    /// Refuse ranges that overlap routes this machine already has (`tpbpf
    /// up`: a VPN or local network tpbpf must not silently take over).
    #[arg(long)]
    pub check_routes: bool,
}

/// The one Kubernetes client of this process, with where it points.
#[derive(Clone)]
pub struct Cluster {
    pub client: KubeClient,
    pub context: String,
    pub server: String,
    /// The context's namespace.
    pub namespace: String,
}

impl BridgeArgs {
    /// Whether a kubeconfig is there to use: given, in $KUBECONFIG, or at
    /// ~/.kube/config.
    fn has_kubeconfig(&self) -> bool {
        let home_config = std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".kube/config"))
            .is_some_and(|p| p.exists());
        self.kubeconfig.is_some() || std::env::var_os("KUBECONFIG").is_some() || home_config
    }

    /// The process's one kube client (an exec credential plugin runs once
    /// for it), if the bridge needs the cluster: for the tunnel, or to ask
    /// what to bridge.
    pub async fn cluster(&self) -> Result<Option<Cluster>> {
        let for_tunnel = self.upstream == "agent";
        let for_discovery = self.wants_discovery();
        if !for_tunnel && !for_discovery {
            return Ok(None);
        }
        let (client, context, server, namespace) =
            tpbpf_kube::client(self.kubeconfig.as_deref(), self.context.as_deref())
                .await
                .context(if for_tunnel {
                    "the tunnel to tpbpf's agent needs the cluster's kubeconfig"
                } else {
                    "no --cidr given, so tpbpf asked the kubeconfig's cluster what to bridge"
                })?;
        Ok(Some(Cluster {
            client,
            context,
            server,
            namespace,
        }))
    }

    fn wants_discovery(&self) -> bool {
        self.discover || (self.cidrs.is_empty() && self.has_kubeconfig())
    }

    /// With no --cidr given, asks the cluster what to bridge (ranges, DNS,
    /// namespaces), as `tpbpf up` shows it.
    pub async fn discover_if_needed(
        &mut self,
        cluster: Option<&Cluster>,
    ) -> Result<Option<tpbpf_kube::ClusterInfo>> {
        let Some(c) = cluster.filter(|_| self.wants_discovery()) else {
            if self.namespaces.is_empty() {
                self.namespaces = vec!["default".into()];
            }
            return Ok(None);
        };
        // Bare names resolve in the first named namespace (else the
        // context's); the context's namespace is always connected.
        let first = self
            .namespaces
            .first()
            .cloned()
            .unwrap_or_else(|| c.namespace.clone());
        let given = tpbpf_kube::Given {
            ranges: !self.cidrs.is_empty(),
            dns: self.cluster_dns.is_some(),
        };
        let mut info = tpbpf_kube::discover(
            &c.client,
            &c.context,
            &c.server,
            &first,
            &self.cluster_domain,
            given,
        )
        .await?;
        for w in &info.warnings {
            tracing::warn!("{w}");
        }
        if given.ranges {
            info.service_cidrs = self.cidrs.iter().map(ToString::to_string).collect();
            info.pod_cidrs.clear();
        } else {
            for r in info.service_cidrs.iter().chain(&info.pod_cidrs) {
                self.cidrs.push(r.parse()?);
            }
        }
        match &self.cluster_dns {
            Some(d) => info.dns = d.parse().ok(),
            None => self.cluster_dns = info.dns.map(|d| d.to_string()),
        }
        for extra in self.namespaces.iter().skip(1).chain([&c.namespace]) {
            if !info.namespaces.contains(extra) {
                info.namespaces.push(extra.clone());
            }
        }
        self.namespaces = info.namespaces.clone();
        Ok(Some(info))
    }

    /// Where handed-over traffic goes.
    pub async fn upstream(&self, cluster: Option<&Cluster>) -> Result<Arc<dyn Upstream>> {
        if self.upstream == "agent" {
            let cluster =
                cluster.context("the tunnel to tpbpf's agent needs the cluster's kubeconfig")?;
            return self.tunnel(cluster.client.clone()).await;
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
    async fn tunnel(&self, client: KubeClient) -> Result<Arc<dyn Upstream>> {
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
                    anyhow::Error::new(control::NoAgent)
                } else {
                    anyhow::anyhow!("opening the tunnel to tpbpf's agent: {e}")
                }
            })?;
        Ok(up)
    }

    /// Writes the live state every half second, for `tpbpf status`.
    pub fn write_status(&self, upstream: Arc<dyn Upstream>) {
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

    fn ranges(&self) -> Vec<Cidr> {
        self.cidrs.iter().chain(&self.also_proxy).copied().collect()
    }

    /// What tpbpfd is asked for.
    pub fn up_request(
        &self,
        instance: &str,
        cgroup: Option<PathBuf>,
        run: bool,
    ) -> Result<UpRequest> {
        let cidrs = self.ranges();
        if cidrs.is_empty() && self.no_dns {
            bail!("nothing to bridge: give --cidr ranges, or leave DNS capture on");
        }
        Ok(UpRequest {
            instance: instance.to_string(),
            cidrs: cidrs.iter().map(ToString::to_string).collect(),
            never_proxy: self.never_proxy.iter().map(ToString::to_string).collect(),
            dns: (!self.no_dns).then(|| DnsRequest {
                cluster_domain: self.cluster_domain.clone(),
                suffixes: self.dns_suffixes.clone(),
                namespaces: self.namespaces.clone(),
            }),
            cgroup,
            run,
            attach_ifaces: self.attach_ifaces.clone(),
            attach_netns: self.attach_netns.clone(),
        })
    }

    /// The event saying the bridge is up; `extra` adds what `tpbpf up`
    /// shows (the cluster as discovered, its agent).
    pub fn ready_event(
        &self,
        ready: &Ready,
        upstream: &dyn Upstream,
        service: bool,
        extra: serde_json::Value,
    ) {
        let cidrs: Vec<String> = self.ranges().iter().map(ToString::to_string).collect();
        let mut event = json!({
            "event": "ready",
            "pid": std::process::id(),
            "cgroup": ready.cgroup,
            "upstream": upstream.describe(),
            // The tunnel's TLS: in the kernel, or in rustls and why.
            "tls": upstream.status()["tls"],
            "cidrs": cidrs,
            "never_proxy": self.never_proxy.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "dns": !self.no_dns,
            "tcp4": ready.tcp4,
            "tcp6": ready.tcp6,
            "udp_port": ready.udp_port,
            "program_ids": ready.program_ids,
            "link_ids": ready.link_ids,
            "attached_ifaces": ready.attached_ifaces,
            "service": service,
        });
        if let (Some(e), serde_json::Value::Object(more)) = (event.as_object_mut(), extra) {
            e.extend(more);
        }
        let text = format!(
            "bridging {} (dns: {}) from cgroup {} via {}",
            if cidrs.is_empty() {
                "no ranges".to_string()
            } else {
                cidrs.join(", ")
            },
            if self.no_dns { "off" } else { "on" },
            ready.cgroup.display(),
            upstream.describe()
        );
        emit(self.output, event, text);
    }

    /// What only root may ask for, refused at once for a user.
    pub fn refuse_root_only(&self) -> Result<()> {
        if nix::unistd::geteuid().is_root() {
            return Ok(());
        }
        if self.upstream != "agent" {
            bail!(
                "--upstream {} enters another network namespace and needs root: sudo tpbpf ...",
                self.upstream
            );
        }
        if !self.attach_ifaces.is_empty() || !self.attach_netns.is_empty() {
            bail!("--attach-iface/--attach-netns reach other network namespaces and need root: sudo tpbpf ...");
        }
        Ok(())
    }
}

/// Prints an event: JSON, or its text.
pub fn emit(out: Output, event: serde_json::Value, text: String) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = match out {
        Output::Table => writeln!(stdout, "{text}"),
        machine => write!(stdout, "{}", machine.render(&event)),
    };
    let _ = stdout.flush();
}
