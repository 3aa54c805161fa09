//! Whatever a cluster client sends on an intercepted connection, the
//! filter never panics, overflows or hangs (each input runs under a 2 s
//! timeout; libFuzzer reports a slow unit past its own limit).
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};
use tpbpf_proto::InterceptMode;

/// Answers each read with a small response; returns all it received.
async fn peer(mut s: DuplexStream) -> Vec<u8> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return seen,
            Ok(n) => {
                seen.extend_from_slice(&buf[..n]);
                if s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await
                    .is_err()
                {
                    return seen;
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        let (mut client, agent_side) = duplex(1 << 16);
        let (app_near, app_far) = duplex(1 << 16);
        let (dev_near, dev_far) = duplex(1 << 16);
        let app = tokio::spawn(peer(app_far));
        let dev = tokio::spawn(peer(dev_far));
        let app_near = std::sync::Mutex::new(Some(app_near));
        let dev_near = std::sync::Mutex::new(Some(dev_near));
        let modes = [InterceptMode::Header {
            name: "x-dev".into(),
            value: "me".into(),
        }];
        let serve = tpbpf_http_filter::serve(
            agent_side,
            &modes,
            || {
                let a = app_near.lock().unwrap().take();
                async move { a.ok_or_else(|| std::io::Error::other("dialed twice")) }
            },
            |_| {
                dev_near
                    .lock()
                    .unwrap()
                    .take()
                    .ok_or_else(|| std::io::Error::other("opened twice"))
            },
        );
        let feed = async {
            let _ = client.write_all(data).await;
            let _ = client.shutdown().await;
            let mut sink = Vec::new();
            let _ = client.read_to_end(&mut sink).await;
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            tokio::join!(serve, feed)
        })
        .await;
        drop(app_near);
        drop(dev_near);
        for side in [app, dev] {
            let _ = tokio::time::timeout(Duration::from_secs(1), side).await;
        }
    });
});
