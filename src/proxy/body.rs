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
/// The next piece of the body, unless the body as a whole outlives
/// `deadline` (`limit` long from its start: `limits.body_timeout`).
async fn body_piece(
    session: &mut Session,
    deadline: tokio::time::Instant,
    limit: std::time::Duration,
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
                limit,
            }))
        }
    }
}

impl Proxy {
    /// The next piece of the request body (`None` at its end), unless the
    /// body as a whole outlives `deadline` (`limits.body_timeout`): then the
    /// connection is not reused, as the rest may still come.
    pub(super) async fn body_chunk(
        &self,
        session: &mut Session,
        deadline: tokio::time::Instant,
    ) -> Step<Option<Bytes>> {
        body_piece(session, deadline, self.app.config().limits.body_timeout).await
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;
    use tokio::time::Instant;

    use super::*;

    const LIMIT: Duration = Duration::from_secs(180);

    /// A session whose head has been read, and the app's end of it.
    async fn open_session(head: &[u8]) -> (Session, tokio::io::DuplexStream) {
        let (ours, mut app) = tokio::io::duplex(64 * 1024);
        app.write_all(head).await.unwrap();
        let mut session = Session::new_h1(Box::new(ours));
        assert!(session.read_request().await.unwrap());
        (session, app)
    }

    /// The body deadline on tokio's clock: a body still coming at it ends
    /// the request (408-shaped `BodyTimeout`, not reused) exactly then; one
    /// whose last bytes come a second before it is read whole.
    #[tokio::test(start_paused = true)]
    async fn a_body_is_whole_by_its_deadline_or_the_request_ends() {
        let head =
            b"POST /cgi-bin/media/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n01234";
        let (mut session, _app) = open_session(head).await;
        let start = Instant::now();
        let deadline = start + LIMIT;
        let first = body_piece(&mut session, deadline, LIMIT)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first.as_deref(), Some(&b"01234"[..]));
        let rest = body_piece(&mut session, deadline, LIMIT).await.unwrap();
        assert!(
            matches!(rest, Err(ProxyError::BodyTimeout { limit, .. }) if limit == LIMIT),
            "{rest:?}"
        );
        assert_eq!(
            start.elapsed(),
            LIMIT,
            "ended at the deadline, not before or after"
        );

        let (mut session, mut app) = open_session(head).await;
        let start = Instant::now();
        let deadline = start + LIMIT;
        let writer = tokio::spawn(async move {
            tokio::time::sleep(LIMIT - Duration::from_secs(1)).await;
            app.write_all(b"56789").await.unwrap();
            app
        });
        let mut body = Vec::new();
        while let Some(piece) = body_piece(&mut session, deadline, LIMIT)
            .await
            .unwrap()
            .unwrap()
        {
            body.extend_from_slice(&piece);
        }
        assert_eq!(body, b"0123456789");
        assert_eq!(start.elapsed(), LIMIT - Duration::from_secs(1));
        drop(writer.await);
    }
}
