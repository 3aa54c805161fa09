//! The lab's kubelet, as a platform team meets a real one: an agent pod is
//! Ready only once its readinessProbe passes, a container that dies is
//! restarted and counted (restartCount, CrashLoopBackOff, its last exit),
//! watches see the pods change, and `tpbpf install` says agents are ready
//! only when they are. Where runc is installed the agent runs under it with
//! the DaemonSet's security context.
use std::{
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use tpbpf_vm_tests::*;

/// `tpbpf lab up` with `extra` arguments (another agent binary, a runtime).
fn lab_up(prefix: &str, extra: &[&str]) -> Option<LabGuard> {
    if Command::new("redis-server")
        .arg("--version")
        .output()
        .is_err()
    {
        skip("the lab's servers are not installed (sudo bash xtask/setup.sh installs them)");
        return None;
    }
    let mut guard = LabGuard {
        name: unique_name(prefix),
        status: Value::Null,
    };
    let out = run(Command::new(tpbpf_bin())
        .args(["lab", "up", "--name", &guard.name, "-o", "json"])
        .args(extra));
    guard.status = serde_json::from_str(&out).expect("lab status JSON");
    Some(guard)
}

/// `tpbpf install` into `lab`: its exit, stdout and stderr.
fn install(lab: &LabGuard, timeout_s: u32) -> (bool, String, String) {
    let out = Command::new(tpbpf_bin())
        .args(["--netns", &lab.dev_netns(), "install", "--kubeconfig"])
        .arg(lab.kubeconfig())
        .args(["--resume-window-s", "5", "--timeout-s"])
        .arg(timeout_s.to_string())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn agent_pods(lab: &LabGuard) -> Vec<Value> {
    let body = lab.api_get("/api/v1/namespaces/tpbpf-system/pods");
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    v["items"].as_array().cloned().unwrap_or_default()
}

fn ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
        && pod["status"]["containerStatuses"][0]["ready"] == true
}

fn number_ready(lab: &LabGuard) -> i64 {
    let body = lab.api_get("/apis/apps/v1/namespaces/tpbpf-system/daemonsets/tpbpf-agent");
    let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    v["status"]["numberReady"].as_i64().unwrap_or(-1)
}

fn runc_installed() -> bool {
    Command::new("runc")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The runtimes this machine can run the agent with.
fn runtimes() -> Vec<&'static str> {
    if runc_installed() {
        vec!["runc", "process"]
    } else {
        println!("runc is not installed: the agent runs as a plain process only");
        vec!["process"]
    }
}

#[test]
fn an_agent_that_exits_at_start_is_never_reported_ready() {
    if !require_root() {
        return;
    }
    for runtime in runtimes() {
        // An "image" whose entrypoint fails at once: /bin/false as the agent.
        let Some(lab) = lab_up("tk", &["--agent", "/bin/false", "--agent-runtime", runtime]) else {
            return;
        };
        assert_eq!(lab.status["agent_runtime"], runtime, "{}", lab.status);
        let (ok, out, err) = install(&lab, 10);
        println!("[{runtime}] install:\n{out}{err}");
        assert!(!ok, "install succeeded with agents that exit at start");
        assert!(!out.contains("agents ready: 2/2"), "{out}");
        assert!(!out.contains("installed:"), "{out}");
        assert!(err.contains("not every node has a ready agent"), "{err}");
        for node in ["node1", "node2"] {
            assert!(
                err.contains(&format!("node {node}: ")) && err.contains("last exit code 1"),
                "install does not say why {node}'s agent is not ready: {err}"
            );
        }
        // The pods stay, crashing: Running (restartPolicy Always), not Ready,
        // restarted and counted, the last exit kept.
        let pods = agent_pods(&lab);
        assert_eq!(pods.len(), 2, "{pods:?}");
        for p in &pods {
            let c = &p["status"]["containerStatuses"][0];
            assert!(!ready(p), "{p}");
            assert_eq!(p["status"]["phase"], "Running", "{p}");
            assert!(c["restartCount"].as_i64().unwrap_or(0) >= 1, "{c}");
            assert_eq!(c["lastState"]["terminated"]["exitCode"], 1, "{c}");
        }
        assert_eq!(number_ready(&lab), 0);
        // kubectl's view: 0/1 and the restarts.
        let table = lab
            .api_curl()
            .args(["-H", "Accept: application/json;as=Table;v=1;g=meta.k8s.io"])
            .arg(lab.api_url("/api/v1/namespaces/tpbpf-system/pods"))
            .output()
            .unwrap();
        let table: Value = serde_json::from_slice(&table.stdout).unwrap();
        for row in table["rows"].as_array().unwrap() {
            assert_eq!(row["cells"][1], "0/1", "{row}");
        }
    }
}

/// The DaemonSet `tpbpf install` applies, with `probe` as its container's
/// readinessProbe, applied as the admin (server-side apply).
fn apply_with_readiness(lab: &LabGuard, probe: Value) {
    let out = run(Command::new(tpbpf_bin()).args([
        "install",
        "--dry-run",
        "-o",
        "json",
        "--cluster-cidr",
        "10.96.0.0/12",
        "--cluster-cidr",
        "10.244.0.0/16",
        "--resume-window-s",
        "5",
    ]));
    let objects: Vec<Value> = serde_json::from_str(&out).unwrap();
    let mut ds = objects
        .into_iter()
        .find(|o| o["kind"] == "DaemonSet")
        .expect("a DaemonSet");
    ds["spec"]["template"]["spec"]["containers"][0]["readinessProbe"] = probe;
    let out = lab
        .api_curl()
        .args(["-X", "PATCH", "-H", "Content-Type: application/apply-patch+yaml"])
        .args(["--data-binary", &ds.to_string()])
        .arg(lab.api_url(
            "/apis/apps/v1/namespaces/tpbpf-system/daemonsets/tpbpf-agent?fieldManager=lab-kubelet-test",
        ))
        .output()
        .unwrap();
    let body: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert_eq!(
        body["kind"],
        "DaemonSet",
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn ready_follows_the_readiness_probe_and_restarts_are_counted() {
    if !require_root() {
        return;
    }
    let Some(lab) = lab_up("tr", &[]) else {
        return;
    };
    // A working agent: ready on every node.
    let (ok, out, err) = install(&lab, 60);
    assert!(ok, "{out}{err}");
    assert!(out.contains("agents ready: 2/2"), "{out}");
    assert_eq!(number_ready(&lab), 2);

    // A watch from the start: it sees the pods change.
    let watch_out = std::env::temp_dir().join(format!("{}.watch", lab.name));
    let mut watch = lab
        .api_curl()
        .args(["-N", "-m", "90", "-o"])
        .arg(&watch_out)
        .arg(lab.api_url("/api/v1/namespaces/tpbpf-system/pods?watch=1&timeoutSeconds=90"))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();

    // A probe at a port nothing listens on: the agents run, never ready.
    apply_with_readiness(
        &lab,
        serde_json::json!({"tcpSocket": {"port": 4999}, "periodSeconds": 1, "failureThreshold": 1}),
    );
    assert!(
        wait_for(Duration::from_secs(20), || {
            let pods = agent_pods(&lab);
            pods.len() == 2
                && pods.iter().all(|p| {
                    !ready(p) && p["status"]["containerStatuses"][0]["state"]["running"].is_object()
                })
                && number_ready(&lab) == 0
        }),
        "agents whose readiness probe fails are reported ready: {:?}",
        agent_pods(&lab)
    );
    let pod = &agent_pods(&lab)[0];
    let cond = pod["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .cloned()
        .unwrap();
    assert_eq!(cond["reason"], "ContainersNotReady", "{cond}");
    let status: Value = serde_json::from_str(&run(
        Command::new(tpbpf_bin()).args(["lab", "status", "--name", &lab.name, "-o", "json"])
    ))
    .unwrap();
    for a in status["agents"].as_array().unwrap() {
        assert_eq!(a["running"], true, "{a}");
        assert_eq!(a["ready"], false, "{a}");
        let f = a["pod"]["probe_failure"].as_str().unwrap_or_default();
        assert!(
            f.contains("Readiness probe failed") && f.contains(":4999"),
            "{a}"
        );
    }
    let text = run(Command::new(tpbpf_bin()).args(["lab", "status", "--name", &lab.name]));
    assert!(
        text.contains("running, not ready (Readiness probe failed"),
        "{text}"
    );

    // An exec probe that fails is the same; one that passes makes them
    // ready (exec runs in the container: /tpbpf-agent --version).
    apply_with_readiness(
        &lab,
        serde_json::json!({"exec": {"command": ["/tpbpf-agent", "--version"]}, "periodSeconds": 2}),
    );
    let exec_ready = wait_for(Duration::from_secs(20), || {
        let pods = agent_pods(&lab);
        pods.len() == 2 && pods.iter().all(ready)
    });
    assert!(
        exec_ready || lab.status["agent_runtime"] != "runc",
        "{:?}",
        agent_pods(&lab)
    );

    // The real install again: ready, and said so.
    let (ok, out, err) = install(&lab, 60);
    assert!(ok, "{out}{err}");
    assert!(out.contains("agents ready: 2/2"), "{out}");

    // A killed agent: restarted, counted, ready again.
    let pid: i32 = std::fs::read_to_string(lab.state_dir().join("agent-node1.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // SAFETY: the agent this test's lab started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(
        wait_for(Duration::from_secs(20), || {
            agent_pods(&lab).iter().any(|p| {
                p["spec"]["nodeName"] == "node1"
                    && ready(p)
                    && p["status"]["containerStatuses"][0]["restartCount"] == 1
            })
        }),
        "{:?}",
        agent_pods(&lab)
    );
    let node1 = agent_pods(&lab)
        .into_iter()
        .find(|p| p["spec"]["nodeName"] == "node1")
        .unwrap();
    let last = &node1["status"]["containerStatuses"][0]["lastState"]["terminated"];
    assert_eq!(last["exitCode"], 137, "{last}");

    // The watch delivers what the API shows, a poll later.
    let events = || -> Vec<Value> {
        std::fs::read_to_string(&watch_out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    };
    let modified = |events: &[Value], key: &str, want: Value| {
        events.iter().any(|e| {
            e["type"] == "MODIFIED" && e["object"]["status"]["containerStatuses"][0][key] == want
        })
    };
    let seen_all = wait_for(Duration::from_secs(10), || {
        let ev = events();
        modified(&ev, "ready", Value::Bool(false)) && modified(&ev, "restartCount", 1.into())
    });
    let _ = watch.kill();
    let _ = watch.wait();
    let events = events();
    let _ = std::fs::remove_file(&watch_out);
    let seen: Vec<String> = events
        .iter()
        .map(|e| {
            let o = &e["object"];
            format!(
                "{} {} uid={} ready={} restarts={}",
                e["type"],
                o["metadata"]["name"],
                o["metadata"]["uid"],
                o["status"]["containerStatuses"][0]["ready"],
                o["status"]["containerStatuses"][0]["restartCount"]
            )
        })
        .collect();
    assert!(seen_all, "the watch did not see the pods change: {seen:#?}");
}

#[test]
fn the_agent_runs_under_runc_with_the_daemonsets_security_context() {
    if !require_root() {
        return;
    }
    if !runc_installed() {
        skip("runc is not installed (sudo bash xtask/setup.sh installs it): the lab runs the agent as a plain process");
        return;
    }
    let Some(lab) = LabGuard::up("tc") else {
        return;
    };
    assert_eq!(lab.status["agent_runtime"], "runc", "{}", lab.status);
    let text = run(Command::new(tpbpf_bin()).args(["lab", "status", "--name", &lab.name]));
    assert!(text.contains("agent runtime: runc"), "{text}");
    for node in ["node1", "node2"] {
        let pid = std::fs::read_to_string(lab.state_dir().join(format!("agent-{node}.pid")))
            .unwrap()
            .trim()
            .to_string();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{k}:")))
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        // BPF, NET_ADMIN, SYS_ADMIN and SYS_PTRACE (bits 39, 12, 21, 19).
        let caps = (1u64 << 39) | (1 << 12) | (1 << 21) | (1 << 19);
        for k in ["CapEff", "CapPrm", "CapBnd"] {
            assert_eq!(
                u64::from_str_radix(&field(k), 16).unwrap(),
                caps,
                "{node} {k}: {status}"
            );
        }
        assert_eq!(field("NoNewPrivs"), "1", "{status}");
        assert_eq!(field("Seccomp"), "2", "seccomp filter: {status}");
        // A read-only root, hostPID (the machine's PID namespace), the
        // pod's network namespace.
        let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
        let root = mounts
            .lines()
            .find(|l| l.split_whitespace().nth(4) == Some("/"))
            .unwrap();
        assert!(
            root.split_whitespace()
                .nth(5)
                .unwrap()
                .split(',')
                .any(|o| o == "ro"),
            "{root}"
        );
        let ns = |p: &str, n: &str| std::fs::read_link(format!("/proc/{p}/ns/{n}")).unwrap();
        assert_eq!(ns(&pid, "pid"), ns("self", "pid"));
        let agent_ns = format!("/run/netns/{}-tpbpf-system-tpbpf-agent-{node}", lab.name);
        let want = std::fs::metadata(&agent_ns).unwrap();
        let got = std::fs::metadata(format!("/proc/{pid}/ns/net")).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!((want.dev(), want.ino()), (got.dev(), got.ino()), "{node}");
    }
    // Down: runc has no container of the lab left.
    let runc_root = lab.state_dir().join("runc");
    let name = lab.name.clone();
    drop(lab);
    assert!(!runc_root.exists());
    let cg = std::fs::read_dir("/sys/fs/cgroup")
        .into_iter()
        .flatten()
        .flatten()
        .any(|d| {
            d.path()
                .join(format!("tpbpf-lab.{name}-agent-node1"))
                .exists()
        });
    assert!(!cg, "a cgroup of the lab's agent is left");
}
