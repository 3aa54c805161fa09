//! tpbpfd keeps answering while the cgroups of ended `tpbpf run` bridges
//! are emptied: that work (freezing the cgroup, waiting on its
//! `cgroup.events`, moving its processes out) runs off the service's two
//! async workers. Each command here is blocked on a FUSE mount that never
//! answers, so its cgroup cannot freeze and each emptying waits out its
//! bound: as many slow emptyings as tpbpfd has workers, and another
//! request sent while they run must be answered before any of them ends.
//!
//! The test speaks `tpbpf_bridge_api`'s JSON messages (`ToService`,
//! `FromService`) as serde writes them: `{"op": ..., fields...}`.
use std::{
    ffi::CString,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use tpbpf_sys::seqpacket::{recv_frame, send_frame};
use tpbpf_vm_tests::*;

/// tpbpfd's async workers (`worker_threads(2)` in tpbpfd and `tpbpf
/// service run`).
const WORKERS: usize = 2;

/// A FUSE file system whose server never answers: any lookup in it waits
/// (killable, not freezable) until the connection is aborted, which
/// closing the device does on drop; then it is unmounted.
struct StuckFuse {
    dir: PathBuf,
    dev: Option<OwnedFd>,
}

impl StuckFuse {
    fn mount() -> Result<Self, String> {
        let dir = std::env::temp_dir().join(unique_name("tpbpf-fuse"));
        std::fs::create_dir(&dir).map_err(|e| e.to_string())?;
        // SAFETY: a constant NUL-terminated path; the fd is owned below.
        let fd = unsafe { libc::open(c"/dev/fuse".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd < 0 {
            let _ = std::fs::remove_dir(&dir);
            return Err(format!("/dev/fuse: {}", std::io::Error::last_os_error()));
        }
        let guard = Self {
            // SAFETY: a fresh descriptor nothing else owns.
            dev: Some(unsafe { OwnedFd::from_raw_fd(fd) }),
            dir,
        };
        let target = CString::new(guard.dir.as_os_str().as_encoded_bytes()).unwrap();
        let opts = CString::new(format!("fd={fd},rootmode=40000,user_id=0,group_id=0")).unwrap();
        // SAFETY: NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                c"tpbpf-test".as_ptr(),
                target.as_ptr(),
                c"fuse".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                opts.as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(format!(
                "mounting FUSE: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(guard)
    }
}

impl Drop for StuckFuse {
    fn drop(&mut self) {
        // Closing the device aborts the connection: the waiters get ENOTCONN.
        self.dev.take();
        let target = CString::new(self.dir.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A command stuck in a lookup on `fuse`, started in `cgroup`; killed by
/// its pid and reaped on drop.
struct Stuck(Child);

impl Stuck {
    fn spawn(cgroup: &Path, fuse: &StuckFuse) -> Self {
        use std::os::unix::process::CommandExt;
        let procs = CString::new(
            cgroup
                .join("cgroup.procs")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .unwrap();
        let mut cmd = Command::new("stat");
        cmd.arg(fuse.dir.join("x"));
        // SAFETY: open, write and close are async-signal-safe; the path
        // was made before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
                Ok(())
            });
        }
        Self(cmd.spawn().expect("starting stat"))
    }

    fn pidfd(&self) -> OwnedFd {
        // SAFETY: pidfd_open takes no memory; the result is checked.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, self.0.id() as libc::pid_t, 0) };
        assert!(fd >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh descriptor nothing else owns.
        unsafe { OwnedFd::from_raw_fd(fd as i32) }
    }
}

impl Drop for Stuck {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn connect(socket: &Path) -> OwnedFd {
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: a zeroed sockaddr_un, filled within its size.
    let rc = unsafe {
        let mut addr: libc::sockaddr_un = std::mem::zeroed();
        addr.sun_family = libc::AF_UNIX as u16;
        let path = socket.as_os_str().as_encoded_bytes();
        assert!(path.len() < addr.sun_path.len());
        for (d, s) in addr.sun_path.iter_mut().zip(path) {
            *d = *s as libc::c_char;
        }
        libc::connect(
            sock.as_raw_fd(),
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as u32,
        )
    };
    assert_eq!(
        rc,
        0,
        "connecting to {}: {}",
        socket.display(),
        std::io::Error::last_os_error()
    );
    sock
}

fn ask(sock: &OwnedFd, message: Value, fd: Option<std::os::fd::BorrowedFd<'_>>) {
    send_frame(sock.as_fd(), message.to_string().as_bytes(), &[], fd).expect("asking tpbpfd");
}

fn answer(sock: &OwnedFd) -> Value {
    let frame = recv_frame(sock.as_fd())
        .expect("reading tpbpfd's answer")
        .expect("tpbpfd closed the connection without an answer");
    frame.parse().expect("tpbpfd's answer")
}

fn freezing(cgroup: &Path) -> bool {
    std::fs::read_to_string(cgroup.join("cgroup.freeze")).is_ok_and(|t| t.trim() == "1")
}

#[test]
fn tpbpfd_answers_while_the_cgroups_of_ended_runs_are_emptied() {
    if !require_root() {
        return;
    }
    let fuse = match StuckFuse::mount() {
        Ok(f) => f,
        Err(e) => {
            return skip(&format!(
                "needs a FUSE mount to hold a process unfrozen: {e}"
            ))
        }
    };
    let ns = NetNs::new();
    let home = TestCgroup::new();
    let dir = TempDir::new("tpbpf-svc");
    let socket = dir.0.join("tpbpfd.sock");
    let _service = {
        let mut cmd = Command::new(tpbpf_bin());
        cmd.args([
            "--netns",
            ns.name(),
            "service",
            "run",
            "-o",
            "json",
            "--group",
            "0",
        ])
        .arg("--socket")
        .arg(&socket);
        let mut service = Bg::spawn(&mut cmd);
        service
            .wait_event(Duration::from_secs(10), |e| e["event"] == "ready")
            .expect("tpbpfd's service ready");
        service
    };

    // As many `tpbpf run` bridges as tpbpfd has workers, each for a
    // command stuck on the FUSE mount.
    let mut runs = Vec::new();
    for _ in 0..WORKERS {
        let command = Stuck::spawn(home.path(), &fuse);
        let sock = connect(&socket);
        let request = json!({
            "op": "up",
            "instance": unique_name("stuck"),
            "cidrs": ["10.123.0.0/16"],
            "never_proxy": [],
            "run": true,
        });
        let pidfd = command.pidfd();
        ask(&sock, request, Some(pidfd.as_fd()));
        let ready = answer(&sock);
        assert_eq!(ready["op"], "ready", "tpbpfd answered {ready}");
        let cgroup = PathBuf::from(ready["cgroup"].as_str().expect("the run's cgroup"));
        runs.push((command, sock, cgroup));
    }
    let cgroups: Vec<PathBuf> = runs.iter().map(|r| r.2.clone()).collect();

    // End every bridge at once, and wait until tpbpfd empties each cgroup
    // (it froze them; they cannot freeze while their command is stuck).
    let (commands, socks): (Vec<_>, Vec<_>) = runs.into_iter().map(|(c, s, _)| (c, s)).unzip();
    drop(socks);
    assert!(
        wait_for(Duration::from_secs(10), || cgroups
            .iter()
            .all(|c| freezing(c))),
        "tpbpfd did not start emptying every ended run's cgroup"
    );

    // Another request, while they are being emptied.
    let asked = Instant::now();
    let probe = connect(&socket);
    ask(&probe, json!({"op": "exempt", "id": 1}), None);
    let refused = answer(&probe);
    let took = asked.elapsed();
    let still_emptying: Vec<bool> = cgroups.iter().map(|c| c.exists()).collect();
    eprintln!(
        "a request to tpbpfd while {WORKERS} run cgroups were emptied: answered in {took:?}; \
         cgroups still there when it was: {still_emptying:?}"
    );
    assert_eq!(
        refused["op"], "refused",
        "an exemption on a connection of its own: {refused}"
    );
    assert!(
        still_emptying.iter().all(|e| *e),
        "tpbpfd answered only after it had emptied a cgroup (in {took:?}): the emptying \
         holds its async workers"
    );

    // The emptying finishes on its own (the commands are moved out unfrozen).
    assert!(
        wait_for(Duration::from_secs(10), || cgroups
            .iter()
            .all(|c| !c.exists())),
        "the run cgroups were not removed"
    );
    drop(commands);
    drop(fuse);
    drop(dir);
}
