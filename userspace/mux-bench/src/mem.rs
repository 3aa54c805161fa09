//! Process resources: resident memory and the open-file limit.

use anyhow::Context as _;

/// The process's resident set size in bytes: /proc/self/statm's second
/// field (resident pages) × the page size.
pub fn rss_bytes() -> anyhow::Result<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").context("reading /proc/self/statm")?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .context("/proc/self/statm has no resident field")?
        .parse()
        .context("parsing the resident pages of /proc/self/statm")?;
    Ok(pages * page_size()?)
}

/// The page size.
fn page_size() -> anyhow::Result<u64> {
    // SAFETY: sysconf only reads a configuration value.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size)
        .ok()
        .filter(|&s| s > 0)
        .context("sysconf(_SC_PAGESIZE) failed")
}

/// Gives memory that the allocator holds but nothing uses back to the OS
/// (glibc's `malloc_trim`), so that RSS reflects live memory rather than
/// what earlier workloads freed. A no-op elsewhere.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim is thread-safe and has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// [`trim`], then [`rss_bytes`].
pub fn rss_after_trim() -> anyhow::Result<u64> {
    trim();
    rss_bytes()
}

/// The open-file limit after trying to raise the soft limit to the hard one.
#[derive(Clone, Debug, serde::Serialize)]
pub struct FdLimit {
    /// The soft limit in force.
    pub soft: u64,
    /// The hard limit.
    pub hard: u64,
    /// Why raising failed, if it did.
    pub raise_error: Option<String>,
}

/// Raises RLIMIT_NOFILE's soft limit to the hard limit; reports the result.
pub fn raise_nofile() -> anyhow::Result<FdLimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit for getrlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    let mut raise_error = None;
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `raised` is a valid rlimit for setrlimit to read.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
        } else {
            raise_error = Some(format!(
                "setrlimit(RLIMIT_NOFILE): {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(FdLimit {
        soft: lim.rlim_cur,
        hard: lim.rlim_max,
        raise_error,
    })
}

/// File descriptors open in this process now.
pub fn open_fds() -> anyhow::Result<usize> {
    Ok(std::fs::read_dir("/proc/self/fd")
        .context("listing /proc/self/fd")?
        .count())
}
