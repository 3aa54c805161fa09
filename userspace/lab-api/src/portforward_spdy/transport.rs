//! How a client reaches the session: SPDY/3.1 in a WebSocket's binary
//! messages (kubectl 1.31+), or on the connection after a plain
//! `Upgrade: SPDY/3.1` (kubectl's fallback); each a reader and a writer
//! around [`session`].
use std::convert::Infallible;

use axum::{
    body::Body,
    extract::{
        ws::{Message, WebSocketUpgrade},
        FromRequestParts,
    },
    http::{header, request::Parts, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::mpsc,
};
use tracing::{info, warn};

use super::{
    session, Pod, ACCEPTED_PROTOCOLS_HEADER, CHUNK, PROTOCOL, PROTOCOL_HEADER, TUNNEL_PROTOCOL,
};

/// Hyper's upgrade handle, taken for requests asking for `Upgrade: SPDY/3.1`
/// (a WebSocket upgrade takes it through `WebSocketUpgrade` instead).
pub(crate) struct SpdyUpgrade(pub Option<OnUpgrade>);

impl<S: Send + Sync> FromRequestParts<S> for SpdyUpgrade {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Infallible> {
        Ok(Self(
            wants_spdy(&parts.headers)
                .then(|| parts.extensions.remove::<OnUpgrade>())
                .flatten(),
        ))
    }
}

fn header_has(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.to_ascii_lowercase().contains(token))
}

/// Whether the request asks for the plain SPDY/3.1 upgrade (the check of
/// the API machinery's upgrader: `Connection` has `upgrade`, `Upgrade` has
/// `spdy/3.1`).
pub(super) fn wants_spdy(headers: &HeaderMap) -> bool {
    header_has(headers, header::CONNECTION, "upgrade")
        && header_has(headers, header::UPGRADE, "spdy/3.1")
}

/// Whether a WebSocket upgrade asks for SPDY tunneled in WebSocket.
pub(crate) fn wants_tunnel(ws: &WebSocketUpgrade) -> bool {
    ws.requested_protocols()
        .any(|p| p.as_bytes() == TUNNEL_PROTOCOL.as_bytes())
}

/// The WebSocket tunnel: SPDY/3.1 in binary messages.
pub(crate) fn tunnel(ws: WebSocketUpgrade, pod: Pod) -> Response {
    ws.protocols([TUNNEL_PROTOCOL])
        .on_upgrade(move |socket| async move {
            info!(
                pod = %pod.name,
                "port-forward: SPDY/3.1 tunneled in WebSocket ({TUNNEL_PROTOCOL})"
            );
            let (mut sink, mut source) = socket.split();
            let (in_tx, in_rx) = mpsc::channel::<Vec<u8>>(16);
            let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(16);
            let reader = tokio::spawn(async move {
                while let Some(msg) = source.next().await {
                    match msg {
                        Ok(Message::Binary(b)) => {
                            if in_tx.send(b.to_vec()).await.is_err() {
                                break;
                            }
                        }
                        Ok(Message::Text(_)) => {
                            // The client's tunnel reads binary messages only.
                            warn!("port-forward: text message in a SPDY tunnel");
                            break;
                        }
                        Ok(Message::Close(_)) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            });
            let writer = async move {
                while let Some(bytes) = out_rx.recv().await {
                    if sink.send(Message::Binary(bytes.into())).await.is_err() {
                        return;
                    }
                }
                let _ = sink.send(Message::Close(None)).await;
            };
            tokio::join!(session(in_rx, out_tx, pod), writer);
            reader.abort();
        })
}

/// The plain upgrade: negotiate `X-Stream-Protocol-Version`, answer 101
/// `Upgrade: SPDY/3.1`, then speak SPDY on the connection.
pub(crate) fn upgrade(on_upgrade: OnUpgrade, headers: &HeaderMap, pod: Pod) -> Response {
    let offered: Vec<String> = headers
        .get_all(PROTOCOL_HEADER)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect();
    if offered.is_empty() {
        return plain(
            StatusCode::BAD_REQUEST,
            &[],
            "unable to upgrade: X-Stream-Protocol-Version is required",
        );
    }
    if !offered.iter().any(|p| p == PROTOCOL) {
        return plain(
            StatusCode::FORBIDDEN,
            &[(ACCEPTED_PROTOCOLS_HEADER, PROTOCOL)],
            &format!(
                "unable to upgrade: unable to negotiate protocol: client supports [{}], server accepts [{PROTOCOL}]",
                offered.join(" ")
            ),
        );
    }
    tokio::spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                warn!("port-forward: SPDY upgrade failed: {e}");
                return;
            }
        };
        info!(
            pod = %pod.name,
            "port-forward: SPDY/3.1 over an HTTP upgrade ({PROTOCOL})"
        );
        let (mut rd, mut wr) = tokio::io::split(TokioIo::new(upgraded));
        let (in_tx, in_rx) = mpsc::channel::<Vec<u8>>(16);
        let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(16);
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; CHUNK];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if in_tx.send(buf[..n].to_vec()).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
        let writer = async move {
            while let Some(bytes) = out_rx.recv().await {
                if wr.write_all(&bytes).await.is_err() {
                    return;
                }
            }
            let _ = wr.shutdown().await;
        };
        tokio::join!(session(in_rx, out_tx, pod), writer);
        reader.abort();
    });
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("SPDY/3.1"));
    h.insert(PROTOCOL_HEADER, HeaderValue::from_static(PROTOCOL));
    resp
}

/// A text/plain error, as Go's `http.Error` writes it.
fn plain(code: StatusCode, extra: &[(&'static str, &'static str)], msg: &str) -> Response {
    let mut resp = (
        code,
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        format!("{msg}\n"),
    )
        .into_response();
    for (k, v) in extra {
        resp.headers_mut().append(*k, HeaderValue::from_static(v));
    }
    resp
}
