//! The binary headers of datagrams and DNS messages on a bridge's
//! connection: a tag byte, an id, and for a new flow its destination. A
//! JSON header starts with `{`, which no tag is.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// One datagram frame's header; its payload is the datagram or the DNS
/// message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Datagram {
    /// tpbpfd → user: a new flow of datagrams to `dst`.
    UdpOpen { flow: u32, dst: SocketAddr },
    /// tpbpfd → user: a datagram of `flow`, toward the cluster.
    UdpSend { flow: u32 },
    /// tpbpfd → user: `flow` is closed.
    UdpClose { flow: u32 },
    /// user → tpbpfd: a datagram back to the application of `flow`.
    UdpAnswer { flow: u32 },
    /// tpbpfd → user: a DNS query for the cluster.
    Dns { id: u32 },
    /// user → tpbpfd: the answer to query `id`, or why there is none.
    DnsAnswer { id: u32, error: Option<String> },
}

const UDP_OPEN: u8 = 1;
const UDP_SEND: u8 = 2;
const UDP_CLOSE: u8 = 3;
const UDP_ANSWER: u8 = 4;
const DNS: u8 = 5;
const DNS_ANSWER: u8 = 6;
/// The longest error text a DNS answer carries.
pub const MAX_ERROR: usize = 512;

impl Datagram {
    /// Whether a frame's header is a datagram header (not JSON).
    pub fn is_datagram(header: &[u8]) -> bool {
        matches!(header.first(), Some(UDP_OPEN..=DNS_ANSWER))
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(24);
        let (tag, id) = match self {
            Self::UdpOpen { flow, .. } => (UDP_OPEN, flow),
            Self::UdpSend { flow } => (UDP_SEND, flow),
            Self::UdpClose { flow } => (UDP_CLOSE, flow),
            Self::UdpAnswer { flow } => (UDP_ANSWER, flow),
            Self::Dns { id } => (DNS, id),
            Self::DnsAnswer { id, .. } => (DNS_ANSWER, id),
        };
        out.push(tag);
        out.extend_from_slice(&id.to_be_bytes());
        match self {
            Self::UdpOpen { dst, .. } => {
                match dst.ip() {
                    IpAddr::V4(a) => {
                        out.push(4);
                        out.extend_from_slice(&a.octets());
                    }
                    IpAddr::V6(a) => {
                        out.push(6);
                        out.extend_from_slice(&a.octets());
                    }
                }
                out.extend_from_slice(&dst.port().to_be_bytes());
            }
            Self::DnsAnswer { error: Some(e), .. } => {
                let mut end = e.len().min(MAX_ERROR);
                while !e.is_char_boundary(end) {
                    end -= 1;
                }
                out.extend_from_slice(&e.as_bytes()[..end]);
            }
            _ => {}
        }
        out
    }

    /// Decodes a header, refusing anything malformed or with bytes left over.
    pub fn decode(header: &[u8]) -> Result<Self, String> {
        let bad = |what: &str| format!("a malformed datagram header: {what}");
        let (&tag, rest) = header.split_first().ok_or_else(|| bad("empty"))?;
        if rest.len() < 4 {
            return Err(bad("no id"));
        }
        let (id, rest) = rest.split_at(4);
        let id = u32::from_be_bytes([id[0], id[1], id[2], id[3]]);
        let done = |d: Self, rest: &[u8]| {
            if rest.is_empty() {
                Ok(d)
            } else {
                Err(bad("bytes after its end"))
            }
        };
        match tag {
            UDP_OPEN => {
                let (&family, rest) = rest.split_first().ok_or_else(|| bad("no address"))?;
                let (ip, rest): (IpAddr, &[u8]) = match (family, rest.len()) {
                    (4, 6) => {
                        let o: [u8; 4] = rest[..4].try_into().map_err(|_| bad("address"))?;
                        (Ipv4Addr::from(o).into(), &rest[4..])
                    }
                    (6, 18) => {
                        let o: [u8; 16] = rest[..16].try_into().map_err(|_| bad("address"))?;
                        (Ipv6Addr::from(o).into(), &rest[16..])
                    }
                    _ => return Err(bad("an address of unknown family or length")),
                };
                let port = u16::from_be_bytes([rest[0], rest[1]]);
                Ok(Self::UdpOpen {
                    flow: id,
                    dst: SocketAddr::new(ip, port),
                })
            }
            UDP_SEND => done(Self::UdpSend { flow: id }, rest),
            UDP_CLOSE => done(Self::UdpClose { flow: id }, rest),
            UDP_ANSWER => done(Self::UdpAnswer { flow: id }, rest),
            DNS => done(Self::Dns { id }, rest),
            DNS_ANSWER => {
                if rest.len() > MAX_ERROR {
                    return Err(bad("an error text over 512 bytes"));
                }
                let error = if rest.is_empty() {
                    None
                } else {
                    Some(
                        std::str::from_utf8(rest)
                            .map_err(|_| bad("an error text that is not UTF-8"))?
                            .to_string(),
                    )
                };
                Ok(Self::DnsAnswer { id, error })
            }
            _ => Err(bad("an unknown tag")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_header_round_trips() {
        let all = [
            Datagram::UdpOpen {
                flow: 7,
                dst: "10.96.0.10:53".parse().unwrap(),
            },
            Datagram::UdpOpen {
                flow: u32::MAX,
                dst: "[fd00::1]:8125".parse().unwrap(),
            },
            Datagram::UdpSend { flow: 1 },
            Datagram::UdpClose { flow: 2 },
            Datagram::UdpAnswer { flow: 3 },
            Datagram::Dns { id: 4 },
            Datagram::DnsAnswer { id: 5, error: None },
            Datagram::DnsAnswer {
                id: 6,
                error: Some("the cluster's DNS did not answer".into()),
            },
        ];
        for d in all {
            let bytes = d.encode();
            assert!(Datagram::is_datagram(&bytes));
            assert_eq!(Datagram::decode(&bytes), Ok(d));
        }
        assert!(!Datagram::is_datagram(b"{\"op\":\"prepare\"}"));
    }

    #[test]
    fn malformed_headers_are_refused() {
        for bad in [
            &b""[..],
            &[2, 0, 0],
            &[2, 0, 0, 0, 1, 9],
            &[1, 0, 0, 0, 1, 4, 10, 0, 0],
            &[1, 0, 0, 0, 1, 5, 10, 0, 0, 1, 0, 53],
            &[1, 0, 0, 0, 1, 4, 10, 0, 0, 1, 0, 53, 0],
            &[6, 0, 0, 0, 1, 0xff, 0xfe],
            &[9, 0, 0, 0, 1],
        ] {
            assert!(Datagram::decode(bad).is_err(), "{bad:?} was accepted");
        }
        let long = Datagram::DnsAnswer {
            id: 1,
            error: Some("é".repeat(400)),
        }
        .encode();
        assert!(long.len() <= 5 + MAX_ERROR);
        assert!(Datagram::decode(&long).is_ok(), "cut on a char boundary");
    }
}
