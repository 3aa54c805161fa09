//! Intercepts: asking the agent to steer a pod's connections into this
//! session ([`Session::intercept`]), the proof of access it may ask for,
//! its answers, and the [`Intercept`] handle that removes it when dropped.
use std::{io, sync::Arc, task::Poll, task::Waker, time::Duration};

use tpbpf_proto::{Frame, InterceptMode};

use super::{state::reset_error, Inner, Session, Shared};

#[derive(Default)]
pub(crate) struct InterceptState {
    pub(super) challenges: Option<tokio::sync::mpsc::UnboundedSender<(u16, [u8; 16])>>,
    pub(super) ready: Option<tokio::sync::oneshot::Sender<Result<String, String>>>,
    pub(super) ended: Option<String>,
    pub(super) waker: Option<Waker>,
}

impl Inner {
    /// The agent's answer to an intercept of ours: the first says whether
    /// it is in place; a later failure says it ended.
    pub(super) fn on_intercept_status(&mut self, intercept: u32, ok: bool, message: String) {
        if let Some(i) = self.intercepts.get_mut(&intercept) {
            if let Some(tx) = i.ready.take() {
                let _ = tx.send(if ok { Ok(message) } else { Err(message) });
            } else if !ok {
                i.ended = Some(message);
                if let Some(w) = i.waker.take() {
                    w.wake();
                }
            }
        }
    }

    /// The agent asks for a proof of access before intercepting.
    pub(super) fn on_intercept_challenge(&mut self, intercept: u32, port: u16, nonce: [u8; 16]) {
        if let Some(tx) = self
            .intercepts
            .get(&intercept)
            .and_then(|i| i.challenges.as_ref())
        {
            let _ = tx.send((port, nonce));
        }
    }
}

impl Session {
    /// Answers an intercept request (`ok`), or says it failed or ended.
    pub fn intercept_status(&self, id: u32, ok: bool, message: &str) -> io::Result<()> {
        let mut inner = self.shared.lock();
        if let Some((reason, m)) = &inner.ended {
            return Err(reset_error(*reason, m));
        }
        inner.push_control(&Frame::InterceptStatus {
            intercept: id,
            ok,
            message: message.to_string(),
        });
        drop(inner);
        self.shared.write.notify_one();
        Ok(())
    }

    /// Asks the client to prove it may reach the pod (see
    /// [`Frame::InterceptChallenge`]).
    pub fn intercept_challenge(&self, id: u32, port: u16, nonce: [u8; 16]) -> io::Result<()> {
        let mut inner = self.shared.lock();
        if let Some((reason, m)) = &inner.ended {
            return Err(reset_error(*reason, m));
        }
        inner.push_control(&Frame::InterceptChallenge {
            intercept: id,
            port,
            nonce,
        });
        drop(inner);
        self.shared.write.notify_one();
        Ok(())
    }

    /// Asks the peer (an agent) to steer `target`'s new connections into
    /// this session. They arrive as streams ([`Session::accept`]) whose
    /// destination is `target`. If the agent asks for a proof of access
    /// first, `prove(port, nonce)` gives it. Dropping the handle removes the
    /// intercept.
    pub async fn intercept<P, F>(
        &self,
        target: std::net::SocketAddr,
        mode: InterceptMode,
        timeout: Duration,
        prove: P,
    ) -> io::Result<Intercept>
    where
        P: Fn(u16, [u8; 16]) -> F,
        F: std::future::Future<Output = Result<(), String>>,
    {
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let (ctx, mut crx) = tokio::sync::mpsc::unbounded_channel();
        let id = {
            let mut inner = self.shared.lock();
            if let Some((reason, m)) = &inner.ended {
                return Err(reset_error(*reason, m));
            }
            let id = inner.next_intercept;
            inner.next_intercept += 1;
            inner.intercepts.insert(
                id,
                InterceptState {
                    ready: Some(tx),
                    challenges: Some(ctx),
                    ..InterceptState::default()
                },
            );
            inner.push_control(&Frame::InterceptStart {
                intercept: id,
                target,
                mode,
            });
            id
        };
        self.shared.write.notify_one();
        let mut handle = Intercept {
            shared: self.shared.clone(),
            id,
            target,
            info: String::new(),
            stop_sent: false,
        };
        let deadline = tokio::time::Instant::now() + timeout;
        let answer = loop {
            tokio::select! {
                a = &mut rx => break Some(a),
                Some((port, nonce)) = crx.recv() => {
                    if let Err(e) = prove(port, nonce).await {
                        return Err(io::Error::new(io::ErrorKind::PermissionDenied, e));
                    }
                }
                _ = tokio::time::sleep_until(deadline) => break None,
            }
        };
        match answer {
            Some(Ok(Ok(info))) => {
                handle.info = info;
                Ok(handle)
            }
            Some(Ok(Err(m))) => Err(io::Error::other(m)),
            Some(Err(_)) => Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                self.ended()
                    .unwrap_or_else(|| "the tunnel session ended".into()),
            )),
            None => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the agent did not answer the intercept of {target} within {timeout:?}"),
            )),
        }
    }
}

/// An intercept in place; dropping it asks the agent to remove it.
pub struct Intercept {
    shared: Arc<Shared>,
    id: u32,
    target: std::net::SocketAddr,
    info: String,
    stop_sent: bool,
}

impl Intercept {
    /// What the agent said when the intercept was put in place: the
    /// environment of the pod's process, `KEY=VALUE` entries separated by
    /// NUL bytes, as in /proc/PID/environ.
    pub fn info(&self) -> &str {
        &self.info
    }

    pub fn target(&self) -> std::net::SocketAddr {
        self.target
    }

    /// Waits until the agent says the intercept ended (or the session did),
    /// and says why.
    pub async fn ended(&self) -> String {
        std::future::poll_fn(|cx| {
            let mut inner = self.shared.lock();
            let Some(i) = inner.intercepts.get_mut(&self.id) else {
                return Poll::Ready("the intercept was removed".to_string());
            };
            if let Some(m) = &i.ended {
                return Poll::Ready(m.clone());
            }
            i.waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Asks the agent to remove the intercept and waits (up to `timeout`)
    /// until it says it did: new connections then go to the app again.
    pub async fn stop(mut self, timeout: Duration) {
        {
            let mut inner = self.shared.lock();
            if inner.ended.is_some() || !inner.intercepts.contains_key(&self.id) {
                return;
            }
            inner.push_control(&Frame::InterceptStop { intercept: self.id });
        }
        self.shared.write.notify_one();
        self.stop_sent = true;
        let _ = tokio::time::timeout(timeout, self.ended()).await;
    }
}

impl Drop for Intercept {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        inner.intercepts.remove(&self.id);
        if inner.ended.is_none() && !self.stop_sent {
            inner.push_control(&Frame::InterceptStop { intercept: self.id });
            drop(inner);
            self.shared.write.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tpbpf_proto::{Frame, InterceptMode};

    use super::super::testing::{sent, shared};
    use crate::Session;

    /// Waits for the frames the session sends, yielding to its tasks.
    async fn next_sent(s: &super::Shared, config: &crate::Config) -> Vec<Frame> {
        loop {
            let frames = sent(&mut s.lock(), config);
            if !frames.is_empty() {
                return frames;
            }
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn an_intercept_is_proved_answered_ended_and_stopped_when_dropped() {
        let (s, config) = shared(true);
        let session = Session::from_shared(s.clone());
        let target = "10.0.0.7:8080".parse().unwrap();
        let (proof_tx, mut proof_rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            session
                .intercept(
                    target,
                    InterceptMode::Steal,
                    Duration::from_secs(5),
                    |port, nonce| {
                        let proof_tx = proof_tx.clone();
                        async move {
                            proof_tx.send((port, nonce)).unwrap();
                            Ok(())
                        }
                    },
                )
                .await
        });
        let id = match &next_sent(&s, &config).await[..] {
            [Frame::InterceptStart {
                intercept,
                target: t,
                mode: InterceptMode::Steal,
            }] if *t == target => *intercept,
            other => panic!("{other:?}"),
        };
        s.lock()
            .on_frame(
                Frame::InterceptChallenge {
                    intercept: id,
                    port: 4000,
                    nonce: [3; 16],
                },
                &config,
            )
            .unwrap();
        assert_eq!(proof_rx.recv().await, Some((4000, [3; 16])));
        s.lock()
            .on_frame(
                Frame::InterceptStatus {
                    intercept: id,
                    ok: true,
                    message: "A=1".into(),
                },
                &config,
            )
            .unwrap();
        let intercept = task.await.unwrap().unwrap();
        assert_eq!(intercept.info(), "A=1");
        // A later failure is the intercept's end.
        s.lock()
            .on_frame(
                Frame::InterceptStatus {
                    intercept: id,
                    ok: false,
                    message: "pod gone".into(),
                },
                &config,
            )
            .unwrap();
        assert_eq!(intercept.ended().await, "pod gone");
        drop(intercept);
        assert_eq!(
            next_sent(&s, &config).await,
            vec![Frame::InterceptStop { intercept: id }]
        );
        assert!(s.lock().intercepts.is_empty());
    }

    #[tokio::test]
    async fn a_refused_intercept_says_why() {
        let (s, config) = shared(true);
        let session = Session::from_shared(s.clone());
        let task = tokio::spawn(async move {
            session
                .intercept(
                    "10.0.0.7:8080".parse().unwrap(),
                    InterceptMode::Steal,
                    Duration::from_secs(5),
                    |_, _| async { Ok(()) },
                )
                .await
        });
        next_sent(&s, &config).await;
        s.lock()
            .on_frame(
                Frame::InterceptStatus {
                    intercept: 1,
                    ok: false,
                    message: "not allowed by policy".into(),
                },
                &config,
            )
            .unwrap();
        let e = task.await.unwrap().err().expect("refused");
        assert!(e.to_string().contains("not allowed by policy"), "{e}");
    }
}
