//! The JS-SDK helper on the app listener: what a web page passes to
//! `wx.config` (`GET /wxsidecar/jssdk/config?account=NAME&url=URL`) or to
//! WeCom's `wx.agentConfig` (`GET /wxsidecar/jssdk/agent_config?…`), signed
//! with the cached ticket per WeChat's rule: SHA-1 over
//! `jsapi_ticket=…&noncestr=…&timestamp=…&url=…` (keys sorted, the page URL
//! without its fragment). The ticket itself never leaves the sidecar here.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rand::distributions::Alphanumeric;
use rand::Rng;

use crate::account::Account;

pub const CONFIG_PATH: &str = "/wxsidecar/jssdk/config";
pub const AGENT_CONFIG_PATH: &str = "/wxsidecar/jssdk/agent_config";

/// WeChat's examples use 16 characters.
const DEFAULT_NONCE_LEN: usize = 16;

/// The signature WeChat checks in `wx.config` / `wx.agentConfig`.
pub fn signature(ticket: &str, noncestr: &str, timestamp: u64, url: &str) -> String {
    let plain =
        format!("jsapi_ticket={ticket}&noncestr={noncestr}&timestamp={timestamp}&url={url}");
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, plain.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The page URL as WeChat signs it: everything before `#`. Refuses what is
/// not an http(s) URL, since a page can only be one.
pub fn page_url(url: &str) -> Result<&str, String> {
    let page = url.split('#').next().unwrap_or_default();
    let lower = page.get(..8).unwrap_or(page).to_ascii_lowercase();
    if !(lower.starts_with("http://") || lower.starts_with("https://")) || page.len() <= 8 {
        return Err(format!(
            "url must be the page's full http(s) URL (URL-encoded in the query), got {:?}",
            url.chars().take(64).collect::<String>()
        ));
    }
    Ok(page)
}

/// A signed configuration for one page.
pub struct Signed {
    pub timestamp: u64,
    pub nonce: String,
    pub signature: String,
}

/// Signs `page` (already without its fragment) with `ticket`, now.
pub fn sign(ticket: &str, page: &str) -> Signed {
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let nonce: String = rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(DEFAULT_NONCE_LEN)
        .map(char::from)
        .collect();
    let signature = signature(ticket, &nonce, timestamp, page);
    Signed {
        timestamp,
        nonce,
        signature,
    }
}

/// The JSON a page hands to `wx.config` (`agent: false`) or to
/// `wx.agentConfig` (`agent: true`, WeCom accounts with an `agentid`).
pub fn answer(account: &Account, s: &Signed, agent: bool) -> Result<Bytes, String> {
    let v = if agent {
        let agentid = account.agentid.as_deref().ok_or_else(|| {
            format!(
                "account {} has no agentid: set accounts[].agentid to use wx.agentConfig",
                account.name
            )
        })?;
        // WeCom agent ids are numbers; keep anything else as written.
        let agentid = agentid
            .parse::<u64>()
            .map_or_else(|_| serde_json::json!(agentid), |n| serde_json::json!(n));
        serde_json::json!({
            "corpid": account.id,
            "agentid": agentid,
            "timestamp": s.timestamp,
            "nonceStr": s.nonce,
            "signature": s.signature,
        })
    } else {
        serde_json::json!({
            "appId": account.id,
            "timestamp": s.timestamp,
            "nonceStr": s.nonce,
            "signature": s.signature,
        })
    };
    Ok(Bytes::from(v.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// WeChat's published example (JS-SDK documentation, appendix 1).
    #[test]
    fn wechat_example() {
        let ticket = "sM4AOVdWfPE4DxkXGEs8VMCPGGVi4C3VM0P37wVUCFvkVAy_90u5h9nbSlYy3-Sl-HhTdfl2fzFy1AOcHKP7qg";
        let url = page_url("http://mp.weixin.qq.com?params=value#section").unwrap();
        assert_eq!(
            signature(ticket, "Wm3WZYTPz0wzccnW", 1414587457, url),
            "0f9de62fce790f9a083d5c99e95740ceb90c27ed"
        );
    }

    #[test]
    fn page_urls() {
        assert_eq!(
            page_url("https://a.example/p?x=1#frag").unwrap(),
            "https://a.example/p?x=1"
        );
        assert!(page_url("a.example/p").is_err());
        assert!(page_url("").is_err());
        assert!(page_url("javascript:alert(1)").is_err());
    }
}
