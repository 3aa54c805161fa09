//! Emptying a cgroup tpbpf made into its parent, and removing it, without
//! ever moving a process that is not in it.
//!
//! `cgroup.procs` only takes pids, and a pid read from one cgroup can name
//! another process by the time it is written to the parent (the first
//! exited and its pid was handed out again): moving it would put a stranger
//! (root's, another user's) into a cgroup that a user's bridge may be
//! attached to. So the cgroup is first frozen (`cgroup.freeze`, Linux 5.2):
//! its processes can neither exit nor fork until they are moved out (a move
//! out of a frozen cgroup thaws the process). Each pid is then opened as a
//! pidfd, checked to be in the cgroup, and moved only while that pidfd's
//! process still lives. Waits are on `cgroup.events` (`poll`), not sleeps;
//! they block, so async callers run this on a blocking thread.
use std::{
    fs,
    io::{self, ErrorKind, Read, Seek},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::{cgroup2_mount, cgroup_of, move_pid, procs, CgroupError, Result};

/// Empties the cgroup at `dir` and its descendants into `dir`'s parent (the
/// processes keep running) and removes them, within `timeout`. A cgroup
/// that is already gone is not an error. A cgroup that cannot be removed in
/// time is thawed again, so no process is left frozen.
pub fn evacuate_and_remove(dir: &Path, timeout: Duration) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let start = Instant::now();
    let deadline = start + timeout;
    let parent = dir.parent().unwrap_or(Path::new("/"));
    let mount = cgroup2_mount()?;
    let frozen = freeze(dir, start + timeout / 2);
    match frozen {
        Freeze::Frozen => {}
        Freeze::Unsupported => tracing::warn!(
            cgroup = %dir.display(),
            "this kernel has no cgroup.freeze (Linux 5.2): emptying the cgroup while its \
             processes run, each pid checked against a pidfd before it is moved"
        ),
        Freeze::NotInTime => tracing::warn!(
            cgroup = %dir.display(),
            "the cgroup did not freeze in time (a process in uninterruptible sleep): \
             emptying it anyway, each pid checked against a pidfd before it is moved"
        ),
    }
    let result = empty_and_remove(dir, parent, &mount, deadline);
    if result.is_err() && frozen != Freeze::Unsupported {
        let _ = fs::write(dir.join("cgroup.freeze"), "0");
    }
    result
}

fn empty_and_remove(dir: &Path, parent: &Path, mount: &Path, deadline: Instant) -> Result<()> {
    loop {
        let tree = subtree_bottom_up(dir);
        for cgroup in &tree {
            if let Ok(pids) = procs(cgroup) {
                for pid in pids {
                    move_member(cgroup, mount, parent, pid);
                }
            }
        }
        let mut busy = None;
        for cgroup in &tree {
            match fs::remove_dir(cgroup) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => busy = Some(e),
                Err(source) => {
                    return Err(CgroupError::Remove {
                        path: cgroup.clone(),
                        source,
                    })
                }
            }
        }
        let Some(source) = busy else {
            return Ok(());
        };
        if Instant::now() >= deadline {
            return Err(CgroupError::Remove {
                path: dir.into(),
                source,
            });
        }
        // Moved processes leave at once; one that was forking (no freezer)
        // may have left a child behind: look again when the cgroup changes.
        let _ = wait_events(dir, deadline, |e| e.populated == Some(false));
    }
}

/// `dir` and every cgroup below it, the deepest first (the order rmdir needs).
fn subtree_bottom_up(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                out.extend(subtree_bottom_up(&entry.path()));
            }
        }
    }
    out.push(dir.to_path_buf());
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Freeze {
    Frozen,
    NotInTime,
    Unsupported,
}

/// Freezes `dir` (and so its descendants) and waits, until `deadline`, for
/// the kernel to say every process in it is frozen.
fn freeze(dir: &Path, deadline: Instant) -> Freeze {
    let control = dir.join("cgroup.freeze");
    if !control.exists() {
        return Freeze::Unsupported;
    }
    if fs::write(&control, "1").is_err() {
        return Freeze::Unsupported;
    }
    match wait_events(dir, deadline, |e| e.frozen == Some(true)) {
        Ok(true) => Freeze::Frozen,
        _ => Freeze::NotInTime,
    }
}

/// What `cgroup.events` says.
#[derive(Debug, Default, PartialEq, Eq)]
struct Events {
    populated: Option<bool>,
    frozen: Option<bool>,
}

fn parse_events(text: &str) -> Events {
    let mut events = Events::default();
    for line in text.lines() {
        let mut kv = line.split_whitespace();
        let (Some(k), Some(v)) = (kv.next(), kv.next()) else {
            continue;
        };
        let v = Some(v == "1");
        match k {
            "populated" => events.populated = v,
            "frozen" => events.frozen = v,
            _ => {}
        }
    }
    events
}

/// Waits until `cgroup.events` of `dir` satisfies `done`, or `deadline`:
/// the kernel wakes a `poll` for `POLLPRI` on each change. Ok(false): not
/// by the deadline. A cgroup that is gone is done.
fn wait_events(dir: &Path, deadline: Instant, done: impl Fn(&Events) -> bool) -> io::Result<bool> {
    let mut file = match fs::File::open(dir.join("cgroup.events")) {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(true),
        Err(e) => return Err(e),
    };
    let mut text = String::new();
    loop {
        text.clear();
        file.rewind()?;
        file.read_to_string(&mut text)?;
        if done(&parse_events(&text)) {
            return Ok(true);
        }
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            return Ok(false);
        };
        let mut pfd = libc::pollfd {
            fd: file.as_raw_fd(),
            events: libc::POLLPRI,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd, the count given.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// Moves `pid` from `cgroup` to `to` only if it is still `cgroup`'s: its
/// pidfd is opened first, the process it names is checked to be in
/// `cgroup`, and still alive after the check (so the pid was not reused in
/// between: a pid is not handed out again while its process exists).
/// Returns whether it moved the process.
pub fn move_member(cgroup: &Path, mount: &Path, to: &Path, pid: u32) -> bool {
    let Some(pidfd) = pidfd_open(pid) else {
        // Gone already, or (before Linux 5.3) no pidfds: then the check
        // below is the only one.
        if !pidfd_supported() {
            return in_cgroup(cgroup, mount, pid) && try_move(to, pid);
        }
        return false;
    };
    if !in_cgroup(cgroup, mount, pid) || !alive(&pidfd) {
        return false;
    }
    let moved = try_move(to, pid);
    if moved && !alive(&pidfd) {
        // It died (killed from outside: frozen processes do not exit by
        // themselves) between the check and the move.
        tracing::warn!(
            pid,
            "a process left cgroup {} while it was being moved: pid {pid} may have \
             named another process",
            cgroup.display()
        );
    }
    moved
}

fn try_move(to: &Path, pid: u32) -> bool {
    match move_pid(to, pid) {
        Ok(()) => true,
        // A process may exit before the write: ESRCH is fine.
        Err(CgroupError::Move { source, .. }) if source.raw_os_error() == Some(libc::ESRCH) => {
            false
        }
        Err(e) => {
            tracing::warn!("{e}");
            false
        }
    }
}

/// Whether `pid`'s process is in the cgroup at `cgroup` now.
fn in_cgroup(cgroup: &Path, mount: &Path, pid: u32) -> bool {
    let Ok(rel) = cgroup.strip_prefix(mount) else {
        return false;
    };
    cgroup_of(Some(pid)).is_ok_and(|p| p == rel)
}

fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes no memory; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn pidfd_supported() -> bool {
    // SAFETY: as in pidfd_open; our own pid always exists.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
    if fd < 0 {
        return io::Error::last_os_error().raw_os_error() != Some(libc::ENOSYS);
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    true
}

/// Whether the pidfd's process has not been reaped.
fn alive(pidfd: &OwnedFd) -> bool {
    // SAFETY: signal 0 only checks; no memory is passed.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            0,
            std::ptr::null::<u8>(),
            0,
        ) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_populated_and_frozen() {
        assert_eq!(
            parse_events("populated 1\nfrozen 0\n"),
            Events {
                populated: Some(true),
                frozen: Some(false)
            }
        );
        assert_eq!(
            parse_events("populated 0\n"),
            Events {
                populated: Some(false),
                frozen: None
            }
        );
    }
}
