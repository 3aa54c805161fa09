//! The intercept manager: each intercept's pods kept intercepted, through one tunnel session per node, and the control socket's server.
use super::*;

/// tpbpfd's side: intercepts by name, and tunnel sessions per node.
pub struct Manager {
    pub(super) client: KubeClient,
    pub(super) transport: Transport,
    pub(super) default_namespace: String,
    pub(super) sessions: tokio::sync::Mutex<HashMap<String, Session>>,
    /// Intercepts by name, reserved from the request's first step on.
    pub(super) active: Names<Entry>,
}

/// One pod's intercept, as its watcher keeps it: the connections the
/// agent carries for it go to the developer's `local` port.
pub(super) struct Held {
    pub(super) namespace: String,
    pub(super) pod: tpbpf_kube::WorkloadPod,
    pub(super) remote: u16,
    pub(super) local: u16,
    pub(super) mode: InterceptMode,
}

/// A pod's watcher: the task, and how to tell it to remove its intercept
/// (it answers when done).
pub(super) struct PodHold {
    pub(super) pod: tpbpf_kube::WorkloadPod,
    pub(super) task: tokio::task::JoinHandle<()>,
    pub(super) stop: tokio::sync::oneshot::Sender<tokio::sync::oneshot::Sender<()>>,
}

pub(super) type Pods = Arc<Mutex<HashMap<String, PodHold>>>;
pub(super) type Problems = Arc<Mutex<HashMap<String, String>>>;

pub(super) struct Entry {
    pub(super) workload: tpbpf_kube::Workload,
    pub(super) remote: u16,
    pub(super) local: u16,
    pub(super) mode: InterceptMode,
    /// The workload's pods intercepted now, by name: the follower adds the
    /// ones that come and removes the ones that go.
    pub(super) pods: Pods,
    pub(super) follower: tokio::task::JoinHandle<()>,
    pub(super) problems: Problems,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.follower.abort();
        for h in lock(&self.pods).values() {
            h.task.abort();
        }
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
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
    pub(super) fn prover(&self, namespace: &str, pod: &str) -> impl Fn(u16, [u8; 16]) -> Proof {
        let (client, namespace, pod) =
            (self.client.clone(), namespace.to_string(), pod.to_string());
        move |port, nonce| {
            let (client, namespace, pod) = (client.clone(), namespace.clone(), pod.clone());
            Box::pin(async move {
                // Port 0: the agent asks who we are (and then the API
                // server what we may do); else a port-forward into the
                // pod proves `pods/portforward`.
                if port == 0 {
                    return tpbpf_kube::identity::proof(&nonce, &namespace, &pod).map(Some);
                }
                tpbpf_kube::prove_port_forward(&client, &namespace, &pod, port, nonce)
                    .await
                    .map(|()| None)
            })
        }
    }

    /// A live session with the agent on `node`, made if needed.
    pub(super) async fn session(&self, node: &str) -> Result<Session, String> {
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

    pub(super) async fn intercept(
        self: &Arc<Self>,
        req: &InterceptRequest,
    ) -> Result<Value, String> {
        req.check()?;
        let (name, target) = (req.name.clone(), req.workload.clone());
        let namespace = req
            .namespace
            .clone()
            .unwrap_or_else(|| self.default_namespace.clone());
        let mode = req.mode.to_mode();
        // Taken before the first await, freed if anything below fails: a
        // second request with this name is refused meanwhile.
        let reservation = self.active.reserve(&name)?;
        let workload = tpbpf_kube::resolve_workload(&self.client, &namespace, &target).await?;
        let remote = tpbpf_kube::resolve_port(&self.client, &workload, &req.remote).await?;
        let local = req.local.unwrap_or(remote);
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
        let mut env_withheld = None;
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
            if env.is_empty() && env_withheld.is_none() {
                // The environment of the first pod's process (every
                // replica has the same spec).
                env = environ(h.info());
                env_withheld = withheld(h.info());
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
            json!({"name": name, "kind": workload.kind, "namespace": namespace, "workload": workload.name, "remote": remote, "local": local, "pods": pods, "env": env, "env_withheld": env_withheld}),
        )
    }

    /// Starts the watcher that keeps one pod's intercept (`handle`, or one
    /// it makes).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn start_hold(
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
    pub(super) fn reconcile(
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
    pub(super) async fn hold(
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
    pub(super) async fn leave(&self, name: &str) -> Result<Value, String> {
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

    pub(super) async fn list(&self, namespace: Option<&str>) -> Result<Value, String> {
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

/// Carries one intercepted connection (from `src` to the pod's `target`)
/// to the developer's `local` port; if nothing answers there, the pod's
/// client is reset with why.
pub(super) fn to_local(
    mut stream: tpbpf_mux::Stream,
    src: SocketAddr,
    target: SocketAddr,
    local: u16,
) {
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
pub(super) fn acknowledge(
    done: Result<tokio::sync::oneshot::Sender<()>, tokio::sync::oneshot::error::RecvError>,
) {
    if let Ok(done) = done {
        let _ = done.send(());
    }
}
