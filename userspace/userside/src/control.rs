//! tpbpfd's control side: tunnel sessions with the agents, the intercept
//! manager that keeps each workload's pods intercepted, and the control
//! socket (`/run/tpbpf/BRIDGE/control.sock`) the CLI talks to, with its
//! typed requests. The CLI is a client of this module.
use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::{json, Value};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpStream, UnixListener},
};
use tpbpf_kube::KubeClient;
use tpbpf_mux::{
    transport::{Connector, TcpConnector, TlsConnector},
    Client, Config as MuxConfig, Intercept, InterceptMode, Session,
};
use tracing::{debug, info, warn};

const INTERCEPT_TIMEOUT: Duration = Duration::from_secs(20);

/// The answer to an agent's access check, under way.
type Proof = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>;

/// The control socket of a bridge started by `tpbpf up`.
pub fn control_socket(instance: &str) -> PathBuf {
    state_dir(instance).join("control.sock")
}

/// Where bridge `instance` of the user running this keeps its state:
/// root's in `/run/tpbpf/NAME`, a user's in `/run/tpbpf/uid-UID/NAME`
/// (made by tpbpfd, the user's, 0700).
pub fn state_dir(instance: &str) -> PathBuf {
    let uid = nix::unistd::geteuid().as_raw();
    if uid == 0 {
        PathBuf::from("/run/tpbpf").join(instance)
    } else {
        tpbpf_bridge_api::user_dir(uid).join(instance)
    }
}

/// How the tunnel reaches an agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Portforward,
    Direct,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Portforward => "port-forward",
            Transport::Direct => "direct TLS",
        }
    }
}

/// The cluster has no agent: `tpbpf` exits with
/// [`tpbpf_kube::NO_AGENT_EXIT`].
#[derive(Debug)]
pub struct NoAgent;

impl std::fmt::Display for NoAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(tpbpf_kube::NO_AGENT)
    }
}

impl std::error::Error for NoAgent {}

/// Opens a tunnel session with an agent (on `node`, or any): finds it,
/// asks it for credentials through a port-forward, dials the transport.
pub async fn connect_agent(
    client: &tpbpf_kube::KubeClient,
    transport: Transport,
    agent_address: Option<std::net::SocketAddr>,
    node: Option<&str>,
) -> std::result::Result<(tpbpf_mux::Session, String), String> {
    let agent = tpbpf_kube::find_agent_on(client, node)
        .await?
        .ok_or_else(|| match node {
            None => tpbpf_kube::NO_AGENT.to_string(),
            Some(n) => format!(
                "no running tpbpf agent on node {n} (`kubectl -n {} get pods -o wide`): the \
                 DaemonSet runs one per schedulable node",
                tpbpf_kube::AGENT_NAMESPACE
            ),
        })?;
    let creds = tpbpf_kube::agent_credentials(client, &agent.pod).await?;
    let inner: Arc<dyn Connector> = match transport {
        Transport::Portforward => Arc::new(tpbpf_kube::PortForward::new(
            client,
            &agent.pod,
            creds.tunnel_port,
        )),
        Transport::Direct => {
            let addr = match agent_address.filter(|_| node.is_none()) {
                Some(a) => a,
                None => {
                    let ip: std::net::IpAddr = agent
                        .address
                        .as_deref()
                        .and_then(|a| a.parse().ok())
                        .ok_or_else(|| {
                            format!(
                                "agent {} has no address for a direct transport: give --agent-address",
                                agent.pod
                            )
                        })?;
                    (ip, agent.host_port.unwrap_or(creds.tunnel_port)).into()
                }
            };
            Arc::new(TcpConnector { addr })
        }
    };
    let tls = TlsConnector::over(inner, &creds.fingerprint).map_err(|e| e.to_string())?;
    let describe = format!("{} (agent {} on {})", tls.describe(), agent.pod, agent.node);
    let session = Client::connect(
        Arc::new(tls),
        creds.token.into_bytes(),
        MuxConfig::default(),
    )
    .await
    .map_err(|e| e.to_string())?;
    Ok((session, describe))
}

/// A request on a bridge's control socket: one JSON line, at most
/// [`MAX_REQUEST`] bytes.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Intercept(InterceptRequest),
    Leave {
        name: String,
    },
    List {
        #[serde(default)]
        namespace: Option<String>,
    },
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct InterceptRequest {
    pub name: String,
    pub workload: String,
    #[serde(default)]
    pub namespace: Option<String>,
    pub remote: u16,
    pub local: u16,
    #[serde(flatten)]
    pub mode: ModeRequest,
}

/// How an intercept takes a pod's traffic.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum ModeRequest {
    Steal,
    Mirror,
    Header { header: String, value: String },
    Path { prefix: String },
}

impl ModeRequest {
    fn to_mode(&self) -> InterceptMode {
        match self {
            ModeRequest::Steal => InterceptMode::Steal,
            ModeRequest::Mirror => InterceptMode::Mirror,
            ModeRequest::Header { header, value } => InterceptMode::Header {
                name: header.clone(),
                value: value.clone(),
            },
            ModeRequest::Path { prefix } => InterceptMode::PathPrefix(prefix.clone()),
        }
    }
}

/// The largest request tpbpfd reads; past it the connection is refused.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Requests served at once; more wait.
const MAX_CONNECTIONS: usize = 16;
/// Pods one intercept holds at most (each is a watcher and an agent
/// request).
const MAX_PODS: usize = 256;
/// Names (intercepts, workloads, namespaces, headers) longer than this are
/// refused: Kubernetes names are at most 253 bytes.
const MAX_NAME: usize = 253;

impl InterceptRequest {
    fn check(&self) -> Result<(), String> {
        let mut names = vec![&self.name, &self.workload];
        names.extend(self.namespace.as_ref());
        if let ModeRequest::Header { header, .. } = &self.mode {
            names.push(header);
        }
        if let Some(n) = names.iter().find(|n| n.is_empty() || n.len() > MAX_NAME) {
            return Err(format!(
                "`{}`: names are 1 to {MAX_NAME} bytes",
                n.chars().take(40).collect::<String>()
            ));
        }
        match &self.mode {
            ModeRequest::Header { value, .. } if value.len() > 4096 => {
                Err("the header value is over 4 KiB".into())
            }
            ModeRequest::Path { prefix } if prefix.len() > 4096 || !prefix.starts_with('/') => {
                Err("the path prefix must start with / and be at most 4 KiB".into())
            }
            _ => Ok(()),
        }
    }
}

/// tpbpfd's side: intercepts by name, and tunnel sessions per node.
pub struct Manager {
    client: KubeClient,
    transport: Transport,
    default_namespace: String,
    sessions: tokio::sync::Mutex<HashMap<String, Session>>,
    /// Intercepts by name, reserved from the request's first step on.
    active: Names<Entry>,
}

/// One pod's intercept, as its watcher keeps it: the connections the
/// agent carries for it go to the developer's `local` port.
struct Held {
    namespace: String,
    pod: tpbpf_kube::WorkloadPod,
    remote: u16,
    local: u16,
    mode: InterceptMode,
}

/// A pod's watcher: the task, and how to tell it to remove its intercept
/// (it answers when done).
struct PodHold {
    pod: tpbpf_kube::WorkloadPod,
    task: tokio::task::JoinHandle<()>,
    stop: tokio::sync::oneshot::Sender<tokio::sync::oneshot::Sender<()>>,
}

type Pods = Arc<Mutex<HashMap<String, PodHold>>>;
type Problems = Arc<Mutex<HashMap<String, String>>>;

struct Entry {
    workload: tpbpf_kube::Workload,
    remote: u16,
    local: u16,
    mode: InterceptMode,
    /// The workload's pods intercepted now, by name: the follower adds the
    /// ones that come and removes the ones that go.
    pods: Pods,
    follower: tokio::task::JoinHandle<()>,
    problems: Problems,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.follower.abort();
        for h in lock(&self.pods).values() {
            h.task.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Manager {
    pub fn new(client: KubeClient, transport: Transport, default_namespace: String) -> Arc<Self> {
        Arc::new(Manager {
            client,
            transport,
            default_namespace,
            sessions: tokio::sync::Mutex::new(HashMap::new()),
            active: Names::default(),
        })
    }

    /// Answers an agent's access check for pod `namespace/pod`: a
    /// port-forward through the API server with this bridge's identity.
    fn prover(&self, namespace: &str, pod: &str) -> impl Fn(u16, [u8; 16]) -> Proof {
        let (client, namespace, pod) =
            (self.client.clone(), namespace.to_string(), pod.to_string());
        move |port, nonce| {
            let (client, namespace, pod) = (client.clone(), namespace.clone(), pod.clone());
            Box::pin(async move {
                tpbpf_kube::prove_port_forward(&client, &namespace, &pod, port, nonce).await
            })
        }
    }

    /// A live session with the agent on `node`, made if needed.
    async fn session(&self, node: &str) -> Result<Session, String> {
        let mut sessions = self.sessions.lock().await;
        if let Some(s) = sessions.get(node).filter(|s| s.ended().is_none()) {
            return Ok(s.clone());
        }
        let (session, describe) =
            connect_agent(&self.client, self.transport, None, Some(node)).await?;
        info!(node, %describe, "intercept session made");
        // Intercepted connections come to their intercepts' handles
        // (`hold`); the agent opens nothing else towards this side.
        let s2 = session.clone();
        tokio::spawn(async move {
            while let Some(stream) = s2.accept().await {
                warn!(session = %s2.short_id(), "the agent opened a stream that is no intercepted connection: refused");
                stream.reset(
                    tpbpf_mux::ResetReason::Refused,
                    "this side takes intercepted connections only",
                );
            }
        });
        sessions.insert(node.to_string(), session.clone());
        Ok(session)
    }

    async fn intercept(self: &Arc<Self>, req: &InterceptRequest) -> Result<Value, String> {
        req.check()?;
        let (name, target, remote, local) = (
            req.name.clone(),
            req.workload.clone(),
            req.remote,
            req.local,
        );
        let namespace = req
            .namespace
            .clone()
            .unwrap_or_else(|| self.default_namespace.clone());
        let mode = req.mode.to_mode();
        // Taken before the first await, freed if anything below fails: a
        // second request with this name is refused meanwhile.
        let reservation = self.active.reserve(&name)?;
        let workload = tpbpf_kube::resolve_workload(&self.client, &namespace, &target).await?;
        // Follow the workload from before the first list: a pod that comes
        // while the first ones are being intercepted is not missed.
        let mut follow = tpbpf_kube::follow(&self.client, workload.clone());
        let pods = tpbpf_kube::workload_pods(&self.client, &workload).await?;
        if pods.len() > MAX_PODS {
            return Err(format!(
                "{} {namespace}/{} has {} pods: an intercept takes at most {MAX_PODS}",
                workload.kind,
                workload.name,
                pods.len()
            ));
        }
        if pods.is_empty() {
            return Err(format!(
                "{} {namespace}/{} has no running, ready pod to intercept",
                workload.kind, workload.name
            ));
        }
        // Every pod, wherever it runs; each pod's watcher carries its
        // connections from the moment its intercept is in place. The first
        // failure undoes the rest.
        let problems: Problems = Arc::new(Mutex::new(HashMap::new()));
        let held: Pods = Arc::new(Mutex::new(HashMap::new()));
        let mut env = serde_json::Map::new();
        for p in &pods {
            let target = SocketAddr::new(p.ip, remote);
            let attempt = async {
                let session = self.session(&p.node).await?;
                session
                    .intercept(
                        target,
                        mode.clone(),
                        INTERCEPT_TIMEOUT,
                        self.prover(&namespace, &p.name),
                    )
                    .await
                    .map_err(|e| format!("pod {} on {}: {e}", p.name, p.node))
            };
            let h = match attempt.await {
                Ok(h) => h,
                Err(e) => {
                    // Their handles are dropped with their tasks: their
                    // intercepts go.
                    for (_, ph) in lock(&held).drain() {
                        ph.task.abort();
                    }
                    return Err(e);
                }
            };
            if env.is_empty() {
                // The environment of the first pod's process (every
                // replica has the same spec).
                env = environ(h.info());
            }
            self.start_hold(
                &held,
                &problems,
                &namespace,
                p.clone(),
                (remote, local),
                &mode,
                Some(h),
            );
        }
        let follower = {
            let (me, held, problems, namespace, mode) = (
                self.clone(),
                held.clone(),
                problems.clone(),
                namespace.clone(),
                mode.clone(),
            );
            let what = format!("{} {}", workload.kind, workload.name);
            tokio::spawn(async move {
                while follow.changed().await.is_ok() {
                    let now = follow.borrow_and_update().clone();
                    me.reconcile(
                        &what,
                        &held,
                        &problems,
                        &namespace,
                        now,
                        (remote, local),
                        &mode,
                    );
                }
            })
        };
        let entry = Entry {
            workload: workload.clone(),
            remote,
            local,
            mode: mode.clone(),
            pods: held,
            follower,
            problems,
        };
        if let Err(entry) = reservation.fill(entry) {
            drop(entry);
            return Err(format!(
                "the intercept {name} was ended (tpbpf down) while it was being set up"
            ));
        }
        Ok(
            json!({"name": name, "kind": workload.kind, "namespace": namespace, "workload": workload.name, "pods": pods, "env": env}),
        )
    }

    /// Starts the watcher that keeps one pod's intercept (`handle`, or one
    /// it makes).
    #[allow(clippy::too_many_arguments)]
    fn start_hold(
        self: &Arc<Self>,
        held: &Pods,
        problems: &Problems,
        namespace: &str,
        pod: tpbpf_kube::WorkloadPod,
        (remote, local): (u16, u16),
        mode: &InterceptMode,
        handle: Option<Intercept>,
    ) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let what = Held {
            namespace: namespace.to_string(),
            pod: pod.clone(),
            remote,
            local,
            mode: mode.clone(),
        };
        let task = tokio::spawn(self.clone().hold(what, handle, problems.clone(), rx));
        lock(held).insert(
            pod.name.clone(),
            PodHold {
                pod,
                task,
                stop: tx,
            },
        );
    }

    /// Brings an intercept's pods in line with its workload's: new pods are
    /// intercepted, gone ones (deleted, replaced, no longer ready) released.
    #[allow(clippy::too_many_arguments)]
    fn reconcile(
        self: &Arc<Self>,
        what: &str,
        held: &Pods,
        problems: &Problems,
        namespace: &str,
        now: Vec<tpbpf_kube::WorkloadPod>,
        (remote, local): (u16, u16),
        mode: &InterceptMode,
    ) {
        let gone: Vec<PodHold> = {
            let mut h = lock(held);
            let names: Vec<String> = h
                .iter()
                .filter(|(n, ph)| {
                    !now.iter()
                        .any(|p| &p.name == *n && p.ip == ph.pod.ip && p.node == ph.pod.node)
                })
                .map(|(n, _)| n.clone())
                .collect();
            names.into_iter().filter_map(|n| h.remove(&n)).collect()
        };
        for ph in gone {
            info!(what, pod = ph.pod.name, ip = %ph.pod.ip, "pod gone: releasing its intercept");
            lock(problems).remove(&ph.pod.name);
            tokio::spawn(async move {
                let (tx, rx) = tokio::sync::oneshot::channel();
                if ph.stop.send(tx).is_ok() {
                    let _ = tokio::time::timeout(Duration::from_secs(6), rx).await;
                }
                ph.task.abort();
            });
        }
        for p in now {
            if lock(held).contains_key(&p.name) {
                continue;
            }
            if lock(held).len() >= MAX_PODS {
                warn!(
                    what,
                    "more than {MAX_PODS} pods: the rest are not intercepted"
                );
                break;
            }
            info!(what, pod = p.name, ip = %p.ip, node = p.node, "new pod: intercepting it");
            self.start_hold(held, problems, namespace, p, (remote, local), mode, None);
        }
    }

    /// Keeps one pod's intercept: makes it if `handle` is none, carries the
    /// connections the agent intercepts for it to the developer's port, and
    /// when the agent or the session loses it, puts it back as soon as the
    /// agent is there again.
    async fn hold(
        self: Arc<Self>,
        what: Held,
        mut handle: Option<Intercept>,
        problems: Problems,
        mut stop: tokio::sync::oneshot::Receiver<tokio::sync::oneshot::Sender<()>>,
    ) {
        let Held {
            namespace,
            pod,
            remote,
            local,
            mode,
        } = what;
        let target = SocketAddr::new(pod.ip, remote);
        loop {
            if let Some(mut h) = handle.take() {
                let why = loop {
                    tokio::select! {
                        next = h.accept() => match next {
                            Ok((stream, src)) => to_local(stream, src, target, local),
                            Err(why) => break why,
                        },
                        done = &mut stop => {
                            // `leave`: the agent answers once the pod has its
                            // port back; what it carried until then is still
                            // the developer's.
                            h.stop();
                            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                                while let Ok((stream, src)) = h.accept().await {
                                    to_local(stream, src, target, local);
                                }
                            })
                            .await;
                            return acknowledge(done);
                        }
                    }
                };
                drop(h);
                warn!(pod = pod.name, "intercept lost: {why}; putting it back");
                lock(&problems).insert(pod.name.clone(), format!("lost on {}: {why}", pod.node));
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    done = &mut stop => return acknowledge(done),
                }
            }
            let attempt = async {
                let s = self.session(&pod.node).await?;
                s.intercept(
                    target,
                    mode.clone(),
                    INTERCEPT_TIMEOUT,
                    self.prover(&namespace, &pod.name),
                )
                .await
                .map_err(|e| e.to_string())
            };
            let outcome = tokio::select! {
                r = attempt => r,
                done = &mut stop => return acknowledge(done),
            };
            match outcome {
                Ok(h) => {
                    info!(pod = pod.name, ip = %pod.ip, "intercept in place");
                    lock(&problems).remove(&pod.name);
                    handle = Some(h);
                }
                Err(e) => {
                    debug!(pod = pod.name, "intercept not in place yet: {e}");
                    lock(&problems).insert(pod.name.clone(), format!("not in place yet: {e}"));
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        done = &mut stop => return acknowledge(done),
                    }
                }
            }
        }
    }

    /// Removes an intercept and returns once the agents say every pod has
    /// its port back.
    async fn leave(&self, name: &str) -> Result<Value, String> {
        let entry = self.active.remove(name)?;
        // No new pods from here on.
        entry.follower.abort();
        let holds: Vec<PodHold> = lock(&entry.pods).drain().map(|(_, h)| h).collect();
        let mut waits = Vec::new();
        for h in holds {
            let (tx, rx) = tokio::sync::oneshot::channel();
            if h.stop.send(tx).is_ok() {
                waits.push(rx);
            }
        }
        for w in waits {
            let _ = tokio::time::timeout(Duration::from_secs(6), w).await;
        }
        Ok(json!({"left": name}))
    }

    async fn list(&self, namespace: Option<&str>) -> Result<Value, String> {
        let namespace = namespace
            .map(str::to_string)
            .unwrap_or_else(|| self.default_namespace.clone());
        let workloads = tpbpf_kube::workloads(&self.client, &namespace).await?;
        let intercepts = self.active.summaries(|name, e| Listed {
            name: name.to_string(),
            kind: e.workload.kind,
            workload: e.workload.name.clone(),
            namespace: e.workload.namespace.clone(),
            remote: e.remote,
            local: e.local,
            mode: format!("{:?}", e.mode),
            pods: lock(&e.pods).keys().cloned().collect(),
            problems: lock(&e.problems)
                .iter()
                .map(|(p, m)| (p.clone(), m.clone()))
                .collect(),
        });
        Ok(listing(&namespace, workloads, intercepts))
    }

    /// Ends every intercept and closes the sessions (`tpbpf down`).
    pub async fn shutdown(&self) {
        drop(self.active.drain());
        for (_, s) in self.sessions.lock().await.drain() {
            s.close("tpbpf down");
        }
    }

    /// Serves the control socket at `path` until the task is dropped. The
    /// socket is mode 0660, group `tpbpf` where that group exists (0600,
    /// root's, elsewhere); each connection's peer (`SO_PEERCRED`) must be
    /// root or `owner`, the user the bridge was brought up for: another
    /// user, even in the group, cannot see or end it.
    pub async fn serve(
        self: Arc<Self>,
        listener: UnixListener,
        owner: Option<u32>,
    ) -> std::io::Result<()> {
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            let (conn, _) = listener.accept().await?;
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return Ok(());
            };
            let me = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let peer = conn.peer_cred().ok().map(|c| c.uid());
                let (rd, mut wr) = conn.into_split();
                let answer = match peer {
                    Some(uid) if uid == 0 || Some(uid) == owner => match read_request(rd).await {
                        Err(e) => Err(e),
                        Ok(Request::Intercept(r)) => me.intercept(&r).await,
                        Ok(Request::Leave { name }) => me.leave(&name).await,
                        Ok(Request::List { namespace }) => me.list(namespace.as_deref()).await,
                    },
                    other => {
                        // Read (and drop) its request first: answering
                        // before the peer has written would break its pipe.
                        let _ = read_request(rd).await;
                        warn!(uid = ?other, "control socket: a request from another user refused");
                        Err(format!(
                            "this bridge belongs to {}: only that user and root may use it",
                            owner.map_or("root".to_string(), |u| format!("uid {u}"))
                        ))
                    }
                };
                let v = answer.unwrap_or_else(|e| json!({"error": e}));
                let _ = wr.write_all(format!("{v}\n").as_bytes()).await;
            });
        }
    }
}

/// Intercepts by name. A request takes its name ([`Names::reserve`])
/// before its first await and fills it in once the intercept is in place;
/// the name is freed if the request fails on the way. So two requests
/// with one name cannot both go ahead: the check and the insert are one
/// critical section. Generic over the entry so it is tested without a
/// cluster.
struct Names<T> {
    slots: Mutex<NameSlots<T>>,
}

struct NameSlots<T> {
    by_name: HashMap<String, Slot<T>>,
    next_ticket: u64,
}

enum Slot<T> {
    /// A request is setting it up; the ticket tells its reservation from a
    /// later one of the same name (after `tpbpf down` freed it).
    Reserved(u64),
    Active(T),
}

impl<T> Default for Names<T> {
    fn default() -> Self {
        Names {
            slots: Mutex::new(NameSlots {
                by_name: HashMap::new(),
                next_ticket: 1,
            }),
        }
    }
}

/// A name taken by a request: filled in with [`Reservation::fill`], freed
/// when dropped unfilled.
struct Reservation<'a, T> {
    names: &'a Names<T>,
    name: String,
    ticket: u64,
}

impl<T> Names<T> {
    fn reserve(&self, name: &str) -> Result<Reservation<'_, T>, String> {
        let mut slots = lock(&self.slots);
        match slots.by_name.get(name) {
            Some(Slot::Active(_)) => Err(format!(
                "an intercept named {name} exists: `tpbpf leave {name}` first, or pick another --name"
            )),
            Some(Slot::Reserved(_)) => Err(format!(
                "an intercept named {name} is being set up by another request: wait for it, or pick another --name"
            )),
            None => {
                let ticket = slots.next_ticket;
                slots.next_ticket += 1;
                slots.by_name.insert(name.to_string(), Slot::Reserved(ticket));
                Ok(Reservation {
                    names: self,
                    name: name.to_string(),
                    ticket,
                })
            }
        }
    }

    /// Takes an intercept out (`leave`); one still being set up stays.
    fn remove(&self, name: &str) -> Result<T, String> {
        let mut slots = lock(&self.slots);
        match slots.by_name.remove(name) {
            Some(Slot::Active(t)) => Ok(t),
            Some(reserved @ Slot::Reserved(_)) => {
                slots.by_name.insert(name.to_string(), reserved);
                Err(format!(
                    "the intercept {name} is still being set up: `tpbpf leave {name}` once its `tpbpf intercept` has answered"
                ))
            }
            None => Err(format!(
                "no intercept named {name} (`tpbpf list` shows them)"
            )),
        }
    }

    /// Takes every intercept out, and frees the names being set up (their
    /// requests then fail): `tpbpf down`.
    fn drain(&self) -> Vec<T> {
        lock(&self.slots)
            .by_name
            .drain()
            .filter_map(|(_, slot)| match slot {
                Slot::Active(t) => Some(t),
                Slot::Reserved(_) => None,
            })
            .collect()
    }

    /// What `f` makes of each intercept in place, by name.
    fn summaries<S>(&self, f: impl Fn(&str, &T) -> S) -> Vec<S> {
        let slots = lock(&self.slots);
        let mut active: Vec<(&String, &T)> = slots
            .by_name
            .iter()
            .filter_map(|(n, slot)| match slot {
                Slot::Active(t) => Some((n, t)),
                Slot::Reserved(_) => None,
            })
            .collect();
        active.sort_by(|a, b| a.0.cmp(b.0));
        active.into_iter().map(|(n, t)| f(n, t)).collect()
    }
}

impl<T> Reservation<'_, T> {
    /// Puts the intercept in place under the name; hands it back if the
    /// name was freed meanwhile (`tpbpf down`), to be dropped.
    fn fill(self, value: T) -> Result<(), T> {
        let mut slots = lock(&self.names.slots);
        if !self.holds(&slots) {
            return Err(value);
        }
        slots.by_name.insert(self.name.clone(), Slot::Active(value));
        Ok(())
    }

    /// Whether the name's slot is still this reservation's.
    fn holds(&self, slots: &NameSlots<T>) -> bool {
        matches!(slots.by_name.get(&self.name), Some(Slot::Reserved(t)) if *t == self.ticket)
    }
}

impl<T> Drop for Reservation<'_, T> {
    fn drop(&mut self) {
        let mut slots = lock(&self.names.slots);
        if self.holds(&slots) {
            slots.by_name.remove(&self.name);
        }
    }
}

/// One intercept as `tpbpf list` shows it.
#[derive(Clone, Debug)]
struct Listed {
    name: String,
    kind: &'static str,
    workload: String,
    namespace: String,
    remote: u16,
    local: u16,
    mode: String,
    /// The pods it holds now.
    pods: Vec<String>,
    /// Pod → what is wrong with its intercept.
    problems: Vec<(String, String)>,
}

impl Listed {
    fn json(&self) -> Value {
        let mut pods = self.pods.clone();
        pods.sort();
        // The first pod's problem, by name: the same one each time.
        let problem = self
            .problems
            .iter()
            .min_by(|a, b| a.0.cmp(&b.0))
            .map(|(_, m)| m.clone());
        json!({"name": self.name, "remote": self.remote, "local": self.local, "mode": self.mode,
               "pods": pods, "problem": problem})
    }
}

/// The answer to `tpbpf list` for `namespace`: its workloads (kind, name,
/// replicas), each with the intercepts of it, then the workloads the list
/// does not show (replica sets, bare pods) that are intercepted, with the
/// pods held as their replicas.
fn listing(
    namespace: &str,
    workloads: Vec<(String, String, i32)>,
    intercepts: Vec<Listed>,
) -> Value {
    let here: Vec<&Listed> = intercepts
        .iter()
        .filter(|i| i.namespace == namespace)
        .collect();
    let of = |kind: &str, name: &str| -> Vec<Value> {
        here.iter()
            .filter(|i| i.kind == kind && i.workload == name)
            .map(|i| i.json())
            .collect()
    };
    let mut out: Vec<Value> = workloads
        .into_iter()
        .map(|(kind, name, replicas)| {
            let intercepts = of(&kind, &name);
            json!({"kind": kind, "name": name, "replicas": replicas, "intercepts": intercepts})
        })
        .collect();
    for i in &here {
        if !out
            .iter()
            .any(|w| w["kind"] == i.kind && w["name"] == i.workload.as_str())
        {
            out.push(
                json!({"kind": i.kind, "name": i.workload, "replicas": i.pods.len(),
                            "intercepts": of(i.kind, &i.workload)}),
            );
        }
    }
    json!({"namespace": namespace, "workloads": out})
}

/// A process environment as the agent gives it (`KEY=VALUE` entries
/// separated by NUL bytes), as a JSON object.
fn environ(info: &str) -> serde_json::Map<String, Value> {
    info.split('\0')
        .filter_map(|e| e.split_once('='))
        .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
        .collect()
}

/// Carries one intercepted connection (from `src` to the pod's `target`)
/// to the developer's `local` port; if nothing answers there, the pod's
/// client is reset with why.
fn to_local(mut stream: tpbpf_mux::Stream, src: SocketAddr, target: SocketAddr, local: u16) {
    tokio::spawn(async move {
        match TcpStream::connect(("127.0.0.1", local)).await {
            Ok(mut tcp) => {
                let _ = tcp.set_nodelay(true);
                debug!(%src, %target, local, "intercepted connection");
                let _ = tpbpf_mux::relay(&mut stream, &mut tcp).await;
            }
            Err(e) => {
                warn!(%src, %target, local, "the local port does not answer: {e}");
                stream.reset(
                    tpbpf_mux::ResetReason::Refused,
                    &format!("nothing answers on the developer's port {local}: {e}"),
                );
            }
        }
    });
}

/// Answers a `leave` that asked a pod's watcher to stop.
fn acknowledge(
    done: Result<tokio::sync::oneshot::Sender<()>, tokio::sync::oneshot::error::RecvError>,
) {
    if let Ok(done) = done {
        let _ = done.send(());
    }
}

/// Binds the control socket at `path`: made under a temporary name, given
/// its mode (0600, or 0660 and group `tpbpf` where that group exists), then
/// renamed into place, so it is never reachable with another mode.
pub fn listen(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = std::os::unix::net::UnixListener::bind(&tmp)?;
    let group = nix::unistd::Group::from_name("tpbpf").ok().flatten();
    let mode = if group.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    if let Some(g) = group {
        std::os::unix::fs::chown(&tmp, None, Some(g.gid.as_raw()))?;
    }
    std::fs::rename(&tmp, path)?;
    listener.set_nonblocking(true)?;
    UnixListener::from_std(listener)
}

/// One request line, at most [`MAX_REQUEST`] bytes, within 10 s.
async fn read_request(rd: tokio::net::unix::OwnedReadHalf) -> Result<Request, String> {
    use tokio::io::AsyncReadExt;
    let mut line = String::new();
    let mut reader = BufReader::new(rd.take(MAX_REQUEST as u64 + 1));
    let read = reader.read_line(&mut line);
    match tokio::time::timeout(Duration::from_secs(10), read).await {
        Err(_) => return Err("no request within 10 s".into()),
        Ok(Err(e)) => return Err(format!("reading the request: {e}")),
        Ok(Ok(_)) => {}
    }
    if line.len() > MAX_REQUEST || !line.ends_with('\n') {
        return Err(format!(
            "a request is one line of at most {MAX_REQUEST} bytes"
        ));
    }
    serde_json::from_str(&line).map_err(|e| format!("not a request: {e}"))
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Duration};

    use serde_json::json;
    use tokio::io::AsyncWriteExt;

    use super::*;

    fn request(line: &str) -> Result<Request, serde_json::Error> {
        serde_json::from_str(line)
    }

    fn intercept_request(mode: ModeRequest) -> InterceptRequest {
        InterceptRequest {
            name: "dev".into(),
            workload: "deployment/web".into(),
            namespace: None,
            remote: 80,
            local: 8080,
            mode,
        }
    }

    // Requests.

    #[test]
    fn each_request_parses_from_its_json_line() {
        let r = request(r#"{"op":"intercept","name":"dev","workload":"web","remote":80,"local":8080,"mode":"steal"}"#).unwrap();
        match r {
            Request::Intercept(i) => {
                assert_eq!((i.name.as_str(), i.workload.as_str()), ("dev", "web"));
                assert_eq!((i.remote, i.local, i.namespace), (80, 8080, None));
                assert_eq!(i.mode.to_mode(), InterceptMode::Steal);
            }
            other => panic!("{other:?}"),
        }
        let r = request(r#"{"op":"intercept","name":"dev","workload":"web","namespace":"shop","remote":80,"local":8080,"mode":"header","header":"x-dev","value":"me"}"#).unwrap();
        let Request::Intercept(i) = r else {
            panic!("{r:?}")
        };
        assert_eq!(i.namespace.as_deref(), Some("shop"));
        assert_eq!(
            i.mode.to_mode(),
            InterceptMode::Header {
                name: "x-dev".into(),
                value: "me".into()
            }
        );
        let r = request(r#"{"op":"intercept","name":"d","workload":"w","remote":1,"local":2,"mode":"path","prefix":"/api"}"#).unwrap();
        let Request::Intercept(i) = r else {
            panic!("{r:?}")
        };
        assert_eq!(i.mode.to_mode(), InterceptMode::PathPrefix("/api".into()));
        assert!(matches!(
            request(
                r#"{"op":"intercept","name":"d","workload":"w","remote":1,"local":2,"mode":"mirror"}"#
            ),
            Ok(Request::Intercept(InterceptRequest {
                mode: ModeRequest::Mirror,
                ..
            }))
        ));
        assert!(
            matches!(request(r#"{"op":"leave","name":"dev"}"#), Ok(Request::Leave { name }) if name == "dev")
        );
        assert!(matches!(
            request(r#"{"op":"list"}"#),
            Ok(Request::List { namespace: None })
        ));
        assert!(matches!(
            request(r#"{"op":"list","namespace":"shop"}"#),
            Ok(Request::List { namespace: Some(n) }) if n == "shop"
        ));
    }

    #[test]
    fn what_the_cli_sends_is_what_tpbpfd_reads() {
        let sent = Request::Intercept(intercept_request(ModeRequest::Header {
            header: "x-dev".into(),
            value: "me".into(),
        }));
        let line = serde_json::to_string(&sent).unwrap();
        let Ok(Request::Intercept(got)) = request(&line) else {
            panic!("{line}")
        };
        assert_eq!(got.name, "dev");
        assert!(
            matches!(&got.mode, ModeRequest::Header { header, value } if header == "x-dev" && value == "me")
        );
    }

    #[test]
    fn malformed_requests_are_refused() {
        for line in [
            r#"{"op":"remove","name":"dev"}"#,
            r#"{"name":"dev"}"#,
            r#"{"op":"intercept","name":"dev","workload":"web","remote":80,"local":8080}"#,
            r#"{"op":"intercept","name":"dev","workload":"web","remote":80,"local":8080,"mode":"teleport"}"#,
            r#"{"op":"intercept","name":"dev","workload":"web","remote":70000,"local":8080,"mode":"steal"}"#,
            r#"{"op":"intercept","name":"dev","workload":"web","remote":80,"local":8080,"mode":"header","header":"x"}"#,
            r#"{"op":"leave"}"#,
        ] {
            assert!(request(line).is_err(), "{line} was taken");
        }
    }

    #[test]
    fn names_and_filters_are_checked_before_anything_is_asked_of_the_cluster() {
        assert_eq!(intercept_request(ModeRequest::Steal).check(), Ok(()));
        let long = "a".repeat(MAX_NAME + 1);
        let cases: Vec<(InterceptRequest, &str)> = vec![
            (
                InterceptRequest {
                    name: String::new(),
                    ..intercept_request(ModeRequest::Steal)
                },
                "names are 1 to 253 bytes",
            ),
            (
                InterceptRequest {
                    workload: long.clone(),
                    ..intercept_request(ModeRequest::Steal)
                },
                "names are 1 to 253 bytes",
            ),
            (
                InterceptRequest {
                    namespace: Some(String::new()),
                    ..intercept_request(ModeRequest::Mirror)
                },
                "names are 1 to 253 bytes",
            ),
            (
                intercept_request(ModeRequest::Header {
                    header: String::new(),
                    value: "me".into(),
                }),
                "names are 1 to 253 bytes",
            ),
            (
                intercept_request(ModeRequest::Header {
                    header: "x-dev".into(),
                    value: "v".repeat(4097),
                }),
                "header value is over 4 KiB",
            ),
            (
                intercept_request(ModeRequest::Path {
                    prefix: "api".into(),
                }),
                "must start with /",
            ),
            (
                intercept_request(ModeRequest::Path {
                    prefix: format!("/{}", "p".repeat(4096)),
                }),
                "at most 4 KiB",
            ),
        ];
        for (req, why) in cases {
            let e = req.check().expect_err(why);
            assert!(e.contains(why), "{e}");
            assert!(e.len() < 200, "the refusal quotes too much: {e}");
        }
        let edge = InterceptRequest {
            name: "a".repeat(MAX_NAME),
            ..intercept_request(ModeRequest::Path { prefix: "/".into() })
        };
        assert_eq!(edge.check(), Ok(()));
    }

    /// `read_request` on one end of a socket pair, after `write` on the
    /// other (then closed).
    async fn read_after(write: &[u8]) -> Result<Request, String> {
        let (a, mut b) = tokio::net::UnixStream::pair().unwrap();
        let (rd, _wr) = a.into_split();
        let data = write.to_vec();
        let writer = tokio::spawn(async move {
            let _ = b.write_all(&data).await;
            let _ = b.shutdown().await;
        });
        let got = read_request(rd).await;
        writer.abort();
        got
    }

    #[tokio::test]
    async fn a_request_is_one_json_line_within_the_size_bound() {
        let got = read_after(b"{\"op\":\"leave\",\"name\":\"dev\"}\n").await;
        assert!(matches!(got, Ok(Request::Leave { name }) if name == "dev"));
        let e = read_after(b"{\"op\":\"list\"}").await.unwrap_err();
        assert!(e.contains("one line of at most"), "{e}");
        let mut big = vec![b' '; MAX_REQUEST + 10];
        big.push(b'\n');
        let e = read_after(&big).await.unwrap_err();
        assert!(e.contains("one line of at most 65536 bytes"), "{e}");
        let e = read_after(b"intercept web\n").await.unwrap_err();
        assert!(e.starts_with("not a request"), "{e}");
    }

    // The reservation of names.

    /// A request as `Manager::intercept` makes it: the name is taken
    /// first, then the awaits (the workload, its pods, the agents), here a
    /// barrier both requests reach before either goes on, then the entry.
    async fn intercept_with(
        names: Arc<Names<u32>>,
        barrier: Arc<tokio::sync::Barrier>,
        entry: u32,
    ) -> Result<(), String> {
        let reservation = names.reserve("dev");
        barrier.wait().await;
        let reservation = reservation?;
        tokio::task::yield_now().await;
        reservation
            .fill(entry)
            .map_err(|_| "freed meanwhile".to_string())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_requests_with_one_name_at_once_exactly_one_proceeds() {
        for _ in 0..100 {
            let names: Arc<Names<u32>> = Arc::default();
            let barrier = Arc::new(tokio::sync::Barrier::new(2));
            let a = tokio::spawn(intercept_with(names.clone(), barrier.clone(), 1));
            let b = tokio::spawn(intercept_with(names.clone(), barrier.clone(), 2));
            let results = [a.await.unwrap(), b.await.unwrap()];
            let ok: Vec<usize> = (0..2).filter(|i| results[*i].is_ok()).collect();
            assert_eq!(ok.len(), 1, "{results:?}");
            let refused = results[1 - ok[0]].as_ref().unwrap_err();
            assert!(
                refused.contains("an intercept named dev is being set up by another request"),
                "{refused}"
            );
            // The one that went ahead holds the name, with its entry.
            assert_eq!(names.remove("dev"), Ok(ok[0] as u32 + 1));
        }
    }

    #[test]
    fn a_name_in_place_is_refused_and_a_failed_request_frees_its_name() {
        let names: Names<u32> = Names::default();
        names.reserve("dev").unwrap().fill(1).unwrap();
        let e = names.reserve("dev").err().unwrap();
        assert!(
            e.contains("an intercept named dev exists: `tpbpf leave dev` first"),
            "{e}"
        );
        // A request that fails on the way (its reservation dropped unfilled).
        drop(names.reserve("other").unwrap());
        names.reserve("other").unwrap().fill(2).unwrap();
        assert_eq!(names.remove("dev"), Ok(1));
        assert_eq!(names.remove("other"), Ok(2));
        let e = names.remove("dev").unwrap_err();
        assert!(e.contains("no intercept named dev"), "{e}");
    }

    #[test]
    fn a_name_being_set_up_cannot_be_left_and_is_not_listed() {
        let names: Names<u32> = Names::default();
        let reservation = names.reserve("dev").unwrap();
        let e = names.remove("dev").unwrap_err();
        assert!(e.contains("still being set up"), "{e}");
        assert!(names.summaries(|n, _| n.to_string()).is_empty());
        reservation.fill(7).unwrap();
        assert_eq!(
            names.summaries(|n, e| (n.to_string(), *e)),
            vec![("dev".to_string(), 7)]
        );
    }

    #[test]
    fn an_intercept_ended_by_down_while_set_up_is_handed_back_and_spares_a_newer_one() {
        let names: Names<u32> = Names::default();
        names.reserve("a").unwrap().fill(1).unwrap();
        let old = names.reserve("dev").unwrap();
        // `tpbpf down`: what is in place goes, the name being set up is freed.
        assert_eq!(names.drain(), vec![1]);
        let newer = names.reserve("dev").unwrap();
        // The old request ends: its entry comes back to be dropped, and it
        // takes nothing from the newer one of the same name.
        assert_eq!(old.fill(2), Err(2));
        assert!(names.reserve("dev").is_err());
        newer.fill(3).unwrap();
        assert_eq!(names.remove("dev"), Ok(3));
    }

    #[test]
    fn the_pod_s_environment_becomes_an_object() {
        assert_eq!(
            Value::Object(environ("A=1\0PATH=/bin:/usr/bin\0EQ=a=b\0junk\0")),
            json!({"A": "1", "PATH": "/bin:/usr/bin", "EQ": "a=b"})
        );
        assert!(environ("").is_empty());
    }

    // The listing.

    fn listed(name: &str, kind: &'static str, workload: &str, pods: &[&str]) -> Listed {
        Listed {
            name: name.into(),
            kind,
            workload: workload.into(),
            namespace: "default".into(),
            remote: 80,
            local: 8080,
            mode: "Steal".into(),
            pods: pods.iter().map(|p| p.to_string()).collect(),
            problems: Vec::new(),
        }
    }

    #[test]
    fn the_listing_puts_each_intercept_under_its_workload_in_its_namespace() {
        let workloads = vec![
            ("deployment".to_string(), "web".to_string(), 2),
            ("statefulset".to_string(), "db".to_string(), 1),
        ];
        let mut web = listed("dev", "deployment", "web", &["web-2", "web-1"]);
        web.problems = vec![
            ("web-2".into(), "lost on node2: pod gone".into()),
            ("web-1".into(), "not in place yet: no agent".into()),
        ];
        let elsewhere = Listed {
            namespace: "shop".into(),
            ..listed("other", "deployment", "web", &["web-x"])
        };
        let v = listing(
            "default",
            workloads,
            vec![
                web,
                listed("rs", "replicaset", "web-7d4b9c", &["web-7d4b9c-a1"]),
                listed("rs2", "replicaset", "web-7d4b9c", &["web-7d4b9c-a1"]),
                elsewhere,
            ],
        );
        assert_eq!(
            v,
            json!({"namespace": "default", "workloads": [
                {"kind": "deployment", "name": "web", "replicas": 2, "intercepts": [
                    {"name": "dev", "remote": 80, "local": 8080, "mode": "Steal",
                     "pods": ["web-1", "web-2"], "problem": "not in place yet: no agent"}]},
                {"kind": "statefulset", "name": "db", "replicas": 1, "intercepts": []},
                // Not in the cluster's list: shown once, with both intercepts.
                {"kind": "replicaset", "name": "web-7d4b9c", "replicas": 1, "intercepts": [
                    {"name": "rs", "remote": 80, "local": 8080, "mode": "Steal",
                     "pods": ["web-7d4b9c-a1"], "problem": null},
                    {"name": "rs2", "remote": 80, "local": 8080, "mode": "Steal",
                     "pods": ["web-7d4b9c-a1"], "problem": null}]},
            ]})
        );
    }

    #[test]
    fn an_empty_namespace_lists_nothing() {
        assert_eq!(
            listing(
                "empty",
                Vec::new(),
                vec![listed("dev", "deployment", "web", &[])]
            ),
            json!({"namespace": "empty", "workloads": []})
        );
    }

    #[tokio::test]
    async fn a_request_cut_short_does_not_hold_its_name() {
        // A request that never gets past its awaits (here cut by a timeout,
        // as a client that goes away is) frees its name when dropped.
        let names: Arc<Names<u32>> = Arc::default();
        let n2 = names.clone();
        let stuck = async move {
            let _reservation = n2.reserve("dev")?;
            std::future::pending::<()>().await;
            Ok::<(), String>(())
        };
        assert!(tokio::time::timeout(Duration::from_millis(10), stuck)
            .await
            .is_err());
        assert!(names.reserve("dev").is_ok());
    }
}
