//! The per-account refresher: the only writer of an account's token, and
//! (one more refresher per ticket in use) of its tickets.
//!
//! It fetches at start, then again when the token is due (`refresh_before`
//! ahead of expiry, at most half the lifetime), or at once when the request
//! path reports the *current* token invalid (compare-and-refresh, see
//! [`crate::lease::LeaseCell::report_invalid`]). Failures retry with capped
//! exponential backoff and jitter while the old token lasts; hard failures
//! wait `token.failed_retry`; every fetch is counted against the daily budget.
//! Because one task per account does all fetching, there is never more than
//! one fetch in flight per account. Logs name the account, never the token or
//! secret.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rand::Rng;

pub mod ticket;
pub mod token;

use self::token::FetchError;
use crate::account::Account;
use crate::config::{AccountKind, OnStoreError, TokenApi, TokenConfig};
use crate::failover::Upstreams;
use crate::lease::store::{Lock, Record, RedisStore};
use crate::lease::LeaseCell;
use crate::lease::{until_next_wechat_day, StoreOutcome};
use crate::metrics::{TICKET_FETCHES, TOKEN_FETCHES};
use crate::ticket::TicketKind;

/// First retry after a failed fetch; doubles up to the cap.
const DEFAULT_BACKOFF_FIRST: Duration = Duration::from_millis(500);
/// Retries never wait longer than this while the failure may be transient.
const DEFAULT_BACKOFF_CAP: Duration = Duration::from_secs(30);
/// When a stable fetch returns the token we already hold, ask again no
/// sooner than this.
const DEFAULT_SAME_TOKEN_RETRY_MIN: Duration = Duration::from_millis(200);
/// While another replica holds the refresh lock, look again this often.
const DEFAULT_STORE_POLL: Duration = Duration::from_millis(100);
/// WeChat allows `force_refresh: true` at most every 30 s (and 20 a day).
const FORCE_REFRESH_SPACING: Duration = Duration::from_secs(30);

/// When a fresh token should be fetched, from now.
pub fn refresh_delay(
    remaining: Duration,
    lifetime: Duration,
    refresh_before: Duration,
) -> Duration {
    let window = refresh_before.min(lifetime / 2);
    remaining.saturating_sub(window)
}

/// Capped exponential backoff with ±50% jitter.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Backoff {
            next: DEFAULT_BACKOFF_FIRST,
        }
    }

    fn step(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(DEFAULT_BACKOFF_CAP);
        base.mul_f64(rand::thread_rng().gen_range(0.5..1.5))
    }
}

/// What a refresher keeps fresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    Token,
    Ticket(TicketKind),
}

struct Refresher {
    account: Arc<Account>,
    subject: Subject,
    upstream: Arc<Upstreams>,
    conf: TokenConfig,
    /// The shared store, when `token.store` is Redis.
    store: Option<Arc<RedisStore>>,
    /// When `force_refresh: true` was last sent (stable tokens).
    last_force: Option<Instant>,
}

/// The store key suffix of an account's token: its token API and id.
fn token_store_id(account: &Account) -> (&'static str, String) {
    match account.kind {
        AccountKind::WeCom => (
            "wecom",
            format!(
                "{}:{}",
                account.id,
                account.agentid.as_deref().unwrap_or(&account.name)
            ),
        ),
        AccountKind::Official => (account.token_api.as_str(), account.id.clone()),
    }
}

impl Subject {
    /// The cell holding it (a ticket's exists once it is in use).
    pub fn cell(self, account: &Account) -> Option<&LeaseCell> {
        match self {
            Subject::Token => Some(&account.tokens),
            Subject::Ticket(k) => account.tickets.get(k).map(|c| &**c),
        }
    }

    /// Its store key suffix, `(api, id)`. WeCom's jsapi ticket belongs to
    /// the corp, so every app of the corp shares it.
    pub fn store_id(self, account: &Account) -> (String, String) {
        match (self, account.kind) {
            (Subject::Token, _) => {
                let (api, id) = token_store_id(account);
                (api.to_string(), id)
            }
            (Subject::Ticket(TicketKind::AgentConfig), AccountKind::WeCom) => {
                ("ticket_agent_config".to_string(), token_store_id(account).1)
            }
            (Subject::Ticket(k), _) => (format!("ticket_{}", k.as_str()), account.id.clone()),
        }
    }

    /// The account's token and its tickets in use, with their cells.
    pub fn in_use(account: &Account) -> impl Iterator<Item = (Subject, &LeaseCell)> {
        std::iter::once((Subject::Token, &account.tokens)).chain(
            account
                .tickets
                .in_use()
                .map(|(k, c)| (Subject::Ticket(k), &**c)),
        )
    }
}

/// Runs forever (until its runtime stops).
pub async fn run(
    account: Arc<Account>,
    subject: Subject,
    upstream: Arc<Upstreams>,
    conf: TokenConfig,
    store: Option<Arc<RedisStore>>,
) {
    let mut r = Refresher {
        account,
        subject,
        upstream,
        conf,
        store,
        last_force: None,
    };
    r.run().await
}

impl Refresher {
    /// The cell this refresher writes.
    fn cell(&self) -> &LeaseCell {
        self.subject
            .cell(&self.account)
            .expect("a ticket's cell exists before its refresher")
    }

    /// "token", "jsapi ticket": for logs.
    fn what(&self) -> &'static str {
        match self.subject {
            Subject::Token => "token",
            Subject::Ticket(k) => k.what(),
        }
    }

    /// The store key suffix: `(api, id)`.
    fn store_id(&self) -> (String, String) {
        self.subject.store_id(&self.account)
    }

    /// Counts a fetch outcome in the metrics.
    fn count(&self, result: &str) {
        let name = self.account.name.as_str();
        match self.subject {
            Subject::Token => TOKEN_FETCHES.with_label_values(&[name, result]).inc(),
            Subject::Ticket(k) => TICKET_FETCHES
                .with_label_values(&[name, k.as_str(), result])
                .inc(),
        }
    }

    async fn run(&mut self) {
        let mut bad: Option<Arc<str>> = None;
        loop {
            let delay = match self.store.clone() {
                None => self.fetch_alone(bad.take()).await,
                Some(store) => self.obtain_shared(&store, bad.take()).await,
            };
            tracing::debug!(account = %self.account.name, what = self.what(), next_refresh_in = ?delay, "refresh scheduled");
            let cell = self.cell();
            let due = tokio::time::Instant::now() + delay;
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => break,
                    _ = cell.force.notified() => {}
                }
                // Woken by a report: refresh only if the token WeChat rejected
                // is still the one we hold (it may have been replaced since).
                if let Some(t) = cell.latest().filter(|t| t.is_reported_invalid()) {
                    tracing::info!(account = %self.account.name, "WeChat rejected the current token; refreshing");
                    bad = Some(t.value.clone());
                    break;
                }
                if cell.take_forced() {
                    tracing::info!(account = %self.account.name, what = self.what(), "refresh requested by an operator");
                    bad = cell.latest().map(|t| t.value.clone());
                    break;
                }
            }
        }
    }

    /// When to refresh next after storing a token.
    fn next_delay(&self, outcome: StoreOutcome) -> Duration {
        let Some(token) = self.cell().latest() else {
            return DEFAULT_SAME_TOKEN_RETRY_MIN;
        };
        match outcome {
            StoreOutcome::New => {
                refresh_delay(token.remaining(), token.lifetime, self.conf.refresh_before)
            }
            // WeChat has not rotated the stable token (or the ticket) yet:
            // ask again halfway to its expiry, and keep using it meanwhile.
            StoreOutcome::Same => (token.remaining() / 2).max(DEFAULT_SAME_TOKEN_RETRY_MIN),
        }
    }

    /// One fetch from WeChat. A stable fetch that hands back the very token
    /// WeChat just rejected is repeated with `force_refresh: true`, as
    /// often as WeChat allows it.
    async fn fetch_once(&mut self, bad: Option<&str>) -> Result<self::token::Fetched, FetchError> {
        let account = self.account.clone();
        let upstream = self.upstream.clone();
        if let Subject::Ticket(kind) = self.subject {
            let wait = upstream.read_timeout();
            return self::ticket::fetch(&upstream, &account, kind, wait).await;
        }
        let f = self::token::fetch(&upstream, &account, false).await?;
        let may_force = account.token_api == TokenApi::Stable
            && account.kind == AccountKind::Official
            && self
                .last_force
                .is_none_or(|t| t.elapsed() >= FORCE_REFRESH_SPACING);
        if bad == Some(f.value.as_str()) && may_force {
            tracing::info!(account = %account.name, "stable token unchanged after a rejection; forcing a new one");
            self.last_force = Some(Instant::now());
            return self::token::fetch(&upstream, &account, true).await;
        }
        Ok(f)
    }

    fn stored(&self, f: &self::token::Fetched, last_logged: &mut Option<i64>) -> StoreOutcome {
        let account = &self.account;
        self.count("ok");
        let outcome = self.cell().store(&f.value, f.expires_in);
        if outcome == StoreOutcome::New {
            tracing::info!(
                account = %account.name,
                appid = %account.id,
                api = %self.store_id().0,
                expires_in = f.expires_in.as_secs(),
                "{} fetched",
                self.what()
            );
        }
        if last_logged.take().is_some() {
            tracing::info!(account = %account.name, "{} fetches recovered", self.what());
        }
        outcome
    }

    /// Handles a failed fetch: logs each new kind once, records it, waits.
    async fn failed(&self, e: &FetchError, backoff: &mut Backoff, last_logged: &mut Option<i64>) {
        let wait = if e.is_hard() {
            self.conf.failed_retry
        } else {
            backoff.step()
        };
        let result = match e {
            FetchError::WeChat { .. } => "wechat_error",
            _ => "transport_error",
        };
        self.count(result);
        if *last_logged != Some(e.errcode()) {
            log_failure(&self.account, self.what(), self.cell(), e, wait);
            *last_logged = Some(e.errcode());
        }
        self.cell().record_failure(e.errcode(), e.to_string());
        tokio::time::sleep(wait).await;
    }

    async fn budget_spent(&self) {
        let account = &self.account;
        let wait = until_next_wechat_day(SystemTime::now());
        let msg = format!(
            "daily {} budget for account {} spent ({} fetches, token.daily_budget)",
            self.what(),
            account.name,
            self.conf.daily_budget
        );
        tracing::error!(account = %account.name, appid = %account.id, what = self.what(), budget = self.conf.daily_budget, resets_in = ?wait, "daily {} budget spent; no more fetches today", self.what());
        self.cell().record_budget_spent(msg);
        self.count("budget_spent");
        tokio::time::sleep(wait).await;
    }

    /// Memory store: fetches until WeChat gives a token, backing off between
    /// failures; returns when to refresh next.
    async fn fetch_alone(&mut self, bad: Option<Arc<str>>) -> Duration {
        let mut backoff = Backoff::new();
        let mut last_logged: Option<i64> = None;
        loop {
            if !self.cell().spend_budget(self.conf.daily_budget) {
                self.budget_spent().await;
                continue;
            }
            match self.fetch_once(bad.as_deref()).await {
                Ok(f) => {
                    let outcome = self.stored(&f, &mut last_logged);
                    return self.next_delay(outcome);
                }
                Err(e) => self.failed(&e, &mut backoff, &mut last_logged).await,
            }
        }
    }

    /// Redis store: uses the shared token when it is good, else takes the
    /// lock and fetches for every replica, else waits for the replica that
    /// holds the lock. Returns when to look again.
    async fn obtain_shared(&mut self, store: &RedisStore, bad: Option<Arc<str>>) -> Duration {
        let (api, id) = self.store_id();
        let key = store.token_key(&api, &id);
        let mut backoff = Backoff::new();
        let mut last_logged: Option<i64> = None;
        loop {
            match store
                .lock(&key, bad.as_deref(), self.conf.store_lock_ttl)
                .await
            {
                Ok(Lock::Current(rec)) => {
                    let outcome = self.cell().store(&rec.token, rec.remaining());
                    if outcome == StoreOutcome::New {
                        tracing::info!(account = %self.account.name, fetched_by = %rec.fetched_by, "{} taken from the shared store", self.what());
                    }
                    return rec.until_next_refresh().max(DEFAULT_SAME_TOKEN_RETRY_MIN);
                }
                Ok(Lock::Busy) => tokio::time::sleep(DEFAULT_STORE_POLL).await,
                Ok(Lock::Held(lock)) => {
                    let day = crate::lease::wechat_day(SystemTime::now());
                    match store
                        .spend_budget(&format!("{api}:{id}"), day, self.conf.daily_budget)
                        .await
                    {
                        Ok(true) => {}
                        Ok(false) => {
                            store.release(&key, &lock).await;
                            self.budget_spent().await;
                            continue;
                        }
                        Err(_) => {
                            store.release(&key, &lock).await;
                            tokio::time::sleep(backoff.step()).await;
                            continue;
                        }
                    }
                    match self.fetch_once(bad.as_deref()).await {
                        Ok(f) => {
                            let outcome = self.stored(&f, &mut last_logged);
                            let delay = self.next_delay(outcome);
                            let record =
                                Record::now(f.value, f.expires_in, delay, store.replica.clone());
                            if let Err(e) = store.save(&key, &record, &lock).await {
                                tracing::warn!(account = %self.account.name, error = %e, "could not share the fetched {}", self.what());
                            }
                            return delay;
                        }
                        Err(e) => {
                            store.release(&key, &lock).await;
                            self.failed(&e, &mut backoff, &mut last_logged).await;
                        }
                    }
                }
                Err(_) => {
                    // Logged once per state change by the store itself.
                    let policy = self.conf.on_store_error.unwrap_or(
                        if self.account.kind == AccountKind::Official
                            && self.account.token_api == TokenApi::Classic
                        {
                            OnStoreError::Wait
                        } else {
                            OnStoreError::Fetch
                        },
                    );
                    let has_token = self.cell().valid().is_some();
                    match policy {
                        // A lone fetch harms nobody: do it when we need a token.
                        OnStoreError::Fetch if !has_token || bad.is_some() => {
                            return self.fetch_alone(bad).await;
                        }
                        // Keep serving the cached token; ask the store again soon.
                        _ => tokio::time::sleep(backoff.step()).await,
                    }
                }
            }
        }
    }
}

fn log_failure(
    account: &Account,
    what: &str,
    cell: &LeaseCell,
    e: &FetchError,
    retry_in: Duration,
) {
    let still_valid = cell.valid().map(|t| t.remaining().as_secs());
    tracing::error!(
        account = %account.name,
        appid = %account.id,
        what,
        errcode = e.errcode(),
        error = %e,
        hard = e.is_hard(),
        retry_in = ?retry_in,
        current_valid_for_s = ?still_valid,
        "{what} fetch failed"
    );
}

/// The cell for `account`'s ticket of `kind`, starting its refresher the
/// first time it is asked for. Call from within the app's runtime.
pub fn ticket_cell<'a>(
    app: &crate::app::App,
    account: &'a Arc<Account>,
    kind: TicketKind,
) -> &'a Arc<LeaseCell> {
    let (c, made) = account.tickets.get_or_make(kind);
    if made {
        crate::metrics::init_ticket(&account.name, kind.as_str());
        tracing::info!(account = %account.name, ticket = kind.as_str(), "first use of a ticket; fetching it");
        tokio::spawn(run(
            account.clone(),
            Subject::Ticket(kind),
            app.upstream_for(account.kind.family()).clone(),
            app.config.token.clone(),
            app.store.clone(),
        ));
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_window_is_capped_at_half_the_lifetime() {
        let s = Duration::from_secs;
        // 7200 s token, refresh 300 s before expiry.
        assert_eq!(refresh_delay(s(7200), s(7200), s(300)), s(6900));
        // 8 s token: the window is 4 s, not 300 s.
        assert_eq!(refresh_delay(s(8), s(8), s(300)), s(4));
        // Already inside the window: now.
        assert_eq!(refresh_delay(s(100), s(7200), s(300)), s(0));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let mut b = Backoff::new();
        let mut last = Duration::ZERO;
        for _ in 0..20 {
            last = b.step();
            assert!(last <= DEFAULT_BACKOFF_CAP.mul_f64(1.5));
        }
        assert!(last >= DEFAULT_BACKOFF_CAP / 2);
    }
}
