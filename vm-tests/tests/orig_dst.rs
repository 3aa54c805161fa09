//! A redirected TCP connection's original destination belongs to the one
//! client socket that dialled it (`tpbpf_loader::OrigDstTable`): a later
//! connection from the same local port, one never redirected (any local
//! process may dial tpbpfd's listener), gets nothing of an earlier one
//! that was never looked up. Real programs, in a network namespace and a
//! cgroup of the test's own.
use std::{
    ffi::CString,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use tpbpf_loader::Redirector;
use tpbpf_vm_tests::*;

/// A pipe, both ends closed on exec.
fn pipe() -> (std::fs::File, std::fs::File) {
    let mut fds = [0; 2];
    // SAFETY: a two-int array for pipe2 to fill.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh descriptors nothing else owns.
    unsafe {
        (
            std::fs::File::from(OwnedFd::from_raw_fd(fds[0])),
            std::fs::File::from(OwnedFd::from_raw_fd(fds[1])),
        )
    }
}

/// A client in the bridged cgroup: a forked child (in this thread's
/// network namespace) that joins `cgroup`, connects to `dst` (which the
/// programs redirect to the listener), and holds the connection until
/// [`BridgedClient::close`]; with `reset`, it closes with an RST (the
/// socket is gone at once, its port free). Killed by its pid and reaped on
/// drop.
struct BridgedClient {
    pid: libc::pid_t,
    go: Option<std::fs::File>,
    port: u16,
}

impl BridgedClient {
    fn connect(cgroup: &Path, dst: SocketAddrV4, reset: bool) -> Self {
        let procs = CString::new(
            cgroup
                .join("cgroup.procs")
                .into_os_string()
                .into_encoded_bytes(),
        )
        .unwrap();
        let (mut port_r, port_w) = pipe();
        let (go_r, go_w) = pipe();
        // SAFETY: a zeroed sockaddr_in is valid; its fields are set below.
        let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        addr.sin_family = libc::AF_INET as u16;
        addr.sin_port = dst.port().to_be();
        addr.sin_addr.s_addr = u32::from_ne_bytes(dst.ip().octets());
        // SAFETY: the child makes only async-signal-safe calls (open,
        // write, socket, connect, getsockname, read, setsockopt, close,
        // _exit) on memory made before the fork, and never returns.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            // SAFETY: as above.
            unsafe {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    libc::_exit(1);
                }
                libc::close(fd);
                let sock = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
                let mut port = [0u8; 2];
                let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
                if libc::connect(sock, (&raw const addr).cast(), len) == 0 {
                    let mut local: libc::sockaddr_in = std::mem::zeroed();
                    let mut len = len;
                    libc::getsockname(sock, (&raw mut local).cast(), &mut len);
                    port = local.sin_port.to_ne_bytes();
                }
                libc::write(port_w.as_raw_fd(), port.as_ptr().cast(), 2);
                let mut b = [0u8; 1];
                libc::read(go_r.as_raw_fd(), b.as_mut_ptr().cast(), 1);
                if reset {
                    let linger = libc::linger {
                        l_onoff: 1,
                        l_linger: 0,
                    };
                    libc::setsockopt(
                        sock,
                        libc::SOL_SOCKET,
                        libc::SO_LINGER,
                        (&raw const linger).cast(),
                        std::mem::size_of::<libc::linger>() as u32,
                    );
                }
                libc::close(sock);
                libc::_exit(0);
            }
        }
        drop((port_w, go_r));
        let mut client = Self {
            pid,
            go: Some(go_w),
            port: 0,
        };
        let mut port = [0u8; 2];
        port_r.read_exact(&mut port).expect("the client's port");
        client.port = u16::from_be_bytes(port);
        assert_ne!(
            client.port, 0,
            "the bridged client's connect to {dst} failed"
        );
        client
    }

    /// Closes the client's socket and waits for the client to exit.
    fn close(mut self) {
        if let Some(mut go) = self.go.take() {
            let _ = go.write_all(b"x");
        }
        self.reap();
    }

    fn reap(&mut self) {
        if self.pid > 0 {
            // SAFETY: waits for our own child; the status is not read.
            unsafe { libc::waitpid(self.pid, std::ptr::null_mut(), 0) };
            self.pid = 0;
        }
    }
}

impl Drop for BridgedClient {
    fn drop(&mut self) {
        self.go.take();
        if self.pid > 0 {
            // SAFETY: our own child, by its pid.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            self.reap();
        }
    }
}

/// A TCP connection from 127.0.0.1:`port` (`SO_REUSEADDR`) to `to`.
fn connect_from(port: u16, to: SocketAddrV4) -> OwnedFd {
    let sockaddr = |a: SocketAddrV4| {
        // SAFETY: a zeroed sockaddr_in is valid; its fields are set below.
        let mut s: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        s.sin_family = libc::AF_INET as u16;
        s.sin_port = a.port().to_be();
        s.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
        s
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as u32;
    // SAFETY: plain socket calls on a descriptor owned here, with
    // addresses and options that outlive each call.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        let sock = OwnedFd::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        );
        let from = sockaddr(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
        assert_eq!(
            libc::bind(fd, (&raw const from).cast(), len),
            0,
            "binding the freed port {port}: {}",
            std::io::Error::last_os_error()
        );
        let to = sockaddr(to);
        assert_eq!(libc::connect(fd, (&raw const to).cast(), len), 0);
        sock
    }
}

fn v4(addr: SocketAddr) -> SocketAddrV4 {
    match addr {
        SocketAddr::V4(a) => a,
        other => panic!("{other} is not IPv4"),
    }
}

#[test]
fn a_connection_from_the_port_of_one_never_looked_up_gets_no_destination() {
    if !require_root() {
        return;
    }
    let ns = NetNs::new();
    let parent = TestCgroup::new();
    let bridged = parent.path().join("bridged");
    std::fs::create_dir(&bridged).unwrap();
    let (ns_name, bridged2) = (ns.name().to_string(), bridged.clone());
    // This thread's network namespace changes: a thread of its own.
    std::thread::spawn(move || check_in_netns(&ns_name, &bridged2))
        .join()
        .expect("the test's thread");
}

fn check_in_netns(ns: &str, bridged: &Path) {
    enter_netns(ns).expect("entering the test's network namespace");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = v4(listener.local_addr().unwrap());
    // The loader forwards the programs' log through a runtime: without one
    // it drops the log map the programs use, and they do not load.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _rt = rt.enter();
    let mut redirector = Redirector::load().expect("loading the programs");
    redirector
        .add_range("10.96.0.0/12".parse().unwrap(), true)
        .unwrap();
    redirector.set_proxy(listen).unwrap();
    let dir = std::fs::File::open(bridged).unwrap();
    redirector
        .attach(&dir, &bridged.display().to_string())
        .expect("attaching to the test's cgroup");
    let table = redirector.table();
    let lookup = |accepted: &TcpStream| {
        let (peer, local) = (
            accepted.peer_addr().unwrap(),
            accepted.local_addr().unwrap(),
        );
        table.original_destination(peer, local)
    };

    // A redirected connection the listener takes but never looks up (as
    // when tpbpfd never accepts it), reset by its client: its port is free.
    let first_dst = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);
    let first = BridgedClient::connect(bridged, first_dst, true);
    let port = first.port;
    let (never_looked_up, _) = listener.accept().unwrap();
    first.close();

    // A connection from that port straight to the listener, from outside
    // the bridged cgroup (never redirected).
    let sock = connect_from(port, listen);
    let (direct, peer) = listener.accept().unwrap();
    assert_eq!(peer.port(), port);
    let found = lookup(&direct).expect("looking up the direct connection");
    assert_eq!(
        found, None,
        "a connection never redirected got the destination of an earlier one from port {port}"
    );
    drop((direct, sock, never_looked_up));

    // A redirected connection does get its own destination, looked up
    // after its client has closed.
    let dst = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 11), 8080);
    let client = BridgedClient::connect(bridged, dst, false);
    let (accepted, _) = listener.accept().unwrap();
    client.close();
    assert_eq!(lookup(&accepted).unwrap(), Some(SocketAddr::V4(dst)));
    let n = 1000;
    let start = std::time::Instant::now();
    for _ in 0..n {
        let _ = lookup(&accepted);
    }
    eprintln!(
        "an original destination is found in {:?} per accepted connection (sock_diag and the \
         cookie map; {n} lookups)",
        start.elapsed() / n
    );
}
