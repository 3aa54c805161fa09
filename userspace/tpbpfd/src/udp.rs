//! The UDP proxy: one socket bound to port P on `lo`, receiving datagrams
//! sent to the slot addresses `127.100.x.y:P`. The destination address of
//! each datagram (IP_PKTINFO) names its original destination; replies leave
//! from that same address, so `recvmsg4/6` can show the application the
//! original source.
use std::{
    io::{IoSlice, IoSliceMut},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::AsRawFd,
    sync::Arc,
    time::Duration,
};

use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
    SockaddrIn,
};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{io::Interest, net::UdpSocket, sync::mpsc};
use tpbpf_loader::{SlotInfo, Udp6Last, UdpSlots};
use tracing::{debug, warn};

use tpbpf_bridge_api::limits::{FLOW_IDLE, FLOW_QUEUE, MAX_FLOWS};
use tpbpf_sys::flows::{Delivery, Flows};

use crate::{dns::Dns, service::UserSide};

/// How often a live flow marks its slot as in use (the kernel hands out
/// slots idle for `UDP_SLOT_IDLE_NS`, 30 s).
const TOUCH_EVERY: Duration = Duration::from_secs(5);

pub struct UdpProxy {
    sock: Arc<UdpSocket>,
    port: u16,
}

impl UdpProxy {
    pub fn bind() -> std::io::Result<Self> {
        let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        // Only local processes can reach it: bound to the loopback device.
        sock.bind_device(Some(b"lo"))?;
        sock.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)).into())?;
        setsockopt(&sock, sockopt::Ipv4PacketInfo, &true).map_err(std::io::Error::from)?;
        sock.set_nonblocking(true)?;
        let port = sock
            .local_addr()?
            .as_socket()
            .map(|a| a.port())
            .unwrap_or(0);
        let sock = UdpSocket::from_std(sock.into())?;
        Ok(Self {
            sock: Arc::new(sock),
            port,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub async fn serve(self, slots: UdpSlots, upstream: Arc<UserSide>, dns: Option<Arc<Dns>>) {
        let mut flows: Flows<(SocketAddrV4, Ipv4Addr)> = Flows::new(MAX_FLOWS, FLOW_QUEUE);
        let (closed_tx, mut closed_rx) = mpsc::unbounded_channel();
        let mut buf = vec![0u8; 65536];
        loop {
            tokio::select! {
                Some(key) = closed_rx.recv() => flows.remove(&key),
                got = recv_with_dst(&self.sock, &mut buf) => {
                    let (n, client, slot_ip) = match got {
                        Ok(v) => v,
                        Err(e) => {
                            warn!("receiving on the UDP proxy: {e}");
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                    };
                    let data = buf[..n].to_vec();
                    let key = (client, slot_ip);
                    if flows.contains(&key) {
                        if flows.deliver(&key, data) == Delivery::Full {
                            debug!(%client, "UDP flow queue full: datagram dropped");
                        }
                        continue;
                    }
                    let Some(info) = slots.lookup(slot_ip) else {
                        debug!(%client, %slot_ip, "datagram for an unknown UDP slot: dropped");
                        continue;
                    };
                    // A slot answers only the socket it was made for: not
                    // another local process (or user) that sends to its
                    // address.
                    let slot_addr = SocketAddrV4::new(slot_ip, self.port);
                    match tpbpf_sys::sockdiag::udp_socket_of(client, slot_addr) {
                        Ok(Some((cookie, _))) if cookie == info.owner => {}
                        Ok(_) => {
                            warn!(%client, %slot_ip, "a datagram to a UDP slot from a socket it was not made for: dropped");
                            continue;
                        }
                        Err(e) => {
                            warn!(%client, "cannot tell which socket sent a datagram (sock_diag: {e}; the kernel needs CONFIG_INET_UDP_DIAG): dropped");
                            continue;
                        }
                    }
                    let orig = info.orig;
                    if orig.port() == 53 {
                        if let Some(dns) = dns.clone() {
                            let sock = self.sock.clone();
                            tokio::spawn(async move {
                                if let Some(answer) = dns.answer(&data, orig).await {
                                    let _ = send_from(&sock, &answer, slot_ip, client).await;
                                }
                            });
                            continue;
                        }
                    }
                    let Some(rx) = flows.open(key) else {
                        debug!(%client, %orig, "{MAX_FLOWS} UDP flows open: datagram dropped");
                        continue;
                    };
                    flows.deliver(&key, data);
                    let reply = ReplyPath::Slot(self.sock.clone(), slot_ip, client);
                    let (upstream, closed) = (upstream.clone(), closed_tx.clone());
                    let touch = Some((slots.clone(), info));
                    tokio::spawn(async move {
                        run_flow(reply, upstream, orig, rx, touch).await;
                        let _ = closed.send(key);
                    });
                }
            }
        }
    }
}

/// Where a flow's replies go back to the client.
#[derive(Clone)]
enum ReplyPath {
    /// From the slot address on the IPv4 proxy socket.
    Slot(Arc<UdpSocket>, Ipv4Addr, SocketAddrV4),
    /// From `[::1]:port` on the IPv6 proxy socket.
    Plain(Arc<UdpSocket>, SocketAddr),
}

impl ReplyPath {
    async fn send(&self, data: &[u8]) -> std::io::Result<()> {
        match self {
            ReplyPath::Slot(sock, from, to) => send_from(sock, data, *from, *to).await,
            ReplyPath::Plain(sock, to) => sock.send_to(data, to).await.map(|_| ()),
        }
    }
}

/// The IPv6 proxy socket on `[::1]`: unconnected IPv6 datagrams, whose
/// destination the kernel programs keep by (netns, client port).
pub async fn serve6(
    sock: UdpSocket,
    last: Udp6Last,
    upstream: Arc<UserSide>,
    dns: Option<Arc<Dns>>,
) {
    let sock = Arc::new(sock);
    let mut flows: Flows<(SocketAddr, SocketAddr)> = Flows::new(MAX_FLOWS, FLOW_QUEUE);
    let (closed_tx, mut closed_rx) = mpsc::unbounded_channel();
    let mut buf = vec![0u8; 65536];
    loop {
        tokio::select! {
            Some(key) = closed_rx.recv() => flows.remove(&key),
            got = sock.recv_from(&mut buf) => {
                let (n, client) = match got {
                    Ok(v) => v,
                    Err(e) => {
                        warn!("receiving on the IPv6 UDP proxy: {e}");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let Some(orig) = last.lookup(sock.as_ref(), client.port()) else {
                    debug!(%client, "IPv6 datagram with no recorded destination: dropped");
                    continue;
                };
                let data = buf[..n].to_vec();
                let reply = ReplyPath::Plain(sock.clone(), client);
                if orig.port() == 53 {
                    if let Some(dns) = dns.clone() {
                        tokio::spawn(async move {
                            if let Some(answer) = dns.answer(&data, orig).await {
                                let _ = reply.send(&answer).await;
                            }
                        });
                        continue;
                    }
                }
                let key = (client, orig);
                if flows.contains(&key) {
                    flows.deliver(&key, data);
                    continue;
                }
                let Some(rx) = flows.open(key) else {
                    debug!(%client, %orig, "{MAX_FLOWS} IPv6 UDP flows open: datagram dropped");
                    continue;
                };
                flows.deliver(&key, data);
                let (upstream, closed) = (upstream.clone(), closed_tx.clone());
                tokio::spawn(async move {
                    run_flow(reply, upstream, orig, rx, None).await;
                    let _ = closed.send(key);
                });
            }
        }
    }
}

/// Relays one flow; `touch`: its slot, kept in use while datagrams pass.
async fn run_flow(
    reply: ReplyPath,
    upstream: Arc<UserSide>,
    orig: SocketAddr,
    mut rx: mpsc::Receiver<Vec<u8>>,
    touch: Option<(UdpSlots, SlotInfo)>,
) {
    let mut touched = tokio::time::Instant::now();
    let mut touch = move || {
        if let Some((slots, info)) = &touch {
            if touched.elapsed() >= TOUCH_EVERY {
                touched = tokio::time::Instant::now();
                slots.touch(info);
            }
        }
    };
    let flow = match upstream.udp(orig).await {
        Ok(f) => f,
        Err(e) => {
            warn!(%orig, "opening a UDP flow: {e}");
            return;
        }
    };
    debug!(%orig, "UDP flow open");
    let mut buf = vec![0u8; 65536];
    loop {
        tokio::select! {
            d = rx.recv() => match d {
                Some(d) => {
                    touch();
                    if let Err(e) = flow.send(&d).await {
                        debug!(%orig, "sending a datagram upstream: {e}");
                    }
                }
                None => return,
            },
            r = flow.recv(&mut buf) => match r {
                Ok(n) => {
                    touch();
                    if let Err(e) = reply.send(&buf[..n]).await {
                        debug!(%orig, "returning a datagram: {e}");
                    }
                }
                Err(e) => {
                    debug!(%orig, "UDP flow ended: {e}");
                    return;
                }
            },
            _ = tokio::time::sleep(FLOW_IDLE) => return,
        }
    }
}

/// Receives one datagram with its sender and the address it was sent to.
async fn recv_with_dst(
    sock: &UdpSocket,
    buf: &mut [u8],
) -> std::io::Result<(usize, SocketAddrV4, Ipv4Addr)> {
    loop {
        sock.readable().await?;
        let fd = sock.as_raw_fd();
        let r = sock.try_io(Interest::READABLE, || {
            let mut iov = [IoSliceMut::new(buf)];
            let mut cmsg = nix::cmsg_space!(libc::in_pktinfo);
            let msg = recvmsg::<SockaddrIn>(fd, &mut iov, Some(&mut cmsg), MsgFlags::empty())
                .map_err(std::io::Error::from)?;
            let mut dst = None;
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::Ipv4PacketInfo(info) = c {
                        dst = Some(Ipv4Addr::from(u32::from_be(info.ipi_addr.s_addr)));
                    }
                }
            }
            let src = msg.address.map(|a| SocketAddrV4::new(a.ip(), a.port()));
            match (src, dst) {
                (Some(src), Some(dst)) => Ok((msg.bytes, src, dst)),
                _ => Err(std::io::Error::other(
                    "datagram without address information",
                )),
            }
        });
        match r {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

/// Sends `data` to `to`, from the local address `from`.
async fn send_from(
    sock: &UdpSocket,
    data: &[u8],
    from: Ipv4Addr,
    to: SocketAddrV4,
) -> std::io::Result<()> {
    let fd = sock.as_raw_fd();
    let info = libc::in_pktinfo {
        ipi_ifindex: 0,
        ipi_spec_dst: libc::in_addr {
            s_addr: u32::from(from).to_be(),
        },
        ipi_addr: libc::in_addr { s_addr: 0 },
    };
    let dest = SockaddrIn::from(to);
    sock.async_io(Interest::WRITABLE, || {
        let iov = [IoSlice::new(data)];
        let cmsg = [ControlMessage::Ipv4PacketInfo(&info)];
        sendmsg(fd, &iov, &cmsg, MsgFlags::empty(), Some(&dest))
            .map(|_| ())
            .map_err(std::io::Error::from)
    })
    .await
}
