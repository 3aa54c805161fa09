//! Helpers for the session's unit tests: a session's state with no
//! transport, frames to feed it, what it would send.
use std::{
    sync::Arc,
    task::{Context, Poll, Waker},
};

use bytes::Bytes;
use tpbpf_proto::{decode, Destination, Frame};

use super::{state::Inner, Shared};
use crate::Config;

pub(super) fn dst() -> Destination {
    Destination::Name {
        host: "web.default".into(),
        port: 80,
    }
}

/// A server's state (it accepts odd stream ids) and its settings.
pub(super) fn server() -> (Inner, Config) {
    (Inner::new(false), Config::default())
}

/// A session's shared state, for the operations streams call.
pub(super) fn shared(client: bool) -> (Arc<Shared>, Config) {
    (shared_with(client, Config::default()), Config::default())
}

pub(super) fn shared_with(client: bool, config: Config) -> Arc<Shared> {
    Shared::new(config, [1; 16], client)
}

/// The peer opens `stream` with `data` as its first bytes.
pub(super) fn open(stream: u32, data: &[u8]) -> Frame {
    Frame::Open {
        stream,
        dst: dst(),
        data: data.to_vec(),
    }
}

pub(super) fn data(n: usize) -> Bytes {
    Bytes::from(vec![0xab; n])
}

/// Reads up to `max` bytes of stream `id` as its application would.
pub(super) fn read(s: &Shared, id: u32, max: usize) -> Vec<u8> {
    let mut storage = vec![0u8; max];
    let mut buf = tokio::io::ReadBuf::new(&mut storage);
    let mut cx = Context::from_waker(Waker::noop());
    match s.poll_read(id, &mut cx, &mut buf) {
        Poll::Ready(Ok(())) => buf.filled().to_vec(),
        Poll::Ready(Err(e)) => panic!("read of stream {id}: {e}"),
        Poll::Pending => panic!("read of stream {id} would wait"),
    }
}

/// Writes to stream `id` as its application would: how much was taken,
/// `None` when the write would wait.
pub(super) fn write(s: &Shared, id: u32, buf: &[u8]) -> Option<usize> {
    let mut cx = Context::from_waker(Waker::noop());
    match s.poll_write(id, &mut cx, buf) {
        Poll::Ready(Ok(n)) => Some(n),
        Poll::Ready(Err(e)) => panic!("write to stream {id}: {e}"),
        Poll::Pending => None,
    }
}

/// Everything the session would send now, as the writer takes it, decoded:
/// per batch, the unreliable frames, then the reliable ones.
pub(super) fn sent(inner: &mut Inner, config: &Config) -> Vec<Frame> {
    let mut frames = Vec::new();
    while let Some((unreliable, reliable)) = inner.take_output(config) {
        for bytes in [&unreliable[..], &reliable[..]] {
            let mut at = 0;
            while at < bytes.len() {
                let (frame, used) = decode(&bytes[at..])
                    .expect("the session sends well-formed frames")
                    .expect("the session sends whole frames");
                frames.push(frame);
                at += used;
            }
        }
    }
    frames
}
