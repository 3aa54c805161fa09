//! What a user may ask for: a request checked and turned into a bridge's
//! options, the cgroup it may bridge, and its state directory.
use std::{
    io,
    path::{Path, PathBuf},
};

use tpbpf_bridge_api::{
    limits::{MAX_DNS_SUFFIXES, MAX_NAMESPACES, MAX_RANGES},
    user_dir, UpRequest, RUN_DIR,
};
use tpbpf_sys::{seqpacket::Peer, Cidr, CidrParseError};

use crate::{BridgeOptions, DnsConfig};

/// A name of `A-Za-z0-9._-`, 1 to `max` bytes.
fn name_ok(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Ranges no user's bridge may take, and what they are: another account's
/// (or root's) traffic to them would be taken, or tpbpf's own.
const RESERVED: &[(&str, &str)] = &[
    ("0.0.0.0/8", "this host's network"),
    (
        "127.0.0.0/8",
        "loopback, where tpbpf's listeners and UDP slots are",
    ),
    ("169.254.0.0/16", "link-local, where cloud metadata is"),
    ("224.0.0.0/4", "multicast"),
    ("255.255.255.255/32", "broadcast"),
    ("::/128", "the unspecified address"),
    ("::1/128", "loopback"),
    ("::ffff:0:0/96", "IPv4-mapped addresses"),
    ("fe80::/10", "link-local"),
    ("ff00::/8", "multicast"),
];

/// Why a user may not bridge `range`: it overlaps a reserved range or one
/// of `own`, this machine's addresses.
fn reserved(range: &Cidr, own: &[std::net::IpAddr]) -> Option<String> {
    let overlaps = |r: &Cidr| r.contains(range.addr()) || range.contains(r.addr());
    for (r, what) in RESERVED {
        let r: Cidr = r.parse().expect("a reserved range");
        if overlaps(&r) {
            return Some(format!("{range} overlaps {r} ({what})"));
        }
    }
    own.iter()
        .find(|a| range.contains(**a))
        .map(|a| format!("{range} holds {a}, an address of this machine"))
}

/// This machine's addresses, in tpbpfd's network namespace.
fn own_addresses() -> Vec<std::net::IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|a| a.address)
        .filter_map(|a| {
            if let Some(v4) = a.as_sockaddr_in() {
                Some(std::net::IpAddr::V4(v4.ip()))
            } else {
                a.as_sockaddr_in6().map(|v6| std::net::IpAddr::V6(v6.ip()))
            }
        })
        .collect()
}

/// Checks a request of uid `uid` and turns it into the bridge's options.
pub fn options(request: &UpRequest, uid: u32) -> Result<BridgeOptions, String> {
    let own = if uid == 0 {
        Vec::new()
    } else {
        own_addresses()
    };
    check(request, uid, &own)
}

/// [`options`], with `own` the machine's addresses.
fn check(request: &UpRequest, uid: u32, own: &[std::net::IpAddr]) -> Result<BridgeOptions, String> {
    if !name_ok(&request.instance, 64) || request.instance.starts_with('.') {
        return Err(format!("`{}` is not a bridge name", request.instance));
    }
    if request.cidrs.len() > MAX_RANGES || request.never_proxy.len() > MAX_RANGES {
        return Err(format!(
            "at most {MAX_RANGES} ranges to bridge and {MAX_RANGES} never to"
        ));
    }
    let parse = |list: &[String]| -> Result<Vec<Cidr>, String> {
        list.iter()
            .map(|c| c.parse().map_err(|e: CidrParseError| e.to_string()))
            .collect()
    };
    let dns = match &request.dns {
        None => None,
        Some(d) => {
            if d.suffixes.len() > MAX_DNS_SUFFIXES || d.namespaces.len() > MAX_NAMESPACES {
                return Err(format!(
                    "at most {MAX_DNS_SUFFIXES} DNS suffixes and {MAX_NAMESPACES} namespaces"
                ));
            }
            let names = std::iter::once(&d.cluster_domain)
                .chain(&d.suffixes)
                .chain(&d.namespaces);
            for n in names {
                if !name_ok(n, 253) {
                    return Err(format!("`{n}` is not a DNS name"));
                }
            }
            Some(DnsConfig {
                cluster_domain: d.cluster_domain.clone(),
                suffixes: d.suffixes.clone(),
                namespaces: d.namespaces.clone(),
                mapped: Default::default(),
            })
        }
    };
    let cidrs = parse(&request.cidrs)?;
    if cidrs.is_empty() && dns.is_none() {
        return Err("nothing to bridge: no ranges and no DNS".into());
    }
    if uid != 0 {
        for c in &cidrs {
            if let Some(why) = reserved(c, own) {
                return Err(format!(
                    "{why}: a user's bridge takes cluster ranges only (root may bridge any range)"
                ));
            }
        }
        if let Some(d) = &request.dns {
            for n in std::iter::once(&d.cluster_domain).chain(&d.suffixes) {
                if !n.trim_end_matches('.').contains('.') {
                    return Err(format!(
                        "`{n}` is a top-level domain, not a cluster's: a user's bridge answers only names under a cluster domain of two labels or more (cluster.local)"
                    ));
                }
            }
        }
    }
    let wants_tc = !request.attach_ifaces.is_empty() || !request.attach_netns.is_empty();
    if wants_tc && uid != 0 {
        return Err(
            "the tc path (--attach-iface, --attach-netns) reaches other network namespaces: only root may attach it"
                .into(),
        );
    }
    for n in request.attach_ifaces.iter().chain(&request.attach_netns) {
        if !name_ok(n, 255) {
            return Err(format!("`{n}` is not an interface or namespace name"));
        }
    }
    Ok(BridgeOptions {
        cidrs,
        never_proxy: parse(&request.never_proxy)?,
        dns,
        tc_mark: wants_tc.then_some(crate::policy::DEFAULT_MARK),
        owner_uid: (uid != 0).then_some(uid),
    })
}

/// The cgroup a user may bridge: one below the cgroup v2 mount that the
/// user owns (a delegated subtree, e.g. systemd's `user@UID.service`), or,
/// without one, the whole machine (allowed to members of the group).
pub fn scope_for(peer: &Peer, cgroup: Option<&Path>) -> Result<(std::fs::File, String), String> {
    use std::os::unix::fs::MetadataExt;
    let mount = tpbpf_cgroup::cgroup2_mount().map_err(|e| e.to_string())?;
    let path = match cgroup {
        None => mount.clone(),
        Some(p) => {
            // Root resolves the path: whether it exists is not said to a
            // user who could not see it.
            let canon = p.canonicalize().map_err(|e| {
                if peer.uid == 0 {
                    format!("cgroup {}: {e}", p.display())
                } else {
                    format!("{} is not a cgroup of yours", p.display())
                }
            })?;
            if !canon.starts_with(&mount) {
                return Err(format!(
                    "{} is not a cgroup (not below {})",
                    p.display(),
                    mount.display()
                ));
            }
            canon
        }
    };
    let dir = std::fs::File::open(&path).map_err(|e| format!("opening {}: {e}", path.display()))?;
    let meta = dir.metadata().map_err(|e| e.to_string())?;
    if !meta.is_dir() {
        return Err(format!("{} is not a cgroup", path.display()));
    }
    if path != mount && peer.uid != 0 && meta.uid() != peer.uid {
        return Err(format!(
            "cgroup {} belongs to uid {}, not to you (uid {}): bridge a cgroup of your own, or the whole machine",
            path.display(),
            meta.uid(),
            peer.uid
        ));
    }
    Ok((dir, path.display().to_string()))
}

/// `/run/tpbpf/uid-UID`, the user's, 0700: made if missing; refused if it
/// is anything else (a link, another owner).
pub fn prepare_user_dir(peer: &Peer) -> io::Result<PathBuf> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = if peer.uid == 0 {
        PathBuf::from(RUN_DIR)
    } else {
        user_dir(peer.uid)
    };
    std::fs::create_dir_all(RUN_DIR)?;
    match std::fs::create_dir(&dir) {
        Ok(()) => {
            std::os::unix::fs::chown(&dir, Some(peer.uid), Some(peer.gid))?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(&dir)?;
    if !meta.is_dir() || meta.uid() != peer.uid {
        return Err(io::Error::other(format!(
            "{} is not a directory of uid {}",
            dir.display(),
            peer.uid
        )));
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use tpbpf_bridge_api::DnsRequest;

    use super::*;

    /// [`check`] on a machine with no address in the test's ranges.
    fn check_(request: &UpRequest, uid: u32) -> Result<BridgeOptions, String> {
        check(request, uid, &[])
    }

    fn request() -> UpRequest {
        UpRequest {
            instance: "default".into(),
            cidrs: vec!["10.96.0.0/12".into(), "fd00::/108".into()],
            never_proxy: vec!["10.96.0.1/32".into()],
            dns: Some(DnsRequest {
                cluster_domain: "cluster.local".into(),
                suffixes: vec![],
                namespaces: vec!["default".into(), "cache".into()],
            }),
            ..UpRequest::default()
        }
    }

    #[test]
    fn a_plain_request_becomes_its_options() {
        let o = check_(&request(), 1000).unwrap();
        assert_eq!(o.cidrs.len(), 2);
        assert_eq!(o.never_proxy[0].to_string(), "10.96.0.1/32");
        let dns = o.dns.unwrap();
        assert_eq!(dns.cluster_domain, "cluster.local");
        assert_eq!(dns.namespaces, ["default", "cache"]);
        assert_eq!(o.tc_mark, None);
    }

    #[test]
    fn names_that_are_paths_or_not_names_are_refused() {
        for bad in ["", "../x", "a/b", ".hidden", "a b", &"x".repeat(65)] {
            let r = UpRequest {
                instance: bad.into(),
                ..request()
            };
            assert!(check_(&r, 1000).is_err(), "instance `{bad}` accepted");
        }
        let mut r = request();
        r.dns.as_mut().unwrap().namespaces.push("a;rm".into());
        assert!(check_(&r, 1000).unwrap_err().contains("not a DNS name"));
    }

    #[test]
    fn ranges_are_parsed_and_bounded() {
        let r = UpRequest {
            cidrs: vec!["10.96.0.0/33".into()],
            ..request()
        };
        assert!(check_(&r, 1000).unwrap_err().contains("not an IP range"));
        let r = UpRequest {
            cidrs: vec!["10.0.0.0/8".into(); MAX_RANGES + 1],
            ..request()
        };
        assert!(check_(&r, 1000).unwrap_err().contains("at most"));
        let mut r = request();
        r.dns.as_mut().unwrap().namespaces = vec!["ns".into(); MAX_NAMESPACES + 1];
        assert!(check_(&r, 1000).unwrap_err().contains("at most"));
    }

    #[test]
    fn nothing_to_bridge_is_refused() {
        let r = UpRequest {
            cidrs: vec![],
            dns: None,
            ..request()
        };
        assert!(check_(&r, 1000).unwrap_err().contains("nothing to bridge"));
    }

    #[test]
    fn a_user_may_not_take_loopback_the_slots_link_local_or_a_top_level_domain() {
        for bad in [
            "0.0.0.0/1",
            "127.0.0.0/8",
            "127.100.0.0/16",
            "127.0.0.1/32",
            "169.254.169.254/32",
            "224.0.0.0/8",
            "::1/128",
            "fe80::/64",
            "::/0",
        ] {
            let r = UpRequest {
                cidrs: vec![bad.into()],
                ..request()
            };
            let e = check_(&r, 1000).unwrap_err();
            assert!(e.contains("cluster ranges only"), "{bad}: {e}");
            assert!(check_(&r, 0).is_ok(), "root may bridge {bad}");
        }
        let own: Vec<std::net::IpAddr> = vec!["192.0.2.7".parse().unwrap()];
        let r: Cidr = "192.0.2.0/24".parse().unwrap();
        assert!(reserved(&r, &own)
            .unwrap()
            .contains("an address of this machine"));
        assert!(reserved(&"10.96.0.0/12".parse().unwrap(), &own).is_none());
        for domain in ["com", "local", "org."] {
            let mut r = request();
            r.dns.as_mut().unwrap().cluster_domain = domain.into();
            let e = check_(&r, 1000).unwrap_err();
            assert!(e.contains("top-level domain"), "{domain}: {e}");
            assert!(check_(&r, 0).is_ok());
        }
        let mut r = request();
        r.dns.as_mut().unwrap().suffixes = vec!["com".into()];
        assert!(check_(&r, 1000).is_err());
    }

    #[test]
    fn a_user_s_bridge_carries_only_that_user_s_sockets() {
        assert_eq!(check_(&request(), 1000).unwrap().owner_uid, Some(1000));
        assert_eq!(check_(&request(), 0).unwrap().owner_uid, None);
    }

    #[test]
    fn only_root_attaches_the_tc_path() {
        let r = UpRequest {
            attach_ifaces: vec!["veth0".into()],
            ..request()
        };
        assert!(check_(&r, 1000).unwrap_err().contains("only root"));
        let r2 = UpRequest {
            attach_netns: vec!["box".into()],
            ..request()
        };
        assert!(check_(&r2, 1000).is_err());
        assert!(check_(&r, 0).unwrap().tc_mark.is_some());
        let r3 = UpRequest {
            attach_ifaces: vec!["../../etc".into()],
            ..request()
        };
        assert!(check_(&r3, 0).is_err());
    }
}
