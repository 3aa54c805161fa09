//! What can go wrong reaching a cluster and finding what to bridge, each
//! error saying what failed, on what, and what to do.
use thiserror::Error;

#[derive(Debug, Error)]
pub enum KubeError {
    #[error("reading kubeconfig {path}: {source} (set KUBECONFIG or pass --kubeconfig)")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no usable kubeconfig: {0} (set KUBECONFIG, pass --kubeconfig, or check ~/.kube/config)"
    )]
    Infer(String),
    #[error("connecting to the cluster: {0}")]
    Client(#[source] kube::Error),
    /// The API server would not talk to this kubeconfig's identity (TLS,
    /// credentials): one line with what and where, and the fix.
    #[error(
        "{problem} (API server {server}, context {context} of kubeconfig {kubeconfig}): {fix}"
    )]
    Refused {
        kubeconfig: String,
        context: String,
        server: String,
        problem: String,
        fix: String,
    },
    #[error("the API server {server} (context {context} of kubeconfig {kubeconfig}) did not answer: {source} (is it up, and reachable from here?)")]
    Unanswered {
        kubeconfig: String,
        context: String,
        server: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error(
        "{what}: {source} (is the API server at {server} reachable, and may you list {what}?)"
    )]
    Api {
        what: &'static str,
        server: String,
        #[source]
        source: kube::Error,
    },
    #[error("could not find the cluster's service range: {0} (give the ranges with --cidr)")]
    ServiceCidr(String),
    #[error("found nothing to bridge: {0}")]
    NothingToBridge(String),
}
