//! The main job: check the machine, then show a real redirected connection.
//!
//! Everything happens in a network namespace and a cgroup created for the
//! demo and removed afterwards (also on failure): the host's own routes,
//! cgroup root and DNS are never touched, and the demo's cluster address has
//! no route, so nothing leaves the machine.
use std::{fs, path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

use crate::{cargo, is_root, root_dir, run as run_cmd, step};

struct Cleanup {
    netns: String,
    cgroup: Option<PathBuf>,
    tpbpf: PathBuf,
    lab: Option<String>,
    instance: Option<String>,
    resolv: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(instance) = &self.instance {
            let _ = Command::new(&self.tpbpf)
                .args(["down", "--instance", instance])
                .status();
        }
        if let Some(lab) = &self.lab {
            let _ = Command::new(&self.tpbpf)
                .args(["lab", "down", "--name", lab])
                .status();
        }
        let _ = fs::remove_file(&self.resolv);
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        if let Some(cg) = &self.cgroup {
            // Children (tpbpf's own) are removed by tpbpf; this is the parent.
            let _ = fs::remove_dir(cg);
        }
    }
}

pub fn run() -> Result<()> {
    if !is_root() {
        bail!("the demo loads eBPF programs and creates a network namespace: run it as root (sudo bash xtask/dev.sh demo)");
    }
    step(
        "build tpbpf and its node agent (the kernel programs are built from bpf/ebpf and embedded)",
    );
    run_cmd(cargo().args(["build", "-p", "tpbpf", "-p", "tpbpf-agent"]))?;
    let tpbpf = root_dir().join("target/debug/tpbpf");

    step("tpbpf doctor: what this machine offers");
    let status = Command::new(&tpbpf).arg("doctor").status()?;
    if !status.success() {
        bail!("tpbpf doctor found a missing requirement (see the remedies above)");
    }

    let pid = std::process::id();
    let netns = format!("tpbpf-demo-{pid}");
    let mount = tpbpf_cgroup::cgroup2_mount()?;
    let parent = mount.join(format!("tpbpf-demo-{pid}"));
    let resolv = std::env::temp_dir().join(format!("tpbpf-demo-{pid}.resolv.conf"));
    let mut cleanup = Cleanup {
        netns: netns.clone(),
        cgroup: None,
        tpbpf: tpbpf.clone(),
        lab: None,
        instance: None,
        resolv: resolv.clone(),
    };

    step(&format!(
        "a network namespace for the demo ({netns}): only `lo`, no route to 10.96.0.0/12"
    ));
    run_cmd(Command::new("ip").args(["netns", "add", &netns]))?;
    run_cmd(Command::new("ip").args(["-n", &netns, "link", "set", "lo", "up"]))?;
    fs::create_dir(&parent).with_context(|| format!("creating {}", parent.display()))?;
    cleanup.cgroup = Some(parent.clone());

    step("without tpbpf: curl http://10.96.0.10/ fails at once (no route)");
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &netns,
            "curl",
            "-sS",
            "-m",
            "3",
            "http://10.96.0.10/",
        ])
        .output()?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    print!("{}", String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        bail!("curl reached 10.96.0.10 without tpbpf: the demo namespace is not isolated");
    }

    step("with tpbpf: the same curl, run in a bridged cgroup; connect4 sends it to tpbpf's listener, which recovers the original destination");
    let script = "curl -sS -m 5 http://10.96.0.10/ && curl -sS -m 5 http://10.100.3.4:8080/";
    let status = Command::new(&tpbpf)
        .args([
            "debug",
            "redirect",
            "--cidr",
            "10.96.0.0/12",
            "--netns",
            &netns,
        ])
        .arg("--cgroup-parent")
        .arg(&parent)
        .args(["--", "sh", "-c", script])
        .status()?;
    if !status.success() {
        bail!("the redirected curl failed ({status})");
    }

    let lab = format!("tpbpf-demo-lab-{pid}");
    step("the lab cluster: two nodes, pods with nginx, Redis and PostgreSQL, ClusterIPs, cluster DNS (tpbpf lab up)");
    cleanup.lab = Some(lab.clone());
    run_cmd(Command::new(&tpbpf).args(["lab", "up", "--name", &lab]))?;

    // The lab's developer namespace stands for the laptop: it reaches the
    // API endpoint and nothing else of the cluster. Its resolv.conf names a
    // local resolver; tpbpf captures port 53 whatever the address, so cluster
    // names resolve with no resolv.conf edit (and the machine's own DNS is
    // never used).
    let dev = format!("{lab}-dev");
    let kubeconfig = format!("/run/tpbpf-lab/{lab}/kubeconfig");
    fs::write(&resolv, "nameserver 127.0.0.53\n")?;
    let in_dev = |script: &str| -> Command {
        // Join the bridged cgroup first: `ip netns exec` hides the cgroup mount.
        let mut c = Command::new("sh");
        c.arg("-c").arg(format!(
            "echo $$ > {}/cgroup.procs && exec ip netns exec {dev} unshare -m sh -c 'mount --bind {} /etc/resolv.conf && sh -c \"$0\"' \"$1\"",
            parent.display(),
            resolv.display()
        ));
        c.arg("sh").arg(script);
        c
    };

    // kubectl as the developer runs it, against the lab's API endpoint.
    let kubectl_cmd = |args: &[&str]| {
        let mut c = Command::new("ip");
        c.args([
            "netns",
            "exec",
            &dev,
            "kubectl",
            "--kubeconfig",
            &kubeconfig,
        ])
        .args(args);
        c
    };
    let kubectl = |args: &[&str]| {
        println!("$ kubectl {}", args.join(" "));
        let _ = kubectl_cmd(args).status();
    };

    step("kubectl against the lab's API endpoint, from the developer namespace");
    kubectl(&["get", "pods", "-A"]);

    step("tpbpf install: the agent DaemonSet into the cluster (server-side apply), one agent per node");
    run_cmd(Command::new(&tpbpf).args(["--netns", &dev, "install", "--kubeconfig", &kubeconfig]))?;
    kubectl(&["-n", "tpbpf-system", "get", "pods"]);

    step("without tpbpf: the developer namespace cannot resolve or reach web.default");
    let out = in_dev("curl -sS -m 3 http://web.default/").output()?;
    print!("{}", String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        bail!("the lab is reachable without tpbpf: the demo namespaces are not isolated");
    }

    step("tpbpf up: discover the cluster through the kubeconfig, open the tunnel to an agent (port-forward through the API server), start tpbpfd in the background");
    let instance = format!("demo-{pid}");
    cleanup.instance = Some(instance.clone());
    run_cmd(
        Command::new(&tpbpf)
            .args([
                "--netns",
                &dev,
                "up",
                "--kubeconfig",
                &kubeconfig,
                "--instance",
                &instance,
                // Connected namespaces (the first for bare names).
                "-n",
                "default",
                "-n",
                "cache",
                "-n",
                "db",
            ])
            .arg("--cgroup")
            .arg(&parent),
    )?;

    step("real clients reach the cluster by name (DNS captured, connections redirected)");
    let script = "set -e; \
        echo '$ getent hosts web.default'; getent hosts web.default; \
        echo '$ curl http://web.default/'; curl -sS -m 5 http://web.default/; \
        echo '$ curl http://web.default.svc.cluster.local/'; curl -sS -m 5 http://web.default.svc.cluster.local/; \
        echo '$ redis-cli -h redis.cache ping'; redis-cli -h redis.cache ping; \
        echo \"$ psql -h postgres.db -U lab -c 'select 1'\"; psql -h postgres.db -U lab -d lab -Atc 'select 1'";
    let status = in_dev(script).status()?;
    if !status.success() {
        bail!("reaching the lab through tpbpf failed ({status})");
    }

    step("intercept: the cluster's requests for deployment web come to a server on the developer machine (no sidecar, no restart)");
    // The "developer's server": socat answering on the developer
    // namespace's loopback with a fixed page.
    let body = "hello from the developer machine";
    let page = std::env::temp_dir().join(format!("tpbpf-demo-{pid}.http"));
    fs::write(
        &page,
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}\n",
            body.len() + 1
        ),
    )?;
    let mut server = Command::new("ip")
        .args(["netns", "exec", &dev, "socat"])
        .arg("TCP-LISTEN:8080,bind=127.0.0.1,fork,reuseaddr")
        .arg(format!("SYSTEM:cat {}", page.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    // Ready once it listens (a loaded machine may take seconds to start it).
    let listening = || {
        Command::new("ip")
            .args(["netns", "exec", &dev, "ss", "-Hltn", "sport = :8080"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("127.0.0.1:8080"))
            .unwrap_or(false)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !listening() {
        if std::time::Instant::now() > deadline {
            let _ = server.kill();
            bail!("the developer's server (socat on 127.0.0.1:8080) did not start listening");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let client_pod = format!("{lab}-cache-redis-0");
    let from_pod = || -> Result<String> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &client_pod,
                "curl",
                "-sS",
                "-m",
                "5",
                "http://10.96.0.20/",
            ])
            .output()?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    println!("$ tpbpf intercept web --port 80:8080");
    let intercepted = Command::new(&tpbpf)
        .args([
            "intercept",
            "web",
            "--port",
            "80:8080",
            "--instance",
            &instance,
        ])
        .status();
    let result = (|| -> Result<()> {
        if !intercepted?.success() {
            bail!("tpbpf intercept failed");
        }
        println!("$ curl http://web.default/    (from pod redis-0, inside the cluster)");
        let got = from_pod()?;
        print!("{got}");
        if !got.contains(body) {
            bail!("the intercepted request did not reach the developer's server");
        }
        println!("$ tpbpf list");
        let _ = Command::new(&tpbpf)
            .args(["list", "--instance", &instance])
            .status();
        // A rollout replaces a pod: the intercept follows its workload.
        println!(
            "$ tpbpf lab restart web-7d4b9c-a1    (the pod is replaced: new name, new address)"
        );
        let out = Command::new(&tpbpf)
            .args([
                "lab",
                "--name",
                &lab,
                "restart",
                "web-7d4b9c-a1",
                "-o",
                "json",
            ])
            .output()?;
        if !out.status.success() {
            bail!(
                "tpbpf lab restart failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let answering = std::time::Instant::now();
        let new: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let (new_name, new_ip) = (
            new["new"].as_str().unwrap_or_default(),
            new["pod_ip"].as_str().unwrap_or_default(),
        );
        println!("pod web-7d4b9c-a1 replaced by {new_name} ({new_ip})");
        let url = format!("http://{new_ip}/");
        let mut got = String::new();
        while answering.elapsed() < std::time::Duration::from_secs(5) {
            let out = Command::new("ip")
                .args(["netns", "exec", &client_pod, "curl", "-sS", "-m", "2", &url])
                .output()?;
            got = String::from_utf8_lossy(&out.stdout).into_owned();
            if got.contains(body) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let took = answering.elapsed();
        println!("$ curl {url}    (the new pod, from pod redis-0)");
        print!("{got}");
        if !got.contains(body) {
            bail!("the new pod {new_name} was not intercepted within 5 s");
        }
        println!(
            "the new pod was intercepted {} ms after it answered",
            took.as_millis()
        );
        if took > std::time::Duration::from_secs(2) {
            bail!("the new pod took {took:?} to be intercepted, more than 2 s");
        }
        println!("$ tpbpf list");
        let _ = Command::new(&tpbpf)
            .args(["list", "--instance", &instance])
            .status();
        println!("$ tpbpf leave web-80");
        run_cmd(Command::new(&tpbpf).args(["leave", "web-80", "--instance", &instance]))?;
        println!("$ curl http://web.default/    (from pod redis-0)");
        let got = from_pod()?;
        print!("{got}");
        if !got.contains("served by nginx") {
            bail!("after leave, nginx did not answer");
        }
        Ok(())
    })();
    let _ = server.kill();
    let _ = server.wait();
    let _ = fs::remove_file(&page);
    result?;

    step("tpbpf status, then tpbpf down");
    let _ = Command::new(&tpbpf)
        .args(["status", "--instance", &instance])
        .status();
    // The programs this bridge loaded, to check they go with it.
    let state = Command::new(&tpbpf)
        .args(["status", "-o", "json", "--instance", &instance])
        .output()?;
    let state: serde_json::Value = serde_json::from_slice(&state.stdout).unwrap_or_default();
    let ours: Vec<u64> = state["bridge"]["program_ids"]
        .as_array()
        .map(|a| a.iter().filter_map(serde_json::Value::as_u64).collect())
        .unwrap_or_default();
    if ours.is_empty() {
        bail!("tpbpf status names no programs of the bridge: {state}");
    }
    run_cmd(Command::new(&tpbpf).args(["down", "--instance", &instance]))?;
    cleanup.instance = None;

    step("tpbpf uninstall: the agents leave the cluster");
    run_cmd(Command::new(&tpbpf).args([
        "--netns",
        &dev,
        "uninstall",
        "--kubeconfig",
        &kubeconfig,
    ]))?;

    // Nothing of tpbpf stays in the cluster.
    let out = kubectl_cmd(&[
        "get",
        "namespaces,serviceaccounts,daemonsets,clusterroles,roles,pods",
        "-A",
        "-l",
        "app.kubernetes.io/part-of=tpbpf",
        "-o",
        "name",
    ])
    .output()?;
    let left = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !left.trim().is_empty() {
        bail!(
            "tpbpf uninstall left objects in the cluster: {left}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    println!("no object labelled app.kubernetes.io/part-of=tpbpf is left");

    step("tpbpf lab down");
    run_cmd(Command::new(&tpbpf).args(["lab", "down", "--name", &lab]))?;
    cleanup.lab = None;

    step("after tpbpf exits: nothing stays attached");
    let leftover: Vec<_> = fs::read_dir(&parent)?
        .flatten()
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .map(|e| e.path())
        .collect();
    if !leftover.is_empty() {
        bail!("cgroups left behind: {leftover:?}");
    }
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()?;
    let loaded: Vec<u64> = serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| {
            v.as_array()
                .map(|a| a.iter().filter_map(|p| p["id"].as_u64()).collect())
        })
        .unwrap_or_default();
    let left: Vec<u64> = ours
        .iter()
        .copied()
        .filter(|id| loaded.contains(id))
        .collect();
    println!(
        "the bridge's {} programs still in the kernel: {}; tpbpf cgroups left: 0",
        ours.len(),
        left.len()
    );
    if !left.is_empty() {
        bail!("the bridge's programs are still loaded: {left:?}");
    }
    drop(cleanup);
    println!("\ndemo done: the machine is as it was.");
    Ok(())
}
