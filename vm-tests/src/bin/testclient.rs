//! A test client for the privileged tests: joins a network namespace and a
//! cgroup (before anything else runs), then opens TCP connections and prints
//! one JSON line per connection with what the application saw:
//! the peer address from getpeername(), the response, or the error.
//!
//! Usage: tpbpf-testclient [--netns NAME] [--cgroup DIR] [--udp|--udp-connected] ADDR [COUNT]
//! With `--udp`, sends one datagram with sendto() and reports the source
//! address recvfrom() gives the reply; with `--udp-connected`, connects
//! first and reports getpeername().
//! With `--udp-wrap N ADDR`: a connected flow to ADDR, then datagrams to N
//! other destinations from another socket, then the first flow again
//! (the UDP slot counter's wrap).
//! With `--udp-rebind ADDR` (and `--udp` or `--udp-connected`): a flow's
//! socket closes while the cluster still owes it a late reply, and another
//! socket binds its port at once; reports what that one receives.
use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let mut take = |flag: &str| -> Option<String> {
        let i = args.iter().position(|a| a == flag)?;
        let v = args.get(i + 1).cloned();
        args.drain(i..(i + 2).min(args.len()));
        v
    };
    let netns = take("--netns");
    let cgroup = take("--cgroup");
    let bench_n = take("--bench");
    let wrap_n = take("--udp-wrap");
    let spoof = take("--udp-spoof");
    let rebind = take("--udp-rebind");
    let mode = if let Some(i) = args
        .iter()
        .position(|a| a == "--udp" || a == "--udp-connected")
    {
        args.remove(i)
    } else {
        "tcp".to_string()
    };
    if let Some(ns) = netns {
        tpbpf_vm_tests::enter_netns(&ns)
            .unwrap_or_else(|e| die(&format!("entering netns {ns}: {e}")));
    }
    if let Some(dir) = cgroup {
        std::fs::write(
            format!("{dir}/cgroup.procs"),
            std::process::id().to_string(),
        )
        .unwrap_or_else(|e| die(&format!("joining cgroup {dir}: {e}")));
    }
    if let Some(addr) = spoof {
        udp_spoof(
            addr.parse()
                .unwrap_or_else(|_| die("--udp-spoof ADDR: ADDR must be an address")),
        );
        return;
    }
    if let Some(addr) = rebind {
        let addr = addr
            .parse()
            .unwrap_or_else(|_| die("--udp-rebind ADDR: ADDR must be an address"));
        println!("{}", udp_rebind(addr, mode == "--udp-connected"));
        return;
    }
    if let Some(n) = wrap_n {
        let addr: SocketAddr = args
            .first()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| die("--udp-wrap N ADDR"));
        udp_wrap(
            addr,
            n.parse()
                .unwrap_or_else(|_| die("--udp-wrap N: N must be a number")),
        );
        return;
    }
    if let Some(n) = bench_n {
        let addr: SocketAddr = args
            .first()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| die("--bench N ADDR"));
        bench(
            addr,
            n.parse()
                .unwrap_or_else(|_| die("--bench N: N must be a number")),
        );
        return;
    }
    let addr: SocketAddr = args
        .first()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| {
            die("usage: tpbpf-testclient [--netns NAME] [--cgroup DIR] ADDR [COUNT]")
        });
    let count: usize = args.get(1).and_then(|c| c.parse().ok()).unwrap_or(1);
    let threads: Vec<_> = (0..count)
        .map(|_| {
            let mode = mode.clone();
            std::thread::spawn(move || match mode.as_str() {
                "--udp" => udp(addr, false),
                "--udp-connected" => udp(addr, true),
                _ => connect(addr),
            })
        })
        .collect();
    for t in threads {
        let line = t
            .join()
            .unwrap_or_else(|_| serde_json::json!({"ok": false, "error": "thread panicked"}));
        println!("{line}");
    }
}

fn connect(addr: SocketAddr) -> serde_json::Value {
    let start = Instant::now();
    let mut stream = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(s) => s,
        Err(e) => {
            return serde_json::json!({
                "ok": false,
                "error": e.to_string(),
                "errno": e.raw_os_error(),
                "elapsed_ms": start.elapsed().as_millis() as u64,
            })
        }
    };
    let peer = stream
        .peer_addr()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let local = stream
        .local_addr()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut response = String::new();
    let result = stream
        .write_all(format!("GET / HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .and_then(|()| stream.read_to_string(&mut response));
    serde_json::json!({
        "ok": result.is_ok(),
        "error": result.err().map(|e| e.to_string()),
        "peer": peer,
        "local": local,
        "response": response,
        "elapsed_ms": start.elapsed().as_millis() as u64,
    })
}

fn udp(addr: SocketAddr, connected: bool) -> serde_json::Value {
    let start = Instant::now();
    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let result = (|| -> std::io::Result<serde_json::Value> {
        let s = std::net::UdpSocket::bind(bind)?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut buf = [0u8; 2048];
        if connected {
            s.connect(addr)?;
            s.send(b"ping")?;
            let n = s.recv(&mut buf)?;
            Ok(serde_json::json!({
                "ok": true,
                "peer": s.peer_addr()?.to_string(),
                "response": String::from_utf8_lossy(&buf[..n]),
            }))
        } else {
            s.send_to(b"ping", addr)?;
            let (n, from) = s.recv_from(&mut buf)?;
            Ok(serde_json::json!({
                "ok": true,
                "from": from.to_string(),
                "response": String::from_utf8_lossy(&buf[..n]),
            }))
        }
    })();
    match result {
        Ok(mut v) => {
            v["elapsed_ms"] = (start.elapsed().as_millis() as u64).into();
            v
        }
        Err(e) => {
            serde_json::json!({"ok": false, "error": e.to_string(), "errno": e.raw_os_error(), "elapsed_ms": start.elapsed().as_millis() as u64})
        }
    }
}

/// N times connect() + close(), one after the other; prints the mean cost.
/// The close is abortive (SO_LINGER 0): no TIME_WAIT, so loopback port
/// reuse (tcp_tw_reuse) never meets a lingering server socket and stalls a
/// SYN for a second.
fn bench(addr: SocketAddr, n: u32) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    let start = Instant::now();
    let mut failed = 0u32;
    for _ in 0..n {
        match TcpStream::connect(addr) {
            Ok(s) => {
                // SAFETY: a valid socket and a linger struct of the size passed.
                unsafe {
                    libc::setsockopt(
                        s.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_LINGER,
                        (&linger as *const libc::linger).cast(),
                        std::mem::size_of::<libc::linger>() as libc::socklen_t,
                    );
                }
                drop(s)
            }
            Err(_) => failed += 1,
        }
    }
    let elapsed = start.elapsed();
    println!(
        "{}",
        serde_json::json!({"ns_per_op": elapsed.as_nanos() as u64 / u64::from(n.max(1)), "n": n, "failed": failed})
    );
}

fn die(msg: &str) -> ! {
    eprintln!("tpbpf-testclient: {msg}");
    std::process::exit(2);
}

/// A connected UDP flow to `addr` that stays in use while `n` other
/// destinations (10.96.128.0/17, every port from 1024) get a datagram each
/// from another socket; then the flow's next datagram and its answer.
fn udp_wrap(addr: SocketAddr, n: u32) {
    let exchange = |s: &std::net::UdpSocket, msg: &str| -> Result<String, String> {
        s.send(msg.as_bytes()).map_err(|e| format!("send: {e}"))?;
        let mut buf = [0u8; 2048];
        let got = s.recv(&mut buf).map_err(|e| format!("recv: {e}"))?;
        Ok(String::from_utf8_lossy(&buf[..got]).into_owned())
    };
    let early = std::net::UdpSocket::bind("0.0.0.0:0").unwrap_or_else(|e| die(&e.to_string()));
    early
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap_or_else(|e| die(&e.to_string()));
    early.connect(addr).unwrap_or_else(|e| die(&e.to_string()));
    let first = exchange(&early, "early-1");
    let other = std::net::UdpSocket::bind("0.0.0.0:0").unwrap_or_else(|e| die(&e.to_string()));
    let (mut sent, mut failed) = (0u32, 0u32);
    for i in 0..n {
        let ip = std::net::Ipv4Addr::from(u32::from_be_bytes([10, 96, 128, 0]) + i / 60_000);
        let port = 1024 + (i % 60_000) as u16;
        match other.send_to(b"x", (ip, port)) {
            Ok(_) => sent += 1,
            Err(_) => failed += 1,
        }
    }
    // The burst may overflow tpbpfd's receive buffer: UDP is lossy, so the
    // flow retries as an application would (a wrong slot fails every time).
    let mut second = Err(String::new());
    for _ in 0..5 {
        second = exchange(&early, "early-2");
        if second.is_ok() {
            break;
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "first": first.unwrap_or_else(|e| e),
            "second": second.unwrap_or_else(|e| e),
            "peer": early.peer_addr().map(|a| a.to_string()).unwrap_or_default(),
            "sent": sent,
            "failed": failed,
        })
    );
}

/// A connected UDP flow to `addr`, then another socket that sends straight
/// to the flow's slot address (read from /proc/net/udp, as any local user
/// can): tpbpfd must not carry it.
fn udp_spoof(addr: SocketAddr) {
    let owner = std::net::UdpSocket::bind("0.0.0.0:0").unwrap_or_else(|e| die(&e.to_string()));
    owner.connect(addr).unwrap_or_else(|e| die(&e.to_string()));
    owner
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap_or_else(|e| die(&e.to_string()));
    let mut buf = [0u8; 2048];
    owner.send(b"mine").unwrap_or_else(|e| die(&e.to_string()));
    let mine = owner
        .recv(&mut buf)
        .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
        .unwrap_or_else(|e| e.to_string());
    // The kernel's own view of where the flow's socket sends: the slot.
    let port = owner.local_addr().map(|a| a.port()).unwrap_or(0);
    let table = std::fs::read_to_string("/proc/net/udp").unwrap_or_default();
    let slot = table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let local_port = u16::from_str_radix(f.get(1)?.split(':').nth(1)?, 16).ok()?;
        if local_port != port {
            return None;
        }
        let (ip, p) = f.get(2)?.split_once(':')?;
        let ip = u32::from_str_radix(ip, 16).ok()?;
        let ip = std::net::Ipv4Addr::from(ip.to_le_bytes());
        Some(SocketAddr::from((ip, u16::from_str_radix(p, 16).ok()?)))
    });
    let Some(slot) = slot else {
        die("the flow's socket is not in /proc/net/udp")
    };
    let intruder = std::net::UdpSocket::bind("0.0.0.0:0").unwrap_or_else(|e| die(&e.to_string()));
    intruder
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap_or_else(|e| die(&e.to_string()));
    let _ = intruder.send_to(b"spoof", slot);
    let theirs = intruder
        .recv_from(&mut buf)
        .map(|(n, _)| String::from_utf8_lossy(&buf[..n]).into_owned())
        .unwrap_or_else(|e| format!("no answer: {e}"));
    println!(
        "{}",
        serde_json::json!({"slot": slot.to_string(), "owner": mine, "intruder": theirs})
    );
}

/// A flow to `addr` (connected or not) asks for a late answer (`later`),
/// takes the first one and closes; another socket binds the same port at
/// once, sends to the proxy address the old flow used (when it can tell
/// it), and reports everything it receives for 3 s.
fn udp_rebind(addr: SocketAddr, connected: bool) -> serde_json::Value {
    let any: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let fail = |what: &str, e: std::io::Error| serde_json::json!({"ok": false, "error": format!("{what}: {e}")});
    let owner = match std::net::UdpSocket::bind(any) {
        Ok(s) => s,
        Err(e) => return fail("bind", e),
    };
    let _ = owner.set_read_timeout(Some(Duration::from_secs(3)));
    let sent = if connected {
        owner.connect(addr).and_then(|()| owner.send(b"later"))
    } else {
        owner.send_to(b"later", addr)
    };
    if let Err(e) = sent {
        return fail("send", e);
    }
    let mut buf = [0u8; 2048];
    let first = match owner.recv(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(e) => return fail("first answer", e),
    };
    let port = owner.local_addr().map(|a| a.port()).unwrap_or(0);
    // The kernel's own view, as any local user reads it: a connected flow's
    // socket sends to its slot; unconnected IPv6 goes to tpbpfd on [::1].
    let proxy = proc_net_udp(addr.is_ipv6())
        .into_iter()
        .find_map(|(local, remote)| {
            if connected {
                (local.port() == port).then_some(remote)
            } else if addr.is_ipv6() && local.ip() == std::net::Ipv6Addr::LOCALHOST {
                Some(local)
            } else {
                None
            }
        });
    drop(owner);
    let bound = SocketAddr::new(any.ip(), port);
    let intruder = match std::net::UdpSocket::bind(bound) {
        Ok(s) => s,
        Err(e) => return fail("binding the closed socket's port", e),
    };
    if let Some(proxy) = proxy {
        let _ = intruder.send_to(b"intrude", proxy);
    }
    let mut got = Vec::new();
    let until = Instant::now() + Duration::from_secs(3);
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        if left.is_zero() || intruder.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match intruder.recv_from(&mut buf) {
            Ok((n, from)) => got.push(format!(
                "{} from {from}",
                String::from_utf8_lossy(&buf[..n])
            )),
            Err(_) => break,
        }
    }
    serde_json::json!({
        "ok": true,
        "first": first,
        "port": port,
        "proxy": proxy.map(|p| p.to_string()),
        "intruder_got": got,
    })
}

/// (local, remote) of every UDP socket of this network namespace, from
/// `/proc/net/udp` or `/proc/net/udp6`.
fn proc_net_udp(v6: bool) -> Vec<(SocketAddr, SocketAddr)> {
    let file = if v6 {
        "/proc/net/udp6"
    } else {
        "/proc/net/udp"
    };
    let table = std::fs::read_to_string(file).unwrap_or_default();
    let addr = |field: &str| -> Option<SocketAddr> {
        let (ip, port) = field.split_once(':')?;
        let port = u16::from_str_radix(port, 16).ok()?;
        // Each 32-bit word is printed in host order.
        let mut octets = Vec::new();
        for i in (0..ip.len()).step_by(8) {
            let word = u32::from_str_radix(ip.get(i..i + 8)?, 16).ok()?;
            octets.extend_from_slice(&word.to_ne_bytes());
        }
        let ip: std::net::IpAddr = match octets.len() {
            4 => <[u8; 4]>::try_from(octets).ok()?.into(),
            16 => <[u8; 16]>::try_from(octets).ok()?.into(),
            _ => return None,
        };
        Some(SocketAddr::new(ip, port))
    };
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((addr(f.get(1)?)?, addr(f.get(2)?)?))
        })
        .collect()
}
