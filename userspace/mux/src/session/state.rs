//! The session's state behind one lock ([`Inner`]), what the driver and the
//! streams share around it ([`Shared`]), and ending the session.
use std::{
    collections::{HashMap, VecDeque},
    io,
    sync::{Arc, Mutex, MutexGuard},
    task::Waker,
    time::{Duration, Instant},
};

use bytes::Bytes;
use tokio::sync::Notify;
use tpbpf_proto::{Destination, Frame, ResetReason};

use super::{
    datagrams::FlowState, intercepts::InterceptState, requests::Request, streams::StreamState,
};
use crate::Config;

pub(crate) struct Shared {
    pub(crate) inner: Mutex<Inner>,
    /// Wakes the writer: frames to send.
    pub(crate) write: Notify,
    /// Wakes the driver: the session ended locally.
    pub(crate) closed: Notify,
    /// Wakes [`super::Session::close_flushed`]: a transport's run ended
    /// (after a close: its go-away written and the transport shut down).
    pub(crate) transport_ended: Notify,
    pub(crate) config: Config,
    pub(crate) id: [u8; 16],
}

/// Everything a session knows, changed only under [`Shared::lock`]. Each
/// group of fields belongs to one of the sibling modules, which holds the
/// methods that change it.
pub(crate) struct Inner {
    // Streams (`streams`, `dispatch`).
    pub(super) next_id: u32,
    pub(super) max_peer_id: u32,
    pub(super) peer_parity: u32,
    pub(super) streams: HashMap<u32, StreamState>,
    pub(super) incoming: VecDeque<u32>,
    pub(super) accept_waker: Option<Waker>,
    // Output (`schedule`).
    /// Streams with something to send, in turn.
    pub(super) ready: VecDeque<u32>,
    /// Reliable frames that are not stream data (credit, reset, go-away).
    pub(super) control: Vec<u8>,
    /// Unreliable frames for the current transport (ping, pong, ack).
    pub(crate) unreliable: Vec<Frame>,
    // The peer's requests (`requests`).
    /// Datagrams and DNS queries from the peer, for the serving side.
    pub(super) requests: VecDeque<Request>,
    /// Intercept starts and stops, in order; never dropped.
    pub(super) intercept_requests: VecDeque<Request>,
    pub(super) request_waker: Option<Waker>,
    // Datagrams (`datagrams`).
    /// Datagrams from the peer on flows this side opened.
    pub(super) flows: HashMap<u32, FlowState>,
    pub(super) next_flow: u32,
    // DNS (`dns`).
    pub(super) dns_pending: HashMap<u32, tokio::sync::oneshot::Sender<Vec<u8>>>,
    pub(super) next_query: u32,
    // Intercepts (`intercepts`).
    /// Intercepts this side asked for: waiting for the agent's answer, or
    /// in place until it says they ended.
    pub(super) intercepts: HashMap<u32, InterceptState>,
    /// The agent's side: identity checks waiting for the client's
    /// [`Frame::InterceptProof`], by intercept id (one each).
    pub(super) proofs: HashMap<u32, tokio::sync::oneshot::Sender<tpbpf_proto::IdentityProof>>,
    pub(super) next_intercept: u32,
    // Flow control (`flow`).
    /// The sum of receive windows and buffered bytes: what the peer can make
    /// this session hold.
    pub(super) granted: usize,
    // The session's state.
    /// Set when the session is over; every stream fails with it.
    pub(crate) ended: Option<(ResetReason, String)>,
    pub(super) go_away: Option<String>,
    // Resume (`replay`): the reliable bytes sent but not acknowledged.
    pub(crate) replay: VecDeque<Bytes>,
    /// Bytes of the first replay chunk already acknowledged.
    pub(crate) replay_skip: usize,
    pub(crate) replay_len: usize,
    /// Batch buffers back from the replay buffer, for reuse: fresh ones
    /// would cost page faults on every batch.
    pub(super) pool: Vec<Vec<u8>>,
    /// Sequence number of the next reliable byte sent.
    pub(crate) sent_seq: u64,
    /// Reliable bytes received and processed.
    pub(crate) recv_seq: u64,
    pub(crate) acked_seq: u64,
    pub(crate) ack_sent: u64,
    // Stats.
    pub(crate) connected: bool,
    /// The kernel does the current transport's TLS.
    pub(crate) kernel_tls: bool,
    /// Datagrams and DNS messages dropped at a full queue, both ways.
    pub(crate) datagrams_dropped: u64,
    pub(crate) rtt: Option<Duration>,
    pub(crate) resumes: u64,
    pub(crate) replayed: u64,
    pub(crate) last_error: Option<String>,
    pub(super) bytes_sent: u64,
    pub(super) bytes_received: u64,
    pub(crate) ping_started: Option<(u64, Instant)>,
}

pub(crate) fn reset_error(reason: ResetReason, message: &str) -> io::Error {
    let kind = match reason {
        ResetReason::Refused => io::ErrorKind::ConnectionRefused,
        ResetReason::Unreachable => io::ErrorKind::HostUnreachable,
        ResetReason::ProtocolError => io::ErrorKind::InvalidData,
        ResetReason::Aborted | ResetReason::ResumeExpired | ResetReason::Other => {
            io::ErrorKind::ConnectionReset
        }
    };
    io::Error::new(kind, message.to_string())
}

impl Shared {
    pub(crate) fn new(config: Config, id: [u8; 16], client: bool) -> Arc<Shared> {
        Arc::new(Shared {
            inner: Mutex::new(Inner::new(client)),
            write: Notify::new(),
            closed: Notify::new(),
            transport_ended: Notify::new(),
            config,
            id,
        })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    /// A fresh session's state: the client's ids are odd, the server's even.
    pub(super) fn new(client: bool) -> Inner {
        Inner {
            next_id: if client { 1 } else { 2 },
            max_peer_id: 0,
            peer_parity: if client { 0 } else { 1 },
            streams: HashMap::new(),
            ready: VecDeque::new(),
            control: Vec::new(),
            unreliable: Vec::new(),
            incoming: VecDeque::new(),
            accept_waker: None,
            requests: VecDeque::new(),
            intercept_requests: VecDeque::new(),
            request_waker: None,
            flows: HashMap::new(),
            next_flow: if client { 1 } else { 2 },
            dns_pending: HashMap::new(),
            next_query: 1,
            intercepts: HashMap::new(),
            proofs: HashMap::new(),
            next_intercept: 1,
            granted: 0,
            ended: None,
            go_away: None,
            replay: VecDeque::new(),
            replay_skip: 0,
            replay_len: 0,
            pool: Vec::new(),
            sent_seq: 0,
            recv_seq: 0,
            acked_seq: 0,
            ack_sent: 0,
            connected: true,
            kernel_tls: false,
            datagrams_dropped: 0,
            rtt: None,
            resumes: 0,
            replayed: 0,
            last_error: None,
            bytes_sent: 0,
            bytes_received: 0,
            ping_started: None,
        }
    }

    pub(crate) fn streams_dst(&self, id: u32) -> Option<Destination> {
        self.streams.get(&id).and_then(|s| s.dst.clone())
    }

    /// Ends the session: every stream fails with `message`.
    pub(crate) fn end(&mut self, reason: ResetReason, message: String) {
        if self.ended.is_some() {
            return;
        }
        self.ended = Some((reason, message.clone()));
        self.connected = false;
        for s in self.streams.values_mut() {
            if s.reset.is_none() {
                s.reset = Some((reason, message.clone()));
            }
            s.wake();
        }
        let ids: Vec<u32> = self.streams.keys().copied().collect();
        for id in ids {
            self.remove_if_finished(id);
        }
        if let Some(w) = self.accept_waker.take() {
            w.wake();
        }
        if let Some(w) = self.request_waker.take() {
            w.wake();
        }
        for f in self.flows.values_mut() {
            if let Some(w) = f.waker.take() {
                w.wake();
            }
        }
        self.dns_pending.clear();
        for i in self.intercepts.values_mut() {
            i.ready = None;
            i.ended.get_or_insert_with(|| message.clone());
            if let Some(w) = i.waker.take() {
                w.wake();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tpbpf_proto::ResetReason;

    use super::super::testing::{dst, open, server};

    #[test]
    fn ending_the_session_fails_its_streams_and_forgets_the_dropped_ones() {
        let (mut inner, config) = server();
        inner.on_frame(open(1, b""), &config).unwrap();
        inner.on_frame(open(3, b""), &config).unwrap();
        // Stream 3's application is gone: nothing holds it once it fails.
        inner.streams.get_mut(&3).unwrap().dropped = true;
        inner.end(ResetReason::Aborted, "the tunnel session was closed".into());
        assert!(inner.ended.is_some());
        assert!(!inner.connected);
        let kept = &inner.streams[&1];
        assert_eq!(
            kept.reset,
            Some((ResetReason::Aborted, "the tunnel session was closed".into()))
        );
        assert!(!inner.streams.contains_key(&3), "a dropped stream was kept");
        assert_eq!(inner.granted, tpbpf_proto::INITIAL_WINDOW as usize);
        assert_eq!(inner.streams_dst(1), Some(dst()));
        // Ending twice keeps the first reason.
        inner.end(ResetReason::ResumeExpired, "later".into());
        assert_eq!(inner.ended.as_ref().unwrap().0, ResetReason::Aborted);
    }
}
