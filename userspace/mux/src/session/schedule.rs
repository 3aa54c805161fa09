//! The writer's scheduler: what goes out next. Unreliable frames and the
//! control queue first, then streams with data in turn, at most [`CHUNK`]
//! bytes a turn, so a bulk transfer does not starve an interactive stream.
use tpbpf_proto::{encode, encode_data_parts, Frame};

use super::{flow::SEND_BUFFER, Inner};
use crate::{Config, CHUNK};

/// What one write to the transport carries at most.
pub(super) const BATCH: usize = 256 * 1024;
/// Bytes of control frames queued before datagrams are dropped.
pub(super) const MAX_CONTROL: usize = 1024 * 1024;

impl Inner {
    /// Puts stream `id` in the queue of streams to send, if it has
    /// something to send and is not there already.
    pub(super) fn queue(&mut self, id: u32) {
        if let Some(s) = self.streams.get_mut(&id) {
            if !s.queued && s.has_output() {
                s.queued = true;
                self.ready.push_back(id);
            }
        }
    }

    pub(super) fn push_control(&mut self, frame: &Frame) {
        // Control frames are small: they always fit.
        let _ = encode(frame, &mut self.control);
    }

    /// Queues a datagram-like frame unless the control queue is full.
    pub(super) fn push_lossy(&mut self, frame: &Frame) -> bool {
        if self.control.len() >= MAX_CONTROL {
            return false;
        }
        self.push_control(frame);
        true
    }

    /// Takes what should go out next: unreliable frames, and a batch of
    /// reliable bytes (control first, then streams' data in turn), which is
    /// also kept for replay. `None` when there is nothing to send.
    pub(crate) fn take_output(&mut self, config: &Config) -> Option<(Vec<u8>, bytes::Bytes)> {
        let mut unreliable = Vec::new();
        for f in self.unreliable.drain(..) {
            let _ = encode(&f, &mut unreliable);
        }
        let mut out = self.batch_buffer();
        out.extend_from_slice(&self.control);
        self.control.clear();
        // A full replay buffer stops new data until the peer acknowledges.
        while out.len() < BATCH && self.replay_len + out.len() < config.resume_bytes {
            let Some(id) = self.ready.pop_front() else {
                break;
            };
            self.take_turn(id, &mut out);
        }
        if out.is_empty() && unreliable.is_empty() {
            self.pool.push(out);
            return None;
        }
        Some((unreliable, self.record_sent(out)))
    }

    /// One turn of stream `id`: its open, up to [`CHUNK`] bytes of its
    /// data, its half-close once the data is out; back in the queue if it
    /// has more.
    fn take_turn(&mut self, id: u32, out: &mut Vec<u8>) {
        let Some(s) = self.streams.get_mut(&id) else {
            return;
        };
        s.queued = false;
        if s.reset.is_some() {
            return;
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
                out,
            );
        } else if n > 0 {
            let (a, b) = s.send.as_slices();
            let a = &a[..n.min(a.len())];
            let b = &b[..n - a.len()];
            encode_data_parts(id, a, b, out);
            s.send.drain(..n);
            if s.send.len() < SEND_BUFFER / 2 {
                if let Some(w) = s.write_waker.take() {
                    w.wake();
                }
            }
        }
        if s.send.is_empty() && s.local_fin && !s.fin_sent {
            s.fin_sent = true;
            let _ = encode(&Frame::HalfClose { stream: id }, out);
        }
        if s.has_output() {
            s.queued = true;
            self.ready.push_back(id);
        } else {
            self.remove_if_finished(id);
        }
    }
}
