//! A request's streams as the kubelet keeps them: the header check of a
//! new stream, each open stream's state, and the error and data streams of
//! one request until both are there.
use tokio::sync::{mpsc, oneshot};

use crate::spdy::Headers;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Error,
    Data,
}

/// The streams' header check of the kubelet.
pub(super) fn check_stream(headers: &Headers) -> Result<(Kind, u16), String> {
    let port = headers
        .get("port")
        .filter(|p| !p.is_empty())
        .ok_or("\"Port\" header is required")?;
    let port: u16 = port
        .parse()
        .map_err(|e| format!("unable to parse {port:?} as a port: {e}"))?;
    if port < 1 {
        return Err(format!("port \"{port}\" must be > 0"));
    }
    let kind = match headers.get("streamtype") {
        None | Some("") => return Err("\"Streamtype\" header is required".into()),
        Some("error") => Kind::Error,
        Some("data") => Kind::Data,
        Some(other) => return Err(format!("invalid stream type {other:?}")),
    };
    Ok((kind, port))
}

/// One stream the client opened.
pub(super) struct StreamState {
    /// Bytes from the client for the pod (data streams, until FIN).
    pub(super) to_pod: Option<mpsc::Sender<Vec<u8>>>,
    /// Dropped when the client resets the stream (data streams).
    pub(super) reset: Option<oneshot::Sender<()>>,
}

/// The data stream of a request, waiting for its error stream.
pub(super) struct DataHalf {
    pub(super) id: u32,
    pub(super) port: u16,
    pub(super) from_client: mpsc::Receiver<Vec<u8>>,
    pub(super) reset: oneshot::Receiver<()>,
}

/// A request's streams, until both are open.
pub(super) struct Pair {
    pub(super) serial: u64,
    pub(super) error: Option<u32>,
    pub(super) data: Option<DataHalf>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_headers_are_checked_like_the_kubelet() {
        let h = |t: &str, p: &str| Headers::default().with("streamtype", t).with("port", p);
        assert_eq!(check_stream(&h("data", "80")), Ok((Kind::Data, 80)));
        assert_eq!(check_stream(&h("error", "6379")), Ok((Kind::Error, 6379)));
        assert!(check_stream(&h("data", "0")).is_err());
        assert!(check_stream(&h("data", "70000")).is_err());
        assert!(check_stream(&h("stdin", "80")).is_err());
        assert!(check_stream(&Headers::default().with("port", "80")).is_err());
    }
}
