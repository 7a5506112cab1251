//! A secret (appsecret, client token) that cannot be printed by accident.
//!
//! `Debug` and `Display` print `***`; the value is read only through
//! [`Secret::expose`], so every place that touches it is easy to find.

use std::fmt;

/// An appsecret or other credential. Never logged, never serialized.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Box<str>);

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

/// `redis://:***@host:port/db`: the URL with any password masked.
pub fn mask_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "(unparsable URL)".into(),
    }
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
    fn matches_only_the_same_bytes() {
        let s = Secret::new("abc");
        assert!(s.matches("abc"));
        assert!(!s.matches("abd"));
        assert!(!s.matches("ab"));
        assert!(!s.matches(""));
    }
}
