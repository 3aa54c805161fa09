//! The DNS proxy. Port 53 to any resolver, from a bridged process, lands
//! here. Names of the cluster are answered through the upstream (the
//! cluster's DNS); every other query goes, unchanged, to the resolver the
//! application asked.
//!
//! Which names are the cluster's:
//! - names under the cluster domain (`cluster.local` unless configured) or
//!   an extra suffix;
//! - `<svc>.<ns>` and `<svc>.<ns>.svc`, when `<ns>` is a connected
//!   namespace or one of the cluster's that the user may list (the user's
//!   side keeps that set current): asked as `<svc>.<ns>.svc.<domain>`,
//!   like inside a pod; `<svc>.<ns>` goes to the application's resolver
//!   if the cluster does not know it;
//! - a bare name (`api`): asked as `api.<first namespace>.svc.<domain>`;
//!   if the cluster does not know it, it is forwarded as it was.
use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use hickory_proto::{
    op::{Message, ResponseCode},
    rr::Name,
};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::Semaphore;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream, UdpSocket},
};
use tpbpf_bridge_api::limits::{MAX_DNS_FORWARDS, MAX_DNS_TCP, MAX_MAPPED_NAMESPACES};
use tpbpf_loader::Bypass;
use tracing::{debug, warn};

use crate::service::UserSide;

const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct DnsConfig {
    /// The cluster domain, e.g. `cluster.local`.
    pub cluster_domain: String,
    /// More suffixes answered by the cluster.
    pub suffixes: Vec<String>,
    /// Connected namespaces; the first is where bare names resolve.
    pub namespaces: Vec<String>,
    /// The cluster's other namespaces, as the user's side reports them.
    pub mapped: Mapped,
}

/// The namespaces whose `<svc>.<ns>` names are the cluster's besides the
/// connected ones (lower case): replaced whole by each report of the
/// user's side, at most [`MAX_MAPPED_NAMESPACES`].
pub type Mapped = Arc<std::sync::RwLock<std::collections::HashSet<String>>>;

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            cluster_domain: "cluster.local".into(),
            suffixes: Vec::new(),
            namespaces: vec!["default".into()],
            mapped: Mapped::default(),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Route {
    /// Ask the cluster for this name.
    Cluster(String),
    /// Ask the cluster; if it does not know the name, forward the query.
    ClusterThenForward(String),
    Forward,
}

/// Which way a query goes; see the module's documentation.
fn route(cfg: &DnsConfig, qname: &str) -> Route {
    let name = qname.trim_end_matches('.').to_ascii_lowercase();
    if name.is_empty() {
        return Route::Forward;
    }
    let domain = cfg.cluster_domain.trim_matches('.').to_ascii_lowercase();
    let under = |suffix: &str| name == suffix || name.ends_with(&format!(".{suffix}"));
    if under(&domain)
        || cfg
            .suffixes
            .iter()
            .any(|s| under(&s.trim_matches('.').to_ascii_lowercase()))
    {
        return Route::Cluster(format!("{name}."));
    }
    let labels: Vec<&str> = name.split('.').collect();
    let mapped = cfg.mapped.read().unwrap_or_else(|p| p.into_inner());
    let is_ns =
        |l: &str| cfg.namespaces.iter().any(|n| n.eq_ignore_ascii_case(l)) || mapped.contains(l);
    match labels.as_slice() {
        [_, .., ns, "svc"] if is_ns(ns) => Route::Cluster(format!("{name}.{domain}.")),
        // `svc.ns` as inside a pod, unless the cluster does not know it:
        // a namespace named like a top-level domain (`test`, `dev`) must
        // not take `local.test` or `pkg.go.dev` from the app's resolver.
        [_, .., ns] if labels.len() >= 2 && is_ns(ns) => {
            Route::ClusterThenForward(format!("{name}.svc.{domain}."))
        }
        [_] => match cfg.namespaces.first() {
            Some(ns) => Route::ClusterThenForward(format!("{name}.{ns}.svc.{domain}.")),
            None => Route::Forward,
        },
        _ => Route::Forward,
    }
}

/// A report of the user's side, in parts: the namespaces so far, checked.
#[derive(Debug, Default)]
pub struct NamespaceReport {
    names: std::collections::HashSet<String>,
}

impl NamespaceReport {
    /// Takes one part (names one per line). `Ok(Some(set))` once the last
    /// part came: the set to put in place. A name that is not a namespace
    /// name, or more than [`MAX_MAPPED_NAMESPACES`], refuses the whole
    /// report (the next starts afresh).
    pub fn part(
        &mut self,
        text: &[u8],
        more: bool,
    ) -> Result<Option<std::collections::HashSet<String>>, String> {
        let result = (|| {
            let text =
                std::str::from_utf8(text).map_err(|_| "namespace names that are not UTF-8")?;
            for name in text.split('\n').filter(|n| !n.is_empty()) {
                if !tpbpf_sys::is_dns_label(name) {
                    return Err(format!("`{}` is not a namespace name", name.escape_debug()));
                }
                self.names.insert(name.to_string());
                if self.names.len() > MAX_MAPPED_NAMESPACES {
                    return Err(format!("more than {MAX_MAPPED_NAMESPACES} namespaces"));
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            self.names.clear();
            return Err(e);
        }
        Ok((!more).then(|| std::mem::take(&mut self.names)))
    }
}

pub struct Dns {
    cfg: DnsConfig,
    upstream: Arc<UserSide>,
    bypass: Bypass,
    /// Forwards in flight ([`MAX_DNS_FORWARDS`]).
    forwards: Semaphore,
    /// DNS-over-TCP connections served ([`MAX_DNS_TCP`]).
    tcp: Semaphore,
}

impl Dns {
    pub fn new(cfg: DnsConfig, upstream: Arc<UserSide>, bypass: Bypass) -> Self {
        Self {
            cfg,
            upstream,
            bypass,
            forwards: Semaphore::new(MAX_DNS_FORWARDS),
            tcp: Semaphore::new(MAX_DNS_TCP),
        }
    }

    fn route(&self, qname: &str) -> Route {
        route(&self.cfg, qname)
    }

    /// Answers one query (wire format). `resolver` is where the application
    /// sent it. `None` when no answer could be produced (the client retries).
    pub async fn answer(&self, query: &[u8], resolver: SocketAddr) -> Option<Vec<u8>> {
        let parsed = Message::from_vec(query).ok();
        let qname = parsed
            .as_ref()
            .and_then(|m| m.queries().first())
            .map(|q| q.name().to_ascii());
        let route = qname.as_deref().map_or(Route::Forward, |n| self.route(n));
        debug!(?qname, ?route, %resolver, "DNS query");
        let (cluster_name, fallback) = match route {
            Route::Forward => return self.forward(query, resolver).await,
            Route::Cluster(n) => (n, false),
            Route::ClusterThenForward(n) => (n, true),
        };
        let msg = parsed?;
        match self.ask_cluster(&msg, &cluster_name).await {
            Ok(answer) if fallback && answer.response_code() == ResponseCode::NXDomain => {
                self.forward(query, resolver).await
            }
            Ok(answer) => answer.to_vec().ok(),
            Err(e) => {
                warn!(name = cluster_name, "cluster DNS: {e}");
                let mut fail = Message::new();
                fail.set_id(msg.id())
                    .set_message_type(hickory_proto::op::MessageType::Response)
                    .set_op_code(msg.op_code())
                    .set_recursion_desired(msg.recursion_desired())
                    .set_recursion_available(true)
                    .set_response_code(ResponseCode::ServFail)
                    .add_queries(msg.queries().to_vec());
                fail.to_vec().ok()
            }
        }
    }

    /// Asks the cluster for `cluster_name`, answering as if for the name
    /// the application asked.
    async fn ask_cluster(&self, msg: &Message, cluster_name: &str) -> io::Result<Message> {
        let original = msg
            .queries()
            .first()
            .map(|q| q.name().clone())
            .ok_or_else(|| io::Error::other("query without a question"))?;
        let target = Name::from_ascii(cluster_name).map_err(io::Error::other)?;
        let mut ask = msg.clone();
        for q in ask.queries_mut() {
            q.set_name(target.clone());
        }
        let bytes = ask.to_vec().map_err(io::Error::other)?;
        let answer = self.upstream.dns(bytes).await?;
        let mut answer = Message::from_vec(&answer).map_err(io::Error::other)?;
        answer.set_id(msg.id());
        for q in answer.queries_mut() {
            if q.name() == &target {
                q.set_name(original.clone());
            }
        }
        for r in answer.answers_mut() {
            if r.name() == &target {
                r.set_name(original.clone());
            }
        }
        Ok(answer)
    }

    /// Sends the query unchanged to the resolver the application asked,
    /// from a socket the programs leave alone.
    async fn forward(&self, query: &[u8], resolver: SocketAddr) -> Option<Vec<u8>> {
        let Ok(_slot) = self.forwards.try_acquire() else {
            debug!(%resolver, "{MAX_DNS_FORWARDS} DNS forwards in flight: one dropped");
            return None;
        };
        let result = async {
            let sock = Socket::new(
                Domain::for_address(resolver),
                Type::DGRAM,
                Some(Protocol::UDP),
            )?;
            sock.set_nonblocking(true)?;
            self.bypass.register(&sock)?;
            let sock = UdpSocket::from_std(sock.into())?;
            let r = async {
                sock.connect(resolver).await?;
                sock.send(query).await?;
                let mut buf = vec![0u8; 65535];
                let n = tokio::time::timeout(FORWARD_TIMEOUT, sock.recv(&mut buf))
                    .await
                    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer"))??;
                buf.truncate(n);
                Ok::<_, io::Error>(buf)
            }
            .await;
            r
        }
        .await;
        match result {
            Ok(a) => Some(a),
            Err(e) => {
                debug!(%resolver, "forwarding a DNS query: {e}");
                None
            }
        }
    }

    async fn forward_tcp(&self, query: &[u8], resolver: SocketAddr) -> io::Result<Vec<u8>> {
        let _slot = self
            .forwards
            .try_acquire()
            .map_err(|_| io::Error::other(format!("{MAX_DNS_FORWARDS} DNS forwards in flight")))?;
        let sock = Socket::new(
            Domain::for_address(resolver),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        sock.set_nonblocking(true)?;
        self.bypass.register(&sock)?;
        async {
            let mut s = tokio::time::timeout(
                FORWARD_TIMEOUT,
                TcpSocket::from_std_stream(sock.into()).connect(resolver),
            )
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect"))??;
            write_frame(&mut s, query).await?;
            read_frame(&mut s)
                .await?
                .ok_or_else(|| io::Error::other("closed"))
        }
        .await
    }

    /// DNS over TCP (RFC 7766): length-prefixed messages, several per connection.
    pub async fn serve_tcp(&self, mut client: TcpStream, resolver: SocketAddr) {
        let Ok(_slot) = self.tcp.try_acquire() else {
            debug!(%resolver, "{MAX_DNS_TCP} DNS-over-TCP connections open: one reset");
            let _ = client.set_zero_linger();
            return;
        };
        loop {
            let query = match tokio::time::timeout(Duration::from_secs(30), read_frame(&mut client))
                .await
            {
                Ok(Ok(Some(q))) => q,
                _ => return,
            };
            let route = Message::from_vec(&query)
                .ok()
                .and_then(|m| {
                    m.queries()
                        .first()
                        .map(|q| self.route(&q.name().to_ascii()))
                })
                .unwrap_or(Route::Forward);
            let answer = match route {
                Route::Forward => self.forward_tcp(&query, resolver).await.ok(),
                _ => self.answer(&query, resolver).await,
            };
            let Some(answer) = answer else { return };
            if write_frame(&mut client, &answer).await.is_err() {
                return;
            }
        }
    }
}

async fn read_frame(s: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match s.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut buf).await?;
    Ok(Some(buf))
}

async fn write_frame(s: &mut TcpStream, msg: &[u8]) -> io::Result<()> {
    let len = u16::try_from(msg.len()).map_err(|_| io::Error::other("DNS message too long"))?;
    let mut out = Vec::with_capacity(msg.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(msg);
    s.write_all(&out).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> DnsConfig {
        DnsConfig {
            cluster_domain: "cluster.local".into(),
            suffixes: vec!["corp.internal".into()],
            namespaces: vec!["default".into(), "db".into()],
            mapped: Mapped::default(),
        }
    }

    #[test]
    fn the_clusters_other_namespaces_resolve_once_reported() {
        let cfg = cfg();
        assert_eq!(route(&cfg, "redis.cache."), Route::Forward);
        let mut report = NamespaceReport::default();
        assert_eq!(report.part(b"cache\n", true).unwrap(), None);
        let names = report.part(b"kube-system\n", false).unwrap().unwrap();
        *cfg.mapped.write().unwrap() = names;
        assert_eq!(
            route(&cfg, "redis.cache."),
            Route::ClusterThenForward("redis.cache.svc.cluster.local.".into())
        );
        assert_eq!(
            route(&cfg, "redis.cache.svc"),
            cluster("redis.cache.svc.cluster.local.")
        );
        assert_eq!(route(&cfg, "example.org."), Route::Forward);
    }

    #[test]
    fn a_bad_namespace_report_is_refused_whole() {
        let mut report = NamespaceReport::default();
        for bad in [&b"Caps\n"[..], b"a.b\n", b"-x\n", b"\xff\n", &[b'a'; 64]] {
            assert!(report.part(b"ok\n", true).is_ok());
            assert!(report.part(bad, false).is_err(), "{bad:?}");
            // The next report starts afresh: `ok` went with the refused one.
            assert_eq!(
                report.part(b"fine\n", false).unwrap().unwrap(),
                ["fine".to_string()].into_iter().collect()
            );
        }
        let many: String = (0..=MAX_MAPPED_NAMESPACES)
            .map(|i| format!("n{i}\n"))
            .collect();
        let e = report.part(many.as_bytes(), false).unwrap_err();
        assert!(e.contains("more than"), "{e}");
    }

    fn cluster(n: &str) -> Route {
        Route::Cluster(n.into())
    }

    #[test]
    fn names_under_the_cluster_domain_go_to_the_cluster_as_they_are() {
        assert_eq!(
            route(&cfg(), "web.default.svc.cluster.local."),
            cluster("web.default.svc.cluster.local.")
        );
        assert_eq!(
            route(&cfg(), "WEB.Default.svc.Cluster.Local"),
            cluster("web.default.svc.cluster.local.")
        );
        assert_eq!(
            route(&cfg(), "api.corp.internal."),
            cluster("api.corp.internal.")
        );
    }

    #[test]
    fn service_dot_namespace_resolves_like_inside_a_pod() {
        assert_eq!(
            route(&cfg(), "web.default."),
            Route::ClusterThenForward("web.default.svc.cluster.local.".into())
        );
        assert_eq!(
            route(&cfg(), "postgres.db"),
            Route::ClusterThenForward("postgres.db.svc.cluster.local.".into())
        );
        assert_eq!(
            route(&cfg(), "postgres.db.svc."),
            cluster("postgres.db.svc.cluster.local.")
        );
    }

    #[test]
    fn bare_names_try_the_first_namespace_then_fall_back() {
        assert_eq!(
            route(&cfg(), "api."),
            Route::ClusterThenForward("api.default.svc.cluster.local.".into())
        );
    }

    #[test]
    fn other_names_are_forwarded_untouched() {
        assert_eq!(route(&cfg(), "example.com."), Route::Forward);
        assert_eq!(route(&cfg(), "web.unknownns."), Route::Forward);
        assert_eq!(route(&cfg(), "."), Route::Forward);
        assert_eq!(route(&cfg(), "notcluster.local."), Route::Forward);
    }
}
