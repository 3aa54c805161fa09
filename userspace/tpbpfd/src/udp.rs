//! The UDP proxy: one socket bound to port P on `lo`, receiving datagrams
//! sent to the slot addresses `127.100.x.y:P`. The destination address of
//! each datagram (IP_PKTINFO) names its original destination; replies leave
//! from that same address, so `recvmsg4/6` can show the application the
//! original source.
use std::{
    collections::HashMap,
    hash::Hash,
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

use tpbpf_bridge_api::limits::{
    FLOWS_QUEUED_BYTES, FLOW_IDLE, FLOW_QUEUE, FLOW_QUEUE_BYTES, MAX_FLOWS,
};
use tpbpf_sys::flows::{Delivery, FlowBounds, FlowRx, Flows};

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
        burst_buffer(&sock);
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
        let mut table: Table<(SocketAddrV4, Ipv4Addr)> = Table::new();
        let (closed_tx, mut closed_rx) = mpsc::unbounded_channel();
        let mut buf = vec![0u8; 65536];
        loop {
            tokio::select! {
                Some((key, owner)) = closed_rx.recv() => table.closed(&key, owner),
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
                    if let Some(owner) = table.owner(&key) {
                        // A flow is its socket's only while that socket is
                        // open: one that binds the port later is not it.
                        if slots.owner_open(owner) {
                            if table.flows.deliver(&key, data) == Delivery::Full {
                                debug!(%client, "UDP flow queue full: datagram dropped");
                            }
                            continue;
                        }
                        debug!(%client, %slot_ip, "a UDP flow's socket has closed: flow ended");
                        table.remove(&key);
                    }
                    let Some(info) = slots.lookup(slot_ip) else {
                        debug!(%client, %slot_ip, "datagram for an unknown UDP slot: dropped");
                        continue;
                    };
                    // A slot answers only the socket it was made for: not
                    // another local process (or user) that sends to its
                    // address.
                    let slot_addr = SocketAddrV4::new(slot_ip, self.port);
                    let diag = tpbpf_sys::sockdiag::udp_socket_of(client, slot_addr);
                    if !sent_by(diag, info.owner, client.into()) {
                        continue;
                    }
                    let orig = info.orig;
                    let owner = Owner::Slot(slots.clone(), info);
                    let reply = ReplyPath::Slot(self.sock.clone(), slot_ip, client);
                    if orig.port() == 53 {
                        if let Some(dns) = dns.clone() {
                            tokio::spawn(answer_dns(dns, data, orig, reply, owner));
                            continue;
                        }
                    }
                    let Some(rx) = table.open(key, info.owner) else {
                        debug!(%client, %orig, "{MAX_FLOWS} UDP flows open: datagram dropped");
                        continue;
                    };
                    table.flows.deliver(&key, data);
                    let (upstream, closed) = (upstream.clone(), closed_tx.clone());
                    tokio::spawn(async move {
                        run_flow(reply, upstream, orig, rx, owner).await;
                        let _ = closed.send((key, info.owner));
                    });
                }
            }
        }
    }
}

/// The proxy socket's receive buffer: every bridged application's
/// datagrams queue here while tpbpfd is off the CPU. With the default
/// (212,992 bytes, about 90 datagrams of 1400 bytes), iperf3 -u at 200
/// Mbit/s lost 8.7% here (RcvbufErrors) on two busy CPUs.
pub(crate) const RECV_BUFFER: usize = 4 << 20;

/// Sets [`RECV_BUFFER`], past `net.core.rmem_max` where tpbpfd may
/// (SO_RCVBUFFORCE takes CAP_NET_ADMIN), else as far as the limit allows.
fn burst_buffer(sock: &Socket) {
    if setsockopt(sock, sockopt::RcvBufForce, &RECV_BUFFER).is_err() {
        if let Err(e) = sock.set_recv_buffer_size(RECV_BUFFER) {
            debug!("the UDP proxy keeps its default receive buffer: {e}");
        }
    }
}

/// Whether sock_diag's answer says the datagram from `client` came from
/// the socket `owner`; says why not.
fn sent_by(diag: std::io::Result<Option<(u64, u32)>>, owner: u64, client: SocketAddr) -> bool {
    match diag {
        Ok(Some((cookie, _))) if cookie == owner => true,
        Ok(_) => {
            warn!(%client, "a datagram to a UDP flow from a socket it was not made for: dropped");
            false
        }
        Err(e) => {
            warn!(%client, "cannot tell which socket sent a datagram (sock_diag: {e}; the kernel needs CONFIG_INET_UDP_DIAG): dropped");
            false
        }
    }
}

/// Answers one DNS query, if the socket that asked is still there.
async fn answer_dns(
    dns: Arc<Dns>,
    query: Vec<u8>,
    orig: SocketAddr,
    reply: ReplyPath,
    owner: Owner,
) {
    if let Some(answer) = dns.answer(&query, orig).await {
        if owner.open() {
            let _ = reply.send(&answer).await;
        }
    }
}

/// One proxy socket's flows, each with the socket (its cookie) it is for.
struct Table<K> {
    flows: Flows<K>,
    owners: HashMap<K, u64>,
}

impl<K: Hash + Eq + Clone> Table<K> {
    fn new() -> Self {
        Self {
            flows: Flows::new(FlowBounds {
                flows: MAX_FLOWS,
                queue: FLOW_QUEUE,
                flow_bytes: FLOW_QUEUE_BYTES,
                total_bytes: FLOWS_QUEUED_BYTES,
            }),
            owners: HashMap::new(),
        }
    }

    fn owner(&self, key: &K) -> Option<u64> {
        self.owners.get(key).copied()
    }

    fn open(&mut self, key: K, owner: u64) -> Option<FlowRx> {
        let rx = self.flows.open(key.clone())?;
        self.owners.insert(key, owner);
        Some(rx)
    }

    /// Ends the flow of `key` now: its task sees its queue close.
    fn remove(&mut self, key: &K) {
        self.flows.remove(key);
        self.owners.remove(key);
    }

    /// The task of `owner`'s flow on `key` has ended; a newer flow on the
    /// same key (another socket's) stays.
    fn closed(&mut self, key: &K, owner: u64) {
        if self.owner(key) == Some(owner) {
            self.remove(key);
        }
    }
}

/// Whose flow it is: asked before every datagram either way, and every
/// [`TOUCH_EVERY`] while it is quiet. A flow lives only as long as the
/// socket it was made for (`sock_release` removes what this reads), so a
/// socket that binds the same port later gets nothing of it.
#[derive(Clone)]
enum Owner {
    /// An IPv4 slot's socket.
    Slot(UdpSlots, SlotInfo),
    /// An unconnected IPv6 socket, by its port on the proxy's namespace.
    Last6 {
        last: Udp6Last,
        proxy: Arc<UdpSocket>,
        port: u16,
        owner: u64,
    },
}

impl Owner {
    /// The socket is still open (per datagram: one map lookup).
    fn open(&self) -> bool {
        match self {
            Owner::Slot(slots, info) => slots.owner_open(info.owner),
            Owner::Last6 {
                last,
                proxy,
                port,
                owner,
            } => last
                .lookup(proxy.as_ref(), *port)
                .is_some_and(|d| d.owner == *owner),
        }
    }

    /// Open, and its slot still names the flow's destination for it.
    fn holds(&self) -> bool {
        match self {
            Owner::Slot(slots, info) => slots.still_owns(info),
            Owner::Last6 { .. } => self.open(),
        }
    }

    /// Marks the flow's slot as in use.
    fn touch(&self) {
        if let Owner::Slot(slots, info) = self {
            slots.touch(info);
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
/// destination (and sending socket) the kernel programs keep by (netns,
/// client port).
pub async fn serve6(
    sock: UdpSocket,
    last: Udp6Last,
    upstream: Arc<UserSide>,
    dns: Option<Arc<Dns>>,
) {
    let sock = Arc::new(sock);
    let local = match sock.local_addr() {
        Ok(SocketAddr::V6(a)) => a,
        other => {
            warn!("the IPv6 UDP proxy has no IPv6 address ({other:?}): not serving");
            return;
        }
    };
    let mut table: Table<(SocketAddr, SocketAddr)> = Table::new();
    let (closed_tx, mut closed_rx) = mpsc::unbounded_channel();
    let mut buf = vec![0u8; 65536];
    loop {
        tokio::select! {
            Some((key, owner)) = closed_rx.recv() => table.closed(&key, owner),
            got = sock.recv_from(&mut buf) => {
                let (n, client) = match got {
                    Ok(v) => v,
                    Err(e) => {
                        warn!("receiving on the IPv6 UDP proxy: {e}");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let Some(dest) = last.lookup(sock.as_ref(), client.port()) else {
                    debug!(%client, "IPv6 datagram with no recorded destination: dropped");
                    continue;
                };
                let (orig, data) = (dest.orig, buf[..n].to_vec());
                let key = (client, orig);
                if let Some(owner) = table.owner(&key) {
                    if owner == dest.owner {
                        table.flows.deliver(&key, data);
                        continue;
                    }
                    debug!(%client, "the socket of an IPv6 UDP flow has closed: flow ended");
                    table.remove(&key);
                }
                // Only the socket that sent to `orig` rides its flow.
                let SocketAddr::V6(client6) = client else {
                    continue;
                };
                let diag = tpbpf_sys::sockdiag::udp6_socket_of(client6, local);
                if !sent_by(diag, dest.owner, client) {
                    continue;
                }
                let reply = ReplyPath::Plain(sock.clone(), client);
                let owner = Owner::Last6 {
                    last: last.clone(),
                    proxy: sock.clone(),
                    port: client.port(),
                    owner: dest.owner,
                };
                if orig.port() == 53 {
                    if let Some(dns) = dns.clone() {
                        tokio::spawn(answer_dns(dns, data, orig, reply, owner));
                        continue;
                    }
                }
                let Some(rx) = table.open(key, dest.owner) else {
                    debug!(%client, %orig, "{MAX_FLOWS} IPv6 UDP flows open: datagram dropped");
                    continue;
                };
                table.flows.deliver(&key, data);
                let (upstream, closed) = (upstream.clone(), closed_tx.clone());
                tokio::spawn(async move {
                    run_flow(reply, upstream, orig, rx, owner).await;
                    let _ = closed.send((key, dest.owner));
                });
            }
        }
    }
}

/// Relays one flow until it is idle for [`FLOW_IDLE`] or its socket has
/// gone: no reply leaves for a socket that is not the flow's.
async fn run_flow(
    reply: ReplyPath,
    upstream: Arc<UserSide>,
    orig: SocketAddr,
    mut rx: FlowRx,
    owner: Owner,
) {
    use tokio::time::Instant;
    let (mut touched, slot) = (Instant::now(), owner.clone());
    let mut used = move |idle: &mut Instant| {
        *idle = Instant::now() + FLOW_IDLE;
        if touched.elapsed() >= TOUCH_EVERY {
            touched = Instant::now();
            slot.touch();
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
    let mut idle = Instant::now() + FLOW_IDLE;
    let mut check = tokio::time::interval(TOUCH_EVERY);
    let mut buf = vec![0u8; 65536];
    loop {
        tokio::select! {
            d = rx.recv() => match d {
                Some(d) => {
                    used(&mut idle);
                    if let Err(e) = flow.send(&d).await {
                        debug!(%orig, "sending a datagram upstream: {e}");
                    }
                }
                None => return,
            },
            r = flow.recv(&mut buf) => match r {
                Ok(n) => {
                    if !owner.open() {
                        debug!(%orig, "the socket of a UDP flow has closed: flow ended");
                        return;
                    }
                    used(&mut idle);
                    if let Err(e) = reply.send(&buf[..n]).await {
                        debug!(%orig, "returning a datagram: {e}");
                    }
                }
                Err(e) => {
                    debug!(%orig, "UDP flow ended: {e}");
                    return;
                }
            },
            _ = check.tick() => if !owner.holds() {
                debug!(%orig, "the socket of a UDP flow has closed: flow ended");
                return;
            },
            _ = tokio::time::sleep_until(idle) => return,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flow_table_knows_each_flows_socket_and_a_late_close_leaves_a_newer_flow() {
        let mut table: Table<u32> = Table::new();
        let _old = table.open(1, 100).expect("room");
        assert_eq!(table.owner(&1), Some(100));
        assert!(table.open(1, 200).is_none(), "one flow per key");
        // The owner closed: the flow ends now, and another socket on the
        // same key gets a flow of its own.
        table.remove(&1);
        assert_eq!(table.owner(&1), None);
        let _new = table.open(1, 200).expect("the key is free again");
        // The old flow's task reports its end after that: the new flow stays.
        table.closed(&1, 100);
        assert_eq!(table.owner(&1), Some(200));
        assert_eq!(table.flows.len(), 1);
        table.closed(&1, 200);
        assert_eq!(table.owner(&1), None);
        assert!(table.flows.is_empty());
    }
}
