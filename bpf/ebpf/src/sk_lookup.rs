//! Intercept, in a pod's network namespace: `sk_lookup` hands new TCP
//! connections for an intercepted port to the agent's listening socket in
//! that namespace. Connections already established are matched to their
//! sockets before sk_lookup runs, so they stay with the app; the link is
//! owned by the agent, so when it dies the app gets its port back.
use aya_ebpf::{macros::sk_lookup, programs::SkLookupContext};

use crate::maps::{INTERCEPT_BYPASS, INTERCEPT_PORTS, INTERCEPT_SOCKS};

const IPPROTO_TCP: u32 = 6;
const SK_PASS: u32 = 1;

#[sk_lookup]
pub fn tpbpf_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: the kernel hands the program a valid context for the call.
    let (protocol, port) = unsafe { ((*ctx.lookup).protocol, (*ctx.lookup).local_port) };
    if protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    // The agent's own connections to the app go to the app.
    // SAFETY: a 2-byte read of the context's remote port.
    let remote_port = u32::from(u16::from_be(unsafe { (*ctx.lookup).remote_port }));
    // SAFETY: only tested for presence.
    if unsafe { INTERCEPT_BYPASS.get(remote_port) }.is_some() {
        return SK_PASS;
    }
    // SAFETY: copied out at once.
    if let Some(index) = unsafe { INTERCEPT_PORTS.get(port) }.copied() {
        // No socket at that index (the agent is gone): the lookup goes on
        // as if there were no intercept.
        let _ = INTERCEPT_SOCKS.redirect_sk_lookup(&ctx, index, 0);
    }
    SK_PASS
}
