//! The session's stream state machine: every frame from the client and
//! every event of a request's task changes it; it answers with frames and
//! starts [`forward`] once a request has both its streams.
use std::{collections::HashMap, sync::Arc};

use tokio::{
    sync::{mpsc, oneshot},
    task::JoinSet,
};
use tracing::{debug, warn};

use super::{
    forward::forward,
    streams::{check_stream, DataHalf, Kind, Pair, StreamState},
    Pod, STREAM_CREATION_TIMEOUT,
};
use crate::spdy::{self, Frame, Headers};

/// What a request's task tells the session.
pub(super) enum Event {
    /// The pair `serial` of a request waited too long for its other stream.
    Timeout(String, u64),
    /// Forwarding of a request ended; its streams are done.
    Done(u32, u32),
}

/// One session's state: its open streams, the requests still waiting for
/// their other stream, and the forwarding tasks (they end with it).
pub(super) struct Conn {
    pub(super) pod: Arc<Pod>,
    frames: mpsc::Sender<Frame>,
    events: mpsc::UnboundedSender<Event>,
    streams: HashMap<u32, StreamState>,
    pairs: HashMap<String, Pair>,
    serial: u64,
    pub(super) last_stream_id: u32,
    going_away: bool,
    tasks: JoinSet<()>,
}

impl Conn {
    pub(super) fn new(
        pod: Pod,
        frames: mpsc::Sender<Frame>,
        events: mpsc::UnboundedSender<Event>,
    ) -> Self {
        Self {
            pod: Arc::new(pod),
            frames,
            events,
            streams: HashMap::new(),
            pairs: HashMap::new(),
            serial: 0,
            last_stream_id: 0,
            going_away: false,
            tasks: JoinSet::new(),
        }
    }

    pub(super) async fn send(&self, f: Frame) {
        let _ = self.frames.send(f).await;
    }

    pub(super) async fn on_frame(&mut self, frame: Frame) {
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

    pub(super) async fn on_event(&mut self, ev: Event) {
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
