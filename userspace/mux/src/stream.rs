//! A stream: the application's end, `AsyncRead + AsyncWrite`.
use std::{
    io,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tpbpf_proto::{Destination, ResetReason};

use crate::session::Shared;

/// One stream of a session. Dropping it closes it like a TCP socket: a
/// half-close after the data written, or a reset if unread data remains.
pub struct Stream {
    shared: Arc<Shared>,
    id: u32,
    /// First bytes given to `open_with` beyond the initial window.
    pub(crate) pending_first: Vec<u8>,
}

impl Stream {
    pub(crate) fn new(shared: Arc<Shared>, id: u32) -> Stream {
        Stream {
            shared,
            id,
            pending_first: Vec::new(),
        }
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    /// Where the peer asked this stream to go (streams the peer opened).
    pub fn destination(&self) -> Option<Destination> {
        let inner = self.shared.lock();
        inner.streams_dst(self.id)
    }

    /// Resets the stream: the peer's reads and writes fail with `reason`.
    pub fn reset(&self, reason: ResetReason, message: &str) {
        self.shared.reset(self.id, reason, message);
    }

    fn flush_first(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.pending_first.is_empty() {
            let n = std::task::ready!(self.shared.poll_write(self.id, cx, &self.pending_first))?;
            self.pending_first.drain(..n);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.shared.poll_read(self.id, cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        std::task::ready!(self.flush_first(cx))?;
        self.shared.poll_write(self.id, cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written bytes are on their way; there is no buffer to flush.
        self.flush_first(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        std::task::ready!(self.flush_first(cx))?;
        Poll::Ready(self.shared.shutdown(self.id))
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.shared.dropped(self.id);
    }
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream").field("id", &self.id).finish()
    }
}
