//! Why the API server would not talk to us, said in one line: which
//! kubeconfig and context, what failed (the server's certificate, the
//! client's certificate, the credentials), and what to do about it. TLS
//! failures are found by walking the error's sources down to rustls's
//! error, which `std::io::Error` holds but does not give as its source.
use std::{error::Error as StdError, io};

use rustls::{AlertDescription, CertificateError};

/// The kubeconfig entries a client was built from.
#[derive(Clone, Debug, Default)]
pub struct Target {
    /// The kubeconfig's path (or `$KUBECONFIG`, or `~/.kube/config`).
    pub kubeconfig: String,
    pub context: String,
    pub cluster: String,
    pub user: String,
    pub server: String,
}

/// What went wrong, in the terms a user can act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cause {
    /// The server's certificate does not chain to the kubeconfig's CA.
    ServerCertUnknownIssuer,
    ServerCertExpired,
    ServerCertNotYetValid,
    /// The certificate does not name the host the kubeconfig dials.
    ServerCertWrongName,
    ServerCertOther(String),
    /// The server ended the handshake over the client's certificate.
    ClientCertExpired,
    ClientCertRefused(String),
    ClientCertRequired,
    /// 401: the credentials are not the server's.
    Unauthorized,
    /// The exec credential plugin did not give a credential.
    ExecPlugin(String),
}

/// The next error down: what an `io::Error` holds (its `source()` is the
/// held error's source, skipping the held error), else the source.
fn below<'a>(e: &'a (dyn StdError + 'static)) -> Option<&'a (dyn StdError + 'static)> {
    match e.downcast_ref::<io::Error>().and_then(io::Error::get_ref) {
        Some(inner) => Some(inner),
        None => e.source(),
    }
}

/// The rustls error anywhere down `e`'s chain (through nested
/// `io::Error`s, as hyper-rustls and tokio-rustls wrap it).
fn rustls_error<'a>(e: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            return Some(r);
        }
        cur = below(e);
    }
    None
}

fn from_rustls(e: &rustls::Error) -> Option<Cause> {
    use CertificateError as C;
    Some(match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer | C::BadSignature => Cause::ServerCertUnknownIssuer,
            C::Expired | C::ExpiredContext { .. } => Cause::ServerCertExpired,
            C::NotValidYet | C::NotValidYetContext { .. } => Cause::ServerCertNotYetValid,
            C::NotValidForName | C::NotValidForNameContext { .. } => Cause::ServerCertWrongName,
            other => Cause::ServerCertOther(format!("{other:?}")),
        },
        rustls::Error::AlertReceived(a) => match a {
            AlertDescription::CertificateExpired => Cause::ClientCertExpired,
            AlertDescription::CertificateRequired => Cause::ClientCertRequired,
            AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateUnknown
            | AlertDescription::CertificateRevoked
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::DecryptError
            | AlertDescription::AccessDenied => Cause::ClientCertRefused(format!("{a:?}")),
            _ => return None,
        },
        _ => return None,
    })
}

/// What a connection's error `e` comes down to, if it is a TLS failure
/// [`Cause`] names.
pub fn cause_of(e: &(dyn StdError + 'static)) -> Option<Cause> {
    rustls_error(e).and_then(from_rustls)
}

/// What `err` comes down to, if it is one of the failures [`Cause`] names.
pub fn cause(err: &kube::Error) -> Option<Cause> {
    match err {
        kube::Error::Api(s) if s.code == 401 => return Some(Cause::Unauthorized),
        kube::Error::Auth(e) => return Some(Cause::ExecPlugin(e.to_string())),
        _ => {}
    }
    rustls_error(err).and_then(from_rustls)
}

/// The problem and its fix, for `target`.
pub fn explain(cause: &Cause, t: &Target) -> (String, String) {
    let (k, cluster, user) = (&t.kubeconfig, &t.cluster, &t.user);
    let minify = format!(
        "or run `kubectl --kubeconfig {k} --context {} config view --minify --raw`",
        t.context
    );
    match cause {
        Cause::ServerCertUnknownIssuer => (
            "the API server's certificate is not signed by the kubeconfig's certificate-authority"
                .into(),
            format!("check certificate-authority-data for cluster {cluster} in {k} (is it this cluster's CA?), {minify}"),
        ),
        Cause::ServerCertExpired => (
            "the API server's certificate expired".into(),
            "renew it on the cluster (kubeadm: `kubeadm certs renew apiserver`), or check this machine's clock".into(),
        ),
        Cause::ServerCertNotYetValid => (
            "the API server's certificate is not valid yet".into(),
            "check this machine's clock".into(),
        ),
        Cause::ServerCertWrongName => (
            format!("the API server's certificate is not valid for {}", t.server),
            format!("use an address the certificate names as server for cluster {cluster} in {k}, or set its tls-server-name"),
        ),
        Cause::ServerCertOther(what) => (
            format!("the API server's certificate was refused ({what})"),
            format!("check certificate-authority-data for cluster {cluster} in {k}, {minify}"),
        ),
        Cause::ClientCertExpired => (
            format!("the API server refused the client certificate of user {user}: certificate expired"),
            format!("get a new client-certificate-data for user {user} in {k} (kubeadm: `kubeadm certs renew admin.conf`), or check this machine's clock"),
        ),
        Cause::ClientCertRefused(alert) => (
            format!("the API server refused the client certificate of user {user} ({alert}): the cluster's CA did not issue it"),
            format!("check client-certificate-data and client-key-data for user {user} in {k}, {minify}"),
        ),
        Cause::ClientCertRequired => (
            format!("the API server requires a client certificate, and user {user} has none"),
            format!("add client-certificate-data and client-key-data for user {user} in {k}"),
        ),
        Cause::Unauthorized => (
            format!("401 Unauthorized: the API server did not accept the credentials of user {user}"),
            format!("check the token, client certificate or exec plugin of user {user} in {k}, or run `kubectl --kubeconfig {k} --context {} auth whoami`", t.context),
        ),
        Cause::ExecPlugin(e) => (
            format!("the exec credential plugin of user {user} gave no credential: {e}"),
            format!("run the plugin by hand (users[{user}].user.exec.command in {k}) and check what it prints"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io_wrapping(e: rustls::Error) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn a_rustls_error_inside_an_io_error_is_found() {
        // As hyper-rustls hands it over: Other around InvalidData around rustls.
        let e = io::Error::other(io_wrapping(rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer,
        )));
        let dyn_e: &(dyn StdError + 'static) = &e;
        assert!(rustls_error(dyn_e).is_some());
        let cause = rustls_error(dyn_e).and_then(from_rustls);
        assert_eq!(cause, Some(Cause::ServerCertUnknownIssuer));
        // io::Error's own source() skips the error it holds.
        assert!(e.source().is_none());
    }

    #[test]
    fn the_servers_alerts_name_the_client_certificate() {
        assert_eq!(
            from_rustls(&rustls::Error::AlertReceived(
                AlertDescription::CertificateExpired
            )),
            Some(Cause::ClientCertExpired)
        );
        assert!(matches!(
            from_rustls(&rustls::Error::AlertReceived(AlertDescription::UnknownCA)),
            Some(Cause::ClientCertRefused(_))
        ));
        assert_eq!(
            from_rustls(&rustls::Error::AlertReceived(AlertDescription::CloseNotify)),
            None
        );
    }

    #[test]
    fn every_explanation_names_the_kubeconfig_or_the_clock() {
        let t = Target {
            kubeconfig: "/k".into(),
            context: "ctx".into(),
            cluster: "c".into(),
            user: "u".into(),
            server: "https://1.2.3.4:6443/".into(),
        };
        for c in [
            Cause::ServerCertUnknownIssuer,
            Cause::ServerCertWrongName,
            Cause::ServerCertOther("x".into()),
            Cause::ClientCertExpired,
            Cause::ClientCertRefused("x".into()),
            Cause::ClientCertRequired,
            Cause::Unauthorized,
            Cause::ExecPlugin("x".into()),
        ] {
            let (problem, fix) = explain(&c, &t);
            assert!(!problem.is_empty() && fix.contains("/k"), "{c:?}: {fix}");
        }
        let (problem, fix) = explain(&Cause::ServerCertUnknownIssuer, &t);
        assert!(
            problem.contains("certificate-authority")
                && fix.contains("certificate-authority-data for cluster c")
        );
    }
}
