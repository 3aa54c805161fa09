//! Datagram flows: [`Flow`]s this side opens (answers queue per flow,
//! bounded like a socket buffer), datagrams the peer sends for the serving
//! side, and the lossy sends both use.
use std::{collections::VecDeque, io, sync::Arc, task::Poll, task::Waker};

use tpbpf_proto::{Destination, Frame};

use super::{requests::Request, state::reset_error, Inner, Session, Shared};

/// Datagrams waiting on one flow for its reader, at most.
pub(super) const MAX_FLOW_QUEUE: usize = 256;

#[derive(Default)]
pub(crate) struct FlowState {
    pub(super) queue: VecDeque<Vec<u8>>,
    pub(super) waker: Option<Waker>,
    pub(super) dropped: u64,
}

impl Inner {
    /// A datagram from the peer: an answer on a flow this side opened, or a
    /// request for the serving side on one the peer opened.
    pub(super) fn on_datagram(&mut self, flow: u32, dst: Destination, data: Vec<u8>) {
        if let Some(f) = self.flows.get_mut(&flow) {
            if f.queue.len() >= MAX_FLOW_QUEUE {
                f.queue.pop_front();
                f.dropped += 1;
                self.datagrams_dropped += 1;
            }
            f.queue.push_back(data);
            if let Some(w) = f.waker.take() {
                w.wake();
            }
        } else if flow % 2 == self.peer_parity {
            self.push_request(Request::Datagram { flow, dst, data });
        }
    }
}

impl Session {
    /// Queues `frame` unless the control queue is full (then it is dropped,
    /// as a datagram may be); an error only once the session is over.
    pub(super) fn send_lossy(&self, frame: &Frame) -> io::Result<()> {
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

#[cfg(test)]
mod tests {
    use tpbpf_proto::{Destination, Frame};

    use super::{super::testing::shared, MAX_FLOW_QUEUE};
    use crate::{Request, Session};

    fn datagram(flow: u32, data: Vec<u8>) -> Frame {
        Frame::Datagram {
            flow,
            dst: Destination::Addr("10.96.0.10:53".parse().unwrap()),
            data,
        }
    }

    #[test]
    fn answers_on_an_unread_flow_keep_the_newest_and_count_the_dropped() {
        let (s, config) = shared(true);
        let flow = Session::from_shared(s.clone())
            .flow(Destination::Addr("10.96.0.10:53".parse().unwrap()))
            .unwrap();
        let mut inner = s.lock();
        for i in 0..MAX_FLOW_QUEUE + 3 {
            let wake = inner
                .on_frame(
                    datagram(flow.id, (i as u32).to_be_bytes().to_vec()),
                    &config,
                )
                .unwrap();
            assert!(!wake);
        }
        let f = &inner.flows[&flow.id];
        assert_eq!((f.queue.len(), f.dropped), (MAX_FLOW_QUEUE, 3));
        assert_eq!(inner.datagrams_dropped, 3, "the session's count");
        assert_eq!(f.queue.front(), Some(&3u32.to_be_bytes().to_vec()));
        // A datagram on a flow the peer opened is a request; one on a flow
        // of ours that is gone is dropped.
        inner.on_frame(datagram(2, b"q".to_vec()), &config).unwrap();
        inner
            .on_frame(datagram(flow.id + 2, b"late".to_vec()), &config)
            .unwrap();
        assert!(matches!(
            &inner.requests.iter().collect::<Vec<_>>()[..],
            [Request::Datagram { flow: 2, .. }]
        ));
        drop(inner);
        let id = flow.id;
        drop(flow);
        assert!(!s.lock().flows.contains_key(&id));
    }
}
