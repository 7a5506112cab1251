//! An app's own calls to `/cgi-bin/component/*`, when platforms are
//! configured: `api_component_token` and `api_authorizer_token` are
//! answered from the sidecar's cache (the secret checked, as for
//! `/cgi-bin/token`), so the app's SDK never fetches (and never
//! invalidates) what the sidecar holds; every other component API gets the
//! platform's component token, in the parameter the caller used
//! (`component_access_token` or `access_token`), else `access_token`.

use bytes::Bytes;
use serde_json::{json, Value};

use super::{Ctx, Plan, Proxy, Step};
use crate::account::ACCOUNT_HEADER;
use crate::config::Family;
use crate::platform::Platform;
use crate::query;
use crate::reply::{self, ProxyError};

const COMPONENT_TOKEN_PARAM: &str = "component_access_token";

impl Proxy {
    pub(super) async fn component(
        &self,
        session: &mut pingora::proxy::Session,
        ctx: &mut Ctx,
    ) -> Step<()> {
        let req = session.req_header();
        let path = crate::target::route_key(req.uri.path()).to_string();
        let bad = |reason: String| ProxyError::BadRequest {
            path: path.clone(),
            reason,
        };
        // Which platform: X-Wx-Account (its name or component appid), else
        // the only one.
        let named = req
            .headers
            .get(ACCOUNT_HEADER)
            .and_then(|v| v.to_str().ok());
        let platform = match named {
            Some(n) => self
                .app
                .platforms
                .iter()
                .find(|p| p.name == n || p.component_appid == n),
            None if self.app.platforms.len() == 1 => self.app.platforms.first(),
            None => {
                return Ok(Err(bad(
                    "several platforms: name one with X-Wx-Account (platforms[].name or component_appid)".into(),
                )))
            }
        };
        let Some(platform) = platform.cloned() else {
            return Ok(Err(bad(format!(
                "X-Wx-Account `{}` is not a configured platform",
                named.unwrap_or("").chars().take(64).collect::<String>()
            ))));
        };
        // A client limited to some accounts drives a platform only when it
        // lists the platform: its component token reaches every authoriser.
        if let Err(e) = self.admit_name(ctx, &platform.name, Some(&platform.name)) {
            return Ok(Err(e));
        }
        let wait = self.app.upstream_for(Family::Official).read_timeout() * 2;
        match path.as_str() {
            "/cgi-bin/component/api_component_token" => {
                let body = match self
                    .read_body(session, self.app.config().limits.buffered_body)
                    .await?
                {
                    Ok(b) => b,
                    Err(e) => return Ok(Err(e)),
                };
                let v: Value = serde_json::from_slice(&body).unwrap_or_default();
                let field = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                if field("component_appid") != platform.component_appid {
                    return answer(
                        session,
                        200,
                        json!({ "errcode": 61005, "errmsg": "component_appid is invalid" }),
                    )
                    .await;
                }
                if !platform
                    .component_secret
                    .matches(&field("component_appsecret"))
                {
                    return answer(
                        session,
                        200,
                        json!({ "errcode": 61006, "errmsg": "component_appsecret is invalid" }),
                    )
                    .await;
                }
                let Some(t) = platform.component.wait_valid(wait).await else {
                    return Ok(Err(no_component(&platform)));
                };
                answer(
                    session,
                    200,
                    json!({ "component_access_token": &*t.value, "expires_in": t.remaining().as_secs() }),
                )
                .await
            }
            "/cgi-bin/component/api_authorizer_token" => {
                let body = match self
                    .read_body(session, self.app.config().limits.buffered_body)
                    .await?
                {
                    Ok(b) => b,
                    Err(e) => return Ok(Err(e)),
                };
                // As WeChat asks: the caller proves it holds the component
                // token (one we hold), else it learns no authoriser's token.
                let q = session.req_header().uri.query().unwrap_or("").to_string();
                let presented = query::param(&q, COMPONENT_TOKEN_PARAM)
                    .or_else(|| query::param(&q, query::TOKEN_PARAM))
                    .map(|v| v.into_owned())
                    .unwrap_or_default();
                let held = platform.component.valid();
                if !held.is_some_and(|t| {
                    crate::secret::constant_time_eq(t.value.as_bytes(), presented.as_bytes())
                }) {
                    return answer(
                        session,
                        200,
                        json!({ "errcode": 40001, "errmsg": "invalid credential, component_access_token is invalid or not latest" }),
                    )
                    .await;
                }
                let v: Value = serde_json::from_slice(&body).unwrap_or_default();
                let appid = v
                    .get("authorizer_appid")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                let authorised = || {
                    self.app
                        .accounts()
                        .by_appid(&appid)
                        .filter(|a| a.platform.as_deref() == Some(platform.name.as_str()))
                        .cloned()
                };
                // Not in memory (unused past idle_after, or known only by
                // its refresh token): made an account as on any request.
                let account = match authorised() {
                    Some(a) => Some(a),
                    None => {
                        self.adopt_authorizer(&appid).await;
                        authorised()
                    }
                };
                let Some(account) = account else {
                    return Ok(Err(bad(format!(
                        "authorizer `{}` has not authorised platform {}",
                        appid.chars().take(64).collect::<String>(),
                        platform.name
                    ))));
                };
                ctx.account = Some(account.clone());
                let Some(t) = account.tokens.wait_valid(wait).await else {
                    return Ok(Err(ProxyError::NoToken {
                        account: account.name.clone(),
                        what: "authorizer token",
                        reason: account.tokens.status().why("not fetched yet"),
                    }));
                };
                // The latest refresh token too: the app may keep its own copy.
                let refresh = platform
                    .refresh_token(&appid)
                    .map(|r| r.expose().to_string());
                answer(
                    session,
                    200,
                    json!({
                        "authorizer_access_token": &*t.value,
                        "expires_in": t.remaining().as_secs(),
                        "authorizer_refresh_token": refresh,
                    }),
                )
                .await
            }
            _ => {
                let Some(t) = platform.component.wait_valid(wait).await else {
                    return Ok(Err(no_component(&platform)));
                };
                let q = req.uri.query().map(str::to_string);
                let q_ref = q.as_deref().unwrap_or("");
                // Where the caller put a component token, and whether it is
                // ours to replace (none, or one we hold): a foreign one stays.
                let (param, presented) = match query::param(q_ref, COMPONENT_TOKEN_PARAM) {
                    Some(v) => (COMPONENT_TOKEN_PARAM, Some(v.into_owned())),
                    None => (
                        query::TOKEN_PARAM,
                        query::param(q_ref, query::TOKEN_PARAM).map(|v| v.into_owned()),
                    ),
                };
                let ours = presented
                    .as_deref()
                    .is_none_or(|p| p.is_empty() || p == &*t.value);
                // Ours: put in, and masked in whatever comes back (an echo
                // must not hand the app what only the component secret buys).
                let mut plan = Plan::untouched(Family::Official);
                if ours {
                    plan.token_param = param;
                    plan.token = Some(t);
                    // Rejected by WeChat: compare-and-refresh, then replayed
                    // once, as an account's call is.
                    plan.cell = Some(platform.component.clone());
                }
                self.forward(session, plan, ctx).await
            }
        }
    }
}

fn no_component(p: &Platform) -> ProxyError {
    ProxyError::NoToken {
        account: p.name.clone(),
        what: "component token",
        reason: p
            .component
            .status()
            .why("not fetched yet (no ticket pushed yet?)"),
    }
}

async fn answer(session: &mut pingora::proxy::Session, status: u16, v: Value) -> Step<()> {
    reply::send_json(session, status, Bytes::from(v.to_string())).await?;
    Ok(Ok(()))
}
