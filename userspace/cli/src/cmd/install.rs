//! `tpbpf install` / `uninstall`: tpbpf's agent into the kubeconfig's
//! cluster (server-side apply of what tpbpf-deploy builds), waiting until an
//! agent is ready on every node, and out again.
use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Yaml,
    Json,
}

#[derive(clap::Args)]
pub struct InstallArgs {
    /// kubeconfig to use (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long)]
    kubeconfig: Option<std::path::PathBuf>,
    /// kubeconfig context (default: the current one).
    #[arg(long)]
    context: Option<String>,
    /// The agent image.
    #[arg(long)]
    image: Option<String>,
    /// The cluster's service and pod ranges (repeatable; default:
    /// discovered, as `tpbpf up` does). Tunnels reach only these.
    #[arg(long = "cluster-cidr", value_name = "CIDR")]
    cluster_cidrs: Vec<tpbpf_sys::Cidr>,
    /// A further range developers may reach through the agent (repeatable).
    #[arg(long = "allow-cidr", value_name = "CIDR")]
    allow_cidrs: Vec<tpbpf_sys::Cidr>,
    /// Seconds a disconnected developer's session keeps its intercepts.
    #[arg(long, default_value_t = 30)]
    resume_window_s: u64,
    /// What taking a pod's traffic asks of a developer's Kubernetes
    /// identity, which the agent checks with the API server: `patch-pod`
    /// (the right to change the pod), `patch-workload` (to change its
    /// Deployment, StatefulSet or DaemonSet, as a sidecar injection does),
    /// or `port-forward` (relaxed: `pods/portforward` on the pod).
    #[arg(long, value_enum, default_value_t = InterceptRights::PatchPod)]
    intercept_rights: InterceptRights,
    /// Print what would be applied, apply nothing.
    #[arg(long)]
    dry_run: bool,
    /// With --dry-run: the format.
    #[arg(short, long, value_enum, default_value_t = Format::Yaml)]
    output: Format,
    /// How long to wait for an agent on every node.
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
}

#[derive(clap::Args)]
pub struct UninstallArgs {
    #[arg(long)]
    kubeconfig: Option<std::path::PathBuf>,
    #[arg(long)]
    context: Option<String>,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Progress, when there is any to show.
struct Steps(Option<crate::progress::Progress>);

impl Steps {
    fn step(&mut self, what: &str) {
        if let Some(p) = &mut self.0 {
            p.step(what);
        }
    }

    fn say(&self, line: &str) {
        match &self.0 {
            Some(p) => p.say(line),
            None => println!("{line}"),
        }
    }

    fn println(&self, line: &str) {
        match &self.0 {
            Some(p) => p.println(line),
            None => eprintln!("{line}"),
        }
    }
}

pub fn install(args: InstallArgs) -> Result<ExitCode> {
    // A dry run only prints the manifests.
    let mut progress = Steps(
        (!args.dry_run).then(|| crate::progress::Progress::new("install", crate::Output::Table)),
    );
    runtime()?.block_on(async move {
        let mut cidrs: Vec<String> = args.cluster_cidrs.iter().map(ToString::to_string).collect();
        let client = if cidrs.is_empty() || !args.dry_run {
            progress.step("reading the kubeconfig");
            let (client, ctx, server, ns) =
                tpbpf_kube::client(args.kubeconfig.as_deref(), args.context.as_deref()).await?;
            if cidrs.is_empty() {
                let given = tpbpf_kube::Given {
                    ranges: false,
                    dns: true,
                };
                progress.step("discovering the cluster's ranges");
                let info = tpbpf_kube::discover(&client, &ctx, &server, &ns, "cluster.local", given)
                    .await
                    .context("finding the cluster's ranges (or give them with --cluster-cidr)")?;
                for w in &info.warnings {
                    progress.println(&format!("tpbpf: warning: {w}"));
                }
                progress.println(&format!(
                    "tpbpf: the agents may dial {} (pod ranges from {}); give them with --cluster-cidr otherwise",
                    info.service_cidrs.iter().chain(&info.pod_cidrs).cloned().collect::<Vec<_>>().join(", "),
                    info.pod_ranges_from
                ));
                cidrs = info.service_cidrs.into_iter().chain(info.pod_cidrs).collect();
                if cidrs.is_empty() {
                    bail!("found no service or pod range in the cluster: give them with --cluster-cidr");
                }
            }
            Some(client)
        } else {
            None
        };
        let settings = tpbpf_deploy::Settings {
            image: args
                .image
                .clone()
                .unwrap_or_else(|| tpbpf_deploy::Settings::default().image),
            cluster_cidrs: cidrs,
            allow_cidrs: args.allow_cidrs.iter().map(ToString::to_string).collect(),
            resume_window_s: args.resume_window_s,
            intercept_rights: args.intercept_rights.as_arg().into(),
        };
        let objects = tpbpf_deploy::objects(&settings);
        if args.dry_run {
            match args.output {
                Format::Yaml => print!("{}", tpbpf_deploy::to_yaml(&objects)),
                Format::Json => println!("{}", serde_json::to_string_pretty(&objects)?),
            }
            return Ok(ExitCode::SUCCESS);
        }
        let client = client.context("a cluster client")?;
        println!(
            "applying tpbpf's agent ({}) to the cluster: namespace {}, DaemonSet {}, roles {} and {}",
            settings.image,
            tpbpf_deploy::NAMESPACE,
            tpbpf_deploy::AGENT,
            tpbpf_deploy::DEVELOPER_ROLE,
            tpbpf_deploy::TUNNEL_ROLE
        );
        progress.step("applying the agent's objects");
        tpbpf_kube::apply(&client, &objects)
            .await
            .map_err(|e| anyhow::anyhow!("{e} (installing takes cluster-admin rights)"))?;
        let deadline = Instant::now() + Duration::from_secs(args.timeout_s);
        let mut last = String::new();
        loop {
            let (ready, desired, waiting) = tpbpf_kube::agents_ready(&client)
                .await
                .map_err(anyhow::Error::msg)?;
            let line = format!("agents ready: {ready}/{desired}");
            if line != last {
                progress.step(&format!("waiting for the agents ({ready}/{desired} ready)"));
                progress.say(&line);
                last = line;
            }
            if desired > 0 && ready == desired {
                if let Some(p) = progress.0.take() {
                    p.finish();
                }
                println!("installed: `tpbpf up` can open tunnels now");
                return Ok(ExitCode::SUCCESS);
            }
            if Instant::now() > deadline {
                bail!(
                    "not every node has a ready agent after {} s:\n  {}",
                    args.timeout_s,
                    waiting.join("\n  ")
                );
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}

pub fn uninstall(args: UninstallArgs) -> Result<ExitCode> {
    runtime()?.block_on(async move {
        let (client, ..) =
            tpbpf_kube::client(args.kubeconfig.as_deref(), args.context.as_deref()).await?;
        // The objects' names and kinds do not depend on the settings.
        let objects = tpbpf_deploy::objects(&tpbpf_deploy::Settings::default());
        tpbpf_kube::delete(&client, &objects)
            .await
            .map_err(anyhow::Error::msg)?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let gone = tpbpf_kube::find_agent(&client)
                .await
                .ok()
                .flatten()
                .is_none();
            if gone {
                println!("uninstalled: no tpbpf agent is left in the cluster");
                return Ok(ExitCode::SUCCESS);
            }
            if Instant::now() > deadline {
                bail!(
                    "agent pods are still running after 120 s (`kubectl -n tpbpf-system get pods`)"
                );
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}

/// `--intercept-rights`, as the agent's flag of the same name takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum InterceptRights {
    PatchPod,
    PatchWorkload,
    PortForward,
}

impl InterceptRights {
    fn as_arg(self) -> &'static str {
        match self {
            InterceptRights::PatchPod => "patch-pod",
            InterceptRights::PatchWorkload => "patch-workload",
            InterceptRights::PortForward => "port-forward",
        }
    }
}
