//! Bounds on the connections apps and admin callers hold, in front of every
//! listener: a cap on how many are open (over it, a new one is closed at
//! once and counted), and deadlines on what a connection may hold without
//! progress — a request head must arrive within `limits.header_timeout`
//! from its first byte (a new connection's first request within that long
//! of the accept), and a kept-alive connection's next request within
//! `limits.idle_timeout`. Request bodies and upstream answers have their own
//! whole-message deadlines in the request path.
//!
//! A connection's phase is kept in one atomic word shared by the stream
//! wrapper (which sees the bytes come and go) and the request path (which
//! says, through a task-local, when a head is complete). Never reads or
//! logs what passes through.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use once_cell::sync::Lazy;
use pingora::apps::ServerApp;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, Ssl, Stream, UniqueID,
    UniqueIDType,
};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// How often refusals are logged at most (they are counted every time).
const DEFAULT_REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// The connection limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub max: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    /// Whether to watch the phases (off where the app needs the raw socket,
    /// as the forward proxy does; it has its own head deadline).
    pub watch: bool,
}

/// Where a connection is between requests, in one word: the phase in the
/// top 2 bits, milliseconds since [`EPOCH`] below.
#[derive(Debug, Default)]
pub struct Phase(AtomicU64);

const FRESH: u64 = 0;
const HEAD: u64 = 1;
const BUSY: u64 = 2;
const DONE: u64 = 3;
const SHIFT: u32 = 62;
const MS_MASK: u64 = (1 << SHIFT) - 1;

static EPOCH: Lazy<Instant> = Lazy::new(Instant::now);

fn now_ms() -> u64 {
    EPOCH.elapsed().as_millis() as u64 & MS_MASK
}

impl Phase {
    fn new() -> Self {
        Phase(AtomicU64::new(now_ms()))
    }

    fn set(&self, phase: u64) {
        self.0.store((phase << SHIFT) | now_ms(), Ordering::Relaxed);
    }

    fn get(&self) -> (u64, u64) {
        let w = self.0.load(Ordering::Relaxed);
        (w >> SHIFT, w & MS_MASK)
    }

    /// Bytes arrived: between requests, that starts a head (a fresh
    /// connection's clock keeps running from the accept).
    fn on_read(&self) {
        match self.get() {
            (DONE, _) => self.set(HEAD),
            (FRESH, since) => self.0.store((HEAD << SHIFT) | since, Ordering::Relaxed),
            _ => {}
        }
    }

    /// An answer is being written: the request has been read, and the idle
    /// clock runs from the last write.
    fn on_write(&self) {
        if matches!(self.get().0, BUSY | DONE) {
            self.set(DONE);
        }
    }

    /// When the connection must be closed, given its phase now; `None`
    /// while a request is being served.
    fn deadline(&self, limits: &ConnLimits) -> Option<Instant> {
        let (p, since) = self.get();
        let allowed = match p {
            FRESH | HEAD => limits.header_timeout,
            DONE => limits.idle_timeout,
            _ => return None,
        };
        Some(*EPOCH + Duration::from_millis(since) + allowed)
    }
}

tokio::task_local! {
    static CURRENT: Arc<Phase>;
}

/// The request path calls this once a request head is complete: from here
/// the body and answer deadlines apply, not the head's.
pub fn head_complete() {
    let _ = CURRENT.try_with(|p| p.set(BUSY));
}

/// A stream that tells its [`Phase`] when bytes come in and go out.
#[derive(Debug)]
struct Watched {
    inner: Stream,
    phase: Arc<Phase>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.phase.on_read();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.phase.on_write();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.phase.on_write();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for Watched {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for Watched {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Watched {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<pingora::protocols::tls::SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<pingora::protocols::ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Watched {
    fn get_timing_digest(&self) -> Vec<Option<pingora::protocols::TimingDigest>> {
        self.inner.get_timing_digest()
    }
}

impl GetProxyDigest for Watched {
    fn get_proxy_digest(&self) -> Option<Arc<pingora::protocols::raw_connect::ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl GetSocketDigest for Watched {
    fn get_socket_digest(&self) -> Option<Arc<pingora::protocols::SocketDigest>> {
        self.inner.get_socket_digest()
    }
}

#[async_trait]
impl Peek for Watched {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

/// Counts an open connection while it lives.
struct Slot(Arc<AtomicUsize>, prometheus::IntGauge);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        self.1.dec();
    }
}

/// A listener's app behind the cap and the deadlines.
pub struct Guarded<A> {
    inner: Arc<A>,
    limits: ConnLimits,
    listener: &'static str,
    open: Arc<AtomicUsize>,
    open_gauge: prometheus::IntGauge,
    refused: prometheus::IntCounter,
    /// When a refusal was last logged (ms since [`EPOCH`], 0: never).
    last_logged: AtomicU64,
}

impl<A> Guarded<A> {
    pub fn new(inner: A, limits: ConnLimits, listener: &'static str) -> Self {
        Guarded {
            inner: Arc::new(inner),
            limits,
            listener,
            open: Arc::new(AtomicUsize::new(0)),
            open_gauge: crate::metrics::CONNECTIONS_OPEN.with_label_values(&[listener]),
            refused: crate::metrics::CONNECTIONS_REFUSED.with_label_values(&[listener]),
            last_logged: AtomicU64::new(0),
        }
    }

    /// Connections open now.
    pub fn open(&self) -> Arc<AtomicUsize> {
        self.open.clone()
    }

    fn refuse(&self) {
        self.refused.inc();
        let now = now_ms().max(1);
        let last = self.last_logged.load(Ordering::Relaxed);
        let interval = DEFAULT_REFUSAL_LOG_INTERVAL.as_millis() as u64;
        if (last == 0 || now.saturating_sub(last) >= interval)
            && self
                .last_logged
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                listener = self.listener,
                max = self.limits.max,
                "connection limit reached; closing new connections at once (logged once a minute, counted in wxsidecar_connections_refused_total)"
            );
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Guarded<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        if self.open.fetch_add(1, Ordering::Relaxed) >= self.limits.max {
            self.open.fetch_sub(1, Ordering::Relaxed);
            self.refuse();
            return None;
        }
        self.open_gauge.inc();
        let _slot = Slot(self.open.clone(), self.open_gauge.clone());
        if !self.limits.watch {
            return self.inner.process_new(stream, shutdown).await;
        }
        let phase = Arc::new(Phase::new());
        let watched: Stream = Box::new(Watched {
            inner: stream,
            phase: phase.clone(),
        });
        let work = CURRENT.scope(phase.clone(), self.inner.process_new(watched, shutdown));
        tokio::pin!(work);
        // Woken at the phase's deadline, or at least this often to notice a
        // phase change while a request was being served.
        let recheck = self.limits.header_timeout.min(self.limits.idle_timeout);
        loop {
            let wake = match phase.deadline(&self.limits) {
                Some(d) => d.min(Instant::now() + recheck),
                None => Instant::now() + recheck,
            };
            tokio::select! {
                reused = &mut work => return reused,
                _ = tokio::time::sleep_until(wake) => {
                    if phase.deadline(&self.limits).is_some_and(|d| d <= Instant::now()) {
                        // Dropping the work closes the connection.
                        return None;
                    }
                }
            }
        }
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}

/// Raises the soft limit on open files to the hard limit, so the
/// connection cap (not `EMFILE`) is what bounds connections.
pub fn raise_nofile_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "open-file limit raised to the hard limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ConnLimits {
        ConnLimits {
            max: 1,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            watch: true,
        }
    }

    #[test]
    fn phases_move_with_the_bytes() {
        let p = Phase::new();
        let l = limits();
        let fresh = p.deadline(&l).unwrap();
        // The first bytes keep the accept's clock.
        p.on_read();
        assert_eq!(p.get().0, HEAD);
        assert_eq!(p.deadline(&l).unwrap(), fresh);
        // A complete head: no head deadline while served.
        p.set(BUSY);
        p.on_read();
        assert_eq!(p.get().0, BUSY);
        assert!(p.deadline(&l).is_none());
        // The answer: idle clock.
        p.on_write();
        assert_eq!(p.get().0, DONE);
        let idle = p.deadline(&l).unwrap();
        assert!(idle >= fresh + Duration::from_secs(49));
        // The next request's first byte: head clock.
        p.on_read();
        assert_eq!(p.get().0, HEAD);
        assert!(p.deadline(&l).unwrap() < idle);
    }
}
