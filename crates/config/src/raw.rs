//! The file format as serde reads it: every section and key, unknown keys
//! refused. Nothing past `Config::check` sees these raw strings.

use serde::Deserialize;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct File {
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    pub upgrade_sock: Option<String>,
    pub pid_file: Option<String>,
    pub threads: Option<usize>,
    pub shutdown_grace: Option<String>,
    pub limits: Option<Limits>,
    pub admin: Option<Admin>,
    pub upstream: Option<Upstream>,
    pub wecom_upstream: Option<Upstream>,
    pub accounts: Option<Vec<Account>>,
    pub token: Option<Token>,
    pub clients: Option<Clients>,
    pub intercept: Option<crate::intercept::RawIntercept>,
    pub reload: Option<Reload>,
    pub platforms: Option<Vec<crate::platform::raw::Platform>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Reload {
    pub watch: Option<bool>,
    pub interval: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Clients {
    pub allow: Option<Vec<String>>,
    pub tokens: Option<Vec<ClientToken>>,
    pub rate_limit: Option<RateLimit>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientToken {
    pub name: Option<String>,
    pub token: Option<String>,
    pub token_file: Option<String>,
    pub accounts: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub per_client: Option<Limit>,
    pub per_account: Option<Limit>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    pub rps: f64,
    pub burst: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub buffered_body: Option<String>,
    pub buffered_total: Option<String>,
    pub max_connections: Option<usize>,
    pub max_admin_connections: Option<usize>,
    pub header_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub body_timeout: Option<String>,
    pub send_timeout: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    pub token: Option<String>,
    pub token_file: Option<String>,
    pub protect_metrics: Option<bool>,
    pub refresh_interval: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub url: Option<String>,
    pub failover: Option<Vec<String>>,
    pub failover_after: Option<u32>,
    pub probe_interval: Option<String>,
    pub ca_file: Option<String>,
    pub connect_timeout: Option<String>,
    pub read_timeout: Option<String>,
    pub answer_timeout: Option<String>,
    pub warm_connections: Option<usize>,
    pub idle_timeout: Option<String>,
    pub dns: Option<Vec<String>>,
    pub http2: Option<bool>,
    pub proxy: Option<String>,
    pub proxy_file: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Account {
    pub name: Option<String>,
    pub kind: Option<String>,
    pub appid: Option<String>,
    pub corpid: Option<String>,
    pub agentid: Option<serde_yaml_ng::Value>,
    pub secret: Option<String>,
    pub secret_file: Option<String>,
    pub token_api: Option<String>,
    pub default: Option<bool>,
    pub replace_tokens: Option<String>,
    pub limits: Option<std::collections::BTreeMap<String, PathLimit>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathLimit {
    pub per_day: Option<u64>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Token {
    pub refresh_before: Option<String>,
    pub daily_budget: Option<u32>,
    pub budget_reserve: Option<u32>,
    pub failed_retry: Option<String>,
    pub store: Option<String>,
    pub store_prefix: Option<String>,
    pub on_store_error: Option<String>,
    pub store_lock_ttl: Option<String>,
}
