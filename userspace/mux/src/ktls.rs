//! Kernel TLS for `--transport direct`: rustls does the handshake, then the
//! keys go to the kernel (TCP ULP `tls`, `TLS_TX`/`TLS_RX`), which encrypts
//! and decrypts from there on, so the transport is a plain socket to the
//! multiplexer: no TLS record copies in user space, and `splice` works.
//!
//! - The ULP goes on the connected socket before the handshake; where the
//!   kernel has none (no CONFIG_TLS, or the module cannot load), the
//!   connection is TLS in rustls (tokio-rustls) as before, and tpbpf says so
//!   once per process; `tpbpf doctor` has a row for it.
//! - Otherwise the handshake runs here, on rustls' connection directly,
//!   reading one whole TLS record at a time and stopping the moment it is
//!   done: rustls never holds a byte past the handshake (tokio-rustls reads
//!   on while it can, and would swallow the peer's first record), so what
//!   the peer sends next stays in the kernel, which decrypts it.
//! - Only TLS 1.3 (which both ends of a tpbpf tunnel speak) goes to the
//!   kernel; the server sends no session tickets, and neither end sends a
//!   key update: keys are replaced by replacing the transport (resume),
//!   before [`crate::Config::rekey_records`].
use std::{
    io,
    os::fd::AsRawFd,
    pin::Pin,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Mutex,
    },
    task::{Context, Poll},
};

use rustls::{pki_types::ServerName, ConnectionTrafficSecrets, ExtractedSecrets, ProtocolVersion};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
};
use tracing::{info, warn};

use crate::transport::BoxIo;

const SOL_TLS: libc::c_int = 282;
const TLS_TX: libc::c_int = 1;
const TLS_RX: libc::c_int = 2;
const TLS_1_3_VERSION: u16 = 0x0304;
const TLS_CIPHER_AES_GCM_128: u16 = 51;
const TLS_CIPHER_AES_GCM_256: u16 = 52;
const TLS_CIPHER_CHACHA20_POLY1305: u16 = 54;

/// A transport whose TLS the kernel does: to the multiplexer, a socket.
pub(crate) struct KernelTls(pub(crate) TcpStream);

impl AsyncRead for KernelTls {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for KernelTls {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, data)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// Transports this process handed to the kernel's TLS.
static OFFLOADED: AtomicU64 = AtomicU64::new(0);
/// Set once the kernel refused keys it had accepted the ULP for: from
/// then on this process keeps TLS in rustls.
static REFUSED: AtomicBool = AtomicBool::new(false);
/// Why the last transport stayed in rustls.
static FALLBACK: Mutex<Option<String>> = Mutex::new(None);

/// How many transports this process has handed to the kernel's TLS.
pub fn kernel_tls_transports() -> u64 {
    OFFLOADED.load(Ordering::Relaxed)
}

/// Why the last TLS transport of this process stayed in rustls, if one did.
pub fn kernel_tls_fallback() -> Option<String> {
    FALLBACK.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

fn fall_back(reason: String) {
    let mut last = FALLBACK.lock().unwrap_or_else(|e| e.into_inner());
    if last.is_none() {
        warn!(
            "kernel TLS is not used for the tunnel: {reason}; its TLS runs in rustls (user space). \
             `tpbpf doctor` shows whether the kernel has TLS (CONFIG_TLS, `modprobe tls`)"
        );
    }
    *last = Some(reason);
}

/// Why this transport cannot go to the kernel, if it cannot: the ULP is
/// set here, on the connected socket, before the handshake.
fn kernel_ready(tcp: &TcpStream) -> Result<(), String> {
    if REFUSED.load(Ordering::Relaxed) {
        return Err("the kernel refused the keys of an earlier transport".to_string());
    }
    set_ulp(tcp).map_err(|e| format!("setting TCP_ULP tls failed ({e})"))
}

/// The client's TLS over `tcp`: in the kernel where it can be.
pub(crate) async fn connect(
    connector: &tokio_rustls::TlsConnector,
    name: ServerName<'static>,
    mut tcp: TcpStream,
) -> io::Result<BoxIo> {
    if let Err(reason) = kernel_ready(&tcp) {
        fall_back(reason);
        return Ok(Box::new(connector.connect(name, tcp).await?));
    }
    let mut conn =
        rustls::ClientConnection::new(connector.config().clone(), name).map_err(tls_error)?;
    handshake(&mut tcp, &mut conn).await?;
    let version = conn.protocol_version();
    into_kernel(tcp, version, conn.dangerous_extract_secrets())
}

/// The server's TLS over an accepted `tcp`: in the kernel where it can be.
pub(crate) async fn accept(
    acceptor: &tokio_rustls::TlsAcceptor,
    mut tcp: TcpStream,
) -> io::Result<BoxIo> {
    if let Err(reason) = kernel_ready(&tcp) {
        fall_back(reason);
        return Ok(Box::new(acceptor.accept(tcp).await?));
    }
    let mut conn = rustls::ServerConnection::new(acceptor.config().clone()).map_err(tls_error)?;
    handshake(&mut tcp, &mut conn).await?;
    let version = conn.protocol_version();
    into_kernel(tcp, version, conn.dangerous_extract_secrets())
}

/// A TLS failure as tokio-rustls reports one (InvalidData), so a refused
/// certificate reads the same on either path.
fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// The largest TLS record a peer may send (RFC 8446 5.2: 2^14 + 256 for
/// TLS 1.3; TLS 1.2 allows 2^14 + 2048).
const MAX_RECORD: usize = 16 * 1024 + 2048;

/// Runs the handshake on `conn` over `tcp`, one whole record read at a
/// time, until it is done and what it has to send is sent; reads nothing
/// beyond.
async fn handshake<D>(
    tcp: &mut TcpStream,
    conn: &mut rustls::ConnectionCommon<D>,
) -> io::Result<()> {
    loop {
        while conn.wants_write() {
            let mut out = Vec::new();
            conn.write_tls(&mut out)?;
            tcp.write_all(&out).await?;
        }
        if !conn.is_handshaking() {
            return Ok(());
        }
        let mut header = [0u8; 5];
        tcp.read_exact(&mut header).await?;
        // A record's type (change_cipher_spec .. heartbeat) and legacy
        // version 3.x: anything else is not TLS (a plain hello, a probe).
        if !(20..=24).contains(&header[0]) || header[1] != 3 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the peer did not speak TLS (no TLS record header)",
            ));
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len > MAX_RECORD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the TLS peer sent a record of {len} bytes, more than TLS allows"),
            ));
        }
        let mut record = vec![0u8; 5 + len];
        record[..5].copy_from_slice(&header);
        tcp.read_exact(&mut record[5..]).await?;
        let mut rest = &record[..];
        while !rest.is_empty() {
            conn.read_tls(&mut rest)?;
        }
        if let Err(e) = conn.process_new_packets() {
            // The alert rustls queued tells the peer why.
            let mut out = Vec::new();
            let _ = conn.write_tls(&mut out);
            let _ = tcp.write_all(&out).await;
            return Err(tls_error(e));
        }
    }
}

/// Hands the finished handshake's keys to the kernel. An error where the
/// kernel took the ULP and then refused the keys (the connection cannot go
/// back to rustls then): this transport is lost, and the next ones of this
/// process stay in rustls.
fn into_kernel(
    tcp: TcpStream,
    version: Option<ProtocolVersion>,
    secrets: Result<ExtractedSecrets, rustls::Error>,
) -> io::Result<BoxIo> {
    let installed = if version != Some(ProtocolVersion::TLSv1_3) {
        Err(io::Error::other(format!(
            "the peer negotiated {version:?}, not TLS 1.3"
        )))
    } else {
        secrets
            .map_err(|e| io::Error::other(format!("rustls gave no keys for the kernel: {e}")))
            .and_then(|s| install(&tcp, s))
    };
    match installed {
        Ok(()) => {
            if OFFLOADED.fetch_add(1, Ordering::Relaxed) == 0 {
                info!("the tunnel's TLS runs in the kernel (kTLS)");
            }
            Ok(Box::new(KernelTls(tcp)))
        }
        Err(e) => {
            REFUSED.store(true, Ordering::Relaxed);
            fall_back(format!("the kernel refused the TLS keys ({e})"));
            Err(io::Error::other(format!(
                "kernel TLS refused this transport's keys ({e}); the next transport keeps TLS in rustls"
            )))
        }
    }
}

fn setsockopt(tcp: &TcpStream, level: libc::c_int, name: libc::c_int, v: &[u8]) -> io::Result<()> {
    // SAFETY: a valid socket; the kernel reads `v.len()` bytes of `v`.
    let rc = unsafe {
        libc::setsockopt(
            tcp.as_raw_fd(),
            level,
            name,
            v.as_ptr().cast(),
            v.len() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn set_ulp(tcp: &TcpStream) -> io::Result<()> {
    setsockopt(tcp, libc::SOL_TCP, libc::TCP_ULP, b"tls")
}

fn install(tcp: &TcpStream, secrets: ExtractedSecrets) -> io::Result<()> {
    let (tx_seq, tx) = secrets.tx;
    let (rx_seq, rx) = secrets.rx;
    setsockopt(tcp, SOL_TLS, TLS_TX, &crypto_info(tx_seq, &tx)?)?;
    setsockopt(tcp, SOL_TLS, TLS_RX, &crypto_info(rx_seq, &rx)?)
}

/// The kernel's `tls12_crypto_info_*` for TLS 1.3: version and cipher
/// (native u16s), then the IV's explicit part, the key, the salt and the
/// record sequence number (big-endian), each field as `linux/tls.h` lays it
/// out, with no padding between the byte arrays.
fn crypto_info(seq: u64, secrets: &ConnectionTrafficSecrets) -> io::Result<Vec<u8>> {
    let (cipher, key, iv, salt_len) = match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (TLS_CIPHER_AES_GCM_128, key, iv, 4),
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (TLS_CIPHER_AES_GCM_256, key, iv, 4),
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            (TLS_CIPHER_CHACHA20_POLY1305, key, iv, 0)
        }
        _ => {
            return Err(io::Error::other(
                "a cipher suite kernel TLS has no mapping for",
            ))
        }
    };
    let iv = iv.as_ref();
    let mut v = Vec::with_capacity(60);
    v.extend_from_slice(&TLS_1_3_VERSION.to_ne_bytes());
    v.extend_from_slice(&cipher.to_ne_bytes());
    // AES-GCM: salt = the IV's first 4 bytes, iv = the other 8; ChaCha20:
    // iv = all 12, no salt.
    v.extend_from_slice(&iv[salt_len..]);
    v.extend_from_slice(key.as_ref());
    v.extend_from_slice(&iv[..salt_len]);
    v.extend_from_slice(&seq.to_be_bytes());
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crypto_info_lays_out_the_kernels_structs() {
        let key: [u8; 32] = std::array::from_fn(|i| i as u8);
        let iv: [u8; 12] = std::array::from_fn(|i| 0x40 + i as u8);
        let s = ConnectionTrafficSecrets::Aes256Gcm {
            key: key.into(),
            iv: iv.into(),
        };
        let v = crypto_info(0x0102, &s).unwrap();
        // struct tls12_crypto_info_aes_gcm_256: 4 + 8 + 32 + 4 + 8 bytes.
        assert_eq!(v.len(), 56);
        assert_eq!(&v[..4], &[0x04, 0x03, 52, 0]);
        assert_eq!(&v[4..12], &iv[4..]);
        assert_eq!(&v[12..44], &key);
        assert_eq!(&v[44..48], &iv[..4]);
        assert_eq!(&v[48..], &[0, 0, 0, 0, 0, 0, 1, 2]);
        let c = ConnectionTrafficSecrets::Chacha20Poly1305 {
            key: [7; 32].into(),
            iv: iv.into(),
        };
        // struct tls12_crypto_info_chacha20_poly1305: 4 + 12 + 32 + 0 + 8.
        let v = crypto_info(9, &c).unwrap();
        assert_eq!(v.len(), 56);
        assert_eq!(&v[2..4], &54u16.to_ne_bytes());
        assert_eq!(&v[4..16], &iv);
    }
}
