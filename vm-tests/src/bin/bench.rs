//! Benchmark: what tpbpf's hooks add to connect() + close(), measured in
//! one run against the same loop without tpbpf, on this machine's kernel.
//!
//! Cases (each a loop of N connect()+close() from a client process pinned
//! to one CPU; every round runs all cases, in a rotating order, so drift of
//! the machine hits them alike):
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

use serde_json::Value;
use tpbpf_vm_tests::*;

/// Connections per round and rounds: `TPBPF_BENCH_N`, `TPBPF_BENCH_ROUNDS`.
fn setting(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let n = setting("TPBPF_BENCH_N", 1000);
    let rounds = setting("TPBPF_BENCH_ROUNDS", 61) as usize;
    let cpu = setting("TPBPF_BENCH_CPU", 1);
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
    let ready = daemon
        .wait_event(Duration::from_secs(10), |e| e["event"] == "ready")
        .expect("tpbpf daemon ready");
    let prog_ids: Vec<u64> = ready["program_ids"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    // The programs' own run time (kernel.bpf_stats_enabled): what the hooks
    // cost, free of the noise of everything else a connect() does.
    let _stats = BpfStats::enable();

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
    // Per round and case: the hooks' run time per connect()+close(), ns.
    let mut hook_ns: Vec<Vec<f64>> = vec![Vec::new(); cases.len()];
    for round in 0..rounds {
        if stop.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        for k in 0..cases.len() {
            let i = (round + k) % cases.len();
            let (name, cg, addr) = &cases[i];
            let before = prog_run_ns(&prog_ids);
            let out = run(Command::new("taskset")
                .args(["-c", &cpu.to_string()])
                .arg(testclient_bin())
                .args(["--netns", client.ns.name(), "--cgroup"])
                .arg(cg)
                .args(["--bench", &n.to_string(), addr]));
            let v: serde_json::Value = serde_json::from_str(out.trim()).expect("bench output");
            assert_eq!(v["failed"], 0, "{name}: connections failed: {v}");
            samples[i].push(v["ns_per_op"].as_u64().unwrap());
            hook_ns[i].push((prog_run_ns(&prog_ids) - before) as f64 / n as f64);
        }
    }
    println!(
        "connect()+close() cost: {n} per round, {rounds} rounds (cases interleaved), client pinned to CPU {cpu}, kernel {}",
        kernel()
    );
    println!(
        "{:<30} {:>8} {:>8} {:>15}   {:<28}",
        "case", "min µs", "med µs", "IQR µs", "vs baseline, paired per round"
    );
    for (i, (name, _, _)) in cases.iter().enumerate() {
        let mut v = samples[i].clone();
        v.sort_unstable();
        let us = |x: u64| x as f64 / 1000.0;
        let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        // Each round's ratio to that same round's baseline.
        let mut ratios: Vec<f64> = samples[i]
            .iter()
            .zip(&samples[0])
            .map(|(c, b)| *c as f64 / *b as f64)
            .collect();
        ratios.sort_by(f64::total_cmp);
        let rq = |p: f64| ratios[((ratios.len() - 1) as f64 * p).round() as usize];
        let (lo, med, hi) = (rq(0.25), rq(0.5), rq(0.75));
        let verdict = if i == 0 {
            String::new()
        } else if lo > 1.0 || hi < 1.0 {
            format!(
                "{:+.1}% (IQR {:+.1}%..{:+.1}%)",
                (med - 1.0) * 100.0,
                (lo - 1.0) * 100.0,
                (hi - 1.0) * 100.0
            )
        } else {
            format!(
                "{:+.1}%, NOT resolved: IQR {:+.1}%..{:+.1}% spans 0",
                (med - 1.0) * 100.0,
                (lo - 1.0) * 100.0,
                (hi - 1.0) * 100.0
            )
        };
        println!(
            "{:<30} {:>8.2} {:>8.2} {:>7.2}..{:<7.2}   {verdict}",
            name,
            us(v[0]),
            us(q(0.5)),
            us(q(0.25)),
            us(q(0.75)),
        );
    }
    let base_min = *samples[0].iter().min().unwrap() as f64;
    println!();
    println!(
        "what tpbpf's programs themselves run per connect()+close() (kernel.bpf_stats_enabled), against the baseline's fastest round ({:.2} µs):",
        base_min / 1000.0
    );
    for (i, (name, _, _)) in cases.iter().enumerate().skip(1).take(2) {
        let mut v = hook_ns[i].clone();
        v.sort_by(f64::total_cmp);
        let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        let (lo, med, hi) = (q(0.25), q(0.5), q(0.75));
        let verdict = if lo > 0.0 && (hi - lo) < med {
            "resolved: the spread is smaller than the effect"
        } else {
            "NOT resolved: the spread is as wide as the effect"
        };
        println!(
            "  {name:<30} {med:>7.0} ns (IQR {lo:.0}..{hi:.0}) = {:+.2}% of the baseline; {verdict}",
            med / base_min * 100.0
        );
    }
    // Which programs: one more not-matching round, program by program.
    let before = prog_stats(&prog_ids);
    run(Command::new("taskset")
        .args(["-c", &cpu.to_string()])
        .arg(testclient_bin())
        .args(["--netns", client.ns.name(), "--cgroup"])
        .arg(&bridged)
        .args(["--bench", &n.to_string(), "127.0.0.1:18080"]));
    let after = prog_stats(&prog_ids);
    println!("  not matching, by program (runs and ns per connect()+close()):");
    for ((name, t0, c0), (_, t1, c1)) in before.iter().zip(&after) {
        if c1 > c0 {
            println!(
                "    {name:<24} {:>5.2} runs {:>7.0} ns ({:.0} ns a run)",
                (c1 - c0) as f64 / n as f64,
                (t1 - t0) as f64 / n as f64,
                (t1 - t0) as f64 / (c1 - c0) as f64
            );
        }
    }
    println!("reproduce: sudo bash xtask/dev.sh bench (TPBPF_BENCH_ROUNDS, TPBPF_BENCH_N, TPBPF_BENCH_CPU)");
}

/// Each program's (name, run time ns, runs) so far.
fn prog_stats(ids: &[u64]) -> Vec<(String, u64, u64)> {
    ids.iter()
        .map(|id| {
            let v: Value = Command::new("bpftool")
                .args(["prog", "show", "id", &id.to_string(), "--json"])
                .output()
                .ok()
                .and_then(|o| serde_json::from_slice(&o.stdout).ok())
                .unwrap_or_default();
            (
                v["name"].as_str().unwrap_or("?").to_string(),
                v["run_time_ns"].as_u64().unwrap_or(0),
                v["run_cnt"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

/// Sum of the run time (ns) of programs `ids` so far.
fn prog_run_ns(ids: &[u64]) -> u64 {
    prog_stats(ids).iter().map(|p| p.1).sum()
}

/// Turns kernel.bpf_stats_enabled on, and back to what it was on drop.
struct BpfStats(Option<String>);

impl BpfStats {
    const PATH: &'static str = "/proc/sys/kernel/bpf_stats_enabled";
    fn enable() -> Self {
        let was = std::fs::read_to_string(Self::PATH).ok();
        if std::fs::write(Self::PATH, "1").is_err() {
            eprintln!("tpbpf-bench: kernel.bpf_stats_enabled cannot be set: the programs' own run time is not measured");
        }
        Self(was)
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Some(was) = &self.0 {
            let _ = std::fs::write(Self::PATH, was.trim());
        }
    }
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}
