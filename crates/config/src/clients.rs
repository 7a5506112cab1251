//! The `clients` section: who may call the app listener, and how fast.
//! Parsed here; enforced by [`crate::clients`].

use ipnet::IpNet;

use std::collections::HashSet;

use super::{expand_env, secret_file, AccountConfig};
use wxsidecar_core::secret::Secret;

/// Requests per second with a burst.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Limit {
    pub rps: f64,
    pub burst: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ClientToken {
    pub name: String,
    pub token: Secret,
    /// `None`: every account.
    pub accounts: Option<Vec<String>>,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ClientsConfig {
    #[serde(serialize_with = "super::print::display_all")]
    pub allow: Vec<IpNet>,
    pub tokens: Vec<ClientToken>,
    pub rate_limit: RateLimits,
}

/// `clients.rate_limit`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RateLimits {
    pub per_client: Option<Limit>,
    pub per_account: Option<Limit>,
}

impl ClientsConfig {
    pub fn restricts(&self) -> bool {
        !self.allow.is_empty() || !self.tokens.is_empty()
    }
}

/// Parses `clients`: who may call, and how fast.
pub(super) fn parse(
    raw: super::raw::Clients,
    accounts: &[AccountConfig],
    platforms: &[super::platform::PlatformConfig],
    problems: &mut Vec<String>,
) -> ClientsConfig {
    let allow = raw
        .allow
        .unwrap_or_default()
        .iter()
        .enumerate()
        .filter_map(|(i, a)| {
            a.parse::<ipnet::IpNet>()
                .or_else(|_| a.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    problems.push(format!(
                        "clients.allow[{i}]: `{a}` is not a CIDR like 10.0.0.0/8 or an address"
                    ))
                })
                .ok()
        })
        .collect();
    let mut names = HashSet::new();
    let tokens = raw
        .tokens
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .filter_map(|(i, t)| {
            let at = |k: &str| format!("clients.tokens[{i}].{k}");
            let name = t.name.filter(|n| !n.is_empty()).unwrap_or_else(|| {
                problems.push(format!("{}: missing; name the calling app", at("name")));
                format!("#{i}")
            });
            if !names.insert(name.clone()) {
                problems.push(format!("{}: `{name}` is used twice", at("name")));
            }
            let value = match (t.token, t.token_file) {
                (Some(v), None) => expand_env(&at("token"), &v, problems),
                (None, Some(f)) => expand_env(&at("token_file"), &f, problems)
                    .and_then(|p| secret_file(&at("token_file"), &p, "", problems)),
                _ => {
                    problems.push(format!(
                        "{}: set token or token_file (client `{name}`)",
                        at("token")
                    ));
                    None
                }
            }?;
            if value.len() < 16 {
                problems.push(format!(
                    "{}: too short (client `{name}`); use at least 16 random characters",
                    at("token")
                ));
            }
            for a in t.accounts.iter().flatten() {
                if !accounts.iter().any(|acc| &acc.name == a)
                    && !platforms.iter().any(|p| &p.name == a)
                {
                    problems.push(format!(
                        "{}: no account or platform named `{a}`",
                        at("accounts")
                    ));
                }
            }
            Some(ClientToken {
                name,
                token: Secret::new(value),
                accounts: t.accounts,
            })
        })
        .collect();
    let rate = raw.rate_limit.unwrap_or_default();
    let limit = |key: &str, l: Option<super::raw::Limit>, problems: &mut Vec<String>| {
        l.and_then(|l| {
            let burst = l.burst.unwrap_or(l.rps.max(1.0));
            if !(l.rps > 0.0 && burst >= 1.0) {
                problems.push(format!(
                    "clients.rate_limit.{key}: rps must be > 0 and burst >= 1"
                ));
                return None;
            }
            Some(Limit { rps: l.rps, burst })
        })
    };
    ClientsConfig {
        allow,
        tokens,
        rate_limit: RateLimits {
            per_client: limit("per_client", rate.per_client, problems),
            per_account: limit("per_account", rate.per_account, problems),
        },
    }
}
