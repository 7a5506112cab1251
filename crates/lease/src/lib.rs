//! Leases: anything WeChat hands out with an expiry — an account's access
//! token, a ticket — held in a [`LeaseCell`]: the current [`Lease`], the ones
//! issued before it (tokens only: apps present them back), its fetch
//! counters and the day's budget, and the shared store (`store`). Nothing
//! here knows accounts or tickets; the product's `refresh` module fills the
//! cells through [`refresher::Source`].
//!
//! The request path only *reads* a cell: one atomic load of an `Arc`, no lock,
//! no await. Only the cell's refresher writes, so at most one fetch per cell
//! is ever in flight. Nothing here logs a value.
//!
//! Its own crate (`wxsidecar-lease`): it builds and tests without pingora,
//! and may not know accounts, the configuration file, HTTP or the request
//! path.
#![forbid(unsafe_code)]

pub mod refresher;
pub mod schedule;
pub mod store;

/// What a replica does about refreshing when the shared store is unreachable
/// (`token.on_store_error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnStoreError {
    /// Never fetch alone (classic tokens: a lone fetch invalidates the others').
    Wait,
    /// Fetch alone (stable and WeCom tokens: a lone fetch harms nobody).
    Fetch,
}

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

// tokio's clock: it is std's in production, and tests can pause and
// advance it, so expiry is testable in milliseconds of wall time.
use tokio::time::Instant;

use arc_swap::ArcSwapOption;
use parking_lot::Mutex;

use wxsidecar_metrics::FetchCounters;

/// Tokens handed out earlier are still recognised (and replaced) for this
/// many refreshes: at one refresh per ~2 h, about two days of history.
const DEFAULT_ISSUED_HISTORY: usize = 24;

/// The longest lifetime believed: WeChat's tokens and tickets live 7200 s.
/// A longer claim (a hostile or broken answer, a corrupt store record) is
/// cut to this, so it can neither overflow a clock nor put the next
/// refresh off for ever.
pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(86_400);

/// A token as the sidecar holds it.
#[derive(Debug)]
pub struct Lease {
    pub value: Arc<str>,
    /// When WeChat stops accepting it.
    pub expires_at: Instant,
    /// Wall-clock time of the fetch, for `/status`.
    pub fetched_at: SystemTime,
    /// Its full lifetime as first seen (`expires_in` of the fetch that
    /// issued it), in milliseconds: 4 bytes where a `Duration` takes 16
    /// keep a lease in the 80-byte class.
    lifetime_ms: u32,
    /// WeChat called it invalid (40001/40014/42001): not handed out any more.
    reported_invalid: AtomicBool,
}

impl Lease {
    fn new(
        value: Arc<str>,
        expires_at: Instant,
        fetched_at: SystemTime,
        lifetime: Duration,
    ) -> Self {
        Lease {
            value,
            expires_at,
            fetched_at,
            lifetime_ms: u32::try_from(lifetime.as_millis()).unwrap_or(u32::MAX),
            reported_invalid: AtomicBool::new(false),
        }
    }

    /// Where the value occurs in `haystack`, plainly or percent-encoded
    /// (`secret::find_spelled`): the span it takes. No searcher is kept
    /// with the token (~400 bytes each): one for its first 16 bytes is
    /// built per answer (~64 ns for a 330-byte answer,
    /// `cargo bench --bench hot_path -- "token scan"`).
    pub fn find_in(&self, haystack: &[u8]) -> Option<std::ops::Range<usize>> {
        wxsidecar_core::secret::find_spelled(haystack, self.value.as_bytes())
    }

    /// Its full lifetime as first seen.
    pub fn lifetime(&self) -> Duration {
        Duration::from_millis(u64::from(self.lifetime_ms))
    }

    pub fn is_reported_invalid(&self) -> bool {
        self.reported_invalid.load(Ordering::Acquire)
    }

    pub fn remaining(&self) -> Duration {
        self.expires_at.saturating_duration_since(Instant::now())
    }

    /// Whole seconds since it was fetched (for `/status`).
    pub fn age_secs(&self) -> Option<u64> {
        self.fetched_at.elapsed().ok().map(|d| d.as_secs())
    }

    /// Not expired and not reported invalid: fit to send.
    pub fn is_valid(&self) -> bool {
        self.expires_at > Instant::now() && !self.is_reported_invalid()
    }
}

/// What `/status` and the logs say about an account's token.
#[derive(Debug, Clone, Default)]
pub struct CellStatus {
    /// Set after the first fetch attempt ends, either way.
    pub attempted: bool,
    /// Fetches this replica made (read from the metric series).
    pub fetches_ok: u64,
    pub fetches_failed: u64,
    /// The last failure, as a WeChat errcode (or -1 for a transport error) and a message.
    pub last_error: Option<(i64, String)>,
    /// Fetches counted against today's budget (UTC+8 day, as WeChat counts).
    pub fetches_today: u32,
    /// Refreshes asked for because WeChat called the token invalid.
    pub invalid_reports: u32,
    /// Set while today's budget is spent: why no fetch is made.
    pub budget_spent: Option<String>,
}

impl CellStatus {
    /// The last failure as errors say it (`errcode C: message`), else `none`.
    pub fn why(&self, none: &str) -> String {
        self.last_error
            .as_ref()
            .map_or_else(|| none.to_string(), |(c, m)| format!("errcode {c}: {m}"))
    }
}

/// What a cell keeps to answer [`LeaseCell::status`]: the counts inline,
/// a failure's words boxed (a healthy cell has none), so a cell fits a
/// smaller allocation class.
#[derive(Default)]
struct CellState {
    attempted: bool,
    fetches_today: u32,
    /// The day `fetches_today` counts (days since 1970 fit 32 bits).
    budget_day: i32,
    invalid_reports: u32,
    trouble: Option<Box<Trouble>>,
    /// Values issued before the current one, newest last (the token index
    /// forgets the oldest); none until the first refresh. A boxed `Vec`:
    /// 8 bytes in every cell where a `Vec` takes 24 (a cell class larger).
    #[allow(clippy::box_collection)]
    earlier: Option<Box<Vec<Arc<str>>>>,
}

/// The last failure and, while today's budget is spent, why.
struct Trouble {
    last_error: (i64, String),
    budget_spent: Option<String>,
}

impl CellState {
    /// Fetches counted against today's budget: 0 on a new day.
    fn today(&self) -> u32 {
        if i64::from(self.budget_day) == wechat_day(SystemTime::now()) {
            self.fetches_today
        } else {
            0
        }
    }
}

/// The current day as WeChat counts quotas: midnight in UTC+8.
pub fn wechat_day(now: SystemTime) -> i64 {
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    (secs + 8 * 3600).div_euclid(86400)
}

/// Time until the next UTC+8 midnight, when budgets reset.
pub fn until_next_wechat_day(now: SystemTime) -> Duration {
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) + 8 * 3600;
    Duration::from_secs(86400 - secs % 86400)
}

/// Which account issued a token, for every account at once: the request
/// path finds the account of a presented token in one hash lookup, however
/// many accounts there are. Written only when a token is stored.
///
/// An entry is 8 bytes — 32 bits of the token's keyed hash and the account —
/// not the token itself (24 bytes with its `Arc`): a lookup yields the
/// accounts whose tokens share those bits, and the caller keeps the one
/// whose cell really issued the token ([`LeaseCell::issued`]).
#[derive(Default)]
pub struct TokenIndex {
    hasher: hashbrown::DefaultHashBuilder,
    entries: parking_lot::RwLock<hashbrown::HashTable<(u32, u32)>>,
}

impl TokenIndex {
    fn short_hash(&self, value: &str) -> u32 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(value) as u32
    }

    /// The table's hash of a stored short hash: spread over 64 bits, as
    /// hashbrown reads its control bits from the top.
    fn spread(short: u32) -> u64 {
        u64::from(short).wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    /// The first account `issued` accepts among those that may have issued
    /// `value` (now or earlier).
    pub fn find(&self, value: &str, issued: impl Fn(usize) -> bool) -> Option<usize> {
        let short = self.short_hash(value);
        let entries = self.entries.read();
        let found = entries
            .iter_hash(Self::spread(short))
            .filter(|e| e.0 == short)
            .map(|e| e.1 as usize)
            .find(|&a| issued(a));
        found
    }

    /// Drops every token of `account` (removed by a reload).
    pub fn forget(&self, account: usize) {
        self.entries.write().retain(|e| e.1 as usize != account);
    }

    fn update(&self, added: &str, removed: Option<&str>, account: usize) {
        let account = account as u32;
        let added = self.short_hash(added);
        let removed = removed.map(|r| self.short_hash(r));
        let mut entries = self.entries.write();
        if let Some(r) = removed {
            if let Ok(e) = entries.find_entry(Self::spread(r), |e| *e == (r, account)) {
                e.remove();
            }
        }
        if entries
            .find(Self::spread(added), |e| *e == (added, account))
            .is_none()
        {
            entries.insert_unique(Self::spread(added), (added, account), |e| Self::spread(e.0));
        }
    }
}

/// How a fetch ended, as counted in `wxsidecar_{token,ticket}_fetches_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchResult {
    Ok = 0,
    WeChatError = 1,
    TransportError = 2,
    BudgetSpent = 3,
}

/// One account's token and its history.
pub struct LeaseCell {
    /// The shared index and this account's place in it (none for tickets).
    index: Option<Arc<TokenIndex>>,
    account: usize,
    /// The current token: read by every request, never locked.
    current: ArcSwapOption<Lease>,
    /// Bumped whenever a token is stored or a fetch attempt ends; waiters
    /// sleep on `changed_wake` (a `Notify`, 32 bytes, where a watch channel
    /// costs ~350 per cell).
    changed: std::sync::atomic::AtomicU64,
    changed_wake: tokio::sync::Notify,
    status: Mutex<CellState>,
    /// Fetch outcomes: the metric series themselves.
    counters: FetchCounters,
    /// How to ask the refresher to fetch now (set when it is scheduled).
    wake: std::sync::OnceLock<schedule::Wake>,
    /// An operator asked for a refresh (`POST /refresh`).
    forced: AtomicBool,
    /// Its account was removed (a reload): the refresher stops.
    retired: AtomicBool,
    /// Fetch once now, keeping the value until the new one arrives (a
    /// reload changed the secret).
    refetch: AtomicBool,
}

impl Default for LeaseCell {
    fn default() -> Self {
        LeaseCell::new(Arc::default(), 0, FetchCounters::default())
    }
}

impl LeaseCell {
    /// A cell for account number `account`, recording its tokens in `index`.
    pub fn new(index: Arc<TokenIndex>, account: usize, counters: FetchCounters) -> Self {
        LeaseCell::with_index(Some(index), account, counters)
    }

    /// A cell for a ticket: the same single flight, no token index.
    pub fn for_ticket(counters: FetchCounters) -> Self {
        LeaseCell::with_index(None, 0, counters)
    }

    fn with_index(index: Option<Arc<TokenIndex>>, account: usize, counters: FetchCounters) -> Self {
        LeaseCell {
            index,
            account,
            current: ArcSwapOption::empty(),
            changed: Default::default(),
            changed_wake: Default::default(),
            status: Mutex::new(CellState::default()),
            counters,
            wake: std::sync::OnceLock::new(),
            forced: AtomicBool::new(false),
            retired: AtomicBool::new(false),
            refetch: AtomicBool::new(false),
        }
    }
}

impl LeaseCell {
    /// The current token if it has not expired. Never waits.
    pub fn valid(&self) -> Option<Arc<Lease>> {
        self.current
            .load()
            .as_ref()
            .filter(|t| t.is_valid())
            .cloned()
    }

    /// Whether this cell handed out `value`: its current token or one of the
    /// [`DEFAULT_ISSUED_HISTORY`] before it.
    pub fn issued(&self, value: &str) -> bool {
        if self
            .current
            .load()
            .as_ref()
            .is_some_and(|t| &*t.value == value)
        {
            return true;
        }
        let st = self.status.lock();
        st.earlier
            .as_ref()
            .is_some_and(|e| e.iter().any(|v| &**v == value))
    }

    /// The current token, expired or not (for the refresher's schedule).
    pub fn latest(&self) -> Option<Arc<Lease>> {
        self.current.load_full()
    }

    /// Reports that WeChat rejected `bad`. Compare-and-refresh: only when the
    /// cell still holds `bad` is a refresh asked for, and only once; a report
    /// about a token already replaced does nothing. Returns whether it asked.
    pub fn report_invalid(&self, bad: &str) -> bool {
        let current = self.current.load();
        let Some(cur) = current.as_ref().filter(|t| &*t.value == bad) else {
            return false;
        };
        if cur.reported_invalid.swap(true, Ordering::AcqRel) {
            return false;
        }
        let mut st = self.status.lock();
        st.invalid_reports = st.invalid_reports.saturating_add(1);
        drop(st);
        self.wake_refresher();
        true
    }

    /// Asks for a refresh whatever the current token (through the same single
    /// flight, counted against the budget).
    pub fn request_refresh(&self) {
        self.forced.store(true, Ordering::Release);
        self.wake_refresher();
    }

    /// Asks for one fetch now, as a due refresh makes it (not a forced
    /// one: the value held is not reported as bad, so a stable token API
    /// is not asked for a new one).
    pub fn request_fetch(&self) {
        self.refetch.store(true, Ordering::Release);
        self.wake_refresher();
    }

    pub fn take_refetch(&self) -> bool {
        self.refetch.swap(false, Ordering::AcqRel)
    }

    /// Stops its refresher for good (the account was removed): the
    /// scheduler drops the job at its next look. The value stays readable
    /// for requests still in flight.
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Release);
        self.wake_refresher();
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// Ties the cell to its refresher's place in the scheduler (once).
    pub fn attach(&self, wake: schedule::Wake) {
        let _ = self.wake.set(wake);
    }

    fn wake_refresher(&self) {
        if let Some(w) = self.wake.get() {
            w.wake();
        }
    }

    pub fn take_forced(&self) -> bool {
        self.forced.swap(false, Ordering::AcqRel)
    }

    /// Fetches counted against today's budget (UTC+8), 0 on a new day.
    pub fn fetched_today(&self) -> u32 {
        self.status.lock().today()
    }

    /// Whether an operator may force a refresh now: never with the last
    /// `reserve` fetches of today's `budget`, which are kept for automatic
    /// refreshes. `Err` carries the fetches left today.
    pub fn may_force_refresh(&self, budget: u32, reserve: u32) -> Result<(), u32> {
        let left = budget.saturating_sub(self.fetched_today());
        if left <= reserve {
            Err(left)
        } else {
            Ok(())
        }
    }

    /// Counts one fetch against the daily budget; `false` when it is spent.
    pub fn spend_budget(&self, budget: u32) -> bool {
        let day = wechat_day(SystemTime::now());
        let mut st = self.status.lock();
        if i64::from(st.budget_day) != day {
            st.budget_day = day as i32;
            st.fetches_today = 0;
        }
        if st.fetches_today >= budget {
            return false;
        }
        st.fetches_today += 1;
        true
    }

    /// Waits up to `limit` for `check` to give something, checking again
    /// each time the cell changes: the one wait loop behind the `wait_*`.
    async fn wait_until<T>(&self, limit: Duration, check: impl Fn() -> Option<T>) -> Option<T> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            // Registered before the check, so a change between the two
            // still wakes us.
            let changed = self.changed_wake.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(x) = check() {
                return Some(x);
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return check();
            }
        }
    }

    /// Waits up to `limit` for a valid token other than `bad`.
    pub async fn wait_replacement(&self, bad: &str, limit: Duration) -> Option<Arc<Lease>> {
        self.wait_until(limit, || self.valid().filter(|t| &*t.value != bad))
            .await
    }

    /// Waits up to `limit` for a valid token; `None` when none came.
    pub async fn wait_valid(&self, limit: Duration) -> Option<Arc<Lease>> {
        self.wait_until(limit, || self.valid()).await
    }

    /// Waits up to `limit` for a valid value, or for a refresh attempt
    /// ending after `since` (see [`Self::fetches_ended`]) to have failed:
    /// then `Err` with its errcode and message (`Err(None)`: neither came),
    /// so a caller waiting on a first fetch hears of its failure at once.
    pub async fn wait_valid_or_failed(
        &self,
        since: u64,
        limit: Duration,
    ) -> Result<Arc<Lease>, Option<(i64, String)>> {
        let got = self
            .wait_until(limit, || match self.valid() {
                Some(t) => Some(Ok(t)),
                None if self.fetches_ended() > since => self
                    .status
                    .lock()
                    .trouble
                    .as_ref()
                    .map(|t| Err(t.last_error.clone())),
                None => None,
            })
            .await;
        match got {
            Some(Ok(t)) => Ok(t),
            Some(Err(e)) => Err(Some(e)),
            None => Err(None),
        }
    }

    /// Refresh attempts ended so far, either way (fetched, failed, taken
    /// from the shared store): pass to [`Self::wait_fetched`].
    pub fn fetches_ended(&self) -> u64 {
        self.changed.load(Ordering::Acquire)
    }

    /// Wakes every waiter: the cell changed.
    fn bump(&self) {
        self.changed.fetch_add(1, Ordering::AcqRel);
        self.changed_wake.notify_waiters();
    }

    /// Waits up to `limit` for a refresh attempt to end after `since` had
    /// (see [`Self::fetches_ended`]); false when none did. For tickets,
    /// where a refresh may rightly bring the same value back.
    pub async fn wait_fetched(&self, since: u64, limit: Duration) -> bool {
        self.wait_until(limit, || (self.fetches_ended() > since).then_some(()))
            .await
            .is_some()
    }

    /// Waits until the first fetch attempt has ended, up to `limit`.
    pub async fn wait_attempted(&self, limit: Duration) -> bool {
        self.wait_until(limit, || self.status.lock().attempted.then_some(()))
            .await
            .is_some()
    }

    /// Stores a fetched token. A value equal to the current one (a stable
    /// token or a ticket not rotated yet) never moves the expiry later: a
    /// ticket fetched again mid-life can come back claiming a full 7200 s,
    /// and believing it is how SDKs end up signing with an expired ticket.
    pub fn store(&self, value: &str, expires_in: Duration) -> StoreOutcome {
        let expires_in = expires_in.min(DEFAULT_MAX_LIFETIME);
        let now = Instant::now();
        let old = self.current.load_full();
        let outcome;
        let lease = match &old {
            Some(cur) if &*cur.value == value => {
                outcome = StoreOutcome::Same;
                Lease::new(
                    cur.value.clone(),
                    cur.expires_at.min(now + expires_in),
                    cur.fetched_at,
                    cur.lifetime(),
                )
            }
            _ => {
                outcome = StoreOutcome::New;
                let mut evicted = None;
                if let Some(cur) = &old {
                    let mut st = self.status.lock();
                    let earlier = st.earlier.get_or_insert_with(Default::default);
                    earlier.push(cur.value.clone());
                    if earlier.len() > DEFAULT_ISSUED_HISTORY {
                        evicted = Some(earlier.remove(0));
                    }
                }
                let value: Arc<str> = Arc::from(value);
                if let Some(index) = &self.index {
                    index.update(&value, evicted.as_deref(), self.account);
                }
                Lease::new(value, now + expires_in, SystemTime::now(), expires_in)
            }
        };
        self.current.store(Some(Arc::new(lease)));
        {
            let mut st = self.status.lock();
            st.attempted = true;
            st.trouble = None;
        }
        self.bump();
        outcome
    }

    /// Stores a token as if fetched: for benches and tests outside the crate.
    #[doc(hidden)]
    pub fn store_for_bench(&self, value: &str, expires_in: Duration) {
        self.store(value, expires_in);
    }

    pub fn record_failure(&self, errcode: i64, message: String) {
        {
            let mut st = self.status.lock();
            st.attempted = true;
            st.trouble = Some(Box::new(Trouble {
                last_error: (errcode, message),
                budget_spent: None,
            }));
        }
        self.bump();
    }

    pub fn record_budget_spent(&self, message: String) {
        {
            let mut st = self.status.lock();
            st.attempted = true;
            st.trouble = Some(Box::new(Trouble {
                last_error: (45009, message.clone()),
                budget_spent: Some(message),
            }));
        }
        self.bump();
    }

    /// Its fetch outcomes so far (for `/metrics`).
    pub fn fetch_counts(&self) -> &FetchCounters {
        &self.counters
    }

    /// Counts how a fetch ended.
    pub fn count(&self, result: FetchResult) {
        self.counters.inc(result as usize);
    }

    /// A snapshot; `fetches_today` is 0 once the day has turned.
    pub fn status(&self) -> CellStatus {
        let c = &self.counters;
        let st = self.status.lock();
        CellStatus {
            attempted: st.attempted,
            fetches_today: st.today(),
            fetches_ok: c.get(FetchResult::Ok as usize),
            fetches_failed: c.get(FetchResult::WeChatError as usize)
                + c.get(FetchResult::TransportError as usize),
            last_error: st.trouble.as_ref().map(|t| t.last_error.clone()),
            invalid_reports: st.invalid_reports,
            budget_spent: st.trouble.as_ref().and_then(|t| t.budget_spent.clone()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOutcome {
    New,
    Same,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_recognises_earlier_tokens() {
        let cell = LeaseCell::default();
        assert!(cell.valid().is_none());
        assert_eq!(cell.store("t1", Duration::from_secs(60)), StoreOutcome::New);
        assert_eq!(cell.store("t2", Duration::from_secs(60)), StoreOutcome::New);
        assert_eq!(&*cell.valid().unwrap().value, "t2");
        let index = cell.index.as_ref().unwrap();
        let find = |v: &str| index.find(v, |_| cell.issued(v));
        assert!(find("t1").is_some() && find("t2").is_some());
        assert!(find("t3").is_none());
        assert!(index.find("t3", |_| true).is_none());
    }

    #[test]
    fn same_value_keeps_lifetime_and_history() {
        let cell = LeaseCell::default();
        cell.store("t1", Duration::from_secs(7200));
        assert_eq!(
            cell.store("t1", Duration::from_secs(300)),
            StoreOutcome::Same
        );
        let t = cell.valid().unwrap();
        assert_eq!(t.lifetime(), Duration::from_secs(7200));
        assert!(t.remaining() <= Duration::from_secs(300));
    }

    #[test]
    fn same_value_never_extends_the_expiry() {
        // A ticket fetched again mid-life that still claims its full lifetime.
        let cell = LeaseCell::for_ticket(FetchCounters::default());
        cell.store("k1", Duration::from_secs(100));
        cell.store("k1", Duration::from_secs(7200));
        assert!(cell.valid().unwrap().remaining() <= Duration::from_secs(100));
    }

    #[test]
    fn history_is_bounded() {
        let cell = LeaseCell::default();
        for i in 0..(DEFAULT_ISSUED_HISTORY + 5) {
            cell.store(&format!("t{i}"), Duration::from_secs(60));
        }
        let index = cell.index.as_ref().unwrap();
        // Gone from the index and from the cell's history alike.
        assert!(index.find("t0", |_| true).is_none());
        assert!(!cell.issued("t3") && cell.issued("t4"));
        let last = format!("t{}", DEFAULT_ISSUED_HISTORY + 4);
        assert!(index.find(&last, |_| cell.issued(&last)).is_some());
    }

    #[test]
    fn compare_and_refresh_asks_once_and_only_for_the_current_token() {
        let cell = LeaseCell::default();
        cell.store("t1", Duration::from_secs(60));
        assert!(!cell.report_invalid("other"), "not the current token");
        assert!(cell.report_invalid("t1"));
        assert!(
            !cell.report_invalid("t1"),
            "second report of the same token"
        );
        assert!(cell.valid().is_none(), "a reported token is not handed out");
        cell.store("t2", Duration::from_secs(60));
        assert!(!cell.report_invalid("t1"), "already replaced");
        assert_eq!(cell.status().invalid_reports, 1);
    }

    // Under tokio's paused clock: hours of token life in milliseconds.

    #[tokio::test(start_paused = true)]
    async fn an_expired_token_is_never_handed_out() {
        let cell = LeaseCell::default();
        cell.store("t1", Duration::from_secs(7200));
        tokio::time::advance(Duration::from_secs(7199)).await;
        assert_eq!(cell.valid().unwrap().remaining(), Duration::from_secs(1));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(cell.valid().is_none());
        assert_eq!(cell.latest().unwrap().remaining(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn a_storm_of_reports_on_one_token_refreshes_once_and_everyone_gets_the_new_one() {
        let cell = Arc::new(LeaseCell::default());
        let (tx, mut wakes) = tokio::sync::mpsc::unbounded_channel();
        cell.attach(schedule::Wake::new(tx, 7));
        cell.store("t1", Duration::from_secs(7200));
        let reports: Vec<_> = (0..100)
            .map(|_| {
                let c = cell.clone();
                tokio::spawn(async move { c.report_invalid("t1") })
            })
            .collect();
        let waiters: Vec<_> = (0..100)
            .map(|_| {
                let c = cell.clone();
                tokio::spawn(async move { c.wait_replacement("t1", Duration::from_secs(30)).await })
            })
            .collect();
        let mut won = 0;
        for r in reports {
            won += usize::from(r.await.unwrap());
        }
        assert_eq!(
            won, 1,
            "one report wins; the others see it already reported"
        );
        // The refresher was woken to fetch, once.
        assert_eq!(wakes.try_recv(), Ok(7), "a refresh was asked for");
        assert!(wakes.try_recv().is_err(), "and only once");
        // The one fetch lands 2 s later (virtual): every waiter gets it.
        tokio::time::sleep(Duration::from_secs(2)).await;
        cell.store("t2", Duration::from_secs(7200));
        for w in waiters {
            assert_eq!(&*w.await.unwrap().unwrap().value, "t2");
        }
        assert_eq!(cell.status().invalid_reports, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_ticket_fetched_again_keeps_its_real_expiry() {
        let cell = LeaseCell::for_ticket(FetchCounters::default());
        cell.store("k1", Duration::from_secs(7200));
        tokio::time::advance(Duration::from_secs(7000)).await;
        // WeChat hands the same ticket out again, claiming the full 7200 s.
        assert_eq!(
            cell.store("k1", Duration::from_secs(7200)),
            StoreOutcome::Same
        );
        assert_eq!(cell.valid().unwrap().remaining(), Duration::from_secs(200));
        tokio::time::advance(Duration::from_secs(200)).await;
        assert!(cell.valid().is_none(), "expired when it really expires");
        // A new ticket gets its own, full lifetime.
        assert_eq!(
            cell.store("k2", Duration::from_secs(7200)),
            StoreOutcome::New
        );
        assert_eq!(cell.valid().unwrap().remaining(), Duration::from_secs(7200));
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_a_replacement_ends_at_its_limit() {
        let cell = LeaseCell::default();
        cell.store("t1", Duration::from_secs(7200));
        assert!(cell.report_invalid("t1"));
        let start = Instant::now();
        assert!(cell
            .wait_replacement("t1", Duration::from_secs(15))
            .await
            .is_none());
        assert_eq!(start.elapsed(), Duration::from_secs(15));
    }

    #[test]
    fn budget_counts_per_day() {
        let cell = LeaseCell::default();
        assert!(cell.spend_budget(2) && cell.spend_budget(2));
        assert!(!cell.spend_budget(2));
        assert_eq!(cell.status().fetches_today, 2);
    }

    #[test]
    fn wechat_day_is_utc_plus_8() {
        let t = |s: u64| UNIX_EPOCH + Duration::from_secs(s);
        // 15:59:59 UTC and 16:00:00 UTC fall on different days in Beijing.
        assert_ne!(
            wechat_day(t(86400 + 15 * 3600 + 3599)),
            wechat_day(t(86400 + 16 * 3600))
        );
        assert_eq!(
            until_next_wechat_day(t(16 * 3600)),
            Duration::from_secs(86400)
        );
    }

    #[tokio::test]
    async fn expired_token_is_never_valid() {
        let cell = LeaseCell::default();
        cell.store("t1", Duration::from_millis(1));
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(cell.valid().is_none());
        assert!(cell.wait_valid(Duration::from_millis(10)).await.is_none());
    }

    #[test]
    fn a_lifetime_past_a_day_is_cut_to_a_day() {
        let cell = LeaseCell::default();
        cell.store("t1", Duration::from_secs(u64::MAX));
        let t = cell.valid().unwrap();
        assert!(t.remaining() <= DEFAULT_MAX_LIFETIME);
        assert!(t.remaining() > DEFAULT_MAX_LIFETIME - Duration::from_secs(60));
        cell.store("t1", Duration::MAX);
        assert!(cell.valid().unwrap().remaining() <= DEFAULT_MAX_LIFETIME);
    }

    /// A wait on `cell` from now, for a minute, in a task of its own
    /// (started and parked by the time this returns).
    async fn waiting(
        cell: &Arc<LeaseCell>,
    ) -> tokio::task::JoinHandle<Result<Arc<Lease>, Option<(i64, String)>>> {
        let (c, since) = (cell.clone(), cell.fetches_ended());
        let waiter =
            tokio::spawn(
                async move { c.wait_valid_or_failed(since, Duration::from_secs(60)).await },
            );
        tokio::time::sleep(Duration::from_millis(20)).await;
        waiter
    }

    #[tokio::test]
    async fn a_waiter_hears_of_a_failed_fetch_at_once() {
        let cell = Arc::new(LeaseCell::default());
        let since = cell.fetches_ended();
        // A failure before the wait (after `since`) ends it too.
        cell.record_failure(45009, "quota".into());
        let got = cell
            .wait_valid_or_failed(since, Duration::from_secs(60))
            .await;
        assert_eq!(got.unwrap_err(), Some((45009, "quota".to_string())));
        // A failure while waiting ends the wait long before its limit.
        let waiter = waiting(&cell).await;
        let started = tokio::time::Instant::now();
        cell.record_failure(-1, "busy".into());
        let got = waiter.await.unwrap();
        assert_eq!(got.unwrap_err(), Some((-1, "busy".to_string())));
        assert!(started.elapsed() < Duration::from_secs(30));
        // Earlier failures do not end a new wait; a value does.
        let waiter = waiting(&cell).await;
        assert!(!waiter.is_finished());
        cell.store("t1", Duration::from_secs(60));
        assert_eq!(&*waiter.await.unwrap().unwrap().value, "t1");
        let none = cell.wait_valid_or_failed(cell.fetches_ended(), Duration::from_millis(10));
        assert!(none.await.is_ok(), "valid: at once");
    }
}
