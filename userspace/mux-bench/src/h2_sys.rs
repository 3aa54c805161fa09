//! `h2`: the `h2` crate (0.4) over ONE TCP connection, h2c with prior
//! knowledge. Each benchmark stream is one POST request: the request body
//! carries client→server bytes, the response body server→client bytes.
//! [`H2Stream`] turns a `SendStream` + `RecvStream` pair into tokio
//! `AsyncRead + AsyncWrite`, doing h2's flow control on both sides.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use anyhow::Context as _;
use bytes::Bytes;
use h2::client::ResponseFuture;
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use crate::system::{
    count_server_error, spawn_serve, AbortOnDrop, BoxedStream, OpenFut, Opener, System,
};

/// Name in the output.
pub const NAME: &str = "h2";

/// SETTINGS_MAX_CONCURRENT_STREAMS the server advertises. h2 advertises no
/// limit by default, but deployed servers use 100-250; we set an explicit
/// limit that the 10,000 idle streams fit under, with room to spare.
pub const MAX_CONCURRENT_STREAMS: u32 = 16_384;

/// Initial per-stream receive window, both ends (SETTINGS_INITIAL_WINDOW_SIZE).
/// The protocol default, 64 KiB - 1, caps one stream at one window per round
/// trip through both tasks; 1 MiB is what a tuned deployment would use and
/// is comparable with yamux's auto-tuned windows.
pub const STREAM_WINDOW: u32 = 1024 * 1024;

/// Connection-level receive window, both ends (sent as a WINDOW_UPDATE
/// after the handshake). The default, 64 KiB - 1, would throttle every
/// stream together; 16 MiB lets 16 streams run at a full stream window.
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

/// Settings reported in the output.
pub fn settings() -> Vec<(&'static str, String)> {
    vec![
        ("version", "0.4 (crate h2), h2c prior knowledge".to_string()),
        ("max_concurrent_streams", MAX_CONCURRENT_STREAMS.to_string()),
        (
            "initial_window_size (stream)",
            format!("{} KiB", STREAM_WINDOW >> 10),
        ),
        (
            "initial_connection_window_size",
            format!("{} MiB", CONNECTION_WINDOW >> 20),
        ),
        ("max_frame_size", "16 KiB (default)".to_string()),
        ("max_send_buffer_size", "~400 KiB (default)".to_string()),
        ("tcp_nodelay", "on (both ends)".to_string()),
    ]
}

/// The client builder: our windows; h2's defaults otherwise.
fn client_builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW);
    b
}

/// The server builder: our windows and stream limit; h2's defaults otherwise.
fn server_builder() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS);
    b
}

/// Maps an h2 error to an I/O error, keeping the underlying one if any.
fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        match e.into_io() {
            Some(io) => io,
            None => io::Error::other("h2: I/O error"),
        }
    } else {
        io::Error::other(format!("h2: {e}"))
    }
}

/// The receiving half of an [`H2Stream`].
enum Recv {
    /// Client side before the response headers came: the body follows.
    Response(ResponseFuture),
    /// Reading the body.
    Body(RecvStream),
    /// End of stream seen.
    Eof,
}

/// One h2 stream as a tokio byte stream.
///
/// - Write: asks for send capacity (`reserve_capacity` / `poll_capacity`)
///   and sends at most what was granted, so h2's own buffer stays bounded
///   (by its max send buffer, ~400 KiB per stream).
/// - Read: releases the received bytes' capacity at once
///   (`flow_control().release_capacity`), so the peer gets window back as
///   the application consumes; at most one DATA frame waits here.
/// - Shutdown: an empty DATA frame with END_STREAM.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: Recv,
    /// Received bytes not yet read by the application.
    pending: Bytes,
    /// END_STREAM sent.
    write_closed: bool,
}

impl H2Stream {
    fn new(send: SendStream<Bytes>, recv: Recv) -> Self {
        H2Stream {
            send,
            recv,
            pending: Bytes::new(),
            write_closed: false,
        }
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending.split_to(n));
                return Poll::Ready(Ok(()));
            }
            match &mut this.recv {
                Recv::Response(response) => {
                    let response = ready!(Pin::new(response).poll(cx)).map_err(h2_io)?;
                    if response.status() != http::StatusCode::OK {
                        return Poll::Ready(Err(io::Error::other(format!(
                            "h2: server answered {}",
                            response.status()
                        ))));
                    }
                    this.recv = Recv::Body(response.into_body());
                }
                Recv::Body(body) => match ready!(body.poll_data(cx)) {
                    Some(Ok(data)) => {
                        body.flow_control()
                            .release_capacity(data.len())
                            .map_err(h2_io)?;
                        this.pending = data;
                    }
                    Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                    None => this.recv = Recv::Eof,
                },
                Recv::Eof => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.write_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "h2: write after shutdown",
            )));
        }
        loop {
            // Capacity left from an earlier grant is used first: h2 only
            // reports a grant through `poll_capacity` once.
            let granted = this.send.capacity();
            if granted > 0 {
                let n = granted.min(buf.len());
                this.send
                    .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                    .map_err(h2_io)?;
                return Poll::Ready(Ok(n));
            }
            // Total wanted, not added to earlier requests.
            this.send.reserve_capacity(buf.len());
            match ready!(this.send.poll_capacity(cx)) {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "h2: stream no longer open for sending",
                    )))
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Data handed to h2 is written by the connection task on its own.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_closed {
            this.write_closed = true;
            this.send.send_data(Bytes::new(), true).map_err(h2_io)?;
        }
        Poll::Ready(Ok(()))
    }
}

/// Opens streams as POST requests on the one client connection.
struct H2Opener {
    send_request: h2::client::SendRequest<Bytes>,
}

impl Opener for H2Opener {
    fn open(&self) -> OpenFut {
        let send_request = self.send_request.clone();
        Box::pin(async move {
            let mut send_request = send_request.ready().await.map_err(h2_io)?;
            let request = http::Request::builder()
                .method(http::Method::POST)
                .uri("http://127.0.0.1/stream")
                .body(())
                .map_err(io::Error::other)?;
            let (response, send) = send_request.send_request(request, false).map_err(h2_io)?;
            // No waiting for the response headers here: like the other
            // systems, the stream is writable at once; the first read waits.
            Ok(Box::new(H2Stream::new(send, Recv::Response(response))) as BoxedStream)
        })
    }
}

/// Serves one server connection: answers every request with 200 at once and
/// hands the stream to [`crate::system::serve_stream`].
async fn serve_connection(tcp: TcpStream) {
    let mut conn = match server_builder().handshake::<_, Bytes>(tcp).await {
        Ok(conn) => conn,
        Err(_) => {
            count_server_error();
            return;
        }
    };
    while let Some(next) = conn.accept().await {
        match next {
            Ok((request, mut respond)) => {
                let body = request.into_body();
                match respond.send_response(http::Response::new(()), false) {
                    Ok(send) => spawn_serve(Box::new(H2Stream::new(send, Recv::Body(body)))),
                    Err(_) => count_server_error(),
                }
            }
            Err(_) => {
                count_server_error();
                return;
            }
        }
    }
}

/// Starts an h2 server and client over one loopback TCP connection.
pub async fn start() -> anyhow::Result<Option<System>> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("h2: binding the listener on 127.0.0.1")?;
    let addr = listener.local_addr().context("h2: listener address")?;
    let (accepted, client_tcp) = tokio::join!(listener.accept(), TcpStream::connect(addr));
    let (server_tcp, _) = accepted.context("h2: accepting the TCP connection")?;
    let client_tcp = client_tcp.context("h2: connecting the TCP connection")?;
    server_tcp
        .set_nodelay(true)
        .context("h2: TCP_NODELAY on the server socket")?;
    client_tcp
        .set_nodelay(true)
        .context("h2: TCP_NODELAY on the client socket")?;

    let server_task = tokio::spawn(serve_connection(server_tcp));
    let (send_request, connection) = client_builder()
        .handshake::<_, Bytes>(client_tcp)
        .await
        .context("h2: client handshake")?;
    let client_task = tokio::spawn(async move {
        // Errors reach the streams (and so the workloads) as I/O errors.
        let _ = connection.await;
    });
    Ok(Some(System {
        name: NAME,
        opener: Arc::new(H2Opener { send_request }),
        guard: Box::new(AbortOnDrop(vec![server_task, client_task])),
    }))
}
