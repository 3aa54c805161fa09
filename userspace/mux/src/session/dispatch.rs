//! Frames from the peer, one at a time: each changes the session's state
//! and may give the writer something to send. An error is a protocol
//! violation that ends the session; a stream's own trouble resets only it.
use bytes::Bytes;
use tpbpf_proto::{Destination, Frame, ResetReason, INITIAL_WINDOW};

use super::{
    requests::Request,
    schedule::{MAX_CONTROL, MAX_LOSSY},
    streams::StreamState,
    Inner,
};
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
            Frame::InterceptProof { intercept, proof } => {
                // A proof nobody asked for (or asked twice) is dropped.
                if let Some(tx) = self.proofs.remove(&intercept) {
                    let _ = tx.send(proof);
                }
            }
            Frame::InterceptIncoming {
                intercept,
                stream,
                src,
                dst,
            } => {
                wake_writer |= self.on_intercept_incoming(intercept, stream, src, dst, config)?;
            }
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
        if let Some(message) = self.check_open(stream, config)? {
            return self.refuse_open(stream, message);
        }
        self.admit_open(stream, dst);
        self.incoming.push_back(stream);
        if let Some(w) = self.accept_waker.take() {
            w.wake();
        }
        if data.is_empty() {
            return Ok(false);
        }
        self.on_data(stream, Bytes::from(data))
    }

    /// Checks a stream the peer opens (with an open or an intercepted
    /// connection): an id it may not use ends the session (`Err`); past the
    /// session's limits it is to be refused (`Ok(Some(why))`).
    pub(super) fn check_open(
        &mut self,
        stream: u32,
        config: &Config,
    ) -> Result<Option<String>, String> {
        if stream % 2 != self.peer_parity || stream <= self.max_peer_id {
            return Err(format!("the peer opened stream {stream}, an id it may not use (ids must grow, odd from the client, even from the server)"));
        }
        self.max_peer_id = stream;
        Ok(if self.streams.len() >= config.max_streams {
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
        })
    }

    /// Refuses a stream the peer opened, with a reset that says why.
    pub(super) fn refuse_open(&mut self, stream: u32, message: String) -> Result<bool, String> {
        // Refusals pile up only while the peer does not read:
        // past the bound (beyond what datagrams may fill), the session
        // ends instead of growing.
        if self.control.len() >= MAX_LOSSY + MAX_CONTROL {
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
        Ok(true)
    }

    /// Takes a stream the peer opened (checked): its state and its window.
    pub(super) fn admit_open(&mut self, stream: u32, dst: Destination) {
        self.granted += INITIAL_WINDOW as usize;
        self.streams
            .insert(stream, StreamState::new(Some(dst), None));
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

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tpbpf_proto::{Frame, ResetReason, INITIAL_WINDOW};

    use super::super::{
        schedule::{MAX_CONTROL, MAX_LOSSY},
        testing::{data, dst, open, read, sent, server, shared},
    };
    use crate::Config;

    const W: usize = INITIAL_WINDOW as usize;

    #[test]
    fn an_open_and_its_data_are_accepted_within_the_stream_s_window() {
        let (mut inner, config) = server();
        assert_eq!(inner.on_frame(open(1, b"hello"), &config), Ok(false));
        assert_eq!(inner.incoming, [1]);
        assert_eq!(inner.streams_dst(1), Some(dst()));
        assert_eq!(inner.granted, W);
        let data_frame = Frame::Data {
            stream: 1,
            data: vec![7; 100],
        };
        assert_eq!(inner.on_frame(data_frame, &config), Ok(false));
        let s = &inner.streams[&1];
        assert_eq!(s.recv_len, 105);
        assert_eq!(s.recv_window as usize, W - 105);
        // Nothing to answer until the application reads.
        assert!(sent(&mut inner, &config).is_empty());
    }

    #[test]
    fn stream_ids_that_do_not_grow_or_are_the_wrong_parity_end_the_session() {
        let (mut inner, config) = server();
        let e = inner.on_frame(open(2, b""), &config).unwrap_err();
        assert!(e.contains("opened stream 2, an id it may not use"), "{e}");
        inner.on_frame(open(5, b""), &config).unwrap();
        let e = inner.on_frame(open(3, b""), &config).unwrap_err();
        assert!(e.contains("opened stream 3"), "{e}");
        let e = inner.on_frame(open(5, b""), &config).unwrap_err();
        assert!(e.contains("opened stream 5"), "{e}");
    }

    #[test]
    fn data_for_an_unknown_stream_ends_the_session_only_if_it_was_never_opened() {
        let (mut inner, config) = server();
        let e = inner.on_data(1, data(3)).unwrap_err();
        assert!(e.contains("data on stream 1 it never opened"), "{e}");
        // A stream that ended here: its late data is dropped.
        inner.on_frame(open(3, b""), &config).unwrap();
        inner
            .on_frame(
                Frame::Reset {
                    stream: 3,
                    reason: ResetReason::Aborted,
                    message: "bye".into(),
                },
                &config,
            )
            .unwrap();
        inner.streams.get_mut(&3).unwrap().dropped = true;
        inner.remove_if_finished(3);
        assert!(inner.streams.is_empty());
        assert_eq!(inner.on_data(3, data(3)), Ok(false));
        // Below the highest id the peer used, or one of ours: the same.
        assert_eq!(inner.on_data(1, data(3)), Ok(false));
        assert_eq!(inner.on_data(2, data(3)), Ok(false));
        assert_eq!(inner.granted, 0, "the ended stream's window is still held");
    }

    #[test]
    fn a_reset_from_the_peer_fails_reads_and_writes_with_its_reason() {
        let (s, config) = shared(false);
        s.lock().on_frame(open(1, b"x"), &config).unwrap();
        let reset = Frame::Reset {
            stream: 1,
            reason: ResetReason::Refused,
            message: "connection refused by 10.0.0.1:80".into(),
        };
        s.lock().on_frame(reset, &config).unwrap();
        // What arrived before the reset is still read; then the reset.
        assert_eq!(read(&s, 1, 8), b"x");
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let mut storage = [0u8; 8];
        let mut buf = tokio::io::ReadBuf::new(&mut storage);
        match s.poll_read(1, &mut cx, &mut buf) {
            std::task::Poll::Ready(Err(e)) => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
                assert!(e.to_string().contains("10.0.0.1:80"), "{e}");
            }
            other => panic!("{other:?}"),
        }
        match s.poll_write(1, &mut cx, b"y") {
            std::task::Poll::Ready(Err(e)) => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused)
            }
            other => panic!("{other:?}"),
        }
        // The application lets go: the stream and its window are forgotten,
        // and nothing is sent back for a reset the peer sent.
        s.dropped(1);
        let mut inner = s.lock();
        assert!(inner.streams.is_empty());
        assert_eq!(inner.granted, 0);
        assert!(sent(&mut inner, &config).is_empty());
    }

    #[test]
    fn data_for_a_stream_its_application_dropped_is_answered_with_a_reset() {
        let (s, config) = shared(false);
        s.lock().on_frame(open(1, b""), &config).unwrap();
        s.dropped(1);
        let mut inner = s.lock();
        assert_eq!(
            sent(&mut inner, &config),
            vec![Frame::HalfClose { stream: 1 }]
        );
        assert_eq!(inner.on_data(1, data(10)), Ok(true));
        match &sent(&mut inner, &config)[..] {
            [Frame::Reset {
                stream: 1,
                reason: ResetReason::Aborted,
                ..
            }] => {}
            other => panic!("{other:?}"),
        }
        assert!(inner.streams.is_empty());
        assert_eq!(inner.granted, 0);
    }

    #[test]
    fn a_half_close_ends_the_reader_after_its_data_and_finishes_the_stream() {
        let (s, config) = shared(false);
        s.lock().on_frame(open(1, b"last"), &config).unwrap();
        s.lock()
            .on_frame(Frame::HalfClose { stream: 1 }, &config)
            .unwrap();
        assert_eq!(read(&s, 1, 16), b"last");
        assert_eq!(read(&s, 1, 16), b"", "no end of stream after the data");
        s.shutdown(1).unwrap();
        s.dropped(1);
        let mut inner = s.lock();
        assert_eq!(
            sent(&mut inner, &config),
            vec![Frame::HalfClose { stream: 1 }]
        );
        assert!(
            inner.streams.is_empty(),
            "a stream closed both ways was kept"
        );
        assert_eq!(inner.granted, 0);
    }

    #[test]
    fn opens_past_the_stream_limit_or_the_buffer_budget_are_refused() {
        let config = Config {
            max_streams: 2,
            max_buffered: 3 * W,
            ..Config::default()
        };
        let (mut inner, _) = server();
        inner.on_frame(open(1, b""), &config).unwrap();
        inner.on_frame(open(3, b""), &config).unwrap();
        assert_eq!(inner.on_frame(open(5, b"lost"), &config), Ok(true));
        assert!(!inner.streams.contains_key(&5));
        assert_eq!(inner.incoming, [1, 3]);
        let refusal = |frames: Vec<Frame>| match &frames[..] {
            [Frame::Reset {
                reason: ResetReason::Refused,
                message,
                ..
            }] => message.clone(),
            other => panic!("{other:?}"),
        };
        let m = refusal(sent(&mut inner, &config));
        assert!(
            m.contains("too many streams on this tunnel session (limit 2)"),
            "{m}"
        );

        // Room for streams, not for their windows.
        let budget = Config {
            max_streams: 100,
            max_buffered: 2 * W,
            ..config
        };
        assert_eq!(inner.on_frame(open(7, b""), &budget), Ok(true));
        let m = refusal(sent(&mut inner, &budget));
        assert!(m.contains("receive buffers are full"), "{m}");
        assert_eq!(inner.granted, 2 * W);
    }

    #[test]
    fn refusals_the_peer_does_not_read_end_the_session_at_the_control_bound() {
        let config = Config {
            max_streams: 0,
            ..Config::default()
        };
        let (mut inner, _) = server();
        let mut id = 1;
        let e = loop {
            match inner.on_frame(open(id, b""), &config) {
                Ok(wake) => assert!(wake),
                Err(e) => break e,
            }
            id += 2;
            assert!(id < 1_000_000, "refusals grew without bound");
        };
        assert!(e.contains("does not read the refusals"), "{e}");
        assert!(inner.control.len() >= MAX_LOSSY + MAX_CONTROL);
        assert!(inner.control.len() < MAX_LOSSY + MAX_CONTROL + 256);
        assert!(inner.streams.is_empty());
    }

    #[test]
    fn a_datagram_flood_to_its_bound_does_not_make_a_refusal_end_the_session() {
        let config = Config {
            max_streams: 0,
            ..Config::default()
        };
        let (mut inner, _) = server();
        let big = Frame::DnsAnswer {
            id: 1,
            answer: vec![0; 60_000],
        };
        while inner.push_lossy(&big) {}
        assert!(inner.control.len() >= MAX_LOSSY);
        assert_eq!(inner.on_frame(open(1, b""), &config), Ok(true));
        assert!(inner.ended.is_none());
    }

    #[test]
    fn pings_coalesce_to_one_pong_for_the_latest() {
        let (mut inner, config) = server();
        for nonce in 0..1000 {
            assert_eq!(inner.on_frame(Frame::Ping { nonce }, &config), Ok(true));
        }
        assert_eq!(inner.unreliable, vec![Frame::Pong { nonce: 999 }]);
        // Pongs are not reliable bytes: nothing is kept for replay.
        assert_eq!(sent(&mut inner, &config), vec![Frame::Pong { nonce: 999 }]);
        assert_eq!(inner.sent_seq, 0);
    }

    #[test]
    fn only_the_pong_for_the_ping_in_flight_measures_the_rtt() {
        let (mut inner, config) = server();
        inner.ping_started = Some((7, Instant::now()));
        inner.on_frame(Frame::Pong { nonce: 6 }, &config).unwrap();
        assert!(inner.rtt.is_none());
        inner.on_frame(Frame::Pong { nonce: 7 }, &config).unwrap();
        assert!(inner.rtt.is_some());
        assert!(inner.ping_started.is_none());
    }

    #[test]
    fn a_go_away_refuses_new_local_streams() {
        let (s, config) = shared(true);
        s.lock()
            .on_frame(
                Frame::GoAway {
                    message: "draining".into(),
                },
                &config,
            )
            .unwrap();
        let e = super::super::Session::from_shared(s.clone())
            .open(dst())
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
        assert!(e.to_string().contains("draining"), "{e}");
    }
}
