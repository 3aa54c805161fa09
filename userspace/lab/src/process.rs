//! The lab's processes and files: starting a detached process with its log,
//! running a command to completion, stopping only what the lab started, and
//! the state directory's files.
use std::{
    fs, io,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::{LabError, Result};

/// Starts `cmd` in a session of its own (it outlives `lab up` and the
/// terminal), its output appended to `log`. Returns its pid.
pub(crate) fn spawn_detached(cmd: &mut Command, log: &Path, what: &str) -> Result<u32> {
    Ok(spawn_child(cmd, log, what)?.id())
}

/// [`spawn_detached`], keeping the child to wait for (its exit status).
pub(crate) fn spawn_child(
    cmd: &mut Command,
    log: &Path,
    what: &str,
) -> Result<std::process::Child> {
    let out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|source| LabError::Io {
            what: format!("opening {}", log.display()),
            source,
        })?;
    let err = out.try_clone().map_err(|source| LabError::Io {
        what: format!("opening {}", log.display()),
        source,
    })?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, || {
            libc::setsid();
            Ok(())
        });
    }
    cmd.spawn().map_err(|source| LabError::Io {
        what: format!("starting {what}"),
        source,
    })
}

pub(crate) fn run(cmd: &mut Command, hint: &'static str) -> Result<()> {
    let out = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| LabError::Io {
            what: format!("running {cmd:?}"),
            source,
        })?;
    if !out.status.success() {
        return Err(LabError::Command {
            cmd: format!("{cmd:?}"),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            hint,
        });
    }
    Ok(())
}

/// SIGTERM, then SIGKILL after 3 s. Only for pids from the lab's pid files.
pub(crate) fn stop_pid(pid: i32) {
    // SAFETY: signals to a pid the lab recorded for a process it started.
    unsafe {
        if libc::kill(pid, libc::SIGTERM) != 0 {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        libc::kill(pid, libc::SIGKILL);
    }
}

/// Whether a process exists and has not exited (a zombie has).
pub fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    if unsafe { libc::kill(pid, 0) } != 0 {
        return false;
    }
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .is_none_or(|zombie| !zombie)
}

pub(crate) fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if fs::File::open("/dev/urandom")
        .and_then(|mut f| io::Read::read_exact(&mut f, &mut b))
        .is_err()
    {
        return u64::from(std::process::id()) ^ Instant::now().elapsed().as_nanos() as u64;
    }
    u64::from_ne_bytes(b)
}

pub(crate) fn mkdir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|source| LabError::Io {
        what: format!("creating {}", dir.display()),
        source,
    })
}

pub(crate) fn write(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).map_err(|source| LabError::Io {
        what: format!("writing {}", path.display()),
        source,
    })
}
