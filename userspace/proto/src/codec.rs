//! Encoding and decoding: pure functions over byte slices.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::{
    Credential, Destination, Frame, Hello, IdentityProof, InterceptMode, ResetReason, Welcome,
    WelcomeStatus, MAGIC, MAX_BODY, MAX_PROOF_CHAIN, MAX_PROOF_NAME, WELCOME_MAGIC,
};

/// length (4) + type (1) + flags (1) + id (4).
pub const HEADER_LEN: usize = 10;
/// A hello's fixed part: magic, version, session, resume, received, token length.
const HELLO_FIXED: usize = 4 + 2 + 16 + 1 + 8 + 2;
/// A welcome's fixed part: magic, version, status, received, message length.
const WELCOME_FIXED: usize = 4 + 2 + 1 + 8 + 2;
/// The largest token a hello may carry.
const MAX_TOKEN: usize = 4096;

/// Why bytes from the peer are not a frame (or a frame cannot be encoded).
///
/// `Display` and `Error` are written out here rather than derived: the
/// protocol crate depends on nothing, so every process can speak it.
#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    TooLarge(u32),
    UnknownType(u8),
    Flags { kind: u8, flags: u8 },
    Malformed { what: &'static str },
    BadMagic,
    TokenTooLarge(usize),
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::TooLarge(len) => write!(
                f,
                "frame body of {len} bytes is larger than the maximum {MAX_BODY}"
            ),
            Self::UnknownType(kind) => write!(
                f,
                "unknown frame type {kind} (a newer peer? the versions should have been negotiated)"
            ),
            Self::Flags { kind, flags } => {
                write!(f, "frame type {kind} has undefined flags {flags:#04x}")
            }
            Self::Malformed { what } => write!(f, "malformed {what}"),
            Self::BadMagic => {
                f.write_str("not a tpbpf tunnel: the peer did not start with a tpbpf hello")
            }
            Self::TokenTooLarge(len) => write!(
                f,
                "hello token of {len} bytes is larger than the maximum {MAX_TOKEN}"
            ),
        }
    }
}

impl std::error::Error for DecodeError {}

const OPEN: u8 = 1;
const DATA: u8 = 2;
const CREDIT: u8 = 3;
const HALF_CLOSE: u8 = 4;
const RESET: u8 = 5;
const DATAGRAM: u8 = 6;
const DNS_QUERY: u8 = 7;
const DNS_ANSWER: u8 = 8;
const INTERCEPT_INCOMING: u8 = 9;
const PING: u8 = 10;
const PONG: u8 = 11;
const GO_AWAY: u8 = 12;
const ACK: u8 = 13;
const INTERCEPT_START: u8 = 14;
const INTERCEPT_STATUS: u8 = 15;
const INTERCEPT_STOP: u8 = 16;
const INTERCEPT_CHALLENGE: u8 = 17;
const INTERCEPT_PROOF: u8 = 18;
const LAST: u8 = INTERCEPT_PROOF;

/// Appends `frame` to `out`. Fails, appending nothing, if its body would be
/// larger than [`MAX_BODY`] (split data before encoding it).
pub fn encode(frame: &Frame, out: &mut Vec<u8>) -> Result<(), DecodeError> {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER_LEN]);
    let (kind, id) = match frame {
        Frame::Open { stream, dst, data } => {
            put_dst(out, dst);
            out.extend_from_slice(data);
            (OPEN, *stream)
        }
        Frame::Data { stream, data } => {
            out.extend_from_slice(data);
            (DATA, *stream)
        }
        Frame::Credit { stream, bytes } => {
            out.extend_from_slice(&bytes.to_be_bytes());
            (CREDIT, *stream)
        }
        Frame::HalfClose { stream } => (HALF_CLOSE, *stream),
        Frame::Reset {
            stream,
            reason,
            message,
        } => {
            out.push(reason_code(*reason));
            put_str(out, message);
            (RESET, *stream)
        }
        Frame::Datagram { flow, dst, data } => {
            put_dst(out, dst);
            out.extend_from_slice(data);
            (DATAGRAM, *flow)
        }
        Frame::DnsQuery { id, query } => {
            out.extend_from_slice(query);
            (DNS_QUERY, *id)
        }
        Frame::DnsAnswer { id, answer } => {
            out.extend_from_slice(answer);
            (DNS_ANSWER, *id)
        }
        Frame::InterceptIncoming {
            intercept,
            stream,
            src,
            dst,
        } => {
            out.extend_from_slice(&stream.to_be_bytes());
            put_addr(out, src);
            put_addr(out, dst);
            (INTERCEPT_INCOMING, *intercept)
        }
        Frame::InterceptStart {
            intercept,
            target,
            mode,
        } => {
            put_addr(out, target);
            match mode {
                InterceptMode::Steal => out.push(0),
                InterceptMode::Header { name, value } => {
                    out.push(1);
                    put_str(out, name);
                    put_str(out, value);
                }
                InterceptMode::PathPrefix(p) => {
                    out.push(2);
                    put_str(out, p);
                }
                InterceptMode::Mirror => out.push(3),
            }
            (INTERCEPT_START, *intercept)
        }
        Frame::InterceptStatus {
            intercept,
            ok,
            message,
        } => {
            out.push(u8::from(*ok));
            put_str(out, message);
            (INTERCEPT_STATUS, *intercept)
        }
        Frame::InterceptStop { intercept } => (INTERCEPT_STOP, *intercept),
        Frame::InterceptChallenge {
            intercept,
            port,
            nonce,
        } => {
            out.extend_from_slice(&port.to_be_bytes());
            out.extend_from_slice(nonce);
            (INTERCEPT_CHALLENGE, *intercept)
        }
        Frame::InterceptProof { intercept, proof } => {
            put_str(out, &proof.namespace);
            put_str(out, &proof.pod);
            match &proof.credential {
                Credential::Token(t) => {
                    out.push(0);
                    put_str(out, t);
                }
                Credential::Certificate {
                    chain,
                    scheme,
                    signature,
                } => {
                    out.push(1);
                    out.push(chain.len().min(255) as u8);
                    for c in chain.iter().take(255) {
                        put_bytes(out, c);
                    }
                    out.extend_from_slice(&scheme.to_be_bytes());
                    put_bytes(out, signature);
                }
            }
            (INTERCEPT_PROOF, *intercept)
        }
        Frame::Ping { nonce } => {
            out.extend_from_slice(&nonce.to_be_bytes());
            (PING, 0)
        }
        Frame::Pong { nonce } => {
            out.extend_from_slice(&nonce.to_be_bytes());
            (PONG, 0)
        }
        Frame::GoAway { message } => {
            put_str(out, message);
            (GO_AWAY, 0)
        }
        Frame::Ack { received } => {
            out.extend_from_slice(&received.to_be_bytes());
            (ACK, 0)
        }
    };
    let body = out.len() - start - HEADER_LEN;
    if body > MAX_BODY as usize {
        out.truncate(start);
        return Err(DecodeError::TooLarge(
            u32::try_from(body).unwrap_or(u32::MAX),
        ));
    }
    let header = &mut out[start..start + HEADER_LEN];
    header[0..4].copy_from_slice(&(body as u32).to_be_bytes());
    header[4] = kind;
    header[5] = 0;
    header[6..10].copy_from_slice(&id.to_be_bytes());
    Ok(())
}

/// Decodes the first frame of `buf`: `Ok(None)` when more bytes are needed,
/// else the frame and how many bytes it used. The declared length is
/// checked before any allocation.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, DecodeError> {
    let Some(len) = buf.get(0..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]);
    if len > MAX_BODY {
        return Err(DecodeError::TooLarge(len));
    }
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let total = HEADER_LEN + len as usize;
    if buf.len() < total {
        return Ok(None);
    }
    let (kind, flags) = (buf[4], buf[5]);
    let id = u32::from_be_bytes([buf[6], buf[7], buf[8], buf[9]]);
    if !(OPEN..=LAST).contains(&kind) {
        return Err(DecodeError::UnknownType(kind));
    }
    if flags != 0 {
        return Err(DecodeError::Flags { kind, flags });
    }
    // Session-level frames have no id: only zero is canonical.
    if matches!(kind, PING | PONG | GO_AWAY | ACK) && id != 0 {
        return Err(DecodeError::Malformed {
            what: "session frame with a stream id",
        });
    }
    let mut r = Reader(&buf[HEADER_LEN..total]);
    let frame = match kind {
        OPEN => Frame::Open {
            stream: id,
            dst: r.dst()?,
            data: r.rest(),
        },
        DATA => Frame::Data {
            stream: id,
            data: r.rest(),
        },
        CREDIT => Frame::Credit {
            stream: id,
            bytes: r.u32("credit")?,
        },
        HALF_CLOSE => Frame::HalfClose { stream: id },
        RESET => Frame::Reset {
            stream: id,
            reason: reason(r.u8("reset")?)?,
            message: r.str("reset message")?,
        },
        DATAGRAM => Frame::Datagram {
            flow: id,
            dst: r.dst()?,
            data: r.rest(),
        },
        DNS_QUERY => Frame::DnsQuery {
            id,
            query: r.rest(),
        },
        DNS_ANSWER => Frame::DnsAnswer {
            id,
            answer: r.rest(),
        },
        INTERCEPT_INCOMING => Frame::InterceptIncoming {
            intercept: id,
            stream: r.u32("intercept stream")?,
            src: r.addr()?,
            dst: r.addr()?,
        },
        PING => Frame::Ping {
            nonce: r.u64("ping")?,
        },
        PONG => Frame::Pong {
            nonce: r.u64("pong")?,
        },
        GO_AWAY => Frame::GoAway {
            message: r.str("go-away message")?,
        },
        ACK => Frame::Ack {
            received: r.u64("ack")?,
        },
        INTERCEPT_START => Frame::InterceptStart {
            intercept: id,
            target: r.addr()?,
            mode: match r.u8("intercept mode")? {
                0 => InterceptMode::Steal,
                1 => InterceptMode::Header {
                    name: r.str("intercept header")?,
                    value: r.str("intercept header value")?,
                },
                2 => InterceptMode::PathPrefix(r.str("intercept path")?),
                3 => InterceptMode::Mirror,
                _ => {
                    return Err(DecodeError::Malformed {
                        what: "intercept mode",
                    })
                }
            },
        },
        INTERCEPT_STATUS => Frame::InterceptStatus {
            intercept: id,
            ok: match r.u8("intercept status")? {
                0 => false,
                1 => true,
                _ => {
                    return Err(DecodeError::Malformed {
                        what: "intercept status",
                    })
                }
            },
            message: r.str("intercept message")?,
        },
        INTERCEPT_STOP => Frame::InterceptStop { intercept: id },
        INTERCEPT_PROOF => Frame::InterceptProof {
            intercept: id,
            proof: r.proof()?,
        },
        _ => Frame::InterceptChallenge {
            intercept: id,
            port: r.u16("challenge port")?,
            nonce: {
                let mut n = [0u8; 16];
                n.copy_from_slice(r.take(16, "challenge nonce")?);
                n
            },
        },
    };
    if !r.0.is_empty() {
        return Err(DecodeError::Malformed {
            what: "frame with trailing bytes",
        });
    }
    Ok(Some((frame, total)))
}

pub fn encode_hello(hello: &Hello, out: &mut Vec<u8>) -> Result<(), DecodeError> {
    if hello.token.len() > MAX_TOKEN {
        return Err(DecodeError::TokenTooLarge(hello.token.len()));
    }
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&hello.version.to_be_bytes());
    out.extend_from_slice(&hello.session);
    out.push(u8::from(hello.resume));
    out.extend_from_slice(&hello.received.to_be_bytes());
    out.extend_from_slice(&(hello.token.len() as u16).to_be_bytes());
    out.extend_from_slice(&hello.token);
    Ok(())
}

/// Decodes a hello: `Ok(None)` when more bytes are needed. Bytes that cannot
/// start a hello are refused at once, before the token is read.
pub fn decode_hello(buf: &[u8]) -> Result<Option<(Hello, usize)>, DecodeError> {
    let n = buf.len().min(4);
    if buf[..n] != MAGIC[..n] {
        return Err(DecodeError::BadMagic);
    }
    if buf.len() < HELLO_FIXED {
        return Ok(None);
    }
    let token_len = usize::from(u16::from_be_bytes([
        buf[HELLO_FIXED - 2],
        buf[HELLO_FIXED - 1],
    ]));
    if token_len > MAX_TOKEN {
        return Err(DecodeError::TokenTooLarge(token_len));
    }
    let total = HELLO_FIXED + token_len;
    if buf.len() < total {
        return Ok(None);
    }
    let mut session = [0u8; 16];
    session.copy_from_slice(&buf[6..22]);
    let resume = match buf[22] {
        0 => false,
        1 => true,
        _ => {
            return Err(DecodeError::Malformed {
                what: "hello resume flag",
            })
        }
    };
    let mut received = [0u8; 8];
    received.copy_from_slice(&buf[23..31]);
    Ok(Some((
        Hello {
            version: u16::from_be_bytes([buf[4], buf[5]]),
            session,
            resume,
            received: u64::from_be_bytes(received),
            token: buf[HELLO_FIXED..total].to_vec(),
        },
        total,
    )))
}

pub fn encode_welcome(welcome: &Welcome, out: &mut Vec<u8>) {
    out.extend_from_slice(&WELCOME_MAGIC);
    out.extend_from_slice(&welcome.version.to_be_bytes());
    out.push(match welcome.status {
        WelcomeStatus::Accepted => 0,
        WelcomeStatus::Resumed => 1,
        WelcomeStatus::Unauthorized => 2,
        WelcomeStatus::UnknownSession => 3,
        WelcomeStatus::Version => 4,
    });
    out.extend_from_slice(&welcome.received.to_be_bytes());
    put_str(out, &welcome.message);
}

/// Decodes a welcome: `Ok(None)` when more bytes are needed.
pub fn decode_welcome(buf: &[u8]) -> Result<Option<(Welcome, usize)>, DecodeError> {
    let n = buf.len().min(4);
    if buf[..n] != WELCOME_MAGIC[..n] {
        return Err(DecodeError::BadMagic);
    }
    if buf.len() < WELCOME_FIXED {
        return Ok(None);
    }
    let mut r = Reader(&buf[4..]);
    let version = r.u16("welcome")?;
    let status = match r.u8("welcome")? {
        0 => WelcomeStatus::Accepted,
        1 => WelcomeStatus::Resumed,
        2 => WelcomeStatus::Unauthorized,
        3 => WelcomeStatus::UnknownSession,
        4 => WelcomeStatus::Version,
        _ => {
            return Err(DecodeError::Malformed {
                what: "welcome status",
            })
        }
    };
    let received = r.u64("welcome")?;
    let len = usize::from(r.u16("welcome")?);
    let total = WELCOME_FIXED + len;
    if buf.len() < total {
        return Ok(None);
    }
    let message = std::str::from_utf8(&buf[WELCOME_FIXED..total])
        .map_err(|_| DecodeError::Malformed {
            what: "welcome message",
        })?
        .to_string();
    Ok(Some((
        Welcome {
            version,
            status,
            received,
            message,
        },
        total,
    )))
}

/// Appends a data frame without building a [`Frame`]: the same bytes as
/// `encode(&Frame::Data { stream, data })`. `data` must not be larger than
/// [`MAX_BODY`].
pub fn encode_data(stream: u32, data: &[u8], out: &mut Vec<u8>) {
    debug_assert!(data.len() <= MAX_BODY as usize);
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.push(DATA);
    out.push(0);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(data);
}

/// Like [`encode_data`] for data in two pieces (a ring buffer's halves).
pub fn encode_data_parts(stream: u32, a: &[u8], b: &[u8], out: &mut Vec<u8>) {
    let len = a.len() + b.len();
    debug_assert!(len <= MAX_BODY as usize);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    out.push(DATA);
    out.push(0);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(a);
    out.extend_from_slice(b);
}

/// If `buf` starts with a complete, valid data frame: its stream and total
/// length (the data is `buf[HEADER_LEN..total]`), so a receiver can take the
/// bytes without copying. `None` for anything else, which [`decode`] handles.
pub fn data_frame(buf: &[u8]) -> Option<(u32, usize)> {
    let h = buf.get(..HEADER_LEN)?;
    let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    if h[4] != DATA || h[5] != 0 || len > MAX_BODY {
        return None;
    }
    let total = HEADER_LEN + len as usize;
    (buf.len() >= total).then(|| (u32::from_be_bytes([h[6], h[7], h[8], h[9]]), total))
}

fn reason_code(r: ResetReason) -> u8 {
    match r {
        ResetReason::Refused => 1,
        ResetReason::Unreachable => 2,
        ResetReason::Aborted => 3,
        ResetReason::ProtocolError => 4,
        ResetReason::ResumeExpired => 5,
        ResetReason::Other => 6,
    }
}

fn reason(code: u8) -> Result<ResetReason, DecodeError> {
    Ok(match code {
        1 => ResetReason::Refused,
        2 => ResetReason::Unreachable,
        3 => ResetReason::Aborted,
        4 => ResetReason::ProtocolError,
        5 => ResetReason::ResumeExpired,
        6 => ResetReason::Other,
        _ => {
            return Err(DecodeError::Malformed {
                what: "reset reason",
            })
        }
    })
}

fn put_addr(out: &mut Vec<u8>, addr: &SocketAddr) {
    match addr.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&addr.port().to_be_bytes());
}

fn put_dst(out: &mut Vec<u8>, dst: &Destination) {
    match dst {
        Destination::Addr(a) => put_addr(out, a),
        Destination::Name { host, port } => {
            // Names longer than 255 bytes are not valid DNS names: cut.
            let host = &host.as_bytes()[..host.len().min(255)];
            out.push(1);
            out.push(host.len() as u8);
            out.extend_from_slice(host);
            out.extend_from_slice(&port.to_be_bytes());
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_bytes(out, s.as_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    let bytes = &b[..b.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// A cursor over a frame body that never reads past its end.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&[u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Malformed { what });
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }
    fn str(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let n = usize::from(self.u16(what)?);
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::Malformed { what })
    }
    fn bytes(&mut self, what: &'static str) -> Result<Vec<u8>, DecodeError> {
        let n = usize::from(self.u16(what)?);
        Ok(self.take(n, what)?.to_vec())
    }
    /// An [`IdentityProof`]: names no longer than a Kubernetes name, at
    /// most [`MAX_PROOF_CHAIN`] certificates.
    fn proof(&mut self) -> Result<IdentityProof, DecodeError> {
        let name = |r: &mut Self, what| {
            let s = r.str(what)?;
            if s.is_empty() || s.len() > MAX_PROOF_NAME {
                return Err(DecodeError::Malformed { what });
            }
            Ok(s)
        };
        let namespace = name(self, "proof namespace")?;
        let pod = name(self, "proof pod")?;
        let credential = match self.u8("proof credential")? {
            0 => Credential::Token(self.str("proof token")?),
            1 => {
                let n = usize::from(self.u8("proof chain length")?);
                if n == 0 || n > MAX_PROOF_CHAIN {
                    return Err(DecodeError::Malformed {
                        what: "proof chain length",
                    });
                }
                let mut chain = Vec::with_capacity(n);
                for _ in 0..n {
                    chain.push(self.bytes("proof certificate")?);
                }
                Credential::Certificate {
                    chain,
                    scheme: self.u16("proof signature scheme")?,
                    signature: self.bytes("proof signature")?,
                }
            }
            _ => {
                return Err(DecodeError::Malformed {
                    what: "proof credential",
                })
            }
        };
        Ok(IdentityProof {
            namespace,
            pod,
            credential,
        })
    }
    fn rest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0).to_vec()
    }
    fn addr(&mut self) -> Result<SocketAddr, DecodeError> {
        let ip = match self.u8("address family")? {
            4 => {
                let b = self.take(4, "IPv4 address")?;
                IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
            }
            6 => {
                let mut o = [0u8; 16];
                o.copy_from_slice(self.take(16, "IPv6 address")?);
                IpAddr::V6(Ipv6Addr::from(o))
            }
            _ => {
                return Err(DecodeError::Malformed {
                    what: "address family",
                })
            }
        };
        Ok(SocketAddr::new(ip, self.u16("port")?))
    }
    fn dst(&mut self) -> Result<Destination, DecodeError> {
        if self.0.first() == Some(&1) {
            self.u8("destination")?;
            let n = usize::from(self.u8("name length")?);
            let host = std::str::from_utf8(self.take(n, "name")?)
                .map_err(|_| DecodeError::Malformed { what: "name" })?
                .to_string();
            return Ok(Destination::Name {
                host,
                port: self.u16("port")?,
            });
        }
        Ok(Destination::Addr(self.addr()?))
    }
}
