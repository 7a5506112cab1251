//! The fake's endpoints: token APIs, template send, media up/download, a
//! generic `/cgi-bin/*` answer, and `/__fake/*` for tests.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response};
use serde::Deserialize;

use super::state::{Refused, Seen, State};
use super::Shared;
use wxsidecar_core::query;

/// WeCom files go up to 20 MB; leave room for multipart framing.
const MAX_BODY: usize = 21 * 1024 * 1024;
/// WeChat's media limit (WeCom files).
const MAX_MEDIA: usize = 20 * 1024 * 1024;
/// Size of the fake mini program code image: bigger than small buffers.
const QRCODE_BYTES: usize = 256 * 1024;
/// Bodies up to this size are kept as text in `/__fake/requests`.
const RECORD_BODY: usize = 4096;

type Answer = Response<Full<Bytes>>;

fn json(status: u16, v: serde_json::Value) -> Answer {
    let body = Bytes::from(v.to_string());
    Response::builder()
        .status(status)
        .header("Content-Type", "application/json; encoding=utf-8")
        .header("Content-Length", body.len())
        .body(Full::new(body))
        .expect("valid response")
}

fn errcode(code: i64, msg: &str) -> Answer {
    json(200, serde_json::json!({ "errcode": code, "errmsg": msg }))
}

fn refused(r: Refused) -> Answer {
    errcode(r.errcode, r.errmsg)
}

/// Masks `secret=` values so the request log never shows one.
fn masked_query(q: &str) -> String {
    q.split('&')
        .map(|p| match p.split_once('=') {
            Some(("secret", _)) => "secret=***".to_string(),
            Some(("appsecret", _)) => "appsecret=***".to_string(),
            _ => p.to_string(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

#[derive(Deserialize)]
struct StableReq {
    grant_type: Option<String>,
    appid: Option<String>,
    secret: Option<String>,
    force_refresh: Option<bool>,
}

/// Returned to hyper to drop the request without an answer: HTTP/1.1
/// closes the connection; HTTP/2 resets the stream with the reason hyper
/// finds in `source()` (INTERNAL_ERROR when there is none).
#[derive(Debug)]
pub(super) struct Reset(Option<h2::Error>);

impl Reset {
    const DROP: Reset = Reset(None);

    fn refused() -> Reset {
        Reset(Some(h2::Reason::REFUSED_STREAM.into()))
    }
}

impl std::fmt::Display for Reset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("injected connection reset")
    }
}

impl std::error::Error for Reset {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.as_ref().map(|e| e as _)
    }
}

pub(super) async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Answer, Reset> {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path().to_string();
    let admin = path.starts_with("/__fake/");
    let verdict = if admin {
        Default::default()
    } else {
        shared.faults.lock().judge(&path)
    };
    // Refusals and early answers come before the body is read.
    if verdict.refuse {
        shared.refused.fetch_add(1, Ordering::Relaxed);
        return Err(Reset::refused());
    }
    if verdict.early_answer {
        return Ok(errcode(45002, "content size out of limit"));
    }
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(errcode(40006, "invalid file size")),
    };
    if admin {
        let q = parts.uri.query().unwrap_or("");
        if parts.method == hyper::Method::POST
            && matches!(
                path.as_str(),
                "/__fake/authorize" | "/__fake/unauthorize" | "/__fake/platform-callback"
            )
        {
            let arg = query::param(q, "authorizer")
                .or_else(|| query::param(q, "url"))
                .unwrap_or_default()
                .into_owned();
            return Ok(json(
                200,
                super::platform::admin(&shared, &path, &arg).await,
            ));
        }
        return Ok(fake_admin(&shared, &parts.method, &path, q, &body));
    }
    if verdict.delay_ms > 0 {
        tokio::time::sleep(Duration::from_millis(verdict.delay_ms)).await;
    }
    if verdict.reset_before {
        return Err(Reset::DROP);
    }
    let mut answer = serve(&shared, parts, body, verdict).await;
    if verdict.reset_after {
        return Err(Reset::DROP);
    }
    if verdict.pad_header_bytes > 0 {
        let pad = "a".repeat(verdict.pad_header_bytes);
        answer.headers_mut().insert(
            "x-fake-pad",
            http::HeaderValue::from_str(&pad).expect("ASCII"),
        );
    }
    Ok(answer)
}

async fn serve(
    shared: &Arc<Shared>,
    parts: http::request::Parts,
    body: Bytes,
    verdict: super::faults::Verdict,
) -> Answer {
    let path = parts.uri.path().to_string();
    let q = parts.uri.query().unwrap_or("").to_string();
    let token = query::param(&q, query::TOKEN_PARAM).map(|t| t.into_owned());

    {
        let seen = Seen {
            method: parts.method.to_string(),
            path: path.clone(),
            query: masked_query(&q),
            access_token: token.clone(),
            // HTTP/2 carries it as :authority.
            host: parts
                .headers
                .get("host")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
                .or_else(|| parts.uri.authority().map(|a| a.to_string())),
            protocol: format!("{:?}", parts.version),
            body_len: body.len(),
            body: (body.len() <= RECORD_BODY)
                .then(|| std::str::from_utf8(&body).ok().map(str::to_string))
                .flatten(),
            headers: parts
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
        };
        shared.state.lock().record(seen);
    }

    let is_token = matches!(
        path.as_str(),
        "/cgi-bin/token"
            | "/cgi-bin/stable_token"
            | "/cgi-bin/gettoken"
            | "/cgi-bin/ticket/getticket"
            | "/cgi-bin/get_jsapi_ticket"
            | "/cgi-bin/ticket/get"
    );
    let delay = if is_token {
        shared.opts.token_latency
    } else {
        shared.opts.latency
    };
    if delay > Duration::ZERO {
        tokio::time::sleep(delay).await;
    }
    if verdict.busy {
        return errcode(-1, "system error");
    }
    if let Some(code) = verdict.echo {
        let echo = format!("echo: {q} {}", String::from_utf8_lossy(&body));
        return errcode(code, &echo);
    }
    if let Some(code) = verdict.errcode {
        let msg = match code {
            45009 => "reach max api daily quota limit",
            45011 => "api minute-quota reach limit  mustslower  retry next minute",
            45033 => "api concurrent out of limit",
            _ => "injected error",
        };
        let mut st = shared.state.lock();
        let appid = token
            .as_deref()
            .and_then(|t| st.token_owner(t))
            .map(|o| o.0);
        let msg = st.quotas.failed(appid.as_deref(), &path, code, msg);
        return errcode(code, &msg);
    }
    if let Some(refusal) = not_whitelisted(shared, &parts, &path) {
        return refusal;
    }
    if verdict.token_error {
        shared.state.lock().invalid_token_calls += 1;
        return errcode(
            40001,
            "invalid credential, access_token is invalid or not latest",
        );
    }

    match path.as_str() {
        "/cgi-bin/token" => classic_token(shared, &q),
        "/cgi-bin/gettoken" => wecom_token(shared, &q),
        "/cgi-bin/stable_token" => {
            if parts.method != hyper::Method::POST {
                errcode(43002, "require POST method")
            } else {
                stable_token(shared, &body)
            }
        }
        "/cgi-bin/message/template/send" => {
            if parts.method != hyper::Method::POST {
                errcode(43002, "require POST method")
            } else {
                template_send(shared, token.as_deref(), &body)
            }
        }
        "/cgi-bin/media/upload" => {
            let ct = parts
                .headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            media_upload(shared, token.as_deref(), &q, &ct, body).await
        }
        "/cgi-bin/media/get" => media_get(shared, token.as_deref(), &q),
        "/cgi-bin/ticket/getticket" | "/cgi-bin/get_jsapi_ticket" | "/cgi-bin/ticket/get" => {
            ticket(shared, &path, token.as_deref(), &q)
        }
        "/wxa/getwxacodeunlimit" => qrcode(shared, token.as_deref()),
        p if p.starts_with("/cgi-bin/component/") => {
            let t = query::param(&q, "component_access_token")
                .or_else(|| query::param(&q, "access_token"));
            json(200, super::platform::api(shared, p, t.as_deref(), &body))
        }
        "/cgi-bin/openapi/quota/get" | "/cgi-bin/openapi/rid/get" | "/cgi-bin/clear_quota" => {
            quota_api(shared, &path, token.as_deref(), &body)
        }
        "/cgi-bin/clear_quota/v2" => clear_quota_v2(shared, &q, &body),
        p if p.starts_with("/cgi-bin/") => api_call(shared, p, token.as_deref()),
        // /sns/* and friends: no server token involved.
        _ => errcode(0, "ok"),
    }
}

/// WeChat's answer to a caller whose IP is not whitelisted, worded as
/// WeChat words it (the IP in the message), when a whitelist is set.
fn not_whitelisted(shared: &Shared, parts: &http::request::Parts, path: &str) -> Option<Answer> {
    let ip = parts.extensions.get::<super::ClientIp>()?.0;
    let allowed = shared.whitelist.lock().as_ref()?.contains(&ip);
    if allowed {
        return None;
    }
    shared.state.lock().api_calls += 1;
    Some(if path == "/cgi-bin/gettoken" {
        errcode(
            60020,
            &format!("not allow to access from your ip, hint: [1733000000_10_abcdef], from ip: {ip}, more info at https://open.work.weixin.qq.com/devtool/query?e=60020"),
        )
    } else {
        errcode(
            40164,
            &format!("invalid ip {ip} ipv6 ::ffff:{ip}, not in whitelist rid: 674c1a2b-5f3e9d21-0a1b2c3d"),
        )
    })
}

fn fake_admin(shared: &Shared, method: &hyper::Method, path: &str, q: &str, body: &[u8]) -> Answer {
    match (method.as_str(), path) {
        ("POST", "/__fake/whitelist") => {
            #[derive(serde::Deserialize)]
            struct List {
                ips: Option<Vec<std::net::IpAddr>>,
            }
            match serde_json::from_slice::<List>(body) {
                Ok(l) => {
                    *shared.whitelist.lock() = l.ips;
                    errcode(0, "ok")
                }
                Err(e) => json(
                    400,
                    serde_json::json!({ "errcode": 40035, "errmsg": format!("bad whitelist: {e}") }),
                ),
            }
        }
        ("POST", "/__fake/close-idle") => {
            shared.close_idle.send_modify(|n| *n += 1);
            errcode(0, "ok")
        }
        ("POST", "/__fake/faults") => match serde_json::from_slice::<super::faults::Plan>(body) {
            Ok(plan) => {
                *shared.faults.lock() = super::faults::Faults::new(plan);
                errcode(0, "ok")
            }
            Err(e) => json(
                400,
                serde_json::json!({ "errcode": 40035, "errmsg": format!("bad fault plan: {e}") }),
            ),
        },
        ("GET", "/__fake/stats") => {
            let st = shared.state.lock();
            json(200, {
                let mut v = st.stats(
                    shared.tls_handshakes.load(Ordering::Relaxed),
                    shared.connections.load(Ordering::Relaxed),
                );
                v["h2_connections"] = shared.h2_connections.load(Ordering::Relaxed).into();
                v["h2_goaways"] = shared.h2_goaways.load(Ordering::Relaxed).into();
                v["refused"] = shared.refused.load(Ordering::Relaxed).into();
                v["h1_connections_open"] = shared.h1_open.load(Ordering::Relaxed).into();
                v
            })
        }
        ("GET", "/__fake/requests") => {
            let st = shared.state.lock();
            json(200, serde_json::to_value(&st.requests).unwrap_or_default())
        }
        ("GET", "/__fake/ticket") => {
            let ticket = query::param(q, "value").unwrap_or_default();
            let left = shared.state.lock().tickets.remaining(&ticket);
            json(
                200,
                serde_json::json!({
                    "issued": left.is_some(),
                    "valid": left.is_some_and(|d| !d.is_zero()),
                    "expires_in": left.map(|d| d.as_secs()),
                    "expires_in_ms": left.map(|d| d.as_millis() as u64),
                }),
            )
        }
        ("POST", "/__fake/quota") => {
            match serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v.get("daily_limit").and_then(|n| n.as_u64()))
            {
                Some(n) => {
                    shared.state.lock().quotas.daily_limit = n;
                    errcode(0, "ok")
                }
                None => errcode(40035, "give {\"daily_limit\": N}"),
            }
        }
        ("POST", "/__fake/secret") => {
            let (appid, secret) = (query::param(q, "appid"), query::param(q, "secret"));
            match (appid, secret) {
                (Some(a), Some(s)) if shared.state.lock().set_secret(&a, &s) => errcode(0, "ok"),
                _ => errcode(40013, "give appid= (a configured app) and secret="),
            }
        }
        ("POST", "/__fake/invalidate") => match query::param(q, "appid") {
            Some(appid) => {
                let n = shared.state.lock().invalidate(&appid);
                json(
                    200,
                    serde_json::json!({ "errcode": 0, "errmsg": "ok", "revoked": n }),
                )
            }
            None => errcode(41002, "appid missing"),
        },
        _ => json(
            404,
            serde_json::json!({ "errcode": 404, "errmsg": "unknown fake endpoint" }),
        ),
    }
}

fn classic_token(shared: &Shared, q: &str) -> Answer {
    let appid = query::param(q, "appid").unwrap_or_default();
    let secret = query::param(q, "secret").unwrap_or_default();
    if query::param(q, "grant_type").as_deref() != Some("client_credential") {
        return errcode(40002, "invalid grant_type");
    }
    let mut st = shared.state.lock();
    if let Err(r) = st.authenticate(&appid, &secret) {
        return refused(r);
    }
    let (token, expires_in) = st.classic_fetch(&appid);
    json(
        200,
        serde_json::json!({ "access_token": token, "expires_in": expires_in }),
    )
}

fn wecom_token(shared: &Shared, q: &str) -> Answer {
    let Some(corpid) = query::param(q, "corpid").filter(|c| !c.is_empty()) else {
        return errcode(41002, "corpid missing");
    };
    let secret = query::param(q, "corpsecret").unwrap_or_default();
    match shared.state.lock().wecom_fetch(&corpid, &secret) {
        Ok((token, expires_in)) => json(
            200,
            serde_json::json!({ "errcode": 0, "errmsg": "ok", "access_token": token, "expires_in": expires_in }),
        ),
        Err(r) => refused(r),
    }
}

fn stable_token(shared: &Shared, body: &[u8]) -> Answer {
    let Ok(r) = serde_json::from_slice::<StableReq>(body) else {
        return errcode(47001, "data format error");
    };
    if r.grant_type.as_deref() != Some("client_credential") {
        return errcode(40002, "invalid grant_type");
    }
    let appid = r.appid.unwrap_or_default();
    let mut st = shared.state.lock();
    if let Err(e) = st.authenticate(&appid, r.secret.as_deref().unwrap_or("")) {
        return refused(e);
    }
    let (token, expires_in) = st.stable_fetch(&appid, r.force_refresh.unwrap_or(false));
    json(
        200,
        serde_json::json!({ "access_token": token, "expires_in": expires_in }),
    )
}

/// The ticket endpoints: WeChat's `getticket` (type jsapi or wx_card) and
/// WeCom's corp `get_jsapi_ticket` and app `ticket/get?type=agent_config`.
fn ticket(shared: &Shared, path: &str, token: Option<&str>, q: &str) -> Answer {
    use super::tickets::{APP_QUOTA_PER_HOUR, CORP_QUOTA_PER_HOUR};
    let mut st = shared.state.lock();
    if let Err(r) = st.check_token(token) {
        return refused(r);
    }
    let Some((appid, owner)) = token.and_then(|t| st.token_owner(t)) else {
        return errcode(40001, "invalid credential");
    };
    let ty = query::param(q, "type");
    let (who, ty, quota) = match (path, ty.as_deref()) {
        ("/cgi-bin/get_jsapi_ticket", _) => (appid, "jsapi", CORP_QUOTA_PER_HOUR),
        ("/cgi-bin/ticket/get", Some("agent_config")) => {
            (owner, "agent_config", APP_QUOTA_PER_HOUR)
        }
        ("/cgi-bin/ticket/getticket", Some("jsapi")) => (appid, "jsapi", APP_QUOTA_PER_HOUR),
        ("/cgi-bin/ticket/getticket", Some("wx_card")) => (appid, "wx_card", APP_QUOTA_PER_HOUR),
        _ => return errcode(40097, "invalid args"),
    };
    match st.tickets.fetch(&who, ty, quota) {
        Ok((ticket, expires_in)) => json(
            200,
            serde_json::json!({ "errcode": 0, "errmsg": "ok", "ticket": ticket, "expires_in": expires_in }),
        ),
        Err(r) => refused(r),
    }
}

/// Checks the token and counts the call against the path's daily quota;
/// a refusal carries a `rid`, as WeChat's do.
fn admit(st: &mut State, path: &str, token: Option<&str>) -> Result<String, Box<Answer>> {
    st.api_calls += 1;
    let appid = match st.check_token(token) {
        Ok(a) => a,
        Err(r) => {
            let msg = st.quotas.failed(None, path, r.errcode, r.errmsg);
            return Err(Box::new(errcode(r.errcode, &msg)));
        }
    };
    if !st.quotas.count(&appid, path) {
        let msg = st
            .quotas
            .failed(Some(&appid), path, 45009, "reach max api daily quota limit");
        return Err(Box::new(errcode(45009, &msg)));
    }
    Ok(appid)
}

fn api_call(shared: &Shared, path: &str, token: Option<&str>) -> Answer {
    let mut st = shared.state.lock();
    match admit(&mut st, path, token) {
        Ok(_) => errcode(0, "ok"),
        Err(a) => *a,
    }
}

/// `openapi/quota/get` (`cgi_path`), `openapi/rid/get` (`rid`) and
/// `clear_quota` (`appid`, the token's own), with the account's token.
fn quota_api(shared: &Shared, path: &str, token: Option<&str>, body: &[u8]) -> Answer {
    let mut st = shared.state.lock();
    let appid = match st.check_token(token) {
        Ok(a) => a,
        Err(r) => return refused(r),
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return errcode(47001, "data format error");
    };
    let field = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
    match path {
        "/cgi-bin/openapi/quota/get" => {
            let cgi = field("cgi_path");
            if !cgi.starts_with('/') {
                return errcode(76021, "cgi_path not found, please check");
            }
            json(
                200,
                serde_json::json!({ "errcode": 0, "errmsg": "ok", "quota": st.quotas.get(&appid, &cgi) }),
            )
        }
        "/cgi-bin/openapi/rid/get" => match st.quotas.lookup(&appid, &field("rid")) {
            Some(r) => json(
                200,
                serde_json::json!({ "errcode": 0, "errmsg": "ok", "request": r }),
            ),
            None => errcode(76001, "rid not found"),
        },
        _ => {
            if field("appid") != appid {
                return errcode(40013, "invalid appid");
            }
            match st.quotas.clear(&appid) {
                Ok(()) => errcode(0, "ok"),
                Err((c, m)) => errcode(c, m),
            }
        }
    }
}

/// `clear_quota/v2`: appid and appsecret in the query (as WeChat's example
/// sends them) or the JSON body (as its newer pages say).
fn clear_quota_v2(shared: &Shared, q: &str, body: &[u8]) -> Answer {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let get = |k: &str| {
        query::param(q, k)
            .map(|s| s.into_owned())
            .or_else(|| v.get(k).and_then(|x| x.as_str()).map(str::to_string))
    };
    let Some(appid) = get("appid") else {
        return errcode(41002, "appid missing");
    };
    let Some(secret) = get("appsecret") else {
        return errcode(41004, "appsecret missing");
    };
    let mut st = shared.state.lock();
    if let Err(r) = st.authenticate(&appid, &secret) {
        return refused(r);
    }
    match st.quotas.clear(&appid) {
        Ok(()) => errcode(0, "ok"),
        Err((c, m)) => errcode(c, m),
    }
}

fn template_send(shared: &Shared, token: Option<&str>, body: &[u8]) -> Answer {
    let mut st = shared.state.lock();
    if let Err(a) = admit(&mut st, "/cgi-bin/message/template/send", token) {
        return *a;
    }
    let Ok(msg) = serde_json::from_slice::<serde_json::Value>(body) else {
        return errcode(47001, "data format error");
    };
    if msg
        .get("touser")
        .and_then(|v| v.as_str())
        .is_none_or(str::is_empty)
    {
        return errcode(40003, "invalid openid");
    }
    if msg
        .get("template_id")
        .and_then(|v| v.as_str())
        .is_none_or(str::is_empty)
    {
        return errcode(40037, "invalid template_id");
    }
    if let Some(id) = msg.get("client_msg_id").and_then(|v| v.as_str()) {
        if !st.client_msg_ids.insert(id.to_string()) {
            // WeChat drops these; the fake counts them so tests can prove none happen.
            st.duplicate_messages += 1;
        }
    }
    st.messages += 1;
    let msgid = 1_000_000_000 + st.messages;
    json(
        200,
        serde_json::json!({ "errcode": 0, "errmsg": "ok", "msgid": msgid }),
    )
}

async fn media_upload(
    shared: &Shared,
    token: Option<&str>,
    q: &str,
    content_type: &str,
    body: Bytes,
) -> Answer {
    {
        let mut st = shared.state.lock();
        st.api_calls += 1;
        if let Err(r) = st.check_token(token) {
            return refused(r);
        }
    }
    let Ok(boundary) = multer::parse_boundary(content_type) else {
        return errcode(41005, "media data missing");
    };
    let stream = futures_util::stream::once(async move { Ok::<Bytes, Infallible>(body) });
    let mut mp = multer::Multipart::new(stream, boundary);
    loop {
        match mp.next_field().await {
            Ok(Some(field)) if field.name() == Some("media") => {
                let filename = field.file_name().unwrap_or("media.bin").to_string();
                let ct = field
                    .content_type()
                    .map(|m| m.to_string())
                    .unwrap_or_else(|| "application/octet-stream".into());
                let Ok(bytes) = field.bytes().await else {
                    return errcode(41005, "media data missing");
                };
                if bytes.len() > MAX_MEDIA {
                    return errcode(40006, "invalid file size");
                }
                let media_id: String = {
                    use rand::Rng;
                    rand::thread_rng()
                        .sample_iter(&rand::distributions::Alphanumeric)
                        .take(40)
                        .map(char::from)
                        .collect()
                };
                let mut st = shared.state.lock();
                st.media_uploads += 1;
                st.media.insert(
                    media_id.clone(),
                    super::state::Media {
                        bytes,
                        filename,
                        content_type: ct,
                    },
                );
                let created = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let kind = query::param(q, "type")
                    .unwrap_or("image".into())
                    .into_owned();
                return json(
                    200,
                    serde_json::json!({ "type": kind, "media_id": media_id, "created_at": created }),
                );
            }
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => return errcode(41005, "media data missing"),
        }
    }
}

/// WeChat answers a mini program code as an image on a JSON API path.
fn qrcode(shared: &Shared, token: Option<&str>) -> Answer {
    let mut st = shared.state.lock();
    st.api_calls += 1;
    if let Err(r) = st.check_token(token) {
        return refused(r);
    }
    let image: Vec<u8> = (0..QRCODE_BYTES)
        .map(|i: usize| (i.wrapping_mul(31).wrapping_add(7) % 251) as u8)
        .collect();
    Response::builder()
        .status(200)
        .header("Content-Type", "image/jpeg")
        .header("Content-Length", image.len())
        .body(Full::new(Bytes::from(image)))
        .expect("valid response")
}

fn media_get(shared: &Shared, token: Option<&str>, q: &str) -> Answer {
    let mut st = shared.state.lock();
    st.api_calls += 1;
    if let Err(r) = st.check_token(token) {
        return refused(r);
    }
    let id = query::param(q, "media_id").unwrap_or_default();
    match st.media.get(id.as_ref()) {
        None => errcode(40007, "invalid media_id"),
        Some(m) => Response::builder()
            .status(200)
            .header("Content-Type", m.content_type.as_str())
            .header(
                "Content-Disposition",
                format!("attachment; filename=\"{}\"", m.filename),
            )
            .header("Content-Length", m.bytes.len())
            .body(Full::new(m.bytes.clone()))
            .expect("valid response"),
    }
}
