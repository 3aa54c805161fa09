//! `tpbpf lab shell` and `tpbpf lab kubeconfig`: the lab as a user tries
//! it. The shell runs in the developer machine's network namespace (which
//! reaches the lab's API endpoint and nothing else of the cluster), in a
//! cgroup of its own that a plain `tpbpf up` in it bridges (`TPBPF_CGROUP`),
//! with `KUBECONFIG` set to the lab's, and with a resolv.conf of its own
//! naming 127.0.0.53, which only tpbpf answers there: before `tpbpf up`,
//! cluster names do not resolve; after it, they do, as through a real
//! bridge. When the shell ends, the bridges of its cgroup go down with it
//! and the cgroup and the resolv.conf are removed.
use std::{
    ffi::CString,
    os::unix::{ffi::OsStrExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{bail, Context, Result};
use tpbpf_lab::Lab;

/// Which of the lab's identities a kubeconfig is for.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Identity {
    /// The cluster's admin (a client certificate).
    Admin,
    /// `lab-developer`: a bearer token, RBAC limited to its namespaces.
    Developer,
    /// `lab-forwarder`: a bridge's reads and port-forward, nothing else.
    Forwarder,
    /// The admin through an exec credential plugin.
    Exec,
}

fn kubeconfig_of(lab: &Lab, identity: Identity) -> PathBuf {
    match identity {
        Identity::Admin => lab.kubeconfig_path(),
        Identity::Developer => lab.restricted_kubeconfig_path(),
        Identity::Forwarder => lab.forwarder_kubeconfig_path(),
        Identity::Exec => lab.exec_kubeconfig_path(),
    }
}

fn running_kubeconfig(lab: &Lab, identity: Identity) -> Result<PathBuf> {
    let path = kubeconfig_of(lab, identity);
    if !lab.status().api_running || !path.is_file() {
        bail!(
            "lab {} is not up (no {}): `sudo tpbpf lab up --name {}` first",
            lab.name(),
            path.display(),
            lab.name()
        );
    }
    Ok(path)
}

/// `tpbpf lab kubeconfig`: the identity's kubeconfig (as `kind get
/// kubeconfig` prints it), or with `path` where it is.
pub fn kubeconfig(lab: &Lab, identity: Identity, path: bool) -> Result<ExitCode> {
    let file = running_kubeconfig(lab, identity)?;
    if path {
        println!("{}", file.display());
    } else {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("reading {}", file.display()))?;
        print!("{text}");
    }
    Ok(ExitCode::SUCCESS)
}

/// The shell's cgroup and resolv.conf, removed when it ends (the bridges
/// of the cgroup first: their bridged processes are gone with the shell).
struct ShellScope {
    cgroup: tpbpf_cgroup::ChildCgroup,
    resolv: PathBuf,
}

impl Drop for ShellScope {
    fn drop(&mut self) {
        for instance in super::up::instances_bridging(self.cgroup.path()) {
            eprintln!("tpbpf lab shell: the shell ended; bringing its bridge `{instance}` down");
            let _ = Command::new(std::env::current_exe().unwrap_or_else(|_| "tpbpf".into()))
                .args(["down", "--instance", &instance])
                .stdout(std::process::Stdio::null())
                .status();
        }
        // What the shell left running in its cgroup (a server started with
        // `&`) ends with it, as a systemd scope's processes do.
        let kill = self.cgroup.path().join("cgroup.kill");
        if kill.exists() && std::fs::write(&kill, "1").is_ok() {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
            while tpbpf_cgroup::procs(self.cgroup.path()).is_ok_and(|p| !p.is_empty())
                && std::time::Instant::now() < deadline
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        // The cgroup goes after this (a field).
        let _ = std::fs::remove_file(&self.resolv);
    }
}

/// `tpbpf lab shell [-- COMMAND...]`.
pub fn shell(lab: &Lab, identity: Identity, command: &[String]) -> Result<ExitCode> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the lab's namespaces are root's: sudo tpbpf lab shell");
    }
    let kubeconfig = running_kubeconfig(lab, identity)?;
    let netns_path = PathBuf::from("/run/netns").join(lab.dev_netns());
    let netns = std::fs::File::open(&netns_path)
        .with_context(|| format!("opening {} (is the lab up?)", netns_path.display()))?;
    let run_dir = kubeconfig
        .parent()
        .unwrap_or(Path::new("/run"))
        .to_path_buf();
    let tag = format!("shell-{}", std::process::id());
    let resolv = run_dir.join(format!("{tag}.resolv.conf"));
    std::fs::write(&resolv, "nameserver 127.0.0.53\n")
        .with_context(|| format!("writing {}", resolv.display()))?;
    let parent = tpbpf_cgroup::current_cgroup_dir()?;
    let made =
        tpbpf_cgroup::ChildCgroup::create(&parent, &format!("tpbpf-lab-{}-{tag}", lab.name()));
    let made = match made {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_file(&resolv);
            return Err(e.into());
        }
    };
    let cgroup = made.path().to_path_buf();
    let scope = ShellScope {
        cgroup: made,
        resolv: resolv.clone(),
    };

    let (program, args): (String, Vec<String>) = match command.split_first() {
        Some((p, rest)) => (p.clone(), rest.to_vec()),
        None => (
            std::env::var("SHELL")
                .ok()
                .filter(|s| Path::new(s).is_file())
                .unwrap_or_else(|| "/bin/bash".into()),
            Vec::new(),
        ),
    };
    if command.is_empty() {
        eprintln!(
            "tpbpf lab shell: lab {} as {identity:?}, in network namespace {} and cgroup {}.\n  `tpbpf install` (once per lab: the agents), `tpbpf up` bridges this shell; then `curl http://web.default/`, `kubectl get pods -A`, `redis-cli -h redis.cache ping`.\n  `exit` ends the shell and any bridge of it.",
            lab.name(),
            lab.dev_netns(),
            cgroup.display()
        );
    }
    let procs = CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes())?;
    let resolv_c = CString::new(resolv.as_os_str().as_bytes())?;
    let etc_resolv = CString::new("/etc/resolv.conf")?;
    let root = CString::new("/")?;
    let netns_fd = std::os::fd::AsRawFd::as_raw_fd(&netns);
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(&program);
    cmd.args(&args)
        .env("KUBECONFIG", &kubeconfig)
        .env("TPBPF_CGROUP", &cgroup)
        .env("TPBPF_LAB", lab.name())
        .env("PS1", format!("(lab {}) \\u@\\h:\\w\\$ ", lab.name()));
    // `tpbpf` in the shell is this one.
    if let (Some(dir), Ok(path)) = (exe.parent(), std::env::var("PATH")) {
        cmd.env("PATH", format!("{}:{path}", dir.display()));
    }
    // SAFETY: only async-signal-safe calls on memory prepared before fork.
    unsafe {
        cmd.pre_exec(move || {
            let fail = || Err(std::io::Error::last_os_error());
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                return fail();
            }
            libc::close(fd);
            if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0
                || libc::unshare(libc::CLONE_NEWNS) != 0
            {
                return fail();
            }
            // Mounts made here stay here.
            if libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
                || libc::mount(
                    resolv_c.as_ptr(),
                    etc_resolv.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ) != 0
            {
                return fail();
            }
            Ok(())
        });
    }
    let status = cmd
        .status()
        .with_context(|| format!("starting {program}"))?;
    drop(netns);
    drop(scope);
    Ok(match status.code() {
        Some(c) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        // Killed by a signal: as a shell reports it.
        None => ExitCode::from(
            128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0) as u8,
        ),
    })
}
