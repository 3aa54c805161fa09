//! The TCP listener behind the redirect.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::{TcpListener, TcpStream};
use tpbpf_loader::OrigDstTable;
use tracing::{debug, warn};

use crate::{dns::Dns, service::UserSide};

pub async fn serve(
    listener: TcpListener,
    table: OrigDstTable,
    upstream: Arc<UserSide>,
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
    upstream: Arc<UserSide>,
    dns: Option<Arc<Dns>>,
) {
    let local = match client.local_addr() {
        Ok(a) => a,
        Err(e) => {
            warn!(%peer, "a redirected connection's own address: {e}");
            return;
        }
    };
    // The destination the socket at the other end dialled, if tpbpf
    // redirected that socket (by its cookie: not whoever used its port).
    let orig = match table.original_destination(peer, local) {
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
    debug!(%peer, %orig, "handing over");
    upstream.hand_over(client, orig);
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
pub async fn serve_transparent(listener: TcpListener, upstream: Arc<UserSide>) {
    loop {
        let (client, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!("accepting on the transparent listener: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        // The accepted socket's local address is the original destination:
        // the user's side reads it there, as for any handed-over connection.
        let Ok(orig) = client.local_addr() else {
            continue;
        };
        let _ = client.set_nodelay(true);
        debug!(%peer, %orig, "handing over (tc path)");
        upstream.hand_over(client, orig);
    }
}
