//! The real clients the bench runs on the developer machine, and what it
//! reads from each: iperf3 (TCP and UDP), redis-benchmark, curl, and wrk
//! (as a load from a lab pod, and as Telepresence's ten-worker workload).
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use serde_json::Value;

/// pod web-a1, where iperf3 -s and nginx serve.
pub const WEB_A1: &str = "10.244.1.10";
/// The redis pod.
pub const REDIS: &str = "10.244.2.20";

/// New connections timed, each its own curl.
const TTFB_RUNS: usize = 15;
/// The UDP rate offered, as Telepresence's bulk-UDP test offers it.
pub const UDP_OFFERED: &str = "200M";
/// Telepresence's workload: workers, the bytes each request reads, and the
/// think time between a worker's requests (ms).
pub const WORKERS: u32 = 10;
const WORKLOAD_READ: usize = 8 * 1024;
pub const THINK_MS: u32 = 50;

/// How a client reaches its server on one path.
pub struct Target {
    pub iperf: (String, u16),
    pub redis: (String, u16),
    /// The cgroup a bridged client runs in (tpbpf), if any.
    pub cgroup: Option<PathBuf>,
    /// The processes that carry the path's bytes, by role, whose CPU the
    /// single stream is charged with (the client's is measured apart).
    pub meters: Vec<(&'static str, Vec<u32>)>,
    /// nginx's address for the time to first byte and the workload, and
    /// whether the path takes a new connection to it (socat's relays go to
    /// iperf and redis only).
    pub web: (String, bool),
    /// Whether the path carries UDP (socat's and sshuttle's do not here).
    pub udp: bool,
}

impl Target {
    /// A path on which the clients reach the pods at their own addresses
    /// (the route, tpbpf, sshuttle), from `cgroup` if bridged there.
    pub fn pods(cgroup: Option<PathBuf>, meters: Vec<(&'static str, Vec<u32>)>, udp: bool) -> Self {
        Target {
            iperf: (WEB_A1.into(), 5201),
            redis: (REDIS.into(), 6379),
            cgroup,
            meters,
            web: (WEB_A1.into(), true),
            udp,
        }
    }

    /// `argv` in the developer namespace (in the target's cgroup): its
    /// stdout, or `None` (said on stderr) when it failed.
    fn run(&self, dev: &str, argv: &[&str]) -> Option<String> {
        let mut cmd = Command::new("sh");
        let quoted: Vec<String> = argv.iter().map(|a| format!("'{a}'")).collect();
        let enter = self
            .cgroup
            .as_ref()
            .map(|c| format!("echo $$ > {}/cgroup.procs && ", c.display()))
            .unwrap_or_default();
        // Bounded: a client that cannot connect must not hold the run.
        cmd.arg("-c").arg(format!(
            "{enter}exec timeout -s KILL 120 ip netns exec {dev} {}",
            quoted.join(" ")
        ));
        let out = cmd.stderr(Stdio::piped()).output().ok()?;
        if !out.status.success() {
            eprintln!(
                "  {}: {}",
                argv.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// iperf3 to the target's iperf server with `args`: its JSON report.
    fn iperf3(&self, dev: &str, args: &[&str]) -> Option<Value> {
        let port = self.iperf.1.to_string();
        let mut argv = vec!["iperf3", "-c", &self.iperf.0, "-p", &port, "-J"];
        argv.extend_from_slice(args);
        serde_json::from_str(&self.run(dev, &argv)?).ok()
    }

    /// Gbit/s received and the bytes, iperf3 with `streams` parallel streams.
    pub fn tcp(&self, dev: &str, streams: u32, secs: u32) -> Option<(f64, f64)> {
        let (secs, streams) = (secs.to_string(), streams.to_string());
        let v = self.iperf3(dev, &["-t", &secs, "-P", &streams])?;
        let sum = &v["end"]["sum_received"];
        Some((
            sum["bits_per_second"].as_f64()? / 1e9,
            sum["bytes"].as_f64()?,
        ))
    }

    /// iperf3 -u at [`UDP_OFFERED`] for `secs`: the share lost (%).
    /// Datagrams of 1400 bytes on every path: iperf3 otherwise sizes them
    /// by its control connection's MSS, which through tpbpf is loopback's
    /// (32 KiB datagrams, a twentieth as many).
    pub fn udp_lost(&self, dev: &str, secs: u32) -> Option<f64> {
        let secs = secs.to_string();
        let v = self.iperf3(dev, &["-u", "-b", UDP_OFFERED, "-l", "1400", "-t", &secs])?;
        v["end"]["sum"]["lost_percent"].as_f64()
    }

    /// redis-benchmark: (requests/s, p50 ms) of `test` with `clients`
    /// connections.
    pub fn redis(&self, dev: &str, test: &str, clients: u32, n: u32) -> Option<(f64, f64)> {
        let (port, clients, n) = (self.redis.1.to_string(), clients.to_string(), n.to_string());
        let out = self.run(
            dev,
            &[
                "redis-benchmark",
                "-h",
                &self.redis.0,
                "-p",
                &port,
                "-c",
                &clients,
                "-n",
                &n,
                "-t",
                test,
                "--csv",
            ],
        )?;
        // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms",...
        let line = out.lines().rfind(|l| !l.starts_with("\"test\""))?;
        let f: Vec<f64> = line
            .split(',')
            .skip(1)
            .filter_map(|x| x.trim_matches('"').parse().ok())
            .collect();
        Some((*f.first()?, *f.get(3)?))
    }

    /// The median time to the first byte of a new connection's answer (ms):
    /// curl to nginx, each run a new connection.
    pub fn ttfb(&self, dev: &str) -> Option<f64> {
        let url = format!("http://{}/", self.web.0);
        let mut times: Vec<f64> = (0..TTFB_RUNS)
            .filter_map(|_| {
                self.run(
                    dev,
                    &[
                        "curl",
                        "-s",
                        "-o",
                        "/dev/null",
                        "-m",
                        "10",
                        "-w",
                        "%{time_starttransfer}",
                        &url,
                    ],
                )?
                .trim()
                .parse::<f64>()
                .ok()
            })
            .collect();
        if times.len() < TTFB_RUNS / 2 {
            return None;
        }
        times.sort_by(f64::total_cmp);
        Some(times[times.len() / 2] * 1000.0)
    }

    /// Telepresence's workload with wrk: [`WORKERS`] workers, each on its
    /// own keep-alive connection, reading 8 KiB of nginx's `/blob` (a range
    /// request) then thinking [`THINK_MS`]; for `secs`. The script goes in
    /// `scratch`. (p50, p95) of the request latency in ms, and the requests.
    pub fn workload(&self, dev: &str, scratch: &Path, secs: u32) -> Option<Workload> {
        let script = scratch.join("workload.lua");
        std::fs::write(
            &script,
            format!(
                "wrk.headers[\"Range\"] = \"bytes=0-{}\"\n\
                 function delay() return {THINK_MS} end\n\
                 function done(summary, latency, requests)\n\
                   local e = summary.errors\n\
                   io.write(string.format(\"workload %d %d %d %d\\n\", latency:percentile(50), latency:percentile(95), summary.requests, e.connect + e.read + e.write + e.status + e.timeout))\n\
                 end\n",
                WORKLOAD_READ - 1
            ),
        )
        .ok()?;
        let (threads, duration) = (format!("-t{WORKERS}"), format!("-d{secs}s"));
        let conns = format!("-c{WORKERS}");
        let url = format!("http://{}/blob", self.web.0);
        let out = self.run(
            dev,
            &[
                "wrk",
                &threads,
                &conns,
                &duration,
                "--timeout",
                "10s",
                "-s",
                &script.display().to_string(),
                &url,
            ],
        )?;
        let f: Vec<f64> = out
            .lines()
            .find_map(|l| l.strip_prefix("workload "))?
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        match f[..] {
            [p50, p95, requests, errors] => Some(Workload {
                p50_ms: p50 / 1000.0,
                p95_ms: p95 / 1000.0,
                requests,
                errors,
            }),
            _ => None,
        }
    }
}

/// What the ten-worker workload measured.
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub requests: f64,
    pub errors: f64,
}

/// wrk's requests/s, run inside network namespace `netns`.
pub fn wrk(netns: &str, url: &str, secs: u32) -> Option<f64> {
    let out = Command::new("timeout")
        .args([
            "-s", "KILL", "120", "ip", "netns", "exec", netns, "wrk", "-t2", "-c16",
        ])
        .arg(format!("-d{secs}s"))
        .arg(url)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
}
