//! The fake's memory: apps, the tokens it issued with WeChat's validity rules,
//! uploaded media, recorded messages and the counters `/__fake/stats` shows.
//!
//! Rules reproduced (see docs/fake-wechat.md): a classic fetch issues a
//! new token and leaves the previous valid for an overlap of
//! min(300 s, ttl/4); a stable fetch returns the same token until the last
//! min(300 s, ttl/4) of its life, then a new one, the old staying valid until
//! it expires; an expired token answers 42001, a superseded or revoked one
//! 40001.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use rand::distributions::Alphanumeric;
use rand::Rng;
use serde::Serialize;

/// Recent requests kept for `/__fake/requests`.
const REQUEST_LOG: usize = 256;

#[derive(Debug)]
struct TokenRec {
    appid: String,
    /// The appid, or `corpid/appN` for a WeCom app's token.
    owner: String,
    stable: bool,
    /// WeCom tokens say 40014 when invalid, as WeCom does.
    wecom: bool,
    expires_at: Instant,
    /// Earlier than `expires_at` once superseded or revoked.
    valid_until: Instant,
}

#[derive(Default)]
struct AppRec {
    secret: String,
    /// A WeCom app's name in stats: `app1`, `app2`, … in the order given.
    label: String,
    classic: Option<String>,
    stable: Option<String>,
    classic_fetches: u64,
    stable_fetches: u64,
}

pub struct Media {
    pub bytes: Bytes,
    pub filename: String,
    pub content_type: String,
}

/// One request as the fake saw it (secrets masked).
#[derive(Serialize, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: String,
    pub access_token: Option<String>,
    pub host: Option<String>,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub protocol: String,
    pub body_len: usize,
    /// The body when it is small UTF-8 text, for byte-exact checks.
    pub body: Option<String>,
    pub headers: Vec<(String, String)>,
}

#[derive(Default)]
pub struct State {
    apps: HashMap<String, AppRec>,
    /// WeCom apps by (corpid, secret): one token per app secret.
    wecom: HashMap<(String, String), AppRec>,
    tokens: HashMap<String, TokenRec>,
    pub media: HashMap<String, Media>,
    pub messages: u64,
    pub api_calls: u64,
    pub invalid_token_calls: u64,
    pub media_uploads: u64,
    pub duplicate_messages: u64,
    pub client_msg_ids: std::collections::HashSet<String>,
    pub requests: VecDeque<Seen>,
    ttl: Duration,
    pub tickets: super::tickets::Tickets,
    pub quotas: super::quota::Quotas,
    /// The third-party platform, with `--platform`.
    pub platform: Option<super::platform::Platform>,
}

/// Why a token was refused, as WeChat says it.
#[derive(Debug)]
pub struct Refused {
    pub errcode: i64,
    pub errmsg: &'static str,
}

impl State {
    pub fn with_wecom(mut self, apps: &[(String, String)]) -> Self {
        for (i, (corpid, secret)) in apps.iter().enumerate() {
            self.wecom.insert(
                (corpid.clone(), secret.clone()),
                AppRec {
                    label: format!("app{}", i + 1),
                    ..AppRec::default()
                },
            );
        }
        self
    }

    /// Ticket lifetime and quota override.
    pub fn with_tickets(mut self, ttl: Duration, quota: Option<u32>) -> Self {
        self.tickets = super::tickets::Tickets::new(ttl, quota);
        self
    }

    /// The owner of a valid token: its appid (or corpid) and its owner key.
    pub fn token_owner(&self, token: &str) -> Option<(String, String)> {
        self.tokens
            .get(token)
            .map(|r| (r.appid.clone(), r.owner.clone()))
    }

    /// `GET /cgi-bin/gettoken`: the same token until its last `overlap`.
    pub fn wecom_fetch(&mut self, corpid: &str, secret: &str) -> Result<(String, u64), Refused> {
        if !self.wecom.keys().any(|(c, _)| c == corpid) {
            return Err(Refused {
                errcode: 40013,
                errmsg: "invalid corpid",
            });
        }
        let key = (corpid.to_string(), secret.to_string());
        let Some(app) = self.wecom.get(&key) else {
            return Err(Refused {
                errcode: 40001,
                errmsg: "invalid secret",
            });
        };
        let now = Instant::now();
        let overlap = self.overlap();
        let current = app.classic.clone().filter(|v| {
            self.tokens
                .get(v)
                .is_some_and(|r| r.valid_until > now && r.expires_at > now + overlap)
        });
        let value = match current {
            Some(v) => v,
            None => {
                let owner = format!("{corpid}/{}", app.label);
                let v = self.new_token(corpid, false);
                if let Some(r) = self.tokens.get_mut(&v) {
                    r.wecom = true;
                    r.owner = owner;
                }
                v
            }
        };
        let app = self.wecom.get_mut(&key).expect("checked above");
        app.classic = Some(value.clone());
        app.classic_fetches += 1;
        let rec = &self.tokens[&value];
        Ok((
            value,
            rec.expires_at.saturating_duration_since(now).as_secs(),
        ))
    }

    pub fn new(apps: &[(String, String)], ttl: Duration) -> Self {
        let mut s = State {
            ttl,
            ..State::default()
        };
        for (appid, secret) in apps {
            s.apps.insert(
                appid.clone(),
                AppRec {
                    secret: secret.clone(),
                    ..AppRec::default()
                },
            );
        }
        s
    }

    fn overlap(&self) -> Duration {
        Duration::from_secs(300).min(self.ttl / 4)
    }

    /// A new token owned by `appid` (a component or authorizer token), valid
    /// for the fake's token lifetime; the lifetime in seconds.
    pub fn issue(&mut self, appid: &str) -> (String, u64) {
        (self.new_token(appid, false), self.ttl.as_secs())
    }

    fn new_token(&mut self, appid: &str, stable: bool) -> String {
        let value: String = rand::thread_rng()
            .sample_iter(&Alphanumeric)
            .take(96)
            .map(char::from)
            .collect();
        let now = Instant::now();
        self.tokens.insert(
            value.clone(),
            TokenRec {
                appid: appid.to_string(),
                owner: appid.to_string(),
                stable,
                wecom: false,
                expires_at: now + self.ttl,
                valid_until: now + self.ttl,
            },
        );
        value
    }

    /// Resets an app's secret, as the console's "reset AppSecret" does:
    /// the old one stops working; tokens already issued stay valid.
    pub fn set_secret(&mut self, appid: &str, secret: &str) -> bool {
        match self.apps.get_mut(appid) {
            Some(a) => {
                a.secret = secret.to_string();
                true
            }
            None => false,
        }
    }

    /// Checks appid and secret like WeChat's token endpoints.
    pub fn authenticate(&self, appid: &str, secret: &str) -> Result<(), Refused> {
        match self.apps.get(appid) {
            None => Err(Refused {
                errcode: 40013,
                errmsg: "invalid appid",
            }),
            Some(a) if a.secret != secret => Err(Refused {
                errcode: 40125,
                errmsg: "invalid appsecret",
            }),
            Some(_) => Ok(()),
        }
    }

    /// `GET /cgi-bin/token`: always a new token; the previous one gets the overlap.
    pub fn classic_fetch(&mut self, appid: &str) -> (String, u64) {
        let now = Instant::now();
        let overlap = self.overlap();
        let old = self.apps.get_mut(appid).and_then(|a| a.classic.take());
        if let Some(rec) = old.and_then(|v| self.tokens.get_mut(&v)) {
            rec.valid_until = rec.valid_until.min(now + overlap);
        }
        let value = self.new_token(appid, false);
        let app = self.apps.get_mut(appid).expect("authenticated app");
        app.classic = Some(value.clone());
        app.classic_fetches += 1;
        (value, self.ttl.as_secs())
    }

    /// `POST /cgi-bin/stable_token`: the same token with its remaining life,
    /// a new one in the last `overlap` of its life or when forced.
    pub fn stable_fetch(&mut self, appid: &str, force: bool) -> (String, u64) {
        let now = Instant::now();
        let overlap = self.overlap();
        let current = self
            .apps
            .get(appid)
            .and_then(|a| a.stable.clone())
            .filter(|v| {
                self.tokens
                    .get(v)
                    .is_some_and(|r| r.valid_until > now && r.expires_at > now + overlap)
            });
        let value = match (current, force) {
            (Some(v), false) => v,
            (old, _) => {
                if let Some(rec) = old.and_then(|v| self.tokens.get_mut(&v)) {
                    // Forced: the old one keeps the overlap, like a classic fetch.
                    rec.valid_until = rec.valid_until.min(now + overlap);
                }
                self.new_token(appid, true)
            }
        };
        let app = self.apps.get_mut(appid).expect("authenticated app");
        app.stable = Some(value.clone());
        app.stable_fetches += 1;
        let rec = &self.tokens[&value];
        (
            value,
            rec.expires_at.saturating_duration_since(now).as_secs(),
        )
    }

    /// Checks a token an API call carries; returns its appid.
    pub fn check_token(&mut self, token: Option<&str>) -> Result<String, Refused> {
        let now = Instant::now();
        let verdict = match token.filter(|t| !t.is_empty()) {
            None => Err(Refused {
                errcode: 41001,
                errmsg: "access_token missing",
            }),
            Some(t) => match self.tokens.get(t) {
                None => Err(Refused {
                    errcode: 40001,
                    errmsg: "invalid credential, access_token is invalid or not latest",
                }),
                Some(r) if r.valid_until <= now && r.valid_until < r.expires_at && r.wecom => {
                    Err(Refused {
                        errcode: 40014,
                        errmsg: "invalid access_token",
                    })
                }
                Some(r) if r.valid_until <= now && r.valid_until < r.expires_at => Err(Refused {
                    errcode: 40001,
                    errmsg: "invalid credential, access_token is invalid or not latest",
                }),
                Some(r) if r.expires_at <= now => Err(Refused {
                    errcode: 42001,
                    errmsg: "access_token expired",
                }),
                Some(r) => Ok(r.appid.clone()),
            },
        };
        if verdict.is_err() {
            self.invalid_token_calls += 1;
        }
        verdict
    }

    /// `POST /__fake/invalidate?appid=A`: an outsider refreshed; every token
    /// of A stops working now.
    pub fn invalidate(&mut self, appid: &str) -> usize {
        let now = Instant::now();
        let mut n = 0;
        for rec in self.tokens.values_mut().filter(|r| r.appid == appid) {
            if rec.valid_until > now {
                rec.valid_until = now;
                n += 1;
            }
        }
        if let Some(a) = self.apps.get_mut(appid) {
            a.classic = None;
            a.stable = None;
        }
        for ((corpid, _), a) in self.wecom.iter_mut() {
            if corpid == appid {
                a.classic = None;
            }
        }
        n
    }

    pub fn record(&mut self, seen: Seen) {
        if self.requests.len() == REQUEST_LOG {
            self.requests.pop_front();
        }
        self.requests.push_back(seen);
    }

    pub fn stats(&self, tls_handshakes: u64, connections: u64) -> serde_json::Value {
        let per_app = |f: fn(&AppRec) -> u64| -> BTreeMap<&str, u64> {
            self.apps.iter().map(|(k, a)| (k.as_str(), f(a))).collect()
        };
        let live_stable = self.tokens.values().filter(|r| r.stable).count();
        let mut wecom: BTreeMap<&str, u64> = BTreeMap::new();
        for ((corpid, _), a) in &self.wecom {
            *wecom.entry(corpid.as_str()).or_default() += a.classic_fetches;
        }
        serde_json::json!({
            "token_fetches": per_app(|a| a.classic_fetches),
            "stable_token_fetches": per_app(|a| a.stable_fetches),
            "wecom_token_fetches": wecom,
            "api_calls": self.api_calls,
            "messages": self.messages,
            "invalid_token_calls": self.invalid_token_calls,
            "media_uploads": self.media_uploads,
            "duplicate_messages": self.duplicate_messages,
            "tls_handshakes": tls_handshakes,
            "connections": connections,
            "tokens_issued": self.tokens.len(),
            "stable_tokens_issued": live_stable,
            "ticket_fetches": self.tickets.fetches,
            "quota_clears": self.quotas.clears,
            "platform": self.platform.as_ref().map(|p| p.stats()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(ttl: u64) -> State {
        State::new(&[("wx1".into(), "s".into())], Duration::from_secs(ttl))
    }

    #[test]
    fn classic_fetch_supersedes_with_overlap() {
        let mut s = state(7200);
        let (a, _) = s.classic_fetch("wx1");
        let (b, _) = s.classic_fetch("wx1");
        assert_ne!(a, b);
        assert!(
            s.check_token(Some(&a)).is_ok(),
            "old token keeps its overlap"
        );
        assert!(s.check_token(Some(&b)).is_ok());
        s.invalidate("wx1");
        assert_eq!(s.check_token(Some(&b)).unwrap_err().errcode, 40001);
        assert_eq!(s.check_token(None).unwrap_err().errcode, 41001);
        assert_eq!(s.check_token(Some("nope")).unwrap_err().errcode, 40001);
    }

    #[test]
    fn stable_fetch_returns_the_same_token() {
        let mut s = state(7200);
        let (a, ea) = s.stable_fetch("wx1", false);
        let (b, eb) = s.stable_fetch("wx1", false);
        assert_eq!(a, b);
        assert!(ea >= eb && ea <= 7200);
        let (c, _) = s.stable_fetch("wx1", true);
        assert_ne!(a, c);
    }

    #[test]
    fn expired_token_answers_42001() {
        let mut s = state(0);
        let (a, _) = s.classic_fetch("wx1");
        assert_eq!(s.check_token(Some(&a)).unwrap_err().errcode, 42001);
    }

    #[test]
    fn wecom_tokens() {
        let mut s = state(7200).with_wecom(&[
            ("ww1".into(), "app-a".into()),
            ("ww1".into(), "app-b".into()),
        ]);
        let (a, _) = s.wecom_fetch("ww1", "app-a").unwrap();
        let (a2, _) = s.wecom_fetch("ww1", "app-a").unwrap();
        let (b, _) = s.wecom_fetch("ww1", "app-b").unwrap();
        assert_eq!(a, a2, "same token while valid");
        assert_ne!(a, b, "one token per app secret");
        assert_eq!(s.wecom_fetch("ww2", "x").unwrap_err().errcode, 40013);
        assert_eq!(s.wecom_fetch("ww1", "x").unwrap_err().errcode, 40001);
        s.invalidate("ww1");
        assert_eq!(s.check_token(Some(&a)).unwrap_err().errcode, 40014);
    }

    #[test]
    fn authentication_codes() {
        let s = state(10);
        assert_eq!(s.authenticate("wx2", "s").unwrap_err().errcode, 40013);
        assert_eq!(s.authenticate("wx1", "x").unwrap_err().errcode, 40125);
        assert!(s.authenticate("wx1", "s").is_ok());
    }
}
