//! The user's side of a bridge's connection to tpbpfd: takes each handed-over
//! connection and carries it through the upstream; carries datagram flows
//! and cluster DNS queries; and exempts its own sockets (connections to the
//! API server) from the bridge's redirection.
use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    os::fd::{AsFd, OwnedFd},
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc, Mutex,
    },
};

use tokio::{
    net::TcpStream,
    sync::{mpsc, oneshot, Semaphore},
};
use tpbpf_bridge_api::{
    limits::{
        DNS_TIMEOUT, FLOWS_QUEUED_BYTES, FLOW_IDLE, FLOW_QUEUE, FLOW_QUEUE_BYTES,
        MAX_DNS_IN_FLIGHT, MAX_EXEMPTIONS_IN_FLIGHT, MAX_FLOWS, REQUEST_TIMEOUT,
    },
    Datagram, FromService, ToService,
};
use tpbpf_sys::{
    flows::{Delivery, FlowBounds, FlowRx, Flows},
    seqpacket::{Channel, Frame, MAX_PAYLOAD},
};
use tracing::{debug, warn};

use crate::upstream::Upstream;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A bridge's connection to tpbpfd, as the user's side holds it.
pub struct BridgeChannel {
    chan: Channel,
    next: AtomicU32,
    exemptions: Mutex<HashMap<u32, oneshot::Sender<Option<String>>>>,
    exempt_slots: Semaphore,
}

impl BridgeChannel {
    pub fn new(chan: Channel) -> Arc<Self> {
        Arc::new(Self {
            chan,
            next: AtomicU32::new(1),
            exemptions: Mutex::new(HashMap::new()),
            exempt_slots: Semaphore::new(MAX_EXEMPTIONS_IN_FLIGHT),
        })
    }

    /// Exempts `sock`, one of this process's own (a connection to the API
    /// server about to be made), from the bridge's redirection; returns
    /// once tpbpfd has done it.
    pub async fn exempt(&self, sock: OwnedFd) -> io::Result<()> {
        let _slot = self
            .exempt_slots
            .acquire()
            .await
            .map_err(|_| io::Error::other("the bridge is closed"))?;
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.exemptions).insert(id, tx);
        let sent = self
            .chan
            .send(&ToService::Exempt { id }, &[], Some(sock.as_fd()))
            .await;
        let answer = match sent {
            Ok(()) => tokio::time::timeout(REQUEST_TIMEOUT, rx).await,
            Err(e) => {
                lock(&self.exemptions).remove(&id);
                return Err(e);
            }
        };
        lock(&self.exemptions).remove(&id);
        match answer {
            Ok(Ok(None)) => Ok(()),
            Ok(Ok(Some(e))) => Err(io::Error::other(format!("tpbpfd: {e}"))),
            Ok(Err(_)) => Err(io::Error::other("the bridge ended")),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "tpbpfd did not exempt a socket in time",
            )),
        }
    }

    /// Ends the bridge and waits (at most `within`) until tpbpfd has
    /// detached it and removed what it made (a `run`'s cgroup): this side
    /// stops sending, tpbpfd sees the end, tears down, and closes its end.
    /// Anything still arriving (a late hand-over) is dropped.
    pub async fn finish(&self, within: std::time::Duration) {
        // SAFETY: shutdown on a descriptor this channel owns; no memory.
        unsafe {
            libc::shutdown(
                std::os::fd::AsRawFd::as_raw_fd(&self.chan.fd()),
                libc::SHUT_WR,
            )
        };
        let _ = tokio::time::timeout(within, async {
            while let Ok(Some(_)) = self.chan.recv().await {}
        })
        .await;
    }

    /// Tells tpbpfd the cluster's namespaces, for the bridge's DNS: in
    /// parts of at most a frame's payload, the last one without `more`.
    pub async fn report_namespaces(&self, names: &[String]) -> io::Result<()> {
        const PART: usize = 60 * 1024;
        let mut parts: Vec<Vec<u8>> = vec![Vec::new()];
        for n in names {
            let part = parts.last_mut().expect("one part at least");
            if !part.is_empty() && part.len() + n.len() + 1 > PART {
                parts.push(Vec::new());
            }
            let part = parts.last_mut().expect("one part at least");
            part.extend_from_slice(n.as_bytes());
            part.push(b'\n');
        }
        let last = parts.len() - 1;
        for (i, part) in parts.iter().enumerate() {
            self.chan
                .send(&ToService::Namespaces { more: i < last }, part, None)
                .await?;
        }
        Ok(())
    }

    async fn send_datagram(&self, header: Datagram, payload: &[u8]) -> io::Result<()> {
        self.chan.send_raw(&header.encode(), payload, None).await
    }
}

/// Carries what tpbpfd hands over through `upstream` until tpbpfd ends the
/// connection (returns why).
pub async fn serve(bridge: Arc<BridgeChannel>, upstream: Arc<dyn Upstream>) -> io::Error {
    let mut flows = Flows::new(FlowBounds {
        flows: MAX_FLOWS,
        queue: FLOW_QUEUE,
        flow_bytes: FLOW_QUEUE_BYTES,
        total_bytes: FLOWS_QUEUED_BYTES,
    });
    let (closed_tx, mut closed_rx) = mpsc::unbounded_channel::<u32>();
    let dns_slots = Arc::new(Semaphore::new(MAX_DNS_IN_FLIGHT));
    loop {
        while let Ok(id) = closed_rx.try_recv() {
            flows.remove(&id);
        }
        let frame = match bridge.chan.recv().await {
            Ok(Some(f)) => f,
            Ok(None) => return io::Error::other("tpbpfd closed the bridge (was it stopped?)"),
            Err(e) => return io::Error::new(e.kind(), format!("reading from tpbpfd: {e}")),
        };
        if Datagram::is_datagram(&frame.header) {
            let header = match Datagram::decode(&frame.header) {
                Ok(h) => h,
                Err(e) => return io::Error::other(format!("tpbpfd sent {e}")),
            };
            let Frame { payload, .. } = frame;
            match header {
                Datagram::UdpOpen { flow, dst } => {
                    let Some(rx) = flows.open(flow) else {
                        debug!(flow, "UDP flow refused (too many, or a duplicate id)");
                        continue;
                    };
                    let (bridge, upstream, closed) =
                        (bridge.clone(), upstream.clone(), closed_tx.clone());
                    tokio::spawn(async move {
                        user_flow(bridge, upstream, flow, dst, rx).await;
                        let _ = closed.send(flow);
                    });
                }
                Datagram::UdpSend { flow } => {
                    if flows.deliver(&flow, payload) == Delivery::Full {
                        debug!(flow, "UDP flow queue full: datagram dropped");
                    }
                }
                Datagram::UdpClose { flow } => flows.remove(&flow),
                Datagram::Dns { id } => {
                    let Ok(permit) = dns_slots.clone().try_acquire_owned() else {
                        debug!("{MAX_DNS_IN_FLIGHT} DNS queries in flight: one dropped");
                        continue;
                    };
                    let (bridge, upstream) = (bridge.clone(), upstream.clone());
                    tokio::spawn(async move {
                        let _permit = permit;
                        let answer = tokio::time::timeout(DNS_TIMEOUT, upstream.dns(payload)).await;
                        let (answer, error) = match answer {
                            Ok(Ok(a)) if a.len() <= MAX_PAYLOAD => (a, None),
                            Ok(Ok(a)) => {
                                (Vec::new(), Some(format!("an answer of {} bytes", a.len())))
                            }
                            Ok(Err(e)) => (Vec::new(), Some(e.to_string())),
                            Err(_) => (
                                Vec::new(),
                                Some("the cluster's DNS did not answer in time".into()),
                            ),
                        };
                        let _ = bridge
                            .send_datagram(Datagram::DnsAnswer { id, error }, &answer)
                            .await;
                    });
                }
                other => debug!("tpbpfd sent an unexpected {other:?}"),
            }
            continue;
        }
        let msg = match frame.parse::<FromService>() {
            Ok(m) => m,
            Err(e) => return io::Error::other(format!("tpbpfd sent {e}")),
        };
        match msg {
            FromService::Tcp { dst } => {
                let Some(fd) = frame.fd else {
                    warn!(%dst, "tpbpfd handed over a connection without its socket");
                    continue;
                };
                take_over(fd, dst, upstream.clone());
            }
            FromService::Exempted { id, error } => {
                if let Some(tx) = lock(&bridge.exemptions).remove(&id) {
                    let _ = tx.send(error);
                }
            }
            other => debug!("tpbpfd sent an unexpected {other:?}"),
        }
    }
}

/// A handed-over connection, carried from here on by this process.
fn take_over(fd: OwnedFd, dst: SocketAddr, upstream: Arc<dyn Upstream>) {
    let client = std::net::TcpStream::from(fd);
    tokio::spawn(async move {
        if client.set_nonblocking(true).is_err() {
            return;
        }
        match TcpStream::from_std(client) {
            Ok(client) => crate::relay::relay(client, dst, upstream).await,
            Err(e) => warn!(%dst, "a handed-over connection is not a TCP socket: {e}"),
        }
    });
}

/// One datagram flow on the user's side.
async fn user_flow(
    bridge: Arc<BridgeChannel>,
    upstream: Arc<dyn Upstream>,
    id: u32,
    dst: SocketAddr,
    mut rx: FlowRx,
) {
    let flow = match upstream.udp(dst).await {
        Ok(f) => f,
        Err(e) => {
            warn!(%dst, "opening a UDP flow: {e}");
            return;
        }
    };
    let mut buf = vec![0u8; MAX_PAYLOAD];
    loop {
        tokio::select! {
            d = rx.recv() => match d {
                Some(d) => { let _ = flow.send(&d).await; }
                None => return,
            },
            r = flow.recv(&mut buf) => match r {
                Ok(n) => {
                    if bridge.send_datagram(Datagram::UdpAnswer { flow: id }, &buf[..n]).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    debug!(%dst, "UDP flow ended: {e}");
                    return;
                }
            },
            _ = tokio::time::sleep(FLOW_IDLE) => return,
        }
    }
}
