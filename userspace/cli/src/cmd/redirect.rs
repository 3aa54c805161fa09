//! `tpbpf debug redirect`: the outbound redirect on its own, with a listener
//! that answers every redirected connection with the original destination
//! it recovered. Useful to check a machine end to end before a cluster is
//! involved; the privileged tests drive it.
use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    signal::unix::{signal, SignalKind},
};
use tpbpf_cgroup::{reaper::Reaper, ChildCgroup};

use tpbpf_loader::{Cidr, OrigDstTable, Redirector};
use tpbpf_userside::process::{exit_code, forward, spawn_in_cgroup};
use tracing::{info, warn};

use crate::Output;

#[derive(clap::Args)]
pub struct Args {
    /// A range to redirect (repeatable).
    #[arg(long = "cidr", default_value = "10.96.0.0/12")]
    cidrs: Vec<Cidr>,
    /// A range never to redirect, even inside a --cidr range (repeatable).
    #[arg(long = "never-proxy")]
    never_proxy: Vec<Cidr>,
    /// Create the child cgroup under this cgroup (default: tpbpf's own).
    #[arg(long)]
    cgroup_parent: Option<PathBuf>,
    /// Name of the child cgroup (default: tpbpf-redirect-<pid>).
    #[arg(long)]
    name: Option<String>,
    /// Event format on stdout.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
    /// Run this command inside the cgroup and exit with its status;
    /// without it, serve until SIGINT or SIGTERM.
    #[arg(last = true)]
    command: Vec<String>,
}

pub fn run(args: Args) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(serve(args))
}

async fn serve(args: Args) -> Result<ExitCode> {
    let parent = match &args.cgroup_parent {
        Some(p) => p.clone(),
        None => tpbpf_cgroup::current_cgroup_dir()?,
    };
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| format!("tpbpf-redirect-{}", std::process::id()));
    let cgroup = ChildCgroup::create(&parent, &name)?;
    let exe = std::env::current_exe().context("finding tpbpf's own executable")?;
    let reaper = Reaper::spawn(&exe, &["__reap-cgroup"], cgroup.path())
        .context("starting the cgroup clean-up helper")?;

    let mut redirector = Redirector::load()?;
    for cidr in &args.cidrs {
        redirector.add_range(*cidr, true)?;
    }
    for cidr in &args.never_proxy {
        redirector.add_range(*cidr, false)?;
    }
    let listener = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
        .await
        .context("binding the redirect listener on 127.0.0.1")?;
    let SocketAddr::V4(listen) = listener.local_addr()? else {
        bail!("the redirect listener is not IPv4");
    };
    redirector.set_proxy(listen)?;
    let dir = cgroup.open()?;
    let ids = redirector.attach(&dir, &cgroup.path().display().to_string())?;
    drop(dir);

    let out = args.output;
    emit(
        out,
        json!({
            "event": "ready",
            "cgroup": cgroup.path(),
            "listen": listen.to_string(),
            "cidrs": args.cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "never_proxy": args.never_proxy.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "program_ids": ids.program_ids,
            "link_ids": ids.link_ids,
        }),
        format!(
            "redirecting {} from cgroup {} to {listen} (programs {:?}, links {:?})",
            args.cidrs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            cgroup.path().display(),
            ids.program_ids,
            ids.link_ids
        ),
    );

    let table = redirector.table();
    let accept = tokio::spawn(accept_loop(listener, table, out));

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let code = if args.command.is_empty() {
        tokio::select! {
            _ = sigint.recv() => {}
            _ = sigterm.recv() => {}
        }
        info!("signal received, detaching");
        ExitCode::SUCCESS
    } else {
        let mut child = spawn_in_cgroup(&args.command, cgroup.path(), None)?;
        let pid = child.id();
        let status = loop {
            tokio::select! {
                status = child.wait() => break status?,
                _ = sigint.recv() => forward(pid, libc::SIGINT),
                _ = sigterm.recv() => forward(pid, libc::SIGTERM),
            }
        };
        exit_code(status)
    };

    accept.abort();
    drop(redirector);
    cgroup.remove()?;
    reaper.finish();
    Ok(code)
}

async fn accept_loop(listener: TcpListener, table: OrigDstTable, out: Output) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!("accepting a redirected connection: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let table = table.clone();
        tokio::spawn(async move {
            if let Err(e) = answer(stream, peer, &table, out).await {
                warn!(%peer, "answering a redirected connection: {e}");
            }
        });
    }
}

async fn answer(
    mut stream: TcpStream,
    peer: SocketAddr,
    table: &OrigDstTable,
    out: Output,
) -> Result<()> {
    let orig = table.original_destination(peer, stream.local_addr()?)?;
    let orig_text = orig.map(|o| o.to_string());
    emit(
        out,
        json!({"event": "accepted", "peer": peer.to_string(), "original_destination": orig_text}),
        match &orig_text {
            Some(o) => format!("accepted {peer}: original destination {o}"),
            None => format!("accepted {peer}: not redirected by tpbpf"),
        },
    );
    // Read the request head (if any) so the client is not reset.
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while len < buf.len() {
            match stream.read(&mut buf[len..]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => len += n,
            }
            if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    })
    .await;
    let (status, body) = match &orig_text {
        Some(o) => ("200 OK", format!("tpbpf: original destination {o}\n")),
        None => (
            "421 Misdirected Request",
            "tpbpf: this connection was not redirected\n".to_string(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}

fn emit(out: Output, event: serde_json::Value, text: String) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = match out {
        Output::Table => writeln!(stdout, "{text}"),
        machine => write!(stdout, "{}", machine.render(&event)),
    };
    let _ = stdout.flush();
}
