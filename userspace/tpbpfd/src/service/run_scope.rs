//! The cgroup of one `tpbpf run` command.
//!
//! Making and emptying it block (files under /sys/fs/cgroup, a helper
//! process, waits on `cgroup.events` while the cgroup freezes and empties):
//! the async entry points ([`RunScope::start`], [`RunScope::end`], and a
//! scope dropped on an error path) run them on the runtime's blocking
//! threads, so the service's two workers keep answering other requests.
use std::os::fd::{AsRawFd, OwnedFd};

use tpbpf_sys::seqpacket::Peer;
use tracing::warn;

/// The cgroup of one `tpbpf run` command: made below the command's own
/// cgroup (or one the asker names and may bridge), removed when the bridge
/// ends (processes still inside go back to the parent), or by a helper if
/// tpbpfd dies.
pub struct RunScope {
    /// `None` once handed to [`RunScope::end`] or a drop's clean-up.
    inner: Option<Inner>,
}

struct Inner {
    cgroup: tpbpf_cgroup::ChildCgroup,
    reaper: tpbpf_cgroup::reaper::Reaper,
}

impl Inner {
    fn finish(self) {
        if let Err(e) = self.cgroup.remove() {
            warn!("removing a command's cgroup: {e}");
        }
        self.reaper.finish();
    }
}

impl RunScope {
    /// [`RunScope::make`] on a blocking thread.
    pub async fn start(
        peer: &Peer,
        pidfd: OwnedFd,
        parent: Option<std::path::PathBuf>,
    ) -> Result<Self, String> {
        let peer = peer.clone();
        tokio::task::spawn_blocking(move || Self::make(&peer, pidfd, parent))
            .await
            .map_err(|e| format!("making the command's cgroup: {e}"))?
    }

    /// Moves the process of `pidfd` into a cgroup of its own, after
    /// checking that it is the peer's child and, unless the peer is root,
    /// runs as the peer's uid. `parent` is where the cgroup goes (checked
    /// by the caller); `None`: below the command's own.
    fn make(
        peer: &Peer,
        pidfd: OwnedFd,
        parent: Option<std::path::PathBuf>,
    ) -> Result<Self, String> {
        let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd()))
            .map_err(|e| format!("reading the command's pidfd: {e}"))?;
        let pid: i32 = status_field(&fdinfo, "Pid:")
            .and_then(|v| v.first()?.parse().ok())
            .filter(|p| *p > 0)
            .ok_or("the descriptor is not a pidfd of a live process")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map_err(|e| format!("the command's process: {e}"))?;
        let uids = status_field(&status, "Uid:").unwrap_or_default();
        let ppid = status_field(&status, "PPid:").and_then(|v| v.first()?.parse::<i32>().ok());
        let uid_ok = peer.uid == 0 || uids.iter().all(|u| u.parse() == Ok(peer.uid));
        if uids.is_empty() || !uid_ok || ppid != Some(peer.pid) {
            return Err(format!(
                "process {pid} is not a child of yours (uid {}, pid {})",
                peer.uid, peer.pid
            ));
        }
        let parent = match parent {
            Some(p) => p,
            None => {
                let mount = tpbpf_cgroup::cgroup2_mount().map_err(|e| e.to_string())?;
                mount.join(tpbpf_cgroup::cgroup_of(Some(pid as u32)).map_err(|e| e.to_string())?)
            }
        };
        let cgroup = tpbpf_cgroup::ChildCgroup::create(&parent, &format!("tpbpf-run-{pid}"))
            .map_err(|e| e.to_string())?;
        // The running binary itself: its path may name another file by now
        // (replaced by whoever may write there), `/proc/self/exe` cannot.
        let exe = std::path::Path::new("/proc/self/exe");
        let reaper = tpbpf_cgroup::reaper::Reaper::spawn(exe, &["__reap-cgroup"], cgroup.path())
            .map_err(|e| format!("starting the cgroup clean-up helper: {e}"))?;
        // From here a refusal waits for the helper (no zombie of root's).
        if let Err(e) = cgroup.add(pid as u32) {
            reaper.finish();
            return Err(e.to_string());
        }
        // The pid named the pidfd's process when it was moved if that
        // process still lives (a pid is not reused while its process exists).
        // SAFETY: pidfd_send_signal with signal 0 only checks; no memory is passed.
        let alive = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                pidfd.as_raw_fd(),
                0,
                std::ptr::null::<u8>(),
                0,
            )
        } == 0;
        if !alive {
            reaper.finish();
            return Err("the command's process went away".into());
        }
        Ok(Self {
            inner: Some(Inner { cgroup, reaper }),
        })
    }

    /// The command's cgroup, open (to attach programs to).
    pub fn open(&self) -> Result<std::fs::File, String> {
        let inner = self.inner.as_ref().ok_or("the command's cgroup is gone")?;
        inner.cgroup.open().map_err(|e| e.to_string())
    }

    pub fn path(&self) -> std::path::PathBuf {
        self.inner
            .as_ref()
            .map(|i| i.cgroup.path().to_path_buf())
            .unwrap_or_default()
    }

    /// Empties and removes the cgroup (its processes go back to the
    /// parent), on a blocking thread; returns when it is done.
    pub async fn end(mut self) {
        if let Some(inner) = self.inner.take() {
            if let Err(e) = tokio::task::spawn_blocking(move || inner.finish()).await {
                warn!("removing a command's cgroup: {e}");
            }
        }
    }
}

impl Drop for RunScope {
    /// A scope dropped on an error path: the same clean-up, off the
    /// runtime's workers when there is a runtime.
    fn drop(&mut self) {
        let Some(inner) = self.inner.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(move || inner.finish())),
            Err(_) => inner.finish(),
        }
    }
}

/// The whitespace-separated values of a `Name:` line of a /proc file.
fn status_field(text: &str, name: &str) -> Option<Vec<String>> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .map(|v| v.split_whitespace().map(str::to_string).collect())
}
