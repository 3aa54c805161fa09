//! Pod port-forward over SPDY/3.1, as kubectl speaks it. kubectl (1.31+)
//! first asks for a WebSocket with subprotocol `SPDY/3.1+portforward.k8s.io`
//! and runs SPDY inside its binary messages (the API server's tunnel,
//! KEP-4006); when that upgrade fails it falls back to a POST with
//! `Upgrade: SPDY/3.1` and `X-Stream-Protocol-Version: portforward.k8s.io`.
//! Both end here, in the same session as the kubelet serves it:
//!
//! - For each forwarded connection the client opens two streams, error
//!   then data, with headers `streamtype` (`error`|`data`), `port` and
//!   `requestid`; every valid stream gets a SYN_REPLY, an invalid one a
//!   RST_STREAM.
//! - Once a request has both, the lab dials the pod from its node's network
//!   namespace and copies bytes both ways; FIN on the data stream is a
//!   half-close in either direction.
//! - When forwarding ends the error stream is closed; a failure is written
//!   on it first (`error forwarding port 80 to pod ..., uid ...: ...`) and the
//!   data stream is reset.
//! - PINGs from the client are echoed; nothing is flow-controlled.
use std::{
    collections::HashMap, convert::Infallible, future::Future, net::SocketAddr, pin::Pin,
    sync::Arc, time::Duration,
};

use axum::{
    body::Body,
    extract::{
        ws::{Message, WebSocketUpgrade},
        FromRequestParts,
    },
    http::{header, request::Parts, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::{mpsc, oneshot},
    task::JoinSet,
};
use tracing::{debug, info, warn};

use crate::spdy::{self, Frame, Headers};

/// The port-forward subprotocol (`X-Stream-Protocol-Version`).
pub(crate) const PROTOCOL: &str = "portforward.k8s.io";
/// The WebSocket subprotocol of SPDY tunneled in WebSocket.
pub(crate) const TUNNEL_PROTOCOL: &str = "SPDY/3.1+portforward.k8s.io";
const PROTOCOL_HEADER: &str = "x-stream-protocol-version";
const ACCEPTED_PROTOCOLS_HEADER: &str = "x-accepted-stream-protocol-versions";
/// How long the kubelet waits for the second stream of a request.
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes read from the pod per DATA frame.
const CHUNK: usize = 32 * 1024;

type DialFuture = Pin<Box<dyn Future<Output = std::io::Result<TcpStream>> + Send>>;

/// The pod being forwarded to.
#[derive(Clone)]
pub(crate) struct Pod {
    pub name: String,
    pub uid: String,
    /// Connects to a port of the pod.
    pub dial: Arc<dyn Fn(u16) -> DialFuture + Send + Sync>,
}

impl Pod {
    /// The lab's pod: dialed from its node's network namespace.
    pub fn in_lab(name: &str, uid: String, target: crate::portforward::Target) -> Self {
        Self {
            name: name.to_string(),
            uid,
            dial: Arc::new(move |port| {
                let netns = target.netns.clone();
                let addr = SocketAddr::new(target.ip, port);
                Box::pin(crate::portforward::dial(netns, addr))
            }),
        }
    }
}

/// Hyper's upgrade handle, taken for requests asking for `Upgrade: SPDY/3.1`
/// (a WebSocket upgrade takes it through `WebSocketUpgrade` instead).
pub(crate) struct SpdyUpgrade(pub Option<OnUpgrade>);

impl<S: Send + Sync> FromRequestParts<S> for SpdyUpgrade {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Infallible> {
        Ok(Self(
            wants_spdy(&parts.headers)
                .then(|| parts.extensions.remove::<OnUpgrade>())
                .flatten(),
        ))
    }
}

fn header_has(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains(token))
}

/// Whether the request asks for the plain SPDY/3.1 upgrade (the check of
/// the API machinery's upgrader: `Connection` has `upgrade`, `Upgrade` has
/// `spdy/3.1`).
pub(crate) fn wants_spdy(headers: &HeaderMap) -> bool {
    header_has(headers, header::CONNECTION, "upgrade")
        && header_has(headers, header::UPGRADE, "spdy/3.1")
}

/// Whether a WebSocket upgrade asks for SPDY tunneled in WebSocket.
pub(crate) fn wants_tunnel(ws: &WebSocketUpgrade) -> bool {
    ws.requested_protocols()
        .any(|p| p.as_bytes() == TUNNEL_PROTOCOL.as_bytes())
}

/// The WebSocket tunnel: SPDY/3.1 in binary messages.
pub(crate) fn tunnel(ws: WebSocketUpgrade, pod: Pod) -> Response {
    ws.protocols([TUNNEL_PROTOCOL])
        .on_upgrade(move |socket| async move {
            info!(
                pod = %pod.name,
                "port-forward: SPDY/3.1 tunneled in WebSocket ({TUNNEL_PROTOCOL})"
            );
            let (mut sink, mut source) = socket.split();
            let (in_tx, in_rx) = mpsc::channel::<Vec<u8>>(16);
            let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(16);
            let reader = tokio::spawn(async move {
                while let Some(msg) = source.next().await {
                    match msg {
                        Ok(Message::Binary(b)) => {
                            if in_tx.send(b.to_vec()).await.is_err() {
                                break;
                            }
                        }
                        Ok(Message::Text(_)) => {
                            // The client's tunnel reads binary messages only.
                            warn!("port-forward: text message in a SPDY tunnel");
                            break;
                        }
                        Ok(Message::Close(_)) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            });
            let writer = async move {
                while let Some(bytes) = out_rx.recv().await {
                    if sink.send(Message::Binary(bytes.into())).await.is_err() {
                        return;
                    }
                }
                let _ = sink.send(Message::Close(None)).await;
            };
            tokio::join!(session(in_rx, out_tx, pod), writer);
            reader.abort();
        })
}

/// The plain upgrade: negotiate `X-Stream-Protocol-Version`, answer 101
/// `Upgrade: SPDY/3.1`, then speak SPDY on the connection.
pub(crate) fn upgrade(on_upgrade: OnUpgrade, headers: &HeaderMap, pod: Pod) -> Response {
    let offered: Vec<String> = headers
        .get_all(PROTOCOL_HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect();
    if offered.is_empty() {
        return plain(
            StatusCode::BAD_REQUEST,
            &[],
            "unable to upgrade: X-Stream-Protocol-Version is required",
        );
    }
    if !offered.iter().any(|p| p == PROTOCOL) {
        return plain(
            StatusCode::FORBIDDEN,
            &[(ACCEPTED_PROTOCOLS_HEADER, PROTOCOL)],
            &format!(
                "unable to upgrade: unable to negotiate protocol: client supports [{}], server accepts [{PROTOCOL}]",
                offered.join(" ")
            ),
        );
    }
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                warn!("port-forward: SPDY upgrade failed: {e}");
                return;
            }
        };
        info!(
            pod = %pod.name,
            "port-forward: SPDY/3.1 over an HTTP upgrade ({PROTOCOL})"
        );
        let (mut rd, mut wr) = tokio::io::split(TokioIo::new(upgraded));
        let (in_tx, in_rx) = mpsc::channel::<Vec<u8>>(16);
        let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(16);
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; CHUNK];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if in_tx.send(buf[..n].to_vec()).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
        let writer = async move {
            while let Some(bytes) = out_rx.recv().await {
                if wr.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            let _ = wr.shutdown().await;
        };
        tokio::join!(session(in_rx, out_tx, pod), writer);
        reader.abort();
    });
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
    h.insert(PROTOCOL_HEADER, HeaderValue::from_static(PROTOCOL));
    resp
}

/// A text/plain error, as Go's `http.Error` writes it.
fn plain(code: StatusCode, extra: &[(&'static str, &'static str)], msg: &str) -> Response {
    let mut resp = (
        code,
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        format!("{msg}\n"),
    )
        .into_response();
    for (k, v) in extra {
        resp.headers_mut().append(*k, HeaderValue::from_static(v));
    }
    resp
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Error,
    Data,
}

/// The streams' header check of the kubelet.
fn check_stream(headers: &Headers) -> Result<(Kind, u16), String> {
    let port = headers
        .get("port")
        .filter(|p| !p.is_empty())
        .ok_or("\"Port\" header is required")?;
    let port: u16 = port
        .parse()
        .map_err(|e| format!("unable to parse {port:?} as a port: {e}"))?;
    if port < 1 {
        return Err(format!("port \"{port}\" must be > 0"));
    }
    let kind = match headers.get("streamtype") {
        None | Some("") => return Err("\"Streamtype\" header is required".into()),
        Some("error") => Kind::Error,
        Some("data") => Kind::Data,
        Some(other) => return Err(format!("invalid stream type {other:?}")),
    };
    Ok((kind, port))
}

/// One stream the client opened.
struct StreamState {
    /// Bytes from the client for the pod (data streams, until FIN).
    to_pod: Option<mpsc::Sender<Vec<u8>>>,
    /// Dropped when the client resets the stream (data streams).
    reset: Option<oneshot::Sender<()>>,
}

/// The data stream of a request, waiting for its error stream.
struct DataHalf {
    id: u32,
    port: u16,
    from_client: mpsc::Receiver<Vec<u8>>,
    reset: oneshot::Receiver<()>,
}

/// A request's streams, until both are open.
struct Pair {
    serial: u64,
    error: Option<u32>,
    data: Option<DataHalf>,
}

enum Event {
    /// The pair `serial` of a request waited too long for its other stream.
    Timeout(String, u64),
    /// Forwarding of a request ended; its streams are done.
    Done(u32, u32),
}

struct Conn {
    pod: Arc<Pod>,
    frames: mpsc::Sender<Frame>,
    events: mpsc::UnboundedSender<Event>,
    streams: HashMap<u32, StreamState>,
    pairs: HashMap<String, Pair>,
    serial: u64,
    last_stream_id: u32,
    going_away: bool,
    tasks: JoinSet<()>,
}

/// One SPDY session: bytes from the client arrive on `inbound` (closed when
/// the client goes), bytes for it leave on `outbound`. Returns when the
/// client has gone or broke the protocol; forwarding tasks end with it.
pub(crate) async fn session(
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
    let mut conn = Conn {
        pod: Arc::new(pod),
        frames,
        events,
        streams: HashMap::new(),
        pairs: HashMap::new(),
        serial: 0,
        last_stream_id: 0,
        going_away: false,
        tasks: JoinSet::new(),
    };
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

impl Conn {
    async fn send(&self, f: Frame) {
        let _ = self.frames.send(f).await;
    }

    async fn on_frame(&mut self, frame: Frame) {
        match frame {
            Frame::SynStream {
                stream_id,
                flags,
                headers,
                ..
            } => self.on_syn_stream(stream_id, flags, headers).await,
            Frame::Data {
                stream_id,
                flags,
                data,
            } => {
                let Some(st) = self.streams.get_mut(&stream_id) else {
                    debug!(stream_id, "port-forward: data for an unknown stream");
                    return;
                };
                if !data.is_empty() {
                    if let Some(tx) = &st.to_pod {
                        if tx.send(data).await.is_err() {
                            st.to_pod = None;
                        }
                    }
                }
                if flags & spdy::FLAG_FIN != 0 {
                    st.to_pod = None;
                }
            }
            Frame::RstStream { stream_id, status } => {
                debug!(stream_id, status, "port-forward: client reset a stream");
                // Dropping the state drops `reset`: forwarding stops.
                self.streams.remove(&stream_id);
                for pair in self.pairs.values_mut() {
                    if pair.error == Some(stream_id) {
                        pair.error = None;
                    }
                    if pair.data.as_ref().is_some_and(|d| d.id == stream_id) {
                        pair.data = None;
                    }
                }
            }
            Frame::Ping { id } => {
                // Client pings have odd ids; even ones would answer ours.
                if id % 2 == 1 {
                    self.send(Frame::Ping { id }).await;
                }
            }
            Frame::GoAway { .. } => self.going_away = true,
            Frame::SynReply { .. }
            | Frame::Headers { .. }
            | Frame::Settings { .. }
            | Frame::WindowUpdate { .. } => {}
        }
    }

    async fn on_syn_stream(&mut self, id: u32, flags: u8, headers: Headers) {
        let rst = |status| Frame::RstStream {
            stream_id: id,
            status,
        };
        if self.going_away {
            return self.send(rst(spdy::RST_REFUSED_STREAM)).await;
        }
        if self.streams.contains_key(&id) {
            return self.send(rst(spdy::RST_STREAM_IN_USE)).await;
        }
        if id.is_multiple_of(2) || id <= self.last_stream_id {
            return self.send(rst(spdy::RST_PROTOCOL_ERROR)).await;
        }
        self.last_stream_id = id;
        let (kind, port) = match check_stream(&headers) {
            Ok(v) => v,
            Err(why) => {
                debug!(stream_id = id, "port-forward: refusing stream: {why}");
                return self.send(rst(spdy::RST_CANCEL)).await;
            }
        };
        self.send(Frame::SynReply {
            stream_id: id,
            flags: 0,
            headers: Headers::default(),
        })
        .await;
        // Clients that send no request id pair consecutive streams.
        let request = match headers.get("requestid") {
            Some(r) if !r.is_empty() => r.to_string(),
            _ => match kind {
                Kind::Error => id.to_string(),
                Kind::Data => id.saturating_sub(2).to_string(),
            },
        };
        let half_closed = flags & spdy::FLAG_FIN != 0;
        let mut state = StreamState {
            to_pod: None,
            reset: None,
        };
        let data = (kind == Kind::Data).then(|| {
            let (tx, rx) = mpsc::channel(64);
            let (reset_tx, reset_rx) = oneshot::channel();
            state.to_pod = (!half_closed).then_some(tx);
            state.reset = Some(reset_tx);
            DataHalf {
                id,
                port,
                from_client: rx,
                reset: reset_rx,
            }
        });
        self.streams.insert(id, state);

        if !self.pairs.contains_key(&request) {
            self.serial += 1;
            let serial = self.serial;
            self.pairs.insert(
                request.clone(),
                Pair {
                    serial,
                    error: None,
                    data: None,
                },
            );
            let events = self.events.clone();
            let r = request.clone();
            self.tasks.spawn(async move {
                tokio::time::sleep(STREAM_CREATION_TIMEOUT).await;
                let _ = events.send(Event::Timeout(r, serial));
            });
        }
        let pair = self.pairs.get_mut(&request).expect("pair just ensured");
        let duplicate = match data {
            None if pair.error.is_some() => Some("error stream already assigned"),
            None => {
                pair.error = Some(id);
                None
            }
            Some(_) if pair.data.is_some() => Some("data stream already assigned"),
            Some(d) => {
                pair.data = Some(d);
                None
            }
        };
        let (error_id, complete) = (pair.error, pair.error.is_some() && pair.data.is_some());
        if let Some(why) = duplicate {
            let msg = format!("error processing stream for request {request}: {why}");
            warn!(pod = %self.pod.name, "port-forward: {msg}");
            if let Some(error_id) = error_id {
                self.send(Frame::Data {
                    stream_id: error_id,
                    flags: 0,
                    data: msg.into_bytes(),
                })
                .await;
            }
            return;
        }
        if complete {
            let pair = self.pairs.remove(&request).expect("pair is there");
            let (Some(error_id), Some(data)) = (pair.error, pair.data) else {
                return;
            };
            debug!(
                pod = %self.pod.name,
                request,
                port = data.port,
                "port-forward: request has its error and data streams"
            );
            let (pod, frames, events) =
                (self.pod.clone(), self.frames.clone(), self.events.clone());
            self.tasks.spawn(async move {
                let data_id = data.id;
                forward(&pod, error_id, data, &frames).await;
                let _ = events.send(Event::Done(error_id, data_id));
            });
        }
    }

    async fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Done(error_id, data_id) => {
                self.streams.remove(&error_id);
                self.streams.remove(&data_id);
            }
            Event::Timeout(request, serial) => {
                if self.pairs.get(&request).map(|p| p.serial) != Some(serial) {
                    return;
                }
                let Some(pair) = self.pairs.remove(&request) else {
                    return;
                };
                let msg = format!("(conn=lab, request={request}) timed out waiting for streams");
                warn!(pod = %self.pod.name, "port-forward: {msg}");
                if let Some(error_id) = pair.error {
                    self.send(Frame::Data {
                        stream_id: error_id,
                        flags: 0,
                        data: msg.into_bytes(),
                    })
                    .await;
                    self.send(Frame::Data {
                        stream_id: error_id,
                        flags: spdy::FLAG_FIN,
                        data: Vec::new(),
                    })
                    .await;
                    self.streams.remove(&error_id);
                }
                if let Some(d) = pair.data {
                    self.send(Frame::RstStream {
                        stream_id: d.id,
                        status: spdy::RST_CANCEL,
                    })
                    .await;
                    self.streams.remove(&d.id);
                }
            }
        }
    }
}

/// Forwards one request: dials the pod's port and copies both ways until
/// both sides have closed, the client resets the data stream, or either
/// side fails; then closes the error stream (writing a failure on it first).
async fn forward(pod: &Pod, error_id: u32, data: DataHalf, frames: &mpsc::Sender<Frame>) {
    let DataHalf {
        id: data_id,
        port,
        mut from_client,
        mut reset,
    } = data;
    let send = |f: Frame| async move {
        let _ = frames.send(f).await;
    };
    let close_error_stream = || {
        send(Frame::Data {
            stream_id: error_id,
            flags: spdy::FLAG_FIN,
            data: Vec::new(),
        })
    };
    let fail = |e: std::io::Error| async move {
        let msg = format!(
            "error forwarding port {port} to pod {}, uid {}: {e}",
            pod.name, pod.uid
        );
        warn!(pod = %pod.name, "port-forward: {msg}");
        send(Frame::Data {
            stream_id: error_id,
            flags: 0,
            data: msg.into_bytes(),
        })
        .await;
        send(Frame::RstStream {
            stream_id: data_id,
            status: spdy::RST_CANCEL,
        })
        .await;
    };
    let stream = tokio::select! {
        s = (pod.dial)(port) => s,
        _ = &mut reset => return close_error_stream().await,
    };
    let stream = match stream {
        Ok(s) => s,
        Err(e) => {
            fail(e).await;
            return close_error_stream().await;
        }
    };
    let (mut rd, mut wr) = stream.into_split();
    let to_client = async {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = rd.read(&mut buf).await?;
            let eof = n == 0;
            send(Frame::Data {
                stream_id: data_id,
                flags: if eof { spdy::FLAG_FIN } else { 0 },
                data: buf[..n].to_vec(),
            })
            .await;
            if eof {
                return Ok::<_, std::io::Error>(());
            }
        }
    };
    let to_pod = async {
        while let Some(bytes) = from_client.recv().await {
            wr.write_all(&bytes).await?;
        }
        // The client half-closed: so does the pod's side.
        wr.shutdown().await
    };
    let copied = tokio::select! {
        r = async { tokio::try_join!(to_client, to_pod) } => Some(r),
        _ = &mut reset => None,
    };
    match copied {
        Some(Ok(_)) => debug!(pod = %pod.name, port, "port-forward: connection done"),
        Some(Err(e)) => fail(e).await,
        None => debug!(pod = %pod.name, port, "port-forward: client reset the data stream"),
    }
    close_error_stream().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spdy::{Decoder, Encoder, FLAG_FIN};
    use tokio::net::TcpListener;

    /// A client side of a session, speaking frames.
    struct Client {
        enc: Encoder,
        dec: Decoder,
        buf: Vec<u8>,
        to_server: mpsc::Sender<Vec<u8>>,
        from_server: mpsc::Receiver<Vec<u8>>,
    }

    impl Client {
        async fn send(&mut self, f: Frame) {
            self.to_server.send(self.enc.encode(&f)).await.unwrap();
        }

        async fn recv(&mut self) -> Frame {
            loop {
                if let Some(f) = self.dec.next_frame(&mut self.buf).unwrap() {
                    return f;
                }
                let chunk = tokio::time::timeout(Duration::from_secs(5), self.from_server.recv())
                    .await
                    .expect("a frame within 5s")
                    .expect("session open");
                self.buf.extend(chunk);
            }
        }

        async fn open(&mut self, id: u32, kind: &str, port: &str, request: &str) {
            self.send(Frame::SynStream {
                stream_id: id,
                associated_to: 0,
                priority: 0,
                flags: 0,
                headers: Headers::default()
                    .with("streamtype", kind)
                    .with("port", port)
                    .with("requestid", request),
            })
            .await;
        }
    }

    fn start(pod: Pod) -> Client {
        let (to_server, in_rx) = mpsc::channel(16);
        let (out_tx, from_server) = mpsc::channel(16);
        tokio::spawn(session(in_rx, out_tx, pod));
        Client {
            enc: Encoder::new(),
            dec: Decoder::new(),
            buf: Vec::new(),
            to_server,
            from_server,
        }
    }

    fn local_pod(addr: SocketAddr) -> Pod {
        Pod {
            name: "web-0".into(),
            uid: "u-1".into(),
            dial: Arc::new(move |port| {
                Box::pin(TcpStream::connect(SocketAddr::new(addr.ip(), port)))
            }),
        }
    }

    #[tokio::test]
    async fn forwards_a_connection_both_ways_with_half_close() {
        // The "pod": answers what it read, upper-cased, once the client is done.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            s.write_all(&got.to_ascii_uppercase()).await.unwrap();
        });
        let mut c = start(local_pod(addr));
        let port = addr.port().to_string();
        c.open(1, "error", &port, "0").await;
        assert_eq!(
            c.recv().await,
            Frame::SynReply {
                stream_id: 1,
                flags: 0,
                headers: Headers::default()
            }
        );
        // The client never writes on the error stream.
        c.send(Frame::Data {
            stream_id: 1,
            flags: FLAG_FIN,
            data: vec![],
        })
        .await;
        c.open(3, "data", &port, "0").await;
        assert!(matches!(
            c.recv().await,
            Frame::SynReply { stream_id: 3, .. }
        ));
        c.send(Frame::Ping { id: 1 }).await;
        c.send(Frame::Data {
            stream_id: 3,
            flags: 0,
            data: b"hello ".to_vec(),
        })
        .await;
        c.send(Frame::Data {
            stream_id: 3,
            flags: FLAG_FIN,
            data: b"pod".to_vec(),
        })
        .await;
        let mut body = Vec::new();
        let mut pinged = false;
        loop {
            match c.recv().await {
                Frame::Ping { id: 1 } => pinged = true,
                Frame::Data {
                    stream_id: 3,
                    flags,
                    data,
                } => {
                    body.extend(data);
                    if flags & FLAG_FIN != 0 {
                        break;
                    }
                }
                f => panic!("unexpected {f:?}"),
            }
        }
        assert!(pinged);
        assert_eq!(body, b"HELLO POD");
        // Then the error stream closes, empty: no error.
        assert_eq!(
            c.recv().await,
            Frame::Data {
                stream_id: 1,
                flags: FLAG_FIN,
                data: vec![]
            }
        );
    }

    #[tokio::test]
    async fn a_refused_port_is_reported_on_the_error_stream() {
        // A port nothing listens on: bind, then free it.
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let mut c = start(local_pod(addr));
        let port = addr.port().to_string();
        c.open(1, "error", &port, "7").await;
        c.recv().await;
        c.open(3, "data", &port, "7").await;
        c.recv().await;
        let Frame::Data {
            stream_id: 1,
            flags: 0,
            data,
        } = c.recv().await
        else {
            panic!("expected the error message");
        };
        let msg = String::from_utf8(data).unwrap();
        assert!(
            msg.starts_with(&format!(
                "error forwarding port {port} to pod web-0, uid u-1: "
            )),
            "{msg}"
        );
        assert_eq!(
            c.recv().await,
            Frame::RstStream {
                stream_id: 3,
                status: spdy::RST_CANCEL
            }
        );
        assert!(matches!(
            c.recv().await,
            Frame::Data {
                stream_id: 1,
                flags: FLAG_FIN,
                ..
            }
        ));
    }

    #[tokio::test]
    async fn invalid_streams_are_reset() {
        let mut c = start(local_pod("127.0.0.1:1".parse().unwrap()));
        c.open(1, "bogus", "80", "0").await;
        assert_eq!(
            c.recv().await,
            Frame::RstStream {
                stream_id: 1,
                status: spdy::RST_CANCEL
            }
        );
        c.open(3, "data", "0", "0").await;
        assert!(matches!(
            c.recv().await,
            Frame::RstStream { stream_id: 3, .. }
        ));
        c.send(Frame::SynStream {
            stream_id: 5,
            associated_to: 0,
            priority: 0,
            flags: 0,
            headers: Headers::default().with("streamtype", "data"),
        })
        .await;
        assert!(matches!(
            c.recv().await,
            Frame::RstStream { stream_id: 5, .. }
        ));
    }

    #[tokio::test]
    async fn a_client_reset_stops_forwarding_and_closes_the_error_stream() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (closed_tx, closed_rx) = oneshot::channel();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"banner").await.unwrap();
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
            let _ = closed_tx.send(());
        });
        let mut c = start(local_pod(addr));
        let port = addr.port().to_string();
        c.open(1, "error", &port, "0").await;
        c.recv().await;
        c.open(3, "data", &port, "0").await;
        c.recv().await;
        assert_eq!(
            c.recv().await,
            Frame::Data {
                stream_id: 3,
                flags: 0,
                data: b"banner".to_vec()
            }
        );
        c.send(Frame::RstStream {
            stream_id: 3,
            status: spdy::RST_CANCEL,
        })
        .await;
        assert!(matches!(
            c.recv().await,
            Frame::Data {
                stream_id: 1,
                flags: FLAG_FIN,
                ..
            }
        ));
        // The pod's connection was closed.
        tokio::time::timeout(Duration::from_secs(5), closed_rx)
            .await
            .unwrap()
            .unwrap();
    }

    #[test]
    fn stream_headers_are_checked_like_the_kubelet() {
        let h = |t: &str, p: &str| Headers::default().with("streamtype", t).with("port", p);
        assert_eq!(check_stream(&h("data", "80")), Ok((Kind::Data, 80)));
        assert_eq!(check_stream(&h("error", "6379")), Ok((Kind::Error, 6379)));
        assert!(check_stream(&h("data", "0")).is_err());
        assert!(check_stream(&h("data", "70000")).is_err());
        assert!(check_stream(&h("stdin", "80")).is_err());
        assert!(check_stream(&Headers::default().with("port", "80")).is_err());
    }
}
