//! Every configuration key, declared once: its name, type, default (the
//! `DEFAULT_*` constant the parser uses, and why), bounds, whether only a
//! restart changes it (and then how reload keeps the running value), whether
//! it is a secret, and its line of documentation.
//!
//! Derived from this table: reload's restart list ([`restart_needed`]), the
//! configuration reference (`wxsidecar check --reference`, written to
//! `docs/configuration.md` by `make docs`; a test fails when that page is
//! stale), and the checks that hold the parser to it: the keys serde accepts
//! in every section are exactly the table's, and each constant default is
//! what `check --print` shows when the key is left out.

use std::time::Duration;

use super::*;
use print::duration_text as dur;
/// What a key holds, as the reference names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Address,
    Bool,
    Duration,
    Integer,
    Size,
    Text,
    Url,
    Path,
    Secret,
    List,
    Map,
    Section,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Address => "address",
            Kind::Bool => "bool",
            Kind::Duration => "duration",
            Kind::Integer => "integer",
            Kind::Size => "size",
            Kind::Text => "text",
            Kind::Url => "URL",
            Kind::Path => "path",
            Kind::Secret => "secret",
            Kind::List => "list",
            Kind::Map => "map",
            Kind::Section => "section",
        }
    }
}

/// A key's default.
pub enum Default {
    /// None: the key must be given (where its section is).
    Required,
    /// A constant the parser uses, as `check --print` shows it.
    Const(fn() -> String),
    /// Worked out from other keys, or absent: said in words.
    Text(&'static str),
}

/// How a reload treats a key only a restart can change: whether it
/// differs between the running and the new configuration, and how the
/// running value is kept.
pub struct Restart {
    pub differs: fn(&Config, &Config) -> bool,
    pub keep: fn(&mut Config, &Config),
}

pub struct Key {
    /// As written in the file (`accounts[].secret`: in each list item).
    pub name: &'static str,
    pub kind: Kind,
    pub default: Default,
    /// Why that default (one line; empty when it says itself).
    pub reason: &'static str,
    /// What values are accepted beyond the type (empty: any).
    pub bounds: &'static str,
    /// `Some`: a reload leaves the running value and names the key.
    pub restart: Option<Restart>,
    /// Never printed (`check --print` shows `***`).
    pub secret: bool,
    pub doc: &'static str,
}

/// Two values differ as `check --print` shows them (secrets included as
/// their masks: the callers that care compare the secret itself).
pub fn differs<T: serde::Serialize>(a: &T, b: &T) -> bool {
    serde_json::to_value(a).ok() != serde_json::to_value(b).ok()
}

/// A key only a restart changes, by its field on [`Config`].
macro_rules! restart {
    ($($field:tt)+) => {
        Some(Restart {
            differs: |a, b| differs(&a.$($field)+, &b.$($field)+),
            keep: |new, old| new.$($field)+ = old.$($field)+.clone(),
        })
    };
}

/// The first of its arguments: an option given, else the default after it.
macro_rules! first {
    ($a:expr $(, $rest:expr)*) => {
        $a
    };
}

macro_rules! key {
    ($name:literal, $kind:ident, $default:expr, $doc:literal $(, reason = $reason:literal)? $(, bounds = $bounds:literal)? $(, restart = $restart:expr)? $(, secret = $secret:literal)?) => {
        Key {
            name: $name,
            kind: Kind::$kind,
            default: $default,
            reason: first!($($reason,)? ""),
            bounds: first!($($bounds,)? ""),
            restart: first!($($restart,)? None),
            secret: first!($($secret,)? false),
            doc: $doc,
        }
    };
}

use Default::{Const, Required, Text};

/// The table, in the order of the reference.
pub fn keys() -> Vec<Key> {
    vec![
        // Listeners and the process.
        key!("listen", Address, Const(|| DEFAULT_LISTEN.into()),
            "where apps connect (plain HTTP/1.1); a non-loopback address requires `clients.allow` and/or `clients.tokens`",
            reason = "loopback: the sidecar case", restart = restart!(listen)),
        key!("admin_listen", Address, Const(|| DEFAULT_ADMIN_LISTEN.into()),
            "`/healthz`, `/readyz`, `/status`, `/metrics`, `POST /refresh`, `/quota`, `/rid`, `POST /reload`; a non-loopback address requires `admin.token`",
            reason = "loopback, a port apart from the app's", restart = restart!(admin_listen)),
        key!("upgrade_sock", Path, Text("`/tmp/wxsidecar-{port}.upgrade.sock`"),
            "where `run --upgrade` receives the listening sockets",
            reason = "one per listen port, so two sidecars on one host do not meet", restart = restart!(upgrade_sock)),
        key!("pid_file", Path, Text("`/tmp/wxsidecar-{port}.pid`"),
            "written by `run --daemon`", restart = restart!(pid_file)),
        key!("threads", Integer, Const(|| DEFAULT_THREADS.to_string()),
            "worker threads of the app listener; with `1` it runs on a current-thread runtime (cheapest per request), with more they share work",
            reason = "a sidecar's load fits one core; measured cheapest per request", bounds = "≥ 1", restart = restart!(threads)),
        key!("shutdown_grace", Duration, Const(|| dur(DEFAULT_SHUTDOWN_GRACE)),
            "on SIGTERM, the longest in-flight requests may take to finish (the process exits as soon as none is left)",
            reason = "inside Kubernetes' default 30 s termination grace", restart = restart!(shutdown_grace)),
        // limits
        key!("limits", Section, Text("each key's"), "bounds on what comes from apps"),
        key!("limits.buffered_body", Size, Const(|| DEFAULT_BUFFERED_BODY.to_string()),
            "cap on buffered JSON request bodies (413 above) and on buffered answers (larger ones stream)",
            reason = "1 MiB: WeChat's JSON APIs take far less; media stream", bounds = "> 0"),
        key!("limits.buffered_total", Size, Const(|| DEFAULT_BUFFERED_TOTAL.to_string()),
            "request bodies and upstream answers being buffered, all together; a request body that would pass it is refused at once (503, errcode -1, `Retry-After: 1`); an answer over 16 KiB that would pass it is streamed instead; counted in `wxsidecar_buffered_total_spent_total{kind}`",
            reason = "256 MiB: 256 full bodies at once, far past a sidecar's load", bounds = "≥ limits.buffered_body", restart = restart!(limits.buffered_total)),
        key!("limits.max_connections", Integer, Const(|| DEFAULT_MAX_CONNECTIONS.to_string()),
            "app connections held at once (the intercept listeners count too); at it a newcomer closes the connection idle longest (`wxsidecar_connections_shed_total`), and is refused only when every connection is inside a request (`wxsidecar_connections_refused_total`); lowered at start when the open-file limit cannot hold it",
            reason = "far above a sidecar's apps, far below the open-file limit", bounds = "≥ 1", restart = restart!(limits.max_connections)),
        key!("limits.max_admin_connections", Integer, Const(|| DEFAULT_MAX_ADMIN_CONNECTIONS.to_string()),
            "the same for the admin listener",
            reason = "probes and scrapes need a few", bounds = "≥ 1", restart = restart!(limits.max_admin_connections)),
        key!("limits.header_timeout", Duration, Const(|| dur(DEFAULT_HEADER_TIMEOUT)),
            "a request head must arrive within this from its first byte, a new connection's first byte within this of connecting; else closed (slowloris)",
            reason = "nginx's client_header_timeout is 60 s; apps on the same host need far less", bounds = "> 0", restart = restart!(limits.header_timeout)),
        key!("limits.idle_timeout", Duration, Const(|| dur(DEFAULT_CLIENT_IDLE_TIMEOUT)),
            "a kept-alive app connection with no next request for this long is closed (idle admin connections too)",
            reason = "under nginx's keepalive_timeout (75 s): idle descriptors freed a little sooner", bounds = "> 0", restart = restart!(limits.idle_timeout)),
        key!("limits.body_timeout", Duration, Const(|| dur(DEFAULT_BODY_TIMEOUT)),
            "a whole request body (JSON and streamed) must arrive within this: 408",
            reason = "a 20 MB upload at ~1 Mbit/s", bounds = "> 0"),
        key!("limits.send_timeout", Duration, Const(|| dur(DEFAULT_SEND_TIMEOUT)),
            "an app that takes none of an answer write for this long (it stopped reading) is disconnected, as nginx's `send_timeout` (admin answers too)",
            reason = "nginx's default", bounds = "> 0", restart = restart!(limits.send_timeout)),
        // admin
        key!("admin", Section, Text("each key's"), "the admin listener's credentials and spacing"),
        key!("admin.token", Secret, Text("none"),
            "bearer token for `/status`, `POST /refresh`, `/quota`, `/rid`, `POST /reload`, `/debug/pprof/*` (`${ENV}` works; compared in constant time); `/healthz` and `/readyz` stay open; required off loopback",
            bounds = "≥ 16 characters", secret = true),
        key!("admin.token_file", Path, Text("none"), "`admin.token` read from a file (trimmed)"),
        key!("admin.protect_metrics", Bool, Const(|| "false".into()),
            "also require the token on `/metrics`", reason = "scrapers usually sit on the host"),
        key!("admin.refresh_interval", Duration, Const(|| dur(DEFAULT_ADMIN_REFRESH_INTERVAL)),
            "at most one forced refresh per account and kind this often; sooner → 429 with `Retry-After`",
            reason = "WeChat's own spacing for `force_refresh`", bounds = "> 0"),
        // upstream
        key!("upstream", Section, Text("each key's"), "where the Official Account / mini program hosts are, and how they are talked to"),
        key!("upstream.url", Url, Const(|| DEFAULT_UPSTREAM_URL.into()),
            "scheme + host (+ port); `http://` for tests"),
        key!("upstream.failover", List, Const(|| "[]".into()),
            "more hosts, in order, e.g. `[https://api2.weixin.qq.com]` (WeChat's documented second host); each has its own pool and warm connections"),
        key!("upstream.failover_after", Integer, Const(|| DEFAULT_FAILOVER_AFTER.to_string()),
            "connect failures in a row that take a host out of use", bounds = "≥ 1"),
        key!("upstream.probe_interval", Duration, Const(|| dur(DEFAULT_PROBE_INTERVAL)),
            "how often a host out of use is probed; a successful connect puts it back", bounds = "> 0"),
        key!("upstream.ca_file", Path, Text("none"),
            "extra PEM CA bundle, **added** to the system roots"),
        key!("upstream.connect_timeout", Duration, Const(|| dur(DEFAULT_CONNECT_TIMEOUT)),
            "TCP + TLS connect, per address tried", bounds = "> 0"),
        key!("upstream.read_timeout", Duration, Const(|| dur(DEFAULT_READ_TIMEOUT)),
            "waiting for an answer (and each body piece)", bounds = "> 0"),
        key!("upstream.answer_timeout", Duration, Const(|| dur(DEFAULT_ANSWER_TIMEOUT)),
            "a whole answer, head and body: 504",
            reason = "20 MB of media at ~1 Mbit/s", bounds = "> 0"),
        key!("upstream.warm_connections", Integer, Const(|| DEFAULT_WARM_CONNECTIONS.to_string()),
            "TLS connections opened at start and kept warm in the pool"),
        key!("upstream.idle_timeout", Duration, Const(|| dur(DEFAULT_IDLE_TIMEOUT)),
            "idle pooled connections are closed after this; the pool is re-warmed every 0.8 × this",
            reason = "under the 60 s after which servers commonly close idle connections", bounds = "> 0"),
        key!("upstream.dns", List, Const(|| "[]".into()),
            "nameservers for the upstream hosts (`10.96.0.10` or `10.96.0.10:53`); empty: those of `/etc/resolv.conf`; with `intercept`, `/etc/hosts` is never read for them"),
        key!("upstream.http2", Bool, Const(|| DEFAULT_HTTP2.to_string()),
            "offer HTTP/2 by ALPN: JSON calls and token fetches share multiplexed connections (HTTP/1.1 from the first connection the server declines h2 on); streamed uploads stay on HTTP/1.1",
            reason = "over a 40 ms WAN, 16 pushes at once kept p99 at one round trip (BENCHMARKS.md, A)"),
        key!("upstream.proxy", Url, Text("none"),
            "a forward proxy every connection to WeChat goes through (a fixed egress IP): `http://[user:pass@]host[:port]`, each connection a `CONNECT` tunnel with TLS to WeChat inside; masked everywhere",
            secret = true),
        key!("upstream.proxy_file", Path, Text("none"), "`upstream.proxy`'s URL in a file (trimmed)"),
        key!("wecom_upstream", Section, Text("`url: https://qyapi.weixin.qq.com`, the rest as `upstream`"),
            "the hosts of `kind: wecom` accounts; the same keys as `upstream` (`wecom_upstream.url`, …)"),
        // accounts
        key!("accounts", List, Text("none"), "the accounts whose tokens the sidecar holds (may be empty with `platforms`)"),
        key!("accounts[].name", Text, Required, "free-form, unique"),
        key!("accounts[].kind", Text, Text("`official`"),
            "`official` (Official Account / mini program: appid + appsecret) or `wecom` (corpid + one WeCom app's secret)"),
        key!("accounts[].appid", Text, Text("required for `official`"), "unique"),
        key!("accounts[].corpid", Text, Text("required for `wecom`"), "several WeCom apps of one corp share it"),
        key!("accounts[].agentid", Text, Text("none"), "WeCom app label; corpid + agentid must be unique"),
        key!("accounts[].secret", Secret, Text("this or `secret_file`"), "the appsecret (`${ENV}` works)", secret = true),
        key!("accounts[].secret_file", Path, Text("this or `secret`"), "the appsecret from a file (trimmed)"),
        key!("accounts[].token_api", Text, Text("`stable`"),
            "`official` accounts: `stable` (`POST /cgi-bin/stable_token`) or `classic` (`GET /cgi-bin/token`); `wecom` accounts always use `gettoken`",
            reason = "the stable API does not invalidate other holders' tokens"),
        key!("accounts[].default", Bool, Text("implied with one account"), "used when a request names no account; at most one"),
        key!("accounts[].replace_tokens", Text, Text("`issued`"),
            "`issued`: replace only tokens this sidecar handed out; `always`: replace any token"),
        key!("accounts[].limits", Map, Text("none"),
            "local daily caps per API path, `{\"/cgi-bin/message/template/send\": {per_day: 90000}}`: past one the sidecar answers WeChat's 45009 itself",
            bounds = "per_day ≥ 1"),
        // token
        key!("token", Section, Text("each key's"), "how tokens are fetched, budgeted and shared",
            restart = Some(Restart {
                differs: |a, b| {
                    let store = |c: &Config| c.token.store.as_ref().map(|s| s.expose().to_string());
                    differs(&a.token, &b.token) || store(a) != store(b)
                },
                keep: |new, old| new.token = old.token.clone(),
            })),
        key!("token.refresh_before", Duration, Const(|| dur(DEFAULT_REFRESH_BEFORE)),
            "refresh this long before expiry, capped at half the token's lifetime",
            reason = "WeChat keeps the old token valid 5 minutes after a refresh", bounds = "> 0"),
        key!("token.daily_budget", Integer, Const(|| DEFAULT_DAILY_BUDGET.to_string()),
            "token fetches per account per day (UTC+8), proactive ones included; when spent, the cached token is used while it lasts, then 503 / 45009",
            reason = "WeChat allows 2,000 a day; a tenth leaves room for other holders", bounds = "≥ 1"),
        key!("token.budget_reserve", Integer, Text("20 % of `daily_budget`"),
            "fetches of the day forced refreshes never spend: kept for automatic ones",
            bounds = "< daily_budget"),
        key!("token.failed_retry", Duration, Const(|| dur(DEFAULT_FAILED_RETRY)),
            "how often a fetch that failed hard (40125, 40013, 40164, …) is retried", bounds = "> 0"),
        key!("token.store", Secret, Const(|| "memory".into()),
            "`memory`, or a Redis URL shared by replicas: `redis://[:password@]host:port/db` or `rediss://…`; the password masked everywhere",
            secret = true),
        key!("token.store_prefix", Text, Const(|| DEFAULT_STORE_PREFIX.into()),
            "Redis key prefix, so deployments can share a Redis"),
        key!("token.on_store_error", Text, Text("`wait` for classic, `fetch` otherwise"),
            "when Redis is unreachable and a refresh is due: `wait` (a lone classic fetch invalidates the other replicas' token) or `fetch`"),
        key!("token.store_lock_ttl", Duration, Text("connect + read timeout + 2 s"),
            "how long a refresh lock lives: longer than a fetch, so a crashed winner's lock expires", bounds = "> 0"),
        // clients
        key!("clients", Section, Text("open (loopback only)"), "who may call the app listener"),
        key!("clients.allow", List, Const(|| "[]".into()),
            "CIDRs (or addresses) that may call; others get 403 / errcode 40164"),
        key!("clients.tokens", List, Const(|| "[]".into()),
            "one bearer token per calling app (`Authorization: Bearer …`, constant-time, never forwarded); others get 403 / errcode 48001"),
        key!("clients.tokens[].name", Text, Required, "the calling app, in logs and metrics"),
        key!("clients.tokens[].token", Secret, Text("this or `token_file`"), "its token (`${ENV}` works)", bounds = "≥ 16 characters", secret = true),
        key!("clients.tokens[].token_file", Path, Text("this or `token`"), "its token from a file (trimmed)"),
        key!("clients.tokens[].accounts", List, Text("every account"),
            "the accounts (or platforms: their component calls and every authoriser) it may use"),
        key!("clients.rate_limit", Section, Text("none"), "token buckets; over one: 429 / errcode 45011 with `Retry-After`"),
        key!("clients.rate_limit.per_client", Map, Text("none"), "`{rps, burst}` per client (token name or address)"),
        key!("clients.rate_limit.per_account", Map, Text("none"), "`{rps, burst}` per account"),
        // reload
        key!("reload", Section, Text("each key's"), "reload without restart (see operations)"),
        key!("reload.watch", Bool, Const(|| "true".into()),
            "re-read the config when it or a file it names changes"),
        key!("reload.interval", Duration, Const(|| dur(DEFAULT_RELOAD_INTERVAL)),
            "how often the watched files are read and compared", bounds = "> 0"),
        // intercept
        key!("intercept", Section, Text("off"), "transparent mode: the sidecar answers as WeChat's hosts (see transparent mode)",
            restart = restart!(intercept)),
        key!("intercept.ca_cert", Path, Text("this or `ca_cert_env`"), "the local CA's certificate (PEM file)"),
        key!("intercept.ca_cert_env", Text, Text("this or `ca_cert`"), "the environment variable holding that PEM"),
        key!("intercept.ca_key", Path, Text("this or `ca_key_env`"), "its private key; must belong to the certificate; never shown"),
        key!("intercept.ca_key_env", Text, Text("this or `ca_key`"), "the environment variable holding the key's PEM"),
        key!("intercept.hosts", List, Text("the six WeChat API hosts"), "names the leaf covers and the listeners accept"),
        key!("intercept.https_listen", Address, Text("off"), "TLS for the intercepted hosts; off loopback requires `clients`"),
        key!("intercept.http_listen", Address, Text("off"), "plain HTTP for the intercepted hosts"),
        key!("intercept.proxy_listen", Address, Text("off"), "forward proxy for `HTTPS_PROXY` / `HTTP_PROXY`"),
        key!("intercept.leaf_lifetime", Duration, Const(|| dur(super::intercept::DEFAULT_LEAF_LIFETIME)),
            "the leaf's validity; re-signed while running when a third of it is left", reason = "30 days", bounds = "> 0"),
        // platforms
        key!("platforms", List, Text("none"), "third-party platforms (see platforms)", restart = restart!(platforms)),
        key!("platforms[].name", Text, Required, "unique"),
        key!("platforms[].component_appid", Text, Required, "the platform's appid"),
        key!("platforms[].component_secret", Secret, Text("this or `_file`"), "its appsecret", secret = true),
        key!("platforms[].component_secret_file", Path, Text("this or the inline one"), "its appsecret from a file"),
        key!("platforms[].token", Secret, Text("this or `_file`"), "the callback token", secret = true),
        key!("platforms[].token_file", Path, Text("this or the inline one"), "the callback token from a file"),
        key!("platforms[].encoding_aes_key", Secret, Text("this or `_file`"), "the callback key", bounds = "43 characters", secret = true),
        key!("platforms[].encoding_aes_key_file", Path, Text("this or the inline one"), "the callback key from a file"),
        key!("platforms[].state_file", Path, Text("none"), "where authorisers' refresh tokens are kept with the memory store"),
        key!("platforms[].authorizers", List, Text("none"), "seed: `[{appid, refresh_token / refresh_token_file}]`"),
        key!("platforms[].authorizers[].appid", Text, Required, "the authoriser's appid"),
        key!("platforms[].authorizers[].refresh_token", Secret, Text("this or `_file`"), "its refresh token", secret = true),
        key!("platforms[].authorizers[].refresh_token_file", Path, Text("this or the inline one"), "its refresh token from a file"),
        key!("platforms[].idle_after", Duration, Const(|| dur(super::platform::DEFAULT_IDLE_AFTER)),
            "an authoriser unused this long leaves memory (back on its next request)", bounds = "> 0"),
        key!("platforms[].callback_max_age", Duration, Const(|| dur(super::platform::DEFAULT_CALLBACK_MAX_AGE)),
            "a callback whose signed timestamp is further from the host's clock is refused as a replay",
            reason = "WeChat retries a callback within seconds", bounds = "30s – 1h"),
        key!("platforms[].forward_events", Url, Text("none"), "the app's handler for events"),
        key!("platforms[].forward_format", Text, Text("`wechat`"), "`wechat` (signed as WeChat sends them) or `plain`"),
    ]
}

/// The keys a reload found changed that only a restart applies, with the
/// running values kept in `new`.
pub fn restart_needed(old: &Config, new: &mut Config) -> Vec<String> {
    let mut needed = Vec::new();
    for k in keys() {
        if let Some(r) = &k.restart {
            if (r.differs)(old, new) {
                (r.keep)(new, old);
                needed.push(k.name.to_string());
            }
        }
    }
    needed
}

/// Checks every lower bound the table declares (`> 0` for a duration,
/// `≥ 1` for a count) on the checked configuration, as `check --print`
/// shows it: in list items too (`platforms[2].…`), in `wecom_upstream` as in
/// `upstream`. Only the sections that hold a bounded key are serialised
/// (never the accounts: 10,000 of them would be megabytes at every start).
pub(super) fn check_bounds(c: &Config, problems: &mut Vec<String>) {
    use serde_yaml_ng::{Mapping, Value};
    let section = |name: &str| -> Value {
        let v = match name {
            "threads" => Ok(Value::from(c.threads as u64)),
            "shutdown_grace" => Ok(Value::from(dur(c.shutdown_grace))),
            "limits" => serde_yaml_ng::to_value(&c.limits),
            "admin" => serde_yaml_ng::to_value(&c.admin),
            "upstream" => serde_yaml_ng::to_value(&c.upstream),
            "wecom_upstream" => serde_yaml_ng::to_value(&c.wecom_upstream),
            "token" => serde_yaml_ng::to_value(&c.token),
            "reload" => serde_yaml_ng::to_value(&c.reload),
            "platforms" => serde_yaml_ng::to_value(&c.platforms),
            "intercept" => serde_yaml_ng::to_value(&c.intercept),
            other => unreachable!("{other}: a bounded key's section is not serialised"),
        };
        v.unwrap_or(Value::Null)
    };
    fn zero(kind: Kind, v: &Value) -> bool {
        match kind {
            Kind::Duration => {
                v.as_str().and_then(|d| parse_duration(d).ok()) == Some(Duration::ZERO)
            }
            _ => v.as_u64() == Some(0),
        }
    }
    /// Calls `f` with each value at `path` under `at`, and its name.
    fn visit(at: &Value, name: String, path: &[&str], f: &mut dyn FnMut(&str, &Value)) {
        let Some((part, rest)) = path.split_first() else {
            f(&name, at);
            return;
        };
        let join = |n: &str| {
            if name.is_empty() {
                n.to_string()
            } else {
                format!("{name}.{n}")
            }
        };
        match part.strip_suffix("[]") {
            Some(list) => {
                if let Some(items) = at.get(list).and_then(Value::as_sequence) {
                    for (i, item) in items.iter().enumerate() {
                        visit(item, join(&format!("{list}[{i}]")), rest, f);
                    }
                }
            }
            None => {
                if let Some(v) = at.get(*part) {
                    visit(v, join(part), rest, f);
                }
            }
        }
    }
    let bounded: Vec<(Key, &str)> = keys()
        .into_iter()
        .filter_map(|k| {
            let message = match (k.kind, k.bounds) {
                (Kind::Duration, "> 0") => "must be greater than zero",
                (Kind::Integer, "≥ 1") => "must be at least 1",
                _ => return None,
            };
            Some((k, message))
        })
        .collect();
    /// The sections a key stands in: its own, and `wecom_upstream` for
    /// an `upstream` key.
    fn sections(name: &str) -> Vec<&str> {
        let base = name
            .split('.')
            .next()
            .unwrap_or(name)
            .trim_end_matches("[]");
        match base {
            "upstream" => vec![base, "wecom_upstream"],
            _ => vec![base],
        }
    }
    let mut root = Mapping::new();
    for (k, _) in &bounded {
        for b in sections(k.name) {
            if !root.contains_key(b) {
                root.insert(Value::from(b), section(b));
            }
        }
    }
    let root = Value::Mapping(root);
    for (k, message) in &bounded {
        let path: Vec<&str> = k.name.split('.').collect();
        let base = path[0].trim_end_matches("[]");
        for b in sections(k.name) {
            let first = path[0].replacen(base, b, 1);
            let mut at = path.clone();
            at[0] = &first;
            let mut check = |name: &str, v: &Value| {
                if zero(k.kind, v) {
                    problems.push(format!("{name}: {message}"));
                }
            };
            visit(&root, String::new(), &at, &mut check);
        }
    }
}

/// The configuration reference, as `docs/configuration.md` holds it.
pub fn reference() -> String {
    let mut out = String::from(REFERENCE_INTRO);
    for k in keys() {
        let default = match &k.default {
            Required => "required".to_string(),
            Const(f) => format!("`{}`", f()),
            Text(t) => t.to_string(),
        };
        let mut meaning = k.doc.to_string();
        if !k.reason.is_empty() {
            meaning.push_str(&format!(" (default: {})", k.reason));
        }
        let mut flags = Vec::new();
        if !k.bounds.is_empty() {
            flags.push(k.bounds.to_string());
        }
        if k.restart.is_some() {
            flags.push("restart".into());
        }
        if k.secret {
            flags.push("secret".into());
        }
        out.push_str(&format!(
            "| `{}` | {} | {} | {} | {} |\n",
            k.name,
            k.kind.as_str(),
            default,
            flags.join(", "),
            meaning.replace('|', "\\|")
        ));
    }
    out.push_str(REFERENCE_OUTRO);
    out
}

const REFERENCE_INTRO: &str = "# Configuration reference

<!-- Generated by `wxsidecar check --reference` (`make docs`) from crates/config/src/keys.rs: edit there. -->

`wxsidecar run --config FILE` (default `conf/wxsidecar.yaml`, or `$WXSIDECAR_CONFIG`).
`wxsidecar check --config FILE` validates the file and prints what it sets up (secrets
masked); `check --print` prints the whole effective configuration, defaults filled in. On
error every problem is printed at once, each naming its key and the fix, and the exit code
is non-zero; `run` makes the same checks before it listens. Unknown keys are errors.
Durations take `ms`, `s`, `m`, `h`; sizes `B`, `KiB`, `MiB`, `KB`, `MB` (printed in bytes).
`${VAR}` is read from the environment in secrets, `appid`, URLs and paths. No error prints
a secret, URL credentials or the value given for a key. A *restart* key keeps its running
value through a reload, which names it ([operations](operations.md)); every other key
applies on reload.

| key | type | default | bounds, restart, secret | meaning |
|---|---|---|---|---|
";

const REFERENCE_OUTRO: &str = "
`conf/wxsidecar.yaml` is the commented example; `conf/minimal.yaml` the smallest file that
runs. Transparent mode's keys are explained in [transparent mode](transparent-mode.md),
platforms' in [third-party platforms](platforms.md).
";

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// The keys serde accepts where `probe` puts an unknown one, read from
    /// its refusal (`unknown field ..., expected one of `a`, `b``).
    fn accepted(probe: &str) -> BTreeSet<String> {
        let problems = Config::parse(probe).expect_err("an unknown key is refused");
        let line = problems
            .iter()
            .find(|p| p.contains("unknown field"))
            .unwrap_or_else(|| panic!("{problems:?}"));
        let list = line.split("expected").nth(1).expect("a list");
        list.split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    }

    /// The table's keys directly under `prefix` (`""`: the top level).
    fn declared(prefix: &str) -> BTreeSet<String> {
        keys()
            .iter()
            .filter_map(|k| {
                let rest = if prefix.is_empty() {
                    k.name
                } else {
                    k.name.strip_prefix(prefix)?.strip_prefix('.')?
                };
                (!rest.contains('.')).then(|| rest.to_string())
            })
            .collect()
    }

    /// Every key the parser accepts is declared, and nothing else is.
    #[test]
    fn the_table_and_the_parser_know_the_same_keys() {
        let sections: [(&str, String); 11] = [
            ("", "zzz_unknown: 1\n".into()),
            ("limits", "limits: {zzz_unknown: 1}\n".into()),
            ("admin", "admin: {zzz_unknown: 1}\n".into()),
            ("upstream", "upstream: {zzz_unknown: 1}\n".into()),
            ("token", "token: {zzz_unknown: 1}\n".into()),
            ("clients", "clients: {zzz_unknown: 1}\n".into()),
            (
                "clients.tokens[]",
                "clients: {tokens: [{zzz_unknown: 1}]}\n".into(),
            ),
            (
                "clients.rate_limit",
                "clients: {rate_limit: {zzz_unknown: 1}}\n".into(),
            ),
            ("reload", "reload: {zzz_unknown: 1}\n".into()),
            ("accounts[]", "accounts: [{zzz_unknown: 1}]\n".into()),
            ("platforms[]", "platforms: [{zzz_unknown: 1}]\n".into()),
        ];
        for (prefix, probe) in sections {
            assert_eq!(declared(prefix), accepted(&probe), "section `{prefix}`");
        }
        assert_eq!(
            declared("platforms[].authorizers[]"),
            accepted("platforms: [{authorizers: [{zzz_unknown: 1}]}]\n")
        );
        assert_eq!(
            declared("intercept"),
            accepted("intercept: {zzz_unknown: 1}\n")
        );
        // wecom_upstream takes upstream's keys.
        assert_eq!(
            accepted("wecom_upstream: {zzz_unknown: 1}\n"),
            accepted("upstream: {zzz_unknown: 1}\n")
        );
    }

    /// Each constant default is what `check --print` shows when the key is
    /// left out.
    #[test]
    fn each_constant_default_is_the_parsers() {
        let c = Config::parse(
            "accounts:\n  - name: a\n    appid: wx0123456789abcdef\n    secret: s\nplatforms:\n  - name: p\n    component_appid: wxc\n    component_secret: s\n    token: t\n    encoding_aes_key: abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG\n",
        )
        .unwrap();
        let printed: serde_yaml_ng::Value = serde_yaml_ng::from_str(&print::yaml(&c)).unwrap();
        let mut checked = 0;
        for k in keys() {
            let Const(f) = &k.default else { continue };
            if k.name.starts_with("intercept.") {
                // Its section needs a CA on disk; the default there is the
                // parser's own constant, named in the table above.
                continue;
            }
            let mut at = &printed;
            for part in k.name.split('.') {
                at = match part.strip_suffix("[]") {
                    Some(list) => &at[list][0],
                    None => &at[part],
                };
            }
            let shown = match at {
                serde_yaml_ng::Value::String(s) => s.clone(),
                serde_yaml_ng::Value::Sequence(items) => format!(
                    "[{}]",
                    items
                        .iter()
                        .map(|i| i.as_str().unwrap_or_default().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                serde_yaml_ng::Value::Null => panic!("{} is not printed", k.name),
                other => serde_yaml_ng::to_string(other).unwrap().trim().to_string(),
            };
            assert_eq!(shown, f(), "{}", k.name);
            checked += 1;
        }
        assert!(checked >= 30, "{checked} defaults checked");
    }

    /// The table's bounds are the parser's: a zero duration where it says
    /// `> 0`, a zero count where it says `≥ 1`, is refused naming the key.
    #[test]
    fn each_lower_bound_is_refused_naming_its_key() {
        let base = "accounts:\n  - name: a\n    appid: wx0123456789abcdef\n    secret: s\n";
        let mut checked = 0;
        for k in keys() {
            let zero = match (k.kind, k.bounds) {
                (Kind::Duration, "> 0") => "0s",
                (Kind::Integer, "≥ 1") => "0",
                _ => continue,
            };
            if k.name.contains("[]") || k.name.starts_with("intercept.") {
                continue;
            }
            let yaml = match k.name.split_once('.') {
                Some((section, key)) => format!("{base}{section}:\n  {key}: {zero}\n"),
                None => format!("{base}{}: {zero}\n", k.name),
            };
            let problems = Config::parse(&yaml).expect_err(k.name);
            assert!(
                problems.iter().any(|p| p.starts_with(k.name)),
                "{}: {problems:?}",
                k.name
            );
            checked += 1;
        }
        assert!(checked >= 15, "{checked} bounds checked");
    }

    /// The keys reload keeps for a restart are the table's restart keys:
    /// a change to each is named and its running value kept.
    #[test]
    fn a_restart_key_changed_is_named_and_kept() {
        let base = "accounts:\n  - name: a\n    appid: wx0123456789abcdef\n    secret: s\n";
        let old = Config::parse(base).unwrap();
        let mut new = Config::parse(&format!(
            "{base}limits:\n  send_timeout: 5s\n  body_timeout: 5s\nthreads: 2\n"
        ))
        .unwrap();
        let needed = restart_needed(&old, &mut new);
        assert_eq!(needed, ["threads", "limits.send_timeout"]);
        assert_eq!(new.limits.send_timeout, old.limits.send_timeout, "kept");
        assert_eq!(new.threads, old.threads, "kept");
        assert_eq!(new.limits.body_timeout, Duration::from_secs(5), "applied");
    }
}
