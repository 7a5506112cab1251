//! The one HTTP/1.1 exchange every upstream request takes (JSON calls from
//! either front, token fetches, admin calls, streamed uploads): the request
//! goes out in one write from bytes the caller built (no header map, no
//! URI), the answer head is parsed with `httparse` from one buffer, and the
//! body is read by its framing (length, chunked, or until close).
//!
//! The connection rule lives here once ([`Upstream::attempt`]): a pooled
//! connection first, one retry on a fresh connection when WeChat cannot
//! have acted (nothing written, or an idempotent method), never after a
//! timeout. A few informational answers are skipped; the connection goes
//! back to the pool only when the answer was read whole and both sides
//! allow it.

use std::net::SocketAddr;
use std::ops::Range;
use std::time::Duration;

use bytes::Bytes;
use pingora::protocols::Stream;
use pingora::upstreams::peer::Peer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::bodies::AnswerClaim;

use super::{peer_addr, AnswerDeadline, Upstream, UpstreamError, DEFAULT_MAX_INFORMATIONAL};

/// Answer heads are small; WeChat's are a few hundred bytes.
const DEFAULT_HEAD_BUFFER: usize = 2048;
/// The largest answer head accepted.
const DEFAULT_MAX_HEAD: usize = 64 * 1024;
/// Headers an answer head may carry.
const DEFAULT_MAX_HEADERS: usize = 64;
/// Read size for bodies.
const DEFAULT_READ: usize = 16 * 1024;

/// How an answer's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// This many bytes are still to come.
    Length(usize),
    /// Chunked: in a chunk with this many bytes left (0: at a size line).
    Chunked {
        left: usize,
        data_seen: bool,
    },
    /// Until the server closes.
    Close,
    Done,
}

/// A request sent and its answer head read; the body is still to come.
pub struct RawExchange<'a> {
    upstream: &'a Upstream,
    stream: Stream,
    reuse_hash: u64,
    /// The address it went to, for errors.
    addr: SocketAddr,
    pub status: u16,
    /// The head, then whatever body bytes came with it (from `at`).
    buf: Vec<u8>,
    at: usize,
    /// Where the body read by [`RawExchange::read_whole`] starts in `buf`
    /// (it ends at `at`).
    body_from: usize,
    /// The deadline every read of the body also ends at.
    by: Option<AnswerDeadline>,
    headers: Vec<(Range<usize>, Range<usize>)>,
    framing: Framing,
    keep_alive: bool,
}

/// A failure, and whether the request may have reached WeChat.
struct Failed {
    error: UpstreamError,
    sent: bool,
}

/// What an attempt delivered: the answer's head, or (for a streamed body)
/// the connection the head was written on.
enum Delivered<'a> {
    Answer(RawExchange<'a>),
    Written(Stream, u64, SocketAddr),
}

/// An HTTP/1.1 request whose head is sent and whose body the caller is
/// still streaming (media uploads): [`Upload::write`], then
/// [`Upload::finish`] for the answer.
pub struct Upload<'a> {
    upstream: &'a Upstream,
    stream: Stream,
    reuse_hash: u64,
    addr: SocketAddr,
    /// The body goes as chunks (its length was not declared).
    chunked: bool,
}

/// A read that ended at the answer deadline, not at its own limit.
#[derive(Debug)]
struct DeadlinePassed(Duration);

impl std::fmt::Display for DeadlinePassed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "no whole answer within {:?}", self.0)
    }
}

impl std::error::Error for DeadlinePassed {}

fn io_err(up: &Upstream, addr: &SocketAddr, e: std::io::Error, what: &str) -> UpstreamError {
    if let Some(DeadlinePassed(after)) = e.get_ref().and_then(|e| e.downcast_ref()) {
        UpstreamError::Timeout {
            addr: addr.to_string(),
            after: *after,
        }
    } else if e.kind() == std::io::ErrorKind::TimedOut {
        UpstreamError::Timeout {
            addr: addr.to_string(),
            after: up.conf.read_timeout,
        }
    } else {
        UpstreamError::Exchange {
            addr: addr.to_string(),
            reason: format!("{what}: {e}"),
        }
    }
}

fn bad(addr: &SocketAddr, reason: impl Into<String>) -> UpstreamError {
    UpstreamError::Exchange {
        addr: addr.to_string(),
        reason: reason.into(),
    }
}

/// The instant a wait of `limit` ends, or `by`'s when that comes first,
/// and whether it is `by`'s.
/// `now`: the time when the caller has it (the request's start, a few
/// µs ago), saving a clock read.
pub(super) fn wait_until(
    limit: Duration,
    by: Option<AnswerDeadline>,
    now: Option<tokio::time::Instant>,
) -> (tokio::time::Instant, bool) {
    let now = now.unwrap_or_else(tokio::time::Instant::now);
    let own = now + limit;
    match by {
        Some(d) if d.at < own => (d.at, true),
        _ => (own, false),
    }
}

fn timed_out(by: Option<AnswerDeadline>, answer: bool) -> std::io::Error {
    match by {
        Some(d) if answer => {
            std::io::Error::new(std::io::ErrorKind::TimedOut, DeadlinePassed(d.limit))
        }
        _ => std::io::ErrorKind::TimedOut.into(),
    }
}

/// Reads once into `buf`'s spare room (growing it), within `limit` and
/// before `by`: one timer for both.
async fn read_more(
    stream: &mut Stream,
    buf: &mut Vec<u8>,
    limit: Duration,
    by: Option<AnswerDeadline>,
    now: Option<tokio::time::Instant>,
) -> std::io::Result<usize> {
    if buf.capacity() - buf.len() < 512 {
        buf.reserve(DEFAULT_READ);
    }
    let (until, answer) = wait_until(limit, by, now);
    match tokio::time::timeout_at(until, stream.read_buf(buf)).await {
        Ok(r) => r,
        Err(_) => Err(timed_out(by, answer)),
    }
}

impl Upstream {
    /// Sends `wire` (request line and headers, without `Host` and the
    /// blank line) and `body`; reads the answer head. `Host`, `Accept-Encoding:
    /// identity` (every answer is read here: its errcode, our token in it),
    /// the blank line and the body are put after `wire`'s head, as the
    /// full path's exchange writes them, for the write and
    /// taken off again, so one buffer serves every host tried. With `by`,
    /// every step (connect, write, each read of head and body) also ends
    /// at that deadline.
    pub async fn call(
        &self,
        wire: &mut Vec<u8>,
        body: &[u8],
        idempotent: bool,
        by: Option<AnswerDeadline>,
    ) -> Result<RawExchange<'_>, UpstreamError> {
        let head = wire.len();
        wire.reserve(self.host_header.len() + 40 + body.len());
        self.end_head(wire);
        wire.extend_from_slice(body);
        let result = self.call_inner(wire, idempotent, by).await;
        wire.truncate(head);
        if result.is_err() {
            self.stats.failed.inc();
        } else {
            self.stats.ok.inc();
        }
        result
    }

    async fn call_inner(
        &self,
        wire: &[u8],
        idempotent: bool,
        by: Option<AnswerDeadline>,
    ) -> Result<RawExchange<'_>, UpstreamError> {
        match self.attempt(wire, idempotent, by, true).await? {
            Delivered::Answer(x) => Ok(x),
            Delivered::Written(..) => unreachable!("an answer was asked for"),
        }
    }

    /// Opens an exchange whose body the caller streams (media uploads):
    /// `wire` is the whole head (request line, headers with `Host`, the
    /// blank line), framed by its `Content-Length` or, with `chunked`,
    /// `Transfer-Encoding: chunked`. A pooled connection that fails while
    /// the head is written gets one retry on a new one: nothing reached
    /// WeChat.
    pub(super) async fn open_raw(
        &self,
        wire: &[u8],
        chunked: bool,
    ) -> Result<Upload<'_>, UpstreamError> {
        let result = self.attempt(wire, false, None, false).await;
        match result {
            Ok(Delivered::Written(stream, reuse_hash, addr)) => Ok(Upload {
                upstream: self,
                stream,
                reuse_hash,
                addr,
                chunked,
            }),
            Ok(Delivered::Answer(_)) => unreachable!("only the head was asked for"),
            Err(e) => {
                self.stats.failed.inc();
                Err(e)
            }
        }
    }

    /// The connection rule, once for every HTTP/1.1 request: a pooled
    /// connection first; on its failure one fresh connection, unless
    /// WeChat may have acted (the request was written and is not
    /// `idempotent`) or the failure was a timeout. `read`: wait for the
    /// answer head (else only write `wire`).
    async fn attempt(
        &self,
        wire: &[u8],
        idempotent: bool,
        by: Option<AnswerDeadline>,
        read: bool,
    ) -> Result<Delivered<'_>, UpstreamError> {
        let (r, _) = self.peers().inspect_err(|_| {
            self.stats
                .connect_failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        })?;
        // With a deadline, its start is "now" for the pool and the first
        // read: the clock is read once per request, not at every step.
        let started = by.map(|d| d.started());
        let pooled = {
            let i = self.preferred.load(std::sync::atomic::Ordering::Relaxed) % r.peers.len();
            // A streamed upload stays on HTTP/1.1 wherever requests go over
            // HTTP/2: its connections are pooled apart (the version is in
            // the key).
            let hash = if !read && self.uses_h2() {
                super::h1_peer(&r.peers[i]).reuse_hash()
            } else {
                r.hashes[i]
            };
            self.pool
                .take_at(hash, started.unwrap_or_else(tokio::time::Instant::now))
                .map(|s| (s, hash, peer_addr(&r.peers[i])))
        };
        drop(r);
        if let Some((stream, hash, addr)) = pooled {
            self.stats.reused.inc();
            match self
                .exchange_raw(stream, hash, addr, wire, by, started, read)
                .await
            {
                Ok(x) => return Ok(x),
                Err(Failed { error, .. }) if error.is_timeout() => return Err(error),
                Err(Failed { error, sent: true }) if !idempotent => return Err(error),
                Err(Failed { error, .. }) => {
                    tracing::debug!(error = %error, "pooled connection failed; retrying on a new one")
                }
            }
        }
        self.attempt_fresh(wire, by, read).await
    }

    /// The exchange on a new connection. Boxed: the pool usually has one,
    /// and this path would otherwise make every request's future ~700
    /// bytes larger.
    fn attempt_fresh<'s: 'w, 'w>(
        &'s self,
        wire: &'w [u8],
        by: Option<AnswerDeadline>,
        read: bool,
    ) -> futures_util::future::BoxFuture<'w, Result<Delivered<'s>, UpstreamError>> {
        Box::pin(async move {
            let (stream, p) = match by {
                None => self.connect_as(!read).await?,
                Some(d) => tokio::time::timeout_at(d.at, self.connect_as(!read))
                    .await
                    .map_err(|_| d.missed())??,
            };
            let (hash, addr) = (p.reuse_hash(), peer_addr(&p));
            drop(p);
            self.exchange_raw(stream, hash, addr, wire, by, None, read)
                .await
                .map_err(|f| f.error)
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn exchange_raw(
        &self,
        mut stream: Stream,
        reuse_hash: u64,
        addr: SocketAddr,
        wire: &[u8],
        by: Option<AnswerDeadline>,
        now: Option<tokio::time::Instant>,
        read: bool,
    ) -> Result<Delivered<'_>, Failed> {
        let wait = self.conf.read_timeout;
        let write = async {
            stream.write_all(wire).await?;
            stream.flush().await
        };
        // Usually done at once: the timer is then never armed.
        let (until, answer) = wait_until(wait, by, now);
        match tokio::time::timeout_at(until, write).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                return Err(Failed {
                    error: io_err(self, &addr, e, "while writing the request"),
                    sent: false,
                })
            }
            Err(_) => {
                return Err(Failed {
                    error: io_err(self, &addr, timed_out(by, answer), ""),
                    sent: false,
                })
            }
        }
        if !read {
            return Ok(Delivered::Written(stream, reuse_hash, addr));
        }
        // Only the request knows a HEAD answer has no body.
        let head_request = wire.starts_with(b"HEAD ");
        self.read_answer(stream, reuse_hash, addr, by, now, head_request)
            .await
            .map(Delivered::Answer)
    }

    /// Reads the answer head on `stream` (informational answers skipped).
    async fn read_answer(
        &self,
        mut stream: Stream,
        reuse_hash: u64,
        addr: SocketAddr,
        by: Option<AnswerDeadline>,
        now: Option<tokio::time::Instant>,
        head_request: bool,
    ) -> Result<RawExchange<'_>, Failed> {
        let wait = self.conf.read_timeout;
        let sent = |error| Failed { error, sent: true };
        let mut buf = Vec::with_capacity(DEFAULT_HEAD_BUFFER);
        let mut informational = 0;
        let mut read_from = now;
        loop {
            // Parse what is there; read more until the head is whole.
            let parsed = loop {
                if !buf.is_empty() {
                    let mut hs = [httparse::EMPTY_HEADER; DEFAULT_MAX_HEADERS];
                    let mut resp = httparse::Response::new(&mut hs);
                    match resp.parse(&buf) {
                        Ok(httparse::Status::Complete(len)) => {
                            let base = buf.as_ptr() as usize;
                            let at = |s: &[u8]| {
                                let start = s.as_ptr() as usize - base;
                                start..start + s.len()
                            };
                            let headers: Vec<_> = resp
                                .headers
                                .iter()
                                .map(|h| (at(h.name.as_bytes()), at(h.value)))
                                .collect();
                            let version = resp.version.unwrap_or(1);
                            break (resp.code.unwrap_or(0), version, len, headers);
                        }
                        Ok(httparse::Status::Partial) => {}
                        Err(e) => return Err(sent(bad(&addr, format!("bad answer head: {e}")))),
                    }
                }
                if buf.len() > DEFAULT_MAX_HEAD {
                    return Err(sent(bad(&addr, "answer head too large")));
                }
                // The first read's limit counts from `now` (when given).
                let first = std::mem::take(&mut read_from);
                match read_more(&mut stream, &mut buf, wait, by, first).await {
                    Ok(0) => return Err(sent(bad(&addr, "connection closed before an answer"))),
                    Ok(_) => {}
                    Err(e) => return Err(sent(io_err(self, &addr, e, "while reading the answer"))),
                }
            };
            let (status, version, len, headers) = parsed;
            if (100..200).contains(&status) && status != 101 {
                informational += 1;
                if informational > DEFAULT_MAX_INFORMATIONAL {
                    return Err(sent(bad(
                        &addr,
                        format!("more than {DEFAULT_MAX_INFORMATIONAL} informational answers"),
                    )));
                }
                buf.drain(..len);
                continue;
            }
            let value = |name: &'static str| {
                headers
                    .iter()
                    .filter(|(n, _)| buf[n.clone()].eq_ignore_ascii_case(name.as_bytes()))
                    .map(|(_, v)| &buf[v.clone()])
            };
            if let Some(reason) = super::unfit_answer(status, value("content-encoding")) {
                return Err(sent(bad(&addr, reason)));
            }
            let chunked = value("transfer-encoding").any(|v| {
                v.split(|b| *b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"))
            });
            let mut lengths = value("content-length");
            let length = lengths.next();
            if lengths.next().is_some() && !chunked {
                return Err(sent(bad(&addr, "answer with more than one Content-Length")));
            }
            let framing = if head_request || status == 204 || status == 304 {
                Framing::Done
            } else if chunked {
                Framing::Chunked {
                    left: 0,
                    data_seen: false,
                }
            } else if let Some(l) = length {
                let n = std::str::from_utf8(l)
                    .ok()
                    .and_then(|s| s.trim().parse::<usize>().ok())
                    .ok_or_else(|| sent(bad(&addr, "answer Content-Length is not a number")))?;
                Framing::Length(n)
            } else {
                Framing::Close
            };
            let close = value("connection").any(|v| {
                v.split(|b| *b == b',')
                    .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
            });
            let keep_alive = !close && version == 1 && framing != Framing::Close;
            let mut x = RawExchange {
                upstream: self,
                stream,
                reuse_hash,
                addr,
                status,
                buf,
                at: len,
                body_from: len,
                by,
                headers,
                framing,
                keep_alive,
            };
            if let Framing::Length(0) = x.framing {
                x.framing = Framing::Done;
            }
            return Ok(x);
        }
    }
}

impl<'a> Upload<'a> {
    /// Sends the next piece of the body (as a chunk when the length was not
    /// declared). An empty piece sends nothing: to a chunked body it would
    /// be the last chunk.
    pub async fn write(&mut self, piece: &[u8]) -> Result<(), UpstreamError> {
        if piece.is_empty() {
            return Ok(());
        }
        if self.chunked {
            let size = format!("{:x}\r\n", piece.len());
            self.send(&[size.as_bytes(), piece, b"\r\n"], "while sending the body")
                .await
        } else {
            self.send(&[piece], "while sending the body").await
        }
    }

    /// Writes `parts` and flushes, within the read timeout (a write that
    /// stalls that long fails the upload, named by `what`).
    async fn send(&mut self, parts: &[&[u8]], what: &str) -> Result<(), UpstreamError> {
        let write = async {
            for part in parts {
                self.stream.write_all(part).await?;
            }
            self.stream.flush().await
        };
        let limit = self.upstream.conf.read_timeout;
        let written = match tokio::time::timeout(limit, write).await {
            Ok(r) => r,
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        };
        written.map_err(|e| self.failed(io_err(self.upstream, &self.addr, e, what)))
    }

    /// Ends the body and reads the answer's head; with `by`, every read of
    /// the answer also ends at that deadline.
    pub async fn finish(
        mut self,
        by: Option<AnswerDeadline>,
    ) -> Result<RawExchange<'a>, UpstreamError> {
        if self.chunked {
            self.send(&[b"0\r\n\r\n"], "while ending the body").await?;
        }
        let up = self.upstream;
        match up
            .read_answer(self.stream, self.reuse_hash, self.addr, by, None, false)
            .await
        {
            Ok(x) => {
                up.stats.ok.inc();
                Ok(x)
            }
            Err(f) => {
                tracing::debug!(error = %f.error, "streamed exchange failed");
                up.stats.failed.inc();
                Err(f.error)
            }
        }
    }

    fn failed(&self, e: UpstreamError) -> UpstreamError {
        tracing::debug!(error = %e, "streamed exchange failed");
        self.upstream.stats.failed.inc();
        e
    }
}

impl RawExchange<'_> {
    /// The answer's headers, as received.
    pub fn headers(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.headers
            .iter()
            .map(|(n, v)| (&self.buf[n.clone()], &self.buf[v.clone()]))
    }

    /// Done with the head (it was written on): from now on the buffer
    /// holds only body bytes in flight, so a streamed body stays small.
    pub fn release_head(&mut self) {
        self.headers.clear();
    }

    /// The declared length, when the answer has one.
    pub fn declared_length(&self) -> Option<usize> {
        match self.framing {
            Framing::Length(n) => Some(n),
            Framing::Done => Some(0),
            _ => None,
        }
    }

    fn err(&self, e: std::io::Error) -> UpstreamError {
        io_err(
            self.upstream,
            &self.addr,
            e,
            "while reading the answer body",
        )
    }

    /// Reads more into the buffer (after compacting what was consumed).
    async fn fill(&mut self) -> Result<usize, UpstreamError> {
        if self.headers.is_empty() && self.at > 0 && self.at == self.buf.len() {
            self.buf.clear();
            self.at = 0;
        }
        let wait = self.upstream.conf.read_timeout;
        read_more(&mut self.stream, &mut self.buf, wait, self.by, None)
            .await
            .map_err(|e| self.err(e))
    }

    /// The next piece of the body; `None` at its end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        loop {
            let avail = self.buf.len() - self.at;
            match self.framing {
                Framing::Done => return Ok(None),
                Framing::Length(left) => {
                    if avail > 0 {
                        let n = avail.min(left);
                        let out = Bytes::copy_from_slice(&self.buf[self.at..self.at + n]);
                        self.at += n;
                        self.framing = if n == left {
                            Framing::Done
                        } else {
                            Framing::Length(left - n)
                        };
                        return Ok(Some(out));
                    }
                    if self.fill().await? == 0 {
                        return Err(bad(&self.addr, "answer ended before its Content-Length"));
                    }
                }
                Framing::Close => {
                    if avail > 0 {
                        let out = Bytes::copy_from_slice(&self.buf[self.at..]);
                        self.at = self.buf.len();
                        return Ok(Some(out));
                    }
                    if self.fill().await? == 0 {
                        self.framing = Framing::Done;
                    }
                }
                Framing::Chunked { left, data_seen } if left > 0 => {
                    if avail > 0 {
                        let n = avail.min(left);
                        let out = Bytes::copy_from_slice(&self.buf[self.at..self.at + n]);
                        self.at += n;
                        self.framing = Framing::Chunked {
                            left: left - n,
                            data_seen,
                        };
                        return Ok(Some(out));
                    }
                    if self.fill().await? == 0 {
                        return Err(bad(&self.addr, "chunked answer cut short"));
                    }
                }
                Framing::Chunked { data_seen, .. } => {
                    // At a chunk boundary: the CRLF after the data, then a size line.
                    let rest = &self.buf[self.at..];
                    let rest = if data_seen {
                        if rest.len() < 2 {
                            if self.fill().await? == 0 {
                                return Err(bad(&self.addr, "chunked answer cut short"));
                            }
                            continue;
                        }
                        if &rest[..2] != b"\r\n" {
                            return Err(bad(&self.addr, "bad chunk ending"));
                        }
                        &rest[2..]
                    } else {
                        rest
                    };
                    let skip = if data_seen { 2 } else { 0 };
                    match httparse::parse_chunk_size(rest) {
                        Ok(httparse::Status::Complete((used, 0))) => {
                            // The last chunk: trailers (ignored), then a blank line.
                            let after = &rest[used..];
                            if after.starts_with(b"\r\n") {
                                self.at += skip + used + 2;
                                self.framing = Framing::Done;
                            } else if let Some(end) = memchr::memmem::find(after, b"\r\n\r\n") {
                                self.at += skip + used + end + 4;
                                self.framing = Framing::Done;
                            } else if self.fill().await? == 0 {
                                return Err(bad(&self.addr, "chunked answer cut short"));
                            }
                        }
                        Ok(httparse::Status::Complete((used, size))) => {
                            let size = usize::try_from(size)
                                .map_err(|_| bad(&self.addr, "chunk too large"))?;
                            self.at += skip + used;
                            self.framing = Framing::Chunked {
                                left: size,
                                data_seen: true,
                            };
                        }
                        Ok(httparse::Status::Partial) => {
                            if self.fill().await? == 0 {
                                return Err(bad(&self.addr, "chunked answer cut short"));
                            }
                        }
                        Err(_) => return Err(bad(&self.addr, "bad chunk size")),
                    }
                }
            }
        }
    }

    /// The rest of the body in memory, up to `cap` bytes and, with a
    /// `claim`, as far as the shared total (`limits.buffered_total`) allows;
    /// `Ok(Err(partial))` when it is larger, with what was read so far.
    pub async fn read_to_end(
        &mut self,
        cap: usize,
        mut claim: Option<&mut AnswerClaim<'_>>,
    ) -> Result<Result<Bytes, Vec<u8>>, UpstreamError> {
        let mut room = |n: usize| n <= cap && claim.as_mut().is_none_or(|c| c.room(n));
        // The usual case: a declared length, all of it already read.
        if let Framing::Length(left) = self.framing {
            if self.buf.len() - self.at == left && room(left) {
                let out = Bytes::copy_from_slice(&self.buf[self.at..]);
                self.at = self.buf.len();
                self.framing = Framing::Done;
                return Ok(Ok(out));
            }
        }
        let mut out = Vec::new();
        while let Some(c) = self.chunk().await? {
            out.extend_from_slice(&c);
            if !room(out.len()) {
                return Ok(Err(out));
            }
        }
        Ok(Ok(Bytes::from(out)))
    }

    /// [`Self::read_to_end`] kept in the exchange, for [`Self::body`]: a
    /// body that came with the head (the usual answer) is neither copied
    /// nor given a buffer of its own.
    pub async fn read_whole(
        &mut self,
        cap: usize,
        claim: &mut AnswerClaim<'_>,
    ) -> Result<Result<(), Vec<u8>>, UpstreamError> {
        if let Framing::Length(left) = self.framing {
            if self.buf.len() - self.at == left && left <= cap && claim.room(left) {
                self.body_from = self.at;
                self.at = self.buf.len();
                self.framing = Framing::Done;
                return Ok(Ok(()));
            }
        }
        let body = match self.read_to_end(cap, Some(claim)).await? {
            Ok(body) => body,
            Err(partial) => return Ok(Err(partial)),
        };
        // All of `buf` is consumed now: the body goes after it.
        self.body_from = self.buf.len();
        self.buf.extend_from_slice(&body);
        self.at = self.buf.len();
        Ok(Ok(()))
    }

    /// The body [`Self::read_whole`] read (empty before).
    pub fn body(&self) -> &[u8] {
        &self.buf[self.body_from.min(self.at)..self.at]
    }

    /// Returns the connection to the pool when the answer was read whole,
    /// nothing more came, and both sides allow keep-alive.
    pub fn finish(self) {
        if self.framing == Framing::Done && self.keep_alive && self.at == self.buf.len() {
            // Parked as of the request's start when known (no clock read;
            // it only ages the connection by the exchange's few ms).
            let since = self
                .by
                .map_or_else(tokio::time::Instant::now, |d| d.started());
            self.upstream
                .pool
                .put_at(self.stream, self.reuse_hash, since);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;
    use tokio::time::Instant;

    use super::*;

    const ANSWER: Duration = Duration::from_secs(3);

    /// A host whose reads time out after 15 s, and the answer deadline
    /// (3 s) that ends them sooner.
    fn upstream() -> std::sync::Arc<Upstream> {
        let c = wxsidecar_config::Config::parse(
            "upstream:\n  url: http://127.0.0.1:9\n  read_timeout: 15s\n  answer_timeout: 3s\naccounts:\n  - name: shop\n    appid: wx0123456789abcdef\n    secret: s\n",
        )
        .unwrap();
        Upstream::new(&c.upstream, None)
    }

    fn addr() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9))
    }

    /// The answer deadline on tokio's clock, at each read of our exchange:
    /// no head by it, a body cut at it — each a timeout naming the
    /// deadline's limit (not the read timeout), exactly when it passes;
    /// and a body whose last byte comes a second before it is whole.
    #[tokio::test(start_paused = true)]
    async fn an_answer_is_whole_by_its_deadline_or_cut_there() {
        let up = upstream();
        let cut = |e: &UpstreamError| matches!(e, UpstreamError::Timeout { after, .. } if *after == ANSWER);

        // No head.
        let (ours, _wechat) = tokio::io::duplex(4096);
        let start = Instant::now();
        let by = AnswerDeadline::from(start, ANSWER);
        let failed = up
            .read_answer(Box::new(ours), 0, addr(), Some(by), None, false)
            .await
            .err()
            .expect("no answer");
        assert!(cut(&failed.error), "{}", failed.error);
        assert_eq!(start.elapsed(), ANSWER);

        // A head, half a body, then nothing.
        let (ours, mut wechat) = tokio::io::duplex(4096);
        wechat
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
            .await
            .unwrap();
        let start = Instant::now();
        let by = AnswerDeadline::from(start, ANSWER);
        let mut x = up
            .read_answer(Box::new(ours), 0, addr(), Some(by), None, false)
            .await
            .ok()
            .expect("the head");
        assert_eq!(x.status, 200);
        assert_eq!(x.chunk().await.unwrap().as_deref(), Some(&b"01234"[..]));
        let e = x.chunk().await.expect_err("cut");
        assert!(cut(&e), "{e}");
        assert_eq!(start.elapsed(), ANSWER);

        // The rest a second before the deadline: whole.
        let (ours, mut wechat) = tokio::io::duplex(4096);
        wechat
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
            .await
            .unwrap();
        let start = Instant::now();
        let by = AnswerDeadline::from(start, ANSWER);
        let writer = tokio::spawn(async move {
            tokio::time::sleep(ANSWER - Duration::from_secs(1)).await;
            wechat.write_all(b"56789").await.unwrap();
            wechat
        });
        let mut x = up
            .read_answer(Box::new(ours), 0, addr(), Some(by), None, false)
            .await
            .ok()
            .expect("the head");
        let body = x.read_to_end(1 << 20, None).await.unwrap().unwrap();
        assert_eq!(&body[..], b"0123456789");
        assert_eq!(start.elapsed(), ANSWER - Duration::from_secs(1));
        drop(writer.await);
    }
}
