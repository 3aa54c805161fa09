//! The maps, named once in `tpbpf_common::maps`.
use aya_ebpf::{
    macros::map,
    maps::{lpm_trie::LpmTrie, Array, HashMap, LruHashMap, SockMap},
};
use tpbpf_common::{
    Config, Endpoint, OrigDst, SlotKey, SockKey, Udp6Dst, UdpSlot, CIDR_MAP_ENTRIES,
    CONN_MAP_ENTRIES, UDP_SLOTS,
};

#[map(name = "TPBPF_CONFIG")]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// BPF_F_NO_PREALLOC: LPM tries must be created with it.
const BPF_F_NO_PREALLOC: u32 = 1;

#[map(name = "TPBPF_CIDRS4")]
pub static CIDRS4: LpmTrie<u32, u32> =
    LpmTrie::with_max_entries(CIDR_MAP_ENTRIES, BPF_F_NO_PREALLOC);

#[map(name = "TPBPF_CIDRS6")]
pub static CIDRS6: LpmTrie<[u32; 4], u32> =
    LpmTrie::with_max_entries(CIDR_MAP_ENTRIES, BPF_F_NO_PREALLOC);

#[map(name = "TPBPF_COOKIE_ORIG")]
pub static COOKIE_ORIG: LruHashMap<u64, OrigDst> =
    LruHashMap::with_max_entries(CONN_MAP_ENTRIES, 0);

#[map(name = "TPBPF_CONN_ORIG")]
pub static CONN_ORIG: LruHashMap<SockKey, OrigDst> =
    LruHashMap::with_max_entries(CONN_MAP_ENTRIES, 0);

#[map(name = "TPBPF_UDP_SLOT_BY_DST")]
pub static UDP_SLOT_BY_DST: LruHashMap<SlotKey, u32> = LruHashMap::with_max_entries(UDP_SLOTS, 0);

#[map(name = "TPBPF_UDP_SLOTS")]
pub static UDP_SLOTS_MAP: Array<UdpSlot> = Array::with_max_entries(UDP_SLOTS, 0);

/// Socket cookie -> the last slot made for it, freed when the socket goes
/// (`sock_release`).
#[map(name = "TPBPF_COOKIE_SLOT")]
pub static COOKIE_SLOT: LruHashMap<u64, u32> = LruHashMap::with_max_entries(UDP_SLOTS, 0);

#[map(name = "TPBPF_UDP_NEXT")]
pub static UDP_NEXT: Array<u32> = Array::with_max_entries(1, 0);

#[map(name = "TPBPF_UDP6_LAST")]
pub static UDP6_LAST: LruHashMap<SockKey, Udp6Dst> =
    LruHashMap::with_max_entries(CONN_MAP_ENTRIES, 0);

/// Intercepted (pod address, port) -> index in `INTERCEPT_SOCKS`.
#[map(name = "TPBPF_INTERCEPT_PORTS")]
pub static INTERCEPT_PORTS: HashMap<Endpoint, u32> = HashMap::with_max_entries(64, 0);

/// (Source address, port) of the agent's own connections to the app: left
/// alone.
#[map(name = "TPBPF_INTERCEPT_BYPASS")]
pub static INTERCEPT_BYPASS: HashMap<Endpoint, u8> = HashMap::with_max_entries(4096, 0);

/// The agent's listening sockets in the pod's namespace.
#[map(name = "TPBPF_INTERCEPT_SOCKS")]
pub static INTERCEPT_SOCKS: SockMap = SockMap::with_max_entries(64, 0);
