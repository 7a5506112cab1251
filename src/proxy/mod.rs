//! The app listener's request path, as a pingora [`ProxyHttp`].
//!
//! JSON API calls run entirely inside `request_filter`: read the (small) body,
//! choose the account, put the cached token into the query, send through our
//! own pooled [`Upstream`], and write the answer. Doing it here rather than in
//! pingora's streaming path is what lets later stages read the answer before
//! the app sees it. Media up- and downloads fall through (`Ok(false)`) to
//! pingora's streaming path with the same token logic.
//!
//! Never logs a query string: it may hold a token or an appsecret.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use http::header;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType};

use crate::account::{Account, PickError, ACCOUNT_HEADER};
use crate::app::App;
use crate::config::Family;
use crate::metrics::Served;
use crate::pipeline::{self, Answer, Plan, Report, Streaming};
use crate::query::{self, TOKEN_PARAM};
use crate::refusal::Refusal;
use crate::reply::{self, ProxyError};
use crate::route::{self, Route};

mod answered;
mod body;
mod callback;
mod component;
pub mod fast;

use body::continue_if_expected;

/// Credentials sent to a token endpoint are tiny.
const DEFAULT_CREDENTIALS_LIMIT: usize = 64 * 1024;

pub struct Proxy {
    app: Arc<App>,
}

impl Proxy {
    pub fn new(app: Arc<App>) -> Self {
        Proxy { app }
    }
}

/// Per-request state for the streaming path.
pub struct Ctx {
    /// For the request log line and metrics.
    start: tokio::time::Instant,
    route: Served,
    account: Option<Arc<Account>>,
    /// WeChat's errcode in a buffered answer.
    errcode: Option<i64>,
    /// Who is calling (after `clients` admitted them).
    caller: Option<crate::clients::Caller>,
    /// Counts the request as in flight while it lives.
    _in_flight: Option<crate::lifecycle::InFlight>,
    /// The family an intercepted host (`Host`, SNI, proxy target) names.
    family: Option<Family>,
}

impl Default for Ctx {
    fn default() -> Self {
        Ctx {
            start: tokio::time::Instant::now(),
            route: Served::Api,
            account: None,
            errcode: None,
            caller: None,
            _in_flight: None,
            family: None,
        }
    }
}

/// Whether any `Connection` header holds the `close` option.
fn asks_to_close(headers: &http::HeaderMap) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|v| {
        pipeline::connection_tokens(v.as_bytes()).any(|t| t.eq_ignore_ascii_case(b"close"))
    })
}

/// The headers a message's `Connection` names ([`pipeline::connection_options`]):
/// usually none, and then nothing is allocated.
fn connection_named(headers: &http::HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| pipeline::connection_options(v.as_bytes()))
        .map(|t| String::from_utf8_lossy(t).into_owned())
        .collect()
}

/// An app's streamed body as the pipeline reads it: pieces from pingora's
/// session within `limits.body_timeout` (`deadline`).
struct SessionPieces<'a> {
    proxy: &'a Proxy,
    session: &'a mut Session,
    deadline: tokio::time::Instant,
}

impl pipeline::Pieces for SessionPieces<'_> {
    async fn started(&mut self) -> Result<(), pipeline::Stop> {
        continue_if_expected(self.session)
            .await
            .map_err(pipeline::Stop::Front)
    }

    async fn next(&mut self) -> Result<Option<Bytes>, pipeline::Stop> {
        match self.proxy.body_chunk(self.session, self.deadline).await {
            Ok(Ok(piece)) => Ok(piece),
            Ok(Err(e)) => Err(pipeline::Stop::Answer(e)),
            Err(e) => Err(pipeline::Stop::Front(e)),
        }
    }

    fn abandon(&mut self) {
        self.session.set_keepalive(None);
    }
}

/// Adds an answer header as the pipeline gives it (its name's case kept).
fn append(resp: &mut ResponseHeader, name: &[u8], value: &[u8]) -> pingora::Result<()> {
    let value = http::HeaderValue::from_bytes(value)
        .map_err(|e| Error::because(ErrorType::InvalidHTTPHeader, "answer header value", e))?;
    resp.append_header(Bytes::copy_from_slice(name), value)?;
    Ok(())
}

/// A request of pingora's path as the pipeline sends it: the app's
/// method, normalised path and query, the headers that go on
/// ([`Proxy::upstream_headers`]) and the body read whole.
struct Forwarded<'a> {
    method: &'a http::Method,
    path: &'a str,
    query: Option<&'a str>,
    headers: RequestHeader,
    body: &'a [u8],
}

impl pipeline::Request for Forwarded<'_> {
    fn method(&self) -> &http::Method {
        self.method
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
        self.headers.header_to_h1_wire(out);
    }

    fn h2_headers(&self, headers: &mut http::HeaderMap) -> Result<(), &'static str> {
        headers.reserve(self.headers.headers.len() + 2);
        for (name, value) in self.headers.headers.iter() {
            headers.append(name.clone(), value.clone());
        }
        Ok(())
    }
}

fn content_length(headers: &http::HeaderMap) -> Option<usize> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// The entry rules, before any route is chosen: only WeChat's methods; the
/// target normalised in place (routes and the upstream see that path); an
/// appsecret only on the paths that take one (the token endpoints, in any
/// spelling, are answered locally and never forwarded).
fn admit_target(req: &mut RequestHeader) -> Result<(), ProxyError> {
    if !crate::target::method_allowed(&req.method) {
        return Err(ProxyError::MethodNotAllowed {
            method: req.method.as_str().chars().take(16).collect(),
        });
    }
    one_content_length(req)?;
    let normal = crate::target::normalise(req.uri.path()).map_err(|e| ProxyError::BadRequest {
        path: "the request target".into(),
        reason: e.0.into(),
    })?;
    if let std::borrow::Cow::Owned(path) = normal {
        let pq = match req.uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        let uri = pq
            .parse::<http::Uri>()
            .map_err(|_| ProxyError::BadRequest {
                path: "the request target".into(),
                reason: "not a valid path after normalisation".into(),
            })?;
        req.set_uri(uri);
    }
    refuse_misplaced_secret(req.uri.path(), req.uri.query().unwrap_or("").as_bytes())
}

/// RFC 9112 §6.3: one `Content-Length`. Repeats of the same number (as
/// headers or a list) become one header; differing values, or anything but
/// digits, are refused, so what goes upstream is framed one way only.
fn one_content_length(req: &mut RequestHeader) -> Result<(), ProxyError> {
    let mut values = req.headers.get_all(header::CONTENT_LENGTH).iter();
    let Some(first) = values.next() else {
        return Ok(());
    };
    let single = values.next().is_none() && !first.as_bytes().contains(&b',');
    if single && !first.is_empty() && first.as_bytes().iter().all(u8::is_ascii_digit) {
        return Ok(());
    }
    let bad = |reason: &str| ProxyError::BadRequest {
        path: "the request".into(),
        reason: format!("Content-Length {reason}; send exactly one"),
    };
    let mut seen: Option<&[u8]> = None;
    for v in req.headers.get_all(header::CONTENT_LENGTH) {
        for n in v.as_bytes().split(|&b| b == b',') {
            let n = n.trim_ascii();
            if n.is_empty() || n.len() > 19 || !n.iter().all(u8::is_ascii_digit) {
                return Err(bad("is not a number"));
            }
            match seen {
                Some(s) if s != n => return Err(bad("is given twice with different values")),
                _ => seen = Some(n),
            }
        }
    }
    let n = String::from_utf8_lossy(seen.unwrap_or(b"0")).into_owned();
    req.insert_header(header::CONTENT_LENGTH, n)
        .map_err(|_| bad("cannot be rewritten"))?;
    Ok(())
}

/// An appsecret in `params` (a query or a form body) is refused unless
/// `path` takes one or is a token endpoint answered locally.
fn refuse_misplaced_secret(path: &str, params: &[u8]) -> Result<(), ProxyError> {
    let Some(name) = crate::target::secret_param(params) else {
        return Ok(());
    };
    let local = matches!(
        route::classify_path(path),
        Some(Route::LocalClassicToken | Route::LocalStableToken | Route::LocalWeComToken)
    );
    if local || crate::target::takes_secret(path) {
        return Ok(());
    }
    Err(ProxyError::BadRequest {
        path: path.to_string(),
        reason: format!(
            "`{name}` is an appsecret and this path does not take one; the sidecar adds the token itself, so drop `{name}` from the request"
        ),
    })
}

/// The body is ours to read: tells a client waiting on `Expect:
/// 100-continue` to send it (clients that did not wait ignore this).
type Step<T> = pingora::Result<Result<T, ProxyError>>;

impl Proxy {
    /// Admits the caller (`clients`): address, bearer token, rates. Answers
    /// a refusal itself and returns `true` then.
    async fn admit_caller(&self, session: &mut Session, ctx: &mut Ctx) -> pingora::Result<bool> {
        // The peer address costs a getpeername(2): ask only when it matters.
        let addr = if self.app.clients().needs_address() {
            session
                .client_addr()
                .and_then(|a| a.as_inet())
                .map(|a| a.ip())
        } else {
            None
        };
        let auth = session
            .req_header()
            .headers
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        match self.app.clients().admit(addr, auth) {
            Ok(caller) => ctx.caller = Some(caller),
            Err(denied) => {
                let e = ProxyError::Denied(denied);
                tracing::info!(path = session.req_header().uri.path(), status = e.status(), error = %e, "caller refused");
                reply::send_error(session, &e).await?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Chooses the account and the token for a request.
    async fn plan(&self, req: &RequestHeader, ctx: &Ctx) -> Result<Plan, ProxyError> {
        let q = req.uri.query();
        let presented = q.and_then(|q| query::param(q, TOKEN_PARAM));
        let named = match req.headers.get(ACCOUNT_HEADER) {
            None => None,
            Some(v) => Some(v.to_str().map_err(|_| ProxyError::BadRequest {
                path: req.uri.path().to_string(),
                reason: "X-Wx-Account is not ASCII".into(),
            })?),
        };
        // The table is read, not held: the token may take a wait.
        let pick = |app: &App| pipeline::choose(app, named, presented.as_deref(), ctx.family);
        let (account, replace) = match (pick(&self.app), named) {
            // An authoriser another replica (or a lost event) knows of: made
            // an account on first use, then picked again.
            (Err(PickError::Unknown { .. }), Some(h)) if !self.app.platforms.is_empty() => {
                self.adopt_authorizer(h.trim()).await;
                pick(&self.app)?
            }
            (picked, _) => picked?,
        };
        self.admit_account(ctx, &account)?;
        if !replace {
            // A token the app brought itself stays: not ours to touch.
            return Ok(Plan::untouched(account.kind.family()));
        }
        let token = self.token_for(&account).await?;
        Ok(Plan::with_token(account, token))
    }

    /// Makes `appid` an account if a platform holds its refresh token (in
    /// memory or in the shared store), or WeChat's authoriser list has it.
    async fn adopt_authorizer(&self, appid: &str) {
        let plausible = !appid.is_empty()
            && appid.len() <= 64
            && appid
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !plausible {
            return;
        }
        for p in &self.app.platforms {
            if p.find_refresh_token(appid).await.is_some() {
                crate::refresh::platform::add_authorizer(&self.app, p, appid).await;
                return;
            }
        }
        // Nobody holds its refresh token (a flushed store, a lost event):
        // WeChat's authoriser list may, read at most once a minute per
        // platform, so unknown names cannot make it a load.
        for p in &self.app.platforms {
            match crate::refresh::platform::recover(p, &self.app.upstreams).await {
                Ok(listed) if listed.iter().any(|a| a == appid) => {
                    crate::refresh::platform::add_authorizer(&self.app, p, appid).await;
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(platform = %p.name, account = appid, error = %e, "authoriser list not read")
                }
            }
        }
    }

    /// Reads which family an intercepted host names, and refuses proxy-style
    /// requests (absolute-form targets) for any host but WeChat's: the sidecar
    /// only ever talks to WeChat, so such a request would go to the wrong place.
    fn check_host(&self, req: &RequestHeader, ctx: &mut Ctx) -> Result<(), ProxyError> {
        // pingora keeps an absolute-form target's authority off the Uri, having
        // checked that it matches `Host`: the raw target tells the form.
        let raw = req.raw_path();
        let absolute = raw.starts_with(b"http://") || raw.starts_with(b"https://");
        if self.app.intercept.is_none() && !absolute {
            // The usual case: a plain request to the app listener.
            return Ok(());
        }
        let host = crate::intercept::request_host(req);
        let Some(host) = host else { return Ok(()) };
        let intercepted = match &self.app.intercept {
            Some(i) => i.resolver.covers(&host),
            None => crate::certs::WECHAT_HOSTS.contains(&host.as_str()),
        };
        if intercepted {
            ctx.family = Some(crate::intercept::family_of(&host));
        } else if absolute && host.parse::<std::net::IpAddr>().is_err() && host != "localhost" {
            return Err(ProxyError::Forbidden {
                reason: format!(
                    "{host} is not a WeChat host this sidecar serves (intercept.hosts); it is not an open proxy"
                ),
            });
        }
        Ok(())
    }

    /// Whether the caller may use `account`, at this rate.
    fn admit_account(&self, ctx: &Ctx, account: &Account) -> Result<(), ProxyError> {
        self.admit_name(ctx, &account.name, account.platform.as_deref())
    }

    /// [`Self::admit_account`] by name: an account's, or a platform's for
    /// its component calls (`platform`: the platform that holds it).
    pub(super) fn admit_name(
        &self,
        ctx: &Ctx,
        name: &str,
        platform: Option<&str>,
    ) -> Result<(), ProxyError> {
        match &ctx.caller {
            Some(caller) => Ok(self.app.clients().account(caller, name, platform)?),
            None => Ok(()),
        }
    }

    /// The app's headers that go on to WeChat ([`pipeline::forwarded`],
    /// minus those its `Connection` names), in a request header for
    /// `path_and_query`.
    fn upstream_headers(
        &self,
        client: &RequestHeader,
        path_and_query: &str,
    ) -> pingora::Result<RequestHeader> {
        let mut req = RequestHeader::build(
            client.method.clone(),
            path_and_query.as_bytes(),
            Some(client.headers.len() + 1),
        )?;
        // Headers the app's `Connection` names are for this hop alone.
        let named = connection_named(&client.headers);
        let uses_tokens = self.app.clients().uses_tokens();
        for (name, value) in client.headers.iter() {
            if !pipeline::forwarded(name.as_str().as_bytes(), uses_tokens)
                || named.iter().any(|n| n.eq_ignore_ascii_case(name.as_str()))
            {
                continue;
            }
            req.append_header(name.clone(), value.clone())?;
        }
        Ok(req)
    }

    /// Buffers the request and sends it through the pipeline (the token
    /// put in, replayed once after a token error, the answer scrubbed),
    /// then writes the answer.
    async fn forward(&self, session: &mut Session, mut plan: Plan, ctx: &mut Ctx) -> Step<()> {
        ctx.account = plan.account.clone();
        let limit = self.app.config().limits.buffered_body;
        let body = match self.read_body(session, limit).await? {
            Ok(b) => b,
            Err(e) => return Ok(Err(e)),
        };
        let client = session.req_header();
        // An HTML form's fields may carry an appsecret too.
        if route::content_type_is(&client.headers, b"application/x-www-form-urlencoded") {
            if let Err(e) = refuse_misplaced_secret(client.uri.path(), &body) {
                return Ok(Err(e));
            }
        }
        let upstreams = self.app.upstream_for(plan.family);
        // The answer's share of limits.buffered_total, held until it is written.
        let mut claim = self.app.bodies.answer();
        let answer = {
            let req = Forwarded {
                method: &client.method,
                path: client.uri.path(),
                query: client.uri.query(),
                headers: self.upstream_headers(client, "/")?,
                body: &body,
            };
            pipeline::exchange(&self.app, &upstreams, &mut plan, &req, None, &mut claim).await
        };
        match answer {
            Err(e) => Ok(Err(e)),
            Ok(Answer::Streaming(s)) => self.stream_answer(session, s).await,
            Ok(Answer::Whole(w)) => {
                ctx.errcode = w.errcode;
                let body = Bytes::copy_from_slice(&w.body());
                let mut resp = ResponseHeader::build(w.status(), Some(8))?;
                let mut bad = None;
                w.head(body.len(), |name, value| {
                    if let Err(e) = append(&mut resp, name, value) {
                        bad.get_or_insert(e);
                    }
                });
                w.finish();
                if let Some(e) = bad {
                    return Err(e);
                }
                session.write_response_header(Box::new(resp), false).await?;
                session.write_response_body(Some(body), true).await?;
                Ok(Ok(()))
            }
        }
    }

    /// Streams a large answer to the app piece by piece.
    async fn stream_answer(&self, session: &mut Session, mut s: Streaming<'_>) -> Step<()> {
        let mut resp = ResponseHeader::build(s.status(), Some(8))?;
        let mut bad = None;
        s.head(|name, value| {
            if let Err(e) = append(&mut resp, name, value) {
                bad.get_or_insert(e);
            }
        });
        if let Some(e) = bad {
            return Err(e);
        }
        // No body, and so no framing, for a HEAD request or a status that
        // cannot have one (RFC 9110 §6.4.1).
        let head_only = session.req_header().method == http::Method::HEAD;
        if head_only || pipeline::bodiless(s.status()) {
            s.finish();
            session.write_response_header(Box::new(resp), true).await?;
            return Ok(Ok(()));
        }
        match s.length() {
            Some(n) => resp.insert_header(header::CONTENT_LENGTH, n)?,
            None => resp.insert_header(header::TRANSFER_ENCODING, "chunked")?,
        }
        session.write_response_header(Box::new(resp), false).await?;
        s.head_written();
        loop {
            match s.next().await {
                Ok(Some(piece)) => session.write_response_body(Some(piece), false).await?,
                Ok(None) => break,
                Err(e) => {
                    // The header is out: all we can do is cut the answer short.
                    return Err(Error::explain(
                        ErrorType::ReadError,
                        format!("upstream failed mid-answer: {e}"),
                    ));
                }
            }
        }
        s.finish();
        session.write_response_body(None, true).await?;
        Ok(Ok(()))
    }

    /// Whether a media call or upload can be kept and sent again: no body,
    /// or one of a declared length within `limits.buffered_body` (a
    /// download by `media_id`, the material list, a deletion, a thumbnail
    /// or an image upload). Those take the buffered way, byte for byte, so
    /// a 40001 is refreshed and replayed as on every API call (WeChat
    /// refuses a bad token before it takes anything), and an answer within
    /// the cap is scrubbed whole; a larger answer (the file) streams.
    fn replayable(&self, req: &RequestHeader) -> bool {
        !req.headers.contains_key(header::TRANSFER_ENCODING)
            && content_length(&req.headers)
                .is_none_or(|n| n <= self.app.config().limits.buffered_body)
    }

    /// Streamed uploads (media and multipart bodies of up to 20 MB, chunked
    /// or over `limits.buffered_body`; see [`Self::replayable`]) through our
    /// own client: the same pool, breaker, failover and
    /// counters as every other request, on HTTP/1.1. The body goes on as it
    /// arrives (bounded as a whole by `limits.body_timeout`), the answer
    /// comes back as it arrives (bounded by `upstream.answer_timeout` from
    /// the end of the body); our token is scrubbed from the answer's head.
    /// Nothing is replayed: a streamed body is not kept.
    async fn stream(&self, session: &mut Session, plan: Plan, ctx: &mut Ctx) -> Step<()> {
        ctx.account = plan.account.clone();
        let path = session.req_header().uri.path().to_string();
        let has_body = !session.as_downstream_mut().is_body_empty();
        let client = session.req_header();
        let target = plan.target_string(client.uri.path(), client.uri.query());
        let head = self.upstream_headers(client, &target)?;
        let declared = content_length(&client.headers);
        let upstreams = self.app.upstream_for(plan.family);
        let deadline = tokio::time::Instant::now() + self.app.config().limits.body_timeout;
        let mut pieces = SessionPieces {
            proxy: self,
            session,
            deadline,
        };
        let sent = pipeline::upload(
            &upstreams,
            &plan,
            &path,
            head,
            declared,
            has_body,
            &mut pieces,
        )
        .await;
        match sent {
            Ok(s) => self.stream_answer(session, s).await,
            Err(pipeline::Stop::Answer(e)) => Ok(Err(e)),
            Err(pipeline::Stop::Front(e)) => Err(e),
        }
    }

    /// A refusal in WeChat's words (HTTP 200 with an errcode, as WeChat does).
    async fn refuse(&self, session: &mut Session, r: Refusal) -> Step<()> {
        tracing::info!(
            path = session.req_header().uri.path(),
            errcode = r.errcode,
            "token request refused"
        );
        reply::send_json(session, 200, r.body()).await?;
        Ok(Ok(()))
    }
}

#[async_trait]
impl ProxyHttp for Proxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            _in_flight: Some(self.app.drain.enter()),
            ..Ctx::default()
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> pingora::Result<bool> {
        crate::guard::head_complete();
        // Handing over or shutting down: tell the client to reconnect (to the
        // new process) rather than reuse a connection about to close.
        // So does a client that asked to close in any `Connection` header:
        // pingora reads only the first, and lets `keep-alive` win over
        // `close` (RFC 9112 §9.6: `close` in any means close; the fast lane
        // does so).
        if self.app.drain.is_draining() || asks_to_close(&session.req_header().headers) {
            session.set_keepalive(None);
        }
        // Pipelined requests are answered in order (RFC 9112 §9.3.2), not
        // dropped with the connection.
        session.as_downstream_mut().set_pipelining_enabled(true);
        // A platform's events are signed by WeChat: `clients` is not
        // theirs to pass (the handler checks the signature).
        let platform_event = crate::route::is_platform_callback(session.req_header().uri.path());
        if !platform_event
            && !self.app.clients().is_open()
            && self.admit_caller(session, ctx).await?
        {
            return Ok(true);
        }
        if let Err(e) = self
            .check_host(session.req_header(), ctx)
            .and_then(|()| admit_target(session.req_header_mut()))
        {
            tracing::info!(status = e.status(), error = %e, "request refused");
            reply::send_error(session, &e).await?;
            return Ok(true);
        }
        let route = route::classify(session.req_header());
        let outcome = match route {
            Route::LocalClassicToken | Route::LocalStableToken | Route::LocalWeComToken => {
                ctx.route = Served::Token;
                self.local_token(session, route, ctx).await?
            }
            Route::LocalTicket => {
                ctx.route = Served::Ticket;
                self.local_ticket(session, ctx).await?
            }
            Route::JsSdk => {
                ctx.route = Served::Jssdk;
                self.jssdk(session, ctx).await?
            }
            Route::PlatformCallback => {
                ctx.route = Served::Platform;
                self.platform_callback(session, ctx).await?
            }
            Route::Untouched
                if !self.app.platforms.is_empty()
                    && crate::target::starts_with_ignore_case(
                        session.req_header().uri.path().as_bytes(),
                        b"/cgi-bin/component/",
                    ) =>
            {
                ctx.route = Served::Platform;
                self.component(session, ctx).await?
            }
            Route::Untouched => {
                ctx.route = Served::Untouched;
                let family = ctx.family.unwrap_or_else(|| self.app.default_family());
                let plan = Plan::untouched(family);
                self.forward(session, plan, ctx).await?
            }
            Route::Api => match self.plan(session.req_header(), ctx).await {
                Ok(plan) => self.forward(session, plan, ctx).await?,
                Err(e) => Err(e),
            },
            Route::Stream => match self.plan(session.req_header(), ctx).await {
                Ok(plan) => {
                    ctx.route = Served::Stream;
                    if self.replayable(session.req_header()) {
                        self.forward(session, plan, ctx).await?
                    } else {
                        self.stream(session, plan, ctx).await?
                    }
                }
                Err(e) => Err(e),
            },
        };
        if let Err(e) = outcome {
            pipeline::refused(session.req_header().uri.path(), &e);
            reply::send_error(session, &e).await?;
        }
        Ok(true)
    }

    /// Never called: every request is answered in `request_filter`
    /// (streamed media too, through our own client).
    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut Ctx,
    ) -> pingora::Result<Box<HttpPeer>> {
        Error::e_explain(
            ErrorType::InternalError,
            "every request is answered in request_filter",
        )
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, _ctx: &mut Ctx) -> FailToProxy {
        let (status, what) = match (e.esource(), e.etype()) {
            (
                _,
                ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout,
            ) if e.esource() != &ErrorSource::Downstream => (504, "upstream timed out"),
            (ErrorSource::Upstream, _) | (_, ErrorType::ConnectNoRoute) => (502, "upstream failed"),
            (ErrorSource::Downstream, _) => (0, ""),
            _ => (500, "internal error"),
        };
        if status > 0 && session.response_written().is_none() {
            let path = session.req_header().uri.path().to_string();
            tracing::warn!(path, status, error = %e.etype().as_str(), "streamed request failed");
            let body = reply::error_body(-1, &format!("{what} for {path}: {}", e.etype().as_str()));
            let _ = reply::send_json(session, status, body).await;
        }
        FailToProxy {
            error_code: status,
            can_reuse_downstream: false,
        }
    }

    /// One debug line and the request metrics per request.
    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Ctx) {
        let req = session.req_header();
        pipeline::report(Report {
            route: ctx.route,
            account: ctx.account.as_deref(),
            method: req.method.as_str(),
            path: req.uri.path(),
            status: session.response_written().map_or(0, |r| r.status.as_u16()),
            errcode: ctx.errcode,
            elapsed: ctx.start.elapsed(),
            lane: "pingora",
        });
    }

    /// Method and path only: pingora logs this, and the query may hold secrets.
    fn request_summary(&self, session: &Session, _ctx: &Ctx) -> String {
        let r = session.req_header();
        format!("{} {}", r.method, r.uri.path())
    }
}
