//! Frames from the peer, one at a time: each changes the session's state
//! and may give the writer something to send. An error is a protocol
//! violation that ends the session; a stream's own trouble resets only it.
use bytes::Bytes;
use tpbpf_proto::{Destination, Frame, ResetReason, INITIAL_WINDOW};

use super::{requests::Request, schedule::MAX_CONTROL, streams::StreamState, Inner};
use crate::Config;

impl Inner {
    /// Handles one frame from the peer. `Ok(true)`: wake the writer.
    pub(crate) fn on_frame(&mut self, frame: Frame, config: &Config) -> Result<bool, String> {
        let mut wake_writer = false;
        match frame {
            Frame::Open { stream, dst, data } => {
                wake_writer |= self.on_open(stream, dst, data, config)?;
            }
            Frame::Data { stream, data } => {
                wake_writer |= self.on_data(stream, Bytes::from(data))?;
            }
            Frame::Credit { stream, bytes } => self.on_credit(stream, bytes),
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
                    s.fail(reason, message);
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
            Frame::Datagram { flow, dst, data } => self.on_datagram(flow, dst, data),
            Frame::DnsQuery { id, query } => {
                self.push_request(Request::Dns { id, query });
            }
            Frame::DnsAnswer { id, answer } => self.on_dns_answer(id, answer),
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
            } => self.on_intercept_status(intercept, ok, message),
            Frame::InterceptChallenge {
                intercept,
                port,
                nonce,
            } => self.on_intercept_challenge(intercept, port, nonce),
            // The agent's announcement of a connection's source; the
            // stream's open carries what is needed.
            Frame::InterceptIncoming { .. } => {}
        }
        Ok(wake_writer)
    }

    /// The peer opens a stream: accepted (for [`super::Session::accept`])
    /// or refused with a reset when over the session's limits.
    fn on_open(
        &mut self,
        stream: u32,
        dst: Destination,
        data: Vec<u8>,
        config: &Config,
    ) -> Result<bool, String> {
        if stream % 2 != self.peer_parity || stream <= self.max_peer_id {
            return Err(format!("the peer opened stream {stream}, an id it may not use (ids must grow, odd from the client, even from the server)"));
        }
        self.max_peer_id = stream;
        let refuse = if self.streams.len() >= config.max_streams {
            Some(format!(
                "too many streams on this tunnel session (limit {})",
                config.max_streams
            ))
        } else if !self.window_fits(config) {
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
        if data.is_empty() {
            return Ok(false);
        }
        self.on_data(stream, Bytes::from(data))
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
        if !s.take_recv_window(data.len()) {
            let message = format!(
                "the peer sent {} bytes on stream {stream} with {} bytes of credit",
                data.len(),
                s.recv_window
            );
            self.reset_local(stream, ResetReason::ProtocolError, &message);
            return Ok(true);
        }
        s.recv_len += data.len();
        s.recv.push_back(data);
        if let Some(w) = s.read_waker.take() {
            w.wake();
        }
        Ok(false)
    }
}
