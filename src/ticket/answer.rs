//! Apps' own ticket requests, answered from the cache whatever token they
//! carry: `/cgi-bin/ticket/getticket?type=jsapi|wx_card` (Official Account,
//! mini program), WeCom's `/cgi-bin/get_jsapi_ticket` and
//! `/cgi-bin/ticket/get?type=agent_config`.

use bytes::Bytes;

use super::TicketKind;
use crate::config::AccountKind;
use crate::lease::Lease;
use crate::query;
use crate::refusal::Refusal;

/// Which family's ticket of which type a request to a ticket path asks for.
pub fn requested(path: &str, q: &str) -> Result<(AccountKind, TicketKind), Refusal> {
    let invalid = Refusal {
        errcode: 40097,
        errmsg: "invalid args: type must be jsapi or wx_card (agent_config on WeCom)",
    };
    let ty = query::param(q, "type");
    // Compared as routes are (case and a trailing `/` aside).
    let path = crate::target::route_key(path);
    if path.eq_ignore_ascii_case("/cgi-bin/get_jsapi_ticket") {
        return Ok((AccountKind::WeCom, TicketKind::Jsapi));
    }
    if path.eq_ignore_ascii_case("/cgi-bin/ticket/get") {
        return match ty.as_deref() {
            Some("agent_config") => Ok((AccountKind::WeCom, TicketKind::AgentConfig)),
            _ => Err(invalid),
        };
    }
    match ty.as_deref() {
        Some("jsapi") => Ok((AccountKind::Official, TicketKind::Jsapi)),
        Some("wx_card") => Ok((AccountKind::Official, TicketKind::WxCard)),
        _ => Err(invalid),
    }
}

/// WeChat's answer, from the cache: `expires_in` is what the ticket really
/// has left, not the 7200 s WeChat may claim on a re-fetch.
pub fn body(ticket: &Lease) -> Bytes {
    Bytes::from(
        serde_json::json!({
            "errcode": 0,
            "errmsg": "ok",
            "ticket": &*ticket.value,
            "expires_in": ticket.remaining().as_secs(),
        })
        .to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_types() {
        let ok = |p, q| requested(p, q).ok();
        assert_eq!(
            ok("/cgi-bin/ticket/getticket", "access_token=x&type=jsapi"),
            Some((AccountKind::Official, TicketKind::Jsapi))
        );
        assert_eq!(
            ok("/cgi-bin/ticket/getticket", "type=wx_card"),
            Some((AccountKind::Official, TicketKind::WxCard))
        );
        assert_eq!(
            ok("/cgi-bin/get_jsapi_ticket", ""),
            Some((AccountKind::WeCom, TicketKind::Jsapi))
        );
        assert_eq!(
            ok("/cgi-bin/ticket/get", "type=agent_config"),
            Some((AccountKind::WeCom, TicketKind::AgentConfig))
        );
        assert!(ok("/cgi-bin/ticket/getticket", "type=other").is_none());
        assert!(ok("/cgi-bin/ticket/getticket", "").is_none());
        assert!(ok("/cgi-bin/ticket/get", "type=jsapi").is_none());
        // Every spelling the route accepts names the same ticket.
        assert_eq!(
            ok("/CGI-BIN/get_jsapi_ticket/", ""),
            Some((AccountKind::WeCom, TicketKind::Jsapi))
        );
        assert_eq!(
            ok("/cgi-bin/ticket/get/", "type=agent_config"),
            Some((AccountKind::WeCom, TicketKind::AgentConfig))
        );
    }
}
