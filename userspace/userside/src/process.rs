//! Running a bridged command: as the user who ran sudo, paused until tpbpfd
//! has moved it into its cgroup (or started inside one), with the signals
//! `tpbpf run` gets passed on, and its status passed through.
use std::{
    ffi::CString,
    os::unix::{ffi::OsStrExt, process::CommandExt},
    process::ExitCode,
};

use anyhow::{bail, Context, Result};
use tokio::signal::unix::{signal, SignalKind};

/// The user who ran `sudo tpbpf ...`: whom the command runs as.
#[derive(Clone, Debug)]
pub struct Invoker {
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    pub groups: Vec<libc::gid_t>,
    pub name: String,
    pub home: Option<std::path::PathBuf>,
}

impl Invoker {
    /// From sudo's SUDO_UID/SUDO_GID (and the user's entry in the password
    /// and group databases), when tpbpf runs as root under sudo for another
    /// user; `None` otherwise.
    pub fn from_sudo() -> Result<Option<Self>> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Ok(None);
        }
        let (Some(uid), Some(gid)) = (
            std::env::var("SUDO_UID").ok(),
            std::env::var("SUDO_GID").ok(),
        ) else {
            return Ok(None);
        };
        let uid: libc::uid_t = uid
            .parse()
            .with_context(|| format!("SUDO_UID `{uid}` is not a user id"))?;
        let gid: libc::gid_t = gid
            .parse()
            .with_context(|| format!("SUDO_GID `{gid}` is not a group id"))?;
        if uid == 0 {
            return Ok(None);
        }
        let user = nix::unistd::User::from_uid(uid.into()).ok().flatten();
        let name = user
            .as_ref()
            .map(|u| u.name.clone())
            .or_else(|| std::env::var("SUDO_USER").ok())
            .unwrap_or_else(|| uid.to_string());
        let groups = match CString::new(name.clone()) {
            Ok(c) => nix::unistd::getgrouplist(&c, gid.into())
                .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
                .unwrap_or_else(|_| vec![gid]),
            Err(_) => vec![gid],
        };
        Ok(Some(Self {
            uid,
            gid,
            groups,
            name,
            home: user.map(|u| u.dir),
        }))
    }
}

impl Invoker {
    /// Gives `cmd` this user's USER, LOGNAME and HOME, and returns what its
    /// child needs to become this user between fork and exec.
    fn prepare(&self, cmd: &mut std::process::Command) -> Ids {
        cmd.env("USER", &self.name).env("LOGNAME", &self.name);
        if let Some(home) = &self.home {
            cmd.env("HOME", home);
        }
        Ids {
            uid: self.uid,
            gid: self.gid,
            groups: self.groups.clone(),
        }
    }
}

/// A user's ids, prepared before fork.
struct Ids {
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
}

impl Ids {
    /// Becomes this user: groups, gid, then uid. Only async-signal-safe
    /// calls on memory prepared before fork: for `pre_exec`.
    fn become_user(&self) -> std::io::Result<()> {
        // SAFETY: setgroups reads `groups.len()` ids from its pointer;
        // setgid and setuid take no memory.
        let failed = unsafe {
            libc::setgroups(self.groups.len(), self.groups.as_ptr()) != 0
                || libc::setgid(self.gid) != 0
                || libc::setuid(self.uid) != 0
        };
        if failed {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Spawns `argv` with the child joining `cgroup` between fork and exec, so
/// not a single syscall of it runs outside the cgroup; then, with `user`,
/// it becomes that user (groups, gid, uid) before exec.
pub fn spawn_in_cgroup(
    argv: &[String],
    cgroup: &std::path::Path,
    user: Option<&Invoker>,
) -> Result<tokio::process::Child> {
    let procs = CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes())
        .context("cgroup path contains a NUL byte")?;
    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    let ids = user.map(|u| u.prepare(&mut cmd));
    // SAFETY: only async-signal-safe calls (open, write, close) on memory
    // prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let rc = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            if rc != 1 {
                return Err(err);
            }
            if let Some(ids) = &ids {
                ids.become_user()?;
            }
            Ok(())
        });
    }
    tokio::process::Command::from(cmd)
        .spawn()
        .with_context(|| format!("starting `{}` in cgroup {}", argv[0], cgroup.display()))
}

pub fn forward(pid: Option<u32>, sig: libc::c_int) {
    let (Some(pid), Ok(sig)) = (pid, nix::sys::signal::Signal::try_from(sig)) else {
        return;
    };
    // Our own child.
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as libc::pid_t), sig);
}

pub fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => ExitCode::from(c as u8),
        (None, Some(s)) => ExitCode::from(128u8.wrapping_add(s as u8)),
        _ => ExitCode::FAILURE,
    }
}

/// Starts `argv` paused: a shell waits for one byte on fd 3 (the returned
/// pipe's write end releases it) before it becomes the command, so tpbpfd
/// can move it into its cgroup first. With `user`, the shell becomes that
/// user (groups, gid, uid) before it starts.
pub fn spawn_paused(
    argv: &[String],
    user: Option<&Invoker>,
) -> Result<(tokio::process::Child, std::fs::File)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`; close-on-exec, so
    // only the dup2 below reaches the child (the write end never does, and
    // the shell sees the end of the pipe when this process lets go).
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("making a pipe: {}", std::io::Error::last_os_error());
    }
    let go_rd = fds[0];
    // SAFETY: the write end, just made, owned here alone.
    let go_wr = unsafe { std::os::fd::OwnedFd::from_raw_fd(fds[1]) };
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg("read -r _ <&3 || exit 126; exec 3<&-; exec \"$@\"")
        .arg("tpbpf-run")
        .args(argv);
    let ids = user.map(|u| u.prepare(&mut cmd));
    // SAFETY: dup2, setgroups, setgid and setuid are async-signal-safe, on
    // memory prepared before fork; go_rd stays open in this process until
    // spawn returns.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(go_rd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(ids) = &ids {
                ids.become_user()?;
            }
            Ok(())
        });
    }
    let child = tokio::process::Command::from(cmd).spawn();
    // SAFETY: go_rd is this process's copy, closed once, here.
    unsafe { libc::close(go_rd) };
    let child = child.with_context(|| format!("starting {}", argv[0]))?;
    Ok((child, std::fs::File::from(go_wr)))
}

/// The signals `tpbpf run` passes on to its command. Listened for before
/// the command starts: one that arrives in between is then held for the
/// command, instead of ending tpbpf (the default action) and leaving the
/// command running unbridged.
pub struct Forwarded {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Forwarded {
    pub fn listen() -> Result<Self> {
        Ok(Self {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }
}

/// Waits for the bridged command, passing SIGINT, SIGTERM and SIGHUP on to
/// it. If `bridge_end` completes first (the bridge is gone), the command
/// gets SIGTERM: it would otherwise reach the cluster's ranges unbridged.
pub async fn wait_forwarding<E>(
    child: &mut tokio::process::Child,
    signals: Forwarded,
    bridge_end: impl std::future::Future<Output = E>,
) -> Result<(std::process::ExitStatus, Option<E>)> {
    let pid = child.id();
    let Forwarded {
        int: mut sigint,
        term: mut sigterm,
        hup: mut sighup,
    } = signals;
    tokio::pin!(bridge_end);
    let mut ended = None;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status?,
            _ = sigint.recv() => forward(pid, libc::SIGINT),
            _ = sigterm.recv() => forward(pid, libc::SIGTERM),
            _ = sighup.recv() => forward(pid, libc::SIGHUP),
            e = &mut bridge_end, if ended.is_none() => {
                forward(pid, libc::SIGTERM);
                ended = Some(e);
            }
        }
    };
    Ok((status, ended))
}
