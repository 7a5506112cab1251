//! Fault injection for the fake: per path, a rate of errcode -1 answers,
//! errmsgs echoing the request, token rejections, connection resets before or after the request takes
//! effect, refused HTTP/2 streams, answers before the body, extra delay and
//! an oversized answer head. Deterministic for a given seed.
//!
//! Set with `POST /__fake/faults` (JSON below) or `fake-wechat --faults JSON`:
//! `{"seed": 7, "rules": [{"path": "/cgi-bin/message/template/send",
//!   "busy_rate": 0.05, "reset_before_rate": 0.05, "reset_after_rate": 0.05,
//!   "refuse_rate": 0.0, "refuse_next": 0, "early_answer_rate": 0.0,
//!   "token_error_rate": 0.0, "echo_rate": 0.0, "errcode": 45009, "errcode_rate": 0.0,
//!   "delay_ms": 0, "pad_header_bytes": 0}]}`. A rule's `path` is a prefix;
//! the first matching rule applies.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub path: String,
    /// Answer `{"errcode":-1,"errmsg":"system error"}` without acting.
    #[serde(default)]
    pub busy_rate: f64,
    /// Answer 40001 whatever the token.
    #[serde(default)]
    pub token_error_rate: f64,
    /// Answer `errcode` (-1 when unset) with an errmsg that echoes the
    /// request's query and body (secrets, tokens and all), as a hostile
    /// upstream might.
    #[serde(default)]
    pub echo_rate: f64,
    /// Close the connection after reading the request, without acting.
    #[serde(default)]
    pub reset_before_rate: f64,
    /// Act on the request (record the message), then close without answering.
    #[serde(default)]
    pub reset_after_rate: f64,
    /// Refuse the request unprocessed: over HTTP/2 the stream is reset with
    /// REFUSED_STREAM (RFC 9113 §8.7, safe to retry); over HTTP/1.1 the
    /// connection is closed, as `reset_before_rate`.
    #[serde(default)]
    pub refuse_rate: f64,
    /// Refuse the next N requests (as `refuse_rate`), then none.
    #[serde(default)]
    pub refuse_next: u64,
    /// Answer 45002 (content size out of limit) without reading the body,
    /// as a server does that rejects a request on its header alone.
    #[serde(default)]
    pub early_answer_rate: f64,
    /// Answer `errcode` (e.g. 45009 daily quota, 45011 minute limit, 45033
    /// WeCom concurrency) without acting, at `errcode_rate`.
    #[serde(default)]
    pub errcode: i64,
    #[serde(default)]
    pub errcode_rate: f64,
    #[serde(default)]
    pub delay_ms: u64,
    /// Add a header of this many bytes to every answer (a hostile head).
    #[serde(default)]
    pub pad_header_bytes: usize,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// What to do to one request.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Verdict {
    pub busy: bool,
    pub token_error: bool,
    /// Answer this errcode, the request echoed in its errmsg.
    pub echo: Option<i64>,
    pub reset_before: bool,
    pub reset_after: bool,
    pub refuse: bool,
    pub early_answer: bool,
    /// Answer this errcode without acting.
    pub errcode: Option<i64>,
    pub delay_ms: u64,
    pub pad_header_bytes: usize,
}

pub struct Faults {
    rules: Vec<Rule>,
    rng: StdRng,
}

impl Default for Faults {
    fn default() -> Self {
        Faults::new(Plan::default())
    }
}

impl Faults {
    pub fn new(plan: Plan) -> Self {
        Faults {
            rules: plan.rules,
            rng: StdRng::seed_from_u64(plan.seed),
        }
    }

    pub fn judge(&mut self, path: &str) -> Verdict {
        let Some(rule) = self.rules.iter_mut().find(|r| path.starts_with(&r.path)) else {
            return Verdict::default();
        };
        let counted_refusal = rule.refuse_next > 0;
        rule.refuse_next = rule.refuse_next.saturating_sub(1);
        let rule = rule.clone();
        let mut roll = |rate: f64| rate > 0.0 && self.rng.gen_bool(rate.min(1.0));
        Verdict {
            reset_before: roll(rule.reset_before_rate),
            busy: roll(rule.busy_rate),
            token_error: roll(rule.token_error_rate),
            echo: roll(rule.echo_rate).then_some(if rule.errcode != 0 { rule.errcode } else { -1 }),
            reset_after: roll(rule.reset_after_rate),
            refuse: roll(rule.refuse_rate) || counted_refusal,
            early_answer: roll(rule.early_answer_rate),
            errcode: roll(rule.errcode_rate).then_some(rule.errcode),
            delay_ms: rule.delay_ms,
            pad_header_bytes: rule.pad_header_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_faults() {
        let plan: Plan = serde_json::from_str(
            r#"{"seed":3,"rules":[{"path":"/cgi-bin/message","reset_after_rate":0.5}]}"#,
        )
        .unwrap();
        let mut a = Faults::new(plan.clone());
        let mut b = Faults::new(plan);
        let ra: Vec<_> = (0..50)
            .map(|_| a.judge("/cgi-bin/message/template/send"))
            .collect();
        let rb: Vec<_> = (0..50)
            .map(|_| b.judge("/cgi-bin/message/template/send"))
            .collect();
        assert_eq!(ra, rb);
        assert!(ra.iter().any(|v| v.reset_after) && ra.iter().any(|v| !v.reset_after));
        assert_eq!(a.judge("/other"), Verdict::default());
    }
}
