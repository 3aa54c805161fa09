//! tpbpfd's handles on the UDP maps: which destination a slot address
//! names and for which socket, whether that socket is still open, and the
//! last destination of each unconnected IPv6 socket. A flow lives only as
//! long as its socket: `sock_release` removes what these read.
use std::{
    net::{Ipv4Addr, SocketAddr},
    os::fd::AsFd,
    sync::{Arc, Mutex},
};

use aya::{
    maps::{Array, HashMap, MapData},
    Ebpf,
};
use tpbpf_common::{maps, SockKey, Udp6Dst, UdpSlot, AF_INET6, UDP_SLOT_NET};

use crate::{
    redirect::{netns_cookie, orig_to_socket_addr},
    LoadError,
};

/// Takes the UDP maps out of the loaded object.
pub(crate) fn take_maps(ebpf: &mut Ebpf) -> Result<(UdpSlots, Udp6Last), LoadError> {
    let slots = Array::try_from(take(ebpf, maps::UDP_SLOTS)?).map_err(|source| LoadError::Map {
        name: maps::UDP_SLOTS,
        source,
    })?;
    let open =
        HashMap::try_from(take(ebpf, maps::COOKIE_SLOT)?).map_err(|source| LoadError::Map {
            name: maps::COOKIE_SLOT,
            source,
        })?;
    let udp6 =
        HashMap::try_from(take(ebpf, maps::UDP6_LAST)?).map_err(|source| LoadError::Map {
            name: maps::UDP6_LAST,
            source,
        })?;
    let open = OpenSockets(Arc::new(open));
    let slots = UdpSlots {
        slots: Arc::new(Mutex::new(slots)),
        open: open.clone(),
    };
    let last = Udp6Last {
        last: Arc::new(udp6),
        open,
    };
    Ok((slots, last))
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, LoadError> {
    ebpf.take_map(name).ok_or(LoadError::MissingMap { name })
}

/// `COOKIE_SLOT`: an entry for every socket tpbpf's UDP paths know that is
/// still open (`sock_release` removes it).
#[derive(Clone)]
struct OpenSockets(Arc<HashMap<MapData, u64, u32>>);

impl OpenSockets {
    /// One map lookup: cheap enough for every datagram. An entry the LRU
    /// map dropped reads as closed (its flows end: fail closed).
    fn has(&self, cookie: u64) -> bool {
        self.0.get(&cookie, 0).is_ok()
    }
}

/// The UDP slot table: which original destination a slot address stands for.
#[derive(Clone)]
pub struct UdpSlots {
    slots: Arc<Mutex<Array<MapData, UdpSlot>>>,
    open: OpenSockets,
}

/// What a slot address names: the original destination, and the socket
/// (its cookie) the slot was made for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotInfo {
    pub slot: u32,
    pub orig: SocketAddr,
    pub owner: u64,
}

impl UdpSlots {
    fn slot_of(ip: Ipv4Addr) -> Option<u32> {
        let o = ip.octets();
        (o[..2] == UDP_SLOT_NET).then(|| u32::from(o[2]) << 8 | u32::from(o[3]))
    }

    fn entry(&self, slot: u32) -> Option<UdpSlot> {
        let map = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&slot, 0).ok()
    }

    /// What the slot address `ip` (127.100.x.y) names now.
    pub fn lookup(&self, ip: Ipv4Addr) -> Option<SlotInfo> {
        let slot = Self::slot_of(ip)?;
        let entry = self.entry(slot)?;
        if entry.owner == 0 || entry.orig.family == 0 {
            return None;
        }
        Some(SlotInfo {
            slot,
            orig: orig_to_socket_addr(&entry.orig)?,
            owner: entry.owner,
        })
    }

    /// Whether the socket `owner` is still open (one map lookup).
    pub fn owner_open(&self, owner: u64) -> bool {
        self.open.has(owner)
    }

    /// Whether `info`'s slot still names the same destination for the same
    /// socket, and that socket is open.
    pub fn still_owns(&self, info: &SlotInfo) -> bool {
        self.entry(info.slot)
            .is_some_and(|e| names(&e, info) && self.owner_open(info.owner))
    }

    /// Marks `info`'s slot as in use now, if it still names the same
    /// destination for the same socket: a flow tpbpfd relays keeps its
    /// slot (connected sockets' datagrams pass no hook that would).
    pub fn touch(&self, info: &SlotInfo) {
        let map = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let Ok(mut entry) = map.get(&info.slot, 0) else {
            return;
        };
        if !names(&entry, info) {
            return;
        }
        entry.used_ns = monotonic_ns();
        drop(map);
        let _ = self
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set(info.slot, entry, 0);
    }
}

/// Whether the kernel's `entry` is the slot `info` describes.
fn names(entry: &UdpSlot, info: &SlotInfo) -> bool {
    entry.owner == info.owner && orig_to_socket_addr(&entry.orig) == Some(info.orig)
}

/// `CLOCK_MONOTONIC` in nanoseconds, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}

/// The last destination of each unconnected IPv6 UDP socket, by its
/// namespace and local port.
#[derive(Clone)]
pub struct Udp6Last {
    last: Arc<HashMap<MapData, SockKey, Udp6Dst>>,
    open: OpenSockets,
}

/// Where an unconnected IPv6 socket last sent, and which socket it is
/// (its cookie): one that binds the same port later is another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Udp6Dest {
    pub orig: SocketAddr,
    pub owner: u64,
}

impl Udp6Last {
    /// Where a datagram that `proxy` (the IPv6 UDP proxy socket) received
    /// from `[::1]:client_port` was going, and from which socket; `None`
    /// once that socket has closed.
    pub fn lookup<S: AsFd>(&self, proxy: &S, client_port: u16) -> Option<Udp6Dest> {
        let key = SockKey {
            netns_cookie: netns_cookie(proxy).ok()?,
            ip_be: [0; 4],
            port: client_port,
            family: AF_INET6,
            _pad: 0,
        };
        let last = self.last.get(&key, 0).ok()?;
        if !self.open.has(last.owner) {
            return None;
        }
        Some(Udp6Dest {
            orig: orig_to_socket_addr(&last.orig)?,
            owner: last.owner,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tpbpf_common::{OrigDst, AF_INET};

    fn slot(owner: u64, ip: [u8; 4], port: u16) -> UdpSlot {
        UdpSlot {
            orig: OrigDst {
                ip_be: [u32::from_ne_bytes(ip), 0, 0, 0],
                port_be: u32::from(port.to_be()),
                family: AF_INET,
                _pad: 0,
            },
            owner,
            used_ns: 0,
        }
    }

    #[test]
    fn a_slot_is_a_flows_only_while_it_names_the_same_socket_and_destination() {
        let info = SlotInfo {
            slot: 3,
            orig: "10.96.0.10:7".parse().unwrap(),
            owner: 42,
        };
        assert!(names(&slot(42, [10, 96, 0, 10], 7), &info));
        assert!(!names(&slot(0, [10, 96, 0, 10], 7), &info), "released");
        assert!(
            !names(&slot(43, [10, 96, 0, 10], 7), &info),
            "another socket's"
        );
        assert!(
            !names(&slot(42, [10, 96, 0, 11], 7), &info),
            "another destination"
        );
        assert!(!names(&slot(42, [10, 96, 0, 10], 8), &info), "another port");
    }

    #[test]
    fn slot_addresses_are_the_slot_range_only() {
        assert_eq!(UdpSlots::slot_of(Ipv4Addr::new(127, 100, 1, 2)), Some(258));
        assert_eq!(UdpSlots::slot_of(Ipv4Addr::new(127, 0, 1, 2)), None);
    }
}
