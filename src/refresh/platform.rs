//! What WeChat is asked for a third-party platform: its component token
//! (with the latest `component_verify_ticket`), an authorised account's
//! token (with its refresh token, stored durably before the token is used
//! when WeChat rotates it), and the exchange of an authorisation code
//! (`api_query_auth`) that makes an authorised account.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::token::FetchError;
use crate::account::Account;
use crate::app::App;
use crate::config::AccountConfig;
use crate::failover::Families;
use crate::lease::refresher::{Fetched, Label, Refresher, SharedKey, Source};
use crate::platform::Platform;

/// WeChat's answers to these calls are a few hundred bytes.
const DEFAULT_ANSWER_LIMIT: usize = 64 * 1024;
/// WeChat's "invalid authorizer_refresh_token": the authoriser must be
/// recovered through `api_get_authorizer_list` (or authorise again).
pub const REFRESH_TOKEN_INVALID: i64 = 61023;

/// POSTs `body` as JSON to a component API and reads the answer; with it,
/// when the request was sent (a token's lifetime counts from then).
async fn post(
    families: &Families,
    path_and_query: &str,
    body: &Value,
) -> Result<(tokio::time::Instant, Value), FetchError> {
    let sent = tokio::time::Instant::now();
    let body = body.to_string();
    let (status, answer) = families
        .get(crate::config::Family::Official)
        .post_json(path_and_query, body.as_bytes(), DEFAULT_ANSWER_LIMIT)
        .await?;
    let answer = answer.map_err(|_| {
        FetchError::BadAnswer(format!(
            "HTTP {status}, body over {DEFAULT_ANSWER_LIMIT} bytes"
        ))
    })?;
    let v: Value = serde_json::from_slice(&answer)
        .map_err(|e| FetchError::BadAnswer(format!("HTTP {status}, not JSON ({e})")))?;
    if let Some(code) = v.get("errcode").and_then(Value::as_i64).filter(|c| *c != 0) {
        let errmsg = v.get("errmsg").and_then(Value::as_str).unwrap_or("");
        let query = path_and_query.split_once('?').map(|(_, q)| q);
        return Err(FetchError::wechat(code, errmsg, query, body.as_bytes()));
    }
    Ok((sent, v))
}

/// The token named `field` in `v` and its `expires_in`, counted from `sent`
/// as every token fetch is ([`Fetched::counted_from`]).
fn token_in(v: &Value, field: &str, sent: tokio::time::Instant) -> Result<Fetched, FetchError> {
    let value = v
        .get(field)
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| FetchError::BadAnswer(format!("{field} missing")))?;
    let secs = v
        .get("expires_in")
        .and_then(Value::as_u64)
        .ok_or_else(|| FetchError::BadAnswer("expires_in missing".into()))?;
    Ok(Fetched {
        value: value.to_string(),
        expires_in: Duration::from_secs(secs),
    }
    .counted_from(sent))
}

/// The component token, with the latest ticket.
pub struct ComponentSource {
    pub platform: Arc<Platform>,
    pub families: Arc<Families>,
}

impl Source for ComponentSource {
    type Error = FetchError;

    fn label(&self) -> Label<'_> {
        Label {
            account: &self.platform.name,
            id: &self.platform.component_appid,
            what: "component token",
            api: "component",
        }
    }

    async fn fetch(&mut self, _rejected: Option<&str>) -> Result<Fetched, FetchError> {
        let p = &self.platform;
        let ticket = p.find_ticket().await.ok_or_else(|| {
            FetchError::NoToken(format!(
                "no component_verify_ticket yet for platform {}: WeChat pushes one every 10 minutes to POST /wxsidecar/platform/{}/callback",
                p.name, p.name
            ))
        })?;
        let body = json!({
            "component_appid": p.component_appid,
            "component_appsecret": p.component_secret.expose(),
            "component_verify_ticket": ticket,
        });
        let (sent, v) = post(
            &self.families,
            "/cgi-bin/component/api_component_token",
            &body,
        )
        .await?;
        token_in(&v, "component_access_token", sent)
    }
}

/// An authorised account's token, with its refresh token.
pub struct AuthorizerSource {
    pub account: Arc<Account>,
    pub platform: Arc<Platform>,
    pub families: Arc<Families>,
}

impl Source for AuthorizerSource {
    type Error = FetchError;

    fn label(&self) -> Label<'_> {
        Label {
            account: &self.account.name,
            id: &self.account.id,
            what: "authorizer token",
            api: "authorizer",
        }
    }

    async fn fetch(&mut self, _rejected: Option<&str>) -> Result<Fetched, FetchError> {
        match self.fetch_once().await {
            // The refresh token is lost or stale: recover it from WeChat's
            // authoriser list (spaced), then try once more.
            Err(e) if is_lost(&e) => {
                let (p, appid) = (&self.platform, &self.account.id);
                tracing::warn!(platform = %p.name, account = %appid, error = %e, "refresh token lost or invalid; recovering it through api_get_authorizer_list");
                match recover(p, &self.families).await {
                    Ok(_) if p.refresh_token(appid).is_some() => self.fetch_once().await,
                    Ok(_) => Err(FetchError::NoToken(format!(
                        "{appid} is not in platform {}'s authoriser list: it must authorise again",
                        p.name
                    ))),
                    Err(r) => Err(FetchError::NoToken(format!("{e}; recovery: {r}"))),
                }
            }
            other => other,
        }
    }
}

/// A refresh token WeChat no longer takes (61023), or none at all.
fn is_lost(e: &FetchError) -> bool {
    match e {
        FetchError::WeChat { errcode, .. } => *errcode == REFRESH_TOKEN_INVALID,
        FetchError::NoToken(m) => m.starts_with("no authorizer_refresh_token"),
        _ => false,
    }
}

/// Authorisers listed per call (WeChat's maximum).
const LIST_PAGE: u64 = 500;
/// Pages read at most in one recovery (100,000 authorisers): an answer
/// that never ends (a `total_count` it never reaches) stops here.
const DEFAULT_MAX_LIST_PAGES: u64 = 200;
/// Recovery asks WeChat for the list at most this often per platform.
const DEFAULT_RECOVERY_SPACING: Duration = Duration::from_secs(60);

/// Reads WeChat's authoriser list (every page) and keeps every refresh
/// token in it, durably; the appids listed. At most once per
/// [`DEFAULT_RECOVERY_SPACING`] per platform.
pub async fn recover(p: &Platform, families: &Families) -> Result<Vec<String>, String> {
    {
        let mut last = p.last_recovery.lock();
        if last.is_some_and(|t| t.elapsed() < DEFAULT_RECOVERY_SPACING) {
            return Err(format!(
                "the authoriser list was read less than {}s ago",
                DEFAULT_RECOVERY_SPACING.as_secs()
            ));
        }
        *last = Some(tokio::time::Instant::now());
    }
    let wait = families.get(crate::config::Family::Official).read_timeout();
    let component = component_token(p, wait).await.map_err(|e| e.to_string())?;
    let path = format!(
        "/cgi-bin/component/api_get_authorizer_list?component_access_token={}",
        component.value
    );
    let mut listed = Vec::new();
    let mut offset = 0;
    for _ in 0..DEFAULT_MAX_LIST_PAGES {
        let body =
            json!({ "component_appid": p.component_appid, "offset": offset, "count": LIST_PAGE });
        let (_, v) = post(families, &path, &body)
            .await
            .map_err(|e| format!("api_get_authorizer_list: {e}"))?;
        let page = v["list"].as_array().cloned().unwrap_or_default();
        for a in &page {
            if let (Some(id), Some(rt)) =
                (a["authorizer_appid"].as_str(), a["refresh_token"].as_str())
            {
                p.share_refresh_token(id, rt).await?;
                listed.push(id.to_string());
            }
        }
        offset += page.len() as u64;
        let total = v["total_count"].as_u64().unwrap_or(0);
        if page.is_empty() || offset >= total {
            break;
        }
    }
    p.persist().await?;
    tracing::info!(platform = %p.name, authorizers = listed.len(), "authoriser list read; refresh tokens kept");
    Ok(listed)
}

impl AuthorizerSource {
    async fn fetch_once(&mut self) -> Result<Fetched, FetchError> {
        let (p, appid) = (&self.platform, &self.account.id);
        let wait = self
            .families
            .get(crate::config::Family::Official)
            .read_timeout();
        let component = component_token(p, wait).await?;
        let refresh = p.find_refresh_token(appid).await.ok_or_else(|| {
            FetchError::NoToken(format!(
                "no authorizer_refresh_token for {appid} on platform {}",
                p.name
            ))
        })?;
        let body = json!({
            "component_appid": p.component_appid,
            "authorizer_appid": appid,
            "authorizer_refresh_token": refresh.expose(),
        });
        let path = format!(
            "/cgi-bin/component/api_authorizer_token?component_access_token={}",
            component.value
        );
        let (sent, v) = match post(&self.families, &path, &body).await {
            Err(FetchError::WeChat { errcode, .. })
                if crate::inspect::INVALID_TOKEN.contains(&errcode) =>
            {
                // The component token, not the account: refresh it, retry.
                p.component.report_invalid(&component.value);
                return Err(FetchError::NoToken(format!(
                    "platform {}'s component token was rejected ({errcode}); refreshing it",
                    p.name
                )));
            }
            other => other?,
        };
        let fetched = token_in(&v, "authorizer_access_token", sent)?;
        if let Some(rotated) = v.get("authorizer_refresh_token").and_then(Value::as_str) {
            if p.refresh_token(appid).is_none_or(|t| t.expose() != rotated) {
                // Durable before the new token is used.
                if let Err(e) = p.keep_refresh_token(appid, rotated).await {
                    tracing::error!(account = %appid, error = %e, "rotated refresh token not kept");
                }
            }
        }
        Ok(fetched)
    }
}

/// The platform's component token, waiting up to `wait` for one.
async fn component_token(
    p: &Platform,
    wait: Duration,
) -> Result<Arc<crate::lease::Lease>, FetchError> {
    // Without a ticket no component token can come: fail now, not later.
    let wait = if p.find_ticket().await.is_none() {
        Duration::ZERO
    } else {
        wait
    };
    p.component.wait_valid(wait).await.ok_or_else(|| {
        let why = p.component.status().why("not fetched yet");
        FetchError::NoToken(format!(
            "platform {}'s component token is not available ({why})",
            p.name
        ))
    })
}

/// Starts every platform's component-token refresher and event hand-off.
pub fn start_platforms(app: &App) {
    for p in &app.platforms {
        if let Some(f) = &p.forward {
            app.tasks.spawn("platform events", f.clone().run(p.clone()));
        }
        let shared = app.store.as_ref().map(|store| SharedKey {
            store: store.clone(),
            key: store.token_key("component", &p.component_appid),
            budget_id: format!("component:{}", p.component_appid),
        });
        let settings = app.refresh_settings(crate::config::OnStoreError::Fetch);
        let source = ComponentSource {
            platform: p.clone(),
            families: app.upstreams.clone(),
        };
        app.refreshers.add(Refresher::new(
            p.component.clone(),
            source,
            shared,
            settings,
        ));
    }
}

/// Exchanges an authorisation code (an `authorized` or `updateauthorized`
/// event) for the authoriser's refresh token, stores it durably, and makes
/// the authoriser an account. Its appid.
pub async fn authorize(app: &Arc<App>, p: &Arc<Platform>, code: &str) -> Result<String, String> {
    let wait = app
        .upstream_for(crate::config::Family::Official)
        .read_timeout()
        * 2;
    let component = component_token(p, wait).await.map_err(|e| e.to_string())?;
    let body = json!({ "component_appid": p.component_appid, "authorization_code": code });
    let path = format!(
        "/cgi-bin/component/api_query_auth?component_access_token={}",
        component.value
    );
    let (_, v) = post(&app.upstreams, &path, &body)
        .await
        .map_err(|e| format!("api_query_auth: {e}"))?;
    let info = &v["authorization_info"];
    let appid = info["authorizer_appid"]
        .as_str()
        .filter(|a| !a.is_empty())
        .ok_or("api_query_auth: authorizer_appid missing")?
        .to_string();
    let refresh = info["authorizer_refresh_token"]
        .as_str()
        .filter(|t| !t.is_empty())
        .ok_or("api_query_auth: authorizer_refresh_token missing")?;
    p.keep_refresh_token(&appid, refresh).await?;
    add_authorizer(app, p, &appid).await;
    Ok(appid)
}

/// Makes `appid` (with a refresh token on `p`) an account, if it is not.
pub async fn add_authorizer(app: &Arc<App>, p: &Arc<Platform>, appid: &str) {
    add_authorizers(app, p, &[appid.to_string()]).await
}

/// [`add_authorizer`] for every authoriser waiting: one new table, not
/// one each.
async fn add_authorizers(app: &Arc<App>, p: &Arc<Platform>, appids: &[String]) {
    p.pending_adds.lock().extend_from_slice(appids);
    let _editing = app.accounts_edit.lock().await;
    // Ours and every other waiting one; none when an edit before this one
    // took ours (it is in the table by now).
    let appids = std::mem::take(&mut *p.pending_adds.lock());
    let current = app.accounts_full();
    let mut add: Vec<AccountConfig> = Vec::new();
    for a in &appids {
        let known = current.by_appid(a).is_some_and(|x| x.platform.is_some());
        if !known && !add.iter().any(|c| &c.appid == a) {
            add.push(AccountConfig::authorizer(&p.name, a));
        }
    }
    if add.is_empty() {
        return;
    }
    let edited = current.edited(add, |_| false);
    app.publish_accounts(edited.accounts);
    let one_by_one = edited.added.len() <= 10;
    for a in &edited.added {
        super::start(app, a, super::Subject::Token);
        if one_by_one {
            tracing::info!(platform = %p.name, account = %a.id, "account authorised the platform; its token is kept from now on");
        }
    }
    if !one_by_one {
        tracing::info!(platform = %p.name, accounts = edited.added.len(), "authorised accounts added; their tokens are kept from now on");
    }
}

/// After refresh tokens came back (a resync): every authoriser of `p` in
/// use without a valid token fetches now, with the token it has now.
pub fn refetch_failed(app: &App, p: &Platform) {
    for a in app.accounts().iter() {
        if a.platform.as_deref() == Some(p.name.as_str()) && a.tokens.valid().is_none() {
            a.tokens.request_fetch();
        }
    }
}

/// Removes an authoriser that revoked its authorisation.
pub async fn remove_authorizer(app: &Arc<App>, p: &Arc<Platform>, appid: &str) {
    p.forget(appid).await;
    let _editing = app.accounts_edit.lock().await;
    let current = app.accounts_full();
    let edited = current.edited(Vec::new(), |a| {
        &*a.id == appid && a.platform.as_deref() == Some(p.name.as_str())
    });
    app.publish_accounts(edited.accounts);
    for a in &edited.removed {
        a.retire();
        current.forget(a);
        tracing::info!(platform = %p.name, account = %a.id, "account revoked its authorisation; removed");
    }
}

/// Drops authorised accounts unused for their platform's `idle_after`:
/// their refresher stops and they leave the table; the refresh token stays,
/// and the next request makes the account again. Runs for the app's life.
pub async fn sweep_idle(app: Arc<App>) {
    let Some(shortest) = app.platforms.iter().map(|p| p.idle_after).min() else {
        return;
    };
    let every = (shortest / 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
    loop {
        tokio::time::sleep(every).await;
        let idle = |a: &Account| {
            a.platform.as_deref().is_some_and(|name| {
                app.platform(name)
                    .is_some_and(|p| u64::from(a.idle_secs()) >= p.idle_after.as_secs())
            })
        };
        if !app.accounts_full().iter().any(|a| idle(a)) {
            continue;
        }
        let _editing = app.accounts_edit.lock().await;
        let current = app.accounts_full();
        let edited = current.edited(Vec::new(), |a| idle(a));
        app.publish_accounts(edited.accounts);
        for a in &edited.removed {
            a.retire();
            current.forget(a);
        }
        tracing::info!(
            accounts = edited.removed.len(),
            "idle authorised accounts dropped from memory; their refresh tokens stay"
        );
    }
}
