//! sock_ops: when a redirected connection is established, re-key its
//! original destination by the client's local address and port, which is
//! what the listener sees as the peer of the accepted socket.
use aya_ebpf::{
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
    let Some(orig) = (unsafe { COOKIE_ORIG.get(&cookie) }) else {
        return;
    };
    let orig = *orig;
    // SAFETY: as above.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
    let family = ctx.family() as u16;
    let ip_be = match family {
        AF_INET => [ctx.local_ip4(), 0, 0, 0],
        AF_INET6 => ctx.local_ip6(),
        _ => return,
    };
    let key = SockKey {
        netns_cookie,
        ip_be,
        // `local_port` is in host order (unlike `remote_port`).
        port: ctx.local_port() as u16,
        family,
        _pad: 0,
    };
    let _ = CONN_ORIG.insert(&key, &orig, 0);
}
