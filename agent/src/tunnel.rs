//! The agent's tunnel endpoint: TLS with key material made at start, a
//! token that is handed out only to connections from the node itself (the
//! path a Kubernetes port-forward takes), and for every session: streams
//! dialed from the node, datagram flows, DNS through the cluster's DNS.
use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tpbpf_mux::{
    transport::TlsIdentity, Config, Destination, Request, ResetReason, Server, Session, Stream,
};
use tracing::{debug, info, warn};

use crate::{policy::Policy, rights::Rights};

/// How long dialing a destination may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// A datagram flow with no traffic for this long is closed.
const FLOW_IDLE: Duration = Duration::from_secs(60);
/// How long the cluster DNS may take to answer.
const DNS_TIMEOUT: Duration = Duration::from_secs(3);

/// How long an issued token may wait for the session it opens.
const TOKEN_TTL: Duration = Duration::from_secs(60);
/// Issued tokens not yet used, at most: the oldest goes first.
const MAX_PENDING_TOKENS: usize = 256;

/// The tunnel's key material (made at start) and the tokens it has issued.
pub struct Credentials {
    pub identity: TlsIdentity,
    pub tunnel: SocketAddr,
    tokens: Arc<Tokens>,
}

/// Tokens issued by `/credentials`: each opens one session, once, within
/// [`TOKEN_TTL`], and is then bound to it (only that session may resume
/// with it); it goes when the session does. No token is shared between
/// users or sessions.
#[derive(Default)]
pub struct Tokens {
    issued: Mutex<HashMap<String, Issued>>,
}

struct Issued {
    at: Instant,
    session: Option<[u8; 16]>,
}

impl Tokens {
    fn issue(&self) -> io::Result<String> {
        let mut raw = [0u8; 32];
        getrandom::getrandom(&mut raw).map_err(|e| io::Error::other(e.to_string()))?;
        let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let mut issued = self.issued.lock().unwrap_or_else(|e| e.into_inner());
        issued.retain(|_, i| i.session.is_some() || i.at.elapsed() < TOKEN_TTL);
        let pending = issued.values().filter(|i| i.session.is_none()).count();
        if pending >= MAX_PENDING_TOKENS {
            if let Some(oldest) = issued
                .iter()
                .filter(|(_, i)| i.session.is_none())
                .min_by_key(|(_, i)| i.at)
                .map(|(t, _)| t.clone())
            {
                issued.remove(&oldest);
            }
        }
        issued.insert(
            token.clone(),
            Issued {
                at: Instant::now(),
                session: None,
            },
        );
        Ok(token)
    }
}

impl tpbpf_mux::Admission for Tokens {
    fn admit(&self, token: &[u8], session: &[u8; 16], resume: bool) -> Result<(), String> {
        let token = std::str::from_utf8(token).unwrap_or("");
        let mut issued = self.issued.lock().unwrap_or_else(|e| e.into_inner());
        // Compared in constant time against each; there are few.
        let found = issued
            .iter_mut()
            .find(|(t, _)| tpbpf_mux::same_token(t.as_bytes(), token.as_bytes()))
            .map(|(_, i)| i);
        match (found, resume) {
            (None, _) => Err(
                "unknown token: get a fresh one from the agent's /credentials \
                 through a port-forward (tpbpf up does)"
                    .into(),
            ),
            (Some(i), false) if i.session.is_some() => Err("this token has opened a session \
                 already: each token opens one session; get a fresh one (tpbpf up does)"
                .into()),
            (Some(i), false) if i.at.elapsed() >= TOKEN_TTL => Err(format!(
                "this token expired ({} s after it was issued): get a fresh one",
                TOKEN_TTL.as_secs()
            )),
            (Some(i), false) => {
                i.session = Some(*session);
                info!(session = %tpbpf_mux::short_id(session), "tunnel token bound to a new session");
                Ok(())
            }
            (Some(i), true) if i.session == Some(*session) => Ok(()),
            (Some(_), true) => Err("this token belongs to another session".into()),
        }
    }

    fn ended(&self, session: &[u8; 16]) {
        self.issued
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, i| i.session != Some(*session));
    }
}

impl Credentials {
    pub fn generate(tunnel: SocketAddr) -> io::Result<Credentials> {
        Ok(Credentials {
            identity: TlsIdentity::generate()?,
            tunnel,
            tokens: Arc::default(),
        })
    }

    /// Fresh credentials for one session.
    pub fn issue(&self) -> io::Result<tpbpf_agent_api::Credentials> {
        Ok(tpbpf_agent_api::Credentials {
            token: self.tokens.issue()?,
            fingerprint: self.identity.fingerprint(),
            tunnel_port: self.tunnel.port(),
            tunnel_address: self.tunnel.to_string(),
        })
    }
}

/// Whether an HTTP peer may have the tunnel's credentials: only from the
/// agent pod's own loopback, which (with the agent in a pod network
/// namespace of its own) a Kubernetes port-forward reaches and nothing
/// else does.
pub fn through_port_forward(peer: IpAddr, local: IpAddr) -> bool {
    peer.is_loopback() && local.is_loopback()
}

/// Serves tunnel sessions on `listener` until it fails.
pub async fn serve(
    listener: TcpListener,
    creds: Arc<Credentials>,
    cluster_dns: Option<SocketAddr>,
    resume_window: Duration,
    policy: Arc<Policy>,
    rights: Arc<Rights>,
) -> io::Result<()> {
    let config = Config {
        resume_window,
        ..Config::default()
    };
    let (server, mut sessions) = Server::new(config, creds.tokens.clone());
    let acceptor = creds.identity.acceptor()?;
    tokio::spawn(async move {
        while let Some((session, peer)) = sessions.recv().await {
            tokio::spawn(serve_session(
                session,
                peer,
                cluster_dns,
                policy.clone(),
                rights.clone(),
            ));
        }
    });
    server.serve(listener, Some(acceptor)).await
}

async fn serve_session(
    session: Session,
    peer: SocketAddr,
    cluster_dns: Option<SocketAddr>,
    policy: Arc<Policy>,
    rights: Arc<Rights>,
) {
    let id = session.short_id();
    info!(%peer, session = %id, "tunnel session open");
    let requests = tokio::spawn(serve_requests(
        session.clone(),
        cluster_dns,
        policy.clone(),
        rights,
    ));
    while let Some(stream) = session.accept().await {
        tokio::spawn(serve_stream(stream, policy.clone()));
    }
    requests.abort();
    info!(%peer, session = %id, "tunnel session over: {}", session.ended().unwrap_or_default());
}

async fn resolve(dst: &Destination) -> io::Result<SocketAddr> {
    match dst {
        Destination::Addr(a) => Ok(*a),
        Destination::Name { host, port } => tokio::net::lookup_host((host.as_str(), *port))
            .await?
            .next()
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address"))
            }),
    }
}

async fn serve_stream(mut stream: Stream, policy: Arc<Policy>) {
    let Some(dst) = stream.destination() else {
        return;
    };
    let addr = match resolve(&dst).await {
        Ok(a) => a,
        Err(e) => {
            stream.reset(
                ResetReason::Unreachable,
                &format!("resolving {dst:?} on the node: {e}"),
            );
            return;
        }
    };
    if let Err(why) = policy.check(addr) {
        warn!(%addr, "tunnel stream refused: {why}");
        stream.reset(ResetReason::Refused, &why);
        return;
    }
    match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(mut tcp)) => {
            let _ = tcp.set_nodelay(true);
            debug!(%addr, "tunnel stream connected");
            match tpbpf_mux::relay(&mut stream, &mut tcp).await {
                Ok(_) => {}
                Err(e) => {
                    debug!(%addr, "tunnel stream ended: {e}");
                    stream.reset(ResetReason::Aborted, &format!("{addr}: {e}"));
                }
            }
        }
        Ok(Err(e)) => {
            let reason = if e.kind() == io::ErrorKind::ConnectionRefused {
                ResetReason::Refused
            } else {
                ResetReason::Unreachable
            };
            stream.reset(reason, &format!("connecting to {addr} from the node: {e}"));
        }
        Err(_) => stream.reset(
            ResetReason::Unreachable,
            &format!("connecting to {addr} from the node: no answer in {DIAL_TIMEOUT:?}"),
        ),
    }
}

/// The cluster's DNS server: given, else the node's resolver.
fn dns_server(given: Option<SocketAddr>) -> Option<SocketAddr> {
    given.or_else(|| {
        let conf = std::fs::read_to_string("/etc/resolv.conf").ok()?;
        conf.lines()
            .filter_map(|l| l.strip_prefix("nameserver"))
            .filter_map(|ip| ip.trim().parse::<IpAddr>().ok())
            .map(|ip| SocketAddr::new(ip, 53))
            .next()
    })
}

async fn serve_requests(
    session: Session,
    cluster_dns: Option<SocketAddr>,
    policy: Arc<Policy>,
    rights: Arc<Rights>,
) {
    let dns = dns_server(cluster_dns);
    let mut flows: HashMap<u32, Arc<UdpSocket>> = HashMap::new();
    // Emptied when the session ends: intercepts detach.
    let intercepts: Arc<Mutex<Intercepts>> = Arc::default();
    let dns_in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_DNS_IN_FLIGHT));
    while let Some(request) = session.next_request().await {
        match request {
            Request::InterceptStart { id, target, mode } => {
                if let Err(e) = intercepts
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .begin(id)
                {
                    warn!(%target, "intercept refused: {e}");
                    let _ = session.intercept_status(id, false, &e);
                    continue;
                }
                let Some(permit) = CheckPermit::take() else {
                    intercepts
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .by_id
                        .remove(&id);
                    let _ = session.intercept_status(
                        id,
                        false,
                        "this agent is busy checking other intercepts: try again in a few seconds",
                    );
                    continue;
                };
                let (session, intercepts) = (session.clone(), intercepts.clone());
                let (policy, rights) = (policy.clone(), rights.clone());
                tokio::spawn(async move {
                    // First the client's rights, asked of the API server
                    // (or a port-forward into the pod); then the
                    // intercept, in the namespace the check found.
                    let checked =
                        crate::intercept::check_access(&session, id, target, &policy, &rights)
                            .await;
                    let result = match checked {
                        Err(e) => Err(e),
                        Ok(access) => {
                            let s2 = session.clone();
                            let ns = access.netns;
                            tokio::task::spawn_blocking(move || {
                                crate::intercept::start(&s2, id, target, &mode, ns)
                            })
                            .await
                            .map_err(|e| e.to_string())
                            .and_then(|r| r)
                            .map(|active| (active, access.env))
                        }
                    };
                    drop(permit);
                    match result {
                        Ok((active, env)) => {
                            // A withheld environment is one `#` note, which
                            // no `KEY=VALUE` reader takes for a variable.
                            let environ = match env {
                                Ok(()) => active.environ.clone(),
                                Err(why) => format!("#{}", why.replace(['=', '\0'], ":")),
                            };
                            // Dropped outside the lock if it was stopped (or
                            // the session ended) while being checked.
                            let stopped = intercepts
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .finish(id, active);
                            match stopped {
                                None => {
                                    let _ = session.intercept_status(id, true, &environ);
                                }
                                Some(active) => {
                                    drop(active);
                                    info!(%target, "intercept stopped while it was being checked");
                                    let _ = session.intercept_status(id, false, "removed");
                                }
                            }
                        }
                        Err(e) => {
                            intercepts
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .by_id
                                .remove(&id);
                            warn!(%target, "intercept refused: {e}");
                            let _ = session.intercept_status(id, false, &e);
                        }
                    }
                });
            }
            Request::InterceptStop { id } => {
                let removed = intercepts
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .by_id
                    .remove(&id);
                // Detached (with the last route of its target) before the
                // answer: the client's `leave` returns once the app gets its
                // connections again. One still being checked is dropped when
                // its check ends.
                drop(removed);
                let _ = session.intercept_status(id, false, "removed");
            }
            Request::Dns { id, query } => {
                // Like a full socket buffer: queries beyond the bound are
                // dropped, and their resolvers retry.
                let Ok(permit) = dns_in_flight.clone().try_acquire_owned() else {
                    debug!(
                        "cluster DNS: {MAX_DNS_IN_FLIGHT} queries in flight already: dropped one"
                    );
                    continue;
                };
                let session = session.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    match ask_dns(dns, &query).await {
                        Ok(answer) => {
                            let _ = session.answer_dns(id, answer);
                        }
                        Err(e) => debug!("cluster DNS: {e}"),
                    }
                });
            }
            Request::Datagram { flow, dst, data } => {
                flows.retain(|_, s| Arc::strong_count(s) > 1);
                let sock = match flows.get(&flow) {
                    Some(s) => s.clone(),
                    None if flows.len() >= MAX_FLOWS => {
                        debug!(
                            ?dst,
                            "{MAX_FLOWS} datagram flows open already: dropped a datagram"
                        );
                        continue;
                    }
                    None => match open_flow(&session, flow, &dst, &policy).await {
                        Ok(s) => {
                            flows.insert(flow, s.clone());
                            s
                        }
                        Err(e) => {
                            warn!(?dst, "datagram flow refused: {e}");
                            continue;
                        }
                    },
                };
                let _ = sock.send(&data).await;
            }
        }
    }
    let gone = intercepts.lock().unwrap_or_else(|e| e.into_inner()).close();
    drop(gone);
}

/// DNS queries one session may have in flight at once.
const MAX_DNS_IN_FLIGHT: usize = 256;
/// Datagram flows (a UDP socket each) one session may have open at once.
const MAX_FLOWS: usize = 1024;

/// Intercepts one session may have (in place or being checked) at once.
const MAX_INTERCEPTS_PER_SESSION: usize = 32;
/// Access checks the agent runs at once, over all sessions.
const MAX_CHECKS: usize = 64;

/// One session's intercepts by id: `None` while its access check runs.
#[derive(Default)]
struct Intercepts {
    closed: bool,
    by_id: HashMap<u32, Option<crate::intercept::Active>>,
}

impl Intercepts {
    /// Reserves `id` for a start.
    fn begin(&mut self, id: u32) -> Result<(), String> {
        if self.closed {
            return Err("the session is over".into());
        }
        if self.by_id.contains_key(&id) {
            return Err(format!("intercept id {id} is in use in this session"));
        }
        if self.by_id.len() >= MAX_INTERCEPTS_PER_SESSION {
            return Err(format!(
                "one session may hold {MAX_INTERCEPTS_PER_SESSION} intercepts at most"
            ));
        }
        self.by_id.insert(id, None);
        Ok(())
    }

    /// Puts a checked intercept in place, unless it was stopped meanwhile:
    /// then it is handed back, to be dropped.
    fn finish(
        &mut self,
        id: u32,
        active: crate::intercept::Active,
    ) -> Option<crate::intercept::Active> {
        match self.by_id.get_mut(&id) {
            Some(slot @ None) if !self.closed => {
                *slot = Some(active);
                None
            }
            _ => Some(active),
        }
    }

    /// The session is over: everything goes, and nothing more comes in.
    fn close(&mut self) -> Vec<crate::intercept::Active> {
        self.closed = true;
        self.by_id.drain().filter_map(|(_, a)| a).collect()
    }
}

static CHECKS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One of the [`MAX_CHECKS`] access checks the agent runs at once.
struct CheckPermit;

impl CheckPermit {
    fn take() -> Option<CheckPermit> {
        use std::sync::atomic::Ordering;
        CHECKS
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_CHECKS).then_some(n + 1)
            })
            .ok()
            .map(|_| CheckPermit)
    }
}

impl Drop for CheckPermit {
    fn drop(&mut self) {
        CHECKS.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

async fn ask_dns(server: Option<SocketAddr>, query: &[u8]) -> io::Result<Vec<u8>> {
    let server = server.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no cluster DNS server known (--cluster-dns)",
        )
    })?;
    let sock = UdpSocket::bind(if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })
    .await?;
    sock.connect(server).await?;
    let mut buf = vec![0u8; 65535];
    for _ in 0..2 {
        sock.send(query).await?;
        if let Ok(r) = tokio::time::timeout(DNS_TIMEOUT, sock.recv(&mut buf)).await {
            let n = r?;
            return Ok(buf[..n].to_vec());
        }
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        format!("{server} did not answer"),
    ))
}

/// A UDP socket for one flow, and a task that carries its answers back
/// until the flow is idle.
async fn open_flow(
    session: &Session,
    flow: u32,
    dst: &Destination,
    policy: &Policy,
) -> io::Result<Arc<UdpSocket>> {
    let addr = resolve(dst).await?;
    policy
        .check(addr)
        .map_err(|why| io::Error::new(io::ErrorKind::PermissionDenied, why))?;
    let sock = UdpSocket::bind(if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })
    .await?;
    sock.connect(addr).await?;
    let sock = Arc::new(sock);
    let (s2, session) = (sock.clone(), session.clone());
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65535];
        loop {
            match tokio::time::timeout(FLOW_IDLE, s2.recv(&mut buf)).await {
                Ok(Ok(n)) => {
                    if session.reply_datagram(flow, addr, &buf[..n]).is_err() {
                        break;
                    }
                }
                Ok(Err(e)) => {
                    debug!(%addr, "datagram flow: {e}");
                    break;
                }
                Err(_) => break,
            }
        }
    });
    Ok(sock)
}

pub fn warn_unreachable(listen: SocketAddr) {
    if listen.ip().is_loopback() {
        warn!(%listen, "the tunnel listens on loopback only: only port-forward transports reach it");
    }
}
