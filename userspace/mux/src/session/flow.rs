//! Flow control: each stream's receive window, the credit returned as its
//! application reads (so backpressure always holds), windows that grow for
//! fast readers, and the session's budget for all windows together.
use tpbpf_proto::{Frame, INITIAL_WINDOW};

use super::{streams::StreamState, Inner};
use crate::{Config, CHUNK};

/// Bytes a stream may have written and not yet framed: the session's
/// writer paces streams, so more would only cost memory.
pub(super) const SEND_BUFFER: usize = 8 * CHUNK;

impl StreamState {
    /// How much the application may write now: the peer's credit, within
    /// the send buffer.
    pub(super) fn send_room(&self) -> usize {
        (self.send_credit as usize).min(SEND_BUFFER.saturating_sub(self.send.len()))
    }

    /// Takes `len` bytes of the receive window for data that arrived.
    /// `false`, and nothing taken, when the peer sent past its credit.
    pub(super) fn take_recv_window(&mut self, len: usize) -> bool {
        if len > self.recv_window as usize {
            return false;
        }
        self.recv_window -= len as u32;
        true
    }
}

impl Inner {
    /// Whether one more stream's initial window fits the session's budget
    /// ([`Config::max_buffered`]).
    pub(super) fn window_fits(&self, config: &Config) -> bool {
        self.granted + INITIAL_WINDOW as usize <= config.max_buffered
    }

    /// The application read `n` bytes of stream `id`. Credit goes back once
    /// half the window was read; a stream that reads a lot has its window
    /// grown, within the session's budget. `true` when a credit frame was
    /// queued (the writer has something to send).
    pub(super) fn on_read(&mut self, id: u32, n: usize, config: &Config) -> bool {
        let Some(s) = self.streams.get_mut(&id) else {
            return false;
        };
        s.read_total += n as u64;
        s.unreturned += n as u32;
        if s.unreturned < s.window / 2 || s.remote_fin {
            return false;
        }
        let mut grant = s.unreturned;
        s.unreturned = 0;
        if s.read_total >= 2 * u64::from(s.window)
            && s.window < config.max_window
            && self.granted + s.window as usize <= config.max_buffered
        {
            let extra = s.window.min(config.max_window - s.window);
            s.window += extra;
            grant += extra;
            self.granted += extra as usize;
        }
        s.recv_window += grant;
        self.push_control(&Frame::Credit {
            stream: id,
            bytes: grant,
        });
        true
    }

    /// The peer read `bytes` of stream `stream`: this side may send more.
    pub(super) fn on_credit(&mut self, stream: u32, bytes: u32) {
        if let Some(s) = self.streams.get_mut(&stream) {
            s.send_credit += u64::from(bytes);
            if let Some(w) = s.write_waker.take() {
                w.wake();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tpbpf_proto::{Frame, ResetReason, INITIAL_WINDOW};

    use super::super::testing::{data, open, read, sent, server, shared, write};
    use crate::Config;

    #[test]
    fn reading_half_the_window_returns_it_as_credit() {
        let (s, config) = shared(false);
        let half = INITIAL_WINDOW as usize / 2;
        {
            let mut inner = s.lock();
            inner.on_frame(open(1, &[]), &config).unwrap();
            inner.on_data(1, data(half)).unwrap();
            assert_eq!(inner.streams[&1].recv_window, INITIAL_WINDOW - half as u32);
        }
        // A little less than half: no credit yet.
        assert_eq!(read(&s, 1, half - 1).len(), half - 1);
        assert!(sent(&mut s.lock(), &config).is_empty());
        // The byte that makes half: the whole half goes back.
        assert_eq!(read(&s, 1, half).len(), 1);
        assert_eq!(
            sent(&mut s.lock(), &config),
            vec![Frame::Credit {
                stream: 1,
                bytes: half as u32
            }]
        );
        let inner = s.lock();
        assert_eq!(inner.streams[&1].recv_window, INITIAL_WINDOW);
        assert_eq!(inner.granted, INITIAL_WINDOW as usize);
        assert_eq!(inner.bytes_received, half as u64);
    }

    #[test]
    fn a_fast_reader_s_window_grows_within_the_session_budget() {
        let config = Config {
            max_window: 2 * INITIAL_WINDOW,
            ..Config::default()
        };
        let (s, _) = shared(false);
        let mut inner = s.lock();
        inner.on_frame(open(1, &[]), &config).unwrap();
        let half = INITIAL_WINDOW as usize / 2;
        let mut grants = Vec::new();
        for _ in 0..6 {
            inner.on_data(1, data(half)).unwrap();
            // What the application reads, as `poll_read` accounts it.
            let st = inner.streams.get_mut(&1).unwrap();
            st.recv.clear();
            st.recv_len = 0;
            if inner.on_read(1, half, &config) {
                match &sent(&mut inner, &config)[..] {
                    [Frame::Credit { stream: 1, bytes }] => grants.push(*bytes),
                    other => panic!("{other:?}"),
                }
            }
        }
        let h = half as u32;
        // After two windows read, one more window on top of the credit;
        // then credit at half the grown window; never past max_window.
        assert_eq!(grants, vec![h, h, h, h + INITIAL_WINDOW, INITIAL_WINDOW]);
        assert_eq!(inner.streams[&1].window, 2 * INITIAL_WINDOW);
        assert_eq!(inner.granted, 2 * INITIAL_WINDOW as usize);

        // With the budget spent, the window stays.
        let tight = Config {
            max_window: 4 * INITIAL_WINDOW,
            max_buffered: 2 * INITIAL_WINDOW as usize,
            ..Config::default()
        };
        for _ in 0..8 {
            inner.on_data(1, data(INITIAL_WINDOW as usize)).unwrap();
            let st = inner.streams.get_mut(&1).unwrap();
            st.recv.clear();
            st.recv_len = 0;
            inner.on_read(1, INITIAL_WINDOW as usize, &tight);
        }
        assert_eq!(inner.streams[&1].window, 2 * INITIAL_WINDOW);
        assert_eq!(inner.granted, 2 * INITIAL_WINDOW as usize);
    }

    #[test]
    fn data_past_the_credit_resets_the_stream_as_a_protocol_error() {
        let (mut inner, config) = server();
        inner.on_frame(open(1, &[]), &config).unwrap();
        inner.on_data(1, data(INITIAL_WINDOW as usize)).unwrap();
        // One byte more than the credit: the stream fails, the session not.
        assert_eq!(inner.on_data(1, data(1)), Ok(true));
        let s = &inner.streams[&1];
        assert_eq!(
            s.reset.as_ref().map(|r| r.0),
            Some(ResetReason::ProtocolError)
        );
        assert_eq!(s.recv_len, INITIAL_WINDOW as usize, "the excess was kept");
        match &sent(&mut inner, &config)[..] {
            [Frame::Reset {
                stream: 1,
                reason: ResetReason::ProtocolError,
                message,
            }] => assert!(message.contains("with 0 bytes of credit"), "{message}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_writer_waits_for_credit_and_goes_on_when_it_comes() {
        let (s, config) = shared(true);
        let stream = {
            let session = super::super::Session::from_shared(s.clone());
            session.open(super::super::testing::dst()).unwrap()
        };
        let id = stream.id();
        let all = vec![1u8; INITIAL_WINDOW as usize + 10];
        assert_eq!(write(&s, id, &all), Some(INITIAL_WINDOW as usize));
        assert_eq!(write(&s, id, &all), None, "wrote past the peer's credit");
        s.lock()
            .on_frame(
                Frame::Credit {
                    stream: id,
                    bytes: 10,
                },
                &config,
            )
            .unwrap();
        assert_eq!(write(&s, id, &all), Some(10));
        assert_eq!(s.lock().bytes_sent, INITIAL_WINDOW as u64 + 10);
        drop(stream);
    }
}
