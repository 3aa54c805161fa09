//! Where the user's side sends what tpbpfd hands over: an [`Upstream`]
//! dials. The tunnel to the cluster's agent is one upstream;
//! [`NetnsUpstream`] is another, which dials every original destination
//! itself from inside a given network namespace (`--upstream netns:NAME`,
//! root only): for tests and debugging without a cluster. Its sockets live
//! in that other namespace, which the bridge's programs never touch.
use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{mpsc, Arc},
    time::Duration,
};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpSocket, UdpSocket},
    sync::oneshot,
};
use tpbpf_bridge_api::limits::DNS_TIMEOUT;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A bidirectional byte stream to a destination.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// A datagram flow to one destination.
pub trait DatagramFlow: Send + Sync {
    fn send<'a>(&'a self, buf: &'a [u8]) -> BoxFuture<'a, io::Result<()>>;
    fn recv<'a>(&'a self, buf: &'a mut [u8]) -> BoxFuture<'a, io::Result<usize>>;
}

/// Dials destinations as seen from the cluster. One role: what tpbpfd
/// hands over is taken by the hand-over receiver, which dials here.
pub trait Upstream: Send + Sync + 'static {
    /// Opens a TCP stream to `dst` whose first bytes are `first` (a tunnel
    /// sends them with the open, saving a round trip).
    fn connect_tcp_with(
        &self,
        dst: SocketAddr,
        first: Vec<u8>,
    ) -> BoxFuture<'_, io::Result<Box<dyn Stream>>>;
    /// Opens a datagram flow to `dst` as seen from the cluster.
    fn udp(&self, dst: SocketAddr) -> BoxFuture<'_, io::Result<Box<dyn DatagramFlow>>>;
    /// Sends a DNS query (wire format) to the cluster's DNS and returns the
    /// answer, within [`DNS_TIMEOUT`].
    fn dns(&self, query: Vec<u8>) -> BoxFuture<'_, io::Result<Vec<u8>>>;
    /// For status output and logs.
    fn describe(&self) -> String;
    /// Ends what the upstream holds open (a tunnel session), saying why,
    /// once the peer has been told (or could not be).
    fn close<'a>(&'a self, _why: &'a str) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }
    /// Live state for `tpbpf status` (a tunnel's session, RTT, bytes).
    fn status(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
}

type SocketRequest = (Domain, Type, oneshot::Sender<io::Result<Socket>>);

/// Dials from inside a network namespace: a thread that entered it makes
/// the sockets (a socket belongs to the namespace it was created in), the
/// runtime uses them.
pub struct NetnsUpstream {
    name: String,
    cluster_dns: Option<SocketAddr>,
    requests: mpsc::Sender<SocketRequest>,
}

impl NetnsUpstream {
    /// `name` is an `ip netns` name or a path to a namespace file.
    /// `cluster_dns` is where cluster DNS queries go, inside that namespace.
    pub fn new(name: &str, cluster_dns: Option<SocketAddr>) -> io::Result<Arc<Self>> {
        let path = tpbpf_sys::netns::path_of(name);
        let ns = std::fs::File::open(&path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "opening network namespace {} for --upstream: {e} (create it with `ip netns add {name}`)",
                    path.display()
                ),
            )
        })?;
        let (tx, rx) = mpsc::channel::<SocketRequest>();
        let (ready_tx, ready_rx) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("netns-{name}"))
            .spawn(move || {
                let entered = tpbpf_sys::netns::enter(&ns);
                let failed = entered.is_err();
                let _ = ready_tx.send(entered);
                if failed {
                    return;
                }
                while let Ok((domain, ty, reply)) = rx.recv() {
                    let proto = if ty == Type::STREAM {
                        Protocol::TCP
                    } else {
                        Protocol::UDP
                    };
                    let _ = reply.send(Socket::new(domain, ty, Some(proto)));
                }
            })?;
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("the namespace thread died"))?
            .map_err(|e| io::Error::new(e.kind(), format!("entering {}: {e}", path.display())))?;
        Ok(Arc::new(Self {
            name: name.to_string(),
            cluster_dns,
            requests: tx,
        }))
    }

    async fn socket(&self, dst: SocketAddr, ty: Type) -> io::Result<Socket> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send((Domain::for_address(dst), ty, tx))
            .map_err(|_| io::Error::other("the namespace thread is gone"))?;
        let sock = rx
            .await
            .map_err(|_| io::Error::other("the namespace thread is gone"))??;
        sock.set_nonblocking(true)?;
        Ok(sock)
    }

    async fn udp_socket(&self, dst: SocketAddr) -> io::Result<UdpSocket> {
        let sock = self.socket(dst, Type::DGRAM).await?;
        let sock = UdpSocket::from_std(sock.into())?;
        sock.connect(dst).await?;
        Ok(sock)
    }
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl Upstream for NetnsUpstream {
    fn connect_tcp_with(
        &self,
        dst: SocketAddr,
        first: Vec<u8>,
    ) -> BoxFuture<'_, io::Result<Box<dyn Stream>>> {
        Box::pin(async move {
            use tokio::io::AsyncWriteExt;
            let sock = self.socket(dst, Type::STREAM).await?;
            let sock = TcpSocket::from_std_stream(sock.into());
            let stream = tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(dst))
                .await
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, format!("connecting to {dst}"))
                })??;
            let mut stream = stream;
            let _ = stream.set_nodelay(true);
            stream.write_all(&first).await?;
            Ok(Box::new(stream) as Box<dyn Stream>)
        })
    }

    fn udp(&self, dst: SocketAddr) -> BoxFuture<'_, io::Result<Box<dyn DatagramFlow>>> {
        Box::pin(async move {
            let sock = self.udp_socket(dst).await?;
            Ok(Box::new(ConnectedUdp(sock)) as Box<dyn DatagramFlow>)
        })
    }

    fn dns(&self, query: Vec<u8>) -> BoxFuture<'_, io::Result<Vec<u8>>> {
        Box::pin(async move {
            let server = self.cluster_dns.ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    "no cluster DNS server configured (--cluster-dns)",
                )
            })?;
            let sock = self.udp_socket(server).await?;
            let mut buf = vec![0u8; 65535];
            for _ in 0..2 {
                sock.send(&query).await?;
                match tokio::time::timeout(DNS_TIMEOUT / 2, sock.recv(&mut buf)).await {
                    Ok(Ok(n)) => return Ok(buf[..n].to_vec()),
                    Ok(Err(e)) => return Err(e),
                    Err(_) => continue,
                }
            }
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("cluster DNS {server} did not answer"),
            ))
        })
    }

    fn describe(&self) -> String {
        format!("netns:{}", self.name)
    }
}

struct ConnectedUdp(UdpSocket);

impl DatagramFlow for ConnectedUdp {
    fn send<'a>(&'a self, buf: &'a [u8]) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move { self.0.send(buf).await.map(|_| ()) })
    }
    fn recv<'a>(&'a self, buf: &'a mut [u8]) -> BoxFuture<'a, io::Result<usize>> {
        Box::pin(self.0.recv(buf))
    }
}
