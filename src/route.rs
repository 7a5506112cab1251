//! Which requests are answered locally, which get a token, which must not,
//! and which stream instead of being buffered.
//!
//! Rules from WeChat's API (see docs/request-path.md): endpoints that take the appsecret,
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
    /// `/wxsidecar/platform/{name}/callback`: a platform's events.
    PlatformCallback,
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
pub const SIGNATURE_HEADER: &str = "wechatmp-signature";

/// Chooses the route on the normalised path ([`crate::target::normalise`]),
/// ignoring ASCII case: whatever spelling WeChat might accept for a token
/// endpoint or an untouched path is treated as that path.
pub fn classify(req: &RequestHeader) -> Route {
    let path = crate::target::route_key(req.uri.path());
    if let Some(local) = local_route(path) {
        return local;
    }
    if req.headers.contains_key(SIGNATURE_HEADER) || starts_with_any(path, UNTOUCHED_PREFIXES) {
        return Route::Untouched;
    }
    if content_type_is(&req.headers, b"multipart/") || starts_with_any(path, STREAM_PREFIXES) {
        return Route::Stream;
    }
    Route::Api
}

/// Whether `path` (already normal) is a JSON API call by the path alone:
/// not answered locally, not passed untouched, not streamed. The fast lane
/// also checks the headers that change the route.
pub fn is_api(path: &str) -> bool {
    let path = crate::target::route_key(path);
    local_route(path).is_none()
        && !starts_with_any(path, UNTOUCHED_PREFIXES)
        && !starts_with_any(path, STREAM_PREFIXES)
}

/// The routes answered locally, decided by the path alone.
pub fn classify_path(path: &str) -> Option<Route> {
    local_route(crate::target::route_key(path))
}

/// [`classify_path`] for a path already cut by [`crate::target::route_key`].
fn local_route(path: &str) -> Option<Route> {
    let is = |p: &str| path.eq_ignore_ascii_case(p);
    if is("/cgi-bin/token") {
        Some(Route::LocalClassicToken)
    } else if is("/cgi-bin/stable_token") {
        Some(Route::LocalStableToken)
    } else if is("/cgi-bin/gettoken") {
        Some(Route::LocalWeComToken)
    } else if is("/cgi-bin/ticket/getticket")
        || is("/cgi-bin/get_jsapi_ticket")
        || is("/cgi-bin/ticket/get")
    {
        Some(Route::LocalTicket)
    } else if is(crate::jssdk::CONFIG_PATH) || is(crate::jssdk::AGENT_CONFIG_PATH) {
        Some(Route::JsSdk)
    } else if is_platform_callback(path) {
        Some(Route::PlatformCallback)
    } else {
        None
    }
}

/// `/wxsidecar/platform/{name}/callback`, any name.
pub fn is_platform_callback(path: &str) -> bool {
    crate::target::starts_with_ignore_case(path.as_bytes(), b"/wxsidecar/platform/")
        && path.ends_with("/callback")
}

/// Whether `path` starts with one of `prefixes`, ignoring ASCII case.
fn starts_with_any(path: &str, prefixes: &[&str]) -> bool {
    prefixes
        .iter()
        .any(|p| crate::target::starts_with_ignore_case(path.as_bytes(), p.as_bytes()))
}

/// Whether the request's `Content-Type` is of `media` (e.g. `multipart/`),
/// ignoring case and leading space.
pub fn content_type_is(headers: &http::HeaderMap, media: &[u8]) -> bool {
    headers.get(http::header::CONTENT_TYPE).is_some_and(|v| {
        crate::target::starts_with_ignore_case(v.as_bytes().trim_ascii_start(), media)
    })
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
        assert_eq!(c("/CGI-BIN/token"), Route::LocalClassicToken);
        assert_eq!(c("/cgi-bin/Stable_Token"), Route::LocalStableToken);
        assert_eq!(c("/SNS/oauth2/access_token"), Route::Untouched);
        assert_eq!(c("/cgi-bin/token/"), Route::LocalClassicToken);
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
