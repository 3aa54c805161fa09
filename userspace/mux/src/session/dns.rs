//! DNS through the tunnel: queries this side sends and waits for, answers
//! to the peer's queries (which arrive as [`super::Request::Dns`]).
use std::{io, time::Duration};

use tpbpf_proto::Frame;

use super::{state::reset_error, Inner, Session};

impl Inner {
    /// The answer to a query of ours; one nobody waits for is dropped.
    pub(super) fn on_dns_answer(&mut self, id: u32, answer: Vec<u8>) {
        if let Some(tx) = self.dns_pending.remove(&id) {
            let _ = tx.send(answer);
        }
    }
}

impl Session {
    /// Answers the DNS query `id`.
    pub fn answer_dns(&self, id: u32, answer: Vec<u8>) -> io::Result<()> {
        self.send_lossy(&Frame::DnsAnswer { id, answer })
    }

    /// Sends a DNS query (wire format) to the peer's resolver and waits for
    /// the answer.
    pub async fn dns(&self, query: Vec<u8>, timeout: Duration) -> io::Result<Vec<u8>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let id = {
            let mut inner = self.shared.lock();
            if let Some((reason, message)) = &inner.ended {
                return Err(reset_error(*reason, message));
            }
            let id = inner.next_query;
            inner.next_query = inner.next_query.wrapping_add(1).max(1);
            inner.dns_pending.insert(id, tx);
            inner.push_lossy(&Frame::DnsQuery { id, query });
            id
        };
        self.shared.write.notify_one();
        let answer = tokio::time::timeout(timeout, rx).await;
        self.shared.lock().dns_pending.remove(&id);
        match answer {
            Ok(Ok(a)) => Ok(a),
            Ok(Err(_)) => Err(match self.ended() {
                Some(m) => io::Error::new(io::ErrorKind::ConnectionReset, m),
                None => io::Error::other("the DNS query was dropped"),
            }),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no DNS answer through the tunnel within {timeout:?}"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tpbpf_proto::{Frame, ResetReason};

    use super::super::testing::{sent, shared};
    use crate::Session;

    #[tokio::test]
    async fn a_query_gets_its_answer_and_a_stray_answer_is_dropped() {
        let (s, config) = shared(true);
        let session = Session::from_shared(s.clone());
        let query = tokio::spawn({
            let session = session.clone();
            async move { session.dns(b"q".to_vec(), Duration::from_secs(5)).await }
        });
        // The query goes out; its answer, and one for no query, come back.
        let id = loop {
            let frames = sent(&mut s.lock(), &config);
            if let [Frame::DnsQuery { id, query }] = &frames[..] {
                assert_eq!(query, b"q");
                break *id;
            }
            assert!(frames.is_empty(), "{frames:?}");
            tokio::task::yield_now().await;
        };
        for (id, answer) in [(id + 1, &b"stray"[..]), (id, b"answer")] {
            let answer = answer.to_vec();
            s.lock()
                .on_frame(Frame::DnsAnswer { id, answer }, &config)
                .unwrap();
        }
        assert_eq!(query.await.unwrap().unwrap(), b"answer");
        assert!(s.lock().dns_pending.is_empty());
    }

    #[tokio::test]
    async fn a_query_fails_with_the_reason_when_the_session_ends() {
        let (s, _) = shared(true);
        let session = Session::from_shared(s.clone());
        let query = tokio::spawn({
            let session = session.clone();
            async move { session.dns(b"q".to_vec(), Duration::from_secs(5)).await }
        });
        while s.lock().dns_pending.is_empty() {
            tokio::task::yield_now().await;
        }
        s.lock()
            .end(ResetReason::Aborted, "the tunnel session was closed".into());
        let e = query.await.unwrap().unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset);
        assert!(e.to_string().contains("closed"), "{e}");
        assert!(session
            .dns(b"q".to_vec(), Duration::from_secs(1))
            .await
            .is_err());
    }
}
