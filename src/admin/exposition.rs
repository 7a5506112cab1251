//! The per-account part of `/metrics`, written at each scrape from the
//! counts the accounts and their lease cells keep (plain atomics: a
//! registered series per account costs ~500 bytes, which with thousands
//! of accounts was most of an account's memory). Every series that can
//! exist for an account in the table (configured, or an authoriser while
//! in memory) and each ticket in use is written from the start, at 0 until
//! it counts: `rate()` panels and `increase(…) > 0` alerts need the series
//! before the first event (Prometheus' guidance on missing series).

use crate::account::{Account, Accounts};
use crate::metrics::{Served, TextFamily, FETCH_RESULTS, NO_ACCOUNT};

/// Appends the platforms' event hand-off counts (`forward_events`) to `out`.
pub fn write_platforms(out: &mut Vec<u8>, platforms: &[std::sync::Arc<crate::platform::Platform>]) {
    if platforms.iter().all(|p| p.forward.is_none()) {
        return;
    }
    let mut f = TextFamily::new(
        out,
        "wxsidecar_platform_events_forwarded_total",
        "Platform events handed on to the app's handler (forward_events), by platform and result (sent, failed, dropped).",
        "counter",
    );
    for p in platforms {
        let Some(fw) = &p.forward else { continue };
        let st = fw.status();
        for (result, n) in [
            ("sent", st.sent),
            ("failed", st.failed),
            ("dropped", st.dropped),
        ] {
            f.series(&[("platform", &p.name), ("result", result)], n);
        }
    }
}

/// Appends every per-account family to `out`.
pub fn write_accounts(out: &mut Vec<u8>, accounts: &Accounts) {
    let mut f = TextFamily::new(
        out,
        "wxsidecar_requests_total",
        "Requests from apps, by account, route (token, ticket, jssdk, api, stream, untouched) and outcome.",
        "counter",
    );
    let named = accounts.iter().map(|a| (a.name.as_str(), &a.requests));
    for (name, counts) in named.chain(std::iter::once(("-", &*NO_ACCOUNT))) {
        // Platform events name no account: that route is the `-` row's.
        let every = name == "-";
        for (route, outcome, n) in counts.all() {
            if route == Served::Platform && !every && n == 0 {
                continue;
            }
            let labels = [
                ("account", name),
                ("outcome", outcome.as_str()),
                ("route", route.as_str()),
            ];
            f.series(&labels, n);
        }
    }

    let mut f = TextFamily::new(
        out,
        "wxsidecar_token_fetches_total",
        "Token fetches from WeChat, by account and result (ok, wechat_error, transport_error, budget_spent).",
        "counter",
    );
    for a in accounts.iter() {
        let counts = a.tokens.fetch_counts();
        for (i, result) in FETCH_RESULTS.iter().enumerate() {
            f.series(&[("account", &a.name), ("result", result)], counts.get(i));
        }
    }

    let mut f = TextFamily::new(
        out,
        "wxsidecar_token_replays_total",
        "Requests sent again after WeChat rejected the token, by account and result (ok, failed).",
        "counter",
    );
    for a in accounts.iter() {
        for (ok, result) in [(true, "ok"), (false, "failed")] {
            f.series(
                &[("account", &a.name), ("result", result)],
                a.replays.get(ok),
            );
        }
    }

    let mut f = TextFamily::new(
        out,
        "wxsidecar_wechat_errors_total",
        "WeChat's answers with an errcode that matters (token, quota, IP, permission), by account and errcode.",
        "counter",
    );
    for a in accounts.iter() {
        for (code, n) in a.quota.errors() {
            f.series(&[("account", &a.name), ("errcode", &code.to_string())], n);
        }
    }

    let mut f = TextFamily::new(
        out,
        "wxsidecar_ip_not_whitelisted_total",
        "Answers from WeChat refusing our egress IP (40164, 60020, 61004, 89503), by account.",
        "counter",
    );
    for a in accounts.iter() {
        f.series(&[("account", &a.name)], a.whitelist.count());
    }

    let mut f = TextFamily::new(
        out,
        "wxsidecar_token_expiry_seconds",
        "Seconds the account's current token has left (0: none valid).",
        "gauge",
    );
    for a in accounts.iter() {
        let left = a
            .tokens
            .valid()
            .map_or(0.0, |t| t.remaining().as_secs_f64());
        f.series(&[("account", &a.name)], left);
    }

    write_tickets(out, accounts);
}

/// The ticket families: fetches, expiry and age of each ticket in use.
fn write_tickets(out: &mut Vec<u8>, accounts: &Accounts) {
    let in_use = || {
        accounts.iter().flat_map(|a: &std::sync::Arc<Account>| {
            a.tickets
                .in_use()
                .map(move |(kind, cell)| (a.name.as_str(), kind.as_str(), cell))
        })
    };
    let mut f = TextFamily::new(
        out,
        "wxsidecar_ticket_fetches_total",
        "Ticket fetches from WeChat, by account, type (jsapi, wx_card, agent_config) and result.",
        "counter",
    );
    for (name, kind, cell) in in_use() {
        for (i, result) in FETCH_RESULTS.iter().enumerate() {
            let n = cell.fetch_counts().get(i);
            f.series(&[("account", name), ("result", result), ("type", kind)], n);
        }
    }
    let mut f = TextFamily::new(
        out,
        "wxsidecar_ticket_expiry_seconds",
        "Seconds the account's current ticket of a type has left (0: none valid).",
        "gauge",
    );
    for (name, kind, cell) in in_use() {
        let left = cell.valid().map_or(0.0, |t| t.remaining().as_secs_f64());
        f.series(&[("account", name), ("type", kind)], left);
    }
    let mut f = TextFamily::new(
        out,
        "wxsidecar_ticket_age_seconds",
        "Seconds since the account's current ticket of a type was fetched.",
        "gauge",
    );
    for (name, kind, cell) in in_use() {
        let age = cell
            .latest()
            .and_then(|t| t.fetched_at.elapsed().ok())
            .map_or(0.0, |d| d.as_secs_f64());
        f.series(&[("account", name), ("type", kind)], age);
    }
}
