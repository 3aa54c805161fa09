//! tpbpf's tunnel wire protocol: the messages between tpbpfd and an agent,
//! and pure functions to encode and decode them. No I/O.
//!
//! A session starts with a [`Hello`] from the client; everything after is a
//! sequence of frames:
//!
//! ```text
//! +----------------+--------+--------+----------------+----------------+
//! | length (u32 BE)| type u8| flags u8| id (u32 BE)    | body (length)  |
//! +----------------+--------+--------+----------------+----------------+
//! ```
//! The server answers the hello with a [`Welcome`] (accepted, resumed or
//! refused, and why).
//!
//! `length` counts the body only and is checked against [`MAX_BODY`] before
//! anything is allocated. `id` is the stream (or flow, query, intercept) id.
//!
//! # Compatibility rules
//! - The hello carries the protocol version; the server answers with the
//!   version both speak (the lower one) or refuses the session; either side
//!   refuses a version below [`MIN_VERSION`].
//! - A frame type whose meaning changes (not its layout: bodies never
//!   change) raises [`VERSION`] and, where the old meaning cannot be
//!   spoken any more, [`MIN_VERSION`].
//! - New frame types are appended with new type numbers and only sent to a
//!   peer whose negotiated version knows them; a peer that receives an
//!   unknown type drops the session with [`DecodeError::UnknownType`].
//! - Existing bodies never change layout; new fields go into new types.
//! - Resume counts bytes of reliable frames only (everything but ping, pong
//!   and ack), so both ends agree on offsets whatever keepalive traffic each
//!   transport carried.
//! - Flags bits not defined for a type must be zero and are rejected
//!   otherwise, so they can be given a meaning later.
mod codec;
mod frame;

pub use codec::{
    data_frame, decode, decode_hello, decode_welcome, encode, encode_data, encode_data_parts,
    encode_hello, encode_welcome, DecodeError, HEADER_LEN,
};
pub use frame::{
    identity_message, Credential, Destination, Frame, Hello, IdentityProof, InterceptMode,
    ResetReason, Welcome, WelcomeStatus, MAX_PROOF_CHAIN, MAX_PROOF_NAME,
};

/// The protocol version this crate speaks.
pub const VERSION: u16 = 3;
/// The oldest version it accepts. Version 2 opens intercepted connections
/// with [`Frame::InterceptIncoming`], which version 1 read as a notice and
/// ignored (and then failed on the stream's data). Version 3's agent asks
/// for an identity ([`Frame::InterceptProof`]) with a challenge that
/// version 2 would answer by port-forwarding to port 0. An older peer is
/// refused at the hello rather than mid-session; the agent and the CLI ship
/// together.
pub const MIN_VERSION: u16 = 3;
/// The largest frame body accepted (and sent): 256 KiB.
pub const MAX_BODY: u32 = 256 * 1024;
/// The credit each side has on a new stream before any credit frame: what
/// the opener may send with the open, and right after it.
pub const INITIAL_WINDOW: u32 = 64 * 1024;
/// Magic bytes that open a hello, so garbage is refused at once.
pub const MAGIC: [u8; 4] = *b"TPBF";
/// Magic bytes that open a welcome.
pub const WELCOME_MAGIC: [u8; 4] = *b"TPBW";
