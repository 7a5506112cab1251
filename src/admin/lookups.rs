//! WeChat's `quota/get` and `rid/get` are quotas of their own: an admin
//! (or a dashboard polling `/quota`) asking forty times must not spend
//! forty calls. At most one call per account and path (or rid) a minute;
//! within it the last answer is served again with its age. Callers asking
//! at once wait for the one call.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

/// How long one answer from WeChat is served again.
pub const DEFAULT_LOOKUP_TTL: Duration = Duration::from_secs(60);
/// Distinct lookups held at once: the admin is trusted, the map bounded
/// all the same.
const DEFAULT_LOOKUPS: usize = 1024;

/// What WeChat answered (or why the call failed), and when.
type Kept = Option<(Instant, Result<Value, String>)>;
/// One lookup's kept answer, locked while WeChat is asked.
type Slot = Arc<tokio::sync::Mutex<Kept>>;

/// The WeChat calls made for the admin, by kind (shown in `/status`).
#[derive(Default)]
pub struct AdminCalls {
    pub quota_get: AtomicU64,
    pub rid_get: AtomicU64,
    pub clear_quota: AtomicU64,
}

impl AdminCalls {
    pub fn snapshot(&self) -> crate::status::AdminCallsStatus {
        crate::status::AdminCallsStatus {
            quota_get: self.quota_get.load(Ordering::Relaxed),
            rid_get: self.rid_get.load(Ordering::Relaxed),
            clear_quota: self.clear_quota.load(Ordering::Relaxed),
        }
    }
}

/// Answers kept per (account, what was asked).
#[derive(Default)]
pub struct Lookups {
    kept: parking_lot::Mutex<HashMap<(String, String), Slot>>,
}

/// Too many distinct lookups within the minute.
#[derive(Debug)]
pub struct Full;

impl Lookups {
    /// The answer for `key`: kept (with its age in seconds) while fresh,
    /// else from `call`, which is then kept. `call` runs once however many
    /// ask at the same time.
    pub async fn get<F>(
        &self,
        key: (String, String),
        call: F,
    ) -> Result<(Result<Value, String>, Option<u64>), Full>
    where
        F: std::future::Future<Output = Result<Value, String>>,
    {
        let slot = {
            let mut kept = self.kept.lock();
            if !kept.contains_key(&key) && kept.len() >= DEFAULT_LOOKUPS {
                // Forget what is stale and not being asked for now.
                kept.retain(|_, slot| match slot.try_lock() {
                    Ok(k) => k
                        .as_ref()
                        .is_some_and(|(at, _)| at.elapsed() < DEFAULT_LOOKUP_TTL),
                    Err(_) => true,
                });
                if kept.len() >= DEFAULT_LOOKUPS {
                    return Err(Full);
                }
            }
            kept.entry(key).or_default().clone()
        };
        // An async lock: the one caller that calls WeChat holds it across
        // the call, the others wait for its answer (admin only, never the
        // request path).
        let mut kept = slot.lock().await;
        if let Some((at, answer)) = kept.as_ref() {
            let age = at.elapsed();
            if age < DEFAULT_LOOKUP_TTL {
                return Ok((answer.clone(), Some(age.as_secs())));
            }
        }
        let answer = call.await;
        *kept = Some((Instant::now(), answer.clone()));
        Ok((answer, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_call_a_minute_per_key_however_many_ask() {
        let lookups = Arc::new(Lookups::default());
        let calls = Arc::new(AtomicU64::new(0));
        let ask = |key: &str| {
            let (lookups, calls, key) = (lookups.clone(), calls.clone(), key.to_string());
            async move {
                lookups
                    .get(("shop".into(), key), async {
                        calls.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        Ok(serde_json::json!({"errcode": 0}))
                    })
                    .await
                    .unwrap()
            }
        };
        let at_once: Vec<_> = (0..40).map(|_| tokio::spawn(ask("/a"))).collect();
        let mut fresh = 0;
        for t in at_once {
            let (answer, age) = t.await.unwrap();
            assert_eq!(answer.unwrap()["errcode"], 0);
            fresh += usize::from(age.is_none());
        }
        assert_eq!((calls.load(Ordering::SeqCst), fresh), (1, 1));
        tokio::time::sleep(Duration::from_secs(30)).await;
        assert_eq!(ask("/a").await.1, Some(30));
        assert!(ask("/b").await.0.is_ok());
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "another path: its own call"
        );
        tokio::time::sleep(Duration::from_secs(31)).await;
        assert_eq!(ask("/a").await.1, None, "a minute on: asked again");
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }
}
