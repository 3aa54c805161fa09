//! The contract between tpbpfd and the user's side of a bridge.
//!
//! tpbpfd (root: eBPF programs, cgroups, listeners) and the user's side
//! (kubeconfig, exec credential plugins, the tunnel, intercepts) are two
//! processes, or two halves of one process for root, that talk over one
//! `SOCK_SEQPACKET` connection to [`DEFAULT_SOCKET`]. Each frame is a
//! header and a payload (`tpbpf_sys::seqpacket`), with at most one passed
//! descriptor:
//! - requests and answers ([`ToService`], [`FromService`]) have a JSON
//!   header;
//! - datagrams and DNS messages, the traffic itself, have a binary
//!   [`Datagram`] header, a few bytes, and their bytes as the payload;
//! - a redirected TCP connection is [`FromService::Tcp`] with the
//!   connection's socket passed along: after that hand-over the kernel
//!   carries its bytes between the application and the user's side.
//!
//! This crate holds the shapes, paths and limits both sides obey, and
//! nothing that does I/O.
pub mod datagram;
pub mod limits;
mod messages;

use std::path::PathBuf;

pub use datagram::Datagram;
pub use messages::{DnsRequest, FromService, Ready, ToService, UpRequest};

/// Where tpbpfd listens (override: `TPBPF_SERVICE_SOCKET`).
pub const DEFAULT_SOCKET: &str = "/run/tpbpf/tpbpfd.sock";
/// The group whose members may use tpbpfd.
pub const GROUP: &str = "tpbpf";
/// The directory of tpbpfd's state, and root's bridges.
pub const RUN_DIR: &str = "/run/tpbpf";

/// The service socket this process talks to.
pub fn socket_path() -> PathBuf {
    std::env::var_os("TPBPF_SERVICE_SOCKET")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

/// Where a user's bridges keep their state (made by tpbpfd, owned by the
/// user, 0700).
pub fn user_dir(uid: u32) -> PathBuf {
    PathBuf::from(RUN_DIR).join(format!("uid-{uid}"))
}
