//! Fetching a token from WeChat: `GET /cgi-bin/token` (classic),
//! `POST /cgi-bin/stable_token` (stable, `force_refresh: false`), or WeCom's
//! `GET /cgi-bin/gettoken`.
//!
//! The secret goes into the request and nowhere else: errors carry the
//! account's name and appid, WeChat's errcode and errmsg, never the URL.

use std::time::Duration;

use pingora::http::RequestHeader;
use serde::Deserialize;

use crate::account::Account;
use crate::config::{AccountKind, TokenApi};
use crate::failover::Upstreams;
use crate::lease::refresher::{Failure, Fetched};
use crate::upstream::UpstreamError;

/// A token answer is a few hundred bytes; anything far larger is not one.
const DEFAULT_ANSWER_LIMIT: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0}")]
    Upstream(#[from] UpstreamError),
    #[error("WeChat answered errcode {errcode}: {errmsg}")]
    WeChat { errcode: i64, errmsg: String },
    #[error("WeChat's answer is not a token or ticket: {0}")]
    BadAnswer(String),
    /// A ticket fetch found no token to use.
    #[error("{0}")]
    NoToken(String),
}

impl FetchError {
    /// The errcode shown in `/status`: WeChat's, or -1 for our own failures.
    pub fn errcode(&self) -> i64 {
        match self {
            FetchError::WeChat { errcode, .. } => *errcode,
            _ => -1,
        }
    }

    /// Errors that retrying soon will not fix: wrong secret, bad appid, IP
    /// not whitelisted (40164, WeCom 60020, platforms 61004), frozen secret,
    /// IP risk check, daily quota spent.
    pub fn is_hard(&self) -> bool {
        matches!(
            self,
            FetchError::WeChat {
                errcode: 40001
                    | 40002
                    | 40013
                    | 40125
                    | 40164
                    | 40243
                    | 41002
                    | 41004
                    | 45009
                    | 60020
                    | 61004
                    | 89501
                    | 89503
                    | 89506
                    | 89507,
                ..
            }
        )
    }
}

impl Failure for FetchError {
    fn errcode(&self) -> i64 {
        FetchError::errcode(self)
    }

    fn is_hard(&self) -> bool {
        FetchError::is_hard(self)
    }

    fn answered(&self) -> bool {
        matches!(self, FetchError::WeChat { .. })
    }
}

/// A token answer, or a ticket answer (`ticket` in place of `access_token`).
#[derive(Deserialize)]
struct Answer {
    #[serde(alias = "ticket")]
    access_token: Option<String>,
    expires_in: Option<u64>,
    errcode: Option<i64>,
    errmsg: Option<String>,
}

/// Fetches a token for `account` through the shared pool. `force` asks a
/// stable token endpoint for a new token (`force_refresh: true`).
pub async fn fetch(
    upstream: &Upstreams,
    account: &Account,
    force: bool,
) -> Result<Fetched, FetchError> {
    let (req, body) = build_request(account, force);
    exchange(upstream, &req, &body).await
}

/// Sends a token or ticket request and reads WeChat's answer; the lifetime
/// is counted from when the request was sent.
pub(crate) async fn exchange(
    upstream: &Upstreams,
    req: &RequestHeader,
    body: &[u8],
) -> Result<Fetched, FetchError> {
    let sent = tokio::time::Instant::now();
    let (status, answer) = upstream.round_trip(req, body, DEFAULT_ANSWER_LIMIT).await?;
    let answer = answer.map_err(|_| {
        FetchError::BadAnswer(format!(
            "HTTP {status}, body over {DEFAULT_ANSWER_LIMIT} bytes"
        ))
    })?;
    parse_answer(status, &answer).map(|f| f.counted_from(sent))
}

/// `POST /cgi-bin/stable_token`'s body, written straight from borrowed
/// fields (a `json!` value cost a tenth of a start's CPU with 10,000
/// accounts).
#[derive(serde::Serialize)]
struct StableTokenRequest<'a> {
    grant_type: &'static str,
    appid: &'a str,
    secret: &'a str,
    force_refresh: bool,
}

fn build_request(account: &Account, force: bool) -> (RequestHeader, Vec<u8>) {
    let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    // Read at each fetch: a reload may have changed it.
    let secret = account.secret.read();
    let (mut req, body) = match (account.kind, account.token_api) {
        (AccountKind::WeCom, _) => {
            let path = format!(
                "/cgi-bin/gettoken?corpid={}&corpsecret={}",
                enc(&account.id),
                enc(secret.expose())
            );
            let req = RequestHeader::build("GET", path.as_bytes(), None).expect("valid path");
            (req, Vec::new())
        }
        (_, TokenApi::Classic) => {
            let path = format!(
                "/cgi-bin/token?grant_type=client_credential&appid={}&secret={}",
                enc(&account.id),
                enc(secret.expose())
            );
            let req = RequestHeader::build("GET", path.as_bytes(), None).expect("valid path");
            (req, Vec::new())
        }
        (_, TokenApi::Stable) => {
            let body = serde_json::to_vec(&StableTokenRequest {
                grant_type: "client_credential",
                appid: &account.id,
                secret: secret.expose(),
                force_refresh: force,
            })
            .expect("strings serialise");
            let mut req =
                RequestHeader::build("POST", b"/cgi-bin/stable_token", None).expect("valid path");
            req.insert_header("Content-Type", "application/json")
                .expect("valid header");
            req.insert_header("Content-Length", body.len().to_string())
                .expect("valid header");
            (req, body)
        }
    };
    req.insert_header(
        "User-Agent",
        concat!("wxsidecar/", env!("CARGO_PKG_VERSION")),
    )
    .expect("valid header");
    (req, body)
}

fn parse_answer(status: u16, body: &[u8]) -> Result<Fetched, FetchError> {
    let a: Answer = serde_json::from_slice(body)
        .map_err(|e| FetchError::BadAnswer(format!("HTTP {status}, not JSON ({e})")))?;
    match (a.access_token, a.errcode) {
        (Some(value), None | Some(0)) if !value.is_empty() => {
            // 0 is legal: a stable token in its last second (WeChat rounds down).
            let secs = a
                .expires_in
                .ok_or_else(|| FetchError::BadAnswer("expires_in missing".into()))?;
            Ok(Fetched {
                value,
                expires_in: Duration::from_secs(secs),
            })
        }
        (_, Some(errcode)) if errcode != 0 => Err(FetchError::WeChat {
            errcode,
            errmsg: a.errmsg.unwrap_or_default().chars().take(200).collect(),
        }),
        _ => Err(FetchError::BadAnswer(format!(
            "HTTP {status}, neither a token, a ticket nor an errcode"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers() {
        let ok = parse_answer(200, br#"{"access_token":"T","expires_in":7200}"#).unwrap();
        assert_eq!((ok.value.as_str(), ok.expires_in.as_secs()), ("T", 7200));
        let e =
            parse_answer(200, br#"{"errcode":40125,"errmsg":"invalid appsecret"}"#).unwrap_err();
        assert_eq!(e.errcode(), 40125);
        assert!(e.is_hard());
        let e = parse_answer(200, br#"{"errcode":-1,"errmsg":"system error"}"#).unwrap_err();
        assert!(!e.is_hard());
        assert!(matches!(
            parse_answer(502, b"<html>"),
            Err(FetchError::BadAnswer(_))
        ));
        assert!(matches!(
            parse_answer(200, br#"{"access_token":"T"}"#),
            Err(FetchError::BadAnswer(_))
        ));
        let t = parse_answer(
            200,
            br#"{"errcode":0,"errmsg":"ok","ticket":"K","expires_in":7200}"#,
        )
        .unwrap();
        assert_eq!(t.value, "K");
    }
}
