//! Frames on tpbpfd's service socket (`SOCK_SEQPACKET`, so each frame is one
//! record and a passed descriptor travels with the frame it belongs to):
//! a 2-byte header length, a header, then a binary payload. The header is
//! JSON for requests and answers, or one of the contract's binary headers
//! for the datagrams and DNS messages that follow (`tpbpf-bridge-api`).
use std::{
    io::{self, IoSlice, IoSliceMut},
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    sync::Mutex,
};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{de::DeserializeOwned, Serialize};
use tokio::io::unix::AsyncFd;

/// The largest header.
pub const MAX_HEADER: usize = 16 * 1024;
/// The largest payload (a datagram, a DNS message).
pub const MAX_PAYLOAD: usize = 64 * 1024;
const MAX_FRAME: usize = 2 + MAX_HEADER + MAX_PAYLOAD;

/// One frame as received.
pub struct Frame {
    pub header: Vec<u8>,
    pub payload: Vec<u8>,
    /// The descriptor passed with it (`SCM_RIGHTS`), if any.
    pub fd: Option<OwnedFd>,
}

impl Frame {
    /// The header as a JSON message.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, String> {
        serde_json::from_slice(&self.header).map_err(|e| format!("not a message: {e}"))
    }
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// A message as a frame's JSON header.
pub fn json(message: &impl Serialize) -> io::Result<Vec<u8>> {
    serde_json::to_vec(message).map_err(io::Error::other)
}

/// Sends one frame (blocking or not, as the socket is).
pub fn send_frame(
    sock: BorrowedFd<'_>,
    header: &[u8],
    payload: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    if header.len() > MAX_HEADER || payload.len() > MAX_PAYLOAD {
        return Err(invalid(format!(
            "a frame of {} + {} bytes is over the limit ({MAX_HEADER} + {MAX_PAYLOAD})",
            header.len(),
            payload.len()
        )));
    }
    let len = (header.len() as u16).to_be_bytes();
    let iov = [
        IoSlice::new(&len),
        IoSlice::new(header),
        IoSlice::new(payload),
    ];
    let raw: [RawFd; 1] = [fd.map_or(-1, |f| f.as_raw_fd())];
    let cmsgs: &[ControlMessage] = if fd.is_some() {
        &[ControlMessage::ScmRights(&raw)]
    } else {
        &[]
    };
    sendmsg::<()>(sock.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)?;
    Ok(())
}

/// Receives one frame; `None` at the end of the connection. A frame that
/// was cut (too long), carries more than one descriptor or is malformed is
/// an error, and any descriptors it carried are closed.
pub fn recv_frame(sock: BorrowedFd<'_>) -> io::Result<Option<Frame>> {
    recv_frame_with(sock, &mut Vec::new())
}

/// [`recv_frame`] into `buf`, a buffer kept between calls: only the
/// frame's own bytes are allocated per frame.
fn recv_frame_with(sock: BorrowedFd<'_>, buf: &mut Vec<u8>) -> io::Result<Option<Frame>> {
    buf.resize(MAX_FRAME + 1, 0);
    let mut cmsg = nix::cmsg_space!([RawFd; 4]);
    let (n, flags, fds) = {
        let mut iov = [IoSliceMut::new(buf)];
        let msg = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut fds = Vec::new();
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(raw) = c {
                    // SAFETY: the kernel just installed these descriptors in
                    // this process for us; nothing else owns them.
                    fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
                }
            }
        }
        (msg.bytes, msg.flags, fds)
    };
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    if flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC) || n > MAX_FRAME {
        return Err(invalid(format!(
            "a frame over {MAX_FRAME} bytes or with too many descriptors"
        )));
    }
    if fds.len() > 1 {
        return Err(invalid(format!("a frame with {} descriptors", fds.len())));
    }
    if n < 2 {
        return Err(invalid("a frame without a header".into()));
    }
    let hlen = u16::from_be_bytes([buf[0], buf[1]]) as usize;
    if hlen > MAX_HEADER || 2 + hlen > n {
        return Err(invalid(format!(
            "a header of {hlen} bytes in a frame of {n}"
        )));
    }
    Ok(Some(Frame {
        header: buf[2..2 + hlen].to_vec(),
        payload: buf[2 + hlen..n].to_vec(),
        fd: fds.into_iter().next(),
    }))
}

/// A connected service socket, for tokio.
pub struct Channel {
    fd: AsyncFd<OwnedFd>,
    /// The receive buffer, kept between frames (one reader at a time).
    buf: Mutex<Vec<u8>>,
}

impl Channel {
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        let sock = socket2::Socket::from(fd);
        sock.set_nonblocking(true)?;
        // SAFETY: an OwnedFd keeps its one descriptor open until dropped.
        let fd = unsafe { AsyncFd::register(OwnedFd::from(sock)) }?;
        Ok(Self {
            fd,
            buf: Mutex::new(Vec::new()),
        })
    }

    /// Sends a frame whose header is the JSON of `message`.
    pub async fn send(
        &self,
        message: &impl Serialize,
        payload: &[u8],
        fd: Option<BorrowedFd<'_>>,
    ) -> io::Result<()> {
        self.send_raw(&json(message)?, payload, fd).await
    }

    /// Sends a frame with a header already encoded.
    pub async fn send_raw(
        &self,
        header: &[u8],
        payload: &[u8],
        fd: Option<BorrowedFd<'_>>,
    ) -> io::Result<()> {
        loop {
            let mut ready = self.fd.writable().await?;
            match ready.try_io(|s| send_frame(s.as_fd(), header, payload, fd)) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    pub async fn recv(&self) -> io::Result<Option<Frame>> {
        loop {
            let mut ready = self.fd.readable().await?;
            let mut buf = self.buf.lock().unwrap_or_else(|p| p.into_inner());
            match ready.try_io(|s| recv_frame_with(s.as_fd(), &mut buf)) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
}

/// The peer's credentials: uid, gid, pid (`SO_PEERCRED`) and supplementary
/// groups (`SO_PEERGROUPS`), as they were when it connected.
#[derive(Clone, Debug)]
pub struct Peer {
    pub uid: u32,
    pub gid: u32,
    pub pid: i32,
    pub groups: Vec<u32>,
}

impl Peer {
    pub fn of(sock: BorrowedFd<'_>) -> io::Result<Self> {
        let cred = nix::sys::socket::getsockopt(&sock, nix::sys::socket::sockopt::PeerCredentials)?;
        let mut groups = vec![0 as libc::gid_t; 64];
        loop {
            let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
            // SAFETY: `groups` has room for `len` bytes, and len is updated
            // with what the kernel wrote (or needs).
            let r = unsafe {
                libc::getsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_PEERGROUPS,
                    groups.as_mut_ptr().cast(),
                    &mut len,
                )
            };
            let count = len as usize / std::mem::size_of::<libc::gid_t>();
            if r == 0 {
                groups.truncate(count);
                break;
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ERANGE) && count > groups.len() && count <= 65536 {
                groups.resize(count, 0);
                continue;
            }
            return Err(e);
        }
        Ok(Self {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
            groups,
        })
    }

    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use socket2::{Domain, Socket, Type};

    use super::*;

    fn pair() -> (Socket, Socket) {
        Socket::pair(Domain::UNIX, Type::SEQPACKET, None).unwrap()
    }

    #[test]
    fn a_frame_carries_its_header_payload_and_descriptor() {
        let (a, b) = pair();
        let passed = std::fs::File::open("/dev/null").unwrap();
        send_frame(
            a.as_fd(),
            &json(&serde_json::json!({"op": "x"})).unwrap(),
            b"payload",
            Some(passed.as_fd()),
        )
        .unwrap();
        let f = recv_frame(b.as_fd()).unwrap().unwrap();
        assert_eq!(f.header, br#"{"op":"x"}"#);
        assert_eq!(f.payload, b"payload");
        assert!(f.fd.is_some());
        drop(a);
        assert!(
            recv_frame(b.as_fd()).unwrap().is_none(),
            "end of connection"
        );
    }

    #[test]
    fn malformed_and_oversized_frames_are_refused() {
        let (a, b) = pair();
        // One byte: no header length.
        a.send(&[1]).unwrap();
        assert!(recv_frame(b.as_fd()).is_err());
        // A header length past the frame's end.
        a.send(&[0xff, 0xff, b'{']).unwrap();
        assert!(recv_frame(b.as_fd()).is_err());
        // Over the frame limit: cut by the kernel, refused.
        let mut big = vec![0u8; MAX_FRAME + 100];
        big[1] = 2;
        a.set_send_buffer_size(4 * MAX_FRAME).unwrap();
        a.send(&big).unwrap();
        assert!(recv_frame(b.as_fd()).is_err());
        // Too big to send.
        let payload = vec![0u8; MAX_PAYLOAD + 1];
        assert!(send_frame(a.as_fd(), b"1", &payload, None).is_err());
        // Still in step after all that.
        send_frame(a.as_fd(), b"2", b"ok", None).unwrap();
        let f = recv_frame(b.as_fd()).unwrap().unwrap();
        assert_eq!(
            (f.header.as_slice(), f.payload.as_slice()),
            (&b"2"[..], &b"ok"[..])
        );
    }

    #[test]
    fn a_frame_with_two_descriptors_is_refused_and_both_are_closed() {
        let (a, b) = pair();
        // Both passed descriptors are a pipe's write end: once they are
        // closed (and ours), its read end sees the end of the pipe.
        let (rd, wr) = nix::unistd::pipe().unwrap();
        let raw = [wr.as_raw_fd(), wr.as_raw_fd()];
        let iov = [IoSlice::new(&[0, 1, b'1'])];
        sendmsg::<()>(
            a.as_raw_fd(),
            &iov,
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        drop(wr);
        assert!(recv_frame(b.as_fd()).is_err());
        // SAFETY: fcntl on a descriptor this test owns.
        unsafe { libc::fcntl(rd.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        let mut file = std::fs::File::from(rd);
        let mut buf = [0u8; 1];
        let n = std::io::Read::read(&mut file, &mut buf);
        assert_eq!(n.ok(), Some(0), "a passed descriptor is still open");
    }
}
