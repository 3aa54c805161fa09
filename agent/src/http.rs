//! HTTP/1.1 on an intercepted connection, request by request: a request
//! that matches a developer's filter goes to that developer's stream, the
//! rest to the app, on the same client connection (keep-alive); mirrors
//! get a copy of every request and their answers are dropped.
use std::{future::Future, io, net::SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tpbpf_mux::{Destination, InterceptMode, Stream};
use tracing::debug;

use crate::intercept::Route;

/// The largest request or response head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// The largest request body buffered (it is buffered to be mirrored).
const MAX_BODY: usize = 64 * 1024 * 1024;

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
    async fn take(&mut self, mut n: usize, out: &mut Out<'_>) -> io::Result<()> {
        while n > 0 {
            if self.buf.is_empty() && self.fill().await? == 0 {
                return Err(invalid("connection closed inside an HTTP body"));
            }
            let k = n.min(self.buf.len());
            out.put(&self.buf[..k]).await?;
            self.buf.drain(..k);
            n -= k;
        }
        Ok(())
    }

    async fn line(&mut self, out: &mut Out<'_>) -> io::Result<Vec<u8>> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..end + 2).collect();
                out.put(&line).await?;
                return Ok(line);
            }
            if self.buf.len() > MAX_HEAD {
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
                let line = self.line(out).await?;
                let size = std::str::from_utf8(&line)
                    .ok()
                    .and_then(|l| usize::from_str_radix(l.trim().split(';').next()?, 16).ok())
                    .ok_or_else(|| invalid("bad chunk size"))?;
                if size == 0 {
                    // Trailers, up to the blank line.
                    while self.line(out).await? != b"\r\n" {}
                    return Ok(());
                }
                self.take(size + 2, out).await?;
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

/// Where body bytes go: collected (requests) or written on (responses).
enum Out<'a> {
    Collect(&'a mut Vec<u8>),
    Write(&'a mut (dyn AsyncWrite + Unpin + Send)),
}

impl Out<'_> {
    async fn put(&mut self, b: &[u8]) -> io::Result<()> {
        match self {
            Out::Collect(v) => {
                if v.len() + b.len() > MAX_BODY {
                    return Err(invalid("HTTP request body too large to route"));
                }
                v.extend_from_slice(b);
                Ok(())
            }
            Out::Write(w) => w.write_all(b).await,
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Framing {
    None,
    Length(usize),
    Chunked,
    UntilClose,
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
    fn length(&self) -> Option<usize> {
        self.header("content-length")
            .and_then(|v| v.trim().parse().ok())
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

/// Serves one intercepted client connection request by request.
pub async fn serve<F, Fut>(
    target: SocketAddr,
    client: tokio::net::TcpStream,
    routes: Vec<Route>,
    dial_app: F,
) -> io::Result<()>
where
    F: Fn() -> Fut,
    Fut: Future<Output = io::Result<tokio::net::TcpStream>>,
{
    let mut client = Conn::new(client);
    let mut app: Option<Conn<tokio::net::TcpStream>> = None;
    // Per route: that developer's stream for this client connection.
    let mut devs: Vec<Option<Conn<Stream>>> = routes.iter().map(|_| None).collect();
    let mut mirrors: Vec<Option<tokio::io::WriteHalf<Stream>>> =
        routes.iter().map(|_| None).collect();
    loop {
        let Some(raw) = client.head().await? else {
            return Ok(());
        };
        let req = parse_request(&raw)?;
        let framing = if req.has_token("transfer-encoding", "chunked") {
            Framing::Chunked
        } else {
            Framing::Length(req.length().unwrap_or(0))
        };
        let mut request = raw.clone();
        client
            .body(framing, &mut Out::Collect(&mut request))
            .await?;
        let close = req.has_token("connection", "close");
        let upgrade = req.header("upgrade").is_some();

        // Copies to the mirrors; their answers are read and dropped.
        for (i, r) in routes.iter().enumerate() {
            if r.mode != InterceptMode::Mirror {
                continue;
            }
            if mirrors[i].is_none() {
                if let Ok(s) = r.session.open(Destination::Addr(target)) {
                    let (mut rd, wr) = tokio::io::split(s);
                    tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut rd, &mut tokio::io::sink()).await;
                    });
                    mirrors[i] = Some(wr);
                }
            }
            if let Some(m) = mirrors[i].as_mut() {
                if m.write_all(&request).await.is_err() {
                    mirrors[i] = None;
                }
            }
        }

        let chosen = routes.iter().position(|r| matches(&r.mode, &req));
        debug!(
            path = req.path,
            developer = chosen.is_some(),
            "intercepted request"
        );
        let (head, response_close) = match chosen {
            Some(i) => {
                if devs[i].is_none() {
                    devs[i] = Some(Conn::new(
                        routes[i].session.open(Destination::Addr(target))?,
                    ));
                }
                let dev = devs[i].as_mut().expect("opened above");
                exchange(dev, &request, &req, upgrade, &mut client).await?
            }
            None => {
                if app.is_none() {
                    app = Some(Conn::new(dial_app().await?));
                }
                let a = app.as_mut().expect("dialed above");
                exchange(a, &request, &req, upgrade, &mut client).await?
            }
        };
        if head == 101 || close || response_close {
            return Ok(());
        }
    }
}

/// Sends `request` on `up`, moves the response to the client. Returns the
/// status and whether the connection must close after it.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    up: &mut Conn<S>,
    request: &[u8],
    req: &Head,
    upgrade: bool,
    client: &mut Conn<tokio::net::TcpStream>,
) -> io::Result<(u16, bool)> {
    up.s.write_all(request).await?;
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
        } else if res.has_token("transfer-encoding", "chunked") {
            Framing::Chunked
        } else if let Some(n) = res.length() {
            Framing::Length(n)
        } else {
            Framing::UntilClose
        };
        up.body(framing, &mut Out::Write(&mut client.s)).await?;
        return Ok((
            res.status,
            framing == Framing::UntilClose || res.has_token("connection", "close"),
        ));
    }
}
