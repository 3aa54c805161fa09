//! The lab cluster (`tpbpf lab`), reached end to end through `tpbpf run`
//! with a node as upstream: real clients (curl, getent, redis-cli, psql)
//! against real servers (nginx, Redis, PostgreSQL, dnsmasq) by name.
use std::process::Command;

use serde_json::Value;
use tpbpf_vm_tests::*;

#[test]
fn lab_serves_web_redis_and_postgres_by_name_through_tpbpf_run() {
    if !require_root("lab_serves_web_redis_and_postgres_by_name_through_tpbpf_run") {
        return;
    }
    let Some(lab) = LabGuard::up("tl") else {
        return;
    };
    let status = lab.status.clone();
    assert_eq!(status["up"], true, "{status}");
    let pids: Vec<Value> = status["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pid"].clone())
        .collect();

    // Idempotent: a second `up` changes nothing.
    let again: Value = serde_json::from_str(&run(
        Command::new(tpbpf_bin()).args(["lab", "up", "--name", &lab.name, "-o", "json"])
    ))
    .unwrap();
    let pids_again: Vec<Value> = again["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pid"].clone())
        .collect();
    assert_eq!(pids, pids_again, "a second lab up restarted servers");

    // The developer machine reaches none of it without tpbpf.
    let client = Client::new();
    let direct = Command::new("ip")
        .args([
            "netns",
            "exec",
            client.ns.name(),
            "curl",
            "-sS",
            "-m",
            "2",
            "http://10.96.0.20/",
        ])
        .output()
        .unwrap();
    assert!(
        !direct.status.success(),
        "the lab is reachable without tpbpf"
    );

    let parent = TestCgroup::new();
    let script = "getent hosts web.default; curl -sS -m 5 http://web.default/; \
                  curl -sS -m 5 http://web.default.svc.cluster.local/; redis-cli -h redis.cache ping; \
                  psql -h postgres.db -U lab -d lab -Atc 'select 1'; getent hosts host-only.test";
    let argv = client.wrap(&["sh", "-c", script]);
    let out = Command::new(tpbpf_bin())
        .args([
            "--netns",
            client.ns.name(),
            "run",
            "--upstream",
            &format!("netns:{}-node1", lab.name),
        ])
        .args([
            "--cidr",
            "10.96.0.0/12",
            "--cidr",
            "10.244.0.0/16",
            "--cluster-dns",
            "10.96.0.10",
        ])
        .args([
            "--namespace",
            "default",
            "--namespace",
            "cache",
            "--namespace",
            "db",
            "--cgroup-parent",
        ])
        .arg(parent.path())
        .arg("--")
        .args(&argv)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().skip(1).collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["10.96.0.20", "web.default"],
        "{text}"
    );
    assert!(
        lines[1].contains("served by nginx") && lines[2].contains("served by nginx"),
        "{text}"
    );
    assert_eq!(lines[3], "PONG", "{text}");
    assert_eq!(lines[4], "1", "{text}");
    assert!(
        lines[5].contains("192.0.2.7"),
        "a name outside the cluster must still resolve: {text}"
    );

    // Down removes everything it made.
    let name = lab.name.clone();
    drop(lab);
    let netns = run(Command::new("ip").args(["netns", "list"]));
    assert!(
        !netns.contains(&format!("{name}-")),
        "lab namespaces left: {netns}"
    );
    assert!(
        !std::path::Path::new("/run/tpbpf-lab").join(&name).exists(),
        "lab state left"
    );
    for p in pids.iter().filter_map(Value::as_u64) {
        let state = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        let zombie_or_gone = state.is_empty()
            || state
                .rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'));
        assert!(zombie_or_gone, "lab server {p} still running: {state}");
    }
}
