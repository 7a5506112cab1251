//! Certificates made at run time: a CA and a leaf it signs (the fake WeChat's
//! TLS identity; the transparent mode's local CA). ECDSA P-256.
//!
//! It may not know: pingora, the configuration, accounts. The product crate
//! re-exports it as `wxsidecar::certs`.
#![forbid(unsafe_code)]

pub mod ca;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use time::{Duration as TimeDuration, OffsetDateTime};

/// The host names WeChat's server API answers on.
pub const WECHAT_HOSTS: &[&str] = &[
    "api.weixin.qq.com",
    "api2.weixin.qq.com",
    "sh.api.weixin.qq.com",
    "sz.api.weixin.qq.com",
    "hk.api.weixin.qq.com",
    "qyapi.weixin.qq.com",
];

/// A CA with a leaf certificate, all as PEM/DER ready for rustls.
pub struct Issued {
    pub ca_pem: String,
    /// The CA's private key, to sign more leaves later with the same CA.
    pub ca_key_pem: String,
    pub leaf_der: Vec<u8>,
    pub leaf_key_der: Vec<u8>,
}

/// A CA certificate's parameters: `name` under organisation wxsidecar,
/// valid from an hour ago for `valid_days`.
pub fn ca_params(
    name: &str,
    valid_days: i64,
    constraints: BasicConstraints,
) -> Result<CertificateParams, rcgen::Error> {
    let now = OffsetDateTime::now_utc();
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(constraints);
    ca.distinguished_name = DistinguishedName::new();
    ca.distinguished_name.push(DnType::CommonName, name);
    ca.distinguished_name
        .push(DnType::OrganizationName, "wxsidecar");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = now - TimeDuration::hours(1);
    ca.not_after = now + TimeDuration::days(valid_days);
    Ok(ca)
}

/// Makes a CA named `ca_name` (with the given key, or a new one) and a leaf
/// for `names` (DNS names or IPs). A CA rebuilt from the same key and name is
/// the same trust anchor, so leaves it signs verify against the first CA PEM.
pub fn issue(
    ca_name: &str,
    names: &[String],
    valid_days: i64,
    ca_key_pem: Option<&str>,
) -> Result<Issued, rcgen::Error> {
    let now = OffsetDateTime::now_utc();
    let ca = ca_params(ca_name, valid_days, BasicConstraints::Unconstrained)?;
    let ca_key = match ca_key_pem {
        Some(pem) => KeyPair::from_pem(pem)?,
        None => KeyPair::generate()?,
    };
    let ca_cert = ca.self_signed(&ca_key)?;

    let mut leaf = CertificateParams::new(names.to_vec())?;
    leaf.distinguished_name = DistinguishedName::new();
    leaf.distinguished_name.push(
        DnType::CommonName,
        names.first().map(String::as_str).unwrap_or("localhost"),
    );
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.not_before = now - TimeDuration::hours(1);
    leaf.not_after = now + TimeDuration::days(valid_days);
    let leaf_key = KeyPair::generate()?;
    let leaf_cert = leaf.signed_by(&leaf_key, &ca_cert, &ca_key)?;

    Ok(Issued {
        ca_pem: ca_cert.pem(),
        ca_key_pem: ca_key.serialize_pem(),
        leaf_der: leaf_cert.der().to_vec(),
        leaf_key_der: leaf_key.serialize_der(),
    })
}
