//! The writer's scheduler: what goes out next. Unreliable frames and the
//! control queue first, then streams with data in turn, at most [`CHUNK`]
//! bytes a turn, so a bulk transfer does not starve an interactive stream.
use tpbpf_proto::{encode, encode_data_parts, Frame};

use super::{flow::SEND_BUFFER, Inner};
use crate::{Config, CHUNK};

/// What one write to the transport carries at most.
pub(super) const BATCH: usize = 256 * 1024;
/// Bytes of control frames queued before the peer's refused opens end
/// the session.
pub(super) const MAX_CONTROL: usize = 1024 * 1024;
/// Bytes of control frames queued before datagrams (and DNS messages) are
/// dropped, as a full socket buffer drops them: 4 MiB, 170 ms at 200
/// Mbit/s, so a burst rides out the transport's TCP growing its window
/// (slow start from idle takes about 6 round trips to reach 1 MB in flight:
/// with 1 MiB, iperf3 -u at 200 Mbit/s over a 20 ms link lost 2.3 to 2.5%).
pub(super) const MAX_LOSSY: usize = 4 * 1024 * 1024;

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
        if self.control.len() >= MAX_LOSSY {
            self.datagrams_dropped += 1;
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

#[cfg(test)]
mod tests {
    use tpbpf_proto::{Frame, ResetReason};

    use super::super::testing::{dst, sent, server, shared, shared_with, write};
    use super::{BATCH, MAX_LOSSY};
    use crate::{Config, CHUNK};

    fn data_turns(frames: &[Frame]) -> Vec<(u32, usize)> {
        frames
            .iter()
            .filter_map(|f| match f {
                Frame::Data { stream, data } => Some((*stream, data.len())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn control_frames_go_first_then_streams_take_turns_of_a_chunk() {
        let (s, config) = shared(true);
        let session = super::super::Session::from_shared(s.clone());
        let a = session.open(dst()).unwrap();
        let b = session.open(dst()).unwrap();
        // Both opens leave at once, empty.
        let opens = sent(&mut s.lock(), &config);
        assert!(
            matches!(&opens[..], [Frame::Open { stream: 1, data: d1, .. }, Frame::Open { stream: 3, data: d3, .. }] if d1.is_empty() && d3.is_empty()),
            "{opens:?}"
        );
        assert_eq!(write(&s, a.id(), &vec![1; 3 * CHUNK]), Some(3 * CHUNK));
        assert_eq!(write(&s, b.id(), &vec![2; CHUNK + 1]), Some(CHUNK + 1));
        b.reset(ResetReason::Aborted, "gone");
        // b's reset is control: it goes first, and b's data never goes.
        let frames = sent(&mut s.lock(), &config);
        assert!(
            matches!(frames[0], Frame::Reset { stream: 3, .. }),
            "{frames:?}"
        );
        assert_eq!(data_turns(&frames), vec![(1, CHUNK); 3]);

        // Two streams with data alternate, a chunk each.
        let c = session.open(dst()).unwrap();
        let d = session.open(dst()).unwrap();
        sent(&mut s.lock(), &config);
        assert_eq!(write(&s, c.id(), &vec![3; 2 * CHUNK]), Some(2 * CHUNK));
        assert_eq!(
            write(&s, d.id(), &vec![4; 2 * CHUNK + 1]),
            Some(2 * CHUNK + 1)
        );
        assert_eq!(
            data_turns(&sent(&mut s.lock(), &config)),
            vec![(5, CHUNK), (7, CHUNK), (5, CHUNK), (7, CHUNK), (7, 1)]
        );
    }

    #[test]
    fn first_bytes_ride_in_the_open_and_the_half_close_follows_the_data() {
        let (s, config) = shared(true);
        let session = super::super::Session::from_shared(s.clone());
        let a = session.open_with(dst(), b"hello").unwrap();
        s.shutdown(a.id()).unwrap();
        assert_eq!(
            sent(&mut s.lock(), &config),
            vec![
                Frame::Open {
                    stream: 1,
                    dst: dst(),
                    data: b"hello".to_vec()
                },
                Frame::HalfClose { stream: 1 }
            ]
        );
        assert!(s.lock().take_output(&config).is_none(), "sent twice");
    }

    #[test]
    fn a_full_replay_buffer_holds_stream_data_but_not_control() {
        let config = Config {
            resume_bytes: 2 * CHUNK,
            ..Config::default()
        };
        let s = shared_with(true, config.clone());
        let session = super::super::Session::from_shared(s.clone());
        let a = session.open(dst()).unwrap();
        assert_eq!(write(&s, a.id(), &vec![0; 4 * CHUNK]), Some(4 * CHUNK));
        let mut inner = s.lock();
        // The open (with a chunk) and one more chunk fill the replay buffer.
        let first = sent(&mut inner, &config);
        assert!(matches!(first[0], Frame::Open { stream: 1, ref data, .. } if data.len() == CHUNK));
        assert_eq!(data_turns(&first), vec![(1, CHUNK)]);
        assert!(inner.replay_len >= 2 * CHUNK, "{}", inner.replay_len);
        // Nothing more of the stream while nothing is acknowledged; control
        // still goes.
        inner.push_control(&Frame::GoAway {
            message: "bye".into(),
        });
        assert_eq!(
            sent(&mut inner, &config),
            vec![Frame::GoAway {
                message: "bye".into()
            }]
        );
        // The rest, once the peer has it all.
        let all = inner.sent_seq;
        inner.on_ack(all).unwrap();
        assert_eq!(data_turns(&sent(&mut inner, &config)), vec![(1, CHUNK); 2]);
    }

    #[test]
    fn lossy_frames_are_dropped_past_the_control_bound() {
        let (mut inner, config) = server();
        let big = Frame::DnsAnswer {
            id: 1,
            answer: vec![0; 60_000],
        };
        while inner.push_lossy(&big) {}
        assert_eq!(inner.datagrams_dropped, 1, "the refused one is counted");
        assert!(inner.control.len() >= MAX_LOSSY);
        assert!(
            inner.control.len() < MAX_LOSSY + 60_100,
            "{}",
            inner.control.len()
        );
        // Control goes out whole, in one batch, past the batch size.
        let (_, reliable) = inner.take_output(&config).unwrap();
        assert!(reliable.len() > BATCH);
        assert!(inner.control.is_empty());
        assert!(inner.push_lossy(&big), "the bound outlived its bytes");
    }
}
