//! The operating system as tpbpf uses it, on both sides of the privilege
//! split and in the agent, without eBPF (no aya): IP ranges as users write
//! them, DNS labels as Kubernetes names namespaces, network namespaces,
//! routes and links over rtnetlink, socket diagnostics, and the frames and
//! peer credentials of tpbpfd's service socket.
mod cidr;
pub mod flows;
mod names;
pub mod netlink;
pub mod netns;
pub mod seqpacket;
pub mod sockdiag;

pub use cidr::{Cidr, CidrParseError};
pub use names::is_dns_label;
