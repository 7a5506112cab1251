//! The local CA of transparent mode: `wxsidecar ca init` makes it, and the
//! sidecar signs short-lived leaf certificates with it for exactly the
//! intercepted hosts. ECDSA P-256 throughout.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
    GeneralSubtree, KeyPair, KeyUsagePurpose, NameConstraints,
};
use time::{Duration as TimeDuration, OffsetDateTime};

/// A local CA outlives the deployments that trust it.
const DEFAULT_CA_YEARS: i64 = 10;
/// The subject apps' trust stores show.
pub const CA_NAME: &str = "wxsidecar local CA (WeChat API interception)";

/// A leaf certificate and its key, as rustls wants them.
pub struct Leaf {
    pub cert_der: Vec<u8>,
    pub key_der: Vec<u8>,
    pub not_after: SystemTime,
}

/// The DNS subtree a new CA may sign for: every WeChat API host is under it.
pub const DEFAULT_PERMITTED_DOMAIN: &str = "weixin.qq.com";

/// Makes a new CA: `(certificate PEM, key PEM)`. It signs leaves only
/// (`pathlen:0`), and only for names under `permitted` (X.509 name
/// constraints): a leaked key cannot sign other sites for clients that
/// honour constraints (rustls, Go, OpenSSL, browsers do).
pub fn new_ca(permitted: &[String]) -> Result<(String, String), rcgen::Error> {
    let mut ca = super::ca_params(
        CA_NAME,
        365 * DEFAULT_CA_YEARS,
        BasicConstraints::Constrained(0),
    )?;
    ca.name_constraints = Some(NameConstraints {
        permitted_subtrees: permitted
            .iter()
            .map(|d| GeneralSubtree::DnsName(d.clone()))
            .collect(),
        excluded_subtrees: Vec::new(),
    });
    let key = KeyPair::generate()?;
    let cert = ca.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// `wxsidecar ca init --out DIR`: writes `ca.pem` and `ca-key.pem` (0600).
/// Refuses to replace either unless `force`.
pub fn init(out: &Path, force: bool, permitted: &[String]) -> Result<(PathBuf, PathBuf), String> {
    if permitted.is_empty() {
        return Err("give at least one --permit domain (default weixin.qq.com)".into());
    }
    let cert_path = out.join("ca.pem");
    let key_path = out.join("ca-key.pem");
    if !force {
        for p in [&cert_path, &key_path] {
            if p.exists() {
                return Err(format!(
                    "{} exists; apps may already trust it. Use --force to replace it",
                    p.display()
                ));
            }
        }
    }
    std::fs::create_dir_all(out).map_err(|e| format!("creating {}: {e}", out.display()))?;
    let (cert, key) = new_ca(permitted).map_err(|e| format!("making the CA: {e}"))?;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(&key_path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_path)
        .map_err(|e| format!("writing {}: {e}", key_path.display()))?;
    f.write_all(key.as_bytes())
        .map_err(|e| format!("writing {}: {e}", key_path.display()))?;
    std::fs::write(&cert_path, cert)
        .map_err(|e| format!("writing {}: {e}", cert_path.display()))?;
    Ok((cert_path, key_path))
}

/// The DNS subtrees a CA certificate's name constraints permit; `None`
/// when it has no constraints (any name: weaker, but still accepted).
pub fn permitted_domains(ca_cert_pem: &str) -> Result<Option<Vec<String>>, String> {
    let der = pem::parse(ca_cert_pem).map_err(|e| format!("CA certificate unreadable: {e}"))?;
    let (_, x509) = x509_parser::parse_x509_certificate(der.contents())
        .map_err(|e| format!("CA certificate unreadable: {e}"))?;
    let nc = x509
        .name_constraints()
        .map_err(|e| format!("CA name constraints unreadable: {e}"))?;
    Ok(nc.map(|nc| {
        nc.value
            .permitted_subtrees
            .iter()
            .flatten()
            .filter_map(|t| match t.base {
                x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_string()),
                _ => None,
            })
            .collect()
    }))
}

/// Whether `host` is `domain` or under it (name-constraint matching).
pub fn within(host: &str, domain: &str) -> bool {
    let (host, domain) = (
        host.to_ascii_lowercase(),
        domain.trim_start_matches('.').to_ascii_lowercase(),
    );
    host == domain || host.ends_with(&format!(".{domain}"))
}

/// Signs a leaf for exactly `hosts`, valid for `lifetime`, with the CA.
pub fn sign_leaf(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    hosts: &[String],
    lifetime: Duration,
) -> Result<Leaf, String> {
    let ca_key = KeyPair::from_pem(ca_key_pem).map_err(|e| format!("CA key unreadable: {e}"))?;
    let der = pem::parse(ca_cert_pem).map_err(|e| format!("CA certificate unreadable: {e}"))?;
    let (_, x509) = x509_parser::parse_x509_certificate(der.contents())
        .map_err(|e| format!("CA certificate unreadable: {e}"))?;
    if x509.public_key().subject_public_key.data.as_ref() != ca_key.public_key_raw() {
        return Err("the CA key does not belong to the CA certificate".into());
    }
    let ca_params = CertificateParams::from_ca_cert_der(&der.contents().to_vec().into())
        .map_err(|e| format!("CA certificate unusable: {e}"))?;
    let ca = ca_params
        .self_signed(&ca_key)
        .map_err(|e| format!("CA certificate unusable: {e}"))?;
    let now = OffsetDateTime::now_utc();
    let mut leaf = CertificateParams::new(hosts.to_vec()).map_err(|e| e.to_string())?;
    leaf.distinguished_name = DistinguishedName::new();
    leaf.distinguished_name.push(
        DnType::CommonName,
        hosts.first().map(String::as_str).unwrap_or("wxsidecar"),
    );
    leaf.distinguished_name
        .push(DnType::OrganizationName, "wxsidecar");
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.not_before = now - TimeDuration::minutes(5);
    let not_after = now + TimeDuration::seconds(lifetime.as_secs() as i64);
    leaf.not_after = not_after;
    let leaf_key = KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = leaf
        .signed_by(&leaf_key, &ca, &ca_key)
        .map_err(|e| format!("signing the leaf: {e}"))?;
    Ok(Leaf {
        cert_der: cert.der().to_vec(),
        key_der: leaf_key.serialize_der(),
        not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(not_after.unix_timestamp() as u64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wechat() -> Vec<String> {
        vec![DEFAULT_PERMITTED_DOMAIN.to_string()]
    }

    /// Whether a client that honours name constraints (rustls's webpki)
    /// accepts `leaf` for `name` under `ca`.
    fn verifies(ca: &str, leaf: &Leaf, name: &str) -> bool {
        use tokio_rustls::rustls;
        use tokio_rustls::rustls::client::danger::ServerCertVerifier;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(pem::parse(ca).unwrap().contents().to_vec().into())
            .unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            std::sync::Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        verifier
            .verify_server_cert(
                &leaf.cert_der.clone().into(),
                &[],
                &rustls::pki_types::ServerName::try_from(name.to_string()).unwrap(),
                &[],
                rustls::pki_types::UnixTime::now(),
            )
            .is_ok()
    }

    #[test]
    fn the_ca_can_sign_for_wechat_only() {
        let (cert, key) = new_ca(&wechat()).unwrap();
        assert_eq!(
            permitted_domains(&cert).unwrap(),
            Some(vec!["weixin.qq.com".to_string()])
        );
        let day = Duration::from_secs(86400);
        let good = sign_leaf(&cert, &key, &["api.weixin.qq.com".into()], day).unwrap();
        assert!(verifies(&cert, &good, "api.weixin.qq.com"));
        // A leaked key signing another site: refused by the client.
        let bad = sign_leaf(&cert, &key, &["bank.example.com".into()], day).unwrap();
        assert!(!verifies(&cert, &bad, "bank.example.com"));
        assert!(within("sh.api.weixin.qq.com", "weixin.qq.com"));
        assert!(!within("weixin.qq.com.evil.com", "weixin.qq.com"));
        assert!(!within("xweixin.qq.com", "weixin.qq.com"));
    }

    #[test]
    fn leaf_covers_exactly_the_hosts_and_chains_to_the_ca() {
        let (cert, key) = new_ca(&wechat()).unwrap();
        let hosts = vec![
            "api.weixin.qq.com".to_string(),
            "qyapi.weixin.qq.com".into(),
        ];
        let leaf = sign_leaf(&cert, &key, &hosts, Duration::from_secs(86400)).unwrap();
        let (_, x) = x509_parser::parse_x509_certificate(&leaf.cert_der).unwrap();
        let sans: Vec<String> = x
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(
            sans,
            ["DNSName(api.weixin.qq.com)", "DNSName(qyapi.weixin.qq.com)"]
        );
        let ca_der = pem::parse(&cert).unwrap();
        let (_, ca) = x509_parser::parse_x509_certificate(ca_der.contents()).unwrap();
        assert_eq!(x.issuer(), ca.subject());
        assert!(ca.is_ca());
    }

    #[test]
    fn a_key_from_another_ca_is_refused() {
        let (cert, _) = new_ca(&wechat()).unwrap();
        let (_, other_key) = new_ca(&wechat()).unwrap();
        let e = sign_leaf(
            &cert,
            &other_key,
            &["a.b".into()],
            Duration::from_secs(3600),
        )
        .err()
        .unwrap();
        assert!(e.contains("does not belong"), "{e}");
    }
}
