//! A session's state, shared by its streams and its driver: streams and
//! their buffers, the send schedule, the replay buffer. No I/O here.
use std::{
    collections::{HashMap, VecDeque},
    io,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll, Waker},
    time::{Duration, Instant},
};

use bytes::Bytes;
use tokio::sync::Notify;
use tpbpf_proto::{
    encode, encode_data_parts, Destination, Frame, InterceptMode, ResetReason, INITIAL_WINDOW,
};

use crate::{stream::Stream, Config, CHUNK};

/// What one write to the transport carries at most.
const BATCH: usize = 256 * 1024;
/// Bytes a stream may have written and not yet framed: the session's
/// writer paces streams, so more would only cost memory.
const SEND_BUFFER: usize = 8 * CHUNK;
/// A receiver acknowledges after this many reliable bytes.
pub(crate) const ACK_EVERY: u64 = 256 * 1024;

/// A session: open streams with [`Session::open`], take the peer's with
/// [`Session::accept`]. Cloning gives another handle to the same session.
#[derive(Clone)]
pub struct Session {
    pub(crate) shared: Arc<Shared>,
}

pub(crate) struct Shared {
    pub(crate) inner: Mutex<Inner>,
    /// Wakes the writer: frames to send.
    pub(crate) write: Notify,
    /// Wakes the driver: the session ended locally.
    pub(crate) closed: Notify,
    pub(crate) config: Config,
    pub(crate) id: [u8; 16],
}

/// A session id as logs and `tpbpf status` show it: its first 8 bytes in hex.
pub fn short_id(id: &[u8; 16]) -> String {
    id[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// A snapshot of a session, for `tpbpf status`.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub connected: bool,
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
    /// Control bytes and unreliable frames waiting to go out (bounded).
    pub queued_control: usize,
}

/// What the peer asks of the serving side besides streams.
#[derive(Debug)]
pub enum Request {
    /// A datagram on a flow: send it to `dst` and answer on the same flow
    /// with [`Session::reply_datagram`].
    Datagram {
        flow: u32,
        dst: Destination,
        data: Vec<u8>,
    },
    /// A DNS query (wire format): answer with [`Session::answer_dns`].
    Dns { id: u32, query: Vec<u8> },
    /// Steer `target`'s new connections into this session; answer with
    /// [`Session::intercept_status`], then open a stream per connection.
    InterceptStart {
        id: u32,
        target: std::net::SocketAddr,
        mode: InterceptMode,
    },
    /// Remove the intercept `id`.
    InterceptStop { id: u32 },
}

/// Datagrams and DNS queries waiting for the serving application, at most.
const MAX_REQUESTS: usize = 4096;
/// Intercept starts and stops waiting for the application, at most. They
/// are never dropped (a lost stop would leave an intercept in place): a
/// peer that sends more than this without the application keeping up
/// breaks the protocol.
const MAX_INTERCEPT_REQUESTS: usize = 256;
/// Datagrams waiting on one flow for its reader, at most.
const MAX_FLOW_QUEUE: usize = 256;
/// Bytes of control frames queued before datagrams are dropped.
const MAX_CONTROL: usize = 1024 * 1024;

#[derive(Default)]
struct InterceptState {
    challenges: Option<tokio::sync::mpsc::UnboundedSender<(u16, [u8; 16])>>,
    ready: Option<tokio::sync::oneshot::Sender<Result<String, String>>>,
    ended: Option<String>,
    waker: Option<Waker>,
}

#[derive(Default)]
struct FlowState {
    queue: VecDeque<Vec<u8>>,
    waker: Option<Waker>,
    dropped: u64,
}

pub(crate) struct StreamState {
    // Receiving.
    recv: VecDeque<Bytes>,
    recv_len: usize,
    /// What the peer may still send.
    recv_window: u32,
    /// The window this stream is at; grows for fast readers.
    window: u32,
    /// Read by the application and not yet returned as credit.
    unreturned: u32,
    read_total: u64,
    remote_fin: bool,
    read_waker: Option<Waker>,
    // Sending.
    open: Option<Destination>,
    send: VecDeque<u8>,
    send_credit: u64,
    local_fin: bool,
    fin_sent: bool,
    write_waker: Option<Waker>,
    queued: bool,
    // Both.
    reset: Option<(ResetReason, String)>,
    dropped: bool,
    pub(crate) dst: Option<Destination>,
}

pub(crate) struct Inner {
    next_id: u32,
    max_peer_id: u32,
    peer_parity: u32,
    streams: HashMap<u32, StreamState>,
    /// Streams with something to send, in turn.
    ready: VecDeque<u32>,
    /// Reliable frames that are not stream data (credit, reset, go-away).
    control: Vec<u8>,
    /// Unreliable frames for the current transport (ping, pong, ack).
    pub(crate) unreliable: Vec<Frame>,
    incoming: VecDeque<u32>,
    accept_waker: Option<Waker>,
    /// Datagrams and DNS queries from the peer, for the serving side.
    requests: VecDeque<Request>,
    /// Intercept starts and stops, in order; never dropped.
    intercept_requests: VecDeque<Request>,
    request_waker: Option<Waker>,
    /// Datagrams from the peer on flows this side opened.
    flows: HashMap<u32, FlowState>,
    next_flow: u32,
    dns_pending: HashMap<u32, tokio::sync::oneshot::Sender<Vec<u8>>>,
    next_query: u32,
    /// Intercepts this side asked for: waiting for the agent's answer, or
    /// in place until it says they ended.
    intercepts: HashMap<u32, InterceptState>,
    next_intercept: u32,
    /// The sum of receive windows and buffered bytes: what the peer can make
    /// this session hold.
    granted: usize,
    /// Set when the session is over; every stream fails with it.
    pub(crate) ended: Option<(ResetReason, String)>,
    go_away: Option<String>,
    // Resume: the reliable bytes sent but not acknowledged.
    pub(crate) replay: VecDeque<Bytes>,
    /// Bytes of the first replay chunk already acknowledged.
    pub(crate) replay_skip: usize,
    pub(crate) replay_len: usize,
    /// Batch buffers back from the replay buffer, for reuse: fresh ones
    /// would cost page faults on every batch.
    pool: Vec<Vec<u8>>,
    /// Sequence number of the next reliable byte sent.
    pub(crate) sent_seq: u64,
    /// Reliable bytes received and processed.
    pub(crate) recv_seq: u64,
    pub(crate) acked_seq: u64,
    pub(crate) ack_sent: u64,
    // Stats.
    pub(crate) connected: bool,
    pub(crate) rtt: Option<Duration>,
    pub(crate) resumes: u64,
    pub(crate) replayed: u64,
    pub(crate) last_error: Option<String>,
    bytes_sent: u64,
    bytes_received: u64,
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
            inner: Mutex::new(Inner {
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
                rtt: None,
                resumes: 0,
                replayed: 0,
                last_error: None,
                bytes_sent: 0,
                bytes_received: 0,
                ping_started: None,
            }),
            write: Notify::new(),
            closed: Notify::new(),
            config,
            id,
        })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl StreamState {
    fn new(dst: Option<Destination>, open: Option<Destination>) -> StreamState {
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

    fn wake(&mut self) {
        if let Some(w) = self.read_waker.take() {
            w.wake();
        }
        if let Some(w) = self.write_waker.take() {
            w.wake();
        }
    }

    fn has_output(&self) -> bool {
        self.reset.is_none()
            && (self.open.is_some() || !self.send.is_empty() || (self.local_fin && !self.fin_sent))
    }

    fn finished(&self) -> bool {
        self.dropped
            && (self.reset.is_some()
                || (self.fin_sent && self.remote_fin && self.recv_len == 0 && !self.queued))
    }
}

impl Inner {
    pub(crate) fn streams_dst(&self, id: u32) -> Option<Destination> {
        self.streams.get(&id).and_then(|s| s.dst.clone())
    }

    fn queue(&mut self, id: u32) {
        if let Some(s) = self.streams.get_mut(&id) {
            if !s.queued && s.has_output() {
                s.queued = true;
                self.ready.push_back(id);
            }
        }
    }

    fn push_control(&mut self, frame: &Frame) {
        // Control frames are small: they always fit.
        let _ = encode(frame, &mut self.control);
    }

    fn remove_if_finished(&mut self, id: u32) {
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
        if s.reset.is_some() {
            return;
        }
        s.reset = Some((reason, message.to_string()));
        s.send.clear();
        s.open = None;
        s.wake();
        self.push_control(&Frame::Reset {
            stream: id,
            reason,
            message: message.to_string(),
        });
        self.remove_if_finished(id);
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

    /// Handles one frame from the peer. An error is a protocol violation
    /// that ends the session.
    pub(crate) fn on_frame(&mut self, frame: Frame, config: &Config) -> Result<bool, String> {
        let mut wake_writer = false;
        match frame {
            Frame::Open { stream, dst, data } => {
                if stream % 2 != self.peer_parity || stream <= self.max_peer_id {
                    return Err(format!("the peer opened stream {stream}, an id it may not use (ids must grow, odd from the client, even from the server)"));
                }
                self.max_peer_id = stream;
                let refuse = if self.streams.len() >= config.max_streams {
                    Some(format!(
                        "too many streams on this tunnel session (limit {})",
                        config.max_streams
                    ))
                } else if self.granted + INITIAL_WINDOW as usize > config.max_buffered {
                    Some(format!(
                        "the tunnel session's receive buffers are full (limit {} bytes)",
                        config.max_buffered
                    ))
                } else {
                    None
                };
                if let Some(message) = refuse {
                    // Refusals pile up only while the peer does not read:
                    // past the bound, the session ends instead of growing.
                    if self.control.len() >= MAX_CONTROL {
                        return Err(format!(
                            "the peer opens streams and does not read the refusals ({} bytes waiting)",
                            self.control.len()
                        ));
                    }
                    self.push_control(&Frame::Reset {
                        stream,
                        reason: ResetReason::Refused,
                        message,
                    });
                    return Ok(true);
                }
                self.granted += INITIAL_WINDOW as usize;
                self.streams
                    .insert(stream, StreamState::new(Some(dst), None));
                self.incoming.push_back(stream);
                if let Some(w) = self.accept_waker.take() {
                    w.wake();
                }
                if !data.is_empty() {
                    wake_writer |= self.on_data(stream, Bytes::from(data))?;
                }
            }
            Frame::Data { stream, data } => {
                wake_writer |= self.on_data(stream, Bytes::from(data))?;
            }
            Frame::Credit { stream, bytes } => {
                if let Some(s) = self.streams.get_mut(&stream) {
                    s.send_credit += u64::from(bytes);
                    if let Some(w) = s.write_waker.take() {
                        w.wake();
                    }
                }
            }
            Frame::HalfClose { stream } => {
                if let Some(s) = self.streams.get_mut(&stream) {
                    s.remote_fin = true;
                    if let Some(w) = s.read_waker.take() {
                        w.wake();
                    }
                    self.remove_if_finished(stream);
                }
            }
            Frame::Reset {
                stream,
                reason,
                message,
            } => {
                if let Some(s) = self.streams.get_mut(&stream) {
                    if s.reset.is_none() {
                        s.reset = Some((reason, message));
                        s.send.clear();
                        s.open = None;
                        s.wake();
                    }
                    self.remove_if_finished(stream);
                }
            }
            Frame::GoAway { message } => {
                self.go_away = Some(message);
            }
            Frame::Ping { nonce } => {
                // Only the latest ping needs its pong: a peer that pings and
                // does not read gets one pong waiting, not one per ping.
                match self
                    .unreliable
                    .iter_mut()
                    .find(|f| matches!(f, Frame::Pong { .. }))
                {
                    Some(pong) => *pong = Frame::Pong { nonce },
                    None => self.unreliable.push(Frame::Pong { nonce }),
                }
                wake_writer = true;
            }
            Frame::Pong { nonce } => {
                if let Some((n, at)) = self.ping_started {
                    if n == nonce {
                        self.rtt = Some(at.elapsed());
                        self.ping_started = None;
                    }
                }
            }
            Frame::Ack { received } => self.on_ack(received)?,
            Frame::Datagram { flow, dst, data } => {
                if let Some(f) = self.flows.get_mut(&flow) {
                    // An answer on a flow this side opened.
                    if f.queue.len() >= MAX_FLOW_QUEUE {
                        f.queue.pop_front();
                        f.dropped += 1;
                    }
                    f.queue.push_back(data);
                    if let Some(w) = f.waker.take() {
                        w.wake();
                    }
                } else if flow % 2 == self.peer_parity {
                    self.push_request(Request::Datagram { flow, dst, data });
                }
            }
            Frame::DnsQuery { id, query } => {
                self.push_request(Request::Dns { id, query });
            }
            Frame::DnsAnswer { id, answer } => {
                if let Some(tx) = self.dns_pending.remove(&id) {
                    let _ = tx.send(answer);
                }
            }
            Frame::InterceptStart {
                intercept,
                target,
                mode,
            } => self.push_intercept_request(Request::InterceptStart {
                id: intercept,
                target,
                mode,
            })?,
            Frame::InterceptStop { intercept } => {
                self.push_intercept_request(Request::InterceptStop { id: intercept })?
            }

            Frame::InterceptStatus {
                intercept,
                ok,
                message,
            } => {
                if let Some(i) = self.intercepts.get_mut(&intercept) {
                    if let Some(tx) = i.ready.take() {
                        let _ = tx.send(if ok { Ok(message) } else { Err(message) });
                    } else if !ok {
                        i.ended = Some(message);
                        if let Some(w) = i.waker.take() {
                            w.wake();
                        }
                    }
                }
            }
            Frame::InterceptChallenge {
                intercept,
                port,
                nonce,
            } => {
                if let Some(tx) = self
                    .intercepts
                    .get(&intercept)
                    .and_then(|i| i.challenges.as_ref())
                {
                    let _ = tx.send((port, nonce));
                }
            }
            // The agent's announcement of a connection's source; the
            // stream's open carries what is needed.
            Frame::InterceptIncoming { .. } => {}
        }
        Ok(wake_writer)
    }

    fn push_request(&mut self, r: Request) {
        // Like a full socket buffer: datagrams and queries beyond the limit
        // are dropped; their senders retry.
        if self.requests.len() < MAX_REQUESTS {
            self.requests.push_back(r);
        }
        if let Some(w) = self.request_waker.take() {
            w.wake();
        }
    }

    /// Intercept control is never dropped; too much of it unread is a
    /// protocol error.
    fn push_intercept_request(&mut self, r: Request) -> Result<(), String> {
        if self.intercept_requests.len() >= MAX_INTERCEPT_REQUESTS {
            return Err(format!(
                "more than {MAX_INTERCEPT_REQUESTS} intercept requests unanswered"
            ));
        }
        self.intercept_requests.push_back(r);
        if let Some(w) = self.request_waker.take() {
            w.wake();
        }
        Ok(())
    }

    /// Queues a datagram-like frame unless the control queue is full.
    fn push_lossy(&mut self, frame: &Frame) -> bool {
        if self.control.len() >= MAX_CONTROL {
            return false;
        }
        self.push_control(frame);
        true
    }

    /// Stream data from the peer.
    pub(crate) fn on_data(&mut self, stream: u32, data: Bytes) -> Result<bool, String> {
        let Some(s) = self.streams.get_mut(&stream) else {
            if stream % 2 == self.peer_parity && stream > self.max_peer_id {
                return Err(format!(
                    "the peer sent data on stream {stream} it never opened"
                ));
            }
            // A stream that ended here; its reset is on its way to the peer.
            return Ok(false);
        };
        if s.reset.is_some() {
            return Ok(false);
        }
        if s.dropped {
            self.reset_local(
                stream,
                ResetReason::Aborted,
                "the stream was closed by the application",
            );
            return Ok(true);
        }
        if data.len() > s.recv_window as usize {
            let message = format!(
                "the peer sent {} bytes on stream {stream} with {} bytes of credit",
                data.len(),
                s.recv_window
            );
            self.reset_local(stream, ResetReason::ProtocolError, &message);
            return Ok(true);
        }
        s.recv_window -= data.len() as u32;
        s.recv_len += data.len();
        s.recv.push_back(data);
        if let Some(w) = s.read_waker.take() {
            w.wake();
        }
        Ok(false)
    }

    pub(crate) fn on_ack(&mut self, received: u64) -> Result<(), String> {
        if received > self.sent_seq {
            return Err(format!(
                "the peer acknowledged byte {received}, beyond what was sent ({})",
                self.sent_seq
            ));
        }
        // An older acknowledgement can follow a newer one across a resume.
        if received > self.acked_seq {
            self.drop_acked(received);
        }
        Ok(())
    }

    /// Forgets replay bytes the peer has.
    pub(crate) fn drop_acked(&mut self, received: u64) {
        let mut drop = (received - self.acked_seq) as usize;
        self.acked_seq = received;
        self.replay_len -= drop.min(self.replay_len);
        while drop > 0 {
            let Some(front) = self.replay.front() else {
                break;
            };
            let left = front.len() - self.replay_skip;
            if left <= drop {
                drop -= left;
                self.replay_skip = 0;
                if let Some(chunk) = self.replay.pop_front() {
                    self.recycle(chunk);
                }
            } else {
                self.replay_skip += drop;
                drop = 0;
            }
        }
    }

    /// The unacknowledged bytes, for a replay.
    pub(crate) fn replay_chunks(&self) -> Vec<Bytes> {
        let mut out: Vec<Bytes> = self.replay.iter().cloned().collect();
        if let Some(first) = out.first_mut() {
            *first = first.slice(self.replay_skip..);
        }
        out
    }

    fn recycle(&mut self, chunk: Bytes) {
        if self.pool.len() < 8 {
            if let Ok(m) = chunk.try_into_mut() {
                let mut v: Vec<u8> = m.into();
                if v.capacity() >= BATCH {
                    v.clear();
                    self.pool.push(v);
                }
            }
        }
    }

    /// Takes what should go out next: unreliable frames, and a batch of
    /// reliable bytes (control first, then streams' data in turn), which is
    /// also kept for replay. `None` when there is nothing to send.
    pub(crate) fn take_output(&mut self, config: &Config) -> Option<(Vec<u8>, Bytes)> {
        let mut unreliable = Vec::new();
        for f in self.unreliable.drain(..) {
            let _ = encode(&f, &mut unreliable);
        }
        let mut out = self
            .pool
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(BATCH + CHUNK + 1024));
        out.extend_from_slice(&self.control);
        self.control.clear();
        // A full replay buffer stops new data until the peer acknowledges.
        while out.len() < BATCH && self.replay_len + out.len() < config.resume_bytes {
            let Some(id) = self.ready.pop_front() else {
                break;
            };
            let Some(s) = self.streams.get_mut(&id) else {
                continue;
            };
            s.queued = false;
            if s.reset.is_some() {
                continue;
            }
            let n = s.send.len().min(CHUNK);
            if let Some(dst) = s.open.take() {
                let data: Vec<u8> = s.send.drain(..n).collect();
                let _ = encode(
                    &Frame::Open {
                        stream: id,
                        dst,
                        data,
                    },
                    &mut out,
                );
            } else if n > 0 {
                let (a, b) = s.send.as_slices();
                let a = &a[..n.min(a.len())];
                let b = &b[..n - a.len()];
                encode_data_parts(id, a, b, &mut out);
                s.send.drain(..n);
                if s.send.len() < SEND_BUFFER / 2 {
                    if let Some(w) = s.write_waker.take() {
                        w.wake();
                    }
                }
            }
            if s.send.is_empty() && s.local_fin && !s.fin_sent {
                s.fin_sent = true;
                let _ = encode(&Frame::HalfClose { stream: id }, &mut out);
            }
            if s.has_output() {
                s.queued = true;
                self.ready.push_back(id);
            } else {
                self.remove_if_finished(id);
            }
        }
        if out.is_empty() && unreliable.is_empty() {
            self.pool.push(out);
            return None;
        }
        // A small batch is copied out, so the replay buffer does not hold a
        // whole batch buffer for a few bytes until they are acknowledged.
        let out = if out.len() < BATCH / 8 {
            let small = Bytes::copy_from_slice(&out);
            out.clear();
            self.pool.push(out);
            small
        } else {
            Bytes::from(out)
        };
        if !out.is_empty() {
            self.sent_seq += out.len() as u64;
            self.replay_len += out.len();
            self.replay.push_back(out.clone());
        }
        Some((unreliable, out))
    }

    /// Queues an acknowledgement if enough arrived since the last one (or
    /// anything, when `force`).
    pub(crate) fn maybe_ack(&mut self, force: bool) -> bool {
        let pending = self.recv_seq - self.ack_sent;
        if pending >= ACK_EVERY || (force && pending > 0) {
            self.ack_sent = self.recv_seq;
            self.unreliable.push(Frame::Ack {
                received: self.recv_seq,
            });
            return true;
        }
        false
    }
}

// Stream operations, called by `Stream`.
impl Shared {
    pub(crate) fn poll_read(
        &self,
        id: u32,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let Some(s) = inner.streams.get_mut(&id) else {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the tunnel stream is gone",
            )));
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
        let mut n = 0;
        while buf.remaining() > 0 {
            let Some(front) = s.recv.front_mut() else {
                break;
            };
            let take = front.len().min(buf.remaining());
            buf.put_slice(&front[..take]);
            n += take;
            if take == front.len() {
                s.recv.pop_front();
            } else {
                let _ = front.split_to(take);
            }
        }
        s.recv_len -= n;
        s.read_total += n as u64;
        s.unreturned += n as u32;
        inner.bytes_received += n as u64;
        // Return credit once half the window was read; grow the window of
        // a stream that reads a lot, within the session's limit.
        if s.unreturned >= s.window / 2 && !s.remote_fin {
            let mut grant = s.unreturned;
            s.unreturned = 0;
            if s.read_total >= 2 * u64::from(s.window)
                && s.window < self.config.max_window
                && inner.granted + s.window as usize <= self.config.max_buffered
            {
                let extra = s.window.min(self.config.max_window - s.window);
                s.window += extra;
                grant += extra;
                inner.granted += extra as usize;
            }
            s.recv_window += grant;
            inner.push_control(&Frame::Credit {
                stream: id,
                bytes: grant,
            });
            drop(guard);
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
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "the tunnel stream is gone",
            )));
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
        let room = (s.send_credit as usize).min(SEND_BUFFER.saturating_sub(s.send.len()));
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
        if inner.granted + INITIAL_WINDOW as usize > config.max_buffered {
            return Err(io::Error::other(format!(
                "the tunnel session's receive buffers are full (limit {} bytes)",
                config.max_buffered
            )));
        }
        let id = inner.next_id;
        inner.next_id = id.checked_add(2).ok_or_else(|| {
            io::Error::other("this tunnel session used all its stream ids: start a new session")
        })?;
        let mut s = StreamState::new(None, Some(dst));
        let n = first.len().min(INITIAL_WINDOW as usize);
        s.send.extend(&first[..n]);
        s.send_credit -= n as u64;
        inner.bytes_sent += n as u64;
        inner.granted += INITIAL_WINDOW as usize;
        inner.streams.insert(id, s);
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

    /// The next datagram or DNS query from the peer; `None` once the
    /// session is over.
    pub async fn next_request(&self) -> Option<Request> {
        std::future::poll_fn(|cx| {
            let mut inner = self.shared.lock();
            if let Some(r) = inner.intercept_requests.pop_front() {
                return Poll::Ready(Some(r));
            }
            if let Some(r) = inner.requests.pop_front() {
                return Poll::Ready(Some(r));
            }
            if inner.ended.is_some() {
                return Poll::Ready(None);
            }
            inner.request_waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    fn send_lossy(&self, frame: &Frame) -> io::Result<()> {
        let mut inner = self.shared.lock();
        if let Some((reason, message)) = &inner.ended {
            return Err(reset_error(*reason, message));
        }
        let queued = inner.push_lossy(frame);
        drop(inner);
        if queued {
            self.shared.write.notify_one();
        }
        Ok(())
    }

    /// Answers a datagram on `flow` (from `src`, the destination it went to).
    pub fn reply_datagram(
        &self,
        flow: u32,
        src: std::net::SocketAddr,
        data: &[u8],
    ) -> io::Result<()> {
        self.send_lossy(&Frame::Datagram {
            flow,
            dst: Destination::Addr(src),
            data: data.to_vec(),
        })
    }

    /// Answers the DNS query `id`.
    pub fn answer_dns(&self, id: u32, answer: Vec<u8>) -> io::Result<()> {
        self.send_lossy(&Frame::DnsAnswer { id, answer })
    }

    /// Sends a DNS query (wire format) to the peer's resolver and waits for
    /// the answer.
    pub async fn dns(&self, query: Vec<u8>, timeout: Duration) -> io::Result<Vec<u8>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let id = {
            let mut inner = self.shared.lock();
            if let Some((reason, message)) = &inner.ended {
                return Err(reset_error(*reason, message));
            }
            let id = inner.next_query;
            inner.next_query = inner.next_query.wrapping_add(1).max(1);
            inner.dns_pending.insert(id, tx);
            inner.push_lossy(&Frame::DnsQuery { id, query });
            id
        };
        self.shared.write.notify_one();
        let answer = tokio::time::timeout(timeout, rx).await;
        self.shared.lock().dns_pending.remove(&id);
        match answer {
            Ok(Ok(a)) => Ok(a),
            Ok(Err(_)) => Err(match self.ended() {
                Some(m) => io::Error::new(io::ErrorKind::ConnectionReset, m),
                None => io::Error::other("the DNS query was dropped"),
            }),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no DNS answer through the tunnel within {timeout:?}"),
            )),
        }
    }

    /// Answers an intercept request (`ok`), or says it failed or ended.
    pub fn intercept_status(&self, id: u32, ok: bool, message: &str) -> io::Result<()> {
        let mut inner = self.shared.lock();
        if let Some((reason, m)) = &inner.ended {
            return Err(reset_error(*reason, m));
        }
        inner.push_control(&Frame::InterceptStatus {
            intercept: id,
            ok,
            message: message.to_string(),
        });
        drop(inner);
        self.shared.write.notify_one();
        Ok(())
    }

    /// Asks the client to prove it may reach the pod (see
    /// [`Frame::InterceptChallenge`]).
    pub fn intercept_challenge(&self, id: u32, port: u16, nonce: [u8; 16]) -> io::Result<()> {
        let mut inner = self.shared.lock();
        if let Some((reason, m)) = &inner.ended {
            return Err(reset_error(*reason, m));
        }
        inner.push_control(&Frame::InterceptChallenge {
            intercept: id,
            port,
            nonce,
        });
        drop(inner);
        self.shared.write.notify_one();
        Ok(())
    }

    /// Asks the peer (an agent) to steer `target`'s new connections into
    /// this session. They arrive as streams ([`Session::accept`]) whose
    /// destination is `target`. If the agent asks for a proof of access
    /// first, `prove(port, nonce)` gives it. Dropping the handle removes the
    /// intercept.
    pub async fn intercept<P, F>(
        &self,
        target: std::net::SocketAddr,
        mode: InterceptMode,
        timeout: Duration,
        prove: P,
    ) -> io::Result<Intercept>
    where
        P: Fn(u16, [u8; 16]) -> F,
        F: std::future::Future<Output = Result<(), String>>,
    {
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let (ctx, mut crx) = tokio::sync::mpsc::unbounded_channel();
        let id = {
            let mut inner = self.shared.lock();
            if let Some((reason, m)) = &inner.ended {
                return Err(reset_error(*reason, m));
            }
            let id = inner.next_intercept;
            inner.next_intercept += 1;
            inner.intercepts.insert(
                id,
                InterceptState {
                    ready: Some(tx),
                    challenges: Some(ctx),
                    ..InterceptState::default()
                },
            );
            inner.push_control(&Frame::InterceptStart {
                intercept: id,
                target,
                mode,
            });
            id
        };
        self.shared.write.notify_one();
        let mut handle = Intercept {
            shared: self.shared.clone(),
            id,
            target,
            info: String::new(),
            stop_sent: false,
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let answer = loop {
            tokio::select! {
                a = &mut rx => break Some(a),
                Some((port, nonce)) = crx.recv() => {
                    if let Err(e) = prove(port, nonce).await {
                        return Err(io::Error::new(io::ErrorKind::PermissionDenied, e));
                    }
                }
                _ = tokio::time::sleep_until(deadline) => break None,
            }
        };
        match answer {
            Some(Ok(Ok(info))) => {
                handle.info = info;
                Ok(handle)
            }
            Some(Ok(Err(m))) => Err(io::Error::other(m)),
            Some(Err(_)) => Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                self.ended()
                    .unwrap_or_else(|| "the tunnel session ended".into()),
            )),
            None => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the agent did not answer the intercept of {target} within {timeout:?}"),
            )),
        }
    }

    /// Opens a datagram flow to `dst`: what is sent goes there from the
    /// peer's side; what comes back arrives on [`Flow::recv`].
    pub fn flow(&self, dst: Destination) -> io::Result<Flow> {
        let mut inner = self.shared.lock();
        if let Some((reason, message)) = &inner.ended {
            return Err(reset_error(*reason, message));
        }
        let id = inner.next_flow;
        inner.next_flow = id.wrapping_add(2);
        inner.flows.insert(id, FlowState::default());
        Ok(Flow {
            shared: self.shared.clone(),
            id,
            dst,
        })
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

/// A datagram flow opened with [`Session::flow`]. Datagrams may be dropped
/// when queues are full, as UDP's may.
pub struct Flow {
    shared: Arc<Shared>,
    id: u32,
    dst: Destination,
}

impl Flow {
    pub fn send(&self, data: &[u8]) -> io::Result<()> {
        Session::from_shared(self.shared.clone()).send_lossy(&Frame::Datagram {
            flow: self.id,
            dst: self.dst.clone(),
            data: data.to_vec(),
        })
    }

    /// The next datagram back on this flow.
    pub async fn recv(&self) -> io::Result<Vec<u8>> {
        std::future::poll_fn(|cx| {
            let mut inner = self.shared.lock();
            if let Some((reason, message)) = &inner.ended {
                return Poll::Ready(Err(reset_error(*reason, message)));
            }
            let Some(f) = inner.flows.get_mut(&self.id) else {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::NotConnected,
                    "flow closed",
                )));
            };
            if let Some(d) = f.queue.pop_front() {
                return Poll::Ready(Ok(d));
            }
            f.waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

impl Drop for Flow {
    fn drop(&mut self) {
        self.shared.lock().flows.remove(&self.id);
    }
}

/// An intercept in place; dropping it asks the agent to remove it.
pub struct Intercept {
    shared: Arc<Shared>,
    id: u32,
    target: std::net::SocketAddr,
    info: String,
    stop_sent: bool,
}

impl Intercept {
    /// What the agent said when the intercept was put in place: the
    /// environment of the pod's process, `KEY=VALUE` entries separated by
    /// NUL bytes, as in /proc/PID/environ.
    pub fn info(&self) -> &str {
        &self.info
    }

    pub fn target(&self) -> std::net::SocketAddr {
        self.target
    }

    /// Waits until the agent says the intercept ended (or the session did),
    /// and says why.
    pub async fn ended(&self) -> String {
        std::future::poll_fn(|cx| {
            let mut inner = self.shared.lock();
            let Some(i) = inner.intercepts.get_mut(&self.id) else {
                return Poll::Ready("the intercept was removed".to_string());
            };
            if let Some(m) = &i.ended {
                return Poll::Ready(m.clone());
            }
            i.waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

impl Intercept {
    /// Asks the agent to remove the intercept and waits (up to `timeout`)
    /// until it says it did: new connections then go to the app again.
    pub async fn stop(mut self, timeout: Duration) {
        {
            let mut inner = self.shared.lock();
            if inner.ended.is_some() || !inner.intercepts.contains_key(&self.id) {
                return;
            }
            inner.push_control(&Frame::InterceptStop { intercept: self.id });
        }
        self.shared.write.notify_one();
        self.stop_sent = true;
        let _ = tokio::time::timeout(timeout, self.ended()).await;
    }
}

impl Drop for Intercept {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        inner.intercepts.remove(&self.id);
        if inner.ended.is_none() && !self.stop_sent {
            inner.push_control(&Frame::InterceptStop { intercept: self.id });
            drop(inner);
            self.shared.write.notify_one();
        }
    }
}
