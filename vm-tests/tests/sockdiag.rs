//! The kernel's socket diagnostics as tpbpfd reads them to tell which
//! socket a UDP datagram came from (`tpbpf_sys::sockdiag`). A kernel
//! without `udp_diag` is a skip under the CI rule, not a pass.
use std::{net::SocketAddrV4, os::fd::AsRawFd};

use tpbpf_sys::sockdiag::udp_socket_of;
use tpbpf_vm_tests::skip;

/// The cookie and owner the kernel reports are the bound socket's
/// (`SO_COOKIE`, our uid); once it is closed there is none.
#[test]
fn finds_the_socket_bound_to_an_address_and_forgets_it_when_closed() {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let local = match sock.local_addr().unwrap() {
        std::net::SocketAddr::V4(a) => a,
        _ => unreachable!(),
    };
    let mut cookie: u64 = 0;
    let mut len = 8u32;
    // SAFETY: a valid socket and a u64 buffer of the length given.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    assert_eq!(r, 0, "SO_COOKIE: {}", std::io::Error::last_os_error());
    let remote: SocketAddrV4 = "127.100.0.7:4000".parse().unwrap();
    match udp_socket_of(local, remote) {
        Ok(Some((c, uid))) => {
            assert_eq!(c, cookie);
            // SAFETY: geteuid has no preconditions.
            assert_eq!(uid, unsafe { libc::geteuid() });
        }
        Ok(None) => panic!("no socket found for {local}"),
        Err(e) => {
            return skip(&format!(
                "this kernel answers no UDP socket diagnostics (udp_diag): {e}"
            ))
        }
    }
    drop(sock);
    assert_eq!(udp_socket_of(local, remote).unwrap(), None);
}
