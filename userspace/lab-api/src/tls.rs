//! The API server's TLS, as kube-apiserver's flags set it up: a serving
//! certificate (`--tls-cert-file`, `--tls-private-key-file`) and client
//! certificates verified against the cluster CA (`--client-ca-file`) in
//! the handshake. A client without a certificate is let through (token
//! users, anonymous); one with a certificate the CA did not sign, or an
//! expired one, is refused with a TLS alert.
use std::{io, path::PathBuf, sync::Arc};

use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    server::WebPkiClientVerifier,
    RootCertStore, ServerConfig,
};

/// Where the API server's certificate, its key and the client CA are.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

fn bad(what: String) -> impl FnOnce(rustls::Error) -> io::Error {
    move |e| io::Error::other(format!("{what}: {e}"))
}

fn pem_err(path: &std::path::Path) -> impl Fn(rustls::pki_types::pem::Error) -> io::Error + '_ {
    move |e| io::Error::other(format!("reading {}: {e}", path.display()))
}

/// The server's rustls configuration (ring, TLS 1.2 and 1.3, HTTP/1.1 by
/// ALPN: port-forward upgrades need it, as they do with kube-apiserver).
pub fn server_config(files: &TlsFiles) -> io::Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(pem_err(&files.cert))?
        .collect::<Result<_, _>>()
        .map_err(pem_err(&files.cert))?;
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(pem_err(&files.key))?;
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(&files.client_ca).map_err(pem_err(&files.client_ca))? {
        roots
            .add(ca.map_err(pem_err(&files.client_ca))?)
            .map_err(bad(format!("the client CA {}", files.client_ca.display())))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| io::Error::other(format!("the client certificate verifier: {e}")))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(bad("TLS versions".into()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(bad(format!(
            "the serving certificate {}",
            files.cert.display()
        )))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
