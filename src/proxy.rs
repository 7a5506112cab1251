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
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType};

use crate::account::{Account, ACCOUNT_HEADER};
use crate::app::App;
use crate::config::ReplaceTokens;
use crate::local::{self, Credentials};
use crate::query::{self, TOKEN_PARAM};
use crate::reply::{self, ProxyError};
use crate::route::{self, Route};
use crate::token::Token;

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
#[derive(Default)]
pub struct Ctx {
    /// The path and query to send upstream, when the token changed.
    stream_uri: Option<http::Uri>,
}

/// Headers that describe one hop, not the message: never forwarded, or
/// pooling silently stops.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

fn content_length(headers: &http::HeaderMap) -> Option<usize> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// Outcome of a step: `Err(ProxyError)` is answered to the app; the outer
/// `pingora::Result` carries failures talking to the app itself.
type Step<T> = pingora::Result<Result<T, ProxyError>>;

impl Proxy {
    /// The valid token for `account`, waiting for the refresher only when
    /// there is none: an expired token is never sent.
    async fn token_for(&self, account: &Account) -> Result<Arc<Token>, ProxyError> {
        if let Some(t) = account.tokens.valid() {
            return Ok(t);
        }
        let st = account.tokens.status();
        if let (true, Some((code, msg))) = (st.attempted, st.last_error) {
            return Err(ProxyError::NoToken {
                account: account.name.clone(),
                reason: format!("the last fetch failed with errcode {code}: {msg}"),
            });
        }
        account
            .tokens
            .wait_valid(self.app.upstream.read_timeout())
            .await
            .ok_or_else(|| ProxyError::NoToken {
                account: account.name.clone(),
                reason: "timed out waiting for the token fetch".into(),
            })
    }

    /// Chooses the account and returns the path and query to send upstream.
    async fn plan(&self, req: &RequestHeader) -> Result<String, ProxyError> {
        let q = req.uri.query();
        let presented = q.and_then(|q| query::param(q, TOKEN_PARAM));
        let named = match req.headers.get(ACCOUNT_HEADER) {
            None => None,
            Some(v) => Some(v.to_str().map_err(|_| ProxyError::BadRequest {
                path: req.uri.path().to_string(),
                reason: "X-Wx-Account is not ASCII".into(),
            })?),
        };
        let account = self.app.accounts.pick(named, presented.as_deref())?;
        let replace = match &presented {
            None => true,
            Some(t) => {
                account.replace_tokens == ReplaceTokens::Always
                    || self.app.accounts.by_issued_token(t).is_some()
            }
        };
        let path = req.uri.path();
        if !replace {
            // A token the app brought itself: not ours to touch.
            return Ok(req
                .uri
                .path_and_query()
                .map_or_else(|| path.to_string(), |pq| pq.as_str().to_string()));
        }
        let token = self.token_for(account).await?;
        Ok(format!("{path}?{}", query::with_token(q, &token.value)))
    }

    /// Reads the whole request body, up to `limit`.
    async fn read_body(&self, session: &mut Session, limit: usize) -> Step<Bytes> {
        let path = session.req_header().uri.path().to_string();
        let too_large = ProxyError::BodyTooLarge {
            limit,
            path: path.clone(),
        };
        if content_length(&session.req_header().headers).is_some_and(|n| n > limit) {
            session.set_keepalive(None);
            return Ok(Err(too_large));
        }
        session.as_downstream_mut().enable_retry_buffering();
        // The body is ours to read: tell a client waiting on `Expect:
        // 100-continue` to send it (clients that did not wait ignore this).
        let expects_continue = session
            .req_header()
            .headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        if expects_continue && !session.as_downstream_mut().is_body_empty() {
            session
                .as_downstream_mut()
                .write_continue_response()
                .await?;
        }
        let mut buf = BytesMut::new();
        while let Some(chunk) = session.read_request_body().await? {
            buf.extend_from_slice(&chunk);
            if buf.len() > limit {
                session.set_keepalive(None);
                return Ok(Err(too_large));
            }
        }
        Ok(Ok(buf.freeze()))
    }

    /// The request WeChat receives: the app's, minus hop-by-hop headers and
    /// `X-Wx-Account`, with our `Host`, the given path and query, and the body
    /// length.
    fn upstream_request(
        &self,
        client: &RequestHeader,
        path_and_query: &str,
        body_len: usize,
    ) -> pingora::Result<RequestHeader> {
        let mut req = RequestHeader::build(
            client.method.clone(),
            path_and_query.as_bytes(),
            Some(client.headers.len() + 1),
        )?;
        for (name, value) in client.headers.iter() {
            // `Expect` too: the body is already in hand, nothing to wait for.
            if is_hop_by_hop(name)
                || name == header::EXPECT
                || name == header::HOST
                || name == header::CONTENT_LENGTH
                || name.as_str() == ACCOUNT_HEADER
            {
                continue;
            }
            req.append_header(name.clone(), value.clone())?;
        }
        req.insert_header(header::HOST, self.app.upstream.host_header())?;
        let has_body_semantics = matches!(client.method.as_str(), "POST" | "PUT" | "PATCH");
        if body_len > 0 || has_body_semantics {
            req.insert_header(header::CONTENT_LENGTH, body_len.to_string())?;
        }
        Ok(req)
    }

    /// Buffers the request, sends it upstream and writes the answer.
    async fn forward(&self, session: &mut Session, path_and_query: String) -> Step<()> {
        let limit = self.app.config.buffered_body_limit;
        let body = match self.read_body(session, limit).await? {
            Ok(b) => b,
            Err(e) => return Ok(Err(e)),
        };
        let req = self.upstream_request(session.req_header(), &path_and_query, body.len())?;
        let path = session.req_header().uri.path().to_string();
        let upstream_err = |source| ProxyError::Upstream {
            path: path.clone(),
            source,
        };
        let mut x = match self.app.upstream.send(&req, &body).await {
            Ok(x) => x,
            Err(e) => return Ok(Err(upstream_err(e))),
        };
        let mut resp = x.header().clone();
        for name in resp
            .headers
            .keys()
            .filter(|n| is_hop_by_hop(n))
            .cloned()
            .collect::<Vec<_>>()
        {
            resp.remove_header(&name);
        }
        let small = content_length(&resp.headers).is_none_or(|n| n <= limit);
        let head = if small {
            match x.read_to_end(limit).await {
                Err(e) => return Ok(Err(upstream_err(e))),
                Ok(Ok(answer)) => {
                    x.finish().await;
                    resp.insert_header(header::CONTENT_LENGTH, answer.len().to_string())?;
                    session.write_response_header(Box::new(resp), false).await?;
                    session.write_response_body(Some(answer), true).await?;
                    return Ok(Ok(()));
                }
                // Bigger than declared or than the cap: stream the rest.
                Ok(Err(partial)) => Some(partial.freeze()),
            }
        } else {
            None
        };
        self.stream_answer(session, resp, head, x).await
    }

    /// Streams a large answer to the app chunk by chunk.
    async fn stream_answer(
        &self,
        session: &mut Session,
        mut resp: ResponseHeader,
        head: Option<Bytes>,
        mut x: crate::upstream::Exchange<'_>,
    ) -> Step<()> {
        if content_length(&resp.headers).is_none() {
            resp.insert_header(header::TRANSFER_ENCODING, "chunked")?;
        }
        session.write_response_header(Box::new(resp), false).await?;
        if let Some(h) = head {
            session.write_response_body(Some(h), false).await?;
        }
        loop {
            match x.chunk().await {
                Ok(Some(c)) => session.write_response_body(Some(c), false).await?,
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
        x.finish().await;
        session.write_response_body(None, true).await?;
        Ok(Ok(()))
    }

    /// Answers `/cgi-bin/token` and `/cgi-bin/stable_token` from the cache.
    async fn local_token(&self, session: &mut Session, stable: bool) -> Step<()> {
        let body = match self.read_body(session, DEFAULT_CREDENTIALS_LIMIT).await? {
            Ok(b) => b,
            Err(e) => return Ok(Err(e)),
        };
        let creds = if stable {
            if session.req_header().method != http::Method::POST {
                let r = local::Refusal {
                    errcode: 43002,
                    errmsg: "require POST method",
                };
                reply::send_json(session, 200, r.body()).await?;
                return Ok(Ok(()));
            }
            match serde_json::from_slice::<Credentials>(&body) {
                Ok(c) => c,
                Err(_) => {
                    let r = local::Refusal {
                        errcode: 47001,
                        errmsg: "data format error",
                    };
                    reply::send_json(session, 200, r.body()).await?;
                    return Ok(Ok(()));
                }
            }
        } else {
            Credentials::from_query(session.req_header().uri.query().unwrap_or(""))
        };
        let account = match local::authenticate(&self.app, &creds) {
            Ok(a) => a.clone(),
            Err(r) => {
                tracing::info!(
                    path = session.req_header().uri.path(),
                    errcode = r.errcode,
                    "token request refused"
                );
                reply::send_json(session, 200, r.body()).await?;
                return Ok(Ok(()));
            }
        };
        match self.token_for(&account).await {
            Ok(t) => reply::send_json(session, 200, local::token_answer(&t)).await?,
            Err(e) => return Ok(Err(e)),
        }
        Ok(Ok(()))
    }
}

#[async_trait]
impl ProxyHttp for Proxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx::default()
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> pingora::Result<bool> {
        let route = route::classify(session.req_header());
        let outcome = match route {
            Route::LocalClassicToken => self.local_token(session, false).await?,
            Route::LocalStableToken => self.local_token(session, true).await?,
            Route::Untouched => {
                let pq = session
                    .req_header()
                    .uri
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .to_string();
                self.forward(session, pq).await?
            }
            Route::Api => match self.plan(session.req_header()).await {
                Ok(pq) => self.forward(session, pq).await?,
                Err(e) => Err(e),
            },
            Route::Stream => match self.plan(session.req_header()).await {
                Ok(pq) => {
                    let uri = pq.parse::<http::Uri>().map_err(|_| {
                        Error::explain(
                            ErrorType::InvalidHTTPHeader,
                            "bad path after token injection",
                        )
                    })?;
                    ctx.stream_uri = Some(uri);
                    return Ok(false);
                }
                Err(e) => Err(e),
            },
        };
        if let Err(e) = outcome {
            let path = session.req_header().uri.path();
            if e.status() >= 500 {
                tracing::warn!(path, status = e.status(), error = %e, "request failed");
            } else {
                tracing::info!(path, status = e.status(), error = %e, "request refused");
            }
            reply::send_error(session, &e).await?;
        }
        Ok(true)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut Ctx,
    ) -> pingora::Result<Box<HttpPeer>> {
        self.app
            .upstream
            .peer()
            .map(Box::new)
            .map_err(|e| Error::explain(ErrorType::ConnectNoRoute, e.to_string()))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> pingora::Result<()> {
        if let Some(uri) = ctx.stream_uri.take() {
            req.set_uri(uri);
        }
        req.remove_header(ACCOUNT_HEADER);
        req.insert_header(header::HOST, self.app.upstream.host_header())?;
        Ok(())
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

    /// Method and path only: pingora logs this, and the query may hold secrets.
    fn request_summary(&self, session: &Session, _ctx: &Ctx) -> String {
        let r = session.req_header();
        format!("{} {}", r.method, r.uri.path())
    }
}
