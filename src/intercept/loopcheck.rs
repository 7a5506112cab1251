//! Refuses to start when an upstream would loop back into the sidecar: with
//! `hostAliases` pointing the WeChat hosts at 127.0.0.1, an upstream that
//! still resolves there would send every request to ourselves.

use std::net::SocketAddr;
use std::time::Duration;

use crate::config::{Config, UpstreamConfig};

/// DNS at start-up gets this long; an unanswered lookup is not a loop.
const DEFAULT_LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);

/// Our listening addresses, with their config keys.
fn ours(c: &Config) -> Vec<(&'static str, SocketAddr)> {
    let mut v = vec![("listen", c.listen), ("admin_listen", c.admin_listen)];
    if let Some(i) = &c.intercept {
        v.extend(i.listeners());
    }
    v
}

/// Whether a connection to `to` would reach the listener at `listener`.
fn reaches(to: SocketAddr, listener: SocketAddr) -> bool {
    to.port() == listener.port()
        && (to.ip() == listener.ip()
            || (listener.ip().is_unspecified()
                && (to.ip().is_loopback() || to.ip().is_unspecified())))
}

/// Checks every upstream host of the families in use. Host names are
/// resolved the way the upstream will resolve them (in transparent mode:
/// DNS only), which needs a runtime; IP hosts need none.
pub fn check(c: &Config, wecom_in_use: bool) -> Result<(), String> {
    let mut families: Vec<(&str, &UpstreamConfig)> = vec![("upstream", &c.upstream)];
    if wecom_in_use {
        families.push(("wecom_upstream", &c.wecom_upstream));
    }
    let listeners = ours(c);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the resolver: {e}"))?;
    let _in_runtime = rt.enter();
    for (key, up) in families {
        let resolver = crate::upstream::build_resolver(up);
        for url in std::iter::once(&up.url).chain(&up.failover) {
            let addrs: Vec<SocketAddr> = match url.host.parse::<std::net::IpAddr>() {
                Ok(ip) => vec![SocketAddr::new(ip, url.port)],
                // Names matter only when /etc/hosts may be pointing them at us.
                Err(_) if c.intercept.is_none() => continue,
                Err(_) => match rt.block_on(async {
                    tokio::time::timeout(
                        DEFAULT_LOOKUP_TIMEOUT,
                        resolver.lookup_ip(url.host.as_str()),
                    )
                    .await
                }) {
                    Ok(Ok(l)) => l.iter().map(|ip| SocketAddr::new(ip, url.port)).collect(),
                    _ => {
                        tracing::warn!(host = %url.host, "could not resolve the upstream at start; the loop check is skipped for it");
                        continue;
                    }
                },
            };
            for to in addrs {
                if let Some((lkey, l)) = listeners.iter().find(|(_, l)| reaches(to, *l)) {
                    return Err(format!(
                        "{key}: {url} resolves to {to}, which is this sidecar's own {lkey} ({l}): requests would loop. Point {key}.url at WeChat (set {key}.dns if the pod's DNS answers with the intercepted address)"
                    ));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_reaches_a_listener() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert!(reaches(a("127.0.0.1:443"), a("127.0.0.1:443")));
        assert!(reaches(a("127.0.0.1:443"), a("0.0.0.0:443")));
        assert!(!reaches(a("127.0.0.1:443"), a("127.0.0.1:8443")));
        assert!(!reaches(a("10.1.2.3:443"), a("127.0.0.1:443")));
    }
}
