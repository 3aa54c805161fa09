//! Resume: the session outlives its transport. Connections are killed
//! with resets through a proxy, not closed politely.
mod common;

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use common::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tpbpf_mux::{
    transport::{Connector, TcpConnector, TlsConnector, TlsIdentity},
    Client, Config, Destination,
};

const GIB: u64 = 1 << 30;

fn dst() -> Destination {
    Destination::Name {
        host: "bulk.default".into(),
        port: 9000,
    }
}

/// 1 GiB through one stream while the transport is cut ten times: the
/// receiver's SHA-256 matches, and neither application sees an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gib_survives_ten_transport_kills() {
    let stats = bulk_through_cuts(Transport::Tcp, GIB, 10, Config::default()).await;
    assert!(!stats.kernel_tls);
}

/// The same over TLS, as `--transport direct` dials it: where the kernel
/// has TLS, every transport (and there are at least eleven) runs in it,
/// on both ends; where it has none, each stays in rustls and tpbpf says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gib_over_tls_survives_ten_transport_kills_in_the_kernel_where_it_can() {
    let before = tpbpf_mux::transport::kernel_tls_transports();
    let stats = bulk_through_cuts(Transport::Tls, GIB, 10, Config::default()).await;
    let offloaded = tpbpf_mux::transport::kernel_tls_transports() - before;
    match tpbpf_sys::kernel_tls_probe() {
        Ok(()) => {
            println!("kernel TLS: {offloaded} transports (both ends) handed to the kernel");
            assert!(
                stats.kernel_tls,
                "the last transport is not in the kernel's TLS"
            );
            // Client and server: two per transport.
            assert!(
                offloaded >= 22,
                "only {offloaded} transports went to the kernel's TLS"
            );
        }
        Err(e) => {
            println!("kernel TLS unavailable here ({e}): the transports ran over rustls");
            assert!(!stats.kernel_tls);
            assert_eq!(offloaded, 0);
            let why = tpbpf_mux::transport::kernel_tls_fallback().expect("a reason for rustls");
            assert!(why.contains("TCP_ULP"), "{why}");
        }
    }
}

/// A transport that has written `rekey_records` TLS records is replaced,
/// through resume, by one with new keys: 64 MiB with a bound of 1,000
/// records makes several, and every byte arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transports_are_replaced_for_new_keys_before_the_record_bound() {
    let config = Config {
        rekey_records: 1000,
        ..Config::default()
    };
    let stats = bulk_through_cuts(Transport::Tls, 64 << 20, 0, config).await;
    // 64 MiB is at least 4,096 records of 16 KiB from the client alone.
    assert!(stats.resumes >= 4, "only {} resumes", stats.resumes);
}

enum Transport {
    Tcp,
    Tls,
}

/// `total` bytes through one stream while the transport is cut `cuts`
/// times, evenly: the receiver's SHA-256 matches, neither application
/// sees an error, and every cut was resumed from.
async fn bulk_through_cuts(
    transport: Transport,
    total: u64,
    cuts: u32,
    config: Config,
) -> tpbpf_mux::Stats {
    let received = Arc::new(AtomicU64::new(0));
    let r2 = received.clone();
    let identity = TlsIdentity::generate().unwrap();
    let acceptor = match transport {
        Transport::Tcp => None,
        Transport::Tls => Some(identity.acceptor().unwrap()),
    };
    // The server hashes what arrives and answers with the digest.
    let srv = server_with_tls(config.clone(), acceptor, move |mut s| {
        let received = r2.clone();
        async move {
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = s
                    .read(&mut buf)
                    .await
                    .expect("server read: no error may reach the application");
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                received.fetch_add(n as u64, Ordering::Relaxed);
            }
            s.write_all(&h.finalize()).await.expect("server write");
            s.shutdown().await.expect("server shutdown");
        }
    })
    .await;
    let proxy = CutProxy::start(srv.addr).await;
    let connector: Arc<dyn Connector> = match transport {
        Transport::Tcp => Arc::new(TcpConnector { addr: proxy.addr }),
        Transport::Tls => {
            Arc::new(TlsConnector::pinned(proxy.addr, &identity.fingerprint()).unwrap())
        }
    };
    let session = Client::connect(connector, TOKEN.to_vec(), config)
        .await
        .unwrap();

    // Cut at every 1/(cuts + 1)th of the way.
    let cutter = {
        let received = received.clone();
        let proxy_cut = Arc::new(proxy);
        let p = proxy_cut.clone();
        (
            tokio::spawn(async move {
                let mut done = 0u32;
                while done < cuts {
                    let next = total / u64::from(cuts + 1) * u64::from(done + 1);
                    if received.load(Ordering::Relaxed) >= next {
                        p.cut();
                        done += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                done
            }),
            proxy_cut,
        )
    };

    let started = Instant::now();
    let mut s = session.open(dst()).unwrap();
    let mut h = Sha256::new();
    let mut src = Bytes(0x5eed);
    let mut buf = vec![0u8; 256 * 1024];
    let mut sent = 0u64;
    while sent < total {
        src.fill(&mut buf);
        h.update(&buf);
        s.write_all(&buf)
            .await
            .expect("client write: no error may reach the application");
        sent += buf.len() as u64;
    }
    s.shutdown().await.expect("client shutdown");
    let mut digest = Vec::new();
    s.read_to_end(&mut digest).await.expect("client read");
    let done = cutter.0.await.unwrap();
    let stats = session.stats();
    println!(
        "{} MiB in {:?} with {done} transport kills, {} resumes, {} KiB replayed by the client, {} connections through the proxy, kernel TLS: {}",
        total >> 20,
        started.elapsed(),
        stats.resumes,
        stats.replayed >> 10,
        cutter.1.accepted.load(Ordering::SeqCst),
        stats.kernel_tls
    );
    assert_eq!(
        digest.as_slice(),
        h.finalize().as_slice(),
        "SHA-256 differs"
    );
    assert_eq!(received.load(Ordering::Relaxed), total);
    assert_eq!(done, cuts);
    assert!(
        stats.resumes >= u64::from(cuts),
        "only {} resumes",
        stats.resumes
    );
    if cuts > 0 {
        assert!(
            stats.replayed > 0,
            "nothing was replayed: the cuts lost nothing?"
        );
    }
    stats
}

/// A transport down for longer than the resume window: the application
/// gets a clear reset error on both sides, and the server forgets the
/// session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_resume_window_streams_fail_with_a_clear_error() {
    let config = Config {
        resume_window: Duration::from_millis(800),
        ..Config::default()
    };
    let (srv, mut rx) = handing_server(config.clone()).await;
    let proxy = CutProxy::start(srv.addr).await;
    let session = Client::connect(
        Arc::new(TcpConnector { addr: proxy.addr }),
        TOKEN.to_vec(),
        config,
    )
    .await
    .unwrap();
    let mut s = session.open_with(dst(), b"before").unwrap();
    let mut peer = rx.recv().await.unwrap();
    let mut b = [0u8; 6];
    peer.read_exact(&mut b).await.unwrap();
    assert_eq!(srv.server.sessions(), 1);

    proxy
        .blocked
        .store(true, std::sync::atomic::Ordering::SeqCst);
    proxy.cut();
    let t = Instant::now();
    let mut buf = [0u8; 16];
    let err = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("the read must fail, not hang")
        .unwrap_err();
    println!("client error after {:?}: {err}", t.elapsed());
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    assert!(err.to_string().contains("resume window"), "{err}");
    let err = s.write_all(b"after").await.unwrap_err();
    assert!(err.to_string().contains("resume window"), "{err}");
    assert!(session.open(dst()).is_err());

    let err = tokio::time::timeout(Duration::from_secs(10), peer.read(&mut buf))
        .await
        .expect("the server's read must fail, not hang")
        .unwrap_err();
    println!("server error: {err}");
    assert!(err.to_string().contains("resume window"), "{err}");
    wait_for(
        "the server to forget the expired session",
        Duration::from_secs(10),
        || srv.server.sessions() == 0,
    )
    .await;
}

/// Many streams echoing both ways while the transport is killed: every
/// stream gets back exactly what it sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_streams_in_both_directions_survive_kills() {
    let srv = server(Config::default(), echo).await;
    let proxy = Arc::new(CutProxy::start(srv.addr).await);
    let session = Client::connect(
        Arc::new(TcpConnector { addr: proxy.addr }),
        TOKEN.to_vec(),
        Config::default(),
    )
    .await
    .unwrap();
    // Five cuts, each once another 16 MiB came back: every cut falls in
    // the middle of the transfer (160 MiB come back in all).
    let p = proxy.clone();
    let s2 = session.clone();
    let cutter = tokio::spawn(async move {
        for cut in 1..=5u64 {
            wait_for("the echo to go on", Duration::from_secs(60), || {
                s2.stats().bytes_received >= cut * (16 << 20)
            })
            .await;
            p.cut();
        }
    });
    let mut tasks = Vec::new();
    for i in 0..20u64 {
        let mut s = session.open(dst()).unwrap();
        tasks.push(tokio::spawn(async move {
            let mut data = vec![0u8; 8 << 20];
            Bytes(i + 7).fill(&mut data);
            let back = round_trip(&mut s, &data, 100_000)
                .await
                .expect("no error may reach the application");
            assert!(back == data, "stream {i} got different bytes back");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    cutter.await.unwrap();
    let stats = session.stats();
    println!(
        "echo under kills: {} resumes, {} KiB replayed",
        stats.resumes,
        stats.replayed >> 10
    );
    assert!(stats.resumes >= 1);
}
