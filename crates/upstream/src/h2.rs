//! Our own HTTP/2 client on the `h2` crate: shared connections, a stream
//! per exchange, the answer's head and body.
//!
//! pingora's h2 client cost about a quarter of the HTTP/2 path's user time
//! (its request header cloned into an `http` one, a timer wheel entry per
//! read, a stream handle wrapping h2's): here the caller builds the
//! `http::Request` h2 sends, from bytes it already has, and a read arms a
//! timer only when it has to wait.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::Stream;

/// The flow-control windows we grant the server (pingora's: 8 MiB), so an
/// answer is never held back waiting for a window update.
const DEFAULT_WINDOW: u32 = 1 << 23;
/// The frame size we ask the server for: a large answer in fewer frames.
const DEFAULT_MAX_FRAME: u32 = 64 * 1024;
/// The largest answer head we take (HPACK-decoded, as h2 counts it), as
/// for HTTP/1.1: WeChat's are a few hundred bytes; h2's default is 16 MiB.
const DEFAULT_MAX_HEAD: u32 = 64 * 1024;

/// A request as an HTTP/2 stream sends it, built again for each try (h2
/// takes it by value): from a request header, or from the fast lane's bytes.
pub trait Outgoing: Sync {
    /// The request with `authority` as its `:authority`; `Err` names what
    /// HTTP/2 cannot carry.
    fn to_h2(&self, authority: &http::uri::Authority) -> Result<http::Request<()>, &'static str>;
    /// The request line and headers as HTTP/1.1 sends them, without
    /// `Host`, `Accept-Encoding` and the blank line (each host adds its
    /// own); `Err` names what HTTP/1.1 cannot carry.
    fn h1_head(&self, out: &mut Vec<u8>) -> Result<(), &'static str>;
    /// Whether WeChat cannot act on it twice (it may be sent again after a
    /// connection dropped under it).
    fn idempotent(&self) -> bool;
}

impl Outgoing for RequestHeader {
    fn to_h2(&self, authority: &http::uri::Authority) -> Result<http::Request<()>, &'static str> {
        let uri = uri(authority, self.uri.path_and_query().cloned())?;
        let mut req = http::Request::new(());
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = uri;
        *req.version_mut() = http::Version::HTTP_2;
        let headers = req.headers_mut();
        headers.reserve(self.headers.len());
        // HTTP/2 names the host in :authority; a Host header as well is a
        // duplicate some servers (nginx) refuse.
        for (name, value) in self
            .headers
            .iter()
            .filter(|(n, _)| *n != http::header::HOST)
        {
            headers.append(name.clone(), value.clone());
        }
        headers.insert(
            http::header::ACCEPT_ENCODING,
            http::HeaderValue::from_static(super::IDENTITY),
        );
        Ok(req)
    }

    fn h1_head(&self, out: &mut Vec<u8>) -> Result<(), &'static str> {
        debug_assert!(self.headers.get(http::header::HOST).is_none());
        let wire = pingora::protocols::http::v1::client::http_req_header_to_wire(self)
            .ok_or("request target not valid for HTTP/1.1")?;
        // Without the blank line: the host's own headers go first.
        out.extend_from_slice(&wire[..wire.len() - 2]);
        Ok(())
    }

    fn idempotent(&self) -> bool {
        super::is_idempotent(&self.method)
    }
}

/// `https://{authority}{path_and_query}` (`/` when there is none).
pub fn uri(
    authority: &http::uri::Authority,
    path_and_query: Option<http::uri::PathAndQuery>,
) -> Result<http::Uri, &'static str> {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(http::uri::Scheme::HTTPS);
    parts.authority = Some(authority.clone());
    parts.path_and_query =
        Some(path_and_query.unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")));
    http::Uri::from_parts(parts).map_err(|_| "request target not valid for HTTP/2")
}

/// One multiplexed connection: h2's request handle, and what its task and
/// its streams share. Cloned per stream (a few reference counts).
#[derive(Clone)]
pub(super) struct Conn {
    send: ::h2::client::SendRequest<Bytes>,
    shared: Arc<Shared>,
}

struct Shared {
    /// Streams open on it now.
    open: AtomicUsize,
    /// How many we open at once at most.
    max: usize,
    /// Its task ended: closed by either side, or failed.
    closed: AtomicBool,
    /// The server is closing it (GOAWAY): no new streams go on it.
    going_away: AtomicBool,
}

/// A stream's claim on room in its connection, given back when dropped.
pub(super) struct Slot(Arc<Shared>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The HTTP/2 preface and settings on `stream` (TLS, h2 agreed by ALPN);
/// the connection's frames are then read and written by a task of its own
/// until both sides are done with it.
pub(super) async fn handshake(stream: Stream, max_streams: usize) -> Result<Conn, ::h2::Error> {
    let (send, connection) = ::h2::client::Builder::new()
        .enable_push(false)
        .initial_max_send_streams(max_streams)
        .max_frame_size(DEFAULT_MAX_FRAME)
        .max_header_list_size(DEFAULT_MAX_HEAD)
        .initial_window_size(DEFAULT_WINDOW)
        .initial_connection_window_size(DEFAULT_WINDOW)
        .handshake::<_, Bytes>(stream)
        .await?;
    let shared = Arc::new(Shared {
        open: AtomicUsize::new(0),
        max: max_streams.max(1),
        closed: AtomicBool::new(false),
        going_away: AtomicBool::new(false),
    });
    let task = shared.clone();
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = describe(&e), "HTTP/2 connection ended");
        }
        task.closed.store(true, Ordering::Relaxed);
    });
    Ok(Conn { send, shared })
}

impl Conn {
    /// Whether its task has ended (for `/status`: live connections).
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Relaxed)
    }

    /// Whether new streams may go on it.
    pub fn usable(&self) -> bool {
        !self.is_closed() && !self.shared.going_away.load(Ordering::Relaxed)
    }

    /// The server said it is closing this connection: pick no more streams
    /// from it (those open finish).
    pub fn mark_going_away(&self) {
        self.shared.going_away.store(true, Ordering::Relaxed);
    }

    /// Room for one more stream, if it has some: below our limit and the
    /// server's (which its SETTINGS may lower or raise at any time; until
    /// they come, ours), so no stream waits unopened for another to end.
    pub fn claim(&self) -> Option<Slot> {
        let max = self
            .shared
            .max
            .min(self.send.current_max_send_streams().max(1));
        let open = self.shared.open.fetch_add(1, Ordering::Relaxed);
        if open >= max {
            self.shared.open.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Slot(self.shared.clone()))
    }
}

/// An answer's head, and its body still to read.
pub(super) struct Answer {
    pub head: ResponseHeader,
    body: ::h2::RecvStream,
    /// The stream's room, given back when the answer is dropped (h2 resets
    /// a stream dropped before its end).
    _slot: Slot,
    /// The deadline of the whole answer, when the caller has one: each
    /// read's one timer ends at it or at the read timeout, what comes first.
    pub by: Option<super::AnswerDeadline>,
}

/// Why an exchange failed.
pub(super) enum Failure {
    /// No answer (or no next piece of it) by the instant given.
    TimedOut,
    /// The stream or its connection failed.
    Broken {
        reason: String,
        /// Whether the server may have acted on the request: false only
        /// when it said it did not (REFUSED_STREAM, a stream beyond a
        /// graceful GOAWAY, HTTP_1_1_REQUIRED) or nothing was sent.
        sent: bool,
        /// The server is closing the connection (GOAWAY).
        going_away: bool,
    },
}

/// What went wrong, in our own words: a GOAWAY's debug data is the
/// server's bytes (an echoing one could send our token back in it), so it
/// never reaches an error answer or a log line. Every other kind names a
/// reason code, h2's own words or an I/O error.
pub(super) fn describe(e: &::h2::Error) -> String {
    match e.reason() {
        Some(reason) if e.is_go_away() => {
            let by = if e.is_remote() { "the server" } else { "us" };
            format!("connection closed by {by} (GOAWAY: {reason})")
        }
        _ => e.to_string(),
    }
}

impl Failure {
    /// Nothing of the request reached the server.
    fn unsent(e: ::h2::Error) -> Failure {
        Failure::Broken {
            going_away: e.is_go_away(),
            reason: describe(&e),
            sent: false,
        }
    }

    /// The answer failed: sent unless the server said it did not process it.
    fn answer(e: ::h2::Error) -> Failure {
        use ::h2::Reason;
        let remote = e.is_remote();
        let unprocessed = remote
            && ((e.is_reset() && e.reason() == Some(Reason::REFUSED_STREAM))
                || (e.is_go_away() && e.reason() == Some(Reason::NO_ERROR))
                || e.reason() == Some(Reason::HTTP_1_1_REQUIRED));
        Failure::Broken {
            going_away: e.is_go_away(),
            reason: describe(&e),
            sent: !unprocessed,
        }
    }
}

/// Sends `req` and `body` on a new stream of `conn` (its room claimed as
/// `slot`) and reads the answer's head by `until`.
pub(super) async fn exchange(
    conn: &Conn,
    slot: Slot,
    req: http::Request<()>,
    body: &[u8],
    until: tokio::time::Instant,
) -> Result<Answer, Failure> {
    // A clone has no stream of its own pending, so it can send at once;
    // a connection that failed or is going away says so here.
    let mut send = conn.send.clone();
    let (answer, mut out) = send
        .send_request(req, body.is_empty())
        .map_err(Failure::unsent)?;
    if !body.is_empty() {
        // Queued whole (the fast lane's bodies are bounded): h2 sends it
        // as the server's window allows. A server may answer before it has
        // it all and reset the stream (RFC 9113 §8.1): then this fails and
        // the answer is still the answer.
        if let Err(e) = out.send_data(Bytes::copy_from_slice(body), true) {
            tracing::debug!(error = describe(&e), "HTTP/2 request body not taken");
        }
    }
    let answer = match tokio::time::timeout_at(until, answer).await {
        Err(_) => return Err(Failure::TimedOut),
        Ok(Err(e)) => return Err(Failure::answer(e)),
        Ok(Ok(a)) => a,
    };
    let (parts, body) = answer.into_parts();
    let encodings = parts.headers.get_all(http::header::CONTENT_ENCODING);
    let refusal = super::unfit_answer(
        parts.status.as_u16(),
        encodings.iter().map(|v| v.as_bytes()),
    );
    if let Some(reason) = refusal {
        return Err(Failure::Broken {
            reason,
            sent: true,
            going_away: false,
        });
    }
    Ok(Answer {
        head: ResponseHeader::from(parts),
        body,
        _slot: slot,
        by: None,
    })
}

impl Answer {
    /// The next piece of the body, `None` at its end; waits until `until`
    /// at most.
    pub async fn chunk(&mut self, until: tokio::time::Instant) -> Result<Option<Bytes>, Failure> {
        let next = match tokio::time::timeout_at(until, self.body.data()).await {
            Err(_) => return Err(Failure::TimedOut),
            Ok(next) => next,
        };
        match next {
            None => Ok(None),
            Some(Err(e)) => Err(Failure::answer(e)),
            Some(Ok(data)) => {
                // Read: the server may send as much again.
                let _ = self.body.flow_control().release_capacity(data.len());
                Ok(Some(data))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_header_goes_with_authority_and_without_host() {
        let mut req = RequestHeader::build("POST", b"/cgi-bin/stable_token?x=1", None).unwrap();
        req.insert_header("Host", "api.weixin.qq.com").unwrap();
        req.insert_header("Content-Type", "application/json")
            .unwrap();
        req.insert_header("Content-Length", "2").unwrap();
        let authority = http::uri::Authority::from_static("api.weixin.qq.com");
        let h2 = req.to_h2(&authority).unwrap();
        assert_eq!(h2.method(), http::Method::POST);
        assert_eq!(h2.version(), http::Version::HTTP_2);
        assert_eq!(
            h2.uri().to_string(),
            "https://api.weixin.qq.com/cgi-bin/stable_token?x=1"
        );
        assert!(h2.headers().get(http::header::HOST).is_none());
        assert_eq!(h2.headers()["content-type"], "application/json");
        assert_eq!(h2.headers()["content-length"], "2");
        assert_eq!(h2.headers()["accept-encoding"], "identity");
        assert!(!req.idempotent());
        let get = RequestHeader::build("GET", b"/cgi-bin/get_api_domain_ip", None).unwrap();
        assert!(get.idempotent());
    }

    #[test]
    fn a_target_without_a_path_is_the_root() {
        let authority = http::uri::Authority::from_static("qyapi.weixin.qq.com:8443");
        assert_eq!(
            uri(&authority, None).unwrap().to_string(),
            "https://qyapi.weixin.qq.com:8443/"
        );
    }
}
