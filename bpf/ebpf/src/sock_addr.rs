//! cgroup sock_addr hooks.
//!
//! - `connect4/6`: TCP connections bound for a bridged range (and port 53
//!   anywhere, for DNS) go to tpbpfd's TCP listener; the original
//!   destination is recorded by socket cookie. Connected UDP goes to a UDP
//!   slot address (see `tpbpf_common::UDP_SLOTS`).
//! - `sendmsg4/6`: unconnected UDP datagrams, the same per datagram.
//! - `recvmsg4/6`: replies from a slot address show the original source.
//! - `getpeername4/6`: the application sees the address it dialled.
//!
//! IPv4-mapped IPv6 destinations (`::ffff:a.b.c.d` on a dual-stack socket)
//! are matched against the IPv4 ranges.
use core::intrinsics::{atomic_xadd, AtomicOrdering};

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{
        bpf_get_current_uid_gid, bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_ktime_get_ns,
    },
    macros::cgroup_sock_addr,
    maps::lpm_trie::Key,
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use tpbpf_common::{
    action, flags, Config, OrigDst, SlotKey, SockKey, Udp6Dst, UdpSlot, AF_INET, AF_INET6,
    EXEMPT_PRIORITY, NO_SLOT, UDP_SLOTS, UDP_SLOT_IDLE_NS, UDP_SLOT_NET, UDP_SLOT_PROBES,
};

use crate::maps::{
    CIDRS4, CIDRS6, CONFIG, COOKIE_ORIG, COOKIE_SLOT, UDP6_LAST, UDP_NEXT, UDP_SLOTS_MAP,
    UDP_SLOT_BY_DST,
};

/// Let the syscall go on (with whatever the program rewrote).
const ALLOW: i32 = 1;
const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
/// `htons(53)` in the low 16 bits, as `user_port` holds it.
const DNS_PORT_BE: u32 = (53u16).to_be() as u32;
/// `htonl(0xffff)`: the third word of an IPv4-mapped IPv6 address.
const MAPPED_BE: u32 = 0xffffu32.to_be();

// --- context access -------------------------------------------------------
// The verifier wants each context field read and written with one load or
// store at a constant offset from the context pointer; volatile accesses keep
// the compiler from merging or widening them.

#[inline(always)]
fn sa(ctx: &SockAddrContext) -> *mut bpf_sock_addr {
    ctx.sock_addr
}

#[inline(always)]
fn rd(field: *const u32) -> u32 {
    // SAFETY: `field` points into the live context.
    unsafe { core::ptr::read_volatile(field) }
}

#[inline(always)]
fn wr(field: *mut u32, v: u32) {
    // SAFETY: `field` points into the live context, at a writable field.
    unsafe { core::ptr::write_volatile(field, v) }
}

#[inline(always)]
fn user_ip6(ctx: &SockAddrContext) -> [u32; 4] {
    let p = sa(ctx);
    // SAFETY: field addresses inside the live context.
    unsafe {
        [
            rd(&(*p).user_ip6[0]),
            rd(&(*p).user_ip6[1]),
            rd(&(*p).user_ip6[2]),
            rd(&(*p).user_ip6[3]),
        ]
    }
}

#[inline(always)]
fn set_user_ip6(ctx: &SockAddrContext, ip: [u32; 4]) {
    let p = sa(ctx);
    // SAFETY: field addresses inside the live context.
    unsafe {
        wr(&mut (*p).user_ip6[0], ip[0]);
        wr(&mut (*p).user_ip6[1], ip[1]);
        wr(&mut (*p).user_ip6[2], ip[2]);
        wr(&mut (*p).user_ip6[3], ip[3]);
    }
}

#[inline(always)]
fn user_port(ctx: &SockAddrContext) -> u32 {
    // SAFETY: field address inside the live context.
    unsafe { rd(&(*sa(ctx)).user_port) }
}

#[inline(always)]
fn set_user_port(ctx: &SockAddrContext, port_be: u32) {
    // SAFETY: field address inside the live context.
    unsafe { wr(&mut (*sa(ctx)).user_port, port_be) }
}

#[inline(always)]
fn user_ip4(ctx: &SockAddrContext) -> u32 {
    // SAFETY: field address inside the live context.
    unsafe { rd(&(*sa(ctx)).user_ip4) }
}

#[inline(always)]
fn set_user_ip4(ctx: &SockAddrContext, ip_be: u32) {
    // SAFETY: field address inside the live context.
    unsafe { wr(&mut (*sa(ctx)).user_ip4, ip_be) }
}

#[inline(always)]
fn sock_type(ctx: &SockAddrContext) -> u32 {
    // SAFETY: field address inside the live context.
    unsafe { rd(&(*sa(ctx)).type_) }
}

#[inline(always)]
fn cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the context pointer is what the helper expects.
    unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) }
}

// --- decisions ------------------------------------------------------------

#[inline(always)]
fn config() -> Option<Config> {
    let cfg = *CONFIG.get(0)?;
    (cfg.flags & flags::ENABLED != 0).then_some(cfg)
}

/// The configuration, if `ctx`'s socket is one to bridge: tpbpf is
/// configured, the socket lives in the bridged network namespace, and for a
/// user's bridge the process is that user's.
#[inline(always)]
fn config_in(ctx: &SockAddrContext) -> Option<Config> {
    let cfg = config()?;
    if cfg.netns_cookie != 0 {
        // SAFETY: the context pointer is what the helper expects.
        let ns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
        if ns != cfg.netns_cookie {
            return None;
        }
    }
    // The low 32 bits are the uid (the high, the gid). Sockets are made in
    // a process's context, so there is always one: the caller's.
    if cfg.flags & flags::OWNER != 0 && bpf_get_current_uid_gid() as u32 != cfg.owner_uid {
        return None;
    }
    Some(cfg)
}

/// tpbpf's own socket (of any bridge's tpbpfd): see `EXEMPT_PRIORITY`.
#[inline(always)]
fn exempt(ctx: &SockAddrContext) -> bool {
    // SAFETY: the kernel sets `sk` for every sock_addr program (a
    // PTR_TO_SOCKET, never null); the field is read with one load.
    unsafe {
        let sk = (*sa(ctx)).__bindgen_anon_1.sk;
        rd(&(*sk).priority) == EXEMPT_PRIORITY
    }
}

#[inline(always)]
fn wanted4(cfg: &Config, ip_be: u32, port_be: u32) -> bool {
    if cfg.flags & flags::DNS != 0 && port_be == DNS_PORT_BE {
        return true;
    }
    matches!(CIDRS4.get(Key::new(32, ip_be)), Some(&action::PROXY))
}

#[inline(always)]
fn wanted6(cfg: &Config, ip_be: [u32; 4], port_be: u32) -> bool {
    if cfg.flags & flags::DNS != 0 && port_be == DNS_PORT_BE {
        return true;
    }
    matches!(CIDRS6.get(Key::new(128, ip_be)), Some(&action::PROXY))
}

#[inline(always)]
fn is_mapped(ip: &[u32; 4]) -> bool {
    ip[0] == 0 && ip[1] == 0 && ip[2] == MAPPED_BE
}

#[inline(always)]
fn orig4(ip_be: u32, port_be: u32) -> OrigDst {
    OrigDst {
        ip_be: [ip_be, 0, 0, 0],
        port_be,
        family: AF_INET,
        _pad: 0,
    }
}

#[inline(always)]
fn orig6(ip_be: [u32; 4], port_be: u32) -> OrigDst {
    OrigDst {
        ip_be,
        port_be,
        family: AF_INET6,
        _pad: 0,
    }
}

/// The slot naming `orig` for the socket `owner`, handing out a new one if
/// it has none. A slot is taken only when free or idle for
/// [`UDP_SLOT_IDLE_NS`]: one that carries a live flow never changes
/// destination. With no such slot among [`UDP_SLOT_PROBES`], none.
#[inline(always)]
fn udp_slot(orig: &OrigDst, owner: u64) -> Option<u32> {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let key = SlotKey { orig: *orig, owner };
    // SAFETY: copied out at once.
    if let Some(slot) = unsafe { UDP_SLOT_BY_DST.get(key) } {
        let slot = *slot;
        if let Some(entry) = UDP_SLOTS_MAP.get_ptr_mut(slot) {
            // SAFETY: `entry` points at a live map value of type UdpSlot.
            unsafe {
                if (*entry).owner == owner && (*entry).orig == *orig {
                    (*entry).used_ns = now;
                    // Still known as open (an entry the LRU map dropped
                    // would end the socket's flows in tpbpfd).
                    if COOKIE_SLOT.get(owner).is_none() {
                        let _ = COOKIE_SLOT.insert(owner, slot, 0);
                    }
                    return Some(slot);
                }
            }
        }
    }
    let next = UDP_NEXT.get_ptr_mut(0)?;
    for _ in 0..UDP_SLOT_PROBES {
        // SAFETY: `next` points at a live u32 map value; an atomic add (BPF
        // v3 `atomic_fetch_add`) is how concurrent programs share it.
        // SeqCst, not Relaxed: LLVM's BPF backend lowers a relaxed add to
        // `lock add`, which does not return the old value.
        let slot =
            unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::SeqCst }>(next, 1) } % UDP_SLOTS;
        let Some(entry) = UDP_SLOTS_MAP.get_ptr_mut(slot) else {
            continue;
        };
        // SAFETY: `entry` points at a live map value of type UdpSlot.
        let old = unsafe { *entry };
        if old.owner != 0 && now.saturating_sub(old.used_ns) < UDP_SLOT_IDLE_NS {
            continue;
        }
        if old.owner != 0 {
            let _ = UDP_SLOT_BY_DST.remove(SlotKey {
                orig: old.orig,
                owner: old.owner,
            });
        }
        // SAFETY: as above.
        unsafe {
            *entry = UdpSlot {
                orig: *orig,
                owner,
                used_ns: now,
            }
        };
        UDP_SLOT_BY_DST.insert(key, slot, 0).ok()?;
        let _ = COOKIE_SLOT.insert(owner, slot, 0);
        return Some(slot);
    }
    None
}

#[inline(always)]
fn slot_ip4_be(slot: u32) -> u32 {
    (u32::from_be_bytes([UDP_SLOT_NET[0], UDP_SLOT_NET[1], 0, 0]) | (slot & 0xffff)).to_be()
}

/// The slot of a slot address, or `None` for any other address.
#[inline(always)]
fn slot_of(ip_be: u32) -> Option<u32> {
    let ip = u32::from_be(ip_be);
    (ip >> 16 == u32::from_be_bytes([0, 0, UDP_SLOT_NET[0], UDP_SLOT_NET[1]]))
        .then_some(ip & 0xffff)
}

/// `::1`, network order words.
const LOOPBACK6_BE: [u32; 4] = [0, 0, 0, 1u32.to_be()];

/// The key of an IPv6 UDP socket's last destination: its namespace and
/// local port (already bound when sendmsg and recvmsg run).
#[inline(always)]
fn udp6_key(ctx: &SockAddrContext) -> SockKey {
    // SAFETY: the context's socket pointer is valid for the call; the field
    // is read with one load.
    let port = unsafe {
        let sk = (*sa(ctx)).__bindgen_anon_1.sk;
        rd(&(*sk).src_port)
    };
    SockKey {
        // SAFETY: the context pointer is what the helper expects.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) },
        ip_be: [0; 4],
        port: port as u16,
        family: AF_INET6,
        _pad: 0,
    }
}

#[inline(always)]
fn mapped(ip4_be: u32) -> [u32; 4] {
    [0, 0, MAPPED_BE, ip4_be]
}

// --- connect --------------------------------------------------------------

#[cgroup_sock_addr(connect4)]
pub fn tpbpf_connect4(ctx: SockAddrContext) -> i32 {
    let Some(cfg) = config_in(&ctx) else {
        return ALLOW;
    };
    let (dst, port) = (user_ip4(&ctx), user_port(&ctx));
    if !wanted4(&cfg, dst, port) {
        return ALLOW;
    }
    if exempt(&ctx) {
        return ALLOW;
    }
    let c = cookie(&ctx);
    let orig = orig4(dst, port);
    match sock_type(&ctx) {
        SOCK_STREAM => {
            if COOKIE_ORIG.insert(c, orig, 0).is_err() {
                return ALLOW;
            }
            set_user_ip4(&ctx, cfg.proxy_ip4_be);
            set_user_port(&ctx, cfg.proxy_port_be);
        }
        SOCK_DGRAM => {
            let Some(slot) = udp_slot(&orig, c) else {
                return ALLOW;
            };
            let _ = COOKIE_ORIG.insert(c, orig, 0);
            set_user_ip4(&ctx, slot_ip4_be(slot));
            set_user_port(&ctx, cfg.udp_port_be);
        }
        _ => return ALLOW,
    }
    if cfg.flags & flags::LOG != 0 {
        debug!(
            &ctx,
            "connect4 redirect cookie={} dst={:i}:{}",
            c,
            u32::from_be(dst),
            u16::from_be(port as u16)
        );
    }
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn tpbpf_connect6(ctx: SockAddrContext) -> i32 {
    let Some(cfg) = config_in(&ctx) else {
        return ALLOW;
    };
    let (dst, port) = (user_ip6(&ctx), user_port(&ctx));
    let v4 = is_mapped(&dst);
    let wanted = if v4 {
        wanted4(&cfg, dst[3], port)
    } else {
        wanted6(&cfg, dst, port)
    };
    if !wanted {
        return ALLOW;
    }
    if exempt(&ctx) {
        return ALLOW;
    }
    let c = cookie(&ctx);
    let orig = if v4 {
        orig4(dst[3], port)
    } else {
        orig6(dst, port)
    };
    match sock_type(&ctx) {
        SOCK_STREAM => {
            if !v4 && cfg.flags & flags::PROXY6 == 0 {
                return ALLOW;
            }
            if COOKIE_ORIG.insert(c, orig, 0).is_err() {
                return ALLOW;
            }
            if v4 {
                set_user_ip6(&ctx, mapped(cfg.proxy_ip4_be));
                set_user_port(&ctx, cfg.proxy_port_be);
            } else {
                set_user_ip6(&ctx, cfg.proxy6_ip_be);
                set_user_port(&ctx, cfg.proxy6_port_be);
            }
        }
        SOCK_DGRAM => {
            let Some(slot) = udp_slot(&orig, c) else {
                return ALLOW;
            };
            let _ = COOKIE_ORIG.insert(c, orig, 0);
            set_user_ip6(&ctx, mapped(slot_ip4_be(slot)));
            set_user_port(&ctx, cfg.udp_port_be);
        }
        _ => return ALLOW,
    }
    if cfg.flags & flags::LOG != 0 {
        debug!(
            &ctx,
            "connect6 redirect cookie={} port={}",
            c,
            u16::from_be(port as u16)
        );
    }
    ALLOW
}

// --- unconnected UDP -----------------------------------------------------

#[cgroup_sock_addr(sendmsg4)]
pub fn tpbpf_sendmsg4(ctx: SockAddrContext) -> i32 {
    let Some(cfg) = config_in(&ctx) else {
        return ALLOW;
    };
    let (dst, port) = (user_ip4(&ctx), user_port(&ctx));
    if !wanted4(&cfg, dst, port) || exempt(&ctx) {
        return ALLOW;
    }
    let c = cookie(&ctx);
    if let Some(slot) = udp_slot(&orig4(dst, port), c) {
        set_user_ip4(&ctx, slot_ip4_be(slot));
        set_user_port(&ctx, cfg.udp_port_be);
    }
    ALLOW
}

#[cgroup_sock_addr(sendmsg6)]
pub fn tpbpf_sendmsg6(ctx: SockAddrContext) -> i32 {
    let Some(cfg) = config_in(&ctx) else {
        return ALLOW;
    };
    let (dst, port) = (user_ip6(&ctx), user_port(&ctx));
    let v4 = is_mapped(&dst);
    let wanted = if v4 {
        wanted4(&cfg, dst[3], port)
    } else {
        wanted6(&cfg, dst, port)
    };
    if !wanted || exempt(&ctx) {
        return ALLOW;
    }
    let c = cookie(&ctx);
    if !v4 {
        if cfg.flags & flags::UDP6 == 0 {
            return ALLOW;
        }
        let last = Udp6Dst {
            orig: orig6(dst, port),
            owner: c,
        };
        // The socket's entry says it is open until sock_release; a slot
        // it already has stays named there (look first: an insert into a
        // full LRU map evicts even when the key is there).
        // SAFETY: only presence is checked.
        if unsafe { COOKIE_SLOT.get(c) }.is_none() {
            let _ = COOKIE_SLOT.insert(c, NO_SLOT, 0);
        }
        if UDP6_LAST.insert(udp6_key(&ctx), last, 0).is_ok() {
            set_user_ip6(&ctx, LOOPBACK6_BE);
            set_user_port(&ctx, cfg.udp6_port_be);
        }
        return ALLOW;
    }
    if let Some(slot) = udp_slot(&orig4(dst[3], port), c) {
        set_user_ip6(&ctx, mapped(slot_ip4_be(slot)));
        set_user_port(&ctx, cfg.udp_port_be);
    }
    ALLOW
}

#[cgroup_sock_addr(recvmsg4)]
pub fn tpbpf_recvmsg4(ctx: SockAddrContext) -> i32 {
    let Some(cfg) = config_in(&ctx) else {
        return ALLOW;
    };
    if user_port(&ctx) != cfg.udp_port_be {
        return ALLOW;
    }
    let Some(slot) = slot_of(user_ip4(&ctx)) else {
        return ALLOW;
    };
    let Some(entry) = UDP_SLOTS_MAP.get(slot) else {
        return ALLOW;
    };
    // Only the socket the slot was made for sees its destination.
    if entry.owner != cookie(&ctx) {
        return ALLOW;
    }
    let orig = entry.orig;
    if orig.family == AF_INET {
        set_user_ip4(&ctx, orig.ip_be[0]);
        set_user_port(&ctx, orig.port_be);
    }
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn tpbpf_recvmsg6(ctx: SockAddrContext) -> i32 {
    let Some(cfg) = config_in(&ctx) else {
        return ALLOW;
    };
    let src = user_ip6(&ctx);
    let port = user_port(&ctx);
    if cfg.flags & flags::UDP6 != 0 && port == cfg.udp6_port_be && src == LOOPBACK6_BE {
        // SAFETY: copied out at once.
        if let Some(last) = unsafe { UDP6_LAST.get(udp6_key(&ctx)) }.copied() {
            // Only the socket that sent there sees its destination.
            if last.owner == cookie(&ctx) {
                set_user_ip6(&ctx, last.orig.ip_be);
                set_user_port(&ctx, last.orig.port_be);
            }
        }
        return ALLOW;
    }
    if port != cfg.udp_port_be {
        return ALLOW;
    }
    if !is_mapped(&src) {
        return ALLOW;
    }
    let Some(slot) = slot_of(src[3]) else {
        return ALLOW;
    };
    let Some(entry) = UDP_SLOTS_MAP.get(slot) else {
        return ALLOW;
    };
    if entry.owner != cookie(&ctx) {
        return ALLOW;
    }
    let orig = entry.orig;
    let ip = if orig.family == AF_INET {
        mapped(orig.ip_be[0])
    } else {
        orig.ip_be
    };
    set_user_ip6(&ctx, ip);
    set_user_port(&ctx, orig.port_be);
    ALLOW
}

// --- getpeername ----------------------------------------------------------

#[cgroup_sock_addr(getpeername4)]
pub fn tpbpf_getpeername4(ctx: SockAddrContext) -> i32 {
    // SAFETY: copied out at once.
    if let Some(orig) = unsafe { COOKIE_ORIG.get(cookie(&ctx)) } {
        if orig.family == AF_INET {
            set_user_ip4(&ctx, orig.ip_be[0]);
            set_user_port(&ctx, orig.port_be);
        }
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn tpbpf_getpeername6(ctx: SockAddrContext) -> i32 {
    // SAFETY: copied out at once.
    if let Some(orig) = unsafe { COOKIE_ORIG.get(cookie(&ctx)) } {
        let ip = if orig.family == AF_INET {
            mapped(orig.ip_be[0])
        } else {
            orig.ip_be
        };
        set_user_ip6(&ctx, ip);
        set_user_port(&ctx, orig.port_be);
    }
    ALLOW
}
