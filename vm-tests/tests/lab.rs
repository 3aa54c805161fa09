//! The lab cluster (`tpbpf lab`), reached end to end through `tpbpf run`
//! with a node as upstream: real clients (curl, getent, redis-cli, psql)
//! against real servers (nginx, Redis, PostgreSQL, dnsmasq) by name.
use std::{process::Command, time::Duration};

use serde_json::Value;
use tpbpf_vm_tests::*;

#[test]
fn lab_serves_web_redis_and_postgres_by_name_through_tpbpf_run() {
    if !require_root() {
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
            "--as-root",
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

/// A lab never pretends: without its agent binary `lab up` fails and says
/// which binary and how to build it, leaving nothing; and the lab's API
/// lists only pods whose processes run.
#[test]
fn lab_up_without_its_agent_fails_and_the_api_lists_only_running_pods() {
    if !require_root() {
        return;
    }
    // `tpbpf` alone in a directory: no tpbpf-agent beside it.
    let alone = PublicCopy::of(&tpbpf_bin());
    let name = unique_name("tn");
    let out = Command::new(alone.path())
        .args(["lab", "up", "--name", &name])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "lab up without the agent succeeded");
    let missing = alone.path().with_file_name("tpbpf-agent");
    assert!(
        err.contains(&missing.display().to_string()) && err.contains("cargo build -p tpbpf-agent"),
        "the error must name the missing binary and how to build it:\n{err}"
    );
    let netns = run(Command::new("ip").args(["netns", "list"]));
    assert!(
        !netns.contains(&name),
        "a failed lab up left namespaces:\n{netns}"
    );
    let out = Command::new(tpbpf_bin())
        .args([
            "lab",
            "up",
            "--name",
            &name,
            "--agent",
            "/nonexistent/tpbpf-agent",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/nonexistent/tpbpf-agent"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let Some(lab) = LabGuard::up("tn") else {
        return;
    };
    let api = |path: &str| -> Value {
        let text = lab.api_get(path);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text}"))
    };
    let pod_names = |list: &Value| -> Vec<String> {
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_string))
            .collect()
    };
    let before = pod_names(&api("/api/v1/pods"));
    assert!(
        before.iter().any(|n| n == "web-7d4b9c-a1")
            && before.iter().any(|n| n == "tpbpf-agent-node1"),
        "{before:?}"
    );
    // Kill a web pod's server, as a crash would: it leaves the API.
    let web_pid = lab.status["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "web-7d4b9c-a1")
        .and_then(|p| p["pid"].as_i64())
        .expect("web's pid") as i32;
    // SAFETY: the pid of a server this test's lab started.
    unsafe { libc::kill(web_pid, libc::SIGKILL) };
    assert!(
        wait_for(Duration::from_secs(5), || {
            !pod_names(&api("/api/v1/pods"))
                .iter()
                .any(|n| n == "web-7d4b9c-a1")
        }),
        "the API still lists a pod whose process is dead: {:?}",
        pod_names(&api("/api/v1/pods"))
    );
    let now = pod_names(&api("/api/v1/pods"));
    assert_eq!(now.len(), before.len() - 1, "{now:?}");
    // A killed agent is started again, as a DaemonSet's pod is.
    let agent_pid = || {
        std::fs::read_to_string(format!("/run/tpbpf-lab/{}/agent-node1.pid", lab.name))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
    };
    let agent = agent_pid().expect("node1's agent");
    // SAFETY: the agent this test's lab started.
    unsafe { libc::kill(agent, libc::SIGKILL) };
    assert!(
        wait_for(Duration::from_secs(10), || agent_pid()
            .is_some_and(|p| p != agent && process_running(p as u64))),
        "the agent on node1 was not started again"
    );
    let ds = api("/apis/apps/v1/namespaces/tpbpf-system/daemonsets/tpbpf-agent");
    assert_eq!(ds["status"]["desiredNumberScheduled"], 2, "{ds}");
    let web = api("/apis/apps/v1/namespaces/default/deployments/web");
    assert_eq!(
        web["status"]["readyReplicas"].as_i64(),
        web["spec"]["replicas"].as_i64().map(|r| r - 1),
        "{web}"
    );
    // A port-forward to the dead pod is refused like a missing pod.
    let pf = lab.api_get("/api/v1/namespaces/default/pods/web-7d4b9c-a1/portforward");
    assert!(pf.contains("NotFound"), "{pf}");
}
