//! The answer as the app gets it, whichever front writes it: the status
//! with its standard reason (the front writes the line), the headers minus
//! hop-by-hop ones and any that carries our token, our `Content-Length` and
//! `Retry-After`, the body with our token masked — whole, or piece by
//! piece for an answer over the buffered limit.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;

use super::scrub::{carries, removed, scrubbed, Scrubber};
use crate::lease::Lease;
use crate::upstream::{AnswerDeadline, Exchange, UpstreamError};

/// Headers that describe one hop, not the message: never forwarded, or
/// pooling silently stops.
pub(crate) const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// The options of one `Connection` value, trimmed.
pub(crate) fn connection_tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// The header names one `Connection` value lists (RFC 9110 §7.6.1): those
/// headers are for this hop alone. `close` and `keep-alive` name no header.
pub(crate) fn connection_options(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    connection_tokens(value)
        .filter(|t| !t.eq_ignore_ascii_case(b"close") && !t.eq_ignore_ascii_case(b"keep-alive"))
}

/// A status whose answer has no body and so no length (RFC 9110 §8.6).
pub(crate) fn bodiless(status: u16) -> bool {
    status == 204 || status == 304 || (100..200).contains(&status)
}

/// What came back.
pub(crate) enum Answer<'u> {
    Whole(Whole<'u>),
    Streaming(Streaming<'u>),
}

/// Calls `f` with each of the upstream's headers that may go to the app:
/// not hop-by-hop (nor one its `Connection` names), not its length (the
/// front frames the body), none that carries `token`.
fn each_header(x: &Exchange<'_>, token: Option<&Lease>, mut f: impl FnMut(&[u8], &[u8])) {
    // Usually `keep-alive` or none: nothing allocated then.
    let mut named: Vec<Vec<u8>> = Vec::new();
    x.for_each_header(|name, value| {
        if name.eq_ignore_ascii_case(b"connection") {
            named.extend(connection_options(value).map(<[u8]>::to_vec));
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
        f(name, value);
    });
}

/// An answer read whole.
pub(crate) struct Whole<'u> {
    x: Exchange<'u>,
    /// WeChat's errcode in it.
    pub errcode: Option<i64>,
    token: Option<Arc<Lease>>,
}

impl<'u> Whole<'u> {
    pub(super) fn new(x: Exchange<'u>, errcode: Option<i64>, token: Option<Arc<Lease>>) -> Self {
        Whole { x, errcode, token }
    }

    pub fn status(&self) -> u16 {
        self.x.status()
    }

    /// The body as the app gets it: our token masked.
    pub fn body(&self) -> Cow<'_, [u8]> {
        if bodiless(self.status()) {
            return Cow::Borrowed(&[]);
        }
        scrubbed(self.x.body(), self.token.as_deref())
    }

    /// Calls `f` with each header the app gets: the upstream's that may go
    /// on, `Retry-After` when WeChat's errcode says when to try again and
    /// the answer has none, and the body's length (`body_len`, none on a
    /// status that has no body).
    pub fn head(&self, body_len: usize, mut f: impl FnMut(&[u8], &[u8])) {
        each_header(&self.x, self.token.as_deref(), &mut f);
        let after = self.errcode.and_then(crate::quota::retry_after);
        if let Some(after) = after.filter(|_| !self.x.has_header(b"retry-after")) {
            f(b"Retry-After", after.as_bytes());
        }
        if !bodiless(self.status()) {
            f(
                b"Content-Length",
                itoa::Buffer::new().format(body_len).as_bytes(),
            );
        }
    }

    /// Done: the upstream connection goes back to the pool (call it once
    /// the body is copied out, before the app's write).
    pub fn finish(self) {
        self.x.finish();
    }
}

/// An answer over the buffered limit: its head, then the body piece by
/// piece as it comes, within the answer deadline, our token masked even
/// when split between two pieces.
pub(crate) struct Streaming<'u> {
    x: Exchange<'u>,
    /// What was read before the answer turned out too large.
    first: Option<Vec<u8>>,
    /// Bytes of it the front has yet to write at the start.
    first_len: usize,
    scrub: Option<Scrubber>,
    deadline: AnswerDeadline,
}

impl<'u> Streaming<'u> {
    pub(crate) fn new(
        x: Exchange<'u>,
        first: Vec<u8>,
        token: Option<Arc<Lease>>,
        deadline: AnswerDeadline,
    ) -> Self {
        Streaming {
            x,
            first_len: first.len(),
            first: (!first.is_empty()).then_some(first),
            scrub: Some(Scrubber::new(token)),
            deadline,
        }
    }

    pub fn status(&self) -> u16 {
        self.x.status()
    }

    /// The whole body's length, when the upstream declared one (what is
    /// left plus what was read).
    pub fn length(&self) -> Option<usize> {
        self.x.declared_length().map(|n| n + self.first_len)
    }

    /// Calls `f` with each upstream header the app gets (the front adds
    /// the framing: [`Self::length`], or chunks, or a close).
    pub fn head(&mut self, f: impl FnMut(&[u8], &[u8])) {
        let token = self.scrub.as_ref().and_then(Scrubber::token);
        each_header(&self.x, token.as_deref(), f);
    }

    /// The head is written: its buffer can go.
    pub fn head_written(&mut self) {
        self.x.release_head();
    }

    /// The next piece of the body for the app (`None` at its end): scrubbed,
    /// within the answer deadline. An error ends the answer short (logged
    /// here).
    pub async fn next(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        if let Some(first) = self.first.take() {
            let scrub = self.scrub.as_mut().expect("scrubber until the end");
            return Ok(Some(scrub.piece(first.into())));
        }
        let Some(scrub) = self.scrub.as_mut() else {
            return Ok(None);
        };
        let got = tokio::time::timeout_at(self.deadline.at, self.x.chunk())
            .await
            .unwrap_or_else(|_| Err(self.deadline.missed()));
        match got {
            Ok(Some(c)) => Ok(Some(scrub.piece(c))),
            Ok(None) => {
                let rest = self.scrub.take().expect("checked above").finish();
                Ok(Some(rest))
            }
            // Passed here, or inside our HTTP/1.1 exchange, which ends its
            // reads at the deadline itself: either names the deadline's limit.
            Err(e @ UpstreamError::Timeout { after, .. }) if after == self.deadline.limit => {
                tracing::warn!(limit = ?self.deadline.limit, "answer cut at upstream.answer_timeout");
                Err(e)
            }
            Err(e) => {
                tracing::warn!(error = %e, "upstream failed mid-answer");
                Err(e)
            }
        }
    }

    /// Done: the upstream connection goes back to the pool when the answer
    /// was read to its end.
    pub fn finish(self) {
        self.x.finish();
    }
}
