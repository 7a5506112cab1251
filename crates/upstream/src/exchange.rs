//! An answer on its way back, whichever connection carries it: our
//! HTTP/1.1 exchange ([`RawExchange`]) or a stream of a shared HTTP/2
//! connection. Every caller reads answers through this one type.

use bytes::{Bytes, BytesMut};

use super::{H2Exchange, RawExchange, UpstreamError};
use crate::bodies::AnswerClaim;

/// A request sent and its answer's head read; the body is still to come.
// The common answer stays inline (boxing it would allocate per request);
// the rare HTTP/2 one is boxed.
#[allow(clippy::large_enum_variant)]
pub enum Exchange<'a> {
    /// Our own HTTP/1.1 exchange.
    H1(RawExchange<'a>),
    /// A stream of a shared HTTP/2 connection, and its body once read
    /// whole. Boxed: ~1 KiB the HTTP/1.1 answers need not carry.
    H2(Box<(H2Exchange<'a>, Bytes)>),
}

impl<'a> From<RawExchange<'a>> for Exchange<'a> {
    fn from(x: RawExchange<'a>) -> Self {
        Exchange::H1(x)
    }
}

impl Exchange<'_> {
    pub fn status(&self) -> u16 {
        match self {
            Exchange::H1(x) => x.status,
            Exchange::H2(x) => x.0.header().status.as_u16(),
        }
    }

    /// Calls `f` with each header of the answer, as received.
    pub fn for_each_header(&self, mut f: impl FnMut(&[u8], &[u8])) {
        match self {
            Exchange::H1(x) => x.headers().for_each(|(n, v)| f(n, v)),
            Exchange::H2(x) => {
                x.0.header()
                    .headers
                    .iter()
                    .for_each(|(n, v)| f(n.as_str().as_bytes(), v.as_bytes()))
            }
        }
    }

    /// Whether the answer carries header `name`.
    pub fn has_header(&self, name: &[u8]) -> bool {
        let mut found = false;
        self.for_each_header(|n, _| found |= n.eq_ignore_ascii_case(name));
        found
    }

    /// The body's length still to come, when the answer declares one.
    pub fn declared_length(&self) -> Option<usize> {
        match self {
            Exchange::H1(x) => x.declared_length(),
            Exchange::H2(x) => x.0.declared_left(),
        }
    }

    /// Done with the head (it was written on): a streamed body's buffer
    /// then holds only bytes in flight.
    pub fn release_head(&mut self) {
        if let Exchange::H1(x) = self {
            x.release_head();
        }
    }

    /// Reads the body whole, up to `cap` and as far as `claim` has room in
    /// the shared total, for [`Self::body`]; `Ok(Err(partial))` when it is
    /// larger.
    pub async fn read_whole(
        &mut self,
        cap: usize,
        claim: &mut AnswerClaim<'_>,
    ) -> Result<Result<(), Vec<u8>>, UpstreamError> {
        match self {
            Exchange::H1(x) => x.read_whole(cap, claim).await,
            Exchange::H2(x) => Ok(match x.0.read_to_end(cap, Some(claim)).await? {
                Ok(b) => {
                    x.1 = b;
                    Ok(())
                }
                Err(partial) => Err(partial.to_vec()),
            }),
        }
    }

    /// The body [`Self::read_whole`] read (empty before).
    pub fn body(&self) -> &[u8] {
        match self {
            Exchange::H1(x) => x.body(),
            Exchange::H2(x) => &x.1,
        }
    }

    /// The rest of the body in memory, up to `cap` bytes (and, with a
    /// `claim`, as far as the shared total allows); `Ok(Err(partial))` when
    /// it is larger.
    pub async fn read_to_end(
        &mut self,
        cap: usize,
        claim: Option<&mut AnswerClaim<'_>>,
    ) -> Result<Result<Bytes, Vec<u8>>, UpstreamError> {
        match self {
            Exchange::H1(x) => x.read_to_end(cap, claim).await,
            Exchange::H2(x) => Ok(x
                .0
                .read_to_end(cap, claim)
                .await?
                .map_err(|p: BytesMut| p.to_vec())),
        }
    }

    /// The next piece of the body; `None` at its end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        match self {
            Exchange::H1(x) => x.chunk().await,
            Exchange::H2(x) => x.0.chunk().await,
        }
    }

    /// Returns an HTTP/1.1 connection to the pool when the answer was read
    /// whole and both sides allow keep-alive; ends an HTTP/2 stream.
    pub fn finish(self) {
        match self {
            Exchange::H1(x) => x.finish(),
            // Dropping the stream frees its slot.
            Exchange::H2(_) => {}
        }
    }
}
