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

/// Keys whose values a token or ticket request sends in the open: ids and
/// kinds. Every other value (a secret, a token, a ticket, a refresh token)
/// is masked in an errmsg that echoes it.
const PUBLIC_KEYS: &[&str] = &[
    "grant_type",
    "appid",
    "corpid",
    "component_appid",
    "authorizer_appid",
    "type",
    "force_refresh",
];

/// The longest errmsg kept (logs, `/status`, a ticket's error answer).
const DEFAULT_ERRMSG_LIMIT: usize = 200;

impl FetchError {
    /// WeChat's refusal, its errmsg cleaned: every non-public value the
    /// request sent (`query`, a JSON `body`) is masked, as sent and as
    /// decoded, before it is cut to length (so no cut leaves a secret's
    /// first part). The errmsg is the server's text, and it goes to logs,
    /// `/status` and, for a ticket, the app's error answer: an upstream that
    /// echoed what it was sent must not carry our secret or token there.
    pub(crate) fn wechat(errcode: i64, errmsg: &str, query: Option<&str>, body: &[u8]) -> Self {
        let mut sent: Vec<String> = Vec::new();
        for pair in query.unwrap_or("").split('&') {
            let (Some((_, raw)), Some((key, value))) = (
                pair.split_once('='),
                url::form_urlencoded::parse(pair.as_bytes()).next(),
            ) else {
                continue;
            };
            if !PUBLIC_KEYS.contains(&key.as_ref()) {
                sent.push(raw.to_string());
                sent.push(value.into_owned());
            }
        }
        if let Ok(serde_json::Value::Object(fields)) = serde_json::from_slice(body) {
            sent.extend(fields.into_iter().filter_map(|(k, v)| match v {
                serde_json::Value::String(v) if !PUBLIC_KEYS.contains(&k.as_str()) => Some(v),
                _ => None,
            }));
        }
        // Longest first: a value that contains another is masked whole.
        sent.sort_by_key(|v| std::cmp::Reverse(v.len()));
        let mut errmsg = errmsg.to_string();
        for v in sent.iter().filter(|v| !v.is_empty()) {
            if errmsg.contains(v.as_str()) {
                errmsg = errmsg.replace(v.as_str(), "***");
            }
        }
        FetchError::WeChat {
            errcode,
            errmsg: errmsg.chars().take(DEFAULT_ERRMSG_LIMIT).collect(),
        }
    }

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
    parse_answer(status, &answer)
        .map(|f| f.counted_from(sent))
        .map_err(|e| match e {
            FetchError::WeChat { errcode, errmsg } => {
                FetchError::wechat(errcode, &errmsg, req.uri.query(), body)
            }
            e => e,
        })
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
        // Whole here: `exchange` masks what was sent, then cuts it.
        (_, Some(errcode)) if errcode != 0 => Err(FetchError::WeChat {
            errcode,
            errmsg: a.errmsg.unwrap_or_default(),
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

    #[test]
    fn an_errmsg_echoing_what_was_sent_is_masked() {
        let secret = "s3cr3t/value+";
        let query =
            "grant_type=client_credential&appid=wx1&secret=s3cr3t%2Fvalue%2B&access_token=TOKEN123";
        let body = br#"{"appid":"wx1","component_appsecret":"CSECRET","authorizer_refresh_token":"refresh@1","force_refresh":false}"#;
        let echo = format!(
            "bad: {query} {} decoded {secret} body {}",
            "x".repeat(150),
            String::from_utf8_lossy(body)
        );
        let e = FetchError::wechat(40125, &echo, Some(query), body);
        let FetchError::WeChat { errmsg, errcode } = e else {
            panic!()
        };
        assert_eq!(errcode, 40125);
        for sent in ["s3cr3t", "TOKEN123", "CSECRET", "refresh@1"] {
            assert!(!errmsg.contains(sent), "{sent} in {errmsg}");
        }
        assert!(errmsg.contains("appid=wx1"), "ids stay: {errmsg}");
        assert!(errmsg.chars().count() <= DEFAULT_ERRMSG_LIMIT);
        // Masked before the cut: a secret across the limit leaves no prefix.
        let long = format!("{}{}", "y".repeat(190), "ABCDEFGHIJKLMNOP");
        let FetchError::WeChat { errmsg, .. } =
            FetchError::wechat(-1, &long, Some("secret=ABCDEFGHIJKLMNOP"), b"")
        else {
            panic!()
        };
        assert!(!errmsg.contains("ABCDEFGHIJ"), "{errmsg}");
    }
}
