//! The fake's quota book, as WeChat keeps one: calls per account and API
//! path today against a daily limit (45009 past it), `quota/get`,
//! `clear_quota` / `clear_quota/v2` (ten resets a month, 48006 past them),
//! and the `rid` in every failed call's errmsg that `rid/get` looks up.

use std::collections::{HashMap, VecDeque};
use std::time::{SystemTime, UNIX_EPOCH};

/// WeChat's default daily limit of most APIs for a verified account.
pub const DEFAULT_DAILY_LIMIT: u64 = 100_000;
/// Resets allowed a month.
pub const CLEARS_PER_MONTH: u32 = 10;
/// Failed calls remembered for `rid/get`.
const RIDS_KEPT: usize = 1024;

pub struct Quotas {
    /// (appid, path) → calls since the last reset.
    used: HashMap<(String, String), u64>,
    pub daily_limit: u64,
    /// appid → resets this month.
    pub clears: HashMap<String, u32>,
    rids: VecDeque<Rid>,
    next: u64,
}

struct Rid {
    rid: String,
    appid: Option<String>,
    path: String,
    errcode: i64,
    errmsg: String,
    at: u64,
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            used: HashMap::new(),
            daily_limit: DEFAULT_DAILY_LIMIT,
            clears: HashMap::new(),
            rids: VecDeque::new(),
            next: 0,
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Quotas {
    /// Counts a call with a valid token; `false` when the path's daily
    /// quota is spent (WeChat answers 45009 and does not count it).
    pub fn count(&mut self, appid: &str, path: &str) -> bool {
        let n = self
            .used
            .entry((appid.to_string(), path.to_string()))
            .or_default();
        if *n >= self.daily_limit {
            return false;
        }
        *n += 1;
        true
    }

    /// `quota/get`'s `quota` object for one path.
    pub fn get(&self, appid: &str, path: &str) -> serde_json::Value {
        let used = self
            .used
            .get(&(appid.to_string(), path.to_string()))
            .copied()
            .unwrap_or(0);
        serde_json::json!({
            "daily_limit": self.daily_limit,
            "used": used,
            "remain": self.daily_limit.saturating_sub(used),
        })
    }

    /// A reset: every path's count of `appid` back to 0, or 48006.
    pub fn clear(&mut self, appid: &str) -> Result<(), (i64, &'static str)> {
        let n = self.clears.entry(appid.to_string()).or_default();
        if *n >= CLEARS_PER_MONTH {
            return Err((48006, "forbid to clear quota because of reaching the limit"));
        }
        *n += 1;
        self.used.retain(|(a, _), _| a != appid);
        Ok(())
    }

    /// Records a failed call and returns its errmsg with ` rid: …` added.
    pub fn failed(
        &mut self,
        appid: Option<&str>,
        path: &str,
        errcode: i64,
        errmsg: &str,
    ) -> String {
        self.next += 1;
        let rid = format!(
            "{:08x}-{:08x}-{:08x}",
            unix_now() as u32,
            rand::random::<u32>(),
            self.next as u32
        );
        if self.rids.len() >= RIDS_KEPT {
            self.rids.pop_front();
        }
        self.rids.push_back(Rid {
            rid: rid.clone(),
            appid: appid.map(str::to_string),
            path: path.to_string(),
            errcode,
            errmsg: errmsg.to_string(),
            at: unix_now(),
        });
        format!("{errmsg} rid: {rid}")
    }

    /// `rid/get`'s `request` object, when the rid is one of `appid`'s.
    pub fn lookup(&self, appid: &str, rid: &str) -> Option<serde_json::Value> {
        let r = self
            .rids
            .iter()
            .find(|r| r.rid == rid && r.appid.as_deref().is_none_or(|a| a == appid))?;
        Some(serde_json::json!({
            "invoke_time": r.at,
            "cost_in_ms": 1,
            "request_url": format!("{}?access_token=ACCESS_TOKEN", r.path),
            "request_body": "",
            "response_body": serde_json::json!({ "errcode": r.errcode, "errmsg": r.errmsg }).to_string(),
            "client_ip": "127.0.0.1",
        }))
    }
}
