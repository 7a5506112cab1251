//! Idle HTTP/1.1 upstream connections, the most recently used first.
//!
//! pingora's pool parks each connection with a watcher task of its own: a
//! spawn, a timer and a cross-task wake-up per request. This one is a
//! locked stack instead, checked when a connection is taken: one
//! non-blocking read tells a live connection from one the server closed
//! (or wrote to) while it sat idle, and age tells a stale one.

use std::time::Duration;

use tokio::time::Instant;

use futures_util::FutureExt;
use parking_lot::Mutex;
use pingora::protocols::Stream;
use tokio::io::AsyncReadExt;

struct Idle {
    stream: Stream,
    /// Which peer (address, TLS name) the connection goes to.
    key: u64,
    since: Instant,
}

pub struct Pool {
    /// Oldest first; the lock is held only to push or pop, never across an
    /// await or a syscall.
    idle: Mutex<Vec<Idle>>,
    max: usize,
    idle_timeout: Duration,
}

impl Pool {
    pub fn new(max: usize, idle_timeout: Duration) -> Self {
        Pool {
            idle: Mutex::new(Vec::with_capacity(max.min(64))),
            max,
            idle_timeout,
        }
    }

    /// Parks a connection whose last exchange ended cleanly. When the pool
    /// is full the oldest connection is closed.
    pub fn put(&self, stream: Stream, key: u64) {
        self.put_at(stream, key, Instant::now())
    }

    /// [`Self::put`] with the time given: idle since `now`.
    pub fn put_at(&self, stream: Stream, key: u64, now: Instant) {
        let evicted = {
            let mut idle = self.idle.lock();
            let evicted = (idle.len() >= self.max).then(|| idle.remove(0));
            idle.push(Idle {
                stream,
                key,
                since: now,
            });
            evicted
        };
        drop(evicted);
    }

    /// The most recently parked live connection to `key`, if any.
    pub fn take(&self, key: u64) -> Option<Stream> {
        self.take_at(key, Instant::now())
    }

    /// [`Self::take`] with the time given.
    pub fn take_at(&self, key: u64, now: Instant) -> Option<Stream> {
        loop {
            let candidate = {
                let mut idle = self.idle.lock();
                let at = idle.iter().rposition(|i| i.key == key)?;
                idle.remove(at)
            };
            if now.saturating_duration_since(candidate.since) < self.idle_timeout {
                let mut stream = candidate.stream;
                if is_quiet(&mut stream) {
                    return Some(stream);
                }
            }
            // Closed or stale: dropped here, outside the lock.
        }
    }

    /// Closes every parked connection that is stale or was closed by the
    /// server; returns how many are left.
    pub fn prune(&self) -> usize {
        let parked = std::mem::take(&mut *self.idle.lock());
        let mut kept: Vec<Idle> = parked
            .into_iter()
            .filter_map(|mut i| {
                (i.since.elapsed() < self.idle_timeout && is_quiet(&mut i.stream)).then_some(i)
            })
            .collect();
        let mut idle = self.idle.lock();
        // Connections parked meanwhile are newer: they go on top.
        kept.append(&mut idle);
        *idle = kept;
        idle.len()
    }

    /// Parked connections, for `/status`.
    pub fn parked(&self) -> usize {
        self.idle.lock().len()
    }
}

/// An idle connection has nothing to read: data or end-of-stream means the
/// server closed it (or broke protocol) and it must not carry a request.
fn is_quiet(stream: &mut Stream) -> bool {
    let mut byte = [0u8; 1];
    // `unconstrained`: tokio's budget must not make a ready read look pending.
    tokio::task::unconstrained(stream.read(&mut byte))
        .now_or_never()
        .is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpStream};

    /// A connected loopback pair: our end as a pingora stream, and the
    /// server's end.
    async fn pair(l: &TcpListener) -> (Stream, TcpStream) {
        let ours = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (theirs, _) = l.accept().await.unwrap();
        (
            Box::new(pingora::protocols::l4::stream::Stream::from(ours)),
            theirs,
        )
    }

    #[tokio::test]
    async fn newest_live_connection_first_per_key() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = Pool::new(8, Duration::from_secs(60));
        let (a, _ta) = pair(&l).await;
        let (b, tb) = pair(&l).await;
        let (c, _tc) = pair(&l).await;
        let (a_id, b_id) = (a.id(), b.id());
        pool.put(a, 1);
        pool.put(b, 1);
        pool.put(c, 2);
        assert_eq!(pool.take(1).map(|s| s.id()), Some(b_id));
        // The server closes a parked connection: it is skipped and dropped.
        let (d, td) = pair(&l).await;
        pool.put(d, 1);
        drop(td);
        drop(tb);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(pool.take(1).map(|s| s.id()), Some(a_id));
        assert!(pool.take(1).is_none());
        assert_eq!(pool.parked(), 1, "key 2 is still parked");
    }

    #[tokio::test]
    async fn stale_and_overflowing_connections_are_closed() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = Pool::new(2, Duration::from_millis(30));
        let mut keep = Vec::new();
        for _ in 0..3 {
            let (s, t) = pair(&l).await;
            keep.push(t);
            pool.put(s, 1);
        }
        assert_eq!(pool.parked(), 2, "the oldest made room");
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(pool.prune(), 0);
        let (s, _t) = pair(&l).await;
        pool.put(s, 1);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(pool.take(1).is_none(), "older than idle_timeout");
    }
}
