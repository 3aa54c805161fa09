//! sock_ops: when a redirected connection is established, re-key its
//! original destination by the client's local address and port, which is
//! what the listener sees as the peer of the accepted socket.
use aya_ebpf::{
    bindings::bpf_sock_ops,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
};
use tpbpf_common::{SockKey, AF_INET, AF_INET6};

use crate::maps::{CONN_ORIG, COOKIE_ORIG};

const BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;

#[sock_ops]
pub fn tpbpf_sock_ops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        rekey_established(&ctx);
    }
    0
}

fn rekey_established(ctx: &SockOpsContext) {
    // SAFETY: `ops` is the context pointer the helpers expect.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
    // SAFETY: copied out at once, see `tpbpf_getpeername4`.
    let Some(orig) = (unsafe { COOKIE_ORIG.get(cookie) }) else {
        return;
    };
    let orig = *orig;
    // SAFETY: as above.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
    // `local_port` is in host order (unlike `remote_port`).
    let port = ctx.local_port() as u16;
    // Each family builds and stores its key on its own path: the verifier
    // refuses a context pointer that two branches computed differently.
    match ctx.family() as u16 {
        AF_INET => {
            let key = SockKey {
                netns_cookie,
                ip_be: [ctx_u32(&ctx_ref(ctx).local_ip4), 0, 0, 0],
                port,
                family: AF_INET,
                _pad: 0,
            };
            let _ = CONN_ORIG.insert(key, orig, 0);
        }
        AF_INET6 => {
            let ops = ctx_ref(ctx);
            let ip = [
                ctx_u32(&ops.local_ip6[0]),
                ctx_u32(&ops.local_ip6[1]),
                ctx_u32(&ops.local_ip6[2]),
                ctx_u32(&ops.local_ip6[3]),
            ];
            // A dual-stack socket talking IPv4 has an IPv4-mapped local
            // address; the listener sees the plain IPv4 peer.
            let key = if ip[0] == 0 && ip[1] == 0 && ip[2] == 0xffffu32.to_be() {
                SockKey {
                    netns_cookie,
                    ip_be: [ip[3], 0, 0, 0],
                    port,
                    family: AF_INET,
                    _pad: 0,
                }
            } else {
                SockKey {
                    netns_cookie,
                    ip_be: ip,
                    port,
                    family: AF_INET6,
                    _pad: 0,
                }
            };
            let _ = CONN_ORIG.insert(key, orig, 0);
        }
        _ => {}
    }
}

fn ctx_ref(ctx: &SockOpsContext) -> &bpf_sock_ops {
    // SAFETY: the kernel hands the program a valid context for the call.
    unsafe { &*ctx.ops }
}

/// Reads one context field with a single load at a constant offset: the
/// verifier rejects context accesses through a pointer the compiler moved.
#[inline(always)]
fn ctx_u32(field: &u32) -> u32 {
    // SAFETY: `field` points into the live context.
    unsafe { core::ptr::read_volatile(field) }
}

const IPPROTO_UDP: u32 = 17;

/// A socket goes: the last UDP slot made for it is free at once (a
/// resolver's one-query sockets do not hold slots for the idle time), and
/// its `COOKIE_SLOT` entry goes, which tells tpbpfd it has closed: tpbpfd
/// ends its flows (every slot's, and an unconnected IPv6 socket's), so a
/// socket that binds the same port later gets nothing of them.
#[aya_ebpf::macros::cgroup_sock(sock_release)]
pub fn tpbpf_sock_release(ctx: aya_ebpf::programs::SockContext) -> i32 {
    // Only UDP sockets hold slots: every other socket leaves at once,
    // without asking for its cookie (which the kernel would make for it).
    // SAFETY: a 4-byte, 4-aligned field of the live bpf_sock context.
    let protocol = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*ctx.sock).protocol)) };
    if protocol != IPPROTO_UDP {
        return 1;
    }
    // SAFETY: `sock` is the context pointer the helper expects.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock.cast()) };
    // SAFETY: copied out at once.
    let Some(slot) = (unsafe { crate::maps::COOKIE_SLOT.get(cookie) }).copied() else {
        return 1;
    };
    let _ = crate::maps::COOKIE_SLOT.remove(cookie);
    // `NO_SLOT` (an IPv6 socket's) is past the array's end: no entry.
    if let Some(entry) = crate::maps::UDP_SLOTS_MAP.get_ptr_mut(slot) {
        // SAFETY: `entry` points at a live map value of type UdpSlot.
        unsafe {
            if (*entry).owner == cookie {
                let _ = crate::maps::UDP_SLOT_BY_DST.remove(tpbpf_common::SlotKey {
                    orig: (*entry).orig,
                    owner: cookie,
                });
                (*entry).owner = 0;
            }
        }
    }
    1
}
