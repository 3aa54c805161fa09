//! The server refuses what is not an authenticated tpbpf session before
//! anything else happens, logs who it was, and goes on serving.
mod common;

use std::{sync::Arc, time::Duration};

use common::*;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tpbpf_mux::{
    transport::{TcpConnector, TlsConnector, TlsIdentity},
    Client, Config, Destination, HandshakeError, Server,
};
use tpbpf_proto::{encode_hello, Hello, WelcomeStatus, VERSION};

fn dst() -> Destination {
    Destination::Name {
        host: "web.default".into(),
        port: 80,
    }
}

async fn echo_once(session: &tpbpf_mux::Session) {
    let mut s = session.open_with(dst(), b"ping").unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"ping");
}

#[tokio::test]
async fn a_wrong_or_missing_token_is_refused_and_the_server_goes_on() {
    let (logs, _guard) = Logs::capture();
    let srv = server(Config::default(), echo).await;
    let good = client(srv.addr, Config::default()).await;
    for (token, what) in [(b"nope".to_vec(), "wrong"), (Vec::new(), "missing")] {
        let err = Client::connect(
            Arc::new(TcpConnector { addr: srv.addr }),
            token,
            Config::default(),
        )
        .await
        .err()
        .expect("refused");
        match &err {
            HandshakeError::Refused {
                status: WelcomeStatus::Unauthorized,
                message,
                ..
            } => assert!(message.contains(what), "{message}"),
            e => panic!("unexpected error: {e}"),
        }
        assert!(err.to_string().contains("refused"), "{err}");
        let log = logs.text();
        assert!(
            log.contains(&format!("{what} token")) && log.contains("peer=127.0.0.1:"),
            "the refusal is not logged with the peer address:\n{log}"
        );
    }
    // No session was started for them: nothing could have been dialed.
    assert_eq!(srv.sessions.lock().unwrap().len(), 1);
    // The existing session and new ones work.
    echo_once(&good).await;
    echo_once(&client(srv.addr, Config::default()).await).await;
}

#[tokio::test]
async fn garbage_instead_of_a_hello_is_refused_and_logged_with_the_peer() {
    let (logs, _guard) = Logs::capture();
    let srv = server(Config::default(), echo).await;
    let good = client(srv.addr, Config::default()).await;
    let mut raw = TcpStream::connect(srv.addr).await.unwrap();
    let me = raw.local_addr().unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut rest))
        .await
        .expect("the server closes the connection")
        .unwrap_or(0);
    assert_eq!(n, 0, "the server answered garbage with {rest:?}");
    let log = logs.text();
    assert!(
        log.contains(&format!("peer={me}")) && log.contains("not a tpbpf hello"),
        "{log}"
    );
    assert_eq!(srv.sessions.lock().unwrap().len(), 1);
    echo_once(&good).await;
}

#[tokio::test]
async fn a_malformed_frame_ends_only_that_session() {
    let (logs, _guard) = Logs::capture();
    let srv = server(Config::default(), echo).await;
    let good = client(srv.addr, Config::default()).await;
    let mut raw = TcpStream::connect(srv.addr).await.unwrap();
    let mut buf = Vec::new();
    encode_hello(
        &Hello {
            version: VERSION,
            session: [9; 16],
            resume: false,
            received: 0,
            token: TOKEN.to_vec(),
        },
        &mut buf,
    )
    .unwrap();
    // A frame of unknown type 200.
    buf.extend_from_slice(&[0, 0, 0, 0, 200, 0, 0, 0, 0, 1]);
    raw.write_all(&buf).await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut rest))
        .await
        .expect("the server drops the session");
    let log = logs.text();
    assert!(log.contains("unknown frame type 200"), "{log}");
    echo_once(&good).await;
}

#[tokio::test]
async fn tls_with_a_pinned_certificate() {
    let (logs, _guard) = Logs::capture();
    let identity = TlsIdentity::generate().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (server, mut sessions) = Server::new(Config::default(), TOKEN.to_vec());
    let acceptor = identity.acceptor().unwrap();
    let serve = tokio::spawn(async move { server.serve(listener, Some(acceptor)).await });
    let accept = tokio::spawn(async move {
        while let Some((session, _)) = sessions.recv().await {
            tokio::spawn(async move {
                while let Some(s) = session.accept().await {
                    tokio::spawn(echo(s));
                }
            });
        }
    });

    let pinned = TlsConnector::pinned(addr, &identity.fingerprint()).unwrap();
    let session = Client::connect(Arc::new(pinned), TOKEN.to_vec(), Config::default())
        .await
        .unwrap();
    echo_once(&session).await;

    // Another agent's certificate: refused by the client, logged by the server.
    let other = TlsIdentity::generate().unwrap();
    let wrong = TlsConnector::pinned(addr, &other.fingerprint()).unwrap();
    let err = Client::connect(Arc::new(wrong), TOKEN.to_vec(), Config::default())
        .await
        .err()
        .expect("a different certificate is refused");
    assert!(err.to_string().contains("fingerprint"), "{err}");
    // Plain TCP to the TLS port: refused, the server goes on.
    let plain = Client::connect(
        Arc::new(TcpConnector { addr }),
        TOKEN.to_vec(),
        Config {
            handshake_timeout: Duration::from_secs(2),
            ..Config::default()
        },
    )
    .await;
    assert!(plain.is_err());
    // The server logs the refusal once its side of the handshake fails,
    // which can be after the client gave up.
    let logged =
        |log: &str| log.contains("TLS handshake failed") && log.contains("peer=127.0.0.1:");
    let waited = tokio::time::timeout(Duration::from_secs(10), async {
        while !logged(&logs.text()) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "{}", logs.text());
    echo_once(&session).await;
    serve.abort();
    accept.abort();
}
