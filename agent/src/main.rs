//! tpbpf's node agent: one per node (a DaemonSet with hostNetwork). It
//! serves tunnel sessions, dials destinations from the node and steers
//! intercepted pods' connections. This binary so far reports what it is and
//! whether its node can run it.
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "tpbpf-agent", version, about = "tpbpf's node agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the agent's node, version and kernel health as JSON.
    Info,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Info => {
            let report = tpbpf_doctor::run();
            let node = std::env::var("NODE_NAME").ok().or_else(|| {
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .ok()
                    .map(|s| s.trim().to_string())
            });
            let info = serde_json::json!({
                "node": node,
                "version": env!("CARGO_PKG_VERSION"),
                "healthy": report.ok(),
                "checks": serde_json::from_str::<serde_json::Value>(&report.to_json())
                    .map(|v| v["checks"].clone())
                    .unwrap_or_default(),
            });
            println!("{info:#}");
            if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
