//! Send, read the errcode, replay once: a request goes to WeChat with the
//! plan's token; when WeChat says the token we put in is invalid, the
//! token is reported (compare-and-refresh), the one refresh awaited, and
//! the request sent once more with the same bytes and the new token. The
//! app sees only the second answer.

use bytes::Bytes;
use tokio::time::Instant;

use super::answer::{Answer, Streaming, Whole};
use super::plan::Plan;
use super::scrub::scrubbed;
use crate::app::App;
use crate::failover::Upstreams;
use crate::guard::bodies::AnswerClaim;
use crate::inspect;
use crate::reply::ProxyError;
use crate::upstream::{AnswerDeadline, Outgoing, UpstreamError};

/// A request as a front parsed it: what the pipeline needs to send it. The
/// request line, `Host`, `Accept-Encoding`, `Content-Length` and the token
/// are the pipeline's to write; the front gives the rest.
pub(crate) trait Request: Sync {
    fn method(&self) -> &http::Method;
    /// The (normalised) path, as routes saw it.
    fn path(&self) -> &str;
    fn query(&self) -> Option<&str>;
    fn body(&self) -> &[u8];
    /// The headers WeChat gets, as `name: value\r\n` lines: the app's,
    /// minus hop-by-hop ones, those the pipeline writes (`Host`,
    /// `Content-Length`, `Accept-Encoding`), `Expect`, `X-Wx-Account` and
    /// our own bearer token.
    fn h1_headers(&self, out: &mut Vec<u8>);
    /// The same headers into an HTTP/2 request's map.
    fn h2_headers(&self, headers: &mut http::HeaderMap) -> Result<(), &'static str>;
}

/// A request with the plan's target, as the upstream sends it.
struct Sending<'a, R: ?Sized> {
    req: &'a R,
    plan: &'a Plan,
}

impl<R: Request + ?Sized> Sending<'_, R> {
    /// `Content-Length` goes with any body, and with an empty one on the
    /// methods that have body semantics.
    fn length(&self) -> Option<usize> {
        let n = self.req.body().len();
        let m = self.req.method();
        (n > 0 || *m == http::Method::POST || *m == http::Method::PUT || *m == http::Method::PATCH)
            .then_some(n)
    }
}

/// `req` with `plan`'s target, as an upstream sends it (for tests of a
/// front's requests).
#[cfg(test)]
pub(crate) fn outgoing<'a, R: Request + ?Sized>(req: &'a R, plan: &'a Plan) -> impl Outgoing + 'a {
    Sending { req, plan }
}

/// Bytes a request target may not hold on the wire.
fn target_ok(target: &[u8]) -> bool {
    target.iter().all(|&b| b > 0x20 && b != 0x7f)
}

impl<R: Request + ?Sized> Outgoing for Sending<'_, R> {
    fn h1_head(&self, out: &mut Vec<u8>) -> Result<(), &'static str> {
        out.extend_from_slice(self.req.method().as_str().as_bytes());
        out.push(b' ');
        let at = out.len();
        self.plan.target(self.req.path(), self.req.query(), out);
        if !target_ok(&out[at..]) {
            return Err("request target not valid for HTTP/1.1");
        }
        out.extend_from_slice(b" HTTP/1.1\r\n");
        self.req.h1_headers(out);
        if let Some(n) = self.length() {
            out.extend_from_slice(b"Content-Length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Ok(())
    }

    fn to_h2(&self, authority: &http::uri::Authority) -> Result<http::Request<()>, &'static str> {
        let mut target = Vec::with_capacity(256);
        self.plan
            .target(self.req.path(), self.req.query(), &mut target);
        let target = http::uri::PathAndQuery::from_maybe_shared(Bytes::from(target))
            .map_err(|_| "request target not valid for HTTP/2")?;
        let mut req = http::Request::new(());
        *req.method_mut() = self.req.method().clone();
        *req.uri_mut() = crate::upstream::h2_uri(authority, Some(target))?;
        *req.version_mut() = http::Version::HTTP_2;
        let headers = req.headers_mut();
        self.req.h2_headers(headers)?;
        headers.insert(
            http::header::ACCEPT_ENCODING,
            http::HeaderValue::from_static(crate::upstream::IDENTITY),
        );
        if let Some(n) = self.length() {
            headers.insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(n));
        }
        Ok(req)
    }

    fn idempotent(&self) -> bool {
        crate::upstream::is_idempotent(self.req.method())
    }
}

/// Sends `req` by `plan` and reads the answer: whole when it fits
/// `limits.buffered_body` and the shared total (`claim`, held by the
/// caller until the answer is written), else its head and first bytes
/// for streaming. The account's daily cap is checked first. `start`: the
/// request's start, when the front has it (the answer deadline counts
/// from it; a replay's from its own start). `upstreams`: the plan's
/// family's (`App::upstream_for`), which the answer borrows.
pub(crate) async fn exchange<'u, R: Request + ?Sized>(
    app: &App,
    upstreams: &'u Upstreams,
    plan: &mut Plan,
    req: &R,
    start: Option<Instant>,
    claim: &mut AnswerClaim<'_>,
) -> Result<Answer<'u>, ProxyError> {
    let path = req.path();
    admit(plan, path)?;
    let upstream_err = |source| upstream_error(path, source);
    let limit = app.config().limits.buffered_body;
    let mut replaying = false;
    loop {
        let deadline = match (replaying, start) {
            (false, Some(s)) => AnswerDeadline::from(s, upstreams.answer_timeout()),
            _ => AnswerDeadline::from_now(upstreams.answer_timeout()),
        };
        let sending = Sending { req, plan: &*plan };
        let mut x = upstreams
            .send(&sending, req.body(), Some(deadline))
            .await
            .map_err(upstream_err)?;
        // Each read of the exchange keeps the deadline in its own timer.
        if let Err(partial) = x.read_whole(limit, claim).await.map_err(upstream_err)? {
            // Over the buffered limit, or over the shared total now:
            // streamed through.
            return Ok(Answer::Streaming(Streaming::new(
                x,
                partial,
                plan.token.clone(),
                deadline,
            )));
        }
        let errcode = inspect::errcode(x.body());
        if let Some(a) = &plan.account {
            a.note_answer(errcode, path, || {
                // Kept for /status: never with our token in it.
                inspect::errmsg(&scrubbed(x.body(), plan.token.as_deref()))
            });
        }
        let rejected =
            plan.token.is_some() && errcode.is_some_and(|c| inspect::INVALID_TOKEN.contains(&c));
        if replaying {
            plan.count_replay(path, !rejected);
        } else if rejected {
            if let Some(fresh) = replacement(app, plan).await {
                x.finish();
                tracing::debug!(
                    path,
                    "token rejected by WeChat; replaying with the refreshed token"
                );
                plan.token = Some(fresh);
                replaying = true;
                continue;
            }
            plan.count_replay(path, false);
        }
        return Ok(Answer::Whole(Whole::new(x, errcode, plan.token.clone())));
    }
}

/// The account's daily cap for `path` (`accounts[].limits`): every call
/// with its token counts, streamed uploads too, before anything is sent.
pub(super) fn admit(plan: &Plan, path: &str) -> Result<(), ProxyError> {
    let Some(a) = &plan.account else {
        return Ok(());
    };
    a.admit_call(path).map_err(|over| ProxyError::QuotaLimit {
        account: a.name.clone(),
        path: path.to_string(),
        per_day: over.per_day,
    })
}

/// An upstream failure as the app's error: every host out of use is a
/// 503, anything else a 502 or 504 naming the path.
pub(super) fn upstream_error(path: &str, source: UpstreamError) -> ProxyError {
    match source {
        UpstreamError::Unavailable => ProxyError::Unavailable,
        source => ProxyError::Upstream {
            path: path.to_string(),
            source,
        },
    }
}

/// After WeChat rejected `plan`'s token: report it (compare-and-refresh)
/// and wait for the one refresh to bring a replacement.
async fn replacement(app: &App, plan: &Plan) -> Option<std::sync::Arc<crate::lease::Lease>> {
    let cell = plan.cell()?;
    let bad = plan.token.as_ref()?;
    cell.report_invalid(&bad.value);
    cell.wait_replacement(
        &bad.value,
        app.upstream_for(crate::config::Family::Official)
            .read_timeout(),
    )
    .await
}

/// Whether an app's request header goes on to WeChat: not hop-by-hop, not
/// one the pipeline writes itself (`Host`, `Content-Length`,
/// `Accept-Encoding`: every answer is read here, so it asks for
/// `identity`), not `Expect` (the body is in hand), not `X-Wx-Account`, and
/// not our own bearer token (`uses_tokens`: `clients` gives tokens). Headers
/// the request's `Connection` names are the front's to leave out too.
pub(crate) fn forwarded(name: &[u8], uses_tokens: bool) -> bool {
    let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
    !(super::HOP_BY_HOP.iter().any(|h| is(h))
        || is("host")
        || is("content-length")
        || is("accept-encoding")
        || is("expect")
        || is(crate::account::ACCOUNT_HEADER)
        || (uses_tokens && is("authorization")))
}
