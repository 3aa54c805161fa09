//! `tpbpf up` / `status` / `down`: bridge this machine to the cluster of the
//! current kubeconfig context, with tpbpfd running in the background.
use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tpbpf_sys::Cidr;

use crate::Output;

#[derive(clap::Args)]
pub struct UpArgs {
    /// kubeconfig to use (default: $KUBECONFIG or ~/.kube/config, like kubectl).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// kubeconfig context (default: the current one).
    #[arg(long)]
    context: Option<String>,
    /// A connected namespace (repeatable): bare names resolve in the first
    /// (default: the context's namespace, which is always connected).
    /// `svc.NS` names resolve for every namespace of the cluster you may
    /// list, as inside a pod.
    #[arg(short, long = "namespace")]
    namespaces: Vec<String>,
    /// Only these namespaces' `svc.NS` names go to the cluster (comma-
    /// separated or repeated), instead of every namespace you may list.
    #[arg(long = "mapped-namespaces", value_name = "NS", value_delimiter = ',')]
    mapped_namespaces: Vec<String>,
    /// Where bridged traffic goes: `agent` (default), a tunnel to tpbpf's
    /// agent; `netns:NAME` dials from inside network namespace NAME (e.g. a
    /// lab node: `netns:tpbpf-lab-node1`), for debugging without a tunnel.
    #[arg(long, default_value = "agent")]
    upstream: String,
    /// How the tunnel reaches the agent: `portforward` through the API
    /// server, or `direct` TLS to the agent's node.
    /// (default: portforward)
    #[arg(long)]
    transport: Option<String>,
    /// With --transport direct: the agent's tunnel address.
    #[arg(long)]
    agent_address: Option<String>,
    /// Bridge this cgroup subtree (default: the whole machine).
    #[arg(long, env = "TPBPF_CGROUP")]
    cgroup: Option<PathBuf>,
    /// The ranges to bridge (repeatable), instead of the service and pod
    /// ranges discovery finds.
    #[arg(long = "cidr", value_name = "CIDR")]
    cidrs: Vec<Cidr>,
    /// The cluster DNS server's address, instead of the one discovery finds
    /// (the service labelled k8s-app=kube-dns in kube-system).
    #[arg(long, value_name = "ADDR")]
    cluster_dns: Option<std::net::IpAddr>,
    /// Another range to bridge (repeatable), besides the discovered ones.
    #[arg(long = "also-proxy")]
    also_proxy: Vec<Cidr>,
    /// A range never to bridge (repeatable).
    #[arg(long = "never-proxy")]
    never_proxy: Vec<Cidr>,
    /// The cluster domain (default: cluster.local).
    #[arg(long)]
    cluster_domain: Option<String>,
    /// Another DNS suffix the cluster answers (repeatable).
    #[arg(long = "dns-suffix", value_name = "SUFFIX")]
    dns_suffixes: Vec<String>,
    /// The project file (default: tpbpf.yaml here or in a parent
    /// directory): its settings apply where no flag gives them, and its
    /// intercepts start once the bridge is up.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Also bridge TCP connections arriving on this interface from another
    /// network namespace (a container's veth; tc ingress). Repeatable; root.
    #[arg(long = "attach-iface", value_name = "IFACE")]
    attach_ifaces: Vec<String>,
    /// Also bridge TCP connections from network namespace NAME, through the
    /// veth interfaces here that lead to it. Repeatable; root.
    #[arg(long = "attach-netns", value_name = "NAME")]
    attach_netns: Vec<String>,
    /// Name of this bridge (several can run at once, to different clusters).
    #[arg(long, default_value = "default", value_parser = instance_name)]
    instance: String,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(clap::Args)]
pub struct StateArgs {
    /// Name of the bridge.
    #[arg(long, default_value = "default", value_parser = instance_name)]
    instance: String,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

/// A bridge's name: it names a directory under /run/tpbpf, so no path
/// separator, no leading dot, 1 to 64 of `A-Za-z0-9._-`.
pub fn instance_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('.')
        && !s.starts_with("uid-")
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "`{s}` is not a bridge name: 1 to 64 of letters, digits, `.`, `_` and `-`, not starting with `.` or `uid-`"
        ))
    }
}

/// Whether `pid` is the tpbpfd of bridge `instance`: a tpbpf `daemon`
/// serving that bridge's control socket (a pid recorded in the state file
/// may have been reused by another process since).
fn is_bridge_daemon(pid: i64, instance: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let socket = super::intercept::control_socket(instance);
    let socket = socket.as_os_str().as_encoded_bytes();
    args.iter().any(|a| *a == b"daemon")
        && args
            .windows(2)
            .any(|w| w[0] == b"--control-socket" && w[1] == socket)
}

fn state_dir(instance: &str) -> PathBuf {
    tpbpf_userside::control::state_dir(instance)
}

/// Where bridge `instance` keeps its state (see `state_dir`).
pub fn state_dir_of(instance: &str) -> PathBuf {
    state_dir(instance)
}

/// The bridges of this user whose scope is cgroup `cgroup`.
pub fn instances_bridging(cgroup: &std::path::Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(tpbpf_userside::control::states_dir()) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| {
            read_state(name).is_some_and(|s| {
                s["bridge"]["cgroup"].as_str().map(std::path::Path::new) == Some(cgroup)
            })
        })
        .collect()
}

/// Bridge `instance`'s recorded state, if it is up (or was, and its
/// tpbpfd died).
pub fn read_state_of(instance: &str) -> Option<Value> {
    read_state(instance)
}

fn alive(pid: i64) -> bool {
    tpbpf_lab::alive(pid as i32)
}

/// Fills what no flag gave from the project file, the environment and the
/// kubeconfig extension (`super::config`); returns the intercepts to start.
fn with_config(args: &mut UpArgs) -> Result<Vec<super::config::InterceptSpec>> {
    use super::config::{Flags, Settings, Transport};
    let cidrs = |v: &[Cidr]| (!v.is_empty()).then(|| v.iter().map(ToString::to_string).collect());
    let flags = Flags {
        config: args.config.clone(),
        settings: Settings {
            context: args.context.clone(),
            kubeconfig: args.kubeconfig.clone(),
            namespaces: (!args.namespaces.is_empty()).then(|| args.namespaces.clone()),
            mapped_namespaces: (!args.mapped_namespaces.is_empty())
                .then(|| args.mapped_namespaces.clone()),
            also_proxy: cidrs(&args.also_proxy),
            never_proxy: cidrs(&args.never_proxy),
            cluster_domain: args.cluster_domain.clone(),
            dns_suffixes: (!args.dns_suffixes.is_empty()).then(|| args.dns_suffixes.clone()),
            transport: match args.transport.as_deref() {
                None => None,
                Some("direct") => Some(Transport::Direct),
                Some("portforward") => Some(Transport::Portforward),
                Some(other) => bail!("--transport {other}: portforward or direct"),
            },
            intercepts: None,
        },
    };
    let s = super::config::resolve(&flags)?.settings;
    let parse = |v: Option<Vec<String>>, what: &str| -> Result<Vec<Cidr>> {
        v.unwrap_or_default()
            .iter()
            .map(|c| {
                c.parse()
                    .map_err(|e| anyhow::anyhow!("{what} `{c}` is not a range: {e}"))
            })
            .collect()
    };
    args.context = s.context;
    args.kubeconfig = s.kubeconfig;
    args.namespaces = s.namespaces.unwrap_or_default();
    args.mapped_namespaces = s.mapped_namespaces.unwrap_or_default();
    args.also_proxy = parse(s.also_proxy, "also-proxy")?;
    args.never_proxy = parse(s.never_proxy, "never-proxy")?;
    args.cluster_domain = s.cluster_domain;
    args.dns_suffixes = s.dns_suffixes.unwrap_or_default();
    args.transport = s.transport.map(|t| t.as_str().to_string());
    Ok(s.intercepts.unwrap_or_default())
}

pub fn up(mut args: UpArgs, netns: Option<&str>) -> Result<ExitCode> {
    let mut progress = crate::progress::Progress::new("up", args.output);
    progress.step("reading the settings");
    let intercepts = with_config(&mut args)?;
    // As a user, tpbpfd (the service) loads and attaches; it makes this
    // user's state directory and says early if this user may not use it.
    if !nix::unistd::geteuid().is_root() {
        tpbpf_userside::client::prepare(&tpbpf_bridge_api::socket_path())?;
    }
    let dir = state_dir(&args.instance);
    if let Some(state) = read_state(&args.instance) {
        if state["pid"].as_i64().is_some_and(alive) {
            bail!(
                "bridge `{}` is already up (tpbpfd pid {}): `tpbpf status`, or `tpbpf down` first",
                args.instance,
                state["pid"]
            );
        }
    }
    let upstream = args.upstream.clone();
    // A bridge that does not come up leaves no state directory behind.
    let made_dir = !dir.exists();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let log_path = dir.join("tpbpfd.log");
    // Appending (O_APPEND): whatever else writes to the log (a note, a
    // second writer) lands after tpbpfd's lines instead of under them.
    let _ = std::fs::remove_file(&log_path);
    let log = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&log_path)?;
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    if let Some(ns) = netns {
        cmd.args(["--netns", ns]);
    }
    cmd.args([
        "daemon",
        "-o",
        "json",
        "--upstream",
        &upstream,
        "--transport",
        args.transport.as_deref().unwrap_or("portforward"),
        "--cluster-domain",
        args.cluster_domain.as_deref().unwrap_or("cluster.local"),
        "--discover",
        "--check-routes",
    ]);
    cmd.arg("--status-file").arg(dir.join("live.json"));
    cmd.arg("--control-socket").arg(dir.join("control.sock"));
    if let Some(k) = &args.kubeconfig {
        cmd.arg("--kubeconfig").arg(k);
    }
    if let Some(c) = &args.context {
        cmd.args(["--context", c]);
    }
    if let Some(a) = &args.agent_address {
        cmd.args(["--agent-address", a]);
    }
    for c in &args.cidrs {
        cmd.args(["--cidr", &c.to_string()]);
    }
    for c in &args.also_proxy {
        cmd.args(["--also-proxy", &c.to_string()]);
    }
    for c in &args.never_proxy {
        cmd.args(["--never-proxy", &c.to_string()]);
    }
    if let Some(dns) = args.cluster_dns {
        cmd.args(["--cluster-dns", &dns.to_string()]);
    }
    for ns in &args.namespaces {
        cmd.args(["--namespace", ns]);
    }
    for d in &args.dns_suffixes {
        cmd.args(["--dns-suffix", d]);
    }
    for ns in &args.mapped_namespaces {
        cmd.args(["--mapped-namespaces", ns]);
    }
    if let Some(cg) = &args.cgroup {
        cmd.arg("--cgroup").arg(cg);
    }
    for i in &args.attach_ifaces {
        cmd.args(["--attach-iface", i]);
    }
    for n in &args.attach_netns {
        cmd.args(["--attach-netns", n]);
    }
    progress.step("starting tpbpfd");
    let (mut child, stdout) = spawn_in_background(&mut cmd, log)?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Step events, then the ready event (at most 64 lines are read).
        let mut lines = BufReader::new(stdout);
        for _ in 0..64 {
            let mut line = String::new();
            let last = !matches!(lines.read_line(&mut line), Ok(n) if n > 0);
            let step = !last && line.contains("\"event\":\"step\"");
            if tx.send(line).is_err() || !step {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut line = String::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        line = rx.recv_timeout(left).unwrap_or_default();
        match serde_json::from_str::<Value>(&line) {
            Ok(v) if v["event"] == "step" => {
                progress.step(
                    v["step"]
                        .as_str()
                        .unwrap_or("?")
                        .chars()
                        .take(80)
                        .collect::<String>(),
                );
            }
            _ => break,
        }
    }
    let ready: Value = match line {
        line if !line.is_empty() => {
            serde_json::from_str(&line).context("the bridge's ready event")?
        }
        _ => {
            let _ = child.kill();
            let status = child.wait().ok();
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            let last: Vec<&str> = log.lines().rev().take(10).collect();
            let last: Vec<&str> = last.into_iter().rev().collect();
            if made_dir {
                let _ = std::fs::remove_dir_all(&dir);
            }
            if status.and_then(|s| s.code()) == Some(i32::from(tpbpf_kube::NO_AGENT_EXIT)) {
                eprintln!("tpbpf: {}", tpbpf_kube::NO_AGENT);
                return Ok(ExitCode::from(tpbpf_kube::NO_AGENT_EXIT));
            }
            // The bridge's own error, all its lines, without the prefix.
            if let Some(at) = log.rfind("tpbpf: error: ") {
                bail!("{}", log[at + "tpbpf: error: ".len()..].trim_end());
            }
            bail!("the bridge did not start:\n{}", last.join("\n"));
        }
    };
    let info: tpbpf_kube::ClusterInfo = serde_json::from_value(ready["cluster"].clone())
        .context("the bridge's ready event has no cluster")?;
    for w in &info.warnings {
        progress.println(&format!("tpbpf: warning: {w}"));
    }
    let cidrs: Vec<String> = ready["cidrs"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let agent = ready["agent"].clone();
    let agent_text = match (&agent, ready["agent_error"].as_str()) {
        (Value::Object(a), _) => format!(
            "{} on {} (v{}, {}), reached through port-forward",
            a["pod"].as_str().unwrap_or("?"),
            a["node"].as_str().unwrap_or("?"),
            a["version"].as_str().unwrap_or("?"),
            if a["healthy"].as_bool() == Some(true) {
                "healthy"
            } else {
                "UNHEALTHY: run `tpbpf-agent info` on that node"
            }
        ),
        (_, Some(e)) => format!("not reachable: {e}"),
        _ => format!(
            "none found in {} (the tunnel needs tpbpf's agent installed)",
            tpbpf_kube::AGENT_NAMESPACE
        ),
    };
    let state = json!({
        "instance": args.instance,
        "pid": child.id(),
        // With the pid, what names this one process (see `down`).
        "start_time": super::recorded::start_time(child.id() as i32),
        "cluster": info,
        "agent": agent,
        "upstream": upstream,
        "bridge": ready,
        "log": log_path,
        // Where its identity comes from (paths, no credentials), for
        // `gather-logs`.
        "kubeconfig": args.kubeconfig,
        "context": args.context,
    });
    std::fs::write(
        dir.join("state.json"),
        serde_json::to_string_pretty(&state)?,
    )?;
    for spec in &intercepts {
        progress.step(format!(
            "intercepting {} port {}",
            spec.workload,
            spec.port.clone().into_vec().join(", ")
        ));
        super::intercept::from_config(&args.instance, spec, args.output).with_context(|| {
            format!(
                "the bridge is up, but the intercept of {} from the configuration failed (`tpbpf down` ends the bridge)",
                spec.workload
            )
        })?;
    }
    let mut state = state;
    state["steps"] = progress.steps();
    progress.finish();
    match args.output {
        o @ (Output::Json | Output::Yaml) => print!("{}", o.render(&state)),
        Output::Table => {
            println!("tpbpf is up: context {} ({})", info.context, info.server);
            println!("  bridged ranges: {}", cidrs.join(", "));
            println!("  pod ranges from: {}", info.pod_ranges_from);
            println!(
                "  cluster DNS: {} (domain {}; names resolve in {})",
                info.dns.map(|d| d.to_string()).unwrap_or("none".into()),
                info.cluster_domain,
                info.namespaces.first().cloned().unwrap_or_default()
            );
            println!(
                "  scope: cgroup {}",
                ready["cgroup"].as_str().unwrap_or("?")
            );
            println!("  agent: {agent_text}");
            println!(
                "  upstream: {}; tpbpfd pid {} (log {})",
                ready["upstream"].as_str().unwrap_or(&upstream),
                child.id(),
                log_path.display()
            );
            println!("`tpbpf status` shows it, `tpbpf down` removes it.");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Starts tpbpfd (or the user's side) in a session of its own, so it
/// outlives this command and the terminal's signals: stderr to `log`, its
/// stdout (the ready event) to read.
pub fn spawn_in_background(
    cmd: &mut Command,
    log: std::fs::File,
) -> Result<(std::process::Child, std::process::ChildStdout)> {
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(log);
    // SAFETY: setsid is async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(cmd, || {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("starting tpbpfd")?;
    let stdout = child.stdout.take().context("tpbpfd's stdout")?;
    Ok((child, stdout))
}

fn read_state(instance: &str) -> Option<Value> {
    let text = std::fs::read_to_string(state_dir(instance).join("state.json")).ok()?;
    serde_json::from_str(&text).ok()
}

pub fn status(args: StateArgs) -> Result<ExitCode> {
    let Some(mut state) = read_state(&args.instance) else {
        match args.output {
            o @ (Output::Json | Output::Yaml) => {
                print!(
                    "{}",
                    o.render(&json!({"instance": args.instance, "up": false}))
                )
            }
            Output::Table => println!(
                "tpbpf is down (bridge `{}`): `tpbpf up` starts it",
                args.instance
            ),
        }
        return Ok(ExitCode::from(3));
    };
    let running = state["pid"].as_i64().is_some_and(alive);
    state["up"] = json!(running);
    let live = std::fs::read_to_string(state_dir(&args.instance).join("live.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok());
    if let Some(live) = live.filter(|_| running) {
        state["live"] = live;
    }
    match args.output {
        o @ (Output::Json | Output::Yaml) => print!("{}", o.render(&state)),
        Output::Table => {
            if running {
                println!(
                    "tpbpf is up (bridge `{}`, tpbpfd pid {})",
                    args.instance, state["pid"]
                );
            } else {
                println!("tpbpf is NOT running: tpbpfd (pid {}) is gone; its programs were detached with it. `tpbpf down` clears this state, `tpbpf up` starts again. Its log: {}", state["pid"], state["log"].as_str().unwrap_or("?"));
            }
            println!(
                "  context: {} ({})",
                state["cluster"]["context"].as_str().unwrap_or("?"),
                state["cluster"]["server"].as_str().unwrap_or("?")
            );
            println!("  ranges: {}", state["bridge"]["cidrs"]);
            println!(
                "  upstream: {}",
                state["bridge"]["upstream"]
                    .as_str()
                    .or(state["upstream"].as_str())
                    .unwrap_or("?")
            );
            let t = &state["live"]["tunnel"];
            if t.is_object() {
                let health = if t["connected"] == true {
                    "connected".to_string()
                } else if let Some(p) = t["problem"].as_str() {
                    format!("DOWN: {p} (retrying by itself)")
                } else {
                    format!(
                        "DOWN: {}; resuming",
                        t["last_error"].as_str().unwrap_or("transport lost")
                    )
                };
                println!(
                    "  tunnel: {health}, via {}",
                    t["transport"].as_str().unwrap_or("?")
                );
                if let Some(tls) = t["tls"].as_str() {
                    println!("  tunnel TLS: {tls}");
                }
                println!(
                    "  session {}: rtt {}, {} streams, {} bytes sent, {} received, {} resumes, {} sessions since up",
                    t["session"].as_str().unwrap_or("?"),
                    t["rtt_ms"].as_f64().map(|r| format!("{r:.2} ms")).unwrap_or("?".into()),
                    t["streams"],
                    t["bytes_sent"],
                    t["bytes_received"],
                    t["resumes"],
                    t["sessions"]
                );
                if let Some(n) = t["datagrams_dropped"].as_u64().filter(|n| *n > 0) {
                    println!(
                        "  datagrams dropped at full queues on this side of the tunnel: {n} (UDP may drop; a steady count means the tunnel is the bottleneck)"
                    );
                }
            }
            match state["agent"].as_object() {
                Some(a) => println!(
                    "  agent: {} on {} (v{}, healthy: {}) when tpbpf up ran",
                    a["pod"].as_str().unwrap_or("?"),
                    a["node"].as_str().unwrap_or("?"),
                    a["version"].as_str().unwrap_or("?"),
                    a["healthy"]
                ),
                None => println!("  agent: none found when tpbpf up ran"),
            }
            println!(
                "  cgroup: {}",
                state["bridge"]["cgroup"].as_str().unwrap_or("?")
            );
            println!(
                "  programs: {} links: {}",
                state["bridge"]["program_ids"], state["bridge"]["link_ids"]
            );
        }
    }
    Ok(if running {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

pub fn down(args: StateArgs) -> Result<ExitCode> {
    let Some(state) = read_state(&args.instance) else {
        match args.output {
            Output::Table => println!("tpbpf is already down (bridge `{}`)", args.instance),
            o => print!(
                "{}",
                o.render(&json!({"instance": args.instance, "up": false, "stopped": false}))
            ),
        }
        return Ok(ExitCode::SUCCESS);
    };
    if let Some(pid) = state["pid"].as_i64().filter(|p| alive(*p)) {
        // The process recorded, not whatever has its pid now: the same
        // start time, held by a pidfd, then a tpbpf daemon of this bridge.
        let recorded = state["start_time"]
            .as_u64()
            .and_then(|start_time| {
                Some(super::recorded::Recorded {
                    pid: i32::try_from(pid).ok()?,
                    start_time,
                })
            })
            .and_then(|r| r.open())
            .filter(|p| is_bridge_daemon(pid, &args.instance) && p.alive());
        let Some(process) = recorded else {
            bail!(
                "the pid recorded for bridge `{}` ({pid}) is not its tpbpfd any more: nothing signalled; remove {} if the bridge is gone",
                args.instance,
                state_dir(&args.instance).display()
            );
        };
        let _ = process.signal(libc::SIGTERM);
        if !process.wait_exit(Duration::from_secs(5)) {
            let _ = process.signal(libc::SIGKILL);
        }
    }
    keep_last_log(&args.instance);
    let _ = std::fs::remove_dir_all(state_dir(&args.instance));
    match args.output {
        Output::Table => {
            println!("tpbpf is down: tpbpfd stopped, everything it attached is detached")
        }
        o => print!(
            "{}",
            o.render(&json!({"instance": args.instance, "up": false, "stopped": true}))
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// Where `down` keeps bridge `instance`'s last log (beside its state
/// directory, which goes), for `gather-logs` and a look after the fact.
pub fn last_log(instance: &str) -> PathBuf {
    let dir = state_dir(instance);
    dir.with_file_name(format!("{instance}.last.log"))
}

fn keep_last_log(instance: &str) {
    let log = state_dir(instance).join("tpbpfd.log");
    if log.exists() {
        if let Err(e) = std::fs::rename(&log, last_log(instance)) {
            tracing::debug!("keeping {}: {e}", log.display());
        }
    }
}
