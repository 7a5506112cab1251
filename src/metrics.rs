//! Prometheus metrics, registered in the default registry (the one
//! `pingora-prometheus` serves too) and rendered by the admin listener.
//!
//! Label values are bounded: account names from the config, a fixed set of
//! routes and outcomes, upstream hosts from the config. Never a path with
//! ids, never a token.

use prometheus::{
    register_gauge_vec, register_histogram_vec, register_int_counter_vec, register_int_gauge_vec,
    Encoder, GaugeVec, Histogram, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec,
    TextEncoder,
};
use std::sync::{LazyLock, OnceLock};

pub static REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "wxsidecar_requests_total",
        "Requests from apps, by account, route (token, ticket, jssdk, api, stream, untouched) and outcome.",
        &["account", "route", "outcome"]
    )
    .expect("metric registers once")
});

pub static REQUEST_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "wxsidecar_request_duration_seconds",
        "Time from the app's request to the end of the answer, by route.",
        &["route"],
        vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
    )
    .expect("metric registers once")
});

pub static UPSTREAM_REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "wxsidecar_upstream_requests_total",
        "Requests sent to WeChat, by host and outcome (ok, error).",
        &["host", "outcome"]
    )
    .expect("metric registers once")
});

pub static UPSTREAM_CONNECTIONS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "wxsidecar_upstream_connections_total",
        "Connections used for requests to WeChat, by host and whether pooled (reused=true) or new.",
        &["host", "reused"]
    )
    .expect("metric registers once")
});

pub static FAST_LANE: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "wxsidecar_fast_lane_total",
        "Requests the fast lane served itself, and those it handed to the full request path (result: served, handed_off).",
        &["result"]
    )
    .expect("metric registers once")
});

pub static TOKEN_FETCHES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "wxsidecar_token_fetches_total",
        "Token fetches from WeChat, by account and result (ok, wechat_error, transport_error, budget_spent).",
        &["account", "result"]
    )
    .expect("metric registers once")
});

pub static TOKEN_REPLAYS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "wxsidecar_token_replays_total",
        "Requests sent again after WeChat rejected the token, by account and result (ok, failed).",
        &["account", "result"]
    )
    .expect("metric registers once")
});

pub static TOKEN_EXPIRY: LazyLock<GaugeVec> = LazyLock::new(|| {
    register_gauge_vec!(
        "wxsidecar_token_expiry_seconds",
        "Seconds the account's current token has left (0: none valid).",
        &["account"]
    )
    .expect("metric registers once")
});

pub static TICKET_FETCHES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "wxsidecar_ticket_fetches_total",
        "Ticket fetches from WeChat, by account, type (jsapi, wx_card, agent_config) and result.",
        &["account", "type", "result"]
    )
    .expect("metric registers once")
});

pub static TICKET_EXPIRY: LazyLock<GaugeVec> = LazyLock::new(|| {
    register_gauge_vec!(
        "wxsidecar_ticket_expiry_seconds",
        "Seconds the account's current ticket of a type has left (0: none valid).",
        &["account", "type"]
    )
    .expect("metric registers once")
});

pub static TICKET_AGE: LazyLock<GaugeVec> = LazyLock::new(|| {
    register_gauge_vec!(
        "wxsidecar_ticket_age_seconds",
        "Seconds since the account's current ticket of a type was fetched.",
        &["account", "type"]
    )
    .expect("metric registers once")
});

pub static CONNECTIONS_REFUSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "wxsidecar_connections_refused_total",
        "Connections closed at once because the listener was at its limit (limits.max_connections, limits.max_admin_connections).",
        &["listener"]
    )
    .expect("metric registers once")
});

pub static CONNECTIONS_OPEN: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "wxsidecar_connections_open",
        "Connections open now, per listener.",
        &["listener"]
    )
    .expect("metric registers once")
});

pub static BUILD_INFO: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "wxsidecar_build_info",
        "Always 1; the version as a label.",
        &["version"]
    )
    .expect("metric registers once")
});

/// Registers every metric, so each shows from the first scrape.
pub fn init() {
    BUILD_INFO
        .with_label_values(&[env!("CARGO_PKG_VERSION")])
        .set(1);
    LazyLock::force(&REQUESTS);
    LazyLock::force(&REQUEST_DURATION);
    LazyLock::force(&UPSTREAM_REQUESTS);
    LazyLock::force(&UPSTREAM_CONNECTIONS);
    LazyLock::force(&TOKEN_FETCHES);
    LazyLock::force(&TOKEN_REPLAYS);
    LazyLock::force(&TOKEN_EXPIRY);
    LazyLock::force(&TICKET_FETCHES);
    LazyLock::force(&TICKET_EXPIRY);
    LazyLock::force(&TICKET_AGE);
    LazyLock::force(&CONNECTIONS_REFUSED);
    LazyLock::force(&CONNECTIONS_OPEN);
}

/// The routes requests are counted by (`route` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    Api = 0,
    Untouched = 1,
    Stream = 2,
    Token = 3,
    Ticket = 4,
    Jssdk = 5,
}

impl Served {
    const ALL: [Served; 6] = [
        Served::Api,
        Served::Untouched,
        Served::Stream,
        Served::Token,
        Served::Ticket,
        Served::Jssdk,
    ];

    pub fn as_str(self) -> &'static str {
        ["api", "untouched", "stream", "token", "ticket", "jssdk"][self as usize]
    }
}

/// How a request ended (`outcome` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok = 0,
    WeChatError = 1,
    Refused = 2,
    Error = 3,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        ["ok", "wechat_error", "refused", "error"][self as usize]
    }
}

/// One account's `wxsidecar_requests_total` series, each resolved the
/// first time it is counted: no label lookup per request, and an account
/// that never sees a route holds no series for it.
pub struct RequestCounters {
    account: Box<str>,
    series: [OnceLock<IntCounter>; 24],
}

impl RequestCounters {
    pub fn new(account: &str) -> Self {
        RequestCounters {
            account: account.into(),
            series: Default::default(),
        }
    }

    pub fn inc(&self, route: Served, outcome: Outcome) {
        self.series[route as usize * 4 + outcome as usize]
            .get_or_init(|| {
                REQUESTS.with_label_values(&[&self.account, route.as_str(), outcome.as_str()])
            })
            .inc();
    }
}

/// Requests that named no account (`account="-"`).
pub static NO_ACCOUNT: LazyLock<RequestCounters> = LazyLock::new(|| RequestCounters::new("-"));

/// `wxsidecar_request_duration_seconds` per route, resolved once.
static DURATIONS: LazyLock<[Histogram; 6]> =
    LazyLock::new(|| Served::ALL.map(|r| REQUEST_DURATION.with_label_values(&[r.as_str()])));

/// Records how long a request on `route` took.
pub fn observe_duration(route: Served, seconds: f64) {
    DURATIONS[route as usize].observe(seconds);
}

/// The fetch outcomes every token and ticket is counted by.
pub const FETCH_RESULTS: [&str; 4] = ["ok", "wechat_error", "transport_error", "budget_spent"];

/// One token's or ticket's fetch counters, resolved once (a lease cell
/// holds them): the one count `/metrics` and `/status` both read.
#[derive(Clone)]
pub struct FetchCounters(pub [IntCounter; 4]);

impl FetchCounters {
    /// `wxsidecar_token_fetches_total{account,result}`.
    pub fn token(account: &str) -> Self {
        FetchCounters(FETCH_RESULTS.map(|r| TOKEN_FETCHES.with_label_values(&[account, r])))
    }

    /// `wxsidecar_ticket_fetches_total{account,type,result}`.
    pub fn ticket(account: &str, kind: &str) -> Self {
        FetchCounters(FETCH_RESULTS.map(|r| TICKET_FETCHES.with_label_values(&[account, kind, r])))
    }

    /// Counters registered nowhere: for cells in tests and benches.
    pub fn detached() -> Self {
        FetchCounters(FETCH_RESULTS.map(|r| IntCounter::new(r, r).expect("a valid name")))
    }
}

/// The text exposition of every registered metric.
pub fn render() -> Vec<u8> {
    let mut out = Vec::new();
    let _ = TextEncoder::new().encode(&prometheus::gather(), &mut out);
    out
}
