//! Who may call the app listener, and how fast.
//!
//! On loopback (the sidecar case) anyone local may call. A shared deployment
//! (`listen` not on loopback) must say who: `clients.allow` (CIDRs) and/or
//! `clients.tokens` (one bearer token per calling app, compared in constant
//! time, optionally limited to some accounts). `clients.rate_limit` caps
//! requests per client and per account (token buckets), so one runaway app
//! cannot burn an account's minute quota. Refusals never echo a token.

use std::collections::HashMap;
use std::net::IpAddr;
use tokio::time::Instant;

use parking_lot::Mutex;

/// Buckets of clients not seen for this long are dropped when the map grows.
const DEFAULT_BUCKET_IDLE_SECS: f64 = 60.0;
/// Past this many tracked clients, idle buckets are swept.
const DEFAULT_MAX_BUCKETS: usize = 10_000;

pub use crate::config::{ClientsConfig, Limit};

/// Why a caller was turned away.
#[derive(Debug, thiserror::Error)]
pub enum Denied {
    #[error("client {0} is not in clients.allow")]
    Address(String),
    #[error(
        "missing or unknown bearer token (clients.tokens); send Authorization: Bearer <token>"
    )]
    Token,
    #[error("client {client} may not use account {account}")]
    Account { client: String, account: String },
    #[error("rate limit for {who} exceeded (clients.rate_limit); retry in {retry_after} s")]
    Rate {
        who: String,
        /// Seconds until the bucket holds a request again (`Retry-After`).
        retry_after: u64,
    },
}

impl Denied {
    pub fn status(&self) -> u16 {
        match self {
            Denied::Rate { .. } => 429,
            _ => 403,
        }
    }

    /// WeChat's codes for the same situations, so SDKs react sensibly.
    pub fn errcode(&self) -> i64 {
        match self {
            Denied::Address(_) => 40164,
            Denied::Token | Denied::Account { .. } => 48001,
            Denied::Rate { .. } => 45011,
        }
    }

    /// Seconds to tell the caller to wait (`Retry-After`), for a rate limit.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Denied::Rate { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

/// Whole seconds until a bucket refilling at `limit.rps` holds one request.
fn refill_secs(limit: &Limit) -> u64 {
    if limit.rps > 0.0 {
        (1.0 / limit.rps).ceil().clamp(1.0, 3600.0) as u64
    } else {
        3600
    }
}

/// A caller admitted at the door.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The token's name, or the client address.
    pub name: String,
    token: Option<usize>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self, limit: Limit, now: Instant) -> bool {
        let elapsed = now.duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * limit.rps).min(limit.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[derive(Default)]
struct Buckets(Mutex<HashMap<String, Bucket>>);

impl Buckets {
    fn take(&self, key: &str, limit: Limit) -> bool {
        let now = Instant::now();
        let mut map = self.0.lock();
        if map.len() > DEFAULT_MAX_BUCKETS {
            map.retain(|_, b| now.duration_since(b.at).as_secs_f64() < DEFAULT_BUCKET_IDLE_SECS);
        }
        match map.get_mut(key) {
            Some(b) => b.take(limit, now),
            None => {
                let mut b = Bucket {
                    tokens: limit.burst,
                    at: now,
                };
                let ok = b.take(limit, now);
                map.insert(key.to_string(), b);
                ok
            }
        }
    }
}

pub struct Clients {
    conf: ClientsConfig,
    per_client: Buckets,
    per_account: Buckets,
}

impl Clients {
    pub fn new(conf: ClientsConfig) -> Self {
        Clients {
            conf,
            per_client: Buckets::default(),
            per_account: Buckets::default(),
        }
    }

    /// No `clients` settings at all: every caller is admitted as is, and
    /// the request path skips admission.
    pub fn is_open(&self) -> bool {
        !self.conf.restricts()
            && self.conf.rate_limit.per_client.is_none()
            && self.conf.rate_limit.per_account.is_none()
    }

    /// Whether admitting a caller needs its address (allow-list, or
    /// per-client limits keyed by address).
    pub fn needs_address(&self) -> bool {
        !self.conf.allow.is_empty()
            || (self.conf.rate_limit.per_client.is_some() && self.conf.tokens.is_empty())
    }

    /// Whether `clients.allow` lets this address in (no list: everyone).
    pub fn allows_address(&self, addr: std::net::IpAddr) -> bool {
        self.conf.allow.is_empty() || self.conf.allow.iter().any(|n| n.contains(&addr))
    }

    pub fn uses_tokens(&self) -> bool {
        !self.conf.tokens.is_empty()
    }

    /// Checks the caller's address, bearer token and per-client rate.
    pub fn admit(
        &self,
        addr: Option<IpAddr>,
        authorization: Option<&[u8]>,
    ) -> Result<Caller, Denied> {
        // On a dual-stack listener (`[::]`) an IPv4 peer shows as
        // `::ffff:a.b.c.d`: it is matched (and named) as the IPv4 address.
        let addr = addr.map(|a| a.to_canonical());
        let shown = addr.map_or("unknown".to_string(), |a| a.to_string());
        if !self.conf.allow.is_empty()
            && !addr.is_some_and(|a| self.conf.allow.iter().any(|n| n.contains(&a)))
        {
            return Err(Denied::Address(shown));
        }
        let mut caller = Caller {
            name: shown,
            token: None,
        };
        if !self.conf.tokens.is_empty() {
            let presented = crate::secret::bearer(authorization).ok_or(Denied::Token)?;
            // Compare with every token, so timing does not tell which matched.
            let matched = self
                .conf
                .tokens
                .iter()
                .enumerate()
                .fold(None, |found, (i, t)| {
                    if t.token.matches(presented) {
                        Some(i)
                    } else {
                        found
                    }
                });
            let i = matched.ok_or(Denied::Token)?;
            caller = Caller {
                name: self.conf.tokens[i].name.clone(),
                token: Some(i),
            };
        }
        if let Some(limit) = self.conf.rate_limit.per_client {
            if !self.per_client.take(&caller.name, limit) {
                return Err(Denied::Rate {
                    who: format!("client {}", caller.name),
                    retry_after: refill_secs(&limit),
                });
            }
        }
        Ok(caller)
    }

    /// Checks that the caller may use `account` (an account's name, or a
    /// platform's for its own component calls), and the account's rate. An
    /// account a platform holds (`platform`: its name) is allowed to a token
    /// listing that platform too.
    pub fn account(
        &self,
        caller: &Caller,
        account: &str,
        platform: Option<&str>,
    ) -> Result<(), Denied> {
        if let Some(allowed) = caller
            .token
            .and_then(|i| self.conf.tokens[i].accounts.as_ref())
        {
            if !allowed
                .iter()
                .any(|a| a == account || Some(a.as_str()) == platform)
            {
                return Err(Denied::Account {
                    client: caller.name.clone(),
                    account: account.to_string(),
                });
            }
        }
        if let Some(limit) = self.conf.rate_limit.per_account {
            if !self.per_account.take(account, limit) {
                return Err(Denied::Rate {
                    who: format!("account {account}"),
                    retry_after: refill_secs(&limit),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ClientToken;
    use crate::secret::Secret;

    fn clients(conf: ClientsConfig) -> Clients {
        Clients::new(conf)
    }

    #[test]
    fn allow_list() {
        let c = clients(ClientsConfig {
            allow: vec!["10.1.0.0/16".parse().unwrap()],
            ..Default::default()
        });
        assert!(c.admit(Some("10.1.2.3".parse().unwrap()), None).is_ok());
        assert!(matches!(
            c.admit(Some("10.2.0.1".parse().unwrap()), None),
            Err(Denied::Address(_))
        ));
        assert!(matches!(c.admit(None, None), Err(Denied::Address(_))));
        // A dual-stack listener's IPv4 peer.
        let mapped = c.admit(Some("::ffff:10.1.2.3".parse().unwrap()), None);
        assert_eq!(mapped.unwrap().name, "10.1.2.3");
        assert!(c
            .admit(Some("::ffff:10.2.0.1".parse().unwrap()), None)
            .is_err());
    }

    #[test]
    fn bearer_tokens_and_account_limits() {
        let c = clients(ClientsConfig {
            tokens: vec![ClientToken {
                name: "billing".into(),
                token: Secret::new("tok-b"),
                accounts: Some(vec!["shop".into()]),
            }],
            ..Default::default()
        });
        let caller = c.admit(None, Some(b"Bearer tok-b")).unwrap();
        assert_eq!(caller.name, "billing");
        assert!(c.account(&caller, "shop", None).is_ok());
        assert!(matches!(
            c.account(&caller, "mall", None),
            Err(Denied::Account { .. })
        ));
        assert!(matches!(
            c.admit(None, Some(b"Bearer nope")),
            Err(Denied::Token)
        ));
        assert!(matches!(c.admit(None, None), Err(Denied::Token)));
    }

    #[test]
    fn rate_limit_with_burst() {
        let c = clients(ClientsConfig {
            rate_limit: crate::config::clients::RateLimits {
                per_client: Some(Limit {
                    rps: 1.0,
                    burst: 3.0,
                }),
                per_account: None,
            },
            ..Default::default()
        });
        let ip = Some("127.0.0.1".parse().unwrap());
        for _ in 0..3 {
            assert!(c.admit(ip, None).is_ok());
        }
        assert!(matches!(c.admit(ip, None), Err(Denied::Rate { .. })));
        assert!(
            c.admit(Some("127.0.0.2".parse().unwrap()), None).is_ok(),
            "per client"
        );
    }

    /// The bucket refills on tokio's clock: a paused clock moved on by a
    /// second gives one more request, not before.
    #[tokio::test(start_paused = true)]
    async fn a_bucket_refills_with_time() {
        let c = clients(ClientsConfig {
            rate_limit: crate::config::clients::RateLimits {
                per_client: Some(Limit {
                    rps: 1.0,
                    burst: 2.0,
                }),
                per_account: None,
            },
            ..Default::default()
        });
        let ip = Some("127.0.0.1".parse().unwrap());
        assert!(c.admit(ip, None).is_ok() && c.admit(ip, None).is_ok());
        assert!(matches!(c.admit(ip, None), Err(Denied::Rate { .. })));
        tokio::time::advance(std::time::Duration::from_millis(900)).await;
        assert!(matches!(c.admit(ip, None), Err(Denied::Rate { .. })));
        tokio::time::advance(std::time::Duration::from_millis(200)).await;
        assert!(c.admit(ip, None).is_ok(), "refilled after a second");
        assert!(matches!(c.admit(ip, None), Err(Denied::Rate { .. })));
    }
}
