//! tc ingress on an interface that leads to another network namespace (a
//! local container, a VM, a kind node): TCP packets from there to a bridged
//! range are assigned (`bpf_sk_assign`) to tpbpfd's transparent listener,
//! or to the connection it already accepted for them. The accepted socket's
//! local address is the original destination. A policy route for the mark
//! set here delivers the packets locally.
use aya_ebpf::{
    bindings::{bpf_sock, bpf_sock_tuple, TC_ACT_OK},
    helpers::{bpf_sk_assign, bpf_sk_release, bpf_skc_lookup_tcp},
    macros::classifier,
    maps::lpm_trie::Key,
    programs::TcContext,
};
use tpbpf_common::{action, flags};

use crate::maps::{CIDRS4, CONFIG};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IPPROTO_TCP: u8 = 6;
/// BPF_F_CURRENT_NETNS: look up in the namespace of the packet's device.
const CURRENT_NETNS: u64 = u64::MAX;
/// BPF_TCP_LISTEN
const TCP_LISTEN: u32 = 10;
/// 127.0.0.1, network order.
const LOOPBACK4_BE: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

/// `bpf_sock_tuple.ipv4`: addresses and ports in network order.
#[repr(C)]
struct Tuple4 {
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
}

/// TC_ACT_UNSPEC, which tcx calls TCX_NEXT: "not mine, go on". The next
/// tcx program, or the classic clsact filters after the tcx list (or, in a
/// direct-action cls_bpf filter, the next filter) see the packet as if tpbpf
/// were not there. TC_ACT_OK would end the run and hide every packet from
/// the programs after tpbpf's (Cilium's, Calico's).
const TC_NEXT: i32 = -1;

/// Steers a cluster-bound TCP packet to tpbpfd's socket and passes it up
/// the stack (TC_ACT_OK); leaves every other packet to the programs after
/// this one.
#[classifier]
pub fn tpbpf_tc_ingress(ctx: TcContext) -> i32 {
    match steer(&ctx) {
        Some(()) => TC_ACT_OK,
        None => TC_NEXT,
    }
}

fn steer(ctx: &TcContext) -> Option<()> {
    let cfg = CONFIG.get(0)?;
    if cfg.flags & flags::ENABLED == 0 || cfg.tc_port_be == 0 {
        return None;
    }
    if u16::from_be(ctx.load::<u16>(12).ok()?) != ETH_P_IP {
        return None;
    }
    let vihl: u8 = ctx.load(ETH_HLEN).ok()?;
    let ihl = usize::from(vihl & 0x0f) * 4;
    if ihl < 20 || ctx.load::<u8>(ETH_HLEN + 9).ok()? != IPPROTO_TCP {
        return None;
    }
    let saddr: u32 = ctx.load(ETH_HLEN + 12).ok()?;
    let daddr: u32 = ctx.load(ETH_HLEN + 16).ok()?;
    if !matches!(CIDRS4.get(Key::new(32, daddr)), Some(&action::PROXY)) {
        return None;
    }
    let l4 = ETH_HLEN + ihl;
    let sport: u16 = ctx.load(l4).ok()?;
    let dport: u16 = ctx.load(l4 + 2).ok()?;

    // A connection tpbpfd already accepted for this flow?
    let mut tuple = Tuple4 {
        saddr,
        daddr,
        sport,
        dport,
    };
    let skb = ctx.skb.skb.cast();
    // SAFETY: a valid skb context and a tuple of the size passed.
    let sk = unsafe {
        bpf_skc_lookup_tcp(
            skb,
            (&mut tuple as *mut Tuple4).cast::<bpf_sock_tuple>(),
            core::mem::size_of::<Tuple4>() as u32,
            CURRENT_NETNS,
            0,
        )
    };
    if !sk.is_null() {
        // SAFETY: a referenced socket from the lookup above.
        let state = unsafe { (*sk).state };
        if state != TCP_LISTEN {
            return assign(ctx, sk, cfg.tc_mark);
        }
        // SAFETY: releasing the reference taken by the lookup.
        unsafe { bpf_sk_release(sk.cast()) };
    }
    // A new connection: tpbpfd's transparent listener.
    let mut listener = Tuple4 {
        saddr,
        daddr: LOOPBACK4_BE,
        sport,
        dport: cfg.tc_port_be as u16,
    };
    // SAFETY: as above.
    let sk = unsafe {
        bpf_skc_lookup_tcp(
            skb,
            (&mut listener as *mut Tuple4).cast::<bpf_sock_tuple>(),
            core::mem::size_of::<Tuple4>() as u32,
            CURRENT_NETNS,
            0,
        )
    };
    if sk.is_null() {
        return None;
    }
    assign(ctx, sk, cfg.tc_mark)
}

fn assign(ctx: &TcContext, sk: *mut bpf_sock, mark: u32) -> Option<()> {
    // SAFETY: `sk` holds a reference from bpf_skc_lookup_tcp, released here.
    let rc = unsafe {
        let rc = bpf_sk_assign(ctx.skb.skb.cast(), sk.cast(), 0);
        bpf_sk_release(sk.cast());
        rc
    };
    if rc != 0 {
        return None;
    }
    ctx.set_mark(mark);
    Some(())
}
