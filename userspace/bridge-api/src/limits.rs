//! The bounds both sides keep, in one place: what a user's bridge may make
//! tpbpfd hold, and how long either side waits.
use std::time::Duration;

/// Connections tpbpfd serves at once.
pub const MAX_SESSIONS: usize = 64;
/// Connections one user (not root) may hold to tpbpfd at once.
pub const MAX_SESSIONS_PER_USER: usize = 16;
/// Bridges one user may hold at once.
pub const MAX_BRIDGES_PER_USER: usize = 8;
/// Redirected connections waiting to be handed over, per bridge.
pub const MAX_PENDING_HANDOVERS: usize = 1024;
/// Datagram flows per bridge, on each side.
pub const MAX_FLOWS: usize = 4096;
/// Datagrams one flow queues on its way to the cluster, at most, and the
/// bytes: 2 MiB is 110 ms at 200 Mbit/s (with 64 datagrams, 3.5 ms, iperf3
/// -u through port-forward lost 4 to 18% there on two busy CPUs; 1.7 to
/// 2.0% with these bounds).
pub const FLOW_QUEUE: usize = 1024;
pub const FLOW_QUEUE_BYTES: usize = 2 << 20;
/// Bytes queued in all of one side's flows together, at most.
pub const FLOWS_QUEUED_BYTES: usize = 32 << 20;
/// Answers one flow queues on their way back to the application, at most.
pub const ANSWER_QUEUE: usize = 64;
/// A flow with no datagram either way for this long is closed.
pub const FLOW_IDLE: Duration = Duration::from_secs(120);
/// DNS queries in flight per bridge, to the cluster.
pub const MAX_DNS_IN_FLIGHT: usize = 256;
/// DNS queries tpbpfd forwards at once per bridge, to the resolvers the
/// applications asked (each a socket for up to 5 s): more are dropped, and
/// the application's resolver retries.
pub const MAX_DNS_FORWARDS: usize = 256;
/// DNS-over-TCP connections tpbpfd serves at once per bridge (each open up
/// to 30 s idle): more are reset.
pub const MAX_DNS_TCP: usize = 64;
/// How long a cluster DNS query may take, end to end (the resolver of the
/// application retries after this).
pub const DNS_TIMEOUT: Duration = Duration::from_secs(5);
/// Exemptions of the user's side's own sockets in flight per bridge.
pub const MAX_EXEMPTIONS_IN_FLIGHT: usize = 64;
/// A request must arrive this soon after connecting, and be answered this
/// soon (loading a bridge may take longer: [`UP_TIMEOUT`]).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the user's side waits for its bridge to be loaded and attached.
pub const UP_TIMEOUT: Duration = Duration::from_secs(60);
/// Ranges in one request, to bridge and never to.
pub const MAX_RANGES: usize = 256;
/// DNS suffixes and namespaces in one request.
pub const MAX_DNS_SUFFIXES: usize = 16;
pub const MAX_NAMESPACES: usize = 64;
/// The cluster's namespaces a bridge's DNS knows (for `<svc>.<ns>` names):
/// a report with more is refused whole, and the set before it kept.
pub const MAX_MAPPED_NAMESPACES: usize = 10_000;
