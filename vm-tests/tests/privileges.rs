//! What tpbpf does with root: `sudo tpbpf run -- CMD` runs CMD as the user
//! who ran sudo; `down` signals only its own tpbpfd; bridge names cannot
//! name paths.
use std::process::Command;

use tpbpf_vm_tests::*;

/// `tpbpf run` in a fresh namespace, as if run by `sudo` for user nobody.
fn run_as_sudo_for_nobody(extra: &[&str], script: &str) -> (String, String, bool) {
    let (ns, upstream) = (NetNs::new(), NetNs::new());
    let parent = TestCgroup::new();
    let out = Command::new(tpbpf_bin())
        .args(["--netns", ns.name(), "run", "--no-dns"])
        .args(["--upstream", &format!("netns:{}", upstream.name())])
        .args(["--cidr", "10.96.0.0/12", "--cgroup-parent"])
        .arg(parent.path())
        .args(extra)
        .args(["--", "sh", "-c", script])
        .env("SUDO_UID", "65534")
        .env("SUDO_GID", "65534")
        .env("SUDO_USER", "nobody")
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out.status.success(),
    )
}

#[test]
fn sudo_tpbpf_run_runs_the_command_as_the_invoking_user() {
    if !require_root() {
        return;
    }
    let (out, err, ok) = run_as_sudo_for_nobody(&[], "id -u; id -g; echo \"$HOME $USER\"");
    assert!(ok, "{out}{err}");
    // The ready line first, then the command's output.
    let lines: Vec<&str> = out.lines().skip(1).collect();
    assert_eq!(
        lines,
        ["65534", "65534", "/nonexistent nobody"],
        "{out}{err}"
    );

    let (out, err, ok) = run_as_sudo_for_nobody(&["--as-root"], "id -u");
    assert!(ok, "{out}{err}");
    assert_eq!(out.lines().nth(1), Some("0"), "{out}{err}");
}

#[test]
fn down_signals_only_its_own_tpbpfd_and_names_cannot_be_paths() {
    if !require_root() {
        return;
    }
    // A bridge whose recorded pid now belongs to another process.
    let instance = unique_name("pid");
    let dir = std::path::Path::new("/run/tpbpf").join(&instance);
    std::fs::create_dir_all(&dir).unwrap();
    let mut victim = Command::new("sleep").arg("30").spawn().unwrap();
    std::fs::write(
        dir.join("state.json"),
        format!("{{\"pid\": {}}}", victim.id()),
    )
    .unwrap();
    let out = Command::new(tpbpf_bin())
        .args(["down", "--instance", &instance])
        .output()
        .unwrap();
    let still_alive = victim.try_wait().unwrap().is_none();
    let _ = victim.kill();
    let _ = victim.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not its tpbpfd"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        still_alive,
        "tpbpf down signalled a process that is not its tpbpfd"
    );

    for bad in ["../etc", "a/b", ".hidden", ""] {
        let out = Command::new(tpbpf_bin())
            .args(["status", "--instance", bad])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "--instance {bad:?} was taken");
        assert!(String::from_utf8_lossy(&out.stderr).contains("not a bridge name"));
    }
}
