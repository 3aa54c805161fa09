//! The operating system as tpbpf uses it, on both sides of the privilege
//! split and in the agent, without eBPF (no aya): IP ranges as users write
//! them, DNS labels as Kubernetes names namespaces, network namespaces,
//! routes and links over rtnetlink, socket diagnostics, the frames and
//! peer credentials of tpbpfd's service socket, and whether the kernel has
//! TLS.
mod cidr;
pub mod flows;
mod names;
pub mod netlink;
pub mod netns;
pub mod seqpacket;
pub mod sockdiag;
mod tls;

pub use cidr::{Cidr, CidrParseError};
pub use names::is_dns_label;
pub use tls::kernel_tls_probe;
