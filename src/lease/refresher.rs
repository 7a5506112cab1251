//! The refresher: the only writer of one [`LeaseCell`], so at most one fetch
//! per cell is ever in flight.
//!
//! It fetches at start, then again when the lease is due (`refresh_before`
//! ahead of expiry, at most half the lifetime), or at once when the request
//! path reports the *current* value invalid (compare-and-refresh, see
//! [`LeaseCell::report_invalid`]) or an operator asks. Failures retry with
//! capped exponential backoff and jitter while the old value lasts; hard
//! failures wait `failed_retry`; every fetch is counted against the daily
//! budget. With a shared store, one replica fetches for all (lock, fetch,
//! save) and the others take its record.
//!
//! Nothing here knows accounts, tokens or tickets: what is fetched comes
//! through [`Source`], the shared store through [`Shared`], names for the
//! logs through [`Label`]. Time is tokio's, so the unit tests below run
//! hours of schedule in milliseconds under a paused clock.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::Rng;
use tokio::time::Instant;

use super::store::{Lock, Record, StoreError};
use super::{until_next_wechat_day, wechat_day, FetchResult, LeaseCell, StoreOutcome};
use crate::config::OnStoreError;

/// First retry after a failed fetch; doubles up to the cap.
pub const DEFAULT_BACKOFF_FIRST: Duration = Duration::from_millis(500);
/// Retries never wait longer than this while the failure may be transient.
pub const DEFAULT_BACKOFF_CAP: Duration = Duration::from_secs(30);
/// When a fetch returns the value we already hold (a stable token or a
/// ticket not rotated yet), ask again no sooner than this.
const DEFAULT_SAME_VALUE_RETRY_MIN: Duration = Duration::from_millis(200);
/// While another replica holds the refresh lock, look again this often.
const DEFAULT_STORE_POLL: Duration = Duration::from_millis(100);

/// What WeChat handed out.
#[derive(Debug)]
pub struct Fetched {
    pub value: String,
    pub expires_in: Duration,
}

impl Fetched {
    /// WeChat's clock started no earlier than our request: count the
    /// lifetime from when it was sent, so ours never outlasts WeChat's.
    pub fn counted_from(mut self, sent: Instant) -> Self {
        self.expires_in = self.expires_in.saturating_sub(sent.elapsed());
        self
    }
}

/// Why a fetch failed, as far as the refresher cares.
pub trait Failure: fmt::Display + Send {
    /// WeChat's errcode, or -1 when WeChat gave none.
    fn errcode(&self) -> i64;
    /// Retrying soon will not help (wrong secret, IP not whitelisted…):
    /// wait `failed_retry` instead of backing off.
    fn is_hard(&self) -> bool;
    /// WeChat answered with an error (rather than the transport failing).
    fn answered(&self) -> bool;
}

/// Where a lease comes from: one fetch per call.
pub trait Source: Send + 'static {
    type Error: Failure;
    /// Fetches a fresh value. `rejected` is the value WeChat just called
    /// invalid, if that is why we fetch.
    fn fetch(
        &mut self,
        rejected: Option<&str>,
    ) -> impl Future<Output = Result<Fetched, Self::Error>> + Send;
}

/// A store shared by replicas (Redis in production).
pub trait Shared: Send + Sync + 'static {
    /// Asks for the right to fetch, unless the stored record is already
    /// what we need (see `store::LOCK_SCRIPT`).
    fn lock(
        &self,
        key: &str,
        rejected: Option<&str>,
        ttl: Duration,
    ) -> impl Future<Output = Result<Lock, StoreError>> + Send;
    /// Counts one fetch against `id`'s budget for `day`, for all replicas;
    /// `false` when it is spent.
    fn spend_budget(
        &self,
        id: &str,
        day: i64,
        budget: u32,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Writes a fetched value and releases our lock.
    fn save(
        &self,
        key: &str,
        record: &Record,
        lock: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Releases our lock after a failed fetch.
    fn release(&self, key: &str, lock: &str) -> impl Future<Output = ()> + Send;
    /// Who we are, written into records.
    fn replica(&self) -> &str;
}

/// The schedule and limits of one refresher.
#[derive(Debug, Clone)]
pub struct Settings {
    pub refresh_before: Duration,
    pub daily_budget: u32,
    pub failed_retry: Duration,
    pub store_lock_ttl: Duration,
    /// What to do while the shared store is unreachable.
    pub on_store_error: OnStoreError,
}

/// Names for the logs: never the value.
#[derive(Debug, Clone)]
pub struct Label {
    /// The account's name.
    pub account: String,
    /// The id WeChat knows it by (appid or corpid).
    pub id: String,
    /// "token", "jsapi ticket"…
    pub what: &'static str,
    /// The token API or ticket kind, as in store keys.
    pub api: String,
}

/// Where the lease lives in the shared store.
pub struct SharedKey<St> {
    pub store: Arc<St>,
    /// The record's key.
    pub key: String,
    /// The budget counter's id.
    pub budget_id: String,
}

/// When a fresh value should be fetched, from now.
pub fn refresh_delay(
    remaining: Duration,
    lifetime: Duration,
    refresh_before: Duration,
) -> Duration {
    let window = refresh_before.min(lifetime / 2);
    remaining.saturating_sub(window)
}

/// Capped exponential backoff with ±50% jitter.
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: DEFAULT_BACKOFF_FIRST,
        }
    }
}

impl Backoff {
    /// The next wait: the current step, jittered; then the step doubles.
    pub fn step(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(DEFAULT_BACKOFF_CAP);
        base.mul_f64(rand::thread_rng().gen_range(0.5..1.5))
    }
}

/// Keeps `cell` fresh from `source` until the task is dropped.
pub async fn run<S: Source, St: Shared>(
    cell: Arc<LeaseCell>,
    source: S,
    shared: Option<SharedKey<St>>,
    settings: Settings,
    label: Label,
) {
    let mut r = Refresher {
        cell,
        source,
        settings,
        label,
        last_logged: None,
    };
    let mut rejected: Option<Arc<str>> = None;
    loop {
        let delay = match &shared {
            None => r.fetch_alone(rejected.take()).await,
            Some(s) => r.obtain_shared(s, rejected.take()).await,
        };
        tracing::debug!(account = %r.label.account, what = r.label.what, next_refresh_in = ?delay, "refresh scheduled");
        rejected = r.wait_due(delay).await;
    }
}

struct Refresher<S> {
    cell: Arc<LeaseCell>,
    source: S,
    settings: Settings,
    label: Label,
    /// The errcode of the last failure logged, so each kind is logged once
    /// until fetches recover.
    last_logged: Option<i64>,
}

impl<S: Source> Refresher<S> {
    /// Sleeps until `delay` has passed, or until a report or an operator
    /// asks for a refresh; returns the value to replace, if one was named.
    async fn wait_due(&self, delay: Duration) -> Option<Arc<str>> {
        let due = Instant::now() + delay;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(due) => return None,
                _ = self.cell.force.notified() => {}
            }
            // Woken by a report: refresh only if the value WeChat rejected
            // is still the one we hold (it may have been replaced since).
            if let Some(t) = self.cell.latest().filter(|t| t.is_reported_invalid()) {
                tracing::info!(account = %self.label.account, what = self.label.what, "WeChat rejected the current value; refreshing");
                return Some(t.value.clone());
            }
            if self.cell.take_forced() {
                tracing::info!(account = %self.label.account, what = self.label.what, "refresh requested by an operator");
                return self.cell.latest().map(|t| t.value.clone());
            }
        }
    }

    /// When to refresh next after storing a value.
    fn next_delay(&self, outcome: StoreOutcome) -> Duration {
        let Some(lease) = self.cell.latest() else {
            return DEFAULT_SAME_VALUE_RETRY_MIN;
        };
        match outcome {
            StoreOutcome::New => refresh_delay(
                lease.remaining(),
                lease.lifetime,
                self.settings.refresh_before,
            ),
            // WeChat has not rotated the value yet: ask again halfway to its
            // expiry, and keep using it meanwhile.
            StoreOutcome::Same => (lease.remaining() / 2).max(DEFAULT_SAME_VALUE_RETRY_MIN),
        }
    }

    fn stored(&mut self, f: &Fetched) -> StoreOutcome {
        self.cell.count(FetchResult::Ok);
        let outcome = self.cell.store(&f.value, f.expires_in);
        let l = &self.label;
        if outcome == StoreOutcome::New {
            tracing::info!(account = %l.account, appid = %l.id, api = %l.api, expires_in = f.expires_in.as_secs(), "{} fetched", l.what);
        }
        if self.last_logged.take().is_some() {
            tracing::info!(account = %l.account, "{} fetches recovered", l.what);
        }
        outcome
    }

    /// Handles a failed fetch: logs each new kind once, records it, waits.
    async fn failed(&mut self, e: &S::Error, backoff: &mut Backoff) {
        let wait = if e.is_hard() {
            self.settings.failed_retry
        } else {
            backoff.step()
        };
        self.cell.count(if e.answered() {
            FetchResult::WeChatError
        } else {
            FetchResult::TransportError
        });
        if self.last_logged != Some(e.errcode()) {
            let l = &self.label;
            let still_valid = self.cell.valid().map(|t| t.remaining().as_secs());
            tracing::error!(
                account = %l.account,
                appid = %l.id,
                what = l.what,
                errcode = e.errcode(),
                error = %e,
                hard = e.is_hard(),
                retry_in = ?wait,
                current_valid_for_s = ?still_valid,
                "{} fetch failed", l.what
            );
            self.last_logged = Some(e.errcode());
        }
        self.cell.record_failure(e.errcode(), e.to_string());
        tokio::time::sleep(wait).await;
    }

    /// Today's budget is spent: say so, and sleep until WeChat's midnight.
    async fn budget_spent(&self) {
        let l = &self.label;
        let budget = self.settings.daily_budget;
        let wait = until_next_wechat_day(SystemTime::now());
        tracing::error!(account = %l.account, appid = %l.id, what = l.what, budget, resets_in = ?wait, "daily {} budget spent; no more fetches today", l.what);
        self.cell.record_budget_spent(format!(
            "daily {} budget for account {} spent ({budget} fetches, token.daily_budget)",
            l.what, l.account
        ));
        self.cell.count(FetchResult::BudgetSpent);
        tokio::time::sleep(wait).await;
    }

    /// No shared store: fetches until WeChat gives a value, backing off
    /// between failures; returns when to refresh next.
    async fn fetch_alone(&mut self, rejected: Option<Arc<str>>) -> Duration {
        let mut backoff = Backoff::default();
        loop {
            if !self.cell.spend_budget(self.settings.daily_budget) {
                self.budget_spent().await;
                continue;
            }
            match self.source.fetch(rejected.as_deref()).await {
                Ok(f) => {
                    let outcome = self.stored(&f);
                    return self.next_delay(outcome);
                }
                Err(e) => self.failed(&e, &mut backoff).await,
            }
        }
    }

    /// Shared store: takes the stored value when it is good, else takes the
    /// lock and fetches for every replica, else waits for the replica that
    /// holds the lock. Returns when to look again.
    async fn obtain_shared<St: Shared>(
        &mut self,
        s: &SharedKey<St>,
        rejected: Option<Arc<str>>,
    ) -> Duration {
        let mut backoff = Backoff::default();
        loop {
            let ttl = self.settings.store_lock_ttl;
            match s.store.lock(&s.key, rejected.as_deref(), ttl).await {
                Ok(Lock::Current(rec)) => {
                    let outcome = self.cell.store(&rec.token, rec.remaining());
                    if outcome == StoreOutcome::New {
                        tracing::info!(account = %self.label.account, fetched_by = %rec.fetched_by, "{} taken from the shared store", self.label.what);
                    }
                    return rec.until_next_refresh().max(DEFAULT_SAME_VALUE_RETRY_MIN);
                }
                Ok(Lock::Busy) => tokio::time::sleep(DEFAULT_STORE_POLL).await,
                Ok(Lock::Held(lock)) => {
                    let day = wechat_day(SystemTime::now());
                    let budget = self.settings.daily_budget;
                    match s.store.spend_budget(&s.budget_id, day, budget).await {
                        Ok(true) => {}
                        Ok(false) => {
                            s.store.release(&s.key, &lock).await;
                            self.budget_spent().await;
                            continue;
                        }
                        Err(_) => {
                            s.store.release(&s.key, &lock).await;
                            tokio::time::sleep(backoff.step()).await;
                            continue;
                        }
                    }
                    match self.source.fetch(rejected.as_deref()).await {
                        Ok(f) => {
                            let outcome = self.stored(&f);
                            let delay = self.next_delay(outcome);
                            let by = s.store.replica().to_string();
                            let record = Record::now(f.value, f.expires_in, delay, by);
                            if let Err(e) = s.store.save(&s.key, &record, &lock).await {
                                tracing::warn!(account = %self.label.account, error = %e, "could not share the fetched {}", self.label.what);
                            }
                            return delay;
                        }
                        Err(e) => {
                            s.store.release(&s.key, &lock).await;
                            self.failed(&e, &mut backoff).await;
                        }
                    }
                }
                // Logged once per state change by the store itself.
                Err(_) => {
                    let has_value = self.cell.valid().is_some();
                    match self.settings.on_store_error {
                        // A lone fetch harms nobody: do it when we need a value.
                        OnStoreError::Fetch if !has_value || rejected.is_some() => {
                            return self.fetch_alone(rejected).await;
                        }
                        // Keep serving the cached value; ask the store again soon.
                        _ => tokio::time::sleep(backoff.step()).await,
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
