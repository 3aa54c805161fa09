//! One forwarded connection: the pod dialed, bytes copied both ways with
//! half-close, and the outcome written on the request's error stream.
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::mpsc,
};
use tracing::{debug, warn};

use super::{streams::DataHalf, Pod, CHUNK};
use crate::spdy::{self, Frame};

/// Forwards one request: dials the pod's port and copies both ways until
/// both sides have closed, the client resets the data stream, or either
/// side fails; then closes the error stream (writing a failure on it first).
pub(super) async fn forward(
    pod: &Pod,
    error_id: u32,
    data: DataHalf,
    frames: &mpsc::Sender<Frame>,
) {
    let DataHalf {
        id: data_id,
        port,
        mut from_client,
        mut reset,
    } = data;
    let send = |f: Frame| async move {
        let _ = frames.send(f).await;
    };
    let close_error_stream = || {
        send(Frame::Data {
            stream_id: error_id,
            flags: spdy::FLAG_FIN,
            data: Vec::new(),
        })
    };
    let fail = |e: std::io::Error| async move {
        let msg = format!(
            "error forwarding port {port} to pod {}, uid {}: {e}",
            pod.name, pod.uid
        );
        warn!(pod = %pod.name, "port-forward: {msg}");
        send(Frame::Data {
            stream_id: error_id,
            flags: 0,
            data: msg.into_bytes(),
        })
        .await;
        send(Frame::RstStream {
            stream_id: data_id,
            status: spdy::RST_CANCEL,
        })
        .await;
    };
    let stream = tokio::select! {
        s = (pod.dial)(port) => s,
        _ = &mut reset => return close_error_stream().await,
    };
    let stream = match stream {
        Ok(s) => s,
        Err(e) => {
            fail(e).await;
            return close_error_stream().await;
        }
    };
    let (mut rd, mut wr) = stream.into_split();
    let to_client = async {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = rd.read(&mut buf).await?;
            let eof = n == 0;
            send(Frame::Data {
                stream_id: data_id,
                flags: if eof { spdy::FLAG_FIN } else { 0 },
                data: buf[..n].to_vec(),
            })
            .await;
            if eof {
                return Ok::<_, std::io::Error>(());
            }
        }
    };
    let to_pod = async {
        while let Some(bytes) = from_client.recv().await {
            wr.write_all(&bytes).await?;
        }
        // The client half-closed: so does the pod's side.
        wr.shutdown().await
    };
    let copied = tokio::select! {
        r = async { tokio::try_join!(to_client, to_pod) } => Some(r),
        _ = &mut reset => None,
    };
    match copied {
        Some(Ok(_)) => debug!(pod = %pod.name, port, "port-forward: connection done"),
        Some(Err(e)) => fail(e).await,
        None => debug!(pod = %pod.name, port, "port-forward: client reset the data stream"),
    }
    close_error_stream().await;
}
