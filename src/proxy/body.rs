//! Reading an app's request body: whole (up to a limit, counted against
//! `limits.buffered_total`) or piece by piece, within
//! `limits.body_timeout`, with `100 Continue` sent when the app waits for it.

use bytes::{Bytes, BytesMut};
use http::header;
use pingora::proxy::Session;

use super::{content_length, Proxy, Step};
use crate::reply::ProxyError;

/// A request body read whole, and its share of `limits.buffered_total`
/// until it is dropped.
pub(crate) struct Body {
    bytes: Bytes,
    _hold: crate::guard::bodies::Hold,
}

impl std::ops::Deref for Body {
    type Target = Bytes;
    fn deref(&self) -> &Bytes {
        &self.bytes
    }
}

/// pingora's error type for chunked framing it cannot read (its constant is
/// private to pingora).
const BAD_CHUNK_ERROR: &str = "InvalidChunk";

pub(super) async fn continue_if_expected(session: &mut Session) -> pingora::Result<()> {
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
        // The body that follows is the request's, not a next head.
        crate::guard::head_complete();
    }
    Ok(())
}

/// Outcome of a step: `Err(ProxyError)` is answered to the app; the outer
/// `pingora::Result` carries failures talking to the app itself.
impl Proxy {
    /// The next piece of the request body (`None` at its end), unless the
    /// body as a whole outlives `deadline` (`limits.body_timeout`): then the
    /// connection is not reused, as the rest may still come.
    pub(super) async fn body_chunk(
        &self,
        session: &mut Session,
        deadline: tokio::time::Instant,
    ) -> Step<Option<Bytes>> {
        match tokio::time::timeout_at(deadline, session.read_request_body()).await {
            Ok(Ok(chunk)) => Ok(Ok(chunk)),
            // The app's framing is wrong (a chunk size that is not one, an
            // extension past pingora's limit): its fault, answered 400, and
            // the connection is not reused (where the body ends is unknown).
            Ok(Err(e)) if e.etype().as_str() == BAD_CHUNK_ERROR => {
                session.set_keepalive(None);
                Ok(Err(ProxyError::BadRequest {
                    path: session.req_header().uri.path().to_string(),
                    reason: "the chunked request body is malformed".into(),
                }))
            }
            Ok(Err(e)) => Err(e),
            Err(_) => {
                session.set_keepalive(None);
                Ok(Err(ProxyError::BodyTimeout {
                    path: session.req_header().uri.path().to_string(),
                    limit: self.app.config().limits.body_timeout,
                }))
            }
        }
    }

    /// Reads the whole request body, up to `limit`, counted against
    /// `limits.buffered_total` while it lives (by its declared length from
    /// the start, else as it comes).
    pub(super) async fn read_body(&self, session: &mut Session, limit: usize) -> Step<Body> {
        let too_large = |session: &Session| ProxyError::BodyTooLarge {
            limit,
            path: session.req_header().uri.path().to_string(),
        };
        let declared = content_length(&session.req_header().headers);
        if declared.is_some_and(|n| n > limit) {
            session.set_keepalive(None);
            return Ok(Err(too_large(session)));
        }
        let bodies = &self.app.bodies;
        let mut hold = bodies.hold();
        let spent = |session: &mut Session, s: crate::guard::bodies::Spent| {
            // The body is left unread: the connection cannot carry another.
            session.set_keepalive(None);
            ProxyError::BodiesBusy { total: s.max }
        };
        if let Err(s) = bodies.grow(&mut hold, declared.unwrap_or(0)) {
            return Ok(Err(spent(session, s)));
        }
        session.as_downstream_mut().enable_retry_buffering();
        continue_if_expected(session).await?;
        // Most bodies come in one read: kept as it came, no copy.
        let mut first: Option<Bytes> = None;
        let mut buf = BytesMut::new();
        let deadline = tokio::time::Instant::now() + self.app.config().limits.body_timeout;
        loop {
            let chunk = match self.body_chunk(session, deadline).await? {
                Ok(chunk) => chunk,
                Err(e) => return Ok(Err(e)),
            };
            let Some(chunk) = chunk else { break };
            if buf.is_empty() && first.is_none() {
                if chunk.len() > limit {
                    session.set_keepalive(None);
                    return Ok(Err(too_large(session)));
                }
                if let Err(s) = bodies.grow(&mut hold, chunk.len()) {
                    return Ok(Err(spent(session, s)));
                }
                first = Some(chunk);
                continue;
            }
            if let Some(f) = first.take() {
                buf.extend_from_slice(&f);
            }
            buf.extend_from_slice(&chunk);
            if buf.len() > limit {
                session.set_keepalive(None);
                return Ok(Err(too_large(session)));
            }
            if let Err(s) = bodies.grow(&mut hold, buf.len()) {
                return Ok(Err(spent(session, s)));
            }
        }
        Ok(Ok(Body {
            bytes: first.unwrap_or_else(|| buf.freeze()),
            _hold: hold,
        }))
    }
}
