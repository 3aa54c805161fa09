//! IP ranges as users write them (`10.96.0.0/12`, `fd00::/108`).
use std::{fmt, net::IpAddr, str::FromStr};

use thiserror::Error;

/// A network: an address with its prefix length, host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix_len: u8,
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("`{input}` is not an IP range: {reason} (expected e.g. 10.96.0.0/12 or fd00::/108)")]
pub struct CidrParseError {
    input: String,
    reason: &'static str,
}

impl Cidr {
    pub fn new(addr: IpAddr, prefix_len: u8) -> Option<Self> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix_len > max {
            return None;
        }
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(prefix_len))
                    .unwrap_or(0);
                IpAddr::V4((u32::from(a) & mask).into())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(prefix_len))
                    .unwrap_or(0);
                IpAddr::V6((u128::from(a) & mask).into())
            }
        };
        Some(Self { addr, prefix_len })
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        Cidr::new(ip, self.prefix_len).is_some_and(|c| c.addr == self.addr)
    }
}

impl FromStr for Cidr {
    type Err = CidrParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| CidrParseError {
            input: s.to_string(),
            reason,
        };
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| err("bad address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            Some(l) => l.parse::<u8>().map_err(|_| err("bad prefix length"))?,
            None => max,
        };
        if len > max {
            return Err(err("prefix length too long for the address family"));
        }
        Cidr::new(addr, len).ok_or_else(|| err("bad prefix length"))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_clears_host_bits() {
        let c: Cidr = "10.96.1.7/12".parse().unwrap();
        assert_eq!(c.to_string(), "10.96.0.0/12");
        assert!(c.contains("10.111.255.255".parse().unwrap()));
        assert!(!c.contains("10.112.0.0".parse().unwrap()));
    }

    #[test]
    fn bare_address_is_a_host_route() {
        let c: Cidr = "fd00::1".parse().unwrap();
        assert_eq!(c.prefix_len(), 128);
    }

    #[test]
    fn rejects_bad_input_with_a_reason() {
        assert!("10.0.0.0/33"
            .parse::<Cidr>()
            .unwrap_err()
            .to_string()
            .contains("too long"));
        assert!("nope/8"
            .parse::<Cidr>()
            .unwrap_err()
            .to_string()
            .contains("bad address"));
        assert!("10.0.0.0/x".parse::<Cidr>().is_err());
    }

    #[test]
    fn zero_prefix_matches_everything() {
        let c: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(c.contains("203.0.113.9".parse().unwrap()));
    }
}
