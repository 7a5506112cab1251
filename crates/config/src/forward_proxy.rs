//! `upstream.proxy`: the forward proxy (squid, tinyproxy, a NAT box with a
//! fixed IP) every connection to WeChat goes through, reached by `CONNECT`.

use std::fmt;

use wxsidecar_core::secret::Secret;

/// A forward proxy: `http://[user:pass@]host:port`.
#[derive(Debug, Clone)]
pub struct ForwardProxy {
    pub host: String,
    pub port: u16,
    /// `user:pass` for `Proxy-Authorization: Basic`, when the URL carries them.
    pub credentials: Option<Secret>,
    /// The key it was configured under (`upstream.proxy`), named in errors.
    pub key: String,
}

/// The port squid and most forward proxies listen on.
const DEFAULT_PROXY_PORT: u16 = 3128;

impl ForwardProxy {
    /// Parses `http://[user:pass@]host[:port]` (percent-encoded user and
    /// password). Errors never quote the password.
    pub fn parse(key: &str, text: &str) -> Result<Self, String> {
        let url = url::Url::parse(text).map_err(|e| {
            format!(
                "`{}` is not a URL ({e}); write http://[user:pass@]host:port",
                wxsidecar_core::secret::mask_url(text)
            )
        })?;
        if url.scheme() != "http" {
            return Err(format!(
                "`{}`: scheme `{}` is not supported; the proxy is spoken to in plain HTTP (http://host:port) and the TLS to WeChat runs inside its CONNECT tunnel",
                wxsidecar_core::secret::mask_url(text),
                url.scheme()
            ));
        }
        let host = match url.host() {
            Some(url::Host::Domain(d)) => d.to_string(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => return Err("has no host; write http://host:port".into()),
        };
        if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
            return Err(format!(
                "`{}` must be scheme, credentials, host and port only",
                wxsidecar_core::secret::mask_url(text)
            ));
        }
        // Percent-decoding; `+` is a plus here, not a space as in forms.
        let decode = |s: &str| {
            url::form_urlencoded::parse(format!("x={}", s.replace('+', "%2B")).as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        let credentials = match (url.username(), url.password()) {
            ("", None) => None,
            (user, password) => Some(Secret::new(format!(
                "{}:{}",
                decode(user),
                decode(password.unwrap_or(""))
            ))),
        };
        Ok(ForwardProxy {
            host,
            port: url.port().unwrap_or(DEFAULT_PROXY_PORT),
            credentials,
            key: key.to_string(),
        })
    }
}

/// As shown in `check --print`, `/status` and errors: the credentials masked.
impl fmt::Display for ForwardProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let auth = if self.credentials.is_some() {
            "***:***@"
        } else {
            ""
        };
        if self.host.contains(':') {
            write!(f, "http://{auth}[{}]:{}", self.host, self.port)
        } else {
            write!(f, "http://{auth}{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let p = ForwardProxy::parse("upstream.proxy", "http://10.0.0.5:8888").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("10.0.0.5", 8888));
        assert!(p.credentials.is_none());
        assert_eq!(p.to_string(), "http://10.0.0.5:8888");

        let p = ForwardProxy::parse("upstream.proxy", "http://bob:p%40s+s@squid.internal").unwrap();
        assert_eq!(p.port, DEFAULT_PROXY_PORT);
        assert_eq!(p.credentials.as_ref().unwrap().expose(), "bob:p@s+s");
        assert_eq!(p.to_string(), "http://***:***@squid.internal:3128");
        assert!(!format!("{p:?}").contains("p@s+s"));

        let e = ForwardProxy::parse("upstream.proxy", "https://bob:hunter2@x:1").unwrap_err();
        assert!(
            e.contains("scheme `https`") && !e.contains("hunter2"),
            "{e}"
        );
        let e = ForwardProxy::parse("upstream.proxy", "http://bob:hunter2@x:1/path").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
        assert!(ForwardProxy::parse("upstream.proxy", "squid:3128").is_err());
    }
}
