//! `/status` as a type: what the admin listener serialises and what tests
//! and tools deserialise, so a field is named in one place. Never a token,
//! a ticket or a secret: none of these types has a field for one.

use serde::{Deserialize, Serialize};

/// The whole `/status` answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub uptime_seconds: u64,
    pub ready: bool,
    /// Background tasks running: the lease scheduler, two per upstream
    /// host, the store watcher, leaf re-signing.
    pub background_tasks: usize,
    /// Tokens and tickets kept fresh by the lease scheduler.
    pub leases_refreshed: usize,
    pub accounts: Vec<AccountStatus>,
    /// 1 at start, one more per applied reload.
    #[serde(default)]
    pub config_generation: u64,
    /// What the last reload did (or why it was refused).
    #[serde(default)]
    pub last_reload: Option<crate::generation::ReloadReport>,
    /// Third-party platforms (`platforms:`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<PlatformStatus>,
    /// WeChat calls the admin listener made (`/quota`, `/rid`, `POST /quota/clear`).
    #[serde(default)]
    pub admin_calls: AdminCallsStatus,
    pub store: StoreStatus,
    pub upstream: FamilyStatus,
    pub wecom_upstream: Option<FamilyStatus>,
}

/// WeChat calls made for the admin, by API, since start: `quota/get` and
/// `rid/get` at most once a minute per account and path (or rid).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AdminCallsStatus {
    pub quota_get: u64,
    pub rid_get: u64,
    pub clear_quota: u64,
}

/// One account: its token's age and counters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AccountStatus {
    pub name: String,
    pub kind: String,
    /// The appid, or the corpid for WeCom.
    pub appid: String,
    pub agentid: Option<String>,
    pub token_api: String,
    pub token_valid: bool,
    pub token_fetched_unix: Option<u64>,
    pub token_age_seconds: Option<u64>,
    pub token_expires_in_seconds: Option<u64>,
    pub fetches_ok: u64,
    pub fetches_today: u32,
    pub budget_left: u32,
    pub budget_spent: bool,
    pub invalid_token_reports: u64,
    pub replays_ok: u64,
    pub replays_failed: u64,
    pub fetches_failed: u64,
    pub last_error: Option<LastError>,
    pub tickets: Vec<TicketStatus>,
    /// The IP WeChat last named as the one our calls come from.
    pub egress_ip_seen: Option<String>,
    /// WeChat refuses calls from that IP (not whitelisted); cleared by the
    /// next call that goes through.
    pub ip_whitelist_error: Option<IpWhitelistError>,
    /// API paths whose daily quota WeChat said is spent (45009), until
    /// midnight UTC+8.
    pub quota_exhausted: Vec<String>,
}

/// A standing IP-whitelist refusal (40164, 60020, 61004, 89503).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IpWhitelistError {
    pub errcode: i64,
    pub errmsg: String,
    /// The IP WeChat named, if it named one.
    pub ip: Option<String>,
    pub seconds_ago: u64,
}

/// A ticket in use: ages and counters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TicketStatus {
    #[serde(rename = "type")]
    pub kind: String,
    pub valid: bool,
    pub age_seconds: Option<u64>,
    pub expires_in_seconds: Option<u64>,
    pub fetches_ok: u64,
    pub fetches_failed: u64,
    pub fetches_today: u32,
    pub budget_spent: bool,
    pub last_error: Option<LastError>,
}

/// WeChat's errcode and message of the last failed fetch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LastError {
    pub errcode: i64,
    pub errmsg: String,
}

/// The token store: `memory`, or `redis` with its masked URL and state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoreStatus {
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub state: Option<String>,
}

/// A third-party platform: its ticket and component token (never their
/// values), and how many accounts authorised it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlatformStatus {
    pub name: String,
    pub component_appid: String,
    pub ticket_received: bool,
    pub component_token_valid: bool,
    pub component_token_expires_in_seconds: Option<u64>,
    pub component_last_error: Option<LastError>,
    pub authorizers: usize,
    /// `forward_events`: what was handed on to the app.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub forward: Option<ForwardStatus>,
}

/// Events handed on to the app's handler (`platforms[].forward_events`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ForwardStatus {
    pub url: String,
    pub format: String,
    pub sent: u64,
    /// Given up after every try.
    pub failed: u64,
    /// Not queued: the queue was full.
    pub dropped: u64,
    pub last_error: Option<String>,
}

pub use wxsidecar_upstream::status::{FamilyStatus, HostStatus};
