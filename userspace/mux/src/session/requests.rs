//! What the peer asks of the serving side besides streams (datagrams, DNS
//! queries, intercepts), queued for [`Session::next_request`] within
//! bounds.
use std::task::Poll;

use tpbpf_proto::{Destination, InterceptMode};

use super::{Inner, Session};

/// What the peer asks of the serving side besides streams.
#[derive(Debug)]
pub enum Request {
    /// A datagram on a flow: send it to `dst` and answer on the same flow
    /// with [`Session::reply_datagram`].
    Datagram {
        flow: u32,
        dst: Destination,
        data: Vec<u8>,
    },
    /// A DNS query (wire format): answer with [`Session::answer_dns`].
    Dns { id: u32, query: Vec<u8> },
    /// Steer `target`'s new connections into this session; answer with
    /// [`Session::intercept_status`], then open a stream per connection.
    InterceptStart {
        id: u32,
        target: std::net::SocketAddr,
        mode: InterceptMode,
    },
    /// Remove the intercept `id`.
    InterceptStop { id: u32 },
}

/// Datagrams and DNS queries waiting for the serving application, at most.
pub(super) const MAX_REQUESTS: usize = 4096;
/// Intercept starts and stops waiting for the application, at most. They
/// are never dropped (a lost stop would leave an intercept in place): a
/// peer that sends more than this without the application keeping up
/// breaks the protocol.
pub(super) const MAX_INTERCEPT_REQUESTS: usize = 256;

impl Inner {
    pub(super) fn push_request(&mut self, r: Request) {
        // Like a full socket buffer: datagrams and queries beyond the limit
        // are dropped; their senders retry.
        if self.requests.len() < MAX_REQUESTS {
            self.requests.push_back(r);
        } else {
            self.datagrams_dropped += 1;
        }
        if let Some(w) = self.request_waker.take() {
            w.wake();
        }
    }

    /// Intercept control is never dropped; too much of it unread is a
    /// protocol error.
    pub(super) fn push_intercept_request(&mut self, r: Request) -> Result<(), String> {
        if self.intercept_requests.len() >= MAX_INTERCEPT_REQUESTS {
            return Err(format!(
                "more than {MAX_INTERCEPT_REQUESTS} intercept requests unanswered"
            ));
        }
        self.intercept_requests.push_back(r);
        if let Some(w) = self.request_waker.take() {
            w.wake();
        }
        Ok(())
    }
}

impl Session {
    /// The next datagram or DNS query from the peer; `None` once the
    /// session is over.
    pub async fn next_request(&self) -> Option<Request> {
        std::future::poll_fn(|cx| {
            let mut inner = self.shared.lock();
            if let Some(r) = inner.intercept_requests.pop_front() {
                return Poll::Ready(Some(r));
            }
            if let Some(r) = inner.requests.pop_front() {
                return Poll::Ready(Some(r));
            }
            if inner.ended.is_some() {
                return Poll::Ready(None);
            }
            inner.request_waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use tpbpf_proto::{Frame, InterceptMode};

    use super::{super::testing::server, Request, MAX_INTERCEPT_REQUESTS, MAX_REQUESTS};

    #[test]
    fn queries_past_the_bound_are_dropped_but_intercept_control_ends_the_session() {
        let (mut inner, config) = server();
        for id in 0..MAX_REQUESTS as u32 + 10 {
            let wake = inner
                .on_frame(Frame::DnsQuery { id, query: vec![1] }, &config)
                .unwrap();
            assert!(!wake);
        }
        assert_eq!(inner.requests.len(), MAX_REQUESTS);
        assert!(
            matches!(inner.requests.back(), Some(Request::Dns { id, .. }) if *id == MAX_REQUESTS as u32 - 1)
        );

        let start = |intercept| Frame::InterceptStart {
            intercept,
            target: "10.0.0.1:80".parse().unwrap(),
            mode: InterceptMode::Steal,
        };
        for i in 0..MAX_INTERCEPT_REQUESTS as u32 {
            inner.on_frame(start(i), &config).unwrap();
        }
        let e = inner.on_frame(start(999), &config).unwrap_err();
        assert!(e.contains("intercept requests unanswered"), "{e}");
        // In order, none lost.
        let ids: Vec<u32> = inner
            .intercept_requests
            .iter()
            .map(|r| match r {
                Request::InterceptStart { id, .. } => *id,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(ids, (0..MAX_INTERCEPT_REQUESTS as u32).collect::<Vec<_>>());
    }
}
