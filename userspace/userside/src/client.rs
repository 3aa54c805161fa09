//! Asking tpbpfd: its socket for a user (`TPBPF_SERVICE_SOCKET`, else
//! `/run/tpbpf/tpbpfd.sock`), or for root one end of a socket pair whose
//! other end tpbpfd's service serves in the same process.
use std::{
    io,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
};

use socket2::{Domain, SockAddr, Socket, Type};
use tpbpf_bridge_api::{
    limits::{REQUEST_TIMEOUT, UP_TIMEOUT},
    FromService, Ready, ToService, UpRequest, GROUP,
};
use tpbpf_sys::seqpacket::{self, Channel};

/// Where tpbpfd is.
pub enum ServiceAt {
    /// The service socket.
    Socket(PathBuf),
    /// A connection already made (root's in-process tpbpfd).
    Connected(Socket),
}

/// Why talking to tpbpfd failed, said so the user knows what to do.
fn connect_error(path: &Path, e: &io::Error) -> io::Error {
    let uid = nix::unistd::getuid();
    let user = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map_or_else(|| format!("uid {uid}"), |u| u.name);
    let text = match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ECONNREFUSED) => format!(
            "tpbpfd is not running here (nothing listens on {}): `sudo tpbpf service install` sets it up once (or run this command as root)",
            path.display()
        ),
        Some(libc::EACCES) | Some(libc::EPERM) => format!(
            "{user} may not use tpbpfd ({}): only root and members of group `{GROUP}` may; `sudo usermod -aG {GROUP} {user}`, then log in again",
            path.display()
        ),
        _ => format!("connecting to tpbpfd at {}: {e}", path.display()),
    };
    io::Error::new(e.kind(), text)
}

impl ServiceAt {
    fn connect(self) -> io::Result<Socket> {
        match self {
            Self::Connected(s) => Ok(s),
            Self::Socket(path) => {
                let sock = Socket::new(Domain::UNIX, Type::SEQPACKET, None)?;
                sock.connect(&SockAddr::unix(&path)?)
                    .map_err(|e| connect_error(&path, &e))?;
                Ok(sock)
            }
        }
    }
}

fn refused(error: String) -> io::Error {
    io::Error::new(io::ErrorKind::PermissionDenied, error)
}

/// Asks tpbpfd for this user's state directory (it makes it the first
/// time), blocking: before any runtime starts.
pub fn prepare(path: &Path) -> io::Result<PathBuf> {
    let sock = ServiceAt::Socket(path.to_path_buf()).connect()?;
    sock.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    sock.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    seqpacket::send_frame(
        sock.as_fd(),
        &seqpacket::json(&ToService::Prepare)?,
        &[],
        None,
    )?;
    let frame = seqpacket::recv_frame(sock.as_fd())?
        .ok_or_else(|| io::Error::other("tpbpfd closed the connection without an answer"))?;
    match frame.parse::<FromService>().map_err(io::Error::other)? {
        FromService::Prepared { state_dir } => Ok(state_dir),
        FromService::Refused { error } => Err(refused(error)),
        other => Err(io::Error::other(format!("tpbpfd answered {other:?}"))),
    }
}

/// Asks tpbpfd for a bridge (with `run`, `pidfd` names the command); the
/// returned channel carries its traffic, for [`crate::handover::serve`].
pub async fn up(
    at: ServiceAt,
    request: UpRequest,
    pidfd: Option<BorrowedFd<'_>>,
) -> io::Result<(Channel, Ready)> {
    let sock = at.connect()?;
    let chan = Channel::new(OwnedFd::from(sock))?;
    chan.send(&ToService::Up(Box::new(request)), &[], pidfd)
        .await?;
    let frame = tokio::time::timeout(UP_TIMEOUT, chan.recv())
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("tpbpfd did not answer within {} s", UP_TIMEOUT.as_secs()),
            )
        })??
        .ok_or_else(|| io::Error::other("tpbpfd closed the connection without an answer"))?;
    match frame.parse::<FromService>().map_err(io::Error::other)? {
        FromService::Ready(ready) => Ok((chan, ready)),
        FromService::Refused { error } => {
            Err(refused(format!("tpbpfd refused the bridge: {error}")))
        }
        other => Err(io::Error::other(format!("tpbpfd answered {other:?}"))),
    }
}
