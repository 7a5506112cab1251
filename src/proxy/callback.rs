//! `POST /wxsidecar/platform/{name}/callback`: the third-party platform's
//! authorisation events, as WeChat sends them (the platform's app forwards
//! the request as received, or WeChat's URL points at the sidecar through
//! an ingress). Authenticated by `msg_signature`, not by `clients`: a bad
//! signature is refused (403) and nothing is stored; so is a stale one, and
//! one already acted on is answered without acting again
//! (`platform::replay`). Tickets are kept, an
//! authorisation code is exchanged at once, a revocation removes the
//! account; the answer is WeChat's expected `success`.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

use super::{Ctx, Proxy, Step};
use crate::msgcrypt::{xml_field, Signature};
use crate::query;
use crate::refresh::platform as ops;
use crate::reply::ProxyError;

/// Where the callbacks are served: `{PREFIX}{name}/callback`.
pub const PREFIX: &str = "/wxsidecar/platform/";

/// WeChat's events are a few hundred bytes of XML: this route takes anyone's
/// request until its signature is checked, so it reads no more than this.
const DEFAULT_CALLBACK_BODY: usize = 64 * 1024;

impl Proxy {
    pub(super) async fn platform_callback(
        &self,
        session: &mut Session,
        _ctx: &mut Ctx,
    ) -> Step<()> {
        let req = session.req_header();
        let path = crate::target::route_key(req.uri.path()).to_string();
        let bad = |reason: String| ProxyError::BadRequest {
            path: path.clone(),
            reason,
        };
        let name = path
            .strip_prefix(PREFIX)
            .and_then(|r| r.strip_suffix("/callback"))
            .unwrap_or_default()
            .to_string();
        let Some(platform) = self.app.platform(&name).cloned() else {
            return Ok(Err(bad(format!(
                "no platform `{}` is configured (platforms[].name)",
                name.chars().take(64).collect::<String>()
            ))));
        };
        if req.method != http::Method::POST {
            return Ok(Err(ProxyError::MethodNotAllowed {
                method: req.method.to_string(),
            }));
        }
        let q = req.uri.query().unwrap_or("").to_string();
        let param = |k: &str| {
            query::param(&q, k)
                .map(|v| v.into_owned())
                .unwrap_or_default()
        };
        let (signature, timestamp, nonce) =
            (param("msg_signature"), param("timestamp"), param("nonce"));
        if signature.is_empty() || timestamp.is_empty() || nonce.is_empty() {
            return Ok(Err(bad(
                "msg_signature, timestamp and nonce are required in the query, as WeChat sends them".into(),
            )));
        }
        let refused = |e: &dyn std::fmt::Display| {
            tracing::warn!(platform = %platform.name, error = %e, "platform callback refused");
            ProxyError::Forbidden {
                reason: format!("platform {} callback refused: {e}", platform.name),
            }
        };
        // One spelling only: the replay mark below is this value.
        let signature = match Signature::parse(&signature) {
            Ok(s) => s,
            Err(e) => return Ok(Err(refused(&e))),
        };
        let limit = DEFAULT_CALLBACK_BODY.min(self.app.config().limits.buffered_body);
        let body = match self.read_body(session, limit).await? {
            Ok(b) => b,
            Err(e) => return Ok(Err(e)),
        };
        let text = String::from_utf8_lossy(&body);
        let Some(encrypt) = xml_field(&text, "Encrypt") else {
            return Ok(Err(bad(
                "the body has no <Encrypt>: not an encrypted WeChat event".into(),
            )));
        };
        let event = match platform.crypt.open(&signature, &timestamp, &nonce, encrypt) {
            Ok(e) => e,
            Err(e) => return Ok(Err(refused(&e))),
        };
        // Fresh and not acted on before: a captured callback sent again is
        // not acted on (`platform::replay`).
        let now = crate::lease::store::now_ms() / 1000;
        if let Err(e) =
            crate::platform::replay::check_age(&timestamp, now, platform.callback_max_age)
        {
            return Ok(Err(refused(&e)));
        }
        if !platform.claim_callback(&signature).await {
            tracing::info!(platform = %platform.name, "platform callback already acted on (a retry or a replay): answered success, not acted on again");
            return self.callback_success(session).await;
        }
        // Not acted on (a malformed event, a failed exchange): WeChat's retry
        // must be taken. Acted on but `success` lost on the way: its retry
        // is answered from the mark (an authorisation code works once).
        let acted = self.act_on_event(session, &platform, &event, path).await;
        if matches!(acted, Ok(Err(_))) {
            platform.release_callback(&signature).await;
        }
        acted
    }

    /// Acts on a fresh event and answers WeChat (`success`), or the error.
    async fn act_on_event(
        &self,
        session: &mut Session,
        platform: &std::sync::Arc<crate::platform::Platform>,
        event: &str,
        path: String,
    ) -> Step<()> {
        let bad = |reason: String| ProxyError::BadRequest {
            path: path.clone(),
            reason,
        };
        // An event we handed on ourselves, passed back as received: acted
        // on again (idempotent) but not handed on a second time.
        let forwarded = session
            .req_header()
            .headers
            .contains_key(crate::platform::forward::FORWARDED_HEADER);
        let info = xml_field(event, "InfoType").unwrap_or_default();
        match info {
            "component_verify_ticket" => {
                let Some(ticket) =
                    xml_field(event, "ComponentVerifyTicket").filter(|t| !t.is_empty())
                else {
                    return Ok(Err(bad(
                        "component_verify_ticket event without ComponentVerifyTicket".into(),
                    )));
                };
                if platform.keep_ticket(ticket).await {
                    tracing::debug!(platform = %platform.name, "component_verify_ticket received");
                    if platform.component.valid().is_none() {
                        platform.component.request_fetch();
                    }
                }
            }
            "authorized" | "updateauthorized" => {
                let Some(code) = xml_field(event, "AuthorizationCode").filter(|c| !c.is_empty())
                else {
                    return Ok(Err(bad(format!("{info} event without AuthorizationCode"))));
                };
                match ops::authorize(&self.app, platform, code).await {
                    Ok(appid) => {
                        tracing::info!(platform = %platform.name, account = %appid, event = info, "authorisation exchanged")
                    }
                    Err(e) => {
                        // Not `success`: WeChat sends the event again, and
                        // the code lives an hour.
                        tracing::error!(platform = %platform.name, event = info, error = %e, "authorisation code not exchanged");
                        return Ok(Err(ProxyError::Upstream {
                            path,
                            source: crate::upstream::UpstreamError::Exchange {
                                addr: "WeChat".into(),
                                reason: e,
                            },
                        }));
                    }
                }
            }
            "unauthorized" => {
                if let Some(appid) = xml_field(event, "AuthorizerAppid").filter(|a| !a.is_empty()) {
                    ops::remove_authorizer(&self.app, platform, appid).await;
                }
            }
            other => {
                tracing::info!(platform = %platform.name, info_type = other, "platform event not acted on");
            }
        }
        if let (Some(f), false) = (&platform.forward, forwarded) {
            f.hand_on(event);
        }
        self.callback_success(session).await
    }

    /// WeChat's expected answer to a callback.
    async fn callback_success(&self, session: &mut Session) -> Step<()> {
        let mut resp = ResponseHeader::build(200, Some(2))?;
        resp.insert_header(http::header::CONTENT_TYPE, "text/plain")?;
        resp.insert_header(http::header::CONTENT_LENGTH, "7")?;
        session.write_response_header(Box::new(resp), false).await?;
        session
            .write_response_body(Some(Bytes::from_static(b"success")), true)
            .await?;
        Ok(Ok(()))
    }
}
