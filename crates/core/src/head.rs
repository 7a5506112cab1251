//! What a request head may be, as RFC 9112 allows it and nothing laxer: the
//! one list of these rules, checked by the guard on every head before
//! either front (the fast lane or pingora's session) reads it. pingora's
//! parser is laxer (it re-escapes a request line it cannot parse, so
//! `POST  /cgi-bin/x HTTP/1.1` became `POST /` upstream, our token added);
//! the fast lane took none of these, so the two fronts disagreed.
//!
//! Refused (400, the connection closed, nothing forwarded):
//! - a request line that is not `method SP request-target SP HTTP/1.x`,
//!   one space apart (RFC 9112 §3);
//! - a target with a control byte, a space, raw non-ASCII or a `#`
//!   (RFC 9112 §3.2, RFC 3986 §3.3), or a percent-encoded control byte in
//!   its path (`%00`, `%0D`: the path is decoded upstream);
//! - a target form the method does not take (`*` is OPTIONS', an authority
//!   CONNECT's, RFC 9112 §3.2.3–4);
//! - a line not ended by CRLF, a lone CR anywhere (RFC 9112 §2.2);
//! - a folded header line (obs-fold, §5.2), whitespace before a field's
//!   colon (§5.1), a field name that is not a token, a control byte other
//!   than HTAB in a value (RFC 9110 §5.5);
//! - HTTP/1.1 without exactly one `Host`, or with one that is not a host
//!   (RFC 9112 §3.2).
//!
//! Empty lines before the request line are skipped (RFC 9112 §2.2). No
//! allocation, one pass over the head.

/// Why a head was refused: what is wrong, said to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadHead(pub &'static str);

impl std::fmt::Display for BadHead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

const LONE_CR: &str = "a lone CR inside a line";

/// `tchar` (RFC 9110 §5.6.2): what a method and a field name are made of.
const fn tchars() -> [bool; 256] {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    let extra = b"!#$%&'*+-.^_`|~";
    let mut i = 0;
    while i < extra.len() {
        t[extra[i] as usize] = true;
        i += 1;
    }
    t
}

static TCHAR: [bool; 256] = tchars();

fn is_token(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|&b| TCHAR[b as usize])
}

/// Checks the head at the start of `data` (it holds at least the whole
/// head; a body or a next request may follow).
pub fn check(data: &[u8]) -> Result<(), BadHead> {
    let mut at = 0;
    // Empty lines before the request line (a client's stray CRLF after a body).
    while data[at..].starts_with(b"\r\n") {
        at += 2;
    }
    let mut lines = Lines { data, at };
    let line = lines.next()?.ok_or(BadHead("no request line"))?;
    let http11 = request_line(line)?;
    let mut hosts = 0;
    while let Some(line) = lines.next()? {
        if line.is_empty() {
            return match (http11, hosts) {
                (false, _) | (true, 1) => Ok(()),
                (true, 0) => Err(BadHead("an HTTP/1.1 request must carry a Host header")),
                (true, _) => Err(BadHead("more than one Host header")),
            };
        }
        if matches!(line[0], b' ' | b'\t') {
            return Err(BadHead(
                "a header line folded onto the next (obs-fold) is not accepted",
            ));
        }
        let colon = memchr::memchr(b':', line).ok_or(BadHead("a header line without a colon"))?;
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        if name.last().is_some_and(|b| matches!(b, b' ' | b'\t')) {
            return Err(BadHead("whitespace between a header name and its colon"));
        }
        if !is_token(name) {
            return Err(BadHead(
                "a header name with a character a token cannot hold",
            ));
        }
        if let Some(&b) = value
            .iter()
            .find(|&&b| (b < 0x20 && b != b'\t') || b == 0x7f)
        {
            return Err(BadHead(match b {
                b'\r' => LONE_CR,
                _ => "a control character in a header value",
            }));
        }
        if name.eq_ignore_ascii_case(b"host") {
            hosts += 1;
            if !host_ok(value.trim_ascii()) {
                return Err(BadHead("the Host header is not a host[:port]"));
            }
        }
    }
    Err(BadHead("the head does not end with an empty line"))
}

/// The lines of a head, each without its CRLF; a line ended otherwise is
/// an error.
struct Lines<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Lines<'a> {
    fn next(&mut self) -> Result<Option<&'a [u8]>, BadHead> {
        let rest = &self.data[self.at..];
        let Some(lf) = memchr::memchr(b'\n', rest) else {
            return Ok(None);
        };
        if lf == 0 || rest[lf - 1] != b'\r' {
            return Err(BadHead("a line ended by a bare LF, not CRLF"));
        }
        // A lone CR inside it is refused by the check of each part (a
        // control byte in the method, target, version, a name or a value).
        let line = &rest[..lf - 1];
        self.at += lf + 1;
        Ok(Some(line))
    }
}

/// Checks `method SP target SP version`; whether it is HTTP/1.1.
fn request_line(line: &[u8]) -> Result<bool, BadHead> {
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(BadHead(
            "the request line must be `METHOD /target HTTP/1.1`, one space apart",
        ));
    };
    if !is_token(method) {
        return Err(BadHead("the method is not a token"));
    }
    let http11 = match version {
        b"HTTP/1.1" => true,
        b"HTTP/1.0" => false,
        _ => return Err(BadHead("the version must be HTTP/1.1 or HTTP/1.0")),
    };
    if target.is_empty() {
        return Err(BadHead("the request target is empty"));
    }
    if let Some(&b) = target.iter().find(|&&b| !(0x21..0x7f).contains(&b)) {
        return Err(BadHead(match b {
            0x80.. => "raw non-ASCII bytes in the request target: percent-encode them",
            b'\r' => LONE_CR,
            _ => "a control character in the request target",
        }));
    }
    if target.contains(&b'#') {
        return Err(BadHead("a fragment (`#`) in the request target"));
    }
    let path = match target[0] {
        b'/' => target,
        b'*' if target.len() == 1 && method == b"OPTIONS" => return Ok(http11),
        _ if method == b"CONNECT" => return Ok(http11),
        _ => {
            let lower =
                |p: &[u8]| target.len() > p.len() && target[..p.len()].eq_ignore_ascii_case(p);
            let after = if lower(b"http://") {
                7
            } else if lower(b"https://") {
                8
            } else {
                return Err(BadHead(
                    "the request target must be a path (`/cgi-bin/…`) or an http(s) URL",
                ));
            };
            let rest = &target[after..];
            rest.iter()
                .position(|&b| b == b'/' || b == b'?')
                .map_or(&[][..], |i| &rest[i..])
        }
    };
    let path = path.split(|&b| b == b'?').next().unwrap_or_default();
    if encoded_control(path) {
        return Err(BadHead(
            "a percent-encoded control character (`%00`–`%1F`, `%7F`) in the path",
        ));
    }
    Ok(http11)
}

/// Whether `path` holds `%XX` naming a control byte.
fn encoded_control(path: &[u8]) -> bool {
    memchr::memchr_iter(b'%', path).any(|i| match path.get(i + 1..i + 3) {
        Some([hi, lo]) => {
            matches!(hi, b'0' | b'1') && lo.is_ascii_hexdigit()
                || (*hi == b'7' && matches!(lo, b'f' | b'F'))
        }
        _ => false,
    })
}

/// `uri-host [ ":" port ]` (RFC 9112 §3.2, RFC 3986 §3.2.2): a name, an
/// IPv4 or a bracketed IPv6 address, a port of digits; empty is allowed
/// (a target without an authority).
fn host_ok(v: &[u8]) -> bool {
    let (host, port) = match v.first() {
        Some(b'[') => match v.iter().position(|&b| b == b']') {
            Some(end) => (&v[..=end], &v[end + 1..]),
            None => return false,
        },
        _ => match v.iter().rposition(|&b| b == b':') {
            Some(c) => (&v[..c], &v[c..]),
            None => (v, &[][..]),
        },
    };
    let port_ok = match port {
        [] => true,
        [b':', digits @ ..] => digits.iter().all(u8::is_ascii_digit),
        _ => false,
    };
    let host_chars = host.iter().all(|&b| {
        b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'%'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b'['
                    | b']'
                    | b':'
            )
    });
    let colon_outside_brackets = host.first() != Some(&b'[') && host.contains(&b':');
    port_ok && host_chars && !colon_outside_brackets
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(line: &str, headers: &str) -> String {
        format!("{line}\r\n{headers}\r\n")
    }

    #[test]
    fn what_rfc_9112_allows_is_taken() {
        for ok in [
            req(
                "POST /cgi-bin/message/template/send?a=1 HTTP/1.1",
                "Host: x\r\n",
            ),
            req("GET /a HTTP/1.0", ""),
            req(
                "GET /a%20b?q=%00 HTTP/1.1",
                "Host: 127.0.0.1:8080\r\nX-A:\tv\r\n",
            ),
            req(
                "GET http://api.weixin.qq.com/cgi-bin/x HTTP/1.1",
                "Host: api.weixin.qq.com\r\n",
            ),
            req("OPTIONS * HTTP/1.1", "Host: [::1]:8080\r\n"),
            req(
                "CONNECT api.weixin.qq.com:443 HTTP/1.1",
                "Host: api.weixin.qq.com:443\r\n",
            ),
            format!("\r\n{}", req("GET /a HTTP/1.1", "Host: x\r\n")),
            req("GET /a HTTP/1.1", "Host: x\r\nX-A: caf\u{e9}\r\n"),
            req("GET /a HTTP/1.1", "Host: x\r\n") + "body bytes\n\0",
        ] {
            assert_eq!(check(ok.as_bytes()), Ok(()), "{ok:?}");
        }
    }

    #[test]
    fn what_it_does_not_is_refused_naming_why() {
        for (bad, why) in [
            (
                req("POST  /cgi-bin/x HTTP/1.1", "Host: x\r\n"),
                "one space apart",
            ),
            (
                req("POST /cgi-bin/x  HTTP/1.1", "Host: x\r\n"),
                "one space apart",
            ),
            (
                req("POST /cgi-bin/x HTTP/1.1 ", "Host: x\r\n"),
                "one space apart",
            ),
            (
                req("POST\t/cgi-bin/x HTTP/1.1", "Host: x\r\n"),
                "one space apart",
            ),
            (req("GET /a HTTP/1.1", ""), "Host"),
            (
                req("GET /a HTTP/1.1", "Host: x\r\nHost: y\r\n"),
                "more than one Host",
            ),
            (req("GET /a HTTP/1.1", "Host: x y\r\n"), "Host header"),
            (req("GET /a HTTP/1.1", "Host: x/y\r\n"), "Host header"),
            (req("GET /a HTTP/1.1", "Host: a:b:c\r\n"), "Host header"),
            (
                req("GET /cgi-bin/a%00b HTTP/1.1", "Host: x\r\n"),
                "percent-encoded control",
            ),
            (
                req("GET /cgi-bin/a%0db HTTP/1.1", "Host: x\r\n"),
                "percent-encoded control",
            ),
            (
                req("GET /cgi-bin/a%7Fb HTTP/1.1", "Host: x\r\n"),
                "percent-encoded control",
            ),
            (
                req("GET http://x/a%0Ab HTTP/1.1", "Host: x\r\n"),
                "percent-encoded control",
            ),
            (
                req("GET /cgi-bin/a\0b HTTP/1.1", "Host: x\r\n"),
                "control character in the request target",
            ),
            (req("GET /cgi-bin/a\rb HTTP/1.1", "Host: x\r\n"), "lone CR"),
            (
                req("GET /cgi-bin/a?q=caf\u{e9} HTTP/1.1", "Host: x\r\n"),
                "non-ASCII",
            ),
            (req("GET /a#frag HTTP/1.1", "Host: x\r\n"), "fragment"),
            (req("GET a HTTP/1.1", "Host: x\r\n"), "a path"),
            (req("GET * HTTP/1.1", "Host: x\r\n"), "a path"),
            (
                req("GET /a HTTP/2.0", "Host: x\r\n"),
                "HTTP/1.1 or HTTP/1.0",
            ),
            (
                req("GET /a http/1.1", "Host: x\r\n"),
                "HTTP/1.1 or HTTP/1.0",
            ),
            (req("G(T /a HTTP/1.1", "Host: x\r\n"), "not a token"),
            (
                req("GET /a HTTP/1.1", "Host: x\r\nX-A: 1\r\n folded\r\n"),
                "obs-fold",
            ),
            (req("GET /a HTTP/1.1", "Host : x\r\n"), "colon"),
            (req("GET /a HTTP/1.1", "Host: x\r\nX A: 1\r\n"), "token"),
            (
                req("GET /a HTTP/1.1", "Host: x\r\nNo colon\r\n"),
                "without a colon",
            ),
            (
                req("GET /a HTTP/1.1", "Host: x\r\nX-A: a\0b\r\n"),
                "control character in a header value",
            ),
            (
                req("GET /a HTTP/1.1", "Host: x\r\nX-A: a\rb\r\n"),
                "lone CR",
            ),
            ("GET /a HTTP/1.1\nHost: x\r\n\r\n".to_string(), "bare LF"),
            ("GET /a HTTP/1.1\r\nHost: x\n\r\n".to_string(), "bare LF"),
            ("GET /a HTTP/1.1\r\nHost: x\r\n\n".to_string(), "bare LF"),
        ] {
            match check(bad.as_bytes()) {
                Err(BadHead(msg)) => assert!(msg.contains(why), "{bad:?}: {msg}"),
                Ok(()) => panic!("taken: {bad:?}"),
            }
        }
    }
}
