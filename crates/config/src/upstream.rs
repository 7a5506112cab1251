//! `upstream:` and `wecom_upstream:`: where each family of WeChat hosts is,
//! its failover hosts, timeouts, pool, DNS, HTTP/2 and forward proxy.

use super::*;

/// The upstream's scheme, host and port, parsed from `upstream.url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl UpstreamUrl {
    /// Parses `https://host[:port]` or `http://host[:port]`, nothing after the host.
    pub fn parse(text: &str) -> Result<Self, String> {
        let url = url::Url::parse(text).map_err(|e| format!("not a URL ({e})"))?;
        let tls = match url.scheme() {
            "https" => true,
            "http" => false,
            other => return Err(format!("scheme `{other}` is not http or https")),
        };
        let host = match url.host() {
            Some(url::Host::Domain(d)) => d.to_string(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            None => return Err("has no host".into()),
        };
        if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
            return Err("must be scheme and host only, without a path or query".into());
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err("must not carry credentials".into());
        }
        let port = url
            .port_or_known_default()
            .unwrap_or(if tls { 443 } else { 80 });
        Ok(UpstreamUrl { tls, host, port })
    }

    /// The `Host` header value: the port only when it is not the scheme's default.
    pub fn host_header(&self) -> String {
        let default = if self.tls { 443 } else { 80 };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == default {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}", self.host_header())
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct UpstreamConfig {
    #[serde(serialize_with = "print::display")]
    pub url: UpstreamUrl,
    /// Hosts to use, in order, when the ones before them fail.
    #[serde(serialize_with = "print::display_all")]
    pub failover: Vec<UpstreamUrl>,
    pub failover_after: u32,
    #[serde(serialize_with = "print::duration")]
    pub probe_interval: Duration,
    pub ca_file: Option<PathBuf>,
    /// What `ca_file` held when read: a reload that finds other
    /// certificates at the same path (a rotated bundle) changes the block.
    #[serde(skip)]
    pub ca_digest: Option<u64>,
    #[serde(serialize_with = "print::duration")]
    pub connect_timeout: Duration,
    #[serde(serialize_with = "print::duration")]
    pub read_timeout: Duration,
    /// A whole answer (header and body) must arrive within this.
    #[serde(serialize_with = "print::duration")]
    pub answer_timeout: Duration,
    pub warm_connections: usize,
    #[serde(serialize_with = "print::duration")]
    pub idle_timeout: Duration,
    /// Nameservers for the upstream hosts (`upstream.dns`); empty: those of
    /// `/etc/resolv.conf`.
    pub dns: Vec<SocketAddr>,
    /// Whether `/etc/hosts` answers too: not in transparent mode, where it
    /// points the WeChat hosts at the sidecar itself.
    #[serde(skip)]
    pub hosts_file: bool,
    /// Offer HTTP/2 by ALPN (`upstream.http2`); HTTP/1.1 when declined.
    pub http2: bool,
    /// Every connection goes through this forward proxy (`upstream.proxy`).
    #[serde(serialize_with = "print::display_opt")]
    pub proxy: Option<forward_proxy::ForwardProxy>,
}

/// Parses one upstream family's block (`upstream` or `wecom_upstream`).
pub(super) fn parse_upstream(
    prefix: &str,
    up: raw::Upstream,
    default_url: &str,
    problems: &mut Vec<String>,
) -> UpstreamConfig {
    let url_text = up
        .url
        .as_deref()
        .and_then(|u| expand_env(&format!("{prefix}.url"), u, problems))
        .unwrap_or_else(|| default_url.to_string());
    let url = UpstreamUrl::parse(&url_text).unwrap_or_else(|e| {
        problems.push(format!(
            "{prefix}.url: `{}` {e}; write e.g. {default_url}",
            wxsidecar_core::secret::mask_url(&url_text)
        ));
        UpstreamUrl::parse(default_url).expect("default URL parses")
    });
    let ca_file = up
        .ca_file
        .as_deref()
        .and_then(|p| expand_env(&format!("{prefix}.ca_file"), p, problems))
        .map(PathBuf::from);
    let mut ca_digest = None;
    if let Some(p) = &ca_file {
        match sources::file(p) {
            Err(e) => problems.push(format!(
                "{prefix}.ca_file: cannot read {} ({e}); give a PEM CA bundle or remove the key",
                p.display()
            )),
            Ok(pem) if !pem.contains("-----BEGIN CERTIFICATE-----") => problems.push(format!(
                "{prefix}.ca_file: {} holds no PEM certificate (-----BEGIN CERTIFICATE-----); give a PEM CA bundle",
                p.display()
            )),
            Ok(pem) => ca_digest = Some(sources::digest(pem.as_bytes())),
        }
    }
    let failover = up
        .failover
        .unwrap_or_default()
        .iter()
        .enumerate()
        .filter_map(|(i, u)| {
            let key = format!("{prefix}.failover[{i}]");
            let text = expand_env(&key, u, problems)?;
            UpstreamUrl::parse(&text)
                .map_err(|e| {
                    problems.push(format!(
                        "{key}: `{}` {e}; write e.g. https://api2.weixin.qq.com",
                        wxsidecar_core::secret::mask_url(&text)
                    ))
                })
                .ok()
        })
        .collect();
    let failover_after = up.failover_after.unwrap_or(DEFAULT_FAILOVER_AFTER);
    let dns = up
        .dns
        .unwrap_or_default()
        .iter()
        .enumerate()
        .filter_map(|(i, d)| {
            let parsed = d
                .parse::<SocketAddr>()
                .or_else(|_| d.parse::<std::net::IpAddr>().map(|ip| SocketAddr::new(ip, 53)));
            parsed
                .map_err(|_| {
                    problems.push(format!(
                        "{prefix}.dns[{i}]: `{d}` is not a nameserver address like 10.96.0.10 or 10.96.0.10:53"
                    ))
                })
                .ok()
        })
        .collect();
    let proxy = parse_proxy(prefix, up.proxy, up.proxy_file, problems);
    let upstream = UpstreamConfig {
        proxy,
        dns,
        hosts_file: true,
        http2: up.http2.unwrap_or(DEFAULT_HTTP2),
        url,
        failover,
        failover_after,
        probe_interval: duration_field(
            &format!("{prefix}.probe_interval"),
            up.probe_interval.as_ref(),
            DEFAULT_PROBE_INTERVAL,
            problems,
        ),
        ca_file,
        ca_digest,
        connect_timeout: duration_field(
            &format!("{prefix}.connect_timeout"),
            up.connect_timeout.as_ref(),
            DEFAULT_CONNECT_TIMEOUT,
            problems,
        ),
        read_timeout: duration_field(
            &format!("{prefix}.read_timeout"),
            up.read_timeout.as_ref(),
            DEFAULT_READ_TIMEOUT,
            problems,
        ),
        answer_timeout: duration_field(
            &format!("{prefix}.answer_timeout"),
            up.answer_timeout.as_ref(),
            DEFAULT_ANSWER_TIMEOUT,
            problems,
        ),
        warm_connections: up.warm_connections.unwrap_or(DEFAULT_WARM_CONNECTIONS),
        idle_timeout: duration_field(
            &format!("{prefix}.idle_timeout"),
            up.idle_timeout.as_ref(),
            DEFAULT_IDLE_TIMEOUT,
            problems,
        ),
    };

    upstream
}

/// `{prefix}.proxy` or `{prefix}.proxy_file` (the URL in a file, for a
/// password kept in a Secret); `${ENV}` expanded in either.
fn parse_proxy(
    prefix: &str,
    proxy: Option<String>,
    proxy_file: Option<String>,
    problems: &mut Vec<String>,
) -> Option<forward_proxy::ForwardProxy> {
    let key = format!("{prefix}.proxy");
    let text = match (proxy, proxy_file) {
        (Some(_), Some(_)) => {
            problems.push(format!("{prefix}: give proxy or proxy_file, not both"));
            return None;
        }
        (Some(p), None) => expand_env(&key, &p, problems)?,
        (None, Some(f)) => {
            let file_key = format!("{prefix}.proxy_file");
            let path = expand_env(&file_key, &f, problems)?;
            let text = secret_file(&file_key, &path, "", problems)?;
            expand_env(&file_key, &text, problems)?
        }
        (None, None) => return None,
    };
    forward_proxy::ForwardProxy::parse(&key, &text)
        .map_err(|e| problems.push(format!("{key}: {e}")))
        .ok()
}
