//! What `/status` shows of an upstream family and its hosts (the product's
//! `status::Status` holds these).

use serde::{Deserialize, Serialize};

/// An upstream family (its failover group).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FamilyStatus {
    pub active: Option<String>,
    /// `upstream.proxy`, credentials masked.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub proxy: Option<String>,
    pub breaker_open: bool,
    pub hosts: Vec<HostStatus>,
}

/// One upstream host and its pool.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostStatus {
    pub url: String,
    pub in_use: bool,
    pub warm_connections: usize,
    pub protocol: String,
    pub h2_connections_open: usize,
    pub idle_connections: usize,
    pub connect_failures_in_a_row: u32,
    pub connections_opened: u64,
    pub connections_reused: u64,
    pub requests: u64,
    pub failures: u64,
    /// Why the last connect failed, until one succeeds.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub last_connect_error: Option<String>,
}
