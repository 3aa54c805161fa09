//! A test client for the privileged tests: joins a network namespace and a
//! cgroup (before anything else runs), then opens TCP connections and prints
//! one JSON line per connection with what the application saw:
//! the peer address from getpeername(), the response, or the error.
//!
//! Usage: tpbpf-testclient [--netns NAME] [--cgroup DIR] [--udp|--udp-connected] ADDR [COUNT]
//! With `--udp`, sends one datagram with sendto() and reports the source
//! address recvfrom() gives the reply; with `--udp-connected`, connects
//! first and reports getpeername().
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
