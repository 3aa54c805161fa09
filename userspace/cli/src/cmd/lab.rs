//! `tpbpf lab up|down|status|restart`: the lab cluster (see tpbpf-lab).
use std::process::ExitCode;

use anyhow::{Context, Result};
use tpbpf_lab::Lab;

use super::lab_shell::Identity;
use crate::Output;

#[derive(clap::Args)]
pub struct LabArgs {
    #[command(subcommand)]
    action: LabAction,
    /// Lab instance name (prefix of its network namespaces).
    #[arg(long, global = true, env = "TPBPF_LAB", default_value = "tpbpf-lab")]
    name: String,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
enum AgentRuntimeArg {
    Auto,
    Runc,
    Process,
}

#[derive(clap::Subcommand)]
enum LabAction {
    /// Build the lab (idempotent): nodes, pods, ClusterIPs, DNS, servers,
    /// and tpbpf's agent on every node.
    Up {
        /// The node agent binary (default: `tpbpf-agent` next to this
        /// `tpbpf`, where `cargo build` puts it).
        #[arg(long, value_name = "PATH")]
        agent: Option<std::path::PathBuf>,
        /// Nodes without `spec.podCIDR`, as with Cilium's cluster-pool,
        /// Calico's IP pools or EKS's VPC CNI: discovery must find the pod
        /// ranges another way.
        #[arg(long)]
        no_node_pod_cidrs: bool,
        /// How the nodes run tpbpf's agent once it is installed: `runc`
        /// (an OCI runtime with the DaemonSet's security context: its
        /// capabilities, RuntimeDefault seccomp, no-new-privileges, a
        /// read-only root), `process` (a plain root process in the pod's
        /// network namespace), or `auto`: runc where it is installed.
        #[arg(long, value_enum, default_value_t = AgentRuntimeArg::Auto)]
        agent_runtime: AgentRuntimeArg,
        /// A WAN between the developer machine and the cluster:
        /// DELAY[,RATE[,LOSS]] each way (`20ms,1gbit,1%`). This kernel has
        /// no netem, so the lab runs the link itself (a process between two
        /// interfaces of namespace NAME-wan).
        #[arg(long, value_name = "DELAY,RATE,LOSS")]
        link: Option<tpbpf_lab::link::LinkSpec>,
    },
    /// Internal: the link process (started by `up --link`), between two
    /// interfaces of this network namespace.
    #[command(name = "__link", hide = true)]
    Link {
        spec: tpbpf_lab::link::LinkSpec,
        a: String,
        b: String,
    },
    /// Stop the lab's servers and remove everything it made.
    Down,
    /// Show what is running.
    Status,
    /// Replace a pod, as its controller does after a delete or a rollout:
    /// the old one stops and its network goes; a new one starts on the same
    /// node with a new address (and a new name, unless a StatefulSet's).
    /// Watches see it DELETED and ADDED.
    Restart {
        /// The pod's name (`tpbpf lab status` lists them).
        pod: String,
        /// Its namespace (default: wherever a pod of that name is).
        #[arg(short, long)]
        namespace: Option<String>,
    },
    /// A shell as on the developer machine: in its network namespace, with
    /// KUBECONFIG set to the lab's, and a cgroup of its own that a plain
    /// `tpbpf up` in it bridges. Cluster names resolve only through tpbpf.
    /// With COMMAND, runs that instead and passes its exit status on.
    Shell {
        /// Whose kubeconfig.
        #[arg(long, value_enum, default_value_t = Identity::Admin)]
        identity: Identity,
        #[arg(last = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// Print the lab's kubeconfig (as `kind get kubeconfig` does).
    Kubeconfig {
        /// Whose kubeconfig.
        #[arg(long, value_enum, default_value_t = Identity::Admin)]
        identity: Identity,
        /// Print where it is instead.
        #[arg(long)]
        path: bool,
    },
    /// Internal: serve the lab's Kubernetes API endpoint over HTTPS
    /// (started by `up`; the TLS and token flags are kube-apiserver's).
    #[command(hide = true)]
    Api {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        tls_cert_file: std::path::PathBuf,
        #[arg(long)]
        tls_private_key_file: std::path::PathBuf,
        /// Client certificates must chain to this CA.
        #[arg(long)]
        client_ca_file: std::path::PathBuf,
        /// Static bearer tokens: `token,user,uid[,"group1,group2"]` a line.
        #[arg(long)]
        token_auth_file: std::path::PathBuf,
        /// Where user lab-developer may port-forward (comma separated).
        #[arg(long, value_delimiter = ',')]
        restricted_namespaces: Vec<String>,
        /// The agent binary the nodes run once tpbpf's DaemonSet is applied.
        #[arg(long)]
        agent_bin: Option<std::path::PathBuf>,
    },
}

pub fn run(args: LabArgs) -> Result<ExitCode> {
    if let LabAction::Api {
        listen,
        tls_cert_file,
        tls_private_key_file,
        client_ca_file,
        token_auth_file,
        restricted_namespaces,
        agent_bin,
    } = &args.action
    {
        let cfg = tpbpf_lab_api::ApiConfig {
            lab: args.name.clone(),
            tls: tpbpf_lab_api::TlsFiles {
                cert: tls_cert_file.clone(),
                key: tls_private_key_file.clone(),
                client_ca: client_ca_file.clone(),
            },
            tokens: tpbpf_lab_api::auth::Tokens::read(token_auth_file)
                .with_context(|| format!("reading the token file {}", token_auth_file.display()))?,
            restricted_namespaces: restricted_namespaces.clone(),
            agent: agent_bin.clone(),
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind(listen).await?;
            tpbpf_lab_api::serve(listener, cfg).await
        })?;
        return Ok(ExitCode::SUCCESS);
    }
    if let LabAction::Link { spec, a, b } = &args.action {
        tpbpf_lab::link::run(*spec, a, b).context("the lab's link")?;
        return Ok(ExitCode::SUCCESS);
    }
    let exe_path = std::env::current_exe()?;
    let exe = exe_path.display().to_string();
    let agent = match &args.action {
        LabAction::Up { agent: Some(a), .. } => a.clone(),
        _ => exe_path.with_file_name("tpbpf-agent"),
    };
    let mut lab = Lab::new(&args.name).with_agent(agent.clone());
    if let LabAction::Up {
        link: Some(spec), ..
    } = &args.action
    {
        let probe = Lab::new(&args.name);
        lab = lab.with_link(
            *spec,
            vec![
                exe_path.display().to_string(),
                "--netns".into(),
                probe.wan_netns(),
                "lab".into(),
                "--name".into(),
                args.name.clone(),
                "__link".into(),
            ],
        );
    }
    if let LabAction::Up { agent_runtime, .. } = &args.action {
        use tpbpf_lab::agent::AgentRuntime;
        lab = lab.with_agent_runtime(match agent_runtime {
            AgentRuntimeArg::Auto => AgentRuntime::detect(),
            AgentRuntimeArg::Runc => AgentRuntime::Runc,
            AgentRuntimeArg::Process => AgentRuntime::Process,
        });
    }
    let lab = lab.clone().with_api(vec![
        exe,
        "--netns".into(),
        lab.fabric_netns(),
        "lab".into(),
        "api".into(),
        "--name".into(),
        args.name.clone(),
        "--agent-bin".into(),
        agent.display().to_string(),
    ]);
    let status = match args.action {
        LabAction::Shell { identity, command } => {
            return super::lab_shell::shell(&lab, identity, &command)
        }
        LabAction::Kubeconfig { identity, path } => {
            return super::lab_shell::kubeconfig(&lab, identity, path)
        }
        LabAction::Up {
            no_node_pod_cidrs, ..
        } => {
            let mut progress = crate::progress::Progress::new("lab up", args.output);
            lab.up_with(&mut |s| progress.step(s))?;
            progress.finish();
            lab.set_node_pod_cidrs(!no_node_pod_cidrs)?;
            lab.status()
        }
        LabAction::Down => {
            lab.down()?;
            if args.output == Output::Table {
                println!(
                    "lab {} is down: its namespaces, servers and state are gone",
                    args.name
                );
                return Ok(ExitCode::SUCCESS);
            }
            lab.status()
        }
        LabAction::Status => lab.status(),
        LabAction::Restart { pod, namespace } => {
            let new = lab.restart_pod(namespace.as_deref(), &pod)?;
            match args.output {
                o @ (Output::Json | Output::Yaml) => print!(
                    "{}",
                    o.render(&serde_json::json!({"old": pod, "new": new.name, "namespace": new.namespace, "node": new.node, "pod_ip": new.ip}))
                ),
                Output::Table => println!(
                    "pod {}/{pod} replaced by {} on {} ({})",
                    new.namespace, new.name, new.node, new.ip
                ),
            }
            return Ok(ExitCode::SUCCESS);
        }
        LabAction::Api { .. } | LabAction::Link { .. } => unreachable!("handled above"),
    };
    match args.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&status)?),
        Output::Yaml => print!("{}", Output::Yaml.render(&serde_json::to_value(&status)?)),
        Output::Table => {
            println!(
                "lab {}: {} (services {}, pods {}, domain {})",
                status.name,
                if status.up { "up" } else { "not up" },
                status.service_cidr,
                status.pod_cidr,
                status.cluster_domain
            );
            println!(
                "{:<12} {:<16} {:<7} {:<13} {:<9} STATE",
                "NAMESPACE", "POD", "NODE", "IP", "APP"
            );
            for p in &status.pods {
                println!(
                    "{:<12} {:<16} {:<7} {:<13} {:<9} {}",
                    p.namespace,
                    p.name,
                    p.node,
                    p.ip,
                    format!("{:?}", p.app).to_lowercase(),
                    if p.running { "running" } else { "stopped" }
                );
            }
            println!(
                "{:<12} {:<16} {:<13} PORTS",
                "NAMESPACE", "SERVICE", "CLUSTER-IP"
            );
            for s in &status.services {
                let ports: Vec<String> = s
                    .ports
                    .iter()
                    .map(|(p, proto)| format!("{p}/{proto}"))
                    .collect();
                println!(
                    "{:<12} {:<16} {:<13} {}",
                    s.namespace,
                    s.name,
                    s.cluster_ip,
                    ports.join(",")
                );
            }
            for (node, ns) in &status.nodes {
                println!("node {node}: network namespace {ns}");
            }
            println!(
                "agent runtime: {}",
                match status.agent_runtime {
                    tpbpf_lab::agent::AgentRuntime::Runc =>
                        "runc (the DaemonSet's security context: its capabilities, RuntimeDefault seccomp, no-new-privileges, read-only root)",
                    tpbpf_lab::agent::AgentRuntime::Process => "process (a root process in the pod's network namespace; no runc)",
                }
            );
            for a in status.agents.iter() {
                let Some(pod) = &a.pod else {
                    continue;
                };
                let state = if a.ready {
                    "ready".to_string()
                } else if a.running {
                    match &pod.probe_failure {
                        Some(f) => format!("running, not ready ({f})"),
                        None => "running, not ready yet".into(),
                    }
                } else {
                    match &pod.waiting {
                        Some(w) => format!("{} {}", w.reason, w.message),
                        None => "not running".into(),
                    }
                };
                println!(
                    "agent {}: {state}, {} restarts{}",
                    tpbpf_lab::agent::pod_name(a.node),
                    a.restarts,
                    a.pid.map(|p| format!(", pid {p}")).unwrap_or_default()
                );
            }
            println!(
                "developer machine: network namespace {} (reaches the API endpoint only)",
                status.dev_netns
            );
            match (&status.api_server, &status.kubeconfig) {
                (Some(url), Some(k)) => {
                    println!(
                        "API endpoint: {url} (CA {})",
                        status.ca_cert.as_deref().unwrap_or(k).display()
                    );
                    use tpbpf_lab::identity::*;
                    println!(
                        "kubeconfig: {} (client certificate, user {ADMIN_USER})",
                        k.display()
                    );
                    for (path, what, user) in [
                        (&status.kubeconfig_restricted, "token", DEVELOPER_USER),
                        (&status.kubeconfig_exec, "exec credential plugin", EXEC_USER),
                    ] {
                        if let Some(p) = path {
                            println!("kubeconfig: {} ({what}, user {user})", p.display());
                        }
                    }
                }
                _ => println!("API endpoint: not running"),
            }
        }
    }
    Ok(if status.up || matches!(args.action, LabAction::Down) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
