//! `tpbpf intercept` / `leave` / `list`: the cluster's traffic for a
//! workload comes to a local port. The commands are clients of the running
//! tpbpfd's control socket (`tpbpf_userside::control`); tpbpfd asks the agent
//! on each of the workload's pods' nodes, over a tunnel session, to steer
//! the pod port's new connections into the session, and carries them to
//! the local port.
use std::{path::PathBuf, process::ExitCode};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixStream,
};

use crate::Output;

use tpbpf_kube::PortRef;
pub use tpbpf_userside::control::control_socket;
use tpbpf_userside::control::{InterceptRequest, ModeRequest, Request};

#[derive(clap::Args)]
pub struct InterceptArgs {
    /// The workload: a deployment, statefulset, daemonset, replicaset or
    /// pod, or a service (its selector's pods), as NAME or KIND/NAME.
    workload: String,
    /// REMOTE[:LOCAL]: the workload's port (a number, or a container's or
    /// the service's port name, e.g. `http`), and the local port its
    /// connections go to (default: the same number). Repeatable: one
    /// intercept per port (`--port 80:8080 --port 443:8443`).
    #[arg(long, required = true)]
    port: Vec<String>,
    /// The workload's namespace (default: the bridge's first namespace).
    #[arg(short, long)]
    namespace: Option<String>,
    /// Name of the intercept, for `tpbpf leave` (default: WORKLOAD-REMOTE;
    /// with several ports each is WORKLOAD-REMOTE).
    #[arg(long)]
    name: Option<String>,
    /// steal: every new connection comes to you; mirror: the workload
    /// answers as usual and you get a copy of each HTTP request.
    #[arg(long, value_enum, default_value_t = Mode::Steal)]
    mode: Mode,
    /// Only HTTP requests with this header (NAME=VALUE) come to you; the
    /// rest go to the workload, on the same connection too.
    #[arg(long, value_name = "NAME=VALUE", conflicts_with = "http_path_prefix")]
    http_header: Option<String>,
    /// Only HTTP requests whose path starts with this come to you.
    #[arg(long, value_name = "PREFIX")]
    http_path_prefix: Option<String>,
    /// Write the intercepted container's environment here, one KEY=VALUE
    /// per line (docker's --env-file format; in a shell:
    /// `while IFS= read -r l; do export "$l"; done < FILE`).
    #[arg(long, value_name = "FILE")]
    env_file: Option<PathBuf>,
    /// Write the intercepted container's environment here as a JSON object.
    #[arg(long, value_name = "FILE")]
    env_json: Option<PathBuf>,
    /// Name of the bridge.
    #[arg(long, default_value = "default", value_parser = super::up::instance_name)]
    instance: String,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Print nothing (an intercept `up` starts from the configuration).
    #[arg(skip)]
    quiet: bool,
    /// Started by `up`, whose progress shows it.
    #[arg(skip)]
    from_up: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    Steal,
    Mirror,
}

#[derive(clap::Args)]
pub struct LeaveArgs {
    /// The intercept's name (`tpbpf list` shows them).
    name: String,
    #[arg(long, default_value = "default", value_parser = super::up::instance_name)]
    instance: String,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(clap::Args)]
pub struct ListArgs {
    #[arg(short, long)]
    namespace: Option<String>,
    #[arg(long, default_value = "default", value_parser = super::up::instance_name)]
    instance: String,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

fn ask(instance: &str, request: &Request) -> Result<Value> {
    let path = control_socket(instance);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut s = UnixStream::connect(&path).await.with_context(|| {
            format!(
                "tpbpf is not up (bridge `{instance}`: no control socket at {}): run `tpbpf up` first",
                path.display()
            )
        })?;
        // A refusal may come before the request is read: still read it.
        let _ = s
            .write_all(format!("{}\n", serde_json::to_string(request)?).as_bytes())
            .await;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).await?;
        let v: Value = serde_json::from_str(&line).context("tpbpfd's answer")?;
        if let Some(e) = v["error"].as_str() {
            bail!("{e}");
        }
        Ok(v)
    })
}

/// Starts an intercept that the configuration names, on bridge `instance`
/// (what `tpbpf intercept` would with the same settings).
pub fn from_config(
    instance: &str,
    spec: &super::config::InterceptSpec,
    output: Output,
) -> Result<ExitCode> {
    use super::config::InterceptMode;
    intercept(InterceptArgs {
        workload: spec.workload.clone(),
        port: spec.port.clone().into_vec(),
        namespace: spec.namespace.clone(),
        name: spec.name.clone(),
        mode: match spec.mode {
            Some(InterceptMode::Mirror) => Mode::Mirror,
            _ => Mode::Steal,
        },
        http_header: spec.http_header.clone(),
        http_path_prefix: spec.http_path_prefix.clone(),
        env_file: spec.env_file.clone(),
        env_json: None,
        instance: instance.to_string(),
        output,
        // A table's lines go with `up`'s; JSON and YAML say only the bridge.
        quiet: output != Output::Table,
        from_up: true,
    })
}

/// `REMOTE[:LOCAL]`: REMOTE a port number or name, LOCAL a number.
pub fn parse_port(port: &str) -> Result<(PortRef, Option<u16>)> {
    let (r, l) = match port.split_once(':') {
        Some((r, l)) => (r, Some(l)),
        None => (port, None),
    };
    let remote = match r.parse::<u16>() {
        Ok(n) => PortRef::Number(n),
        Err(_) if !r.is_empty() && !r.bytes().all(|b| b.is_ascii_digit()) => {
            PortRef::Name(r.to_string())
        }
        Err(_) => bail!("--port `{port}` is not REMOTE[:LOCAL] (e.g. 80:8080 or http:8080)"),
    };
    remote
        .check()
        .map_err(|e| anyhow::anyhow!("--port `{port}`: {e}"))?;
    let local = match l {
        None => None,
        Some(l) => match l.parse::<u16>() {
            Ok(n) if n > 0 => Some(n),
            _ => bail!("--port `{port}`: the local port `{l}` is not a port number"),
        },
    };
    Ok((remote, local))
}

pub fn intercept(args: InterceptArgs) -> Result<ExitCode> {
    let ports = args
        .port
        .iter()
        .map(|p| parse_port(p))
        .collect::<Result<Vec<_>>>()?;
    if ports.len() > 1 && args.name.is_some() {
        bail!("--name names one intercept: with several --port each is named WORKLOAD-PORT");
    }
    if ports.len() > 16 {
        bail!("at most 16 --port in one intercept command");
    }
    let mut mode = if args.mode == Mode::Mirror {
        ModeRequest::Mirror
    } else {
        ModeRequest::Steal
    };
    if let Some(h) = &args.http_header {
        let Some((n, v)) = h.split_once('=') else {
            bail!("--http-header `{h}` is not NAME=VALUE");
        };
        if args.mode == Mode::Mirror {
            bail!(
                "--http-header and --mode mirror do not go together: a mirror gets every request"
            );
        }
        mode = ModeRequest::Header {
            header: n.to_string(),
            value: v.to_string(),
        };
    }
    if let Some(p) = &args.http_path_prefix {
        if args.mode == Mode::Mirror {
            bail!("--http-path-prefix and --mode mirror do not go together: a mirror gets every request");
        }
        mode = ModeRequest::Path { prefix: p.clone() };
    }
    let mut progress =
        (!args.from_up).then(|| crate::progress::Progress::new("intercept", args.output));
    let mut answers: Vec<Value> = Vec::new();
    for (remote, local) in ports {
        let name = args
            .name
            .clone()
            .unwrap_or_else(|| format!("{}-{remote}", args.workload.replace('/', "-")));
        let request = Request::Intercept(InterceptRequest {
            name: name.clone(),
            workload: args.workload.clone(),
            namespace: args.namespace.clone(),
            remote: remote.clone(),
            local,
            mode: mode.clone(),
        });
        if let Some(p) = &mut progress {
            p.step(format!(
                "asking the agents of {}'s pods for port {remote}",
                args.workload
            ));
        }
        match ask(&args.instance, &request) {
            Ok(v) => answers.push(v),
            Err(e) => {
                // All of them or none: the ones already made go.
                for done in &answers {
                    if let Some(n) = done["name"].as_str() {
                        let _ = ask(&args.instance, &Request::Leave { name: n.into() });
                    }
                }
                return Err(e.context(format!("port {remote}")));
            }
        }
    }
    if let Some(p) = progress {
        p.finish();
    }
    let v = answers.first().cloned().unwrap_or_default();
    let env = v["env"].as_object().cloned().unwrap_or_default();
    if let Some(why) = v["env_withheld"].as_str() {
        // The intercept is in place; an empty file would pass for the
        // pod's environment.
        for path in args.env_file.iter().chain(&args.env_json) {
            eprintln!(
                "tpbpf: {why}; {} not written (ask for `create pods/exec` on the pod, or `get` on those secrets)",
                path.display()
            );
        }
    } else if let Some(path) = &args.env_file {
        let mut text = String::new();
        for (k, val) in &env {
            let val = val.as_str().unwrap_or("");
            if val.contains('\n') {
                // One variable per line: a multi-line value cannot be written.
                eprintln!(
                    "tpbpf: {k} has a multi-line value; left out of {}",
                    path.display()
                );
                continue;
            }
            text.push_str(&format!("{k}={val}\n"));
        }
        write_private(path, text.as_bytes())?;
    }
    if let Some(path) = args
        .env_json
        .as_ref()
        .filter(|_| v["env_withheld"].is_null())
    {
        write_private(path, serde_json::to_string_pretty(&env)?.as_bytes())?;
    }
    match args.output {
        _ if args.quiet => {}
        // One port: its intercept; several: the list of them.
        o @ (Output::Json | Output::Yaml) if answers.len() == 1 => print!("{}", o.render(&v)),
        o @ (Output::Json | Output::Yaml) => print!("{}", o.render(&Value::Array(answers))),
        Output::Table => {
            for v in &answers {
                let name = v["name"].as_str().unwrap_or("?");
                println!(
                    "intercepting {} {}/{} port {}: new connections go to 127.0.0.1:{} (name {name}; `tpbpf leave {name}` ends it)",
                    v["kind"].as_str().unwrap_or("workload"),
                    v["namespace"].as_str().unwrap_or("?"),
                    args.workload,
                    v["remote"],
                    v["local"],
                );
                for p in v["pods"].as_array().into_iter().flatten() {
                    println!(
                        "  pod {} ({}) on {}",
                        p["name"].as_str().unwrap_or("?"),
                        p["pod_ip"].as_str().unwrap_or("?"),
                        p["node"].as_str().unwrap_or("?")
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn leave(args: LeaveArgs) -> Result<ExitCode> {
    ask(
        &args.instance,
        &Request::Leave {
            name: args.name.clone(),
        },
    )?;
    match args.output {
        Output::Table => println!(
            "intercept {} removed: the workload gets its connections again",
            args.name
        ),
        o => print!(
            "{}",
            o.render(&serde_json::json!({"name": args.name, "removed": true}))
        ),
    }
    Ok(ExitCode::SUCCESS)
}

pub fn list(args: ListArgs) -> Result<ExitCode> {
    let v = ask(
        &args.instance,
        &Request::List {
            namespace: args.namespace.clone(),
        },
    )?;
    match args.output {
        o @ (Output::Json | Output::Yaml) => print!("{}", o.render(&v)),
        Output::Table => {
            println!(
                "{:<12} {:<24} {:<9} INTERCEPTED",
                "KIND", "NAME", "REPLICAS"
            );
            for w in v["workloads"].as_array().into_iter().flatten() {
                let state = match w["intercepts"].as_array() {
                    Some(a) if !a.is_empty() => a
                        .iter()
                        .map(|i| {
                            format!(
                                "{} (port {} -> {}{})",
                                i["name"].as_str().unwrap_or("?"),
                                i["remote"],
                                i["local"],
                                i["problem"]
                                    .as_str()
                                    .map(|p| format!("; {p}"))
                                    .unwrap_or_default()
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(", "),
                    _ => "-".into(),
                };
                println!(
                    "{:<12} {:<24} {:<9} {state}",
                    w["kind"].as_str().unwrap_or("?"),
                    w["name"].as_str().unwrap_or("?"),
                    w["replicas"].to_string()
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes a pod's environment (secrets, often) to `path`: mode 0600, owned
/// by the user who asked (`SUDO_UID`/`SUDO_GID` under sudo). The bytes go
/// to a new file made with `O_CREAT|O_EXCL|O_NOFOLLOW` beside `path`, which
/// is then renamed over it: a symlink planted at `path`, or at the
/// temporary name, is never followed.
fn write_private(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::{
        io::Write,
        os::unix::fs::{fchown, OpenOptionsExt},
    };
    let name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tpbpf-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    let owner = |var: &str| std::env::var(var).ok().and_then(|v| v.parse::<u32>().ok());
    let result = (|| -> Result<()> {
        if let (Some(uid), Some(gid)) = (owner("SUDO_UID"), owner("SUDO_GID")) {
            fchown(&file, Some(uid), Some(gid))
                .with_context(|| format!("giving {} to uid {uid}", tmp.display()))?;
        }
        file.write_all(bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
