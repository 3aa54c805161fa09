//! A peer that floods and never reads cannot grow the other side's queues:
//! pongs coalesce to the latest, refused opens end the session once their
//! refusals pile past the control bound. Each flood is shown to have been
//! read and handled, not merely sent: the bound is checked after the
//! session has processed it.
mod common;

use std::time::Duration;

use common::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tpbpf_mux::{Config, Destination};
use tpbpf_proto::{decode, decode_welcome, encode, encode_hello, Frame, Hello, VERSION};

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

/// What the raw peer reads back, once it reads: the welcome, then frames.
struct RawReader {
    buf: Vec<u8>,
    welcomed: bool,
}

impl RawReader {
    fn new() -> RawReader {
        RawReader {
            buf: Vec::new(),
            welcomed: false,
        }
    }

    /// The next frame from the server; `None` when it closed the connection.
    async fn next(&mut self, raw: &mut TcpStream) -> Option<Frame> {
        loop {
            if !self.welcomed {
                if let Some((_, used)) = decode_welcome(&self.buf).expect("a welcome") {
                    self.buf.drain(..used);
                    self.welcomed = true;
                    continue;
                }
            } else if let Some((frame, used)) = decode(&self.buf).expect("a well-formed frame") {
                self.buf.drain(..used);
                return Some(frame);
            }
            let mut chunk = [0u8; 64 * 1024];
            match raw.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

const TIMEOUT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn a_hundred_thousand_unread_pings_leave_one_pong_waiting() {
    // No keepalive of the server's own while the test runs: what it queues
    // is the pongs and acknowledgements only.
    let config = Config {
        keepalive: Duration::from_secs(600),
        keepalive_timeout: Duration::from_secs(600),
        ..Config::default()
    };
    let (srv, mut streams) = handing_server(config).await;
    let before = rss_kib();
    // The pings, then an open: frames are handled in order, so the stream
    // reaches the server's application only once every ping was.
    let marker = Frame::Open {
        stream: 1,
        dst: Destination::Addr("10.96.0.10:80".parse().unwrap()),
        data: b"after the pings".to_vec(),
    };
    let pings = (0..100_000u64).map(|nonce| Frame::Ping { nonce });
    let mut raw = flood(srv.addr, pings.chain(std::iter::once(marker))).await;
    let mut stream = tokio::time::timeout(TIMEOUT, streams.recv())
        .await
        .expect("the server never got past the pings")
        .expect("the stream after the pings");
    let mut first = [0u8; 15];
    stream.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"after the pings");
    let s = first_session(&srv).await;
    let queued = s.stats().queued_control;
    println!(
        "100k unread pings: {queued} bytes queued, RSS {} -> {} KiB",
        before,
        rss_kib()
    );
    assert!(queued <= 64, "pongs piled up: {queued} bytes");

    // Reading now: the pongs that went out end with the latest ping's, far
    // fewer than one a ping; and the session still answers a ping.
    let mut reader = RawReader::new();
    let mut pongs = 0u64;
    let last = tokio::time::timeout(TIMEOUT, async {
        loop {
            match reader.next(&mut raw).await {
                Some(Frame::Pong { nonce }) => {
                    pongs += 1;
                    if nonce == 99_999 {
                        return nonce;
                    }
                }
                Some(_) => {}
                None => panic!("the server closed the session"),
            }
        }
    })
    .await
    .expect("no pong for the last ping");
    println!("{pongs} pongs read for 100k pings, the last for ping {last}");
    assert!(
        pongs < 100_000,
        "every ping got its own pong: none coalesced"
    );
    let mut again = Vec::new();
    encode(&Frame::Ping { nonce: 1 << 40 }, &mut again).unwrap();
    raw.write_all(&again).await.unwrap();
    tokio::time::timeout(TIMEOUT, async {
        while reader.next(&mut raw).await != Some(Frame::Pong { nonce: 1 << 40 }) {}
    })
    .await
    .expect("no pong for a ping after the flood");
    assert!(s.ended().is_none(), "{:?}", s.ended());
}

#[tokio::test]
async fn a_hundred_thousand_refused_opens_end_the_session_instead_of_growing() {
    let config = Config {
        max_streams: 4,
        ..Config::default()
    };
    // Echoing streams that never end: the first 4 opens hold the limit.
    let srv = server(config, echo).await;
    let before = rss_kib();
    let opens = (0..100_000u32).map(|i| Frame::Open {
        stream: 2 * i + 1,
        dst: Destination::Addr("10.96.0.10:80".parse().unwrap()),
        data: Vec::new(),
    });
    let mut raw = flood(srv.addr, opens).await;
    let s = first_session(&srv).await;
    let ended = tokio::time::timeout(TIMEOUT, s.closed())
        .await
        .expect("the flood of opens did not end the session");
    let queued = s.stats().queued_control;
    println!(
        "100k refused opens unread: {queued} bytes queued, ended: {ended:?}, RSS {} -> {} KiB",
        before,
        rss_kib()
    );
    assert!(ended.contains("does not read the refusals"), "{ended:?}");
    // The refusals piled up to the bound (the opens were read and refused)
    // and no further: 1 MiB of control beyond the 4 MiB datagrams may fill.
    let bound = 5 * 1024 * 1024;
    assert!(
        queued >= bound,
        "only {queued} bytes of refusals: the opens were not refused"
    );
    assert!(queued <= bound + 4096, "refusals piled up: {queued} bytes");
    // The flooding transport is closed; the server serves other sessions.
    let mut reader = RawReader::new();
    tokio::time::timeout(TIMEOUT, async {
        while reader.next(&mut raw).await.is_some() {}
    })
    .await
    .expect("the server kept the flooding transport open");
    let other = client(srv.addr, Config::default()).await;
    let mut st = other
        .open_with(Destination::Addr("10.96.0.10:80".parse().unwrap()), b"hi")
        .unwrap();
    let mut b = [0u8; 2];
    tokio::time::timeout(TIMEOUT, st.read_exact(&mut b))
        .await
        .expect("no echo on a new session")
        .unwrap();
    assert_eq!(&b, b"hi");
}

#[tokio::test]
async fn sessions_and_handshakes_in_progress_are_capped() {
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
    // at once, and once they time out, handshakes go on. The listener hands
    // connections over in the order they were made, so s1 and s2 hold the
    // slots before the server sees s3: there is nothing to wait for.
    let mut s1 = TcpStream::connect(srv.addr).await.unwrap();
    let mut s2 = TcpStream::connect(srv.addr).await.unwrap();
    let mut s3 = TcpStream::connect(srv.addr).await.unwrap();
    let mut b = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_millis(300), s3.read(&mut b)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "a connection past max_handshakes was kept: {closed:?}"
    );
    for s in [&mut s1, &mut s2] {
        let closed = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await;
        assert!(
            matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
            "a silent handshake outlived handshake_timeout: {closed:?}"
        );
    }
    // A hello is answered again (here: refused, both sessions are taken).
    let fourth = tpbpf_mux::Client::connect(
        std::sync::Arc::new(tpbpf_mux::transport::TcpConnector { addr: srv.addr }),
        TOKEN.to_vec(),
        config,
    )
    .await;
    let e = fourth.err().expect("a session past max_sessions");
    assert!(e.to_string().contains("sessions already"), "{e}");
}
