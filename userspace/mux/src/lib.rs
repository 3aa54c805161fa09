//! tpbpf's tunnel multiplexer: many TCP-like streams over one session
//! between tpbpfd and an agent, on tokio.
//!
//! - Each [`Stream`] is `AsyncRead + AsyncWrite`. Opening one costs no round
//!   trip: the open frame leaves with the first bytes written.
//! - Flow control per stream: the receiver grants credit as its application
//!   reads, so a slow reader never makes the session buffer without bound;
//!   windows grow for streams that read fast.
//! - Fair scheduling: streams with data take turns of at most [`CHUNK`]
//!   bytes, so a bulk transfer does not starve an interactive stream.
//! - Keepalive pings measure the RTT and detect a dead transport.
//! - Resume: both ends keep the reliable bytes the other has not
//!   acknowledged; when the transport dies, the client dials again, presents
//!   the session id and what it received, both replay, and streams carry on
//!   with no byte lost or duplicated. Past the resume window (time or bytes)
//!   the session ends and every stream fails with [`ResetReason::ResumeExpired`].
//! - Transports ([`transport`]): TCP, and TCP with TLS and a token.
mod conn;
mod handshake;
mod ktls;
mod session;
mod stream;
pub mod transport;

use std::time::Duration;

pub mod x509;
pub use handshake::{same_token, Admission, Client, HandshakeError, Server};
pub use session::{short_id, Flow, Intercept, Request, Session, Stats};
pub use stream::Stream;
pub use tpbpf_proto::{
    identity_message, Credential, Destination, IdentityProof, InterceptMode, ResetReason,
    MIN_VERSION as MIN_PROTOCOL_VERSION, VERSION as PROTOCOL_VERSION,
};

/// The largest piece of one stream's data sent in one turn.
pub const CHUNK: usize = 16 * 1024;

/// The buffer each direction of a relay (a local socket to or from a
/// stream) reads into: 64 KiB, so a bulk transfer takes a quarter of the
/// system calls and wakeups of tokio's default 8 KiB (measured in
/// docs/performance.md).
pub const RELAY_BUFFER: usize = 64 * 1024;

/// Copies both ways between `a` and `b` until both are done, through
/// [`RELAY_BUFFER`]-sized buffers; returns the bytes each way.
pub async fn relay<A, B>(a: &mut A, b: &mut B) -> std::io::Result<(u64, u64)>
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(a, b, RELAY_BUFFER, RELAY_BUFFER).await
}

/// A session's settings. Both ends should use the same values for the
/// limits that the other end relies on (windows).
#[derive(Clone, Debug)]
pub struct Config {
    /// The largest receive window a stream grows to: 16 MiB, so one
    /// stream fills 1 Gbit/s at a 130 ms round trip.
    pub max_window: u32,
    /// Streams open at once on a session, in both directions.
    pub max_streams: usize,
    /// The most bytes the session may be made to buffer for its streams'
    /// readers: the sum of all receive windows granted. A new stream that
    /// would go past it is refused.
    pub max_buffered: usize,
    /// How long a session waits for a new transport before it gives up.
    pub resume_window: Duration,
    /// The most bytes a side keeps for replay; senders wait when it is full.
    pub resume_bytes: usize,
    /// Interval of keepalive pings.
    pub keepalive: Duration,
    /// A transport with nothing received for this long is dead.
    pub keepalive_timeout: Duration,
    /// How long a handshake (TLS and hello) may take.
    pub handshake_timeout: Duration,
    /// Server: sessions alive at once (connected or waiting to resume).
    pub max_sessions: usize,
    /// Server: handshakes in progress at once; a connection beyond it is
    /// closed at once.
    pub max_handshakes: usize,
    /// A transport that wrote this many TLS records (counted from above:
    /// one per write, one more per 16 KiB) is replaced by a new one through
    /// resume, with new keys: an AES-GCM key is good for 2^24.5 records
    /// (RFC 8446 5.5), and the kernel's TLS does no key update.
    pub rekey_records: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_window: 16 * 1024 * 1024,
            max_streams: 16 * 1024,
            max_buffered: 1024 * 1024 * 1024,
            resume_window: Duration::from_secs(30),
            resume_bytes: 64 * 1024 * 1024,
            keepalive: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(20),
            handshake_timeout: Duration::from_secs(10),
            max_sessions: 1024,
            max_handshakes: 128,
            rekey_records: 1 << 23,
        }
    }
}
