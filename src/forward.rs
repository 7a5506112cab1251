//! The forward proxy (`intercept.proxy_listen`) for apps that honour
//! `HTTPS_PROXY` / `HTTP_PROXY`. `CONNECT` to an intercepted host on 443 is
//! answered `200`, TLS is ended here with the local leaf, and the requests
//! inside go through the app listener's own request path. A plain-HTTP
//! proxy request (`GET http://api.weixin.qq.com/…`) to an intercepted host is
//! served the same way (each later request on the connection is checked by
//! the request path). Anything else gets 403: never an open proxy.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::listeners::tls::Acceptor;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::{GetSocketDigest, Stream};
use pingora::proxy::HttpProxy;
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::app::App;
use crate::guard::Guarded;
use crate::intercept::tls::LeafResolver;
use crate::proxy::Proxy;

/// A proxy request head is a few hundred bytes.
const DEFAULT_HEAD_LIMIT: usize = 8 * 1024;

pub struct ForwardProxy {
    pub app: Arc<App>,
    /// The app listener's request path, under the same connection deadlines
    /// (head, idle, send); the forward proxy's own cap counts the connection.
    pub http: Arc<Guarded<HttpProxy<Proxy>>>,
    pub resolver: Arc<LeafResolver>,
    pub tls: Acceptor,
    /// The proxy request head, and the TLS handshake inside a `CONNECT`,
    /// must each arrive within this (`limits.header_timeout`), as a request
    /// head must.
    pub head_timeout: Duration,
}

/// The first line of a request: method and target.
fn request_line(head: &[u8]) -> Option<(&str, &str)> {
    let line = head.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?.trim_end();
    let mut parts = line.split(' ');
    let (method, target) = (parts.next()?, parts.next()?);
    parts
        .next()?
        .starts_with("HTTP/")
        .then_some((method, target))
}

/// `host:port` of a CONNECT target.
fn connect_target(target: &str) -> Option<(String, u16)> {
    let (host, port) = target.rsplit_once(':')?;
    Some((host.to_ascii_lowercase(), port.parse().ok()?))
}

/// The host of an absolute-form `http://host[:port]/…` target.
fn absolute_host(target: &str) -> Option<String> {
    let uri: http::Uri = target.parse().ok()?;
    (uri.scheme_str() == Some("http")).then_some(())?;
    uri.host().map(|h| h.to_ascii_lowercase())
}

async fn refuse(mut io: Box<L4Stream>, why: &str) {
    tracing::info!(reason = why, "forward proxy request refused");
    let body = format!("wxsidecar: {why}\n");
    let answer = format!(
        "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = io.write_all(answer.as_bytes()).await;
    let _ = io.flush().await;
}

impl ForwardProxy {
    /// Serves HTTP on `stream` through the app's request path until the
    /// connection ends.
    async fn serve_http(self: &Arc<Self>, stream: Stream, shutdown: &ShutdownWatch) {
        let mut next = Some(stream);
        while let Some(s) = next {
            next = self.http.process_new(s, shutdown).await;
        }
    }

    async fn handle(self: &Arc<Self>, mut io: Box<L4Stream>, shutdown: &ShutdownWatch) {
        let peer = io
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        if let Some(ip) = peer {
            if !self.app.clients().allows_address(ip) {
                return refuse(io, &format!("{ip} is not in clients.allow")).await;
            }
        }
        let mut head = Vec::with_capacity(512);
        let read = tokio::time::timeout(self.head_timeout, async {
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < DEFAULT_HEAD_LIMIT {
                let n = io.read(&mut buf).await?;
                if n == 0 {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                head.extend_from_slice(&buf[..n]);
            }
            Ok::<(), std::io::Error>(())
        })
        .await;
        if !matches!(read, Ok(Ok(()))) {
            return;
        }
        let Some(end) = head
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|p| p + 4)
        else {
            return refuse(io, "request head too large").await;
        };
        let Some((method, target)) = request_line(&head) else {
            return refuse(io, "not an HTTP request").await;
        };
        if method.eq_ignore_ascii_case("CONNECT") {
            let Some((host, port)) = connect_target(target) else {
                return refuse(io, "CONNECT needs host:port").await;
            };
            if port != 443 || !self.resolver.covers(&host) {
                let why = format!("CONNECT {host}:{port} refused: only the intercepted WeChat hosts on port 443 (intercept.hosts)");
                return refuse(io, &why).await;
            }
            // Bytes sent after the head (an eager ClientHello) belong to TLS.
            io.rewind(&head[end..]);
            let established = async {
                io.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                    .await?;
                io.flush().await
            };
            if established.await.is_err() {
                return;
            }
            let tls = match crate::guard::tls::handshake(&self.tls, *io, self.head_timeout).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::info!(host, error = %e, "TLS inside CONNECT");
                    return;
                }
            };
            self.serve_http(Box::new(tls), shutdown).await;
        } else {
            match absolute_host(target) {
                Some(host) if self.resolver.covers(&host) => {
                    io.rewind(&head);
                    self.serve_http(io, shutdown).await;
                }
                _ => {
                    let why = format!(
                        "{method} {} refused: only requests to the intercepted WeChat hosts (intercept.hosts)",
                        target.chars().take(80).collect::<String>().split('?').next().unwrap_or("")
                    );
                    refuse(io, &why).await
                }
            }
        }
    }
}

#[async_trait]
impl ServerApp for ForwardProxy {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let io = stream.into_any().downcast::<L4Stream>().ok();
        match io {
            Some(io) => self.handle(io, shutdown).await,
            None => tracing::error!("forward proxy: unexpected stream type"),
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads() {
        assert_eq!(
            request_line(b"CONNECT api.weixin.qq.com:443 HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(("CONNECT", "api.weixin.qq.com:443"))
        );
        assert_eq!(request_line(b"garbage\r\n\r\n"), None);
        assert_eq!(
            connect_target("API.weixin.qq.com:443"),
            Some(("api.weixin.qq.com".into(), 443))
        );
        assert_eq!(connect_target("api.weixin.qq.com"), None);
        assert_eq!(
            absolute_host("http://api.weixin.qq.com/cgi-bin/token?x=1").as_deref(),
            Some("api.weixin.qq.com")
        );
        assert_eq!(absolute_host("/cgi-bin/token"), None);
    }
}
