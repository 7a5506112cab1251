//! A small, faithful stand-in for WeChat's server API, served over TLS with a
//! CA it makes at start (or plain HTTP). Used by the tests, `demo` and the
//! benchmarks; `wxsidecar fake-wechat` runs it alone.
//!
//! The token rules live in [`state`], the endpoints in [`api`].
//!
//! Its own crate, so the product built without it (`--no-default-features`,
//! the image) carries none of it; it may not know the product, only its
//! core (`wxsidecar-core`) and certificates (`wxsidecar-certs`).
#![forbid(unsafe_code)]

mod api;
pub mod faults;
pub mod platform;
pub mod quota;
pub mod state;
pub mod tickets;

pub mod cli;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::TlsAcceptor;

use state::State;
use wxsidecar_certs as certs;

/// The app the fake serves when none is given (documented in docs/fake-wechat.md).
pub const DEMO_APPID: &str = "wx0123456789abcdef";
pub const DEMO_SECRET: &str = "demo-secret-0123456789";
/// WeChat's token lifetime.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(7200);

#[derive(Debug, Clone)]
pub struct FakeOptions {
    pub listen: SocketAddr,
    pub plain: bool,
    /// `(appid, secret)` pairs.
    pub apps: Vec<(String, String)>,
    /// WeCom `(corpid, secret)` pairs, one per WeCom app.
    pub wecom_apps: Vec<(String, String)>,
    pub token_ttl: Duration,
    /// Ticket lifetime (what WeChat claims on every fetch).
    pub ticket_ttl: Duration,
    /// Ticket fetches allowed per owner, type and hour (default: WeCom's
    /// 400 per corp, 100 per app and for every other ticket).
    pub ticket_quota: Option<u32>,
    /// Added before every API answer.
    pub latency: Duration,
    /// Added before every token answer.
    pub token_latency: Duration,
    /// Injected faults (see [`faults`]).
    pub faults: faults::Plan,
    /// Offer HTTP/2 by ALPN (`--h2`); clients that do not ask get HTTP/1.1.
    pub h2: bool,
    /// Send GOAWAY on an HTTP/2 connection after this many requests.
    pub h2_max_requests: Option<u64>,
    /// Streams allowed at once on an HTTP/2 connection (`--h2-max-streams`).
    pub h2_max_streams: Option<u32>,
    /// Keep the CA here (`ca.pem`, `ca-key.pem`) and reuse it when present,
    /// so fakes restarted or run side by side share one CA.
    pub ca_dir: Option<std::path::PathBuf>,
    /// A third-party platform, `APPID:SECRET:TOKEN:AESKEY` (`--platform`).
    pub platform: Option<String>,
    /// Where its events are POSTed (`--platform-callback`).
    pub platform_callback: Option<String>,
    /// How often a ticket is pushed (`--ticket-push-every`).
    pub ticket_push_every: Duration,
    /// Rotate refresh tokens on every `api_authorizer_token`.
    pub rotate_refresh: bool,
}

impl Default for FakeOptions {
    fn default() -> Self {
        FakeOptions {
            listen: "127.0.0.1:0".parse().expect("valid address"),
            plain: false,
            apps: vec![(DEMO_APPID.into(), DEMO_SECRET.into())],
            wecom_apps: Vec::new(),
            token_ttl: DEFAULT_TOKEN_TTL,
            ticket_ttl: DEFAULT_TOKEN_TTL,
            ticket_quota: None,
            latency: Duration::ZERO,
            token_latency: Duration::ZERO,
            faults: faults::Plan::default(),
            ca_dir: None,
            h2: false,
            h2_max_requests: None,
            h2_max_streams: None,
            platform: None,
            platform_callback: None,
            ticket_push_every: Duration::from_secs(600),
            rotate_refresh: false,
        }
    }
}

/// Shared by every connection.
pub(crate) struct Shared {
    pub state: Mutex<State>,
    pub faults: Mutex<faults::Faults>,
    pub opts: FakeOptions,
    pub tls_handshakes: AtomicU64,
    pub connections: AtomicU64,
    /// Connections that negotiated HTTP/2.
    pub h2_connections: AtomicU64,
    /// GOAWAYs sent after `h2_max_requests`.
    pub h2_goaways: AtomicU64,
    /// Requests refused unprocessed by the `refuse_rate` fault.
    pub refused: AtomicU64,
    /// Bumped by `POST /__fake/close-idle`: every HTTP/1.1 connection closes
    /// once idle, as servers do at their keep-alive timeout.
    pub close_idle: tokio::sync::watch::Sender<u64>,
    /// HTTP/1.1 connections open now.
    pub h1_open: AtomicU64,
    /// Set by `POST /__fake/whitelist`: only these caller IPs are served;
    /// the rest get WeChat's IP-whitelist errors (40164, WeCom 60020).
    pub whitelist: Mutex<Option<Vec<std::net::IpAddr>>>,
}

/// The caller's address, put on each request for the whitelist check.
#[derive(Clone, Copy)]
pub(crate) struct ClientIp(pub std::net::IpAddr);

/// A running fake.
pub struct Fake {
    pub addr: SocketAddr,
    /// PEM of the CA that signed the fake's certificate (`None` with `--plain`).
    pub ca_pem: Option<String>,
    pub tls: bool,
}

/// Binds and serves in the current tokio runtime; returns once listening.
pub async fn start(opts: FakeOptions) -> std::io::Result<Fake> {
    let listener = TcpListener::bind(opts.listen).await?;
    let addr = listener.local_addr()?;
    let (acceptor, ca_pem) = if opts.plain {
        (None, None)
    } else {
        let (acceptor, ca) =
            tls_acceptor(opts.ca_dir.as_deref(), opts.h2).map_err(std::io::Error::other)?;
        (Some(acceptor), Some(ca))
    };
    let mut state = State::new(&opts.apps, opts.token_ttl)
        .with_wecom(&opts.wecom_apps)
        .with_tickets(opts.ticket_ttl, opts.ticket_quota);
    if let Some(spec) = &opts.platform {
        let mut p = platform::Platform::parse(spec, opts.platform_callback.clone())
            .map_err(std::io::Error::other)?;
        p.rotate_refresh = opts.rotate_refresh;
        state.platform = Some(p);
    }
    let shared = Arc::new(Shared {
        state: Mutex::new(state),
        faults: Mutex::new(faults::Faults::new(opts.faults.clone())),
        tls_handshakes: AtomicU64::new(0),
        connections: AtomicU64::new(0),
        h2_connections: AtomicU64::new(0),
        h2_goaways: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        close_idle: tokio::sync::watch::Sender::new(0),
        h1_open: AtomicU64::new(0),
        whitelist: Mutex::new(None),
        opts: opts.clone(),
    });
    if opts.platform.is_some() {
        tokio::spawn(platform::push_tickets(
            shared.clone(),
            opts.ticket_push_every,
        ));
    }
    tokio::spawn(accept_loop(listener, acceptor, shared));
    Ok(Fake {
        addr,
        ca_pem,
        tls: !opts.plain,
    })
}

fn tls_acceptor(
    ca_dir: Option<&std::path::Path>,
    h2: bool,
) -> Result<(TlsAcceptor, String), String> {
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    names.extend(certs::WECHAT_HOSTS.iter().map(|h| h.to_string()));
    let key_path = ca_dir.map(|d| d.join("ca-key.pem"));
    let known_key = key_path
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok());
    let issued = certs::issue("wxsidecar fake WeChat CA", &names, 30, known_key.as_deref())
        .map_err(|e| e.to_string())?;
    if let (Some(dir), None) = (ca_dir, &known_key) {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        std::fs::write(dir.join("ca.pem"), &issued.ca_pem).map_err(|e| e.to_string())?;
        let key_file = dir.join("ca-key.pem");
        std::fs::write(&key_file, &issued.ca_key_pem).map_err(|e| e.to_string())?;
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(issued.leaf_der)],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(issued.leaf_key_der)),
        )
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = if h2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok((TlsAcceptor::from(Arc::new(config)), issued.ca_pem))
}

/// RFC 9113's initial flow-control window.
const DEFAULT_H2_STREAM_WINDOW: u32 = 65_535;

/// One HTTP/2 connection. With `h2_max_requests`, the fake sends GOAWAY
/// after that many requests, as servers do (nginx: `keepalive_requests`):
/// requests in flight finish, new streams must go to another connection.
async fn serve_h2<S>(stream: S, shared: Arc<Shared>, ip: ClientIp) -> Result<(), hyper::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let served = Arc::new(AtomicU64::new(0));
    let limit_hit = Arc::new(tokio::sync::Notify::new());
    let svc = {
        let (shared, served, limit_hit) = (shared.clone(), served.clone(), limit_hit.clone());
        service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ip);
            let n = served.fetch_add(1, Ordering::Relaxed) + 1;
            if shared.opts.h2_max_requests.is_some_and(|max| n >= max) {
                limit_hit.notify_one();
            }
            api::handle(shared.clone(), req)
        })
    };
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    // The protocol's default window (hyper's is 1 MiB): a large body
    // waits on flow control, as with most servers.
    builder.initial_stream_window_size(DEFAULT_H2_STREAM_WINDOW);
    if let Some(n) = shared.opts.h2_max_streams {
        builder.max_concurrent_streams(n);
    }
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => return r,
        _ = limit_hit.notified() => {
            shared.h2_goaways.fetch_add(1, Ordering::Relaxed);
            conn.as_mut().graceful_shutdown();
        }
    }
    conn.await
}

/// Counts an HTTP/1.1 connection as open while it lives.
struct H1Open(Arc<Shared>);

impl Drop for H1Open {
    fn drop(&mut self) {
        self.0.h1_open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One HTTP/1.1 connection, closed once idle on `POST /__fake/close-idle`.
async fn serve_h1<S>(stream: S, shared: Arc<Shared>, ip: ClientIp) -> Result<(), hyper::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut close = shared.close_idle.subscribe();
    shared.h1_open.fetch_add(1, Ordering::Relaxed);
    let _open = H1Open(shared.clone());
    let svc = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ip);
        api::handle(shared.clone(), req)
    });
    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => return r,
        _ = close.changed() => conn.as_mut().graceful_shutdown(),
    }
    conn.await
}

async fn accept_loop(listener: TcpListener, tls: Option<TlsAcceptor>, shared: Arc<Shared>) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "fake: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let ip = ClientIp(peer.ip());
        shared.connections.fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let result = match tls {
                Some(acceptor) => match acceptor.accept(tcp).await {
                    Ok(stream) if stream.get_ref().1.alpn_protocol() == Some(b"h2") => {
                        shared.tls_handshakes.fetch_add(1, Ordering::Relaxed);
                        shared.h2_connections.fetch_add(1, Ordering::Relaxed);
                        serve_h2(stream, shared.clone(), ip).await
                    }
                    Ok(stream) => {
                        shared.tls_handshakes.fetch_add(1, Ordering::Relaxed);
                        serve_h1(stream, shared.clone(), ip).await
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "fake: TLS handshake failed");
                        return;
                    }
                },
                None => serve_h1(tcp, shared.clone(), ip).await,
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "fake: connection ended with an error");
            }
        });
    }
}
