//! cgroup sock_addr hooks: `connect4` redirects TCP connections bound for a
//! bridged range to tpbpfd and remembers where they were going;
//! `getpeername4` shows the application the address it dialled.
use aya_ebpf::{
    helpers::bpf_get_socket_cookie, macros::cgroup_sock_addr, maps::lpm_trie::Key,
    programs::SockAddrContext,
};
use aya_log_ebpf::debug;
use tpbpf_common::{action, OrigDst, AF_INET};

use crate::maps::{CIDRS4, CONFIG, COOKIE_ORIG};

/// Allow the syscall to go on (with whatever the program rewrote).
const ALLOW: i32 = 1;
const SOCK_STREAM: u32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn tpbpf_connect4(ctx: SockAddrContext) -> i32 {
    redirect_connect4(&ctx);
    ALLOW
}

fn redirect_connect4(ctx: &SockAddrContext) {
    // SAFETY: the kernel hands the program a valid `bpf_sock_addr` for the
    // duration of the call.
    let sa = unsafe { &mut *ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return;
    }
    let dst_be = sa.user_ip4;
    let key = Key::new(32, dst_be);
    match CIDRS4.get(key) {
        Some(&action::PROXY) => {}
        _ => return,
    }
    let Some(cfg) = CONFIG.get(0) else { return };
    if cfg.enabled == 0 {
        return;
    }
    // SAFETY: `sock_addr` is the context pointer the helper expects.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    let orig = OrigDst {
        ip_be: [dst_be, 0, 0, 0],
        port_be: sa.user_port,
        family: AF_INET,
        _pad: 0,
    };
    if COOKIE_ORIG.insert(cookie, orig, 0).is_err() {
        // Without the record the listener could not tell where to go:
        // better to leave the connection alone.
        return;
    }
    debug!(
        ctx,
        "connect4 redirect cookie={} dst={:i}:{}",
        cookie,
        u32::from_be(dst_be),
        u16::from_be(sa.user_port as u16)
    );
    sa.user_ip4 = cfg.proxy_ip4_be;
    sa.user_port = cfg.proxy_port_be;
}

#[cgroup_sock_addr(getpeername4)]
pub fn tpbpf_getpeername4(ctx: SockAddrContext) -> i32 {
    // SAFETY: `sock_addr` is the context pointer the helper expects.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    // SAFETY: the value is copied out at once; a concurrent update of the
    // same entry can only replace it with another complete record.
    if let Some(orig) = unsafe { COOKIE_ORIG.get(cookie) } {
        if orig.family == AF_INET {
            // SAFETY: as in `redirect_connect4`.
            let sa = unsafe { &mut *ctx.sock_addr };
            sa.user_ip4 = orig.ip_be[0];
            sa.user_port = orig.port_be;
        }
    }
    ALLOW
}
