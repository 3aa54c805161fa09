//! Loads tpbpf's kernel programs (built from `bpf/ebpf` by `build.rs` and
//! embedded in this crate) and attaches them to a cgroup through `bpf_link`s
//! owned by this process: when the process exits, however it exits, the
//! kernel detaches them and the machine is as it was.
//!
//! Minimum kernel: 5.15 (bpf_link for cgroup programs 5.7, `getpeername4`
//! 5.8, `bpf_get_netns_cookie` from sock_ops 5.15). `tpbpf doctor` checks
//! each of these on the running kernel.

mod intercept;
mod redirect;
mod udp;

pub use intercept::{Bypass as InterceptBypass, Interceptor};
pub use redirect::{
    remove_leftover_tc_filter, AttachedIds, Bypass, OrigDstTable, ProxyConfig, Redirector,
};
/// Network namespaces (kept here for the agent's callers).
pub use tpbpf_sys::netns;
pub use tpbpf_sys::{Cidr, CidrParseError};
pub use udp::{SlotInfo, Udp6Dest, Udp6Last, UdpSlots};

use thiserror::Error;

/// The kernel programs, as built by `build.rs`. Empty when the crate was
/// built with `TPBPF_SKIP_EBPF=1`.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tpbpf.bpf.o"));

/// The oldest kernel tpbpf runs on (docs/kernels.md).
pub const MIN_KERNEL: &str = "5.15";

impl LoadError {
    /// The error for a program the kernel would not load: on a kernel older
    /// than [`MIN_KERNEL`] it says so.
    pub fn program_load(name: &'static str, source: aya::programs::ProgramError) -> Self {
        use aya::util::KernelVersion;
        match KernelVersion::current() {
            Ok(v) if v < KernelVersion::new(5, 15, 0) => LoadError::KernelTooOld {
                name,
                found: v.to_string(),
                source: Box::new(source),
            },
            _ => LoadError::Program { name, source },
        }
    }
}

#[derive(Debug, Error)]
pub enum LoadError {
    #[error(
        "this tpbpf binary was built without its kernel programs (TPBPF_SKIP_EBPF was set): \
         rebuild it without TPBPF_SKIP_EBPF"
    )]
    NotEmbedded,
    #[error(
        "reading this network namespace's cookie (SO_NETNS_COOKIE, Linux 5.14 or later): {0}; \
         tpbpf bridges only the sockets of its own network namespace and needs it"
    )]
    NetnsCookie(String),
    #[error("loading tpbpf's kernel programs into the kernel: {0} (run `tpbpf doctor` to see what this kernel supports)")]
    Object(#[source] aya::EbpfError),
    #[error("kernel program `{name}` is missing from the embedded object: the build is inconsistent, rebuild tpbpf")]
    MissingProgram { name: &'static str },
    #[error("map `{name}` is missing from the embedded object: the build is inconsistent, rebuild tpbpf")]
    MissingMap { name: &'static str },
    #[error("loading kernel program `{name}`: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    /// A program the verifier refused on a kernel older than tpbpf's
    /// minimum: most likely what that kernel lacks (atomic fetch-add, 5.12;
    /// the netns cookie in sock_ops, 5.15), not a bug.
    #[error("loading kernel program `{name}` on Linux {found}: {source}. tpbpf needs Linux {MIN_KERNEL} or newer (`tpbpf doctor` names what this kernel lacks); upgrade the kernel")]
    KernelTooOld {
        name: &'static str,
        found: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    /// EPERM as root on a cgroup: another program holds that hook
    /// exclusively (attached without `BPF_F_ALLOW_MULTI`) on the cgroup or
    /// an ancestor; the kernel refuses every link below it.
    #[error("attaching kernel program `{name}` to cgroup {cgroup}: {source} (tpbpf needs root, or CAP_BPF + CAP_NET_ADMIN; as root, \"Operation not permitted\" on a cgroup means another program holds this hook exclusively there or on an ancestor, attached without BPF_F_ALLOW_MULTI: `bpftool cgroup tree` shows it)")]
    Attach {
        name: &'static str,
        cgroup: String,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map `{name}`: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}
