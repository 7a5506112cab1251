//! The bytes of request bodies and upstream answers buffered at once,
//! across every connection (`limits.buffered_total`). Each is bounded by
//! `limits.buffered_body`, but 10,000 connections each trickling 1 MiB, or
//! asking at once for WeChat's largest answers, would hold 10 GB: past the
//! total, a request body is refused (503, retry shortly) instead of
//! buffered, and an answer is streamed through instead of buffered.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often a spent total is logged at most (it is counted every time).
const DEFAULT_SPENT_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// The clock the log spacing is read on: ms since first use.
fn now_ms() -> u64 {
    static EPOCH: std::sync::LazyLock<tokio::time::Instant> =
        std::sync::LazyLock::new(tokio::time::Instant::now);
    EPOCH.elapsed().as_millis() as u64
}

/// When a spent total was last logged (ms since `now_ms`'s epoch, 0: never).
static LAST_LOGGED: AtomicU64 = AtomicU64::new(0);

/// Counts a body refused or an answer streamed because the total is spent,
/// and says so in the log once a minute: the operator's cue to raise it.
fn spent(kind: &'static str, max: usize) {
    wxsidecar_metrics::BUFFERED_TOTAL_SPENT
        .with_label_values(&[kind])
        .inc();
    let now = now_ms().max(1);
    let last = LAST_LOGGED.load(Ordering::Relaxed);
    let interval = DEFAULT_SPENT_LOG_INTERVAL.as_millis() as u64;
    if (last == 0 || now.saturating_sub(last) >= interval)
        && LAST_LOGGED
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(
            limit = max,
            kind,
            "limits.buffered_total is spent: request bodies are refused (503) and answers over 16 KiB streamed until it frees; raise it if this recurs (logged once a minute, counted in wxsidecar_buffered_total_spent_total)"
        );
    }
}

/// The shared count and its bound.
#[derive(Debug)]
pub struct Bodies {
    held: Arc<AtomicUsize>,
    max: usize,
}

/// One body's share of the total, given back when dropped.
#[derive(Debug)]
pub struct Hold {
    held: Arc<AtomicUsize>,
    max: usize,
    n: usize,
}

/// Answers this small are buffered whatever the total says: their memory
/// is about one socket read's, and an errcode in them (40001: replay) must
/// be read.
pub const DEFAULT_SMALL_ANSWER: usize = 16 * 1024;

/// An upstream answer's claim on the total, taken only once the answer
/// passes [`DEFAULT_SMALL_ANSWER`] (the usual answer never touches the
/// shared count).
#[derive(Debug)]
pub struct AnswerClaim<'a> {
    bodies: &'a Bodies,
    hold: Option<Hold>,
}

impl AnswerClaim<'_> {
    /// Room for an answer of `n` bytes so far.
    pub fn room(&mut self, n: usize) -> bool {
        if n <= DEFAULT_SMALL_ANSWER {
            return true;
        }
        let bodies = self.bodies;
        match self.hold.get_or_insert_with(|| bodies.hold()).grow(n) {
            Ok(()) => true,
            Err(s) => {
                spent("answer", s.max);
                false
            }
        }
    }
}

/// The total is spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spent {
    pub max: usize,
}

impl Bodies {
    pub fn new(max: usize) -> Self {
        Bodies {
            held: Arc::default(),
            max,
        }
    }

    /// An empty hold, grown as the body comes.
    pub fn hold(&self) -> Hold {
        Hold {
            held: self.held.clone(),
            max: self.max,
            n: 0,
        }
    }

    /// A claim for one upstream answer, held until it is written.
    pub fn answer(&self) -> AnswerClaim<'_> {
        AnswerClaim {
            bodies: self,
            hold: None,
        }
    }

    /// Bytes held now.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Grows a request body's `hold` to `n` bytes, unless that would pass
    /// the total (counted and logged: the body is refused).
    pub fn grow(&self, hold: &mut Hold, n: usize) -> Result<(), Spent> {
        hold.grow(n).inspect_err(|s| spent("request_body", s.max))
    }
}

impl Hold {
    /// Grows to `n` bytes, unless that would pass the total.
    pub fn grow(&mut self, n: usize) -> Result<(), Spent> {
        if n <= self.n {
            return Ok(());
        }
        let more = n - self.n;
        let before = self.held.fetch_add(more, Ordering::Relaxed);
        if before + more > self.max {
            self.held.fetch_sub(more, Ordering::Relaxed);
            return Err(Spent { max: self.max });
        }
        self.n = n;
        Ok(())
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.held.fetch_sub(self.n, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_share_the_total_and_give_it_back() {
        let bodies = Bodies::new(100);
        let mut a = bodies.hold();
        let mut b = bodies.hold();
        bodies.grow(&mut a, 60).unwrap();
        assert_eq!(bodies.grow(&mut b, 50), Err(Spent { max: 100 }));
        assert_eq!(bodies.held(), 60, "a refused growth takes nothing");
        bodies.grow(&mut b, 40).unwrap();
        bodies.grow(&mut a, 30).unwrap();
        assert_eq!(bodies.held(), 100, "a hold never shrinks while it lives");
        drop(a);
        assert_eq!(bodies.held(), 40);
        bodies.grow(&mut b, 100).unwrap();
        drop(b);
        assert_eq!(bodies.held(), 0);
    }

    #[test]
    fn small_answers_take_no_share_large_ones_do() {
        let bodies = Bodies::new(DEFAULT_SMALL_ANSWER * 3);
        let mut small = bodies.answer();
        assert!(small.room(DEFAULT_SMALL_ANSWER));
        assert_eq!(bodies.held(), 0);
        let mut large = bodies.answer();
        assert!(large.room(DEFAULT_SMALL_ANSWER * 2));
        assert_eq!(bodies.held(), DEFAULT_SMALL_ANSWER * 2);
        let mut other = bodies.answer();
        assert!(!other.room(DEFAULT_SMALL_ANSWER * 2), "past the total");
        assert!(other.room(100), "a small one still fits");
        drop(large);
        assert!(other.room(DEFAULT_SMALL_ANSWER * 2));
        drop(other);
        assert_eq!(bodies.held(), 0);
    }
}
