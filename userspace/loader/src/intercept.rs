//! The intercept's kernel side, used by the agent: `sk_lookup` attached to a
//! pod's network namespace (a link owned by the agent) steering new TCP
//! connections for a port to the agent's listener in that namespace.
use std::{
    fs::File,
    net::{IpAddr, SocketAddr},
    os::fd::AsFd,
};

use aya::{
    maps::{HashMap, SockMap},
    programs::{loaded_links, SkLookup},
    Ebpf, EbpfLoader,
};
use tpbpf_common::{maps, programs, Endpoint, AF_INET, AF_INET6};

use crate::{AttachedIds, LoadError, EBPF_OBJECT};

/// An active intercept. Dropping it detaches the program: the pod's app
/// gets its new connections again.
pub struct Interceptor {
    _ebpf: Ebpf,
    attached: AttachedIds,
    bypass: Bypass,
}

/// The source endpoints (address and port) whose connections the intercept
/// leaves alone: the agent's own connections to the app. Cloneable, shared.
#[derive(Clone)]
pub struct Bypass(std::sync::Arc<std::sync::Mutex<HashMap<aya::maps::MapData, Endpoint, u8>>>);

impl Bypass {
    pub fn add(&self, source: SocketAddr) -> Result<(), aya::maps::MapError> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(endpoint(source), 1, 0)
    }
    pub fn remove(&self, source: SocketAddr) {
        let _ = self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&endpoint(source));
    }
}

/// The intercept maps' key for an address and port (IPv4-mapped IPv6 is
/// its IPv4 address, as the kernel's lookup sees such connections).
pub fn endpoint(addr: SocketAddr) -> Endpoint {
    let ip = match addr.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    match ip {
        IpAddr::V4(a) => Endpoint {
            ip_be: [u32::from_ne_bytes(a.octets()), 0, 0, 0],
            port: u32::from(addr.port()),
            family: u32::from(AF_INET),
        },
        IpAddr::V6(a) => {
            let o = a.octets();
            let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            Endpoint {
                ip_be: [word(0), word(4), word(8), word(12)],
                port: u32::from(addr.port()),
                family: u32::from(AF_INET6),
            }
        }
    }
}

impl std::fmt::Debug for Interceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interceptor")
            .field("attached", &self.attached)
            .finish()
    }
}

impl Interceptor {
    /// Steers new TCP connections to `target` (the pod's own address and
    /// port) in the network namespace open at `netns` to `listener` (a
    /// listening socket created in that namespace). Connections to the port
    /// on other addresses (loopback: sidecars, probes) are left alone.
    pub fn attach<L: std::os::fd::AsRawFd>(
        netns: &File,
        target: SocketAddr,
        listener: &L,
    ) -> Result<Self, LoadError> {
        if EBPF_OBJECT.is_empty() {
            return Err(LoadError::NotEmbedded);
        }
        let mut ebpf = EbpfLoader::new()
            .load(EBPF_OBJECT)
            .map_err(LoadError::Object)?;
        let name = maps::INTERCEPT_SOCKS;
        let mut socks: SockMap<_> =
            SockMap::try_from(ebpf.map_mut(name).ok_or(LoadError::MissingMap { name })?)
                .map_err(|source| LoadError::Map { name, source })?;
        socks
            .set(0, listener, 0)
            .map_err(|source| LoadError::Map { name, source })?;
        let name = maps::INTERCEPT_PORTS;
        let mut ports: HashMap<_, Endpoint, u32> =
            HashMap::try_from(ebpf.map_mut(name).ok_or(LoadError::MissingMap { name })?)
                .map_err(|source| LoadError::Map { name, source })?;
        ports
            .insert(endpoint(target), 0, 0)
            .map_err(|source| LoadError::Map { name, source })?;

        let name = maps::INTERCEPT_BYPASS;
        let bypass: HashMap<_, Endpoint, u8> =
            HashMap::try_from(ebpf.take_map(name).ok_or(LoadError::MissingMap { name })?)
                .map_err(|source| LoadError::Map { name, source })?;

        let name = programs::SK_LOOKUP;
        let prog: &mut SkLookup = ebpf
            .program_mut(name)
            .ok_or(LoadError::MissingProgram { name })?
            .try_into()
            .map_err(|source| LoadError::Program { name, source })?;
        prog.load()
            .map_err(|source| LoadError::program_load(name, source))?;
        prog.attach(netns.as_fd())
            .map_err(|source| LoadError::Attach {
                name,
                cgroup: "the pod's network namespace".into(),
                source,
            })?;
        let id = prog
            .info()
            .map_err(|source| LoadError::Program { name, source })?
            .id();
        let link_ids = loaded_links()
            .filter_map(Result::ok)
            .filter(|l| l.program_id() == id)
            .map(|l| l.id())
            .collect();
        Ok(Self {
            _ebpf: ebpf,
            attached: AttachedIds {
                program_ids: vec![id],
                link_ids,
            },
            bypass: Bypass(std::sync::Arc::new(std::sync::Mutex::new(bypass))),
        })
    }

    /// The ports whose connections are left to the app.
    pub fn bypass(&self) -> Bypass {
        self.bypass.clone()
    }

    pub fn attached(&self) -> &AttachedIds {
        &self.attached
    }
}
