//! `tpbpf`: tpbpf's own tunnel multiplexer (crate `tpbpf-mux`) over one
//! loopback TCP connection, like the peers; `tpbpf-tls` adds the TLS layer
//! (rustls, pinned certificate) that the agent's tunnel always uses.
use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tpbpf_mux::{
    transport::{Connector, TcpConnector, TlsConnector, TlsIdentity},
    Client, Config, Destination, Server, Session,
};

use crate::system::{spawn_serve, AbortOnDrop, BoxedStream, OpenFut, Opener, System};

/// Names in the output.
pub const NAME: &str = "tpbpf";
pub const NAME_TLS: &str = "tpbpf-tls";

const TOKEN: &[u8] = b"bench-token";

/// Settings reported in the output.
pub fn settings() -> Vec<(&'static str, String)> {
    let c = Config::default();
    vec![
        (
            "initial window",
            format!("{} KiB", tpbpf_proto::INITIAL_WINDOW / 1024),
        ),
        ("max window", format!("{} MiB", c.max_window >> 20)),
        ("max streams", c.max_streams.to_string()),
        (
            "session buffer limit",
            format!("{} MiB", c.max_buffered >> 20),
        ),
        ("resume buffer", format!("{} MiB", c.resume_bytes >> 20)),
    ]
}

pub fn settings_tls() -> Vec<(&'static str, String)> {
    let mut s = settings();
    s.push((
        "TLS",
        "rustls (ring), pinned self-signed certificate".into(),
    ));
    s
}

struct TpbpfOpener(Session);

impl Opener for TpbpfOpener {
    fn open(&self) -> OpenFut {
        let s = self.0.open(Destination::Name {
            host: "bench".into(),
            port: 1,
        });
        Box::pin(async move { Ok(Box::new(s?) as BoxedStream) })
    }
}

async fn start_with(tls: bool) -> anyhow::Result<Option<System>> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (server, mut sessions) = Server::new(Config::default(), TOKEN.to_vec());
    let identity = TlsIdentity::generate()?;
    let acceptor = tls.then(|| identity.acceptor()).transpose()?;
    let serve = tokio::spawn(async move {
        let _ = server.serve(listener, acceptor).await;
    });
    let accept = tokio::spawn(async move {
        while let Some((session, _)) = sessions.recv().await {
            tokio::spawn(async move {
                while let Some(s) = session.accept().await {
                    spawn_serve(Box::new(s));
                }
            });
        }
    });
    let connector: Arc<dyn Connector> = if tls {
        Arc::new(TlsConnector::pinned(addr, &identity.fingerprint())?)
    } else {
        Arc::new(TcpConnector { addr })
    };
    let session = Client::connect(connector, TOKEN.to_vec(), Config::default())
        .await
        .context("connecting the tpbpf session")?;
    Ok(Some(System {
        name: if tls { NAME_TLS } else { NAME },
        opener: Arc::new(TpbpfOpener(session)),
        guard: Box::new(AbortOnDrop(vec![serve, accept])),
    }))
}

pub async fn start() -> anyhow::Result<Option<System>> {
    start_with(false).await
}

pub async fn start_tls() -> anyhow::Result<Option<System>> {
    start_with(true).await
}
