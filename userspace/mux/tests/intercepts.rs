//! Intercepts over one session on loopback, the agent's side played by the
//! server: each intercepted connection names its intercept and reaches that
//! intercept's handle on the client, with its peer and bytes; the agent's
//! end of the intercept follows the connections carried before it; a
//! connection for an intercept the client no longer holds is refused with
//! a reason; a peer of protocol version 1 is refused at the hello.
mod common;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tpbpf_mux::{
    transport::TcpConnector, Client, Config, Destination, HandshakeError, InterceptMode, Request,
};
use tpbpf_proto::{decode_welcome, encode_hello, Hello, WelcomeStatus, MIN_VERSION};

fn target() -> SocketAddr {
    "10.0.0.7:8080".parse().unwrap()
}

fn peer(port: u16) -> SocketAddr {
    SocketAddr::from(([10, 0, 9, 1], port))
}

#[tokio::test]
async fn intercepted_connections_reach_their_intercept_and_its_end_follows_them() {
    let srv = server(Config::default(), echo).await;
    let session = client(srv.addr, Config::default()).await;
    let agent = first_session(&srv).await;
    let agent_task = tokio::spawn(async move {
        let Some(Request::InterceptStart { id, target: t, .. }) = agent.next_request().await else {
            panic!("no intercept start");
        };
        assert_eq!(t, target());
        agent.intercept_status(id, true, "A=1").unwrap();
        let mut a = agent.open_intercepted(id, peer(5000), t, b"first").unwrap();
        // The stop: one more connection carried, then the end.
        let Some(Request::InterceptStop { id: stopped }) = agent.next_request().await else {
            panic!("no intercept stop");
        };
        assert_eq!(stopped, id);
        let mut b = agent
            .open_intercepted(id, peer(5001), t, b"second")
            .unwrap();
        agent.intercept_status(id, false, "removed").unwrap();
        // After the end: refused by the client, with why.
        let mut late = agent.open_intercepted(id, peer(5002), t, b"late").unwrap();
        let mut back = Vec::new();
        let e = late.read_to_end(&mut back).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
        assert!(e.to_string().contains("which ended: removed"), "{e}");
        let mut answer = [0u8; 2];
        a.read_exact(&mut answer).await.unwrap();
        b.read_exact(&mut answer).await.unwrap();
        // And for an intercept the client never had.
        let mut unknown = agent.open_intercepted(99, peer(5003), t, b"?").unwrap();
        let e = unknown.read_to_end(&mut back).await.unwrap_err();
        assert!(e.to_string().contains("intercept 99"), "{e}");
    });
    let mut handle = session
        .intercept(
            target(),
            InterceptMode::Steal,
            Duration::from_secs(5),
            |_, _| async { Ok(None) },
        )
        .await
        .unwrap();
    assert_eq!(handle.info(), "A=1");
    let (mut a, src) = handle.accept().await.unwrap();
    assert_eq!(src, peer(5000));
    assert_eq!(a.destination(), Some(Destination::Addr(target())));
    let mut got = [0u8; 5];
    a.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"first");
    a.write_all(b"ok").await.unwrap();
    handle.stop();
    let (mut b, src) = handle.accept().await.unwrap();
    assert_eq!(src, peer(5001));
    let mut got = [0u8; 6];
    b.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"second");
    b.write_all(b"ok").await.unwrap();
    assert_eq!(handle.accept().await.err().unwrap(), "removed");
    tokio::time::timeout(Duration::from_secs(10), agent_task)
        .await
        .expect("the agent's side finished")
        .unwrap();
    drop((a, b));
    assert!(session.ended().is_none(), "{:?}", session.ended());
}

#[tokio::test]
async fn a_peer_of_protocol_version_1_is_refused_at_the_hello() {
    let srv = server(Config::default(), echo).await;
    let mut tcp = tokio::net::TcpStream::connect(srv.addr).await.unwrap();
    let mut hello = Vec::new();
    encode_hello(
        &Hello {
            version: 1,
            session: [7; 16],
            resume: false,
            received: 0,
            token: TOKEN.to_vec(),
        },
        &mut hello,
    )
    .unwrap();
    tcp.write_all(&hello).await.unwrap();
    let mut buf = Vec::new();
    let welcome = loop {
        let mut chunk = [0u8; 256];
        let n = tcp.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed without a welcome");
        buf.extend_from_slice(&chunk[..n]);
        if let Some((w, _)) = decode_welcome(&buf).unwrap() {
            break w;
        }
    };
    assert_eq!(welcome.status, WelcomeStatus::Version);
    assert!(
        welcome.message.contains("version 1 is not supported")
            && welcome.message.contains(&format!("{MIN_VERSION} at least")),
        "{}",
        welcome.message
    );
    assert!(srv.sessions.lock().unwrap().is_empty());
    // And today's client speaks a version the server takes.
    let ok = Client::connect(
        Arc::new(TcpConnector { addr: srv.addr }),
        TOKEN.to_vec(),
        Config::default(),
    )
    .await;
    assert!(!matches!(ok, Err(HandshakeError::Refused { .. })));
}

#[tokio::test]
async fn an_agent_of_protocol_version_1_is_refused_by_the_client() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // An old agent: it takes the hello and answers in version 1.
    let old = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 512];
        let _ = tcp.read(&mut buf).await.unwrap();
        let mut welcome = Vec::new();
        tpbpf_proto::encode_welcome(
            &tpbpf_proto::Welcome {
                version: 1,
                status: WelcomeStatus::Accepted,
                received: 0,
                message: String::new(),
            },
            &mut welcome,
        );
        tcp.write_all(&welcome).await.unwrap();
        let _ = tcp.read(&mut buf).await;
    });
    let got = Client::connect(
        Arc::new(TcpConnector { addr }),
        TOKEN.to_vec(),
        Config::default(),
    )
    .await;
    match got {
        Err(HandshakeError::Refused {
            status: WelcomeStatus::Version,
            message,
            ..
        }) => assert!(
            message.contains("version 1") && message.contains("install the agent"),
            "{message}"
        ),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a session with a version-1 agent"),
    }
    old.abort();
}

#[tokio::test]
async fn the_agent_asks_who_the_client_is_and_gets_its_proof_for_that_intercept_only() {
    use tpbpf_proto::{Credential, IdentityProof};
    let srv = server(Config::default(), echo).await;
    let session = client(srv.addr, Config::default()).await;
    let agent = first_session(&srv).await;
    let agent_task = tokio::spawn(async move {
        let Some(Request::InterceptStart { id, .. }) = agent.next_request().await else {
            panic!("no intercept start");
        };
        let proof = agent
            .intercept_identity(id, [9; 16], Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(proof.pod, "web-1");
        assert_eq!(proof.credential, Credential::Token("t0ken".into()));
        // A second ask for an id the client is not proving times out.
        let e = agent
            .intercept_identity(id + 100, [1; 16], Duration::from_millis(200))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        agent.intercept_status(id, true, "").unwrap();
    });
    let handle = session
        .intercept(
            target(),
            InterceptMode::Steal,
            Duration::from_secs(5),
            |port, nonce| async move {
                assert_eq!((port, nonce), (0, [9; 16]));
                Ok(Some(IdentityProof {
                    namespace: "default".into(),
                    pod: "web-1".into(),
                    credential: Credential::Token("t0ken".into()),
                }))
            },
        )
        .await
        .unwrap();
    assert_eq!(handle.info(), "");
    tokio::time::timeout(Duration::from_secs(10), agent_task)
        .await
        .expect("the agent's side finished")
        .unwrap();
}
