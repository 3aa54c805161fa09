//! A UDP flow belongs to the socket it was made for, and dies with it: a
//! socket that binds a closed flow socket's port (any local user's) gets
//! nothing of the old flow, neither its late replies nor a ride on its
//! tunnel, on every path (IPv4 slots, connected or not; IPv6 connected,
//! through a slot; unconnected IPv6, through tpbpfd's `[::1]` socket).
use std::{process::Command, time::Duration};

use serde_json::Value;
use tpbpf_vm_tests::*;

/// `tpbpf --netns CLIENT run ... -- argv` bridging the test cluster's ranges;
/// returns the command's output lines after the ready event, and success.
fn tpbpf_run(
    client: &Client,
    cluster: &Cluster,
    parent: &TestCgroup,
    argv: &[String],
) -> (String, bool) {
    let out = Command::new(tpbpf_bin())
        .args([
            "--netns",
            client.ns.name(),
            "run",
            "--as-root",
            "-o",
            "json",
        ])
        .args(["--upstream", &format!("netns:{}", cluster.ns.name())])
        .args(["--cidr", CLUSTER_CIDR4, "--cidr", CLUSTER_CIDR6])
        .arg("--cgroup-parent")
        .arg(parent.path())
        .arg("--")
        .args(argv)
        .output()
        .expect("running tpbpf run");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let rest = stdout.split_once('\n').map(|(_, r)| r).unwrap_or("");
    let text = format!("{rest}\n{}", String::from_utf8_lossy(&out.stderr));
    (text, out.status.success())
}

#[test]
fn a_socket_that_binds_a_closed_udp_sockets_port_receives_nothing_of_its_flow() {
    if !require_root() {
        return;
    }
    let mut cluster = Cluster::new("rebind");
    let client = Client::new();
    let parent = TestCgroup::new();
    let tc = testclient_bin().display().to_string();
    let cases = [
        ("--udp-connected", format!("{WEB4}:7")),
        ("--udp", format!("{WEB4}:7")),
        ("--udp-connected", format!("[{WEB6}]:7")),
        ("--udp", format!("[{WEB6}]:7")),
    ];
    let script = cases
        .iter()
        .map(|(mode, addr)| format!("{tc} {mode} --udp-rebind '{addr}'"))
        .collect::<Vec<_>>()
        .join(" && ");
    let (out, ok) = tpbpf_run(
        &client,
        &cluster,
        &parent,
        &["sh".into(), "-c".into(), script],
    );
    assert!(ok, "{out}");
    let reports: Vec<Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("ok").is_some())
        .collect();
    assert_eq!(reports.len(), cases.len(), "{out}");
    for ((mode, addr), r) in cases.iter().zip(&reports) {
        println!("{mode} {addr}: {r}");
    }
    for ((mode, addr), r) in cases.iter().zip(&reports) {
        assert_eq!(r["ok"], true, "{mode} {addr}: {r}");
        assert_eq!(
            r["first"], "echo:later",
            "{mode} {addr}: the flow works: {r}"
        );
        // Where the old flow's datagrams went is known on every path but
        // unconnected IPv4 (a slot per datagram): the intruder tries it.
        if !(*mode == "--udp" && addr.starts_with(WEB4)) {
            assert!(
                r["proxy"].is_string(),
                "{mode} {addr}: no proxy address found: {r}"
            );
        }
        assert_eq!(
            r["intruder_got"],
            serde_json::json!([]),
            "{mode} {addr}: the socket that took a closed flow's port received that flow's datagrams"
        );
    }
    // The cluster did answer each flow late, while the intruder listened.
    let late = |e: &Value| e["event"] == "late" && e["sent"] == true;
    assert!(
        wait_for(Duration::from_secs(5), || {
            cluster.udp.events().iter().filter(|e| late(e)).count() == cases.len()
        }),
        "the cluster did not send every flow its late reply: {:?}",
        cluster.udp.events()
    );
}
