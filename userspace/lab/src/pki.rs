//! The lab cluster's PKI, as kubeadm lays one out in `/etc/kubernetes/pki`:
//! a cluster CA, the API server's serving certificate (its address and the
//! `kubernetes.default.svc` names as SANs), and client certificates whose
//! subject is the identity (CN = user, O = groups), issued by that CA.
//!
//! Keys are written 0600 into the lab's state directory and never leave it.
use std::{
    fs,
    io::Write,
    net::IpAddr,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::SystemTime,
};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::{LabError, Result};

/// The CA's subject, as kubeadm names it.
const CA_NAME: &str = "kubernetes";
/// DNS names in the API server's certificate (kubeadm's list, for the
/// lab's cluster domain).
pub const API_SERVER_DNS_NAMES: &[&str] = &[
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
    "localhost",
];
/// Addresses in the API server's certificate besides its own: the
/// `kubernetes` Service's ClusterIP (the service range's first address, as
/// kubeadm adds it) and loopback.
pub const API_SERVER_EXTRA_IPS: &[&str] = &["10.96.0.1", "127.0.0.1"];

/// A client certificate and its key, PEM.
#[derive(Clone, Debug)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The lab's PKI directory (`<state>/pki`).
#[derive(Clone, Debug)]
pub struct Pki {
    dir: PathBuf,
}

fn pki_err(what: &str) -> impl FnOnce(rcgen::Error) -> LabError + '_ {
    move |e| LabError::Pki {
        what: what.to_string(),
        detail: e.to_string(),
    }
}

impl Pki {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("apiserver.crt")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("apiserver.key")
    }
    /// The admin identity's certificate (also embedded in the kubeconfig),
    /// for curl and other clients that take files.
    pub fn admin_cert(&self) -> PathBuf {
        self.dir.join("admin.crt")
    }
    pub fn admin_key(&self) -> PathBuf {
        self.dir.join("admin.key")
    }

    /// Makes the CA, the API server's certificate for `api_ip` and the
    /// admin's client certificate (`user` in `group`). Valid from an hour
    /// ago (clocks differ), the CA for ten years, the others for one, as
    /// kubeadm issues them.
    pub fn create(&self, api_ip: IpAddr, user: &str, group: &str) -> Result<Issued> {
        crate::mkdir(&self.dir)?;
        let ca_key = KeyPair::generate().map_err(pki_err("the CA's key"))?;
        let ca = ca_params(OffsetDateTime::now_utc() + Duration::days(3650))
            .self_signed(&ca_key)
            .map_err(pki_err("the CA's certificate"))?;
        write_private(&self.ca_key(), &ca_key.serialize_pem())?;
        crate::write(&self.ca_cert(), &ca.pem())?;

        let mut params = leaf_params(
            &[(DnType::CommonName, "kube-apiserver")],
            OffsetDateTime::now_utc() - Duration::hours(1),
            OffsetDateTime::now_utc() + Duration::days(365),
        );
        let mut ips = vec![api_ip];
        ips.extend(
            API_SERVER_EXTRA_IPS
                .iter()
                .filter_map(|s| s.parse::<IpAddr>().ok()),
        );
        for ip in ips {
            params.subject_alt_names.push(SanType::IpAddress(ip));
        }
        for name in API_SERVER_DNS_NAMES {
            let name = rcgen::Ia5String::try_from(*name).map_err(pki_err("a DNS name"))?;
            params.subject_alt_names.push(SanType::DnsName(name));
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().map_err(pki_err("the API server's key"))?;
        let cert = params
            .signed_by(&key, &ca, &ca_key)
            .map_err(pki_err("the API server's certificate"))?;
        write_private(&self.server_key(), &key.serialize_pem())?;
        crate::write(&self.server_cert(), &cert.pem())?;

        let now = SystemTime::now();
        let admin = self.issue_client(
            user,
            &[group],
            now - std::time::Duration::from_secs(3600),
            now + std::time::Duration::from_secs(365 * 86400),
        )?;
        write_private(&self.admin_key(), &admin.key_pem)?;
        crate::write(&self.admin_cert(), &admin.cert_pem)?;
        Ok(admin)
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> Result<String> {
        read(&self.ca_cert())
    }

    /// A client certificate for `user` in `groups`, signed by the lab's CA,
    /// valid between the two times (a test asks for an expired one).
    pub fn issue_client(
        &self,
        user: &str,
        groups: &[&str],
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Issued> {
        let (not_before, not_after) = (not_before.into(), not_after.into());
        let ca_key = KeyPair::from_pem(&read(&self.ca_key())?).map_err(pki_err("the CA's key"))?;
        // The issuer is named by its subject and key only: the same
        // parameters and key stand for the CA written at `create`.
        let ca = ca_params(not_after)
            .self_signed(&ca_key)
            .map_err(pki_err("the CA"))?;
        // rcgen keys a Name's attributes by type: a second O goes in under
        // its OID spelled out (two groups at most).
        if groups.len() > 2 {
            return Err(LabError::Pki {
                what: format!("a certificate for {user}"),
                detail: "at most two groups (O attributes)".into(),
            });
        }
        let o_types = [
            DnType::OrganizationName,
            DnType::CustomDnType(vec![2, 5, 4, 10]),
        ];
        let mut subject = vec![(DnType::CommonName, user)];
        subject.extend(o_types.into_iter().zip(groups.iter().copied()));
        let mut params = leaf_params(&subject, not_before, not_after);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().map_err(pki_err("a client key"))?;
        let cert = params
            .signed_by(&key, &ca, &ca_key)
            .map_err(pki_err("a client certificate"))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A CA that is not the lab's, with a client certificate of its own: what a
/// kubeconfig for another cluster, or a forged identity, carries.
pub fn foreign_ca(user: &str) -> Result<(String, Issued)> {
    let ca_key = KeyPair::generate().map_err(pki_err("a CA key"))?;
    let ca: Certificate = ca_params(OffsetDateTime::now_utc() + Duration::days(30))
        .self_signed(&ca_key)
        .map_err(pki_err("a CA"))?;
    let mut params = leaf_params(
        &[(DnType::CommonName, user)],
        OffsetDateTime::now_utc() - Duration::hours(1),
        OffsetDateTime::now_utc() + Duration::days(30),
    );
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().map_err(pki_err("a client key"))?;
    let cert = params
        .signed_by(&key, &ca, &ca_key)
        .map_err(pki_err("a client certificate"))?;
    Ok((
        ca.pem(),
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        },
    ))
}

fn ca_params(not_after: OffsetDateTime) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = OffsetDateTime::now_utc() - Duration::hours(1);
    params.not_after = not_after;
    params
}

fn leaf_params(
    subject: &[(DnType, &str)],
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    for (t, v) in subject {
        dn.push(t.clone(), *v);
    }
    params.distinguished_name = dn;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before;
    params.not_after = not_after;
    params
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|source| LabError::Io {
        what: format!("reading {}", path.display()),
        source,
    })
}

/// Writes a file only its owner may read (0600 from the start).
pub(crate) fn write_private(path: &Path, text: &str) -> Result<()> {
    write_with_mode(path, text, 0o600)
}

/// Writes a new file with `mode` from the start (no window with another).
pub(crate) fn write_with_mode(path: &Path, text: &str, mode: u32) -> Result<()> {
    let _ = fs::remove_file(path);
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(|source| LabError::Io {
            what: format!("writing {}", path.display()),
            source,
        })
}
