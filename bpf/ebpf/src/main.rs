//! tpbpf's kernel programs. One module per hook family; shared types and map
//! names come from `tpbpf-common`.
#![no_std]
#![no_main]
// Atomic fetch-add on map values (the UDP slot counter).
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod maps;
mod sk_lookup;
mod sock_addr;
mod sock_ops;
mod tc;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here; this is never run.
    loop {}
}

/// Programs that use GPL-only helpers must say so.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
