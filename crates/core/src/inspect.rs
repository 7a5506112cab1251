//! Reading `errcode` from small JSON answers, to decide whether to replay.
//!
//! Only buffered answers are inspected; binary and streamed answers never
//! are. Never copies or logs the body.

use serde::Deserialize;

/// WeChat's "this token is not good": invalid or not latest, invalid (WeCom's
/// usual code for an expired token), expired.
pub const INVALID_TOKEN: [i64; 3] = [40001, 40014, 42001];

#[derive(Deserialize)]
struct Errcode {
    errcode: Option<i64>,
}

/// The key as it appears in an answer.
static KEY: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"errcode\""));

/// The answer's `errcode`, when it is a JSON object that has one.
///
/// Every answer passes here, so the common case is a byte scan: find the
/// key, read the number after it. The full parse runs only when the scan
/// says the token was rejected (a replay hangs on it) or cannot read the
/// value; it decides then.
pub fn errcode(body: &[u8]) -> Option<i64> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace())?;
    if *first != b'{' {
        return None;
    }
    match scan(body) {
        Some(code) if !INVALID_TOKEN.contains(&code) => Some(code),
        _ => parse(body),
    }
}

/// The answer's `errmsg` (parsed only when it is needed: a refusal worth
/// reading).
pub fn errmsg(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Errmsg {
        errmsg: Option<String>,
    }
    serde_json::from_slice::<Errmsg>(body).ok()?.errmsg
}

fn parse(body: &[u8]) -> Option<i64> {
    serde_json::from_slice::<Errcode>(body).ok()?.errcode
}

/// The number after the first `"errcode"` key that is not inside a string
/// (a key is never preceded by a backslash); `None` when there is none or
/// it is not a plain integer.
fn scan(body: &[u8]) -> Option<i64> {
    let mut from = 0;
    loop {
        let at = from + KEY.find(&body[from..])?;
        from = at + KEY.needle().len();
        if at > 0 && body[at - 1] == b'\\' {
            continue;
        }
        let rest = &body[from..];
        let skip_ws = |b: &[u8]| {
            b.iter()
                .position(|c| !c.is_ascii_whitespace())
                .unwrap_or(b.len())
        };
        let rest = &rest[skip_ws(rest)..];
        let rest = rest.strip_prefix(b":")?;
        let rest = &rest[skip_ws(rest)..];
        let (negative, digits) = match rest.strip_prefix(b"-") {
            Some(d) => (true, d),
            None => (false, rest),
        };
        let n = digits.iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 || n > 18 || matches!(digits.get(n), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        let value = digits[..n]
            .iter()
            .fold(0i64, |v, d| v * 10 + i64::from(d - b'0'));
        return Some(if negative { -value } else { value });
    }
}

/// Whether WeChat rejected the token the request carried.
pub fn token_rejected(body: &[u8]) -> bool {
    errcode(body).is_some_and(|c| INVALID_TOKEN.contains(&c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_errcode_only_from_json() {
        assert_eq!(
            errcode(br#"{"errcode":40001,"errmsg":"invalid credential"}"#),
            Some(40001)
        );
        assert_eq!(errcode(b" \n{\"errmsg\":\"ok\",\"errcode\":0}"), Some(0));
        assert_eq!(errcode(br#"{"msgid":1}"#), None);
        assert_eq!(errcode(b"\xff\xd8\xff errcode"), None);
        assert_eq!(errcode(b"{not json errcode"), None);
        assert!(token_rejected(
            br#"{"errcode":42001,"errmsg":"access_token expired"}"#
        ));
        assert!(token_rejected(br#"{"errcode":40014}"#));
        assert!(!token_rejected(br#"{"errcode":-1,"errmsg":"system busy"}"#));
    }

    #[test]
    fn the_scan_agrees_with_the_parse() {
        for body in [
            &br#"{"errcode":0,"errmsg":"ok","msgid":200228332}"#[..],
            br#"{ "errcode" : 45009 , "errmsg":"reach max api daily quota limit"}"#,
            br#"{"errmsg":"ok \"errcode\":40001 quoted","errcode":0}"#,
            br#"{"errcode":-1,"errmsg":"system busy"}"#,
            br#"{"errcode":40001,"errmsg":"invalid credential"}"#,
            br#"{"errcode":1.5}"#,
            br#"{"errcode":"40001"}"#,
            br#"{"data":{"errcode":40001}}"#,
            br#"{"errcode":99999999999999999999}"#,
        ] {
            let text = String::from_utf8_lossy(body);
            assert_eq!(errcode(body), parse(body), "{text}");
        }
        // A rejection is always confirmed by the parse.
        assert_eq!(scan(br#"{"data":{"errcode":40001}}"#), Some(40001));
        assert_eq!(errcode(br#"{"data":{"errcode":40001}}"#), None);
    }
}
