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
//! Clients ([`clients`]): iperf3 (one stream, -P 4, and UDP at 200 Mbit/s
//! offered) to pod web-a1, redis-benchmark (PING on one connection, GET on
//! 20) to the redis pod, curl's time to first byte of a new connection and
//! Telepresence's ten-worker workload (wrk) to web-a1's nginx; and, the
//! other way, wrk from a lab pod to `web` while a steal intercept sends its
//! requests to an nginx on the developer side, against the same wrk on that
//! nginx directly.
//!
//! Run: `sudo bash xtask/dev.sh bench` (or `cargo xtask bench e2e`);
//! `TPBPF_E2E_LINK=DELAY,RATE,LOSS` runs it over the lab's WAN link,
//! `TPBPF_E2E_PATHS=direct,portforward` only those paths beside the route.
use std::{
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use tpbpf_vm_tests::*;

mod clients;

use clients::{wrk, Target, Workload, REDIS, THINK_MS, UDP_OFFERED, WEB_A1, WORKERS};

const NODE1: &str = "172.31.0.11";
const NODE2: &str = "172.31.0.12";

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
    /// Telepresence's ten-worker workload.
    workload: Option<Workload>,
    note: String,
}

fn setting(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Every client over path `t`; `scratch` holds what they need written.
fn measure(dev: &str, t: &Target, scratch: &Path, secs: u32) -> Row {
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
    let single = t.tcp(dev, 1, secs);
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
    let ttfb_ms = (t.web.1).then(|| t.ttfb(dev)).flatten();
    let workload = (t.web.1)
        .then(|| t.workload(dev, scratch, setting("TPBPF_E2E_WORKLOAD_SECONDS", 10)))
        .flatten();
    let udp = (t.udp).then(|| t.udp_lost(dev, secs)).flatten();
    let iperf4 = t.tcp(dev, 4, secs).map(|s| s.0);
    let ping = t.redis(dev, "ping_mbulk", 1, setting("TPBPF_E2E_PINGS", 20000));
    let get20 = t
        .redis(dev, "get", 20, setting("TPBPF_E2E_GETS", 100000))
        .map(|p| p.0);
    eprintln!(
        "  iperf3 {iperf1:?} / -P 4 {iperf4:?} Gbit/s, PING c=1 {ping:?}, GET c=20 {get20:?}, workload {workload:?}"
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
        workload,
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
    // TPBPF_E2E_PATHS=direct,portforward: the paths besides the route.
    let paths = std::env::var("TPBPF_E2E_PATHS").unwrap_or_default();
    let wanted = |path: &str| paths.is_empty() || paths.split(',').any(|p| p.trim() == path);
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
    let direct = measure(
        &dev,
        &Target::pods(None, vec![server.clone()], true),
        &scratch,
        secs,
    );
    route("del", "10.244.1.0/24", NODE1);
    route("del", "10.244.2.0/24", NODE2);

    // tpbpf, both transports.
    for transport in ["direct", "portforward"].into_iter().filter(|t| wanted(t)) {
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
        // Through port-forward, the API server relays every byte (the
        // lab's stands for kube-apiserver and the kubelet).
        let meters = if transport == "portforward" {
            vec![
                server.clone(),
                ("tpbpfd", bridge),
                agents.clone(),
                ("api server", api.clone()),
            ]
        } else {
            vec![server.clone(), ("tpbpfd", bridge), agents.clone()]
        };
        let t = Target::pods(Some(cg.path().to_path_buf()), meters, true);
        let mut row = measure(&dev, &t, &scratch, secs);
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
    if wanted("socat") {
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
            web: (String::new(), false),
            udp: false,
        };
        rows.push((
            "socat two-hop relay".into(),
            measure(&dev, &t, &scratch, secs),
        ));
    }

    // sshuttle, over ssh to node1 (an sshd of the benchmark's own there).
    if wanted("sshuttle") {
        eprintln!("sshuttle");
        rows.push((
            "sshuttle (Debian's, ssh to a node)".into(),
            sshuttle(&dev, &pod("node1"), &scratch, secs, &server),
        ));
    }

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
    let t = Target::pods(
        None,
        vec![server.clone(), ("relays", vec![tunnel.pid(), sshd.pid()])],
        false,
    );
    let up = wait_for(Duration::from_secs(15), || {
        Command::new("ip")
            .args(["netns", "exec", dev, "redis-cli", "-h", REDIS, "ping"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("PONG"))
    });
    let row = if up {
        measure(dev, &t, scratch, secs)
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
    println!();
    println!(
        "| Telepresence's workload: {WORKERS} workers, 8 KiB reads, {THINK_MS} ms think time | p50 | p95 | p95 ratio | requests | errors |"
    );
    println!("|---|---|---|---|---|---|");
    let base95 = direct.workload.map(|w| w.p95_ms);
    let all =
        std::iter::once(("direct route".to_string(), direct.clone())).chain(rows.iter().cloned());
    for (name, r) in all {
        if let Some(w) = r.workload {
            println!(
                "| {name} | {:.1} ms | {:.1} ms | {} | {} | {} |",
                w.p50_ms,
                w.p95_ms,
                base95.map_or("-".into(), |b| format!("{:.2}x", w.p95_ms / b)),
                w.requests,
                w.errors
            );
        }
    }
    let base = wrk_rows.first().and_then(|r| r.1);
    println!();
    println!("| wrk -t2 -c16 from a lab pod | requests/s |");
    println!("|---|---|");
    for (name, v) in wrk_rows {
        println!("| {name} | {} |", cell(*v, base, ""));
    }
    println!("reproduce: sudo bash xtask/dev.sh bench (or cargo xtask bench e2e); TPBPF_E2E_SECONDS, TPBPF_E2E_PINGS, TPBPF_E2E_GETS, TPBPF_E2E_LINK, TPBPF_E2E_PATHS, TPBPF_E2E_WORKLOAD_SECONDS");
}
