//! The fake's tickets, with the rules that trip SDKs up: a ticket fetched
//! again before its last `overlap` comes back unchanged *still claiming its
//! full lifetime* (while it really expires on schedule); a new one is issued
//! only in that last stretch, the old one staying valid until it expires.
//! Fetches are limited per owner and type per hour, as WeCom documents
//! (400/hour per corp, 100/hour per app); beyond that WeChat answers 45009.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tokio::time::Instant;

use rand::distributions::Alphanumeric;
use rand::Rng;

use super::state::Refused;

/// WeCom's corp-wide jsapi_ticket quota.
pub const CORP_QUOTA_PER_HOUR: u32 = 400;
/// WeCom's per-app quota, used for every other ticket too.
pub const APP_QUOTA_PER_HOUR: u32 = 100;

const HOUR: Duration = Duration::from_secs(3600);

struct Issued {
    expires_at: Instant,
}

/// Who holds a ticket: an appid, a corpid, or `corpid/appN` for a WeCom app.
type Key = (String, &'static str);

pub struct Tickets {
    ttl: Duration,
    /// Overrides every quota (`--ticket-quota`).
    quota: Option<u32>,
    issued: HashMap<String, Issued>,
    current: HashMap<Key, String>,
    /// Fetches in the current hour window, per key.
    window: HashMap<Key, (Instant, u32)>,
    /// All fetches, for `/__fake/stats`: "owner:type" → count.
    pub fetches: BTreeMap<String, u64>,
}

impl Default for Tickets {
    fn default() -> Self {
        Tickets::new(Duration::from_secs(7200), None)
    }
}

impl Tickets {
    pub fn new(ttl: Duration, quota: Option<u32>) -> Self {
        Tickets {
            ttl,
            quota,
            issued: HashMap::new(),
            current: HashMap::new(),
            window: HashMap::new(),
            fetches: BTreeMap::new(),
        }
    }

    fn overlap(&self) -> Duration {
        Duration::from_secs(300).min(self.ttl / 4)
    }

    /// A fetch by `owner` of a ticket of type `ty`; returns the ticket and
    /// the `expires_in` WeChat claims.
    pub fn fetch(
        &mut self,
        owner: &str,
        ty: &'static str,
        default_quota: u32,
    ) -> Result<(String, u64), Refused> {
        let now = Instant::now();
        let key = (owner.to_string(), ty);
        let quota = self.quota.unwrap_or(default_quota);
        let slot = self.window.entry(key.clone()).or_insert((now, 0));
        if now.duration_since(slot.0) >= HOUR {
            *slot = (now, 0);
        }
        if slot.1 >= quota {
            return Err(Refused {
                errcode: 45009,
                errmsg: "reach max api daily quota limit",
            });
        }
        slot.1 += 1;
        *self.fetches.entry(format!("{owner}:{ty}")).or_default() += 1;
        let overlap = self.overlap();
        let current = self
            .current
            .get(&key)
            .filter(|v| {
                self.issued
                    .get(*v)
                    .is_some_and(|i| i.expires_at > now + overlap)
            })
            .cloned();
        let value = current.unwrap_or_else(|| {
            let v: String = rand::thread_rng()
                .sample_iter(&Alphanumeric)
                .take(86)
                .map(char::from)
                .collect();
            self.issued.insert(
                v.clone(),
                Issued {
                    expires_at: now + self.ttl,
                },
            );
            self.current.insert(key, v.clone());
            v
        });
        // The claim is always the full lifetime: the trap.
        Ok((value, self.ttl.as_secs()))
    }

    /// The time a ticket really has left; `None` if the fake never issued it.
    pub fn remaining(&self, ticket: &str) -> Option<Duration> {
        self.issued
            .get(ticket)
            .map(|i| i.expires_at.saturating_duration_since(Instant::now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refetch_returns_the_same_ticket_claiming_full_life() {
        let mut t = Tickets::new(Duration::from_secs(7200), None);
        let (a, claim) = t.fetch("wx1", "jsapi", APP_QUOTA_PER_HOUR).unwrap();
        let (b, _) = t.fetch("wx1", "jsapi", APP_QUOTA_PER_HOUR).unwrap();
        assert_eq!((a.as_str(), claim), (b.as_str(), 7200));
        let (c, _) = t.fetch("wx1", "wx_card", APP_QUOTA_PER_HOUR).unwrap();
        assert_ne!(a, c, "one ticket per type");
        assert!(t.remaining(&a).unwrap() <= Duration::from_secs(7200));
        assert!(t.remaining("nope").is_none());
    }

    #[test]
    fn quota_per_hour() {
        let mut t = Tickets::new(Duration::from_secs(7200), Some(2));
        assert!(t.fetch("ww1", "jsapi", CORP_QUOTA_PER_HOUR).is_ok());
        assert!(t.fetch("ww1", "jsapi", CORP_QUOTA_PER_HOUR).is_ok());
        assert_eq!(
            t.fetch("ww1", "jsapi", CORP_QUOTA_PER_HOUR)
                .unwrap_err()
                .errcode,
            45009
        );
        assert!(t.fetch("ww2", "jsapi", CORP_QUOTA_PER_HOUR).is_ok());
    }

    #[test]
    fn rotates_in_the_last_stretch() {
        let mut t = Tickets::new(Duration::from_secs(0), None);
        let (a, _) = t.fetch("wx1", "jsapi", 10).unwrap();
        let (b, _) = t.fetch("wx1", "jsapi", 10).unwrap();
        assert_ne!(a, b);
    }
}
