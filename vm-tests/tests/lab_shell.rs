//! `tpbpf lab shell` and `tpbpf lab kubeconfig`, as a user tries the lab:
//! in the shell, cluster names do not resolve until a plain `tpbpf up`
//! (no --netns, no --kubeconfig, no --cgroup); then curl, kubectl and
//! redis-cli reach the lab by name; the shell's exit status passes through;
//! its end takes its bridge, its cgroup and its resolv.conf with it, and
//! the machine's own resolv.conf is never touched.
use std::process::Command;

use tpbpf_vm_tests::*;

#[test]
fn a_lab_shell_reaches_the_lab_after_a_plain_up_and_leaves_nothing() {
    if !require_root() {
        return;
    }
    let Some(lab) = LabGuard::up("sh") else {
        return;
    };
    let resolv_before = std::fs::read("/etc/resolv.conf").unwrap();
    let instance = Instance(unique_name("sh"));
    let script = format!(
        "set -u
echo cgroup=$TPBPF_CGROUP
if curl -sS -m 3 http://web.default/ 2>/dev/null; then echo REACHED-WITHOUT-TPBPF; fi
tpbpf up --instance {i} >/dev/null
curl -sS -m 10 http://web.default/
kubectl get pods -n default -o name
redis-cli -h redis.cache ping
sleep 300 >/dev/null 2>&1 &
echo left=$!
exit 7",
        i = instance.0
    );
    let out = Command::new(tpbpf_bin())
        .args([
            "lab", "--name", &lab.name, "shell", "--", "sh", "-c", &script,
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}{stderr}");
    assert_eq!(out.status.code(), Some(7), "{stdout}{stderr}");
    assert!(!stdout.contains("REACHED-WITHOUT-TPBPF"), "{stdout}");
    assert!(stdout.contains("served by nginx"), "{stdout}{stderr}");
    assert!(stdout.contains("pod/web-7d4b9c-a1"), "{stdout}{stderr}");
    assert!(stdout.contains("PONG"), "{stdout}{stderr}");
    let cgroup = stdout
        .lines()
        .find_map(|l| l.strip_prefix("cgroup="))
        .expect("the shell's cgroup")
        .to_string();
    assert!(
        cgroup.contains(&format!("tpbpf-lab-{}-shell-", lab.name)),
        "{cgroup}"
    );
    // Its end took what it left running, the bridge, the cgroup and the
    // resolv.conf.
    let left_pid: i32 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("left="))
        .and_then(|p| p.trim().parse().ok())
        .expect("the background process's pid");
    assert!(
        wait_for(std::time::Duration::from_secs(2), || process_gone(left_pid)),
        "the shell's background process {left_pid} outlived it"
    );
    assert!(
        !std::path::Path::new("/run/tpbpf")
            .join(&instance.0)
            .exists(),
        "the shell's bridge is still up"
    );
    assert!(!std::path::Path::new(&cgroup).exists(), "{cgroup} left");
    let left: Vec<_> = std::fs::read_dir(lab.state_dir())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("shell-"))
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(std::fs::read("/etc/resolv.conf").unwrap(), resolv_before);
}

#[test]
fn lab_kubeconfig_prints_each_identitys_kubeconfig() {
    if !require_root() {
        return;
    }
    let Some(lab) = LabGuard::up("sk") else {
        return;
    };
    let run = |args: &[&str]| {
        let out = Command::new(tpbpf_bin())
            .args(["lab", "--name", &lab.name, "kubeconfig"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(run(&[]), std::fs::read_to_string(lab.kubeconfig()).unwrap());
    assert_eq!(run(&["--path"]).trim(), lab.kubeconfig());
    let developer = run(&["--identity", "developer", "--path"]);
    assert_eq!(
        developer.trim(),
        lab.state_dir()
            .join("kubeconfig-restricted")
            .display()
            .to_string()
    );
    assert!(run(&["--identity", "forwarder"]).contains("token"));
    // A lab that is not up says so and what to do.
    let out = Command::new(tpbpf_bin())
        .args(["lab", "--name", &unique_name("nolab"), "kubeconfig"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("tpbpf lab up"),
        "{err}"
    );
}
