//! The fast lane: the common request — an HTTP/1.1 `GET` or `POST` to a
//! JSON API path, whole in the first read — answered without building
//! pingora's HTTP session, header maps or URIs: the head is parsed with
//! `httparse` where it lies, the upstream request written as bytes, the
//! answer read by our own HTTP/1.1 exchange (over an HTTP/2 upstream, a
//! stream of pingora's shared connection) and written back in one write.
//!
//! The lane is a strict subset of what the request path serves, and it
//! decides before touching anything: whatever it does not take (another
//! route, a body still to come, anything ambiguous in the framing — a
//! `Transfer-Encoding`, two lengths, a bare LF, `Expect`, an escaped path,
//! a secret in the query, callers to admit, an account or token not at
//! hand) goes to pingora's path unchanged, which
//! answers it as before. What it takes behaves as that path does: the
//! token injected or replaced by the same rules, one replay after a token
//! error, the answer scrubbed of our token, the same errors, counters and
//! log line.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use pingora::protocols::Stream;
use tokio::io::AsyncWriteExt;

use crate::account::ACCOUNT_HEADER;
use crate::app::App;
use crate::guard::{Fast, Served as LaneServed};
use crate::metrics::Served;
use crate::pipeline::{self, Answer, Plan, Report, Request as _, Streaming, HOP_BY_HOP};
use crate::query::{self, TOKEN_PARAM};
use crate::reply::{self, ProxyError};

/// Headers a request may carry into the lane.
const DEFAULT_MAX_HEADERS: usize = 32;

/// Counts of what the lane did: requests it served, and those it left to
/// pingora's path (`wxsidecar_fast_lane_total{result}`).
static SERVED: std::sync::LazyLock<prometheus::IntCounter> =
    std::sync::LazyLock::new(|| crate::metrics::FAST_LANE.with_label_values(&["served"]));
static HANDED_OFF: std::sync::LazyLock<prometheus::IntCounter> =
    std::sync::LazyLock::new(|| crate::metrics::FAST_LANE.with_label_values(&["handed_off"]));

pub struct FastLane {
    app: Arc<App>,
    /// Each answer write must be taken by the app within this
    /// (`limits.send_timeout`, fixed at start like the other connection
    /// limits).
    send_timeout: Duration,
}

impl FastLane {
    pub fn new(app: Arc<App>, send_timeout: Duration) -> Self {
        // Both series show from the first scrape.
        std::sync::LazyLock::force(&SERVED);
        std::sync::LazyLock::force(&HANDED_OFF);
        FastLane { app, send_timeout }
    }
}

/// A request the lane takes, as it lies in the first read.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Head<'a> {
    pub post: bool,
    pub path: &'a str,
    pub query: Option<&'a str>,
    /// Header lines to forward, as received (hop-by-hop, `Host`,
    /// `Content-Length`, `X-Wx-Account` left out).
    pub forward: Vec<(&'a str, &'a [u8])>,
    pub account: Option<&'a str>,
    /// The `Host` value (there is exactly one).
    pub host: &'a [u8],
    pub body: &'a [u8],
    /// Bytes of the read that were this request.
    pub used: usize,
    /// The client asked to close after the answer.
    pub close: bool,
}

/// A table of the bytes in `extra` and ASCII letters and digits (one
/// lookup per byte instead of a scan of the list).
const fn byte_table(extra: &[u8]) -> [bool; 256] {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    let mut i = 0;
    while i < extra.len() {
        t[extra[i] as usize] = true;
        i += 1;
    }
    t
}

/// Bytes a path may hold in the lane: unreserved and sub-delims, `:`, `@`
/// and `/` — no escapes, no `;` parameters, nothing to normalise.
static PATH_BYTES: [bool; 256] = byte_table(b"/-._~!$&'()*+,=:@");
/// Query bytes: the same plus `%` escapes and `?`.
static QUERY_BYTES: [bool; 256] = byte_table(b"/-._~!$&'()*+,=:@%?");

fn path_byte_ok(b: u8) -> bool {
    PATH_BYTES[b as usize]
}

fn query_byte_ok(b: u8) -> bool {
    QUERY_BYTES[b as usize]
}

/// No `.` or `..` segment and no empty one but the last (`//` inside):
/// nothing a normaliser would change. `path` starts with `/`.
fn segments_plain(path: &str) -> bool {
    let mut segments = path.as_bytes()[1..].split(|&b| b == b'/').peekable();
    while let Some(seg) = segments.next() {
        let last = segments.peek().is_none();
        if seg == b"." || seg == b".." || (seg.is_empty() && !last) {
            return false;
        }
    }
    true
}

/// Header value bytes: visible ASCII, space and tab only.
fn value_ok(v: &[u8]) -> bool {
    v.iter().all(|&b| (0x20..0x7f).contains(&b) || b == b'\t')
}

/// Parses `data` as a request the lane takes; `None` for anything else.
/// Strict on purpose: every `None` goes to pingora's parser. `data` is a
/// head RFC 9112 allows (`head::check`, run by the guard first).
pub(crate) fn parse(data: &[u8], body_limit: usize) -> Option<Head<'_>> {
    let mut hs = [httparse::EMPTY_HEADER; DEFAULT_MAX_HEADERS];
    let mut req = httparse::Request::new(&mut hs);
    let head_len = match req.parse(data) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return None,
    };
    if req.version != Some(1) {
        return None;
    }
    let post = match req.method? {
        "GET" => false,
        "POST" => true,
        _ => return None,
    };
    // Line ends, controls, the request line's spacing and `Host` were
    // checked by the guard (`head::check`) before the lane saw the bytes.
    let target = req.path?;
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    if !path.starts_with('/')
        || !path.bytes().all(path_byte_ok)
        || !segments_plain(path)
        || !query.is_none_or(|q| q.bytes().all(query_byte_ok))
    {
        return None;
    }
    let mut length: Option<usize> = None;
    let mut hosts = 0;
    let mut host: &[u8] = &[];
    let mut close = false;
    let mut account = None;
    let mut forward = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        let name = h.name;
        if !value_ok(h.value) {
            return None;
        }
        let is = |n: &str| name.eq_ignore_ascii_case(n);
        if is("content-length") {
            let v = h.value;
            if length.is_some() || v.is_empty() || v.len() > 10 || !v.iter().all(u8::is_ascii_digit)
            {
                return None;
            }
            length = Some(std::str::from_utf8(v).ok()?.parse().ok()?);
        } else if is("host") {
            hosts += 1;
            host = h.value;
        } else if is("connection") {
            let v = h.value.trim_ascii();
            if v.eq_ignore_ascii_case(b"close") {
                close = true;
            } else if !v.eq_ignore_ascii_case(b"keep-alive") {
                return None;
            }
        } else if is(ACCOUNT_HEADER) {
            if account.is_some() {
                return None;
            }
            account = Some(std::str::from_utf8(h.value).ok()?);
        } else if is("transfer-encoding")
            || is("expect")
            || is("upgrade")
            || is("te")
            || is("trailer")
            || is(crate::route::SIGNATURE_HEADER)
            || HOP_BY_HOP.iter().any(|n| is(n))
        {
            return None;
        } else if is("content-type") {
            let v = h.value.trim_ascii_start();
            let starts = |p: &[u8]| crate::target::starts_with_ignore_case(v, p);
            if starts(b"multipart/") || starts(b"application/x-www-form-urlencoded") {
                return None;
            }
            forward.push((name, h.value));
        } else if pipeline::forwarded(name.as_bytes(), false) {
            forward.push((name, h.value));
        }
    }
    if hosts != 1 {
        return None;
    }
    // A GET with a body, a POST without a length: unusual, not ours.
    let length = match (post, length) {
        (false, None | Some(0)) => 0,
        (true, Some(n)) if n <= body_limit => n,
        _ => return None,
    };
    let used = head_len.checked_add(length)?;
    if data.len() < used {
        return None;
    }
    Some(Head {
        post,
        path,
        query,
        forward,
        account,
        host,
        body: &data[head_len..used],
        used,
        close,
    })
}

impl Fast for FastLane {
    async fn serve(&self, stream: &mut Stream, data: &[u8]) -> Option<LaneServed> {
        let peer = || {
            stream
                .get_socket_digest()
                .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()))
        };
        let Some(taken) = self.take(data, peer) else {
            HANDED_OFF.inc();
            return None;
        };
        SERVED.inc();
        let _in_flight = self.app.drain.enter();
        let start = tokio::time::Instant::now();
        let close = taken.head().close || self.app.drain.is_draining();
        let (head, account, (status, errcode, streamed, written)) = match taken {
            Taken::Serve(head, plan) => {
                // Counted for the account whose token was put in, as on
                // pingora's path.
                let account = plan.account.clone();
                let answered = self.answer(stream, &head, plan, close, start).await;
                (head, account, answered)
            }
            Taken::Refused(head, e) => {
                let answered = self.error(stream, head.path, e, close).await;
                (head, None, answered)
            }
        };
        pipeline::report(Report {
            route: Served::Api,
            account: account.as_deref(),
            method: head.method().as_str(),
            path: head.path,
            status,
            errcode,
            elapsed: start.elapsed(),
            lane: "fast",
        });
        Some(LaneServed {
            used: head.used,
            keep_alive: written.is_ok() && !close && !streamed,
        })
    }
}

/// What the lane does with a request it takes.
enum Taken<'a> {
    Serve(Head<'a>, Plan),
    /// `clients` turned the caller away: answered here, as the full path would.
    Refused(Head<'a>, ProxyError),
}

impl<'a> Taken<'a> {
    fn head(&self) -> &Head<'a> {
        match self {
            Taken::Serve(h, _) | Taken::Refused(h, _) => h,
        }
    }
}

impl FastLane {
    /// The request and its plan when the lane takes it, or the refusal
    /// of a caller `clients` turns away. Everything that could hand the
    /// request off is decided before the caller is admitted, so no request
    /// is admitted (and rate-counted) twice.
    fn take<'a>(&self, data: &'a [u8], peer: impl FnOnce() -> Option<IpAddr>) -> Option<Taken<'a>> {
        let app = &self.app;
        if app.drain.is_draining() {
            return None;
        }
        let mut head = parse(data, app.config().limits.buffered_body)?;
        if let Some(intercept) = &app.intercept {
            // A WeChat host (transparent mode's plain listener) names the
            // account family: the full path reads it.
            // (`covers` ignores case: nothing to allocate per request.)
            let host = crate::intercept::without_port(std::str::from_utf8(head.host).ok()?);
            if intercept.resolver.covers(host) {
                return None;
            }
        }
        if !crate::route::is_api(head.path)
            || head
                .query
                .is_some_and(|q| crate::target::secret_param(q.as_bytes()).is_some())
        {
            return None;
        }
        let presented = head.query.and_then(|q| query::param(q, TOKEN_PARAM));
        let (account, replace) =
            pipeline::choose(app, head.account, presented.as_deref(), None).ok()?;
        // The lane never waits for a token: none at hand, pingora's path.
        let plan = if replace {
            Plan::with_token(account.clone(), account.tokens.valid()?)
        } else {
            Plan::untouched(account.kind.family())
        };
        let clients = app.clients();
        if !clients.is_open() {
            let mut auths = head
                .forward
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case("authorization"));
            let auth = auths.next().map(|(_, v)| *v);
            if auths.next().is_some() {
                // Two credentials: the full path decides.
                return None;
            }
            let addr = if clients.needs_address() {
                peer()
            } else {
                None
            };
            let admitted = clients.admit(addr, auth).and_then(|caller| {
                clients.account(&caller, &account.name, account.platform.as_deref())
            });
            if let Err(denied) = admitted {
                return Some(Taken::Refused(head, ProxyError::Denied(denied)));
            }
            if app.clients().uses_tokens() {
                // Our own bearer token is for us, never for WeChat.
                head.forward
                    .retain(|(n, _)| !n.eq_ignore_ascii_case("authorization"));
            }
        }
        Some(Taken::Serve(head, plan))
    }

    /// Sends the request through the pipeline and writes the answer.
    /// Returns the status and errcode written, whether the answer was
    /// streamed (the connection then closes), and whether writing worked.
    async fn answer(
        &self,
        stream: &mut Stream,
        head: &Head<'_>,
        mut plan: Plan,
        close: bool,
        start: tokio::time::Instant,
    ) -> (u16, Option<i64>, bool, std::io::Result<()>) {
        let app = &self.app;
        let upstreams = app.upstream_for(plan.family);
        // The answer's share of limits.buffered_total, held until it is written.
        let mut claim = app.bodies.answer();
        let answer =
            pipeline::exchange(app, &upstreams, &mut plan, head, Some(start), &mut claim).await;
        match answer {
            Err(e) => self.error(stream, head.path, e, close).await,
            Ok(Answer::Streaming(s)) => {
                let status = s.status();
                let written = stream_rest(stream, s, self.send_timeout).await;
                (status, None, true, written)
            }
            Ok(Answer::Whole(w)) => {
                let status = w.status();
                let body = w.body();
                let mut out = Vec::with_capacity(256 + body.len());
                status_line(&mut out, status);
                w.head(body.len(), |name, value| header_line(&mut out, name, value));
                if close {
                    out.extend_from_slice(b"Connection: close\r\n");
                }
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(&body);
                drop(body);
                let errcode = w.errcode;
                // The connection goes back before the app's write (the body
                // is copied out).
                w.finish();
                let written = write_all(stream, &out, self.send_timeout).await;
                (status, errcode, false, written)
            }
        }
    }

    /// Writes a WeChat-shaped error answer.
    async fn error(
        &self,
        stream: &mut Stream,
        path: &str,
        e: ProxyError,
        close: bool,
    ) -> (u16, Option<i64>, bool, std::io::Result<()>) {
        let status = e.status();
        pipeline::refused(path, &e);
        let body = reply::error_body(e.errcode(), &e.to_string());
        let mut out = Vec::with_capacity(128 + body.len());
        status_line(&mut out, status);
        out.extend_from_slice(b"Content-Type: ");
        out.extend_from_slice(reply::JSON.as_bytes());
        out.extend_from_slice(b"\r\nContent-Length: ");
        out.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
        out.extend_from_slice(b"\r\n");
        if let Some(secs) = e.retry_after() {
            out.extend_from_slice(format!("Retry-After: {secs}\r\n").as_bytes());
        }
        if close {
            out.extend_from_slice(b"Connection: close\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&body);
        let written = write_all(stream, &out, self.send_timeout).await;
        (status, Some(e.errcode()), false, written)
    }
}

fn status_line(out: &mut Vec<u8>, status: u16) {
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa::Buffer::new().format(status).as_bytes());
    out.push(b' ');
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn header_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// What the lane forwards, as the pipeline sends it.
impl pipeline::Request for Head<'_> {
    fn method(&self) -> &http::Method {
        static GET: http::Method = http::Method::GET;
        static POST: http::Method = http::Method::POST;
        if self.post {
            &POST
        } else {
            &GET
        }
    }

    fn path(&self) -> &str {
        self.path
    }

    fn query(&self) -> Option<&str> {
        self.query
    }

    fn body(&self) -> &[u8] {
        self.body
    }

    fn h1_headers(&self, out: &mut Vec<u8>) {
        for (name, value) in &self.forward {
            header_line(out, name.as_bytes(), value);
        }
    }

    fn h2_headers(&self, headers: &mut http::HeaderMap) -> Result<(), &'static str> {
        headers.reserve(self.forward.len() + 2);
        for (name, value) in &self.forward {
            let name = http::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| "header name not valid for HTTP/2")?;
            let value = http::HeaderValue::from_bytes(value)
                .map_err(|_| "header value not valid for HTTP/2")?;
            headers.append(name, value);
        }
        Ok(())
    }
}

/// Writes `out` whole, unless the app takes none of it for `limit` (it
/// stopped reading): then the connection is given up. Most writes fit the
/// socket's buffer at once and arm no timer.
async fn write_all(stream: &mut Stream, out: &[u8], limit: Duration) -> std::io::Result<()> {
    use std::future::Future;
    let mut write = std::pin::pin!(async {
        stream.write_all(out).await?;
        stream.flush().await
    });
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(write.as_mut().poll(cx))).await;
    if let std::task::Poll::Ready(done) = first {
        return done;
    }
    match tokio::time::timeout(limit, write).await {
        Ok(done) => done,
        Err(_) => {
            tracing::info!(limit = ?limit, "app took no answer bytes within limits.send_timeout; connection closed");
            Err(std::io::ErrorKind::TimedOut.into())
        }
    }
}

/// An answer over the buffered limit: its head, then its pieces as the
/// pipeline gives them. The app's connection closes after it (the length
/// is the upstream's, or the close ends it).
async fn stream_rest(
    stream: &mut Stream,
    mut s: Streaming<'_>,
    send_timeout: Duration,
) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(512);
    status_line(&mut out, s.status());
    s.head(|name, value| header_line(&mut out, name, value));
    if let Some(n) = s.length() {
        header_line(
            &mut out,
            b"Content-Length",
            itoa::Buffer::new().format(n).as_bytes(),
        );
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    s.head_written();
    write_all(stream, &out, send_timeout).await?;
    loop {
        match s.next().await {
            Ok(Some(piece)) => write_all(stream, &piece, send_timeout).await?,
            Ok(None) => {
                s.finish();
                return Ok(());
            }
            Err(crate::upstream::UpstreamError::Timeout { .. }) => {
                return Err(std::io::ErrorKind::TimedOut.into())
            }
            Err(_) => return Err(std::io::ErrorKind::BrokenPipe.into()),
        }
    }
}

#[cfg(test)]
mod tests;
