//! Who this side is to the API server, as an agent can check it: the
//! bearer token the kube client last sent (a kubeconfig token, a token
//! file's, an exec plugin's, refreshed as the plugin refreshes it), else the
//! kubeconfig's client certificate, with a signature of its key over one
//! challenge. The agent asks the API server what that identity may do;
//! nothing here is sent anywhere else.
use std::sync::Mutex;

use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
use tpbpf_proto::{identity_message, Credential, IdentityProof};

/// The last `Authorization: Bearer` value the kube client sent.
static BEARER: Mutex<Option<String>> = Mutex::new(None);
/// A client certificate chain (DER, leaf first) and its key (DER).
type ChainAndKey = (Vec<Vec<u8>>, Vec<u8>);
/// The kubeconfig's client certificate, if it has one.
static CERTIFICATE: Mutex<Option<ChainAndKey>> = Mutex::new(None);

/// Called with every request the kube client sends, after its auth layer.
pub(crate) fn saw_request<B>(req: &http::Request<B>) {
    if let Some(token) = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        let mut b = BEARER.lock().unwrap_or_else(|e| e.into_inner());
        if b.as_deref() != Some(token) {
            *b = Some(token.to_string());
        }
    }
}

/// Remembers the client certificate of `auth` (inline data or files).
pub(crate) fn remember_certificate(auth: &kube::config::AuthInfo) {
    let read = |data: Option<String>, path: Option<&String>| -> Option<Vec<u8>> {
        match (data, path) {
            (Some(d), _) => base64_decode(d.trim()),
            (None, Some(p)) => std::fs::read(p).ok(),
            _ => None,
        }
    };
    use secrecy::ExposeSecret;
    let cert = read(
        auth.client_certificate_data.clone(),
        auth.client_certificate.as_ref(),
    );
    let key = read(
        auth.client_key_data
            .as_ref()
            .map(|k| k.expose_secret().to_string()),
        auth.client_key.as_ref(),
    );
    let (Some(cert), Some(key)) = (cert, key) else {
        return;
    };
    if let Some(Identity::Certificate(chain, key)) = Identity::from_pem(&cert, &key) {
        *CERTIFICATE.lock().unwrap_or_else(|e| e.into_inner()) = Some((chain, key));
    }
}

/// Standard base64 (kubeconfig `*-data` fields), padding optional.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=') {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// An identity an agent can have the API server check.
#[derive(Clone)]
pub enum Identity {
    /// A bearer token.
    Token(String),
    /// A client certificate chain (DER, leaf first) and its key (DER).
    Certificate(Vec<Vec<u8>>, Vec<u8>),
}

impl Identity {
    /// A client certificate and key, each PEM.
    pub fn from_pem(cert: &[u8], key: &[u8]) -> Option<Self> {
        let chain: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(cert)
            .filter_map(Result::ok)
            .map(|c| c.as_ref().to_vec())
            .collect();
        let key = PrivateKeyDer::from_pem_slice(key).ok()?;
        (!chain.is_empty()).then(|| Identity::Certificate(chain, key.secret_der().to_vec()))
    }

    /// This process's kube client's: the bearer token it last sent, else
    /// its kubeconfig's client certificate.
    pub fn current() -> Option<Self> {
        if let Some(t) = BEARER.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            return Some(Identity::Token(t));
        }
        CERTIFICATE
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .map(|(chain, key)| Identity::Certificate(chain, key))
    }

    /// The answer to an agent's identity challenge `nonce` about pod
    /// `namespace/pod`.
    pub fn proof(
        &self,
        nonce: &[u8; 16],
        namespace: &str,
        pod: &str,
    ) -> Result<IdentityProof, String> {
        let credential = match self {
            Identity::Token(t) => Credential::Token(t.clone()),
            Identity::Certificate(chain, key) => sign(
                chain.clone(),
                key.clone(),
                &identity_message(nonce, namespace, pod),
            )?,
        };
        Ok(IdentityProof {
            namespace: namespace.into(),
            pod: pod.into(),
            credential,
        })
    }
}

/// This side's answer to an agent's identity challenge about pod
/// `namespace/pod` (see [`Identity::current`]).
pub fn proof(nonce: &[u8; 16], namespace: &str, pod: &str) -> Result<IdentityProof, String> {
    Identity::current()
        .ok_or_else(|| {
            "the kubeconfig's user has neither a bearer token nor a client certificate that the agent can have the API server check: intercept refused".to_string()
        })?
        .proof(nonce, namespace, pod)
}

fn sign(chain: Vec<Vec<u8>>, key: Vec<u8>, message: &[u8]) -> Result<Credential, String> {
    use rustls::SignatureScheme as S;
    let key = PrivateKeyDer::try_from(key).map_err(|e| format!("the client key: {e}"))?;
    let key = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| format!("the client key cannot sign: {e}"))?;
    let signer = key
        .choose_scheme(&[
            S::ECDSA_NISTP256_SHA256,
            S::ECDSA_NISTP384_SHA384,
            S::ED25519,
            S::RSA_PSS_SHA256,
        ])
        .ok_or("the client key signs with no scheme the agent checks (ECDSA, Ed25519, RSA-PSS)")?;
    let signature = signer
        .sign(message)
        .map_err(|e| format!("signing the identity challenge: {e}"))?;
    Ok(Credential::Certificate {
        chain,
        scheme: u16::from(signer.scheme()),
        signature,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_is_read_with_or_without_padding() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVsbG8").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVs\nbG8=").unwrap(), b"hello");
        assert!(base64_decode("a*b").is_none());
    }
}
