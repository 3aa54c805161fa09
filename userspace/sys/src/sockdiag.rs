//! Which local socket a datagram came from: the kernel's socket diagnostics
//! (`NETLINK_SOCK_DIAG`, `inet_diag` for UDP) give the cookie of the socket
//! bound to the datagram's source address, so a UDP slot answers only the
//! socket it was made for, not any local process that sends to its address.
use std::{
    io,
    net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::AsRawFd,
};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLMSG_ERROR: u16 = 2;
/// `inet_diag_req_v2`: family, protocol, ext, pad, states, then the socket id.
const REQ_LEN: usize = 4 + 4 + SOCKID_LEN;
/// `inet_diag_sockid`: sport, dport (be16), src[4], dst[4] (be32), if, cookie[2].
const SOCKID_LEN: usize = 2 + 2 + 16 + 16 + 4 + 8;
const NLMSG_HDR_LEN: usize = 16;

/// The cookie of the UDP socket that receives what `remote` sends to
/// `local` (the socket bound to `local`, connected to `remote` or not), and
/// its owner's uid; `None` if there is none.
pub fn udp_socket_of(local: SocketAddrV4, remote: SocketAddrV4) -> io::Result<Option<(u64, u32)>> {
    query(&request(local.into(), remote.into()))
}

/// [`udp_socket_of`] for IPv6 sockets.
pub fn udp6_socket_of(local: SocketAddrV6, remote: SocketAddrV6) -> io::Result<Option<(u64, u32)>> {
    query(&request(local.into(), remote.into()))
}

/// The `SOCK_DIAG_BY_FAMILY` request for the UDP socket at `local` that
/// `remote` sends to (both of one family): the lookup is an incoming
/// datagram's, source = remote, destination = local.
fn request(local: SocketAddr, remote: SocketAddr) -> Vec<u8> {
    diag_request(libc::IPPROTO_UDP, remote, local)
}

/// A `SOCK_DIAG_BY_FAMILY` request for the `protocol` socket whose id is
/// (`src`, `dst`), in every state, without a cookie.
fn diag_request(protocol: i32, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    // inet_diag puts an IPv4 address in the first of four words.
    let words = |a: SocketAddr| match a.ip() {
        IpAddr::V4(ip) => {
            let mut o = [0u8; 16];
            o[..4].copy_from_slice(&ip.octets());
            o
        }
        IpAddr::V6(ip) => ip.octets(),
    };
    let family = if src.is_ipv4() && dst.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let mut msg = Vec::with_capacity(NLMSG_HDR_LEN + REQ_LEN);
    msg.extend_from_slice(&((NLMSG_HDR_LEN + REQ_LEN) as u32).to_ne_bytes());
    msg.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    msg.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid
    msg.extend_from_slice(&[family as u8, protocol as u8, 0, 0]);
    msg.extend_from_slice(&u32::MAX.to_ne_bytes()); // every state
    msg.extend_from_slice(&src.port().to_be_bytes());
    msg.extend_from_slice(&dst.port().to_be_bytes());
    msg.extend_from_slice(&words(src));
    msg.extend_from_slice(&words(dst));
    msg.extend_from_slice(&0u32.to_ne_bytes()); // any interface
    msg.extend_from_slice(&u32::MAX.to_ne_bytes()); // INET_DIAG_NOCOOKIE
    msg.extend_from_slice(&u32::MAX.to_ne_bytes());
    msg
}

/// Sends one request on a fresh `NETLINK_SOCK_DIAG` socket and reads its answer.
fn query(msg: &[u8]) -> io::Result<Option<(u64, u32)>> {
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd this function owns.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: a buffer of the length given; the kernel's netlink address.
    let sent = unsafe {
        let mut kernel: libc::sockaddr_nl = std::mem::zeroed();
        kernel.nl_family = libc::AF_NETLINK as u16;
        libc::sendto(
            sock.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&raw const kernel).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; 1024];
    // SAFETY: a buffer of the length given.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    parse(&buf[..n as usize])
}

/// The cookie (and owner's uid) of the TCP socket whose own address is
/// `local` and whose peer is `remote`, in the calling thread's network
/// namespace; `None` if there is none. For a connection accepted from a
/// local client, `local` is the accepted socket's peer address and
/// `remote` its own: the answer is the client's socket, established,
/// closing, or in TIME_WAIT (which keeps the socket's cookie).
pub fn tcp_socket_of(local: SocketAddr, remote: SocketAddr) -> io::Result<Option<(u64, u32)>> {
    query(&tcp_request(local, remote))
}

/// The `SOCK_DIAG_BY_FAMILY` request for the TCP socket at `local`
/// connected to `remote`: inet_diag finds a TCP socket by its own address
/// as the source (a UDP one by the datagram's, see [`request`]). An
/// IPv4-mapped pair is asked as IPv4, as the kernel hashes it.
fn tcp_request(local: SocketAddr, remote: SocketAddr) -> Vec<u8> {
    let unmap = |a: SocketAddr| match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => a,
        },
        v4 => v4,
    };
    diag_request(libc::IPPROTO_TCP, unmap(local), unmap(remote))
}

fn parse(buf: &[u8]) -> io::Result<Option<(u64, u32)>> {
    let u32_at =
        |i: usize| -> Option<u32> { Some(u32::from_ne_bytes(buf.get(i..i + 4)?.try_into().ok()?)) };
    let bad = || io::Error::other("a truncated sock_diag answer");
    let len = u32_at(0).ok_or_else(bad)? as usize;
    let kind = u16::from_ne_bytes(
        buf.get(4..6)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    );
    if len > buf.len() || len < NLMSG_HDR_LEN {
        return Err(bad());
    }
    if kind == NLMSG_ERROR {
        let errno = u32_at(NLMSG_HDR_LEN).ok_or_else(bad)? as i32;
        return match -errno {
            0 => Ok(None),
            libc::ENOENT => Ok(None),
            e => Err(io::Error::from_raw_os_error(e)),
        };
    }
    // inet_diag_msg: family, state, timer, retrans, the socket id, then
    // expires, rqueue, wqueue, uid, inode.
    let id = NLMSG_HDR_LEN + 4;
    let cookie_at = id + 2 + 2 + 16 + 16 + 4;
    let lo = u64::from(u32_at(cookie_at).ok_or_else(bad)?);
    let hi = u64::from(u32_at(cookie_at + 4).ok_or_else(bad)?);
    let uid = u32_at(id + SOCKID_LEN + 12).ok_or_else(bad)?;
    Ok(Some((hi << 32 | lo, uid)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_names_the_datagrams_source_then_its_destination_in_either_family() {
        let v4 = request(
            "127.0.0.1:5000".parse().unwrap(),
            "127.100.0.1:53".parse().unwrap(),
        );
        assert_eq!(v4.len(), NLMSG_HDR_LEN + REQ_LEN);
        let id = NLMSG_HDR_LEN + 8;
        assert_eq!(v4[NLMSG_HDR_LEN], libc::AF_INET as u8);
        assert_eq!(&v4[id..id + 4], &[0, 53, 0x13, 0x88]);
        assert_eq!(
            &v4[id + 4..id + 20],
            &[127, 100, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(&v4[id + 20..id + 24], &[127, 0, 0, 1]);
        let v6 = request(
            "[::1]:5000".parse().unwrap(),
            "[fd00::2]:7".parse().unwrap(),
        );
        assert_eq!(v6.len(), NLMSG_HDR_LEN + REQ_LEN);
        assert_eq!(v6[NLMSG_HDR_LEN], libc::AF_INET6 as u8);
        assert_eq!(&v6[id..id + 4], &[0, 7, 0x13, 0x88]);
        assert_eq!(v6[id + 4], 0xfd);
        assert_eq!(v6[id + 19], 2);
        assert_eq!(v6[id + 35], 1, "the local address, ::1");
        assert_eq!(&v6[id + 36..id + 44], &[0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
    }

    #[test]
    fn a_tcp_request_names_the_socket_itself_first_and_asks_a_mapped_pair_as_ipv4() {
        let v4 = tcp_request(
            "127.0.0.1:40000".parse().unwrap(),
            "127.0.0.1:8080".parse().unwrap(),
        );
        assert_eq!(v4.len(), NLMSG_HDR_LEN + REQ_LEN);
        assert_eq!(
            &v4[NLMSG_HDR_LEN..NLMSG_HDR_LEN + 2],
            &[libc::AF_INET as u8, libc::IPPROTO_TCP as u8]
        );
        let id = NLMSG_HDR_LEN + 8;
        assert_eq!(
            &v4[id..id + 4],
            &[0x9c, 0x40, 0x1f, 0x90],
            "40000, then 8080"
        );
        let mapped = tcp_request(
            "[::ffff:127.0.0.1]:40000".parse().unwrap(),
            "[::ffff:127.0.0.1]:8080".parse().unwrap(),
        );
        assert_eq!(mapped, v4);
        let v6 = tcp_request(
            "[::1]:40000".parse().unwrap(),
            "[::1]:8080".parse().unwrap(),
        );
        assert_eq!(v6[NLMSG_HDR_LEN], libc::AF_INET6 as u8);
        assert_eq!(v6[id + 19], 1, "the socket's own address, ::1");
    }
}
