//! A platform callback is acted on once, and only while it is fresh.
//!
//! `msg_signature` proves a callback came from WeChat, not when: anyone who
//! once saw a signed callback (an ingress log with bodies, a proxy, the
//! app's own handler) could send it again — an old `unauthorized` removes
//! an account that authorised again since, an old ticket replaces the
//! current one. So the signed `timestamp` must lie within `callback_max_age`
//! of this host's clock, and a signature already acted on within that time
//! is answered `success` without acting again (as WeChat's own retry of an
//! event whose `success` it missed wants). Signatures are remembered here
//! and, with `token.store`, in the shared store, so a replay to another
//! replica is caught too.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use parking_lot::Mutex;

/// Signatures remembered per platform: far more than WeChat sends in a
/// window (a ticket every 10 minutes, authorisations by hand). Past it the
/// oldest is forgotten — only callbacks WeChat signed get here, and the
/// age check still bounds a replay.
const DEFAULT_SEEN_CAP: usize = 4096;

/// Why a signed callback is refused as stale.
pub fn check_age(timestamp: &str, now_secs: u64, max_age: Duration) -> Result<(), String> {
    let Ok(ts) = timestamp.trim().parse::<u64>() else {
        return Err("timestamp is not seconds since 1970, as WeChat sends it".into());
    };
    let off = now_secs.abs_diff(ts);
    if off > max_age.as_secs() {
        let (way, what) = if ts < now_secs {
            ("old", "a replayed callback")
        } else {
            ("ahead of this host's clock", "a clock set wrong")
        };
        return Err(format!(
            "timestamp is {off} s {way} (callback_max_age is {} s): {what}, or this host's clock is off (check NTP)",
            max_age.as_secs()
        ));
    }
    Ok(())
}

/// The signatures acted on lately, each until it expires.
#[derive(Default)]
pub struct Seen {
    inner: Mutex<SeenInner>,
}

#[derive(Default)]
struct SeenInner {
    order: VecDeque<(u64, String)>,
    set: HashSet<String>,
}

impl Seen {
    /// Marks `sig` as acted on until `until_secs`; `false` when it already
    /// was (and has not expired at `now_secs`).
    pub fn claim(&self, sig: &str, now_secs: u64, until_secs: u64) -> bool {
        let mut s = self.inner.lock();
        while let Some((until, _)) = s.order.front() {
            if *until > now_secs && s.order.len() < DEFAULT_SEEN_CAP {
                break;
            }
            let (_, old) = s.order.pop_front().expect("front exists");
            s.set.remove(&old);
        }
        if !s.set.insert(sig.to_string()) {
            return false;
        }
        s.order.push_back((until_secs, sig.to_string()));
        true
    }

    /// Forgets `sig` (acting on it failed: WeChat's retry must be taken).
    pub fn release(&self, sig: &str) {
        let mut s = self.inner.lock();
        if s.set.remove(sig) {
            s.order.retain(|(_, x)| x != sig);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_timestamps_within_the_window_are_fresh() {
        let age = Duration::from_secs(300);
        assert!(check_age("1000", 1000, age).is_ok());
        assert!(check_age("700", 1000, age).is_ok());
        assert!(check_age("1300", 1000, age).is_ok());
        let old = check_age("699", 1000, age).unwrap_err();
        assert!(
            old.contains("301 s old") && old.contains("replayed"),
            "{old}"
        );
        let ahead = check_age("1301", 1000, age).unwrap_err();
        assert!(ahead.contains("ahead"), "{ahead}");
        for bad in ["", "abc", "-5", "1e9", "99999999999999999999999"] {
            assert!(check_age(bad, 1000, age).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_signature_is_claimed_once_until_it_expires_or_is_released() {
        let seen = Seen::default();
        assert!(seen.claim("a", 100, 200));
        assert!(!seen.claim("a", 150, 250), "still remembered");
        assert!(seen.claim("b", 150, 250));
        seen.release("b");
        assert!(seen.claim("b", 160, 260), "released: taken again");
        // Expired at 200: forgotten on the next claim.
        assert!(seen.claim("a", 200, 300));
    }

    #[test]
    fn the_memory_is_bounded() {
        let seen = Seen::default();
        for i in 0..DEFAULT_SEEN_CAP + 10 {
            assert!(seen.claim(&i.to_string(), 0, 1_000));
        }
        let s = seen.inner.lock();
        assert!(s.order.len() <= DEFAULT_SEEN_CAP && s.set.len() == s.order.len());
        assert!(!s.set.contains("0"), "the oldest went first");
    }
}
