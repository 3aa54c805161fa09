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
