//! SPDY/3.1 framing, as the API server's port-forward speaks it (after a
//! `Upgrade: SPDY/3.1` HTTP upgrade, or tunneled in WebSocket binary
//! messages under the subprotocol `SPDY/3.1+portforward.k8s.io`).
//!
//! A frame is an 8-byte header and a payload of up to 2^24-1 bytes:
//!
//! ```text
//! control: |1| version (15) | type (16) | flags (8) | length (24) | payload
//! data:    |0| stream id (31)           | flags (8) | length (24) | data
//! ```
//!
//! Name/value header blocks (SYN_STREAM, SYN_REPLY, HEADERS) are a count and
//! length-prefixed (u32, big endian) names and values, values separated by
//! NUL, compressed with zlib and the SPDY/3 preset dictionary. Each direction
//! of a connection is one zlib stream: every block ends with a sync flush
//! and the next block continues the same stream.
//!
//! Like the Kubernetes SPDY stack, the lab does no flow control:
//! WINDOW_UPDATE and SETTINGS are read and ignored, and none are sent.
//!
//! The files: the preset dictionary (`dictionary`), reading frames
//! (`decode`), writing them (`encode`); the frame types and limits are
//! here.
mod decode;
mod dictionary;
mod encode;
#[cfg(test)]
mod tests;

pub use decode::Decoder;
pub use dictionary::{adler32, dictionary};
pub use encode::Encoder;

pub const VERSION: u16 = 3;

pub const TYPE_SYN_STREAM: u16 = 1;
pub const TYPE_SYN_REPLY: u16 = 2;
pub const TYPE_RST_STREAM: u16 = 3;
pub const TYPE_SETTINGS: u16 = 4;
pub const TYPE_PING: u16 = 6;
pub const TYPE_GOAWAY: u16 = 7;
pub const TYPE_HEADERS: u16 = 8;
pub const TYPE_WINDOW_UPDATE: u16 = 9;

/// FLAG_FIN on control and data frames: the sender's last frame on the stream.
pub const FLAG_FIN: u8 = 0x01;
/// FLAG_UNIDIRECTIONAL on SYN_STREAM: the receiver must not send on it.
pub const FLAG_UNIDIRECTIONAL: u8 = 0x02;

/// RST_STREAM status codes.
pub const RST_PROTOCOL_ERROR: u32 = 1;
pub const RST_INVALID_STREAM: u32 = 2;
pub const RST_REFUSED_STREAM: u32 = 3;
pub const RST_CANCEL: u32 = 5;
pub const RST_STREAM_IN_USE: u32 = 8;

/// GOAWAY status codes.
pub const GOAWAY_OK: u32 = 0;
pub const GOAWAY_PROTOCOL_ERROR: u32 = 1;

/// The largest payload a frame can carry (its length field is 24 bits).
pub const MAX_PAYLOAD: usize = (1 << 24) - 1;

/// A header block: lower-case names, each with its values.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers(pub Vec<(String, Vec<String>)>);

impl Headers {
    /// The first value of `name` (names are lower case on the wire).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.first())
            .map(String::as_str)
    }

    pub fn with(mut self, name: &str, value: &str) -> Self {
        self.0.push((name.to_string(), vec![value.to_string()]));
        self
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting {
    pub flags: u8,
    pub id: u32,
    pub value: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    SynStream {
        stream_id: u32,
        associated_to: u32,
        priority: u8,
        flags: u8,
        headers: Headers,
    },
    SynReply {
        stream_id: u32,
        flags: u8,
        headers: Headers,
    },
    RstStream {
        stream_id: u32,
        status: u32,
    },
    Settings {
        flags: u8,
        entries: Vec<Setting>,
    },
    Ping {
        id: u32,
    },
    GoAway {
        last_good_stream_id: u32,
        status: u32,
    },
    Headers {
        stream_id: u32,
        flags: u8,
        headers: Headers,
    },
    WindowUpdate {
        stream_id: u32,
        delta: u32,
    },
    Data {
        stream_id: u32,
        flags: u8,
        data: Vec<u8>,
    },
}

/// A connection-level error: the peer broke the protocol.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unsupported SPDY version {0}")]
    Version(u16),
    #[error("invalid {what} frame: {why}")]
    Invalid { what: &'static str, why: String },
    #[error("header block: {0}")]
    Compression(String),
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
