//! Test fixtures: a server on loopback, a proxy that cuts transports the
//! hard way (RST), a deterministic byte source.
#![allow(dead_code)]
use std::{
    io::Write,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tpbpf_mux::{transport::TcpConnector, Client, Config, Server, Session, Stream};

pub const TOKEN: &[u8] = b"test-token-0123456789";

/// A server on 127.0.0.1 that runs `handler` for every stream of every
/// session. Dropping it stops accepting.
pub struct TestServer {
    pub addr: SocketAddr,
    pub server: Server,
    pub sessions: Arc<Mutex<Vec<Session>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

pub async fn server<F, Fut>(config: Config, handler: F) -> TestServer
where
    F: Fn(Stream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    server_with_tls(config, None, handler).await
}

/// [`server`], with TLS when `tls` is given.
pub async fn server_with_tls<F, Fut>(
    config: Config,
    tls: Option<tokio_rustls::TlsAcceptor>,
    handler: F,
) -> TestServer
where
    F: Fn(Stream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (server, mut new) = Server::new(config, TOKEN.to_vec());
    let sessions = Arc::new(Mutex::new(Vec::new()));
    let handler = Arc::new(handler);
    let s2 = server.clone();
    let serve = tokio::spawn(async move {
        let _ = s2.serve(listener, tls).await;
    });
    let sess = sessions.clone();
    let accept = tokio::spawn(async move {
        while let Some((session, _peer)) = new.recv().await {
            sess.lock().unwrap().push(session.clone());
            let handler = handler.clone();
            tokio::spawn(async move {
                while let Some(stream) = session.accept().await {
                    tokio::spawn(handler(stream));
                }
            });
        }
    });
    TestServer {
        addr,
        server,
        sessions,
        tasks: vec![serve, accept],
    }
}

/// Echoes until EOF, then half-closes.
pub async fn echo(mut s: Stream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = s.shutdown().await;
}

/// Writes `data` (in `chunk`-sized writes, yielding between them), shuts
/// the write side, and returns all the stream sends back until EOF.
pub async fn round_trip(s: &mut Stream, data: &[u8], chunk: usize) -> std::io::Result<Vec<u8>> {
    let (mut r, mut w) = tokio::io::split(s);
    let send = async {
        for c in data.chunks(chunk.max(1)) {
            w.write_all(c).await?;
            tokio::task::yield_now().await;
        }
        w.shutdown().await
    };
    let mut back = Vec::new();
    let (sent, got) = tokio::join!(send, r.read_to_end(&mut back));
    sent?;
    got?;
    Ok(back)
}

/// Waits until `cond` holds, looking every few milliseconds; fails the test,
/// saying what it waited for, once `timeout` has passed.
pub async fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited {timeout:?} for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The server's first session, once its handshake is done.
pub async fn first_session(srv: &TestServer) -> Session {
    wait_for("the server's session", Duration::from_secs(10), || {
        !srv.sessions.lock().unwrap().is_empty()
    })
    .await;
    srv.sessions.lock().unwrap()[0].clone()
}

/// A server that hands every stream it accepts to the test, unread.
pub async fn handing_server(
    config: Config,
) -> (TestServer, tokio::sync::mpsc::UnboundedReceiver<Stream>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let srv = server(config, move |s| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(s);
        }
    })
    .await;
    (srv, rx)
}

pub async fn client(addr: SocketAddr, config: Config) -> Session {
    Client::connect(Arc::new(TcpConnector { addr }), TOKEN.to_vec(), config)
        .await
        .expect("client session")
}

/// A TCP proxy whose connections can be cut with a reset, and which can
/// refuse new ones for a while.
pub struct CutProxy {
    pub addr: SocketAddr,
    cut: watch::Sender<u64>,
    pub blocked: Arc<AtomicBool>,
    pub accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut.send_modify(|g| *g += 1);
    }
}

impl CutProxy {
    pub async fn start(upstream: SocketAddr) -> CutProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cut, rx) = watch::channel(0u64);
        let blocked = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let (b, a) = (blocked.clone(), accepted.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut down, _)) = listener.accept().await else {
                    return;
                };
                if b.load(Ordering::SeqCst) {
                    rst(&down);
                    continue;
                }
                a.fetch_add(1, Ordering::SeqCst);
                let mut rx = rx.clone();
                rx.borrow_and_update();
                tokio::spawn(async move {
                    let Ok(mut up) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = up.set_nodelay(true);
                    let _ = down.set_nodelay(true);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut down, &mut up) => {}
                        _ = rx.changed() => {}
                    }
                    // Killed, not closed politely: RST both ways.
                    rst(&down);
                    rst(&up);
                });
            }
        });
        CutProxy {
            addr,
            cut,
            blocked,
            accepted,
            task,
        }
    }

    /// Resets every connection through the proxy.
    pub fn cut(&self) {
        self.cut.send_modify(|g| *g += 1);
    }
}

/// Makes the socket's close send a reset. A zero linger never blocks.
#[allow(deprecated)]
pub fn rst(s: &TcpStream) {
    let _ = s.set_linger(Some(Duration::ZERO));
}

/// Deterministic pseudo-random bytes (xorshift64*).
pub struct Bytes(pub u64);

impl Bytes {
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let v = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Captures tracing output of the current thread.
#[derive(Clone, Default)]
pub struct Logs(pub Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    pub fn capture() -> (Logs, tracing::subscriber::DefaultGuard) {
        let logs = Logs::default();
        let l2 = logs.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || l2.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::DEBUG)
            .finish();
        (logs, tracing::subscriber::set_default(sub))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// A channel of sessions, unused: keeps the type in scope for tests that
/// build servers by hand.
pub type NewSessions = mpsc::Receiver<(Session, SocketAddr)>;
