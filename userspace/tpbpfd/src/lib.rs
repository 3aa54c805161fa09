//! tpbpfd: root's half of every bridge. The kernel programs (tpbpf-loader)
//! send every socket the bridged processes open toward the cluster to the
//! listeners here:
//! - a TCP listener on 127.0.0.1 (and one on ::1 for IPv6 destinations),
//!   which recovers each connection's original destination and hands the
//!   connection to the bridge's user's side ([`service::UserSide`]);
//! - a UDP socket receiving on the slot addresses 127.100.x.y, each naming
//!   one original destination, relaying datagram flows through the user's
//!   side and answering from the same slot address;
//! - a DNS proxy behind both, for port 53 to any resolver: cluster names are
//!   answered through the user's side, everything else is forwarded
//!   unchanged to the resolver the application asked.
//!
//! Nothing here speaks Kubernetes, HTTP or TLS: that is the user's side's
//! (`tpbpf-userside`), which runs as the user who asked.
pub mod dns;
pub mod policy;
pub mod service;
pub mod tc;
mod tcp;
mod udp;

use std::{
    fs::File,
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    sync::Arc,
};

use thiserror::Error;
use tokio::{net::TcpListener, task::JoinHandle};
use tpbpf_loader::{AttachedIds, LoadError, ProxyConfig, Redirector};
use tpbpf_sys::Cidr;
use tracing::info;

pub use dns::DnsConfig;
use service::UserSide;

#[derive(Debug, Error)]
pub enum BridgeError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// What to bridge.
#[derive(Clone, Debug, Default)]
pub struct BridgeOptions {
    /// Ranges to redirect (cluster CIDRs and `--also-proxy`).
    pub cidrs: Vec<Cidr>,
    /// Ranges never to redirect (`--never-proxy`), even inside `cidrs`.
    pub never_proxy: Vec<Cidr>,
    /// Capture DNS (port 53 to any resolver) and answer cluster names.
    pub dns: Option<DnsConfig>,
    /// The tc path for other network namespaces: the mark steered packets
    /// get. `None`: no transparent listener.
    pub tc_mark: Option<u32>,
    /// A user's bridge: only this uid's processes are bridged. `None`:
    /// every process of the scope (root's bridges).
    pub owner_uid: Option<u32>,
}

/// The running bridge: programs loaded, listeners serving. Attach it to a
/// cgroup with [`Bridge::attach`]. Dropping it stops the listeners and
/// detaches everything.
pub struct Bridge {
    redirector: Redirector,
    tasks: Vec<JoinHandle<()>>,
    proxy: ProxyConfig,
    mapped: Option<dns::Mapped>,
}

impl Bridge {
    pub async fn start(
        options: BridgeOptions,
        upstream: Arc<UserSide>,
    ) -> Result<Self, BridgeError> {
        let mut redirector = Redirector::load()?;
        for cidr in &options.cidrs {
            redirector.add_range(*cidr, true)?;
        }
        for cidr in &options.never_proxy {
            redirector.add_range(*cidr, false)?;
        }

        let io_err = |what| move |source| BridgeError::Io { what, source };
        let tcp4 = listen(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0).into())
            .map_err(io_err("binding the TCP listener on 127.0.0.1"))?;
        // No ::1 (IPv6 disabled): IPv6 destinations are left alone.
        let tcp6 = listen(SocketAddrV6::new(Ipv6Addr::LOCALHOST, 0, 0, 0).into()).ok();
        let udp = udp::UdpProxy::bind().map_err(io_err("binding the UDP proxy socket on lo"))?;
        let udp6 = tokio::net::UdpSocket::bind(SocketAddrV6::new(Ipv6Addr::LOCALHOST, 0, 0, 0))
            .await
            .ok();
        let addr4 = match tcp4.local_addr() {
            Ok(SocketAddr::V4(a)) => a,
            _ => {
                return Err(BridgeError::Io {
                    what: "reading the TCP listener's address",
                    source: io::Error::other("not IPv4"),
                })
            }
        };
        let transparent = match options.tc_mark {
            Some(_) => Some(tcp::transparent_listener().map_err(io_err(
                "binding the transparent listener for the tc path (needs CAP_NET_ADMIN)",
            ))?),
            None => None,
        };
        let addr6 = tcp6.as_ref().and_then(|l| match l.local_addr() {
            Ok(SocketAddr::V6(a)) => Some(a),
            _ => None,
        });
        let proxy = ProxyConfig {
            tcp4: addr4,
            tcp6: addr6,
            udp_port: udp.port(),
            udp6_port: udp6
                .as_ref()
                .and_then(|s| s.local_addr().ok())
                .map(|a| a.port()),
            dns: options.dns.is_some(),
            tc: match (&transparent, options.tc_mark) {
                (Some(l), Some(mark)) => l.local_addr().ok().map(|a| (a.port(), mark)),
                _ => None,
            },
            owner_uid: options.owner_uid,
        };
        redirector.configure(proxy)?;

        let mapped = options.dns.as_ref().map(|d| d.mapped.clone());
        let dns = options
            .dns
            .map(|cfg| Arc::new(dns::Dns::new(cfg, upstream.clone(), redirector.bypass())));
        let table = redirector.table();
        let mut tasks = vec![tokio::spawn(tcp::serve(
            tcp4,
            table.clone(),
            upstream.clone(),
            dns.clone(),
        ))];
        if let Some(l) = transparent {
            tasks.push(tokio::spawn(tcp::serve_transparent(l, upstream.clone())));
        }
        if let Some(l) = tcp6 {
            tasks.push(tokio::spawn(tcp::serve(
                l,
                table,
                upstream.clone(),
                dns.clone(),
            )));
        }
        if let Some(s6) = udp6 {
            tasks.push(tokio::spawn(udp::serve6(
                s6,
                redirector.udp6_last(),
                upstream.clone(),
                dns.clone(),
            )));
        }
        tasks.push(tokio::spawn(udp.serve(
            redirector.udp_slots(),
            upstream,
            dns,
        )));
        info!(tcp4 = %addr4, tcp6 = ?addr6, udp_port = proxy.udp_port, "bridge listening");
        Ok(Self {
            redirector,
            tasks,
            proxy,
            mapped,
        })
    }

    /// Attaches the programs to a cgroup (bpf_links owned by this process).
    pub fn attach(&mut self, cgroup: &File, name: &str) -> Result<AttachedIds, BridgeError> {
        Ok(self.redirector.attach(cgroup, name)?)
    }

    /// Steers TCP connections arriving on `iface` (from another network
    /// namespace) for bridged ranges into the bridge (tc ingress, tcx link).
    pub fn attach_iface(&mut self, iface: &str) -> Result<Vec<u32>, BridgeError> {
        Ok(self.redirector.attach_tc(iface)?)
    }

    /// The interfaces whose `clsact` qdisc the tc path made (before Linux
    /// 6.6); [`tpbpf_sys::netlink::remove_clsact_if_unused`] undoes each once this
    /// bridge is dropped.
    pub fn made_clsact(&self) -> Vec<String> {
        self.redirector.made_clsact().to_vec()
    }

    pub fn attached(&self) -> AttachedIds {
        self.redirector.attached().clone()
    }

    pub fn proxy(&self) -> ProxyConfig {
        self.proxy
    }

    /// The cluster's namespaces the bridge's DNS knows (`None`: no DNS).
    pub fn mapped_namespaces(&self) -> Option<dns::Mapped> {
        self.mapped.clone()
    }

    /// The handle that exempts tpbpfd's own sockets from its redirection.
    pub fn bypass(&self) -> tpbpf_loader::Bypass {
        self.redirector.bypass()
    }
}

/// A listener with a deep accept queue: a burst of connects from the bridged
/// applications must not overflow it (a dropped SYN costs a second).
fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let sock = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    sock.bind(addr)?;
    sock.listen(LISTEN_BACKLOG)
}

const LISTEN_BACKLOG: u32 = 4096;

impl Drop for Bridge {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}
