//! `check --print`: the checked [`Config`] serialised back into the file's
//! format, every default filled in, secrets as `***` and the store URL
//! masked. The checked types derive `Serialize` with these helpers, so a
//! new key is written once, on its checked type.

use std::fmt::Display;
use std::time::Duration;

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

use super::{AccountConfig, AccountKind, Config};
use wxsidecar_core::secret::Secret;

/// The configuration as YAML text.
pub fn yaml(c: &Config) -> String {
    serde_yaml_ng::to_string(c).expect("the configuration serialises")
}

/// A duration as the file writes it: `300s`, or `250ms` when not whole.
pub fn duration_text(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// [`duration_text`] as a serialised value.
pub fn duration<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&duration_text(*d))
}

/// A value by its `Display`.
pub fn display<T: Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// A list by each item's `Display`.
pub fn display_all<T: Display, S: Serializer>(v: &[T], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(|x| x.to_string()))
}

/// An optional value as its `Display`, or nothing.
pub fn display_opt<T: Display, S: Serializer>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        None => s.serialize_none(),
        Some(x) => s.serialize_str(&x.to_string()),
    }
}

/// `token.store`: `memory`, or the Redis URL with its password masked.
pub fn store_url<S: Serializer>(v: &Option<Secret>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        None => s.serialize_str("memory"),
        Some(url) => s.serialize_str(&wxsidecar_core::secret::mask_url(url.expose())),
    }
}

/// An account in the file's words: `appid` and `token_api` for Official
/// Accounts, `corpid` and `agentid` for WeCom.
impl Serialize for AccountConfig {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("name", &self.name)?;
        m.serialize_entry("kind", &self.kind)?;
        match self.kind {
            AccountKind::Official => {
                m.serialize_entry("appid", &self.appid)?;
                m.serialize_entry("token_api", &self.token_api)?;
            }
            AccountKind::WeCom => {
                m.serialize_entry("corpid", &self.appid)?;
                m.serialize_entry("agentid", &self.agentid)?;
            }
        }
        m.serialize_entry("secret", &self.secret)?;
        m.serialize_entry("default", &self.default)?;
        m.serialize_entry("replace_tokens", &self.replace_tokens)?;
        if !self.limits.is_empty() {
            let limits: std::collections::BTreeMap<&str, std::collections::BTreeMap<&str, u64>> =
                self.limits
                    .iter()
                    .map(|(p, n)| (p.as_str(), [("per_day", *n)].into_iter().collect()))
                    .collect();
            m.serialize_entry("limits", &limits)?;
        }
        m.end()
    }
}
