//! `yamux`: the `yamux` crate (0.13) over ONE TCP connection.
//!
//! yamux 0.13 has no control handle: the [`Connection`] is polled by one
//! task, which also hands out outbound streams (`poll_new_outbound`) to
//! [`Opener::open`] callers through a channel. The server side polls
//! `poll_next_inbound` and spawns [`crate::system::serve_stream`] per stream.
//! `tokio-util`'s `compat` bridges futures-io (yamux) and tokio-io.

use std::future::poll_fn;
use std::io;
use std::sync::Arc;
use std::task::Poll;

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};
use yamux::{Config, Connection, Mode, Stream};

use crate::system::{
    count_server_error, spawn_serve, AbortOnDrop, BoxedStream, OpenFut, Opener, System,
};

/// Name in the output.
pub const NAME: &str = "yamux";

/// Streams allowed on the connection (both directions). The default (512)
/// is far below the 10,000 idle streams of the memory test; 16,384 leaves
/// room for them plus stragglers of the earlier workloads.
pub const MAX_STREAMS: usize = 16_384;

/// yamux's initial per-stream receive window (the spec's 256 KiB).
const DEFAULT_CREDIT: usize = yamux::DEFAULT_CREDIT as usize;

/// The part of the connection receive window that streams may grow into
/// beyond their initial 256 KiB. With the defaults (1 GiB for 512 streams)
/// that pool is 1 GiB - 512 × 256 KiB = 896 MiB; we keep the same pool.
const GROWTH_POOL: usize = 1024 * 1024 * 1024 - 512 * DEFAULT_CREDIT;

/// Connection receive window limit: yamux asserts it is at least
/// `max_num_streams × 256 KiB`, so it has to grow with [`MAX_STREAMS`]
/// (to 4 GiB + 896 MiB here). It is an upper bound on credit, not memory
/// allocated up front.
pub const MAX_CONNECTION_RECEIVE_WINDOW: usize = MAX_STREAMS * DEFAULT_CREDIT + GROWTH_POOL;

/// The yamux config for both ends: the defaults (16 KiB split send size,
/// read after close, window auto-tuning) except the stream limit and the
/// connection window it requires.
fn config() -> Config {
    let mut cfg = Config::default();
    // Window first: `set_max_num_streams` asserts the window is big enough.
    cfg.set_max_connection_receive_window(Some(MAX_CONNECTION_RECEIVE_WINDOW));
    cfg.set_max_num_streams(MAX_STREAMS);
    cfg
}

/// Settings reported in the output.
pub fn settings() -> Vec<(&'static str, String)> {
    vec![
        ("version", "0.13 (crate yamux)".to_string()),
        ("max_num_streams", MAX_STREAMS.to_string()),
        (
            "max_connection_receive_window",
            format!("{} MiB", MAX_CONNECTION_RECEIVE_WINDOW >> 20),
        ),
        (
            "stream window",
            "256 KiB initial, auto-tuned (default)".to_string(),
        ),
        ("split_send_size", "16 KiB (default)".to_string()),
        ("tcp_nodelay", "on (both ends)".to_string()),
    ]
}

/// Where the driver task sends a newly opened stream.
type OpenReply = oneshot::Sender<io::Result<Stream>>;

/// Asks the client connection's driver task for new outbound streams.
struct YamuxOpener {
    requests: mpsc::UnboundedSender<OpenReply>,
}

impl Opener for YamuxOpener {
    fn open(&self) -> OpenFut {
        let requests = self.requests.clone();
        Box::pin(async move {
            let (reply, stream) = oneshot::channel();
            requests
                .send(reply)
                .map_err(|_| io::Error::other("yamux: the client connection driver has stopped"))?;
            let stream = stream.await.map_err(|_| {
                io::Error::other("yamux: the client connection driver dropped an open request")
            })??;
            Ok(Box::new(stream.compat()) as BoxedStream)
        })
    }
}

/// Maps a yamux connection error to an I/O error.
fn to_io(e: yamux::ConnectionError) -> io::Error {
    io::Error::other(format!("yamux: {e}"))
}

/// Polls the client connection: hands out outbound streams to waiting
/// [`Opener::open`] calls and drives all I/O. Returns when the connection
/// ends.
async fn drive_client(
    mut conn: Connection<Compat<TcpStream>>,
    mut requests: mpsc::UnboundedReceiver<OpenReply>,
) -> yamux::Result<()> {
    let mut waiting: Option<OpenReply> = None;
    poll_fn(move |cx| {
        // New outbound streams first, so that the streams created here are
        // registered with the connection by the `poll_next_inbound` below.
        loop {
            if waiting.is_none() {
                match requests.poll_recv(cx) {
                    Poll::Ready(Some(reply)) => waiting = Some(reply),
                    // No opener left, or nothing asked: just drive I/O.
                    Poll::Ready(None) | Poll::Pending => break,
                }
            }
            match conn.poll_new_outbound(cx) {
                Poll::Ready(result) => {
                    if let Some(reply) = waiting.take() {
                        // The caller may have given up; nothing to do then.
                        let _ = reply.send(result.map_err(to_io));
                    }
                }
                // 256 streams await the server's ACK: woken when one comes.
                Poll::Pending => break,
            }
        }
        loop {
            match conn.poll_next_inbound(cx) {
                // The benchmark server opens no streams; refuse any.
                Poll::Ready(Some(Ok(stream))) => drop(stream),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    })
    .await
}

/// Accepts the server connection's inbound streams and serves each.
async fn drive_server(mut conn: Connection<Compat<TcpStream>>) {
    loop {
        match poll_fn(|cx| conn.poll_next_inbound(cx)).await {
            Some(Ok(stream)) => spawn_serve(Box::new(stream.compat())),
            Some(Err(_)) => {
                count_server_error();
                return;
            }
            None => return,
        }
    }
}

/// Starts a yamux server and client over one loopback TCP connection.
pub async fn start() -> anyhow::Result<Option<System>> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("yamux: binding the listener on 127.0.0.1")?;
    let addr = listener.local_addr().context("yamux: listener address")?;
    let (accepted, client_tcp) = tokio::join!(listener.accept(), TcpStream::connect(addr));
    let (server_tcp, _) = accepted.context("yamux: accepting the TCP connection")?;
    let client_tcp = client_tcp.context("yamux: connecting the TCP connection")?;
    server_tcp
        .set_nodelay(true)
        .context("yamux: TCP_NODELAY on the server socket")?;
    client_tcp
        .set_nodelay(true)
        .context("yamux: TCP_NODELAY on the client socket")?;

    let server = Connection::new(server_tcp.compat(), config(), Mode::Server);
    let client = Connection::new(client_tcp.compat(), config(), Mode::Client);
    let (requests_tx, requests_rx) = mpsc::unbounded_channel();

    let server_task = tokio::spawn(drive_server(server));
    let client_task = tokio::spawn(async move {
        // Errors reach the streams (and so the workloads) as I/O errors.
        let _ = drive_client(client, requests_rx).await;
    });
    Ok(Some(System {
        name: NAME,
        opener: Arc::new(YamuxOpener {
            requests: requests_tx,
        }),
        guard: Box::new(AbortOnDrop(vec![server_task, client_task])),
    }))
}
