//! Sharing tokens between replicas through Redis, so one replica fetches per
//! token lifetime, cluster-wide.
//!
//! Per account one key (`{prefix}:token:{api}:{id}`) holds a JSON record:
//! the token, its absolute expiry, when and by which replica it was fetched,
//! and when the next refresh is due. Never the secret. A replica that finds
//! the token due takes a lock (`SET NX PX`, unique value, released only by its
//! owner, TTL longer than a fetch); the others poll (bounded) for the new
//! record and never fetch while a valid lock exists. A report "token T
//! failed" checks that the stored token is still T and takes the lock in one
//! Lua script (compare-and-refresh across replicas). The request path never
//! touches Redis: only the refresher and the health loop do.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use rand::Rng;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};

/// Redis answers in microseconds on a LAN; a second means it is in trouble.
const DEFAULT_OP_TIMEOUT: Duration = Duration::from_secs(1);

/// What the store keeps per account.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub token: String,
    pub expires_at_ms: u64,
    pub fetched_at_ms: u64,
    pub fetched_by: String,
    /// When the next refresh is due, decided by the replica that fetched.
    pub next_refresh_at_ms: u64,
}

impl Record {
    /// A record written now for a value with `expires_in` left, due for
    /// refresh in `refresh_in`.
    pub fn now(token: String, expires_in: Duration, refresh_in: Duration, by: String) -> Self {
        let now = now_ms();
        let at =
            |d: Duration| now.saturating_add(d.min(super::DEFAULT_MAX_LIFETIME).as_millis() as u64);
        Record {
            token,
            expires_at_ms: at(expires_in),
            fetched_at_ms: now,
            fetched_by: by,
            next_refresh_at_ms: at(refresh_in),
        }
    }

    /// What is left of its life; a record that claims more than
    /// [`super::DEFAULT_MAX_LIFETIME`] (written by a broken replica, or by
    /// hand) gets that.
    pub fn remaining(&self) -> Duration {
        Self::until(self.expires_at_ms)
    }

    pub fn until_next_refresh(&self) -> Duration {
        Self::until(self.next_refresh_at_ms)
    }

    fn until(at_ms: u64) -> Duration {
        Duration::from_millis(at_ms.saturating_sub(now_ms())).min(super::DEFAULT_MAX_LIFETIME)
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Debug, thiserror::Error)]
#[error("token store {url}: {reason}")]
pub struct StoreError {
    url: String,
    reason: String,
}

impl StoreError {
    /// `url` must already be masked.
    pub fn new(url: impl Into<String>, reason: impl Into<String>) -> Self {
        StoreError {
            url: url.into(),
            reason: reason.into(),
        }
    }
}

/// The outcome of asking for the right to fetch.
pub enum Lock {
    /// We hold the lock (its value): fetch, then [`RedisStore::save`].
    Held(String),
    /// The stored token is already what we need: use it.
    Current(Record),
    /// Another replica holds the lock: wait for its record.
    Busy,
}

/// Takes the lock unless the stored record makes a fetch unnecessary.
/// KEYS: token key, lock key. ARGV: the failed token ("" if none), lock
/// value, lock TTL ms, now ms.
const LOCK_SCRIPT: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, rec = pcall(cjson.decode, cur)
  if ok and type(rec) == 'table' and rec.token then
    if ARGV[1] ~= '' then
      if rec.token ~= ARGV[1] and tonumber(rec.expires_at_ms) > tonumber(ARGV[4]) then
        return {'current', cur}
      end
    elseif tonumber(rec.next_refresh_at_ms) > tonumber(ARGV[4]) then
      return {'current', cur}
    end
  end
end
if redis.call('SET', KEYS[2], ARGV[2], 'NX', 'PX', ARGV[3]) then
  return {'held', ''}
end
return {'busy', ''}
"#;

/// Writes the record and releases the lock if it is still ours.
/// KEYS: token key, lock key. ARGV: record JSON, TTL ms, lock value.
const SAVE_SCRIPT: &str = r#"
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[3] then
  redis.call('DEL', KEYS[2])
end
return 1
"#;

/// Releases the lock only if it is still ours.
const RELEASE_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

pub struct RedisStore {
    client: redis::Client,
    conn: tokio::sync::Mutex<Option<ConnectionManager>>,
    /// The URL without its password, for logs and `/status`.
    shown_url: String,
    prefix: String,
    /// Who fetched: written into records, and part of every lock value.
    pub replica: String,
    healthy: AtomicBool,
    last_error: Mutex<Option<String>>,
}

fn replica_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".into());
    format!("{host}-{}", std::process::id())
}

impl RedisStore {
    pub fn new(url: &str, prefix: &str) -> Result<Arc<Self>, String> {
        let client = redis::Client::open(url).map_err(|e| {
            format!(
                "token.store: {} is not a Redis URL: {e}",
                wxsidecar_core::secret::mask_url(url)
            )
        })?;
        Ok(Arc::new(RedisStore {
            client,
            conn: tokio::sync::Mutex::new(None),
            shown_url: wxsidecar_core::secret::mask_url(url),
            prefix: prefix.to_string(),
            replica: replica_id(),
            healthy: AtomicBool::new(true),
            last_error: Mutex::new(None),
        }))
    }

    pub fn url(&self) -> &str {
        &self.shown_url
    }

    pub fn token_key(&self, api: &str, id: &str) -> String {
        format!("{}:token:{api}:{id}", self.prefix)
    }

    fn err(&self, reason: impl std::fmt::Display) -> StoreError {
        StoreError::new(self.shown_url.clone(), reason.to_string())
    }

    async fn conn(&self) -> Result<ConnectionManager, StoreError> {
        let mut guard = self.conn.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(DEFAULT_OP_TIMEOUT)
            .set_response_timeout(DEFAULT_OP_TIMEOUT)
            .set_number_of_retries(1)
            .set_max_delay(1000);
        let c = tokio::time::timeout(
            DEFAULT_OP_TIMEOUT * 2,
            self.client.get_connection_manager_with_config(config),
        )
        .await
        .map_err(|_| self.err("connect timed out"))?
        .map_err(|e| self.err(e))?;
        *guard = Some(c.clone());
        Ok(c)
    }

    /// Runs one Redis operation with a timeout and records the store's health.
    async fn run<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let result = async {
            let conn = self.conn().await?;
            tokio::time::timeout(DEFAULT_OP_TIMEOUT, op(conn))
                .await
                .map_err(|_| self.err("timed out"))?
                .map_err(|e| self.err(e))
        }
        .await;
        self.note(result.as_ref().err());
        result
    }

    /// Logs once per change between reachable and unreachable.
    fn note(&self, error: Option<&StoreError>) {
        match error {
            None => {
                if !self.healthy.swap(true, Ordering::AcqRel) {
                    tracing::info!(store = %self.shown_url, "token store reachable again");
                }
                *self.last_error.lock() = None;
            }
            Some(e) => {
                if self.healthy.swap(false, Ordering::AcqRel) {
                    tracing::error!(store = %self.shown_url, error = %e, "token store unreachable; serving cached tokens");
                }
                *self.last_error.lock() = Some(e.reason.clone());
            }
        }
    }

    pub fn state(&self) -> String {
        match &*self.last_error.lock() {
            None => "ok".into(),
            Some(e) => format!("unreachable: {e}"),
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        self.run(|mut c| async move { redis::cmd("PING").query_async::<String>(&mut c).await })
            .await
            .map(|_| ())
    }

    /// Asks for the right to fetch; see [`LOCK_SCRIPT`].
    pub async fn lock(
        &self,
        key: &str,
        failed: Option<&str>,
        ttl: Duration,
    ) -> Result<Lock, StoreError> {
        let value = format!("{}-{:016x}", self.replica, rand::thread_rng().gen::<u64>());
        let (key, lock_key) = (key.to_string(), format!("{key}:lock"));
        let failed = failed.unwrap_or("").to_string();
        let v = value.clone();
        let (verdict, record): (String, String) = self
            .run(|mut c| async move {
                redis::Script::new(LOCK_SCRIPT)
                    .key(&key)
                    .key(&lock_key)
                    .arg(&failed)
                    .arg(&v)
                    .arg(ttl.as_millis() as u64)
                    .arg(now_ms())
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(match verdict.as_str() {
            "held" => Lock::Held(value),
            "current" => match serde_json::from_str(&record) {
                Ok(r) => Lock::Current(r),
                Err(e) => return Err(self.err(format!("bad record: {e}"))),
            },
            _ => Lock::Busy,
        })
    }

    /// Writes a fetched token and releases our lock.
    pub async fn save(
        &self,
        key: &str,
        record: &Record,
        lock_value: &str,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_string(record).expect("record serializes");
        let ttl = record.remaining().as_millis().max(1) as u64;
        let (key, lock_key, lv) = (
            key.to_string(),
            format!("{key}:lock"),
            lock_value.to_string(),
        );
        self.run(|mut c| async move {
            redis::Script::new(SAVE_SCRIPT)
                .key(&key)
                .key(&lock_key)
                .arg(&json)
                .arg(ttl)
                .arg(&lv)
                .invoke_async::<i64>(&mut c)
                .await
        })
        .await
        .map(|_| ())
    }

    /// Releases our lock after a failed fetch, so another replica may try.
    pub async fn release(&self, key: &str, lock_value: &str) {
        let (lock_key, lv) = (format!("{key}:lock"), lock_value.to_string());
        let _ = self
            .run(|mut c| async move {
                redis::Script::new(RELEASE_SCRIPT)
                    .key(&lock_key)
                    .arg(&lv)
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await;
    }

    /// Puts a token back after Redis lost it (a restart without
    /// persistence), unless another replica already did.
    pub async fn restore(&self, key: &str, record: &Record) -> Result<(), StoreError> {
        let json = serde_json::to_string(record).expect("record serializes");
        let ttl = record.remaining().as_millis() as u64;
        if ttl == 0 {
            return Ok(());
        }
        let key = key.to_string();
        self.run(|mut c| async move {
            redis::cmd("SET")
                .arg(&key)
                .arg(&json)
                .arg("NX")
                .arg("PX")
                .arg(ttl)
                .query_async::<Option<String>>(&mut c)
                .await
        })
        .await
        .map(|_| ())
    }

    /// Counts one fetch against the account's budget for `day`, cluster-wide.
    pub async fn spend_budget(&self, id: &str, day: i64, budget: u32) -> Result<bool, StoreError> {
        let key = format!("{}:budget:{id}:{day}", self.prefix);
        let used: i64 = self
            .run(|mut c| async move {
                let (n, _): (i64, i64) = redis::pipe()
                    .atomic()
                    .cmd("INCR")
                    .arg(&key)
                    .cmd("EXPIRE")
                    .arg(&key)
                    .arg(2 * 86400)
                    .query_async(&mut c)
                    .await?;
                Ok(n)
            })
            .await?;
        Ok(used <= budget as i64)
    }
}

impl RedisStore {
    /// Adds increments to hash fields in one pipeline: `(key, field, by)`.
    /// Returns each field's new total (the cluster's count). Every key
    /// expires `ttl` after its last write.
    pub async fn add_counts(
        &self,
        items: &[(String, String, u64)],
        ttl: Duration,
    ) -> Result<Vec<u64>, StoreError> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        self.run(|mut c| async move {
            let mut pipe = redis::pipe();
            for (key, field, by) in items {
                pipe.cmd("HINCRBY").arg(key).arg(field).arg(*by);
            }
            let mut keys: Vec<&String> = items.iter().map(|i| &i.0).collect();
            keys.dedup();
            for key in keys {
                pipe.cmd("EXPIRE").arg(key).arg(ttl.as_secs()).ignore();
            }
            pipe.query_async::<Vec<u64>>(&mut c).await
        })
        .await
    }

    /// The day's quota ledger key of account `id`.
    pub fn quota_key(&self, id: &str, day: i64) -> String {
        format!("{}:quota:{id}:{day}", self.prefix)
    }

    /// The count at `key` (0 when unset).
    pub async fn count(&self, key: &str) -> Result<u64, StoreError> {
        self.run(|mut c| async move {
            redis::cmd("GET")
                .arg(key)
                .query_async::<Option<u64>>(&mut c)
                .await
                .map(Option::unwrap_or_default)
        })
        .await
    }

    /// Adds one to the count at `key` (expiring after `ttl`); the new count.
    pub async fn bump(&self, key: &str, ttl: Duration) -> Result<u64, StoreError> {
        self.run(|mut c| async move {
            let (n,): (u64,) = redis::pipe()
                .atomic()
                .cmd("INCR")
                .arg(key)
                .cmd("EXPIRE")
                .arg(key)
                .arg(ttl.as_secs())
                .ignore()
                .query_async(&mut c)
                .await?;
            Ok(n)
        })
        .await
    }

    /// Sets the count at `key` (expiring after `ttl`).
    pub async fn set_count(&self, key: &str, n: u64, ttl: Duration) -> Result<(), StoreError> {
        self.run(|mut c| async move {
            redis::cmd("SET")
                .arg(key)
                .arg(n)
                .arg("EX")
                .arg(ttl.as_secs())
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    /// A key under this deployment's prefix.
    pub fn key(&self, rest: &str) -> String {
        format!("{}:{rest}", self.prefix)
    }

    /// Sets a hash field, never expiring (a platform's refresh tokens).
    pub async fn hset(&self, key: &str, field: &str, value: &str) -> Result<(), StoreError> {
        self.run(|mut c| async move {
            redis::cmd("HSET")
                .arg(key)
                .arg(field)
                .arg(value)
                .query_async::<i64>(&mut c)
                .await
        })
        .await
        .map(|_| ())
    }

    pub async fn hget(&self, key: &str, field: &str) -> Result<Option<String>, StoreError> {
        self.run(|mut c| async move {
            redis::cmd("HGET")
                .arg(key)
                .arg(field)
                .query_async::<Option<String>>(&mut c)
                .await
        })
        .await
    }

    pub async fn hdel(&self, key: &str, field: &str) -> Result<(), StoreError> {
        self.run(|mut c| async move {
            redis::cmd("HDEL")
                .arg(key)
                .arg(field)
                .query_async::<i64>(&mut c)
                .await
        })
        .await
        .map(|_| ())
    }

    /// Sets a string key expiring after `ttl` (a platform's ticket).
    pub async fn set_for(&self, key: &str, value: &str, ttl: Duration) -> Result<(), StoreError> {
        self.run(|mut c| async move {
            redis::cmd("SET")
                .arg(key)
                .arg(value)
                .arg("EX")
                .arg(ttl.as_secs().max(1))
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    /// Sets `key` only when absent, expiring after `ttl`: `true` when this
    /// call set it (a platform callback acted on by one replica only).
    pub async fn claim(&self, key: &str, ttl: Duration) -> Result<bool, StoreError> {
        self.run(|mut c| async move {
            redis::cmd("SET")
                .arg(key)
                .arg(1)
                .arg("NX")
                .arg("EX")
                .arg(ttl.as_secs().max(1))
                .query_async::<Option<String>>(&mut c)
                .await
                .map(|set| set.is_some())
        })
        .await
    }

    pub async fn del(&self, key: &str) -> Result<(), StoreError> {
        self.run(|mut c| async move { redis::cmd("DEL").arg(key).query_async::<i64>(&mut c).await })
            .await
            .map(|_| ())
    }

    pub async fn get(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.run(|mut c| async move {
            redis::cmd("GET")
                .arg(key)
                .query_async::<Option<String>>(&mut c)
                .await
        })
        .await
    }
}

impl super::refresher::Shared for RedisStore {
    async fn lock(
        &self,
        key: &str,
        rejected: Option<&str>,
        ttl: Duration,
    ) -> Result<Lock, StoreError> {
        RedisStore::lock(self, key, rejected, ttl).await
    }

    async fn spend_budget(&self, id: &str, day: i64, budget: u32) -> Result<bool, StoreError> {
        RedisStore::spend_budget(self, id, day, budget).await
    }

    async fn save(&self, key: &str, record: &Record, lock: &str) -> Result<(), StoreError> {
        RedisStore::save(self, key, record, lock).await
    }

    async fn release(&self, key: &str, lock: &str) {
        RedisStore::release(self, key, lock).await
    }

    fn replica(&self) -> &str {
        &self.replica
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DEFAULT_MAX_LIFETIME;

    #[test]
    fn a_record_never_claims_more_than_a_day() {
        let day = DEFAULT_MAX_LIFETIME;
        let r = Record::now("t".into(), Duration::MAX, Duration::MAX, "me".into());
        assert!(r.remaining() <= day && r.remaining() > day - Duration::from_secs(60));
        assert!(r.until_next_refresh() <= day);
        let corrupt = Record {
            token: "t".into(),
            expires_at_ms: u64::MAX,
            fetched_at_ms: 0,
            fetched_by: "elsewhere".into(),
            next_refresh_at_ms: u64::MAX,
        };
        assert_eq!(corrupt.remaining(), day);
        assert_eq!(corrupt.until_next_refresh(), day);
    }
}
