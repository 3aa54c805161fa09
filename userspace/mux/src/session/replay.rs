//! Resume: the reliable bytes sent and not yet acknowledged, kept for a
//! replay on the next transport; acknowledgements both ways; the batch
//! buffers the replay buffer gives back for reuse.
use bytes::Bytes;
use tpbpf_proto::Frame;

use super::{schedule::BATCH, Inner};
use crate::CHUNK;

/// A receiver acknowledges after this many reliable bytes.
pub(crate) const ACK_EVERY: u64 = 256 * 1024;

impl Inner {
    /// A new transport carries the session: the peer has `peer_received`
    /// of our reliable bytes. What it lacks is returned, to be sent again
    /// first; an error when the peer claims bytes never sent.
    pub(crate) fn resume_from(&mut self, peer_received: u64) -> Result<Vec<Bytes>, String> {
        if peer_received < self.acked_seq || peer_received > self.sent_seq {
            return Err(format!(
                "the peer resumed from byte {peer_received}, outside what was sent ({}..{})",
                self.acked_seq, self.sent_seq
            ));
        }
        self.drop_acked(peer_received);
        // Pings, pongs and acks queued for the last transport are stale.
        self.unreliable.clear();
        self.ping_started = None;
        // The handshake told the peer what we received.
        self.ack_sent = self.recv_seq;
        self.connected = true;
        self.replayed += self.replay_len as u64;
        Ok(self.replay_chunks())
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

    /// A buffer for the next batch: one given back, or a new one.
    pub(super) fn batch_buffer(&mut self) -> Vec<u8> {
        self.pool
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(BATCH + CHUNK + 1024))
    }

    /// Counts a batch of reliable bytes as sent and keeps it for replay.
    pub(super) fn record_sent(&mut self, mut out: Vec<u8>) -> Bytes {
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

#[cfg(test)]
mod tests {
    use tpbpf_proto::Frame;

    use super::{super::testing::server, ACK_EVERY};

    /// A server that sent three batches of 10, 20 and 30 bytes.
    fn sent_three() -> super::Inner {
        let (mut inner, _) = server();
        for n in [10, 20, 30] {
            inner.record_sent(vec![n as u8; n]);
        }
        inner
    }

    fn replayed(inner: &super::Inner) -> Vec<u8> {
        inner
            .replay_chunks()
            .iter()
            .flat_map(|c| c.to_vec())
            .collect()
    }

    #[test]
    fn an_ack_trims_the_replay_buffer_to_what_the_peer_lacks() {
        let mut inner = sent_three();
        assert_eq!((inner.sent_seq, inner.replay_len), (60, 60));
        // Into the second batch: the first goes, the second is skipped into.
        inner.on_ack(15).unwrap();
        assert_eq!(inner.replay.len(), 2);
        assert_eq!((inner.replay_skip, inner.replay_len), (5, 45));
        let rest = replayed(&inner);
        assert_eq!(rest.len(), 45);
        assert_eq!(&rest[..15], &[20; 15]);
        assert_eq!(&rest[15..], &[30; 30]);
        // To the end of a batch exactly.
        inner.on_ack(30).unwrap();
        assert_eq!((inner.replay.len(), inner.replay_skip), (1, 0));
        assert_eq!(replayed(&inner), vec![30; 30]);
        // Everything.
        inner.on_ack(60).unwrap();
        assert!(inner.replay.is_empty());
        assert_eq!((inner.replay_len, inner.acked_seq), (0, 60));
    }

    #[test]
    fn an_old_ack_changes_nothing_and_one_past_what_was_sent_is_an_error() {
        let mut inner = sent_three();
        inner.on_ack(30).unwrap();
        // Across a resume, an older acknowledgement can arrive late.
        inner.on_ack(12).unwrap();
        assert_eq!((inner.acked_seq, inner.replay_len), (30, 30));
        let e = inner.on_ack(61).unwrap_err();
        assert!(e.contains("beyond what was sent (60)"), "{e}");
        assert_eq!(inner.replay_len, 30);
    }

    #[test]
    fn resuming_replays_from_what_the_peer_received() {
        let mut inner = sent_three();
        inner.on_ack(10).unwrap();
        inner.recv_seq = 500;
        inner.unreliable.push(Frame::Ping { nonce: 1 });
        inner.connected = false;
        // The peer got 25 bytes before the transport died.
        let replay = inner.resume_from(25).unwrap();
        let bytes: Vec<u8> = replay.iter().flat_map(|c| c.to_vec()).collect();
        assert_eq!(bytes.len(), 35);
        assert_eq!(&bytes[..5], &[20; 5]);
        assert_eq!(inner.replayed, 35);
        assert!(inner.unreliable.is_empty(), "a stale ping survived");
        assert!(inner.connected);
        assert_eq!(inner.ack_sent, 500);
        // Before what was acknowledged, or past what was sent: refused.
        assert!(inner.resume_from(24).is_err());
        assert!(inner.resume_from(61).is_err());
    }

    #[test]
    fn acks_go_every_ack_every_bytes_or_when_forced() {
        let (mut inner, _) = server();
        assert!(!inner.maybe_ack(true), "an ack for nothing");
        inner.recv_seq = ACK_EVERY - 1;
        assert!(!inner.maybe_ack(false));
        inner.recv_seq = ACK_EVERY;
        assert!(inner.maybe_ack(false));
        assert_eq!(
            inner.unreliable,
            vec![Frame::Ack {
                received: ACK_EVERY
            }]
        );
        inner.recv_seq += 1;
        assert!(!inner.maybe_ack(false));
        assert!(inner.maybe_ack(true));
        assert_eq!(inner.ack_sent, ACK_EVERY + 1);
    }
}
