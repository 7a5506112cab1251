//! The `intercept` block: the local CA, the hosts it covers and the three
//! listeners. Every problem is reported with its key, like the rest of the
//! configuration; the CA key is held as a [`Secret`] and never printed.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use super::parse_duration;
use wxsidecar_certs::WECHAT_HOSTS;
use wxsidecar_core::secret::Secret;

/// Leaf certificates live this long and are re-signed well before the end:
/// short enough that a leaked leaf key soon stops mattering.
pub const DEFAULT_LEAF_LIFETIME: Duration = Duration::from_secs(30 * 86400);
/// Shorter leaves only make sense in tests of the re-signing.
const MIN_LEAF_LIFETIME: Duration = Duration::from_secs(10);

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RawIntercept {
    pub ca_cert: Option<String>,
    pub ca_cert_env: Option<String>,
    pub ca_key: Option<String>,
    pub ca_key_env: Option<String>,
    pub hosts: Option<Vec<String>>,
    pub https_listen: Option<String>,
    pub http_listen: Option<String>,
    pub proxy_listen: Option<String>,
    pub leaf_lifetime: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct InterceptConfig {
    #[serde(skip)]
    pub ca_cert_pem: String,
    #[serde(rename = "ca_key")]
    pub ca_key_pem: Secret,
    /// Where the CA came from (a path or `$VAR`), for `check`.
    #[serde(rename = "ca_cert")]
    pub ca_source: String,
    /// Lower-case host names the leaf certificate covers.
    pub hosts: Vec<String>,
    pub https_listen: Option<SocketAddr>,
    pub http_listen: Option<SocketAddr>,
    pub proxy_listen: Option<SocketAddr>,
    #[serde(serialize_with = "super::print::duration")]
    pub leaf_lifetime: Duration,
}

impl InterceptConfig {
    /// The intercept listeners, with their keys.
    pub fn listeners(&self) -> impl Iterator<Item = (&'static str, SocketAddr)> + '_ {
        [
            ("intercept.https_listen", self.https_listen),
            ("intercept.http_listen", self.http_listen),
            ("intercept.proxy_listen", self.proxy_listen),
        ]
        .into_iter()
        .filter_map(|(k, a)| a.map(|a| (k, a)))
    }
}

/// Reads a PEM from a file or an environment variable (exactly one).
fn pem_source(
    key: &str,
    file: Option<String>,
    env: Option<String>,
    marker: &str,
    problems: &mut Vec<String>,
) -> Option<(String, String)> {
    let (text, source) = match (file, env) {
        (Some(_), Some(_)) => {
            problems.push(format!(
                "intercept.{key}: set either {key} (a file) or {key}_env (a variable), not both"
            ));
            return None;
        }
        (None, None) => {
            problems.push(format!(
                "intercept.{key}: missing; create a CA with `wxsidecar ca init --out DIR` and point {key} (or {key}_env) at it"
            ));
            return None;
        }
        (Some(path), None) => match super::sources::file(&path) {
            Ok(t) => (t, path),
            Err(e) => {
                problems.push(format!("intercept.{key}: cannot read {path}: {e}"));
                return None;
            }
        },
        (None, Some(var)) => match super::sources::var(&var) {
            Some(t) => (t, format!("${var}")),
            None => {
                problems.push(format!(
                    "intercept.{key}_env: environment variable {var} is not set"
                ));
                return None;
            }
        },
    };
    if !text.contains(marker) {
        problems.push(format!(
            "intercept.{key}: {source} holds no PEM `{marker}` block"
        ));
        return None;
    }
    Some((text, source))
}

fn listen_field(key: &str, v: Option<String>, problems: &mut Vec<String>) -> Option<SocketAddr> {
    let v = v?;
    v.parse()
        .map_err(|_| {
            problems.push(format!(
                "intercept.{key}: `{v}` is not an address like 127.0.0.1:443"
            ))
        })
        .ok()
}

/// A host name as a certificate and SNI see it.
fn valid_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Validates the block; `None` when it has problems (all recorded).
pub fn parse(raw: RawIntercept, problems: &mut Vec<String>) -> Option<InterceptConfig> {
    let before = problems.len();
    let cert = pem_source(
        "ca_cert",
        raw.ca_cert,
        raw.ca_cert_env,
        "BEGIN CERTIFICATE",
        problems,
    );
    let key = pem_source(
        "ca_key",
        raw.ca_key,
        raw.ca_key_env,
        "PRIVATE KEY",
        problems,
    );
    let hosts: Vec<String> = match raw.hosts {
        None => WECHAT_HOSTS.iter().map(|h| h.to_string()).collect(),
        Some(list) => list.iter().map(|h| h.trim().to_ascii_lowercase()).collect(),
    };
    if hosts.is_empty() {
        problems.push("intercept.hosts: empty; list the WeChat hosts to intercept".into());
    }
    for (i, h) in hosts.iter().enumerate() {
        if !valid_host(h) {
            problems.push(format!(
                "intercept.hosts[{i}]: `{h}` is not a host name (no scheme, port or wildcard)"
            ));
        }
    }
    let https_listen = listen_field("https_listen", raw.https_listen, problems);
    let http_listen = listen_field("http_listen", raw.http_listen, problems);
    let proxy_listen = listen_field("proxy_listen", raw.proxy_listen, problems);
    if problems.len() == before
        && https_listen.is_none()
        && http_listen.is_none()
        && proxy_listen.is_none()
    {
        problems.push(
            "intercept: no listener; set https_listen (e.g. 127.0.0.1:443), http_listen and/or proxy_listen".into(),
        );
    }
    let leaf_lifetime = match raw.leaf_lifetime.as_deref() {
        None => DEFAULT_LEAF_LIFETIME,
        Some(v) => match parse_duration(v) {
            Ok(d) if d >= MIN_LEAF_LIFETIME => d,
            Ok(_) => {
                problems.push("intercept.leaf_lifetime: at least 10s (days in production)".into());
                DEFAULT_LEAF_LIFETIME
            }
            Err(e) => {
                problems.push(format!("intercept.leaf_lifetime: {e}"));
                DEFAULT_LEAF_LIFETIME
            }
        },
    };
    let ((ca_cert_pem, ca_source), (ca_key_pem, _)) = (cert?, key?);
    // Sign one leaf now: a key that does not match the certificate, or an
    // unreadable certificate, is a configuration error, not a runtime one.
    if let Err(e) = wxsidecar_certs::ca::sign_leaf(&ca_cert_pem, &ca_key_pem, &hosts, leaf_lifetime)
    {
        problems.push(format!("intercept.ca_cert / ca_key ({ca_source}): {e}"));
    }
    (problems.len() == before).then(|| InterceptConfig {
        ca_cert_pem,
        ca_key_pem: Secret::new(ca_key_pem),
        ca_source,
        hosts,
        https_listen,
        http_listen,
        proxy_listen,
        leaf_lifetime,
    })
}
