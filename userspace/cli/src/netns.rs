//! Entering a named network namespace (`ip netns` style, `/run/netns/NAME`).
use std::{fs::File, os::fd::AsRawFd, path::PathBuf};

use anyhow::{bail, Context, Result};

/// Moves the calling thread into the named network namespace. Call it before
/// any other thread starts: threads created afterwards inherit it.
pub fn enter(name: &str) -> Result<()> {
    let path = if name.contains('/') {
        PathBuf::from(name)
    } else {
        PathBuf::from("/run/netns").join(name)
    };
    let file = File::open(&path).with_context(|| {
        format!(
            "opening network namespace {} (create it with `ip netns add {name}`)",
            path.display()
        )
    })?;
    // SAFETY: a valid namespace fd; setns affects only this thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!(
            "entering network namespace {}: {} (needs root)",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}
