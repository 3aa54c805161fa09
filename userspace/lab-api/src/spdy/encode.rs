//! Writing frames: [`Frame`]s into one direction's bytes, its header
//! blocks deflated with the shared zlib stream.
use flate2::{Compress, Compression, FlushCompress};

use super::*;

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
