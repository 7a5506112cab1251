//! TLS for the intercepted hosts: a certificate resolver that answers only
//! the configured SNI names (any other name, or none, fails the handshake)
//! with a leaf it re-signs before it expires, without a restart.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use tokio_rustls::rustls::crypto::ring::sign::any_supported_type;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;

use crate::certs::ca;
use crate::config::intercept::InterceptConfig;

/// After a failed re-sign, try again this soon (the old leaf still works).
const DEFAULT_RESIGN_RETRY: Duration = Duration::from_secs(60);

/// The current leaf and when it ends.
struct Current {
    key: Arc<CertifiedKey>,
    not_after: SystemTime,
}

pub struct LeafResolver {
    conf: InterceptConfig,
    current: ArcSwap<Current>,
}

impl std::fmt::Debug for LeafResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeafResolver")
            .field("hosts", &self.conf.hosts)
            .finish_non_exhaustive()
    }
}

fn certified(leaf: ca::Leaf) -> Result<Current, String> {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf.key_der));
    let signer = any_supported_type(&key).map_err(|e| format!("leaf key: {e}"))?;
    Ok(Current {
        key: Arc::new(CertifiedKey::new(
            vec![CertificateDer::from(leaf.cert_der)],
            signer,
        )),
        not_after: leaf.not_after,
    })
}

impl LeafResolver {
    /// Signs the first leaf.
    pub fn new(conf: &InterceptConfig) -> Result<Arc<Self>, String> {
        match ca::permitted_domains(&conf.ca_cert_pem)? {
            None => tracing::warn!(
                "the intercept CA has no name constraints: a leaked key could sign any site; make a new one with `wxsidecar ca init` (it permits weixin.qq.com only)"
            ),
            Some(domains) => {
                if let Some(h) = conf
                    .hosts
                    .iter()
                    .find(|h| !domains.iter().any(|d| ca::within(h, d)))
                {
                    return Err(format!(
                        "intercept.hosts: {h} is outside what the CA may sign for ({}); make a CA with `wxsidecar ca init --permit DOMAIN` for it",
                        domains.join(", ")
                    ));
                }
            }
        }
        // A key that does not match the certificate, or an unreadable one,
        // is a configuration error: reported before anything listens.
        let leaf = Self::sign(conf)
            .map_err(|e| format!("intercept.ca_cert / ca_key ({}): {e}", conf.ca_source))?;
        let current = certified(leaf)?;
        Ok(Arc::new(LeafResolver {
            conf: conf.clone(),
            current: ArcSwap::from_pointee(current),
        }))
    }

    fn sign(conf: &InterceptConfig) -> Result<ca::Leaf, String> {
        ca::sign_leaf(
            &conf.ca_cert_pem,
            conf.ca_key_pem.expose(),
            &conf.hosts,
            conf.leaf_lifetime,
        )
    }

    /// When the current leaf stops being valid.
    pub fn not_after(&self) -> SystemTime {
        self.current.load().not_after
    }

    /// Whether `name` (an SNI or `Host`, any case, no port) is intercepted.
    pub fn covers(&self, name: &str) -> bool {
        self.conf.hosts.iter().any(|h| h.eq_ignore_ascii_case(name))
    }

    /// Re-signs the leaf when a third of its life is left; runs forever.
    pub async fn keep_fresh(self: Arc<Self>) {
        loop {
            let left = self
                .not_after()
                .duration_since(SystemTime::now())
                .unwrap_or_default();
            tokio::time::sleep(left * 2 / 3).await;
            match Self::sign(&self.conf).and_then(certified) {
                Ok(fresh) => {
                    let until = fresh.not_after;
                    self.current.store(Arc::new(fresh));
                    tracing::info!(valid_until = ?until, "intercept leaf certificate re-signed");
                }
                Err(e) => {
                    tracing::error!(error = %e, retry_in = ?DEFAULT_RESIGN_RETRY, "re-signing the intercept leaf certificate failed; the current one stays");
                    tokio::time::sleep(DEFAULT_RESIGN_RETRY).await;
                }
            }
        }
    }
}

impl ResolvesServerCert for LeafResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match hello.server_name() {
            Some(name) if self.covers(name) => Some(self.current.load().key.clone()),
            other => {
                tracing::info!(sni = ?other.map(|n| n.chars().take(64).collect::<String>()), "TLS handshake refused: not an intercepted host");
                None
            }
        }
    }
}
