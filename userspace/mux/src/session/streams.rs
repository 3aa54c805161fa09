//! One stream's state, and the operations [`crate::Stream`] calls on it:
//! read, write, shutdown, reset, drop.
use std::{
    collections::VecDeque,
    io,
    task::{Context, Poll, Waker},
};

use bytes::Bytes;
use tpbpf_proto::{Destination, Frame, ResetReason, INITIAL_WINDOW};

use super::{state::reset_error, Inner, Shared};

pub(crate) struct StreamState {
    // Receiving.
    pub(super) recv: VecDeque<Bytes>,
    pub(super) recv_len: usize,
    /// What the peer may still send.
    pub(super) recv_window: u32,
    /// The window this stream is at; grows for fast readers.
    pub(super) window: u32,
    /// Read by the application and not yet returned as credit.
    pub(super) unreturned: u32,
    pub(super) read_total: u64,
    pub(super) remote_fin: bool,
    pub(super) read_waker: Option<Waker>,
    // Sending.
    pub(super) open: Option<Destination>,
    pub(super) send: VecDeque<u8>,
    pub(super) send_credit: u64,
    pub(super) local_fin: bool,
    pub(super) fin_sent: bool,
    pub(super) write_waker: Option<Waker>,
    pub(super) queued: bool,
    // Both.
    pub(super) reset: Option<(ResetReason, String)>,
    pub(super) dropped: bool,
    pub(crate) dst: Option<Destination>,
}

impl StreamState {
    pub(super) fn new(dst: Option<Destination>, open: Option<Destination>) -> StreamState {
        StreamState {
            recv: VecDeque::new(),
            recv_len: 0,
            recv_window: INITIAL_WINDOW,
            window: INITIAL_WINDOW,
            unreturned: 0,
            read_total: 0,
            remote_fin: false,
            read_waker: None,
            open,
            send: VecDeque::new(),
            send_credit: u64::from(INITIAL_WINDOW),
            local_fin: false,
            fin_sent: false,
            write_waker: None,
            queued: false,
            reset: None,
            dropped: false,
            dst,
        }
    }

    pub(super) fn wake(&mut self) {
        if let Some(w) = self.read_waker.take() {
            w.wake();
        }
        if let Some(w) = self.write_waker.take() {
            w.wake();
        }
    }

    pub(super) fn has_output(&self) -> bool {
        self.reset.is_none()
            && (self.open.is_some() || !self.send.is_empty() || (self.local_fin && !self.fin_sent))
    }

    pub(super) fn finished(&self) -> bool {
        self.dropped
            && (self.reset.is_some()
                || (self.fin_sent && self.remote_fin && self.recv_len == 0 && !self.queued))
    }

    /// Fails the stream with `reason` from either side: what it had to send
    /// is dropped, its reader and writer wake to the error. `false` if it
    /// had failed already.
    pub(super) fn fail(&mut self, reason: ResetReason, message: String) -> bool {
        if self.reset.is_some() {
            return false;
        }
        self.reset = Some((reason, message));
        self.send.clear();
        self.open = None;
        self.wake();
        true
    }

    /// Moves received bytes into `buf`; how many.
    fn read_into(&mut self, buf: &mut tokio::io::ReadBuf<'_>) -> usize {
        let mut n = 0;
        while buf.remaining() > 0 {
            let Some(front) = self.recv.front_mut() else {
                break;
            };
            let take = front.len().min(buf.remaining());
            buf.put_slice(&front[..take]);
            n += take;
            if take == front.len() {
                self.recv.pop_front();
            } else {
                let _ = front.split_to(take);
            }
        }
        self.recv_len -= n;
        n
    }
}

impl Inner {
    pub(super) fn remove_if_finished(&mut self, id: u32) {
        if self.streams.get(&id).is_some_and(StreamState::finished) {
            if let Some(s) = self.streams.remove(&id) {
                self.granted -= s.window as usize;
            }
        }
    }

    /// Resets a stream from this side: the peer is told.
    pub(crate) fn reset_local(&mut self, id: u32, reason: ResetReason, message: &str) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        if !s.fail(reason, message.to_string()) {
            return;
        }
        self.push_control(&Frame::Reset {
            stream: id,
            reason,
            message: message.to_string(),
        });
        self.remove_if_finished(id);
    }
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "the tunnel stream is gone")
}

// Stream operations, called by `Stream`.
impl Shared {
    pub(crate) fn poll_read(
        &self,
        id: u32,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut inner = self.lock();
        let Some(s) = inner.streams.get_mut(&id) else {
            return Poll::Ready(Err(gone()));
        };
        if s.recv_len == 0 {
            if let Some((reason, message)) = &s.reset {
                return Poll::Ready(Err(reset_error(*reason, message)));
            }
            if s.remote_fin {
                return Poll::Ready(Ok(()));
            }
            s.read_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = s.read_into(buf);
        inner.bytes_received += n as u64;
        if inner.on_read(id, n, &self.config) {
            drop(inner);
            self.write.notify_one();
        }
        Poll::Ready(Ok(()))
    }

    pub(crate) fn poll_write(
        &self,
        id: u32,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut inner = self.lock();
        let Some(s) = inner.streams.get_mut(&id) else {
            return Poll::Ready(Err(gone()));
        };
        if let Some((reason, message)) = &s.reset {
            return Poll::Ready(Err(reset_error(*reason, message)));
        }
        if s.local_fin {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after shutdown of the tunnel stream",
            )));
        }
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let room = s.send_room();
        if room == 0 {
            s.write_waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = buf.len().min(room);
        s.send_credit -= n as u64;
        s.send.extend(&buf[..n]);
        inner.bytes_sent += n as u64;
        let was_idle = inner.ready.is_empty() && inner.control.is_empty();
        inner.queue(id);
        drop(inner);
        if was_idle {
            self.write.notify_one();
        }
        Poll::Ready(Ok(n))
    }

    pub(crate) fn shutdown(&self, id: u32) -> io::Result<()> {
        let mut inner = self.lock();
        let Some(s) = inner.streams.get_mut(&id) else {
            return Ok(());
        };
        if let Some((reason, message)) = &s.reset {
            return Err(reset_error(*reason, message));
        }
        if !s.local_fin {
            s.local_fin = true;
            inner.queue(id);
            drop(inner);
            self.write.notify_one();
        }
        Ok(())
    }

    pub(crate) fn reset(&self, id: u32, reason: ResetReason, message: &str) {
        self.lock().reset_local(id, reason, message);
        self.write.notify_one();
    }

    pub(crate) fn dropped(&self, id: u32) {
        let mut inner = self.lock();
        let Some(s) = inner.streams.get_mut(&id) else {
            return;
        };
        s.dropped = true;
        if s.reset.is_none() {
            if s.recv_len > 0 {
                // Like TCP: closing with unread data resets; data that
                // arrives later is answered with a reset too (on_data).
                inner.reset_local(
                    id,
                    ResetReason::Aborted,
                    "the stream was closed by the application",
                );
            } else if !s.local_fin {
                s.local_fin = true;
                inner.queue(id);
            }
        }
        inner.remove_if_finished(id);
        drop(inner);
        self.write.notify_one();
    }
}
