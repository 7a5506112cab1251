//! What WeChat's answers say about an account's quotas. 45009 (the daily
//! quota of an API spent) marks that path exhausted until WeChat's midnight
//! (UTC+8) and is never retried; 45011 (the minute limit) and 45033 (WeCom's
//! concurrency limit) reach the app with `Retry-After`, so its HTTP client
//! can back off without knowing WeChat's errcodes; the errcodes that matter
//! are counted per account (`wxsidecar_wechat_errors_total`).

pub mod ledger;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use parking_lot::Mutex;

use crate::lease::wechat_day;

/// The errcodes counted per account: a bounded set, so the metric's
/// series are bounded too.
pub const COUNTED: [i64; 12] = [
    -1, 40001, 40014, 42001, 40164, 45009, 45011, 45033, 48001, 60020, 61004, 89503,
];

/// Paths remembered as exhausted per account and day: more (a client
/// walking ids in the path) are counted, not listed.
const DEFAULT_MAX_EXHAUSTED: usize = 500;

/// `Retry-After` for an answer with `errcode`: 45011 is WeChat's per-minute
/// limit ("retry next minute"), 45033 WeCom's concurrency limit.
pub fn retry_after(errcode: i64) -> Option<&'static str> {
    match errcode {
        45011 => Some("60"),
        45033 => Some("1"),
        _ => None,
    }
}

/// One account's quota view; 8 bytes until WeChat answers an error.
#[derive(Default)]
pub struct Quota(once_cell::race::OnceBox<State>);

#[derive(Default)]
struct State {
    errors: [AtomicU64; COUNTED.len()],
    /// Paths whose daily quota is spent, and the WeChat day it was.
    exhausted: Mutex<Vec<(Box<str>, i64)>>,
}

impl Quota {
    /// Notes an answer's errcode (not 0) for `path`.
    pub fn note(&self, account: &str, errcode: i64, path: &str) {
        let Some(i) = COUNTED.iter().position(|&c| c == errcode) else {
            return;
        };
        let st = self.0.get_or_init(Box::default);
        st.errors[i].fetch_add(1, Ordering::Relaxed);
        if errcode != 45009 {
            return;
        }
        let today = wechat_day(SystemTime::now());
        let mut ex = st.exhausted.lock();
        ex.retain(|(_, day)| *day == today);
        if ex.iter().any(|(p, _)| &**p == path) || ex.len() >= DEFAULT_MAX_EXHAUSTED {
            return;
        }
        ex.push((path.into(), today));
        drop(ex);
        tracing::warn!(account, path, "daily quota of this API spent (45009): calls fail until midnight UTC+8; POST /cgi-bin/clear_quota resets it (10 a month)");
    }

    /// Every counted errcode with its count so far, 0 included.
    pub fn errors(&self) -> impl Iterator<Item = (i64, u64)> + '_ {
        COUNTED.iter().enumerate().map(move |(i, &c)| {
            let n = self
                .0
                .get()
                .map_or(0, |st| st.errors[i].load(Ordering::Relaxed));
            (c, n)
        })
    }

    /// The paths whose daily quota is spent today.
    pub fn exhausted(&self) -> Vec<String> {
        let Some(st) = self.0.get() else {
            return Vec::new();
        };
        let today = wechat_day(SystemTime::now());
        st.exhausted
            .lock()
            .iter()
            .filter(|(_, day)| *day == today)
            .map(|(p, _)| p.to_string())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errcodes_are_counted_and_spent_paths_listed_once() {
        let q = Quota::default();
        q.note("shop", 12345, "/cgi-bin/x");
        assert!(
            q.0.get().is_none(),
            "an errcode outside the set costs nothing"
        );
        q.note("shop", 45009, "/cgi-bin/message/template/send");
        q.note("shop", 45009, "/cgi-bin/message/template/send");
        q.note("shop", 45011, "/cgi-bin/message/custom/send");
        let seen: Vec<_> = q.errors().filter(|&(_, n)| n > 0).collect();
        assert_eq!(seen, [(45009, 2), (45011, 1)]);
        assert_eq!(q.errors().count(), COUNTED.len());
        assert_eq!(q.exhausted(), ["/cgi-bin/message/template/send"]);
        for i in 0..600 {
            q.note("shop", 45009, &format!("/cgi-bin/p{i}"));
        }
        assert_eq!(q.exhausted().len(), DEFAULT_MAX_EXHAUSTED, "bounded");
        assert_eq!(retry_after(45011), Some("60"));
        assert_eq!(retry_after(45033), Some("1"));
        assert_eq!(retry_after(45009), None);
    }
}
