//! Benchmark: what tpbpf's hooks add to connect() + close(), measured in
//! one run against the same loop without tpbpf, on this machine's kernel.
//!
//! Cases (each a loop of N connect()+close() from a client process, the
//! median of several rounds):
//! - baseline: to a local listener, from a cgroup with nothing attached;
//! - hooks, not matching: the same, from the bridged cgroup (tpbpf's
//!   programs run and decide to leave the connection alone);
//! - redirected: to a cluster address from the bridged cgroup: connect4
//!   rewrites it to tpbpfd's listener, which accepts and dials the upstream;
//! - peer, socat relay: to a socat relay (fork per connection) in front of
//!   the same local listener, the classic userspace way to reach a service.
//!
//! Run: `sudo bash xtask/dev.sh bench` (or `cargo xtask bench`).
use std::{process::Command, time::Duration};

use tpbpf_vm_tests::*;

/// Connections per round and rounds: `TPBPF_BENCH_N`, `TPBPF_BENCH_ROUNDS`.
fn setting(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let n = setting("TPBPF_BENCH_N", 2000);
    let rounds = setting("TPBPF_BENCH_ROUNDS", 7) as usize;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("tpbpf-bench: loads eBPF programs and makes network namespaces: run it as root");
        std::process::exit(1);
    }
    let stop = stop_on_signals();
    let cluster = Cluster::new("bench");
    let client = Client::new();
    let root = TestCgroup::new();
    let (plain, bridged) = (root.path().join("plain"), root.path().join("bridged"));
    std::fs::create_dir(&plain).unwrap();
    std::fs::create_dir(&bridged).unwrap();

    // A local listener in the client namespace, and a socat relay in front of it.
    let mut local = Command::new(testserver_bin());
    local.args(["--netns", client.ns.name(), "sink", "127.0.0.1:18080"]);
    let mut local = Bg::spawn(&mut local);
    local
        .wait_event(Duration::from_secs(5), |e| e["event"] == "ready")
        .expect("local listener");
    let _socat = Bg::spawn(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                client.ns.name(),
                "socat",
                "TCP-LISTEN:18081,bind=127.0.0.1,fork,reuseaddr,backlog=4096",
                "TCP:127.0.0.1:18080",
            ])
            .stderr(std::process::Stdio::null()),
    );
    std::thread::sleep(Duration::from_millis(300));

    // The cluster side of the redirected case: a sink on the discard port.
    let mut sink = Command::new(testserver_bin());
    sink.args(["--netns", cluster.ns.name(), "sink", &format!("{WEB4}:9")]);
    let mut sink = Bg::spawn(&mut sink);
    sink.wait_event(Duration::from_secs(5), |e| e["event"] == "ready")
        .expect("cluster sink");

    let mut daemon = Command::new(tpbpf_bin());
    daemon
        .args([
            "--netns",
            client.ns.name(),
            "--log",
            "warn",
            "daemon",
            "-o",
            "json",
        ])
        .args([
            "--upstream",
            &format!("netns:{}", cluster.ns.name()),
            "--cidr",
            CLUSTER_CIDR4,
            "--no-dns",
        ])
        .arg("--cgroup")
        .arg(&bridged);
    let mut daemon = Bg::spawn(&mut daemon);
    daemon
        .wait_event(Duration::from_secs(10), |e| e["event"] == "ready")
        .expect("tpbpf daemon ready");

    let cases: [(&str, &std::path::Path, String); 4] = [
        ("baseline: no tpbpf", &plain, "127.0.0.1:18080".into()),
        (
            "hooks attached, not matching",
            &bridged,
            "127.0.0.1:18080".into(),
        ),
        ("redirected to tpbpfd", &bridged, format!("{WEB4}:9")),
        ("peer: socat relay", &plain, "127.0.0.1:18081".into()),
    ];
    let mut samples: Vec<Vec<u64>> = vec![Vec::new(); cases.len()];
    for _ in 0..rounds {
        if stop.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        for (i, (name, cg, addr)) in cases.iter().enumerate() {
            let t = std::time::Instant::now();
            let out = run(Command::new(testclient_bin())
                .args(["--netns", client.ns.name(), "--cgroup"])
                .arg(cg)
                .args(["--bench", &n.to_string(), addr]));
            let v: serde_json::Value = serde_json::from_str(out.trim()).expect("bench output");
            assert_eq!(v["failed"], 0, "{}: connections failed: {v}", cases[i].0);
            samples[i].push(v["ns_per_op"].as_u64().unwrap());
            eprintln!("  {name}: {} ns/op ({:?})", v["ns_per_op"], t.elapsed());
        }
    }
    let median = |v: &mut Vec<u64>| {
        v.sort_unstable();
        v[v.len() / 2]
    };
    let medians: Vec<u64> = samples.iter_mut().map(median).collect();
    println!(
        "connect()+close() cost, {n} per round, median of {rounds} rounds, kernel {}",
        kernel()
    );
    println!("{:<32} {:>10} {:>10}", "case", "µs/op", "vs base");
    for ((name, _, _), m) in cases.iter().zip(&medians) {
        println!(
            "{:<32} {:>10.1} {:>9.2}x",
            name,
            *m as f64 / 1000.0,
            *m as f64 / medians[0] as f64
        );
    }
    println!("reproduce: sudo bash xtask/dev.sh bench");
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}
