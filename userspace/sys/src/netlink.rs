//! Routes, rules and links over rtnetlink (`rtnetlink`,
//! `netlink-packet-route`): no `ip` command. Each call runs on a thread of
//! its own with its own runtime, so it may be called from anywhere, sync or
//! async code, and [`in_netns`] runs one in another network namespace.
use std::{
    future::Future,
    io,
    net::{IpAddr, Ipv4Addr},
};

use futures_util::TryStreamExt;
use rtnetlink::{
    packet_route::{
        link::LinkAttribute,
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteScope, RouteType},
        rule::{RuleAction, RuleAttribute, RuleMessage},
        AddressFamily,
    },
    Handle, IpVersion, RouteMessageBuilder,
};

fn nl_err(what: &str) -> impl Fn(rtnetlink::Error) -> io::Error + '_ {
    move |e| io::Error::other(format!("{what} (rtnetlink): {e}"))
}

/// Runs `f` with an rtnetlink handle, on a thread of its own, in network
/// namespace `netns` (an `ip netns` name under /run/netns, or a path) or
/// in this thread's.
pub fn in_netns<T, F, Fut>(netns: Option<&str>, f: F) -> io::Result<T>
where
    T: Send,
    F: FnOnce(Handle) -> Fut + Send,
    Fut: Future<Output = io::Result<T>>,
{
    let ns = match netns {
        None => std::fs::File::open("/proc/thread-self/ns/net")?,
        Some(n) => crate::netns::open(n)?,
    };
    crate::netns::run_in(&ns, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let (conn, handle, _) = rtnetlink::new_connection()?;
            let task = tokio::spawn(conn);
            let out = f(handle).await;
            task.abort();
            out
        })
    })?
}

/// A network interface: its index, name, and for a veth, its peer's index
/// and the peer's namespace (`link_netnsid`), if the peer is elsewhere.
#[derive(Clone, Debug)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub peer: Option<u32>,
    pub peer_netnsid: Option<i32>,
}

pub async fn links(handle: Handle) -> io::Result<Vec<Link>> {
    let mut out = Vec::new();
    let mut stream = handle.link().get().execute();
    while let Some(msg) = stream.try_next().await.map_err(nl_err("listing links"))? {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            peer: None,
            peer_netnsid: None,
        };
        for a in msg.attributes {
            match a {
                LinkAttribute::IfName(n) => link.name = n,
                LinkAttribute::Link(p) => link.peer = Some(p),
                LinkAttribute::LinkNetNsId(id) => link.peer_netnsid = Some(id),
                _ => {}
            }
        }
        out.push(link);
    }
    Ok(out)
}

/// A unicast route of the main table with a destination (not a default
/// route): its destination and outgoing interface index.
#[derive(Clone, Debug)]
pub struct Route {
    pub dst: IpAddr,
    pub prefix_len: u8,
    pub oif: Option<u32>,
}

pub async fn main_routes(handle: Handle) -> io::Result<Vec<Route>> {
    let mut out = Vec::new();
    for version in [IpVersion::V4, IpVersion::V6] {
        let req = match version {
            IpVersion::V4 => RouteMessageBuilder::<Ipv4Addr>::new().build(),
            IpVersion::V6 => RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
        };
        let mut stream = handle.route().get(req).execute();
        while let Some(msg) = stream.try_next().await.map_err(nl_err("listing routes"))? {
            if let Some(r) = main_unicast(&msg) {
                out.push(r);
            }
        }
    }
    Ok(out)
}

fn main_unicast(msg: &RouteMessage) -> Option<Route> {
    let h = &msg.header;
    let table = msg
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(h.table));
    if table != u32::from(RouteHeaderMain::MAIN) || h.kind != RouteType::Unicast {
        return None;
    }
    if h.destination_prefix_length == 0 {
        return None;
    }
    let mut dst = None;
    let mut oif = None;
    for a in &msg.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(v4)) => dst = Some(IpAddr::V4(*v4)),
            RouteAttribute::Destination(RouteAddress::Inet6(v6)) => dst = Some(IpAddr::V6(*v6)),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    Some(Route {
        dst: dst?,
        prefix_len: h.destination_prefix_length,
        oif,
    })
}

struct RouteHeaderMain;
impl RouteHeaderMain {
    const MAIN: u8 = 254;
}

/// The IPv4 rule `fwmark MARK lookup TABLE` (any priority), if there is one.
pub async fn fwmark_rule(handle: Handle, mark: u32, table: u32) -> io::Result<Option<RuleMessage>> {
    let mut stream = handle.rule().get(IpVersion::V4).execute();
    while let Some(rule) = stream.try_next().await.map_err(nl_err("listing rules"))? {
        let has = |want: &RuleAttribute| rule.attributes.iter().any(|a| a == want);
        let table_ok = has(&RuleAttribute::Table(table)) || u32::from(rule.header.table) == table;
        if has(&RuleAttribute::FwMark(mark))
            && table_ok
            && rule.header.action == RuleAction::ToTable
        {
            return Ok(Some(rule));
        }
    }
    Ok(None)
}

pub async fn add_fwmark_rule(
    handle: Handle,
    mark: u32,
    table: u32,
    priority: u32,
) -> io::Result<()> {
    handle
        .rule()
        .add()
        .v4()
        .fw_mark(mark)
        .table_id(table)
        .priority(priority)
        .action(RuleAction::ToTable)
        .execute()
        .await
        .map_err(nl_err("adding the fwmark rule"))
}

pub async fn del_rule(handle: Handle, rule: RuleMessage) -> io::Result<()> {
    handle
        .rule()
        .del(rule)
        .execute()
        .await
        .map_err(nl_err("removing the fwmark rule"))
}

/// `local 0.0.0.0/0 dev lo table TABLE`: everything looked up in TABLE is
/// delivered locally.
fn local_default(table: u32, lo: u32) -> RouteMessage {
    let mut msg = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
        .output_interface(lo)
        .table_id(table)
        .kind(RouteType::Local)
        .scope(RouteScope::Host)
        .build();
    msg.header.address_family = AddressFamily::Inet;
    msg
}

async fn loopback_index(handle: &Handle) -> io::Result<u32> {
    let mut stream = handle.link().get().match_name("lo").execute();
    match stream.try_next().await.map_err(nl_err("finding lo"))? {
        Some(l) => Ok(l.header.index),
        None => Err(io::Error::other("no loopback interface")),
    }
}

pub async fn replace_local_default(handle: Handle, table: u32) -> io::Result<()> {
    let lo = loopback_index(&handle).await?;
    handle
        .route()
        .add(local_default(table, lo))
        .replace()
        .execute()
        .await
        .map_err(nl_err("adding the local route"))
}

pub async fn del_local_default(handle: Handle, table: u32) -> io::Result<()> {
    let lo = loopback_index(&handle).await?;
    handle
        .route()
        .del(local_default(table, lo))
        .execute()
        .await
        .map_err(nl_err("removing the local route"))
}

async fn link_index(handle: &Handle, iface: &str) -> io::Result<i32> {
    let mut stream = handle.link().get().match_name(iface.to_string()).execute();
    match stream
        .try_next()
        .await
        .map_err(|e| io::Error::other(format!("finding interface {iface} (rtnetlink): {e}")))?
    {
        Some(l) => Ok(l.header.index as i32),
        None => Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no interface {iface}"),
        )),
    }
}

/// Removes the `clsact` qdisc of `iface` if no filter is left on it, ingress
/// or egress. Before Linux 6.6 (no tcx) the tc path makes that qdisc when
/// the interface has none; this undoes it once tpbpf's own filter is gone,
/// and never takes another program's filters with it. True if it was
/// removed; an interface that is gone counts as done.
pub fn remove_clsact_if_unused(iface: &str) -> io::Result<bool> {
    use rtnetlink::packet_route::tc::TcHandle;
    let iface = iface.to_string();
    in_netns(None, move |handle| async move {
        let index = match link_index(&handle, &iface).await {
            Ok(i) => i,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(true),
            Err(e) => return Err(e),
        };
        for egress in [false, true] {
            let get = handle.traffic_filter(index).get();
            let get = if egress { get.egress() } else { get.ingress() };
            let mut filters = get.execute();
            match filters.try_next().await {
                Ok(Some(_)) => return Ok(false),
                Ok(None) => {}
                // EINVAL/ENOENT: no clsact qdisc at all.
                Err(rtnetlink::Error::NetlinkError(e))
                    if matches!(e.raw_code().abs(), libc::EINVAL | libc::ENOENT) =>
                {
                    return Ok(true)
                }
                Err(e) => {
                    return Err(io::Error::other(format!(
                        "listing the tc filters of {iface} (rtnetlink): {e}"
                    )))
                }
            }
        }
        let mut del = handle.qdisc().del(index);
        del.message_mut().header.parent = TcHandle::CLSACT;
        del.message_mut().header.handle = TcHandle {
            major: 0xffff,
            minor: 0,
        };
        match del.execute().await {
            Ok(()) => Ok(true),
            Err(rtnetlink::Error::NetlinkError(e))
                if matches!(e.raw_code().abs(), libc::EINVAL | libc::ENOENT) =>
            {
                Ok(true)
            }
            Err(e) => Err(io::Error::other(format!(
                "removing the clsact qdisc of {iface} (rtnetlink): {e}"
            ))),
        }
    })
}
