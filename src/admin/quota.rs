//! Quota tools on the admin listener, beside WeChat's own:
//! `GET /quota?account=[&path=]` (our ledger, and WeChat's `quota/get` for
//! a path), `POST /quota/clear?account=` (`clear_quota/v2`, at most
//! [`CLEARS_PER_MONTH`] a month, counted store-wide) and
//! `GET /rid?account=&rid=` (`rid/get`: what WeChat logged of a failed call).
//!
//! Answers are WeChat's, scrubbed of any token, with our counts beside them.

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use http::Response;
use serde_json::{json, Value};

use super::{answer, Admin};
use crate::account::Account;
use crate::config::AccountKind;
use crate::reply::JSON;

/// WeChat allows ten quota resets a month per account (the web console's
/// included); past them it answers 48006.
pub const CLEARS_PER_MONTH: u64 = 10;
/// WeChat's answers to these calls are a few hundred bytes.
const DEFAULT_ANSWER_LIMIT: usize = 64 * 1024;
/// WeChat's rids are ~30 characters (`6123abcd-1234abcd-5678ef01`).
const DEFAULT_MAX_RID: usize = 128;
/// The month count lives a little longer than a month.
const DEFAULT_KEEP_CLEARS: Duration = Duration::from_secs(40 * 86400);

/// The month WeChat counts resets in (UTC+8), as `YYYYMM`.
fn wechat_month(now: SystemTime) -> u32 {
    let day = crate::lease::wechat_day(now);
    let date = time::Date::from_julian_day(day as i32 + 2_440_588).unwrap_or(time::Date::MIN);
    date.year() as u32 * 100 + u8::from(date.month()) as u32
}

fn error(status: u16, errcode: i64, msg: &str) -> Response<Vec<u8>> {
    answer(
        status,
        JSON,
        crate::reply::error_body(errcode, msg).to_vec(),
    )
}

fn ok(v: Value) -> Response<Vec<u8>> {
    answer(200, JSON, v.to_string().into_bytes())
}

/// [`ok`] of an answer kept from WeChat `age` seconds ago (`Age`, RFC 9111
/// §5.1), or just now.
fn ok_aged(v: Value, age: Option<u64>) -> Response<Vec<u8>> {
    let mut r = ok(v);
    if let Some(age) = age {
        r.headers_mut().insert(http::header::AGE, age.into());
    }
    r
}

/// Too many distinct `/quota` and `/rid` lookups within the minute.
fn too_many() -> Response<Vec<u8>> {
    error(
        429,
        45009,
        "too many distinct quota/rid lookups this minute; ask again in a minute",
    )
}

/// Resets counted in memory, per account, when there is no shared store:
/// the month they count in (`YYYYMM`) and how many.
#[derive(Default)]
pub struct LocalClears(parking_lot::Mutex<std::collections::HashMap<String, (u32, u64)>>);

impl LocalClears {
    fn get(&self, id: &str, month: u32) -> u64 {
        match self.0.lock().get(id) {
            Some(&(m, n)) if m == month => n,
            _ => 0,
        }
    }

    fn set(&self, id: &str, month: u32, n: u64) {
        self.0.lock().insert(id.to_string(), (month, n));
    }
}

impl Admin {
    /// The account a query names (`account=` name or appid), or the answer
    /// that says there is none (never listing the configured ones).
    pub(super) fn named_account(
        &self,
        query: &str,
    ) -> Result<std::sync::Arc<Account>, Box<Response<Vec<u8>>>> {
        let name = crate::query::param(query, "account").unwrap_or_default();
        self.app
            .accounts()
            .iter()
            .find(|a| a.name == name || *a.id == *name)
            .cloned()
            .ok_or_else(|| {
                Box::new(error(
                    404,
                    40013,
                    "no such account; pass account=NAME (a configured name or appid)",
                ))
            })
    }

    /// Calls WeChat for `account` with its token; a token WeChat rejects is
    /// reported and the call made once more with the next one.
    async fn call_wechat(
        &self,
        account: &Account,
        path_and_query: &str,
        body: &[u8],
        with_token: bool,
    ) -> Result<Value, String> {
        let upstream = self.app.upstream_for(account.kind.family());
        let wait =
            self.app.config().upstream.connect_timeout + self.app.config().upstream.read_timeout;
        let mut token =
            match with_token {
                true => {
                    Some(account.tokens.wait_valid(wait).await.ok_or_else(|| {
                        format!("account {} has no valid token yet", account.name)
                    })?)
                }
                false => None,
            };
        let (path, query) = match path_and_query.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path_and_query, None),
        };
        for attempt in 0..2 {
            let target = match &token {
                Some(t) => format!("{path}?{}", crate::query::with_token(query, &t.value)),
                None => path_and_query.to_string(),
            };
            let (status, answer) = upstream
                .post_json(&target, body, DEFAULT_ANSWER_LIMIT)
                .await
                .map_err(|e| format!("{path}: {e}"))?;
            let answer =
                answer.map_err(|_| format!("{path}: answer over {DEFAULT_ANSWER_LIMIT} bytes"))?;
            let text = String::from_utf8_lossy(&answer);
            let mut text = crate::logging::scrub(&text).into_owned();
            if let Some(t) = &token {
                text = text.replace(&*t.value, "***");
            }
            let v: Value = serde_json::from_str(&text)
                .map_err(|_| format!("{path}: WeChat answered HTTP {status}, not JSON"))?;
            let errcode = v.get("errcode").and_then(Value::as_i64);
            let rejected = errcode.is_some_and(|c| crate::inspect::INVALID_TOKEN.contains(&c));
            if let (true, 0, Some(bad)) = (rejected, attempt, &token) {
                account.tokens.report_invalid(&bad.value);
                if let Some(fresh) = account.tokens.wait_replacement(&bad.value, wait).await {
                    token = Some(fresh);
                    continue;
                }
            }
            return Ok(v);
        }
        unreachable!("the loop returns on its second pass")
    }

    /// `GET /quota?account=NAME[&path=/cgi-bin/...]`.
    pub(super) async fn quota(&self, query: &str) -> Response<Vec<u8>> {
        let account = match self.named_account(query) {
            Ok(a) => a,
            Err(r) => return *r,
        };
        let path = match crate::query::param(query, "path") {
            None => None,
            Some(p) => match crate::target::normalise(&p) {
                Ok(n) => Some(crate::target::route_key(&n).to_string()),
                Err(e) => {
                    return error(
                        400,
                        40035,
                        &format!("path: {}; pass path=/cgi-bin/message/template/send", e.0),
                    )
                }
            },
        };
        let ours = account.ledger.report(path.as_deref());
        let beijing = time::UtcOffset::from_hms(8, 0, 0).expect("a valid offset");
        let date = time::OffsetDateTime::now_utc().to_offset(beijing).date();
        let day = format!(
            "{}-{:02}-{:02}",
            date.year(),
            u8::from(date.month()),
            date.day()
        );
        let mut out = json!({
            "account": account.name,
            "day": day,
            "ours": ours,
        });
        let limit = path.as_deref().and_then(|p| account.limit_for(p));
        if let Some(n) = limit {
            out["local_limit_per_day"] = json!(n);
        }
        let Some(path) = path else {
            return ok(out);
        };
        out["path"] = json!(path);
        if account.kind == AccountKind::WeCom {
            out["wechat"] = Value::Null;
            out["note"] = json!("WeCom has no per-API quota query; our own counts only");
            return ok(out);
        }
        let body = json!({ "cgi_path": path }).to_string();
        let call = async {
            self.calls.quota_get.fetch_add(1, Ordering::Relaxed);
            self.call_wechat(
                &account,
                "/cgi-bin/openapi/quota/get",
                body.as_bytes(),
                true,
            )
            .await
        };
        let key = (account.id.to_string(), format!("quota {path}"));
        let Ok((answer, age)) = self.lookups.get(key, call).await else {
            return too_many();
        };
        match answer {
            Ok(v) => {
                out["wechat"] = v;
                ok_aged(out, age)
            }
            Err(e) => error(
                502,
                -1,
                &format!("quota/get for account {}: {e}", account.name),
            ),
        }
    }

    /// `POST /quota/clear?account=NAME`: `clear_quota/v2` with the appid and
    /// secret, refused here once the month's resets are used up.
    pub(super) async fn quota_clear(&self, query: &str) -> Response<Vec<u8>> {
        let account = match self.named_account(query) {
            Ok(a) => a,
            Err(r) => return *r,
        };
        if account.kind == AccountKind::WeCom {
            return error(
                400,
                40013,
                &format!(
                    "account {} is a WeCom app: WeCom has no quota reset",
                    account.name
                ),
            );
        }
        let month = wechat_month(SystemTime::now());
        let key = self
            .app
            .store
            .as_ref()
            .map(|s| s.key(&format!("quota_clears:{}:{month}", account.id)));
        let used = match (&self.app.store, &key) {
            (Some(store), Some(key)) => match store.count(key).await {
                Ok(n) => n,
                Err(e) => {
                    return error(
                        503,
                        -1,
                        &format!("the month's quota resets cannot be counted: token store {e}; try again when it is back"),
                    )
                }
            },
            _ => self.clears.get(&account.id, month),
        };
        if used >= CLEARS_PER_MONTH {
            return error(
                429,
                48006,
                &format!(
                    "forbid to clear quota because of reaching the limit: account {} used its {CLEARS_PER_MONTH} resets this month ({used} counted)",
                    account.name
                ),
            );
        }
        let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let target = format!(
            "/cgi-bin/clear_quota/v2?appid={}&appsecret={}",
            enc(&account.id),
            enc(account.secret.read().expose())
        );
        self.calls.clear_quota.fetch_add(1, Ordering::Relaxed);
        let v = match self.call_wechat(&account, &target, b"", false).await {
            Ok(v) => v,
            Err(e) => {
                // The error never quotes the query (it holds the secret).
                return error(
                    502,
                    -1,
                    &format!("clear_quota/v2 for account {}: {e}", account.name),
                );
            }
        };
        let errcode = v.get("errcode").and_then(Value::as_i64).unwrap_or(-1);
        let counted = match errcode {
            0 => Some(used + 1),
            // WeChat's own count says the month is used up (the console's
            // resets count too): remember it.
            48006 => Some(CLEARS_PER_MONTH),
            _ => None,
        };
        let mut clears_this_month = used;
        if let Some(n) = counted {
            clears_this_month = n;
            match (&self.app.store, &key) {
                (Some(store), Some(key)) => {
                    let stored = if errcode == 0 {
                        store.bump(key, DEFAULT_KEEP_CLEARS).await
                    } else {
                        store
                            .set_count(key, n, DEFAULT_KEEP_CLEARS)
                            .await
                            .map(|_| n)
                    };
                    match stored {
                        Ok(n) => clears_this_month = n,
                        Err(e) => {
                            tracing::error!(account = %account.name, error = %e, "quota reset done but not counted in the store")
                        }
                    }
                }
                _ => self.clears.set(&account.id, month, n),
            }
        }
        if errcode == 0 {
            tracing::warn!(account = %account.name, clears_this_month, "API quotas reset (clear_quota/v2) on the admin listener");
        }
        let mut out = v;
        out["account"] = json!(account.name);
        out["clears_this_month"] = json!(clears_this_month);
        out["clears_left"] = json!(CLEARS_PER_MONTH.saturating_sub(clears_this_month));
        ok(out)
    }

    /// `GET /rid?account=NAME&rid=RID`: WeChat's record of a failed call,
    /// by the `rid` in its errmsg (kept for 7 days).
    pub(super) async fn rid(&self, query: &str) -> Response<Vec<u8>> {
        let account = match self.named_account(query) {
            Ok(a) => a,
            Err(r) => return *r,
        };
        let Some(rid) = crate::query::param(query, "rid")
            .filter(|r| !r.trim().is_empty() && r.trim().len() <= DEFAULT_MAX_RID)
        else {
            return error(
                400,
                40035,
                "pass rid=…, the rid at the end of WeChat's errmsg (at most 128 characters)",
            );
        };
        let body = json!({ "rid": rid.trim() }).to_string();
        let call = async {
            self.calls.rid_get.fetch_add(1, Ordering::Relaxed);
            self.call_wechat(&account, "/cgi-bin/openapi/rid/get", body.as_bytes(), true)
                .await
        };
        let key = (account.id.to_string(), format!("rid {}", rid.trim()));
        let Ok((answer, age)) = self.lookups.get(key, call).await else {
            return too_many();
        };
        match answer {
            Ok(mut v) => {
                v["account"] = json!(account.name);
                ok_aged(v, age)
            }
            Err(e) => error(
                502,
                -1,
                &format!("rid/get for account {}: {e}", account.name),
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_are_wechats() {
        // 2026-11-30 16:30 UTC is 2026-12-01 00:30 in Beijing.
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_056_200);
        assert_eq!(wechat_month(t), 202612);
        let c = LocalClears::default();
        c.set("wx1", 202612, 3);
        assert_eq!(c.get("wx1", 202612), 3);
        assert_eq!(c.get("wx1", 202701), 0, "a new month starts at 0");
    }
}
