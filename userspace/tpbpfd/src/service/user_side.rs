//! A bridge's user's side, as tpbpfd sees it: the other end of the bridge's
//! connection. Redirected TCP connections are handed over to it whole;
//! datagram flows and cluster DNS queries travel to it as frames with a
//! binary header.
use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    os::fd::AsFd,
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
    limits::{ANSWER_QUEUE, DNS_TIMEOUT, MAX_DNS_IN_FLIGHT, MAX_FLOWS, MAX_PENDING_HANDOVERS},
    Datagram, FromService,
};
use tpbpf_sys::seqpacket::{Channel, Frame};
use tracing::{debug, warn};

/// Where the answer to a DNS query sent to the user's side goes.
type DnsWaiter = oneshot::Sender<Result<Vec<u8>, String>>;

/// The user's side of one bridge, over the bridge's connection.
pub struct UserSide {
    chan: Arc<Channel>,
    who: String,
    next: AtomicU32,
    flows: Mutex<HashMap<u32, mpsc::Sender<Vec<u8>>>>,
    dns: Mutex<HashMap<u32, DnsWaiter>>,
    handovers: Arc<Semaphore>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl UserSide {
    pub fn new(chan: Arc<Channel>, who: String) -> Arc<Self> {
        Arc::new(Self {
            chan,
            who,
            next: AtomicU32::new(1),
            flows: Mutex::new(HashMap::new()),
            dns: Mutex::new(HashMap::new()),
            handovers: Arc::new(Semaphore::new(MAX_PENDING_HANDOVERS)),
        })
    }

    fn id(&self) -> u32 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    /// For logs.
    pub fn describe(&self) -> String {
        self.who.clone()
    }

    /// A datagram frame from the user's side.
    pub fn answer(&self, header: Datagram, frame: Frame) -> Result<(), String> {
        if frame.fd.is_some() {
            return Err("a descriptor where none belongs".into());
        }
        match header {
            Datagram::UdpAnswer { flow } => {
                if let Some(tx) = lock(&self.flows).get(&flow) {
                    let _ = tx.try_send(frame.payload);
                }
                Ok(())
            }
            Datagram::DnsAnswer { id, error } => {
                if let Some(tx) = lock(&self.dns).remove(&id) {
                    let _ = tx.send(match error {
                        None => Ok(frame.payload),
                        Some(e) => Err(e),
                    });
                }
                Ok(())
            }
            other => Err(format!("{other:?} from the user's side")),
        }
    }

    /// Hands a redirected connection to `dst` over; dropped (the
    /// application sees a reset) when too many wait already.
    pub fn hand_over(&self, client: TcpStream, dst: SocketAddr) {
        let Ok(permit) = self.handovers.clone().try_acquire_owned() else {
            warn!(%dst, "{MAX_PENDING_HANDOVERS} connections waiting for {}: refused", self.who);
            let _ = client.set_zero_linger();
            return;
        };
        let chan = self.chan.clone();
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
    }

    /// Opens a datagram flow to `dst` on the user's side.
    pub async fn udp(self: &Arc<Self>, dst: SocketAddr) -> io::Result<RemoteFlow> {
        let id = self.id();
        let (tx, rx) = mpsc::channel(ANSWER_QUEUE);
        {
            let mut flows = lock(&self.flows);
            if flows.len() >= MAX_FLOWS {
                return Err(io::Error::other(format!("{MAX_FLOWS} UDP flows open")));
            }
            flows.insert(id, tx);
        }
        let flow = RemoteFlow {
            up: self.clone(),
            id,
            rx: tokio::sync::Mutex::new(rx),
        };
        self.chan
            .send_raw(&Datagram::UdpOpen { flow: id, dst }.encode(), &[], None)
            .await?;
        Ok(flow)
    }

    /// Asks the cluster's DNS, through the user's side.
    pub async fn dns(&self, query: Vec<u8>) -> io::Result<Vec<u8>> {
        let id = self.id();
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = lock(&self.dns);
            if pending.len() >= MAX_DNS_IN_FLIGHT {
                return Err(io::Error::other("too many DNS queries in flight"));
            }
            pending.insert(id, tx);
        }
        let sent = self
            .chan
            .send_raw(&Datagram::Dns { id }.encode(), &query, None)
            .await;
        let answer = match sent {
            Ok(()) => tokio::time::timeout(DNS_TIMEOUT, rx).await,
            Err(e) => {
                lock(&self.dns).remove(&id);
                return Err(e);
            }
        };
        lock(&self.dns).remove(&id);
        match answer {
            Ok(Ok(Ok(a))) => Ok(a),
            Ok(Ok(Err(e))) => Err(io::Error::other(e)),
            Ok(Err(_)) => Err(io::Error::other("the user's side is gone")),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the cluster's DNS did not answer in time",
            )),
        }
    }
}

/// One datagram flow, carried by the user's side.
pub struct RemoteFlow {
    up: Arc<UserSide>,
    id: u32,
    rx: tokio::sync::Mutex<mpsc::Receiver<Vec<u8>>>,
}

impl RemoteFlow {
    pub async fn send(&self, buf: &[u8]) -> io::Result<()> {
        self.up
            .chan
            .send_raw(&Datagram::UdpSend { flow: self.id }.encode(), buf, None)
            .await
    }

    pub async fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        let d = self.rx.lock().await.recv().await.ok_or_else(|| {
            io::Error::new(io::ErrorKind::ConnectionAborted, "the user's side is gone")
        })?;
        let n = d.len().min(buf.len());
        buf[..n].copy_from_slice(&d[..n]);
        Ok(n)
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
                    .send_raw(&Datagram::UdpClose { flow }.encode(), &[], None)
                    .await;
            });
        }
    }
}
