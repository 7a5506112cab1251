//! The query string: finding the `access_token` an app sent and putting ours
//! in its place, leaving every other byte of the query as the app wrote it.

use std::borrow::Cow;

/// WeChat's name for the token parameter on every server API.
pub const TOKEN_PARAM: &str = "access_token";

/// The decoded value of the first `name` parameter, if any. Keys are
/// compared decoded: `access%5Ftoken` is `access_token`.
pub fn param<'q>(query: &'q str, name: &str) -> Option<Cow<'q, str>> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        key_is(k, name).then(|| percent_decode(v))
    })
}

/// Whether the raw key `k` decodes to `name` (no copy unless it is encoded).
fn key_is(k: &str, name: &str) -> bool {
    if k.contains(['%', '+']) {
        percent_decode(k) == name
    } else {
        k == name
    }
}

fn percent_decode(v: &str) -> Cow<'_, str> {
    if !v.contains(['%', '+']) {
        return Cow::Borrowed(v);
    }
    let decoded: String = url::form_urlencoded::parse(format!("x={v}").as_bytes())
        .next()
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    Cow::Owned(decoded)
}

/// `query` with `access_token` set to `token`: replaced in place where the app
/// sent one (duplicates dropped), appended otherwise.
pub fn with_token(query: Option<&str>, token: &str) -> String {
    with_param(query, TOKEN_PARAM, token)
}

/// [`with_token`] for any parameter (`component_access_token`).
pub fn with_param(query: Option<&str>, name: &str, token: &str) -> String {
    let mut out = Vec::with_capacity(query.map_or(0, str::len) + name.len() + token.len() + 2);
    push_with_param(&mut out, query, name, token);
    String::from_utf8(out).expect("made of str parts")
}

/// [`with_token`] written onto the end of `out` (the fast lane's request
/// buffer): no string of its own.
pub fn push_with_token(out: &mut Vec<u8>, query: Option<&str>, token: &str) {
    push_with_param(out, query, TOKEN_PARAM, token)
}

pub fn push_with_param(out: &mut Vec<u8>, query: Option<&str>, name: &str, token: &str) {
    let encoded: Cow<'_, str> = if token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~'))
    {
        Cow::Borrowed(token)
    } else {
        Cow::Owned(url::form_urlencoded::byte_serialize(token.as_bytes()).collect())
    };
    let start = out.len();
    let mut placed = false;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let key = pair.split_once('=').map_or(pair, |(k, _)| k);
        if key_is(key, name) {
            if placed {
                continue;
            }
            placed = true;
            push_pair(out, start, name, &encoded);
        } else {
            if out.len() > start {
                out.push(b'&');
            }
            out.extend_from_slice(pair.as_bytes());
        }
    }
    if !placed {
        push_pair(out, start, name, &encoded);
    }
}

/// `k=v`, after a `&` unless it is the first pair written since `start`.
fn push_pair(out: &mut Vec<u8>, start: usize, k: &str, v: &str) {
    if out.len() > start {
        out.push(b'&');
    }
    out.extend_from_slice(k.as_bytes());
    out.push(b'=');
    out.extend_from_slice(v.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_and_decodes() {
        assert_eq!(
            param("a=1&access_token=T", TOKEN_PARAM).as_deref(),
            Some("T")
        );
        assert_eq!(
            param("access_token=a%2Bb", TOKEN_PARAM).as_deref(),
            Some("a+b")
        );
        assert_eq!(param("x_access_token=T", TOKEN_PARAM), None);
        assert_eq!(param("", TOKEN_PARAM), None);
        assert_eq!(param("access%5Ftoken=T", TOKEN_PARAM).as_deref(), Some("T"));
    }

    #[test]
    fn replaces_in_place_and_keeps_the_rest() {
        assert_eq!(with_token(None, "T"), "access_token=T");
        assert_eq!(with_token(Some(""), "T"), "access_token=T");
        assert_eq!(
            with_token(Some("type=image"), "T"),
            "type=image&access_token=T"
        );
        assert_eq!(
            with_token(Some("a=%20x&access_token=OLD&b=2"), "T"),
            "a=%20x&access_token=T&b=2"
        );
        assert_eq!(
            with_token(Some("access_token=1&access_token=2"), "T"),
            "access_token=T"
        );
        assert_eq!(with_token(None, "a+b/c"), "access_token=a%2Bb%2Fc");
        assert_eq!(
            with_token(Some("access%5Ftoken=X&a=1"), "T"),
            "access_token=T&a=1"
        );
    }
}
