//! What a client certificate proves, as kube-apiserver's x509
//! authenticator reads it: a chain to the cluster's client CA, for client
//! authentication, whose subject's CN is the user and each O a group; and,
//! for a certificate sent over a tunnel rather than presented in a
//! handshake, a signature of its key over a challenge.
use std::sync::Arc;

use rustls::{
    pki_types::{pem::PemObject, CertificateDer, UnixTime},
    server::WebPkiClientVerifier,
    RootCertStore, SignatureScheme,
};

/// The user a certificate's subject names: its CN, and each O as a group.
/// `None` for a certificate that cannot be parsed or has no CN.
pub fn subject_user(cert: &CertificateDer<'_>) -> Option<(String, Vec<String>)> {
    let parsed = webpki::EndEntityCert::try_from(cert).ok()?;
    let (mut cn, mut groups) = (None, Vec::new());
    for (oid, value) in subject_attributes(parsed.subject())? {
        match oid.as_slice() {
            [2, 5, 4, 3] => cn = Some(value),
            [2, 5, 4, 10] => groups.push(value),
            _ => {}
        }
    }
    Some((cn.filter(|n| !n.is_empty())?, groups))
}

/// A Name's attributes (`RDNSequence` without its outer SEQUENCE header,
/// as webpki gives it) as (OID arcs, string value).
fn subject_attributes(subject: &[u8]) -> Option<Vec<(Vec<u64>, String)>> {
    // Put back the SEQUENCE header so the DER reader sees one value.
    let mut der = vec![0x30];
    match subject.len() {
        n if n < 0x80 => der.push(n as u8),
        n if n <= 0xff => der.extend([0x81, n as u8]),
        n if n <= 0xffff => der.extend([0x82, (n >> 8) as u8, n as u8]),
        _ => return None,
    }
    der.extend_from_slice(subject);
    let mut out = Vec::new();
    yasna::parse_der(&der, |r| {
        r.read_sequence_of(|r| {
            r.read_set_of(|r| {
                r.read_sequence(|r| {
                    let oid = r.next().read_oid()?;
                    let value = r.next().read_tagged_der()?;
                    out.push((
                        oid.components().clone(),
                        String::from_utf8_lossy(value.value()).into_owned(),
                    ));
                    Ok(())
                })
            })
        })
    })
    .ok()?;
    Some(out)
}

/// Checks that `chain` (leaf first) chains, now, to one of the CAs in
/// `ca_pem` for client authentication, as the API server checks a client
/// certificate; then that the leaf's key made `signature` over `message`.
/// Returns the user and groups the leaf names.
pub fn verify_client(
    chain: &[Vec<u8>],
    ca_pem: &str,
    scheme: u16,
    message: &[u8],
    signature: &[u8],
) -> Result<(String, Vec<String>), String> {
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()).filter_map(Result::ok) {
        roots
            .add(ca)
            .map_err(|e| format!("the cluster's client CA: {e}"))?;
    }
    if roots.is_empty() {
        return Err("the cluster names no client CA".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| format!("the cluster's client CA: {e}"))?;
    let (leaf, rest) = chain.split_first().ok_or("no certificate")?;
    let leaf = CertificateDer::from(leaf.as_slice());
    let intermediates: Vec<CertificateDer<'_>> = rest
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    verifier
        .verify_client_cert(&leaf, &intermediates, UnixTime::now())
        .map_err(|e| format!("the client certificate is not the cluster's: {e}"))?;
    let scheme = SignatureScheme::from(scheme);
    let algs = provider
        .signature_verification_algorithms
        .mapping
        .iter()
        .find(|(s, _)| *s == scheme)
        .map(|(_, a)| *a)
        .ok_or_else(|| format!("signature scheme {scheme:?} is not one the agent checks"))?;
    let cert = webpki::EndEntityCert::try_from(&leaf)
        .map_err(|e| format!("the client certificate: {e}"))?;
    if !algs
        .iter()
        .any(|alg| cert.verify_signature(*alg, message, signature).is_ok())
    {
        return Err("the signature is not the client certificate's key's".into());
    }
    subject_user(&leaf).ok_or_else(|| "the client certificate names no user (CN)".into())
}

#[cfg(test)]
mod tests {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair,
    };
    use rustls::crypto::ring::sign::any_ecdsa_type;
    use rustls::pki_types::PrivateKeyDer;

    use super::*;

    struct Ca(rcgen::Certificate, KeyPair);

    fn ca(name: &str) -> Ca {
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        Ca(p.self_signed(&key).unwrap(), key)
    }

    fn client(ca: &Ca, user: &str, groups: &[&str]) -> (Vec<u8>, KeyPair) {
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, user);
        for g in groups {
            p.distinguished_name.push(DnType::OrganizationName, *g);
        }
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &ca.0, &ca.1).unwrap();
        (cert.der().to_vec(), key)
    }

    fn sign(key: &KeyPair, msg: &[u8]) -> (u16, Vec<u8>) {
        let der = PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        let k = any_ecdsa_type(&der).unwrap();
        let s = k
            .choose_scheme(&[SignatureScheme::ECDSA_NISTP256_SHA256])
            .unwrap();
        (u16::from(s.scheme()), s.sign(msg).unwrap())
    }

    #[test]
    fn a_clusters_certificate_with_its_keys_signature_names_its_user() {
        let cluster = ca("kubernetes");
        // (rcgen keeps one O: the lab's PKI tests several groups.)
        let (cert, key) = client(&cluster, "alice", &["dev"]);
        let (scheme, sig) = sign(&key, b"challenge");
        let pem = cluster.0.pem();
        let (user, groups) = verify_client(
            std::slice::from_ref(&cert),
            &pem,
            scheme,
            b"challenge",
            &sig,
        )
        .unwrap();
        assert_eq!((user.as_str(), groups), ("alice", vec!["dev".to_string()]));
        // Another challenge: the signature does not answer it.
        let e =
            verify_client(std::slice::from_ref(&cert), &pem, scheme, b"another", &sig).unwrap_err();
        assert!(e.contains("signature"), "{e}");
        // Another CA's certificate, signed by its own key: refused.
        let other = ca("someone");
        let (forged, fkey) = client(&other, "alice", &["system:masters"]);
        let (scheme, fsig) = sign(&fkey, b"challenge");
        let e = verify_client(&[forged], &pem, scheme, b"challenge", &fsig).unwrap_err();
        assert!(e.contains("not the cluster's"), "{e}");
        // The cluster's certificate with another key's signature: refused.
        let e = verify_client(&[cert], &pem, scheme, b"challenge", &fsig).unwrap_err();
        assert!(e.contains("signature"), "{e}");
        assert!(verify_client(&[], &pem, scheme, b"x", &fsig).is_err());
    }
}
