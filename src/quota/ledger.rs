//! The quota ledger: per account and API path, the calls sent to WeChat
//! today (UTC+8, as WeChat counts) and the errcodes it answered, so a team
//! sees where its daily quotas go before a send fails; and, with
//! `accounts[].limits`, a local daily cap answered with WeChat's 45009.
//!
//! A call costs a read lock, a hash of the path and two atomic adds. With
//! Redis the counts are shared: a flush every [`DEFAULT_FLUSH_EVERY`] sends
//! what each path gained (`HINCRBY`, one pipeline for every account) and
//! learns the cluster's totals back, so no request waits on Redis.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use parking_lot::{Mutex, RwLock};

use crate::lease::store::RedisStore;
use crate::lease::wechat_day;

/// Distinct paths counted per account and day; calls to more (a client
/// walking ids in the path) count under [`OTHER`].
pub const DEFAULT_MAX_PATHS: usize = 500;
/// Where calls beyond [`DEFAULT_MAX_PATHS`] distinct paths are counted.
pub const OTHER: &str = "other";
/// Distinct errcodes kept per path: WeChat answers a path with a handful.
const DEFAULT_MAX_ERRCODES: usize = 16;
/// How often counts go to Redis: a replica's unshared calls are at most
/// this old, and Redis sees one pipeline per interval, not one per call.
pub const DEFAULT_FLUSH_EVERY: Duration = Duration::from_secs(2);

/// One account's ledger; 8 bytes until its first call.
#[derive(Default)]
pub struct Ledger(once_cell::race::OnceBox<Book>);

struct Book {
    /// The WeChat day the counts are for.
    day: AtomicI64,
    /// foldhash, not SipHash: counted on every call, keyed by our own paths.
    paths: RwLock<hashbrown::HashMap<Box<str>, PathCount>>,
}

/// A path's errcodes: (errcode, count today, count not yet flushed). Most
/// paths never see one: boxed, 8 bytes in every path's entry (a `Vec` takes
/// 24, and the entries of a one-path map a larger allocation class).
#[derive(Default)]
#[allow(clippy::box_collection)]
struct Errcodes(Option<Box<Vec<(i64, u64, u64)>>>);

impl std::ops::Deref for Errcodes {
    type Target = [(i64, u64, u64)];
    fn deref(&self) -> &Self::Target {
        self.0.as_deref().map_or(&[], |v| v.as_slice())
    }
}

impl std::ops::DerefMut for Errcodes {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.0.as_deref_mut().map_or(&mut [], |v| v.as_mut_slice())
    }
}

impl Errcodes {
    fn push(&mut self, e: (i64, u64, u64)) {
        self.0.get_or_insert_with(Default::default).push(e)
    }
}

#[derive(Default)]
struct PathCount {
    calls: AtomicU64,
    /// Of `calls`, those sent to the shared store (one atomic add per call,
    /// not two).
    flushed: AtomicU64,
    /// The cluster's total (ours included) when we last flushed.
    cluster: AtomicU64,
    /// errcode, count today, count not yet flushed.
    errors: Mutex<Errcodes>,
}

impl PathCount {
    /// Every replica's calls as far as known: the cluster's total at the
    /// last flush (ours included), or ours if more, plus ours since.
    fn cluster_calls(&self) -> u64 {
        let calls = self.calls.load(Ordering::Relaxed);
        let flushed = self.flushed.load(Ordering::Relaxed).min(calls);
        self.cluster.load(Ordering::Relaxed).max(flushed) + (calls - flushed)
    }
}

/// What the ledger says of one path today.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PathReport {
    pub path: String,
    /// Calls this replica sent.
    pub calls: u64,
    /// Every replica's calls, as of the last flush plus ours since (equal
    /// to `calls` without a shared store).
    pub cluster_calls: u64,
    /// errcode → answers today (this replica).
    pub errors: std::collections::BTreeMap<i64, u64>,
}

/// A path's local daily cap was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverLimit {
    pub per_day: u64,
}

/// One path's increments for the shared store, and where its answer goes.
pub struct Pending {
    pub field: String,
    pub by: u64,
}

impl Ledger {
    fn book(&self, today: i64) -> &Book {
        let book = self.0.get_or_init(|| {
            Box::new(Book {
                day: AtomicI64::new(today),
                paths: RwLock::new(hashbrown::HashMap::new()),
            })
        });
        if book.day.load(Ordering::Relaxed) != today {
            // A new day at WeChat: yesterday's counts are done with.
            let mut paths = book.paths.write();
            if book.day.swap(today, Ordering::Relaxed) != today {
                paths.clear();
            }
        }
        book
    }

    /// Runs `f` on `path`'s counts, adding the path (or counting it under
    /// [`OTHER`] past the bound) if it is new today.
    fn with_path<T>(&self, path: &str, f: impl Fn(&PathCount) -> T) -> T {
        let book = self.book(wechat_day(SystemTime::now()));
        {
            let paths = book.paths.read();
            if let Some(p) = paths.get(path) {
                return f(p);
            }
        }
        let mut paths = book.paths.write();
        let key = if paths.len() < DEFAULT_MAX_PATHS || paths.contains_key(path) {
            path
        } else {
            OTHER
        };
        f(paths.entry(key.into()).or_default())
    }

    /// Counts a call about to be sent to `path`; with a local cap
    /// (`per_day`) the call is refused, and not counted, once the day's
    /// calls (cluster-wide as far as known) reached it.
    pub fn admit(&self, path: &str, per_day: Option<u64>) -> Result<(), OverLimit> {
        self.with_path(path, |p| {
            if let Some(per_day) = per_day {
                if p.cluster_calls() >= per_day {
                    return Err(OverLimit { per_day });
                }
            }
            p.calls.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
    }

    /// Notes an answer's errcode (not 0) for `path`.
    pub fn error(&self, path: &str, errcode: i64) {
        self.with_path(path, |p| {
            let mut errors = p.errors.lock();
            let n = errors.len();
            match errors.iter_mut().find(|e| e.0 == errcode) {
                Some(e) => {
                    e.1 += 1;
                    e.2 += 1;
                }
                None if n < DEFAULT_MAX_ERRCODES => errors.push((errcode, 1, 1)),
                None => {}
            }
        })
    }

    /// Today's counts, every path or the one asked for (busiest first).
    pub fn report(&self, only: Option<&str>) -> Vec<PathReport> {
        let Some(book) = self.0.get() else {
            return Vec::new();
        };
        if book.day.load(Ordering::Relaxed) != wechat_day(SystemTime::now()) {
            return Vec::new();
        }
        let paths = book.paths.read();
        let mut out: Vec<PathReport> = paths
            .iter()
            .filter(|(k, _)| only.is_none_or(|o| &***k == o))
            .map(|(k, p)| PathReport {
                path: k.to_string(),
                calls: p.calls.load(Ordering::Relaxed),
                cluster_calls: p.cluster_calls(),
                errors: p.errors.lock().iter().map(|e| (e.0, e.1)).collect(),
            })
            .collect();
        out.sort_by(|a, b| b.calls.cmp(&a.calls).then(a.path.cmp(&b.path)));
        out
    }

    /// Takes what changed since the last flush: the day, and per path a
    /// field (`path`, or `path#errcode`) and its increment. Give the
    /// increments back with [`Self::unflushed`] when the store fails.
    pub fn take_pending(&self) -> Option<(i64, Vec<Pending>)> {
        let book = self.0.get()?;
        let day = book.day.load(Ordering::Relaxed);
        let paths = book.paths.read();
        let mut out = Vec::new();
        for (k, p) in paths.iter() {
            let calls = p.calls.load(Ordering::Relaxed);
            let by = calls - p.flushed.swap(calls, Ordering::Relaxed);
            if by > 0 {
                out.push(Pending {
                    field: k.to_string(),
                    by,
                });
            }
            for e in p.errors.lock().iter_mut().filter(|e| e.2 > 0) {
                out.push(Pending {
                    field: format!("{k}#{}", e.0),
                    by: std::mem::take(&mut e.2),
                });
            }
        }
        (!out.is_empty()).then_some((day, out))
    }

    /// Gives back increments a failed flush took.
    pub fn unflushed(&self, day: i64, pending: &[Pending]) {
        let Some(book) = self.0.get() else { return };
        if book.day.load(Ordering::Relaxed) != day {
            return;
        }
        let paths = book.paths.read();
        for x in pending {
            match x.field.rsplit_once('#') {
                Some((path, code)) => {
                    let code: i64 = code.parse().unwrap_or(0);
                    if let Some(p) = paths.get(path) {
                        if let Some(e) = p.errors.lock().iter_mut().find(|e| e.0 == code) {
                            e.2 += x.by;
                        }
                    }
                }
                None => {
                    if let Some(p) = paths.get(x.field.as_str()) {
                        p.flushed.fetch_sub(x.by, Ordering::Relaxed);
                    }
                }
            }
        }
    }

    /// Records the cluster's totals a flush learnt (for call fields).
    pub fn learnt(&self, day: i64, pending: &[Pending], totals: &[u64]) {
        let Some(book) = self.0.get() else { return };
        if book.day.load(Ordering::Relaxed) != day {
            return;
        }
        let paths = book.paths.read();
        for (x, total) in pending.iter().zip(totals) {
            if let Some(p) = paths.get(x.field.as_str()) {
                p.cluster.fetch_max(*total, Ordering::Relaxed);
            }
        }
    }
}

/// How long a day's shared counts are kept: past WeChat's midnight, for
/// a look back at yesterday.
const DEFAULT_KEEP_COUNTS: Duration = Duration::from_secs(2 * 86400);

/// Sends every ledger's new counts to the shared store in one pipeline and
/// learns the cluster's totals back; on failure the counts wait for the
/// next flush. `ledgers`: each account's store id and ledger.
pub async fn flush<'a>(
    store: &RedisStore,
    ledgers: impl Iterator<Item = (String, &'a Ledger)>,
) -> Result<(), crate::lease::store::StoreError> {
    let mut taken = Vec::new();
    let mut items = Vec::new();
    for (id, ledger) in ledgers {
        if let Some((day, pending)) = ledger.take_pending() {
            let key = store.quota_key(&id, day);
            items.extend(pending.iter().map(|p| (key.clone(), p.field.clone(), p.by)));
            taken.push((ledger, day, pending));
        }
    }
    match store.add_counts(&items, DEFAULT_KEEP_COUNTS).await {
        Ok(totals) => {
            let mut at = 0;
            for (ledger, day, pending) in &taken {
                ledger.learnt(*day, pending, &totals[at..at + pending.len()]);
                at += pending.len();
            }
            Ok(())
        }
        Err(e) => {
            for (ledger, day, pending) in &taken {
                ledger.unflushed(*day, pending);
            }
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_calls_and_errcodes_per_path_bounded() {
        let l = Ledger::default();
        assert!(l.report(None).is_empty());
        assert!(l.0.get().is_none(), "nothing allocated before a call");
        for _ in 0..3 {
            l.admit("/cgi-bin/message/template/send", None).unwrap();
        }
        l.admit("/cgi-bin/user/info", None).unwrap();
        l.error("/cgi-bin/message/template/send", 45011);
        l.error("/cgi-bin/message/template/send", 45011);
        let r = l.report(None);
        assert_eq!(r[0].path, "/cgi-bin/message/template/send");
        assert_eq!((r[0].calls, r[0].cluster_calls), (3, 3));
        assert_eq!(r[0].errors.get(&45011), Some(&2));
        assert_eq!(l.report(Some("/cgi-bin/user/info"))[0].calls, 1);

        for i in 0..DEFAULT_MAX_PATHS + 20 {
            l.admit(&format!("/cgi-bin/p/{i}"), None).unwrap();
        }
        let r = l.report(None);
        assert_eq!(r.len(), DEFAULT_MAX_PATHS + 1, "bounded, plus `other`");
        let other = r.iter().find(|p| p.path == OTHER).unwrap();
        assert_eq!(other.calls, 22);
    }

    #[test]
    fn a_local_cap_refuses_without_counting_and_knows_the_cluster() {
        let l = Ledger::default();
        let path = "/cgi-bin/message/template/send";
        assert!(l.admit(path, Some(3)).is_ok());
        assert!(l.admit(path, Some(3)).is_ok());
        // A flush: our 2 went out; the cluster says 2 + 0 others so far.
        let (day, pending) = l.take_pending().unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].by, 2);
        l.learnt(day, &pending, &[2]);
        assert!(l.admit(path, Some(3)).is_ok());
        assert_eq!(l.admit(path, Some(3)), Err(OverLimit { per_day: 3 }));
        assert_eq!(
            l.report(None)[0].calls,
            3,
            "the refused call is not counted"
        );

        // Other replicas called too: the next flush learns 10 in all.
        let (day, pending) = l.take_pending().unwrap();
        l.learnt(day, &pending, &[10]);
        let r = &l.report(None)[0];
        assert_eq!((r.calls, r.cluster_calls), (3, 10));
        assert!(l.admit(path, Some(5)).is_err(), "the cluster's calls count");

        // A failed flush gives its increments back.
        l.admit("/cgi-bin/x", None).unwrap();
        l.error("/cgi-bin/x", 40001);
        let (day, pending) = l.take_pending().unwrap();
        assert!(l.take_pending().is_none(), "taken");
        l.unflushed(day, &pending);
        let (_, again) = l.take_pending().unwrap();
        let mut fields: Vec<(String, u64)> = again.into_iter().map(|p| (p.field, p.by)).collect();
        fields.sort();
        assert_eq!(
            fields,
            [
                ("/cgi-bin/x".to_string(), 1),
                ("/cgi-bin/x#40001".to_string(), 1)
            ]
        );
    }
}
