//! Who a request is from, as kube-apiserver authenticates it: a client
//! certificate the cluster CA signed (verified in the TLS handshake; its
//! subject's CN is the user, each O a group), else a bearer token from the
//! static token file (`--token-auth-file`), else anonymous.
use std::{collections::HashMap, path::Path};

use rustls::pki_types::CertificateDer;

/// An authenticated identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
}

impl User {
    /// `system:anonymous`, who sends no credentials.
    pub fn anonymous() -> Self {
        Self {
            name: "system:anonymous".into(),
            groups: vec!["system:unauthenticated".into()],
        }
    }

    pub fn in_group(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }
}

/// The user a verified client certificate names: CN, and O as groups (as
/// kube-apiserver's x509 authenticator reads it). `None` for a certificate
/// that cannot be parsed or has no CN.
pub fn user_of_cert(cert: &CertificateDer<'_>) -> Option<User> {
    tpbpf_mux::x509::subject_user(cert).map(|(name, groups)| User { name, groups })
}

/// Static bearer tokens, kube-apiserver's `--token-auth-file`:
/// `token,user,uid[,"group1,group2"]` a line.
#[derive(Clone, Debug, Default)]
pub struct Tokens(HashMap<String, User>);

impl Tokens {
    pub fn parse(text: &str) -> Self {
        let mut map = HashMap::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.splitn(4, ',');
            let (Some(token), Some(user)) = (fields.next(), fields.next()) else {
                continue;
            };
            let _uid = fields.next();
            let groups = fields
                .next()
                .map(|g| {
                    g.trim_matches('"')
                        .split(',')
                        .map(|g| g.trim().to_string())
                        .filter(|g| !g.is_empty())
                        .collect()
                })
                .unwrap_or_default();
            if !token.is_empty() && !user.is_empty() {
                map.insert(
                    token.to_string(),
                    User {
                        name: user.to_string(),
                        groups,
                    },
                );
            }
        }
        Self(map)
    }

    pub fn read(path: &Path) -> std::io::Result<Self> {
        Ok(Self::parse(&std::fs::read_to_string(path)?))
    }

    pub fn user(&self, token: &str) -> Option<&User> {
        self.0.get(token)
    }
}

/// What authentication made of a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Authn {
    User(User),
    /// A bearer token no one has: 401, as kube-apiserver answers.
    BadToken,
}

/// A request's identity: the connection's certificate first (x509 comes
/// first in kube-apiserver's chain), then the `Authorization` header.
pub fn authenticate(
    cert_user: Option<&User>,
    authorization: Option<&str>,
    tokens: &Tokens,
) -> Authn {
    if let Some(u) = cert_user {
        return Authn::User(u.clone());
    }
    match authorization {
        None => Authn::User(User::anonymous()),
        Some(v) => match v
            .strip_prefix("Bearer ")
            .and_then(|t| tokens.user(t.trim()))
        {
            Some(u) => Authn::User(u.clone()),
            None => Authn::BadToken,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    fn issue(user: &str, groups: &[&str]) -> CertificateDer<'static> {
        let dir =
            std::env::temp_dir().join(format!("tpbpf-lab-api-auth-{}-{user}", std::process::id()));
        let pki = tpbpf_lab::pki::Pki::new(dir.clone());
        pki.create(
            "172.31.0.1".parse().unwrap(),
            "kubernetes-admin",
            "system:masters",
        )
        .unwrap();
        let now = SystemTime::now();
        let issued = pki
            .issue_client(user, groups, now, now + Duration::from_secs(60))
            .unwrap();
        let _ = std::fs::remove_dir_all(dir);
        use rustls::pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap()
    }

    #[test]
    fn a_client_certificate_maps_cn_to_the_user_and_each_o_to_a_group() {
        let u = user_of_cert(&issue("kubernetes-admin", &["system:masters"])).unwrap();
        assert_eq!(u.name, "kubernetes-admin");
        assert_eq!(u.groups, ["system:masters"]);
        let u = user_of_cert(&issue("alice", &["dev", "ops"])).unwrap();
        assert_eq!((u.name.as_str(), u.groups.len()), ("alice", 2));
        assert!(u.in_group("dev") && u.in_group("ops") && !u.in_group("system:masters"));
    }

    #[test]
    fn the_certificate_wins_then_tokens_and_an_unknown_token_is_refused() {
        let tokens = Tokens::parse(
            "# static tokens\nt1,lab-developer,lab-developer\nt2,lab-sso-admin,lab-sso-admin,\"system:masters\"\n",
        );
        let admin = User {
            name: "kubernetes-admin".into(),
            groups: vec!["system:masters".into()],
        };
        assert_eq!(
            authenticate(Some(&admin), Some("Bearer nope"), &tokens),
            Authn::User(admin.clone())
        );
        let Authn::User(dev) = authenticate(None, Some("Bearer t1"), &tokens) else {
            panic!("t1 is a token")
        };
        assert_eq!((dev.name.as_str(), dev.groups.len()), ("lab-developer", 0));
        let Authn::User(sso) = authenticate(None, Some("Bearer t2"), &tokens) else {
            panic!("t2 is a token")
        };
        assert!(sso.in_group("system:masters"));
        assert_eq!(
            authenticate(None, Some("Bearer t3"), &tokens),
            Authn::BadToken
        );
        assert_eq!(
            authenticate(None, Some("Basic eA=="), &tokens),
            Authn::BadToken
        );
        assert_eq!(
            authenticate(None, None, &tokens),
            Authn::User(User::anonymous())
        );
    }
}
