//! A secret (appsecret, client token) that cannot be printed by accident.
//!
//! `Debug` and `Display` print `***`; the value is read only through
//! [`Secret::expose`], so every place that touches it is easy to find.

use std::fmt;

/// An appsecret or other credential. Never logged; serialised as `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Box<str>);

impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

impl Secret {
    pub fn new(value: impl Into<Box<str>>) -> Self {
        Secret(value.into())
    }

    /// The raw value: only for building the request that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Compares in time independent of where the first difference is, so a
    /// caller guessing the secret learns nothing from response times.
    pub fn matches(&self, candidate: &str) -> bool {
        constant_time_eq(self.0.as_bytes(), candidate.as_bytes())
    }
}

/// `text` with every occurrence of `secret` (and of its password part, for a
/// URL) replaced by `***`: for error messages from libraries that quote
/// their input.
pub fn mask_in(text: &str, secret: &str) -> String {
    let mut out = text.to_string();
    if let Ok(u) = url::Url::parse(secret) {
        if let Some(p) = u.password().filter(|p| !p.is_empty()) {
            out = out.replace(p, "***");
        }
    }
    if !secret.is_empty() {
        out = out.replace(secret, "***");
    }
    out
}

/// A URL as it may be shown (`/status`, `check`, errors): user, password
/// and query masked (`redis://:***@host:port/db`); an unparsable one shows
/// no more than its scheme.
pub fn mask_url(text: &str) -> String {
    match url::Url::parse(text) {
        Ok(mut u) => {
            if !u.username().is_empty() {
                let _ = u.set_username("***");
            }
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            if u.query().is_some() {
                u.set_query(Some("***"));
            }
            u.to_string()
        }
        Err(_) => match text.split_once("://") {
            Some((scheme, _)) if scheme.len() < 10 => format!("{scheme}://…"),
            _ => "(unparsable URL, not shown)".into(),
        },
    }
}

/// The token of an `Authorization: Bearer …` header (scheme in any case,
/// surrounding space trimmed).
pub fn bearer(authorization: Option<&[u8]>) -> Option<&str> {
    let v = std::str::from_utf8(authorization?).ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Byte comparison whose time depends only on the lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_prints_the_value() {
        let s = Secret::new("s3cr3t-value");
        assert_eq!(format!("{s}"), "***");
        assert_eq!(format!("{s:?}"), "***");
        assert_eq!(format!("{:?}", Some(&s)), "Some(***)");
        assert_eq!(s.expose(), "s3cr3t-value");
    }

    #[test]
    fn urls_and_bearer_tokens() {
        assert_eq!(mask_url("redis://:pw@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(
            mask_url("https://u:pw@h/?secret=s"),
            "https://***:***@h/?***"
        );
        assert_eq!(mask_url("ftp://u:pw@[bad"), "ftp://…");
        assert_eq!(bearer(Some(b"Bearer  tok ")), Some("tok"));
        assert_eq!(bearer(Some(b"bearer tok")), Some("tok"));
        assert_eq!(bearer(Some(b"Basic tok")), None);
        assert_eq!(bearer(None), None);
    }

    #[test]
    fn matches_only_the_same_bytes() {
        let s = Secret::new("abc");
        assert!(s.matches("abc"));
        assert!(!s.matches("abd"));
        assert!(!s.matches("ab"));
        assert!(!s.matches(""));
    }
}
