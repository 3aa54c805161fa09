//! Intercepts asked for over a tunnel session: find the pod's network
//! namespace from its IP, open a listener inside it, steer the port's new
//! connections to that listener with sk_lookup, and carry each connection
//! to the developer as a stream of the session. Everything is owned by the
//! session's task: when the session ends (tpbpfd gone, `leave`, `down`),
//! the intercept is detached and the pod's app gets its connections again.
use std::{
    collections::HashSet,
    fs::File,
    net::{IpAddr, SocketAddr},
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::PathBuf,
    sync::Mutex,
};

use tokio::task::JoinHandle;
use tpbpf_mux::{Destination, InterceptMode, Session};
use tracing::{debug, info, warn};

/// Targets intercepted on this node, by any session: a second steal of
/// the same pod port is refused.
static TAKEN: Mutex<Vec<SocketAddr>> = Mutex::new(Vec::new());

/// One intercept in place. Dropping it detaches the program.
pub struct Active {
    /// The environment of the pod's process, as /proc/PID/environ has it.
    pub environ: String,
    target: SocketAddr,
    task: JoinHandle<()>,
    _interceptor: tpbpf_loader::Interceptor,
}

impl Drop for Active {
    fn drop(&mut self) {
        self.task.abort();
        TAKEN
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|t| *t != self.target);
        info!(target = %self.target, "intercept removed");
    }
}

/// The network namespace in which `ip` is a local address: found among the
/// namespaces of the node's processes (a pod's sandbox and containers are
/// processes of the node), not from any name.
pub fn netns_of(ip: IpAddr) -> Result<PathBuf, String> {
    let mut seen = HashSet::new();
    let entries = std::fs::read_dir("/proc").map_err(|e| format!("reading /proc: {e}"))?;
    for e in entries.flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let path = e.path().join("ns/net");
        let Ok(meta) = std::fs::metadata(&path) else {
            continue;
        };
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        if has_address(&path, ip) {
            return Ok(path);
        }
    }
    Err(format!(
        "no network namespace on this node has the address {ip}: is the pod on this node?"
    ))
}

/// The environment of the pod's main process: the lowest pid in the
/// namespace of `ns_path` whose /proc/PID/environ reads as `KEY=VALUE`
/// entries (some servers overwrite theirs with their process title).
fn environ_in(ns_path: &std::path::Path) -> String {
    let Ok(want) = std::fs::metadata(ns_path) else {
        return String::new();
    };
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| m.dev() == want.dev() && m.ino() == want.ino())
        })
        .collect();
    pids.sort_unstable();
    for pid in pids {
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let Ok(text) = String::from_utf8(raw) else {
            continue;
        };
        let entries: Vec<&str> = text.split('\0').filter(|e| !e.is_empty()).collect();
        let valid = !entries.is_empty()
            && entries.iter().all(|e| {
                e.split_once('=').is_some_and(|(k, _)| {
                    !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                })
            });
        if valid {
            return entries.join("\0");
        }
    }
    String::new()
}

/// Whether `ip` is a local address in the namespace at `path` (binding a
/// socket to it succeeds only then).
fn has_address(path: &std::path::Path, ip: IpAddr) -> bool {
    let Ok(ns) = File::open(path) else {
        return false;
    };
    std::thread::spawn(move || {
        // SAFETY: a valid namespace fd; setns affects only this thread,
        // which ends here.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return false;
        }
        std::net::UdpSocket::bind((ip, 0)).is_ok()
    })
    .join()
    .unwrap_or(false)
}

/// A listening socket made inside the namespace at `path`.
fn listener_in(path: &std::path::Path) -> Result<std::net::TcpListener, String> {
    let ns = File::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
    std::thread::spawn(move || {
        // SAFETY: as above.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!(
                "entering the pod's network namespace: {}",
                std::io::Error::last_os_error()
            ));
        }
        std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())
    })
    .join()
    .map_err(|_| "the namespace thread panicked".to_string())?
}

/// Puts an intercept of `target` in place for `session`.
pub fn start(
    session: &Session,
    target: SocketAddr,
    mode: &InterceptMode,
) -> Result<Active, String> {
    if *mode != InterceptMode::Steal {
        return Err(format!(
            "intercept mode {mode:?} is not supported by this agent (steal is)"
        ));
    }
    {
        let mut taken = TAKEN.lock().unwrap_or_else(|e| e.into_inner());
        if taken.contains(&target) {
            return Err(format!(
                "{target} is already intercepted by another session: two steals of one port are refused"
            ));
        }
        taken.push(target);
    }
    let release = || {
        TAKEN
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|t| *t != target);
    };
    let mut environ = String::new();
    let mut setup = || -> Result<(tpbpf_loader::Interceptor, std::net::TcpListener), String> {
        let path = netns_of(target.ip())?;
        environ = environ_in(&path);
        let listener = listener_in(&path)?;
        let ns = File::open(&path).map_err(|e| e.to_string())?;
        let interceptor = tpbpf_loader::Interceptor::attach(&ns, target.port(), &listener)
            .map_err(|e| format!("attaching the intercept in the pod's namespace: {e}"))?;
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        Ok((interceptor, listener))
    };
    let (interceptor, listener) = setup().inspect_err(|_| release())?;
    let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| {
        release();
        e.to_string()
    })?;
    let session = session.clone();
    let task = tokio::spawn(async move {
        loop {
            let (mut conn, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!(%target, "accepting an intercepted connection: {e}");
                    continue;
                }
            };
            let _ = conn.set_nodelay(true);
            let mut first = vec![0u8; 16 * 1024];
            let n = conn.try_read(&mut first).unwrap_or_default();
            first.truncate(n);
            match session.open_with(Destination::Addr(target), &first) {
                Ok(mut stream) => {
                    debug!(%target, %peer, "intercepted connection");
                    tokio::spawn(async move {
                        let _ = tokio::io::copy_bidirectional(&mut conn, &mut stream).await;
                    });
                }
                Err(e) => {
                    warn!(%target, %peer, "no stream to the developer: {e}");
                }
            }
        }
    });
    info!(%target, "intercept in place");
    Ok(Active {
        environ,
        target,
        task,
        _interceptor: interceptor,
    })
}
