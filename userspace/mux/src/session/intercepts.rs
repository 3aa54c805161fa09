//! Intercepts: asking the agent to steer a pod's connections into this
//! session ([`Session::intercept`]), the proof of access it may ask for,
//! its answers, the connections it carries ([`Frame::InterceptIncoming`],
//! opened by [`Session::open_intercepted`], taken with
//! [`Intercept::accept`]), and the [`Intercept`] handle that removes it
//! when dropped.
//!
//! Each intercepted connection names its intercept: the client finds it in
//! the intercept's own entry here, and refuses one whose intercept it does
//! not hold (any more) with a reset that says so.
use std::{
    collections::VecDeque, io, net::SocketAddr, sync::Arc, task::Poll, task::Waker, time::Duration,
};

use tpbpf_proto::{Destination, Frame, InterceptMode, ResetReason};

use super::{state::reset_error, Inner, Session, Shared};
use crate::{Config, Stream};

#[derive(Default)]
pub(crate) struct InterceptState {
    pub(super) challenges: Option<tokio::sync::mpsc::UnboundedSender<(u16, [u8; 16])>>,
    pub(super) ready: Option<tokio::sync::oneshot::Sender<Result<String, String>>>,
    pub(super) ended: Option<String>,
    /// Connections the agent opened for this intercept, not yet taken by
    /// [`Intercept::accept`]: stream ids and their peers.
    pub(super) incoming: VecDeque<(u32, SocketAddr)>,
    /// [`Intercept::accept`], waiting for a connection or the end.
    pub(super) waker: Option<Waker>,
}

/// What the agent's open of an intercepted connection says.
#[derive(Clone, Copy, Debug)]
pub(super) struct Intercepted {
    pub(super) intercept: u32,
    pub(super) src: SocketAddr,
    pub(super) dst: SocketAddr,
}

impl Intercepted {
    pub(super) fn open_frame(&self, stream: u32) -> Frame {
        Frame::InterceptIncoming {
            intercept: self.intercept,
            stream,
            src: self.src,
            dst: self.dst,
        }
    }
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

    /// The agent opens a stream for a connection to intercept
    /// `intercept`'s target: it goes to that intercept's handle, or is
    /// refused if this side holds no such intercept, or holds one that
    /// ended. (Connections that came before its end are still taken:
    /// the agent's opens and its status travel in order.)
    pub(super) fn on_intercept_incoming(
        &mut self,
        intercept: u32,
        stream: u32,
        src: SocketAddr,
        dst: SocketAddr,
        config: &Config,
    ) -> Result<bool, String> {
        if let Some(message) = self.check_open(stream, config)? {
            return self.refuse_open(stream, message);
        }
        let refusal = match self.intercepts.get(&intercept) {
            None => Some(format!(
                "the connection from {src} to {dst} is for intercept {intercept}, which this side does not hold (it was removed)"
            )),
            Some(i) => i.ended.as_ref().map(|why| {
                format!("the connection from {src} to {dst} is for intercept {intercept}, which ended: {why}")
            }),
        };
        if let Some(message) = refusal {
            return self.refuse_open(stream, message);
        }
        self.admit_open(stream, Destination::Addr(dst));
        if let Some(i) = self.intercepts.get_mut(&intercept) {
            i.incoming.push_back((stream, src));
            if let Some(w) = i.waker.take() {
                w.wake();
            }
        }
        Ok(false)
    }
}

impl Session {
    /// Answers an intercept request (`ok`), or says it failed or ended.
    /// It follows, in order, the opens of the connections carried for it
    /// before.
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

    /// Asks the client who it is (an [`InterceptChallenge`] with port 0)
    /// and waits up to `within` for its [`Frame::InterceptProof`].
    ///
    /// [`InterceptChallenge`]: Frame::InterceptChallenge
    pub async fn intercept_identity(
        &self,
        id: u32,
        nonce: [u8; 16],
        within: Duration,
    ) -> io::Result<tpbpf_proto::IdentityProof> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let mut inner = self.shared.lock();
            if let Some((reason, m)) = &inner.ended {
                return Err(reset_error(*reason, m));
            }
            inner.proofs.insert(id, tx);
            inner.push_control(&Frame::InterceptChallenge {
                intercept: id,
                port: 0,
                nonce,
            });
        }
        self.shared.write.notify_one();
        let got = tokio::time::timeout(within, rx).await;
        self.shared.lock().proofs.remove(&id);
        match got {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(_)) => Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                self.ended()
                    .unwrap_or_else(|| "the tunnel session ended".into()),
            )),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client gave no identity within {within:?}"),
            )),
        }
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

    /// Carries a connection from `src` to `dst` that the peer's intercept
    /// `intercept` took: a stream like [`Session::open_with`]'s, opened with
    /// [`Frame::InterceptIncoming`] so the peer hands it to that intercept.
    /// Its open goes out with the control frames, before any status of the
    /// intercept sent after it.
    pub fn open_intercepted(
        &self,
        intercept: u32,
        src: SocketAddr,
        dst: SocketAddr,
        first: &[u8],
    ) -> io::Result<Stream> {
        self.open_stream(
            Destination::Addr(dst),
            first,
            Some(Intercepted {
                intercept,
                src,
                dst,
            }),
        )
    }

    /// Asks the peer (an agent) to steer `target`'s new connections into
    /// this session. They arrive as streams, each for its intercept
    /// ([`Intercept::accept`]), with `target` as their destination. If the
    /// agent asks for a proof of access first, `prove(port, nonce)` gives
    /// it: a port-forward's it makes itself (`None`), an identity it
    /// returns and this sends. Dropping the handle removes the intercept.
    pub async fn intercept<P, F>(
        &self,
        target: SocketAddr,
        mode: InterceptMode,
        timeout: Duration,
        prove: P,
    ) -> io::Result<Intercept>
    where
        P: Fn(u16, [u8; 16]) -> F,
        F: std::future::Future<Output = Result<Option<tpbpf_proto::IdentityProof>, String>>,
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
                    match prove(port, nonce).await {
                        Err(e) => return Err(io::Error::new(io::ErrorKind::PermissionDenied, e)),
                        Ok(None) => {}
                        Ok(Some(proof)) => {
                            let mut inner = self.shared.lock();
                            if inner.ended.is_none() {
                                inner.push_control(&Frame::InterceptProof { intercept: id, proof });
                            }
                            drop(inner);
                            self.shared.write.notify_one();
                        }
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

/// An intercept in place; dropping it asks the agent to remove it, and
/// refuses the connections it had not taken.
pub struct Intercept {
    shared: Arc<Shared>,
    id: u32,
    target: SocketAddr,
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

    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// The next connection the agent intercepted, as a stream whose
    /// destination is the target, and the connection's peer. Once the
    /// agent says the intercept ended (or the session did), and the
    /// connections that came before are taken: why it ended.
    pub async fn accept(&mut self) -> Result<(Stream, SocketAddr), String> {
        std::future::poll_fn(|cx| {
            let mut inner = self.shared.lock();
            let Some(i) = inner.intercepts.get_mut(&self.id) else {
                return Poll::Ready(Err("the intercept was removed".to_string()));
            };
            if let Some((stream, src)) = i.incoming.pop_front() {
                return Poll::Ready(Ok((Stream::new(self.shared.clone(), stream), src)));
            }
            if let Some(m) = &i.ended {
                return Poll::Ready(Err(m.clone()));
            }
            i.waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Asks the agent to remove the intercept. Keep taking connections:
    /// [`Intercept::accept`] gives those it carried before, then fails once
    /// the agent says the intercept is gone (new connections go to the app
    /// again).
    pub fn stop(&mut self) {
        if self.stop_sent {
            return;
        }
        {
            let mut inner = self.shared.lock();
            if inner.ended.is_some() || !inner.intercepts.contains_key(&self.id) {
                return;
            }
            inner.push_control(&Frame::InterceptStop { intercept: self.id });
        }
        self.shared.write.notify_one();
        self.stop_sent = true;
    }
}

impl Drop for Intercept {
    fn drop(&mut self) {
        let mut inner = self.shared.lock();
        if let Some(i) = inner.intercepts.remove(&self.id) {
            for (stream, src) in i.incoming {
                if let Some(s) = inner.streams.get_mut(&stream) {
                    s.dropped = true;
                }
                inner.reset_local(
                    stream,
                    ResetReason::Refused,
                    &format!(
                        "the connection from {src} came as intercept {} of {} was removed",
                        self.id, self.target
                    ),
                );
                // One the session's end had failed already.
                inner.remove_if_finished(stream);
            }
        }
        if inner.ended.is_none() && !self.stop_sent {
            inner.push_control(&Frame::InterceptStop { intercept: self.id });
        }
        drop(inner);
        self.shared.write.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use std::{net::SocketAddr, sync::Arc, time::Duration};

    use tokio::io::AsyncReadExt;
    use tpbpf_proto::{Destination, Frame, InterceptMode, ResetReason, INITIAL_WINDOW};

    use super::super::testing::{sent, shared};
    use super::{Intercept, Shared};
    use crate::{Config, Session};

    const TARGET: &str = "10.0.0.7:8080";

    fn target() -> SocketAddr {
        TARGET.parse().unwrap()
    }

    fn peer(port: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 9, 1], port))
    }

    /// Waits for the frames the session sends, yielding to its tasks.
    async fn next_sent(s: &Shared, config: &Config) -> Vec<Frame> {
        loop {
            let frames = sent(&mut s.lock(), config);
            if !frames.is_empty() {
                return frames;
            }
            tokio::task::yield_now().await;
        }
    }

    /// The agent's connection `stream` from `peer(port)` for `intercept`.
    fn incoming(intercept: u32, stream: u32, port: u16) -> Frame {
        Frame::InterceptIncoming {
            intercept,
            stream,
            src: peer(port),
            dst: target(),
        }
    }

    /// A client session with intercept 1 of [`TARGET`] in place.
    async fn intercepted() -> (Arc<Shared>, Config, Intercept) {
        let (s, config) = shared(true);
        let session = Session::from_shared(s.clone());
        let task = tokio::spawn(async move {
            session
                .intercept(
                    target(),
                    InterceptMode::Steal,
                    Duration::from_secs(5),
                    |_, _| async { Ok(None) },
                )
                .await
        });
        next_sent(&s, &config).await;
        let ok = Frame::InterceptStatus {
            intercept: 1,
            ok: true,
            message: String::new(),
        };
        s.lock().on_frame(ok, &config).unwrap();
        let handle = task.await.unwrap().unwrap();
        (s, config, handle)
    }

    fn refusal(frames: &[Frame]) -> (u32, String) {
        match frames {
            [Frame::Reset {
                stream,
                reason: ResetReason::Refused,
                message,
            }] => (*stream, message.clone()),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn an_intercept_is_proved_answered_ended_and_stopped_when_dropped() {
        let (s, config) = shared(true);
        let session = Session::from_shared(s.clone());
        let (proof_tx, mut proof_rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            session
                .intercept(
                    target(),
                    InterceptMode::Steal,
                    Duration::from_secs(5),
                    |port, nonce| {
                        let proof_tx = proof_tx.clone();
                        async move {
                            proof_tx.send((port, nonce)).unwrap();
                            Ok(None)
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
            }] if *t == target() => *intercept,
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
        let mut intercept = task.await.unwrap().unwrap();
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
        assert_eq!(intercept.accept().await.err().unwrap(), "pod gone");
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
                    target(),
                    InterceptMode::Steal,
                    Duration::from_secs(5),
                    |_, _| async { Ok(None) },
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

    #[tokio::test]
    async fn an_intercepted_connection_reaches_its_intercept_s_handle_with_its_peer_and_bytes() {
        let (s, config, mut handle) = intercepted().await;
        assert_eq!(s.lock().on_frame(incoming(1, 2, 5000), &config), Ok(false));
        let data = Frame::Data {
            stream: 2,
            data: b"GET / HTTP/1.1\r\n".to_vec(),
        };
        s.lock().on_frame(data, &config).unwrap();
        let (mut stream, src) = handle.accept().await.unwrap();
        assert_eq!((stream.id(), src), (2, peer(5000)));
        assert_eq!(stream.destination(), Some(Destination::Addr(target())));
        let mut got = [0u8; 16];
        stream.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"GET / HTTP/1.1\r\n");
        // Only the intercept's handle gets it, not the session's accept.
        assert!(s.lock().incoming.is_empty());
        assert_eq!(s.lock().granted, INITIAL_WINDOW as usize);
    }

    #[tokio::test]
    async fn a_connection_for_an_intercept_this_side_does_not_hold_is_refused_with_a_reason() {
        let (s, config, _handle) = intercepted().await;
        let mut inner = s.lock();
        assert_eq!(inner.on_frame(incoming(9, 2, 5000), &config), Ok(true));
        let (stream, message) = refusal(&sent(&mut inner, &config));
        assert_eq!(stream, 2);
        assert!(
            message.contains("intercept 9") && message.contains("10.0.9.1:5000"),
            "{message}"
        );
        assert!(inner.streams.is_empty());
        assert_eq!(inner.granted, 0);
        // Its data, already on the way, is dropped; the session goes on.
        let late = Frame::Data {
            stream: 2,
            data: vec![1; 10],
        };
        assert_eq!(inner.on_frame(late, &config), Ok(false));
        assert!(inner.ended.is_none());
        // Stream ids are checked as for any open.
        let e = inner.on_frame(incoming(1, 2, 5001), &config).unwrap_err();
        assert!(e.contains("opened stream 2, an id it may not use"), "{e}");
    }

    #[tokio::test]
    async fn connections_before_the_intercept_s_end_are_taken_and_those_after_refused() {
        let (s, config, mut handle) = intercepted().await;
        s.lock().on_frame(incoming(1, 2, 5000), &config).unwrap();
        let removed = Frame::InterceptStatus {
            intercept: 1,
            ok: false,
            message: "removed".into(),
        };
        s.lock().on_frame(removed, &config).unwrap();
        assert_eq!(s.lock().on_frame(incoming(1, 4, 5001), &config), Ok(true));
        let (stream, message) = refusal(&sent(&mut s.lock(), &config));
        assert_eq!(stream, 4);
        assert!(
            message.contains("intercept 1, which ended: removed"),
            "{message}"
        );
        let (before, src) = handle.accept().await.unwrap();
        assert_eq!((before.id(), src), (2, peer(5000)));
        assert_eq!(handle.accept().await.err().unwrap(), "removed");
    }

    #[tokio::test]
    async fn dropping_the_handle_refuses_the_connections_it_had_not_taken() {
        let (s, config, handle) = intercepted().await;
        s.lock().on_frame(incoming(1, 2, 5000), &config).unwrap();
        drop(handle);
        let mut inner = s.lock();
        let frames = sent(&mut inner, &config);
        assert!(
            matches!(&frames[..], [Frame::Reset { stream: 2, reason: ResetReason::Refused, message }, Frame::InterceptStop { intercept: 1 }] if message.contains("was removed")),
            "{frames:?}"
        );
        assert!(inner.streams.is_empty());
        assert_eq!(inner.granted, 0);
        // Later ones: refused as for an intercept it never had.
        assert_eq!(inner.on_frame(incoming(1, 4, 5001), &config), Ok(true));
        let (_, message) = refusal(&sent(&mut inner, &config));
        assert!(message.contains("does not hold"), "{message}");
    }

    #[tokio::test]
    async fn a_stop_is_sent_once_and_the_connections_carried_before_it_are_still_taken() {
        let (s, config, mut handle) = intercepted().await;
        handle.stop();
        handle.stop();
        assert_eq!(
            sent(&mut s.lock(), &config),
            vec![Frame::InterceptStop { intercept: 1 }]
        );
        s.lock().on_frame(incoming(1, 2, 5000), &config).unwrap();
        assert_eq!(handle.accept().await.unwrap().1, peer(5000));
        drop(handle);
        assert!(
            !sent(&mut s.lock(), &config)
                .iter()
                .any(|f| matches!(f, Frame::InterceptStop { .. })),
            "a second stop on drop"
        );
    }

    #[test]
    fn an_intercepted_connection_opens_with_its_intercept_ahead_of_a_later_status() {
        let (s, config) = shared(false);
        let session = Session::from_shared(s.clone());
        let stream = session
            .open_intercepted(7, peer(5000), target(), b"hello")
            .unwrap();
        session.intercept_status(7, false, "removed").unwrap();
        assert_eq!(
            sent(&mut s.lock(), &config),
            vec![
                incoming(7, stream.id(), 5000),
                Frame::InterceptStatus {
                    intercept: 7,
                    ok: false,
                    message: "removed".into()
                },
                Frame::Data {
                    stream: stream.id(),
                    data: b"hello".to_vec()
                },
            ]
        );
        // A plain open still rides with its first bytes.
        let plain = session
            .open_with(Destination::Addr(target()), b"x")
            .unwrap();
        assert!(matches!(
            &sent(&mut s.lock(), &config)[..],
            [Frame::Open { stream, data, .. }] if *stream == plain.id() && data == b"x"
        ));
    }
}
