//! Running a command inside a cgroup, and passing its status through.
use std::{
    ffi::CString,
    os::unix::{ffi::OsStrExt, process::CommandExt},
    process::ExitCode,
};

use anyhow::{Context, Result};

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
    let ids = user.map(|u| (u.uid, u.gid, u.groups.clone()));
    if let Some(u) = user {
        cmd.env("USER", &u.name).env("LOGNAME", &u.name);
        if let Some(home) = &u.home {
            cmd.env("HOME", home);
        }
    }
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
            if let Some((uid, gid, groups)) = &ids {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(*gid) != 0
                    || libc::setuid(*uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
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
