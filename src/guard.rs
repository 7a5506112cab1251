//! Bounds on the connections apps and admin callers hold, in front of every
//! listener: a cap on how many are open (at it, a new one closes the
//! connection idle longest, or is closed at once and counted when every one
//! is inside a request), and deadlines on what a connection may hold without
//! progress — a new connection's first byte within `limits.header_timeout`
//! of the accept, a kept-alive connection's next request within
//! `limits.idle_timeout`, and every request head within
//! `limits.header_timeout` of its first byte, and every answer write taken
//! by the app within `limits.send_timeout`; on a listener whose TLS it ends
//! ([`tls`]), the handshake within `limits.header_timeout`. Request bodies
//! and upstream answers have their own whole-message deadlines in the
//! request path.
//!
//! For HTTP/1.1 this runs pingora's keep-alive loop itself, so that between
//! requests a connection holds only a small future waiting for the next
//! byte, not pingora's whole request state machine (~14 KiB): that is most
//! of what an idle connection costs. Never reads or logs what passes.

pub use wxsidecar_upstream::bodies;
pub mod rewind;
pub mod tls;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use std::sync::LazyLock;
use tokio::time::Instant;

/// How often refusals are logged at most (they are counted every time).
const DEFAULT_REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// The connection limits of one listener.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    pub max: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    /// An answer write must be taken within this (`limits.send_timeout`).
    pub send_timeout: Duration,
}

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn now_ms() -> u64 {
    EPOCH.elapsed().as_millis() as u64
}

tokio::task_local! {
    /// Set once the current request's head is complete.
    static HEAD_DONE: Arc<AtomicBool>;
}

/// The request path calls this once a request head is complete: from here
/// the body and answer deadlines apply, not the head's.
pub fn head_complete() {
    let _ = HEAD_DONE.try_with(|done| done.store(true, Ordering::Relaxed));
}

/// `Idle::since` of a connection inside a request.
const BUSY: u64 = 0;
/// `Idle::since` of a connection chosen to close for a newcomer.
const SHED: u64 = u64::MAX;

/// Whether a connection is idle (waiting for a request's first byte: a new
/// one, or kept alive between requests) and since when, so that a full
/// listener can close the one idle longest to make room, as nginx does.
#[derive(Default)]
struct Idle {
    /// [`BUSY`], [`SHED`], or when it became idle (ms since [`EPOCH`], ≥ 1).
    since: AtomicU64,
    /// Woken when it is chosen to close.
    shed: tokio::sync::Notify,
}

impl Idle {
    /// It waits for a request from now on.
    fn waiting(&self) -> u64 {
        let now = now_ms().max(1);
        self.since.store(now, Ordering::Release);
        now
    }

    /// A request began: `false` when it was chosen to close meanwhile (the
    /// bytes that came are dropped with the connection).
    fn working(&self, since: u64) -> bool {
        self.since
            .compare_exchange(since, BUSY, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// Counts an open connection while it lives, and lists it with its cap.
struct Slot<'a> {
    cap: &'a Cap,
    id: u64,
    idle: Arc<Idle>,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.cap.conns.lock().remove(&self.id);
        self.cap.open.fetch_sub(1, Ordering::Relaxed);
        self.cap.open_gauge.dec();
    }
}

/// The cap of one listener: connections open (each with its idle state),
/// sheddings and refusals counted.
struct Cap {
    max: usize,
    listener: &'static str,
    open: AtomicUsize,
    conns: parking_lot::Mutex<std::collections::HashMap<u64, Arc<Idle>>>,
    next_id: AtomicU64,
    open_gauge: prometheus::IntGauge,
    refused: prometheus::IntCounter,
    shed: prometheus::IntCounter,
    /// When a refusal was last logged (ms since [`EPOCH`], 0: never).
    last_logged: AtomicU64,
}

impl Cap {
    fn new(max: usize, listener: &'static str) -> Self {
        Cap {
            max,
            listener,
            open: AtomicUsize::new(0),
            conns: Default::default(),
            next_id: AtomicU64::new(0),
            open_gauge: crate::metrics::CONNECTIONS_OPEN.with_label_values(&[listener]),
            refused: crate::metrics::CONNECTIONS_REFUSED.with_label_values(&[listener]),
            shed: crate::metrics::CONNECTIONS_SHED.with_label_values(&[listener]),
            last_logged: AtomicU64::new(0),
        }
    }

    /// A place for a new connection: at the cap, the connection idle
    /// longest is closed to make room (it leaves a moment later, so the
    /// count is over the cap by the connections still leaving); `None`
    /// when every connection is inside a request (refused and counted).
    fn enter(&self) -> Option<Slot<'_>> {
        if self.open.fetch_add(1, Ordering::Relaxed) >= self.max && !self.shed_one() {
            self.open.fetch_sub(1, Ordering::Relaxed);
            self.refuse();
            return None;
        }
        self.open_gauge.inc();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let idle = Arc::new(Idle::default());
        self.conns.lock().insert(id, idle.clone());
        Some(Slot {
            cap: self,
            id,
            idle,
        })
    }

    /// Closes the connection idle longest, if one is: whether one was.
    /// A scan of the listener's connections, only when it is full.
    fn shed_one(&self) -> bool {
        let conns = self.conns.lock();
        loop {
            let oldest = conns
                .values()
                .map(|c| (c.since.load(Ordering::Acquire), c))
                .filter(|(s, _)| *s != BUSY && *s != SHED)
                .min_by_key(|(s, _)| *s);
            let Some((since, conn)) = oldest else {
                return false;
            };
            // It may have begun a request since: then look again.
            if conn
                .since
                .compare_exchange(since, SHED, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                conn.shed.notify_one();
                self.shed.inc();
                return true;
            }
        }
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
                max = self.max,
                "connection limit reached and every connection is inside a request; closing new connections at once (logged once a minute, counted in wxsidecar_connections_refused_total)"
            );
        }
    }
}

/// A lane that serves the common request itself, before pingora's HTTP
/// session is built (see `proxy::fast`).
pub trait Fast: Send + Sync + 'static {
    /// Serves the request whose first bytes are `data`, if it is one this
    /// lane takes. `None`: not taken — nothing was written and nothing is
    /// consumed, so the bytes go to pingora as they came.
    fn serve(
        &self,
        stream: &mut Stream,
        data: &[u8],
    ) -> impl std::future::Future<Output = Option<Served>> + Send;
}

/// A request the fast lane answered.
pub struct Served {
    /// Bytes of `data` that were the request (the rest is a pipelined next one).
    pub used: usize,
    /// Whether the connection may carry another request.
    pub keep_alive: bool,
}

/// No fast lane: every request goes to pingora.
pub struct NoFast;

impl Fast for NoFast {
    async fn serve(&self, _stream: &mut Stream, _data: &[u8]) -> Option<Served> {
        None
    }
}

/// An HTTP app behind the cap and the deadlines.
pub struct Guarded<A, F = NoFast> {
    inner: Arc<A>,
    limits: ConnLimits,
    /// `None` where a connection was counted before it got here (the
    /// forward proxy's tunnels, capped by their listener).
    cap: Option<Cap>,
    fast: F,
    /// The HTTPS listener's TLS, done here under the cap and the head
    /// deadline (transparent mode).
    tls: Option<crate::guard::tls::TlsFront>,
}

impl<A> Guarded<A> {
    pub fn new(inner: A, limits: ConnLimits, listener: &'static str) -> Self {
        Guarded::with_fast(inner, limits, listener, NoFast)
    }

    /// The deadlines without a cap of its own: for connections a capped
    /// listener already counts.
    pub fn uncapped(inner: A, limits: ConnLimits) -> Self {
        Guarded {
            inner: Arc::new(inner),
            limits,
            cap: None,
            fast: NoFast,
            tls: None,
        }
    }
}

impl<A, F> Guarded<A, F> {
    /// With a fast lane tried before pingora on plain connections.
    pub fn with_fast(inner: A, limits: ConnLimits, listener: &'static str, fast: F) -> Self {
        Guarded {
            inner: Arc::new(inner),
            limits,
            cap: Some(Cap::new(limits.max, listener)),
            fast,
            tls: None,
        }
    }

    /// Ends TLS itself on the connections `front` serves.
    pub fn with_tls(mut self, front: crate::guard::tls::TlsFront) -> Self {
        self.tls = Some(front);
        self
    }
}

/// Whether pingora carried bytes of a pipelined next request over from the
/// last one: then the next head is already read and must not be waited for.
/// pingora 0.9 has no getter for this; its `Debug` output names the field.
fn has_pipelined_prefix(settings: &HttpPersistentSettings) -> bool {
    !format!("{settings:?}").contains("pipelined_prefix: None")
}

/// What waiting for the next request found.
enum FirstRead {
    /// Bytes came (not yet put back for the parser); `true` when they
    /// hold the whole head (no head deadline needed).
    Came(Vec<u8>, bool),
    /// Nothing within the limit, the peer closed, or shutdown: close.
    Close,
}

/// The end of a request head; the searcher is built once (building one
/// per request showed in the profile).
static HEAD_END: LazyLock<memchr::memmem::Finder<'static>> =
    LazyLock::new(|| memchr::memmem::Finder::new(b"\r\n\r\n"));

/// How much of the next request the guard reads itself: one template send
/// (head and body) fits, so the parser finds it all without another read.
const DEFAULT_FIRST_READ: usize = 4096;

thread_local! {
    /// Scratch space for the first read, borrowed only inside one poll, so
    /// an idle connection holds no buffer while it waits.
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; DEFAULT_FIRST_READ].into_boxed_slice());
}

/// Waits for the next request's first bytes, up to `limit`, or for
/// shutdown; reads them (one `recv` on a plain socket, as the parser would
/// have) for the fast lane or, through [`put_back`], pingora's parser.
/// While it waits the connection is idle (`idle`, where its listener is
/// capped): closed when a newcomer needs its place.
async fn first_read(
    mut stream: Stream,
    until: Instant,
    mut timer: std::pin::Pin<&mut tokio::time::Sleep>,
    shutdown: &ShutdownWatch,
    stopping: std::pin::Pin<&mut impl std::future::Future>,
    idle: Option<&Idle>,
) -> (Stream, FirstRead) {
    use tokio::io::ReadBuf;
    if *shutdown.borrow() {
        return (stream, FirstRead::Close);
    }
    let since = idle.map(Idle::waiting);
    let shed = async {
        match idle {
            Some(i) => i.shed.notified().await,
            None => std::future::pending().await,
        }
    };
    let read = std::future::poll_fn(|cx| {
        SCRATCH.with_borrow_mut(|buf| {
            let mut rb = ReadBuf::new(buf);
            match std::pin::Pin::new(&mut *stream).poll_read(cx, &mut rb) {
                std::task::Poll::Ready(Ok(())) => std::task::Poll::Ready(Ok(rb.filled().to_vec())),
                std::task::Poll::Ready(Err(e)) => std::task::Poll::Ready(Err(e)),
                std::task::Poll::Pending => std::task::Poll::Pending,
            }
        })
    });
    if timer.deadline() > until {
        timer.as_mut().reset(until);
    }
    // The connection's one timer fires at or before `until`; fired early
    // (it was set for an earlier wait), it is moved on, not re-armed per request.
    let expired = async {
        loop {
            timer.as_mut().await;
            if Instant::now() >= until {
                return;
            }
            timer.as_mut().reset(until);
        }
    };
    let outcome = tokio::select! {
        biased;
        got = read => match got {
            Ok(data) if !data.is_empty() => {
                let whole_head = HEAD_END.find(&data).is_some();
                FirstRead::Came(data, whole_head)
            }
            _ => FirstRead::Close,
        },
        _ = stopping => FirstRead::Close,
        _ = shed => FirstRead::Close,
        _ = expired => FirstRead::Close,
    };
    let outcome = match (idle.zip(since), outcome) {
        // Chosen to close just as a request came: it goes with the connection.
        (Some((i, s)), FirstRead::Came(..)) if !i.working(s) => FirstRead::Close,
        (_, o) => o,
    };
    (stream, outcome)
}

/// The largest request head taken (nginx: four 8 KiB buffers); pingora's
/// parser would buffer up to 1 MiB, which 10,000 connections make 10 GB.
const DEFAULT_MAX_HEAD: usize = 64 * 1024;

enum RestOfHead {
    /// The head is whole in these bytes (a body may follow in them).
    Whole(Vec<u8>),
    TooLarge,
    /// Closed, failed, or not whole by the head deadline.
    Closed,
}

/// Reads on after `data` until the request head is whole, by `until`,
/// refusing one over [`DEFAULT_MAX_HEAD`].
async fn rest_of_head(stream: &mut Stream, mut data: Vec<u8>, until: Instant) -> RestOfHead {
    use tokio::io::AsyncReadExt;
    let mut scanned: usize = 0;
    loop {
        // The end may straddle the previous read's last bytes. An empty
        // line ends the head, CRLF or bare LF alike: the parser judges it.
        let fresh = &data[scanned.saturating_sub(2)..];
        if memchr::memmem::find(fresh, b"\n\r\n").is_some()
            || memchr::memmem::find(fresh, b"\n\n").is_some()
        {
            return RestOfHead::Whole(data);
        }
        if data.len() > DEFAULT_MAX_HEAD {
            return RestOfHead::TooLarge;
        }
        scanned = data.len();
        data.reserve(DEFAULT_FIRST_READ);
        match tokio::time::timeout_at(until, stream.read_buf(&mut data)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return RestOfHead::Closed,
        }
    }
}

/// Answers a request whose head is over [`DEFAULT_MAX_HEAD`] (the
/// connection then closes).
async fn refuse_large_head(stream: &mut Stream) {
    tracing::info!(
        limit = DEFAULT_MAX_HEAD,
        "request head over the limit; answered 431 and closed"
    );
    let msg = format!("request head over {DEFAULT_MAX_HEAD} bytes");
    refuse_head(stream, "431 Request Header Fields Too Large", &msg).await
}

/// Whether the head at the start of `data` is one RFC 9112 allows
/// ([`crate::head`]); if not, it is answered 400 naming what is wrong (the
/// connection then closes) and nothing of it goes further.
async fn head_allowed(stream: &mut Stream, data: &[u8]) -> bool {
    let Err(bad) = crate::head::check(data) else {
        return true;
    };
    tracing::debug!(problem = %bad, "malformed request head; answered 400 and closed");
    refuse_head(stream, "400 Bad Request", &format!("bad request: {bad}")).await;
    false
}

/// Writes a refusal of a request head, WeChat-shaped, and asks to close.
async fn refuse_head(stream: &mut Stream, status: &str, msg: &str) {
    use tokio::io::AsyncWriteExt;
    let body =
        serde_json::json!({ "errcode": 40035, "errmsg": format!("wxsidecar: {msg}") }).to_string();
    let answer = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let write = async {
        stream.write_all(answer.as_bytes()).await?;
        stream.flush().await
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), write).await;
}

/// Puts bytes read ahead back, for the next reader: into a plain socket's
/// own buffer, or in front of a TLS stream ([`rewind::Rewound`]).
fn put_back(stream: Stream, data: &[u8]) -> Stream {
    use pingora::protocols::l4::stream::Stream as L4Stream;
    if !stream.as_any().is::<L4Stream>() {
        return rewind::Rewound::put_back(stream, data);
    }
    let mut l4: Box<L4Stream> = stream.into_any().downcast().expect("checked to be l4");
    l4.rewind(data);
    l4
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static, F: Fast> ServerApp for Guarded<A, F> {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let slot = match &self.cap {
            Some(cap) => Some(cap.enter()?),
            None => None,
        };
        let idle = slot.as_ref().map(|s| &*s.idle);
        if let Some(tls) = self.tls.as_ref().filter(|t| t.serves(&stream)) {
            // Boxed: a handshake's state is kilobytes that every connection's
            // future (idle ones too) would otherwise carry.
            stream = Box::pin(tls.handshake(stream, self.limits.header_timeout)).await?;
        }
        if matches!(
            stream.selected_alpn_proto(),
            Some(pingora::protocols::ALPN::H2)
        ) {
            // Not offered by our listeners; pingora's own loop if it happens.
            return ServerApp::process_new(&self.inner, stream, shutdown).await;
        }
        // The fast lane serves plain sockets; TLS (transparent mode) goes to
        // pingora, its head read ahead and bounded here all the same.
        let plain = stream
            .as_any()
            .is::<pingora::protocols::l4::stream::Stream>();
        let head_done = Arc::new(AtomicBool::new(false));
        let mut settings: Option<HttpPersistentSettings> = None;
        let mut kept = false;
        let keepalive = self.limits.idle_timeout.as_secs().max(1);
        // One timer for every wait on this connection (see `first_read`).
        let timer = tokio::time::sleep(self.limits.header_timeout);
        tokio::pin!(timer);
        // One wait for shutdown for the connection's life: registered once,
        // not at every request (its unlinking showed in the profile).
        let mut watch = shutdown.clone();
        let stopping = watch.changed();
        tokio::pin!(stopping);
        loop {
            // Between requests only this small future is held.
            let pipelined = settings.as_ref().is_some_and(has_pipelined_prefix);
            let wait = if kept {
                self.limits.idle_timeout
            } else {
                self.limits.header_timeout
            };
            // `None`: the head is already in hand, no deadline needed.
            let mut head_limit = Some(self.limits.header_timeout);
            if !pipelined {
                let until = Instant::now() + wait;
                let (back, found) = first_read(
                    stream,
                    until,
                    timer.as_mut(),
                    shutdown,
                    stopping.as_mut(),
                    idle,
                )
                .await;
                stream = back;
                match found {
                    FirstRead::Came(data, true) => {
                        if !head_allowed(&mut stream, &data).await {
                            return None;
                        }
                        let served = match plain {
                            true => self.fast.serve(&mut stream, &data).await,
                            false => None,
                        };
                        if let Some(done) = served {
                            if !done.keep_alive {
                                return None;
                            }
                            if done.used < data.len() {
                                stream = put_back(stream, &data[done.used..]);
                            }
                            kept = true;
                            continue;
                        }
                        stream = put_back(stream, &data);
                        head_limit = None;
                    }
                    FirstRead::Came(data, false) => {
                        // The rest of the head is read here, bounded, before
                        // pingora's parser would buffer up to 1 MiB of it.
                        let until = Instant::now() + self.limits.header_timeout;
                        match rest_of_head(&mut stream, data, until).await {
                            RestOfHead::Whole(data) => {
                                if !head_allowed(&mut stream, &data).await {
                                    return None;
                                }
                                stream = put_back(stream, &data);
                                head_limit = None;
                            }
                            RestOfHead::TooLarge => {
                                refuse_large_head(&mut stream).await;
                                return None;
                            }
                            RestOfHead::Closed => return None,
                        }
                    }
                    FirstRead::Close => return None,
                }
            }
            let mut session = ServerSession::new_http1(stream);
            // pingora bounds each of its writes by this (it has no default).
            session.set_write_timeout(Some(self.limits.send_timeout));
            match settings.take() {
                Some(s) => s.apply_to_session(&mut session),
                None if kept => session.set_keepalive(Some(keepalive)),
                None => {
                    session.set_keepalive(Some(keepalive));
                    session.set_keepalive_reuses_remaining(
                        self.inner
                            .server_options()
                            .and_then(|o| o.keepalive_request_limit),
                    );
                }
            }
            if *shutdown.borrow() {
                session.set_keepalive(None);
            }
            head_done.store(false, Ordering::Relaxed);
            let work = HEAD_DONE.scope(
                head_done.clone(),
                self.inner.process_new_http(session, shutdown),
            );
            tokio::pin!(work);
            let reused = match head_limit {
                None => work.await,
                Some(limit) => tokio::select! {
                    reused = &mut work => reused,
                    _ = tokio::time::sleep(limit) => {
                        if !head_done.load(Ordering::Relaxed) {
                            // The head is late: dropping the work closes the connection.
                            return None;
                        }
                        work.await
                    }
                },
            };
            (stream, settings) = reused?.consume();
            kept = true;
        }
    }

    async fn cleanup(&self) {
        self.inner.http_cleanup().await
    }
}

/// A raw app (the forward proxy reads the socket itself, CONNECT then
/// TLS, and bounds its own head) behind the cap only.
pub struct Capped<A> {
    inner: Arc<A>,
    cap: Cap,
}

impl<A> Capped<A> {
    pub fn new(inner: A, max: usize, listener: &'static str) -> Self {
        Capped {
            inner: Arc::new(inner),
            cap: Cap::new(max, listener),
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Capped<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let _slot = self.cap.enter()?;
        self.inner.process_new(stream, shutdown).await
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}

/// File descriptors kept for what is not an app connection: the upstream
/// pools, Redis, the resolver, logs and files.
pub const DEFAULT_FD_RESERVE: usize = 256;

/// Raises the soft limit on open files to the hard limit, so the
/// connection cap (not `EMFILE`) is what bounds connections; returns the
/// limit now in force (`None` when it cannot be read).
pub fn raise_nofile_limit() -> Option<usize> {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => {
            tracing::debug!(limit = n, "open-file limit raised to the hard limit");
            Some(usize::try_from(n).unwrap_or(usize::MAX))
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open-file limit");
            None
        }
    }
}

/// The app listener's cap: as configured, lowered when the open-file
/// limit could not hold it besides the admin cap and [`DEFAULT_FD_RESERVE`],
/// so a full listener closes new connections at once instead of leaving
/// them hanging on `EMFILE` while upstream connects fail.
pub fn fit_to_fd_limit(configured: usize, others: usize, nofile: Option<usize>) -> usize {
    let Some(nofile) = nofile else {
        return configured;
    };
    let room = nofile.saturating_sub(others + DEFAULT_FD_RESERVE).max(16);
    if configured > room {
        tracing::warn!(
            configured,
            open_file_limit = nofile,
            using = room,
            "limits.max_connections is above what the open-file limit allows; using the lower number (raise `ulimit -n` or LimitNOFILE)"
        );
        room
    } else {
        configured
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_fits_the_open_file_limit() {
        assert_eq!(fit_to_fd_limit(10_000, 64, Some(1_048_576)), 10_000);
        assert_eq!(fit_to_fd_limit(10_000, 64, Some(1024)), 1024 - 64 - 256);
        assert_eq!(fit_to_fd_limit(10_000, 64, None), 10_000);
        assert_eq!(fit_to_fd_limit(10_000, 64, Some(100)), 16);
    }

    /// A connection's two ends: ours as the guard holds it, the client's.
    fn pair() -> (Stream, tokio::io::DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        (Box::new(ours), theirs)
    }

    /// Waits for a request as the guard's loop does, with `wait` to come.
    async fn wait_for_request(
        stream: Stream,
        wait: Duration,
        shutdown: &ShutdownWatch,
        idle: Option<&Idle>,
    ) -> FirstRead {
        let until = Instant::now() + wait;
        let timer = tokio::time::sleep(wait);
        tokio::pin!(timer);
        let mut watch = shutdown.clone();
        let stopping = watch.changed();
        tokio::pin!(stopping);
        first_read(
            stream,
            until,
            timer.as_mut(),
            shutdown,
            stopping.as_mut(),
            idle,
        )
        .await
        .1
    }

    /// The idle deadline on tokio's clock: nothing by it, closed at it;
    /// a byte before it, read.
    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_is_closed_at_its_deadline_and_not_before() {
        let (_tx, shutdown) = tokio::sync::watch::channel(false);
        let (stream, _client) = pair();
        let start = Instant::now();
        let found = wait_for_request(stream, Duration::from_secs(60), &shutdown, None).await;
        assert!(matches!(found, FirstRead::Close));
        assert_eq!(start.elapsed(), Duration::from_secs(60));

        let (stream, mut client) = pair();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(59)).await;
            tokio::io::AsyncWriteExt::write_all(&mut client, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            client
        });
        let found = wait_for_request(stream, Duration::from_secs(60), &shutdown, None).await;
        assert!(matches!(found, FirstRead::Came(_, true)));
        drop(writer.await);
    }

    /// A head must be whole by its deadline: the rest of one trickled past
    /// it closes the connection; in time, it is whole.
    #[tokio::test(start_paused = true)]
    async fn a_head_is_whole_by_its_deadline_or_the_connection_closes() {
        let first = b"GET / HTTP/1.1\r\n".to_vec();
        let (mut stream, mut client) = pair();
        let until = Instant::now() + Duration::from_secs(10);
        let writer = tokio::spawn(async move {
            for _ in 0..20 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let _ = tokio::io::AsyncWriteExt::write_all(&mut client, b"X-A: 1\r\n").await;
            }
            client
        });
        let start = Instant::now();
        assert!(matches!(
            rest_of_head(&mut stream, first.clone(), until).await,
            RestOfHead::Closed
        ));
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        drop(writer);

        let (mut stream, mut client) = pair();
        let until = Instant::now() + Duration::from_secs(10);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(9)).await;
            tokio::io::AsyncWriteExt::write_all(&mut client, b"Host: x\r\n\r\n")
                .await
                .unwrap();
            client
        });
        assert!(matches!(
            rest_of_head(&mut stream, first, until).await,
            RestOfHead::Whole(_)
        ));
    }

    /// A full cap closes the connection idle longest, never one inside a
    /// request, and refuses when none is idle.
    #[tokio::test(start_paused = true)]
    async fn the_cap_sheds_the_connection_idle_longest() {
        let (_tx, shutdown) = tokio::sync::watch::channel(false);
        let cap = Cap::new(2, "test");
        let (older, newer) = (cap.enter().unwrap(), cap.enter().unwrap());
        // `older` waits from now, `newer` from a second later.
        let (stream, _c1) = pair();
        let (newer_since, newcomer) = {
            let older_waits = wait_for_request(
                stream,
                Duration::from_secs(60),
                &shutdown,
                Some(&older.idle),
            );
            tokio::pin!(older_waits);
            assert!(futures_util::poll!(older_waits.as_mut()).is_pending());
            tokio::time::advance(Duration::from_secs(1)).await;
            let newer_since = newer.idle.waiting();
            // A newcomer: the older one is chosen and wakes to close.
            let newcomer = cap.enter().expect("room made");
            assert!(matches!(older_waits.await, FirstRead::Close));
            (newer_since, newcomer)
        };
        assert_eq!(newer.idle.since.load(Ordering::Acquire), newer_since);
        drop(older);
        // `newer` begins a request; the newcomer is inside one too: the
        // next is refused.
        assert!(newer.idle.working(newer_since));
        assert!(cap.enter().is_none(), "none idle: refused");
        assert_eq!(cap.refused.get(), 1);
        assert_eq!(cap.shed.get(), 1);
        drop((newer, newcomer));
        assert_eq!(cap.open.load(Ordering::Relaxed), 0);
    }
}
