//! The first real redirect: `connect4` + `sock_ops` + `getpeername4` attached
//! through bpf_links owned by `tpbpf debug redirect` to a fresh child
//! cgroup. Each test runs in its own network namespace (no route off the
//! machine) and its own cgroup subtree, and checks the kernel's own view
//! (bpftool) that nothing stays attached afterwards.
use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, ChildStdout, Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use tpbpf_vm_tests::*;
use wait_timeout::ChildExt;

/// `tpbpf debug redirect` running in the background; killed on drop.
struct Loader {
    child: Child,
    stdout: BufReader<ChildStdout>,
    ready: Value,
}

impl Loader {
    fn start(ns: &NetNs, parent: &TestCgroup) -> Self {
        let mut child = Command::new(tpbpf_bin())
            .args(["debug", "redirect", "-o", "json", "--cidr", "10.96.0.0/12"])
            .args(["--never-proxy", "10.96.99.0/24"])
            .arg("--netns")
            .arg(ns.name())
            .arg("--cgroup-parent")
            .arg(parent.path())
            .args(["--name", "bridged"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting tpbpf debug redirect");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let ready = read_event(&mut stdout);
        assert_eq!(ready["event"], "ready", "first event: {ready}");
        Self {
            child,
            stdout,
            ready,
        }
    }

    fn cgroup(&self) -> PathBuf {
        PathBuf::from(self.ready["cgroup"].as_str().unwrap())
    }

    fn ids(&self, key: &str) -> Vec<u64> {
        self.ready[key]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_u64)
            .collect()
    }

    fn next_event(&mut self) -> Value {
        read_event(&mut self.stdout)
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill has no memory preconditions; the pid is our child's.
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_event(stdout: &mut BufReader<ChildStdout>) -> Value {
    let mut line = String::new();
    stdout.read_line(&mut line).expect("reading tpbpf's events");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("event is not JSON ({e}): {line:?}"))
}

/// Runs the test client; returns one JSON value per connection.
fn client(ns: &NetNs, cgroup: Option<&std::path::Path>, addr: &str, count: usize) -> Vec<Value> {
    let mut cmd = Command::new(testclient_bin());
    cmd.arg("--netns").arg(ns.name());
    if let Some(dir) = cgroup {
        cmd.arg("--cgroup").arg(dir);
    }
    cmd.arg(addr).arg(count.to_string());
    let out = run(&mut cmd);
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn assert_redirected(results: &[Value], dst: &str) {
    for r in results {
        assert_eq!(r["ok"], true, "connection failed: {r}");
        assert_eq!(
            r["peer"], dst,
            "getpeername() must show the dialled address: {r}"
        );
        let response = r["response"].as_str().unwrap();
        assert!(
            response.contains(&format!("original destination {dst}")),
            "the listener must recover the original destination: {r}"
        );
    }
}

fn assert_unreachable(results: &[Value]) {
    for r in results {
        assert_eq!(r["ok"], false, "must not be redirected: {r}");
        assert_eq!(
            r["errno"],
            libc::ENETUNREACH,
            "must fail as without tpbpf: {r}"
        );
        assert!(
            r["elapsed_ms"].as_u64().unwrap() < 1000,
            "must fail at once: {r}"
        );
    }
}

fn assert_gone(loader_ready: &Value, cgroup: &std::path::Path) {
    let ids = |key: &str| -> Vec<u64> {
        loader_ready[key]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_u64)
            .collect()
    };
    let (progs, links) = (ids("program_ids"), ids("link_ids"));
    assert!(
        wait_for(Duration::from_secs(1), || {
            let live_links = kernel_link_ids();
            links.iter().all(|l| !live_links.contains(l))
        }),
        "links {links:?} still in the kernel after the loader exited"
    );
    assert!(
        wait_for(Duration::from_secs(2), || {
            let live = kernel_prog_ids();
            progs.iter().all(|p| !live.contains(p))
        }),
        "programs {progs:?} still loaded after the loader exited"
    );
    assert!(
        wait_for(Duration::from_secs(3), || !cgroup.exists()),
        "child cgroup {} left behind",
        cgroup.display()
    );
}

#[test]
fn connect4_redirect_recovers_original_destination_and_leaves_nothing() {
    if !require_root() {
        return;
    }
    let ns = NetNs::new();
    let parent = TestCgroup::new();
    let mut loader = Loader::start(&ns, &parent);
    let child_cgroup = loader.cgroup();
    assert!(child_cgroup.starts_with(parent.path()));

    // The kernel sees our three programs attached to the child cgroup, via links.
    let attached = cgroup_prog_ids(&child_cgroup);
    let progs = loader.ids("program_ids");
    assert_eq!(
        progs.len(),
        10,
        "connect, sendmsg, recvmsg, getpeername (v4 and v6), sock_ops and sock_release"
    );
    for p in &progs {
        assert!(
            attached.contains(p),
            "program {p} not attached to {}: {attached:?}",
            child_cgroup.display()
        );
    }
    let live_links = kernel_link_ids();
    let links = loader.ids("link_ids");
    assert_eq!(
        links.len(),
        10,
        "one bpf_link per program: {}",
        loader.ready
    );
    assert!(links.iter().all(|l| live_links.contains(l)));

    // A process in the cgroup reaches the listener; it sees the address it dialled.
    let results = client(&ns, Some(&child_cgroup), "10.96.0.10:80", 1);
    assert_redirected(&results, "10.96.0.10:80");
    let event = loader.next_event();
    assert_eq!(event["event"], "accepted");
    assert_eq!(event["original_destination"], "10.96.0.10:80");

    // Many clients at once: each gets its own original destination.
    let results = client(&ns, Some(&child_cgroup), "10.100.7.9:6379", 32);
    assert_eq!(results.len(), 32);
    assert_redirected(&results, "10.100.7.9:6379");

    // Outside the cgroup, and inside a --never-proxy range: untouched.
    assert_unreachable(&client(&ns, None, "10.96.0.10:80", 1));
    assert_unreachable(&client(&ns, Some(&child_cgroup), "10.96.99.5:80", 1));
    // Outside every bridged range: untouched.
    assert_unreachable(&client(&ns, Some(&child_cgroup), "192.0.2.1:80", 1));

    // Normal exit (SIGTERM): everything detached, the cgroup removed.
    let ready = loader.ready.clone();
    loader.signal(libc::SIGTERM);
    let status = loader
        .child
        .wait_timeout(Duration::from_secs(5))
        .unwrap()
        .expect("loader did not exit on SIGTERM");
    assert!(status.success(), "loader exit status {status}");
    assert_gone(&ready, &child_cgroup);

    let (ns_path, parent_path) = (ns.path(), parent.path().to_path_buf());
    drop(loader);
    drop(ns);
    drop(parent);
    assert!(!ns_path.exists(), "network namespace left behind");
    assert!(!parent_path.exists(), "test cgroup left behind");
}

#[test]
fn sigkill_of_the_loader_detaches_everything_and_removes_its_cgroup() {
    if !require_root() {
        return;
    }
    let ns = NetNs::new();
    let parent = TestCgroup::new();
    let mut loader = Loader::start(&ns, &parent);
    let child_cgroup = loader.cgroup();
    assert_redirected(
        &client(&ns, Some(&child_cgroup), "10.96.0.10:80", 1),
        "10.96.0.10:80",
    );

    // A long-running process in the bridged cgroup: it must survive the
    // loader's death, moved out of the cgroup, no longer bridged.
    let mut sleeper = Command::new("sleep").arg("30").spawn().unwrap();
    std::fs::write(child_cgroup.join("cgroup.procs"), sleeper.id().to_string()).unwrap();

    let ready = loader.ready.clone();
    loader.signal(libc::SIGKILL);
    let status = loader
        .child
        .wait_timeout(Duration::from_secs(5))
        .unwrap()
        .expect("loader did not die");
    assert!(!status.success());
    assert_gone(&ready, &child_cgroup);

    assert!(
        sleeper.try_wait().unwrap().is_none(),
        "a process of the bridged cgroup died with the loader"
    );
    let procs = std::fs::read_to_string(parent.path().join("cgroup.procs")).unwrap();
    assert!(
        procs.lines().any(|p| p == sleeper.id().to_string()),
        "the process was not moved to the parent cgroup"
    );
    let _ = sleeper.kill();
    let _ = sleeper.wait();

    // Nothing redirects any more: a connect from the parent cgroup fails at once.
    assert_unreachable(&client(&ns, Some(parent.path()), "10.96.0.10:80", 1));

    let (ns_path, parent_path) = (ns.path(), parent.path().to_path_buf());
    drop(loader);
    drop(ns);
    drop(parent);
    assert!(!ns_path.exists(), "network namespace left behind");
    assert!(!parent_path.exists(), "test cgroup left behind");
}

/// A process of the bridged cgroup that enters another network namespace
/// (a container, a kind node, `ip netns exec`) is left alone there: its
/// TCP connects and UDP datagrams to a cluster range reach that namespace's
/// own servers, exactly as without tpbpf, while the bridged namespace's are
/// redirected.
#[test]
fn only_the_bridged_network_namespace_is_redirected() {
    if !require_root() {
        return;
    }
    let (bridged, other) = (NetNs::new(), NetNs::new());
    let parent = TestCgroup::new();
    let loader = Loader::start(&bridged, &parent);
    let cg = loader.cgroup();
    // The other namespace has its own server on an address inside the
    // bridged range: TCP on :80 and a UDP echo on :53 (DNS's port).
    run(Command::new("ip").args([
        "-n",
        other.name(),
        "addr",
        "add",
        "10.96.5.5/32",
        "dev",
        "lo",
    ]));
    let mut tcp = Command::new(testserver_bin());
    tcp.args(["--netns", other.name(), "http", "10.96.5.5:80"])
        .env("TAG", "local-server");
    let mut tcp = Bg::spawn(&mut tcp);
    tcp.wait_event(Duration::from_secs(5), |e| e["event"] == "ready")
        .expect("the other namespace's server");
    let _udp = Bg::spawn(Command::new("ip").args([
        "netns",
        "exec",
        other.name(),
        "socat",
        "UDP-RECVFROM:53,bind=10.96.5.5,fork",
        "SYSTEM:cat",
    ]));
    // Ready when socat has bound its port, however slow the machine.
    assert!(
        wait_for(Duration::from_secs(20), || {
            run(Command::new("ip").args(["netns", "exec", other.name(), "ss", "-Hlun"]))
                .contains("10.96.5.5:53")
        }),
        "socat did not bind 10.96.5.5:53"
    );

    // In the bridged namespace: redirected.
    assert_redirected(
        &client(&bridged, Some(&cg), "10.96.0.10:80", 1),
        "10.96.0.10:80",
    );
    // The same cgroup in the other namespace: that namespace's servers.
    for r in client(&other, Some(&cg), "10.96.5.5:80", 3) {
        assert_eq!(r["ok"], true, "{r}");
        assert!(
            r["response"].as_str().unwrap().contains("local-server"),
            "{r}"
        );
    }
    for mode in ["--udp", "--udp-connected"] {
        let out = run(Command::new(testclient_bin())
            .args(["--netns", other.name(), "--cgroup"])
            .arg(&cg)
            .args([mode, "10.96.5.5:53"]));
        let r: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
        assert_eq!(r["ok"], true, "{mode}: {r}");
        assert_eq!(r["response"], "ping", "{mode}: {r}");
    }
    // And where the other namespace has no route, it fails as without tpbpf.
    assert_unreachable(&client(&other, Some(&cg), "10.96.0.10:80", 1));
}
