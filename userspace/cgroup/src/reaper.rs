//! Removes a child cgroup when the process that created it is gone, however
//! it went: a helper process holds the read end of a pipe whose write end
//! only the creator holds. When the creator exits, or is killed with SIGKILL,
//! the kernel closes the write end; the helper reads EOF, moves any process
//! still in the cgroup to its parent (they keep running, no longer bridged)
//! and removes it.
use std::{
    io::{self, Read},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    time::Duration,
};

use crate::evacuate_and_remove;

/// The creator's end of the watch. Dropping it lets the helper finish.
#[derive(Debug)]
pub struct Reaper {
    stdin: Option<ChildStdin>,
    child: Child,
}

impl Reaper {
    /// Starts `exe args... PATH` as the helper. The helper must call
    /// [`run_reaper`] with `PATH`. It runs in a session of its own, so a
    /// Ctrl-C aimed at the creator does not reach it.
    pub fn spawn(exe: &Path, args: &[&str], cgroup: &Path) -> io::Result<Self> {
        let mut all: Vec<&std::ffi::OsStr> = args.iter().map(std::ffi::OsStr::new).collect();
        all.push(cgroup.as_os_str());
        Self::spawn_with(exe, &all)
    }

    /// Starts `exe args...` as a helper that acts when this process is gone
    /// (the helper reads EOF on its stdin).
    pub fn spawn_with(exe: &Path, args: &[&std::ffi::OsStr]) -> io::Result<Self> {
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        // SAFETY: setsid is async-signal-safe and touches no memory.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        let stdin = child.stdin.take();
        Ok(Self { stdin, child })
    }

    /// Tells an undo helper that the creator undid everything itself, then
    /// lets it go.
    pub fn done(mut self) {
        use std::io::Write;
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.write_all(b"done");
        }
        let _ = self.child.wait();
    }

    /// Tells the helper something it will need if this process dies (one
    /// line; at most a pipe's buffer in all).
    pub fn tell(&mut self, line: &str) -> io::Result<()> {
        use std::io::Write;
        match self.stdin.as_mut() {
            Some(stdin) => writeln!(stdin, "{line}"),
            None => Err(io::Error::other("the clean-up helper was let go")),
        }
    }

    /// Lets the helper go (after the creator removed the cgroup itself) and
    /// waits for it, so no zombie is left.
    pub fn finish(mut self) {
        self.stdin.take();
        let _ = self.child.wait();
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.stdin.take();
    }
}

/// The helper's side: waits for EOF on stdin, then removes `cgroup`.
/// Termination signals are ignored so the cleanup always runs.
pub fn run_reaper(cgroup: PathBuf) -> io::Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGPIPE] {
        // SAFETY: installing SIG_IGN has no preconditions.
        unsafe {
            libc::signal(sig, libc::SIG_IGN);
        }
    }
    let mut buf = [0u8; 64];
    let mut stdin = io::stdin().lock();
    loop {
        match stdin.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    evacuate_and_remove(&cgroup, Duration::from_secs(5)).map_err(io::Error::other)
}

/// Waits for EOF on stdin (the creator is gone), ignoring termination
/// signals; true unless the creator wrote `done` first (it undid its changes
/// outside itself, a policy route, on its own).
pub fn wait_for_creator() -> bool {
    !wait_for_creator_input().starts_with(b"done")
}

/// Waits for EOF on stdin like [`wait_for_creator`], and returns what the
/// creator wrote to it ([`Reaper::tell`]) before it went.
pub fn wait_for_creator_input() -> Vec<u8> {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGPIPE] {
        // SAFETY: installing SIG_IGN has no preconditions.
        unsafe {
            libc::signal(sig, libc::SIG_IGN);
        }
    }
    let mut input = Vec::new();
    let _ = io::stdin().lock().read_to_end(&mut input);
    input
}
