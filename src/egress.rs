//! What WeChat says about our egress IP: an API or token call refused
//! because the IP it came from is not whitelisted (40164 for Official
//! Accounts and mini programs, 60020 for WeCom apps' trusted IPs, 61004 for
//! third-party platforms, 89503 when an admin must confirm a new IP). WeChat
//! names the IP it saw; the operator needs that IP and where to add it, once,
//! not in every failed request. Knows no account: the account holds one.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::SystemTime;

use parking_lot::Mutex;

/// The errcodes that mean "not from this IP".
pub const IP_NOT_WHITELISTED: [i64; 4] = [40164, 60020, 61004, 89503];

/// One account's view of its egress IP; 8 bytes until WeChat refuses one.
#[derive(Default)]
pub struct Whitelist(once_cell::race::OnceBox<State>);

#[derive(Default)]
struct State {
    /// A refusal is standing (cleared by the next call that goes through).
    refused: AtomicBool,
    count: AtomicU64,
    seen: Mutex<Seen>,
}

#[derive(Default)]
struct Seen {
    ip: Option<IpAddr>,
    last: Option<Refusal>,
}

/// The standing refusal, for `/status`.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub errcode: i64,
    /// WeChat's message, as it came.
    pub message: String,
    pub ip: Option<IpAddr>,
    pub at: SystemTime,
}

impl Whitelist {
    /// Records a refusal (`errcode` one of [`IP_NOT_WHITELISTED`]); logs at
    /// error level, naming the IP and where to whitelist it, when the
    /// refusal is new: the first, or a new IP or errcode.
    pub fn refused(&self, account: &str, errcode: i64, errmsg: &str) {
        let st = self.0.get_or_init(Box::default);
        st.count.fetch_add(1, Ordering::Relaxed);
        let ip = ip_in(errmsg);
        let mut seen = st.seen.lock();
        let new = !st.refused.swap(true, Ordering::AcqRel)
            || seen
                .last
                .as_ref()
                .is_none_or(|l| l.errcode != errcode || l.ip != ip);
        if ip.is_some() {
            seen.ip = ip;
        }
        seen.last = Some(Refusal {
            errcode,
            message: errmsg.to_string(),
            ip,
            at: SystemTime::now(),
        });
        drop(seen);
        if new {
            let ip = ip.map_or_else(|| "the sidecar's egress IP".to_string(), |i| i.to_string());
            tracing::error!(
                account,
                errcode,
                egress_ip = %ip,
                "WeChat refused calls from {ip}: {}", where_to(errcode, &ip)
            );
        }
    }

    /// A call went through: a standing refusal is over. One atomic load
    /// when there is none.
    pub fn accepted(&self, account: &str) {
        let Some(st) = self.0.get() else { return };
        if st.refused.swap(false, Ordering::AcqRel) {
            tracing::info!(account, "WeChat accepts calls from the egress IP again");
        }
    }

    /// Refusals so far (`wxsidecar_ip_not_whitelisted_total`).
    pub fn count(&self) -> u64 {
        self.0.get().map_or(0, |s| s.count.load(Ordering::Relaxed))
    }

    /// The IP WeChat last named as ours.
    pub fn ip_seen(&self) -> Option<IpAddr> {
        self.0.get().and_then(|s| s.seen.lock().ip)
    }

    /// The standing refusal, if any.
    pub fn standing(&self) -> Option<Refusal> {
        let st = self.0.get()?;
        if !st.refused.load(Ordering::Acquire) {
            return None;
        }
        st.seen.lock().last.clone()
    }
}

/// Where the operator whitelists `ip`, by errcode.
fn where_to(errcode: i64, ip: &str) -> String {
    match errcode {
        60020 => format!("add {ip} to the WeCom app's trusted IPs (WeCom admin console: the app → Trusted IP)"),
        61004 => format!("add {ip} to the third-party platform's IP whitelist (Open Platform console: the platform → Development settings)"),
        89503 => format!("the account's admin must confirm calls from {ip} in the WeChat prompt (a refusal blocks it for an hour)"),
        _ => format!("add {ip} to the account's API IP whitelist (admin console: Settings and development → Basic configuration → IP whitelist)"),
    }
}

/// The first IP address in WeChat's message ("invalid ip 1.2.3.4 ipv6
/// ::ffff:1.2.3.4, not in whitelist", "from ip: 1.2.3.4", "requestIP:
/// 1.2.3.4"): IPv4 first, as WeChat names it first.
pub fn ip_in(errmsg: &str) -> Option<IpAddr> {
    let words = || {
        errmsg
            .split(|c: char| !(c.is_ascii_hexdigit() || c == '.' || c == ':'))
            .map(|w| w.trim_matches(':'))
    };
    let v4 = words().find_map(|w| w.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4));
    v4.or_else(|| {
        words()
            .filter(|w| w.contains(':'))
            .find_map(|w| w.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ip_is_read_from_each_message() {
        let ip = |m: &str| ip_in(m).map(|i| i.to_string());
        assert_eq!(
            ip("invalid ip 203.0.113.7 ipv6 ::ffff:203.0.113.7, not in whitelist rid: 674c1a2b-5f3e9d21-0a1b2c3d").as_deref(),
            Some("203.0.113.7")
        );
        assert_eq!(
            ip("not allow to access from your ip, hint: [1733000000_10_abcdef], from ip: 198.51.100.4, more info at https://open.work.weixin.qq.com/devtool/query?e=60020").as_deref(),
            Some("198.51.100.4")
        );
        assert_eq!(
            ip("access clientip is not registered, requestIP: 192.0.2.1 rid: 1a2b").as_deref(),
            Some("192.0.2.1")
        );
        assert_eq!(
            ip("invalid ip  ipv6 2001:db8::5, not in whitelist").as_deref(),
            Some("2001:db8::5")
        );
        assert_eq!(
            ip("此IP调用需要管理员确认,请联系管理员 rid: 674c1a2b-5f3e9d21"),
            None
        );
        assert_eq!(ip("time 12:00:00 not an ip"), None);
    }

    #[test]
    fn a_refusal_stands_until_a_call_goes_through() {
        let w = Whitelist::default();
        assert!(w.standing().is_none() && w.count() == 0);
        w.accepted("shop");
        w.refused(
            "shop",
            40164,
            "invalid ip 203.0.113.7 ipv6 ::ffff:203.0.113.7, not in whitelist",
        );
        w.refused(
            "shop",
            40164,
            "invalid ip 203.0.113.7 ipv6 ::ffff:203.0.113.7, not in whitelist",
        );
        assert_eq!(w.count(), 2);
        let r = w.standing().unwrap();
        assert_eq!((r.errcode, r.ip), (40164, "203.0.113.7".parse().ok()));
        w.accepted("shop");
        assert!(w.standing().is_none());
        assert_eq!(w.ip_seen(), "203.0.113.7".parse().ok(), "the IP seen stays");
    }
}
