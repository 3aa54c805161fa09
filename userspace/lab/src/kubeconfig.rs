//! Kubeconfigs for the lab's identities, shaped as kind, kubeadm and cloud
//! clusters hand them out: the cluster's CA inline
//! (`certificate-authority-data`), and one user per file with a client
//! certificate, a bearer token or an exec credential plugin.
use std::path::Path;

use base64::Engine as _;

use crate::pki::Issued;

/// How a kubeconfig's user proves who it is.
#[derive(Clone, Debug)]
pub enum Credential<'a> {
    /// `client-certificate-data` / `client-key-data` (kubeadm's admin.conf).
    ClientCert(&'a Issued),
    /// `token` (a static or service-account token).
    Token(&'a str),
    /// `exec`: a client.authentication.k8s.io/v1 credential plugin (as
    /// `aws eks get-token` or `gke-gcloud-auth-plugin`).
    Exec(&'a Path),
}

/// One cluster, one user, one context (named after the cluster).
#[derive(Clone, Debug)]
pub struct Spec<'a> {
    /// `https://ADDR:PORT`.
    pub server: &'a str,
    /// The CA the server's certificate must chain to, PEM.
    pub ca_pem: &'a str,
    /// The cluster's and the context's name.
    pub cluster: &'a str,
    /// The kubeconfig's name for the user.
    pub user: &'a str,
    pub credential: Credential<'a>,
}

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// The kubeconfig's YAML.
pub fn render(spec: &Spec<'_>) -> String {
    let Spec {
        server,
        ca_pem,
        cluster,
        user,
        ..
    } = spec;
    let credential = match &spec.credential {
        Credential::ClientCert(issued) => format!(
            "    client-certificate-data: {}\n    client-key-data: {}\n",
            b64(&issued.cert_pem),
            b64(&issued.key_pem)
        ),
        Credential::Token(token) => format!("    token: {token}\n"),
        Credential::Exec(command) => format!(
            "    exec:\n      apiVersion: client.authentication.k8s.io/v1\n      command: {}\n      interactiveMode: Never\n      provideClusterInfo: false\n",
            command.display()
        ),
    };
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: {cluster}\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: {user}\n  user:\n{credential}contexts:\n- name: {cluster}\n  context:\n    cluster: {cluster}\n    user: {user}\n    namespace: default\ncurrent-context: {cluster}\n",
        ca = b64(ca_pem),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_certificate_kubeconfig_carries_the_ca_and_the_identity_inline() {
        let issued = Issued {
            cert_pem: "CERT".into(),
            key_pem: "KEY".into(),
        };
        let text = render(&Spec {
            server: "https://172.31.0.1:6443",
            ca_pem: "CA",
            cluster: "lab",
            user: "kubernetes-admin",
            credential: Credential::ClientCert(&issued),
        });
        assert!(
            text.contains("certificate-authority-data: Q0E=\n"),
            "{text}"
        );
        assert!(
            text.contains("client-certificate-data: Q0VSVA==\n"),
            "{text}"
        );
        assert!(text.contains("client-key-data: S0VZ\n"), "{text}");
        assert!(text.contains("current-context: lab\n"), "{text}");
    }

    #[test]
    fn an_exec_kubeconfig_names_the_plugin_and_never_prompts() {
        let text = render(&Spec {
            server: "https://172.31.0.1:6443",
            ca_pem: "CA",
            cluster: "lab",
            user: "sso",
            credential: Credential::Exec(Path::new("/run/x/exec-credential")),
        });
        assert!(
            text.contains("      command: /run/x/exec-credential\n"),
            "{text}"
        );
        assert!(text.contains("interactiveMode: Never"), "{text}");
        assert!(!text.contains("token:"), "{text}");
    }
}
