//! Requests and answers: the JSON headers of the service socket.
use std::{net::SocketAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

/// What a user's side asks of tpbpfd.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum ToService {
    /// Make sure the user's state directory exists.
    Prepare,
    /// Load and attach a bridge; this connection then carries its traffic.
    Up(Box<UpRequest>),
    /// On a bridge's connection: exempt the passed socket (a connection of
    /// the user's side to the API server) from this bridge's redirection,
    /// answered by [`FromService::Exempted`] with the same `id`.
    Exempt { id: u32 },
    /// On a bridge's connection: the cluster's namespaces the user may
    /// list, for the bridge's DNS (`<svc>.<ns>` names), one name per line
    /// in the payload. A report larger than a frame comes in parts, each
    /// but the last with `more`; the last replaces the set whole.
    Namespaces {
        #[serde(default)]
        more: bool,
    },
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpRequest {
    /// The bridge's name (unique per user).
    pub instance: String,
    pub cidrs: Vec<String>,
    pub never_proxy: Vec<String>,
    pub dns: Option<DnsRequest>,
    /// The cgroup subtree to bridge (one the user owns); `None`: the
    /// machine. With `run`: the cgroup to make the command's below
    /// (default: the command's own).
    pub cgroup: Option<PathBuf>,
    /// `tpbpf run`: bridge only the command whose pidfd comes with the
    /// request (a child of the asking process, paused until `Ready`), in a
    /// cgroup tpbpfd makes for it.
    #[serde(default)]
    pub run: bool,
    /// Root only: also steer TCP connections arriving on these interfaces
    /// from other network namespaces (the tc path).
    #[serde(default)]
    pub attach_ifaces: Vec<String>,
    /// Root only: also the interfaces here that lead to these network
    /// namespaces.
    #[serde(default)]
    pub attach_netns: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsRequest {
    pub cluster_domain: String,
    pub suffixes: Vec<String>,
    pub namespaces: Vec<String>,
}

/// What tpbpfd answers or sends.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum FromService {
    Prepared {
        state_dir: PathBuf,
    },
    Ready(Ready),
    Refused {
        error: String,
    },
    /// The answer to [`ToService::Exempt`]: done, or why not.
    Exempted {
        id: u32,
        error: Option<String>,
    },
    /// A redirected connection (the passed descriptor) to `dst`.
    Tcp {
        dst: SocketAddr,
    },
}

/// A bridge tpbpfd made: what `tpbpf status` shows.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Ready {
    pub cgroup: PathBuf,
    pub tcp4: String,
    pub tcp6: Option<String>,
    pub udp_port: u16,
    pub program_ids: Vec<u32>,
    pub link_ids: Vec<u32>,
    /// The interfaces the tc path is attached to.
    #[serde(default)]
    pub attached_ifaces: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_and_operations_are_refused() {
        assert!(serde_json::from_str::<ToService>(r#"{"op":"prepare"}"#).is_ok());
        assert!(serde_json::from_str::<ToService>(r#"{"op":"format_disk"}"#).is_err());
        assert!(serde_json::from_str::<ToService>(
            r#"{"op":"up","instance":"a","cidrs":[],"never_proxy":[],"dns":null,"cgroup":null,"sudo":true}"#
        )
        .is_err());
    }
}
