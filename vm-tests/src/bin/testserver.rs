//! A test server for the privileged tests, run inside a "cluster" network
//! namespace. Prints one JSON line per request it serves, so a test can
//! check what reached the server.
//!
//! Usage: tpbpf-testserver --netns NAME http ADDR... | udp-echo ADDR... | bulk ADDR
//! - http: answers every request with `served-by <ADDR> <tag>` (env TAG);
//! - udp-echo: echoes each datagram, prefixed with `echo:`; one that starts
//!   with `later` is answered once more a second after, prefixed `late:`
//!   (a reply that comes after its client may have gone);
//! - bulk: sends 64 KiB chunks slowly (about 2 MiB/s) until the peer closes;
//! - sink: accepts and closes at once (for connect benchmarks).
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, UdpSocket},
    thread,
    time::Duration,
};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (netns, rest) = match args.first().map(String::as_str) {
        Some("--netns") => (args.get(1).cloned(), &args[2..]),
        _ => (None, &args[..]),
    };
    if let Some(ns) = netns {
        tpbpf_vm_tests::enter_netns(&ns)
            .unwrap_or_else(|e| die(&format!("entering netns {ns}: {e}")));
    }
    let Some((mode, addrs)) = rest.split_first() else {
        die("usage: tpbpf-testserver [--netns NAME] http|udp-echo|bulk ADDR...")
    };
    let addrs: Vec<SocketAddr> = addrs
        .iter()
        .map(|a| {
            a.parse()
                .unwrap_or_else(|_| die(&format!("bad address {a}")))
        })
        .collect();
    let tag = std::env::var("TAG").unwrap_or_default();
    let mut threads = Vec::new();
    for addr in addrs {
        let (mode, tag) = (mode.clone(), tag.clone());
        match mode.as_str() {
            "sink" => {
                let l = listen(addr);
                threads.push(thread::spawn(move || {
                    for c in l.incoming() {
                        drop(c);
                    }
                }));
            }
            "http" | "bulk" | "http11" | "upload" => {
                let l =
                    TcpListener::bind(addr).unwrap_or_else(|e| die(&format!("bind {addr}: {e}")));
                threads.push(thread::spawn(move || serve_tcp(l, addr, &mode, &tag)));
            }
            "udp-echo" => {
                let s = UdpSocket::bind(addr).unwrap_or_else(|e| die(&format!("bind {addr}: {e}")));
                threads.push(thread::spawn(move || serve_udp(s)));
            }
            _ => die("mode must be http, http11, upload, udp-echo, bulk or sink"),
        }
    }
    println!("{}", serde_json::json!({"event": "ready"}));
    for t in threads {
        let _ = t.join();
    }
}

fn serve_tcp(l: TcpListener, addr: SocketAddr, mode: &str, tag: &str) {
    for conn in l.incoming().flatten() {
        let (mode, tag) = (mode.to_string(), tag.to_string());
        thread::spawn(move || {
            let peer = conn.peer_addr().map(|p| p.to_string()).unwrap_or_default();
            if mode == "http11" {
                serve_keepalive(conn, addr, &peer, &tag);
                return;
            }
            if mode == "upload" {
                serve_upload(conn);
                return;
            }
            let mut reader = BufReader::new(conn);
            let mut request_line = String::new();
            let _ = reader.read_line(&mut request_line);
            loop {
                let mut line = String::new();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) if line == "\r\n" || line == "\n" => break,
                    Ok(_) => {}
                }
            }
            println!(
                "{}",
                serde_json::json!({"event": "request", "addr": addr.to_string(), "peer": peer, "request": request_line.trim()})
            );
            let mut conn = reader.into_inner();
            if mode == "bulk" {
                let _ = conn.write_all(b"HTTP/1.0 200 OK\r\n\r\n");
                let chunk = vec![b'x'; 65536];
                for _ in 0..2000 {
                    if conn.write_all(&chunk).is_err() {
                        return;
                    }
                    thread::sleep(Duration::from_millis(30));
                }
                return;
            }
            let body = format!("served-by {addr} {tag}\n");
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let mut rest = Vec::new();
            let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
            let _ = conn.read_to_end(&mut rest);
        });
    }
}

/// HTTP/1.1 with keep-alive: every request on the connection is answered
/// (requests without bodies).
fn serve_keepalive(conn: std::net::TcpStream, addr: SocketAddr, peer: &str, tag: &str) {
    let mut writer = match conn.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(conn);
    loop {
        let mut request_line = String::new();
        match reader.read_line(&mut request_line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) if line == "\r\n" || line == "\n" => break,
                Ok(_) => {}
            }
        }
        println!(
            "{}",
            serde_json::json!({"event": "request", "addr": addr.to_string(), "peer": peer, "request": request_line.trim()})
        );
        let body = format!("served-by {addr} {tag}\n");
        if write!(
            writer,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .is_err()
        {
            return;
        }
    }
}

/// One request with a Content-Length body, read and counted: answers
/// `received N`.
fn serve_upload(conn: std::net::TcpStream) {
    let mut writer = match conn.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(conn);
    let mut length: u64 = 0;
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if line == "\r\n" => break,
            Ok(_) => {
                if let Some((k, v)) = line.split_once(':') {
                    if k.eq_ignore_ascii_case("content-length") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                }
            }
        }
    }
    let got = std::io::copy(&mut reader.by_ref().take(length), &mut std::io::sink()).unwrap_or(0);
    let body = format!("received {got}\n");
    let _ = write!(
        writer,
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    println!("{}", serde_json::json!({"event": "upload", "bytes": got}));
}

fn serve_udp(s: UdpSocket) {
    let s = std::sync::Arc::new(s);
    let mut buf = [0u8; 2048];
    while let Ok((n, from)) = s.recv_from(&mut buf) {
        let mut out = b"echo:".to_vec();
        out.extend_from_slice(&buf[..n]);
        let _ = s.send_to(&out, from);
        if buf[..n].starts_with(b"later") {
            let (s, mut late) = (s.clone(), b"late:".to_vec());
            late.extend_from_slice(&buf[..n]);
            // The late answer's delay is what it stands for, not a wait.
            thread::spawn(move || {
                thread::sleep(Duration::from_secs(1));
                let sent = s.send_to(&late, from).is_ok();
                println!(
                    "{}",
                    serde_json::json!({"event": "late", "peer": from.to_string(), "sent": sent})
                );
            });
        }
        println!(
            "{}",
            serde_json::json!({"event": "datagram", "peer": from.to_string()})
        );
    }
}

/// Binds with a deep accept queue: a burst of connects on a busy machine
/// must not overflow it (a dropped SYN costs the client a second).
fn listen(addr: SocketAddr) -> TcpListener {
    use std::os::fd::AsRawFd;
    let l = TcpListener::bind(addr).unwrap_or_else(|e| die(&format!("bind {addr}: {e}")));
    // SAFETY: listen() again on a listening socket only resizes its queue.
    unsafe { libc::listen(l.as_raw_fd(), 4096) };
    l
}

fn die(msg: &str) -> ! {
    eprintln!("tpbpf-testserver: {msg}");
    std::process::exit(2);
}
