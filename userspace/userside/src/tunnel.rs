//! The upstream through the tunnel to a cluster agent: streams, datagram
//! flows and DNS over one multiplexed session. The session resumes by
//! itself when its transport drops; when it ends for good (the agent died,
//! the resume window passed), a new one is made with the factory, again and
//! again until the agent is back, without a new `tpbpf up`.
use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde_json::{json, Value};
use tokio::sync::watch;
use tpbpf_bridge_api::limits::DNS_TIMEOUT;
use tpbpf_mux::{Destination, Flow, Session};
use tracing::{info, warn};

use crate::upstream::{BoxFuture, DatagramFlow, Stream, Upstream};

/// Makes a new session: finds the agent, dials, says hello. Returns the
/// session and a description of its transport.
pub type Factory = Arc<
    dyn Fn() -> Pin<Box<dyn Future<Output = Result<(Session, String), String>> + Send>>
        + Send
        + Sync,
>;

/// How long a new connection waits for a session before it fails.
const WAIT_FOR_SESSION: Duration = Duration::from_secs(10);
/// How long closing waits for the go-away to leave.
const CLOSE_WITHIN: Duration = Duration::from_secs(2);

#[derive(Clone, Default)]
struct State {
    transport: String,
    /// Why there is no session, when there is none.
    problem: Option<String>,
    since: Option<u64>,
    sessions: u64,
}

pub struct TunnelUpstream {
    session: watch::Receiver<Option<Session>>,
    state: Arc<Mutex<State>>,
    describe: String,
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl TunnelUpstream {
    /// Makes the first session (its error is returned: `tpbpf up` says
    /// why), then keeps one alive in the background.
    pub async fn start(factory: Factory, describe: String) -> Result<Arc<Self>, String> {
        let (session, transport) = factory().await?;
        let (tx, rx) = watch::channel(Some(session.clone()));
        let state = Arc::new(Mutex::new(State {
            transport,
            problem: None,
            since: Some(now_s()),
            sessions: 1,
        }));
        let st = state.clone();
        tokio::spawn(async move {
            let mut session = session;
            loop {
                let why = session.closed().await;
                warn!("tunnel session ended: {why}; making a new one");
                let _ = tx.send(None);
                {
                    let mut s = st.lock().unwrap_or_else(|e| e.into_inner());
                    s.problem = Some(why);
                    s.since = Some(now_s());
                }
                let mut backoff = Duration::from_millis(200);
                session = loop {
                    match factory().await {
                        Ok((new, transport)) => {
                            info!(%transport, "tunnel session made");
                            let mut s = st.lock().unwrap_or_else(|e| e.into_inner());
                            s.transport = transport;
                            s.problem = None;
                            s.since = Some(now_s());
                            s.sessions += 1;
                            break new;
                        }
                        Err(e) => {
                            warn!("no tunnel session: {e}");
                            st.lock().unwrap_or_else(|e| e.into_inner()).problem = Some(e);
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_secs(3));
                        }
                    }
                };
                let _ = tx.send(Some(session.clone()));
            }
        });
        Ok(Arc::new(TunnelUpstream {
            session: rx,
            state,
            describe,
        }))
    }

    async fn session(&self) -> io::Result<Session> {
        let mut rx = self.session.clone();
        let deadline = Instant::now() + WAIT_FOR_SESSION;
        loop {
            if let Some(s) = rx.borrow_and_update().clone() {
                if s.ended().is_none() {
                    return Ok(s);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || tokio::time::timeout(left, rx.changed()).await.is_err() {
                let problem = self
                    .state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .problem
                    .clone()
                    .unwrap_or_default();
                return Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    format!("no tunnel to the cluster's agent: {problem}"),
                ));
            }
        }
    }
}

struct TunnelFlow(Flow);

impl DatagramFlow for TunnelFlow {
    fn send<'a>(&'a self, buf: &'a [u8]) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move { self.0.send(buf) })
    }
    fn recv<'a>(&'a self, buf: &'a mut [u8]) -> BoxFuture<'a, io::Result<usize>> {
        Box::pin(async move {
            let d = self.0.recv().await?;
            let n = d.len().min(buf.len());
            buf[..n].copy_from_slice(&d[..n]);
            Ok(n)
        })
    }
}

impl Upstream for TunnelUpstream {
    fn connect_tcp_with(
        &self,
        dst: SocketAddr,
        first: Vec<u8>,
    ) -> BoxFuture<'_, io::Result<Box<dyn Stream>>> {
        Box::pin(async move {
            let session = self.session().await?;
            // No round trip: the open leaves with the first bytes.
            let s = session.open_with(Destination::Addr(dst), &first)?;
            Ok(Box::new(s) as Box<dyn Stream>)
        })
    }

    fn udp(&self, dst: SocketAddr) -> BoxFuture<'_, io::Result<Box<dyn DatagramFlow>>> {
        Box::pin(async move {
            let session = self.session().await?;
            let flow = session.flow(Destination::Addr(dst))?;
            Ok(Box::new(TunnelFlow(flow)) as Box<dyn DatagramFlow>)
        })
    }

    fn dns(&self, query: Vec<u8>) -> BoxFuture<'_, io::Result<Vec<u8>>> {
        Box::pin(async move {
            let session = self.session().await?;
            session.dns(query, DNS_TIMEOUT).await
        })
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn close<'a>(&'a self, why: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let session = self.session.borrow().clone();
            if let Some(s) = session {
                s.close_flushed(why, CLOSE_WITHIN).await;
            }
        })
    }

    fn status(&self) -> Value {
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let session = self.session.borrow().clone();
        let stats = session.as_ref().map(Session::stats);
        json!({
            "connected": stats.as_ref().is_some_and(|s| s.connected),
            "session": session.as_ref().map(Session::short_id),
            "transport": state.transport,
            "tls": stats.as_ref().filter(|s| s.connected).map(|s| {
                if s.kernel_tls {
                    "kernel".to_string()
                } else {
                    match tpbpf_mux::transport::kernel_tls_fallback() {
                        Some(why) => format!("rustls ({why})"),
                        None => "rustls".to_string(),
                    }
                }
            }),
            "problem": state.problem,
            "since": state.since,
            "sessions": state.sessions,
            "rtt_ms": stats.as_ref().and_then(|s| s.rtt).map(|r| r.as_secs_f64() * 1000.0),
            "streams": stats.as_ref().map(|s| s.streams),
            "bytes_sent": stats.as_ref().map(|s| s.bytes_sent),
            "bytes_received": stats.as_ref().map(|s| s.bytes_received),
            "resumes": stats.as_ref().map(|s| s.resumes),
            "datagrams_dropped": stats.as_ref().map(|s| s.datagrams_dropped),
            "last_error": stats.as_ref().and_then(|s| s.last_error.clone()),
        })
    }
}
