//! End-to-end benchmark in the lab: real clients on the developer machine
//! (`NAME-dev`) reaching pods, through each path in one run, each shown as
//! a ratio to the direct route (a plain route from the developer namespace
//! to the pods' nodes, the limit):
//! - tpbpf over `--transport direct` (TLS straight to the agent) and over
//!   the default port-forward (through the lab's API endpoint);
//! - a socat two-hop relay (one socat on the developer side, one on the
//!   pod's node);
//! - sshuttle (Debian's), over ssh to the pod's node.
//!
//! Clients: iperf3 (one stream and -P 4) to pod web-a1, redis-benchmark
//! (PING on one connection, GET on 20) to the redis pod; and, the other way,
//! wrk from a lab pod to `web` while a steal intercept sends its requests to
//! an nginx on the developer side, against the same wrk on that nginx
//! directly.
//!
//! Run: `sudo bash xtask/dev.sh bench` (or `cargo xtask bench e2e`).
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use tpbpf_vm_tests::*;

const WEB_A1: &str = "10.244.1.10";
const REDIS: &str = "10.244.2.20";
const NODE1: &str = "172.31.0.11";
const NODE2: &str = "172.31.0.12";

/// How a client reaches its server on one path.
struct Target {
    iperf: (String, u16),
    redis: (String, u16),
    /// The cgroup a bridged client runs in (tpbpf), if any.
    cgroup: Option<PathBuf>,
    /// The processes that carry the path's bytes, by role, whose CPU the
    /// single stream is charged with (the client's is measured apart).
    meters: Vec<(&'static str, Vec<u32>)>,
    /// nginx's address for the time to first byte, and whether the path
    /// takes a new connection to it (socat's relays go to iperf and redis
    /// only).
    ttfb: (String, bool),
    /// Whether the path carries UDP (socat's and sshuttle's do not here).
    udp: bool,
}

/// CPU seconds (user + system) of process `root` and its live
/// descendants, with what their reaped children used: each process counted
/// once (a reaped one in its reaper's c-times).
fn tree_cpu(root: u32) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut procs: Vec<(u32, u32, f64)> = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command's `)`: state is field 3, so field n is
        // rest[n - 3]: ppid 4, utime 14, stime 15, cutime 16, cstime 17.
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        let ppid = f.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
        procs.push((pid, ppid, (num(11) + num(12) + num(13) + num(14)) / tick));
    }
    let mut tree = vec![root];
    let mut total = 0.0;
    while let Some(p) = tree.pop() {
        for (pid, ppid, cpu) in &procs {
            if *pid == p {
                total += cpu;
            }
            if *ppid == p {
                tree.push(*pid);
            }
        }
    }
    total
}

/// CPU seconds of this process's waited-for children, all of them.
fn children_cpu() -> f64 {
    // SAFETY: a zeroed rusage is valid, and getrusage only writes it.
    let mut r: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `r` is a valid rusage to write.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut r) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(r.ru_utime) + t(r.ru_stime)
}

/// The lab's agents' processes.
fn agent_pids(lab: &str) -> Vec<u32> {
    ["node1", "node2"]
        .iter()
        .filter_map(|n| std::fs::read_to_string(format!("/run/tpbpf-lab/{lab}/agent-{n}.pid")).ok())
        .filter_map(|p| p.trim().parse().ok())
        .collect()
}

#[derive(Default, Clone)]
struct Row {
    /// A new connection's time to the first byte of nginx's answer, the
    /// median of [`TTFB_RUNS`] (ms).
    ttfb_ms: Option<f64>,
    /// iperf3 -u at [`UDP_OFFERED`]: the share of datagrams lost (%).
    udp_lost: Option<f64>,
    /// The single stream's gigabytes, and each role's CPU-seconds per GB.
    gb: Option<f64>,
    cpu: Vec<(&'static str, f64)>,
    iperf1: Option<f64>,
    iperf4: Option<f64>,
    ping1: Option<f64>,
    ping1_p50: Option<f64>,
    get20: Option<f64>,
    note: String,
}

fn setting(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `argv` in the developer namespace (in `cgroup` if given): its stdout.
fn in_dev(dev: &str, cgroup: Option<&Path>, argv: &[String]) -> Option<String> {
    let mut cmd = Command::new("sh");
    let quoted: Vec<String> = argv.iter().map(|a| format!("'{a}'")).collect();
    let enter = cgroup
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

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Gbit/s received and the bytes, iperf3 with `streams` parallel streams.
fn iperf(dev: &str, t: &Target, streams: u32, secs: u32) -> Option<(f64, f64)> {
    let out = in_dev(
        dev,
        t.cgroup.as_deref(),
        &strings(&[
            "iperf3",
            "-c",
            &t.iperf.0,
            "-p",
            &t.iperf.1.to_string(),
            "-t",
            &secs.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
        ]),
    )?;
    let v: Value = serde_json::from_str(&out).ok()?;
    let sum = &v["end"]["sum_received"];
    Some((
        sum["bits_per_second"].as_f64()? / 1e9,
        sum["bytes"].as_f64()?,
    ))
}

/// redis-benchmark: (requests/s, p50 ms) of `test` with `clients` connections.
fn redis(dev: &str, t: &Target, test: &str, clients: u32, n: u32) -> Option<(f64, f64)> {
    let out = in_dev(
        dev,
        t.cgroup.as_deref(),
        &strings(&[
            "redis-benchmark",
            "-h",
            &t.redis.0,
            "-p",
            &t.redis.1.to_string(),
            "-c",
            &clients.to_string(),
            "-n",
            &n.to_string(),
            "-t",
            test,
            "--csv",
        ]),
    )?;
    // "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms",...
    let line = out
        .lines()
        .rfind(|l| !l.starts_with("\"test\""))?
        .to_string();
    let f: Vec<f64> = line
        .split(',')
        .skip(1)
        .filter_map(|x| x.trim_matches('"').parse().ok())
        .collect();
    Some((*f.first()?, *f.get(3)?))
}

/// New connections timed, each its own curl.
const TTFB_RUNS: usize = 15;
/// The UDP rate offered, as Telepresence's bulk-UDP test offers it.
const UDP_OFFERED: &str = "200M";

/// The median time to the first byte of a new connection's answer (ms):
/// curl to nginx on pod web-a1, port 80, each run a new connection.
fn ttfb(dev: &str, t: &Target) -> Option<f64> {
    let mut times: Vec<f64> = (0..TTFB_RUNS)
        .filter_map(|_| {
            in_dev(
                dev,
                t.cgroup.as_deref(),
                &strings(&[
                    "curl",
                    "-s",
                    "-o",
                    "/dev/null",
                    "-m",
                    "10",
                    "-w",
                    "%{time_starttransfer}",
                    &format!("http://{}/", t.ttfb.0),
                ]),
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

/// iperf3 -u at [`UDP_OFFERED`] for `secs`: the share lost (%).
fn udp_lost(dev: &str, t: &Target, secs: u32) -> Option<f64> {
    let out = in_dev(
        dev,
        t.cgroup.as_deref(),
        &strings(&[
            "iperf3",
            "-u",
            "-b",
            UDP_OFFERED,
            "-c",
            &t.iperf.0,
            "-p",
            &t.iperf.1.to_string(),
            "-t",
            &secs.to_string(),
            "-J",
        ]),
    )?;
    let v: Value = serde_json::from_str(&out).ok()?;
    v["end"]["sum"]["lost_percent"].as_f64()
}

fn measure(dev: &str, t: &Target, secs: u32) -> Row {
    // The single stream, with what each process spent carrying it.
    let cpu_now = || -> Vec<f64> {
        std::iter::once(children_cpu())
            .chain(
                t.meters
                    .iter()
                    .map(|(_, pids)| pids.iter().map(|p| tree_cpu(*p)).sum()),
            )
            .collect()
    };
    let before = cpu_now();
    let single = iperf(dev, t, 1, secs);
    let after = cpu_now();
    let gb = single.map(|s| s.1 / 1e9);
    let cpu = match gb {
        Some(gb) if gb > 0.0 => std::iter::once("client")
            .chain(t.meters.iter().map(|(n, _)| *n))
            .zip(after.iter().zip(&before).map(|(a, b)| (a - b) / gb))
            .collect(),
        _ => Vec::new(),
    };
    let iperf1 = single.map(|s| s.0);
    let ttfb_ms = (t.ttfb.1).then(|| ttfb(dev, t)).flatten();
    let udp = (t.udp).then(|| udp_lost(dev, t, secs)).flatten();
    let iperf4 = iperf(dev, t, 4, secs).map(|s| s.0);
    let ping = redis(dev, t, "ping_mbulk", 1, setting("TPBPF_E2E_PINGS", 20000));
    let get20 = redis(dev, t, "get", 20, setting("TPBPF_E2E_GETS", 100000)).map(|p| p.0);
    eprintln!(
        "  iperf3 {iperf1:?} / -P 4 {iperf4:?} Gbit/s, PING c=1 {ping:?}, GET c=20 {get20:?}"
    );
    Row {
        ttfb_ms,
        udp_lost: udp,
        gb,
        cpu,
        iperf1,
        iperf4,
        ping1: ping.map(|p| p.0),
        ping1_p50: ping.map(|p| p.1),
        get20,
        note: String::new(),
    }
}

fn tpbpf(args: &[&str]) -> Option<String> {
    let out = Command::new(tpbpf_bin()).args(args).output().ok()?;
    if !out.status.success() {
        eprintln!(
            "  tpbpf {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        return None;
    }
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// wrk's requests/s, run inside network namespace `netns`.
fn wrk(netns: &str, url: &str, secs: u32) -> Option<f64> {
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

/// A background process in a network namespace.
fn bg_in(netns: &str, argv: &[&str]) -> Bg {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns])
        .args(argv)
        .stderr(Stdio::null());
    Bg::spawn(&mut cmd)
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("tpbpf-e2e-bench: brings up the lab: run it as root");
        std::process::exit(1);
    }
    let secs = setting("TPBPF_E2E_SECONDS", 4);
    let _stop = stop_on_signals();
    // TPBPF_E2E_LINK=20ms,1gbit,1%: every path over the lab's WAN link.
    let link = std::env::var("TPBPF_E2E_LINK")
        .ok()
        .filter(|l| !l.is_empty());
    let extra: Vec<&str> = link.iter().flat_map(|l| ["--link", l.as_str()]).collect();
    let Some(lab) = LabGuard::up_with("e2e", &extra) else {
        return;
    };
    lab.install();
    let dev = lab.dev_netns();
    let kubeconfig = lab.kubeconfig();
    let pod = |name: &str| format!("{}-{name}", lab.name);
    let web_a1 = pod("default-web-7d4b9c-a1");
    let iperf_server = bg_in(&web_a1, &["iperf3", "-s", "-p", "5201"]);
    let server = ("server", vec![iperf_server.pid()]);
    let agents = ("agents", agent_pids(&lab.name));
    let api: Vec<u32> = std::fs::read_to_string(lab.state_dir().join("api.pid"))
        .ok()
        .and_then(|p| p.trim().parse().ok())
        .into_iter()
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut rows: Vec<(String, Row)> = Vec::new();
    let mut wrk_rows: Vec<(String, Option<f64>)> = Vec::new();

    // The developer's nginx, for the intercepts and the wrk baseline.
    let scratch = std::env::temp_dir().join(unique_name("tpbpf-e2e"));
    std::fs::create_dir_all(&scratch).unwrap();
    let conf = scratch.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off; master_process off; worker_processes 1; pid {0}/nginx.pid; error_log {0}/error.log;\n\
             events {{ worker_connections 1024; }}\n\
             http {{ access_log off; server {{ listen 127.0.0.1:18090; location / {{ return 200 \"developer\\n\"; }} }} }}\n",
            scratch.display()
        ),
    )
    .unwrap();
    let _nginx = bg_in(&dev, &["nginx", "-c", &conf.display().to_string()]);
    std::thread::sleep(Duration::from_millis(300));
    let local = wrk(&dev, "http://127.0.0.1:18090/", secs);
    wrk_rows.push(("developer's nginx reached directly".into(), local));
    let client_pod = pod("cache-redis-0");

    // The direct route: the limit.
    eprintln!("direct route");
    let route = |op: &str, net: &str, via: &str| {
        let _ = Command::new("ip")
            .args(["-n", &dev, "route", op, net, "via", via])
            .status();
    };
    route("add", "10.244.1.0/24", NODE1);
    route("add", "10.244.2.0/24", NODE2);
    let t = Target {
        iperf: (WEB_A1.into(), 5201),
        redis: (REDIS.into(), 6379),
        cgroup: None,
        meters: vec![server.clone()],
        ttfb: (WEB_A1.into(), true),
        udp: true,
    };
    let direct = measure(&dev, &t, secs);
    route("del", "10.244.1.0/24", NODE1);
    route("del", "10.244.2.0/24", NODE2);

    // tpbpf, both transports.
    for transport in ["direct", "portforward"] {
        eprintln!("tpbpf, --transport {transport}");
        let cg = TestCgroup::new();
        let instance = Instance(unique_name("e2e"));
        let up = tpbpf(&[
            "--netns",
            &dev,
            "--log",
            "warn",
            "up",
            "--kubeconfig",
            &kubeconfig,
            "--instance",
            &instance.0,
            "--cgroup",
            &cg.path().display().to_string(),
            "--transport",
            transport,
        ]);
        if up.is_none() {
            rows.push((format!("tpbpf, {transport}"), Row::default()));
            continue;
        }
        std::thread::sleep(Duration::from_millis(1500));
        // Root's bridge: tpbpfd and the user's side are one process.
        let bridge: Vec<u32> =
            std::fs::read_to_string(Path::new("/run/tpbpf").join(&instance.0).join("state.json"))
                .ok()
                .and_then(|s| serde_json::from_str::<Value>(&s).ok())
                .and_then(|s| s["pid"].as_u64())
                .map(|p| vec![p as u32])
                .unwrap_or_default();
        let t = Target {
            iperf: (WEB_A1.into(), 5201),
            redis: (REDIS.into(), 6379),
            cgroup: Some(cg.path().to_path_buf()),
            // Through port-forward, the API server relays every byte (the
            // lab's stands for kube-apiserver and the kubelet).
            meters: if transport == "portforward" {
                vec![
                    server.clone(),
                    ("tpbpfd", bridge),
                    agents.clone(),
                    ("api server", api.clone()),
                ]
            } else {
                vec![server.clone(), ("tpbpfd", bridge), agents.clone()]
            },
            ttfb: (WEB_A1.into(), true),
            udp: true,
        };
        let mut row = measure(&dev, &t, secs);
        let status = tpbpf(&["status", "--instance", &instance.0, "-o", "json"])
            .and_then(|s| serde_json::from_str::<Value>(&s).ok());
        if let Some(rtt) = status
            .as_ref()
            .and_then(|s| s["live"]["tunnel"]["rtt_ms"].as_f64())
        {
            row.note = format!("tunnel RTT {rtt:.2} ms");
        }
        rows.push((format!("tpbpf, --transport {transport}"), row));
        // The other way: a steal intercept of web to the developer's nginx.
        let hijacked = tpbpf(&[
            "intercept",
            "web",
            "--port",
            "80:18090",
            "--instance",
            &instance.0,
        ]);
        let rps = hijacked.and_then(|_| {
            std::thread::sleep(Duration::from_millis(500));
            wrk(&client_pod, "http://10.96.0.20/", secs)
        });
        wrk_rows.push((format!("steal intercept, --transport {transport}"), rps));
        let _ = tpbpf(&["leave", "web-80", "--instance", &instance.0]);
        drop(instance);
    }

    // socat, two hops: the developer side, then the pod's node.
    {
        eprintln!("socat two-hop relay");
        let n1 = bg_in(
            &pod("node1"),
            &[
                "socat",
                "TCP-LISTEN:16000,fork,reuseaddr,backlog=1024",
                &format!("TCP:{WEB_A1}:5201"),
            ],
        );
        let n2 = bg_in(
            &pod("node2"),
            &[
                "socat",
                "TCP-LISTEN:16000,fork,reuseaddr,backlog=1024",
                &format!("TCP:{REDIS}:6379"),
            ],
        );
        let d1 = bg_in(
            &dev,
            &[
                "socat",
                "TCP-LISTEN:16001,bind=127.0.0.1,fork,reuseaddr,backlog=1024",
                &format!("TCP:{NODE1}:16000"),
            ],
        );
        let d2 = bg_in(
            &dev,
            &[
                "socat",
                "TCP-LISTEN:16002,bind=127.0.0.1,fork,reuseaddr,backlog=1024",
                &format!("TCP:{NODE2}:16000"),
            ],
        );
        std::thread::sleep(Duration::from_millis(300));
        let t = Target {
            iperf: ("127.0.0.1".into(), 16001),
            redis: ("127.0.0.1".into(), 16002),
            cgroup: None,
            meters: vec![
                server.clone(),
                (
                    "relays",
                    [&n1, &n2, &d1, &d2].iter().map(|b| b.pid()).collect(),
                ),
            ],
            ttfb: (String::new(), false),
            udp: false,
        };
        rows.push(("socat two-hop relay".into(), measure(&dev, &t, secs)));
    }

    // sshuttle, over ssh to node1 (an sshd of the benchmark's own there).
    eprintln!("sshuttle");
    rows.push((
        "sshuttle (Debian's, ssh to a node)".into(),
        sshuttle(&dev, &pod("node1"), &scratch, secs, &server),
    ));

    let _ = std::fs::remove_dir_all(&scratch);
    report(&direct, &rows, &wrk_rows);
}

/// sshuttle from the developer namespace through an sshd in `node`.
fn sshuttle(
    dev: &str,
    node: &str,
    scratch: &Path,
    secs: u32,
    server: &(&'static str, Vec<u32>),
) -> Row {
    let failed = |why: &str| Row {
        note: format!("not measured: {why}"),
        ..Row::default()
    };
    for key in ["host", "client"] {
        let ok = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", ""])
            .arg("-f")
            .arg(scratch.join(key))
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return failed("ssh-keygen failed");
        }
    }
    let _ = std::fs::copy(scratch.join("client.pub"), scratch.join("authorized_keys"));
    let config = scratch.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port 2222\nListenAddress {NODE1}\nHostKey {0}/host\nAuthorizedKeysFile {0}/authorized_keys\nPermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nPidFile {0}/sshd.pid\n",
            scratch.display()
        ),
    )
    .unwrap();
    let _ = std::fs::create_dir_all("/run/sshd");
    let sshd = bg_in(
        node,
        &[
            "/usr/sbin/sshd",
            "-D",
            "-e",
            "-f",
            &config.display().to_string(),
        ],
    );
    std::thread::sleep(Duration::from_millis(500));
    let ssh = format!(
        "ssh -i {}/client -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
        scratch.display()
    );
    // sshuttle redirects in the nat table's OUTPUT chain, which a connect
    // only reaches with a route: this one leads nowhere (lo) unless
    // sshuttle redirects, so nothing takes the direct path by mistake.
    let _ = Command::new("ip")
        .args(["-n", dev, "route", "add", "10.244.0.0/16", "dev", "lo"])
        .status();
    let log = scratch.join("sshuttle.log");
    let mut tunnel = Bg::spawn(
        Command::new("ip")
            .args(["netns", "exec", dev, "sshuttle", "--method", "nat", "-r"])
            .arg(format!("root@{NODE1}:2222"))
            .args(["-e", &ssh, "10.244.0.0/16"])
            .stderr(std::fs::File::create(&log).unwrap()),
    );
    let t = Target {
        iperf: (WEB_A1.into(), 5201),
        redis: (REDIS.into(), 6379),
        cgroup: None,
        meters: vec![server.clone(), ("relays", vec![tunnel.pid(), sshd.pid()])],
        ttfb: (WEB_A1.into(), true),
        udp: false,
    };
    let up = wait_for(Duration::from_secs(15), || {
        Command::new("ip")
            .args(["netns", "exec", dev, "redis-cli", "-h", REDIS, "ping"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("PONG"))
    });
    let row = if up {
        measure(dev, &t, secs)
    } else {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        eprintln!("  sshuttle's log:\n{text}");
        failed("sshuttle did not connect within 15 s")
    };
    // SIGINT: sshuttle removes its firewall rules.
    tunnel.kill(libc::SIGINT);
    let _ = tunnel.wait_exit(Duration::from_secs(5));
    let _ = Command::new("ip")
        .args(["-n", dev, "route", "del", "10.244.0.0/16", "dev", "lo"])
        .status();
    row
}

fn report(direct: &Row, rows: &[(String, Row)], wrk_rows: &[(String, Option<f64>)]) {
    let cell = |v: Option<f64>, base: Option<f64>, unit: &str| match (v, base) {
        (Some(v), Some(b)) => format!("{v:.2}{unit} ({:.2}x)", v / b),
        (Some(v), None) => format!("{v:.2}{unit}"),
        _ => "failed".into(),
    };
    println!(
        "end to end, lab on one machine ({} CPUs), kernel {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    println!(
        "link between the developer machine and the cluster: {}",
        std::env::var("TPBPF_E2E_LINK")
            .unwrap_or_else(|_| "none (TPBPF_E2E_LINK=DELAY,RATE,LOSS)".into())
    );
    println!(
        "| path | iperf3 1 stream | iperf3 -P 4 | redis PING c=1 | PING p50 | redis GET c=20 | new connection, first byte | UDP {UDP_OFFERED}bit/s offered: lost | |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let all = std::iter::once(("direct route (the limit)".to_string(), direct.clone()))
        .chain(rows.iter().cloned());
    for (name, r) in all {
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} |",
            cell(r.iperf1, direct.iperf1, " Gbit/s"),
            cell(r.iperf4, direct.iperf4, " Gbit/s"),
            cell(r.ping1, direct.ping1, " rps"),
            r.ping1_p50.map_or("-".into(), |p| format!("{p:.3} ms")),
            cell(r.get20, direct.get20, " rps"),
            cell(r.ttfb_ms, direct.ttfb_ms, " ms"),
            r.udp_lost.map_or("-".into(), |l| format!("{l:.1}%")),
            r.note
        );
    }
    // What carrying the single stream cost, per gigabyte, by role.
    let roles = [
        "client",
        "server",
        "tpbpfd",
        "agents",
        "api server",
        "relays",
    ];
    println!();
    println!("| CPU-seconds per GB, iperf3 1 stream | GB | client | server | tpbpfd | agents | API server | relays | all | ratio |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let total =
        |r: &Row| -> Option<f64> { (!r.cpu.is_empty()).then(|| r.cpu.iter().map(|c| c.1).sum()) };
    let direct_total = total(direct);
    let all =
        std::iter::once(("direct route".to_string(), direct.clone())).chain(rows.iter().cloned());
    for (name, r) in all {
        let cells: Vec<String> = roles
            .iter()
            .map(|role| {
                r.cpu
                    .iter()
                    .find(|c| c.0 == *role)
                    .map_or("-".into(), |c| format!("{:.2}", c.1))
            })
            .collect();
        let t = total(&r);
        println!(
            "| {name} | {} | {} | {} | {} |",
            r.gb.map_or("-".into(), |g| format!("{g:.2}")),
            cells.join(" | "),
            t.map_or("-".into(), |t| format!("{t:.2}")),
            match (t, direct_total) {
                (Some(t), Some(d)) if d > 0.0 => format!("{:.2}x", t / d),
                _ => "-".into(),
            }
        );
    }
    let base = wrk_rows.first().and_then(|r| r.1);
    println!();
    println!("| wrk -t2 -c16 from a lab pod | requests/s |");
    println!("|---|---|");
    for (name, v) in wrk_rows {
        println!("| {name} | {} |", cell(*v, base, ""));
    }
    println!("reproduce: sudo bash xtask/dev.sh bench (or cargo xtask bench e2e); TPBPF_E2E_SECONDS, TPBPF_E2E_PINGS, TPBPF_E2E_GETS, TPBPF_E2E_LINK");
}
