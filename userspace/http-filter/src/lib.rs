//! HTTP/1.1 on an intercepted connection, request by request: a request
//! that matches a developer's filter goes to that developer's stream, the
//! rest to the app, on the same client connection (keep-alive); mirrors
//! get a copy of every request and their answers are dropped.
//!
//! The parser faces the cluster's clients, so it is strict where HTTP is
//! ambiguous (RFC 9112 §6.3): Transfer-Encoding with Content-Length, more
//! than one Content-Length, a Content-Length that is not a plain number, a
//! transfer coding other than `chunked`, a malformed chunk size — each gets
//! `400 Bad Request` and the connection closes, so no request can be read
//! one way here and another way by the app or the developer (request
//! smuggling). Heads are parsed by httparse; bodies are framed here with
//! checked arithmetic and streamed, never buffered whole: the route is
//! chosen from the head alone. Mirror copies go through a bounded queue
//! and are dropped, not waited for, when the mirror falls behind.
use std::{future::Future, io};

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    sync::mpsc,
};
use tpbpf_proto::InterceptMode;
use tracing::debug;

/// The largest request or response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// The longest chunk-size line (with extensions) accepted.
const MAX_CHUNK_LINE: usize = 4096;
/// Chunks of a request a mirror may lag behind before its copy is dropped.
const MIRROR_QUEUE: usize = 64;

fn invalid(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// A connection with a read buffer.
struct Conn<S> {
    s: S,
    buf: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    fn new(s: S) -> Self {
        Conn { s, buf: Vec::new() }
    }

    async fn fill(&mut self) -> io::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.s.read(&mut chunk).await?;
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// The next head (up to and with the blank line); `None` at a clean EOF.
    async fn head(&mut self) -> io::Result<Option<Vec<u8>>> {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                return Ok(Some(self.buf.drain(..end + 4).collect()));
            }
            if self.buf.len() > MAX_HEAD {
                return Err(invalid("HTTP head too large"));
            }
            if self.fill().await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(invalid("connection closed inside an HTTP head"))
                };
            }
        }
    }

    /// Moves `n` bytes to `out`.
    async fn take(&mut self, mut n: u64, out: &mut Out<'_>) -> io::Result<()> {
        while n > 0 {
            if self.buf.is_empty() && self.fill().await? == 0 {
                return Err(invalid("connection closed inside an HTTP body"));
            }
            let k = usize::try_from(n).unwrap_or(usize::MAX).min(self.buf.len());
            out.put(&self.buf[..k]).await?;
            self.buf.drain(..k);
            n -= k as u64;
        }
        Ok(())
    }

    /// The next line, with its CRLF; the caller checks it before passing
    /// it on.
    async fn line(&mut self) -> io::Result<Vec<u8>> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                return Ok(self.buf.drain(..end + 2).collect());
            }
            if self.buf.len() > MAX_CHUNK_LINE {
                return Err(invalid("HTTP chunk line too long"));
            }
            if self.fill().await? == 0 {
                return Err(invalid("connection closed inside a chunked body"));
            }
        }
    }

    /// Moves a body framed as `framing` to `out`.
    async fn body(&mut self, framing: Framing, out: &mut Out<'_>) -> io::Result<()> {
        match framing {
            Framing::None => Ok(()),
            Framing::Length(n) => self.take(n, out).await,
            Framing::Chunked => loop {
                let line = self.line().await?;
                let size = chunk_size(&line).ok_or_else(|| invalid("bad chunk size"))?;
                out.put(&line).await?;
                if size == 0 {
                    // Trailers, up to the blank line.
                    loop {
                        let line = self.line().await?;
                        out.put(&line).await?;
                        if line == b"\r\n" {
                            return Ok(());
                        }
                    }
                }
                self.take(size, out).await?;
                if self.line().await? != b"\r\n" {
                    return Err(invalid("a chunk longer than its size"));
                }
                out.put(b"\r\n").await?;
            },
            Framing::UntilClose => {
                out.put(&std::mem::take(&mut self.buf)).await?;
                let mut chunk = [0u8; 16 * 1024];
                loop {
                    let n = self.s.read(&mut chunk).await?;
                    if n == 0 {
                        return Ok(());
                    }
                    out.put(&chunk[..n]).await?;
                }
            }
        }
    }
}

/// Where body bytes go: written on, and copied to the mirrors (a copy a
/// mirror has no room for ends that mirror's stream for this connection:
/// a mirror misses requests rather than delay the real one).
struct Out<'a> {
    to: &'a mut (dyn AsyncWrite + Unpin + Send),
    mirrors: &'a mut [Option<mpsc::Sender<Vec<u8>>>],
}

impl<'a> Out<'a> {
    fn new(to: &'a mut (dyn AsyncWrite + Unpin + Send)) -> Self {
        Out {
            to,
            mirrors: &mut [],
        }
    }

    async fn put(&mut self, b: &[u8]) -> io::Result<()> {
        mirror(self.mirrors, b);
        self.to.write_all(b).await
    }
}

/// Copies `b` to every mirror with room; a full or gone one is dropped.
fn mirror(mirrors: &mut [Option<mpsc::Sender<Vec<u8>>>], b: &[u8]) {
    for m in mirrors.iter_mut() {
        if let Some(tx) = m {
            if tx.try_send(b.to_vec()).is_err() {
                debug!("a mirror fell behind: its copy of this connection ends");
                *m = None;
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

/// A chunk-size line (`1a;ext=v\r\n`): hex digits only, at most 15 (no
/// size can overflow), optional extensions after `;`.
fn chunk_size(line: &[u8]) -> Option<u64> {
    let line = line.strip_suffix(b"\r\n")?;
    let digits_end = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    let (digits, rest) = line.split_at(digits_end);
    if digits.is_empty() || digits.len() > 15 {
        return None;
    }
    let rest = rest.trim_ascii_start();
    if !rest.is_empty() && rest[0] != b';' {
        return None;
    }
    u64::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
}

/// How a request's body is framed (RFC 9112 §6.3), or why the request is
/// refused: anything two parsers could read two ways.
fn request_framing(req: &Head) -> Result<Framing, &'static str> {
    let te: Vec<&str> = req.all("transfer-encoding").collect();
    let cl: Vec<&str> = req.all("content-length").collect();
    match (te.as_slice(), cl.as_slice()) {
        ([], []) => Ok(Framing::Length(0)),
        ([], [one]) => content_length(one).map(Framing::Length),
        ([], _) => Err("more than one Content-Length"),
        ([_, ..], [_, ..]) => Err("both Transfer-Encoding and Content-Length"),
        ([one], []) if one.trim().eq_ignore_ascii_case("chunked") => Ok(Framing::Chunked),
        ([_], []) => Err("a transfer coding other than chunked"),
        _ => Err("more than one Transfer-Encoding"),
    }
}

/// A Content-Length value: ASCII digits only (no sign, no list), at most
/// 18 of them (no overflow).
fn content_length(v: &str) -> Result<u64, &'static str> {
    let v = v.trim();
    if v.is_empty() || v.len() > 18 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err("an invalid Content-Length");
    }
    v.parse().map_err(|_| "an invalid Content-Length")
}

struct Head {
    method: String,
    path: String,
    status: u16,
    headers: Vec<(String, String)>,
}

impl Head {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn has_token(&self, name: &str, token: &str) -> bool {
        self.header(name)
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    }
    fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn owned(headers: &[httparse::Header<'_>]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect()
}

fn parse_request(raw: &[u8]) -> io::Result<Head> {
    let mut headers = [httparse::EMPTY_HEADER; 100];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(raw) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(invalid("not an HTTP/1.x request")),
    }
    Ok(Head {
        method: req.method.unwrap_or("").to_string(),
        path: req.path.unwrap_or("").to_string(),
        status: 0,
        headers: owned(req.headers),
    })
}

fn parse_response(raw: &[u8]) -> io::Result<Head> {
    let mut headers = [httparse::EMPTY_HEADER; 100];
    let mut res = httparse::Response::new(&mut headers);
    match res.parse(raw) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(invalid("not an HTTP/1.x response")),
    }
    Ok(Head {
        method: String::new(),
        path: String::new(),
        status: res.code.unwrap_or(0),
        headers: owned(res.headers),
    })
}

fn matches(mode: &InterceptMode, req: &Head) -> bool {
    match mode {
        InterceptMode::Header { name, value } => req.header(name) == Some(value.as_str()),
        InterceptMode::PathPrefix(p) => req.path.starts_with(p.as_str()),
        InterceptMode::Steal | InterceptMode::Mirror => false,
    }
}

/// Serves one intercepted client connection request by request. `modes`
/// are the developers' routes (header or path filters, mirrors); a request
/// that matches route `i` goes to `open(i)` (opened once per connection),
/// the rest to the app (`dial_app`, once per connection).
pub async fn serve<C, A, D, F, Fut, O>(
    client: C,
    modes: &[InterceptMode],
    dial_app: F,
    open: O,
) -> io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin + Send,
    A: AsyncRead + AsyncWrite + Unpin + Send,
    D: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn() -> Fut,
    Fut: Future<Output = io::Result<A>>,
    O: Fn(usize) -> io::Result<D>,
{
    let mut client = Conn::new(client);
    let mut app: Option<Conn<A>> = None;
    // Per route: that developer's stream for this client connection.
    let mut devs: Vec<Option<Conn<D>>> = modes.iter().map(|_| None).collect();
    let mut mirrors: Vec<Option<mpsc::Sender<Vec<u8>>>> = modes.iter().map(|_| None).collect();
    loop {
        let Some(raw) = client.head().await? else {
            return Ok(());
        };
        let req = parse_request(&raw)?;
        let framing = match request_framing(&req) {
            Ok(f) => f,
            Err(why) => {
                debug!(why, "ambiguous HTTP framing refused");
                let body = format!("tpbpf: request refused: {why}\n");
                let answer = format!(
                    "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                client.s.write_all(answer.as_bytes()).await?;
                let _ = client.s.shutdown().await;
                return Ok(());
            }
        };
        let close = req.has_token("connection", "close");
        let upgrade = req.header("upgrade").is_some();

        // Mirrors get a copy through a bounded queue; their answers are
        // read and dropped.
        for (i, mode) in modes.iter().enumerate() {
            if *mode == InterceptMode::Mirror && mirrors[i].is_none() {
                if let Ok(stream) = open(i) {
                    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(MIRROR_QUEUE);
                    let (mut rd, mut wr) = tokio::io::split(stream);
                    tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut rd, &mut tokio::io::sink()).await;
                    });
                    tokio::spawn(async move {
                        while let Some(b) = rx.recv().await {
                            if wr.write_all(&b).await.is_err() {
                                return;
                            }
                        }
                        let _ = wr.shutdown().await;
                    });
                    mirrors[i] = Some(tx);
                }
            }
        }
        mirror(&mut mirrors, &raw);

        let chosen = modes.iter().position(|m| matches(m, &req));
        debug!(
            path = req.path,
            developer = chosen.is_some(),
            "intercepted request"
        );
        let (status, response_close) = match chosen {
            Some(i) => {
                if devs[i].is_none() {
                    devs[i] = Some(Conn::new(open(i)?));
                }
                let dev = devs[i].as_mut().expect("opened above");
                exchange(dev, &raw, framing, &req, upgrade, &mut client, &mut mirrors).await?
            }
            None => {
                if app.is_none() {
                    app = Some(Conn::new(dial_app().await?));
                }
                let a = app.as_mut().expect("dialed above");
                exchange(a, &raw, framing, &req, upgrade, &mut client, &mut mirrors).await?
            }
        };
        if status == 101 || close || response_close {
            return Ok(());
        }
    }
}

/// Sends `request` on `up`, moves the response to the client. Returns the
/// status and whether the connection must close after it.
///
/// The request's body is streamed from the client as it arrives (and
/// copied to the mirrors).
async fn exchange<S, C>(
    up: &mut Conn<S>,
    head: &[u8],
    framing: Framing,
    req: &Head,
    upgrade: bool,
    client: &mut Conn<C>,
    mirrors: &mut [Option<mpsc::Sender<Vec<u8>>>],
) -> io::Result<(u16, bool)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    C: AsyncRead + AsyncWrite + Unpin + Send,
{
    up.s.write_all(head).await?;
    client
        .body(
            framing,
            &mut Out {
                to: &mut up.s,
                mirrors,
            },
        )
        .await?;
    loop {
        let raw = up
            .head()
            .await?
            .ok_or_else(|| invalid("the server closed without an answer"))?;
        let res = parse_response(&raw)?;
        client.s.write_all(&raw).await?;
        if res.status == 101 && upgrade {
            // A protocol switch: from here on, bytes both ways.
            client.s.write_all(&std::mem::take(&mut up.buf)).await?;
            up.s.write_all(&std::mem::take(&mut client.buf)).await?;
            tokio::io::copy_bidirectional(&mut client.s, &mut up.s).await?;
            return Ok((101, true));
        }
        if (100..200).contains(&res.status) {
            continue;
        }
        let framing = if req.method == "HEAD" || res.status == 204 || res.status == 304 {
            Framing::None
        } else {
            match request_framing(&res) {
                // A response with neither runs until the server closes.
                Ok(Framing::Length(0)) if res.header("content-length").is_none() => {
                    Framing::UntilClose
                }
                Ok(f) => f,
                Err(why) => return Err(invalid(format!("a response with {why}"))),
            }
        };
        up.body(framing, &mut Out::new(&mut client.s)).await?;
        return Ok((
            res.status,
            framing == Framing::UntilClose || res.has_token("connection", "close"),
        ));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::io::{duplex, DuplexStream};

    use super::*;

    /// A scripted app: answers every request with `200 app`, and records
    /// every byte it received.
    async fn app(mut s: DuplexStream, seen: std::sync::Arc<Mutex<Vec<u8>>>) {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    seen.lock().unwrap().extend_from_slice(&buf[..n]);
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\napp")
                        .await;
                }
            }
        }
    }

    /// Sends `request` through `serve_with` (no developer routes) and
    /// returns what the client got back and what the app received.
    async fn through(request: &[u8]) -> (String, String) {
        let (mut client, agent_side) = duplex(1 << 20);
        let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let dial = move || {
            let seen = seen2.clone();
            async move {
                let (a, b) = duplex(1 << 20);
                tokio::spawn(app(b, seen));
                Ok(a)
            }
        };
        let server = tokio::spawn(async move {
            let _ = serve(agent_side, &[], dial, |_| -> io::Result<DuplexStream> {
                Err(io::Error::other("no developer"))
            })
            .await;
        });
        client.write_all(request).await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), client.read_to_end(&mut got)).await;
        server.abort();
        let seen = String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
        (String::from_utf8_lossy(&got).into_owned(), seen)
    }

    use std::time::Duration;

    #[tokio::test]
    async fn ambiguous_framing_gets_400_and_reaches_nobody() {
        for (name, request) in [
            (
                "CL+TE",
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
            ),
            (
                "TE+CL",
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 40\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
            ),
            (
                "duplicate CL",
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
            ),
            (
                "differing CL",
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 38\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
            ),
            ("CL list", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\nhello"),
            ("signed CL", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello"),
            ("invalid CL", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: abc\r\n\r\n"),
            (
                "overflowing CL",
                "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            ),
            (
                "other coding",
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            ),
            (
                "two TE",
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            ),
        ] {
            let (got, seen) = through(request.as_bytes()).await;
            assert!(got.starts_with("HTTP/1.1 400 "), "{name}: {got}");
            assert!(seen.is_empty(), "{name}: the app received {seen:?}");
        }
    }

    #[tokio::test]
    async fn a_huge_chunk_size_never_reaches_a_second_request() {
        let request = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
                       10000000000000000000a\r\nx\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
        let (_, seen) = through(request.as_bytes()).await;
        assert!(!seen.contains("/smuggled"), "{seen}");
        // A chunk longer than its size is refused too.
        let request = "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
                       1\r\nxGET /smuggled HTTP/1.1\r\n\r\n0\r\n\r\n";
        let (_, seen) = through(request.as_bytes()).await;
        assert!(!seen.contains("/smuggled"), "{seen}");
    }

    #[tokio::test]
    async fn keep_alive_requests_with_both_framings_pass_whole() {
        let request = "POST /a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
                       5;ext=1\r\nhello\r\n0\r\n\r\n\
                       POST /b HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nworld";
        let (got, seen) = through(request.as_bytes()).await;
        assert_eq!(seen, request, "the app got something else");
        assert!(got.matches("HTTP/1.1 200 OK").count() >= 2, "{got}");
    }

    /// Runs `serve_with` with developer routes `modes`, each developer's
    /// side a duplex whose far end is returned.
    async fn with_routes(
        modes: Vec<InterceptMode>,
        dev_buffer: usize,
    ) -> (
        DuplexStream,
        Vec<DuplexStream>,
        std::sync::Arc<Mutex<Vec<u8>>>,
    ) {
        let (client, agent_side) = duplex(1 << 20);
        let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        let mut near = Vec::new();
        let mut far = Vec::new();
        for _ in &modes {
            let (a, b) = duplex(dev_buffer);
            near.push(Mutex::new(Some(a)));
            far.push(b);
        }
        tokio::spawn(async move {
            let dial = move || {
                let seen = seen2.clone();
                async move {
                    let (a, b) = duplex(1 << 20);
                    tokio::spawn(app(b, seen));
                    Ok(a)
                }
            };
            let _ = serve(agent_side, &modes, dial, |i| {
                near[i]
                    .lock()
                    .unwrap()
                    .take()
                    .ok_or_else(|| io::Error::other("opened twice"))
            })
            .await;
        });
        (client, far, seen)
    }

    #[tokio::test]
    async fn a_filtered_request_goes_to_its_developer_and_only_it() {
        let mode = InterceptMode::Header {
            name: "x-dev".into(),
            value: "me".into(),
        };
        let (mut client, mut devs, seen) = with_routes(vec![mode], 1 << 20).await;
        let mut dev = devs.remove(0);
        client
            .write_all(b"GET /mine HTTP/1.1\r\nHost: a\r\nx-dev: me\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = dev.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("GET /mine"));
        dev.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\ndev")
            .await
            .unwrap();
        client
            .write_all(b"GET /theirs HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), client.read_to_end(&mut got)).await;
        let got = String::from_utf8_lossy(&got);
        assert!(got.contains("dev") && got.contains("app"), "{got}");
        let seen = String::from_utf8_lossy(&seen.lock().unwrap()).into_owned();
        assert!(
            seen.contains("/theirs") && !seen.contains("/mine"),
            "{seen}"
        );
    }

    #[tokio::test]
    async fn a_mirror_that_does_not_read_never_delays_the_app() {
        // The mirror's stream has room for 64 bytes and is never read.
        let (mut client, _devs, seen) = with_routes(vec![InterceptMode::Mirror], 64).await;
        let body = vec![b'x'; 4 << 20];
        let head = format!(
            "POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let send = async {
            client.write_all(head.as_bytes()).await.unwrap();
            client.write_all(&body).await.unwrap();
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        };
        let got = tokio::time::timeout(Duration::from_secs(10), send)
            .await
            .expect("the app's request waited for the mirror");
        assert!(String::from_utf8_lossy(&got).contains("app"));
        // The app reads what is left in its pipe.
        for _ in 0..200 {
            if seen.lock().unwrap().len() == head.len() + body.len() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(seen.lock().unwrap().len(), head.len() + body.len());
    }

    #[test]
    fn chunk_sizes_are_hex_digits_that_cannot_overflow() {
        assert_eq!(chunk_size(b"1a\r\n"), Some(26));
        assert_eq!(chunk_size(b"0\r\n"), Some(0));
        assert_eq!(chunk_size(b"5 ;name=value\r\n"), Some(5));
        assert_eq!(
            chunk_size(b"fffffffffffffff\r\n"),
            Some(0xfff_ffff_ffff_ffff)
        );
        for bad in [
            &b"ffffffffffffffff\r\n"[..],
            b"\r\n",
            b"-1\r\n",
            b"0x10\r\n",
            b"1 2\r\n",
            b"12",
        ] {
            assert_eq!(chunk_size(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
