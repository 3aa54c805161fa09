//! tpbpf where no cgroup v2 hierarchy is visible: under `ip netns exec`
//! (which remounts /sys and hides it) and in a mount namespace whose cgroup2
//! mount was removed (as on a cgroup v1-only machine). tpbpf mounts one of
//! its own at /run/tpbpf/cgroupv2 and bridges as usual; nothing stays.
use std::{path::Path, process::Command, time::Duration};

use serde_json::Value;
use tpbpf_vm_tests::*;

/// `sh -c SCRIPT` started in cgroup `parent` (so the bridged command's
/// cgroup is made under it, where the test can see and clean it up); the
/// ready event, the rest of stdout, and whether it succeeded.
fn run_in(parent: &TestCgroup, script: &str) -> (Value, String, bool) {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && {script}",
            parent.path().display()
        ))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let (first, rest) = stdout.split_once('\n').unwrap_or((&stdout, ""));
    let ready: Value = serde_json::from_str(first).unwrap_or_else(|e| {
        panic!("tpbpf run's first line is not the ready event ({e}):\n{stdout}\n{stderr}")
    });
    (ready, format!("{rest}{stderr}"), out.status.success())
}

fn run_args(cluster: &Cluster, path: &str) -> String {
    format!(
        "run --as-root -o json --upstream netns:{} --cidr {CLUSTER_CIDR4} --no-dns -- curl -sS -m 5 http://{WEB4}{path}",
        cluster.ns.name()
    )
}

fn assert_left_nothing(ready: &Value, parent: &Path) {
    let links: Vec<u64> = ready["link_ids"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    assert!(!links.is_empty(), "{ready}");
    assert!(
        wait_for(Duration::from_secs(2), || {
            let now = kernel_link_ids();
            links.iter().all(|l| !now.contains(l))
        }),
        "links {links:?} still attached"
    );
    let children: Vec<_> = std::fs::read_dir(parent)
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
        .collect();
    assert!(children.is_empty(), "cgroups left behind: {children:?}");
}

#[test]
fn run_under_ip_netns_exec_uses_a_cgroup2_mount_of_its_own() {
    if !require_root() {
        return;
    }
    let cluster = Cluster::new("netns-exec");
    let client = Client::new();
    let parent = TestCgroup::new();
    let (ready, out, ok) = run_in(
        &parent,
        &format!(
            "exec ip netns exec {} {} {}",
            client.ns.name(),
            tpbpf_bin().display(),
            run_args(&cluster, "/from-ip-netns-exec")
        ),
    );
    assert!(ok, "tpbpf run under ip netns exec failed:\n{out}");
    assert!(
        out.contains(&format!("served-by {WEB4}:80 netns-exec")),
        "{out}"
    );
    let cgroup = ready["cgroup"].as_str().unwrap();
    assert!(
        cgroup.starts_with(tpbpf_cgroup::OWN_MOUNT),
        "the command's cgroup {cgroup} is not under tpbpf's own mount"
    );
    assert_left_nothing(&ready, parent.path());
}

#[test]
fn run_in_a_mount_namespace_without_cgroup2_mounts_its_own() {
    if !require_root() {
        return;
    }
    let mount = tpbpf_cgroup_mount().expect("cgroup v2 mount");
    let cluster = Cluster::new("no-cgroup2");
    let client = Client::new();
    let parent = TestCgroup::new();
    // A private mount namespace (unshare's default propagation), the
    // cgroup2 mount removed: what a cgroup v1-only machine shows.
    let inner = format!(
        "umount -l {} && ! grep -q ' - cgroup2 ' /proc/self/mountinfo && exec {} --netns {} {}",
        mount.display(),
        tpbpf_bin().display(),
        client.ns.name(),
        run_args(&cluster, "/from-no-cgroup2")
    );
    let (ready, out, ok) = run_in(&parent, &format!("exec unshare -m sh -c \"{inner}\""));
    assert!(ok, "tpbpf run without a visible cgroup2 failed:\n{out}");
    assert!(
        out.contains(&format!("served-by {WEB4}:80 no-cgroup2")),
        "{out}"
    );
    assert!(
        ready["cgroup"]
            .as_str()
            .unwrap()
            .starts_with(tpbpf_cgroup::OWN_MOUNT),
        "{ready}"
    );
    assert_left_nothing(&ready, parent.path());
    // The machine's own mount namespace still has its mount, untouched.
    assert_eq!(tpbpf_cgroup_mount(), Some(mount));
}
