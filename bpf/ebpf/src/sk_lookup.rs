//! Intercept, in a pod's network namespace: `sk_lookup` hands new TCP
//! connections for an intercepted port to the agent's listening socket in
//! that namespace. Connections already established are matched to their
//! sockets before sk_lookup runs, so they stay with the app; the link is
//! owned by the agent, so when it dies the app gets its port back.
use aya_ebpf::{macros::sk_lookup, programs::SkLookupContext};

use tpbpf_common::{Endpoint, AF_INET, AF_INET6};

use crate::maps::{INTERCEPT_BYPASS, INTERCEPT_PORTS, INTERCEPT_SOCKS};

const IPPROTO_TCP: u32 = 6;
const SK_PASS: u32 = 1;

/// One 4-byte read of the context: the verifier allows context fields only
/// at their own size, so adjacent fields must not be merged into one load.
macro_rules! ctx_u32 {
    ($l:expr, $($field:tt)+) => {
        // SAFETY: a 4-byte, 4-aligned field of the kernel's sk_lookup context.
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*$l).$($field)+)) }
    };
}

#[sk_lookup]
pub fn tpbpf_sk_lookup(ctx: SkLookupContext) -> u32 {
    let l = ctx.lookup;
    if ctx_u32!(l, protocol) != IPPROTO_TCP {
        return SK_PASS;
    }
    let family = ctx_u32!(l, family);
    let (local_ip, remote_ip) = if family == u32::from(AF_INET) {
        (
            [ctx_u32!(l, local_ip4), 0, 0, 0],
            [ctx_u32!(l, remote_ip4), 0, 0, 0],
        )
    } else if family == u32::from(AF_INET6) {
        (
            [
                ctx_u32!(l, local_ip6[0]),
                ctx_u32!(l, local_ip6[1]),
                ctx_u32!(l, local_ip6[2]),
                ctx_u32!(l, local_ip6[3]),
            ],
            [
                ctx_u32!(l, remote_ip6[0]),
                ctx_u32!(l, remote_ip6[1]),
                ctx_u32!(l, remote_ip6[2]),
                ctx_u32!(l, remote_ip6[3]),
            ],
        )
    } else {
        return SK_PASS;
    };
    // The agent's own connections to the app go to the app.
    // SAFETY: a 2-byte read of the context's remote port.
    let remote_port = unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*l).remote_port)) };
    let remote = Endpoint {
        ip_be: remote_ip,
        port: u32::from(u16::from_be(remote_port)),
        family,
    };
    // SAFETY: only tested for presence.
    if unsafe { INTERCEPT_BYPASS.get(remote) }.is_some() {
        return SK_PASS;
    }
    // Only connections to the pod's own address: loopback (sidecars,
    // probes) and other local addresses keep going to the app.
    let local = Endpoint {
        ip_be: local_ip,
        port: ctx_u32!(l, local_port),
        family,
    };
    // SAFETY: copied out at once.
    if let Some(index) = unsafe { INTERCEPT_PORTS.get(local) }.copied() {
        // No socket at that index (the agent is gone): the lookup goes on
        // as if there were no intercept.
        let _ = INTERCEPT_SOCKS.redirect_sk_lookup(&ctx, index, 0);
    }
    SK_PASS
}
