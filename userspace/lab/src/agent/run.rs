//! Starting and stopping the agent on a node, as the kubelet and its
//! container runtime would: under runc with the container's security
//! context, or as a plain process; exec in it; its pid and its log.
use std::{
    fs,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use super::{pod_name, AgentProcess, AgentRuntime, ContainerSpec};
use crate::{alive, oci, spec, write, Lab, LabError, Result};

impl Lab {
    /// How this lab runs the agent: chosen at `up` (the `agent-runtime`
    /// file), a plain process for a lab made before there was a choice.
    pub fn agent_runtime(&self) -> AgentRuntime {
        fs::read_to_string(self.state.join("agent-runtime"))
            .ok()
            .and_then(|s| serde_json::from_str(&format!("\"{}\"", s.trim())).ok())
            .unwrap_or_default()
    }

    pub fn agent_pid(&self, node: &str) -> Option<i32> {
        fs::read_to_string(self.agent_pid_path(node))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn agent_pid_path(&self, node: &str) -> PathBuf {
        self.state.join(format!("agent-{node}.pid"))
    }

    /// The runc container of the agent on `node`.
    pub fn agent_container_id(&self, node: &str) -> String {
        format!("{}-agent-{node}", self.name)
    }

    /// runc's state directory for this lab's containers (`runc --root`).
    pub fn runc_root(&self) -> PathBuf {
        self.state.join("runc")
    }

    /// What the kubelet does for the agent DaemonSet's pod on `node`: runs
    /// the container `c` in the agent's pod network namespace, with a
    /// resolv.conf naming the cluster DNS (dnsPolicy ClusterFirst) and
    /// `NODE_NETNS` (the node is a network namespace here, not PID 1's:
    /// the agent reads the node's routes there). Under runc with the
    /// container's security context; else as a plain process.
    pub fn start_agent(&self, node: &spec::Node, c: &ContainerSpec) -> Result<AgentProcess> {
        let Some(agent) = &self.agent else {
            return Err(LabError::AgentMissing {
                path: "tpbpf-agent".into(),
            });
        };
        let cluster_dns = spec::services()
            .iter()
            .find(|s| s.name == "kube-dns")
            .map(|s| s.cluster_ip)
            .unwrap_or("10.96.0.10");
        let resolv = self.state.join("agent-resolv.conf");
        write(
            &resolv,
            &format!(
                "nameserver {cluster_dns}\nsearch tpbpf-system.svc.{d} svc.{d} {d}\n",
                d = spec::CLUSTER_DOMAIN
            ),
        )?;
        let node_netns = format!("/run/netns/{}", self.node_netns(node.name));
        let mut env: Vec<(String, String)> = vec![(
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        )];
        env.extend(c.env.iter().cloned());
        env.push(("NODE_NETNS".into(), node_netns.clone()));
        let service_account = c.service_account.then(|| self.agent_service_account_dir());
        if service_account.is_some() {
            env.push((
                "KUBERNETES_SERVICE_HOST".into(),
                crate::API_SERVICE_IP.into(),
            ));
            env.push(("KUBERNETES_SERVICE_PORT".into(), "443".into()));
        }
        let log = self.state.join(format!("agent-{}.log", node.name));
        let pid_file = self.agent_pid_path(node.name);
        let _ = fs::remove_file(&pid_file);
        let (mut cmd, what) = match self.agent_runtime() {
            AgentRuntime::Process => {
                // `ip netns exec` runs in a mount namespace of its own: the
                // bind mount is the agent's alone.
                let mut cmd = Command::new("ip");
                cmd.env_clear()
                    .envs(env.iter().map(|(k, v)| (k, v)))
                    // No mount of its own here: the agent is told where
                    // the service account's files are.
                    .envs(
                        service_account
                            .iter()
                            .map(|d| (tpbpf_agent_api::SERVICE_ACCOUNT_DIR_ENV, d.as_os_str())),
                    )
                    .args(["netns", "exec", &self.agent_netns(node.name), "sh", "-c"])
                    .arg(format!(
                        "mount --bind {} /etc/resolv.conf && exec \"$0\" \"$@\"",
                        resolv.display()
                    ));
                if c.command.is_empty() {
                    cmd.arg(agent);
                } else {
                    cmd.args(&c.command);
                }
                cmd.args(&c.args);
                (cmd, format!("the agent ({})", agent.display()))
            }
            AgentRuntime::Runc => {
                let rootfs = oci::stage_rootfs(&self.state.join("agent-rootfs"), agent)?;
                let bundle = self.state.join(format!("agent-{}-bundle", node.name));
                crate::mkdir(&bundle)?;
                let config = oci::config(&oci::Bundle {
                    container: c,
                    rootfs: &rootfs,
                    agent,
                    hostname: &pod_name(node.name),
                    env: &env,
                    netns: &format!("/run/netns/{}", self.agent_netns(node.name)),
                    resolv: &resolv,
                    node_netns: &node_netns,
                    cgroup: &format!("tpbpf-lab.{}", self.agent_container_id(node.name)),
                    service_account: service_account.as_deref(),
                })?;
                write(
                    &bundle.join("config.json"),
                    &serde_json::to_string_pretty(&config).unwrap_or_default(),
                )?;
                // A container left by a kubelet that died.
                self.runc_delete(node.name);
                let mut cmd = Command::new("runc");
                cmd.arg("--root")
                    .arg(self.runc_root())
                    .arg("run")
                    .arg("--bundle")
                    .arg(&bundle)
                    .arg("--pid-file")
                    .arg(&pid_file)
                    .arg(self.agent_container_id(node.name));
                (cmd, format!("the agent under runc ({})", agent.display()))
            }
        };
        let child = crate::spawn_child(&mut cmd, &log, &what)?;
        let pid = match self.agent_runtime() {
            AgentRuntime::Process => {
                write(&pid_file, &child.id().to_string())?;
                child.id()
            }
            // runc writes the container's pid once it is created.
            AgentRuntime::Runc => {
                let mut child = child;
                let deadline = Instant::now() + Duration::from_secs(10);
                loop {
                    if let Some(pid) = self.agent_pid(node.name) {
                        return Ok(AgentProcess {
                            child,
                            pid: pid as u32,
                        });
                    }
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err(LabError::NotReady(format!(
                            "runc could not start the agent on {} ({status}); the end of {}:\n{}",
                            node.name,
                            log.display(),
                            log_tail(&log, 5).unwrap_or_default()
                        )));
                    }
                    if Instant::now() > deadline {
                        let _ = child.kill();
                        let _ = child.wait();
                        self.runc_delete(node.name);
                        return Err(LabError::NotReady(format!(
                            "runc did not start the agent on {} in 10 s (see {})",
                            node.name,
                            log.display()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        Ok(AgentProcess { child, pid })
    }

    /// Runs `argv` in the agent container on `node` (an exec probe), with
    /// `timeout`: whether it exited 0, or why not.
    pub fn exec_in_agent(
        &self,
        node: &str,
        argv: &[String],
        timeout: Duration,
    ) -> Result<(), String> {
        if argv.is_empty() {
            return Err("an exec probe without a command".into());
        }
        let mut cmd = match self.agent_runtime() {
            AgentRuntime::Runc => {
                let mut c = Command::new("runc");
                c.arg("--root")
                    .arg(self.runc_root())
                    .arg("exec")
                    .arg(self.agent_container_id(node));
                c
            }
            AgentRuntime::Process => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &self.agent_netns(node)]);
                c
            }
        };
        let mut child = cmd
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("running {}: {e}", argv[0]))?;
        let deadline = Instant::now() + timeout;
        loop {
            match child.try_wait() {
                Ok(Some(st)) if st.success() => return Ok(()),
                Ok(Some(st)) => {
                    let mut err = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        let _ = std::io::Read::read_to_string(&mut e, &mut err);
                    }
                    return Err(format!("command {argv:?} {st}: {}", err.trim()));
                }
                Ok(None) if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!("command {argv:?} timed out after {timeout:?}"));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    /// Stops the agent on `node`, if it runs (its DaemonSet is gone or
    /// changed, or the lab goes down): `runc kill` then `runc delete` for a
    /// container, SIGTERM then SIGKILL for a process.
    pub fn stop_agent(&self, node: &str) {
        let runc = self
            .runc_root()
            .join(self.agent_container_id(node))
            .exists();
        if runc {
            let _ = self.runc(&["kill", &self.agent_container_id(node), "TERM"]);
            let deadline = Instant::now() + Duration::from_secs(3);
            while self.agent_pid(node).is_some_and(alive) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            self.runc_delete(node);
        }
        if let Some(pid) = self.agent_pid(node) {
            crate::stop_pid(pid);
        }
        let _ = fs::remove_file(self.agent_pid_path(node));
    }

    /// The agent on `node` has exited: its pid file and its container go.
    pub fn forget_agent(&self, node: &str) {
        self.runc_delete(node);
        let _ = fs::remove_file(self.agent_pid_path(node));
    }

    /// `runc delete --force` of the agent container on `node` (kills it if
    /// it still runs, removes its cgroup and state).
    fn runc_delete(&self, node: &str) {
        if self
            .runc_root()
            .join(self.agent_container_id(node))
            .exists()
        {
            let _ = self.runc(&["delete", "--force", &self.agent_container_id(node)]);
        }
    }

    fn runc(&self, args: &[&str]) -> std::io::Result<std::process::Output> {
        Command::new("runc")
            .arg("--root")
            .arg(self.runc_root())
            .args(args)
            .stdin(Stdio::null())
            .output()
    }

    /// Whether the agent on `node` runs.
    pub fn agent_running(&self, node: &str) -> bool {
        self.agent_pid(node).is_some_and(alive)
    }

    /// The last lines of the agent's log on `node`.
    pub fn agent_log_tail(&self, node: &str) -> String {
        log_tail(&self.state.join(format!("agent-{node}.log")), 5).unwrap_or_default()
    }

    /// The agent's log on `node`, its last `lines` lines (what `pods/log`
    /// of its pod answers); `None` where it has none.
    pub fn agent_log(&self, node: &str, lines: usize) -> Option<String> {
        log_tail(&self.state.join(format!("agent-{node}.log")), lines)
    }
}

/// The last `n` lines of a log file, without terminal colours.
fn log_tail(path: &std::path::Path, n: usize) -> Option<String> {
    let raw = fs::read_to_string(path).ok()?;
    let mut text = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ parameters, up to a final letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            text.push(c);
        }
    }
    let lines: Vec<&str> = text.lines().collect();
    Some(lines[lines.len().saturating_sub(n)..].join("\n"))
}
