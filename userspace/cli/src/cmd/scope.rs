//! Running a command inside a cgroup, and passing its status through.
use std::{
    ffi::CString,
    os::unix::{ffi::OsStrExt, process::CommandExt},
    process::ExitCode,
};

use anyhow::{Context, Result};

/// Spawns `argv` with the child joining `cgroup` between fork and exec, so
/// not a single syscall of it runs outside the cgroup.
pub fn spawn_in_cgroup(argv: &[String], cgroup: &std::path::Path) -> Result<tokio::process::Child> {
    let procs = CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes())
        .context("cgroup path contains a NUL byte")?;
    let mut cmd = std::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]);
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
            Ok(())
        });
    }
    tokio::process::Command::from(cmd)
        .spawn()
        .with_context(|| format!("starting `{}` in cgroup {}", argv[0], cgroup.display()))
}

pub fn forward(pid: Option<u32>, sig: libc::c_int) {
    if let Some(pid) = pid {
        // SAFETY: kill has no memory preconditions; pid is our own child.
        unsafe {
            libc::kill(pid as libc::pid_t, sig);
        }
    }
}

pub fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => ExitCode::from(c as u8),
        (None, Some(s)) => ExitCode::from(128u8.wrapping_add(s as u8)),
        _ => ExitCode::FAILURE,
    }
}
