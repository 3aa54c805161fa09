//! tpbpf's agent pod on a lab node, as a kubelet and its container runtime
//! run it: the container spec read from the DaemonSet's pod template, the
//! runtime that runs it (runc with the spec's security context where runc
//! is installed, a plain process otherwise), and the pod's state as the
//! kubelet last saw it (ready, restarts, why it waits), kept in the lab's
//! state directory so `lab status` and the API report the same thing.
use std::{
    fs,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{alive, oci, spec, write, Lab, LabError, Result};

/// How the lab runs the agent's container.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentRuntime {
    /// An OCI runtime (runc) with the container's security context: its
    /// capabilities, seccomp profile, no-new-privileges, a read-only root.
    Runc,
    /// A plain process in the pod's network namespace, as root with every
    /// capability (no runc on the machine).
    #[default]
    Process,
}

impl AgentRuntime {
    /// runc where it is installed, a plain process otherwise.
    pub fn detect() -> Self {
        if oci::runc_installed() {
            AgentRuntime::Runc
        } else {
            AgentRuntime::Process
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AgentRuntime::Runc => "runc",
            AgentRuntime::Process => "process",
        }
    }
}

/// `seccompProfile.type` of a container (or its pod).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Seccomp {
    /// The runtime's default profile (containers-common's here).
    RuntimeDefault,
    /// A profile file on the node (`localhostProfile`).
    Localhost(PathBuf),
    #[default]
    Unconfined,
}

/// What a container runtime needs of one container of a pod template: the
/// process, its environment (the downward API resolved for the node), and
/// its security context.
#[derive(Clone, Debug, Default)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    /// `command`; empty: the image's entrypoint (`/tpbpf-agent`).
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub privileged: bool,
    pub caps_add: Vec<String>,
    pub caps_drop: Vec<String>,
    pub read_only_root: bool,
    /// `allowPrivilegeEscalation: false`.
    pub no_new_privileges: bool,
    pub run_as_user: u32,
    pub seccomp: Seccomp,
    /// hostPID: the node's PID namespace, not one of the pod's own.
    pub host_pid: bool,
    /// `resources.limits`: CPU in millicores, memory in bytes.
    pub cpu_limit_millis: Option<u64>,
    pub memory_limit_bytes: Option<u64>,
}

/// The pod name of the agent on `node`.
pub fn pod_name(node: &str) -> String {
    format!("tpbpf-agent-{node}")
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// A Kubernetes quantity of CPU in millicores (`500m`, `1`, `1.5`).
fn cpu_millis(q: &str) -> Option<u64> {
    match q.strip_suffix('m') {
        Some(m) => m.parse().ok(),
        None => q.parse::<f64>().ok().map(|c| (c * 1000.0) as u64),
    }
}

/// A Kubernetes quantity of memory in bytes (`512Mi`, `1G`, `1000`).
fn bytes(q: &str) -> Option<u64> {
    let units: [(&str, u64); 8] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    for (suffix, mult) in units {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<u64>().ok().map(|n| n * mult);
        }
    }
    q.parse().ok()
}

fn seccomp_of(v: &Value) -> Option<Seccomp> {
    match v["type"].as_str()? {
        "RuntimeDefault" => Some(Seccomp::RuntimeDefault),
        "Localhost" => Some(Seccomp::Localhost(
            v["localhostProfile"].as_str().unwrap_or_default().into(),
        )),
        _ => Some(Seccomp::Unconfined),
    }
}

impl ContainerSpec {
    /// The first container of pod template `template` (a DaemonSet's
    /// `spec.template`) as the kubelet on `node` runs it: `fieldRef`
    /// variables resolved for the node and the agent's pod.
    pub fn from_template(template: &Value, node: &spec::Node) -> Result<Self, String> {
        let pod = &template["spec"];
        let c = &pod["containers"][0];
        if !c.is_object() {
            return Err("the pod template has no container".into());
        }
        let mut env = Vec::new();
        for e in c["env"].as_array().into_iter().flatten() {
            let Some(name) = e["name"].as_str() else {
                continue;
            };
            let value = if let Some(v) = e["value"].as_str() {
                v.to_string()
            } else if let Some(path) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                match path {
                    "spec.nodeName" => node.name.into(),
                    "status.hostIP" | "status.hostIPs" => node.ip.into(),
                    "status.podIP" | "status.podIPs" => node.agent_ip.into(),
                    "metadata.name" => pod_name(node.name),
                    "metadata.namespace" => tpbpf_agent_api::NAMESPACE.into(),
                    other => {
                        return Err(format!("env {name}: fieldPath {other} is not in the lab"))
                    }
                }
            } else {
                return Err(format!(
                    "env {name}: only value and fieldRef are in the lab"
                ));
            };
            env.push((name.to_string(), value));
        }
        let sc = &c["securityContext"];
        let seccomp = seccomp_of(&sc["seccompProfile"])
            .or_else(|| seccomp_of(&pod["securityContext"]["seccompProfile"]))
            // The kubelet's default (SeccompDefault off): unconfined.
            .unwrap_or_default();
        let limits = &c["resources"]["limits"];
        Ok(ContainerSpec {
            name: c["name"].as_str().unwrap_or("agent").to_string(),
            image: c["image"].as_str().unwrap_or_default().to_string(),
            command: strings(&c["command"]),
            args: strings(&c["args"]),
            env,
            privileged: sc["privileged"].as_bool().unwrap_or(false),
            caps_add: strings(&sc["capabilities"]["add"]),
            caps_drop: strings(&sc["capabilities"]["drop"]),
            read_only_root: sc["readOnlyRootFilesystem"].as_bool().unwrap_or(false),
            no_new_privileges: sc["allowPrivilegeEscalation"].as_bool() == Some(false),
            run_as_user: sc["runAsUser"]
                .as_u64()
                .or_else(|| pod["securityContext"]["runAsUser"].as_u64())
                .unwrap_or(0) as u32,
            seccomp,
            host_pid: pod["hostPID"].as_bool().unwrap_or(false),
            cpu_limit_millis: limits["cpu"].as_str().and_then(cpu_millis),
            memory_limit_bytes: limits["memory"].as_str().and_then(bytes),
        })
    }

    /// The capabilities the process gets, as containerd computes them:
    /// every one when privileged, else its default set minus `drop`
    /// (`ALL`: all) plus `add`; names as `CAP_X`.
    pub fn capabilities(&self) -> Vec<String> {
        let norm = |c: &str| {
            let c = c.to_ascii_uppercase();
            if c.starts_with("CAP_") {
                c
            } else {
                format!("CAP_{c}")
            }
        };
        if self.privileged {
            return oci::ALL_CAPS.iter().map(|c| c.to_string()).collect();
        }
        let drop_all = self.caps_drop.iter().any(|c| c.eq_ignore_ascii_case("ALL"));
        let dropped: Vec<String> = self.caps_drop.iter().map(|c| norm(c.as_str())).collect();
        let mut caps: Vec<String> = if drop_all {
            Vec::new()
        } else {
            oci::DEFAULT_CAPS
                .iter()
                .map(|c| c.to_string())
                .filter(|c| !dropped.contains(c))
                .collect()
        };
        for c in &self.caps_add {
            let c = norm(c);
            if c == "CAP_ALL" {
                return oci::ALL_CAPS.iter().map(|c| c.to_string()).collect();
            }
            if !caps.contains(&c) {
                caps.push(c);
            }
        }
        caps
    }
}

/// Why a container is not running, as `containerStatuses[].state.waiting`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Waiting {
    pub reason: String,
    pub message: String,
}

/// How a container's last run ended (`lastState.terminated`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Terminated {
    pub exit_code: i32,
    pub reason: String,
    pub message: String,
    pub started_at: u64,
    pub finished_at: u64,
}

/// The agent pod on one node as the lab's kubelet keeps it: written by the
/// kubelet on every change, read by `status` (and so by the API). Times
/// are Unix seconds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentPodState {
    /// Bumped on every change: the pod's resourceVersion.
    pub version: u64,
    /// When this pod was made (a DaemonSet change makes a new one).
    pub created_at: u64,
    /// The DaemonSet's resourceVersion it was made from (up to date or
    /// not, for `updatedNumberScheduled`).
    pub generation: String,
    pub image: String,
    pub runtime: AgentRuntime,
    /// The readiness probe passed (or there is none and the container runs).
    pub ready: bool,
    /// When `ready` last changed (the Ready condition's lastTransitionTime).
    pub ready_changed_at: u64,
    /// The last readiness probe failure, while not ready.
    pub probe_failure: Option<String>,
    pub restart_count: u32,
    /// When the running container started; `None` while it waits.
    pub started_at: Option<u64>,
    pub waiting: Option<Waiting>,
    pub last_terminated: Option<Terminated>,
    /// Whether it has run once (the pod is Running, not Pending).
    pub ever_started: bool,
}

pub fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A started agent container: the process the lab waits for (the agent
/// itself, or `runc run`, which exits with the container's status) and the
/// agent's pid.
pub struct AgentProcess {
    pub child: Child,
    pub pid: u32,
}

impl Lab {
    fn agent_state_path(&self, node: &str) -> PathBuf {
        self.state.join(format!("agent-{node}.json"))
    }

    /// The agent pod on `node` as the kubelet last wrote it; `None` when
    /// there is none (no DaemonSet, or the kubelet has not seen it yet).
    pub fn agent_state(&self, node: &str) -> Option<AgentPodState> {
        fs::read(self.agent_state_path(node))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    }

    /// Writes the agent pod's state (atomically: readers never see half).
    pub fn set_agent_state(&self, node: &str, state: &AgentPodState) -> Result<()> {
        let path = self.agent_state_path(node);
        let tmp = path.with_extension("json.tmp");
        write(&tmp, &serde_json::to_string(state).unwrap_or_default())?;
        fs::rename(&tmp, &path).map_err(|source| LabError::Io {
            what: format!("writing {}", path.display()),
            source,
        })
    }

    /// The agent pod on `node` is gone (its DaemonSet was deleted).
    pub fn remove_agent_state(&self, node: &str) {
        let _ = fs::remove_file(self.agent_state_path(node));
    }

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
                            log_tail(&log)
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
        log_tail(&self.state.join(format!("agent-{node}.log")))
    }
}

/// The last few lines of a log file, without terminal colours.
fn log_tail(path: &std::path::Path) -> String {
    let raw = fs::read_to_string(path).unwrap_or_default();
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
    lines[lines.len().saturating_sub(5)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> spec::Node {
        spec::nodes().remove(0)
    }

    #[test]
    fn a_container_spec_is_read_from_the_daemonset_template_as_a_kubelet_reads_it() {
        let t = serde_json::json!({"spec": {"hostPID": true,
            "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "agent", "image": "x/agent:1", "args": ["serve", "--listen", "127.0.0.1:4390"],
              "env": [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                      {"name": "NODE_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
                      {"name": "PLAIN", "value": "v"}],
              "resources": {"limits": {"cpu": "1", "memory": "512Mi"}},
              "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "runAsUser": 0,
                "capabilities": {"drop": ["ALL"], "add": ["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"]}}}]}});
        let c = ContainerSpec::from_template(&t, &node()).unwrap();
        assert_eq!(c.args, ["serve", "--listen", "127.0.0.1:4390"]);
        assert_eq!(
            c.env,
            [
                ("NODE_NAME".to_string(), "node1".to_string()),
                ("NODE_IP".into(), "172.31.0.11".into()),
                ("PLAIN".into(), "v".into())
            ]
        );
        assert!(c.host_pid && c.read_only_root && c.no_new_privileges);
        assert_eq!(c.seccomp, Seccomp::RuntimeDefault);
        assert_eq!(c.cpu_limit_millis, Some(1000));
        assert_eq!(c.memory_limit_bytes, Some(512 << 20));
        assert_eq!(
            c.capabilities(),
            [
                "CAP_BPF",
                "CAP_NET_ADMIN",
                "CAP_SYS_ADMIN",
                "CAP_SYS_PTRACE"
            ]
        );
    }

    #[test]
    fn capabilities_start_from_containerds_default_set() {
        let c = ContainerSpec {
            caps_drop: vec!["NET_RAW".into()],
            caps_add: vec!["NET_ADMIN".into()],
            ..Default::default()
        };
        let caps = c.capabilities();
        assert!(caps.contains(&"CAP_CHOWN".to_string()));
        assert!(caps.contains(&"CAP_NET_ADMIN".to_string()));
        assert!(!caps.contains(&"CAP_NET_RAW".to_string()));
        assert!(!caps.contains(&"CAP_SYS_ADMIN".to_string()));
    }

    #[test]
    fn quantities() {
        assert_eq!(cpu_millis("50m"), Some(50));
        assert_eq!(cpu_millis("1.5"), Some(1500));
        assert_eq!(bytes("64Mi"), Some(64 << 20));
        assert_eq!(bytes("1G"), Some(1_000_000_000));
    }
}
