//! `tpbpf service install` run from a directory a user owns: root must
//! never run a binary that user could replace. The unit (and, without
//! systemd, the started tpbpfd) runs a root-owned copy instead.
use std::{os::unix::fs::MetadataExt, path::Path, process::Command, time::Duration};

use tpbpf_vm_tests::*;

const COPY: &str = "/usr/local/libexec/tpbpf/tpbpfd";
const PID_FILE: &str = "/run/tpbpf/tpbpfd.pid";
const LOG_FILE: &str = "/var/log/tpbpfd.log";

/// A directory of uid 65534 holding copies of tpbpf and tpbpfd (theirs),
/// removed with the guard, with whatever install left.
struct UsersBinaries {
    dir: std::path::PathBuf,
    had_log: bool,
}

impl Drop for UsersBinaries {
    fn drop(&mut self) {
        let _ = Command::new(self.dir.join("tpbpf"))
            .args(["service", "uninstall"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
        if !self.had_log {
            let _ = std::fs::remove_file(LOG_FILE);
        }
    }
}

#[test]
fn install_from_a_users_directory_runs_a_root_owned_copy() {
    if !require_root() {
        return;
    }
    if Path::new("/run/systemd/system").is_dir() || Path::new(PID_FILE).exists() {
        return skip("systemd runs here, or a tpbpfd service already does: installing one would change this machine");
    }
    let dir = std::env::temp_dir().join(unique_name("users-bin"));
    std::fs::create_dir(&dir).unwrap();
    let guard = UsersBinaries {
        dir: dir.clone(),
        had_log: Path::new(LOG_FILE).exists(),
    };
    for name in ["tpbpf", "tpbpfd"] {
        let to = dir.join(name);
        std::fs::copy(tpbpf_bin().with_file_name(name), &to).unwrap();
        std::os::unix::fs::chown(&to, Some(65534), Some(65534)).unwrap();
    }
    std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
    let tpbpf = dir.join("tpbpf");

    // The unit it would write runs the copy, not the user's file.
    let out = Command::new(&tpbpf)
        .args(["service", "install", "--dry-run", "--group", "nogroup"])
        .output()
        .unwrap();
    let unit = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        unit.contains(&format!("ExecStart={COPY} --group nogroup")),
        "{unit}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("belongs to uid 65534"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Installed (no systemd here: started now): the running tpbpfd is the
    // root-owned copy.
    let out = Command::new(&tpbpf)
        .args(["service", "install", "--group", "nogroup"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // "PID START_TIME": the pid comes first.
    let pid: u32 = std::fs::read_to_string(PID_FILE)
        .unwrap()
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a pid in tpbpfd's pid file");
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(exe, Path::new(COPY), "tpbpfd runs {}", exe.display());
    let meta = std::fs::metadata(COPY).unwrap();
    assert_eq!(
        (meta.uid(), meta.mode() & 0o022),
        (0, 0),
        "{COPY} is not root's alone"
    );

    // The user replaces their file: what root runs does not change.
    std::fs::write(dir.join("tpbpfd"), b"#!/bin/sh\nid > /tmp/owned\n").unwrap();
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/exe")).unwrap(),
        Path::new(COPY)
    );

    let out = Command::new(&tpbpf)
        .args(["service", "uninstall"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        wait_for(Duration::from_secs(10), || {
            !Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z "))
        }),
        "tpbpfd (pid {pid}) did not stop"
    );
    assert!(!Path::new(COPY).exists(), "uninstall left {COPY}");
    drop(guard);
}
