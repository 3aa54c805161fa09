//! Transports: what carries a session's bytes. A [`Connector`] dials one for
//! the client (again after a loss); the server takes what it accepts.
//!
//! - [`TcpConnector`]: plain TCP, for tests and a trusted path.
//! - [`TlsConnector`]: TCP with TLS (rustls). The agent generates its key
//!   material ([`TlsIdentity`]) and hands out the certificate's SHA-256
//!   fingerprint with the session token; the client pins that fingerprint,
//!   so no CA is involved. Over a TCP connection of its own (`--transport
//!   direct`), and on the server's side, the keys go to the kernel after the
//!   handshake where it has TLS (`crate::ktls`).
use std::{fmt::Write as _, future::Future, io, net::SocketAddr, pin::Pin, sync::Arc};

use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider},
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime},
    DigitallySignedStruct, SignatureScheme,
};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

/// Anything that carries bytes both ways.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + std::any::Any {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

pub use crate::ktls::{kernel_tls_fallback, kernel_tls_transports};

/// Whether the kernel does this transport's TLS.
pub fn is_kernel_tls(io: &dyn Io) -> bool {
    (io as &dyn std::any::Any).is::<crate::ktls::KernelTls>()
}
pub type BoxIo = Box<dyn Io>;

pub type ConnectFuture<'a> = Pin<Box<dyn Future<Output = io::Result<BoxIo>> + Send + 'a>>;

/// Dials a transport to the server.
pub trait Connector: Send + Sync + 'static {
    fn connect(&self) -> ConnectFuture<'_>;
    /// For messages: where it dials.
    fn describe(&self) -> String;
}

/// How much unsent data a transport socket may queue in the kernel
/// (TCP_NOTSENT_LOWAT). The multiplexer schedules streams fairly; a deep
/// kernel queue would put an interactive stream's bytes behind megabytes of
/// bulk data all the same.
pub const NOTSENT_LOWAT: u32 = 128 * 1024;

/// Prepares a TCP socket that carries a session: no Nagle, a short kernel
/// send queue.
pub fn tune(s: &TcpStream) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    s.set_nodelay(true)?;
    let v = NOTSENT_LOWAT as libc::c_int;
    // SAFETY: a valid socket fd and a c_int option value of the right size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Plain TCP.
pub struct TcpConnector {
    pub addr: SocketAddr,
}

impl Connector for TcpConnector {
    fn connect(&self) -> ConnectFuture<'_> {
        Box::pin(async move {
            let s = TcpStream::connect(self.addr).await?;
            tune(&s)?;
            Ok(Box::new(s) as BoxIo)
        })
    }
    fn describe(&self) -> String {
        format!("tcp://{}", self.addr)
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The agent's TLS key material, generated at start.
#[derive(Clone)]
pub struct TlsIdentity {
    pub cert: CertificateDer<'static>,
    key: Vec<u8>,
}

impl TlsIdentity {
    /// A new self-signed certificate and key.
    pub fn generate() -> io::Result<TlsIdentity> {
        let ck = rcgen::generate_simple_self_signed(vec!["tpbpf-agent".to_string()])
            .map_err(|e| io::Error::other(format!("generating the TLS certificate: {e}")))?;
        Ok(TlsIdentity {
            cert: ck.cert.der().clone(),
            key: ck.key_pair.serialize_der(),
        })
    }

    /// The SHA-256 of the certificate, hex: what clients pin.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert)
    }

    /// The server side's TLS acceptor.
    pub fn acceptor(&self) -> io::Result<tokio_rustls::TlsAcceptor> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone()));
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(io::Error::other)?
            .with_no_client_auth()
            .with_single_cert(vec![self.cert.clone()], key)
            .map_err(|e| io::Error::other(format!("the TLS key material is unusable: {e}")))?;
        // The keys may go to the kernel after the handshake (kTLS), which
        // takes application data only: no tickets after the handshake
        // (a client resumes sessions, not TLS).
        config.enable_secret_extraction = true;
        config.send_tls13_tickets = 0;
        Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
    }
}

pub fn fingerprint(cert: &[u8]) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, cert);
    let mut s = String::with_capacity(64);
    for b in d.as_ref() {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// TLS over another transport (TCP, a port-forward) to a server whose
/// certificate has the pinned fingerprint.
pub struct TlsConnector {
    inner: Arc<dyn Connector>,
    connector: tokio_rustls::TlsConnector,
    /// Dialed here, over TCP of its own: the keys may go to the kernel.
    kernel: Option<SocketAddr>,
}

impl TlsConnector {
    /// TLS over TCP to `addr`. `fingerprint`: the SHA-256 of the server's
    /// certificate, hex, as [`TlsIdentity::fingerprint`] gives it.
    /// Where the kernel has TLS, it takes the keys after each handshake.
    pub fn pinned(addr: SocketAddr, fingerprint: &str) -> io::Result<TlsConnector> {
        let mut c = Self::over(Arc::new(TcpConnector { addr }), fingerprint)?;
        c.kernel = Some(addr);
        Ok(c)
    }

    /// TLS over what `inner` dials, in rustls.
    pub fn over(inner: Arc<dyn Connector>, fingerprint: &str) -> io::Result<TlsConnector> {
        let verifier = Arc::new(Pinned {
            fingerprint: fingerprint.to_ascii_lowercase(),
            provider: provider(),
        });
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(io::Error::other)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        config.enable_secret_extraction = true;
        Ok(TlsConnector {
            inner,
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            kernel: None,
        })
    }
}

impl Connector for TlsConnector {
    fn connect(&self) -> ConnectFuture<'_> {
        Box::pin(async move {
            let name = ServerName::try_from("tpbpf-agent").map_err(io::Error::other)?;
            if let Some(addr) = self.kernel {
                let tcp = TcpStream::connect(addr).await?;
                tune(&tcp)?;
                return crate::ktls::connect(&self.connector, name, tcp).await;
            }
            let io = self.inner.connect().await?;
            let tls = self.connector.connect(name, io).await?;
            Ok(Box::new(tls) as BoxIo)
        })
    }
    fn describe(&self) -> String {
        format!("tls over {}", self.inner.describe())
    }
}

/// Accepts exactly the certificate with the pinned fingerprint; the TLS
/// signatures are still verified.
#[derive(Debug)]
struct Pinned {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = fingerprint(end_entity);
        if got == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the agent's certificate has fingerprint {got}, not the pinned {}: a different agent, or someone in between",
                self.fingerprint
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
