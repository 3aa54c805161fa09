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

/// How a command reports: a table (text) for people, JSON for programs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
}
