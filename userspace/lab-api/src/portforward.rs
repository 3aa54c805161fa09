//! Pod port-forward over WebSocket, as kube-rs speaks it: subprotocol
//! `v4.channel.k8s.io`, binary messages whose first byte is the channel;
//! port i uses channel 2i for data and 2i+1 for errors, and the first
//! message on each channel carries the port (u16, little endian). kubectl
//! speaks SPDY instead (`portforward_spdy`). Either way the endpoint dials
//! the pod from its node's network namespace ([`target`], [`dial`]).
use std::{net::SocketAddr, time::Duration};

use axum::{
    extract::ws::{Message, WebSocket, WebSocketUpgrade},
    http::Uri,
    response::Response,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
};
use tpbpf_lab::spec;
use tracing::{debug, warn};

/// Where a port-forward to a pod (or the agent of a node) lands: loopback
/// inside the pod's own network namespace, as the kubelet's container
/// runtime dials it (containerd enters the pod's namespace and connects to
/// localhost), so a port that listens only on the pod's loopback is
/// reached, and nothing outside the pod is.
#[derive(Clone, Debug)]
pub(crate) struct Target {
    pub ip: std::net::IpAddr,
    pub netns: String,
}

/// The pod `ns/pod` of lab `lab`, if the lab has it and its process runs.
pub(crate) fn target(lab: &str, ns: &str, pod: &str) -> Option<Target> {
    let lab = tpbpf_lab::Lab::new(lab);
    let live = lab.status();
    let agent = (ns == crate::objects::AGENT_NAMESPACE)
        .then(|| {
            spec::nodes().into_iter().find(|n| {
                format!("tpbpf-agent-{}", n.name) == pod
                    && live.agents.iter().any(|a| a.node == n.name && a.running)
            })
        })
        .flatten()
        .map(|n| lab.agent_netns(n.name));
    let netns = live
        .pod_specs
        .iter()
        .find(|p| {
            p.namespace == ns
                && p.name == pod
                && live
                    .pods
                    .iter()
                    .any(|l| l.namespace == ns && l.name == pod && l.running)
        })
        .map(|p| lab.pod_netns(p))
        .or(agent)?;
    Some(Target {
        ip: std::net::Ipv4Addr::LOCALHOST.into(),
        netns,
    })
}

/// Serves a port-forward to `target` (found by the caller) over the upgraded WebSocket.
pub(crate) fn upgrade(ws: WebSocketUpgrade, target: Target, uri: &Uri) -> Response {
    let ports: Vec<u16> = uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.strip_prefix("ports="))
        .flat_map(|v| v.split(','))
        .filter_map(|p| p.parse().ok())
        .collect();
    ws.protocols(["v4.channel.k8s.io", "portforward.k8s.io"])
        .on_upgrade(move |socket| forward(socket, target.ip.to_string(), target.netns, ports))
}

/// Connects to `addr` from network namespace `netns`.
pub(crate) async fn dial(netns: String, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let ns = netns.clone();
    let std = tokio::task::spawn_blocking(move || {
        tpbpf_lab::in_netns(&ns, move || {
            Some(std::net::TcpStream::connect_timeout(
                &addr,
                Duration::from_secs(5),
            ))
        })
    })
    .await
    .map_err(std::io::Error::other)?
    .ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("entering network namespace {netns}"),
        )
    })?
    .map_err(|e| std::io::Error::new(e.kind(), format!("connecting to {addr}: {e}")))?;
    std.set_nonblocking(true)?;
    // As the kubelet's dial into the pod (Go: TCP_NODELAY by default).
    std.set_nodelay(true)?;
    TcpStream::from_std(std)
}

async fn forward(mut socket: WebSocket, ip: String, netns: String, ports: Vec<u16>) {
    if ports.is_empty() {
        let _ = socket
            .send(Message::Binary(
                b"\x01no ports given (ports=N)".to_vec().into(),
            ))
            .await;
        return;
    }
    // Announce each port on its data and error channels.
    for (i, port) in ports.iter().enumerate() {
        let [lo, hi] = port.to_le_bytes();
        for ch in [2 * i as u8, 2 * i as u8 + 1] {
            if socket
                .send(Message::Binary(vec![ch, lo, hi].into()))
                .await
                .is_err()
            {
                return;
            }
        }
    }
    // One connection per port, opened now.
    let (to_ws_tx, mut to_ws_rx) = mpsc::channel::<Vec<u8>>(64);
    let mut writers = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let addr: SocketAddr = match format!("{ip}:{port}").parse() {
            Ok(a) => a,
            Err(_) => return,
        };
        match dial(netns.clone(), addr).await {
            Ok(stream) => {
                let (mut rd, wr) = stream.into_split();
                writers.push(Some(wr));
                let tx = to_ws_tx.clone();
                let ch = 2 * i as u8;
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 32 * 1024];
                    loop {
                        match rd.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                let mut frame = Vec::with_capacity(n + 1);
                                frame.push(ch);
                                frame.extend_from_slice(&buf[..n]);
                                if tx.send(frame).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                });
            }
            Err(e) => {
                warn!(%addr, "port-forward: {e}");
                writers.push(None);
                let mut frame = vec![2 * i as u8 + 1];
                frame.extend_from_slice(
                    format!("error forwarding port {port} to pod: {e}").as_bytes(),
                );
                let _ = to_ws_tx.send(frame).await;
            }
        }
    }
    drop(to_ws_tx);
    loop {
        tokio::select! {
            out = to_ws_rx.recv() => match out {
                Some(frame) => {
                    if socket.send(Message::Binary(frame.into())).await.is_err() {
                        return;
                    }
                }
                None => {
                    let _ = socket.send(Message::Close(None)).await;
                    return;
                }
            },
            msg = socket.recv() => match msg {
                Some(Ok(Message::Binary(data))) if !data.is_empty() => {
                    let ch = usize::from(data[0]);
                    if ch % 2 == 0 {
                        if let Some(Some(w)) = writers.get_mut(ch / 2) {
                            if w.write_all(&data[1..]).await.is_err() {
                                writers[ch / 2] = None;
                            }
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    debug!("port-forward: client closed");
                    return;
                }
                Some(Ok(_)) => {}
            },
        }
    }
}
