//! `tpbpf version`: this binary's version and protocol, and the agent's in
//! the kubeconfig's cluster.
use std::{process::ExitCode, time::Duration};

use anyhow::Result;
use serde_json::{json, Value};

use crate::Output;

#[derive(clap::Args)]
pub struct VersionArgs {
    /// This binary only: do not ask the cluster for its agent's version.
    #[arg(long)]
    client: bool,
    /// kubeconfig to use (default: $KUBECONFIG or ~/.kube/config).
    #[arg(long)]
    kubeconfig: Option<std::path::PathBuf>,
    /// kubeconfig context (default: the current one).
    #[arg(long)]
    context: Option<String>,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

/// How long the agent's version may take (a port-forward to it).
const AGENT_TIMEOUT: Duration = Duration::from_secs(15);

pub fn run(args: VersionArgs) -> Result<ExitCode> {
    let mut v = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "protocol": {
            "version": tpbpf_mux::PROTOCOL_VERSION,
            "oldest": tpbpf_mux::MIN_PROTOCOL_VERSION,
        },
    });
    if !args.client {
        let agent = agent(&args);
        match agent {
            Ok(a) => v["agent"] = a,
            Err(e) => v["agent_error"] = json!(e),
        }
    }
    match args.output {
        Output::Table => {
            println!(
                "tpbpf {} (tunnel protocol {}, accepts {} and later)",
                v["version"].as_str().unwrap_or("?"),
                v["protocol"]["version"],
                v["protocol"]["oldest"]
            );
            if let Some(a) = v.get("agent") {
                println!(
                    "agent {} (pod {} on {}{})",
                    a["version"].as_str().unwrap_or("?"),
                    a["pod"].as_str().unwrap_or("?"),
                    a["node"].as_str().unwrap_or("?"),
                    if a["healthy"] == true {
                        ""
                    } else {
                        ", not healthy"
                    }
                );
            }
            if let Some(e) = v["agent_error"].as_str() {
                println!("agent: {e}");
            }
        }
        o => print!("{}", o.render(&v)),
    }
    Ok(ExitCode::SUCCESS)
}

/// The agent's version, as one of the cluster's agents answers it.
fn agent(args: &VersionArgs) -> Result<Value, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let ask = async {
            let (client, ..) =
                tpbpf_kube::client(args.kubeconfig.as_deref(), args.context.as_deref())
                    .await
                    .map_err(|e| e.to_string())?;
            match tpbpf_kube::find_agent(&client).await? {
                Some(a) => Ok(json!({
                    "version": a.version,
                    "pod": a.pod,
                    "node": a.node,
                    "healthy": a.healthy,
                })),
                None => Err("no tpbpf agent in this cluster: run `tpbpf install`".to_string()),
            }
        };
        tokio::time::timeout(AGENT_TIMEOUT, ask)
            .await
            .map_err(|_| format!("the cluster's agent did not answer within {AGENT_TIMEOUT:?}"))?
    })
}
