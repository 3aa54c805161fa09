//! The session, driven frame by frame through its channels, against a
//! "pod" on loopback.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot},
};

use super::{session, Pod};
use crate::spdy::{self, Decoder, Encoder, Frame, Headers, FLAG_FIN};

/// A client side of a session, speaking frames.
struct Client {
    enc: Encoder,
    dec: Decoder,
    buf: Vec<u8>,
    to_server: mpsc::Sender<Vec<u8>>,
    from_server: mpsc::Receiver<Vec<u8>>,
}

impl Client {
    async fn send(&mut self, f: Frame) {
        self.to_server.send(self.enc.encode(&f)).await.unwrap();
    }

    async fn recv(&mut self) -> Frame {
        loop {
            if let Some(f) = self.dec.next_frame(&mut self.buf).unwrap() {
                return f;
            }
            let chunk = tokio::time::timeout(Duration::from_secs(5), self.from_server.recv())
                .await
                .expect("a frame within 5s")
                .expect("session open");
            self.buf.extend(chunk);
        }
    }

    async fn open(&mut self, id: u32, kind: &str, port: &str, request: &str) {
        self.send(Frame::SynStream {
            stream_id: id,
            associated_to: 0,
            priority: 0,
            flags: 0,
            headers: Headers::default()
                .with("streamtype", kind)
                .with("port", port)
                .with("requestid", request),
        })
        .await;
    }
}

fn start(pod: Pod) -> Client {
    let (to_server, in_rx) = mpsc::channel(16);
    let (out_tx, from_server) = mpsc::channel(16);
    tokio::spawn(session(in_rx, out_tx, pod));
    Client {
        enc: Encoder::new(),
        dec: Decoder::new(),
        buf: Vec::new(),
        to_server,
        from_server,
    }
}

fn local_pod(addr: SocketAddr) -> Pod {
    Pod {
        name: "web-0".into(),
        uid: "u-1".into(),
        dial: Arc::new(move |port| Box::pin(TcpStream::connect(SocketAddr::new(addr.ip(), port)))),
    }
}

#[tokio::test]
async fn forwards_a_connection_both_ways_with_half_close() {
    // The "pod": answers what it read, upper-cased, once the client is done.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        s.write_all(&got.to_ascii_uppercase()).await.unwrap();
    });
    let mut c = start(local_pod(addr));
    let port = addr.port().to_string();
    c.open(1, "error", &port, "0").await;
    assert_eq!(
        c.recv().await,
        Frame::SynReply {
            stream_id: 1,
            flags: 0,
            headers: Headers::default()
        }
    );
    // The client never writes on the error stream.
    c.send(Frame::Data {
        stream_id: 1,
        flags: FLAG_FIN,
        data: vec![],
    })
    .await;
    c.open(3, "data", &port, "0").await;
    assert!(matches!(
        c.recv().await,
        Frame::SynReply { stream_id: 3, .. }
    ));
    c.send(Frame::Ping { id: 1 }).await;
    c.send(Frame::Data {
        stream_id: 3,
        flags: 0,
        data: b"hello ".to_vec(),
    })
    .await;
    c.send(Frame::Data {
        stream_id: 3,
        flags: FLAG_FIN,
        data: b"pod".to_vec(),
    })
    .await;
    let mut body = Vec::new();
    let mut pinged = false;
    loop {
        match c.recv().await {
            Frame::Ping { id: 1 } => pinged = true,
            Frame::Data {
                stream_id: 3,
                flags,
                data,
            } => {
                body.extend(data);
                if flags & FLAG_FIN != 0 {
                    break;
                }
            }
            f => panic!("unexpected {f:?}"),
        }
    }
    assert!(pinged);
    assert_eq!(body, b"HELLO POD");
    // Then the error stream closes, empty: no error.
    assert_eq!(
        c.recv().await,
        Frame::Data {
            stream_id: 1,
            flags: FLAG_FIN,
            data: vec![]
        }
    );
}

#[tokio::test]
async fn a_refused_port_is_reported_on_the_error_stream() {
    // A port nothing listens on: bind, then free it.
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let mut c = start(local_pod(addr));
    let port = addr.port().to_string();
    c.open(1, "error", &port, "7").await;
    c.recv().await;
    c.open(3, "data", &port, "7").await;
    c.recv().await;
    let Frame::Data {
        stream_id: 1,
        flags: 0,
        data,
    } = c.recv().await
    else {
        panic!("expected the error message");
    };
    let msg = String::from_utf8(data).unwrap();
    assert!(
        msg.starts_with(&format!(
            "error forwarding port {port} to pod web-0, uid u-1: "
        )),
        "{msg}"
    );
    assert_eq!(
        c.recv().await,
        Frame::RstStream {
            stream_id: 3,
            status: spdy::RST_CANCEL
        }
    );
    assert!(matches!(
        c.recv().await,
        Frame::Data {
            stream_id: 1,
            flags: FLAG_FIN,
            ..
        }
    ));
}

#[tokio::test]
async fn invalid_streams_are_reset() {
    let mut c = start(local_pod("127.0.0.1:1".parse().unwrap()));
    c.open(1, "bogus", "80", "0").await;
    assert_eq!(
        c.recv().await,
        Frame::RstStream {
            stream_id: 1,
            status: spdy::RST_CANCEL
        }
    );
    c.open(3, "data", "0", "0").await;
    assert!(matches!(
        c.recv().await,
        Frame::RstStream { stream_id: 3, .. }
    ));
    c.send(Frame::SynStream {
        stream_id: 5,
        associated_to: 0,
        priority: 0,
        flags: 0,
        headers: Headers::default().with("streamtype", "data"),
    })
    .await;
    assert!(matches!(
        c.recv().await,
        Frame::RstStream { stream_id: 5, .. }
    ));
}

#[tokio::test]
async fn a_client_reset_stops_forwarding_and_closes_the_error_stream() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (closed_tx, closed_rx) = oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(b"banner").await.unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
        let _ = closed_tx.send(());
    });
    let mut c = start(local_pod(addr));
    let port = addr.port().to_string();
    c.open(1, "error", &port, "0").await;
    c.recv().await;
    c.open(3, "data", &port, "0").await;
    c.recv().await;
    assert_eq!(
        c.recv().await,
        Frame::Data {
            stream_id: 3,
            flags: 0,
            data: b"banner".to_vec()
        }
    );
    c.send(Frame::RstStream {
        stream_id: 3,
        status: spdy::RST_CANCEL,
    })
    .await;
    assert!(matches!(
        c.recv().await,
        Frame::Data {
            stream_id: 1,
            flags: FLAG_FIN,
            ..
        }
    ));
    // The pod's connection was closed.
    tokio::time::timeout(Duration::from_secs(5), closed_rx)
        .await
        .unwrap()
        .unwrap();
}
