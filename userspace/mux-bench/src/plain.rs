//! `plain-tcp`: the baseline. Every stream is its own TCP connection.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpStream};

use crate::system::{
    count_server_error, spawn_serve, AbortOnDrop, BoxedStream, OpenFut, Opener, System,
};

/// Name in the output.
pub const NAME: &str = "plain-tcp";

/// Settings reported in the output.
pub fn settings() -> Vec<(&'static str, String)> {
    vec![("tcp_nodelay", "on (both ends)".to_string())]
}

/// Opens a new TCP connection per stream, with `TCP_NODELAY` on.
struct PlainOpener {
    addr: SocketAddr,
}

impl Opener for PlainOpener {
    fn open(&self) -> OpenFut {
        let addr = self.addr;
        Box::pin(async move {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            Ok(Box::new(tcp) as BoxedStream)
        })
    }
}

/// Starts a TCP listener on 127.0.0.1 whose accepted connections go to
/// [`crate::system::serve_stream`].
pub async fn start() -> anyhow::Result<Option<System>> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("plain-tcp: binding the listener on 127.0.0.1")?;
    let addr = listener
        .local_addr()
        .context("plain-tcp: listener address")?;
    let accept = tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((tcp, _)) => {
                    // Setting NODELAY only fails on a dead socket, which the
                    // stream's own I/O then reports.
                    let _ = tcp.set_nodelay(true);
                    spawn_serve(Box::new(tcp));
                }
                // EMFILE and friends: counted; the client's side then fails
                // and says so. Back off a little instead of spinning.
                Err(_) => {
                    count_server_error();
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
            }
        }
    });
    Ok(Some(System {
        name: NAME,
        opener: Arc::new(PlainOpener { addr }),
        guard: Box::new(AbortOnDrop(vec![accept])),
    }))
}
