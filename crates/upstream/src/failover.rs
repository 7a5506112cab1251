//! Domain failover and the circuit breaker for one upstream family
//! (`upstream.url` then `upstream.failover`, e.g. `api.weixin.qq.com` then
//! `api2.weixin.qq.com`).
//!
//! Each host has its own pool and warm connections ([`Upstream`]). A host
//! whose connects fail `failover_after` times in a row is out of use; new
//! requests and token fetches go to the first host still in use, and a
//! request whose connect fails moves on to the next host at once (nothing was
//! sent, so nothing can be duplicated). A background probe per host brings it
//! back when a connect succeeds, so the primary is taken back when healthy.
//! When every host is out, the breaker is open: requests fail fast with
//! [`UpstreamError::Unavailable`] instead of piling up on timeouts.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use pingora::http::RequestHeader;

use crate::{Exchange, Upload, Upstream, UpstreamError};
use wxsidecar_config::{Family, UpstreamConfig};

/// One piece of background upkeep, for the product's task set.
pub type Upkeep = futures_util::future::BoxFuture<'static, ()>;

pub struct Upstreams {
    hosts: Vec<Arc<Upstream>>,
    conf: UpstreamConfig,
    /// Set when a reload replaced this family: its upkeep tasks end.
    retired: tokio::sync::watch::Sender<bool>,
}

/// The upstream families in use: the Official Account hosts, and WeCom's
/// once a WeCom account is configured. A reload swaps either; requests
/// and fetches already running finish on the one they took.
pub struct Families {
    official: arc_swap::ArcSwap<Upstreams>,
    wecom: arc_swap::ArcSwapOption<Upstreams>,
}

impl Families {
    pub fn new(official: Arc<Upstreams>, wecom: Option<Arc<Upstreams>>) -> Self {
        Families {
            official: arc_swap::ArcSwap::new(official),
            wecom: arc_swap::ArcSwapOption::new(wecom),
        }
    }

    /// The hosts of `family` (WeCom's fall back to the official ones when
    /// no WeCom account is configured).
    pub fn get(&self, family: Family) -> Arc<Upstreams> {
        match family {
            Family::WeCom => self
                .wecom
                .load_full()
                .unwrap_or_else(|| self.official.load_full()),
            Family::Official => self.official.load_full(),
        }
    }

    pub fn has_wecom(&self) -> bool {
        self.wecom.load().is_some()
    }

    pub fn all(&self) -> Vec<Arc<Upstreams>> {
        std::iter::once(self.official.load_full())
            .chain(self.wecom.load_full())
            .collect()
    }

    /// Replaces a family; the old one's upkeep stops (its pooled
    /// connections close as their exchanges end).
    pub fn replace(&self, family: Family, new: Arc<Upstreams>) {
        let old = match family {
            Family::Official => Some(self.official.swap(new)),
            Family::WeCom => self.wecom.swap(Some(new)),
        };
        if let Some(old) = old {
            let _ = old.retired.send(true);
        }
    }
}

impl Upstreams {
    pub fn new(conf: &UpstreamConfig, ca_bundle: Option<&Path>) -> Arc<Self> {
        let mut hosts = vec![Upstream::new(conf, ca_bundle)];
        for url in &conf.failover {
            let mut c = conf.clone();
            c.url = url.clone();
            hosts.push(Upstream::new(&c, ca_bundle));
        }
        Arc::new(Upstreams {
            hosts,
            conf: conf.clone(),
            retired: tokio::sync::watch::channel(false).0,
        })
    }

    pub fn read_timeout(&self) -> Duration {
        self.conf.read_timeout
    }

    /// A whole answer, header and body, must arrive within this.
    pub fn answer_timeout(&self) -> Duration {
        self.conf.answer_timeout
    }

    fn in_use(&self, h: &Upstream) -> bool {
        h.stats.connect_failures.load(Ordering::Relaxed) < self.conf.failover_after
    }

    /// The host new requests go to: the first one in use. `None`: the
    /// breaker is open.
    pub fn active(&self) -> Option<&Arc<Upstream>> {
        self.hosts.iter().find(|h| self.in_use(h))
    }

    /// Tries `attempt` on each host in use in turn: a connect failure moves
    /// on to the next (nothing was sent), anything else is the answer.
    async fn on_hosts<'a, T, F, Fut>(&'a self, mut attempt: F) -> Result<T, UpstreamError>
    where
        F: FnMut(&'a Upstream) -> Fut,
        Fut: std::future::Future<Output = Result<T, UpstreamError>>,
    {
        let mut last = UpstreamError::Unavailable;
        for h in self.hosts.iter().filter(|h| self.in_use(h)) {
            match attempt(h).await {
                Ok(x) => return Ok(x),
                Err(e) => last = self.next_host_after(h, e)?,
            }
        }
        Err(Self::none_left(last))
    }

    /// After `h` failed with `e`: `Ok(e)` when the next host may take the
    /// request (a connect failure), `Err(e)` when the request is done.
    fn next_host_after(
        &self,
        h: &Upstream,
        e: UpstreamError,
    ) -> Result<UpstreamError, UpstreamError> {
        if !e.is_connect() {
            return Err(e);
        }
        if !self.in_use(h) {
            tracing::warn!(upstream = %h.url(), error = %e, "upstream out of use after repeated connect failures");
        }
        Ok(e)
    }

    /// The error when no host was left to try.
    fn none_left(last: UpstreamError) -> UpstreamError {
        if matches!(last, UpstreamError::Unavailable) {
            tracing::debug!("every upstream host is out of use; failing fast");
        }
        last
    }

    /// Sends through the active host, with failover ([`Self::on_hosts`]):
    /// over HTTP/2 or our HTTP/1.1 exchange, as the host speaks. `by`: the
    /// answer deadline, kept by each wait of the exchange.
    pub async fn send<R: crate::Outgoing + ?Sized>(
        &self,
        req: &R,
        body: &[u8],
        by: Option<crate::AnswerDeadline>,
    ) -> Result<Exchange<'_>, UpstreamError> {
        self.on_hosts(|h| h.send(req, body, by)).await
    }

    /// One whole small exchange (token fetches, admin calls to WeChat):
    /// the request sent, the answer read whole up to `limit` bytes
    /// (`Err(())` past it).
    pub async fn round_trip(
        &self,
        req: &RequestHeader,
        body: &[u8],
        limit: usize,
    ) -> Result<(u16, Result<bytes::Bytes, ()>), UpstreamError> {
        let mut x = self.send(req, body, None).await?;
        let status = x.status();
        let answer = x.read_to_end(limit, None).await?;
        x.finish();
        Ok((status, answer.map_err(drop)))
    }

    /// [`Self::round_trip`] of a JSON `POST` to `path_and_query` (WeChat's
    /// component, quota and rid APIs).
    pub async fn post_json(
        &self,
        path_and_query: &str,
        body: &[u8],
        limit: usize,
    ) -> Result<(u16, Result<bytes::Bytes, ()>), UpstreamError> {
        let mut req =
            RequestHeader::build("POST", path_and_query.as_bytes(), Some(2)).map_err(|e| {
                UpstreamError::Exchange {
                    addr: "the upstream".into(),
                    reason: format!("cannot build the request: {e}"),
                }
            })?;
        let _ = req.insert_header(http::header::CONTENT_TYPE, "application/json");
        let _ = req.insert_header(http::header::CONTENT_LENGTH, body.len());
        self.round_trip(&req, body, limit).await
    }

    /// Opens a streamed HTTP/1.1 exchange (media), with the same failover.
    pub async fn open(
        &self,
        req: &RequestHeader,
        chunked: bool,
    ) -> Result<Upload<'_>, UpstreamError> {
        self.on_hosts(|h| h.open(req, chunked)).await
    }

    pub async fn resolve(&self) {
        for h in &self.hosts {
            if let Err(e) = h.resolve_if_due().await {
                tracing::error!(upstream = %h.url(), error = %e, "cannot resolve upstream host; will retry");
            }
        }
    }

    /// Warms the pool of the active host (the others are warmed when used).
    pub async fn warm(&self) {
        if let Some(h) = self.active() {
            h.warm().await;
        }
    }

    /// Background upkeep, handed to `spawn` (the product's task set): per-host
    /// DNS and warmth for hosts in use, a probe every `probe_interval` for
    /// hosts out of use.
    pub fn maintain(self: &Arc<Self>, spawn: &dyn Fn(&'static str, Upkeep)) {
        for h in &self.hosts {
            spawn(
                "upstream upkeep",
                Box::pin(self.until_retired(h.clone().maintain())),
            );
            let me = self.clone();
            let h = h.clone();
            spawn("upstream probe", Box::pin(self.until_retired(async move {
                loop {
                    tokio::time::sleep(me.conf.probe_interval).await;
                    if me.in_use(&h) {
                        continue;
                    }
                    match h.probe().await {
                        Ok(()) => {
                            tracing::info!(upstream = %h.url(), "upstream host healthy again; back in use")
                        }
                        Err(e) => {
                            tracing::debug!(upstream = %h.url(), error = %e, "upstream probe failed")
                        }
                    }
                }
            })));
        }
    }

    /// `fut`, ending early once a reload replaced this family.
    fn until_retired(
        &self,
        fut: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut retired = self.retired.subscribe();
        async move {
            tokio::select! {
                _ = fut => {}
                _ = retired.wait_for(|r| *r) => {}
            }
        }
    }

    pub fn status(&self) -> crate::status::FamilyStatus {
        use crate::status::{FamilyStatus, HostStatus};
        let hosts = self
            .hosts
            .iter()
            .map(|h| {
                let s = &h.stats;
                HostStatus {
                    url: h.url().to_string(),
                    in_use: self.in_use(h),
                    warm_connections: self.conf.warm_connections,
                    protocol: if h.uses_h2() { "h2" } else { "http/1.1" }.into(),
                    h2_connections_open: h.h2_open(),
                    idle_connections: h.idle(),
                    connect_failures_in_a_row: s.connect_failures.load(Ordering::Relaxed),
                    connections_opened: s.opened.get(),
                    connections_reused: s.reused.get(),
                    requests: s.ok.get() + s.failed.get(),
                    failures: s.failed.get(),
                    last_connect_error: s.last_connect_error.lock().clone(),
                }
            })
            .collect();
        FamilyStatus {
            active: self.active().map(|h| h.url().to_string()),
            proxy: self.hosts[0].proxy(),
            breaker_open: self.active().is_none(),
            hosts,
        }
    }
}
