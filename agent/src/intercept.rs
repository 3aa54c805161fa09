//! Intercepts asked for over a tunnel session: find the pod's network
//! namespace from its IP, open a listener inside it, steer the port's new
//! connections to that listener with sk_lookup, and carry each connection
//! to the developer as a stream of the session that names its intercept
//! ([`Session::open_intercepted`]). Everything is owned by the
//! session's task: when the session ends (tpbpfd gone, `leave`, `down`),
//! the intercept is detached and the pod's app gets its connections again.
use std::{
    collections::HashSet,
    fs::File,
    net::{IpAddr, SocketAddr},
    os::unix::fs::MetadataExt,
    sync::{Arc, Mutex},
};

use tokio::{net::TcpStream, task::JoinHandle};
use tpbpf_mux::{InterceptMode, Session};
use tracing::{debug, info, warn};

use crate::{
    policy::Policy,
    rights::{InterceptRights, Rights},
};

/// Intercepted targets on this node: one sk_lookup program and listener
/// per pod port, shared by the sessions intercepting it.
static TARGETS: Mutex<Vec<(SocketAddr, Arc<Target>)>> = Mutex::new(Vec::new());

/// One pod port taken over: its kernel side, its listener's task, and the
/// intercepts (routes) that share it.
struct Target {
    addr: SocketAddr,
    /// The pod's network namespace, held open from the access check on.
    netns: Arc<File>,
    bypass: tpbpf_loader::InterceptBypass,
    routes: Mutex<Vec<Route>>,
    task: Mutex<Option<JoinHandle<()>>>,
    interceptor: Mutex<Option<tpbpf_loader::Interceptor>>,
    /// Intercepted connections carried at once, at most
    /// [`MAX_CONNS_PER_TARGET`].
    conns: Arc<tokio::sync::Semaphore>,
}

/// Intercepted connections one target carries at once.
const MAX_CONNS_PER_TARGET: usize = 4096;

impl Target {
    /// Detaches the program and stops accepting, at once: connections
    /// already carried (which hold the target) go on.
    fn detach(&self) {
        if let Some(t) = self.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            t.abort();
        }
        if self
            .interceptor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .is_some()
        {
            info!(target = %self.addr, "intercept removed");
        }
    }
}

#[derive(Clone)]
pub(crate) struct Route {
    key: u64,
    pub(crate) session: Session,
    /// The session's id for the intercept: every connection carried for it
    /// names it, so the developer's side hands it to that intercept.
    pub(crate) intercept: u32,
    pub(crate) mode: InterceptMode,
}

impl Drop for Target {
    fn drop(&mut self) {
        self.detach();
    }
}

static NEXT_KEY: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// One session's intercept of a target. Dropping it removes its route, and
/// the target's program with the last one.
pub struct Active {
    /// The environment of the pod's process, as /proc/PID/environ has it.
    pub environ: String,
    target: SocketAddr,
    key: u64,
}

impl Drop for Active {
    fn drop(&mut self) {
        let mut targets = TARGETS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pos) = targets.iter().position(|(a, _)| *a == self.target) {
            let t = targets[pos].1.clone();
            let mut routes = t.routes.lock().unwrap_or_else(|e| e.into_inner());
            routes.retain(|r| r.key != self.key);
            if routes.is_empty() {
                drop(routes);
                targets.remove(pos);
                t.detach();
            }
        }
    }
}

/// The network namespace in which `ip` is a local address and which this
/// node reaches: found among the namespaces of the node's processes (a
/// pod's sandbox and containers are processes of the node), not from any
/// name. Reachability tells this node's pod from another namespace that
/// happens to have the same address (another cluster's, on one machine).
pub fn netns_of(ip: IpAddr) -> Result<File, String> {
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
        // Opened once: the checks and the attach all use this namespace,
        // whatever happens to the process it was found through.
        let Ok(ns) = File::open(&path) else {
            continue;
        };
        if let Some(sock) = bound_in(&ns, ip) {
            if reached(&sock) {
                return Ok(ns);
            }
        }
    }
    Err(format!(
        "no network namespace reachable from this node has the address {ip}: is the pod on this node?"
    ))
}

/// A UDP socket bound to `ip` in the namespace at `path`, if `ip` is a
/// local address there.
fn bound_in(ns: &File, ip: IpAddr) -> Option<std::net::UdpSocket> {
    tpbpf_loader::netns::run_in(ns, || std::net::UdpSocket::bind((ip, 0)).ok())
        .ok()
        .flatten()
}

/// Whether a datagram sent from this node's namespace reaches `sock`.
fn reached(sock: &std::net::UdpSocket) -> bool {
    let Ok(to) = sock.local_addr() else {
        return false;
    };
    let probe: [u8; 8] = rand_probe();
    let from = match std::net::UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }) {
        Ok(s) => s,
        Err(_) => return false,
    };
    let _ = sock.set_read_timeout(Some(std::time::Duration::from_millis(100)));
    let mut buf = [0u8; 16];
    for _ in 0..3 {
        if from.send_to(&probe, to).is_err() {
            return false;
        }
        if let Ok(n) = sock.recv(&mut buf) {
            if buf[..n] == probe {
                return true;
            }
        }
    }
    false
}

fn rand_probe() -> [u8; 8] {
    let mut b = [0u8; 8];
    let _ = getrandom::getrandom(&mut b);
    b
}

/// The environment of the pod's container process that listens on `port`
/// (the one the intercept stands in for); where none does, the lowest pid
/// of the namespace that is not the sandbox (`pause`). Only environments
/// that read as `KEY=VALUE` entries count (some servers overwrite theirs
/// with their process title).
fn environ_in(ns: &File, port: u16) -> String {
    let Ok(want) = ns.metadata() else {
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
    let listening = pids
        .first()
        .map(|pid| listening_inodes(*pid, port))
        .unwrap_or_default();
    let owner = pids.iter().copied().find(|pid| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .any(|link| {
                link.to_str()
                    .and_then(|l| l.strip_prefix("socket:["))
                    .and_then(|l| l.strip_suffix(']'))
                    .and_then(|i| i.parse::<u64>().ok())
                    .is_some_and(|i| listening.contains(&i))
            })
    });
    let sandbox = |pid: &u32| {
        std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "pause")
    };
    owner
        .into_iter()
        .chain(pids.iter().copied().filter(|p| !sandbox(p)))
        .find_map(environ_of)
        .unwrap_or_default()
}

/// `/proc/PID/environ` as NUL-separated `KEY=VALUE` entries, if it reads so.
fn environ_of(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let entries: Vec<&str> = text.split('\0').filter(|e| !e.is_empty()).collect();
    let valid = !entries.is_empty()
        && entries.iter().all(|e| {
            e.split_once('=').is_some_and(|(k, _)| {
                !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            })
        });
    valid.then(|| entries.join("\0"))
}

/// Socket inodes listening on TCP `port` in the network namespace of `pid`
/// (`/proc/PID/net/tcp` and `tcp6`: state `0A`).
fn listening_inodes(pid: u32, port: u16) -> Vec<u64> {
    let mut out = Vec::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
                continue;
            };
            let local_port = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if *state == "0A" && local_port == Some(port) {
                if let Ok(i) = inode.parse() {
                    out.push(i);
                }
            }
        }
    }
    out
}

/// A listening socket on loopback inside the namespace `ns`: reached only
/// from inside the pod (sk_lookup, a port-forward), never from outside it.
fn loopback_listener_in(ns: &File, v6: bool) -> Result<std::net::TcpListener, String> {
    let addr: SocketAddr = if v6 {
        (std::net::Ipv6Addr::LOCALHOST, 0).into()
    } else {
        (std::net::Ipv4Addr::LOCALHOST, 0).into()
    };
    tpbpf_loader::netns::run_in(ns, || std::net::TcpListener::bind(addr))
        .map_err(|e| format!("the pod's network namespace: {e}"))?
        .map_err(|e| e.to_string())
}

/// Refuses a target whose namespace is the node's own (a hostNetwork pod)
/// or the agent's. (Addresses the dial policy refuses — loopback,
/// link-local, the node's own, outside the cluster — are refused before the
/// namespace is looked for.)
fn refuse_namespace(target: SocketAddr, ns: &File) -> Result<(), String> {
    let same = |path: &str| {
        std::fs::metadata(path)
            .ok()
            .zip(ns.metadata().ok())
            .is_some_and(|(a, b)| a.dev() == b.dev() && a.ino() == b.ino())
    };
    if same("/proc/1/ns/net") {
        return Err(format!(
            "{target} is in the node's own network namespace (a hostNetwork pod): never an intercept target"
        ));
    }
    if same("/proc/self/ns/net") {
        return Err(format!(
            "{target} is tpbpf's agent itself: never an intercept target"
        ));
    }
    Ok(())
}

/// How long a client has to prove who it is (or its port-forward).
const PROOF_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// What an access check found: the pod's network namespace (held open for
/// the attach), and whether the client may have the pod's environment.
pub struct Access {
    pub netns: Arc<File>,
    pub env: Result<(), String>,
}

/// Checks that the session's client may intercept `target`: the dial
/// policy and the namespace first (never the node's or the agent's own);
/// then, as `rights` says, its identity and rights with the API server
/// (see [`crate::rights`]), or a port-forward into the pod.
pub async fn check_access(
    session: &Session,
    id: u32,
    target: SocketAddr,
    policy: &Policy,
    rights: &Rights,
) -> Result<Access, String> {
    let ip = target.ip();
    policy
        .check(target)
        .map_err(|why| format!("{target} cannot be intercepted: {why}"))?;
    let port_forward = rights.mode == InterceptRights::PortForward;
    let (ns, listener) = tokio::task::spawn_blocking(move || -> Result<_, String> {
        let ns = netns_of(ip)?;
        refuse_namespace(target, &ns)?;
        let listener = if port_forward {
            Some(loopback_listener_in(&ns, ip.is_ipv6())?)
        } else {
            None
        };
        Ok((ns, listener))
    })
    .await
    .map_err(|e| e.to_string())??;
    let nonce = {
        let mut n = [0u8; 16];
        getrandom::getrandom(&mut n).map_err(|e| e.to_string())?;
        n
    };
    let env = match listener {
        Some(listener) => {
            prove_port_forward(session, id, ip, listener, nonce).await?;
            // A port-forward reaches the pod's listeners, not its
            // environment: that asks what reading it would, as below.
            env_after_port_forward(session, id, target, rights).await?
        }
        None => {
            let api = rights.api()?;
            let proof = session
                .intercept_identity(id, nonce, PROOF_TIMEOUT)
                .await
                .map_err(|e| {
                    format!("no identity from the client for the intercept of {target}: {e}")
                })?;
            let granted = crate::rights::check(api, rights.mode, &proof, &nonce, ip).await?;
            info!(%target, user = granted.user, env = granted.env.is_ok(), "intercept rights checked with the API server");
            granted.env
        }
    };
    Ok(Access {
        netns: Arc::new(ns),
        env,
    })
}

/// Whether the client of an intercept that a port-forward let through may
/// have the pod's environment: its identity, checked with the API server
/// (see [`crate::rights::env_only`]). The inner `Err` says why it is
/// withheld (no API client, no identity, not the right); the outer, that
/// the session ended.
async fn env_after_port_forward(
    session: &Session,
    id: u32,
    target: SocketAddr,
    rights: &Rights,
) -> Result<Result<(), String>, String> {
    let api = match rights.api() {
        Ok(api) => api,
        Err(e) => {
            return Ok(Err(format!(
                "the environment of {target}'s pod is withheld: {e}"
            )))
        }
    };
    let mut nonce = [0u8; 16];
    getrandom::getrandom(&mut nonce).map_err(|e| e.to_string())?;
    let proof = match session.intercept_identity(id, nonce, PROOF_TIMEOUT).await {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Err(e.to_string()),
        Err(e) => {
            return Ok(Err(format!(
                "the environment of {target}'s pod is withheld: no identity from the client: {e}"
            )))
        }
    };
    Ok(
        match crate::rights::env_only(api, &proof, &nonce, target.ip()).await {
            Ok(env) => env,
            Err(e) => Err(format!(
                "the environment of {target}'s pod is withheld: {e}"
            )),
        },
    )
}

/// The port-forward proof (`--intercept-rights port-forward`): the agent
/// listens on a fresh port inside the pod's namespace and asks the client
/// to port-forward there and send `nonce`. The API server only lets the
/// port-forward through if the user may (`pods/portforward` on the pod).
/// The listener is on the pod's loopback: a port-forward lands there (the
/// container runtime dials localhost inside the pod), a tunnel stream to
/// the pod's address does not.
async fn prove_port_forward(
    session: &Session,
    id: u32,
    ip: std::net::IpAddr,
    listener: std::net::TcpListener,
    nonce: [u8; 16],
) -> Result<(), String> {
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
    session
        .intercept_challenge(id, port, nonce)
        .map_err(|e| e.to_string())?;
    let wait = async {
        loop {
            let (mut conn, _) = listener.accept().await.map_err(|e| e.to_string())?;
            let mut got = [0u8; 16];
            let read = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                tokio::io::AsyncReadExt::read_exact(&mut conn, &mut got),
            )
            .await;
            if matches!(read, Ok(Ok(_))) && got == nonce {
                return Ok::<(), String>(());
            }
            debug!(%ip, "intercept challenge: a connection without the nonce");
        }
    };
    tokio::time::timeout(PROOF_TIMEOUT, wait)
        .await
        .map_err(|_| {
            format!(
                "no proof that you may port-forward into the pod at {ip} (tpbpf port-forwards to it through the API server first): intercept refused"
            )
        })?
}

/// Puts an intercept of `target` in place for `session`, as its intercept
/// `intercept`. Two steals of one port are refused; filtered intercepts and
/// mirrors share it.
pub fn start(
    session: &Session,
    intercept: u32,
    target: SocketAddr,
    mode: &InterceptMode,
    ns: Arc<File>,
) -> Result<Active, String> {
    let key = NEXT_KEY.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let route = Route {
        key,
        session: session.clone(),
        intercept,
        mode: mode.clone(),
    };
    let mut targets = TARGETS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, t)) = targets.iter().find(|(a, _)| *a == target) {
        let mut routes = t.routes.lock().unwrap_or_else(|e| e.into_inner());
        let steal = |m: &InterceptMode| *m == InterceptMode::Steal;
        if steal(mode) || routes.iter().any(|r| steal(&r.mode)) {
            return Err(format!(
                "{target} is already intercepted by another developer: two intercepts of one port need HTTP filters (--http-header, --http-path-prefix) or mirror on both"
            ));
        }
        routes.push(route);
        return Ok(Active {
            environ: environ_in(&t.netns, target.port()),
            target,
            key,
        });
    }
    let environ = environ_in(&ns, target.port());
    let listener = loopback_listener_in(&ns, target.is_ipv6())?;
    let interceptor = tpbpf_loader::Interceptor::attach(&ns, target, &listener)
        .map_err(|e| format!("attaching the intercept in the pod's namespace: {e}"))?;
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| e.to_string())?;
    let t = Arc::new(Target {
        addr: target,
        netns: ns,
        bypass: interceptor.bypass(),
        routes: Mutex::new(vec![route]),
        task: Mutex::new(None),
        interceptor: Mutex::new(Some(interceptor)),
        conns: Arc::new(tokio::sync::Semaphore::new(MAX_CONNS_PER_TARGET)),
    });
    let weak = Arc::downgrade(&t);
    *t.task.lock().unwrap_or_else(|e| e.into_inner()) = Some(tokio::spawn(async move {
        loop {
            let (conn, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!(%target, "accepting an intercepted connection: {e}");
                    continue;
                }
            };
            let Some(t) = weak.upgrade() else {
                return;
            };
            let Ok(permit) = t.conns.clone().try_acquire_owned() else {
                warn!(target = %t.addr, %peer, "{MAX_CONNS_PER_TARGET} intercepted connections already: closing this one");
                continue;
            };
            let _ = conn.set_nodelay(true);
            tokio::spawn(async move {
                if let Err(e) = serve_conn(&t, conn, peer).await {
                    debug!(target = %t.addr, %peer, "intercepted connection: {e}");
                }
                drop(permit);
            });
        }
    }));
    targets.push((target, t));
    info!(%target, ?mode, "intercept in place");
    Ok(Active {
        environ,
        target,
        key,
    })
}

/// A connection to the app itself, from inside the pod's namespace, that
/// the intercept leaves alone.
async fn dial_app(t: &Target) -> std::io::Result<TcpStream> {
    let ip = t.addr.ip();
    let sock = tpbpf_loader::netns::run_in(&t.netns, || -> std::io::Result<socket2::Socket> {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(SocketAddr::new(ip, 0)),
            socket2::Type::STREAM,
            None,
        )?;
        s.bind(&SocketAddr::new(ip, 0).into())?;
        Ok(s)
    })??;
    let source = sock
        .local_addr()?
        .as_socket()
        .ok_or_else(|| std::io::Error::other("an unbound socket"))?;
    t.bypass.add(source).map_err(std::io::Error::other)?;
    sock.set_nonblocking(true)?;
    let result = tokio::net::TcpSocket::from_std_stream(sock.into())
        .connect(t.addr)
        .await;
    t.bypass.remove(source);
    let s = result?;
    let _ = s.set_nodelay(true);
    Ok(s)
}

/// One intercepted connection: to the developer whole (steal), or request
/// by request (filters), or to the app with a copy to the developer
/// (mirror).
///
/// Fail-open: routes whose session is away (its transport dropped, the
/// laptop asleep, tpbpfd killed) are skipped, so while no developer is
/// connected the app answers its own traffic; when the session resumes
/// within its window, its route applies again to new connections.
async fn serve_conn(t: &Arc<Target>, mut conn: TcpStream, peer: SocketAddr) -> std::io::Result<()> {
    let routes: Vec<Route> = t
        .routes
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|r| r.session.connected())
        .cloned()
        .collect();
    if routes.is_empty() {
        debug!(target = %t.addr, %peer, "no developer connected: the app answers");
        let mut app = dial_app(t).await?;
        tpbpf_mux::relay(&mut conn, &mut app).await?;
        return Ok(());
    }
    if let Some(r) = routes.iter().find(|r| r.mode == InterceptMode::Steal) {
        let mut first = vec![0u8; 16 * 1024];
        let n = conn.try_read(&mut first).unwrap_or_default();
        first.truncate(n);
        let mut stream = r
            .session
            .open_intercepted(r.intercept, peer, t.addr, &first)?;
        debug!(target = %t.addr, %peer, "intercepted connection");
        tpbpf_mux::relay(&mut conn, &mut stream).await?;
        return Ok(());
    }
    let modes: Vec<InterceptMode> = routes.iter().map(|r| r.mode.clone()).collect();
    tpbpf_http_filter::serve(
        conn,
        &modes,
        || dial_app(t),
        |i| {
            let r = &routes[i];
            r.session.open_intercepted(r.intercept, peer, t.addr, &[])
        },
    )
    .await
}
