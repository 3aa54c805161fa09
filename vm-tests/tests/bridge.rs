//! The client datapath end to end: `tpbpf run` and `tpbpf daemon` with a
//! local upstream (`--upstream netns:CLUSTER`), real clients (curl, getent,
//! dig) in a client namespace with no route off the machine, real servers
//! and dnsmasq in a cluster namespace.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;
use tpbpf_vm_tests::*;

/// `tpbpf --netns CLIENT run ... -- argv`; returns (ready event, command output, success).
fn tpbpf_run(
    client: &Client,
    cluster: &Cluster,
    parent: &TestCgroup,
    argv: &[String],
) -> (Value, String, bool) {
    let out = Command::new(tpbpf_bin())
        // The command mounts a resolv.conf (root), even under sudo.
        .args([
            "--netns",
            client.ns.name(),
            "run",
            "--as-root",
            "-o",
            "json",
        ])
        .args(["--upstream", &format!("netns:{}", cluster.ns.name())])
        .args([
            "--cidr",
            CLUSTER_CIDR4,
            "--cidr",
            CLUSTER_CIDR6,
            "--never-proxy",
            "10.96.99.0/24",
        ])
        .args([
            "--cluster-dns",
            WEB4,
            "--namespace",
            "default",
            "--namespace",
            "db",
            // A namespace named like a top-level domain: names under it
            // that the cluster does not know still resolve as before.
            "--namespace",
            "test",
        ])
        .arg("--cgroup-parent")
        .arg(parent.path())
        .arg("--")
        .args(argv)
        .output()
        .expect("running tpbpf run");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let (first, rest) = stdout.split_once('\n').unwrap_or((&stdout, ""));
    let ready: Value = serde_json::from_str(first).unwrap_or_else(|e| {
        panic!(
            "tpbpf run's first line is not the ready event ({e}):\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (ready, rest.to_string(), out.status.success())
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn no_child_cgroups(parent: &Path) -> bool {
    std::fs::read_dir(parent)
        .map(|d| {
            d.flatten()
                .all(|e| !e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        })
        .unwrap_or(true)
}

fn ids(ready: &Value, key: &str) -> Vec<u64> {
    ready[key]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

fn assert_programs_gone(ready: &Value, within: Duration) {
    let (progs, links) = (ids(ready, "program_ids"), ids(ready, "link_ids"));
    assert!(!progs.is_empty());
    assert!(
        wait_for(within, || {
            let (p, l) = (kernel_prog_ids(), kernel_link_ids());
            progs.iter().all(|x| !p.contains(x)) && links.iter().all(|x| !l.contains(x))
        }),
        "programs {progs:?} / links {links:?} still in the kernel"
    );
}

#[test]
fn run_bridges_curl_to_cluster_ipv4_and_ipv6() {
    if !require_root() {
        return;
    }
    let mut cluster = Cluster::new("cluster-a");
    let client = Client::new();
    let parent = TestCgroup::new();
    let script = format!(
        "curl -sS -m 5 http://{WEB4}/v4 && curl -sS -m 5 'http://[{WEB6}]/v6' && \
         {tc} {WEB4}:80 && {tc} '[{WEB6}]:80' && {tc} '[::ffff:{WEB4}]:80'",
        tc = testclient_bin().display()
    );
    let (ready, out, ok) = tpbpf_run(
        &client,
        &cluster,
        &parent,
        &client.wrap(&["sh", "-c", &script]),
    );
    assert!(ok, "tpbpf run failed:\n{out}");
    assert!(
        out.contains(&format!("served-by {WEB4}:80 cluster-a")),
        "{out}"
    );
    assert!(
        out.contains(&format!("served-by [{WEB6}]:80 cluster-a")),
        "{out}"
    );
    // getpeername() in the client shows the cluster addresses.
    let conns = json_lines(&out);
    assert_eq!(conns.len(), 3, "{out}");
    assert_eq!(conns[0]["peer"], format!("{WEB4}:80"));
    assert_eq!(conns[1]["peer"], format!("[{WEB6}]:80"));
    // An IPv4-mapped destination on a dual-stack socket is bridged as IPv4.
    assert_eq!(conns[2]["peer"], format!("[::ffff:{WEB4}]:80"));
    assert!(
        conns[2]["response"].as_str().unwrap().contains("served-by"),
        "{out}"
    );
    // The server saw the requests.
    let seen = cluster.http.wait_event(Duration::from_secs(2), |e| {
        e["request"] == "GET /v6 HTTP/1.1"
    });
    assert!(
        seen.is_some(),
        "server did not see the IPv6 request: {:?}",
        cluster.http.events()
    );
    assert!(cluster
        .http
        .events()
        .iter()
        .any(|e| e["request"] == "GET /v4 HTTP/1.1"));
    // Nothing left.
    assert_programs_gone(&ready, Duration::from_secs(2));
    assert!(
        no_child_cgroups(parent.path()),
        "tpbpf run left a cgroup behind"
    );
}

#[test]
fn run_resolves_cluster_names_and_forwards_the_rest() {
    if !require_root() {
        return;
    }
    let cluster = Cluster::new("dns");
    let client = Client::new();
    let parent = TestCgroup::new();
    let script = "echo getent; getent hosts web.default; getent ahostsv4 web.default.svc.cluster.local; \
                  getent hosts postgres.db; getent hosts host-only.test; \
                  echo dig; dig +short +time=2 web.default; dig +short +time=2 +tcp web.default @8.8.8.8; \
                  dig +short +time=2 AAAA web.default; dig +short +time=2 host-only.test";
    let (_ready, out, ok) = tpbpf_run(
        &client,
        &cluster,
        &parent,
        &client.wrap(&["sh", "-c", script]),
    );
    assert!(ok, "{out}");
    let (getent, dig) = out.split_once("dig\n").expect("both parts ran");
    // glibc's resolver: cluster names by short and full name, another namespace, and a
    // name only the machine's own resolver knows.
    let has = |words: &[&str]| {
        getent
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == words)
    };
    assert!(
        has(&[WEB6, "web.default"]) || has(&[WEB4, "web.default"]),
        "{getent}"
    );
    assert!(
        has(&[WEB4, "STREAM", "web.default.svc.cluster.local"]),
        "{getent}"
    );
    assert!(has(&[BULK4, "postgres.db"]), "{getent}");
    assert!(has(&["192.0.2.7", "host-only.test"]), "{getent}");
    // dig over UDP and TCP, even to a resolver the client cannot reach (8.8.8.8): the query
    // never leaves the machine, the cluster answers.
    let lines: Vec<&str> = dig.lines().collect();
    assert_eq!(lines, vec![WEB4, WEB4, WEB6, "192.0.2.7"], "{dig}");
}

#[test]
fn run_relays_udp_connected_and_unconnected_with_original_source() {
    if !require_root() {
        return;
    }
    let mut cluster = Cluster::new("udp");
    let client = Client::new();
    let parent = TestCgroup::new();
    let tc = testclient_bin().display().to_string();
    let script = format!(
        "{tc} --udp {WEB4}:7 && {tc} --udp-connected {WEB4}:7 && {tc} --udp '[{WEB6}]:7' && {tc} --udp-connected '[{WEB6}]:7' && {tc} --udp '[::ffff:{WEB4}]:7'"
    );
    let (_ready, out, ok) = tpbpf_run(
        &client,
        &cluster,
        &parent,
        &["sh".into(), "-c".into(), script],
    );
    assert!(ok, "{out}");
    let r = json_lines(&out);
    assert_eq!(r.len(), 5, "{out}");
    for x in &r {
        assert_eq!(x["ok"], true, "{x}");
        assert_eq!(x["response"], "echo:ping", "{x}");
    }
    assert_eq!(
        r[0]["from"],
        format!("{WEB4}:7"),
        "recvfrom must show the cluster address"
    );
    assert_eq!(r[1]["peer"], format!("{WEB4}:7"));
    assert_eq!(r[2]["from"], format!("[{WEB6}]:7"));
    assert_eq!(r[3]["peer"], format!("[{WEB6}]:7"));
    assert_eq!(r[4]["from"], format!("[::ffff:{WEB4}]:7"));
    assert!(cluster
        .udp
        .wait_event(Duration::from_secs(2), |e| e["event"] == "datagram")
        .is_some());
}

/// `tpbpf daemon --cgroup SUBTREE` in the client namespace.
fn daemon(client: &Client, cluster: &Cluster, cgroup: &Path, inside: bool) -> (Bg, Value) {
    daemon_with(client, cluster, cgroup, inside, &[])
}

fn daemon_with(
    client: &Client,
    cluster: &Cluster,
    cgroup: &Path,
    inside: bool,
    extra: &[&str],
) -> (Bg, Value) {
    let mut cmd = Command::new(tpbpf_bin());
    cmd.args(["--netns", client.ns.name(), "daemon", "-o", "json"])
        .args(extra)
        .args(["--upstream", &format!("netns:{}", cluster.ns.name())])
        .args([
            "--cidr",
            CLUSTER_CIDR4,
            "--never-proxy",
            "10.96.99.0/24",
            "--cluster-dns",
            WEB4,
        ])
        .arg("--cgroup")
        .arg(cgroup);
    if inside {
        // tpbpfd inside the very cgroup it bridges: its own dials must not loop back.
        let procs =
            std::ffi::CString::new(cgroup.join("cgroup.procs").to_string_lossy().as_bytes())
                .unwrap();
        // SAFETY: only async-signal-safe calls on memory prepared before fork.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(fd);
                Ok(())
            });
        }
    }
    let mut bg = Bg::spawn(&mut cmd);
    let ready = bg
        .wait_event(Duration::from_secs(10), |e| e["event"] == "ready")
        .expect("tpbpf daemon did not get ready");
    (bg, ready)
}

fn client_in(client: &Client, cgroup: Option<&Path>, flags: &[&str], addr: &str) -> Value {
    let mut cmd = Command::new(testclient_bin());
    cmd.args(["--netns", client.ns.name()]);
    if let Some(c) = cgroup {
        cmd.arg("--cgroup").arg(c);
    }
    cmd.args(flags).arg(addr);
    let out = run(&mut cmd);
    serde_json::from_str(out.lines().next().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[test]
fn daemon_bridges_a_subtree_and_leaves_the_rest_untouched() {
    if !require_root() {
        return;
    }
    let cluster = Cluster::new("subtree");
    let client = Client::new();
    let root = TestCgroup::new();
    let bridged = root.path().join("bridged");
    let outside = root.path().join("outside");
    std::fs::create_dir(&bridged).unwrap();
    std::fs::create_dir(&outside).unwrap();
    let (mut d, ready) = daemon(&client, &cluster, &bridged, true);

    let ok = client_in(&client, Some(&bridged), &[], &format!("{WEB4}:80"));
    assert_eq!(ok["ok"], true, "bridged client: {ok}");
    assert_eq!(ok["peer"], format!("{WEB4}:80"));
    assert!(
        ok["response"].as_str().unwrap().contains("served-by"),
        "{ok}"
    );

    // Outside the bridged subtree, and to a --never-proxy range: exactly as
    // without tpbpf (no route: ENETUNREACH at once).
    for (cg, addr) in [
        (Some(outside.as_path()), format!("{WEB4}:80")),
        (None, format!("{WEB4}:80")),
        (Some(bridged.as_path()), "10.96.99.5:80".to_string()),
    ] {
        let r = client_in(&client, cg, &[], &addr);
        assert_eq!(r["ok"], false, "{cg:?} {addr}: {r}");
        assert_eq!(r["errno"], libc::ENETUNREACH, "{r}");
        assert!(r["elapsed_ms"].as_u64().unwrap() < 1000);
    }
    let r = client_in(&client, Some(&outside), &["--udp"], &format!("{WEB4}:7"));
    assert_eq!(r["ok"], false, "unbridged UDP must fail: {r}");

    d.kill(libc::SIGTERM);
    assert!(d
        .wait_exit(Duration::from_secs(5))
        .is_some_and(|s| s.success()));
    assert_programs_gone(&ready, Duration::from_secs(2));
    assert!(
        cgroup_prog_ids(&bridged).is_empty(),
        "programs still attached to {}",
        bridged.display()
    );
}

#[test]
fn two_runs_with_the_same_cidr_reach_their_own_upstream() {
    if !require_root() {
        return;
    }
    let (a, b) = (Cluster::new("cluster-a"), Cluster::new("cluster-b"));
    let client = Client::new();
    let parent = TestCgroup::new();
    // Each run fetches repeatedly for a while, so the two overlap in time.
    let script = format!(
        "for i in 1 2 3 4 5 6 7 8 9 10; do curl -sS -m 5 http://{WEB4}/ || exit 1; sleep 0.1; done"
    );
    let argv = s(&["sh", "-c", &script]);
    let started = Instant::now();
    let (ra, rb) = std::thread::scope(|sc| {
        let ta = sc.spawn(|| tpbpf_run(&client, &a, &parent, &argv));
        let tb = sc.spawn(|| tpbpf_run(&client, &b, &parent, &argv));
        (ta.join().unwrap(), tb.join().unwrap())
    });
    assert!(started.elapsed() < Duration::from_secs(30));
    for ((_, out, ok), mine, theirs) in [
        (&ra, "cluster-a", "cluster-b"),
        (&rb, "cluster-b", "cluster-a"),
    ] {
        assert!(ok, "{out}");
        assert_eq!(
            out.matches(&format!("served-by {WEB4}:80 {mine}")).count(),
            10,
            "{out}"
        );
        assert!(
            !out.contains(theirs),
            "a run saw the other run's cluster:\n{out}"
        );
    }
}

#[test]
fn sigkill_of_tpbpfd_during_a_transfer_detaches_at_once_and_it_starts_again() {
    if !require_root() {
        return;
    }
    let mut cluster = Cluster::new("kill");
    let client = Client::new();
    let root = TestCgroup::new();
    let bridged: PathBuf = root.path().join("bridged");
    std::fs::create_dir(&bridged).unwrap();
    let (mut d, ready) = daemon(&client, &cluster, &bridged, false);

    // A transfer in progress (the bulk server sends slowly).
    let mut curl = Command::new(testclient_bin());
    curl.args(["--netns", client.ns.name(), "--cgroup"])
        .arg(&bridged)
        .arg(format!("{BULK4}:80"));
    let transfer = Bg::spawn(&mut curl);
    // In progress once the bulk server has the request: it sends from then.
    cluster
        .bulk
        .wait_event(Duration::from_secs(10), |e| e["event"] == "request")
        .expect("the transfer never reached the bulk server");

    let killed_at = Instant::now();
    d.kill(libc::SIGKILL);
    assert!(d.wait_exit(Duration::from_secs(2)).is_some());
    assert_programs_gone(&ready, Duration::from_secs(1));
    assert!(
        killed_at.elapsed() < Duration::from_millis(1500),
        "detaching took {:?}",
        killed_at.elapsed()
    );
    assert!(
        cgroup_prog_ids(&bridged).is_empty(),
        "programs still attached to the bridged cgroup"
    );
    drop(transfer);

    // A new connect to a cluster address fails at once, as without tpbpf.
    let r = client_in(&client, Some(&bridged), &[], &format!("{WEB4}:80"));
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["errno"], libc::ENETUNREACH, "{r}");
    assert!(r["elapsed_ms"].as_u64().unwrap() < 1000, "{r}");

    // And tpbpfd works again right away.
    let (mut d2, _ready2) = daemon(&client, &cluster, &bridged, false);
    let ok = client_in(&client, Some(&bridged), &[], &format!("{WEB4}:80"));
    assert_eq!(ok["ok"], true, "{ok}");
    d2.kill(libc::SIGTERM);
    let _ = d2.wait_exit(Duration::from_secs(5));
    // tpbpf run too.
    let (_, out, ok) = tpbpf_run(
        &client,
        &cluster,
        &root,
        &s(&["curl", "-sS", "-m", "5", &format!("http://{WEB4}/")]),
    );
    assert!(ok && out.contains("served-by"), "{out}");
}

#[test]
fn tc_path_bridges_a_container_namespace_and_sigkill_leaves_nothing() {
    if !require_root() {
        return;
    }
    let cluster = Cluster::new("tc");
    let client = Client::new();
    let container = NetNs::new();
    // A veth pair between the "developer machine" and the "container".
    let n = unique_name("v").replace('-', "");
    let (host_if, ctr_if) = (
        format!("{}h", &n[..n.len().min(13)]),
        format!("{}c", &n[..n.len().min(13)]),
    );
    run(Command::new("ip").args([
        "link",
        "add",
        &host_if,
        "netns",
        client.ns.name(),
        "type",
        "veth",
        "peer",
        "name",
        &ctr_if,
        "netns",
        container.name(),
    ]));
    run(Command::new("ip").args([
        "-n",
        client.ns.name(),
        "addr",
        "add",
        "10.200.0.1/24",
        "dev",
        &host_if,
    ]));
    run(Command::new("ip").args(["-n", client.ns.name(), "link", "set", &host_if, "up"]));
    run(Command::new("ip").args([
        "-n",
        container.name(),
        "addr",
        "add",
        "10.200.0.2/24",
        "dev",
        &ctr_if,
    ]));
    run(Command::new("ip").args(["-n", container.name(), "link", "set", &ctr_if, "up"]));
    run(Command::new("ip").args([
        "-n",
        container.name(),
        "route",
        "add",
        "default",
        "via",
        "10.200.0.1",
    ]));

    let root = TestCgroup::new();
    let (mut d, ready) = daemon_with(
        &client,
        &cluster,
        root.path(),
        false,
        &["--attach-netns", container.name()],
    );
    assert_eq!(
        ready["attached_ifaces"],
        serde_json::json!([host_if]),
        "{ready}"
    );

    // curl in the container reaches the cluster server through tc + sk_assign.
    let out = run(Command::new("ip").args([
        "netns",
        "exec",
        container.name(),
        "curl",
        "-sS",
        "-m",
        "5",
        &format!("http://{WEB4}/from-container"),
    ]));
    assert!(out.contains(&format!("served-by {WEB4}:80 tc")), "{out}");
    let mut tc = Command::new(testclient_bin());
    tc.args(["--netns", container.name(), &format!("{WEB4}:80")]);
    let r: Value = serde_json::from_str(run(&mut tc).lines().next().unwrap()).unwrap();
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["peer"], format!("{WEB4}:80"), "{r}");
    let rules = run(Command::new("ip").args(["-n", client.ns.name(), "rule", "show"]));
    assert!(rules.contains("fwmark 0x74700000 lookup 7470"), "{rules}");

    // SIGKILL: the tcx link goes with the process; the helper removes the policy route.
    d.kill(libc::SIGKILL);
    assert!(d.wait_exit(Duration::from_secs(2)).is_some());
    assert_programs_gone(&ready, Duration::from_secs(1));
    assert!(
        wait_for(Duration::from_secs(2), || {
            !run(Command::new("ip").args(["-n", client.ns.name(), "rule", "show"]))
                .contains("lookup 7470")
        }),
        "policy route left behind after SIGKILL"
    );
    let routes =
        run(Command::new("ip").args(["-n", client.ns.name(), "route", "show", "table", "all"]));
    assert!(!routes.contains("table 7470"), "{routes}");
    // Before Linux 6.6 (no tcx) the filter went on a clsact qdisc that tpbpf
    // made: the helper removes both.
    assert!(
        wait_for(Duration::from_secs(2), || {
            !run(Command::new("tc").args([
                "-n",
                client.ns.name(),
                "qdisc",
                "show",
                "dev",
                &host_if,
            ]))
            .contains("clsact")
        }),
        "clsact qdisc left behind after SIGKILL: {}",
        run(Command::new("tc").args([
            "-n",
            client.ns.name(),
            "filter",
            "show",
            "dev",
            &host_if,
            "ingress"
        ]))
    );
    // The container's traffic is no longer bridged (nothing routes 10.96.0.0/12 here).
    let after = Command::new("ip")
        .args([
            "netns",
            "exec",
            container.name(),
            "curl",
            "-sS",
            "-m",
            "2",
            &format!("http://{WEB4}/"),
        ])
        .output()
        .unwrap();
    assert!(!after.status.success(), "still bridged after tpbpfd died");
}

#[test]
fn run_passes_the_exit_status_and_signals_through() {
    if !require_root() {
        return;
    }
    let cluster = Cluster::new("status");
    let client = Client::new();
    let parent = TestCgroup::new();
    let status = |script: &str| {
        Command::new(tpbpf_bin())
            .args([
                "--netns",
                client.ns.name(),
                "run",
                "--as-root",
                "--upstream",
                &format!("netns:{}", cluster.ns.name()),
            ])
            .args(["--cidr", CLUSTER_CIDR4, "--cgroup-parent"])
            .arg(parent.path())
            .args(["--", "sh", "-c", script])
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap()
    };
    assert_eq!(status("exit 7").code(), Some(7));
    assert_eq!(status("exit 0").code(), Some(0));
    // Killed by a signal: 128 + signal number, as a shell reports it.
    assert_eq!(status("kill -TERM $$").code(), Some(128 + libc::SIGTERM));

    // A signal sent to tpbpf run reaches the command.
    let mut child = Command::new(tpbpf_bin())
        .args([
            "--netns",
            client.ns.name(),
            "run",
            "--as-root",
            "--upstream",
            &format!("netns:{}", cluster.ns.name()),
        ])
        .args(["--cidr", CLUSTER_CIDR4, "--cgroup-parent"])
        .arg(parent.path())
        .args([
            "--",
            "sh",
            "-c",
            "trap 'exit 42' INT; echo armed; sleep 20 & wait",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Ready when the command has set its trap (it says so), however slow
    // the machine.
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    assert!(
        lines.any(|l| l.is_ok_and(|l| l == "armed")),
        "the command never started"
    );
    // SAFETY: kill has no memory preconditions; the pid is our child's.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(5);
    let code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code();
        }
        assert!(
            Instant::now() < deadline,
            "tpbpf run did not pass SIGINT on"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(code, Some(42));
    assert!(
        wait_for(Duration::from_secs(3), || no_child_cgroups(parent.path())),
        "cgroup left behind"
    );
}

/// The UDP slot counter wraps after 65,536 destinations: a flow still in
/// use keeps its slot, so its datagrams never reach another destination
/// (before, the slot went to the 65,537th destination and the early flow's
/// datagrams with it).
#[test]
fn after_70000_udp_destinations_an_early_flow_still_reaches_its_own() {
    if !require_root() {
        return;
    }
    let cluster = Cluster::new("wrap");
    let client = Client::new();
    let parent = TestCgroup::new();
    let tc = testclient_bin().display().to_string();
    let (_ready, out, ok) = tpbpf_run(
        &client,
        &cluster,
        &parent,
        &[tc, "--udp-wrap".into(), "70000".into(), format!("{WEB4}:7")],
    );
    assert!(ok, "{out}");
    let r = json_lines(&out)
        .into_iter()
        .find(|v| v.get("second").is_some())
        .unwrap_or_else(|| panic!("no report: {out}"));
    println!("{r}");
    assert_eq!(r["first"], "echo:early-1", "{r}");
    assert_eq!(
        r["second"], "echo:early-2",
        "the early flow lost its slot: {r}"
    );
    assert_eq!(r["peer"], format!("{WEB4}:7"), "{r}");
    // Every destination got a slot until none was idle, then was left
    // unbridged (it fails as without tpbpf): none took the early flow's.
    assert_eq!(
        r["sent"].as_u64().unwrap() + r["failed"].as_u64().unwrap(),
        70000,
        "{r}"
    );
}

/// A UDP slot answers only the socket it was made for: another socket
/// (any local user's) that sends straight to the slot's address is not
/// carried to the flow's destination.
#[test]
fn a_udp_slot_answers_only_the_socket_it_was_made_for() {
    if !require_root() {
        return;
    }
    let cluster = Cluster::new("spoof");
    let client = Client::new();
    let parent = TestCgroup::new();
    let tc = testclient_bin().display().to_string();
    let (_ready, out, ok) = tpbpf_run(
        &client,
        &cluster,
        &parent,
        &[tc, "--udp-spoof".into(), format!("{WEB4}:7")],
    );
    assert!(ok, "{out}");
    let r = json_lines(&out)
        .into_iter()
        .find(|v| v.get("intruder").is_some())
        .unwrap_or_else(|| panic!("no report: {out}"));
    assert_eq!(r["owner"], "echo:mine", "{r}");
    assert!(r["slot"].as_str().unwrap().starts_with("127.100."), "{r}");
    assert!(
        r["intruder"].as_str().unwrap().starts_with("no answer"),
        "another socket's datagram reached the flow's destination: {r}"
    );
}
