//! The way to WeChat: async DNS, peers built from addresses, one shared
//! keep-alive pool of verified TLS connections, and pool warmth.
//!
//! Sits at the end of the request path: the proxy and the token fetcher both
//! call [`Upstream::send`]. Never resolves DNS blocking (pingora's
//! `HttpPeer::new("host:443")` would), never disables certificate or
//! hostname verification, and never puts a query string (which may carry a
//! token or secret) into an error.
//!
//! Its own crate (`wxsidecar-upstream`): dial (DNS, TCP, TLS, a `CONNECT`
//! tunnel), the pool, the one HTTP/1.1 exchange, HTTP/2 streams, failover
//! and the breaker, the shared budget of buffered bodies (`bodies`). It may
//! not know accounts, tokens, routes or the request path.
#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;
use hickory_resolver::config::{LookupIpStrategy, ResolverConfig, ResolverOpts};
use hickory_resolver::TokioAsyncResolver;
use pingora::connectors::{ConnectorOptions, TransportConnector};
use pingora::http::RequestHeader;
use pingora::protocols::Stream;
use pingora::upstreams::peer::{HttpPeer, Peer};
use pingora::ErrorType;

use wxsidecar_config::{UpstreamConfig, UpstreamUrl};

pub mod bodies;
pub mod failover;
pub mod status;

mod exchange;
pub use exchange::Exchange;
mod h1;
pub use h1::{RawExchange, Upload};
mod h2;
pub use self::h2::{uri as h2_uri, Outgoing};
mod multiplex;
pub use multiplex::H2Exchange;
mod pool;
use pool::Pool;
mod tunnel;
use tunnel::Tunnel;

/// Idle connections kept per upstream; far above what a sidecar needs.
pub const DEFAULT_POOL_SIZE: usize = 256;
/// Re-resolve at least this often even when the DNS TTL is longer, so a
/// moved WeChat endpoint is picked up within a minute.
const DEFAULT_MAX_DNS_TTL: Duration = Duration::from_secs(60);
/// Re-resolve no more often than this, whatever the TTL says.
const DEFAULT_MIN_DNS_TTL: Duration = Duration::from_secs(5);
/// Informational (1xx) answers read before the final one: WeChat sends at
/// most a `100 Continue`; an upstream sending them without end is cut off.
pub const DEFAULT_MAX_INFORMATIONAL: usize = 8;

/// Why a final answer head may not go on to the app (a 502 instead), from
/// its status and its `Content-Encoding` values; `None` when it may. The
/// status must be 200–599: outside 100–599 is no HTTP status (RFC 9110
/// §15), informational ones are skipped before this, and a 101 switches
/// protocols we never asked to switch. And it must be as it is: every
/// request asks for `identity` (we read every answer: its errcode, our
/// token in it), and a coded answer anyway would hide both.
pub fn unfit_answer<'a>(
    status: u16,
    mut content_encodings: impl Iterator<Item = &'a [u8]>,
) -> Option<String> {
    if !(200..=599).contains(&status) {
        return Some(format!("answer status {status} is not one to pass on"));
    }
    content_encodings
        .any(|v| {
            let v = v.trim_ascii();
            !v.is_empty() && !v.eq_ignore_ascii_case(b"identity")
        })
        .then(|| "answer has a content-coding; identity was asked for".to_string())
}

/// What every upstream request says it takes: answers as they are (set
/// here for every request this client writes; the fast lane writes its own).
pub const IDENTITY: &str = "identity";

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot resolve upstream host {host}: {reason}")]
    Resolve { host: String, reason: String },
    #[error("cannot connect to upstream {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("connecting to upstream {addr} timed out after {after:?}")]
    ConnectTimeout { addr: String, after: Duration },
    #[error("upstream {addr} did not answer within {after:?}")]
    Timeout { addr: String, after: Duration },
    #[error("upstream unavailable, retry later")]
    Unavailable,
    #[error("exchange with upstream {addr} failed: {reason}")]
    Exchange { addr: String, reason: String },
}

impl UpstreamError {
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            UpstreamError::Timeout { .. } | UpstreamError::ConnectTimeout { .. }
        )
    }

    /// Failed before any byte of the request left: safe to try another host.
    pub fn is_connect(&self) -> bool {
        matches!(
            self,
            UpstreamError::Resolve { .. }
                | UpstreamError::Connect { .. }
                | UpstreamError::ConnectTimeout { .. }
        )
    }
}

/// A failed exchange, and whether the whole request had been written (so
/// WeChat may have acted on it).
struct Failed {
    error: UpstreamError,
    sent: bool,
}

/// Methods WeChat cannot act on twice.
pub fn is_idempotent(m: &http::Method) -> bool {
    matches!(m.as_str(), "GET" | "HEAD" | "OPTIONS")
}

/// A host's counters: the metric series themselves (handles resolved once,
/// so the request path does no label lookup), read by `/metrics` and by
/// `/status` alike — one source for each number.
pub struct UpstreamStats {
    /// `wxsidecar_upstream_requests_total{host,outcome="ok"}`
    pub ok: prometheus::IntCounter,
    /// `wxsidecar_upstream_requests_total{host,outcome="error"}`
    pub failed: prometheus::IntCounter,
    /// `wxsidecar_upstream_connections_total{host,reused="false"}`
    pub opened: prometheus::IntCounter,
    /// `wxsidecar_upstream_connections_total{host,reused="true"}`
    pub reused: prometheus::IntCounter,
    /// Connect attempts that failed in a row (every address); 0 after a success.
    pub connect_failures: AtomicU32,
    /// Why the last connect failed, until one succeeds (for `/status`).
    pub last_connect_error: parking_lot::Mutex<Option<String>>,
}

impl UpstreamStats {
    fn new(host: &str) -> Self {
        use wxsidecar_metrics::{UPSTREAM_CONNECTIONS, UPSTREAM_REQUESTS};
        UpstreamStats {
            ok: UPSTREAM_REQUESTS.with_label_values(&[host, "ok"]),
            failed: UPSTREAM_REQUESTS.with_label_values(&[host, "error"]),
            opened: UPSTREAM_CONNECTIONS.with_label_values(&[host, "false"]),
            reused: UPSTREAM_CONNECTIONS.with_label_values(&[host, "true"]),
            connect_failures: AtomicU32::new(0),
            last_connect_error: parking_lot::Mutex::new(None),
        }
    }
}

struct Resolved {
    peers: Vec<HttpPeer>,
    /// Each peer's pool key, worked out once (hashing a peer per request
    /// showed in the profile).
    hashes: Vec<u64>,
    valid_until: Instant,
}

/// When a whole upstream answer must be in (`upstream.answer_timeout`).
/// Our own exchange checks it at each read, within the same timer as the
/// read's own limit: a request waits on one timer, not one per layer.
#[derive(Clone, Copy, Debug)]
pub struct AnswerDeadline {
    pub at: tokio::time::Instant,
    pub limit: Duration,
}

impl AnswerDeadline {
    pub fn from_now(limit: Duration) -> Self {
        AnswerDeadline {
            at: tokio::time::Instant::now() + limit,
            limit,
        }
    }

    /// `limit` from `start` (a clock reading the caller already has).
    pub fn from(start: Instant, limit: Duration) -> Self {
        AnswerDeadline {
            at: start + limit,
            limit,
        }
    }

    /// When the wait began.
    pub fn started(&self) -> Instant {
        self.at - self.limit
    }

    /// The error when it passed.
    pub fn missed(self) -> UpstreamError {
        UpstreamError::Timeout {
            addr: "the upstream".into(),
            after: self.limit,
        }
    }
}

/// One upstream host with its pool.
pub struct Upstream {
    url: UpstreamUrl,
    host_header: String,
    /// `host_header` as an HTTP/2 `:authority`, parsed once (`None`: it
    /// does not parse, and each HTTP/2 request says so).
    authority: Option<http::uri::Authority>,
    /// The host and port we connect to: the upstream's own, or with
    /// `upstream.proxy` the proxy's (WeChat's host is then the proxy's to
    /// resolve).
    dial_host: String,
    dial_port: u16,
    /// `upstream.proxy`: every connection is a `CONNECT` tunnel.
    tunnel: Option<Arc<Tunnel>>,
    /// Opens connections (TCP, TLS with verification and SNI).
    transport: TransportConnector,
    /// Idle HTTP/1.1 connections.
    pool: Pool,
    resolved: ArcSwap<Resolved>,
    /// Which resolved address to use first; moves on after a connect failure.
    preferred: AtomicUsize,
    resolver: Option<TokioAsyncResolver>,
    resolving: tokio::sync::Mutex<()>,
    /// Multiplexed HTTP/2 connections (`upstream.http2`); the lock is
    /// held only to pick or add one, never across an await.
    h2: parking_lot::Mutex<Vec<self::h2::Conn>>,
    /// The server answered our h2 offer with HTTP/1.1: stop offering.
    h2_declined: std::sync::atomic::AtomicBool,
    /// One new HTTP/2 connection at a time: concurrent first requests share it.
    h2_connecting: tokio::sync::Mutex<()>,
    conf: UpstreamConfig,
    pub stats: UpstreamStats,
}

/// A peer's address for errors, in 32 bytes (pingora's allows for Unix
/// paths: 120); upstream peers are always IP addresses (see `make_peer`).
fn peer_addr(peer: &HttpPeer) -> SocketAddr {
    peer.address()
        .as_inet()
        .copied()
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
}

impl Upstream {
    /// Builds the upstream; `ca_bundle` is the CA file given to every TLS
    /// connection (system roots plus `upstream.ca_file`, see [`ca_bundle`]).
    pub fn new(conf: &UpstreamConfig, ca_bundle: Option<&Path>) -> Arc<Self> {
        let mut opts = ConnectorOptions::new(DEFAULT_POOL_SIZE);
        opts.ca_file = ca_bundle.map(|p| p.display().to_string());
        let transport = TransportConnector::new(Some(opts));
        let (dial_host, dial_port) = match &conf.proxy {
            Some(p) => (p.host.clone(), p.port),
            None => (conf.url.host.clone(), conf.url.port),
        };
        let tunnel = conf.proxy.as_ref().map(|p| {
            let authority = if conf.url.host.contains(':') {
                format!("[{}]:{}", conf.url.host, conf.url.port)
            } else {
                format!("{}:{}", conf.url.host, conf.url.port)
            };
            Arc::new(Tunnel::new(p, authority))
        });
        let resolver = match dial_host.parse::<IpAddr>() {
            Ok(_) => None,
            Err(_) => Some(build_resolver(conf)),
        };
        let up = Upstream {
            tunnel,
            host_header: conf.url.host_header(),
            authority: http::uri::Authority::try_from(conf.url.host_header().as_str()).ok(),
            url: conf.url.clone(),
            dial_host,
            dial_port,
            transport,
            pool: Pool::new(DEFAULT_POOL_SIZE, conf.idle_timeout),
            resolved: ArcSwap::from_pointee(Resolved {
                peers: Vec::new(),
                hashes: Vec::new(),
                valid_until: Instant::now(),
            }),
            preferred: AtomicUsize::new(0),
            resolver,
            resolving: tokio::sync::Mutex::new(()),
            h2: parking_lot::Mutex::new(Vec::new()),
            h2_declined: std::sync::atomic::AtomicBool::new(!conf.url.tls),
            h2_connecting: tokio::sync::Mutex::new(()),
            conf: conf.clone(),
            stats: UpstreamStats::new(&conf.url.host_header()),
        };
        if let Ok(ip) = up.dial_host.parse::<IpAddr>() {
            up.set_addrs(
                &[SocketAddr::new(ip, up.dial_port)],
                Instant::now() + Duration::from_secs(86400 * 365),
            );
        }
        Arc::new(up)
    }

    pub fn url(&self) -> &UpstreamUrl {
        &self.url
    }

    /// `upstream.proxy` as shown (credentials masked), when configured.
    pub fn proxy(&self) -> Option<String> {
        self.conf.proxy.as_ref().map(|p| p.to_string())
    }

    fn make_peer(&self, addr: SocketAddr) -> HttpPeer {
        let mut peer = HttpPeer::new(addr, self.url.tls, self.url.host.clone());
        let o = &mut peer.options;
        o.connection_timeout = Some(self.conf.connect_timeout);
        o.total_connection_timeout = Some(self.conf.connect_timeout);
        o.read_timeout = Some(self.conf.read_timeout);
        o.write_timeout = Some(self.conf.read_timeout);
        o.idle_timeout = Some(self.conf.idle_timeout);
        if let Some(t) = &self.tunnel {
            o.custom_l4 = Some(t.clone());
        }
        if self.uses_h2() {
            // Offer h2, accept HTTP/1.1 (ALPN).
            o.set_http_version(2, 1);
        }
        // verify_cert and verify_hostname stay at their default: true.
        peer
    }

    fn set_addrs(&self, addrs: &[SocketAddr], valid_until: Instant) {
        let peers: Vec<HttpPeer> = addrs.iter().map(|a| self.make_peer(*a)).collect();
        let hashes = peers.iter().map(Peer::reuse_hash).collect();
        self.resolved.store(Arc::new(Resolved {
            peers,
            hashes,
            valid_until,
        }));
        self.preferred.store(0, Ordering::Relaxed);
    }

    /// Resolves the host when its last answer is due; a no-op for IP hosts.
    pub async fn resolve_if_due(&self) -> Result<(), UpstreamError> {
        let Some(resolver) = &self.resolver else {
            return Ok(());
        };
        if self.resolved.load().valid_until > Instant::now() {
            return Ok(());
        }
        let Ok(_guard) = self.resolving.try_lock() else {
            // Someone else is resolving; use what we have.
            return Ok(());
        };
        let host = self.dial_host.clone();
        match resolver.lookup_ip(host.as_str()).await {
            Ok(lookup) => {
                let addrs: Vec<SocketAddr> = lookup
                    .iter()
                    .map(|ip| SocketAddr::new(ip, self.dial_port))
                    .collect();
                if addrs.is_empty() {
                    return Err(UpstreamError::Resolve {
                        host,
                        reason: "no addresses".into(),
                    });
                }
                let ttl = lookup
                    .valid_until()
                    .saturating_duration_since(Instant::now().into_std())
                    .clamp(DEFAULT_MIN_DNS_TTL, DEFAULT_MAX_DNS_TTL);
                tracing::debug!(host = %self.dial_host, addrs = ?addrs, "upstream resolved");
                self.set_addrs(&addrs, Instant::now() + ttl);
                Ok(())
            }
            Err(e) => Err(UpstreamError::Resolve {
                host,
                reason: e.to_string(),
            }),
        }
    }

    fn peers(&self) -> Result<(Arc<Resolved>, usize), UpstreamError> {
        let r = self.resolved.load_full();
        if r.peers.is_empty() {
            return Err(UpstreamError::Resolve {
                host: self.dial_host.clone(),
                reason: "not resolved yet".into(),
            });
        }
        let first = self.preferred.load(Ordering::Relaxed) % r.peers.len();
        Ok((r, first))
    }

    /// The peer for the preferred resolved address.
    fn peer(&self) -> Result<HttpPeer, UpstreamError> {
        let (r, first) = self.peers()?;
        Ok(r.peers[first].clone())
    }

    /// The preferred resolved address, without cloning its peer.
    fn preferred_addr(&self) -> Result<SocketAddr, UpstreamError> {
        let (r, first) = self.peers()?;
        Ok(peer_addr(&r.peers[first]))
    }

    /// Opens a new connection, trying each resolved address in turn, and
    /// keeps count of failures in a row (for failover).
    async fn connect(&self) -> Result<(Stream, HttpPeer), UpstreamError> {
        self.connect_as(false).await
    }

    /// [`Self::connect`], offering HTTP/1.1 alone when `h1_only` (streamed
    /// media, even where requests go over HTTP/2).
    ///
    /// Boxed: pingora's connect (TCP, TLS, a proxy tunnel) is a ~9 KiB
    /// future, and every exchange that might connect would carry it inline
    /// and move it per request; a new connection is rare, so it pays one
    /// allocation instead.
    fn connect_as(
        &self,
        h1_only: bool,
    ) -> futures_util::future::BoxFuture<'_, Result<(Stream, HttpPeer), UpstreamError>> {
        Box::pin(self.connect_counted(h1_only))
    }

    async fn connect_counted(&self, h1_only: bool) -> Result<(Stream, HttpPeer), UpstreamError> {
        let result = self.connect_inner(h1_only).await;
        match &result {
            Ok(_) => {
                if self.stats.connect_failures.swap(0, Ordering::Relaxed) > 0 {
                    *self.stats.last_connect_error.lock() = None;
                }
            }
            Err(e) => {
                self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                *self.stats.last_connect_error.lock() = Some(e.to_string());
            }
        }
        result
    }

    /// Opens one connection and parks it in the pool: a health probe that
    /// also keeps the pool warm.
    pub async fn probe(&self) -> Result<(), UpstreamError> {
        self.resolved_or_resolve().await?;
        let (stream, peer) = self.connect().await?;
        self.pool.put(stream, peer.reuse_hash());
        Ok(())
    }

    /// Resolves now when no address is known yet, else when due.
    async fn resolved_or_resolve(&self) -> Result<(), UpstreamError> {
        match self.resolve_if_due().await {
            Err(e) if self.resolved.load().peers.is_empty() => {
                self.stats.connect_failures.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
            _ => Ok(()),
        }
    }

    async fn connect_inner(&self, h1_only: bool) -> Result<(Stream, HttpPeer), UpstreamError> {
        let (r, first) = self.peers()?;
        let n = r.peers.len();
        let mut last = None;
        for i in 0..n {
            let idx = (first + i) % n;
            let peer = &if h1_only {
                h1_peer(&r.peers[idx])
            } else {
                r.peers[idx].clone()
            };
            match self.transport.new_stream(peer).await {
                Ok(stream) => {
                    self.stats.opened.inc();
                    if i > 0 {
                        self.preferred.store(idx, Ordering::Relaxed);
                    }
                    return Ok((stream, peer.clone()));
                }
                Err(e) => {
                    let addr = match &self.tunnel {
                        // The reason names the proxy.
                        Some(t) => t.target.clone(),
                        None => peer.address().to_string(),
                    };
                    tracing::warn!(upstream = %addr, error = %e, "upstream connect failed");
                    last = Some(if matches!(e.etype(), ErrorType::ConnectTimedout) {
                        UpstreamError::ConnectTimeout {
                            addr,
                            after: self.conf.connect_timeout,
                        }
                    } else {
                        UpstreamError::Connect {
                            addr,
                            // The tunnel's own words say what to change.
                            reason: match (e.etype(), &e.context) {
                                (ErrorType::ConnectProxyFailure, Some(c)) => c.to_string(),
                                _ => e.to_string(),
                            },
                        }
                    });
                }
            }
        }
        Err(last.expect("at least one peer"))
    }

    /// Sends a request with an in-memory body and reads the answer's head:
    /// a stream of a shared HTTP/2 connection when this host speaks it,
    /// else our HTTP/1.1 exchange ([`Self::call`], which keeps the
    /// pooled-then-fresh rule). With `by`, every wait also ends at that
    /// answer deadline.
    pub async fn send<R: Outgoing + ?Sized>(
        &self,
        req: &R,
        body: &[u8],
        by: Option<AnswerDeadline>,
    ) -> Result<Exchange<'_>, UpstreamError> {
        if self.uses_h2() {
            // Boxed: the HTTP/2 send is a few hundred bytes of future the
            // HTTP/1.1 requests would otherwise carry and move.
            if let Some(x) = Box::pin(self.send_h2(req, body, by)).await? {
                return Ok(Exchange::H2(Box::new((x, Bytes::new()))));
            }
        }
        let mut wire = self.h1_head(req, 320 + body.len())?;
        self.call(&mut wire, body, req.idempotent(), by)
            .await
            .map(Exchange::H1)
    }

    /// Opens an HTTP/1.1 exchange for a body the caller streams (media up-
    /// and downloads stay on HTTP/1.1 whatever `upstream.http2` says): the
    /// same pool, connects, counters and connection rule as [`Self::send`].
    /// The head goes out now, framed by the request's `Content-Length` or,
    /// without one, `Transfer-Encoding: chunked` (`chunked`).
    pub async fn open(
        &self,
        req: &RequestHeader,
        chunked: bool,
    ) -> Result<Upload<'_>, UpstreamError> {
        let mut wire = self.h1_head(req, 512)?;
        self.end_head(&mut wire);
        self.open_raw(&wire, chunked).await
    }

    /// `req`'s request line and headers as HTTP/1.1 sends them, in a buffer
    /// of `capacity`; one it cannot carry is a failed request.
    fn h1_head<R: Outgoing + ?Sized>(
        &self,
        req: &R,
        capacity: usize,
    ) -> Result<Vec<u8>, UpstreamError> {
        let mut wire = Vec::with_capacity(capacity);
        req.h1_head(&mut wire).map_err(|reason| {
            self.stats.failed.inc();
            UpstreamError::Exchange {
                addr: self.url.to_string(),
                reason: reason.into(),
            }
        })?;
        Ok(wire)
    }

    /// Ends a request head with this host's `Host`, `Accept-Encoding:
    /// identity` (every answer is read here: its errcode, our token in it)
    /// and the blank line.
    fn end_head(&self, wire: &mut Vec<u8>) {
        wire.extend_from_slice(b"Host: ");
        wire.extend_from_slice(self.host_header.as_bytes());
        wire.extend_from_slice(b"\r\nAccept-Encoding: identity\r\n\r\n");
    }

    /// Live HTTP/2 connections, for `/status`.
    pub fn h2_open(&self) -> usize {
        self.h2.lock().iter().filter(|c| !c.is_closed()).count()
    }

    /// Parked HTTP/1.1 connections, for `/status`.
    pub fn idle(&self) -> usize {
        self.pool.parked()
    }

    /// Whether requests go over HTTP/2 (configured, and not declined).
    pub fn uses_h2(&self) -> bool {
        self.conf.http2 && !self.h2_declined.load(Ordering::Relaxed)
    }

    /// Makes sure `warm_connections` connections sit in the pool: takes what
    /// is pooled (refreshing its idle timer), opens the rest, returns all.
    pub async fn warm(&self) {
        let n = self.conf.warm_connections;
        if n == 0 {
            return;
        }
        if self.uses_h2() {
            // One multiplexed connection is the warm pool.
            match self.h2_stream(None).await {
                Ok(Some(_)) => return,
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "warming the HTTP/2 connection failed");
                    return;
                }
            }
        }
        let peer = match self.peer() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "cannot warm the upstream pool");
                return;
            }
        };
        let attempts = (0..n).map(|_| async {
            match self.pool.take(peer.reuse_hash()) {
                Some(s) => Some((s, peer.clone())),
                None => match self.connect().await {
                    Ok(x) => Some(x),
                    Err(e) => {
                        tracing::warn!(error = %e, "warming the upstream pool failed");
                        None
                    }
                },
            }
        });
        let streams = futures_util::future::join_all(attempts).await;
        for (stream, p) in streams.into_iter().flatten() {
            self.pool.put(stream, p.reuse_hash());
        }
    }

    /// Background upkeep: re-resolve by TTL and keep the pool warm. Runs in
    /// the proxy's runtime so the pooled sockets belong to the same reactor
    /// as the requests that use them.
    pub async fn maintain(self: Arc<Self>) {
        let period = (self.conf.idle_timeout.mul_f32(0.8)).max(Duration::from_secs(1));
        loop {
            tokio::time::sleep(period.min(DEFAULT_MAX_DNS_TTL)).await;
            if let Err(e) = self.resolve_if_due().await {
                tracing::warn!(error = %e, "re-resolving the upstream failed; keeping the old addresses");
            }
            self.pool.prune();
            self.warm().await;
        }
    }
}

/// `peer` offering HTTP/1.1 alone (its pooled connections are kept apart
/// from those that may have agreed on h2: the version is in the pool key).
fn h1_peer(peer: &HttpPeer) -> HttpPeer {
    let mut p = peer.clone();
    p.options.set_http_version(1, 1);
    p
}

/// The CA file every upstream TLS connection trusts: the system roots
/// plus the families' `ca_file`s; `None` when neither adds one.
pub fn ca_bundle_for(
    config: &wxsidecar_config::Config,
    wecom_in_use: bool,
) -> Result<Option<std::path::PathBuf>, String> {
    let mut extras: Vec<&std::path::Path> = config
        .upstream
        .ca_file
        .iter()
        .map(|p| p.as_path())
        .collect();
    if wecom_in_use {
        extras.extend(config.wecom_upstream.ca_file.as_deref());
    }
    if extras.is_empty() {
        Ok(None)
    } else {
        ca_bundle(&extras).map(Some)
    }
}

/// The resolver for an upstream family: the system's nameservers or
/// `upstream.dns`, and `/etc/hosts` only outside transparent mode.
pub fn build_resolver(conf: &UpstreamConfig) -> TokioAsyncResolver {
    use hickory_resolver::config::{NameServerConfig, NameServerConfigGroup, Protocol};
    let (mut config, mut opts) = hickory_resolver::system_conf::read_system_conf()
        .unwrap_or_else(|_| (ResolverConfig::default(), ResolverOpts::default()));
    if !conf.dns.is_empty() {
        let mut group = NameServerConfigGroup::new();
        for addr in &conf.dns {
            group.push(NameServerConfig::new(*addr, Protocol::Udp));
            group.push(NameServerConfig::new(*addr, Protocol::Tcp));
        }
        config = ResolverConfig::from_parts(None, Vec::new(), group);
    }
    // Loopback tests and most WeChat clients are IPv4; try v4 first, then v6.
    opts.ip_strategy = LookupIpStrategy::Ipv4thenIpv6;
    opts.use_hosts_file = conf.hosts_file;
    TokioAsyncResolver::tokio(config, opts)
}

/// Writes the CA bundle for upstream TLS: the system roots plus `extras`, so
/// a private CA is *added* to what the system trusts.
pub fn ca_bundle(extras: &[&Path]) -> Result<PathBuf, String> {
    let mut extra_pem = String::new();
    for extra in extras {
        let pem = std::fs::read_to_string(extra)
            .map_err(|e| format!("ca_file {}: {e}", extra.display()))?;
        if !pem.contains("-----BEGIN CERTIFICATE-----") {
            return Err(format!(
                "ca_file {}: no PEM certificate in it",
                extra.display()
            ));
        }
        extra_pem.push_str(&pem);
        extra_pem.push('\n');
    }
    let mut text = String::new();
    if let Ok(certs) = pingora::tls::load_native_certs() {
        for c in certs {
            text.push_str(&pem::encode(&pem::Pem::new("CERTIFICATE", c.to_vec())));
        }
    }
    text.push_str(&extra_pem);
    let path = std::env::temp_dir().join(format!("wxsidecar-ca-{}.pem", std::process::id()));
    std::fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(path)
}
