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

use bytes::Bytes;
use pingora::protocols::Stream;
use tokio::io::AsyncWriteExt;

use super::scrub::{carries, removed, scrubbed, Scrubber};
use super::{AnswerDeadline, HOP_BY_HOP};
use crate::account::{Account, ACCOUNT_HEADER};
use crate::app::App;
use crate::config::ReplaceTokens;
use crate::guard::bodies::AnswerClaim;
use crate::guard::{Fast, Served as LaneServed};
use crate::inspect;
use crate::lease::Lease;
use crate::metrics::{Outcome, Served};
use crate::query::{self, TOKEN_PARAM};
use crate::reply::{self, ProxyError};
use crate::upstream::UpstreamError;

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
        } else if is("accept-encoding") {
            // Not passed on: the answer is read here (errcode, our token).
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
        } else {
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
        let (head, plan) = match taken {
            Taken::Serve(head, plan) => (head, plan),
            Taken::Refused(head, e) => {
                let close = head.close || self.app.drain.is_draining();
                let (_, _, _, written) = self.error(stream, e, close).await;
                crate::metrics::NO_ACCOUNT.inc(Served::Api, Outcome::Refused);
                crate::metrics::observe_duration(Served::Api, start.elapsed().as_secs_f64());
                return Some(LaneServed {
                    used: head.used,
                    keep_alive: written.is_ok() && !close,
                });
            }
        };
        let close = head.close || self.app.drain.is_draining();
        // Counted for the account whose token was put in, as on pingora's path.
        let account = plan.token.is_some().then(|| plan.account.clone());
        let (status, errcode, streamed, written) =
            self.answer(stream, &head, plan, close, start).await;
        let ok = written.is_ok();
        let outcome = match (status, errcode) {
            (200..=299, Some(c)) if c != 0 => Outcome::WeChatError,
            (200..=399, _) => Outcome::Ok,
            (400..=499, _) => Outcome::Refused,
            _ => Outcome::Error,
        };
        match &account {
            Some(a) => a.requests.inc(Served::Api, outcome),
            None => crate::metrics::NO_ACCOUNT.inc(Served::Api, outcome),
        }
        let elapsed = start.elapsed();
        crate::metrics::observe_duration(Served::Api, elapsed.as_secs_f64());
        tracing::debug!(
            method = if head.post { "POST" } else { "GET" },
            path = head.path,
            route = "api",
            account = account.as_ref().map_or("-", |a| a.name.as_str()),
            status,
            errcode = ?errcode,
            elapsed_us = elapsed.as_micros() as u64,
            lane = "fast",
            "request"
        );
        Some(LaneServed {
            used: head.used,
            keep_alive: ok && !close && !streamed,
        })
    }
}

/// Whether the sidecar puts its token in: none presented, a token it
/// issued, or `replace_tokens: always`.
fn replaces(app: &App, account: &Account, presented: Option<&str>) -> bool {
    match presented {
        None => true,
        Some(t) => {
            account.replace_tokens() == ReplaceTokens::Always
                || app.accounts().by_issued_token(t).is_some()
        }
    }
}

/// What the lane does with a request it takes.
enum Taken<'a> {
    Serve(Head<'a>, Plan),
    /// `clients` turned the caller away: answered here, as the full path would.
    Refused(Head<'a>, ProxyError),
}

/// Where a taken request goes.
struct Plan {
    account: Arc<Account>,
    /// The token put in; `None`: the app's own goes through untouched.
    token: Option<Arc<Lease>>,
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
        let account = app
            .accounts()
            .pick_for(head.account, presented.as_deref(), None)
            .ok()?
            .clone();
        let token = if replaces(app, &account, presented.as_deref()) {
            Some(account.tokens.valid()?)
        } else {
            None
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
        Some(Taken::Serve(
            head,
            Plan {
                account: account.clone(),
                token,
            },
        ))
    }

    /// The path and query for WeChat, with `token` in the query.
    fn target(out: &mut Vec<u8>, head: &Head<'_>, token: Option<&Lease>) {
        out.extend_from_slice(head.path.as_bytes());
        match (token, head.query) {
            (Some(t), q) => {
                out.push(b'?');
                query::push_with_token(out, q, &t.value);
            }
            (None, Some(q)) => {
                out.push(b'?');
                out.extend_from_slice(q.as_bytes());
            }
            (None, None) => {}
        }
    }

    /// The request line and headers for WeChat, with `token` in the query,
    /// in a buffer with room for `Host`, `Accept-Encoding` and the body (the
    /// upstream adds them).
    fn upstream_head(head: &Head<'_>, token: Option<&Lease>) -> Vec<u8> {
        let mut out = Vec::with_capacity(320 + head.forward.len() * 32 + head.body.len());
        out.extend_from_slice(if head.post { b"POST " } else { b"GET " });
        Self::target(&mut out, head, token);
        out.extend_from_slice(b" HTTP/1.1\r\n");
        for (name, value) in &head.forward {
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        // `Host` and `Accept-Encoding: identity` follow (the upstream's
        // exchange adds them), in the full path's order.
        if head.post || !head.body.is_empty() {
            out.extend_from_slice(b"Content-Length: ");
            out.extend_from_slice(itoa::Buffer::new().format(head.body.len()).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    /// Sends the request (again once, after a token error) and writes the
    /// answer. Returns the status and errcode written, whether the answer
    /// was streamed (the connection then closes), and whether writing worked.
    async fn answer(
        &self,
        stream: &mut Stream,
        head: &Head<'_>,
        mut plan: Plan,
        close: bool,
        start: tokio::time::Instant,
    ) -> (u16, Option<i64>, bool, std::io::Result<()>) {
        let app = &self.app;
        if let Err(over) = plan.account.admit_call(head.path) {
            let e = ProxyError::QuotaLimit {
                account: plan.account.name.clone(),
                path: head.path.to_string(),
                per_day: over.per_day,
            };
            return self.error(stream, e, close).await;
        }
        let limit = app.config().limits.buffered_body;
        let upstreams = app.upstream_for(plan.account.kind.family());
        let upstream_err = |source| match source {
            UpstreamError::Unavailable => ProxyError::Unavailable,
            source => ProxyError::Upstream {
                path: head.path.to_string(),
                source,
            },
        };
        let mut replaying = false;
        // The answer's share of limits.buffered_total, held until it is written.
        let mut claim = app.bodies.answer();
        loop {
            // The request's start is the first try's "now" (one clock read).
            let deadline = if replaying {
                AnswerDeadline::from_now(upstreams.answer_timeout())
            } else {
                AnswerDeadline::from(start, upstreams.answer_timeout())
            };
            let h2 = if upstreams.speaks_h1() {
                Ok(None)
            } else {
                // Boxed: the h2 send is a few hundred bytes of future that
                // the HTTP/1.1 requests would otherwise carry and move. Each
                // of its waits keeps the deadline (one timer per wait).
                Box::pin(async {
                    let req = H2Request {
                        head,
                        token: plan.token.as_deref(),
                    };
                    upstreams.send_h2(&req, head.body, Some(deadline)).await
                })
                .await
            };
            let sent = match h2 {
                Ok(Some(x)) => Ok(Reply::H2(Box::new((x, Bytes::new())))),
                Err(e) => Err(e),
                // Our HTTP/1.1 exchange (also when the server declined h2
                // just now); it keeps the deadline itself: one timer per wait.
                Ok(None) => {
                    let mut wire = Self::upstream_head(head, plan.token.as_deref());
                    upstreams
                        .call(&mut wire, head.body, !head.post, Some(deadline))
                        .await
                        .map(Reply::H1)
                }
            };
            let mut x = match sent {
                Err(e) => return self.error(stream, upstream_err(e), close).await,
                Ok(x) => x,
            };
            // Both exchanges keep the deadline in each read's timer.
            let read = x.read_whole(limit, &mut claim).await;
            match read {
                Err(e) => return self.error(stream, upstream_err(e), close).await,
                Ok(Err(partial)) => {
                    // Over the buffered limit, or over the shared total
                    // now: stream it through.
                    let status = x.status();
                    let written = stream_rest(
                        stream,
                        &mut x,
                        partial,
                        plan.token.as_deref(),
                        deadline,
                        self.send_timeout,
                    )
                    .await;
                    return (status, None, true, written);
                }
                Ok(Ok(())) => {}
            }
            let body = x.body();
            let errcode = inspect::errcode(body);
            plan.account.note_answer(errcode, head.path, || {
                // Kept for /status: never with our token in it.
                inspect::errmsg(&scrubbed(body, plan.token.as_deref()))
            });
            let rejected = plan.token.is_some()
                && errcode.is_some_and(|c| inspect::INVALID_TOKEN.contains(&c));
            if replaying {
                count_replay(&plan.account, head.path, !rejected);
            } else if rejected {
                let bad = plan.token.clone().expect("checked above");
                plan.account.tokens.report_invalid(&bad.value);
                let fresh = plan
                    .account
                    .tokens
                    .wait_replacement(
                        &bad.value,
                        app.upstream_for(crate::config::Family::Official)
                            .read_timeout(),
                    )
                    .await;
                if let Some(fresh) = fresh {
                    x.finish().await;
                    tracing::debug!(
                        path = head.path,
                        "token rejected by WeChat; replaying with the refreshed token"
                    );
                    plan.token = Some(fresh);
                    replaying = true;
                    continue;
                }
                count_replay(&plan.account, head.path, false);
            }
            let status = x.status();
            let body = scrubbed(body, plan.token.as_deref());
            let mut out = Vec::with_capacity(256 + body.len());
            status_line(&mut out, status);
            copy_headers(&mut out, &x, plan.token.as_deref());
            let after = errcode.and_then(crate::quota::retry_after);
            if let Some(after) = after.filter(|_| !has_header(&x, b"retry-after")) {
                out.extend_from_slice(b"Retry-After: ");
                out.extend_from_slice(after.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            // No length on an answer that cannot have a body (RFC 9110 §8.6).
            if !super::bodiless(status) {
                out.extend_from_slice(b"Content-Length: ");
                out.extend_from_slice(itoa::Buffer::new().format(body.len()).as_bytes());
                out.extend_from_slice(b"\r\n");
            }
            if close {
                out.extend_from_slice(b"Connection: close\r\n");
            }
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(&body);
            drop(body);
            // The connection goes back before the app's write (the body lives in it).
            x.finish().await;
            let written = write_all(stream, &out, self.send_timeout).await;
            return (status, errcode, false, written);
        }
    }

    /// Writes a WeChat-shaped error answer.
    async fn error(
        &self,
        stream: &mut Stream,
        e: ProxyError,
        close: bool,
    ) -> (u16, Option<i64>, bool, std::io::Result<()>) {
        let status = e.status();
        if status >= 500 {
            tracing::warn!(status, error = %e, "request failed");
        } else {
            tracing::info!(status, error = %e, "request refused");
        }
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

fn count_replay(account: &Account, path: &str, ok: bool) {
    account.replays.inc(ok);
    if !ok {
        tracing::warn!(account = %account.name, path, "token rejected again after a refresh; passing WeChat's answer through");
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

/// The answer's headers for the app: not hop-by-hop, not its length (ours
/// is written), and none that carries our token.
/// Whether the answer carries header `name` (lowercase).
fn has_header(x: &Reply<'_>, name: &[u8]) -> bool {
    let mut found = false;
    x.for_each_header(|n, _| found |= n.eq_ignore_ascii_case(name));
    found
}

fn copy_headers(out: &mut Vec<u8>, x: &Reply<'_>, token: Option<&Lease>) {
    // Headers the answer's `Connection` names are hop-by-hop too (none in
    // the usual `keep-alive`: nothing allocated then).
    let mut named: Vec<Vec<u8>> = Vec::new();
    x.for_each_header(|name, value| {
        if name.eq_ignore_ascii_case(b"connection") {
            named.extend(super::connection_options(value).map(<[u8]>::to_vec));
        }
    });
    x.for_each_header(|name, value| {
        let skip = name.eq_ignore_ascii_case(b"content-length")
            || HOP_BY_HOP
                .iter()
                .any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
            || named.iter().any(|n| n.eq_ignore_ascii_case(name));
        if skip {
            return;
        }
        if let Some(t) = token.filter(|t| carries(t, name, value)) {
            removed(t, name);
            return;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    });
}

/// The fast lane's request as an HTTP/2 stream sends it: built from the
/// bytes at hand, no request header in between.
struct H2Request<'a> {
    head: &'a Head<'a>,
    token: Option<&'a Lease>,
}

impl crate::upstream::Outgoing for H2Request<'_> {
    fn to_h2(&self, authority: &http::uri::Authority) -> Result<http::Request<()>, &'static str> {
        let mut target = Vec::with_capacity(256);
        FastLane::target(&mut target, self.head, self.token);
        let target = http::uri::PathAndQuery::from_maybe_shared(Bytes::from(target))
            .map_err(|_| "request target not valid for HTTP/2")?;
        let mut req = http::Request::new(());
        if self.head.post {
            *req.method_mut() = http::Method::POST;
        }
        *req.uri_mut() = crate::upstream::h2_uri(authority, Some(target))?;
        *req.version_mut() = http::Version::HTTP_2;
        let headers = req.headers_mut();
        headers.reserve(self.head.forward.len() + 2);
        for (name, value) in &self.head.forward {
            let name = http::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| "header name not valid for HTTP/2")?;
            let value = http::HeaderValue::from_bytes(value)
                .map_err(|_| "header value not valid for HTTP/2")?;
            headers.append(name, value);
        }
        headers.insert(
            http::header::ACCEPT_ENCODING,
            http::HeaderValue::from_static(crate::upstream::IDENTITY),
        );
        if self.head.post || !self.head.body.is_empty() {
            headers.insert(
                http::header::CONTENT_LENGTH,
                http::HeaderValue::from(self.head.body.len()),
            );
        }
        Ok(req)
    }

    fn idempotent(&self) -> bool {
        !self.head.post
    }
}

/// An answer from either kind of upstream connection.
// The common answer stays inline (boxing it would allocate per request);
// the rare HTTP/2 one is boxed.
#[allow(clippy::large_enum_variant)]
enum Reply<'a> {
    /// Our own HTTP/1.1 exchange.
    H1(crate::upstream::RawExchange<'a>),
    /// A stream of a shared HTTP/2 connection, and its body
    /// once read whole. Boxed: ~1 KiB the HTTP/1.1 answers need not carry.
    H2(Box<(crate::upstream::Exchange<'a>, Bytes)>),
}

impl Reply<'_> {
    fn status(&self) -> u16 {
        match self {
            Reply::H1(x) => x.status,
            Reply::H2(x) => x.0.header().status.as_u16(),
        }
    }

    fn for_each_header(&self, mut f: impl FnMut(&[u8], &[u8])) {
        match self {
            Reply::H1(x) => x.headers().for_each(|(n, v)| f(n, v)),
            Reply::H2(x) => {
                x.0.header()
                    .headers
                    .iter()
                    .for_each(|(n, v)| f(n.as_str().as_bytes(), v.as_bytes()))
            }
        }
    }

    fn declared_length(&self) -> Option<usize> {
        match self {
            Reply::H1(x) => x.declared_length(),
            Reply::H2(_) => None,
        }
    }

    fn release_head(&mut self) {
        if let Reply::H1(x) = self {
            x.release_head();
        }
    }

    /// Reads the body whole, up to `cap` and as far as `claim` has room in
    /// the shared total, for [`Self::body`]; `Ok(Err(partial))` when it is
    /// larger.
    async fn read_whole(
        &mut self,
        cap: usize,
        claim: &mut AnswerClaim<'_>,
    ) -> Result<Result<(), Vec<u8>>, UpstreamError> {
        match self {
            Reply::H1(x) => x.read_whole(cap, claim).await,
            Reply::H2(x) => Ok(match x.0.read_to_end(cap, Some(claim)).await? {
                Ok(b) => {
                    x.1 = b;
                    Ok(())
                }
                Err(partial) => Err(partial.to_vec()),
            }),
        }
    }

    fn body(&self) -> &[u8] {
        match self {
            Reply::H1(x) => x.body(),
            Reply::H2(x) => &x.1,
        }
    }

    async fn chunk(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        match self {
            Reply::H1(x) => x.chunk().await,
            Reply::H2(x) => x.0.chunk().await,
        }
    }

    async fn finish(self) {
        match self {
            Reply::H1(x) => x.finish(),
            Reply::H2(x) => x.0.finish().await,
        }
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

/// An answer over the buffered limit: its head, what was read, then the
/// rest as it comes, within the answer deadline. The app's connection
/// closes after it (the length is the upstream's, or the close ends it).
async fn stream_rest(
    stream: &mut Stream,
    x: &mut Reply<'_>,
    first: Vec<u8>,
    token: Option<&Lease>,
    deadline: AnswerDeadline,
    send_timeout: Duration,
) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(512);
    status_line(&mut out, x.status());
    copy_headers(&mut out, x, token);
    if let Some(n) = x.declared_length() {
        // What is left plus what was read: the whole declared length.
        out.extend_from_slice(format!("Content-Length: {}\r\n", n + first.len()).as_bytes());
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
    x.release_head();
    write_all(stream, &out, send_timeout).await?;
    // Piece by piece, our token masked even when split between two.
    let mut scrub = Scrubber::new(token);
    write_all(stream, &scrub.piece(first.into()), send_timeout).await?;
    loop {
        let got = tokio::time::timeout_at(deadline.at, x.chunk())
            .await
            .unwrap_or_else(|_| Err(deadline.missed()));
        match got {
            Ok(Some(c)) => write_all(stream, &scrub.piece(c), send_timeout).await?,
            Ok(None) => return write_all(stream, &scrub.finish(), send_timeout).await,
            // Passed here, or inside our HTTP/1.1 exchange, which ends its
            // reads at the deadline itself: either names the deadline's limit.
            Err(UpstreamError::Timeout { after, .. }) if after == deadline.limit => {
                tracing::warn!(limit = ?deadline.limit, "answer cut at upstream.answer_timeout");
                return Err(std::io::ErrorKind::TimedOut.into());
            }
            Err(e) => {
                tracing::warn!(error = %e, "upstream failed mid-answer");
                return Err(std::io::ErrorKind::BrokenPipe.into());
            }
        }
    }
}

#[cfg(test)]
mod tests;
