//! The effective configuration, defaults filled in, for `check --print`:
//! the same keys as the file, secrets and the store password masked.

use std::time::Duration;

use serde_json::{json, Value};

use crate::config::{Config, ReplaceTokens, UpstreamConfig};

fn dur(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

fn upstream(u: &UpstreamConfig) -> Value {
    json!({
        "url": u.url.to_string(),
        "failover": u.failover.iter().map(|f| f.to_string()).collect::<Vec<_>>(),
        "failover_after": u.failover_after,
        "probe_interval": dur(u.probe_interval),
        "ca_file": u.ca_file.as_ref().map(|p| p.display().to_string()),
        "connect_timeout": dur(u.connect_timeout),
        "read_timeout": dur(u.read_timeout),
        "answer_timeout": dur(u.answer_timeout),
        "warm_connections": u.warm_connections,
        "idle_timeout": dur(u.idle_timeout),
        "dns": u.dns.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
        "http2": u.http2,
    })
}

/// The effective configuration as YAML text.
pub fn yaml(c: &Config) -> String {
    let accounts: Vec<Value> = c
        .accounts
        .iter()
        .map(|a| {
            let mut v = json!({
                "name": a.name,
                "kind": a.kind.as_str(),
                "secret": "***",
                "default": a.default,
                "replace_tokens": match a.replace_tokens {
                    ReplaceTokens::Issued => "issued",
                    ReplaceTokens::Always => "always",
                },
            });
            match a.kind {
                crate::config::AccountKind::Official => {
                    v["appid"] = json!(a.appid);
                    v["token_api"] = json!(a.token_api.as_str());
                }
                crate::config::AccountKind::WeCom => {
                    v["corpid"] = json!(a.appid);
                    v["agentid"] = json!(a.agentid);
                }
            }
            v
        })
        .collect();
    let t = &c.token;
    let limit =
        |l: Option<crate::clients::Limit>| l.map(|l| json!({"rps": l.rps, "burst": l.burst}));
    let doc = json!({
        "listen": c.listen.to_string(),
        "admin_listen": c.admin_listen.to_string(),
        "threads": c.threads,
        "shutdown_grace": dur(c.shutdown_grace),
        "upgrade_sock": c.upgrade_sock.display().to_string(),
        "pid_file": c.pid_file.display().to_string(),
        "limits": {
            "buffered_body": c.buffered_body_limit,
            "max_connections": c.limits.max_connections,
            "max_admin_connections": c.limits.max_admin_connections,
            "header_timeout": dur(c.limits.header_timeout),
            "idle_timeout": dur(c.limits.idle_timeout),
            "body_timeout": dur(c.limits.body_timeout),
        },
        "admin": {
            "token": c.admin.token.as_ref().map(|_| "***"),
            "protect_metrics": c.admin.protect_metrics,
            "refresh_interval": dur(c.admin.refresh_interval),
        },
        "upstream": upstream(&c.upstream),
        "wecom_upstream": upstream(&c.wecom_upstream),
        "accounts": accounts,
        "token": {
            "refresh_before": dur(t.refresh_before),
            "daily_budget": t.daily_budget,
            "budget_reserve": t.budget_reserve,
            "failed_retry": dur(t.failed_retry),
            "store": t.store.as_ref().map_or("memory".to_string(), |s| crate::secret::mask_url(s.expose())),
            "store_prefix": t.store_prefix,
            "on_store_error": t.on_store_error.map(|p| format!("{p:?}").to_lowercase()),
            "store_lock_ttl": dur(t.store_lock_ttl),
        },
        "clients": {
            "allow": c.clients.allow.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            "tokens": c.clients.tokens.iter().map(|t| json!({"name": t.name, "token": "***", "accounts": t.accounts})).collect::<Vec<_>>(),
            "rate_limit": {"per_client": limit(c.clients.per_client), "per_account": limit(c.clients.per_account)},
        },
        "intercept": c.intercept.as_ref().map(|i| json!({
            "ca_cert": i.ca_source,
            "ca_key": "***",
            "hosts": i.hosts,
            "https_listen": i.https_listen.map(|a| a.to_string()),
            "http_listen": i.http_listen.map(|a| a.to_string()),
            "proxy_listen": i.proxy_listen.map(|a| a.to_string()),
            "leaf_lifetime": dur(i.leaf_lifetime),
        })),
    });
    serde_yaml_ng::to_string(&doc).unwrap_or_default()
}
