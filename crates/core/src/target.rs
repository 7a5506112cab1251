//! The request target, normalised once at entry (RFC 3986 §6.2.2): routes
//! are chosen on this path and this path is what goes upstream, so no
//! spelling (`//cgi-bin/token`, `/cgi-bin/%74oken`, `/cgi-bin/x/../token`)
//! can slip past a route that keeps the secret or the token where it belongs.
//!
//! Also the other entry rules: which methods may go upstream and which paths
//! may carry an appsecret. Pure functions, no I/O.

use std::borrow::Cow;

/// Why a target was refused (answered 400).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadTarget(pub &'static str);

/// The normalised path: percent-encoded unreserved characters decoded,
/// dot-segments removed, repeated `/` collapsed; other escapes kept as they
/// are (uppercased hex), so the bytes WeChat sees mean what the app meant.
/// `Borrowed` when the path was already normal (the common case: no copy).
pub fn normalise(path: &str) -> Result<Cow<'_, str>, BadTarget> {
    if !path.starts_with('/') {
        return Err(BadTarget("the path must start with `/`"));
    }
    // Servers differ on `;params` (some drop them, some keep them): a path
    // that means one thing here and another at WeChat is refused.
    if path.contains(';') || path.contains("%3b") || path.contains("%3B") {
        return Err(BadTarget(
            "`;` path parameters are not part of WeChat's API; remove them",
        ));
    }
    if is_normal(path.as_bytes()) {
        return Ok(Cow::Borrowed(path));
    }
    // Pass 1: decode unreserved escapes (RFC 3986 §2.3), keep the rest.
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or(BadTarget(
                    "a `%` in the path is not followed by two hex digits",
                ))?;
            if is_unreserved(hex) {
                decoded.push(hex as char);
            } else {
                decoded.push('%');
                decoded.push_str(&format!("{hex:02X}"));
            }
            i += 3;
        } else if b.is_ascii() {
            decoded.push(b as char);
            i += 1;
        } else {
            decoded.push_str(&format!("%{b:02X}"));
            i += 1;
        }
    }
    // Pass 2: segments, without empty ones and dot-segments (§5.2.4).
    let trailing = decoded.ends_with('/');
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded.split('/').collect();
    let last = segments.len() - 1;
    let mut ends_in_dir = trailing;
    for (n, seg) in segments.into_iter().enumerate() {
        match seg {
            "" => {}
            "." => ends_in_dir |= n == last,
            ".." => {
                if out.pop().is_none() {
                    return Err(BadTarget("the path climbs above `/`"));
                }
                ends_in_dir |= n == last;
            }
            s => out.push(s),
        }
    }
    let mut normal = String::with_capacity(decoded.len());
    for s in &out {
        normal.push('/');
        normal.push_str(s);
    }
    if normal.is_empty() || ends_in_dir {
        normal.push('/');
    }
    Ok(Cow::Owned(normal))
}

/// Whether `path` has nothing to normalise: no `%`, no `//`, no
/// dot-segment, nothing outside ASCII.
fn is_normal(path: &[u8]) -> bool {
    path.iter().all(|&b| b != b'%' && b.is_ascii())
        && !path.windows(2).any(|w| w == b"//")
        && path.split(|&b| b == b'/').all(|s| s != b"." && s != b"..")
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// The part of a normalised path routes are chosen on: one trailing `/`
/// cut off, so `/cgi-bin/token/` is the token endpoint (path parameters,
/// `;x`, never get this far: [`normalise`] refuses them).
pub fn route_key(path: &str) -> &str {
    match path.strip_suffix('/') {
        Some(p) if !p.is_empty() => p,
        _ => path,
    }
}

/// The methods WeChat's server API takes; anything else never goes upstream
/// (`TRACE` would echo our token back to the app).
pub fn method_allowed(method: &http::Method) -> bool {
    matches!(
        *method,
        http::Method::GET | http::Method::POST | http::Method::HEAD
    )
}

/// Query (or form) parameters that carry an appsecret.
pub const SECRET_PARAMS: &[&str] = &["secret", "appsecret", "corpsecret"];

/// Paths that take an appsecret in their query or form, besides the token
/// endpoints (answered locally). Sources: WeChat's docs for web OAuth
/// (`/sns/oauth2/access_token`: appid, secret, code), mini program login
/// (`/sns/jscode2session`: appid, secret, js_code), quota reset with the
/// secret (`/cgi-bin/clear_quota/v2`: appid, appsecret), the third-party
/// platform's component APIs (`/cgi-bin/component/*`), and WeCom's service
/// providers (`/cgi-bin/service/get_provider_token`, `get_suite_token`).
pub const SECRET_PATHS: &[&str] = &[
    "/sns/oauth2/access_token",
    "/sns/jscode2session",
    "/cgi-bin/clear_quota/v2",
    "/cgi-bin/service/get_provider_token",
    "/cgi-bin/service/get_suite_token",
];

/// Path prefixes that may carry an appsecret (see [`SECRET_PATHS`]).
pub const SECRET_PREFIXES: &[&str] = &["/cgi-bin/component/"];

/// Whether `path` (normalised) is one WeChat takes an appsecret on.
pub fn takes_secret(path: &str) -> bool {
    let path = route_key(path);
    SECRET_PATHS.iter().any(|p| path.eq_ignore_ascii_case(p))
        || SECRET_PREFIXES
            .iter()
            .any(|p| starts_with_ignore_case(path.as_bytes(), p.as_bytes()))
}

/// Whether `hay` starts with `prefix`, ignoring ASCII case: how paths and
/// media types are compared.
pub fn starts_with_ignore_case(hay: &[u8], prefix: &[u8]) -> bool {
    hay.len() >= prefix.len() && hay[..prefix.len()].eq_ignore_ascii_case(prefix)
}

/// The first secret-carrying parameter in a query or form body, by its
/// decoded name.
pub fn secret_param(query: &[u8]) -> Option<&'static str> {
    if query.is_empty() {
        return None;
    }
    url::form_urlencoded::parse(query).find_map(|(k, _)| {
        SECRET_PARAMS
            .iter()
            .find(|s| k.eq_ignore_ascii_case(s))
            .copied()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> Result<String, BadTarget> {
        normalise(p).map(Cow::into_owned)
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for p in [
            "/",
            "/cgi-bin/token",
            "/cgi-bin/message/template/send",
            "/a/",
        ] {
            assert!(matches!(normalise(p), Ok(Cow::Borrowed(_))), "{p}");
        }
    }

    #[test]
    fn every_spelling_of_the_token_path_is_the_token_path() {
        for p in [
            "//cgi-bin/token",
            "/cgi-bin//token",
            "/cgi-bin/%74oken",
            "/cgi-bin/%74%6F%6b%65%6e",
            "/cgi-bin/./token",
            "/cgi-bin/x/../token",
            "/./cgi-bin/token",
            "/cgi-bin/x/y/../../token",
            "/%63gi-bin/token",
        ] {
            assert_eq!(n(p).unwrap(), "/cgi-bin/token", "{p}");
        }
        assert_eq!(n("/cgi-bin/token/").unwrap(), "/cgi-bin/token/");
        assert_eq!(n("/cgi-bin/../sns/x").unwrap(), "/sns/x");
        assert_eq!(n("/%73ns/x").unwrap(), "/sns/x");
        assert_eq!(n("/cgi-bin/.").unwrap(), "/cgi-bin/");
    }

    #[test]
    fn reserved_escapes_stay_escaped() {
        assert_eq!(n("/a%2fb").unwrap(), "/a%2Fb");
        assert_eq!(n("/a%20b").unwrap(), "/a%20b");
        assert_eq!(n("/a%3F").unwrap(), "/a%3F");
    }

    #[test]
    fn bad_targets_are_refused() {
        assert!(n("/..").is_err());
        assert!(n("/cgi-bin/../../token").is_err());
        assert!(n("/%zz").is_err());
        assert!(n("/%4").is_err());
        assert!(n("cgi-bin/token").is_err());
        assert!(n("*").is_err());
        assert!(n("/cgi-bin/token;x").is_err());
        assert!(n("/cgi-bin/token%3Bx").is_err());
    }

    #[test]
    fn secrets_only_where_wechat_takes_them() {
        assert_eq!(secret_param(b"appid=a&secret=s"), Some("secret"));
        assert_eq!(secret_param(b"appid=a&%73ecret=s"), Some("secret"));
        assert_eq!(secret_param(b"CORPSECRET=s"), Some("corpsecret"));
        assert_eq!(secret_param(b"appsecret=s"), Some("appsecret"));
        assert_eq!(secret_param(b"secretive=1&x=secret"), None);
        assert!(takes_secret("/sns/jscode2session"));
        assert!(takes_secret("/cgi-bin/component/api_component_token"));
        assert!(!takes_secret("/cgi-bin/message/template/send"));
        assert!(!takes_secret("/sns/userinfo"));
    }

    #[test]
    fn methods() {
        assert!(method_allowed(&http::Method::GET));
        assert!(method_allowed(&http::Method::POST));
        assert!(method_allowed(&http::Method::HEAD));
        assert!(!method_allowed(&http::Method::TRACE));
        assert!(!method_allowed(&http::Method::PUT));
        assert!(!method_allowed(&http::Method::OPTIONS));
    }
}
