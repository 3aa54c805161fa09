//! `tpbpf gather-logs`: one tarball for a bug report, with tokens, keys and
//! certificates taken out.
//!
//! What goes in: the bridge's log (and the last one `down` kept), tpbpfd's
//! service log where this account may read it, `status.json` (the bridge's
//! recorded and live state), `doctor.json`, `version.json`, `config.json`
//! (the kubeconfig context in force, without its credentials), and each
//! agent's log through the API (`pods/log`). `MANIFEST.txt` lists every part
//! and what could not be gathered, and why.
//!
//! Taken out of every part: each credential of the kubeconfig in use (its
//! tokens, token files' contents, client certificates and keys, as given
//! and decoded), PEM blocks, JWTs, and the value after `Authorization:` or
//! a `token`/`password`/`secret` key.
use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, Result};
use serde_json::{json, Value};

use crate::Output;

#[derive(clap::Args)]
pub struct GatherArgs {
    /// The bridge whose logs and state to gather.
    #[arg(long, default_value = "default", value_parser = super::up::instance_name)]
    instance: String,
    /// Where to write the tarball (default: tpbpf-logs-UNIXTIME.tar.gz
    /// here).
    #[arg(long = "output-file", short = 'f', value_name = "FILE")]
    file: Option<PathBuf>,
    /// kubeconfig for the agents' logs (default: the bridge's, else
    /// $KUBECONFIG or ~/.kube/config).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// kubeconfig context (default: the bridge's, else the current one).
    #[arg(long)]
    context: Option<String>,
    /// Do not ask the cluster for the agents' logs.
    #[arg(long)]
    no_agents: bool,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

/// Lines of each agent's log.
const AGENT_LOG_LINES: i64 = 5000;
/// How long the agents' logs may take, all of them.
const AGENTS_TIMEOUT: Duration = Duration::from_secs(30);
/// The most of any one local log taken (its end).
const LOG_BYTES: usize = 16 << 20;

pub fn run(args: GatherArgs) -> Result<ExitCode> {
    let state = super::up::read_state_of(&args.instance);
    let kubeconfig = args.kubeconfig.clone().or_else(|| {
        state
            .as_ref()
            .and_then(|s| s["kubeconfig"].as_str().map(PathBuf::from))
    });
    let context = args.context.clone().or_else(|| {
        state
            .as_ref()
            .and_then(|s| s["context"].as_str().map(str::to_string))
    });
    let secrets = super::redact::kubeconfig_secrets(kubeconfig.as_deref(), context.as_deref());
    let redact = |text: &str| super::redact::redact(text, &secrets);
    let mut parts: Vec<(String, Vec<u8>)> = Vec::new();
    let mut missing: Vec<String> = Vec::new();

    let dir = super::up::state_dir_of(&args.instance);
    for (name, path) in [
        (
            format!("logs/{}.log", args.instance),
            dir.join("tpbpfd.log"),
        ),
        (
            format!("logs/{}.last.log", args.instance),
            super::up::last_log(&args.instance),
        ),
        (
            "logs/tpbpfd-service.log".to_string(),
            PathBuf::from(super::service::LOG_FILE),
        ),
    ] {
        match read_end(&path) {
            Ok(text) => parts.push((name, redact(&text).into_bytes())),
            Err(e) => missing.push(format!("{name}: {}: {e}", path.display())),
        }
    }
    let status = match &state {
        Some(s) => {
            let mut s = s.clone();
            if let Ok(live) = std::fs::read_to_string(dir.join("live.json")) {
                s["live"] = serde_json::from_str(&live).unwrap_or(Value::String(live));
            }
            s
        }
        None => json!({"instance": args.instance, "up": false}),
    };
    let report = tpbpf_doctor::run();
    let doctor: Value = serde_json::from_str(&report.to_json()).unwrap_or(Value::Null);
    let version = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "protocol": tpbpf_mux::PROTOCOL_VERSION,
    });
    let config = super::redact::context_summary(kubeconfig.as_deref(), context.as_deref());
    for (name, v) in [
        ("status.json", status),
        ("doctor.json", doctor),
        ("version.json", version),
        ("config.json", config),
    ] {
        let text = serde_json::to_string_pretty(&v)?;
        parts.push((name.to_string(), redact(&text).into_bytes()));
    }
    if args.no_agents {
        missing.push("agents/: not asked (--no-agents)".into());
    } else {
        match agent_logs(kubeconfig.as_deref(), context.as_deref()) {
            Ok(logs) => {
                for (pod, log) in logs {
                    match log {
                        Ok(text) => {
                            parts.push((format!("agents/{pod}.log"), redact(&text).into_bytes()))
                        }
                        Err(e) => missing.push(format!("agents/{pod}.log: {}", redact(&e))),
                    }
                }
            }
            Err(e) => missing.push(format!("agents/: {}", redact(&e))),
        }
    }
    let mut manifest = String::from("tpbpf gather-logs: the parts of this tarball\n");
    for (name, data) in &parts {
        manifest.push_str(&format!("{name} ({} bytes)\n", data.len()));
    }
    for m in &missing {
        manifest.push_str(&format!("not gathered: {m}\n"));
    }
    parts.insert(0, ("MANIFEST.txt".into(), manifest.into_bytes()));

    let file = args.file.clone().unwrap_or_else(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        PathBuf::from(format!("tpbpf-logs-{now}.tar.gz"))
    });
    write_tarball(&file, &parts).with_context(|| format!("writing {}", file.display()))?;
    let names: Vec<&str> = parts.iter().map(|(n, _)| n.as_str()).collect();
    match args.output {
        Output::Table => {
            println!("wrote {} ({} parts):", file.display(), parts.len());
            for n in &names {
                println!("  {n}");
            }
            for m in &missing {
                println!("  not gathered: {m}");
            }
            println!("Tokens, keys and certificates are taken out; read it before you share it.");
        }
        o => print!(
            "{}",
            o.render(&json!({"file": file, "parts": names, "not_gathered": missing}))
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// A log's text, its last [`LOG_BYTES`] at most (from a line's start).
fn read_end(path: &std::path::Path) -> std::io::Result<String> {
    let data = std::fs::read(path)?;
    let from = data.len().saturating_sub(LOG_BYTES);
    let start = data[from..]
        .iter()
        .position(|b| *b == b'\n')
        .filter(|_| from > 0)
        .map_or(from, |i| from + i + 1);
    Ok(String::from_utf8_lossy(&data[start..]).into_owned())
}

fn agent_logs(
    kubeconfig: Option<&std::path::Path>,
    context: Option<&str>,
) -> Result<tpbpf_kube::AgentLogs, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let ask = async {
            let (client, ..) = tpbpf_kube::client(kubeconfig, context)
                .await
                .map_err(|e| e.to_string())?;
            tpbpf_kube::agent_logs(&client, AGENT_LOG_LINES).await
        };
        tokio::time::timeout(AGENTS_TIMEOUT, ask)
            .await
            .map_err(|_| format!("the agents' logs took over {AGENTS_TIMEOUT:?}"))?
    })
}

/// A gzipped tar of `parts` (name, content), files 0600 under `tpbpf-logs/`.
fn write_tarball(file: &std::path::Path, parts: &[(String, Vec<u8>)]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(file)?;
    let gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    let mtime = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    for (name, data) in parts {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o600);
        header.set_mtime(mtime);
        header.set_cksum();
        tar.append_data(&mut header, format!("tpbpf-logs/{name}"), data.as_slice())?;
    }
    tar.into_inner()?.finish()?.sync_all()
}
