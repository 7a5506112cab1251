//! Count and log: one request's metrics and its debug line, the same for
//! both fronts (the query is never logged: it may hold a token or an
//! appsecret).

use crate::account::Account;
use crate::metrics::{Outcome, Served};
use crate::reply::ProxyError;

/// What a request came to, from the status written and WeChat's errcode.
pub(crate) fn outcome(status: u16, errcode: Option<i64>) -> Outcome {
    match (status, errcode) {
        (200..=299, Some(c)) if c != 0 => Outcome::WeChatError,
        (200..=399, _) => Outcome::Ok,
        (400..=499, _) => Outcome::Refused,
        _ => Outcome::Error,
    }
}

/// One request answered.
pub(crate) struct Report<'a> {
    pub route: Served,
    /// The account whose token went in (requests are counted for it).
    pub account: Option<&'a Account>,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub errcode: Option<i64>,
    pub elapsed: std::time::Duration,
    /// Which front served it.
    pub lane: &'static str,
}

/// Counts the request (per account or for none, its duration) and logs
/// its line.
pub(crate) fn report(r: Report<'_>) {
    let outcome = outcome(r.status, r.errcode);
    match r.account {
        Some(a) => a.requests.inc(r.route, outcome),
        None => crate::metrics::NO_ACCOUNT.inc(r.route, outcome),
    }
    crate::metrics::observe_duration(r.route, r.elapsed.as_secs_f64());
    tracing::debug!(
        method = r.method,
        path = r.path,
        route = r.route.as_str(),
        account = r.account.map_or("-", |a| a.name.as_str()),
        status = r.status,
        errcode = ?r.errcode,
        elapsed_us = r.elapsed.as_micros() as u64,
        lane = r.lane,
        "request"
    );
}

/// Logs an error answer before a front writes it: a failure as a warning,
/// a refusal as information.
pub(crate) fn refused(path: &str, e: &ProxyError) {
    let status = e.status();
    if status >= 500 {
        tracing::warn!(path, status, error = %e, "request failed");
    } else {
        tracing::info!(path, status, error = %e, "request refused");
    }
}
