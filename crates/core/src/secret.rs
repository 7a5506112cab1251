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

/// Where `secret` first appears in `haystack`, written plainly or with any
/// of its bytes percent-encoded (`%61`, `%6A` or `%6a`, in any mix): the
/// span it takes there. An upstream that echoes a URL back may encode it;
/// masking only the plain spelling would hand the app the token anyway.
pub fn find_spelled(haystack: &[u8], secret: &[u8]) -> Option<std::ops::Range<usize>> {
    let first = secret.first()?;
    // No spelling is shorter than the secret itself.
    if haystack.len() < secret.len() {
        return None;
    }
    let plain = find_plain(haystack, secret).map(|i| i..i + secret.len());
    // An encoded spelling holds a `%` within its first `len` bytes: none
    // before the plain match (the usual case: none at all), nothing to try.
    let Some(pct) = memchr::memchr(b'%', haystack) else {
        return plain;
    };
    let until = plain.as_ref().map_or(haystack.len(), |p| p.start);
    let from = pct.saturating_sub(secret.len() - 1);
    if from >= until {
        // The plain one comes before any spelling with a `%` could start.
        return plain;
    }
    memchr::memchr2_iter(*first, b'%', &haystack[from..until])
        .map(|i| from + i)
        .find_map(|i| match spelled_at(haystack, i, secret) {
            Spelled::Whole(end) => Some(i..end),
            _ => None,
        })
        .or(plain)
}

/// Where `secret` first appears as it is. A searcher for a whole token
/// (100+ bytes) costs ~0.8 µs to build, more than the search of a JSON
/// answer: one for its first bytes is cheap, and a token is random enough
/// that they rarely occur without the rest.
fn find_plain(haystack: &[u8], secret: &[u8]) -> Option<usize> {
    let prefix = &secret[..secret.len().min(DEFAULT_PREFIX)];
    let mut from = 0;
    while let Some(i) = memchr::memmem::find(&haystack[from..], prefix) {
        let at = from + i;
        if haystack[at..].starts_with(secret) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

/// How many of a secret's first bytes [`find_plain`] searches for.
const DEFAULT_PREFIX: usize = 16;

/// Where the tail of `haystack` that could begin a spelling of `secret`
/// (plain or percent-encoded, cut anywhere, inside an escape too) starts,
/// if it has one: what a scrubber of pieces holds back for the next.
pub fn spelled_start(haystack: &[u8], secret: &[u8]) -> Option<usize> {
    let first = *secret.first()?;
    // A spelling is at most three bytes a secret byte.
    let from = haystack.len().saturating_sub(3 * secret.len() - 1);
    (from..haystack.len())
        .filter(|&i| haystack[i] == first || haystack[i] == b'%')
        .find(|&i| matches!(spelled_at(haystack, i, secret), Spelled::Cut))
}

/// What stands at a place in a haystack, read as a spelling of a secret.
enum Spelled {
    /// The whole secret, ending here.
    Whole(usize),
    /// The haystack ends inside a spelling.
    Cut,
    Not,
}

/// [`Spelled`] for `secret` starting at `at`.
fn spelled_at(haystack: &[u8], mut at: usize, secret: &[u8]) -> Spelled {
    for &want in secret {
        let Some(&b) = haystack.get(at) else {
            return Spelled::Cut;
        };
        if b == want {
            at += 1;
            continue;
        }
        if b != b'%' {
            return Spelled::Not;
        }
        let hex = &haystack[at + 1..haystack.len().min(at + 3)];
        if !hex.iter().all(u8::is_ascii_hexdigit) {
            return Spelled::Not;
        }
        if hex.len() < 2 {
            // `%` or `%6` at the end: the escape may go on in the next piece.
            let could = hex.first().is_none_or(|&d| hex_value(d) == want >> 4);
            return if could { Spelled::Cut } else { Spelled::Not };
        }
        let byte = (hex_value(hex[0]) << 4) | hex_value(hex[1]);
        if byte != want {
            return Spelled::Not;
        }
        at += 3;
    }
    Spelled::Whole(at)
}

/// The value of one hex digit (checked to be one).
fn hex_value(d: u8) -> u8 {
    match d {
        b'0'..=b'9' => d - b'0',
        b'a'..=b'f' => d - b'a' + 10,
        _ => d - b'A' + 10,
    }
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

    /// Every spelling of a token with its bytes percent-encoded or not, in
    /// either hex case, is found where it is; near misses are not.
    #[test]
    fn a_secret_is_found_in_every_spelling() {
        let t = b"Tok_en-9";
        let encode = |mask: u32, upper: bool| -> Vec<u8> {
            let mut out = Vec::new();
            for (i, &b) in t.iter().enumerate() {
                match (mask >> i & 1 == 1, upper) {
                    (false, _) => out.push(b),
                    (true, true) => out.extend(format!("%{b:02X}").into_bytes()),
                    (true, false) => out.extend(format!("%{b:02x}").into_bytes()),
                }
            }
            out
        };
        for mask in 0..(1u32 << t.len()) {
            for upper in [false, true] {
                let spelled = encode(mask, upper);
                let hay = [b"x=%25&a=".as_slice(), &spelled, b"&b=T"].concat();
                assert_eq!(
                    find_spelled(&hay, t),
                    Some(8..8 + spelled.len()),
                    "{}",
                    String::from_utf8_lossy(&hay)
                );
            }
        }
        // The first of two: an encoded one before a plain one, a plain one
        // before a `%` far after it.
        assert_eq!(find_spelled(b"%54ok_en-9 Tok_en-9", t), Some(0..10));
        assert_eq!(
            find_spelled(b"Tok_en-9 and after it, far: %41", t),
            Some(0..8)
        );
        assert_eq!(find_spelled(b"xx Tok_en-9 ..........%41", t), Some(3..11));
        for miss in [
            b"Tok_en-".as_slice(),
            b"Tok_en%2",
            b"Tok_en%2d",
            b"%+4ok_en-9",
            b"Tok_en-8",
            b"",
        ] {
            assert_eq!(
                find_spelled(miss, t),
                None,
                "{}",
                String::from_utf8_lossy(miss)
            );
        }
        assert_eq!(find_spelled(b"abc", b""), None);
    }
}
