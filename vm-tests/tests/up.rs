//! `tpbpf up` / `status` / `down` against the lab's API endpoint, from the
//! lab's developer namespace: discovery through the kubeconfig, the route
//! overlap check, a dead tpbpfd reported by `status`, nothing left by `down`.
use std::{path::Path, process::Command, time::Duration};

use serde_json::Value;
use tpbpf_vm_tests::*;

fn in_cgroup_and_netns(
    cgroup: &Path,
    netns: &str,
    resolv: &Path,
    script: &str,
) -> std::process::Output {
    let inner = format!(
        "mount --bind {} /etc/resolv.conf && {script}",
        resolv.display()
    );
    Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {}/cgroup.procs && exec ip netns exec {netns} unshare -m sh -c '{inner}'",
            cgroup.display()
        ))
        .output()
        .unwrap()
}

#[test]
fn up_discovers_the_cluster_and_bridges_a_subtree_until_down() {
    if !require_root() {
        return;
    }
    let Some(lab) = LabGuard::up("tu") else {
        return;
    };
    let (kubeconfig, dev) = (lab.kubeconfig(), lab.dev_netns());
    let cg = TestCgroup::new();
    let resolv = std::env::temp_dir().join(format!("{}.resolv.conf", lab.name));
    std::fs::write(&resolv, "nameserver 127.0.0.53\n").unwrap();
    let instance = Instance(unique_name("up"));
    let up = |extra: &[&str]| {
        Command::new(tpbpf_bin())
            .args([
                "--netns",
                &dev,
                "up",
                "-o",
                "json",
                "--kubeconfig",
                &kubeconfig,
                "--instance",
                &instance.0,
                // Connected namespaces: the first for bare names.
                "-n",
                "default",
                "-n",
                "cache",
            ])
            .arg("--cgroup")
            .arg(cg.path())
            .args(extra)
            .output()
            .unwrap()
    };

    // A route the machine already has inside a cluster range: `up` refuses
    // and names it.
    run(Command::new("ip").args(["-n", &dev, "route", "add", "10.244.2.0/24", "dev", "eth0"]));
    let refused = up(&[]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("overlaps route 10.244.2.0/24") && err.contains("--never-proxy"),
        "{err}"
    );
    run(Command::new("ip").args(["-n", &dev, "route", "del", "10.244.2.0/24"]));

    let out = up(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let state: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        state["cluster"]["service_cidrs"],
        serde_json::json!(["10.96.0.0/12"]),
        "{state}"
    );
    assert_eq!(
        state["cluster"]["pod_cidrs"],
        serde_json::json!(["10.244.1.0/24", "10.244.2.0/24"]),
        "{state}"
    );
    assert_eq!(state["cluster"]["dns"], "10.96.0.10");
    // The namespaces named, never every namespace of the cluster.
    assert_eq!(
        state["cluster"]["namespaces"],
        serde_json::json!(["default", "cache"]),
        "{state}"
    );
    // The agent was found and asked who it is, through a port-forward via
    // the API endpoint (the tunnel's path).
    assert_eq!(state["agent"]["healthy"], true, "{state}");
    assert!(
        state["agent"]["pod"]
            .as_str()
            .unwrap()
            .starts_with("tpbpf-agent-"),
        "{state}"
    );

    // A second `up` of the same bridge is refused while it runs.
    assert!(!up(&[]).status.success());

    let r = in_cgroup_and_netns(
        cg.path(),
        &dev,
        &resolv,
        "curl -sS -m 5 http://web.default/ && redis-cli -h redis.cache ping",
    );
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(
        r.status.success() && text.contains("served by nginx") && text.contains("PONG"),
        "{text}{}",
        String::from_utf8_lossy(&r.stderr)
    );

    // The session through the tunnel: connected, with an RTT and the bytes
    // the clients moved (the live state is written twice a second).
    let mut st = Value::Null;
    wait_for_every(Duration::from_secs(10), Duration::from_millis(200), || {
        let out = Command::new(tpbpf_bin())
            .args(["status", "-o", "json", "--instance", &instance.0])
            .output()
            .unwrap();
        assert!(out.status.success());
        st = serde_json::from_slice(&out.stdout).unwrap();
        st["live"]["tunnel"]["bytes_received"].as_u64().unwrap_or(0) > 0
    });
    assert_eq!(st["up"], true);
    let t = &st["live"]["tunnel"];
    assert_eq!(t["connected"], true, "{st}");
    assert!(t["rtt_ms"].as_f64().is_some(), "{st}");
    assert!(t["bytes_received"].as_u64().unwrap_or(0) > 0, "{st}");
    // The session's id, as the agent's log names it.
    let id = t["session"].as_str().unwrap_or_default();
    assert_eq!(id.len(), 16, "{st}");
    let logs: String = ["node1", "node2"]
        .iter()
        .filter_map(|n| {
            std::fs::read_to_string(format!("/run/tpbpf-lab/{}/agent-{n}.log", lab.name)).ok()
        })
        .collect();
    assert!(
        logs.lines()
            .any(|l| l.contains("tunnel session open") && l.contains(id)),
        "no agent logged session {id}"
    );

    // tpbpfd killed: status says so; nothing stays attached.
    let pid = st["pid"].as_i64().unwrap() as libc::pid_t;
    // SAFETY: the pid of the tpbpfd this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert!(wait_for(Duration::from_secs(2), || !process_running(
        pid as u64
    )));
    let st = Command::new(tpbpf_bin())
        .args(["status", "--instance", &instance.0])
        .output()
        .unwrap();
    assert_eq!(st.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&st.stdout).contains("NOT running"));
    assert!(
        wait_for(Duration::from_secs(1), || cgroup_prog_ids(cg.path())
            .is_empty()),
        "programs still attached"
    );

    // down clears the state; up works again; down stops it.
    run(Command::new(tpbpf_bin()).args(["down", "--instance", &instance.0]));
    let out = up(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    run(Command::new(tpbpf_bin()).args(["down", "--instance", &instance.0]));
    assert!(
        cgroup_prog_ids(cg.path()).is_empty(),
        "programs attached after down"
    );
    assert!(
        !Path::new("/run/tpbpf").join(&instance.0).exists(),
        "state left after down"
    );
    let _ = std::fs::remove_file(&resolv);
}

#[test]
fn run_discovers_the_cluster_from_the_kubeconfig_and_leaves_nothing() {
    if !require_root() {
        return;
    }
    let Some(lab) = LabGuard::up("tr") else {
        return;
    };
    let (kubeconfig, dev) = (lab.kubeconfig(), lab.dev_netns());
    let parent = TestCgroup::new();
    let resolv = std::env::temp_dir().join(format!("{}.resolv.conf", lab.name));
    std::fs::write(&resolv, "nameserver 127.0.0.53\n").unwrap();
    let script = format!(
        "mount --bind {} /etc/resolv.conf && curl -sS -m 5 http://web.default/ && redis-cli -h redis.cache ping",
        resolv.display()
    );
    let out = Command::new(tpbpf_bin())
        .args([
            "--netns",
            &dev,
            "run",
            "--as-root",
            "-o",
            "json",
            "--kubeconfig",
            &kubeconfig,
        ])
        .args(["--namespace", "default", "--namespace", "cache"])
        // The direct transport: TLS straight to the agent's node address.
        .args(["--transport", "direct", "--cgroup-parent"])
        .arg(parent.path())
        .args(["--", "unshare", "-m", "sh", "-c", &script])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ready: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert!(
        ready["upstream"].as_str().unwrap_or("") == "agent via direct TLS",
        "not through the tunnel: {ready}"
    );
    // The kernel does the tunnel's TLS where it can; elsewhere tpbpf says
    // it does not, and why.
    let tls = ready["tls"].as_str().unwrap_or_default();
    match tpbpf_sys::kernel_tls_probe() {
        Ok(()) => assert_eq!(tls, "kernel", "{ready}"),
        Err(e) => {
            println!("kernel TLS unavailable ({e}): the tunnel says {tls:?}");
            assert!(
                tls.starts_with("rustls (setting TCP_ULP tls failed"),
                "{ready}"
            );
        }
    }
    assert_eq!(
        ready["cidrs"],
        serde_json::json!(["10.96.0.0/12", "10.244.1.0/24", "10.244.2.0/24"]),
        "{ready}"
    );
    assert!(
        text.contains("served by nginx") && text.contains("PONG"),
        "{text}"
    );
    // Nothing attached before or after, no cgroup left.
    let (progs, live) = (
        ready["program_ids"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_u64)
            .collect::<Vec<_>>(),
        kernel_prog_ids(),
    );
    assert!(
        wait_for(Duration::from_secs(2), || progs
            .iter()
            .all(|p| !kernel_prog_ids().contains(p))),
        "programs left: {progs:?} of {live:?}"
    );
    let children = std::fs::read_dir(parent.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().unwrap().is_dir())
        .count();
    assert_eq!(children, 0, "cgroup left behind");
    let _ = std::fs::remove_file(&resolv);
}

/// When the API server's address is inside a bridged range (a runner in
/// the cluster reaching `kubernetes.default`), tpbpfd's own connections to
/// it are not redirected to itself: after its port-forward is cut, the
/// tunnel comes back through a new connection to the API server.
#[test]
fn tpbpfds_own_api_server_connections_are_not_redirected() {
    if !require_root() {
        return;
    }
    let Some(lab) = LabGuard::up("ta") else {
        return;
    };
    let (kubeconfig, dev) = (lab.kubeconfig(), lab.dev_netns());
    // tpbpfd inside the cgroup it bridges (as with a machine-wide `up`).
    let cg = TestCgroup::new();
    let cgroup = cg.path().display().to_string();
    let mut daemon = Command::new("sh");
    daemon.arg("-c").arg(format!(
        "echo $$ > {cgroup}/cgroup.procs && exec {} --netns {dev} daemon -o json --kubeconfig {kubeconfig} \
         --cidr 10.96.0.0/12 --cidr 172.31.0.0/24 --no-dns --cgroup {cgroup}",
        tpbpf_bin().display()
    ));
    let mut daemon = Bg::spawn(&mut daemon);
    daemon
        .wait_event(Duration::from_secs(30), |e| e["event"] == "ready")
        .expect("tpbpfd ready");
    // The API server (172.31.0.1:6443) is bridged like a service; killing
    // tpbpfd's connections to it (its port-forward) forces a new one, which
    // must reach the API server itself (an established connection to it,
    // waited for), not tpbpfd's own bridge.
    let script =
        "curl -sS -m 5 http://10.96.0.20/ && ss -K dst 172.31.0.1 dport = 6443 >/dev/null || exit 1; \
         n=0; until ss -Htn state established dst 172.31.0.1 dport = 6443 | grep -q .; do \
           n=$((n+1)); [ $n -lt 150 ] || { echo \"no new connection to the API server\" >&2; exit 1; }; \
           sleep 0.1; \
         done; curl -sS -m 15 http://10.96.0.20/";
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "echo $$ > {cgroup}/cgroup.procs && exec ip netns exec {dev} sh -c '{script}'"
        ))
        .output()
        .unwrap();
    drop(daemon);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.matches("served by nginx").count(), 2, "{text}");
}

#[test]
fn up_and_run_without_an_agent_say_to_install_it_and_install_uninstall_work() {
    if !require_root() {
        return;
    }
    // A lab starts as a cluster does: without tpbpf.
    let Some(lab) = LabGuard::up_without_agent("tn") else {
        return;
    };
    let (dev, kubeconfig) = (lab.dev_netns(), lab.kubeconfig());
    let cg = TestCgroup::new();
    let instance = Instance(unique_name("tn"));
    let up = || {
        Command::new(tpbpf_bin())
            .args(["--netns", &dev, "up", "--kubeconfig", &kubeconfig])
            .args(["--instance", &instance.0, "--cgroup"])
            .arg(cg.path())
            .output()
            .unwrap()
    };
    let run_true = || {
        Command::new(tpbpf_bin())
            .args([
                "--netns",
                &dev,
                "run",
                "--as-root",
                "--kubeconfig",
                &kubeconfig,
            ])
            .arg("--cgroup-parent")
            .arg(cg.path())
            .args(["--", "true"])
            .output()
            .unwrap()
    };
    let no_agent = |what: &str, out: std::process::Output| {
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(4), "{what}: {err}");
        assert!(
            err.contains("no tpbpf agent in this cluster: run `tpbpf install`"),
            "{what}: {err}"
        );
    };
    no_agent("up", up());
    let state = std::path::Path::new("/run/tpbpf").join(&instance.0);
    assert!(
        !state.exists(),
        "a bridge that did not come up left {}",
        state.display()
    );
    no_agent("run", run_true());

    // Installed: an agent per node, and the bridge works.
    lab.install();
    let out = run_true();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Uninstalled: the agents go, and the cluster is as before.
    let out = run(Command::new(tpbpf_bin()).args([
        "--netns",
        &dev,
        "uninstall",
        "--kubeconfig",
        &kubeconfig,
    ]));
    assert!(out.contains("uninstalled"), "{out}");
    no_agent("up after uninstall", up());
}

/// Nodes without podCIDRs (Cilium's cluster-pool, EKS's VPC CNI): the pod
/// ranges come from the nodes' routes as the agents see them, not a /16
/// guessed around every pod; `--cidr` and `--cluster-dns` replace what
/// discovery finds.
#[test]
fn without_node_pod_cidrs_the_ranges_come_from_the_agents_and_overrides_win() {
    if !require_root() {
        return;
    }
    let Some(lab) = LabGuard::up("tp") else {
        return;
    };
    let set = Command::new(tpbpf_bin())
        .args(["lab", "--name", &lab.name, "up", "--no-node-pod-cidrs"])
        .output()
        .unwrap();
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    let (kubeconfig, dev) = (lab.kubeconfig(), lab.dev_netns());
    let cg = TestCgroup::new();
    let up = |instance: &Instance, extra: &[&str]| {
        let out = Command::new(tpbpf_bin())
            .args([
                "--netns",
                &dev,
                "up",
                "-o",
                "json",
                "--kubeconfig",
                &kubeconfig,
            ])
            .args(["--instance", &instance.0])
            .arg("--cgroup")
            .arg(cg.path())
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        let down = Command::new(tpbpf_bin())
            .args(["down", "--instance", &instance.0])
            .output()
            .unwrap();
        assert!(down.status.success());
        v
    };
    let v = up(&Instance(unique_name("pc")), &[]);
    let pods = sorted_strings(&v["cluster"]["pod_cidrs"]);
    assert_eq!(pods, ["10.244.1.0/24", "10.244.2.0/24"], "{v}");
    assert!(
        v["cluster"]["pod_ranges_from"]
            .as_str()
            .unwrap()
            .contains("routes"),
        "{v}"
    );
    assert_eq!(v["cluster"]["service_cidrs"][0], "10.96.0.0/12", "{v}");
    assert_eq!(v["cluster"]["dns"], "10.96.0.10", "{v}");

    // What the user gives replaces what discovery finds.
    let v = up(
        &Instance(unique_name("po")),
        &["--cidr", "10.96.0.0/16", "--cluster-dns", "10.96.0.99"],
    );
    assert_eq!(
        v["cluster"]["service_cidrs"],
        serde_json::json!(["10.96.0.0/16"]),
        "{v}"
    );
    assert_eq!(v["cluster"]["pod_cidrs"], serde_json::json!([]), "{v}");
    assert_eq!(v["cluster"]["dns"], "10.96.0.99", "{v}");
}

/// A plain `tpbpf up` (no `-n`) resolves `svc.ns` for every namespace of
/// the cluster the user may list, as inside a pod: `redis.cache` and
/// `postgres.db` work with real clients, bare names resolve in the
/// context's namespace. A namespace named like a top-level domain (`test`)
/// does not take that domain's names: `local.test` still resolves through
/// the application's own resolver. `--mapped-namespaces` narrows the set.
#[test]
fn a_plain_up_resolves_names_in_every_namespace_and_leaves_local_test_to_the_apps_resolver() {
    if !require_root() {
        return;
    }
    let Some(lab) = LabGuard::up("tt") else {
        return;
    };
    let (kubeconfig, dev) = (lab.kubeconfig(), lab.dev_netns());
    // An admin creates namespace `test` (JSON, as the lab API takes it).
    let created = lab
        .api_curl()
        .args(["-f", "-X", "POST", "-H", "Content-Type: application/json"])
        .arg(lab.api_url("/api/v1/namespaces"))
        .arg("-d")
        .arg(r#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"test"}}"#)
        .output()
        .unwrap();
    assert!(
        created.status.success(),
        "{}{}",
        String::from_utf8_lossy(&created.stdout),
        String::from_utf8_lossy(&created.stderr)
    );
    // The developer machine's own resolver, which knows local.test.
    let _resolver = Bg::spawn(Command::new("ip").args([
        "netns",
        "exec",
        &dev,
        "dnsmasq",
        "--keep-in-foreground",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--listen-address=127.0.0.53",
        "--address=/local.test/192.0.2.7",
        "--pid-file=",
    ]));
    // Ready when dnsmasq has bound its port, however slow the machine.
    assert!(
        wait_for(Duration::from_secs(20), || {
            run(Command::new("ip").args(["netns", "exec", &dev, "ss", "-Hlun"]))
                .contains("127.0.0.53:53")
        }),
        "dnsmasq did not bind 127.0.0.53:53"
    );
    let resolv = TempDir::new("tpbpf-resolv");
    let resolv = resolv.0.join("resolv.conf");
    std::fs::write(&resolv, "nameserver 127.0.0.53\n").unwrap();
    let up = |cg: &TestCgroup, instance: &Instance, extra: &[&str]| {
        let out = Command::new(tpbpf_bin())
            .args(["--netns", &dev, "up", "--kubeconfig", &kubeconfig])
            .args(["--instance", &instance.0])
            .args(extra)
            .arg("--cgroup")
            .arg(cg.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let cg = TestCgroup::new();
    let instance = Instance(unique_name("tt"));
    up(&cg, &instance, &[]);
    // The namespaces come from a watch that starts with the bridge: the
    // first query may come before its first report.
    let mut text = String::new();
    let resolved = wait_for_every(Duration::from_secs(15), Duration::from_millis(300), || {
        let got = in_cgroup_and_netns(
            cg.path(),
            &dev,
            &resolv,
            "redis-cli -h redis.cache ping; psql -h postgres.db -U lab -d lab -Atc \"select 41 + 1\"; \
             getent hosts local.test; getent hosts web.default; getent hosts web",
        );
        text = format!(
            "{}{}",
            String::from_utf8_lossy(&got.stdout),
            String::from_utf8_lossy(&got.stderr)
        );
        text.contains("PONG") && text.lines().any(|l| l == "42")
    });
    assert!(
        resolved,
        "redis.cache and postgres.db after a plain up: {text}"
    );
    let has = |text: &str, ip: &str, name: &str| {
        text.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == [ip, name])
    };
    assert!(has(&text, "192.0.2.7", "local.test"), "{text}");
    assert!(has(&text, "10.96.0.20", "web.default"), "{text}");
    assert!(has(&text, "10.96.0.20", "web"), "{text}");
    drop(instance);

    // Narrowed to `default`: `redis.cache` is the app's resolver's again
    // (which does not know it), `web.default` still the cluster's.
    let cg = TestCgroup::new();
    let instance = Instance(unique_name("tm"));
    up(&cg, &instance, &["--mapped-namespaces", "default"]);
    let got = in_cgroup_and_netns(
        cg.path(),
        &dev,
        &resolv,
        "getent hosts redis.cache; echo rc=$?; getent hosts web.default",
    );
    let text = String::from_utf8_lossy(&got.stdout);
    assert!(text.contains("rc=2"), "redis.cache resolved: {text}");
    assert!(has(&text, "10.96.0.20", "web.default"), "{text}");
}
