//! Answers the sidecar writes itself: local token answers and errors in
//! WeChat's shape (`{"errcode":…,"errmsg":"wxsidecar: …"}`) so SDKs parse
//! them, with an HTTP status that tells the truth.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

use crate::account::PickError;
use crate::upstream::UpstreamError;

/// WeChat's JSON content type.
pub const JSON: &str = "application/json; charset=utf-8";

/// Why the sidecar answered instead of WeChat.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{0}")]
    NoAccount(#[from] PickError),
    #[error("no valid {what} for account {account}: {reason}")]
    NoToken {
        account: String,
        /// "token", "jsapi ticket", …
        what: &'static str,
        reason: String,
    },
    #[error("daily {what} budget for account {account} spent (token.daily_budget); it resets at midnight UTC+8")]
    BudgetSpent { account: String, what: &'static str },
    #[error("upstream unavailable, retry later")]
    Unavailable,
    #[error("reach max api daily quota limit: {per_day} calls to {path} for account {account} today (accounts[].limits); it resets at midnight UTC+8")]
    QuotaLimit {
        account: String,
        path: String,
        per_day: u64,
    },
    #[error("{0}")]
    Denied(#[from] crate::clients::Denied),
    #[error("request body over the {limit}-byte limit for {path} (limits.buffered_body)")]
    BodyTooLarge { limit: usize, path: String },
    #[error("request bodies being read fill limits.buffered_total ({total} bytes); retry shortly")]
    BodiesBusy { total: usize },
    #[error("{reason}")]
    Forbidden { reason: String },
    #[error("bad request for {path}: {reason}")]
    BadRequest { path: String, reason: String },
    #[error("method {method} is not one WeChat's API takes (GET, POST, HEAD)")]
    MethodNotAllowed { method: String },
    #[error("request body for {path} not received within {limit:?} (limits.body_timeout)")]
    BodyTimeout {
        path: String,
        limit: std::time::Duration,
    },
    #[error("{path}: {source}")]
    Upstream {
        path: String,
        #[source]
        source: UpstreamError,
    },
}

impl ProxyError {
    pub fn status(&self) -> u16 {
        match self {
            ProxyError::NoAccount(_) | ProxyError::BadRequest { .. } => 400,
            // As WeChat answers a spent quota: the errcode says it.
            ProxyError::QuotaLimit { .. } => 200,
            ProxyError::Denied(d) => d.status(),
            ProxyError::NoToken { .. }
            | ProxyError::BudgetSpent { .. }
            | ProxyError::Unavailable
            | ProxyError::BodiesBusy { .. } => 503,
            ProxyError::BodyTooLarge { .. } => 413,
            ProxyError::MethodNotAllowed { .. } => 405,
            ProxyError::BodyTimeout { .. } => 408,
            ProxyError::Forbidden { .. } => 403,
            ProxyError::Upstream { source, .. } if source.is_timeout() => 504,
            ProxyError::Upstream { .. } => 502,
        }
    }

    /// The errcode SDKs see: WeChat's closest code, so their handling fits.
    pub fn errcode(&self) -> i64 {
        match self {
            ProxyError::NoAccount(_) => 40013,
            ProxyError::Denied(d) => d.errcode(),
            ProxyError::BodyTooLarge { .. } => 45002,
            // WeChat's "require POST method": the closest it has.
            ProxyError::MethodNotAllowed { .. } => 43002,
            ProxyError::BudgetSpent { .. } | ProxyError::QuotaLimit { .. } => 45009,
            ProxyError::BadRequest { .. } => 40035,
            // WeChat's "API unauthorized".
            ProxyError::Forbidden { .. } => 48001,
            // -1 is WeChat's "system busy": SDKs treat it as transient.
            ProxyError::NoToken { .. }
            | ProxyError::Upstream { .. }
            | ProxyError::Unavailable
            | ProxyError::BodiesBusy { .. }
            | ProxyError::BodyTimeout { .. } => -1,
        }
    }
}

impl ProxyError {
    /// Seconds to tell the caller to wait, when waiting is the answer.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            ProxyError::Denied(d) => d.retry_after(),
            ProxyError::BodiesBusy { .. } => Some(1),
            _ => None,
        }
    }
}

/// A WeChat-shaped error body.
pub fn error_body(errcode: i64, message: &str) -> Bytes {
    let msg = format!("wxsidecar: {message}");
    Bytes::from(serde_json::json!({ "errcode": errcode, "errmsg": msg }).to_string())
}

/// Writes a complete JSON answer (with `Content-Length`, so the client's
/// connection stays open).
pub async fn send_json(session: &mut Session, status: u16, body: Bytes) -> pingora::Result<()> {
    let mut resp = ResponseHeader::build(status, Some(3))?;
    resp.insert_header(http::header::CONTENT_TYPE, JSON)?;
    resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await
}

/// Writes `err` as a WeChat-shaped answer (with `Retry-After` on a rate
/// limit).
pub async fn send_error(session: &mut Session, err: &ProxyError) -> pingora::Result<()> {
    let body = error_body(err.errcode(), &err.to_string());
    let mut resp = ResponseHeader::build(err.status(), Some(4))?;
    resp.insert_header(http::header::CONTENT_TYPE, JSON)?;
    resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    if let Some(secs) = err.retry_after() {
        resp.insert_header(http::header::RETRY_AFTER, secs.to_string())?;
    }
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await
}
