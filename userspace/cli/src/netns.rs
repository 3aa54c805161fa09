//! Entering a named network namespace (`ip netns` style, `/run/netns/NAME`)
//! for the whole process (`tpbpf --netns NAME ...`).
use anyhow::{Context, Result};
use tpbpf_loader::netns;

/// Moves the calling thread into the named network namespace. Call it before
/// any other thread starts: threads created afterwards inherit it.
pub fn enter(name: &str) -> Result<()> {
    let ns = netns::open(name).with_context(|| format!("create it with `ip netns add {name}`"))?;
    netns::enter(&ns).with_context(|| format!("entering network namespace {name}"))
}
