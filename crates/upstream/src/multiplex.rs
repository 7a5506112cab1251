//! The HTTP/2 way to a host (`upstream.http2`): connections shared by many
//! requests, a stream per request on the one with room, a new connection
//! when none has it (one opened at a time), HTTP/1.1 from then on when the
//! server declines h2; failures read as ours, with the same resend rule as
//! HTTP/1.1 (again only when WeChat cannot have acted).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use bytes::{Bytes, BytesMut};
use pingora::http::ResponseHeader;
use pingora::protocols::ALPN;
use pingora::upstreams::peer::Peer;

use super::{h1, peer_addr, AnswerDeadline, Failed, Outgoing, Upstream, UpstreamError};

/// Concurrent streams we open on one HTTP/2 connection before opening
/// another, fewer when the server allows fewer (its
/// SETTINGS_MAX_CONCURRENT_STREAMS): RFC 9113 asks servers to allow at
/// least 100; nginx allows 128. More streams per connection share writes
/// (measured: 32 → 100 gave ~1.5 % more requests per second at 64 and 256
/// connections over TLS).
const DEFAULT_H2_STREAMS: usize = 100;
/// A stream of a shared HTTP/2 connection, its answer's head read; the
/// body is still to come.
pub struct H2Exchange<'a> {
    upstream: &'a Upstream,
    answer: super::h2::Answer,
    /// The address it went to, for errors.
    addr: SocketAddr,
    /// Body bytes read so far.
    taken: usize,
}

impl Upstream {
    /// Room for a new stream on a live HTTP/2 connection, opening one if
    /// none has it. `None` when the server declined h2: use HTTP/1.1 from
    /// now on (the connection it declined on goes to the HTTP/1.1 pool).
    /// With `by`, a connection opened here is ready by its deadline.
    pub(super) async fn h2_stream(
        &self,
        by: Option<AnswerDeadline>,
    ) -> Result<Option<(super::h2::Conn, super::h2::Slot, SocketAddr)>, UpstreamError> {
        if let Some((conn, slot)) = self.h2_shared_stream() {
            return Ok(Some((conn, slot, self.preferred_addr()?)));
        }
        // Boxed: opening a connection (handshake included) is a large
        // future that every request's future would otherwise carry.
        match by {
            None => Box::pin(self.h2_new_stream()).await,
            Some(d) => Box::pin(tokio::time::timeout_at(d.at, self.h2_new_stream()))
                .await
                .map_err(|_| d.missed())?,
        }
    }

    /// [`Self::h2_stream`] when no live connection has room: one caller
    /// at a time opens a connection, the others then share it.
    async fn h2_new_stream(
        &self,
    ) -> Result<Option<(super::h2::Conn, super::h2::Slot, SocketAddr)>, UpstreamError> {
        let _one_at_a_time = self.h2_connecting.lock().await;
        // Someone may have connected while we waited.
        if let Some((conn, slot)) = self.h2_shared_stream() {
            return Ok(Some((conn, slot, self.preferred_addr()?)));
        }
        if !self.uses_h2() {
            return Ok(None);
        }
        let (stream, peer) = self.connect().await?;
        if stream.selected_alpn_proto() != Some(ALPN::H2) {
            if !self.h2_declined.swap(true, Ordering::Relaxed) {
                tracing::info!(upstream = %self.url, "upstream declined HTTP/2; using HTTP/1.1");
                // From now on offer HTTP/1.1 alone, so no later connection
                // can come back as h2 on the HTTP/1.1 path.
                let r = self.resolved.load_full();
                let addrs: Vec<SocketAddr> = r
                    .peers
                    .iter()
                    .filter_map(|p| p.address().as_inet().copied())
                    .collect();
                self.set_addrs(&addrs, r.valid_until);
            }
            // The connection itself speaks HTTP/1.1: pool it under the new peer.
            let same = self
                .resolved
                .load()
                .peers
                .iter()
                .find(|p| p.address() == peer.address())
                .cloned();
            if let Some(p) = same {
                self.pool.put(stream, p.reuse_hash());
            }
            return Ok(None);
        }
        let addr = peer_addr(&peer);
        // The preface and settings go out within the connect timeout too.
        let handshake = tokio::time::timeout(
            self.conf.connect_timeout,
            super::h2::handshake(stream, DEFAULT_H2_STREAMS),
        );
        let conn = match handshake.await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => {
                return Err(UpstreamError::Connect {
                    addr: addr.to_string(),
                    reason: format!("HTTP/2 handshake: {}", super::h2::describe(&e)),
                })
            }
            Err(_) => {
                return Err(UpstreamError::ConnectTimeout {
                    addr: addr.to_string(),
                    after: self.conf.connect_timeout,
                })
            }
        };
        self.h2.lock().push(conn.clone());
        let slot = conn.claim().ok_or_else(|| UpstreamError::Connect {
            addr: addr.to_string(),
            reason: "new HTTP/2 connection has no room for a stream".into(),
        })?;
        Ok(Some((conn, slot, addr)))
    }

    /// Room on a live connection, if one has it.
    fn h2_shared_stream(&self) -> Option<(super::h2::Conn, super::h2::Slot)> {
        let mut conns = self.h2.lock();
        conns.retain(super::h2::Conn::usable);
        let found = conns
            .iter()
            .find_map(|c| c.claim().map(|slot| (c.clone(), slot)))?;
        drop(conns);
        self.stats.reused.inc();
        Some(found)
    }

    /// [`Self::send`] over HTTP/2 alone, for a request built as HTTP/2
    /// sends it (the fast lane's): `None` when the server declined h2 (the
    /// caller uses HTTP/1.1). `by`: the answer deadline, kept by each wait
    /// of the exchange within the same timer as its read timeout.
    pub async fn send_h2<R: Outgoing + ?Sized>(
        &self,
        req: &R,
        body: &[u8],
        by: Option<AnswerDeadline>,
    ) -> Result<Option<H2Exchange<'_>>, UpstreamError> {
        let result = self.h2_send(req, body, by).await;
        match &result {
            Ok(None) => {}
            Ok(Some(_)) => self.stats.ok.inc(),
            Err(_) => self.stats.failed.inc(),
        }
        result
    }

    /// The HTTP/2 way: a stream on a shared connection. The same resend
    /// rule as HTTP/1.1: again (up to three tries in all) only when WeChat
    /// cannot have acted.
    async fn h2_send<R: Outgoing + ?Sized>(
        &self,
        req: &R,
        body: &[u8],
        by: Option<AnswerDeadline>,
    ) -> Result<Option<H2Exchange<'_>>, UpstreamError> {
        // A connection the server is closing refuses new streams; the
        // next try goes to another (or a new) one.
        let mut attempts = 3;
        loop {
            attempts -= 1;
            let Some((conn, slot, at)) = self.h2_stream(by).await? else {
                return Ok(None);
            };
            match self.exchange_h2(&conn, slot, at, req, body, by).await {
                Ok(x) => return Ok(Some(x)),
                Err(Failed { error, .. }) if error.is_timeout() || attempts == 0 => {
                    return Err(error)
                }
                Err(Failed { error, sent: true }) if !req.idempotent() => return Err(error),
                Err(Failed { error, .. }) => {
                    tracing::debug!(error = %error, "HTTP/2 stream not processed; retrying");
                }
            }
        }
    }

    async fn exchange_h2<R: Outgoing + ?Sized>(
        &self,
        conn: &super::h2::Conn,
        slot: super::h2::Slot,
        at: SocketAddr,
        req: &R,
        body: &[u8],
        by: Option<AnswerDeadline>,
    ) -> Result<H2Exchange<'_>, Failed> {
        // The address is only for errors: formatted when one happens.
        let built = self
            .authority
            .as_ref()
            .ok_or("upstream host not valid as an HTTP/2 authority")
            .and_then(|a| req.to_h2(a));
        let req = built.map_err(|reason| Failed {
            error: UpstreamError::Exchange {
                addr: at.to_string(),
                reason: reason.into(),
            },
            sent: false,
        })?;
        let (until, answer_deadline) = h1::wait_until(self.conf.read_timeout, by, None);
        match super::h2::exchange(conn, slot, req, body, until).await {
            Ok(mut answer) => {
                answer.by = by;
                Ok(H2Exchange {
                    upstream: self,
                    answer,
                    addr: at,
                    taken: 0,
                })
            }
            Err(failure) => Err(self.h2_failed(conn, at, failure, by, answer_deadline)),
        }
    }

    /// An HTTP/2 failure as ours; a server closing the connection gets no
    /// more streams on it (a refused stream leaves it in use).
    /// `answer_deadline`: a wait that timed out was `by`'s, not the read
    /// timeout's.
    fn h2_failed(
        &self,
        conn: &super::h2::Conn,
        at: SocketAddr,
        f: super::h2::Failure,
        by: Option<AnswerDeadline>,
        answer_deadline: bool,
    ) -> Failed {
        let sent = match &f {
            super::h2::Failure::TimedOut => true,
            super::h2::Failure::Broken {
                reason,
                sent,
                going_away,
            } => {
                tracing::debug!(error = %reason, sent, "HTTP/2 stream failed");
                if *going_away {
                    conn.mark_going_away();
                }
                *sent
            }
        };
        Failed {
            error: self.h2_error(at, f, by, answer_deadline),
            sent,
        }
    }

    /// An HTTP/2 failure as our error; a timeout names the limit that
    /// passed: the answer deadline's (`by`, when `answer_deadline`) or the
    /// read timeout.
    fn h2_error(
        &self,
        at: SocketAddr,
        f: super::h2::Failure,
        by: Option<AnswerDeadline>,
        answer_deadline: bool,
    ) -> UpstreamError {
        match f {
            super::h2::Failure::TimedOut => UpstreamError::Timeout {
                addr: at.to_string(),
                after: match by {
                    Some(d) if answer_deadline => d.limit,
                    _ => self.conf.read_timeout,
                },
            },
            super::h2::Failure::Broken { reason, .. } => UpstreamError::Exchange {
                addr: at.to_string(),
                reason,
            },
        }
    }
}

impl H2Exchange<'_> {
    pub fn header(&self) -> &ResponseHeader {
        &self.answer.head
    }

    /// Reads the next body chunk; `None` at the end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        let a = &mut self.answer;
        let (until, answer_deadline) = h1::wait_until(self.upstream.conf.read_timeout, a.by, None);
        let piece = a
            .chunk(until)
            .await
            .map_err(|f| self.upstream.h2_error(self.addr, f, a.by, answer_deadline))?;
        self.taken += piece.as_ref().map_or(0, Bytes::len);
        Ok(piece)
    }

    /// The body's length still to come, when the answer declares one.
    pub fn declared_left(&self) -> Option<usize> {
        let total: usize = self
            .answer
            .head
            .headers
            .get(http::header::CONTENT_LENGTH)?
            .to_str()
            .ok()?
            .trim()
            .parse()
            .ok()?;
        Some(total.saturating_sub(self.taken))
    }

    /// Reads the rest of the body into memory, up to `cap` bytes and, with
    /// a `claim`, as far as the shared total (`limits.buffered_total`)
    /// allows. Returns `Ok(Err(partial))` when the body is larger, with what
    /// was read so far.
    pub async fn read_to_end(
        &mut self,
        cap: usize,
        mut claim: Option<&mut crate::bodies::AnswerClaim<'_>>,
    ) -> Result<Result<Bytes, BytesMut>, UpstreamError> {
        let mut room = |n: usize| n <= cap && claim.as_mut().is_none_or(|c| c.room(n));
        // An answer in one piece (WeChat's JSON, an HTTP/2 DATA frame) is
        // kept as it came: no buffer, no copy.
        let first = match self.chunk().await? {
            None => return Ok(Ok(Bytes::new())),
            Some(c) if !room(c.len()) => return Ok(Err(BytesMut::from(c))),
            Some(c) => c,
        };
        let mut buf = match self.chunk().await? {
            None => return Ok(Ok(first)),
            Some(next) => {
                let mut buf = BytesMut::with_capacity(first.len() + next.len());
                buf.extend_from_slice(&first);
                buf.extend_from_slice(&next);
                buf
            }
        };
        while room(buf.len()) {
            match self.chunk().await? {
                Some(chunk) => buf.extend_from_slice(&chunk),
                None => return Ok(Ok(buf.freeze())),
            }
        }
        Ok(Err(buf))
    }
}
