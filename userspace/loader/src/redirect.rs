//! The outbound redirect: `connect4` + `sock_ops` + `getpeername4` on one
//! cgroup, and the table that tells the listener where each accepted
//! connection was going.
use std::{
    fs::File,
    io,
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::{AsFd, AsRawFd},
    sync::Arc,
};

use aya::{
    maps::{
        lpm_trie::{Key, LpmTrie},
        Array, HashMap, MapData,
    },
    programs::{
        loaded_links, CgroupAttachMode, CgroupSock, CgroupSockAddr, SchedClassifier, SockOps,
        TcAttachType,
    },
    Ebpf, EbpfLoader,
};
use tpbpf_common::{action, flags, maps, programs, Config, OrigDst, AF_INET, AF_INET6};
use tracing::debug;

use crate::{
    udp::{Udp6Last, UdpSlots},
    Cidr, LoadError, EBPF_OBJECT,
};

/// The kernel's ids of what [`Redirector::attach`] attached, so tests and
/// `tpbpf status` can check them against the kernel's own listings.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AttachedIds {
    pub program_ids: Vec<u32>,
    pub link_ids: Vec<u32>,
}

/// Loaded programs and their maps. Dropping it detaches and unloads
/// everything.
pub struct Redirector {
    ebpf: Ebpf,
    table: OrigDstTable,
    bypass: Bypass,
    udp_slots: UdpSlots,
    udp6_last: Udp6Last,
    attached: AttachedIds,
    /// Interfaces whose `clsact` qdisc this process made (before Linux 6.6).
    made_clsact: Vec<String>,
}

/// The cgroup sock_addr programs, in attach order.
const SOCK_ADDR_PROGRAMS: [&str; 8] = [
    programs::CONNECT4,
    programs::CONNECT6,
    programs::SENDMSG4,
    programs::SENDMSG6,
    programs::RECVMSG4,
    programs::RECVMSG6,
    programs::GETPEERNAME4,
    programs::GETPEERNAME6,
];

/// Where redirected sockets go, and what to capture.
#[derive(Clone, Copy, Debug)]
pub struct ProxyConfig {
    /// TCP listener for IPv4 (and IPv4-mapped) destinations, on 127.0.0.1.
    pub tcp4: SocketAddrV4,
    /// TCP listener for IPv6 destinations, on ::1, if there is one.
    pub tcp6: Option<std::net::SocketAddrV6>,
    /// The UDP proxy's port (it receives on the slot addresses).
    pub udp_port: u16,
    /// The IPv6 UDP proxy's port on `::1`, if there is one.
    pub udp6_port: Option<u16>,
    /// Steer port 53 to any address to the DNS proxy.
    pub dns: bool,
    /// The tc path for other network namespaces: the transparent listener's
    /// port (on 127.0.0.1) and the mark its packets get.
    pub tc: Option<(u16, u32)>,
    /// Bridge only the sockets of this uid's processes (a user's bridge);
    /// `None`: every process of the scope (root's).
    pub owner_uid: Option<u32>,
}

impl std::fmt::Debug for Redirector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redirector")
            .field("attached", &self.attached)
            .finish_non_exhaustive()
    }
}

impl Redirector {
    /// Loads the embedded object and its programs into the kernel (not yet
    /// attached anywhere). Kernel log records (aya-log) are forwarded to
    /// `tracing` when a tokio runtime is running.
    pub fn load() -> Result<Self, LoadError> {
        if EBPF_OBJECT.is_empty() {
            return Err(LoadError::NotEmbedded);
        }
        let mut ebpf = EbpfLoader::new()
            .load(EBPF_OBJECT)
            .map_err(LoadError::Object)?;
        forward_kernel_logs(&mut ebpf);
        for name in SOCK_ADDR_PROGRAMS {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load()
                .map_err(|source| LoadError::program_load(name, source))?;
        }
        let prog: &mut SockOps = program(&mut ebpf, programs::SOCK_OPS)?;
        prog.load()
            .map_err(|source| LoadError::program_load(programs::SOCK_OPS, source))?;
        let prog: &mut CgroupSock = program(&mut ebpf, programs::SOCK_RELEASE)?;
        prog.load().map_err(|source| LoadError::Program {
            name: programs::SOCK_RELEASE,
            source,
        })?;
        let cookie_orig = ebpf
            .take_map(maps::COOKIE_ORIG)
            .ok_or(LoadError::MissingMap {
                name: maps::COOKIE_ORIG,
            })?;
        let cookie_orig = HashMap::try_from(cookie_orig).map_err(|source| LoadError::Map {
            name: maps::COOKIE_ORIG,
            source,
        })?;
        let (udp_slots, udp6_last) = crate::udp::take_maps(&mut ebpf)?;
        Ok(Self {
            ebpf,
            table: OrigDstTable(Arc::new(cookie_orig)),
            bypass: Bypass,
            udp_slots,
            udp6_last,
            attached: AttachedIds::default(),
            made_clsact: Vec::new(),
        })
    }

    /// Configures where redirected sockets go; until this is called nothing
    /// is redirected.
    pub fn configure(&mut self, proxy: ProxyConfig) -> Result<(), LoadError> {
        let name = maps::CONFIG;
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(LoadError::MissingMap { name })?;
        let mut config: Array<_, Config> =
            Array::try_from(map).map_err(|source| LoadError::Map { name, source })?;
        let mut value = Config {
            proxy_ip4_be: u32::from_ne_bytes(proxy.tcp4.ip().octets()),
            proxy_port_be: u32::from(proxy.tcp4.port().to_be()),
            udp_port_be: u32::from(proxy.udp_port.to_be()),
            flags: flags::ENABLED,
            // Only this network namespace's sockets (tpbpfd's own, where
            // its listeners are).
            netns_cookie: own_netns_cookie()?,
            ..Config::default()
        };
        if let Some(v6) = proxy.tcp6 {
            value.proxy6_ip_be = ip6_words(v6.ip());
            value.proxy6_port_be = u32::from(v6.port().to_be());
            value.flags |= flags::PROXY6;
        }
        if proxy.dns {
            value.flags |= flags::DNS;
        }
        // Kernel log records cost a ring buffer write per connection: only
        // when someone reads them.
        if tracing::enabled!(target: "tpbpf", tracing::Level::DEBUG) {
            value.flags |= flags::LOG;
        }
        if let Some((port, mark)) = proxy.tc {
            value.tc_port_be = u32::from(port.to_be());
            value.tc_mark = mark;
        }
        if let Some(port) = proxy.udp6_port {
            value.udp6_port_be = u32::from(port.to_be());
            value.flags |= flags::UDP6;
        }
        if let Some(uid) = proxy.owner_uid {
            value.owner_uid = uid;
            value.flags |= flags::OWNER;
        }
        config
            .set(0, value, 0)
            .map_err(|source| LoadError::Map { name, source })
    }

    /// A handle to exempt tpbpfd's own sockets from redirection.
    pub fn bypass(&self) -> Bypass {
        self.bypass
    }

    /// A handle on the IPv6 UDP last-destination table, for the UDP proxy.
    pub fn udp6_last(&self) -> Udp6Last {
        self.udp6_last.clone()
    }

    /// A handle on the UDP slot table, for the UDP proxy.
    pub fn udp_slots(&self) -> UdpSlots {
        self.udp_slots.clone()
    }

    /// Sends redirected TCP connections to `listener` (IPv4 only, no UDP
    /// or DNS capture). Until this is called nothing is redirected.
    pub fn set_proxy(&mut self, listener: SocketAddrV4) -> Result<(), LoadError> {
        self.configure(ProxyConfig {
            tcp4: listener,
            tcp6: None,
            udp_port: 0,
            udp6_port: None,
            dns: false,
            tc: None,
            owner_uid: None,
        })
    }

    /// Adds a range to redirect (`proxy`) or to leave alone (`!proxy`,
    /// `--never-proxy`). The most specific range wins.
    pub fn add_range(&mut self, cidr: Cidr, proxy: bool) -> Result<(), LoadError> {
        let value = if proxy { action::PROXY } else { action::NEVER };
        let prefix = u32::from(cidr.prefix_len());
        match cidr.addr() {
            IpAddr::V4(addr) => {
                let name = maps::CIDRS4;
                let map = self
                    .ebpf
                    .map_mut(name)
                    .ok_or(LoadError::MissingMap { name })?;
                let mut trie: LpmTrie<_, u32, u32> =
                    LpmTrie::try_from(map).map_err(|source| LoadError::Map { name, source })?;
                let key = Key::new(prefix, u32::from_ne_bytes(addr.octets()));
                trie.insert(&key, value, 0)
                    .map_err(|source| LoadError::Map { name, source })
            }
            IpAddr::V6(addr) => {
                let name = maps::CIDRS6;
                let map = self
                    .ebpf
                    .map_mut(name)
                    .ok_or(LoadError::MissingMap { name })?;
                let mut trie: LpmTrie<_, [u32; 4], u32> =
                    LpmTrie::try_from(map).map_err(|source| LoadError::Map { name, source })?;
                let key = Key::new(prefix, ip6_words(&addr));
                trie.insert(&key, value, 0)
                    .map_err(|source| LoadError::Map { name, source })
            }
        }
    }

    /// Attaches the programs to the cgroup open at `cgroup` through
    /// `bpf_link`s owned by this process.
    pub fn attach(&mut self, cgroup: &File, cgroup_name: &str) -> Result<AttachedIds, LoadError> {
        let attach_err = |name, source| LoadError::Attach {
            name,
            cgroup: cgroup_name.to_string(),
            source,
        };
        let mut program_ids = Vec::new();
        for name in SOCK_ADDR_PROGRAMS {
            let prog: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
            prog.attach(cgroup.as_fd(), CgroupAttachMode::Single)
                .map_err(|e| attach_err(name, e))?;
            program_ids.push(prog.info().map_err(|e| attach_err(name, e))?.id());
        }
        let name = programs::SOCK_OPS;
        let prog: &mut SockOps = program(&mut self.ebpf, name)?;
        prog.attach(cgroup.as_fd(), CgroupAttachMode::Single)
            .map_err(|e| attach_err(name, e))?;
        program_ids.push(prog.info().map_err(|e| attach_err(name, e))?.id());
        let name = programs::SOCK_RELEASE;
        let prog: &mut CgroupSock = program(&mut self.ebpf, name)?;
        prog.attach(cgroup.as_fd(), CgroupAttachMode::Single)
            .map_err(|e| attach_err(name, e))?;
        program_ids.push(prog.info().map_err(|e| attach_err(name, e))?.id());

        let link_ids = loaded_links()
            .filter_map(Result::ok)
            .filter(|l| program_ids.contains(&l.program_id()))
            .map(|l| l.id())
            .collect();
        self.attached = AttachedIds {
            program_ids,
            link_ids,
        };
        debug!(cgroup = cgroup_name, ids = ?self.attached, "attached");
        Ok(self.attached.clone())
    }

    /// Attaches the tc ingress program to `iface` (tcx: a link owned by this
    /// process, Linux 6.6+). Returns the kernel's link id. Before 6.6 the
    /// program goes on the `clsact` qdisc through netlink, and the qdisc is
    /// made here if the interface has none.
    pub fn attach_tc(&mut self, iface: &str) -> Result<Vec<u32>, LoadError> {
        let name = programs::TC_INGRESS;
        let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?;
        if prog.fd().is_err() {
            prog.load()
                .map_err(|source| LoadError::program_load(name, source))?;
        }
        if aya::util::KernelVersion::current()
            .is_ok_and(|v| v < aya::util::KernelVersion::new(6, 6, 0))
        {
            match aya::programs::tc::qdisc_add_clsact(iface) {
                Ok(()) => {
                    debug!(iface, "clsact qdisc added (no tcx before Linux 6.6)");
                    self.made_clsact.push(iface.to_string());
                }
                // EEXIST: it has one already.
                Err(aya::programs::tc::TcError::NetlinkError(e))
                    if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => {
                    return Err(LoadError::Attach {
                        name,
                        cgroup: format!("interface {iface}"),
                        source: aya::programs::ProgramError::TcError(e),
                    })
                }
            }
        }
        prog.attach(iface, TcAttachType::Ingress)
            .map_err(|source| LoadError::Attach {
                name,
                cgroup: format!("interface {iface}"),
                source,
            })?;
        let id = prog
            .info()
            .map_err(|source| LoadError::Program { name, source })?
            .id();
        self.attached.program_ids.push(id);
        let links: Vec<u32> = loaded_links()
            .filter_map(Result::ok)
            .filter(|l| l.program_id() == id)
            .map(|l| l.id())
            .collect();
        for l in &links {
            if !self.attached.link_ids.contains(l) {
                self.attached.link_ids.push(*l);
            }
        }
        Ok(links)
    }

    pub fn attached(&self) -> &AttachedIds {
        &self.attached
    }

    /// The interfaces whose `clsact` qdisc [`Self::attach_tc`] made; the
    /// caller removes them once the program is detached (they are not
    /// owned by a link).
    pub fn made_clsact(&self) -> &[String] {
        &self.made_clsact
    }

    /// A handle on the original-destination table, for the listener's tasks.
    pub fn table(&self) -> OrigDstTable {
        self.table.clone()
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, LoadError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf
        .program_mut(name)
        .ok_or(LoadError::MissingProgram { name })?;
    prog.try_into()
        .map_err(|source| LoadError::Program { name, source })
}

/// Forwards aya-log records from the kernel programs to `log` (and from
/// there to `tracing`), if a tokio runtime is there to poll them.
fn forward_kernel_logs(ebpf: &mut Ebpf) {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(l) => l,
        Err(e) => {
            debug!("kernel program logs unavailable: {e}");
            return;
        }
    };
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        debug!("no tokio runtime: kernel program logs are not forwarded");
        return;
    };
    handle.spawn(async move {
        // SAFETY: the logger owns its ring buffer's fd, which stays open and
        // the same for as long as the logger lives inside the AsyncFd.
        let registered = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
        };
        let Ok(mut fd) = registered else { return };
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

/// Where each redirected connection was going: `COOKIE_ORIG`, by the
/// client socket's cookie. The listener finds that socket from the accepted
/// connection's two addresses through the kernel's socket diagnostics
/// (`sock_diag`), so an entry belongs to the one socket that dialled: a
/// later connection from the same port (never redirected, or from another
/// socket after the first was never accepted) finds nothing of it. A socket
/// cookie is never reused.
#[derive(Clone)]
pub struct OrigDstTable(Arc<HashMap<MapData, u64, OrigDst>>);

impl OrigDstTable {
    /// The original destination of a connection accepted on a listener of
    /// this bridge, from its `peer` and `local` addresses, or `None` if the
    /// socket at its other end was not redirected by tpbpf (or is gone).
    /// The lookup is made in the calling thread's network namespace, which
    /// must be the listener's: elsewhere it finds no redirected socket.
    pub fn original_destination(
        &self,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> io::Result<Option<SocketAddr>> {
        let Some((cookie, _uid)) = tpbpf_sys::sockdiag::tcp_socket_of(peer, local)? else {
            return Ok(None);
        };
        match self.0.get(&cookie, 0) {
            Ok(orig) => Ok(orig_to_socket_addr(&orig)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(io::Error::other(e)),
        }
    }
}

/// An IPv6 address as the kernel's four network-order words.
fn ip6_words(ip: &std::net::Ipv6Addr) -> [u32; 4] {
    let o = ip.octets();
    let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

/// tpbpf's own sockets: marked before they connect or send, so the
/// programs leave them alone even when tpbpfd runs inside a bridged
/// cgroup, and every other bridge of the machine does too, whichever
/// process loaded it (see [`tpbpf_common::EXEMPT_PRIORITY`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct Bypass;

impl Bypass {
    /// Exempts `sock` from redirection by every bridge: sets its
    /// `SO_PRIORITY` to [`tpbpf_common::EXEMPT_PRIORITY`] (which takes
    /// `CAP_NET_ADMIN`, as loading the programs did).
    pub fn register<S: AsFd>(&self, sock: &S) -> io::Result<()> {
        let priority = tpbpf_common::EXEMPT_PRIORITY as libc::c_int;
        // SAFETY: valid fd, and an int-sized value whose length is passed.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_fd().as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_PRIORITY,
                (&priority as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(
                e.kind(),
                format!("marking a socket as tpbpf's own (SO_PRIORITY): {e}"),
            ));
        }
        Ok(())
    }
}

pub(crate) fn orig_to_socket_addr(orig: &OrigDst) -> Option<SocketAddr> {
    let port = u16::from_be(orig.port_be as u16);
    match orig.family {
        AF_INET => Some(SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(orig.ip_be[0].to_ne_bytes()),
            port,
        ))),
        AF_INET6 => {
            let mut o = [0u8; 16];
            for (i, w) in orig.ip_be.iter().enumerate() {
                o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            Some(SocketAddr::new(IpAddr::from(o), port))
        }
        _ => None,
    }
}

/// `SO_NETNS_COOKIE` (Linux 5.14): the network namespace a socket lives in.
pub(crate) fn netns_cookie<S: AsFd>(sock: &S) -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, and a u64-sized out buffer whose length is passed.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// The cookie of this thread's network namespace (`SO_NETNS_COOKIE`, Linux
/// 5.14), as `bpf_get_netns_cookie` returns it for sockets there.
pub fn own_netns_cookie() -> Result<u64, LoadError> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")
        .or_else(|_| std::net::UdpSocket::bind("[::1]:0"))
        .map_err(|e| LoadError::NetnsCookie(e.to_string()))?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: a valid socket, and a buffer of the size given.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(LoadError::NetnsCookie(
            std::io::Error::last_os_error().to_string(),
        ));
    }
    Ok(cookie)
}

/// Removes tpbpf's tc ingress filter from `iface`, attached through
/// netlink before Linux 6.6 (no tcx link to end with the process): what the
/// clean-up helper does when tpbpfd died without detaching. Filters of other
/// programs are left alone (they are found by tpbpf's program name). True
/// if one was removed.
pub fn remove_leftover_tc_filter(iface: &str) -> std::io::Result<bool> {
    match aya::programs::tc::qdisc_detach_program(
        iface,
        TcAttachType::Ingress,
        programs::TC_INGRESS,
    ) {
        Ok(()) => Ok(true),
        // Nothing of tpbpf's there, no clsact qdisc, or no interface.
        Err(aya::programs::tc::TcError::IoError(e))
            if e.kind() == std::io::ErrorKind::NotFound
                || e.raw_os_error() == Some(libc::ENODEV) =>
        {
            Ok(false)
        }
        Err(aya::programs::tc::TcError::NetlinkError(e))
            if matches!(
                e.raw_os_error(),
                Some(libc::EINVAL | libc::ENOENT | libc::ENODEV)
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(std::io::Error::other(format!(
            "removing tpbpf's tc filter from {iface}: {e}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_destination_round_trips_from_kernel_layout() {
        let orig = OrigDst {
            ip_be: [u32::from_ne_bytes([10, 96, 0, 10]), 0, 0, 0],
            port_be: u32::from(80u16.to_be()),
            family: AF_INET,
            _pad: 0,
        };
        assert_eq!(
            orig_to_socket_addr(&orig),
            Some("10.96.0.10:80".parse().unwrap())
        );
    }
}
