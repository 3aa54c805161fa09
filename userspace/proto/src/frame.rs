//! The messages.
use std::net::SocketAddr;

/// Where a stream or datagram goes: an address, or a name the agent resolves
/// with the cluster's DNS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    Addr(SocketAddr),
    Name { host: String, port: u16 },
}

/// Why a stream was reset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetReason {
    /// The destination refused the connection.
    Refused,
    /// No route, timeout, or an unreachable destination.
    Unreachable,
    /// The peer's application aborted the stream.
    Aborted,
    /// A flow-control or protocol limit was broken.
    ProtocolError,
    /// The session could not resume in time: bytes may have been lost.
    ResumeExpired,
    /// Anything else; the message says more.
    Other,
}

/// The first message of a session, client to server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    /// Random, chosen by the client; the same id resumes a session.
    pub session: [u8; 16],
    /// True to resume the session `session` on a new transport; false to
    /// start a new one.
    pub resume: bool,
    /// For a resume: how many bytes of the server's reliable frames the
    /// client has received (see [`Frame::is_reliable`]).
    pub received: u64,
    /// Authentication token issued by the agent side.
    pub token: Vec<u8>,
}

/// The server's answer to a [`Hello`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Welcome {
    /// The version both speak.
    pub version: u16,
    pub status: WelcomeStatus,
    /// For a resume: how many bytes of the client's reliable frames the
    /// server has received; the client replays from there.
    pub received: u64,
    /// Why, when refused; empty otherwise.
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WelcomeStatus {
    /// A new session.
    Accepted,
    /// The session was resumed: replay from `received`.
    Resumed,
    /// The token was wrong or missing.
    Unauthorized,
    /// The session to resume is unknown or expired.
    UnknownSession,
    /// No common protocol version.
    Version,
}

/// What an intercept does with the workload's incoming connections.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InterceptMode {
    /// Every new connection goes to the developer.
    Steal,
    /// HTTP requests with the header go to the developer, the rest to the
    /// workload.
    Header { name: String, value: String },
    /// HTTP requests whose path starts with the prefix go to the developer.
    PathPrefix(String),
    /// The workload answers; the developer gets a copy of each request.
    Mirror,
}

/// A frame after the hello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// Opens a TCP stream; `data` is sent right after the connect (zero round trips).
    Open {
        stream: u32,
        dst: Destination,
        data: Vec<u8>,
    },
    Data {
        stream: u32,
        data: Vec<u8>,
    },
    /// The receiver read `bytes` more: the sender may send that much more.
    Credit {
        stream: u32,
        bytes: u32,
    },
    /// No more data from the sender on this stream.
    HalfClose {
        stream: u32,
    },
    Reset {
        stream: u32,
        reason: ResetReason,
        message: String,
    },
    /// One UDP datagram on a flow (a flow is a (client socket, destination) pair).
    Datagram {
        flow: u32,
        dst: Destination,
        data: Vec<u8>,
    },
    DnsQuery {
        id: u32,
        query: Vec<u8>,
    },
    DnsAnswer {
        id: u32,
        answer: Vec<u8>,
    },
    /// Agent to client: a connection for intercept `intercept` arrived
    /// (from `src`, to the pod's `dst`): this opens `stream`, an id of the
    /// agent's, as [`Frame::Open`] would; its bytes follow in data frames.
    /// The client refuses it with a reset when it has no such intercept
    /// (any more). Since version 2; every intercepted connection opens so.
    InterceptIncoming {
        intercept: u32,
        stream: u32,
        src: SocketAddr,
        dst: SocketAddr,
    },
    /// Client to agent: steer new connections to `target` (a pod's IP and
    /// port) into this session; the agent opens a stream per connection
    /// with [`Frame::InterceptIncoming`], `target` as its destination.
    InterceptStart {
        intercept: u32,
        target: SocketAddr,
        mode: InterceptMode,
    },
    /// Agent to client: the intercept is in place (`ok`; `message` is then
    /// the environment of the pod's process, `KEY=VALUE` entries separated
    /// by NUL bytes), failed, or ended on the agent's side (`message` says
    /// why).
    InterceptStatus {
        intercept: u32,
        ok: bool,
        message: String,
    },
    /// Client to agent: remove the intercept.
    InterceptStop {
        intercept: u32,
    },
    /// Agent to client: before intercepting, prove your Kubernetes
    /// identity. With a `port`: port-forward to the pod's `port` through
    /// the API server and send `nonce` there (it proves `pods/portforward`).
    /// With port 0 (since version 3): answer with [`Frame::InterceptProof`]
    /// (the agent asks the API server what that identity may do).
    InterceptChallenge {
        intercept: u32,
        port: u16,
        nonce: [u8; 16],
    },
    /// Client to agent (since version 3): who is asking for the intercept
    /// of pod `proof.namespace/proof.pod`, answering the challenge whose
    /// nonce the agent sent.
    InterceptProof {
        intercept: u32,
        proof: IdentityProof,
    },
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    /// The sender will accept no new streams; existing ones finish.
    GoAway {
        message: String,
    },
    /// Resume: the sender has received `received` data bytes of the session.
    Ack {
        received: u64,
    },
}

impl Frame {
    /// Whether the frame is part of the session's reliable byte stream, the
    /// one that is counted, acknowledged and replayed on resume. Keepalive
    /// and acknowledgements belong to one transport only.
    pub fn is_reliable(&self) -> bool {
        !matches!(
            self,
            Frame::Ping { .. } | Frame::Pong { .. } | Frame::Ack { .. }
        )
    }
}

/// The most certificates a client's chain may carry in an
/// [`IdentityProof`], and the longest namespace or pod name.
pub const MAX_PROOF_CHAIN: usize = 4;
pub const MAX_PROOF_NAME: usize = 253;

/// A client's identity, as the API server would know it, and the pod it
/// asks about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityProof {
    pub namespace: String,
    pub pod: String,
    pub credential: Credential,
}

/// What identifies the client: its bearer token (a kubeconfig token or an
/// exec plugin's), which the agent has the API server review; or its
/// client certificate chain and a signature, made with the certificate's
/// key, over [`identity_message`].
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    Token(String),
    Certificate {
        chain: Vec<Vec<u8>>,
        /// The TLS `SignatureScheme` of `signature`.
        scheme: u16,
        signature: Vec<u8>,
    },
}

// A token is a secret: never in a log.
impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Token(_) => f.write_str("Token(..)"),
            Credential::Certificate { chain, scheme, .. } => {
                write!(
                    f,
                    "Certificate({} certificates, scheme {scheme:#06x})",
                    chain.len()
                )
            }
        }
    }
}

/// What a client certificate's key signs: the challenge's nonce and the
/// pod asked about, so a signature answers one challenge for one pod.
pub fn identity_message(nonce: &[u8; 16], namespace: &str, pod: &str) -> Vec<u8> {
    let mut m = b"tpbpf intercept identity v1\0".to_vec();
    m.extend_from_slice(nonce);
    m.extend_from_slice(namespace.as_bytes());
    m.push(b'/');
    m.extend_from_slice(pod.as_bytes());
    m
}
