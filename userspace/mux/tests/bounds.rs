//! A peer that floods and never reads cannot grow the other side's queues:
//! pongs coalesce to the latest, refused opens end the session once their
//! refusals pile past the control bound.
mod common;

use std::time::Duration;

use common::*;
use tokio::{io::AsyncWriteExt, net::TcpStream};
use tpbpf_mux::{Config, Destination};
use tpbpf_proto::{encode, encode_hello, Frame, Hello, VERSION};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Opens a raw session and writes `frames` without ever reading.
async fn flood(addr: std::net::SocketAddr, frames: impl Iterator<Item = Frame>) -> TcpStream {
    // A tiny receive buffer: the server's answers back up at once.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut raw = sock.connect(addr).await.unwrap();
    let mut buf = Vec::new();
    encode_hello(
        &Hello {
            version: VERSION,
            session: [7; 16],
            resume: false,
            received: 0,
            token: TOKEN.to_vec(),
        },
        &mut buf,
    )
    .unwrap();
    for f in frames {
        encode(&f, &mut buf).unwrap();
        if buf.len() > 64 * 1024 {
            if raw.write_all(&buf).await.is_err() {
                return raw;
            }
            buf.clear();
        }
    }
    let _ = raw.write_all(&buf).await;
    raw
}

#[tokio::test]
async fn a_hundred_thousand_unread_pings_leave_one_pong_waiting() {
    let srv = server(Config::default(), echo).await;
    let before = rss_kib();
    let _raw = flood(srv.addr, (0..100_000u64).map(|nonce| Frame::Ping { nonce })).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sessions = srv.sessions.lock().unwrap().clone();
    let s = sessions.first().expect("the session");
    let queued = s.stats().queued_control;
    println!(
        "100k unread pings: {queued} bytes queued, RSS {} -> {} KiB",
        before,
        rss_kib()
    );
    assert!(queued <= 64, "pongs piled up: {queued} bytes");
}

#[tokio::test]
async fn a_hundred_thousand_refused_opens_end_the_session_instead_of_growing() {
    let config = Config {
        max_streams: 4,
        ..Config::default()
    };
    let srv = server(config, |_s| async {}).await;
    let before = rss_kib();
    let opens = (0..100_000u32).map(|i| Frame::Open {
        stream: 2 * i + 1,
        dst: Destination::Addr("10.96.0.10:80".parse().unwrap()),
        data: Vec::new(),
    });
    let _raw = flood(srv.addr, opens).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sessions = srv.sessions.lock().unwrap().clone();
    let s = sessions.first().expect("the session");
    let (queued, ended) = (s.stats().queued_control, s.ended());
    println!(
        "100k refused opens unread: {queued} bytes queued, ended: {ended:?}, RSS {} -> {} KiB",
        before,
        rss_kib()
    );
    assert!(
        queued <= 1024 * 1024 + 4096,
        "refusals piled up: {queued} bytes"
    );
    assert!(
        ended
            .as_ref()
            .is_some_and(|e| e.contains("does not read the refusals")),
        "{ended:?}"
    );
}

#[tokio::test]
async fn sessions_and_handshakes_in_progress_are_capped() {
    use tokio::io::AsyncReadExt;
    let config = Config {
        max_sessions: 2,
        max_handshakes: 2,
        handshake_timeout: Duration::from_millis(500),
        ..Config::default()
    };
    let srv = server(config.clone(), echo).await;
    let _a = client(srv.addr, config.clone()).await;
    let _b = client(srv.addr, config.clone()).await;
    let third = tpbpf_mux::Client::connect(
        std::sync::Arc::new(tpbpf_mux::transport::TcpConnector { addr: srv.addr }),
        TOKEN.to_vec(),
        config.clone(),
    )
    .await;
    let e = third.err().expect("a third session past max_sessions");
    assert!(e.to_string().contains("sessions already"), "{e}");

    // Two silent connections hold both handshake slots: a third is closed
    // at once, and once they time out, handshakes go on.
    let _s1 = TcpStream::connect(srv.addr).await.unwrap();
    let _s2 = TcpStream::connect(srv.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut s3 = TcpStream::connect(srv.addr).await.unwrap();
    let mut b = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_millis(300), s3.read(&mut b)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "a connection past max_handshakes was kept: {closed:?}"
    );
}
