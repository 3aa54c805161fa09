//! Network namespaces and what runs in them: `ip`, `sysctl` and `nft`
//! inside a namespace, and a closure on a thread that entered one.
use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use crate::{process::run, LabError, Result};

/// Runs `f` on a thread that entered network namespace `name`.
pub fn in_netns<T>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T
where
    T: Default + Send + 'static,
{
    let path = PathBuf::from("/run/netns").join(name);
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        let Ok(file) = fs::File::open(&path) else {
            return T::default();
        };
        // SAFETY: a valid namespace fd; affects only this short-lived thread.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return T::default();
        }
        f()
    })
    .join()
    .unwrap_or_default()
}

pub(crate) fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

pub(crate) fn netns_add(name: &str) -> Result<()> {
    if !netns_exists(name) {
        ip(&["netns", "add", name])?;
    }
    ip(&["-n", name, "link", "set", "lo", "up"])
}

pub(crate) fn netns_del(name: &str) {
    if netns_exists(name) {
        let _ = Command::new("ip").args(["netns", "del", name]).status();
    }
}

pub(crate) fn ip(args: &[&str]) -> Result<()> {
    run(
        Command::new("ip").args(args),
        "iproute2 and root are needed",
    )
}

pub(crate) fn sysctl(netns: &str, key: &str, value: &str) -> Result<()> {
    run(
        Command::new("ip").args([
            "netns",
            "exec",
            netns,
            "sh",
            "-c",
            &format!("echo {value} > /proc/sys/{key}"),
        ]),
        "needs root",
    )
}

pub(crate) fn nft(netns: &str, rules: &str) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| LabError::Io {
            what: "running nft (install nftables: sudo bash xtask/setup.sh)".into(),
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(rules.as_bytes());
    }
    let out = child.wait_with_output().map_err(|source| LabError::Io {
        what: "running nft".into(),
        source,
    })?;
    if !out.status.success() {
        return Err(LabError::Command {
            cmd: format!("nft -f - (in {netns})"),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            hint: "the kernel needs nf_tables with NAT",
        });
    }
    Ok(())
}
