//! One handed-over connection, carried to its original destination.
use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;
use tracing::{debug, warn};

use crate::upstream::Upstream;

/// Carries a redirected connection to its original destination `orig`
/// through `upstream`, until either side ends it. Bytes the application
/// already sent leave with the open; a refusal or a failed dial resets the
/// application's connection, so it sees a failed connection rather than an
/// orderly close.
pub async fn relay(mut client: TcpStream, orig: SocketAddr, upstream: Arc<dyn Upstream>) {
    let peer = client.peer_addr().unwrap_or(orig);
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
            let _ = client.set_zero_linger();
        }
    }
}
