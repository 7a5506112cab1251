//! The per-account refresher: the only writer of an account's token.
//!
//! It fetches at start, then again when the token is due (`refresh_before`
//! ahead of expiry, at most half the lifetime), or at once when the request
//! path reports the *current* token invalid (compare-and-refresh, see
//! [`super::TokenCell::report_invalid`]). Failures retry with capped
//! exponential backoff and jitter while the old token lasts; hard failures
//! wait `token.failed_retry`; every fetch is counted against the daily budget.
//! Because one task per account does all fetching, there is never more than
//! one fetch in flight per account. Logs name the account, never the token or
//! secret.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use rand::Rng;

use super::source::{self, FetchError};
use super::{until_next_wechat_day, StoreOutcome};
use crate::account::Account;
use crate::config::{TokenApi, TokenConfig};
use crate::failover::Upstreams;

/// First retry after a failed fetch; doubles up to the cap.
const DEFAULT_BACKOFF_FIRST: Duration = Duration::from_millis(500);
/// Retries never wait longer than this while the failure may be transient.
const DEFAULT_BACKOFF_CAP: Duration = Duration::from_secs(30);
/// When a stable fetch returns the token we already hold, ask again no
/// sooner than this.
const DEFAULT_SAME_TOKEN_RETRY_MIN: Duration = Duration::from_millis(200);
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

struct Refresher {
    account: Arc<Account>,
    upstream: Arc<Upstreams>,
    conf: TokenConfig,
    /// When `force_refresh: true` was last sent (stable tokens).
    last_force: Option<Instant>,
}

/// Runs forever (until its runtime stops).
pub async fn run(account: Arc<Account>, upstream: Arc<Upstreams>, conf: TokenConfig) {
    let mut r = Refresher {
        account,
        upstream,
        conf,
        last_force: None,
    };
    r.run().await
}

impl Refresher {
    async fn run(&mut self) {
        let mut bad: Option<Arc<str>> = None;
        loop {
            let outcome = self.fetch_until_ok(bad.take()).await;
            let cell = &self.account.tokens;
            while let Some(token) = cell.latest() {
                let delay = match outcome {
                    StoreOutcome::New => {
                        refresh_delay(token.remaining(), token.lifetime, self.conf.refresh_before)
                    }
                    // WeChat has not rotated the stable token yet: ask again
                    // halfway to its expiry, and keep using it meanwhile.
                    StoreOutcome::Same => (token.remaining() / 2).max(DEFAULT_SAME_TOKEN_RETRY_MIN),
                };
                tracing::debug!(account = %self.account.name, next_refresh_in = ?delay, "token refresh scheduled");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => break,
                    _ = cell.force.notified() => {}
                }
                // Woken by a report: refresh only if the token WeChat rejected
                // is still the one we hold (it may have been replaced since).
                let current = cell.latest();
                if let Some(t) = current.filter(|t| t.is_reported_invalid()) {
                    tracing::info!(account = %self.account.name, "WeChat rejected the current token; refreshing");
                    bad = Some(t.value.clone());
                    break;
                }
            }
        }
    }

    /// Fetches until WeChat gives a token; backs off between failures.
    async fn fetch_until_ok(&mut self, bad: Option<Arc<str>>) -> StoreOutcome {
        let account = self.account.clone();
        let cell = &account.tokens;
        let mut backoff = Backoff::new();
        let mut last_logged: Option<i64> = None;
        let mut force = false;
        loop {
            if !cell.spend_budget(self.conf.daily_budget) {
                let wait = until_next_wechat_day(SystemTime::now());
                let msg = format!(
                    "daily token budget for account {} spent ({} fetches, token.daily_budget)",
                    account.name, self.conf.daily_budget
                );
                tracing::error!(account = %account.name, appid = %account.appid, budget = self.conf.daily_budget, resets_in = ?wait, "daily token budget spent; no more fetches today");
                cell.record_budget_spent(msg);
                tokio::time::sleep(wait).await;
                continue;
            }
            match source::fetch(&self.upstream, &account, force).await {
                Ok(f) => {
                    if force {
                        self.last_force = Some(Instant::now());
                    }
                    // A stable fetch may hand back the very token WeChat just
                    // rejected: then force a new one, as WeChat allows it.
                    let rejected_again = bad.as_deref() == Some(f.value.as_str());
                    let may_force = account.token_api == TokenApi::Stable
                        && !force
                        && self
                            .last_force
                            .is_none_or(|t| t.elapsed() >= FORCE_REFRESH_SPACING);
                    if rejected_again && may_force {
                        tracing::info!(account = %account.name, "stable token unchanged after a rejection; forcing a new one");
                        force = true;
                        continue;
                    }
                    let outcome = cell.store(&f.value, f.expires_in);
                    if outcome == StoreOutcome::New {
                        tracing::info!(
                            account = %account.name,
                            appid = %account.appid,
                            api = account.token_api.as_str(),
                            expires_in = f.expires_in.as_secs(),
                            "token fetched"
                        );
                    }
                    if last_logged.is_some() {
                        tracing::info!(account = %account.name, "token fetches recovered");
                    }
                    return outcome;
                }
                Err(e) => {
                    let wait = if e.is_hard() {
                        self.conf.failed_retry
                    } else {
                        backoff.step()
                    };
                    // Log each new kind of failure once, not every retry.
                    if last_logged != Some(e.errcode()) {
                        log_failure(&account, &e, wait);
                        last_logged = Some(e.errcode());
                    }
                    cell.record_failure(e.errcode(), e.to_string());
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

fn log_failure(account: &Account, e: &FetchError, retry_in: Duration) {
    let still_valid = account.tokens.valid().map(|t| t.remaining().as_secs());
    tracing::error!(
        account = %account.name,
        appid = %account.appid,
        errcode = e.errcode(),
        error = %e,
        hard = e.is_hard(),
        retry_in = ?retry_in,
        current_token_valid_for_s = ?still_valid,
        "token fetch failed"
    );
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
