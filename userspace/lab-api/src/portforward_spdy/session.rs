//! The session loop: one writer that owns the compression stream, and a
//! reader that decodes the client's frames into [`Conn`].
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{conn::Conn, Pod};
use crate::spdy::{self, Frame};

/// One SPDY session: bytes from the client arrive on `inbound` (closed when
/// the client goes), bytes for it leave on `outbound`. Returns when the
/// client has gone or broke the protocol; forwarding tasks end with it.
pub(super) async fn session(
    mut inbound: mpsc::Receiver<Vec<u8>>,
    outbound: mpsc::Sender<Vec<u8>>,
    pod: Pod,
) {
    let (frames, mut frames_rx) = mpsc::channel::<Frame>(64);
    // One writer owns the compression stream: frames leave in the order
    // they are encoded.
    let writer = tokio::spawn(async move {
        let mut enc = spdy::Encoder::new();
        while let Some(f) = frames_rx.recv().await {
            let mut bytes = enc.encode(&f);
            while bytes.len() < 64 * 1024 {
                match frames_rx.try_recv() {
                    Ok(f) => bytes.extend(enc.encode(&f)),
                    Err(_) => break,
                }
            }
            if outbound.send(bytes).await.is_err() {
                break;
            }
        }
    });
    let (events, mut events_rx) = mpsc::unbounded_channel();
    let mut conn = Conn::new(pod, frames, events);
    let mut decoder = spdy::Decoder::new();
    let mut buf = Vec::new();
    'session: loop {
        loop {
            match decoder.next_frame(&mut buf) {
                Ok(Some(frame)) => conn.on_frame(frame).await,
                Ok(None) => break,
                Err(e) => {
                    warn!(pod = %conn.pod.name, "port-forward: SPDY protocol error: {e}");
                    conn.send(Frame::GoAway {
                        last_good_stream_id: conn.last_stream_id,
                        status: spdy::GOAWAY_PROTOCOL_ERROR,
                    })
                    .await;
                    break 'session;
                }
            }
        }
        tokio::select! {
            chunk = inbound.recv() => match chunk {
                Some(c) => buf.extend_from_slice(&c),
                None => {
                    debug!(pod = %conn.pod.name, "port-forward: client closed the SPDY session");
                    break 'session;
                }
            },
            Some(ev) = events_rx.recv() => conn.on_event(ev).await,
        }
    }
    // Forwarding ends with the session; what was queued is still written.
    drop(conn);
    let abort = writer.abort_handle();
    if tokio::time::timeout(Duration::from_secs(2), writer)
        .await
        .is_err()
    {
        abort.abort();
    }
}
