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
use crate::OnStoreError;

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
    /// What it fetches, for whom: for the logs.
    fn label(&self) -> Label<'_>;
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

/// Names for the logs: never the value. Borrowed from the source, so an
/// idle refresher holds no copies.
#[derive(Debug, Clone, Copy)]
pub struct Label<'a> {
    /// The account's name.
    pub account: &'a str,
    /// The id WeChat knows it by (appid or corpid).
    pub id: &'a str,
    /// "token", "jsapi ticket"…
    pub what: &'static str,
    /// The token API or ticket kind, as in store keys.
    pub api: &'static str,
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

/// Keeps `cell` fresh from `source` until the future is dropped: one lease
/// on a scheduler of its own (production puts every lease on one, see
/// [`super::schedule`]).
#[cfg(test)]
pub async fn run<S: Source, St: Shared>(
    cell: Arc<LeaseCell>,
    source: S,
    shared: Option<SharedKey<St>>,
    settings: Settings,
) {
    let scheduler = super::schedule::Scheduler::new(1);
    let drive = scheduler.drive().expect("a new scheduler has its drive");
    scheduler.add(Refresher::new(cell, source, shared, Arc::new(settings)));
    drive.await;
}

/// Keeps one [`LeaseCell`] fresh, one step at a time: the scheduler runs a
/// step when the lease is due or reported, and the step says how long to
/// wait before the next. Steps never sleep, so an idle lease is this struct
/// and nothing else.
pub struct Refresher<S, St> {
    cell: Arc<LeaseCell>,
    source: S,
    /// Boxed: most leases of a large install share no store, and an idle
    /// refresher should be small.
    shared: Option<Box<SharedKey<St>>>,
    /// Shared by every refresher with the same settings.
    settings: Arc<Settings>,
    /// The errcode of the last failure logged, so each kind is logged once
    /// until fetches recover.
    last_logged: Option<i32>,
    /// Set while a refresh is being retried (failure, busy lock, budget);
    /// boxed, as few are at any time.
    retry: Option<Box<Retry>>,
}

/// A refresh being retried: what it replaces, and how long it waits next.
struct Retry {
    rejected: Option<Arc<str>>,
    backoff: Backoff,
}

/// How a step ended.
enum Step {
    /// A value is in: look again after this long.
    Done(Duration),
    /// Not yet: try the same refresh again after this long.
    Retry(Duration),
}

impl<S: Source, St: Shared> Refresher<S, St> {
    pub fn new(
        cell: Arc<LeaseCell>,
        source: S,
        shared: Option<SharedKey<St>>,
        settings: Arc<Settings>,
    ) -> Box<Self> {
        Box::new(Refresher {
            cell,
            source,
            shared: shared.map(Box::new),
            settings,
            last_logged: None,
            retry: None,
        })
    }

    /// One refresh attempt; `asked` names the value to replace when a
    /// report or an operator asked for it. Returns when to run again.
    async fn refresh(&mut self, asked: Option<Arc<str>>) -> Duration {
        // The fetch about to run answers any request for one made so far
        // (one made while it runs asks again afterwards).
        self.cell.take_refetch();
        let (rejected, mut backoff) = match self.retry.take() {
            Some(r) => (r.rejected, r.backoff),
            None => (asked, Backoff::default()),
        };
        let shared = self.shared.take();
        let step = match &shared {
            None => self.fetch_alone(rejected.as_deref(), &mut backoff).await,
            Some(s) => {
                self.obtain_shared(s, rejected.as_deref(), &mut backoff)
                    .await
            }
        };
        self.shared = shared;
        match step {
            Step::Done(delay) => {
                let l = self.source.label();
                tracing::debug!(account = %l.account, what = l.what, next_refresh_in = ?delay, "refresh scheduled");
                delay
            }
            Step::Retry(wait) => {
                self.retry = Some(Box::new(Retry { rejected, backoff }));
                wait
            }
        }
    }
}

impl<S: Source, St: Shared> super::schedule::Job for Refresher<S, St> {
    fn cell(&self) -> &Arc<LeaseCell> {
        &self.cell
    }

    fn retrying(&self) -> bool {
        self.retry.is_some()
    }

    fn name(&self) -> String {
        let l = self.source.label();
        format!("{} of account {}", l.what, l.account)
    }

    fn step(self: Box<Self>, asked: Option<Arc<str>>) -> super::schedule::Stepping {
        Box::pin(async move {
            let mut me = self;
            let wait = me.refresh(asked).await;
            (me as Box<dyn super::schedule::Job>, wait)
        })
    }
}

/// Why the cell asks for a refresh now, if it does: WeChat rejected the
/// value it holds, or an operator asked. The value to replace, if any.
pub fn asked(cell: &LeaseCell) -> Option<Option<Arc<str>>> {
    // Refresh for a report only if the value WeChat rejected is still the
    // one we hold (it may have been replaced since).
    if let Some(t) = cell.latest().filter(|t| t.is_reported_invalid()) {
        return Some(Some(t.value.clone()));
    }
    if cell.take_forced() {
        // A forced fetch is a fetch too.
        cell.take_refetch();
        return Some(cell.latest().map(|t| t.value.clone()));
    }
    if cell.take_refetch() {
        return Some(None);
    }
    None
}

impl<S: Source, St> Refresher<S, St> {
    /// When to refresh next after storing a value.
    fn next_delay(&self, outcome: StoreOutcome) -> Duration {
        let Some(lease) = self.cell.latest() else {
            return DEFAULT_SAME_VALUE_RETRY_MIN;
        };
        match outcome {
            StoreOutcome::New => refresh_delay(
                lease.remaining(),
                lease.lifetime(),
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
        let l = self.source.label();
        if outcome == StoreOutcome::New {
            tracing::info!(account = %l.account, appid = %l.id, api = %l.api, expires_in = f.expires_in.as_secs(), "{} fetched", l.what);
        }
        if self.last_logged.take().is_some() {
            tracing::info!(account = %l.account, "{} fetches recovered", l.what);
        }
        outcome
    }

    /// Handles a failed fetch: logs each new kind once, records it, says
    /// how long to wait.
    fn failed(&mut self, e: &S::Error, backoff: &mut Backoff) -> Step {
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
        if self.last_logged != Some(e.errcode() as i32) {
            let l = self.source.label();
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
            self.last_logged = Some(e.errcode() as i32);
        }
        self.cell.record_failure(e.errcode(), e.to_string());
        Step::Retry(wait)
    }

    /// Today's budget is spent: say so, and wait until WeChat's midnight.
    fn budget_spent(&self) -> Step {
        let l = self.source.label();
        let budget = self.settings.daily_budget;
        let wait = until_next_wechat_day(SystemTime::now());
        tracing::error!(account = %l.account, appid = %l.id, what = l.what, budget, resets_in = ?wait, "daily {} budget spent; no more fetches today", l.what);
        self.cell.record_budget_spent(format!(
            "daily {} budget for account {} spent ({budget} fetches, token.daily_budget)",
            l.what, l.account
        ));
        self.cell.count(FetchResult::BudgetSpent);
        Step::Retry(wait)
    }

    /// No shared store: one fetch, counted against the budget.
    async fn fetch_alone(&mut self, rejected: Option<&str>, backoff: &mut Backoff) -> Step {
        if !self.cell.spend_budget(self.settings.daily_budget) {
            return self.budget_spent();
        }
        match self.source.fetch(rejected).await {
            Ok(f) => {
                let outcome = self.stored(&f);
                Step::Done(self.next_delay(outcome))
            }
            Err(e) => self.failed(&e, backoff),
        }
    }
}

impl<S: Source, St: Shared> Refresher<S, St> {
    /// Shared store: takes the stored value when it is good, else takes the
    /// lock and fetches for every replica, else waits for the replica that
    /// holds the lock.
    async fn obtain_shared(
        &mut self,
        s: &SharedKey<St>,
        rejected: Option<&str>,
        backoff: &mut Backoff,
    ) -> Step {
        let ttl = self.settings.store_lock_ttl;
        match s.store.lock(&s.key, rejected, ttl).await {
            Ok(Lock::Current(rec)) => {
                let outcome = self.cell.store(&rec.token, rec.remaining());
                if outcome == StoreOutcome::New {
                    let l = self.source.label();
                    tracing::info!(account = %l.account, fetched_by = %rec.fetched_by, "{} taken from the shared store", l.what);
                }
                Step::Done(rec.until_next_refresh().max(DEFAULT_SAME_VALUE_RETRY_MIN))
            }
            Ok(Lock::Busy) => Step::Retry(DEFAULT_STORE_POLL),
            Ok(Lock::Held(lock)) => {
                let day = wechat_day(SystemTime::now());
                let budget = self.settings.daily_budget;
                match s.store.spend_budget(&s.budget_id, day, budget).await {
                    Ok(true) => {}
                    Ok(false) => {
                        s.store.release(&s.key, &lock).await;
                        return self.budget_spent();
                    }
                    Err(_) => {
                        s.store.release(&s.key, &lock).await;
                        return Step::Retry(backoff.step());
                    }
                }
                match self.source.fetch(rejected).await {
                    Ok(f) => {
                        let outcome = self.stored(&f);
                        let delay = self.next_delay(outcome);
                        let by = s.store.replica().to_string();
                        let record = Record::now(f.value, f.expires_in, delay, by);
                        if let Err(e) = s.store.save(&s.key, &record, &lock).await {
                            let l = self.source.label();
                            tracing::warn!(account = %l.account, error = %e, "could not share the fetched {}", l.what);
                        }
                        Step::Done(delay)
                    }
                    Err(e) => {
                        s.store.release(&s.key, &lock).await;
                        self.failed(&e, backoff)
                    }
                }
            }
            // Logged once per state change by the store itself.
            Err(_) => {
                let has_value = self.cell.valid().is_some();
                match self.settings.on_store_error {
                    // A lone fetch harms nobody: do it when we need a value.
                    OnStoreError::Fetch if !has_value || rejected.is_some() => {
                        self.fetch_alone(rejected, backoff).await
                    }
                    // Keep serving the cached value; ask the store again soon.
                    _ => Step::Retry(backoff.step()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
