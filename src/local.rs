//! Local answers for WeChat's token endpoints: an app (or its SDK) that asks
//! for a token with the right appid and secret gets the sidecar's cached
//! token, with the seconds it really has left. Nothing reaches WeChat, so
//! apps can no longer invalidate each other's classic tokens or spend quota.
//!
//! Errors mirror WeChat's codes for the same mistakes; the secret the app
//! sent is compared in constant time and never echoed or logged.

use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;

use crate::account::Account;
use crate::account::Accounts;
use crate::lease::Lease;
use crate::query;
use crate::refusal::Refusal;

/// `force_refresh: true` from an app refreshes only a token at least this
/// old: WeChat's own spacing for forced refreshes.
pub const FORCE_REFRESH_MIN_AGE: std::time::Duration = std::time::Duration::from_secs(30);

/// The credentials an app presents to a token endpoint.
#[derive(Default, Deserialize)]
pub struct Credentials {
    pub grant_type: Option<String>,
    pub appid: Option<String>,
    pub secret: Option<String>,
    /// Never forwarded to WeChat: becomes a compare-and-refresh report.
    pub force_refresh: Option<bool>,
}

impl Credentials {
    pub fn from_query(q: &str) -> Self {
        let get = |k: &str| query::param(q, k).map(|v| v.into_owned());
        Credentials {
            grant_type: get("grant_type"),
            appid: get("appid"),
            secret: get("secret"),
            force_refresh: None,
        }
    }
}

/// Checks credentials the way WeChat does and finds the account.
pub fn authenticate<'a>(
    accounts: &'a Accounts,
    c: &Credentials,
) -> Result<&'a Arc<Account>, Refusal> {
    let appid = c
        .appid
        .as_deref()
        .filter(|s| !s.is_empty())
        .ok_or(Refusal {
            errcode: 41002,
            errmsg: "appid missing",
        })?;
    let account = accounts.by_appid(appid).ok_or(Refusal {
        errcode: 40013,
        errmsg: "invalid appid",
    })?;
    let secret = c
        .secret
        .as_deref()
        .filter(|s| !s.is_empty())
        .ok_or(Refusal {
            errcode: 41004,
            errmsg: "appsecret missing",
        })?;
    if !account.secret.read().matches(secret) {
        return Err(Refusal {
            errcode: 40125,
            errmsg: "invalid appsecret",
        });
    }
    if c.grant_type.as_deref() != Some("client_credential") {
        return Err(Refusal {
            errcode: 40002,
            errmsg: "invalid grant_type",
        });
    }
    Ok(account)
}

/// Checks a WeCom `gettoken` request (corpid + corpsecret) like WeCom does
/// and finds the account: one per app secret in the corp.
pub fn authenticate_wecom<'a>(
    accounts: &'a Accounts,
    query: &str,
) -> Result<&'a Arc<Account>, Refusal> {
    let corpid = query::param(query, "corpid")
        .filter(|s| !s.is_empty())
        .ok_or(Refusal {
            errcode: 41002,
            errmsg: "corpid missing",
        })?;
    let accounts = accounts.by_corpid(&corpid);
    if accounts.is_empty() {
        return Err(Refusal {
            errcode: 40013,
            errmsg: "invalid corpid",
        });
    }
    let secret = query::param(query, "corpsecret")
        .filter(|s| !s.is_empty())
        .ok_or(Refusal {
            errcode: 41004,
            errmsg: "corpsecret missing",
        })?;
    // Check every candidate, so the time does not tell which one matched.
    let matched = accounts.into_iter().fold(None, |found, a| {
        if a.secret.read().matches(&secret) {
            Some(a)
        } else {
            found
        }
    });
    matched.ok_or(Refusal {
        errcode: 40001,
        errmsg: "invalid secret",
    })
}

/// The answer WeChat would give, from the cache: `expires_in` is the time the
/// token really has left, rounded down. WeCom's shape adds `errcode: 0`.
pub fn token_answer(token: &Lease, wecom: bool) -> Bytes {
    let secs = token.remaining().as_secs();
    let v = if wecom {
        serde_json::json!({ "errcode": 0, "errmsg": "ok", "access_token": &*token.value, "expires_in": secs })
    } else {
        serde_json::json!({ "access_token": &*token.value, "expires_in": secs })
    };
    Bytes::from(v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_credentials() {
        let c = Credentials::from_query("grant_type=client_credential&appid=wx1&secret=a%26b");
        assert_eq!(c.appid.as_deref(), Some("wx1"));
        assert_eq!(c.secret.as_deref(), Some("a&b"));
        let c: Credentials = serde_json::from_str(
            r#"{"grant_type":"client_credential","appid":"wx1","secret":"s","force_refresh":true}"#,
        )
        .unwrap();
        assert_eq!(c.force_refresh, Some(true));
    }
}
