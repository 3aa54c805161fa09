//! The TCP listener behind the redirect.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::{TcpListener, TcpStream};
use tpbpf_loader::OrigDstTable;
use tracing::{debug, warn};

use crate::{dns::Dns, upstream::Upstream};

pub async fn serve(
    listener: TcpListener,
    table: OrigDstTable,
    upstream: Arc<dyn Upstream>,
    dns: Option<Arc<Dns>>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!("accepting a redirected connection: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let (table, upstream, dns) = (table.clone(), upstream.clone(), dns.clone());
        tokio::spawn(async move { handle(stream, peer, table, upstream, dns).await });
    }
}

async fn handle(
    client: TcpStream,
    peer: SocketAddr,
    table: OrigDstTable,
    upstream: Arc<dyn Upstream>,
    dns: Option<Arc<Dns>>,
) {
    let orig = match table.take(&client, peer) {
        Ok(Some(orig)) => orig,
        Ok(None) => {
            debug!(%peer, "connection not redirected by tpbpf: closing it");
            return;
        }
        Err(e) => {
            warn!(%peer, "looking up the original destination: {e}");
            return;
        }
    };
    let _ = client.set_nodelay(true);
    if orig.port() == 53 {
        if let Some(dns) = dns {
            dns.serve_tcp(client, orig).await;
            return;
        }
    }
    match upstream.take_tcp(client, orig) {
        Ok(()) => debug!(%peer, %orig, "handed over"),
        Err(client) => relay(client, orig, upstream).await,
    }
}

/// Carries a redirected connection to its original destination `orig`
/// through `upstream`, until either side ends it.
pub async fn relay(mut client: TcpStream, orig: SocketAddr, upstream: Arc<dyn Upstream>) {
    let peer = client.peer_addr().unwrap_or(orig);
    // Bytes the client already sent travel with the open.
    let mut first = vec![0u8; 16 * 1024];
    let n = client.try_read(&mut first).unwrap_or_default();
    first.truncate(n);
    match upstream.connect_tcp_with(orig, first).await {
        Ok(mut up) => {
            debug!(%peer, %orig, "connected");
            match tpbpf_mux::relay(&mut client, &mut up).await {
                // The far side refused the stream (the agent's policy, a
                // closed port): the user should see why.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    warn!(%peer, %orig, "connection refused: {e}");
                    let _ = client.set_zero_linger();
                }
                Err(e) => debug!(%peer, %orig, "connection ended: {e}"),
                Ok(_) => {}
            }
        }
        Err(e) => {
            warn!(%peer, %orig, upstream = upstream.describe(), "dialing the original destination: {e}");
            // Reset, so the application sees a failed connection rather than
            // an orderly close.
            let _ = client.set_zero_linger();
        }
    }
}

/// A listener for the tc path: IP_TRANSPARENT, so it may accept connections
/// whose destination is not a local address; `bpf_sk_assign` hands it the
/// packets.
pub fn transparent_listener() -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    sock.set_ip_transparent(true)?;
    sock.set_reuse_address(true)?;
    sock.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    sock.listen(4096)?;
    sock.set_nonblocking(true)?;
    TcpListener::from_std(sock.into())
}

/// Connections from the tc path: the accepted socket's local address is the
/// original destination.
pub async fn serve_transparent(listener: TcpListener, upstream: Arc<dyn Upstream>) {
    loop {
        let (mut client, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!("accepting on the transparent listener: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let upstream = upstream.clone();
        tokio::spawn(async move {
            let Ok(orig) = client.local_addr() else {
                return;
            };
            let _ = client.set_nodelay(true);
            match upstream.connect_tcp(orig).await {
                Ok(mut up) => {
                    debug!(%peer, %orig, "connected (tc path)");
                    let _ = tpbpf_mux::relay(&mut client, &mut up).await;
                }
                Err(e) => {
                    warn!(%peer, %orig, "dialing the original destination (tc path): {e}");
                    let _ = client.set_zero_linger();
                }
            }
        });
    }
}
