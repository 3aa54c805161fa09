//! `#[repr(C)]` types and map names shared by tpbpf's kernel programs
//! (`bpf/ebpf`) and its userspace loader.
//!
//! Rules, so both sides agree byte for byte:
//! - every struct is `#[repr(C)]` with explicit padding fields;
//! - flags are `u32`, never `bool`;
//! - a field's byte order is in its name: `_be` is network order as the
//!   kernel stores it, no suffix is host order.
#![no_std]

/// Map names, defined once for both sides.
pub mod maps {
    /// `Array<Config>` with one entry: where redirected sockets go.
    pub const CONFIG: &str = "TPBPF_CONFIG";
    /// `LpmTrie<u32 (addr, network order), u32 (action)>`: IPv4 ranges.
    pub const CIDRS4: &str = "TPBPF_CIDRS4";
    /// `LpmTrie<[u32; 4] (addr, network order), u32 (action)>`: IPv6 ranges.
    pub const CIDRS6: &str = "TPBPF_CIDRS6";
    /// `LruHashMap<SlotKey (destination, socket), u32 (slot)>`: the UDP slot
    /// of each socket's destination.
    pub const UDP_SLOT_BY_DST: &str = "TPBPF_UDP_SLOT_BY_DST";
    /// `LruHashMap<u64 (socket cookie), u32 (slot)>`: the last slot made for
    /// each socket ([`super::NO_SLOT`] for an IPv6 socket's unconnected
    /// datagrams), freed by `sock_release`. A socket with an entry is open:
    /// tpbpfd ends a UDP flow once its socket has none.
    pub const COOKIE_SLOT: &str = "TPBPF_COOKIE_SLOT";
    /// `Array<UdpSlot>` of [`UDP_SLOTS`] entries: each slot's destination,
    /// owner socket and last use.
    pub const UDP_SLOTS: &str = "TPBPF_UDP_SLOTS";
    /// `Array<u32>` with one entry: the next slot to hand out.
    pub const UDP_NEXT: &str = "TPBPF_UDP_NEXT";
    /// `LruHashMap<SockKey (netns, client port), Udp6Dst>`: the last
    /// destination of each unconnected IPv6 UDP socket and that socket's
    /// cookie (see `Config::udp6_port_be`).
    pub const UDP6_LAST: &str = "TPBPF_UDP6_LAST";
    /// `HashMap<Endpoint (the pod's own address and port), u32 (index)>`:
    /// what is intercepted. Only connections to the pod's address are
    /// steered: loopback traffic of sidecars and probes is not.
    pub const INTERCEPT_PORTS: &str = "TPBPF_INTERCEPT_PORTS";
    /// `SockMap`: the agent's listeners in the intercepted pod's namespace.
    pub const INTERCEPT_SOCKS: &str = "TPBPF_INTERCEPT_SOCKS";
    /// `HashMap<Endpoint (source address and port), u8>`: the agent's own
    /// connections to the intercepted app, not steered (HTTP-filtered
    /// intercepts and mirrors pass requests on to the app).
    pub const INTERCEPT_BYPASS: &str = "TPBPF_INTERCEPT_BYPASS";
    /// `LruHashMap<u64 (socket cookie), OrigDst>`: filled on connect, read by
    /// getpeername and by the sock_ops re-keying.
    pub const COOKIE_ORIG: &str = "TPBPF_COOKIE_ORIG";
    /// `LruHashMap<SockKey, OrigDst>`: the original destination keyed by the
    /// client's local address, which the listener sees as the peer address of
    /// the accepted connection.
    pub const CONN_ORIG: &str = "TPBPF_CONN_ORIG";
}

/// Program names (the function names in `bpf/ebpf`). A program function must
/// not share its name with its ELF section.
pub mod programs {
    pub const CONNECT4: &str = "tpbpf_connect4";
    pub const CONNECT6: &str = "tpbpf_connect6";
    pub const GETPEERNAME4: &str = "tpbpf_getpeername4";
    pub const GETPEERNAME6: &str = "tpbpf_getpeername6";
    pub const SENDMSG4: &str = "tpbpf_sendmsg4";
    pub const SENDMSG6: &str = "tpbpf_sendmsg6";
    pub const RECVMSG4: &str = "tpbpf_recvmsg4";
    pub const RECVMSG6: &str = "tpbpf_recvmsg6";
    pub const SOCK_OPS: &str = "tpbpf_sock_ops";
    pub const SOCK_RELEASE: &str = "tpbpf_sock_release";
    pub const TC_INGRESS: &str = "tpbpf_tc_ingress";
    pub const SK_LOOKUP: &str = "tpbpf_sk_lookup";
}

/// The `SO_PRIORITY` of tpbpf's own sockets (DNS forwards, connections to
/// the API server and the cluster): every bridge's programs, in whichever
/// process loaded them, leave such a socket alone, so two bridges never
/// hand each other's forwards back and forth. Setting a priority above 6
/// takes `CAP_NET_ADMIN` (or `CAP_NET_RAW`) in the socket's network
/// namespace, so a process can only exempt itself where it could leave
/// the bridge anyway. Its low four bits are 0 (best effort, as a socket
/// without a priority: the band and VLAN mappings use those bits) and its
/// major number 0x7470 names no qdisc, so no qdisc classifies by it.
pub const EXEMPT_PRIORITY: u32 = 0x7470_bf00;

/// UDP datagrams are redirected to `127.100.S.S:<udp_port>`, where `S.S` is
/// a slot number naming the original destination: tpbpfd's UDP socket reads
/// the slot from each datagram's destination address (IP_PKTINFO) and
/// answers from the same address, which `recvmsg4/6` turn back into the
/// original destination. Per datagram, no race, no per-socket state.
pub const UDP_SLOTS: u32 = 65536;
/// The first two octets of the slot addresses, `127.100.0.0/16`.
pub const UDP_SLOT_NET: [u8; 2] = [127, 100];
/// A slot unused this long may be handed to another destination (a slot
/// in use never is: its datagrams would reach the wrong destination).
pub const UDP_SLOT_IDLE_NS: u64 = 30_000_000_000;
/// The `COOKIE_SLOT` value of a socket that is known (it sent an IPv6
/// datagram through tpbpfd) but has no slot.
pub const NO_SLOT: u32 = u32::MAX;
/// How many slots one allocation looks at before it gives up (the
/// datagram then goes out unbridged, and fails as without tpbpf).
pub const UDP_SLOT_PROBES: u32 = 8;

/// A UDP slot: the destination it names and the socket it was made for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpSlot {
    pub orig: OrigDst,
    /// Cookie of the socket the slot was made for (`SO_COOKIE`); zero: free.
    /// tpbpfd answers a slot only for that socket.
    pub owner: u64,
    /// When it was last used, `CLOCK_MONOTONIC` nanoseconds (as
    /// `bpf_ktime_get_ns`): by the hooks when they hand it out, by tpbpfd
    /// while it relays the flow.
    pub used_ns: u64,
}

/// The last destination of an unconnected IPv6 UDP socket, and which
/// socket it is: a socket that binds the same port later is not it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Udp6Dst {
    pub orig: OrigDst,
    /// Cookie of the socket that sent to `orig` (`SO_COOKIE`).
    pub owner: u64,
}

const _: () = assert!(core::mem::size_of::<Udp6Dst>() == 24 + 8);

/// The key of a slot: one per socket and destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SlotKey {
    pub orig: OrigDst,
    pub owner: u64,
}

/// `Config.flags` bits.
pub mod flags {
    /// Userspace has filled the config: redirect.
    pub const ENABLED: u32 = 1;
    /// Steer port 53 (UDP and TCP) to any address to tpbpfd's DNS proxy.
    pub const DNS: u32 = 2;
    /// A TCP listener on `[::1]` exists for native IPv6 destinations.
    pub const PROXY6: u32 = 4;
    /// A UDP socket on `[::1]` exists for unconnected IPv6 datagrams.
    pub const UDP6: u32 = 8;
    /// Emit aya-log records from the hot paths (tpbpf runs at debug level).
    pub const LOG: u32 = 16;
    /// Only sockets of processes running as [`super::Config::owner_uid`]
    /// are bridged: a group member's bridge carries that member's traffic,
    /// never another account's (nor root's).
    pub const OWNER: u32 = 32;
}

/// Values of the CIDR maps.
pub mod action {
    /// Destination is in a bridged range: redirect it.
    pub const PROXY: u32 = 1;
    /// Destination is excluded (`--never-proxy`): leave it alone.
    pub const NEVER: u32 = 2;
}

/// `AF_INET`, as the kernel numbers it.
pub const AF_INET: u16 = 2;
/// `AF_INET6`, as the kernel numbers it.
pub const AF_INET6: u16 = 10;

/// Maximum entries of the connection maps. LRU maps: the oldest entries go
/// first when full, so a flood of connections cannot fail new ones.
pub const CONN_MAP_ENTRIES: u32 = 65536;
/// Maximum entries of each CIDR map.
pub const CIDR_MAP_ENTRIES: u32 = 1024;

/// Where redirected sockets go: tpbpfd's listeners.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// IPv4 TCP listener address, network order (as `bpf_sock_addr.user_ip4`).
    pub proxy_ip4_be: u32,
    /// IPv4 TCP listener port, network order in the low 16 bits (as `bpf_sock_addr.user_port`).
    pub proxy_port_be: u32,
    /// IPv6 TCP listener address (`::1`), network order words.
    pub proxy6_ip_be: [u32; 4],
    /// IPv6 TCP listener port, network order in the low 16 bits.
    pub proxy6_port_be: u32,
    /// UDP proxy port (on the slot addresses), network order in the low 16 bits.
    pub udp_port_be: u32,
    /// [`flags`] bits; zero until userspace has filled the entry.
    pub flags: u32,
    /// UDP proxy port on `[::1]` for unconnected IPv6 datagrams, network
    /// order in the low 16 bits. The kernel refuses to turn an IPv6
    /// `sendmsg` into an IPv4-mapped one, so native IPv6 datagrams cannot use
    /// the slot addresses; they go to `[::1]`, and the socket's last
    /// destination is kept by (netns, local port).
    pub udp6_port_be: u32,
    /// Port of the transparent TCP listener on 127.0.0.1 for connections
    /// from other network namespaces (tc path), network order in the low 16
    /// bits; zero when there is none.
    pub tc_port_be: u32,
    /// Mark the tc program puts on packets it steers, so a policy route
    /// (`fwmark` -> `local` table) delivers them locally.
    pub tc_mark: u32,
    /// The network namespace (its cookie) whose sockets are bridged: a
    /// process of the bridged cgroup in another namespace (a container, a
    /// kind node, `ip netns exec`) is left alone, since tpbpfd's listeners
    /// do not exist there. Zero: any namespace.
    pub netns_cookie: u64,
    /// With [`flags::OWNER`]: the uid whose processes' sockets are bridged.
    pub owner_uid: u32,
    /// Keeps the layout the same on both sides (explicit padding).
    pub _pad: u32,
}

/// An original destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct OrigDst {
    /// Address, network order. IPv4 uses `[0]` and leaves the rest zero.
    pub ip_be: [u32; 4],
    /// Port, network order in the low 16 bits (as `bpf_sock_addr.user_port`).
    pub port_be: u32,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    pub _pad: u16,
}

/// A socket's endpoint as one side sees it: used to find a redirected
/// connection's original destination from the accepted socket's peer address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    /// Network namespace cookie of the socket (`SO_NETNS_COOKIE`), so two
    /// namespaces with the same addresses never collide.
    pub netns_cookie: u64,
    /// Address, network order. IPv4 uses `[0]` and leaves the rest zero.
    pub ip_be: [u32; 4],
    /// Port, host order.
    pub port: u16,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    pub _pad: u32,
}

/// An address and port in an intercepted pod's namespace: the keys of the
/// intercept maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Endpoint {
    /// Address, network order. IPv4 uses `[0]` and leaves the rest zero.
    pub ip_be: [u32; 4],
    /// Port, host order.
    pub port: u32,
    /// `AF_INET` or `AF_INET6`.
    pub family: u32,
}

const _: () = assert!(core::mem::size_of::<Endpoint>() == 24);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain `#[repr(C)]` integers with explicit padding: every bit
    // pattern is valid and there are no implicit holes.
    unsafe impl aya::Pod for super::Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: plain old data, `repr(C)`, no padding (24 + 8 + 8 bytes).
    unsafe impl aya::Pod for super::UdpSlot {}
    // SAFETY: plain old data, `repr(C)`, no padding (24 + 8 bytes).
    unsafe impl aya::Pod for super::SlotKey {}
    // SAFETY: plain old data, `repr(C)`, no padding (24 + 8 bytes).
    unsafe impl aya::Pod for super::Udp6Dst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Endpoint {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::mem::size_of;

    #[test]
    fn shared_types_have_the_sizes_the_kernel_side_expects() {
        // owner_uid and its explicit padding after the netns cookie.
        assert_eq!(size_of::<Config>(), 64);
        assert_eq!(size_of::<OrigDst>(), 24);
        assert_eq!(size_of::<SockKey>(), 32);
        // No padding: aya's Pod types must have none.
        assert_eq!(size_of::<UdpSlot>(), 24 + 8 + 8);
        assert_eq!(size_of::<SlotKey>(), 24 + 8);
        assert_eq!(size_of::<Udp6Dst>(), 24 + 8);
    }
}
