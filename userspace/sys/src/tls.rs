//! Whether the kernel has TLS (the `tls` TCP upper-layer protocol), which
//! the tunnel hands its keys to after the handshake.
use std::{io, net, os::fd::AsRawFd};

/// Sets TCP_ULP `tls` on a loopback connection of this process's own, as
/// the tunnel would on its transport (loading the module where the kernel
/// builds it as one). `Err` says why not: ENOENT where the kernel has no
/// TLS (no CONFIG_TLS, or the module cannot load).
pub fn kernel_tls_probe() -> io::Result<()> {
    let l = net::TcpListener::bind("127.0.0.1:0")?;
    let c = net::TcpStream::connect(l.local_addr()?)?;
    let _peer = l.accept()?;
    let ulp = b"tls";
    // SAFETY: `ulp` lives for the call; the kernel reads its length.
    let r = unsafe {
        libc::setsockopt(
            c.as_raw_fd(),
            libc::SOL_TCP,
            libc::TCP_ULP,
            ulp.as_ptr().cast(),
            ulp.len() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
