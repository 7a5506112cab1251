//! Requests answered here, from the sidecar's cache: the token endpoints
//! (`/cgi-bin/token`, `stable_token`, WeCom's `gettoken`, the secret
//! checked), an app's own ticket requests, and JS-SDK page signatures.

use std::sync::Arc;

use pingora::proxy::Session;

use super::{Ctx, Proxy, Step, DEFAULT_CREDENTIALS_LIMIT};
use crate::account::{Account, ACCOUNT_HEADER};
use crate::config::AccountKind;
use crate::jssdk;
use crate::lease::{Lease, LeaseCell};
use crate::local::{self, Credentials};
use crate::query::{self, TOKEN_PARAM};
use crate::refusal::Refusal;
use crate::reply::{self, ProxyError};
use crate::route::Route;
use crate::ticket::{self, TicketKind};

impl Proxy {
    /// The valid token for `account`, waiting for the refresher only when
    /// there is none: an expired token is never sent.
    pub(super) async fn token_for(&self, account: &Account) -> Result<Arc<Lease>, ProxyError> {
        self.valid_from(&account.tokens, &account.name, "token")
            .await
    }

    /// The valid value (token or ticket) in `cell`, waiting for its
    /// refresher only when there is none.
    async fn valid_from(
        &self,
        cell: &LeaseCell,
        account: &str,
        what: &'static str,
    ) -> Result<Arc<Lease>, ProxyError> {
        // Taken first: a fetch that fails from here on ends the wait below.
        let since = cell.fetches_ended();
        if let Some(t) = cell.valid() {
            return Ok(t);
        }
        let st = cell.status();
        if st.budget_spent.is_some() {
            return Err(ProxyError::BudgetSpent {
                account: account.to_string(),
                what,
            });
        }
        if let (true, Some((code, msg))) = (st.attempted, st.last_error) {
            return Err(ProxyError::NoToken {
                account: account.to_string(),
                what,
                reason: format!("the last fetch failed with errcode {code}: {msg}"),
            });
        }
        // A ticket fetch may first wait for the token: allow for both. A
        // fetch that fails meanwhile is the answer (not a wait to the end).
        let limit = self
            .app
            .upstream_for(crate::config::Family::Official)
            .read_timeout()
            * 2;
        let reason = match cell.wait_valid_or_failed(since, limit).await {
            Ok(t) => return Ok(t),
            Err(Some((code, msg))) => format!("the last fetch failed with errcode {code}: {msg}"),
            Err(None) => format!("timed out waiting for the {what} fetch"),
        };
        Err(ProxyError::NoToken {
            account: account.to_string(),
            what,
            reason,
        })
    }

    /// The account a ticket or JS-SDK request is for — checked to have a
    /// ticket of `kind` (of `family`, when the path names one) and to be open
    /// to the caller — and its valid ticket, fetched on first use.
    async fn ticket_for(
        &self,
        ctx: &mut Ctx,
        path: &str,
        (named, presented): (Option<&str>, Option<&str>),
        family: Option<AccountKind>,
        kind: TicketKind,
    ) -> Result<(Arc<Account>, Arc<Lease>), ProxyError> {
        let account = self.app.accounts().pick(named, presented)?.clone();
        if !kind.exists_for(account.kind) || family.is_some_and(|f| f != account.kind) {
            return Err(ProxyError::BadRequest {
                path: path.to_string(),
                reason: format!(
                    "account {} is a {} account, which has no such ticket; name another account (X-Wx-Account or account=)",
                    account.name,
                    account.kind.as_str()
                ),
            });
        }
        self.admit_account(ctx, &account)?;
        ctx.account = Some(account.clone());
        let cell = crate::refresh::ticket_cell(&self.app, &account, kind);
        let ticket = self.valid_from(cell, &account.name, kind.what()).await?;
        Ok((account.clone(), ticket))
    }

    /// Answers an app's own ticket request from the ticket cache.
    pub(super) async fn local_ticket(&self, session: &mut Session, ctx: &mut Ctx) -> Step<()> {
        let req = session.req_header();
        let path = req.uri.path().to_string();
        let q = req.uri.query().unwrap_or("");
        let (family, kind) = match ticket::answer::requested(&path, q) {
            Ok(x) => x,
            Err(r) => return self.refuse(session, r).await,
        };
        let presented = query::param(q, TOKEN_PARAM);
        let named = req
            .headers
            .get(ACCOUNT_HEADER)
            .and_then(|v| v.to_str().ok());
        let who = (named, presented.as_deref());
        let t = match self.ticket_for(ctx, &path, who, Some(family), kind).await {
            Ok((_, t)) => t,
            Err(e) => return Ok(Err(e)),
        };
        reply::send_json(session, 200, ticket::answer::body(&t)).await?;
        Ok(Ok(()))
    }

    /// `/wxsidecar/jssdk/config` and `/agent_config`: a signed
    /// configuration for one page.
    pub(super) async fn jssdk(&self, session: &mut Session, ctx: &mut Ctx) -> Step<()> {
        let req = session.req_header();
        let path = req.uri.path().to_string();
        let agent = crate::target::route_key(&path).eq_ignore_ascii_case(jssdk::AGENT_CONFIG_PATH);
        let q = req.uri.query().unwrap_or("");
        let bad = |reason: String| ProxyError::BadRequest {
            path: path.clone(),
            reason,
        };
        let Some(url) = query::param(q, "url").filter(|u| !u.is_empty()) else {
            return Ok(Err(bad(
                "url missing: pass the page's URL as url= (URL-encoded)".into(),
            )));
        };
        let page = match jssdk::page_url(&url) {
            Ok(p) => p.to_string(),
            Err(e) => return Ok(Err(bad(e))),
        };
        let named = query::param(q, "account");
        let named = named.as_deref().or_else(|| {
            req.headers
                .get(ACCOUNT_HEADER)
                .and_then(|v| v.to_str().ok())
        });
        let kind = if agent {
            TicketKind::AgentConfig
        } else {
            TicketKind::Jsapi
        };
        let (account, t) = match self.ticket_for(ctx, &path, (named, None), None, kind).await {
            Ok(x) => x,
            Err(e) => return Ok(Err(e)),
        };
        let signed = jssdk::sign(&t.value, &page);
        match jssdk::answer(&account, &signed, agent) {
            Ok(body) => {
                reply::send_json(session, 200, body).await?;
                Ok(Ok(()))
            }
            Err(e) => Ok(Err(bad(e))),
        }
    }

    /// Answers `/cgi-bin/token` and `/cgi-bin/stable_token` from the cache.
    pub(super) async fn local_token(
        &self,
        session: &mut Session,
        route: Route,
        ctx: &mut Ctx,
    ) -> Step<()> {
        let body = match self.read_body(session, DEFAULT_CREDENTIALS_LIMIT).await? {
            Ok(b) => b,
            Err(e) => return Ok(Err(e)),
        };
        let query = session.req_header().uri.query().unwrap_or("").to_string();
        // WeCom's gettoken carries corpid and corpsecret; the others appid and secret.
        let creds = match route {
            Route::LocalWeComToken => None,
            Route::LocalStableToken => {
                if session.req_header().method != http::Method::POST {
                    return self
                        .refuse(
                            session,
                            Refusal {
                                errcode: 43002,
                                errmsg: "require POST method",
                            },
                        )
                        .await;
                }
                match serde_json::from_slice::<Credentials>(&body) {
                    Ok(c) => Some(c),
                    Err(_) => {
                        return self
                            .refuse(
                                session,
                                Refusal {
                                    errcode: 47001,
                                    errmsg: "data format error",
                                },
                            )
                            .await
                    }
                }
            }
            _ => Some(Credentials::from_query(&query)),
        };
        let authenticated = {
            let accounts = self.app.accounts();
            match &creds {
                None => local::authenticate_wecom(&accounts, &query),
                Some(c) => local::authenticate(&accounts, c),
            }
            .cloned()
        };
        let account = match authenticated {
            Ok(a) => {
                ctx.account = Some(a.clone());
                if let Err(e) = self.admit_account(ctx, &a) {
                    return Ok(Err(e));
                }
                a
            }
            Err(r) => return self.refuse(session, r).await,
        };
        let mut token = match self.token_for(&account).await {
            Ok(t) => t,
            Err(e) => return Ok(Err(e)),
        };
        // An app asking to force a refresh says its token failed: treat it as
        // a compare-and-refresh report of the current token, at most as often
        // as WeChat allows force_refresh itself.
        if creds.as_ref().and_then(|c| c.force_refresh) == Some(true)
            && token
                .fetched_at
                .elapsed()
                .is_ok_and(|age| age >= local::FORCE_REFRESH_MIN_AGE)
            && account.tokens.report_invalid(&token.value)
        {
            tracing::info!(account = %account.name, "app asked for force_refresh; refreshing once");
            if let Some(fresh) = account
                .tokens
                .wait_replacement(
                    &token.value,
                    self.app
                        .upstream_for(crate::config::Family::Official)
                        .read_timeout(),
                )
                .await
            {
                token = fresh;
            } else {
                return Ok(Err(ProxyError::NoToken {
                    account: account.name.clone(),
                    what: "token",
                    reason: "the forced refresh did not finish in time".into(),
                }));
            }
        }
        let answer = local::token_answer(&token, route == Route::LocalWeComToken);
        reply::send_json(session, 200, answer).await?;
        Ok(Ok(()))
    }
}
