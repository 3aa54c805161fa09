//! Starting and resuming sessions: the client dials and says hello; the
//! server checks the hello (magic, version, token) before anything else
//! happens, then starts a session or hands the transport to the one it
//! resumes.
use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::BytesMut;
use thiserror::Error;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::mpsc,
};
use tpbpf_proto::{
    decode_hello, decode_welcome, encode_hello, encode_welcome, DecodeError, Hello, ResetReason,
    Welcome, WelcomeStatus, MIN_VERSION, VERSION,
};
use tracing::{debug, info, warn};

use crate::{
    conn::{self, Ended},
    session::{Session, Shared},
    transport::{BoxIo, Connector},
    Config,
};

#[derive(Debug, Error)]
pub enum HandshakeError {
    #[error("could not reach the tunnel endpoint {endpoint}: {source}")]
    Dial {
        endpoint: String,
        #[source]
        source: io::Error,
    },
    #[error("the tunnel endpoint {endpoint} refused the session ({status:?}): {message}")]
    Refused {
        endpoint: String,
        status: WelcomeStatus,
        message: String,
    },
    #[error("the tunnel endpoint {endpoint} does not speak tpbpf's tunnel protocol: {source}")]
    Protocol {
        endpoint: String,
        #[source]
        source: DecodeError,
    },
    #[error("the tunnel endpoint {endpoint} did not answer the hello within {0:?}", .timeout)]
    Timeout { endpoint: String, timeout: Duration },
    #[error("the tunnel endpoint {endpoint} closed the connection during the hello: {source}")]
    Io {
        endpoint: String,
        #[source]
        source: io::Error,
    },
}

/// Reads one handshake message with `decode`, keeping what follows it.
async fn read_msg<T>(
    io: &mut BoxIo,
    decode: impl Fn(&[u8]) -> Result<Option<(T, usize)>, DecodeError>,
) -> Result<Result<(T, BytesMut), DecodeError>, io::Error> {
    let mut buf = BytesMut::with_capacity(512);
    loop {
        match decode(&buf) {
            Ok(Some((msg, used))) => {
                let _ = buf.split_to(used);
                return Ok(Ok((msg, buf)));
            }
            Ok(None) => {}
            Err(e) => return Ok(Err(e)),
        }
        if io.read_buf(&mut buf).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
    }
}

fn random_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    getrandom::getrandom(&mut id).expect("the kernel's random source");
    id
}

/// Decides whether a hello's token may start or resume a session: a fixed
/// shared token (`Vec<u8>`), or credentials issued per session (the agent's).
pub trait Admission: Send + Sync + 'static {
    /// Whether `token` may start session `session` (`resume` false) or
    /// resume it (`resume` true, the session is alive on this server). The
    /// refusal is sent to the client.
    fn admit(&self, token: &[u8], session: &[u8; 16], resume: bool) -> Result<(), String>;
    /// Session `session` is gone for good (closed, or its resume window
    /// passed): whatever was bound to it can go.
    fn ended(&self, _session: &[u8; 16]) {}
}

/// Shared with whoever issues the credentials.
impl<T: Admission> Admission for Arc<T> {
    fn admit(&self, token: &[u8], session: &[u8; 16], resume: bool) -> Result<(), String> {
        (**self).admit(token, session, resume)
    }
    fn ended(&self, session: &[u8; 16]) {
        (**self).ended(session)
    }
}

/// One token, shared by every session.
impl Admission for Vec<u8> {
    fn admit(&self, token: &[u8], _: &[u8; 16], _: bool) -> Result<(), String> {
        if same_token(token, self) {
            Ok(())
        } else if token.is_empty() {
            Err("missing token: get the current one from the agent (tpbpf up does)".into())
        } else {
            Err("wrong token: get the current one from the agent (tpbpf up does)".into())
        }
    }
}

/// Compares without leaking where the first difference is.
pub fn same_token(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The client side.
pub struct Client;

impl Client {
    /// Dials `connector`, starts a session with `token`, and keeps it alive:
    /// when the transport is lost it dials again and resumes.
    pub async fn connect(
        connector: Arc<dyn Connector>,
        token: Vec<u8>,
        config: Config,
    ) -> Result<Session, HandshakeError> {
        let id = random_id();
        let (io, welcome, leftover) = hello(&*connector, &token, id, false, 0, &config).await?;
        if welcome.status != WelcomeStatus::Accepted {
            return Err(HandshakeError::Refused {
                endpoint: connector.describe(),
                status: welcome.status,
                message: welcome.message,
            });
        }
        if welcome.version < MIN_VERSION {
            return Err(HandshakeError::Refused {
                endpoint: connector.describe(),
                status: WelcomeStatus::Version,
                message: format!(
                    "the agent speaks tunnel protocol version {}, this tpbpf needs {MIN_VERSION} \
                     at least: install the agent of this tpbpf release",
                    welcome.version
                ),
            });
        }
        let shared = Shared::new(config, id, true);
        let session = Session::from_shared(shared.clone());
        tokio::spawn(client_driver(shared, connector, token, io, leftover));
        Ok(session)
    }
}

async fn hello(
    connector: &dyn Connector,
    token: &[u8],
    session: [u8; 16],
    resume: bool,
    received: u64,
    config: &Config,
) -> Result<(BoxIo, Welcome, BytesMut), HandshakeError> {
    let endpoint = connector.describe();
    let exchange = async {
        let mut io = connector
            .connect()
            .await
            .map_err(|source| HandshakeError::Dial {
                endpoint: endpoint.clone(),
                source,
            })?;
        let mut buf = Vec::new();
        let hello = Hello {
            version: VERSION,
            session,
            resume,
            received,
            token: token.to_vec(),
        };
        encode_hello(&hello, &mut buf).map_err(|source| HandshakeError::Protocol {
            endpoint: endpoint.clone(),
            source,
        })?;
        let io_err = |source| HandshakeError::Io {
            endpoint: endpoint.clone(),
            source,
        };
        io.write_all(&buf).await.map_err(io_err)?;
        match read_msg(&mut io, decode_welcome).await.map_err(io_err)? {
            Ok((welcome, leftover)) => Ok((io, welcome, leftover)),
            Err(source) => Err(HandshakeError::Protocol {
                endpoint: endpoint.clone(),
                source,
            }),
        }
    };
    tokio::time::timeout(config.handshake_timeout, exchange)
        .await
        .map_err(|_| HandshakeError::Timeout {
            endpoint: endpoint.clone(),
            timeout: config.handshake_timeout,
        })?
}

async fn client_driver(
    shared: Arc<Shared>,
    connector: Arc<dyn Connector>,
    token: Vec<u8>,
    io: BoxIo,
    leftover: BytesMut,
) {
    let mut next = Some((io, 0u64, leftover));
    let config = shared.config.clone();
    while let Some((io, peer_received, leftover)) = next.take() {
        let lost = match conn::run(&shared, io, peer_received, leftover).await {
            Ended::Closed => break,
            Ended::Protocol(m) => {
                warn!("tunnel session ended: {m}");
                shared.lock().end(ResetReason::ProtocolError, m);
                break;
            }
            Ended::Lost(e) => {
                warn!(error = %e, "tunnel transport lost; resuming");
                e
            }
            Ended::Rekey(records) => {
                info!("tunnel transport replaced after {records} TLS records, for new keys");
                io::Error::other("replaced for new keys")
            }
        };
        shared.lock().last_error = Some(format!("transport lost: {lost}"));
        let deadline = Instant::now() + config.resume_window;
        let mut backoff = Duration::from_millis(20);
        let mut last_error = lost.to_string();
        while next.is_none() {
            if Instant::now() >= deadline || shared.lock().ended.is_some() {
                let m = format!(
                    "the tunnel to {} was down for longer than the resume window ({:?}); streams were reset and data may be lost (last error: {last_error})",
                    connector.describe(),
                    config.resume_window
                );
                warn!("{m}");
                shared.lock().end(ResetReason::ResumeExpired, m);
                break;
            }
            let received = shared.lock().recv_seq;
            match hello(&*connector, &token, shared.id, true, received, &config).await {
                Ok((io, w, leftover)) if w.status == WelcomeStatus::Resumed => {
                    let mut inner = shared.lock();
                    inner.resumes += 1;
                    inner.last_error = None;
                    drop(inner);
                    info!("tunnel session resumed on {}", connector.describe());
                    next = Some((io, w.received, leftover));
                }
                Ok((_, w, _)) => {
                    let m = format!(
                        "the tunnel endpoint {} refused to resume the session ({:?}): {}",
                        connector.describe(),
                        w.status,
                        w.message
                    );
                    warn!("{m}");
                    shared.lock().end(ResetReason::ResumeExpired, m);
                    break;
                }
                Err(HandshakeError::Dial { source, endpoint })
                    if source.kind() == io::ErrorKind::InvalidData =>
                {
                    // A TLS refusal: the endpoint is not the one this
                    // session was made with (an agent that restarted has
                    // new key material). Waiting will not help.
                    let m = format!(
                        "the tunnel endpoint {endpoint} is no longer the one this session was made with ({source}); streams were reset"
                    );
                    warn!("{m}");
                    shared.lock().end(ResetReason::ResumeExpired, m);
                    break;
                }
                Err(e) => {
                    debug!("resume attempt failed: {e}");
                    last_error = e.to_string();
                    shared.lock().last_error = Some(last_error.clone());
                    let left = deadline.saturating_duration_since(Instant::now());
                    tokio::time::sleep(backoff.min(left)).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }
    shared.closed.notify_waiters();
}

type Resumer = mpsc::Sender<(BoxIo, u64, BytesMut)>;

/// The server side: checks hellos, starts sessions, resumes them.
#[derive(Clone)]
pub struct Server {
    inner: Arc<ServerInner>,
}

struct ServerInner {
    config: Config,
    admission: Box<dyn Admission>,
    sessions: Mutex<HashMap<[u8; 16], Resumer>>,
    new_sessions: mpsc::Sender<(Session, SocketAddr)>,
}

impl Server {
    /// A server admitting hellos with `admission` (a fixed token, or
    /// per-session credentials); new sessions arrive on the receiver.
    pub fn new(
        config: Config,
        admission: impl Admission,
    ) -> (Server, mpsc::Receiver<(Session, SocketAddr)>) {
        let (tx, rx) = mpsc::channel(64);
        let server = Server {
            inner: Arc::new(ServerInner {
                config,
                admission: Box::new(admission),
                sessions: Mutex::new(HashMap::new()),
                new_sessions: tx,
            }),
        };
        (server, rx)
    }

    /// Sessions alive (connected or waiting to resume).
    pub fn sessions(&self) -> usize {
        self.inner
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Accepts connections on `listener` (with TLS if `tls` is given) until
    /// the listener fails; each connection's handshake runs on its own.
    pub async fn serve(
        &self,
        listener: TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> io::Result<()> {
        let handshakes = Arc::new(tokio::sync::Semaphore::new(
            self.inner.config.max_handshakes,
        ));
        loop {
            let (tcp, peer) = listener.accept().await?;
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                warn!(%peer, "tunnel connection refused: {} handshakes in progress already", self.inner.config.max_handshakes);
                continue;
            };
            let _ = crate::transport::tune(&tcp);
            let server = self.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let io: BoxIo = match tls {
                    None => Box::new(tcp),
                    Some(tls) => {
                        match tokio::time::timeout(
                            server.inner.config.handshake_timeout,
                            crate::ktls::accept(&tls, tcp),
                        )
                        .await
                        {
                            Ok(Ok(io)) => io,
                            // Connected and closed without a byte: the
                            // kubelet's tcpSocket probe, every period.
                            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                                debug!(%peer, "connection closed before its TLS hello (a TCP probe)");
                                return;
                            }
                            Ok(Err(e)) => {
                                warn!(%peer, "tunnel connection refused: TLS handshake failed: {e}");
                                return;
                            }
                            Err(_) => {
                                warn!(%peer, "tunnel connection refused: no TLS handshake in time");
                                return;
                            }
                        }
                    }
                };
                server.handle(io, peer).await;
            });
        }
    }

    /// Runs the handshake on one transport. Nothing is dialed and no
    /// session is touched before the hello is checked.
    pub async fn handle(&self, mut io: BoxIo, peer: SocketAddr) {
        let config = &self.inner.config;
        let hello = match tokio::time::timeout(
            config.handshake_timeout,
            read_msg(&mut io, decode_hello),
        )
        .await
        {
            Err(_) => {
                warn!(%peer, "tunnel connection refused: no hello within {:?}", config.handshake_timeout);
                return;
            }
            Ok(Err(e)) => {
                warn!(%peer, "tunnel connection refused: closed before its hello: {e}");
                return;
            }
            Ok(Ok(Err(e))) => {
                warn!(%peer, "tunnel connection refused: not a tpbpf hello: {e}");
                return;
            }
            Ok(Ok(Ok(h))) => h,
        };
        let (hello, leftover) = hello;
        let refuse = |status, message: String| Welcome {
            version: VERSION,
            status,
            received: 0,
            message,
        };
        let refusal = if hello.version < MIN_VERSION {
            Some(refuse(
                WelcomeStatus::Version,
                format!(
                    "tunnel protocol version {} is not supported (this agent speaks {VERSION}, \
                     {MIN_VERSION} at least): use the tpbpf release of this agent",
                    hello.version
                ),
            ))
        } else {
            let known = self
                .inner
                .sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains_key(&hello.session);
            let count = self
                .inner
                .sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .len();
            match (hello.resume, known) {
                (false, _) if count >= config.max_sessions => Some(refuse(
                    WelcomeStatus::Unauthorized,
                    format!(
                        "this agent serves {} sessions already: try again later",
                        config.max_sessions
                    ),
                )),
                // A new session may not take the id of a live one.
                (false, true) => Some(refuse(
                    WelcomeStatus::Unauthorized,
                    "that session id is in use: start a session with a fresh id".into(),
                )),
                // Resuming an unknown session is refused below, with
                // nothing granted.
                (true, false) => None,
                (resume, _) => {
                    match self
                        .inner
                        .admission
                        .admit(&hello.token, &hello.session, resume)
                    {
                        Ok(()) => None,
                        Err(why) => {
                            warn!(%peer, "tunnel connection refused: {why}");
                            Some(refuse(WelcomeStatus::Unauthorized, why))
                        }
                    }
                }
            }
        };
        if let Some(w) = refusal {
            let mut buf = Vec::new();
            encode_welcome(&w, &mut buf);
            let _ = io.write_all(&buf).await;
            let _ = io.shutdown().await;
            return;
        }
        if hello.resume {
            let resumer = self
                .inner
                .sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&hello.session)
                .cloned();
            match resumer {
                Some(tx) => {
                    debug!(%peer, "tunnel session resuming");
                    let _ = tx.send((io, hello.received, leftover)).await;
                }
                None => {
                    warn!(%peer, "tunnel resume refused: unknown or expired session");
                    let mut buf = Vec::new();
                    encode_welcome(
                        &refuse(
                            WelcomeStatus::UnknownSession,
                            "the session is unknown or expired: start a new one".to_string(),
                        ),
                        &mut buf,
                    );
                    let _ = io.write_all(&buf).await;
                }
            }
            return;
        }
        let mut buf = Vec::new();
        encode_welcome(
            &Welcome {
                version: VERSION.min(hello.version),
                status: WelcomeStatus::Accepted,
                received: 0,
                message: String::new(),
            },
            &mut buf,
        );
        if let Err(e) = io.write_all(&buf).await {
            warn!(%peer, "tunnel connection lost during its hello: {e}");
            return;
        }
        let shared = Shared::new(config.clone(), hello.session, false);
        let (tx, rx) = mpsc::channel(4);
        self.inner
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(hello.session, tx);
        info!(%peer, "tunnel session started");
        let _ = self
            .inner
            .new_sessions
            .send((Session::from_shared(shared.clone()), peer))
            .await;
        let server = self.clone();
        tokio::spawn(async move {
            server_driver(&shared, io, leftover, rx).await;
            server
                .inner
                .sessions
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&shared.id);
            server.inner.admission.ended(&shared.id);
            shared.closed.notify_waiters();
        });
    }
}

async fn server_driver(
    shared: &Arc<Shared>,
    io: BoxIo,
    leftover: BytesMut,
    mut resumes: mpsc::Receiver<(BoxIo, u64, BytesMut)>,
) {
    let config = shared.config.clone();
    let mut next = Some((io, 0u64, leftover));
    while let Some((io, peer_received, leftover)) = next.take() {
        let ended = tokio::select! {
            e = conn::run(shared, io, peer_received, leftover) => Some(e),
            r = resumes.recv() => {
                // The client came back before this side noticed the loss.
                next = r;
                None
            }
        };
        match ended {
            Some(Ended::Closed) => return,
            Some(Ended::Protocol(m)) => {
                warn!("tunnel session ended: {m}");
                shared.lock().end(ResetReason::ProtocolError, m);
                return;
            }
            Some(lost @ (Ended::Lost(_) | Ended::Rekey(_))) => {
                if let Ended::Rekey(records) = lost {
                    info!("tunnel transport closed after {records} TLS records, for new keys; waiting for the client to resume");
                } else if let Ended::Lost(e) = lost {
                    debug!("tunnel transport lost ({e}); waiting for the client to resume");
                }
                shared.lock().connected = false;
                match tokio::time::timeout(config.resume_window, resumes.recv()).await {
                    Ok(Some(t)) => next = Some(t),
                    _ => {
                        let m = format!(
                            "the tunnel client did not come back within the resume window ({:?}); streams were reset",
                            config.resume_window
                        );
                        warn!("{m}");
                        shared.lock().end(ResetReason::ResumeExpired, m);
                        return;
                    }
                }
            }
            None if next.is_none() => return,
            None => {}
        }
        // Tell the client where to replay from, then carry on.
        let mut candidate = next.take();
        loop {
            let Some((mut io, r, l)) = candidate else {
                shared.lock().end(
                    ResetReason::ResumeExpired,
                    "the tunnel client did not come back within the resume window".to_string(),
                );
                return;
            };
            let received = shared.lock().recv_seq;
            let mut buf = Vec::new();
            encode_welcome(
                &Welcome {
                    version: VERSION,
                    status: WelcomeStatus::Resumed,
                    received,
                    message: String::new(),
                },
                &mut buf,
            );
            if io.write_all(&buf).await.is_ok() {
                shared.lock().resumes += 1;
                next = Some((io, r, l));
                break;
            }
            // That transport died at once; wait for another.
            candidate = tokio::time::timeout(config.resume_window, resumes.recv())
                .await
                .ok()
                .flatten();
        }
    }
}
