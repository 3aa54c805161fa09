//! What tpbpf's node agent and its clients (tpbpfd, `tpbpf install`, the
//! lab) agree on, defined once: where the agent runs, its ports, and the
//! credentials its `/credentials` endpoint hands out.
use serde::{Deserialize, Serialize};

/// The namespace tpbpf installs into.
pub const NAMESPACE: &str = "tpbpf-system";
/// The agent DaemonSet's name (and its container's, and its service
/// account's).
pub const DAEMONSET: &str = "tpbpf-agent";
/// The label the agent's pods carry: `app=tpbpf-agent`.
pub const APP_LABEL: (&str, &str) = ("app", "tpbpf-agent");
/// HTTP (`/healthz`, `/info`, `/credentials`), on the agent pod's loopback.
pub const HTTP_PORT: u16 = 4390;
/// The tunnel (TLS), on every address of the agent pod; a hostPort too.
pub const TUNNEL_PORT: u16 = 4391;

/// Where a kubelet mounts the agent's service-account token, CA and
/// namespace; [`SERVICE_ACCOUNT_DIR_ENV`] names another directory (the
/// lab's agents that run as plain processes).
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
pub const SERVICE_ACCOUNT_DIR_ENV: &str = "TPBPF_SERVICE_ACCOUNT_DIR";

/// What `/credentials` answers: one fresh token for one session, the
/// agent's TLS certificate fingerprint to pin, and where its tunnel listens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    pub token: String,
    /// SHA-256 of the agent's certificate, hex.
    pub fingerprint: String,
    pub tunnel_port: u16,
    /// The tunnel's listening address as the agent sees it.
    #[serde(default)]
    pub tunnel_address: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_round_trip_as_json() {
        let c = Credentials {
            token: "ab".into(),
            fingerprint: "cd".into(),
            tunnel_port: TUNNEL_PORT,
            tunnel_address: "0.0.0.0:4391".into(),
        };
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<Credentials>(&text).unwrap(), c);
        // Older agents said no tunnel_address.
        let old: Credentials =
            serde_json::from_str(r#"{"token":"t","fingerprint":"f","tunnel_port":4391}"#).unwrap();
        assert_eq!(old.tunnel_address, "");
    }
}
