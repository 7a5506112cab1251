//! A listener's TLS handshake done by its guard (transparent mode's HTTPS
//! listener): under the connection cap and within `limits.header_timeout`.
//! Left to pingora's listener, a handshake runs before any cap counts the
//! connection and may take 60 s (a fixed bound), so silent sockets could
//! pile up uncounted.

use std::net::SocketAddr;
use std::time::Duration;

use pingora::listeners::tls::Acceptor;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::tls::TlsStream;
use pingora::protocols::Stream;

/// TLS for the connections accepted on one address.
pub struct TlsFront {
    /// The `https_listen` address (its connections arrive as plain TCP).
    addr: SocketAddr,
    acceptor: Acceptor,
}

impl TlsFront {
    pub fn new(addr: SocketAddr, acceptor: Acceptor) -> Self {
        TlsFront { addr, acceptor }
    }

    /// Whether `stream` came in on our address (a listener on `0.0.0.0`
    /// or `[::]` takes every local address of its port).
    pub fn serves(&self, stream: &Stream) -> bool {
        let local = stream
            .get_socket_digest()
            .and_then(|d| d.local_addr().and_then(|a| a.as_inet()).copied());
        local.is_some_and(|l| {
            l.port() == self.addr.port()
                && (self.addr.ip().is_unspecified() || l.ip() == self.addr.ip())
        })
    }

    /// The TLS stream, or `None` (closed) when the handshake failed or did
    /// not end within `limit`.
    pub async fn handshake(&self, stream: Stream, limit: Duration) -> Option<Stream> {
        let l4 = stream.into_any().downcast::<L4Stream>().ok()?;
        match handshake(&self.acceptor, *l4, limit).await {
            Ok(tls) => Some(Box::new(tls)),
            Err(e) => {
                tracing::debug!(error = %e, "TLS on the HTTPS listener");
                None
            }
        }
    }
}

/// Ends TLS on `l4` within `limit` (`limits.header_timeout`); the error
/// says which way it failed.
pub async fn handshake(
    acceptor: &Acceptor,
    l4: L4Stream,
    limit: Duration,
) -> Result<TlsStream<L4Stream>, String> {
    match tokio::time::timeout(limit, acceptor.tls_handshake(l4)).await {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(e)) => Err(format!("handshake failed: {e}")),
        Err(_) => Err(format!(
            "handshake not done within {limit:?} (limits.header_timeout); closed"
        )),
    }
}
