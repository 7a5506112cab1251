//! A streamed upload (media over `limits.buffered_body`, or chunked) through
//! the same stages as every request where they apply: the plan's token and
//! daily cap, the body's framing kept, our HTTP/1.1 exchange (pooled then
//! fresh, failover), the answer scrubbed as it streams. Not replayed: the
//! body is not kept.

use bytes::Bytes;
use pingora::http::RequestHeader;

use super::answer::Streaming;
use super::plan::Plan;
use super::send::{admit, upstream_error};
use crate::failover::Upstreams;
use crate::reply::ProxyError;
use crate::upstream::AnswerDeadline;

/// Why an upload stopped before its answer.
pub(crate) enum Stop {
    /// Answered to the app as an error.
    Answer(ProxyError),
    /// The front's own connection failed (pingora's error).
    Front(Box<pingora::Error>),
}

/// An app's body as a front reads it, piece by piece.
pub(crate) trait Pieces {
    /// The upstream took the head: the front may tell the app to go on
    /// (`100 Continue`).
    async fn started(&mut self) -> Result<(), Stop>;
    /// The next piece; `None` at the body's end.
    async fn next(&mut self) -> Result<Option<Bytes>, Stop>;
    /// The app's body will not be read to its end: its connection cannot
    /// carry another request.
    fn abandon(&mut self);
}

/// Sends `head` (the app's forwarded headers, for `target`) and the body
/// `pieces` give, framed as it came (`declared` length, else chunks when
/// `has_body`); returns the answer to stream back.
pub(crate) async fn upload<'u>(
    upstreams: &'u Upstreams,
    plan: &Plan,
    path: &str,
    mut head: RequestHeader,
    declared: Option<usize>,
    has_body: bool,
    pieces: &mut impl Pieces,
) -> Result<Streaming<'u>, Stop> {
    // Counted (and capped) like every API call, before any body moves.
    if let Err(e) = admit(plan, path) {
        pieces.abandon();
        return Err(Stop::Answer(e));
    }
    let chunked = declared.is_none() && has_body;
    let framed = match declared {
        Some(n) => head.insert_header(http::header::CONTENT_LENGTH, n),
        None if chunked => head.insert_header(http::header::TRANSFER_ENCODING, "chunked"),
        None => Ok(()),
    };
    framed.map_err(Stop::Front)?;
    let failed = |e| Stop::Answer(upstream_error(path, e));
    let mut up = upstreams.open(&head, chunked).await.map_err(failed)?;
    pieces.started().await?;
    while let Some(piece) = pieces.next().await? {
        if let Err(e) = up.write(&piece).await {
            pieces.abandon();
            return Err(failed(e));
        }
    }
    let deadline = AnswerDeadline::from_now(upstreams.answer_timeout());
    let x = up.finish(Some(deadline)).await.map_err(failed)?;
    Ok(Streaming::new(
        x.into(),
        Vec::new(),
        plan.token.clone(),
        deadline,
    ))
}
