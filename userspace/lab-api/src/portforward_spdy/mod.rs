//! Pod port-forward over SPDY/3.1, as kubectl speaks it. kubectl (1.31+)
//! first asks for a WebSocket with subprotocol `SPDY/3.1+portforward.k8s.io`
//! and runs SPDY inside its binary messages (the API server's tunnel,
//! KEP-4006); when that upgrade fails it falls back to a POST with
//! `Upgrade: SPDY/3.1` and `X-Stream-Protocol-Version: portforward.k8s.io`.
//! Both end here, in the same session as the kubelet serves it:
//!
//! - For each forwarded connection the client opens two streams, error
//!   then data, with headers `streamtype` (`error`|`data`), `port` and
//!   `requestid`; every valid stream gets a SYN_REPLY, an invalid one a
//!   RST_STREAM.
//! - Once a request has both, the lab dials the pod from its node's network
//!   namespace and copies bytes both ways; FIN on the data stream is a
//!   half-close in either direction.
//! - When forwarding ends the error stream is closed; a failure is written
//!   on it first (`error forwarding port 80 to pod ..., uid ...: ...`) and the
//!   data stream is reset.
//! - PINGs from the client are echoed; nothing is flow-controlled.

//!
//! The files: how a client gets here (`transport`: the WebSocket tunnel and
//! the plain upgrade), the session loop (`session`), its stream state
//! machine (`conn`, over the types in `streams`), and the copy of one
//! request's bytes to and from the pod (`forward`). The frames themselves
//! are `crate::spdy`'s.
mod conn;
mod forward;
mod session;
mod streams;
#[cfg(test)]
mod tests;
mod transport;

use std::{future::Future, net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use tokio::net::TcpStream;

use session::session;
pub(crate) use transport::{tunnel, upgrade, wants_tunnel, SpdyUpgrade};

/// The port-forward subprotocol (`X-Stream-Protocol-Version`).
pub(crate) const PROTOCOL: &str = "portforward.k8s.io";
/// The WebSocket subprotocol of SPDY tunneled in WebSocket.
pub(crate) const TUNNEL_PROTOCOL: &str = "SPDY/3.1+portforward.k8s.io";
const PROTOCOL_HEADER: &str = "x-stream-protocol-version";
const ACCEPTED_PROTOCOLS_HEADER: &str = "x-accepted-stream-protocol-versions";
/// How long the kubelet waits for the second stream of a request.
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes read from the pod per DATA frame.
const CHUNK: usize = 32 * 1024;

type DialFuture = Pin<Box<dyn Future<Output = std::io::Result<TcpStream>> + Send>>;

/// The pod being forwarded to.
#[derive(Clone)]
pub(crate) struct Pod {
    pub name: String,
    pub uid: String,
    /// Connects to a port of the pod.
    pub dial: Arc<dyn Fn(u16) -> DialFuture + Send + Sync>,
}

impl Pod {
    /// The lab's pod: dialed from its node's network namespace.
    pub fn in_lab(name: &str, uid: String, target: crate::portforward::Target) -> Self {
        Self {
            name: name.to_string(),
            uid,
            dial: Arc::new(move |port| {
                let netns = target.netns.clone();
                let addr = SocketAddr::new(target.ip, port);
                Box::pin(crate::portforward::dial(netns, addr))
            }),
        }
    }
}
