//! The refresher alone, under tokio's paused clock: a scripted [`Source`]
//! and an in-memory [`Shared`] store stand in for WeChat and Redis (the
//! integration tests run the real ones), so hours of schedule take
//! milliseconds and every time below is exact.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use super::*;
use crate::store::now_ms;
use wxsidecar_metrics::FetchCounters;

const S: fn(u64) -> Duration = Duration::from_secs;

/// A fetch failure with chosen traits.
#[derive(Debug, Clone)]
struct Fail {
    errcode: i64,
    hard: bool,
}

impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "errcode {}", self.errcode)
    }
}

impl Failure for Fail {
    fn errcode(&self) -> i64 {
        self.errcode
    }
    fn is_hard(&self) -> bool {
        self.hard
    }
    fn answered(&self) -> bool {
        self.errcode >= 0
    }
}

/// When each fetch began and what it was told was rejected.
type Calls = Arc<Mutex<Vec<(Duration, Option<String>)>>>;
type Answer = Box<dyn FnMut(usize) -> Result<(String, Duration), Fail> + Send>;

/// Answers fetch number `n` (from 0) with `answer(n)` after `latency`, and
/// records when each fetch began and what it was told was rejected.
#[derive(Clone)]
struct Script {
    calls: Calls,
    answer: Arc<Mutex<Answer>>,
    latency: Duration,
    start: Instant,
}

impl Script {
    fn new(answer: impl FnMut(usize) -> Result<(String, Duration), Fail> + Send + 'static) -> Self {
        Script {
            calls: Arc::default(),
            answer: Arc::new(Mutex::new(Box::new(answer))),
            latency: Duration::ZERO,
            start: Instant::now(),
        }
    }

    /// A new value `v1`, `v2`… with `lifetime` on every fetch.
    fn rotating(lifetime: Duration) -> Self {
        Script::new(move |n| Ok((format!("v{}", n + 1), lifetime)))
    }

    fn slow(mut self, latency: Duration) -> Self {
        self.latency = latency;
        self
    }

    fn count(&self) -> usize {
        self.calls.lock().len()
    }

    /// When each fetch began, from the script's start.
    fn times(&self) -> Vec<Duration> {
        self.calls.lock().iter().map(|c| c.0).collect()
    }
}

impl Source for Script {
    type Error = Fail;

    fn label(&self) -> Label<'_> {
        Label {
            account: "shop",
            id: "wx1",
            what: "token",
            api: "stable",
        }
    }

    async fn fetch(&mut self, rejected: Option<&str>) -> Result<Fetched, Fail> {
        let n = {
            let mut calls = self.calls.lock();
            calls.push((self.start.elapsed(), rejected.map(str::to_string)));
            calls.len() - 1
        };
        tokio::time::sleep(self.latency).await;
        let (value, expires_in) = (self.answer.lock())(n)?;
        Ok(Fetched { value, expires_in })
    }
}

/// A shared store in memory, with `LOCK_SCRIPT`'s rules, that can go down.
#[derive(Default)]
struct MemStore {
    down: AtomicBool,
    records: Mutex<HashMap<String, Record>>,
    locks: Mutex<HashMap<String, String>>,
    budgets: Mutex<HashMap<String, u32>>,
}

impl MemStore {
    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::Acquire) {
            Err(StoreError::new("redis://mem", "connection refused"))
        } else {
            Ok(())
        }
    }

    fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::Release);
    }
}

impl Shared for MemStore {
    async fn lock(
        &self,
        key: &str,
        rejected: Option<&str>,
        _ttl: Duration,
    ) -> Result<Lock, StoreError> {
        self.check()?;
        if let Some(rec) = self.records.lock().get(key) {
            let good = match rejected {
                Some(bad) => rec.token != bad && rec.expires_at_ms > now_ms(),
                None => rec.next_refresh_at_ms > now_ms(),
            };
            if good {
                return Ok(Lock::Current(rec.clone()));
            }
        }
        let mut locks = self.locks.lock();
        if locks.contains_key(key) {
            return Ok(Lock::Busy);
        }
        locks.insert(key.to_string(), "me".to_string());
        Ok(Lock::Held("me".to_string()))
    }

    async fn spend_budget(&self, id: &str, _day: i64, budget: u32) -> Result<bool, StoreError> {
        self.check()?;
        let mut b = self.budgets.lock();
        let used = b.entry(id.to_string()).or_default();
        *used += 1;
        Ok(*used <= budget)
    }

    async fn save(&self, key: &str, record: &Record, _lock: &str) -> Result<(), StoreError> {
        self.check()?;
        self.records.lock().insert(key.to_string(), record.clone());
        self.locks.lock().remove(key);
        Ok(())
    }

    async fn release(&self, key: &str, _lock: &str) {
        self.locks.lock().remove(key);
    }

    fn replica(&self) -> &str {
        "test"
    }
}

fn settings() -> Settings {
    Settings {
        refresh_before: S(300),
        daily_budget: 1000,
        failed_retry: S(60),
        store_lock_ttl: S(10),
        on_store_error: OnStoreError::Fetch,
    }
}

fn cell() -> Arc<LeaseCell> {
    Arc::new(LeaseCell::new(Arc::default(), 0, FetchCounters::default()))
}

/// Starts a refresher without a shared store.
fn alone(
    cell: &Arc<LeaseCell>,
    script: &Script,
    settings: Settings,
) -> tokio::task::JoinHandle<()> {
    let none: Option<SharedKey<MemStore>> = None;
    tokio::spawn(run(cell.clone(), script.clone(), none, settings))
}

/// Starts a refresher sharing through `store`.
fn shared(
    cell: &Arc<LeaseCell>,
    script: &Script,
    store: &Arc<MemStore>,
    settings: Settings,
) -> tokio::task::JoinHandle<()> {
    let key = SharedKey {
        store: store.clone(),
        key: "wxsidecar:token:stable:wx1".into(),
        budget_id: "stable:wx1".into(),
    };
    tokio::spawn(run(cell.clone(), script.clone(), Some(key), settings))
}

#[tokio::test(start_paused = true)]
async fn many_waiters_share_one_fetch() {
    let (c, script) = (cell(), Script::rotating(S(7200)).slow(S(1)));
    let task = alone(&c, &script, settings());
    let waiters: Vec<_> = (0..100)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { c.wait_valid(S(5)).await.map(|t| t.value.clone()) })
        })
        .collect();
    for w in waiters {
        assert_eq!(w.await.unwrap().as_deref(), Some("v1"));
    }
    assert_eq!(script.count(), 1, "one fetch for 100 waiters");
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn a_storm_of_reports_refreshes_once_and_old_reports_do_nothing() {
    let (c, script) = (
        cell(),
        Script::rotating(S(7200)).slow(Duration::from_millis(50)),
    );
    let task = alone(&c, &script, settings());
    assert_eq!(c.wait_valid(S(5)).await.unwrap().value.as_ref(), "v1");
    // 200 requests see v1 rejected at once and each waits for a new one.
    let storm: Vec<_> = (0..200)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move {
                c.report_invalid("v1");
                c.wait_replacement("v1", S(5))
                    .await
                    .map(|t| t.value.clone())
            })
        })
        .collect();
    for r in storm {
        assert_eq!(r.await.unwrap().as_deref(), Some("v2"));
    }
    assert_eq!(script.count(), 2, "the storm cost one fetch");
    assert_eq!(
        script.calls.lock()[1].1.as_deref(),
        Some("v1"),
        "the fetch knows which value was rejected"
    );
    // Late reports about v1 (already replaced) ask for nothing.
    for _ in 0..50 {
        assert!(!c.report_invalid("v1"));
    }
    tokio::time::sleep(S(60)).await;
    assert_eq!(script.count(), 2);
    assert_eq!(c.status().invalid_reports, 1);
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn refreshes_ahead_of_expiry_and_at_most_half_the_lifetime() {
    let (c, script) = (cell(), Script::rotating(S(7200)));
    let task = alone(&c, &script, settings());
    tokio::time::sleep(S(7200 * 3)).await;
    assert_eq!(script.times()[..4], [S(0), S(6900), S(13800), S(20700)]);
    task.abort();

    // A short-lived lease refreshes at half its life, not 300 s early.
    let (c, script) = (cell(), Script::rotating(S(8)));
    let task = alone(&c, &script, settings());
    tokio::time::sleep(S(13)).await;
    assert_eq!(script.times(), [S(0), S(4), S(8), S(12)]);
    task.abort();
}

/// A lifetime past believing (`expires_in` near 2^64 s, from a broken or
/// hostile answer) is a day: nothing overflows, and the next refresh is a
/// day off, not never (shared through the store the same way).
#[tokio::test(start_paused = true)]
async fn an_endless_lifetime_is_taken_as_a_day() {
    let (c, script) = (cell(), Script::rotating(Duration::MAX));
    let task = alone(&c, &script, settings());
    tokio::time::sleep(S(86_400 + 10)).await;
    assert_eq!(script.times(), [S(0), S(86_100)]);
    assert!(c.valid().unwrap().remaining() <= crate::DEFAULT_MAX_LIFETIME);
    task.abort();

    let (c, script, store) = (
        cell(),
        Script::rotating(Duration::MAX),
        Arc::new(MemStore::default()),
    );
    let task = shared(&c, &script, &store, settings());
    tokio::time::sleep(S(10)).await;
    let record = store.records.lock().values().next().cloned().unwrap();
    assert!(record.remaining() <= crate::DEFAULT_MAX_LIFETIME);
    assert_eq!(script.count(), 1);
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn a_ticket_fetched_again_keeps_its_real_expiry() {
    // WeChat hands the same ticket out again, claiming a full 7200 s each
    // time; believing it would sign pages with an expired ticket.
    let (c, script) = (cell(), Script::new(|_| Ok(("ticket".to_string(), S(7200)))));
    let start = Instant::now();
    let task = alone(&c, &script, settings());
    tokio::time::sleep(S(6900) + Duration::from_millis(1)).await;
    assert_eq!(script.count(), 2, "due at 6900 s");
    let t = c.latest().unwrap();
    assert_eq!(t.expires_at - start, S(7200), "the first expiry stands");
    // Same value: ask again halfway to the real expiry (150 s), not in 6900 s.
    tokio::time::sleep(S(150)).await;
    assert_eq!(script.times()[2], S(7050));
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn transient_failures_back_off_with_jitter_up_to_the_cap() {
    let (c, script) = (
        cell(),
        Script::new(|_| {
            Err(Fail {
                errcode: -1,
                hard: false,
            })
        }),
    );
    let task = alone(&c, &script, settings());
    tokio::time::sleep(S(600)).await;
    let times = script.times();
    assert!(times.len() > 12, "{} fetches", times.len());
    let mut step = DEFAULT_BACKOFF_FIRST;
    for (i, gap) in times.windows(2).map(|w| w[1] - w[0]).enumerate() {
        assert!(
            gap >= step.mul_f64(0.5) && gap < step.mul_f64(1.5),
            "wait {i} was {gap:?}, step {step:?}"
        );
        step = (step * 2).min(DEFAULT_BACKOFF_CAP);
    }
    assert_eq!(step, DEFAULT_BACKOFF_CAP, "the cap was reached");
    let st = c.status();
    assert_eq!(st.fetches_failed as usize, times.len());
    assert_eq!(st.fetches_ok, 0);
    assert_eq!(st.last_error.unwrap().0, -1);
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn hard_failures_wait_failed_retry_and_recover() {
    let (c, script) = (
        cell(),
        Script::new(|n| {
            if n < 3 {
                Err(Fail {
                    errcode: 40125,
                    hard: true,
                })
            } else {
                Ok(("v".to_string(), S(7200)))
            }
        }),
    );
    let task = alone(&c, &script, settings());
    assert!(c.wait_valid(S(600)).await.is_some());
    assert_eq!(script.times(), [S(0), S(60), S(120), S(180)]);
    let st = c.status();
    assert_eq!((st.fetches_ok, st.fetches_failed), (1, 3));
    assert!(st.last_error.is_none(), "cleared by the good fetch");
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn the_budget_stops_fetches_and_keeps_a_reserve_from_operators() {
    let (c, script) = (
        cell(),
        Script::new(|_| {
            Err(Fail {
                errcode: 40164,
                hard: true,
            })
        }),
    );
    let s = Settings {
        daily_budget: 5,
        ..settings()
    };
    // With 5 a day and 3 kept back, an operator may force while 4 or 5 are
    // left, never below.
    assert_eq!(c.may_force_refresh(5, 3), Ok(()));
    let task = alone(&c, &script, s);
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(c.fetched_today(), 1);
    assert_eq!(c.may_force_refresh(5, 3), Ok(()));
    // Hard failures retry every failed_retry (60 s): exact times.
    tokio::time::sleep(S(60)).await;
    assert_eq!(c.fetched_today(), 2);
    assert_eq!(c.may_force_refresh(5, 3), Err(3));
    tokio::time::sleep(S(3600)).await;
    assert_eq!(script.count(), 5, "no fetch past the budget");
    let st = c.status();
    assert!(st.budget_spent.unwrap().contains("token.daily_budget"));
    assert_eq!(st.last_error.unwrap().0, 45009);
    assert_eq!(c.may_force_refresh(5, 3), Err(0));
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn an_operator_refresh_goes_through_the_same_single_flight() {
    let (c, script) = (
        cell(),
        Script::rotating(S(7200)).slow(Duration::from_millis(10)),
    );
    let task = alone(&c, &script, settings());
    c.wait_valid(S(5)).await.unwrap();
    for _ in 0..10 {
        c.request_refresh();
    }
    assert_eq!(
        c.wait_replacement("v1", S(5)).await.unwrap().value.as_ref(),
        "v2"
    );
    tokio::time::sleep(S(60)).await;
    assert_eq!(script.count(), 2, "ten requests, one fetch");
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn a_replica_takes_the_shared_value_without_fetching() {
    let store = Arc::new(MemStore::default());
    let (first, second) = (Script::rotating(S(7200)), Script::rotating(S(7200)));
    let (c1, c2) = (cell(), cell());
    let t1 = shared(&c1, &first, &store, settings());
    assert_eq!(c1.wait_valid(S(5)).await.unwrap().value.as_ref(), "v1");
    let t2 = shared(&c2, &second, &store, settings());
    assert_eq!(c2.wait_valid(S(5)).await.unwrap().value.as_ref(), "v1");
    assert_eq!((first.count(), second.count()), (1, 0));
    assert_eq!(c2.status().fetches_ok, 0, "taking is not fetching");
    t1.abort();
    t2.abort();
}

#[tokio::test(start_paused = true)]
async fn store_down_with_wait_never_fetches_alone() {
    // Classic tokens: a lone fetch would invalidate every other replica's.
    let store = Arc::new(MemStore::default());
    let s = Settings {
        on_store_error: OnStoreError::Wait,
        ..settings()
    };
    let (c, script) = (cell(), Script::rotating(S(7200)));
    let task = shared(&c, &script, &store, s);
    c.wait_valid(S(5)).await.unwrap();
    store.set_down(true);
    c.report_invalid("v1");
    tokio::time::sleep(S(120)).await;
    assert_eq!(script.count(), 1, "no fetch while the store is down");
    store.set_down(false);
    assert_eq!(
        c.wait_replacement("v1", S(60))
            .await
            .unwrap()
            .value
            .as_ref(),
        "v2"
    );
    assert_eq!(script.count(), 2);
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn store_down_with_fetch_fetches_alone_only_when_needed() {
    let store = Arc::new(MemStore::default());
    store.set_down(true);
    let (c, script) = (cell(), Script::rotating(S(7200)));
    let task = shared(&c, &script, &store, settings());
    // No value yet: fetch alone.
    assert_eq!(c.wait_valid(S(5)).await.unwrap().value.as_ref(), "v1");
    assert_eq!(script.count(), 1);
    // A rejected value: fetch alone again.
    c.report_invalid("v1");
    assert_eq!(
        c.wait_replacement("v1", S(60))
            .await
            .unwrap()
            .value
            .as_ref(),
        "v2"
    );
    assert_eq!(script.count(), 2);
    task.abort();

    // Down from the start with `wait`: nothing is fetched until it is back.
    let store = Arc::new(MemStore::default());
    store.set_down(true);
    let s = Settings {
        on_store_error: OnStoreError::Wait,
        ..settings()
    };
    let (c, script) = (cell(), Script::rotating(S(7200)));
    let task = shared(&c, &script, &store, s);
    tokio::time::sleep(S(120)).await;
    assert_eq!(script.count(), 0);
    store.set_down(false);
    assert!(c.wait_valid(S(60)).await.is_some());
    task.abort();
}
