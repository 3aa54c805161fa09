//! Streams over one session: data both ways, half-close, zero-RTT open,
//! flow control against a slow reader, fair turns, limits, keepalive.
mod common;

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tpbpf_mux::{Config, Destination};
use tpbpf_proto::INITIAL_WINDOW;

fn dst() -> Destination {
    Destination::Name {
        host: "web.default".into(),
        port: 80,
    }
}

#[tokio::test]
async fn streams_carry_data_both_ways_and_half_close() {
    let srv = server(Config::default(), echo).await;
    let session = client(srv.addr, Config::default()).await;
    let mut tasks = Vec::new();
    for i in 0..50u64 {
        let mut s = session.open(dst()).unwrap();
        tasks.push(tokio::spawn(async move {
            let mut data = vec![0u8; 100_000 + i as usize * 1000];
            Bytes(i + 1).fill(&mut data);
            let back = round_trip(&mut s, &data, data.len()).await.unwrap();
            assert_eq!(back, data, "stream {i} echoed different bytes");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Streams that both sides finished are forgotten on both sides.
    let served = srv.sessions.lock().unwrap()[0].clone();
    wait_for(
        "both sides to forget their finished streams",
        Duration::from_secs(10),
        || session.stats().streams == 0 && served.stats().streams == 0,
    )
    .await;
}

#[tokio::test]
async fn the_server_sees_the_destination_and_the_first_bytes_with_the_open() {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let srv = server(Config::default(), move |mut s| {
        let tx = tx.clone();
        async move {
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.unwrap();
            tx.send((s.destination(), buf)).unwrap();
        }
    })
    .await;
    let session = client(srv.addr, Config::default()).await;
    let _s = session.open_with(dst(), b"hello").unwrap();
    let (d, first) = rx.recv().await.unwrap();
    assert_eq!(d, Some(dst()));
    assert_eq!(&first, b"hello");
}

#[tokio::test]
async fn a_slow_reader_does_not_make_the_session_buffer_without_bound() {
    let (srv, mut rx) = handing_server(Config::default()).await;
    let session = client(srv.addr, Config::default()).await;
    let mut s = session.open(dst()).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let d2 = done.clone();
    let writer = tokio::spawn(async move {
        let data = vec![7u8; 8 * 1024 * 1024];
        s.write_all(&data).await.unwrap();
        d2.store(true, Ordering::SeqCst);
        s
    });
    let mut held = rx.recv().await.unwrap();
    let server_session = srv.sessions.lock().unwrap()[0].clone();
    // The window's worth arrives and is held for the reader...
    wait_for(
        "a window of data at the receiver",
        Duration::from_secs(10),
        || server_session.stats().buffered >= INITIAL_WINDOW as usize,
    )
    .await;
    // ...and a round trip on another stream of the session, whose frames
    // go behind whatever the writer had, finds no more: the writer waits
    // for credit.
    let mut probe = session.open_with(dst(), b"probe").unwrap();
    let mut other = rx.recv().await.unwrap();
    let mut b = [0u8; 5];
    other.read_exact(&mut b).await.unwrap();
    other.write_all(&b).await.unwrap();
    probe.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"probe");
    assert!(
        !done.load(Ordering::SeqCst),
        "8 MiB went into a stream nobody reads"
    );
    let buffered = server_session.stats().buffered;
    assert_eq!(
        buffered, INITIAL_WINDOW as usize,
        "the receiver buffered {buffered} bytes for an unread stream (window {INITIAL_WINDOW})"
    );
    // The probe's 5 bytes and the held stream's window, nothing more.
    assert_eq!(
        session.stats().bytes_sent,
        u64::from(INITIAL_WINDOW) + 5,
        "the writer was let past the window"
    );
    assert!(
        session.stats().unacked <= 2 * u64::from(INITIAL_WINDOW),
        "the sender holds more than a window"
    );
    // Reading lets it all through.
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    while got < 8 * 1024 * 1024 {
        got += held.read(&mut buf).await.unwrap();
    }
    writer.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_transfer_does_not_starve_an_interactive_stream() {
    let srv = server(Config::default(), echo).await;
    let session = client(srv.addr, Config::default()).await;
    // Several bulk streams keep the session's writer busy.
    let bulk_done = Arc::new(AtomicBool::new(false));
    let mut bulks = Vec::new();
    for _ in 0..4 {
        let mut s = session.open(dst()).unwrap();
        let done = bulk_done.clone();
        bulks.push(tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(&mut s);
            let chunk = vec![1u8; 256 * 1024];
            let send = async {
                while !done.load(Ordering::SeqCst) {
                    if w.write_all(&chunk).await.is_err() {
                        break;
                    }
                }
                let _ = w.shutdown().await;
            };
            let recv = async {
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(n) = r.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            };
            tokio::join!(send, recv);
        }));
    }
    wait_for(
        "the bulk streams to get going",
        Duration::from_secs(10),
        || session.stats().bytes_sent >= 4 << 20,
    )
    .await;
    let before = session.stats().bytes_sent;
    // Meanwhile an interactive stream does 200 small round trips.
    let mut s = session.open(dst()).unwrap();
    let started = Instant::now();
    let mut worst = Duration::ZERO;
    for i in 0..200u32 {
        let t = Instant::now();
        s.write_all(&i.to_be_bytes()).await.unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(u32::from_be_bytes(b), i);
        worst = worst.max(t.elapsed());
    }
    let elapsed = started.elapsed();
    let bulk_bytes = session.stats().bytes_sent - before;
    bulk_done.store(true, Ordering::SeqCst);
    for b in bulks {
        b.await.unwrap();
    }
    println!(
        "200 round trips beside bulk streams in {elapsed:?} (worst {worst:?}); bulk moved {} MiB meanwhile",
        bulk_bytes >> 20
    );
    // Both progressed: the bulk streams moved data while the interactive
    // one got all its turns.
    assert!(
        bulk_bytes > 16 << 20,
        "the bulk streams barely moved ({bulk_bytes} bytes)"
    );
}

#[tokio::test]
async fn stream_limits_are_enforced_on_both_sides() {
    let config = Config {
        max_streams: 8,
        ..Config::default()
    };
    let srv = server(config.clone(), echo).await;
    // The client is allowed more than the server: the server refuses.
    let session = client(
        srv.addr,
        Config {
            max_streams: 100,
            ..Config::default()
        },
    )
    .await;
    let mut open = Vec::new();
    for i in 0..8u8 {
        let mut s = session.open(dst()).unwrap();
        s.write_all(&[i]).await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        open.push(s);
    }
    let mut ninth = session.open(dst()).unwrap();
    ninth.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    let err = ninth.read_exact(&mut b).await.unwrap_err();
    assert!(
        err.to_string().contains("too many streams"),
        "unexpected error: {err}"
    );
    // The local limit says so at open.
    let small = client(srv.addr, config).await;
    let _held: Vec<_> = (0..8).map(|_| small.open(dst()).unwrap()).collect();
    let err = small.open(dst()).unwrap_err();
    assert!(err.to_string().contains("limit 8"), "{err}");
}

#[tokio::test]
async fn keepalive_measures_the_rtt() {
    let config = Config {
        keepalive: Duration::from_millis(100),
        ..Config::default()
    };
    let srv = server(config.clone(), echo).await;
    let session = client(srv.addr, config).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while session.stats().rtt.is_none() {
        assert!(Instant::now() < deadline, "no RTT measured");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rtt = session.stats().rtt.unwrap();
    assert!(rtt < Duration::from_secs(1), "rtt {rtt:?} on loopback");
    assert!(session.stats().connected);
}

#[tokio::test]
async fn dropping_a_stream_with_unread_data_resets_the_peer() {
    let (srv, mut rx) = handing_server(Config::default()).await;
    let session = client(srv.addr, Config::default()).await;
    let mut s = session.open(dst()).unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut peer = rx.recv().await.unwrap();
    peer.write_all(b"unread").await.unwrap();
    wait_for(
        "the bytes to arrive, unread",
        Duration::from_secs(10),
        || session.stats().buffered == 6,
    )
    .await;
    drop(s);
    let mut buf = [0u8; 4];
    peer.read_exact(&mut buf).await.unwrap();
    let mut rest = Vec::new();
    let err = peer.read_to_end(&mut rest).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
}

#[tokio::test]
async fn closing_a_session_fails_its_streams_on_both_sides_with_the_reason() {
    let (srv, mut rx) = handing_server(Config::default()).await;
    let session = client(srv.addr, Config::default()).await;
    let mut s = session.open_with(dst(), b"x").unwrap();
    let mut peer = rx.recv().await.unwrap();
    session.close("tpbpf down");
    let mut buf = [0u8; 8];
    let err = s.read(&mut buf).await.unwrap_err();
    assert!(err.to_string().contains("tpbpf down"), "{err}");
    let mut one = [0u8; 1];
    peer.read_exact(&mut one).await.unwrap();
    let err = peer.read(&mut buf).await.unwrap_err();
    assert!(err.to_string().contains("closed"), "{err}");
    assert!(session.open(dst()).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flushed_close_returns_once_the_peer_can_know_the_session_ended() {
    let config = Config {
        resume_window: Duration::from_secs(60),
        ..Config::default()
    };
    let srv = server(config.clone(), echo).await;
    let addr = srv.addr;
    // The client on a runtime of its own, dropped the moment the close
    // returns, as a process exits after `tpbpf down`: only what the close
    // waited for has left.
    let took = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let took = rt.block_on(async move {
            let session = client(addr, config).await;
            let mut s = session.open_with(dst(), b"x").unwrap();
            let mut one = [0u8; 1];
            s.read_exact(&mut one).await.unwrap();
            let t = std::time::Instant::now();
            session
                .close_flushed("tpbpf down", Duration::from_secs(5))
                .await;
            let took = t.elapsed();
            // With no transport left, a second close returns at once.
            let t = std::time::Instant::now();
            session.close_flushed("again", Duration::from_secs(5)).await;
            (took, t.elapsed())
        });
        drop(rt);
        took
    })
    .join()
    .unwrap();
    assert!(
        took.0 < Duration::from_secs(5),
        "the close waited out its bound: the transport never shut down"
    );
    assert!(took.1 < Duration::from_secs(1), "{:?}", took.1);
    // The go-away reached the server: it ends the session now instead of
    // holding it for a resume for a minute.
    let served = first_session(&srv).await;
    wait_for(
        "the server to end the session",
        Duration::from_secs(2),
        || served.ended().is_some(),
    )
    .await;
    assert!(
        served.ended().unwrap().contains("closed the session"),
        "{:?}",
        served.ended()
    );
}

#[tokio::test]
async fn dns_queries_and_datagram_flows_go_both_ways() {
    let srv = server(Config::default(), echo).await;
    let session = client(srv.addr, Config::default()).await;
    let served = srv.sessions.lock().unwrap()[0].clone();
    tokio::spawn(async move {
        while let Some(r) = served.next_request().await {
            match r {
                tpbpf_mux::Request::Dns { id, mut query } => {
                    query.reverse();
                    served.answer_dns(id, query).unwrap();
                }
                tpbpf_mux::Request::Datagram { flow, dst, data } => {
                    let Destination::Addr(from) = dst else {
                        panic!("{dst:?}")
                    };
                    served
                        .reply_datagram(flow, from, &data.to_ascii_uppercase())
                        .unwrap();
                }
                other => panic!("unexpected request {other:?}"),
            }
        }
    });
    let answer = session
        .dns(b"abc".to_vec(), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(answer, b"cba");
    let flow = session
        .flow(Destination::Addr("10.96.0.10:53".parse().unwrap()))
        .unwrap();
    for word in [&b"one"[..], b"two", b"three"] {
        flow.send(word).unwrap();
        assert_eq!(flow.recv().await.unwrap(), word.to_ascii_uppercase());
    }
}

#[tokio::test]
async fn finished_streams_give_their_windows_back_to_the_session() {
    // Room for only a few windows: any window left accounted after a
    // stream ends would soon refuse new streams.
    let config = Config {
        max_buffered: 8 * INITIAL_WINDOW as usize,
        ..Config::default()
    };
    let srv = server(config.clone(), echo).await;
    let session = client(srv.addr, config).await;
    let data = vec![5u8; 300 * 1024];
    for i in 0..100 {
        let mut s = session
            .open(dst())
            .unwrap_or_else(|e| panic!("stream {i}: {e}"));
        let back = round_trip(&mut s, &data, data.len())
            .await
            .unwrap_or_else(|e| panic!("stream {i}: {e}"));
        assert_eq!(back.len(), data.len());
    }
}
