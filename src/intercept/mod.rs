//! Transparent mode: apps keep calling `https://api.weixin.qq.com` and the
//! sidecar answers, by `/etc/hosts` (Kubernetes `hostAliases`) pointing the
//! WeChat hosts at its HTTPS/HTTP listeners, or by an `HTTPS_PROXY` setting
//! pointing at its forward proxy. TLS ends here with a leaf signed by a
//! local CA the apps trust, covering only the intercepted hosts; then the
//! request goes down the same path as on the plain listener.

pub mod loopcheck;
pub mod tls;

use std::sync::Arc;

use crate::config::Family;

/// WeCom's API host: requests to it are for `kind: wecom` accounts.
pub const WECOM_HOST: &str = "qyapi.weixin.qq.com";

/// The host a request is for, lower-case, without port, from `Host`. (For
/// an absolute-form target pingora has already checked that `Host` matches
/// the target's authority, and keeps the authority off the Uri.)
pub fn request_host(req: &pingora::http::RequestHeader) -> Option<String> {
    let h = req.headers.get(http::header::HOST)?.to_str().ok()?;
    Some(without_port(h).to_ascii_lowercase())
}

/// A `Host` value's name, the port left off (its case as sent).
pub fn without_port(h: &str) -> &str {
    match h.rsplit_once(':') {
        Some((name, port)) if !name.ends_with(']') && port.bytes().all(|b| b.is_ascii_digit()) => {
            name
        }
        _ => h,
    }
}

/// Which account family a host's API belongs to.
pub fn family_of(host: &str) -> Family {
    if host == WECOM_HOST {
        Family::WeCom
    } else {
        Family::Official
    }
}

/// What the request path needs to know about interception.
pub struct Intercept {
    pub resolver: Arc<tls::LeafResolver>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_from_targets_and_headers() {
        let mut r = pingora::http::RequestHeader::build("GET", b"/cgi-bin/x", None).unwrap();
        assert_eq!(request_host(&r), None);
        r.insert_header("Host", "API.weixin.qq.com").unwrap();
        assert_eq!(request_host(&r).as_deref(), Some("api.weixin.qq.com"));
        r.insert_header("Host", "qyapi.weixin.qq.com:443").unwrap();
        assert_eq!(request_host(&r).as_deref(), Some("qyapi.weixin.qq.com"));
        assert_eq!(family_of("qyapi.weixin.qq.com"), Family::WeCom);
        assert_eq!(family_of("api.weixin.qq.com"), Family::Official);
    }
}
