//! tpbpfd as a service of its own: the privileged half (eBPF programs,
//! cgroup attachments, the listeners) serving users of group `tpbpf` over
//! one socket, while each user's side of a bridge (kubeconfig, exec
//! credential plugins, the tunnel, intercepts) runs as that user.
//!
//! A user's side connects to [`DEFAULT_SOCKET`] (root:tpbpf, 0660) and asks
//! for a bridge ([`ToService::Up`]). tpbpfd checks who asks (`SO_PEERCRED`,
//! `SO_PEERGROUPS`) and what (a cgroup the user owns, or the whole machine),
//! loads and attaches the programs, and from then on passes each redirected
//! TCP connection to the user's side (`SCM_RIGHTS`, with its original
//! destination): after the hand-over the kernel moves that connection's
//! bytes between the application and the user's side, without tpbpfd.
//! Datagrams and cluster DNS queries travel as frames. When the user's side
//! goes away, the bridge is detached at once.
use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};
use socket2::{Domain, SockAddr, Socket, Type};
use tokio::{
    io::unix::AsyncFd,
    net::TcpStream,
    sync::{mpsc, oneshot, Semaphore},
};
use tracing::{debug, info, warn};

use crate::{
    upstream::{BoxFuture, DatagramFlow, Stream},
    wire::{self, Channel, Frame, Peer},
    Bridge, BridgeOptions, DnsConfig, Upstream,
};

/// Where tpbpfd listens (override: `TPBPF_SERVICE_SOCKET`).
pub const DEFAULT_SOCKET: &str = "/run/tpbpf/tpbpfd.sock";
/// The group whose members may use tpbpfd.
pub const GROUP: &str = "tpbpf";
/// Connections served at once.
const MAX_SESSIONS: usize = 64;
/// Bridges one user may hold at once.
const MAX_BRIDGES_PER_USER: usize = 8;
/// Redirected connections waiting to be handed over, per bridge.
const MAX_PENDING_HANDOVERS: usize = 1024;
/// Datagram flows per bridge, on each side.
const MAX_FLOWS: usize = 4096;
/// Datagrams queued per flow.
const FLOW_QUEUE: usize = 64;
/// DNS queries in flight per bridge.
const MAX_DNS_IN_FLIGHT: usize = 256;
const DNS_TIMEOUT: Duration = Duration::from_secs(6);
/// A request must arrive this soon after connecting.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The service socket this process talks to.
pub fn socket_path() -> PathBuf {
    std::env::var_os("TPBPF_SERVICE_SOCKET")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

/// Where a user's bridges keep their state (made by tpbpfd, owned by the user, 0700).
pub fn user_dir(uid: u32) -> PathBuf {
    PathBuf::from("/run/tpbpf").join(format!("uid-{uid}"))
}

/// What a user's side asks of tpbpfd.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum ToService {
    /// Make sure the user's state directory exists.
    Prepare,
    /// Load and attach a bridge; this connection then carries its traffic.
    Up(UpRequest),
    /// Exempt the passed socket (a connection of the user's side to the
    /// API server or an agent) from the bridge `instance`'s redirection.
    Exempt { instance: String },
    /// A datagram back to the application of flow `flow` (payload).
    UdpAnswer { flow: u32 },
    /// The answer to DNS query `id` (payload), or why there is none.
    DnsAnswer { id: u32, error: Option<String> },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpRequest {
    /// The bridge's name (unique per user).
    pub instance: String,
    pub cidrs: Vec<String>,
    pub never_proxy: Vec<String>,
    pub dns: Option<DnsRequest>,
    /// The cgroup subtree to bridge (one the user owns); `None`: the machine.
    pub cgroup: Option<PathBuf>,
    /// `tpbpf run`: bridge only the command whose pidfd comes with the
    /// request (a child of the asking process, paused until `Ready`), in a
    /// cgroup tpbpfd makes for it below the command's own.
    #[serde(default)]
    pub run: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsRequest {
    pub cluster_domain: String,
    pub suffixes: Vec<String>,
    pub namespaces: Vec<String>,
}

/// What tpbpfd answers or sends.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum FromService {
    Prepared {
        state_dir: PathBuf,
    },
    Ready(Ready),
    Refused {
        error: String,
    },
    Exempted,
    /// A redirected connection (the passed descriptor) to `dst`.
    Tcp {
        dst: SocketAddr,
    },
    UdpOpen {
        flow: u32,
        dst: SocketAddr,
    },
    /// A datagram of flow `flow` (payload), toward the cluster.
    UdpSend {
        flow: u32,
    },
    UdpClose {
        flow: u32,
    },
    /// A DNS query for the cluster (payload).
    Dns {
        id: u32,
    },
}

/// A bridge tpbpfd made: what `tpbpf status` shows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Ready {
    pub cgroup: PathBuf,
    pub tcp4: String,
    pub tcp6: Option<String>,
    pub udp_port: u16,
    pub program_ids: Vec<u32>,
    pub link_ids: Vec<u32>,
}

/// Why talking to tpbpfd failed, said so the user knows what to do.
fn connect_error(path: &Path, e: &io::Error) -> io::Error {
    let uid = nix::unistd::getuid();
    let user = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map_or_else(|| format!("uid {uid}"), |u| u.name);
    let text = match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ECONNREFUSED) => format!(
            "tpbpfd is not running here (nothing listens on {}): `sudo tpbpf service install` sets it up once (or run this command as root)",
            path.display()
        ),
        Some(libc::EACCES) | Some(libc::EPERM) => format!(
            "{user} may not use tpbpfd ({}): only root and members of group `{GROUP}` may; `sudo usermod -aG {GROUP} {user}`, then log in again",
            path.display()
        ),
        _ => format!("connecting to tpbpfd at {}: {e}", path.display()),
    };
    io::Error::new(e.kind(), text)
}

fn connect_blocking(path: &Path) -> io::Result<Socket> {
    let sock = Socket::new(Domain::UNIX, Type::SEQPACKET, None)?;
    sock.connect(&SockAddr::unix(path)?)
        .map_err(|e| connect_error(path, &e))?;
    sock.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    sock.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    Ok(sock)
}

fn refused(error: String) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, error)
}

/// One request and its answer, blocking.
fn ask_blocking(
    path: &Path,
    request: &ToService,
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<FromService> {
    let sock = connect_blocking(path)?;
    wire::send_frame(sock.as_fd(), request, &[], fd)?;
    let frame = wire::recv_frame(sock.as_fd())?
        .ok_or_else(|| io::Error::other("tpbpfd closed the connection without an answer"))?;
    match frame.parse::<FromService>().map_err(io::Error::other)? {
        FromService::Refused { error } => Err(refused(error)),
        answer => Ok(answer),
    }
}

/// Asks tpbpfd for this user's state directory (it makes it the first time).
pub fn prepare(path: &Path) -> io::Result<PathBuf> {
    match ask_blocking(path, &ToService::Prepare, None)? {
        FromService::Prepared { state_dir } => Ok(state_dir),
        other => Err(io::Error::other(format!("tpbpfd answered {other:?}"))),
    }
}

/// Exempts `sock` from bridge `instance`'s redirection.
pub fn exempt(path: &Path, instance: &str, sock: BorrowedFd<'_>) -> io::Result<()> {
    let request = ToService::Exempt {
        instance: instance.to_string(),
    };
    match ask_blocking(path, &request, Some(sock))? {
        FromService::Exempted => Ok(()),
        other => Err(io::Error::other(format!("tpbpfd answered {other:?}"))),
    }
}

/// Asks tpbpfd for a bridge (with `run`, `pidfd` names the command); the
/// returned channel carries its traffic, for [`serve_user_side`].
pub async fn up(
    path: &Path,
    request: UpRequest,
    pidfd: Option<BorrowedFd<'_>>,
) -> io::Result<(Channel, Ready)> {
    let sock = connect_blocking(path)?;
    let chan = Channel::new(OwnedFd::from(sock))?;
    chan.send(&ToService::Up(request), &[], pidfd).await?;
    let frame = tokio::time::timeout(Duration::from_secs(60), chan.recv())
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "tpbpfd did not answer within 60 s"))??
        .ok_or_else(|| io::Error::other("tpbpfd closed the connection without an answer"))?;
    match frame.parse::<FromService>().map_err(io::Error::other)? {
        FromService::Ready(ready) => Ok((chan, ready)),
        FromService::Refused { error } => {
            Err(refused(format!("tpbpfd refused the bridge: {error}")))
        }
        other => Err(io::Error::other(format!("tpbpfd answered {other:?}"))),
    }
}

/// The user's side of a bridge: carries what tpbpfd hands over through
/// `upstream` until tpbpfd ends the connection (returns why).
pub async fn serve_user_side(chan: Channel, upstream: Arc<dyn Upstream>) -> io::Error {
    let chan = Arc::new(chan);
    let mut flows: HashMap<u32, mpsc::Sender<Vec<u8>>> = HashMap::new();
    let (closed_tx, mut closed_rx) = mpsc::unbounded_channel::<u32>();
    let dns_slots = Arc::new(Semaphore::new(MAX_DNS_IN_FLIGHT));
    loop {
        while let Ok(id) = closed_rx.try_recv() {
            flows.remove(&id);
        }
        let frame = match chan.recv().await {
            Ok(Some(f)) => f,
            Ok(None) => return io::Error::other("tpbpfd closed the bridge (was it stopped?)"),
            Err(e) => return io::Error::new(e.kind(), format!("reading from tpbpfd: {e}")),
        };
        let msg = match frame.parse::<FromService>() {
            Ok(m) => m,
            Err(e) => return io::Error::other(format!("tpbpfd sent {e}")),
        };
        let Frame { payload, fd, .. } = frame;
        match msg {
            FromService::Tcp { dst } => {
                let Some(fd) = fd else {
                    warn!(%dst, "tpbpfd handed over a connection without its socket");
                    continue;
                };
                let client = std::net::TcpStream::from(fd);
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    if client.set_nonblocking(true).is_err() {
                        return;
                    }
                    match TcpStream::from_std(client) {
                        Ok(client) => crate::tcp::relay(client, dst, upstream).await,
                        Err(e) => warn!(%dst, "a handed-over connection is not a TCP socket: {e}"),
                    }
                });
            }
            FromService::UdpOpen { flow, dst } => {
                if flows.len() >= MAX_FLOWS || flows.contains_key(&flow) {
                    debug!(flow, "UDP flow refused (too many, or a duplicate id)");
                    continue;
                }
                let (tx, rx) = mpsc::channel(FLOW_QUEUE);
                flows.insert(flow, tx);
                let (chan, upstream, closed) = (chan.clone(), upstream.clone(), closed_tx.clone());
                tokio::spawn(async move {
                    user_flow(chan, upstream, flow, dst, rx).await;
                    let _ = closed.send(flow);
                });
            }
            FromService::UdpSend { flow } => {
                if let Some(tx) = flows.get(&flow) {
                    let _ = tx.try_send(payload);
                }
            }
            FromService::UdpClose { flow } => {
                flows.remove(&flow);
            }
            FromService::Dns { id } => {
                let Ok(permit) = dns_slots.clone().try_acquire_owned() else {
                    debug!("{MAX_DNS_IN_FLIGHT} DNS queries in flight: one dropped");
                    continue;
                };
                let (chan, upstream, query) = (chan.clone(), upstream.clone(), payload);
                tokio::spawn(async move {
                    let _permit = permit;
                    let (answer, error) = match upstream.dns(query).await {
                        Ok(a) if a.len() <= wire::MAX_PAYLOAD => (a, None),
                        Ok(a) => (Vec::new(), Some(format!("an answer of {} bytes", a.len()))),
                        Err(e) => (Vec::new(), Some(e.to_string())),
                    };
                    let _ = chan
                        .send(&ToService::DnsAnswer { id, error }, &answer, None)
                        .await;
                });
            }
            other => debug!("tpbpfd sent an unexpected {other:?}"),
        }
    }
}

/// One datagram flow on the user's side.
async fn user_flow(
    chan: Arc<Channel>,
    upstream: Arc<dyn Upstream>,
    id: u32,
    dst: SocketAddr,
    mut rx: mpsc::Receiver<Vec<u8>>,
) {
    let flow = match upstream.udp(dst).await {
        Ok(f) => f,
        Err(e) => {
            warn!(%dst, "opening a UDP flow: {e}");
            return;
        }
    };
    let mut buf = vec![0u8; wire::MAX_PAYLOAD];
    loop {
        tokio::select! {
            d = rx.recv() => match d {
                Some(d) => { let _ = flow.send(&d).await; }
                None => return,
            },
            r = flow.recv(&mut buf) => match r {
                Ok(n) => {
                    if chan.send(&ToService::UdpAnswer { flow: id }, &buf[..n], None).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    debug!(%dst, "UDP flow ended: {e}");
                    return;
                }
            },
        }
    }
}

// ---------------------------------------------------------------------------
// tpbpfd's side.

/// Where the answer to a DNS query sent to the user's side goes.
type DnsWaiter = oneshot::Sender<Result<Vec<u8>, String>>;

/// The upstream of a user's bridge, inside tpbpfd: the user's side, over
/// the service connection.
struct RemoteUpstream {
    chan: Arc<Channel>,
    who: String,
    next: AtomicU32,
    flows: Mutex<HashMap<u32, mpsc::Sender<Vec<u8>>>>,
    dns: Mutex<HashMap<u32, DnsWaiter>>,
    handovers: Arc<Semaphore>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl RemoteUpstream {
    fn id(&self) -> u32 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// A frame from the user's side.
    fn answer(&self, frame: Frame) -> Result<(), String> {
        if frame.fd.is_some() {
            return Err("a descriptor where none belongs".into());
        }
        match frame.parse::<ToService>()? {
            ToService::UdpAnswer { flow } => {
                if let Some(tx) = lock(&self.flows).get(&flow) {
                    let _ = tx.try_send(frame.payload);
                }
                Ok(())
            }
            ToService::DnsAnswer { id, error } => {
                if let Some(tx) = lock(&self.dns).remove(&id) {
                    let _ = tx.send(match error {
                        None => Ok(frame.payload),
                        Some(e) => Err(e),
                    });
                }
                Ok(())
            }
            other => Err(format!("{other:?} on a bridge's connection")),
        }
    }
}

struct RemoteFlow {
    up: Arc<RemoteUpstream>,
    id: u32,
    rx: tokio::sync::Mutex<mpsc::Receiver<Vec<u8>>>,
}

impl DatagramFlow for RemoteFlow {
    fn send<'a>(&'a self, buf: &'a [u8]) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            self.up
                .chan
                .send(&FromService::UdpSend { flow: self.id }, buf, None)
                .await
        })
    }
    fn recv<'a>(&'a self, buf: &'a mut [u8]) -> BoxFuture<'a, io::Result<usize>> {
        Box::pin(async move {
            let d = self.rx.lock().await.recv().await.ok_or_else(|| {
                io::Error::new(io::ErrorKind::ConnectionAborted, "the user's side is gone")
            })?;
            let n = d.len().min(buf.len());
            buf[..n].copy_from_slice(&d[..n]);
            Ok(n)
        })
    }
}

impl Drop for RemoteFlow {
    fn drop(&mut self) {
        lock(&self.up.flows).remove(&self.id);
        let (up, flow) = (self.up.clone(), self.id);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = up
                    .chan
                    .send(&FromService::UdpClose { flow }, &[], None)
                    .await;
            });
        }
    }
}

/// `Upstream` for an `Arc<RemoteUpstream>` (flows keep the upstream alive).
struct Remote(Arc<RemoteUpstream>);

impl Upstream for Remote {
    fn connect_tcp(&self, dst: SocketAddr) -> BoxFuture<'_, io::Result<Box<dyn Stream>>> {
        Box::pin(async move {
            Err(io::Error::other(format!(
                "{dst}: connections of a user's bridge are handed over, not dialed by tpbpfd"
            )))
        })
    }

    fn take_tcp(&self, client: TcpStream, dst: SocketAddr) -> Result<(), TcpStream> {
        let Ok(permit) = self.0.handovers.clone().try_acquire_owned() else {
            warn!(%dst, "{MAX_PENDING_HANDOVERS} connections waiting for {}: refused", self.0.who);
            return Err(client);
        };
        let chan = self.0.chan.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let Ok(client) = client.into_std() else {
                return;
            };
            if let Err(e) = chan
                .send(&FromService::Tcp { dst }, &[], Some(client.as_fd()))
                .await
            {
                debug!(%dst, "handing a connection over: {e}");
            }
        });
        Ok(())
    }

    fn udp(&self, dst: SocketAddr) -> BoxFuture<'_, io::Result<Box<dyn DatagramFlow>>> {
        Box::pin(async move {
            let up = &self.0;
            let id = up.id();
            let (tx, rx) = mpsc::channel(FLOW_QUEUE);
            {
                let mut flows = lock(&up.flows);
                if flows.len() >= MAX_FLOWS {
                    return Err(io::Error::other(format!("{MAX_FLOWS} UDP flows open")));
                }
                flows.insert(id, tx);
            }
            let flow = RemoteFlow {
                up: up.clone(),
                id,
                rx: tokio::sync::Mutex::new(rx),
            };
            up.chan
                .send(&FromService::UdpOpen { flow: id, dst }, &[], None)
                .await?;
            Ok(Box::new(flow) as Box<dyn DatagramFlow>)
        })
    }

    fn dns(&self, query: Vec<u8>) -> BoxFuture<'_, io::Result<Vec<u8>>> {
        Box::pin(async move {
            let up = &self.0;
            let id = up.id();
            let (tx, rx) = oneshot::channel();
            {
                let mut pending = lock(&up.dns);
                if pending.len() >= MAX_DNS_IN_FLIGHT {
                    return Err(io::Error::other("too many DNS queries in flight"));
                }
                pending.insert(id, tx);
            }
            let sent = up.chan.send(&FromService::Dns { id }, &query, None).await;
            let answer = match sent {
                Ok(()) => tokio::time::timeout(DNS_TIMEOUT, rx).await,
                Err(e) => {
                    lock(&up.dns).remove(&id);
                    return Err(e);
                }
            };
            lock(&up.dns).remove(&id);
            match answer {
                Ok(Ok(Ok(a))) => Ok(a),
                Ok(Ok(Err(e))) => Err(io::Error::other(e)),
                Ok(Err(_)) => Err(io::Error::other("the user's side is gone")),
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the cluster's DNS did not answer in time",
                )),
            }
        })
    }

    fn describe(&self) -> String {
        self.0.who.clone()
    }
}

/// Who may use this tpbpfd.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// Members of this group may (root always may).
    pub group: u32,
}

struct Service {
    policy: Policy,
    /// Each user's bridges: their exemption handles, by (uid, instance).
    bridges: Mutex<HashMap<(u32, String), tpbpf_loader::Bypass>>,
}

/// Binds the service socket at `path`: root:`group`, 0660, made under a
/// temporary name and renamed into place.
pub fn listen(path: &Path, group: u32) -> io::Result<Socket> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let sock = Socket::new(Domain::UNIX, Type::SEQPACKET, None)?;
    sock.bind(&SockAddr::unix(&tmp)?)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o660))?;
    std::os::unix::fs::chown(&tmp, Some(0), Some(group))?;
    sock.listen(128)?;
    std::fs::rename(&tmp, path)?;
    sock.set_nonblocking(true)?;
    Ok(sock)
}

/// tpbpfd's service loop: serves users of `policy` on `listener` until the
/// task is dropped.
pub async fn serve(listener: Socket, policy: Policy) -> io::Result<()> {
    // SAFETY: a Socket keeps its one descriptor open until dropped.
    let listener = unsafe { AsyncFd::register(listener) }?;
    let service = Arc::new(Service {
        policy,
        bridges: Mutex::new(HashMap::new()),
    });
    let slots = Arc::new(Semaphore::new(MAX_SESSIONS));
    info!(group = policy.group, "tpbpfd serving");
    loop {
        let mut ready = listener.readable().await?;
        let conn = match ready.try_io(|l| l.get_ref().accept()) {
            Ok(Ok((conn, _))) => conn,
            Ok(Err(e)) => {
                warn!("accepting on the service socket: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Err(_would_block) => continue,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            warn!("{MAX_SESSIONS} connections at once: one refused");
            continue;
        };
        let service = service.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = service.session(conn).await {
                debug!("service connection: {e}");
            }
        });
    }
}

impl Service {
    async fn session(self: Arc<Self>, conn: Socket) -> io::Result<()> {
        let peer = Peer::of(conn.as_fd())?;
        let chan = Arc::new(Channel::new(OwnedFd::from(conn))?);
        let refuse = |error: String| {
            let chan = chan.clone();
            async move {
                warn!("refused: {error}");
                chan.send(&FromService::Refused { error }, &[], None).await
            }
        };
        let frame = match tokio::time::timeout(REQUEST_TIMEOUT, chan.recv()).await {
            Err(_) => return refuse("no request within 10 s".into()).await,
            Ok(Err(e)) => return refuse(format!("a malformed request: {e}")).await,
            Ok(Ok(None)) => return Ok(()),
            Ok(Ok(Some(f))) => f,
        };
        if !(peer.uid == 0 || peer.in_group(self.policy.group)) {
            return refuse(format!(
                "uid {} is not in group {} (gid {}): only root and that group's members may use tpbpfd",
                peer.uid, GROUP, self.policy.group
            ))
            .await;
        }
        let request = match frame.parse::<ToService>() {
            Ok(r) => r,
            Err(e) => return refuse(e).await,
        };
        match request {
            ToService::Prepare => match prepare_user_dir(&peer) {
                Ok(state_dir) => {
                    chan.send(&FromService::Prepared { state_dir }, &[], None)
                        .await
                }
                Err(e) => refuse(format!("making the user's state directory: {e}")).await,
            },
            ToService::Exempt { instance } => {
                let Some(sock) = frame.fd else {
                    return refuse("an exemption without its socket".into()).await;
                };
                let bypass = lock(&self.bridges)
                    .get(&(peer.uid, instance.clone()))
                    .cloned();
                let Some(bypass) = bypass else {
                    return refuse(format!("you have no bridge `{instance}`")).await;
                };
                match bypass.register(&sock) {
                    Ok(_) => chan.send(&FromService::Exempted, &[], None).await,
                    Err(e) => refuse(format!("not a socket to exempt: {e}")).await,
                }
            }
            ToService::Up(request) => {
                match self
                    .clone()
                    .bridge(peer, chan.clone(), request, frame.fd)
                    .await
                {
                    Ok(()) => Ok(()),
                    Err(e) => refuse(e).await,
                }
            }
            other => refuse(format!("{other:?} before any bridge")).await,
        }
    }

    /// Makes the bridge, then serves it until the user's side goes away.
    async fn bridge(
        self: Arc<Self>,
        peer: Peer,
        chan: Arc<Channel>,
        request: UpRequest,
        pidfd: Option<OwnedFd>,
    ) -> Result<(), String> {
        let options = options(&request)?;
        let run = match (request.run, pidfd) {
            (true, Some(pidfd)) => Some(RunScope::make(&peer, pidfd)?),
            (true, None) => return Err("a command to bridge comes with its pidfd".into()),
            (false, Some(_)) => return Err("a descriptor where none belongs".into()),
            (false, None) => None,
        };
        let (scope, scope_name) = match &run {
            Some(r) => {
                let dir = r.cgroup.open().map_err(|e| e.to_string())?;
                (dir, r.cgroup.path().display().to_string())
            }
            None => scope_for(&peer, request.cgroup.as_deref())?,
        };
        let key = (peer.uid, request.instance.clone());
        {
            let bridges = lock(&self.bridges);
            if bridges.contains_key(&key) {
                return Err(format!("you already have a bridge `{}`", request.instance));
            }
            if bridges.keys().filter(|(uid, _)| *uid == peer.uid).count() >= MAX_BRIDGES_PER_USER {
                return Err(format!("{MAX_BRIDGES_PER_USER} bridges per user at most"));
            }
        }
        let remote = Arc::new(RemoteUpstream {
            chan: chan.clone(),
            who: format!("the user's side of uid {} (pid {})", peer.uid, peer.pid),
            next: AtomicU32::new(1),
            flows: Mutex::new(HashMap::new()),
            dns: Mutex::new(HashMap::new()),
            handovers: Arc::new(Semaphore::new(MAX_PENDING_HANDOVERS)),
        });
        let mut bridge = Bridge::start(options, Arc::new(Remote(remote.clone())))
            .await
            .map_err(|e| format!("loading the bridge: {e}"))?;
        let ids = bridge
            .attach(&scope, &scope_name)
            .map_err(|e| format!("attaching to cgroup {scope_name}: {e}"))?;
        drop(scope);
        let registered = Registered {
            service: self.clone(),
            key: key.clone(),
        };
        {
            let mut bridges = lock(&self.bridges);
            if bridges.contains_key(&key) {
                return Err(format!("you already have a bridge `{}`", request.instance));
            }
            bridges.insert(key, bridge.bypass());
        }
        let proxy = bridge.proxy();
        let ready = Ready {
            cgroup: PathBuf::from(&scope_name),
            tcp4: proxy.tcp4.to_string(),
            tcp6: proxy.tcp6.map(|a| a.to_string()),
            udp_port: proxy.udp_port,
            program_ids: ids.program_ids,
            link_ids: ids.link_ids,
        };
        info!(
            uid = peer.uid,
            pid = peer.pid,
            instance = request.instance,
            cgroup = scope_name,
            "bridge up"
        );
        chan.send(&FromService::Ready(ready), &[], None)
            .await
            .map_err(|e| e.to_string())?;
        loop {
            match chan.recv().await {
                Ok(Some(frame)) => {
                    if let Err(e) = remote.answer(frame) {
                        warn!(uid = peer.uid, "ending bridge `{}`: {e}", request.instance);
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    warn!(uid = peer.uid, "ending bridge `{}`: {e}", request.instance);
                    break;
                }
            }
        }
        drop(registered);
        drop(bridge);
        if let Some(run) = run {
            run.finish();
        }
        info!(uid = peer.uid, instance = request.instance, "bridge down");
        Ok(())
    }
}

/// The cgroup of one `tpbpf run` command: made below the command's own
/// cgroup, removed when the bridge ends (processes still inside go back to
/// the parent, as with root's `tpbpf run`), or by a helper if tpbpfd dies.
struct RunScope {
    cgroup: tpbpf_cgroup::ChildCgroup,
    reaper: tpbpf_cgroup::reaper::Reaper,
}

impl RunScope {
    /// Moves the process of `pidfd` into a cgroup of its own, after
    /// checking that it is the peer's child and runs as the peer's uid.
    fn make(peer: &Peer, pidfd: OwnedFd) -> Result<Self, String> {
        use std::os::fd::AsRawFd;
        let fdinfo = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd()))
            .map_err(|e| format!("reading the command's pidfd: {e}"))?;
        let pid: i32 = status_field(&fdinfo, "Pid:")
            .and_then(|v| v.first()?.parse().ok())
            .filter(|p| *p > 0)
            .ok_or("the descriptor is not a pidfd of a live process")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map_err(|e| format!("the command's process: {e}"))?;
        let uids = status_field(&status, "Uid:").unwrap_or_default();
        let ppid = status_field(&status, "PPid:").and_then(|v| v.first()?.parse::<i32>().ok());
        if uids.is_empty()
            || uids.iter().any(|u| u.parse() != Ok(peer.uid))
            || ppid != Some(peer.pid)
        {
            return Err(format!(
                "process {pid} is not a child of yours (uid {}, pid {})",
                peer.uid, peer.pid
            ));
        }
        let mount = tpbpf_cgroup::cgroup2_mount().map_err(|e| e.to_string())?;
        let parent =
            mount.join(tpbpf_cgroup::cgroup_of(Some(pid as u32)).map_err(|e| e.to_string())?);
        let cgroup = tpbpf_cgroup::ChildCgroup::create(&parent, &format!("tpbpf-run-{pid}"))
            .map_err(|e| e.to_string())?;
        let exe = std::env::current_exe().map_err(|e| format!("tpbpfd's own executable: {e}"))?;
        let reaper = tpbpf_cgroup::reaper::Reaper::spawn(&exe, &["__reap-cgroup"], cgroup.path())
            .map_err(|e| format!("starting the cgroup clean-up helper: {e}"))?;
        cgroup.add(pid as u32).map_err(|e| e.to_string())?;
        // The pid named the pidfd's process when it was moved if that
        // process still lives (a pid is not reused while its process exists).
        // SAFETY: pidfd_send_signal with signal 0 only checks; no memory is passed.
        let alive = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                pidfd.as_raw_fd(),
                0,
                std::ptr::null::<u8>(),
                0,
            )
        } == 0;
        if !alive {
            return Err("the command's process went away".into());
        }
        Ok(Self { cgroup, reaper })
    }

    fn finish(self) {
        if let Err(e) = self.cgroup.remove() {
            warn!("removing a command's cgroup: {e}");
        }
        self.reaper.finish();
    }
}

/// The whitespace-separated values of a `Name:` line of a /proc file.
fn status_field(text: &str, name: &str) -> Option<Vec<String>> {
    text.lines()
        .find_map(|l| l.strip_prefix(name))
        .map(|v| v.split_whitespace().map(str::to_string).collect())
}

/// Removes a bridge from the registry when its session ends, however it ends.
struct Registered {
    service: Arc<Service>,
    key: (u32, String),
}

impl Drop for Registered {
    fn drop(&mut self) {
        lock(&self.service.bridges).remove(&self.key);
    }
}

/// Checks a user's request and turns it into the bridge's options.
fn options(request: &UpRequest) -> Result<BridgeOptions, String> {
    let name_ok = |s: &str, max: usize| {
        !s.is_empty()
            && s.len() <= max
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    };
    if !name_ok(&request.instance, 64) || request.instance.starts_with('.') {
        return Err(format!("`{}` is not a bridge name", request.instance));
    }
    if request.cidrs.len() > 256 || request.never_proxy.len() > 256 {
        return Err("at most 256 ranges to bridge and 256 never to".into());
    }
    let parse = |list: &[String]| -> Result<Vec<tpbpf_loader::Cidr>, String> {
        list.iter()
            .map(|c| {
                c.parse()
                    .map_err(|e: tpbpf_loader::CidrParseError| e.to_string())
            })
            .collect()
    };
    let dns = match &request.dns {
        None => None,
        Some(d) => {
            let names = std::iter::once(&d.cluster_domain)
                .chain(&d.suffixes)
                .chain(&d.namespaces);
            if d.suffixes.len() > 16 || d.namespaces.len() > 64 {
                return Err("at most 16 DNS suffixes and 64 namespaces".into());
            }
            for n in names {
                if !name_ok(n, 253) {
                    return Err(format!("`{n}` is not a DNS name"));
                }
            }
            Some(DnsConfig {
                cluster_domain: d.cluster_domain.clone(),
                suffixes: d.suffixes.clone(),
                namespaces: d.namespaces.clone(),
            })
        }
    };
    let cidrs = parse(&request.cidrs)?;
    if cidrs.is_empty() && dns.is_none() {
        return Err("nothing to bridge: no ranges and no DNS".into());
    }
    Ok(BridgeOptions {
        cidrs,
        never_proxy: parse(&request.never_proxy)?,
        dns,
        tc_mark: None,
    })
}

/// The cgroup a user may bridge: one below the cgroup v2 mount that the
/// user owns (a delegated subtree, e.g. systemd's `user@UID.service`), or,
/// without one, the whole machine (allowed to members of the group).
fn scope_for(peer: &Peer, cgroup: Option<&Path>) -> Result<(std::fs::File, String), String> {
    use std::os::unix::fs::MetadataExt;
    let mount = tpbpf_cgroup::cgroup2_mount().map_err(|e| e.to_string())?;
    let path = match cgroup {
        None => mount.clone(),
        Some(p) => {
            let canon = p
                .canonicalize()
                .map_err(|e| format!("cgroup {}: {e}", p.display()))?;
            if !canon.starts_with(&mount) {
                return Err(format!(
                    "{} is not a cgroup (not below {})",
                    p.display(),
                    mount.display()
                ));
            }
            canon
        }
    };
    let dir = std::fs::File::open(&path).map_err(|e| format!("opening {}: {e}", path.display()))?;
    let meta = dir.metadata().map_err(|e| e.to_string())?;
    if !meta.is_dir() {
        return Err(format!("{} is not a cgroup", path.display()));
    }
    if path != mount && peer.uid != 0 && meta.uid() != peer.uid {
        return Err(format!(
            "cgroup {} belongs to uid {}, not to you (uid {}): bridge a cgroup of your own, or the whole machine",
            path.display(),
            meta.uid(),
            peer.uid
        ));
    }
    Ok((dir, path.display().to_string()))
}

/// `/run/tpbpf/uid-UID`, the user's, 0700: made if missing; refused if it
/// is anything else (a link, another owner).
fn prepare_user_dir(peer: &Peer) -> io::Result<PathBuf> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = if peer.uid == 0 {
        PathBuf::from("/run/tpbpf")
    } else {
        user_dir(peer.uid)
    };
    std::fs::create_dir_all("/run/tpbpf")?;
    match std::fs::create_dir(&dir) {
        Ok(()) => {
            std::os::unix::fs::chown(&dir, Some(peer.uid), Some(peer.gid))?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(&dir)?;
    if !meta.is_dir() || meta.uid() != peer.uid {
        return Err(io::Error::other(format!(
            "{} is not a directory of uid {}",
            dir.display(),
            peer.uid
        )));
    }
    Ok(dir)
}
