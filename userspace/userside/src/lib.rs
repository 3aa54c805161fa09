//! The user's side of a bridge: everything of tpbpf that runs as the user
//! who asked, never as root on their behalf: the kubeconfig and its exec
//! credential plugins, the tunnel to the cluster's agent, intercepts and
//! their control socket, and the receiver of what tpbpfd hands over.
//!
//! tpbpfd (root: eBPF, cgroups, listeners) and this side talk over one
//! connection per bridge, in the contract of `tpbpf-bridge-api`; for root,
//! tpbpfd's service runs in the same process, on a socket pair, so there is
//! one start-up path ([`start::start`]).
pub mod args;
pub mod client;
pub mod control;
pub mod handover;
pub mod process;
mod relay;
pub mod routes;
pub mod start;
pub mod tunnel;
pub mod upstream;

pub use args::BridgeArgs;
pub use start::{start, Mode, Tpbpfd};
pub use tunnel::TunnelUpstream;
pub use upstream::{NetnsUpstream, Upstream};

/// How a command reports: a table (text) for people, JSON or YAML for
/// programs (the same values: YAML is the JSON's other spelling).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
    Yaml,
}

impl Output {
    /// Whether this is a format for programs (JSON or YAML).
    pub fn machine(self) -> bool {
        self != Output::Table
    }

    /// `v` as this format prints it: JSON on one line, or one YAML
    /// document (starting `---`, so a stream of them is a multi-document
    /// file); for [`Output::Table`], JSON too (a caller with no table).
    pub fn render(self, v: &serde_json::Value) -> String {
        match self {
            Output::Yaml => format!(
                "---\n{}",
                serde_saphyr::to_string(v).unwrap_or_else(|e| format!("# not YAML: {e}\n"))
            ),
            Output::Table | Output::Json => format!("{v}\n"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Output;

    #[test]
    fn yaml_output_reads_back_as_the_json_it_spells() {
        let v = serde_json::json!({
            "instance": "default", "up": true, "pid": 4242,
            "cluster": {"namespaces": ["default", "cache"], "dns": "10.96.0.10", "empty": []},
            "note": "a: colon, a # hash, \"quotes\" and\nnewline", "none": null, "ratio": 0.5,
        });
        let yaml = Output::Yaml.render(&v);
        assert!(yaml.starts_with("---\n"), "{yaml}");
        let back: serde_json::Value = serde_saphyr::from_str(&yaml).unwrap();
        assert_eq!(back, v, "{yaml}");
        let json: serde_json::Value = serde_json::from_str(&Output::Json.render(&v)).unwrap();
        assert_eq!(json, v);
    }
}
