//! Reading frames: one direction's bytes into [`Frame`]s, its header
//! blocks inflated with the shared zlib stream.
use flate2::{Decompress, FlushDecompress, Status};

use super::*;

fn invalid(what: &'static str, why: impl Into<String>) -> Error {
    Error::Invalid {
        what,
        why: why.into(),
    }
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
