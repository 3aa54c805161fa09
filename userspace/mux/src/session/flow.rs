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
