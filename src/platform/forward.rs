//! `platforms[].forward_events`: every event the callback accepted is
//! handed on to the app's own handler, after the sidecar acted on it (the
//! ticket kept, the authorisation exchanged), so the app sees what it saw
//! before the sidecar stood in front of it — and the events the sidecar does
//! not act on (registrations, audits, …).
//!
//! Handing on never holds WeChat's answer back: the callback queues the event
//! and answers `success`; one task per platform sends the queue in order, a
//! few tries each, and counts what it could not deliver. The connection is an
//! [`Upstream`] of its own: the same client (pool, TLS checked against the
//! same CA bundle, counters) as the WeChat hosts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use pingora::http::RequestHeader;
use tokio::sync::mpsc;

use crate::config::platform::{ForwardEvents, ForwardFormat};
use crate::config::UpstreamConfig;
use crate::msgcrypt::{xml_field, MsgCrypt};
use crate::upstream::Upstream;

/// Events waiting to be handed on; beyond this they are dropped and
/// counted (WeChat pushes one ticket every 10 minutes: a full queue means the
/// app's handler has been down a long time).
pub const DEFAULT_FORWARD_QUEUE: usize = 256;
/// Tries per event before it is counted as failed.
pub const DEFAULT_FORWARD_ATTEMPTS: u32 = 3;
/// The wait after the first failed try; doubled after each.
pub const DEFAULT_FORWARD_BACKOFF: Duration = Duration::from_secs(1);
/// How much of the handler's answer is read (it is only logged by status).
const DEFAULT_FORWARD_ANSWER_LIMIT: usize = 16 * 1024;

/// A header on every event handed on: a handler that passes callbacks to
/// the sidecar as received carries it back, and the sidecar does not hand
/// that event on again (no loop).
pub const FORWARDED_HEADER: &str = "x-wxsidecar-forwarded";

/// Counters of the events handed on (`/status` `platforms[].forward`).
#[derive(Default)]
pub struct ForwardStats {
    pub sent: AtomicU64,
    pub failed: AtomicU64,
    pub dropped: AtomicU64,
    /// The last failure: the handler's status or the connection's error
    /// (never the event, which carries authorisation codes).
    pub last_error: Mutex<Option<String>>,
}

/// One platform's event hand-off.
pub struct Forwarder {
    target: ForwardEvents,
    upstream: Arc<Upstream>,
    queue: mpsc::Sender<String>,
    waiting: Mutex<Option<mpsc::Receiver<String>>>,
    pub stats: ForwardStats,
}

impl Forwarder {
    /// `base` lends the timeouts (`upstream.*`) and `ca_bundle` the trusted
    /// roots; the connection is direct (not through `upstream.proxy`, which
    /// is the way to WeChat) and HTTP/1.1.
    pub fn new(
        target: &ForwardEvents,
        base: &UpstreamConfig,
        ca_bundle: Option<&std::path::Path>,
    ) -> Self {
        let mut conf = base.clone();
        conf.url = target.origin.clone();
        conf.failover.clear();
        conf.proxy = None;
        conf.http2 = false;
        conf.warm_connections = 0;
        // The app's handler is named by the config, often `localhost`.
        conf.hosts_file = true;
        let (queue, waiting) = mpsc::channel(DEFAULT_FORWARD_QUEUE);
        Forwarder {
            target: target.clone(),
            upstream: Upstream::new(&conf, ca_bundle),
            queue,
            waiting: Mutex::new(Some(waiting)),
            stats: ForwardStats::default(),
        }
    }

    /// What `/status` shows.
    pub fn status(&self) -> crate::status::ForwardStatus {
        let s = &self.stats;
        crate::status::ForwardStatus {
            url: self.target.url.clone(),
            format: match self.target.format {
                ForwardFormat::Wechat => "wechat",
                ForwardFormat::Plain => "plain",
            }
            .into(),
            sent: s.sent.load(Ordering::Relaxed),
            failed: s.failed.load(Ordering::Relaxed),
            dropped: s.dropped.load(Ordering::Relaxed),
            last_error: s.last_error.lock().clone(),
        }
    }

    /// Queues a decrypted event; never waits (a full queue drops it).
    pub fn hand_on(&self, event: &str) {
        if self.queue.try_send(event.to_string()).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(url = %self.target.url, "platform event queue full: event dropped (is the app's handler up?)");
        }
    }

    /// Sends the queue, in order, until the process stops; the platform's
    /// crypto seals events in WeChat's format.
    pub async fn run(self: Arc<Self>, platform: Arc<super::Platform>) {
        let Some(mut waiting) = self.waiting.lock().take() else {
            return;
        };
        let (name, crypt) = (&platform.name, &platform.crypt);
        while let Some(event) = waiting.recv().await {
            let mut wait = DEFAULT_FORWARD_BACKOFF;
            for attempt in 1..=DEFAULT_FORWARD_ATTEMPTS {
                match self.send(name, crypt, &event).await {
                    Ok(()) => {
                        self.stats.sent.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(platform = %name, url = %self.target.url, attempt, error = %e, "platform event not handed on");
                        *self.stats.last_error.lock() = Some(e);
                        if attempt == DEFAULT_FORWARD_ATTEMPTS {
                            self.stats.failed.fetch_add(1, Ordering::Relaxed);
                        } else {
                            tokio::time::sleep(wait).await;
                            wait *= 2;
                        }
                    }
                }
            }
        }
    }

    /// One try: the event POSTed in the configured format; a 2xx answer is
    /// delivery.
    async fn send(&self, platform: &str, crypt: &MsgCrypt, event: &str) -> Result<(), String> {
        let info = xml_field(event, "InfoType").unwrap_or_default();
        let (target, body) = match self.target.format {
            ForwardFormat::Wechat => {
                let timestamp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
                    .to_string();
                let nonce = rand::random::<u32>().to_string();
                let (query, body) = crypt.seal(event, &timestamp, &nonce);
                let sep = if self.target.path.contains('?') {
                    '&'
                } else {
                    '?'
                };
                (format!("{}{sep}{query}", self.target.path), body)
            }
            ForwardFormat::Plain => (self.target.path.clone(), event.to_string()),
        };
        let build = || -> Result<RequestHeader, pingora::BError> {
            let mut req = RequestHeader::build("POST", target.as_bytes(), Some(5))?;
            req.insert_header(http::header::CONTENT_TYPE, "text/xml; charset=utf-8")?;
            req.insert_header(http::header::CONTENT_LENGTH, body.len())?;
            req.insert_header(FORWARDED_HEADER, "1")?;
            if self.target.format == ForwardFormat::Plain {
                req.insert_header("x-wx-platform", platform)?;
                req.insert_header("x-wx-info-type", info)?;
            }
            Ok(req)
        };
        let req = build().map_err(|e| format!("cannot build the request: {e}"))?;
        self.upstream
            .resolve_if_due()
            .await
            .map_err(|e| e.to_string())?;
        let mut x = self
            .upstream
            .send(&req, body.as_bytes(), None)
            .await
            .map_err(|e| e.to_string())?;
        let status = x.status();
        let _ = x.read_to_end(DEFAULT_FORWARD_ANSWER_LIMIT, None).await;
        x.finish();
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(format!("the handler answered {status}"))
        }
    }
}
