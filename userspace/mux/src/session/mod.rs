//! A session's state, shared by its streams and its driver, and the public
//! [`Session`] handle. No I/O here: `conn` drives it over a transport.
//!
//! One job a file, as h2 splits `proto/streams/`:
//! - `state`: [`Shared`] and [`Inner`], the state behind one lock, and
//!   ending the session;
//! - `streams`: one stream's state, and the operations [`Stream`] calls;
//! - `flow`: receive windows, credit, the session's buffer budget;
//! - `schedule`: the writer's queues and its turns between streams;
//! - `replay`: what was sent and not acknowledged, acknowledgements, resume;
//! - `dispatch`: frames from the peer;
//! - `requests`: what the peer asks of the serving side, queued for it;
//! - `datagrams`, `dns`, `intercepts`: those features' handles and state.
use std::{io, sync::Arc, task::Poll, time::Duration};

use tpbpf_proto::{Destination, Frame, ResetReason, INITIAL_WINDOW};

use crate::stream::Stream;

mod datagrams;
mod dispatch;
mod dns;
mod flow;
mod intercepts;
mod replay;
mod requests;
mod schedule;
mod state;
mod streams;
#[cfg(test)]
mod testing;

pub use datagrams::Flow;
pub use intercepts::Intercept;
use intercepts::Intercepted;
pub use requests::Request;
use state::reset_error;
pub(crate) use state::{Inner, Shared};
use streams::StreamState;

/// A session: open streams with [`Session::open`], take the peer's with
/// [`Session::accept`]. Cloning gives another handle to the same session.
#[derive(Clone)]
pub struct Session {
    pub(crate) shared: Arc<Shared>,
}

/// A session id as logs and `tpbpf status` show it: its first 8 bytes in hex.
pub fn short_id(id: &[u8; 16]) -> String {
    id[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// A snapshot of a session, for `tpbpf status`.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub connected: bool,
    /// The kernel does the current transport's TLS (kTLS).
    pub kernel_tls: bool,
    pub rtt: Option<Duration>,
    pub streams: usize,
    /// Application bytes written into and read out of streams.
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Transports that replaced a lost one.
    pub resumes: u64,
    /// Bytes waiting for the peer's acknowledgement.
    pub unacked: u64,
    /// Bytes received and not yet read by the streams' applications.
    pub buffered: usize,
    /// Bytes sent again after resumes.
    pub replayed: u64,
    /// While the transport is down: why the last attempt to resume failed.
    pub last_error: Option<String>,
    /// Datagrams and DNS messages this side dropped at a full queue: its
    /// lossy send queue, a flow's answers unread, requests unserved.
    pub datagrams_dropped: u64,
    /// Control bytes and unreliable frames waiting to go out (bounded).
    pub queued_control: usize,
}

impl Session {
    pub(crate) fn from_shared(shared: Arc<Shared>) -> Session {
        Session { shared }
    }

    /// Opens a stream to `dst`. No round trip: the open frame leaves with
    /// the first bytes written (or at once, if nothing is written before
    /// the session's writer runs).
    pub fn open(&self, dst: Destination) -> io::Result<Stream> {
        self.open_with(dst, &[])
    }

    /// Opens a stream whose first bytes travel in the open frame itself.
    pub fn open_with(&self, dst: Destination, first: &[u8]) -> io::Result<Stream> {
        self.open_stream(dst, first, None)
    }

    /// Opens a stream; one for an intercepted connection opens with
    /// [`Frame::InterceptIncoming`] (`intercepts`).
    fn open_stream(
        &self,
        dst: Destination,
        first: &[u8],
        intercepted: Option<Intercepted>,
    ) -> io::Result<Stream> {
        let config = &self.shared.config;
        let mut inner = self.shared.lock();
        if let Some((reason, message)) = &inner.ended {
            return Err(reset_error(*reason, message));
        }
        if let Some(message) = &inner.go_away {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("the tunnel peer accepts no new streams: {message}"),
            ));
        }
        if inner.streams.len() >= config.max_streams {
            return Err(io::Error::other(format!(
                "too many streams on this tunnel session (limit {}): close some or raise the limit",
                config.max_streams
            )));
        }
        if !inner.window_fits(config) {
            return Err(io::Error::other(format!(
                "the tunnel session's receive buffers are full (limit {} bytes)",
                config.max_buffered
            )));
        }
        let id = inner.next_id;
        inner.next_id = id.checked_add(2).ok_or_else(|| {
            io::Error::other("this tunnel session used all its stream ids: start a new session")
        })?;
        let mut s = StreamState::new(None, intercepted.is_none().then_some(dst));
        let n = first.len().min(INITIAL_WINDOW as usize);
        s.send.extend(&first[..n]);
        s.send_credit -= n as u64;
        inner.bytes_sent += n as u64;
        inner.granted += INITIAL_WINDOW as usize;
        inner.streams.insert(id, s);
        if let Some(i) = intercepted {
            inner.push_control(&i.open_frame(id));
        }
        inner.queue(id);
        drop(inner);
        self.shared.write.notify_one();
        let mut stream = Stream::new(self.shared.clone(), id);
        if n < first.len() {
            stream.pending_first = first[n..].to_vec();
        }
        Ok(stream)
    }

    /// The next stream the peer opened; `None` once the session is over.
    pub async fn accept(&self) -> Option<Stream> {
        std::future::poll_fn(|cx| {
            let mut inner = self.shared.lock();
            if let Some(id) = inner.incoming.pop_front() {
                return Poll::Ready(Some(Stream::new(self.shared.clone(), id)));
            }
            if inner.ended.is_some() {
                return Poll::Ready(None);
            }
            inner.accept_waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Tells the peer no new streams will be accepted, and ends the session
    /// for everything still open.
    pub fn close(&self, message: &str) {
        let mut inner = self.shared.lock();
        inner.push_control(&Frame::GoAway {
            message: message.to_string(),
        });
        inner.end(
            ResetReason::Aborted,
            format!("the tunnel session was closed: {message}"),
        );
        drop(inner);
        self.shared.closed.notify_one();
        self.shared.write.notify_one();
    }

    /// [`Session::close`], then waits until the go-away has been written
    /// and the transport shut down (at most `within`; at once when no
    /// transport is connected), so the peer learns the session ended on
    /// purpose rather than waiting out its resume window.
    pub async fn close_flushed(&self, message: &str, within: std::time::Duration) {
        let ended = self.shared.transport_ended.notified();
        let connected = self.shared.lock().connected;
        self.close(message);
        if connected {
            let _ = tokio::time::timeout(within, ended).await;
        }
    }

    /// Why the session ended, if it did.
    pub fn ended(&self) -> Option<String> {
        self.shared.lock().ended.as_ref().map(|(_, m)| m.clone())
    }

    /// Waits until the session ends and says why.
    pub async fn closed(&self) -> String {
        loop {
            let notified = self.shared.closed.notified();
            if let Some(m) = self.ended() {
                return m;
            }
            notified.await;
        }
    }

    /// The session's id as logs and `tpbpf status` show it, on both sides:
    /// its first 8 bytes in hex.
    pub fn short_id(&self) -> String {
        short_id(&self.shared.id)
    }

    pub fn id(&self) -> [u8; 16] {
        self.shared.id
    }

    /// Whether a transport carries the session now (false while it waits
    /// to resume, and once it is over).
    pub fn connected(&self) -> bool {
        self.shared.lock().connected
    }

    pub fn stats(&self) -> Stats {
        let inner = self.shared.lock();
        Stats {
            queued_control: inner.control.len() + 32 * inner.unreliable.len(),
            connected: inner.connected,
            kernel_tls: inner.kernel_tls,
            datagrams_dropped: inner.datagrams_dropped,
            rtt: inner.rtt,
            streams: inner.streams.len(),
            bytes_sent: inner.bytes_sent,
            bytes_received: inner.bytes_received,
            resumes: inner.resumes,
            unacked: inner.sent_seq - inner.acked_seq,
            buffered: inner.streams.values().map(|s| s.recv_len).sum(),
            replayed: inner.replayed,
            last_error: inner.last_error.clone(),
        }
    }
}
