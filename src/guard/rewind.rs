//! Bytes the guard read ahead, put back in front of a stream that cannot
//! take them back itself (TLS: pingora's plain socket has `rewind`, its TLS
//! stream does not), so the guard bounds a request head over TLS the same
//! way as on a plain socket before pingora's parser sees it.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::Stream;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A stream whose next reads return `ahead` first.
#[derive(Debug)]
pub struct Rewound {
    inner: Stream,
    ahead: Vec<u8>,
    /// How much of `ahead` has been read.
    at: usize,
}

impl Rewound {
    /// `data` put back in front of `stream`: on it when it is already a
    /// `Rewound` (a kept-alive connection), so wrappers do not pile up.
    pub fn put_back(stream: Stream, data: &[u8]) -> Stream {
        let mut rewound: Box<Rewound> = if stream.as_any().is::<Rewound>() {
            stream.into_any().downcast().expect("checked to be Rewound")
        } else {
            Box::new(Rewound {
                inner: stream,
                ahead: Vec::new(),
                at: 0,
            })
        };
        rewound.rewind(data);
        rewound
    }

    fn rewind(&mut self, data: &[u8]) {
        let mut ahead = data.to_vec();
        ahead.extend_from_slice(&self.ahead[self.at..]);
        self.ahead = ahead;
        self.at = 0;
    }
}

impl AsyncRead for Rewound {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.at < this.ahead.len() {
            let n = buf.remaining().min(this.ahead.len() - this.at);
            buf.put_slice(&this.ahead[this.at..this.at + n]);
            this.at += n;
            if this.at == this.ahead.len() {
                // An idle connection holds no buffer.
                this.ahead = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewound {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for Rewound {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for Rewound {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Rewound {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Rewound {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Rewound {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for Rewound {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for Rewound {
    /// Only what was put back can be peeked (nobody peeks past a head).
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        let ahead = &self.ahead[self.at..];
        if ahead.len() < buf.len() {
            return Ok(false);
        }
        buf.copy_from_slice(&ahead[..buf.len()]);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn what_is_put_back_is_read_first_then_the_stream() {
        let (a, mut b) = tokio::io::duplex(64);
        let inner: Stream = Box::new(a);
        b.write_all(b" world").await.unwrap();
        let mut s = Rewound::put_back(inner, b"hello");
        // Put back again on the same wrapper: in front, not nested.
        s = Rewound::put_back(s, b">");
        assert!(s.as_any().is::<Rewound>());
        let mut got = vec![0u8; 12];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b">hello world");
        s.write_all(b"back").await.unwrap();
        let mut echo = [0u8; 4];
        b.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"back");
    }
}
