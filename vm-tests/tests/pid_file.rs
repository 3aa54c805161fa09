//! `tpbpf down` signals the process a bridge's state file recorded, never
//! another that has its pid now: a command line anyone can give a process
//! does not make it the bridge's tpbpfd; the recorded start time must match.
use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use tpbpf_vm_tests::*;

/// A process whose command line reads like bridge `instance`'s tpbpfd
/// (`... daemon --control-socket /run/tpbpf/INSTANCE/control.sock`): a
/// shell that waits on its stdin. Killed by its pid and reaped on drop.
struct LookAlike(Child);

impl LookAlike {
    fn spawn(instance: &str) -> Self {
        let socket = format!("/run/tpbpf/{instance}/control.sock");
        let child = Command::new("sh")
            .args(["-c", "read _", "daemon", "--control-socket", &socket])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        let cmdline = format!("/proc/{}/cmdline", child.id());
        assert!(
            wait_for(Duration::from_secs(5), || std::fs::read(&cmdline)
                .is_ok_and(|c| c.windows(16).any(|w| w == b"--control-socket"))),
            "the look-alike's command line"
        );
        Self(child)
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }

    fn start_time(&self) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap();
        let (_, rest) = stat.rsplit_once(')').unwrap();
        rest.split_whitespace().nth(19).unwrap().parse().unwrap()
    }

    fn exited_within(&mut self, timeout: Duration) -> bool {
        wait_for(timeout, || self.0.try_wait().ok().flatten().is_some())
    }
}

impl Drop for LookAlike {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A bridge's state directory under /run/tpbpf, removed on drop.
struct StateDir(PathBuf);

impl StateDir {
    fn new(instance: &str, state: serde_json::Value) -> Self {
        let dir = Path::new("/run/tpbpf").join(instance);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("state.json"), state.to_string()).unwrap();
        Self(dir)
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn down(instance: &str) -> std::process::Output {
    Command::new(tpbpf_bin())
        .args(["down", "--instance", instance])
        .output()
        .unwrap()
}

/// A state file whose pid now names a live process with a command line
/// like the bridge's tpbpfd, but another start time (the recorded tpbpfd
/// is gone and its pid was handed out again), or none (an older state
/// file): nothing is signalled. The same process with its own start time
/// is the recorded one, and is stopped.
#[test]
fn down_does_not_signal_a_look_alike_that_has_the_recorded_pid() {
    if !require_root() {
        return;
    }
    let instance = unique_name("stale");
    let mut look_alike = LookAlike::spawn(&instance);
    let (pid, started) = (look_alike.pid(), look_alike.start_time());

    for state in [
        serde_json::json!({"pid": pid, "start_time": started - 1}),
        serde_json::json!({"pid": pid}),
    ] {
        let _dir = StateDir::new(&instance, state.clone());
        let out = down(&instance);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{state}: down succeeded");
        assert!(stderr.contains("not its tpbpfd"), "{state}: {stderr}");
        assert!(
            !look_alike.exited_within(Duration::from_millis(200)),
            "tpbpf down signalled a process that is not the one recorded ({state})"
        );
    }

    let _dir = StateDir::new(
        &instance,
        serde_json::json!({"pid": pid, "start_time": started}),
    );
    let out = down(&instance);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        look_alike.exited_within(Duration::from_secs(10)),
        "the recorded process itself was not stopped"
    );
}
