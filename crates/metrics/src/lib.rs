//! Prometheus metrics, registered in the default registry (the one
//! `pingora-prometheus` serves too) and rendered by the admin listener.
//!
//! Label values are bounded: account names from the config, a fixed set of
//! routes and outcomes, upstream hosts from the config. Never a path with
//! ids, never a token.
//!
//! Its own crate (`wxsidecar-metrics`): the counters every layer counts in,
//! knowing none of them.
#![forbid(unsafe_code)]

use prometheus::{
    register_histogram_vec, register_int_counter_vec, register_int_gauge_vec, Encoder, Histogram,
    HistogramVec, IntCounterVec, IntGaugeVec, TextEncoder,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;

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

pub static BUFFERED_TOTAL_SPENT: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "wxsidecar_buffered_total_spent_total",
        "Times limits.buffered_total was spent: a request body refused (503, kind=request_body) or an upstream answer streamed instead of buffered (kind=answer).",
        &["kind"]
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

pub static CONNECTIONS_SHED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "wxsidecar_connections_shed_total",
        "Idle connections closed to make room for a new one at the listener's limit (the one idle longest first; never one inside a request).",
        &["listener"]
    )
    .expect("metric registers once")
});

pub static CONFIG_RELOADS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "wxsidecar_config_reloads_total",
        "Config reloads (SIGHUP, POST /reload, a watched file changing), by result (ok: applied, unchanged: nothing differed, failed: refused).",
        &["result"]
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
    LazyLock::force(&REQUEST_DURATION);
    LazyLock::force(&UPSTREAM_REQUESTS);
    LazyLock::force(&UPSTREAM_CONNECTIONS);
    LazyLock::force(&CONNECTIONS_REFUSED);
    LazyLock::force(&CONNECTIONS_OPEN);
    for result in ["ok", "unchanged", "failed"] {
        CONFIG_RELOADS.with_label_values(&[result]);
    }
    for kind in ["request_body", "answer"] {
        BUFFERED_TOTAL_SPENT.with_label_values(&[kind]);
    }
    for result in ["served", "handed_off"] {
        FAST_LANE.with_label_values(&[result]);
    }
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
    /// A third-party platform's authorisation events.
    Platform = 6,
}

impl Served {
    const ALL: [Served; 7] = [
        Served::Api,
        Served::Untouched,
        Served::Stream,
        Served::Token,
        Served::Ticket,
        Served::Jssdk,
        Served::Platform,
    ];

    pub fn as_str(self) -> &'static str {
        [
            "api",
            "untouched",
            "stream",
            "token",
            "ticket",
            "jssdk",
            "platform",
        ][self as usize]
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
    const ALL: [Outcome; 4] = [
        Outcome::Ok,
        Outcome::WeChatError,
        Outcome::Refused,
        Outcome::Error,
    ];

    pub fn as_str(self) -> &'static str {
        ["ok", "wechat_error", "refused", "error"][self as usize]
    }
}

/// `N` counters of one owner (an account, a lease), allocated the first
/// time one counts: an owner that never counts holds one empty pointer.
/// Plain atomics, not registered series: a series costs ~500 bytes, and
/// with thousands of accounts that is most of an account's memory. The
/// admin listener writes them out at each scrape ([`TextFamily`]).
pub struct Counts<const N: usize>(once_cell::race::OnceBox<[AtomicU64; N]>);

impl<const N: usize> Default for Counts<N> {
    fn default() -> Self {
        Counts(once_cell::race::OnceBox::new())
    }
}

impl<const N: usize> Counts<N> {
    pub fn inc(&self, i: usize) {
        self.0
            .get_or_init(|| Box::new(std::array::from_fn(|_| AtomicU64::new(0))))[i]
            .fetch_add(1, Ordering::Relaxed);
    }

    /// The count so far.
    pub fn get(&self, i: usize) -> u64 {
        self.0.get().map_or(0, |c| c[i].load(Ordering::Relaxed))
    }
}

/// One account's requests by route and outcome
/// (`wxsidecar_requests_total{account,outcome,route}`).
#[derive(Default)]
pub struct RequestCounters(Counts<28>);

impl RequestCounters {
    pub fn inc(&self, route: Served, outcome: Outcome) {
        self.0.inc(route as usize * 4 + outcome as usize);
    }

    /// Every (route, outcome) with its count so far, 0 included.
    pub fn all(&self) -> impl Iterator<Item = (Served, Outcome, u64)> + '_ {
        Served::ALL.into_iter().flat_map(move |r| {
            Outcome::ALL
                .into_iter()
                .map(move |o| (r, o, self.0.get(r as usize * 4 + o as usize)))
        })
    }
}

/// One account's replays after a token rejection, by result
/// (`wxsidecar_token_replays_total{account,result}`).
#[derive(Default)]
pub struct ReplayCounters(Counts<2>);

impl ReplayCounters {
    /// Counts a replay that worked (`ok`) or did not.
    pub fn inc(&self, ok: bool) {
        self.0.inc(usize::from(!ok));
    }

    /// Replays so far that worked (`ok`) or did not.
    pub fn get(&self, ok: bool) -> u64 {
        self.0.get(usize::from(!ok))
    }
}

/// Requests that named no account (`account="-"`).
pub static NO_ACCOUNT: LazyLock<RequestCounters> = LazyLock::new(RequestCounters::default);

/// `wxsidecar_request_duration_seconds` per route, resolved once.
static DURATIONS: LazyLock<[Histogram; 7]> =
    LazyLock::new(|| Served::ALL.map(|r| REQUEST_DURATION.with_label_values(&[r.as_str()])));

/// Records how long a request on `route` took.
pub fn observe_duration(route: Served, seconds: f64) {
    DURATIONS[route as usize].observe(seconds);
}

/// The fetch outcomes every token and ticket is counted by.
pub const FETCH_RESULTS: [&str; 4] = ["ok", "wechat_error", "transport_error", "budget_spent"];

/// One token's or ticket's fetch outcomes, indexed like [`FETCH_RESULTS`]
/// (a lease cell holds them): the one count `/metrics` and `/status` both
/// read.
#[derive(Default)]
pub struct FetchCounters(Counts<4>);

impl FetchCounters {
    /// Counts one fetch ending as `FETCH_RESULTS[i]`.
    pub fn inc(&self, i: usize) {
        self.0.inc(i);
    }

    /// Fetches so far that ended as `FETCH_RESULTS[i]`.
    pub fn get(&self, i: usize) -> u64 {
        self.0.get(i)
    }
}

/// One metric family written in Prometheus' text format from counts kept
/// outside the registry. Label names must come sorted, as the registry
/// writes them.
pub struct TextFamily<'a> {
    out: &'a mut Vec<u8>,
    name: &'static str,
}

impl<'a> TextFamily<'a> {
    /// Starts the family: its `HELP` and `TYPE` lines.
    pub fn new(out: &'a mut Vec<u8>, name: &'static str, help: &str, kind: &str) -> Self {
        use std::io::Write;
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        TextFamily { out, name }
    }

    /// One series.
    pub fn series(&mut self, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        use std::io::Write;
        self.out.extend_from_slice(self.name.as_bytes());
        for (i, (k, v)) in labels.iter().enumerate() {
            self.out.push(if i == 0 { b'{' } else { b',' });
            self.out.extend_from_slice(k.as_bytes());
            self.out.extend_from_slice(b"=\"");
            for c in v.bytes() {
                match c {
                    b'\\' => self.out.extend_from_slice(b"\\\\"),
                    b'"' => self.out.extend_from_slice(b"\\\""),
                    b'\n' => self.out.extend_from_slice(b"\\n"),
                    c => self.out.push(c),
                }
            }
            self.out.push(b'"');
        }
        if !labels.is_empty() {
            self.out.push(b'}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// The text exposition of every registered metric.
pub fn render() -> Vec<u8> {
    let mut out = Vec::new();
    let _ = TextEncoder::new().encode(&prometheus::gather(), &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_written_by_hand_match_the_registry_format() {
        let mut out = Vec::new();
        let mut f = TextFamily::new(&mut out, "x_total", "Things.", "counter");
        f.series(&[("account", "shop"), ("result", "ok")], 3u64);
        f.series(&[("account", "a\"b\\c\nd")], 0.5f64);
        f.series(&[], 1u64);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "# HELP x_total Things.\n# TYPE x_total counter\n\
             x_total{account=\"shop\",result=\"ok\"} 3\n\
             x_total{account=\"a\\\"b\\\\c\\nd\"} 0.5\n\
             x_total 1\n"
        );
    }

    #[test]
    fn counts_take_no_memory_until_they_count() {
        let c = RequestCounters::default();
        assert!(c.0 .0.get().is_none());
        assert_eq!(c.all().count(), 28);
        assert!(c.all().all(|(_, _, n)| n == 0));
        assert!(c.0 .0.get().is_none(), "reading allocates nothing");
        c.inc(Served::Token, Outcome::Refused);
        c.inc(Served::Token, Outcome::Refused);
        c.inc(Served::Api, Outcome::Ok);
        let got: Vec<_> = c
            .all()
            .filter(|(_, _, n)| *n > 0)
            .map(|(r, o, n)| (r.as_str(), o.as_str(), n))
            .collect();
        assert_eq!(got, [("api", "ok", 1), ("token", "refused", 2)]);
    }
}
