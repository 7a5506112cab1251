//! Fetching a ticket from WeChat with the account's current token.
//!
//! A fetch that WeChat refuses because of the token (40001/40014/42001) goes
//! through the token's compare-and-refresh path first — report the token,
//! wait for its replacement — and is tried once more with the new token.

use std::time::Duration;

use pingora::http::RequestHeader;

use super::token::{exchange, FetchError};
use crate::account::Account;
use crate::config::AccountKind;
use crate::failover::Upstreams;
use crate::inspect::INVALID_TOKEN;
use crate::lease::refresher::Fetched;
use crate::query;
use crate::ticket::TicketKind;

/// Fetches `account`'s ticket of `kind`, waiting up to `wait` for a token.
pub async fn fetch(
    upstream: &Upstreams,
    account: &Account,
    kind: TicketKind,
    wait: Duration,
) -> Result<Fetched, FetchError> {
    let no_token = |why: &str| FetchError::NoToken(format!("account {}: {why}", account.name));
    let mut token = account
        .tokens
        .wait_valid(wait)
        .await
        .ok_or_else(|| no_token("no valid token to fetch the ticket with"))?;
    let mut retried = false;
    loop {
        let req = request(account.kind, kind, &token.value);
        match exchange(upstream, &req, &[]).await {
            Err(FetchError::WeChat { errcode, .. })
                if !retried && INVALID_TOKEN.contains(&errcode) =>
            {
                tracing::info!(account = %account.name, ticket = kind.as_str(), errcode, "ticket fetch refused for the token; refreshing the token first");
                account.tokens.report_invalid(&token.value);
                token = account
                    .tokens
                    .wait_replacement(&token.value, wait)
                    .await
                    .ok_or_else(|| no_token("the token refresh did not finish in time"))?;
                retried = true;
            }
            other => return other,
        }
    }
}

/// WeChat's path for each ticket, with the token in the query.
fn request(account: AccountKind, kind: TicketKind, token: &str) -> RequestHeader {
    let (path, q) = match (account, kind) {
        (AccountKind::WeCom, TicketKind::Jsapi) => ("/cgi-bin/get_jsapi_ticket", None),
        (AccountKind::WeCom, _) => ("/cgi-bin/ticket/get", Some("type=agent_config")),
        (AccountKind::Official, TicketKind::WxCard) => {
            ("/cgi-bin/ticket/getticket", Some("type=wx_card"))
        }
        (AccountKind::Official, _) => ("/cgi-bin/ticket/getticket", Some("type=jsapi")),
    };
    let pq = format!("{path}?{}", query::with_token(q, token));
    let mut req = RequestHeader::build("GET", pq.as_bytes(), None).expect("valid path");
    req.insert_header(
        "User-Agent",
        concat!("wxsidecar/", env!("CARGO_PKG_VERSION")),
    )
    .expect("valid header");
    req
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let pq = |a, k| request(a, k, "T").uri.to_string();
        assert_eq!(
            pq(AccountKind::Official, TicketKind::Jsapi),
            "/cgi-bin/ticket/getticket?type=jsapi&access_token=T"
        );
        assert_eq!(
            pq(AccountKind::Official, TicketKind::WxCard),
            "/cgi-bin/ticket/getticket?type=wx_card&access_token=T"
        );
        assert_eq!(
            pq(AccountKind::WeCom, TicketKind::Jsapi),
            "/cgi-bin/get_jsapi_ticket?access_token=T"
        );
        assert_eq!(
            pq(AccountKind::WeCom, TicketKind::AgentConfig),
            "/cgi-bin/ticket/get?type=agent_config&access_token=T"
        );
    }
}
