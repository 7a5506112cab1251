//! The admin listener: `/healthz`, `/readyz`, `/status`, `/metrics`,
//! `POST /refresh?account=NAME`, and the quota tools (`/quota`,
//! `POST /quota/clear`, `/rid`, in `quota.rs`).
//!
//! `/status` shows token ages and counters, never a token or a secret.
//! Everything but the kubelet probes (and `/metrics`, unless
//! `admin.protect_metrics`) needs `admin.token` when one is set — always
//! off loopback. A forced refresh can never burn the day's budget: one per
//! account and kind per `admin.refresh_interval`, and never the last
//! `token.budget_reserve` fetches.

mod exposition;
mod lookups;
mod quota;

use std::collections::HashMap;

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use parking_lot::Mutex;
use tokio::time::Instant;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::app::App;
use crate::reply::JSON;
use crate::status::{self, Status};

/// How long `POST /reload` waits for the outcome: a reload that adds
/// accounts waits for their first token (connect + read timeouts).
const DEFAULT_RELOAD_WAIT: Duration = Duration::from_secs(60);

pub struct Admin {
    app: Arc<App>,
    /// When each (account, kind) may be force-refreshed again.
    next_refresh: Mutex<HashMap<(String, &'static str), Instant>>,
    /// Quota resets this month, without a shared store.
    clears: quota::LocalClears,
    /// `quota/get` and `rid/get` answers, served again for a minute.
    lookups: lookups::Lookups,
    /// WeChat calls made for the admin.
    calls: lookups::AdminCalls,
}

/// Whether a request carries the admin token (`Authorization: Bearer …`),
/// compared in constant time.
fn authorized(expected: &crate::secret::Secret, auth: Option<&[u8]>) -> bool {
    crate::secret::bearer(auth).is_some_and(|t| expected.matches(t))
}

impl Admin {
    pub fn new(app: Arc<App>) -> Self {
        Admin {
            app,
            next_refresh: Mutex::new(HashMap::new()),
            clears: Default::default(),
            lookups: Default::default(),
            calls: Default::default(),
        }
    }

    /// Takes the (account, kind) refresh slot, or says how long until it is
    /// free again.
    fn take_refresh_slot(&self, account: &str, what: &'static str) -> Result<(), Duration> {
        let now = Instant::now();
        let mut slots = self.next_refresh.lock();
        let key = (account.to_string(), what);
        if let Some(at) = slots.get(&key).filter(|at| **at > now) {
            return Err(*at - now);
        }
        slots.insert(key, now + self.app.config().admin.refresh_interval);
        Ok(())
    }

    fn status(&self) -> Status {
        let app = &self.app;
        let accounts = app
            .accounts()
            .iter()
            .map(|a| {
                let st = a.tokens.status();
                let tok = a.tokens.latest();
                status::AccountStatus {
                    name: a.name.clone(),
                    kind: a.kind.as_str().into(),
                    appid: a.id.to_string(),
                    agentid: a.agentid.as_deref().map(str::to_string),
                    token_api: if a.platform.is_some() {
                        "authorizer".into()
                    } else {
                        a.token_api.as_str().into()
                    },
                    token_valid: tok.as_ref().is_some_and(|t| t.is_valid()),
                    token_fetched_unix: tok
                        .as_ref()
                        .and_then(|t| t.fetched_at.duration_since(UNIX_EPOCH).ok())
                        .map(|d| d.as_secs()),
                    token_age_seconds: tok.as_ref().and_then(|t| t.age_secs()),
                    token_expires_in_seconds: tok.as_ref().map(|t| t.remaining().as_secs()),
                    fetches_ok: st.fetches_ok,
                    fetches_today: st.fetches_today,
                    budget_left: app
                        .config()
                        .token
                        .daily_budget
                        .saturating_sub(st.fetches_today),
                    budget_spent: st.budget_spent.is_some(),
                    invalid_token_reports: st.invalid_reports.into(),
                    replays_ok: a.replays.get(true),
                    replays_failed: a.replays.get(false),
                    fetches_failed: st.fetches_failed,
                    last_error: last_error(st.last_error),
                    tickets: tickets(a),
                    quota_exhausted: a.quota.exhausted(),
                    egress_ip_seen: a.whitelist.ip_seen().map(|ip| ip.to_string()),
                    ip_whitelist_error: a.whitelist.standing().map(|r| status::IpWhitelistError {
                        errcode: r.errcode,
                        errmsg: r.message,
                        ip: r.ip.map(|ip| ip.to_string()),
                        seconds_ago: r.at.elapsed().map_or(0, |d| d.as_secs()),
                    }),
                }
            })
            .collect();
        Status {
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_seconds: app.started.elapsed().as_secs(),
            ready: app.not_ready_reason().is_none(),
            background_tasks: app.tasks.running(),
            leases_refreshed: app.refreshers.leases(),
            accounts,
            store: match &app.store {
                None => status::StoreStatus {
                    kind: "memory".into(),
                    url: None,
                    state: None,
                },
                Some(s) => status::StoreStatus {
                    kind: "redis".into(),
                    url: Some(s.url().to_string()),
                    state: Some(s.state()),
                },
            },
            platforms: app
                .platforms
                .iter()
                .map(|p| {
                    let t = p.component.latest();
                    status::PlatformStatus {
                        name: p.name.clone(),
                        component_appid: p.component_appid.clone(),
                        ticket_received: p.ticket().is_some(),
                        component_token_valid: t.as_ref().is_some_and(|t| t.is_valid()),
                        component_token_expires_in_seconds: t
                            .as_ref()
                            .map(|t| t.remaining().as_secs()),
                        component_last_error: last_error(p.component.status().last_error),
                        authorizers: p.authorizer_count(),
                        forward: p.forward.as_ref().map(|f| f.status()),
                    }
                })
                .collect(),
            admin_calls: self.calls.snapshot(),
            config_generation: app.generation.current(),
            last_reload: app.generation.last(),
            upstream: app.upstream_for(crate::config::Family::Official).status(),
            wecom_upstream: app
                .upstreams
                .has_wecom()
                .then(|| app.upstream_for(crate::config::Family::WeCom).status()),
        }
    }
}

/// A cell's last failure as `/status` shows it.
fn last_error(e: Option<(i64, String)>) -> Option<status::LastError> {
    e.map(|(errcode, errmsg)| status::LastError { errcode, errmsg })
}

/// What `/status` says of an account's tickets in use: ages and counts,
/// never a ticket.
fn tickets(a: &crate::account::Account) -> Vec<status::TicketStatus> {
    a.tickets
        .in_use()
        .map(|(kind, cell)| {
            let st = cell.status();
            let t = cell.latest();
            status::TicketStatus {
                kind: kind.as_str().into(),
                valid: t.as_ref().is_some_and(|t| t.is_valid()),
                age_seconds: t.as_ref().and_then(|t| t.age_secs()),
                expires_in_seconds: t.as_ref().map(|t| t.remaining().as_secs()),
                fetches_ok: st.fetches_ok,
                fetches_failed: st.fetches_failed,
                fetches_today: st.fetches_today,
                budget_spent: st.budget_spent.is_some(),
                last_error: last_error(st.last_error),
            }
        })
        .collect()
}

fn answer(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .body(body)
        .expect("valid response")
}

const TEXT: &str = "text/plain; charset=utf-8";

#[cfg(feature = "profiling")]
async fn profile(query: &str) -> Response<Vec<u8>> {
    let seconds = crate::query::param(query, "seconds")
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(10);
    if seconds == 0 || seconds > crate::profile::MAX_SECONDS {
        return answer(
            400,
            TEXT,
            format!("seconds must be 1..={}\n", crate::profile::MAX_SECONDS).into_bytes(),
        );
    }
    let flamegraph = crate::query::param(query, "format").as_deref() == Some("flamegraph");
    match crate::profile::cpu(seconds, flamegraph).await {
        Ok((content_type, body)) => answer(200, content_type, body),
        Err(e) => answer(409, TEXT, format!("{e}\n").into_bytes()),
    }
}

#[cfg(not(feature = "profiling"))]
async fn profile(_query: &str) -> Response<Vec<u8>> {
    answer(404, TEXT, b"built without the profiling feature\n".to_vec())
}

impl Admin {
    /// `POST /reload`: re-reads the config and answers what the reload did
    /// (200 applied or unchanged, 422 refused: the running config stays).
    async fn reload(&self) -> Response<Vec<u8>> {
        match self
            .app
            .generation
            .request("POST /reload", DEFAULT_RELOAD_WAIT)
            .await
        {
            Some(report) => {
                let status = if report.result == "failed" { 422 } else { 200 };
                let body = serde_json::to_vec(&report).expect("report serialises");
                answer(status, JSON, body)
            }
            None => {
                let body = crate::reply::error_body(
                    -1,
                    "no reload: the sidecar runs without a config file (demo), or the reload is still running; see /status last_reload",
                );
                answer(503, JSON, body.to_vec())
            }
        }
    }

    /// `POST /platform/resync?name=PLATFORM`: reads WeChat's authoriser
    /// list and keeps every refresh token in it (after lost refresh
    /// tokens); authorisers in use without a token fetch at once, the rest
    /// become accounts on their first request.
    async fn resync(&self, query: &str) -> Response<Vec<u8>> {
        let name = crate::query::param(query, "name").unwrap_or_default();
        let Some(p) = self.app.platform(&name).cloned() else {
            let body = crate::reply::error_body(
                40013,
                "no such platform; pass name=PLATFORM (platforms[].name)",
            );
            return answer(404, JSON, body.to_vec());
        };
        match crate::refresh::platform::recover(&p, &self.app.upstreams).await {
            Ok(listed) => {
                crate::refresh::platform::refetch_failed(&self.app, &p);
                tracing::info!(platform = %p.name, authorizers = listed.len(), "authoriser list resynced on the admin listener");
                let body = serde_json::json!({
                    "errcode": 0,
                    "errmsg": "ok",
                    "platform": p.name,
                    "authorizers": listed,
                });
                answer(200, JSON, body.to_string().into_bytes())
            }
            Err(e) => {
                let status = if e.contains("less than") { 429 } else { 503 };
                let body =
                    crate::reply::error_body(-1, &format!("resync of platform {}: {e}", p.name));
                answer(status, JSON, body.to_vec())
            }
        }
    }

    fn metrics(&self) -> Response<Vec<u8>> {
        let mut out = crate::metrics::render();
        exposition::write_accounts(&mut out, &self.app.accounts());
        exposition::write_platforms(&mut out, &self.app.platforms);
        answer(200, "text/plain; version=0.0.4", out)
    }

    /// `POST /refresh?account=NAME[&ticket=TYPE]`: a refresh whatever the
    /// current token (or ticket in use), through its single flight, counted
    /// against its budget.
    async fn refresh(&self, query: &str) -> Response<Vec<u8>> {
        let account = match self.named_account(query) {
            Ok(a) => a,
            Err(r) => return *r,
        };
        let (cell, ticket) = match crate::query::param(query, "ticket") {
            None => (&*account.tokens, None),
            Some(t) => match self.ticket_cell(&account, &t) {
                Ok((cell, kind)) => (cell, Some(kind)),
                // WeChat's "invalid ticket type".
                Err((status, msg)) => {
                    let body = crate::reply::error_body(40097, &msg);
                    return answer(status, JSON, body.to_vec());
                }
            },
        };
        let what = ticket.map_or("token", crate::ticket::TicketKind::what);
        if let Some(why) = cell.status().budget_spent {
            let body = crate::reply::error_body(
                45009,
                &format!("refresh of {what} for account {}: {why}", account.name),
            );
            return answer(503, JSON, body.to_vec());
        }
        let token = &self.app.config().token;
        if let Err(left) = cell.may_force_refresh(token.daily_budget, token.budget_reserve) {
            let body = crate::reply::error_body(
                45009,
                &format!(
                    "refresh of {what} for account {} refused: {left} fetches left today, kept for automatic refreshes (token.budget_reserve {})",
                    account.name, token.budget_reserve
                ),
            );
            return answer(429, JSON, body.to_vec());
        }
        if let Err(wait) = self.take_refresh_slot(&account.name, what) {
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            let body = crate::reply::error_body(
                45011,
                &format!(
                    "{what} of account {} was refreshed less than admin.refresh_interval ago; retry in {secs} s",
                    account.name
                ),
            );
            let mut r = answer(429, JSON, body.to_vec());
            r.headers_mut()
                .insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs));
            return r;
        }
        let before = cell.latest().map(|t| t.value.clone());
        let ended = cell.fetches_ended();
        cell.request_refresh();
        tracing::info!(account = %account.name, what, "refresh requested on the admin listener");
        // A ticket may wait for a new token first.
        let wait = 2
            * (self.app.config().upstream.connect_timeout
                + self.app.config().upstream.read_timeout);
        let fresh = match &before {
            // WeChat hands a ticket out again until late in its life: the
            // fetch is what was asked for, not a new value.
            Some(_) if ticket.is_some() => {
                let fetched = cell.wait_fetched(ended, wait).await;
                let failed = cell.status().last_error.is_some();
                cell.valid().filter(|_| fetched && !failed)
            }
            Some(old) => cell.wait_replacement(old, wait).await,
            None => cell.wait_valid(wait).await,
        };
        match fresh {
            Some(t) => answer(
                200,
                JSON,
                serde_json::json!({
                    "errcode": 0,
                    "errmsg": "ok",
                    "account": account.name,
                    "refreshed": what,
                    "changed": before.as_deref() != Some(&*t.value),
                    "expires_in": t.remaining().as_secs(),
                })
                .to_string()
                .into_bytes(),
            ),
            None => {
                let why = cell.status().why(&format!("no new {what} in time"));
                let body = crate::reply::error_body(
                    -1,
                    &format!(
                        "refresh of {what} for account {} failed: {why}",
                        account.name
                    ),
                );
                answer(503, JSON, body.to_vec())
            }
        }
    }
}

impl Admin {
    /// The cell of `account`'s ticket of type `t`, when it is in use. A
    /// ticket nobody has asked for yet has nothing to refresh: it is fetched
    /// on first use.
    fn ticket_cell<'a>(
        &self,
        account: &'a crate::account::Account,
        t: &str,
    ) -> Result<(&'a crate::lease::LeaseCell, crate::ticket::TicketKind), (u16, String)> {
        use crate::ticket::TicketKind;
        let Some(kind) = TicketKind::parse(t).filter(|k| k.exists_for(account.kind)) else {
            let types: Vec<&str> = TicketKind::ALL
                .into_iter()
                .filter(|k| k.exists_for(account.kind))
                .map(TicketKind::as_str)
                .collect();
            return Err((
                400,
                format!(
                    "account {} ({}) has no ticket `{t}`; its types: {}",
                    account.name,
                    account.kind.as_str(),
                    types.join(", ")
                ),
            ));
        };
        match account.tickets.get(kind) {
            Some(cell) => Ok((cell, kind)),
            None => Err((
                404,
                format!(
                    "account {}'s {} is not in use yet; it is fetched on first use",
                    account.name,
                    kind.what()
                ),
            )),
        }
    }
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        crate::guard::head_complete();
        let req = session.req_header();
        let path = req.uri.path().to_string();
        let query = req.uri.query().unwrap_or("").to_string();
        let method = req.method.clone();
        let read_only = method == http::Method::GET || method == http::Method::HEAD;
        let probe = matches!(path.as_str(), "/healthz" | "/readyz")
            || (path == "/metrics" && !self.app.config().admin.protect_metrics);
        if let Some(expected) = self.app.config().admin.token.as_ref().filter(|_| !probe) {
            let auth = req
                .headers
                .get(http::header::AUTHORIZATION)
                .map(|v| v.as_bytes());
            if !authorized(expected, auth) {
                let mut r = answer(
                    401,
                    TEXT,
                    b"unauthorized: send Authorization: Bearer <admin.token>\n".to_vec(),
                );
                r.headers_mut().insert(
                    http::header::WWW_AUTHENTICATE,
                    http::HeaderValue::from_static("Bearer"),
                );
                return r;
            }
        }
        match (path.as_str(), read_only) {
            ("/refresh", _) if method == http::Method::POST => self.refresh(&query).await,
            ("/refresh", _) => answer(
                405,
                TEXT,
                b"use POST /refresh?account=NAME[&ticket=TYPE]\n".to_vec(),
            ),
            ("/platform/resync", _) if method == http::Method::POST => self.resync(&query).await,
            ("/platform/resync", _) => answer(405, TEXT, b"use POST /platform/resync?name=PLATFORM\n".to_vec()),
            ("/reload", _) if method == http::Method::POST => self.reload().await,
            ("/reload", _) => answer(405, TEXT, b"use POST /reload\n".to_vec()),
            ("/quota/clear", _) if method == http::Method::POST => self.quota_clear(&query).await,
            ("/quota/clear", _) => answer(405, TEXT, b"use POST /quota/clear?account=NAME\n".to_vec()),
            (_, false) => answer(405, TEXT, b"method not allowed\n".to_vec()),
            ("/healthz", _) => answer(200, TEXT, b"ok\n".to_vec()),
            ("/readyz", _) => match self.app.not_ready_reason() {
                None => answer(200, TEXT, b"ready\n".to_vec()),
                Some(why) => answer(503, TEXT, format!("not ready: {why}\n").into_bytes()),
            },
            ("/status", _) => answer(
                200,
                JSON,
                serde_json::to_vec(&self.status()).expect("status serialises"),
            ),
            ("/metrics", _) => self.metrics(),
            ("/quota", _) => self.quota(&query).await,
            ("/rid", _) => self.rid(&query).await,
            ("/debug/pprof/profile", _) => profile(&query).await,
            _ => answer(
                404,
                TEXT,
                b"not found: try /healthz /readyz /status /metrics /quota?account=NAME /rid?account=NAME&rid=RID, POST /refresh?account=NAME, POST /quota/clear?account=NAME, POST /reload, POST /platform/resync?name=PLATFORM\n"
                    .to_vec(),
            ),
        }
    }
}
