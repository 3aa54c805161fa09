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
use std::sync::OnceLock;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

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

/// Length-prefixed words at the start of the SPDY/3 header dictionary.
const DICTIONARY_WORDS: &[&str] = &[
    "options",
    "head",
    "post",
    "put",
    "delete",
    "trace",
    "accept",
    "accept-charset",
    "accept-encoding",
    "accept-language",
    "accept-ranges",
    "age",
    "allow",
    "authorization",
    "cache-control",
    "connection",
    "content-base",
    "content-encoding",
    "content-language",
    "content-length",
    "content-location",
    "content-md5",
    "content-range",
    "content-type",
    "date",
    "etag",
    "expect",
    "expires",
    "from",
    "host",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-range",
    "if-unmodified-since",
    "last-modified",
    "location",
    "max-forwards",
    "pragma",
    "proxy-authenticate",
    "proxy-authorization",
    "range",
    "referer",
    "retry-after",
    "server",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "user-agent",
    "vary",
    "via",
    "warning",
    "www-authenticate",
    "method",
    "get",
    "status",
    "200 OK",
    "version",
    "HTTP/1.1",
    "url",
    "public",
    "set-cookie",
    "keep-alive",
    "origin",
];

/// The text that follows the words in the SPDY/3 header dictionary.
const DICTIONARY_TAIL: &str = concat!(
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505",
    "203 Non-Authoritative Information",
    "204 No Content",
    "301 Moved Permanently",
    "400 Bad Request",
    "401 Unauthorized",
    "403 Forbidden",
    "404 Not Found",
    "500 Internal Server Error",
    "501 Not Implemented",
    "503 Service Unavailable",
    "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec",
    " 00:00:00",
    " Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT",
    "chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,",
    "text/plain,text/javascript,public",
    "private",
    "max-age=",
    "gzip,deflate,sdch",
    "charset=utf-8",
    "charset=iso-8859-1,",
    "utf-,*,enq=0.",
);

/// The zlib preset dictionary of SPDY/3 header blocks (SPDY/3 section 2.6.10.1).
pub fn dictionary() -> &'static [u8] {
    static DICT: OnceLock<Vec<u8>> = OnceLock::new();
    DICT.get_or_init(|| {
        let mut d = Vec::with_capacity(1423);
        for w in DICTIONARY_WORDS {
            d.extend_from_slice(&(w.len() as u32).to_be_bytes());
            d.extend_from_slice(w.as_bytes());
        }
        d.extend_from_slice(DICTIONARY_TAIL.as_bytes());
        d
    })
}

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

fn invalid(what: &'static str, why: impl Into<String>) -> Error {
    Error::Invalid {
        what,
        why: why.into(),
    }
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Reads frames from one direction of a connection (it owns that
/// direction's zlib stream).
pub struct Decoder {
    inflate: Decompress,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Decoder {
    pub fn new() -> Self {
        Self {
            inflate: Decompress::new(true),
        }
    }

    /// Takes the next whole frame off the front of `buf`; `Ok(None)` when
    /// `buf` does not hold one yet. Frames of unknown control types are
    /// skipped, as SPDY/3 asks.
    pub fn next_frame(&mut self, buf: &mut Vec<u8>) -> Result<Option<Frame>, Error> {
        loop {
            if buf.len() < 8 {
                return Ok(None);
            }
            let len = usize::from(buf[5]) << 16 | usize::from(buf[6]) << 8 | usize::from(buf[7]);
            if buf.len() < 8 + len {
                return Ok(None);
            }
            let frame: Vec<u8> = buf.drain(..8 + len).collect();
            let (head, payload) = frame.split_at(8);
            let flags = head[4];
            if head[0] & 0x80 == 0 {
                return Ok(Some(Frame::Data {
                    stream_id: be32(head) & 0x7fff_ffff,
                    flags,
                    data: payload.to_vec(),
                }));
            }
            let version = u16::from_be_bytes([head[0], head[1]]) & 0x7fff;
            if version != VERSION {
                return Err(Error::Version(version));
            }
            let kind = u16::from_be_bytes([head[2], head[3]]);
            if let Some(f) = self.control(kind, flags, payload)? {
                return Ok(Some(f));
            }
        }
    }

    fn control(&mut self, kind: u16, flags: u8, p: &[u8]) -> Result<Option<Frame>, Error> {
        let need = |what: &'static str, n: usize| {
            if p.len() < n {
                Err(invalid(what, format!("{} bytes, need {n}", p.len())))
            } else {
                Ok(())
            }
        };
        Ok(Some(match kind {
            TYPE_SYN_STREAM => {
                need("SYN_STREAM", 10)?;
                Frame::SynStream {
                    stream_id: be32(p) & 0x7fff_ffff,
                    associated_to: be32(&p[4..]) & 0x7fff_ffff,
                    priority: p[8] >> 5,
                    flags,
                    headers: self.headers(&p[10..])?,
                }
            }
            TYPE_SYN_REPLY => {
                need("SYN_REPLY", 4)?;
                Frame::SynReply {
                    stream_id: be32(p) & 0x7fff_ffff,
                    flags,
                    headers: self.headers(&p[4..])?,
                }
            }
            TYPE_HEADERS => {
                need("HEADERS", 4)?;
                Frame::Headers {
                    stream_id: be32(p) & 0x7fff_ffff,
                    flags,
                    headers: self.headers(&p[4..])?,
                }
            }
            TYPE_RST_STREAM => {
                need("RST_STREAM", 8)?;
                Frame::RstStream {
                    stream_id: be32(p) & 0x7fff_ffff,
                    status: be32(&p[4..]),
                }
            }
            TYPE_SETTINGS => {
                need("SETTINGS", 4)?;
                let n = be32(p) as usize;
                let body = &p[4..];
                if body.len() != n.saturating_mul(8) {
                    return Err(invalid(
                        "SETTINGS",
                        format!("{n} entries in {} bytes", body.len()),
                    ));
                }
                Frame::Settings {
                    flags,
                    entries: body
                        .chunks_exact(8)
                        .map(|e| Setting {
                            flags: e[0],
                            id: be32(e) & 0x00ff_ffff,
                            value: be32(&e[4..]),
                        })
                        .collect(),
                }
            }
            TYPE_PING => {
                need("PING", 4)?;
                Frame::Ping { id: be32(p) }
            }
            TYPE_GOAWAY => {
                need("GOAWAY", 8)?;
                Frame::GoAway {
                    last_good_stream_id: be32(p) & 0x7fff_ffff,
                    status: be32(&p[4..]),
                }
            }
            TYPE_WINDOW_UPDATE => {
                need("WINDOW_UPDATE", 8)?;
                Frame::WindowUpdate {
                    stream_id: be32(p) & 0x7fff_ffff,
                    delta: be32(&p[4..]) & 0x7fff_ffff,
                }
            }
            _ => return Ok(None),
        }))
    }

    /// Inflates one header block (it ends with a sync flush) and parses it.
    fn headers(&mut self, input: &[u8]) -> Result<Headers, Error> {
        let zerr = |e: &dyn std::fmt::Display| Error::Compression(e.to_string());
        let start = self.inflate.total_in();
        let mut out = Vec::with_capacity(input.len() * 4 + 64);
        loop {
            let used = (self.inflate.total_in() - start) as usize;
            if out.len() == out.capacity() {
                out.reserve(1024);
            }
            let (in_before, out_before) = (self.inflate.total_in(), self.inflate.total_out());
            match self
                .inflate
                .decompress_vec(&input[used..], &mut out, FlushDecompress::Sync)
            {
                Ok(Status::StreamEnd) => break,
                Ok(_) => {}
                Err(e) => match e.needs_dictionary() {
                    Some(id) => {
                        let ours = adler32(dictionary());
                        if id != ours {
                            return Err(Error::Compression(format!(
                                "block asks for dictionary {id:#010x}, SPDY/3's is {ours:#010x}"
                            )));
                        }
                        self.inflate
                            .set_dictionary(dictionary())
                            .map_err(|e| zerr(&e))?;
                        continue;
                    }
                    None => return Err(zerr(&e)),
                },
            }
            let used = (self.inflate.total_in() - start) as usize;
            let stalled =
                self.inflate.total_in() == in_before && self.inflate.total_out() == out_before;
            if (used == input.len() && out.len() < out.capacity()) || stalled {
                break;
            }
        }
        if ((self.inflate.total_in() - start) as usize) < input.len() {
            return Err(Error::Compression(
                "compressed block longer than its content".into(),
            ));
        }
        parse_block(&out)
    }
}

fn parse_block(b: &[u8]) -> Result<Headers, Error> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Result<&[u8], Error> {
        let s = b
            .get(at..at + n)
            .ok_or_else(|| Error::Compression("header block is truncated".into()))?;
        at += n;
        Ok(s)
    };
    let count = be32(take(4)?);
    let mut headers = Vec::new();
    for _ in 0..count {
        let n = be32(take(4)?) as usize;
        let name = String::from_utf8_lossy(take(n)?).into_owned();
        let n = be32(take(4)?) as usize;
        let value = String::from_utf8_lossy(take(n)?).into_owned();
        if name.is_empty() {
            return Err(Error::Compression("empty header name".into()));
        }
        headers.push((
            name.to_ascii_lowercase(),
            value.split('\0').map(str::to_string).collect(),
        ));
    }
    Ok(Headers(headers))
}

/// Adler-32 (RFC 1950), the dictionary id in a zlib header.
pub fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for chunk in data.chunks(5552) {
        for &x in chunk {
            a += u32::from(x);
            b += a;
        }
        a %= 65521;
        b %= 65521;
    }
    b << 16 | a
}

/// Writes frames for one direction of a connection (it owns that
/// direction's zlib stream: frames must go out in the order encoded).
pub struct Encoder {
    deflate: Compress,
}

impl Default for Encoder {
    fn default() -> Self {
        Self::new()
    }
}

impl Encoder {
    pub fn new() -> Self {
        let mut deflate = Compress::new(Compression::best(), true);
        deflate
            .set_dictionary(dictionary())
            .expect("a fresh zlib stream takes a dictionary");
        Self { deflate }
    }

    pub fn encode(&mut self, frame: &Frame) -> Vec<u8> {
        let control = |kind: u16, flags: u8, payload: Vec<u8>| {
            let mut out = Vec::with_capacity(8 + payload.len());
            out.extend_from_slice(&(0x8000 | VERSION).to_be_bytes());
            out.extend_from_slice(&kind.to_be_bytes());
            out.extend_from_slice(&(u32::from(flags) << 24 | payload.len() as u32).to_be_bytes());
            out.extend_from_slice(&payload);
            out
        };
        let pair = |a: u32, b: u32| [a.to_be_bytes(), b.to_be_bytes()].concat();
        match frame {
            Frame::SynStream {
                stream_id,
                associated_to,
                priority,
                flags,
                headers,
            } => {
                let mut p = pair(*stream_id, *associated_to);
                p.extend_from_slice(&[priority << 5, 0]);
                p.extend(self.block(headers));
                control(TYPE_SYN_STREAM, *flags, p)
            }
            Frame::SynReply {
                stream_id,
                flags,
                headers,
            } => {
                let mut p = stream_id.to_be_bytes().to_vec();
                p.extend(self.block(headers));
                control(TYPE_SYN_REPLY, *flags, p)
            }
            Frame::Headers {
                stream_id,
                flags,
                headers,
            } => {
                let mut p = stream_id.to_be_bytes().to_vec();
                p.extend(self.block(headers));
                control(TYPE_HEADERS, *flags, p)
            }
            Frame::RstStream { stream_id, status } => {
                control(TYPE_RST_STREAM, 0, pair(*stream_id, *status))
            }
            Frame::Settings { flags, entries } => {
                let mut p = (entries.len() as u32).to_be_bytes().to_vec();
                for e in entries {
                    p.extend_from_slice(&(u32::from(e.flags) << 24 | e.id).to_be_bytes());
                    p.extend_from_slice(&e.value.to_be_bytes());
                }
                control(TYPE_SETTINGS, *flags, p)
            }
            Frame::Ping { id } => control(TYPE_PING, 0, id.to_be_bytes().to_vec()),
            Frame::GoAway {
                last_good_stream_id,
                status,
            } => control(TYPE_GOAWAY, 0, pair(*last_good_stream_id, *status)),
            Frame::WindowUpdate { stream_id, delta } => {
                control(TYPE_WINDOW_UPDATE, 0, pair(*stream_id, *delta))
            }
            Frame::Data {
                stream_id,
                flags,
                data,
            } => {
                debug_assert!(data.len() <= MAX_PAYLOAD);
                let mut out = Vec::with_capacity(8 + data.len());
                out.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
                out.extend_from_slice(&(u32::from(*flags) << 24 | data.len() as u32).to_be_bytes());
                out.extend_from_slice(data);
                out
            }
        }
    }

    /// Serializes and deflates one header block, ending with a sync flush.
    fn block(&mut self, headers: &Headers) -> Vec<u8> {
        let mut raw = (headers.0.len() as u32).to_be_bytes().to_vec();
        for (name, values) in &headers.0 {
            let name = name.to_ascii_lowercase();
            let value = values.join("\0");
            raw.extend_from_slice(&(name.len() as u32).to_be_bytes());
            raw.extend_from_slice(name.as_bytes());
            raw.extend_from_slice(&(value.len() as u32).to_be_bytes());
            raw.extend_from_slice(value.as_bytes());
        }
        let start = self.deflate.total_in();
        let mut out = Vec::with_capacity(raw.len() + 64);
        loop {
            let used = (self.deflate.total_in() - start) as usize;
            if out.len() == out.capacity() {
                out.reserve(256);
            }
            self.deflate
                .compress_vec(&raw[used..], &mut out, FlushCompress::Sync)
                .expect("deflating into memory");
            let used = (self.deflate.total_in() - start) as usize;
            if used == raw.len() && out.len() < out.capacity() {
                break;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dictionary_is_spdy3s() {
        // SPDY/3 section 2.6.10.1: 1423 bytes; zlib names it by its Adler-32.
        assert_eq!(dictionary().len(), 1423);
        assert_eq!(adler32(dictionary()), 0xe3c6_a7c2);
        assert_eq!(&dictionary()[..11], b"\0\0\0\x07options");
        assert!(dictionary().ends_with(b"utf-,*,enq=0."));
    }

    #[test]
    fn frames_round_trip_with_a_shared_compression_stream() {
        let mut enc = Encoder::new();
        let mut dec = Decoder::new();
        let frames = vec![
            Frame::SynStream {
                stream_id: 1,
                associated_to: 0,
                priority: 0,
                flags: 0,
                headers: Headers::default()
                    .with("streamtype", "error")
                    .with("port", "80")
                    .with("requestid", "0"),
            },
            Frame::SynReply {
                stream_id: 1,
                flags: 0,
                headers: Headers::default(),
            },
            Frame::SynStream {
                stream_id: 3,
                associated_to: 0,
                priority: 2,
                flags: FLAG_FIN,
                headers: Headers(vec![("a".into(), vec!["x".into(), "y".into()])]),
            },
            Frame::Data {
                stream_id: 3,
                flags: FLAG_FIN,
                data: b"hello".to_vec(),
            },
            Frame::RstStream {
                stream_id: 3,
                status: RST_CANCEL,
            },
            Frame::Settings {
                flags: 0,
                entries: vec![Setting {
                    flags: 1,
                    id: 7,
                    value: 65536,
                }],
            },
            Frame::Ping { id: 1 },
            Frame::WindowUpdate {
                stream_id: 1,
                delta: 4096,
            },
            Frame::Headers {
                stream_id: 1,
                flags: 0,
                headers: Headers::default().with("x", "y"),
            },
            Frame::GoAway {
                last_good_stream_id: 3,
                status: GOAWAY_OK,
            },
        ];
        let mut wire = Vec::new();
        for f in &frames {
            wire.extend(enc.encode(f));
        }
        // Fed in small pieces, as a socket or WebSocket messages deliver it.
        let mut buf = Vec::new();
        let mut got = Vec::new();
        for piece in wire.chunks(7) {
            buf.extend_from_slice(piece);
            while let Some(f) = dec.next_frame(&mut buf).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, frames);
        assert!(buf.is_empty());
    }

    #[test]
    fn header_blocks_name_the_spdy3_dictionary() {
        let mut enc = Encoder::new();
        let f = enc.encode(&Frame::SynReply {
            stream_id: 1,
            flags: 0,
            headers: Headers::default(),
        });
        let z = &f[12..];
        // zlib header: deflate, FDICT set, then the dictionary's Adler-32.
        assert_eq!(z[0] & 0x0f, 8);
        assert_ne!(z[1] & 0x20, 0);
        assert_eq!(be32(&z[2..]), adler32(dictionary()));
    }

    #[test]
    fn unknown_control_frames_are_skipped_and_bad_versions_refused() {
        let mut dec = Decoder::new();
        let mut buf = vec![0x80, 3, 0, 10, 0, 0, 0, 2, 0xaa, 0xbb];
        buf.extend(Encoder::new().encode(&Frame::Ping { id: 5 }));
        assert_eq!(
            dec.next_frame(&mut buf).unwrap(),
            Some(Frame::Ping { id: 5 })
        );
        let mut buf = vec![0x80, 2, 0, 6, 0, 0, 0, 4, 0, 0, 0, 1];
        assert!(matches!(dec.next_frame(&mut buf), Err(Error::Version(2))));
    }
}
