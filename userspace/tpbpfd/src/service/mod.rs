//! tpbpfd's service: the privileged half of every bridge (eBPF programs,
//! cgroup attachments, the listeners), serving the user's sides of bridges
//! over one socket each. The contract is `tpbpf-bridge-api`.
//!
//! A user's side connects to the service socket (root:tpbpf, 0660), or for
//! root gets one end of a socket pair served in its own process, and asks
//! for a bridge ([`ToService::Up`]). tpbpfd checks who asks
//! (`SO_PEERCRED`, `SO_PEERGROUPS`) and what (a cgroup the user owns, or
//! the whole machine), loads and attaches the programs, and from then on
//! passes each redirected TCP connection to the user's side (`SCM_RIGHTS`,
//! with its original destination). Datagrams and cluster DNS queries travel
//! as frames with a binary header. When the user's side goes away, the
//! bridge is detached at once.
mod request;
mod run_scope;
mod user_side;

use std::{
    collections::{HashMap, HashSet},
    io,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use socket2::{Domain, SockAddr, Socket, Type};
use tokio::{io::unix::AsyncFd, sync::Semaphore};
use tpbpf_bridge_api::{
    limits::{MAX_BRIDGES_PER_USER, MAX_SESSIONS, MAX_SESSIONS_PER_USER, REQUEST_TIMEOUT},
    Datagram, FromService, Ready, ToService, UpRequest, GROUP,
};
use tpbpf_sys::seqpacket::{Channel, Frame, Peer};
use tracing::{debug, info, warn};

pub use request::options;
use run_scope::RunScope;
use user_side::lock;
pub use user_side::{RemoteFlow, UserSide};

use crate::{tc::TcPath, Bridge};

/// Who may use this tpbpfd.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    /// Members of this group may (root always may).
    pub group: u32,
}

/// The bridges of one tpbpfd.
pub struct Service {
    policy: Policy,
    /// Each user's bridges, by (uid, instance): a name is taken when its
    /// request is checked, before anything is loaded.
    bridges: Mutex<HashSet<(u32, String)>>,
    /// Each user's connections to the service, for [`MAX_SESSIONS_PER_USER`].
    sessions: Mutex<HashMap<u32, usize>>,
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

impl Service {
    pub fn new(policy: Policy) -> Arc<Self> {
        Arc::new(Self {
            policy,
            bridges: Mutex::new(HashSet::new()),
            sessions: Mutex::new(HashMap::new()),
        })
    }

    /// Serves users of the policy on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: Socket) -> io::Result<()> {
        // SAFETY: a Socket keeps its one descriptor open until dropped.
        let listener = unsafe { AsyncFd::register(listener) }?;
        let slots = Arc::new(Semaphore::new(MAX_SESSIONS));
        info!(group = self.policy.group, "tpbpfd serving");
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
            // One user may not hold every connection the service takes.
            let Some(user_slot) = Peer::of(conn.as_fd())
                .ok()
                .and_then(|p| UserSlot::take(&self, p.uid))
            else {
                warn!("{MAX_SESSIONS_PER_USER} connections of one user at once: one refused");
                continue;
            };
            let service = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let _user_slot = user_slot;
                if let Err(e) = service.session(conn).await {
                    debug!("service connection: {e}");
                }
            });
        }
    }

    /// Serves one connection (for root's own bridges, one end of a socket
    /// pair in the same process) until it ends.
    pub async fn session(self: Arc<Self>, conn: Socket) -> io::Result<()> {
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
            ToService::Prepare => match request::prepare_user_dir(&peer) {
                Ok(state_dir) => {
                    chan.send(&FromService::Prepared { state_dir }, &[], None)
                        .await
                }
                Err(e) => refuse(format!("making the user's state directory: {e}")).await,
            },
            ToService::Up(request) => {
                match self
                    .clone()
                    .bridge(peer, chan.clone(), *request, frame.fd)
                    .await
                {
                    Ok(()) => Ok(()),
                    Err(e) => refuse(e).await,
                }
            }
            ToService::Exempt { .. } | ToService::Namespaces { .. } => {
                refuse(
                    "exemptions and namespaces are sent on a bridge's own connection, for that bridge: this connection has none"
                        .into(),
                )
                .await
            }
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
        let options = options(&request, peer.uid)?;
        let run = match (request.run, pidfd) {
            (true, Some(pidfd)) => {
                let parent = match &request.cgroup {
                    Some(p) => Some(PathBuf::from(request::scope_for(&peer, Some(p))?.1)),
                    None => None,
                };
                Some(RunScope::start(&peer, pidfd, parent).await?)
            }
            (true, None) => return Err("a command to bridge comes with its pidfd".into()),
            (false, Some(_)) => return Err("a descriptor where none belongs".into()),
            (false, None) => None,
        };
        let (scope, scope_name) = match &run {
            Some(r) => (r.open()?, r.path().display().to_string()),
            None => request::scope_for(&peer, request.cgroup.as_deref())?,
        };
        let key = (peer.uid, request.instance.clone());
        // The name and the count are checked and taken in one step.
        let registered = {
            let mut bridges = lock(&self.bridges);
            if bridges.contains(&key) {
                return Err(format!("you already have a bridge `{}`", request.instance));
            }
            if bridges.iter().filter(|(uid, _)| *uid == peer.uid).count() >= MAX_BRIDGES_PER_USER {
                return Err(format!("{MAX_BRIDGES_PER_USER} bridges per user at most"));
            }
            bridges.insert(key.clone());
            Registered {
                service: self.clone(),
                key,
            }
        };
        let user = UserSide::new(
            chan.clone(),
            format!("the user's side of uid {} (pid {})", peer.uid, peer.pid),
        );
        let mut bridge = Bridge::start(options, user.clone())
            .await
            .map_err(|e| format!("loading the bridge: {e}"))?;
        let ids = bridge
            .attach(&scope, &scope_name)
            .map_err(|e| format!("attaching to cgroup {scope_name}: {e}"))?;
        drop(scope);
        let tc = if bridge.proxy().tc.is_some() {
            Some(TcPath::start(
                &mut bridge,
                &request.attach_ifaces,
                &request.attach_netns,
            )?)
        } else {
            None
        };
        let bypass = bridge.bypass();
        let mut dns = bridge.mapped_namespaces().map(|m| (m, Default::default()));
        let proxy = bridge.proxy();
        let ready = Ready {
            cgroup: PathBuf::from(&scope_name),
            tcp4: proxy.tcp4.to_string(),
            tcp6: proxy.tcp6.map(|a| a.to_string()),
            udp_port: proxy.udp_port,
            program_ids: ids.program_ids,
            link_ids: ids.link_ids,
            attached_ifaces: tc.as_ref().map(|t| t.ifaces.clone()).unwrap_or_default(),
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
            let ended = match chan.recv().await {
                Ok(Some(frame)) => from_user(&user, &bypass, &mut dns, &chan, frame).await,
                Ok(None) => break,
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = ended {
                warn!(uid = peer.uid, "ending bridge `{}`: {e}", request.instance);
                break;
            }
        }
        drop(registered);
        drop(bridge);
        if let Some(tc) = tc {
            tc.finish();
        }
        if let Some(run) = run {
            run.end().await;
        }
        // Done: the user's side waits for this end of the connection to
        // close, whoever still holds the channel (a datagram flow's task).
        // SAFETY: shutdown on a descriptor the channel owns; no memory.
        unsafe { libc::shutdown(chan.fd().as_raw_fd(), libc::SHUT_RDWR) };
        info!(uid = peer.uid, instance = request.instance, "bridge down");
        Ok(())
    }
}

/// One frame from a bridge's user's side: a datagram or DNS answer, or an
/// exemption of one of its own sockets, or a report of the cluster's
/// namespaces (for `dns`: the bridge's set and the report in parts).
async fn from_user(
    user: &UserSide,
    bypass: &tpbpf_loader::Bypass,
    dns: &mut Option<(crate::dns::Mapped, crate::dns::NamespaceReport)>,
    chan: &Channel,
    frame: Frame,
) -> Result<(), String> {
    if Datagram::is_datagram(&frame.header) {
        let header = Datagram::decode(&frame.header)?;
        return user.answer(header, frame);
    }
    match frame.parse::<ToService>()? {
        ToService::Exempt { id } => {
            let error = match &frame.fd {
                None => Some("an exemption without its socket".to_string()),
                Some(sock) => bypass
                    .register(sock)
                    .err()
                    .map(|e| format!("not a socket to exempt: {e}")),
            };
            chan.send(&FromService::Exempted { id, error }, &[], None)
                .await
                .map_err(|e| e.to_string())
        }
        ToService::Namespaces { more } => {
            // A bridge without DNS has nothing to do with them.
            if let Some((mapped, report)) = dns {
                match report.part(&frame.payload, more) {
                    Ok(Some(names)) => {
                        debug!(count = names.len(), "the cluster's namespaces, for DNS");
                        *mapped.write().unwrap_or_else(|p| p.into_inner()) = names;
                    }
                    Ok(None) => {}
                    Err(e) => warn!("a report of the cluster's namespaces refused: {e}"),
                }
            }
            Ok(())
        }
        other => Err(format!("{other:?} on a bridge's connection")),
    }
}

/// One of a user's connections to the service, given back when dropped.
struct UserSlot {
    service: Arc<Service>,
    uid: u32,
}

impl UserSlot {
    /// A connection slot for `uid`; root's are bounded by the service's.
    fn take(service: &Arc<Service>, uid: u32) -> Option<Self> {
        let mut sessions = lock(&service.sessions);
        let n = sessions.entry(uid).or_insert(0);
        if uid != 0 && *n >= MAX_SESSIONS_PER_USER {
            return None;
        }
        *n += 1;
        Some(Self {
            service: service.clone(),
            uid,
        })
    }
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut sessions = lock(&self.service.sessions);
        if let Some(n) = sessions.get_mut(&self.uid) {
            *n -= 1;
            if *n == 0 {
                sessions.remove(&self.uid);
            }
        }
    }
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

/// tpbpfd's service until SIGINT or SIGTERM: binds the socket at `path`
/// for root and group `gid`, calls `ready`, serves, then removes the
/// socket. Every bridge's session ends with it: their programs are
/// detached with it.
pub async fn run(path: &Path, gid: u32, ready: impl FnOnce()) -> io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let listener = listen(path, gid).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("making tpbpfd's socket {}: {e}", path.display()),
        )
    })?;
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    ready();
    let result = tokio::select! {
        r = Service::new(Policy { group: gid }).serve(listener) => r,
        _ = sigint.recv() => Ok(()),
        _ = sigterm.recv() => Ok(()),
    };
    let _ = std::fs::remove_file(path);
    result
}

/// A group by name or number.
pub fn group_id(group: &str) -> Result<u32, String> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(group) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(format!(
            "there is no group `{group}`: `sudo tpbpf service install` creates it (or give --group)"
        )),
        Err(e) => Err(format!("looking up group `{group}`: {e}")),
    }
}
