//! The kube client: from the kubeconfig (like kubectl), checked against
//! the API server before it is handed out, over tpbpf's own TCP connector.
use std::path::Path;

use kube::{
    config::{KubeConfigOptions, Kubeconfig},
    Client, Config,
};
use tracing::debug;

use crate::{access, KubeError};

/// A client for the kubeconfig at `path` (or the usual places, like
/// kubectl), in `context` (or the current one). It asks the server its
/// version first, as kubectl's discovery does, so that a certificate or
/// credential the server refuses is said here, in one line naming the
/// kubeconfig, the context and the fix ([`KubeError::Refused`]).
pub async fn client(
    path: Option<&Path>,
    context: Option<&str>,
) -> Result<(Client, String, String, String), KubeError> {
    let options = KubeConfigOptions {
        context: context.map(str::to_string),
        ..Default::default()
    };
    let config = match path {
        Some(p) => {
            let kc = Kubeconfig::read_from(p).map_err(|source| KubeError::Kubeconfig {
                path: p.display().to_string(),
                source,
            })?;
            Config::from_custom_kubeconfig(kc, &options)
                .await
                .map_err(|source| KubeError::Kubeconfig {
                    path: p.display().to_string(),
                    source,
                })?
        }
        None => Config::from_kubeconfig(&options)
            .await
            .map_err(|e| KubeError::Infer(e.to_string()))?,
    };
    let server = config.cluster_url.to_string();
    let namespace = config.default_namespace.clone();
    let kc = match path {
        Some(p) => Kubeconfig::read_from(p).ok(),
        None => Kubeconfig::read().ok(),
    };
    let ctx = context
        .map(str::to_string)
        .or_else(|| kc.as_ref().and_then(|k| k.current_context.clone()))
        .unwrap_or_default();
    let entry = kc
        .as_ref()
        .and_then(|k| k.contexts.iter().find(|c| c.name == ctx))
        .and_then(|c| c.context.clone());
    let target = access::Target {
        kubeconfig: match path {
            Some(p) => p.display().to_string(),
            None => std::env::var("KUBECONFIG")
                .ok()
                .filter(|k| !k.is_empty())
                .unwrap_or_else(|| "~/.kube/config".into()),
        },
        context: ctx.clone(),
        cluster: entry
            .as_ref()
            .map(|c| c.cluster.clone())
            .unwrap_or_default(),
        user: entry.and_then(|c| c.user).unwrap_or_default(),
        server: server.clone(),
    };
    let (client, tls) = build_client(config)?;
    if let Err(e) = client.apiserver_version().await {
        debug!("the API server's version: {e:?}");
        // In TLS 1.3 the server refuses a client certificate after the
        // client's handshake is done, so hyper may lose the server's alert
        // to a request it had not sent yet ("connection was not ready").
        // A handshake of our own, read to its end, hears the alert.
        let cause = match access::cause(&e) {
            Some(c) => Some(c),
            None => match &tls {
                Some(tls) => probe_tls(tls).await,
                None => None,
            },
        };
        if let Some(cause) = cause {
            let (problem, fix) = access::explain(&cause, &target);
            return Err(KubeError::Refused {
                kubeconfig: target.kubeconfig,
                context: target.context,
                server: target.server,
                problem,
                fix,
            });
        }
        return Err(KubeError::Unanswered {
            kubeconfig: target.kubeconfig,
            context: target.context,
            server: target.server,
            source: Box::new(e),
        });
    }
    Ok((client, ctx, server, namespace))
}

/// Called with every socket the kube client makes, before it connects
/// (tpbpfd exempts its own connections to the API server from its own
/// redirection this way).
/// What the hook does with a socket before it connects (it gets a
/// duplicate of the socket's descriptor).
pub type SocketHookFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<()>> + Send>>;
type SocketHook = Box<dyn Fn(std::os::fd::OwnedFd) -> SocketHookFuture + Send + Sync>;
static SOCKET_HOOK: std::sync::OnceLock<SocketHook> = std::sync::OnceLock::new();

/// Sets the hook every socket of the kube client goes through before it
/// connects (once per process): the user's side exempts its connections
/// to the API server from its own bridge there, awaited, so no worker
/// thread blocks. A hook's error fails that connection.
pub fn on_new_socket(
    hook: impl Fn(std::os::fd::OwnedFd) -> SocketHookFuture + Send + Sync + 'static,
) {
    let _ = SOCKET_HOOK.set(Box::new(hook));
}

/// The kube client's stack (as kube's own: base URI, auth, TLS), over a
/// connector of tpbpf's: TCP_NODELAY on (a port-forward carries a tunnel,
/// and Nagle's algorithm meeting delayed ACKs costs 40 ms a round trip),
/// and [`on_new_socket`] before each connect. Proxies in the kubeconfig go
/// through kube's default stack.
///
/// With the client comes the configuration its TLS identity was built
/// from, for [`probe_tls`] (`None` through a proxy or over plain HTTP).
fn build_client(config: Config) -> Result<(Client, Option<Config>), KubeError> {
    use kube::client::ConfigExt;
    use tower::{BoxError, ServiceBuilder};
    if config.proxy_url.is_some() {
        return Ok((Client::try_from(config).map_err(KubeError::Client)?, None));
    }
    // kube runs an exec credential plugin once for the TLS identity and
    // once for the auth layer. A plugin that gives a token (aws, gcloud,
    // kubelogin: seconds each) runs once here: the auth layer first, then
    // TLS without the plugin. Only a plugin that gives a client certificate
    // (no auth layer) runs a second time, for the TLS identity.
    let auth = config.auth_layer().map_err(KubeError::Client)?;
    let tls_config = if config.auth_info.exec.is_some() && auth.is_some() {
        let mut c = config.clone();
        c.auth_info.exec = None;
        c
    } else {
        config.clone()
    };
    let https = tls_config
        .rustls_https_connector_with_connector(Connector)
        .map_err(KubeError::Client)?;
    let hyper = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(https);
    crate::identity::remember_certificate(&config.auth_info);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(auth)
        .map_request(|req: http::Request<kube::client::Body>| {
            crate::identity::saw_request(&req);
            req
        })
        .map_err(BoxError::from)
        .service(hyper);
    let https_url = config.cluster_url.scheme_str() == Some("https");
    Ok((
        Client::new(service, config.default_namespace),
        https_url.then_some(tls_config),
    ))
}

/// One TLS connection to the API server with the client's own TLS
/// settings, carrying `GET /version` and read until the server answers,
/// closes or refuses: what the refusal was, if it was one [`access::Cause`]
/// names. Bounded by 10 s; any other outcome is `None`.
async fn probe_tls(config: &Config) -> Option<access::Cause> {
    use kube::client::ConfigExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tower::ServiceExt;
    let uri = config.cluster_url.clone();
    let host = uri.host()?.to_string();
    let probe = async {
        let https = config
            .rustls_https_connector_with_connector(Connector)
            .ok()?;
        let stream = match https.oneshot(uri).await {
            Ok(s) => s,
            Err(e) => return access::cause_of(&*e),
        };
        let mut stream = hyper_util::rt::TokioIo::new(stream);
        let request = format!("GET /version HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        // A write may fail once the server has closed, with its alert still
        // to be read; the read says which.
        let written = stream.write_all(request.as_bytes()).await;
        // An answer (any status) or a close means the handshake held.
        let mut buf = [0u8; 1024];
        match stream.read(&mut buf).await {
            Err(e) => access::cause_of(&e),
            Ok(_) => written.err().and_then(|e| access::cause_of(&e)),
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), probe)
        .await
        .ok()
        .flatten()
}

/// Plain TCP to the API server, made by tpbpf (see [`build_client`]).
#[derive(Clone, Copy, Debug)]
struct Connector;

impl tower::Service<http::Uri> for Connector {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| std::io::Error::other(format!("no host in {uri}")))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
                Some("http") => 80,
                _ => 443,
            });
            let mut last = None;
            for addr in tokio::net::lookup_host((host.as_str(), port)).await? {
                match connect_one(addr).await {
                    Ok(s) => return Ok(hyper_util::rt::TokioIo::new(s)),
                    Err(e) => last = Some(e),
                }
            }
            Err(last
                .unwrap_or_else(|| std::io::Error::other(format!("{host}:{port} has no address"))))
        })
    }
}

async fn connect_one(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    if let Some(hook) = SOCKET_HOOK.get() {
        hook(sock.try_clone()?.into()).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("exempting the connection to the API server from the bridge: {e}"),
            )
        })?;
    }
    sock.set_tcp_nodelay(true)?;
    sock.set_nonblocking(true)?;
    let std: std::net::TcpStream = sock.into();
    let stream = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        tokio::net::TcpSocket::from_std_stream(std).connect(addr),
    )
    .await
    .map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("connecting to {addr}"),
        )
    })??;
    Ok(stream)
}
