//! The machine's routes, read from the kernel over rtnetlink (an
//! RTM_GETROUTE dump of the main table), for `tpbpf up`'s overlap check.
use std::{io, net::IpAddr, os::fd::FromRawFd};

use tpbpf_loader::Cidr;

/// A route of the main table: destination and outgoing interface.
#[derive(Debug, Clone)]
pub struct Route {
    pub dst: Cidr,
    pub dev: String,
}

const RTMSG_LEN: usize = 12;
const NLMSG_HDRLEN: usize = 16;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Unicast routes of the main table with a destination (not the default),
/// IPv4 and IPv6.
pub fn main_table() -> io::Result<Vec<Route>> {
    let mut out = Vec::new();
    for family in [libc::AF_INET, libc::AF_INET6] {
        dump(family as u8, &mut out)?;
    }
    Ok(out)
}

fn dump(family: u8, out: &mut Vec<Route>) -> io::Result<()> {
    // SAFETY: plain socket(2); the fd is owned by `sock` below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    let sock = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut req = Vec::with_capacity(NLMSG_HDRLEN + RTMSG_LEN);
    req.extend_from_slice(&((NLMSG_HDRLEN + RTMSG_LEN) as u32).to_ne_bytes());
    req.extend_from_slice(&libc::RTM_GETROUTE.to_ne_bytes());
    req.extend_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // seq
    req.extend_from_slice(&0u32.to_ne_bytes()); // pid: the kernel
    let mut rtm = [0u8; RTMSG_LEN];
    rtm[0] = family;
    req.extend_from_slice(&rtm);
    // SAFETY: sending a buffer we own to our socket; the kernel is the
    // default destination of a netlink socket.
    if unsafe { libc::send(fd, req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: receiving into a buffer we own.
        let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut msgs = &buf[..n as usize];
        while msgs.len() >= NLMSG_HDRLEN {
            let len = u32::from_ne_bytes(msgs[0..4].try_into().unwrap_or_default()) as usize;
            let kind = u16::from_ne_bytes([msgs[4], msgs[5]]);
            if len < NLMSG_HDRLEN || len > msgs.len() {
                return Err(io::Error::other("malformed netlink message"));
            }
            match i32::from(kind) {
                libc::NLMSG_DONE => {
                    drop(sock);
                    return Ok(());
                }
                libc::NLMSG_ERROR => {
                    let code = i32::from_ne_bytes(
                        msgs[NLMSG_HDRLEN..NLMSG_HDRLEN + 4]
                            .try_into()
                            .unwrap_or_default(),
                    );
                    return Err(io::Error::from_raw_os_error(-code));
                }
                _ if kind == libc::RTM_NEWROUTE => {
                    if let Some(r) = parse_route(&msgs[NLMSG_HDRLEN..len]) {
                        out.push(r);
                    }
                }
                _ => {}
            }
            msgs = &msgs[align4(len).min(msgs.len())..];
        }
    }
}

fn parse_route(body: &[u8]) -> Option<Route> {
    if body.len() < RTMSG_LEN {
        return None;
    }
    let (family, dst_len, mut table, kind) = (body[0], body[1], u32::from(body[4]), body[7]);
    if kind != libc::RTN_UNICAST || dst_len == 0 {
        return None;
    }
    let (mut dst, mut oif) = (None, None);
    let mut attrs = &body[align4(RTMSG_LEN)..];
    while attrs.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attrs[0], attrs[1]]));
        let ty = u16::from_ne_bytes([attrs[2], attrs[3]]);
        if len < 4 || len > attrs.len() {
            break;
        }
        let v = &attrs[4..len];
        match ty {
            libc::RTA_DST => {
                dst = match (i32::from(family), v.len()) {
                    (libc::AF_INET, 4) => Some(IpAddr::from(<[u8; 4]>::try_from(v).ok()?)),
                    (libc::AF_INET6, 16) => Some(IpAddr::from(<[u8; 16]>::try_from(v).ok()?)),
                    _ => None,
                }
            }
            libc::RTA_OIF if v.len() == 4 => oif = Some(u32::from_ne_bytes(v.try_into().ok()?)),
            libc::RTA_TABLE if v.len() == 4 => table = u32::from_ne_bytes(v.try_into().ok()?),
            _ => {}
        }
        attrs = &attrs[align4(len).min(attrs.len())..];
    }
    if table != u32::from(libc::RT_TABLE_MAIN) {
        return None;
    }
    let dst = Cidr::new(dst?, dst_len)?;
    let dev = oif.map(ifname).unwrap_or_else(|| "?".into());
    Some(Route { dst, dev })
}

fn ifname(index: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer is IF_NAMESIZE long, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return format!("if{index}");
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into buf.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_routes_of_this_namespace() {
        // Every namespace has at least its loopback; the main table may be
        // empty in a bare namespace, but the dump itself must work.
        let routes = super::main_table().expect("RTM_GETROUTE dump");
        for r in &routes {
            assert!(!r.dev.is_empty());
        }
    }
}
