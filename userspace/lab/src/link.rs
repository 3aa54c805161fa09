//! A WAN between the developer machine and the lab's cluster
//! (`tpbpf lab up --link DELAY[,RATE[,LOSS]]`): delay, rate and loss on
//! every frame that crosses, both ways, as a Wi-Fi, a VPN or the internet
//! would put them. This kernel has no `sch_netem`, so the lab runs the link
//! itself: the developer's veth ends in a namespace `NAME-wan` (`w0`), the
//! fabric's in the same namespace (`w1`), and a process of the lab moves
//! frames between the two (AF_PACKET sockets, one thread each way to read
//! and one to write when each frame is due). Offloads are off on the ends
//! that feed it, so every frame is at most the MTU and loss takes single
//! segments, as on a real path.
//!
//! Model, per direction: a frame dropped with probability LOSS; otherwise
//! it waits for the link (RATE's serialization, FIFO; tail drop past
//! [`QUEUE_LIMIT`] of queueing, as a router buffer), then DELAY, then is
//! delivered.
use std::{
    collections::VecDeque,
    fmt,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    str::FromStr,
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

/// Queueing past this is dropped (a router's buffer, in time at RATE).
pub const QUEUE_LIMIT: Duration = Duration::from_millis(100);
/// Frames (and bytes) held per direction at most, whatever the rate.
const MAX_FRAMES: usize = 200_000;
const MAX_BYTES: usize = 256 << 20;

/// `DELAY[,RATE[,LOSS]]`: `20ms`, `20ms,1gbit`, `20ms,1gbit,1%`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkSpec {
    /// One way.
    pub delay: Duration,
    /// Bits per second; `None`: as fast as the link process goes.
    pub rate: Option<u64>,
    /// Per frame, each way, 0..1.
    pub loss: f64,
}

impl FromStr for LinkSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            |what: &str| format!("--link `{s}`: {what} (DELAY[,RATE[,LOSS]], e.g. 20ms,1gbit,1%)");
        let mut parts = s.split(',').map(str::trim);
        let delay = parts.next().unwrap_or("");
        let delay = if let Some(ms) = delay.strip_suffix("ms") {
            ms.parse::<f64>()
                .ok()
                .filter(|v| (0.0..=10_000.0).contains(v))
                .map(|v| Duration::from_secs_f64(v / 1000.0))
        } else if let Some(us) = delay.strip_suffix("us") {
            us.parse::<f64>()
                .ok()
                .filter(|v| (0.0..=10_000_000.0).contains(v))
                .map(|v| Duration::from_secs_f64(v / 1e6))
        } else {
            None
        }
        .ok_or_else(|| bad("the delay is a number of ms or us, at most 10 s"))?;
        let rate = match parts.next().filter(|r| !r.is_empty()) {
            None => None,
            Some(r) => {
                let lower = r.to_ascii_lowercase();
                let (num, mult) = [("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3)]
                    .iter()
                    .find_map(|(u, m)| lower.strip_suffix(u).map(|n| (n.to_string(), *m)))
                    .ok_or_else(|| bad("the rate is in kbit, mbit or gbit"))?;
                let v = num
                    .parse::<f64>()
                    .ok()
                    .filter(|v| *v > 0.0 && v * mult >= 64_000.0 && v * mult <= 100e9)
                    .ok_or_else(|| bad("the rate is between 64kbit and 100gbit"))?;
                Some((v * mult) as u64)
            }
        };
        let loss = match parts.next().filter(|l| !l.is_empty()) {
            None => 0.0,
            Some(l) => l
                .strip_suffix('%')
                .and_then(|p| p.parse::<f64>().ok())
                .filter(|p| (0.0..=50.0).contains(p))
                .map(|p| p / 100.0)
                .ok_or_else(|| bad("the loss is a percentage from 0% to 50%"))?,
        };
        if parts.next().is_some() {
            return Err(bad("at most three parts"));
        }
        Ok(Self { delay, rate, loss })
    }
}

impl fmt::Display for LinkSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}ms", self.delay.as_secs_f64() * 1000.0)?;
        match self.rate {
            Some(r) if r % 1_000_000_000 == 0 => write!(f, ",{}gbit", r / 1_000_000_000)?,
            Some(r) if r % 1_000_000 == 0 => write!(f, ",{}mbit", r / 1_000_000)?,
            Some(r) => write!(f, ",{}kbit", r / 1000)?,
            None if self.loss > 0.0 => write!(f, ",")?,
            None => {}
        }
        if self.loss > 0.0 {
            write!(f, ",{}%", self.loss * 100.0)?;
        }
        Ok(())
    }
}

/// Turns segmentation and receive offloads off on `iface` (in this
/// network namespace), so what it hands the link is at most the MTU.
pub fn disable_offloads(iface: &str) -> std::io::Result<()> {
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: *mut libc::c_void,
        _pad: [u8; 16],
    }
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    // ETHTOOL_STXCSUM (a frame read off a packet socket would carry a
    // checksum left for the hardware), ETHTOOL_STSO, ETHTOOL_SGSO,
    // ETHTOOL_SGRO.
    const SETS: [u32; 4] = [0x17, 0x1f, 0x24, 0x2c];
    if iface.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::other(format!(
            "interface name {iface} too long"
        )));
    }
    // SAFETY: a plain socket for the ioctl, owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new socket nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    for cmd in SETS {
        let mut value = EthtoolValue { cmd, data: 0 };
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: (&mut value as *mut EthtoolValue).cast(),
            _pad: [0; 16],
        };
        req.name[..iface.len()].copy_from_slice(iface.as_bytes());
        // SAFETY: req and value outlive the call; SIOCETHTOOL reads them.
        if unsafe { libc::ioctl(fd.as_raw_fd(), SIOCETHTOOL, &mut req) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// An AF_PACKET socket on `iface`, taking every frame that arrives there
/// (not those it sends).
fn packet_socket(iface: &str) -> std::io::Result<OwnedFd> {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket creation, owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(proto),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new socket nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(iface).map_err(std::io::Error::other)?;
    // SAFETY: name is a valid C string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a zeroed sockaddr_ll is valid; the fields are set below.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = index as i32;
    let setopt = |level, opt, v: libc::c_int| {
        // SAFETY: v lives for the call.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                level,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        }
    };
    // PACKET_IGNORE_OUTGOING: what this socket sends is not read back.
    const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
    let _ = setopt(libc::SOL_PACKET, PACKET_IGNORE_OUTGOING, 1);
    let _ = setopt(libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, 32 << 20);
    let _ = setopt(libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, 32 << 20);
    // SAFETY: addr is a valid sockaddr_ll of the size given.
    let bound = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if bound != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// Frames on their way one direction, each with when it is delivered.
#[derive(Default)]
struct Queue {
    frames: VecDeque<(Instant, Vec<u8>)>,
    bytes: usize,
}

/// What one direction did (for the link's log line).
#[derive(Default)]
struct Counts {
    passed: u64,
    lost: u64,
    overflowed: u64,
}

/// Moves frames from `from` to `to` as `spec` says, until either socket
/// fails. Two threads: one reads and schedules, one writes when due.
fn direction(spec: LinkSpec, from: OwnedFd, to: OwnedFd, seed: u64) -> std::thread::JoinHandle<()> {
    let queue = Arc::new((Mutex::new(Queue::default()), Condvar::new()));
    let q = queue.clone();
    std::thread::spawn(move || {
        loop {
            let mut guard = q.0.lock().unwrap_or_else(|e| e.into_inner());
            let frame = loop {
                match guard.frames.front() {
                    None => guard = q.1.wait(guard).unwrap_or_else(|e| e.into_inner()),
                    Some((due, _)) => {
                        let now = Instant::now();
                        if *due <= now {
                            let (_, f) = guard.frames.pop_front().expect("a front");
                            guard.bytes -= f.len();
                            break f;
                        }
                        let wait = *due - now;
                        guard =
                            q.1.wait_timeout(guard, wait)
                                .unwrap_or_else(|e| e.into_inner())
                                .0;
                    }
                }
            };
            drop(guard);
            // SAFETY: frame is a valid buffer of its length.
            let sent = unsafe { libc::send(to.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            if sent < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::ENOBUFS) {
                    eprintln!("tpbpf lab link: sending: {e}");
                }
            }
        }
    });
    std::thread::spawn(move || {
        let mut rng = seed | 1;
        let mut link_free = Instant::now();
        let mut counts = Counts::default();
        let mut buf = vec![0u8; 65536];
        let mut last_report = Instant::now();
        loop {
            // SAFETY: buf is a valid buffer of its length.
            let n = unsafe { libc::recv(from.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                eprintln!("tpbpf lab link: reading: {e}");
                return;
            }
            let len = n as usize;
            let now = Instant::now();
            // xorshift64: loss needs no better randomness.
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            if spec.loss > 0.0 && (rng >> 11) as f64 / (1u64 << 53) as f64 <= spec.loss {
                counts.lost += 1;
                continue;
            }
            let start = link_free.max(now);
            if start.duration_since(now) > QUEUE_LIMIT {
                counts.overflowed += 1;
                continue;
            }
            let tx = spec.rate.map_or(Duration::ZERO, |r| {
                // The frame on the wire: preamble, gap and FCS with it.
                Duration::from_secs_f64((len + 24) as f64 * 8.0 / r as f64)
            });
            link_free = start + tx;
            let due = link_free + spec.delay;
            let mut guard = queue.0.lock().unwrap_or_else(|e| e.into_inner());
            if guard.frames.len() >= MAX_FRAMES || guard.bytes + len > MAX_BYTES {
                counts.overflowed += 1;
                continue;
            }
            guard.bytes += len;
            guard.frames.push_back((due, buf[..len].to_vec()));
            drop(guard);
            queue.1.notify_one();
            counts.passed += 1;
            if last_report.elapsed() > Duration::from_secs(60) {
                eprintln!(
                    "tpbpf lab link: {} frames passed, {} lost, {} over the queue",
                    counts.passed, counts.lost, counts.overflowed
                );
                last_report = Instant::now();
            }
        }
    })
}

/// Runs the link between interfaces `a` and `b` of this network namespace
/// until killed (the lab stops it by its pid file).
pub fn run(spec: LinkSpec, a: &str, b: &str) -> std::io::Result<()> {
    let open = |i: &str| {
        packet_socket(i).map_err(|e| std::io::Error::new(e.kind(), format!("interface {i}: {e}")))
    };
    let (a_in, b_in) = (open(a)?, open(b)?);
    let (a_out, b_out) = (a_in.try_clone()?, b_in.try_clone()?);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(7, |d| d.as_nanos() as u64);
    eprintln!("tpbpf lab link: {a} <-> {b}: {spec}");
    let one = direction(spec, a_in, b_out, seed);
    let other = direction(spec, b_in, a_out, seed.rotate_left(17));
    let _ = one.join();
    let _ = other.join();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_is_written_as_delay_rate_and_loss() {
        let l: LinkSpec = "20ms,1gbit,1%".parse().unwrap();
        assert_eq!(
            l,
            LinkSpec {
                delay: Duration::from_millis(20),
                rate: Some(1_000_000_000),
                loss: 0.01
            }
        );
        assert_eq!(l.to_string(), "20ms,1gbit,1%");
        let l: LinkSpec = "100ms".parse().unwrap();
        assert_eq!((l.rate, l.loss), (None, 0.0));
        assert_eq!(l.to_string(), "100ms");
        let l: LinkSpec = "500us,100mbit".parse().unwrap();
        assert_eq!(l.delay, Duration::from_micros(500));
        assert_eq!(l.rate, Some(100_000_000));
        let l: LinkSpec = "10ms,,3%".parse().unwrap();
        assert_eq!((l.rate, l.loss), (None, 0.03));
        assert_eq!(l.to_string().parse::<LinkSpec>().unwrap(), l);
        for bad in [
            "",
            "20",
            "20s",
            "20ms,1gbps",
            "20ms,1gbit,1",
            "20ms,1gbit,60%",
            "-1ms",
            "20ms,1kbit",
            "20ms,1gbit,1%,x",
        ] {
            let e = bad.parse::<LinkSpec>().unwrap_err();
            assert!(e.contains("DELAY[,RATE[,LOSS]]"), "{bad}: {e}");
        }
    }
}
