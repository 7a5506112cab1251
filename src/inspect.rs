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

/// The answer's `errcode`, when it is a JSON object that has one.
pub fn errcode(body: &[u8]) -> Option<i64> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace())?;
    if *first != b'{' || !body.windows(7).any(|w| w == b"errcode") {
        return None;
    }
    serde_json::from_slice::<Errcode>(body).ok()?.errcode
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
}
