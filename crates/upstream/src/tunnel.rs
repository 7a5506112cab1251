//! The `CONNECT` tunnel through `upstream.proxy`.
//!
//! pingora opens every upstream connection through this (a custom L4
//! connect on the peer), then speaks TLS, and HTTP/2 when agreed, inside the
//! tunnel exactly as on a direct connection: certificate and host name are
//! still WeChat's, checked as always. The proxy resolves WeChat's host name;
//! we resolve only the proxy's.

use std::fmt;

use async_trait::async_trait;
use base64::Engine;
use pingora::connectors::L4Connect;
use pingora::protocols::l4::socket::SocketAddr;
use pingora::protocols::l4::stream::Stream;
use pingora::{Error, ErrorType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use wxsidecar_config::forward_proxy::ForwardProxy;

/// The proxy's answer to `CONNECT`, head only: a few hundred bytes from
/// squid or tinyproxy; a proxy sending more is cut off.
const DEFAULT_MAX_CONNECT_ANSWER: usize = 8 * 1024;

/// Opens connections to one upstream host through one forward proxy.
pub struct Tunnel {
    /// The `CONNECT` request, the same for every connection.
    head: Box<[u8]>,
    /// `host:port` asked for.
    pub target: String,
    /// The proxy as shown (credentials masked) and the key it came from.
    proxy: String,
    key: String,
    with_credentials: bool,
}

impl fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The head holds the credentials: never printed.
        write!(f, "Tunnel({} via {})", self.target, self.proxy)
    }
}

/// `api.weixin.qq.com:443 via upstream.proxy http://squid:3128`.
impl fmt::Display for Tunnel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} via {} {}", self.target, self.key, self.proxy)
    }
}

impl Tunnel {
    /// A tunnel to `host:port` (the upstream's authority) through `proxy`.
    pub fn new(proxy: &ForwardProxy, authority: String) -> Self {
        let mut head = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
        if let Some(c) = &proxy.credentials {
            let basic = base64::engine::general_purpose::STANDARD.encode(c.expose());
            head.push_str("Proxy-Authorization: Basic ");
            head.push_str(&basic);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        Tunnel {
            head: head.into_bytes().into_boxed_slice(),
            target: authority,
            proxy: proxy.to_string(),
            key: proxy.key.clone(),
            with_credentials: proxy.credentials.is_some(),
        }
    }

    fn fail(&self, what: String) -> Box<Error> {
        Error::explain(ErrorType::ConnectProxyFailure, what)
    }

    /// What the proxy's answer means, in words that say what to change.
    fn refusal(&self, code: u16, reason: &str, had_credentials: bool) -> String {
        let (key, proxy, target) = (&self.key, &self.proxy, &self.target);
        match code {
            // tinyproxy answers a wrong password with 401.
            401 | 407 if had_credentials => format!(
                "{key} {proxy} refused the user and password in {key} (407 Proxy Authentication Required); correct them"
            ),
            401 | 407 => format!(
                "{key} {proxy} asks for credentials (407 Proxy Authentication Required); write them into {key} as http://user:pass@host:port"
            ),
            403 => format!(
                "{key} {proxy} refused to CONNECT to {target} (403 Forbidden); allow it in the proxy's rules (squid: http_access and SSL_ports, tinyproxy: Allow and ConnectPort)"
            ),
            _ => format!("{key} {proxy} answered CONNECT {target} with {code} {reason}"),
        }
    }
}

#[async_trait]
impl L4Connect for Tunnel {
    async fn connect(&self, addr: &SocketAddr) -> pingora::Result<Stream> {
        let (key, proxy) = (&self.key, &self.proxy);
        let Some(inet) = addr.as_inet() else {
            return Err(self.fail(format!("{key} {proxy} is not a TCP address")));
        };
        // pingora's total connection timeout (`upstream.connect_timeout`)
        // bounds this together with the TLS handshake after it.
        let mut tcp = TcpStream::connect(inet)
            .await
            .map_err(|e| self.fail(format!("cannot reach {key} {proxy} at {inet}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        tcp.write_all(&self.head)
            .await
            .map_err(|e| self.fail(format!("{key} {proxy} closed before CONNECT was sent: {e}")))?;
        let mut buf = vec![0u8; DEFAULT_MAX_CONNECT_ANSWER];
        let mut filled = 0;
        loop {
            let n = tcp.read(&mut buf[filled..]).await.map_err(|e| {
                self.fail(format!("{key} {proxy} failed while answering CONNECT: {e}"))
            })?;
            if n == 0 {
                return Err(self.fail(format!(
                    "{key} {proxy} closed the connection instead of answering CONNECT {}",
                    self.target
                )));
            }
            filled += n;
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut answer = httparse::Response::new(&mut headers);
            match answer.parse(&buf[..filled]) {
                Ok(httparse::Status::Complete(len)) => {
                    let code = answer.code.unwrap_or(0);
                    if !(200..300).contains(&code) {
                        let reason = answer.reason.unwrap_or("").to_string();
                        let refusal = self.refusal(code, &reason, self.with_credentials);
                        return Err(self.fail(refusal));
                    }
                    if len != filled {
                        // The server speaks first in neither TLS nor HTTP.
                        return Err(self.fail(format!(
                            "{key} {proxy} sent data after its CONNECT answer; not a tunnel"
                        )));
                    }
                    return Ok(Stream::from(tcp));
                }
                Ok(httparse::Status::Partial) if filled < buf.len() => {}
                Ok(httparse::Status::Partial) => {
                    return Err(self.fail(format!(
                        "{key} {proxy} answered CONNECT with a head over {DEFAULT_MAX_CONNECT_ANSWER} bytes"
                    )))
                }
                Err(e) => {
                    return Err(self.fail(format!(
                        "{key} {proxy} answered CONNECT with something that is not HTTP ({e})"
                    )))
                }
            }
        }
    }
}
