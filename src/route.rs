//! Which requests are answered locally, which get a token, which must not,
//! and which stream instead of being buffered.
//!
//! Rules from WeChat's API (see README): endpoints that take the appsecret,
//! user OAuth tokens (`/sns/*`), third-party platform tokens, midas payments
//! and API-security signed requests never get our token.

use pingora::http::RequestHeader;

/// What the proxy does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `/cgi-bin/token`: answered from the cache.
    LocalClassicToken,
    /// `/cgi-bin/stable_token`: answered from the cache.
    LocalStableToken,
    /// WeCom's `/cgi-bin/gettoken`: answered from the cache.
    LocalWeComToken,
    /// The ticket endpoints: answered from the ticket cache.
    LocalTicket,
    /// `/wxsidecar/jssdk/*`: the JS-SDK signature helper.
    JsSdk,
    /// Forwarded untouched: no token added, replaced or removed.
    Untouched,
    /// Gets a token; body and answer streamed (media, multipart).
    Stream,
    /// Gets a token; body and answer buffered (the JSON API).
    Api,
}

/// Paths whose `access_token` is not ours to touch, or that take the secret.
const UNTOUCHED_PREFIXES: &[&str] = &[
    "/sns/",
    "/cgi-bin/component/",
    "/cgi-bin/midas/",
    "/cgi-bin/clear_quota/v2",
];

/// Paths whose bodies or answers may be large or binary.
const STREAM_PREFIXES: &[&str] = &["/cgi-bin/media/", "/cgi-bin/material/"];

/// Header WeChat's API-security mode signs requests with.
const SIGNATURE_HEADER: &str = "wechatmp-signature";

pub fn classify(req: &RequestHeader) -> Route {
    let path = req.uri.path();
    match path {
        "/cgi-bin/token" => return Route::LocalClassicToken,
        "/cgi-bin/stable_token" => return Route::LocalStableToken,
        "/cgi-bin/gettoken" => return Route::LocalWeComToken,
        "/cgi-bin/ticket/getticket" | "/cgi-bin/get_jsapi_ticket" | "/cgi-bin/ticket/get" => {
            return Route::LocalTicket
        }
        crate::jssdk::CONFIG_PATH | crate::jssdk::AGENT_CONFIG_PATH => return Route::JsSdk,
        _ => {}
    }
    if req.headers.contains_key(SIGNATURE_HEADER)
        || UNTOUCHED_PREFIXES.iter().any(|p| path.starts_with(p))
    {
        return Route::Untouched;
    }
    let multipart = req
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("multipart/")
        });
    if multipart || STREAM_PREFIXES.iter().any(|p| path.starts_with(p)) {
        return Route::Stream;
    }
    Route::Api
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, path: &str, headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build(method, path.as_bytes(), None).unwrap();
        for (k, v) in headers {
            r.insert_header(k.to_string(), *v).unwrap();
        }
        r
    }

    #[test]
    fn routes() {
        let c = |p: &str| classify(&req("GET", p, &[]));
        assert_eq!(c("/cgi-bin/token?appid=x"), Route::LocalClassicToken);
        assert_eq!(c("/cgi-bin/stable_token"), Route::LocalStableToken);
        assert_eq!(c("/cgi-bin/gettoken?corpid=ww1"), Route::LocalWeComToken);
        assert_eq!(c("/cgi-bin/message/template/send"), Route::Api);
        assert_eq!(
            c("/cgi-bin/ticket/getticket?type=jsapi"),
            Route::LocalTicket
        );
        assert_eq!(c("/cgi-bin/get_jsapi_ticket"), Route::LocalTicket);
        assert_eq!(
            c("/cgi-bin/ticket/get?type=agent_config"),
            Route::LocalTicket
        );
        assert_eq!(c("/wxsidecar/jssdk/config?url=x"), Route::JsSdk);
        assert_eq!(c("/wxsidecar/jssdk/agent_config"), Route::JsSdk);
        assert_eq!(c("/sns/jscode2session?appid=x"), Route::Untouched);
        assert_eq!(
            c("/cgi-bin/component/api_component_token"),
            Route::Untouched
        );
        assert_eq!(c("/cgi-bin/midas/pay"), Route::Untouched);
        assert_eq!(c("/cgi-bin/clear_quota/v2"), Route::Untouched);
        assert_eq!(c("/cgi-bin/media/get?media_id=1"), Route::Stream);
        assert_eq!(c("/cgi-bin/material/add_material"), Route::Stream);
        assert_eq!(
            classify(&req("POST", "/wxa/x", &[("Wechatmp-Signature", "s")])),
            Route::Untouched
        );
        assert_eq!(
            classify(&req(
                "POST",
                "/cgi-bin/x",
                &[("Content-Type", "multipart/form-data; boundary=b")]
            )),
            Route::Stream
        );
    }
}
