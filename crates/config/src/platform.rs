//! `platforms:`: third-party platforms (开放平台第三方平台) whose component
//! token and authorised accounts' tokens the sidecar holds.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{duration_field, expand_env, secret_file, valid_appid};
use wxsidecar_core::secret::Secret;

/// An authorised account's token is kept fresh this long after its last
/// use; then it is dropped from memory (its refresh token is kept).
pub const DEFAULT_IDLE_AFTER: Duration = Duration::from_secs(3600);

/// How far a callback's signed timestamp may lie from the host's clock
/// (`platform::replay`): WeChat's own window for signed requests (WeChat
/// Pay's ±5 minutes); its clock and an NTP-kept host agree to seconds, and
/// a retry comes within seconds.
pub const DEFAULT_CALLBACK_MAX_AGE: Duration = Duration::from_secs(300);
/// Below this, a host clock a few seconds off refuses WeChat's own callbacks.
const MIN_CALLBACK_MAX_AGE: Duration = Duration::from_secs(30);
/// Above this, a captured callback stays usable too long.
const MAX_CALLBACK_MAX_AGE: Duration = Duration::from_secs(3600);

#[derive(Debug, Clone, Serialize)]
pub struct PlatformConfig {
    pub name: String,
    pub component_appid: String,
    pub component_secret: Secret,
    /// The message-verification token of the platform's console.
    pub token: Secret,
    /// The 43-character EncodingAESKey.
    pub encoding_aes_key: Secret,
    /// Authorisers known before any event (a migration), with their
    /// refresh tokens.
    pub authorizers: Vec<AuthorizerSeed>,
    /// Where refresh tokens are kept with the memory store.
    pub state_file: Option<PathBuf>,
    /// An authoriser unused this long is dropped from memory (its refresh
    /// token kept) and made an account again on its next request.
    #[serde(serialize_with = "super::print::duration")]
    pub idle_after: Duration,
    /// Where each decrypted event is handed on (`forward_events`).
    pub forward: Option<ForwardEvents>,
    /// A callback whose signed timestamp lies further than this from the
    /// host's clock is refused (a replay).
    #[serde(serialize_with = "super::print::duration")]
    pub callback_max_age: Duration,
}

/// `forward_events` / `forward_format`: the app's own event handler.
#[derive(Debug, Clone, Serialize)]
pub struct ForwardEvents {
    /// Scheme, host and port (the connection); [`Self::path`] is the rest.
    #[serde(skip)]
    pub origin: super::UpstreamUrl,
    /// Path and query of the URL, as given (`/` when none).
    #[serde(skip)]
    pub path: String,
    /// The URL as shown (`check --print`, `/status`): its query, which may
    /// carry the handler's own key, masked.
    pub url: String,
    pub format: ForwardFormat,
}

/// How an event is handed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ForwardFormat {
    /// As WeChat sends it: encrypted and signed again with the platform's
    /// token and key (fresh timestamp and nonce), so a handler written for
    /// WeChat's callbacks takes it unchanged; the signature is its
    /// credential.
    Wechat,
    /// The decrypted XML with `X-Wx-Platform` and `X-Wx-Info-Type` headers;
    /// only over https or to loopback (the events carry authorisation codes).
    Plain,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuthorizerSeed {
    pub appid: String,
    pub refresh_token: Secret,
}

pub(super) mod raw {
    use super::Deserialize;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Platform {
        pub name: Option<String>,
        pub component_appid: Option<String>,
        pub component_secret: Option<String>,
        pub component_secret_file: Option<String>,
        pub token: Option<String>,
        pub token_file: Option<String>,
        pub encoding_aes_key: Option<String>,
        pub encoding_aes_key_file: Option<String>,
        pub authorizers: Option<Vec<Authorizer>>,
        pub forward_events: Option<String>,
        pub forward_format: Option<String>,
        pub state_file: Option<String>,
        pub idle_after: Option<String>,
        pub callback_max_age: Option<String>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Authorizer {
        pub appid: Option<String>,
        pub refresh_token: Option<String>,
        pub refresh_token_file: Option<String>,
    }
}

/// A value given inline (`${ENV}` expanded) or in a file (`key_file`);
/// exactly one. Problems name `at(key)`; the value is never quoted.
fn one_of(
    at: &dyn Fn(&str) -> String,
    key: &str,
    value: Option<String>,
    file: Option<String>,
    problems: &mut Vec<String>,
) -> Option<Secret> {
    let file_key = format!("{key}_file");
    match (value, file) {
        (Some(_), Some(_)) => {
            problems.push(format!("{}: give {key} or {file_key}, not both", at(key)));
            None
        }
        (Some(v), None) => expand_env(&at(key), &v, problems),
        (None, Some(f)) => expand_env(&at(&file_key), &f, problems)
            .and_then(|p| secret_file(&at(&file_key), &p, "", problems)),
        (None, None) => {
            problems.push(format!("{}: missing; give {key} or {file_key}", at(key)));
            None
        }
    }
    .filter(|v| {
        let empty = v.trim().is_empty();
        if empty {
            problems.push(format!("{}: is empty", at(key)));
        }
        !empty
    })
    .map(Secret::new)
}

pub(super) fn parse(raw: Vec<raw::Platform>, problems: &mut Vec<String>) -> Vec<PlatformConfig> {
    let mut out: Vec<PlatformConfig> = Vec::with_capacity(raw.len());
    for (i, p) in raw.into_iter().enumerate() {
        let at = |k: &str| format!("platforms[{i}].{k}");
        let name = match p.name {
            Some(n)
                if !n.is_empty()
                    && n.len() <= 64
                    && n.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
            {
                n
            }
            _ => {
                problems.push(format!(
                    "{}: give each platform a name of letters, digits, - and _ (it is part of its callback path)",
                    at("name")
                ));
                continue;
            }
        };
        if out.iter().any(|o| o.name == name) {
            problems.push(format!(
                "{}: `{name}` is used by another platform",
                at("name")
            ));
        }
        let component_appid = match p.component_appid {
            Some(a) if valid_appid(&a) => a,
            Some(_) => {
                problems.push(format!(
                    "{}: not an appid (letters, digits, - and _; the value is not shown)",
                    at("component_appid")
                ));
                String::new()
            }
            None => {
                problems.push(format!("{}: missing", at("component_appid")));
                String::new()
            }
        };
        let component_secret = one_of(
            &at,
            "component_secret",
            p.component_secret,
            p.component_secret_file,
            problems,
        );
        let token = one_of(&at, "token", p.token, p.token_file, problems);
        let aes = one_of(
            &at,
            "encoding_aes_key",
            p.encoding_aes_key,
            p.encoding_aes_key_file,
            problems,
        );
        if let Some(k) = &aes {
            let k = k.expose().trim();
            if k.len() != 43
                || !k
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
            {
                problems.push(format!(
                    "{}: must be the 43 letters and digits of the platform's EncodingAESKey (the value is not shown)",
                    at("encoding_aes_key")
                ));
            }
        }
        let mut authorizers: Vec<AuthorizerSeed> = Vec::new();
        for (j, a) in p.authorizers.unwrap_or_default().into_iter().enumerate() {
            let at_a = |k: &str| format!("platforms[{i}].authorizers[{j}].{k}");
            let appid = match a.appid {
                Some(x) if valid_appid(&x) => x,
                _ => {
                    problems.push(format!("{}: missing or not an appid", at_a("appid")));
                    continue;
                }
            };
            if authorizers.iter().any(|s| s.appid == appid) {
                problems.push(format!("{}: `{appid}` is listed twice", at_a("appid")));
                continue;
            }
            if let Some(rt) = one_of(
                &at_a,
                "refresh_token",
                a.refresh_token,
                a.refresh_token_file,
                problems,
            ) {
                authorizers.push(AuthorizerSeed {
                    appid,
                    refresh_token: rt,
                });
            }
        }
        let forward = forward_events(&at, p.forward_events, p.forward_format, problems);
        let idle_after = duration_field(
            &at("idle_after"),
            p.idle_after.as_ref(),
            DEFAULT_IDLE_AFTER,
            problems,
        );
        let callback_max_age = duration_field(
            &at("callback_max_age"),
            p.callback_max_age.as_ref(),
            DEFAULT_CALLBACK_MAX_AGE,
            problems,
        );
        if !(MIN_CALLBACK_MAX_AGE..=MAX_CALLBACK_MAX_AGE).contains(&callback_max_age) {
            problems.push(format!(
                "{}: must be between 30s and 1h (WeChat's retries come within seconds; longer lets an old callback be replayed)",
                at("callback_max_age")
            ));
        }
        if let (Some(component_secret), Some(token), Some(encoding_aes_key)) =
            (component_secret, token, aes)
        {
            out.push(PlatformConfig {
                name,
                component_appid,
                component_secret,
                token,
                encoding_aes_key,
                authorizers,
                state_file: p.state_file.map(PathBuf::from),
                idle_after,
                forward,
                callback_max_age,
            });
        }
    }
    out
}

/// `forward_events` (a URL) and `forward_format` (`wechat`, the default, or
/// `plain`).
fn forward_events(
    at: &dyn Fn(&str) -> String,
    url: Option<String>,
    format: Option<String>,
    problems: &mut Vec<String>,
) -> Option<ForwardEvents> {
    let format = match format.as_deref() {
        None | Some("wechat") => ForwardFormat::Wechat,
        Some("plain") => ForwardFormat::Plain,
        Some(other) => {
            problems.push(format!(
                "{}: `{}` is not a format; use wechat (encrypted and signed as WeChat sends it) or plain (the decrypted XML)",
                at("forward_format"),
                other.chars().take(32).collect::<String>()
            ));
            ForwardFormat::Wechat
        }
    };
    let url = expand_env(&at("forward_events"), &url?, problems)?;
    let parsed = match url::Url::parse(url.trim()) {
        Ok(u) => u,
        Err(e) => {
            problems.push(format!(
                "{}: not a URL ({e}); give the app's handler as http(s)://host[:port]/path",
                at("forward_events")
            ));
            return None;
        }
    };
    if !parsed.username().is_empty() || parsed.password().is_some() || parsed.fragment().is_some() {
        problems.push(format!(
            "{}: must not carry credentials or a #fragment (the value is not shown)",
            at("forward_events")
        ));
        return None;
    }
    let mut base = parsed.clone();
    base.set_path("");
    base.set_query(None);
    let origin = match super::UpstreamUrl::parse(base.as_str()) {
        Ok(o) => o,
        Err(e) => {
            problems.push(format!("{}: {e}", at("forward_events")));
            return None;
        }
    };
    let loopback = match parsed.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d == "localhost",
        None => false,
    };
    if format == ForwardFormat::Plain && !origin.tls && !loopback {
        problems.push(format!(
            "{}: plain events carry authorisation codes: send them over https, to loopback, or use forward_format: wechat (encrypted and signed)",
            at("forward_events")
        ));
        return None;
    }
    let path = match parsed.query() {
        Some(q) => format!("{}?{q}", parsed.path()),
        None => parsed.path().to_string(),
    };
    let mut shown = parsed.clone();
    if shown.query().is_some() {
        shown.set_query(Some("***"));
    }
    Some(ForwardEvents {
        origin,
        path,
        url: shown.to_string(),
        format,
    })
}

#[cfg(test)]
mod tests {
    use crate::Config;

    const KEY: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";

    #[test]
    fn a_platform_parses_and_its_problems_are_named_without_values() {
        let base = "accounts:\n  - {name: shop, appid: wxshop, secret: s}\n";
        let c = Config::parse(&format!(
            "{base}platforms:\n  - name: saas\n    component_appid: wxcomp\n    component_secret: cs-1\n    token: tok\n    encoding_aes_key: {KEY}\n    authorizers: [{{appid: wxauth1, refresh_token: rt-1}}]\n"
        ))
        .unwrap();
        let p = &c.platforms[0];
        assert_eq!(
            (p.name.as_str(), p.component_appid.as_str()),
            ("saas", "wxcomp")
        );
        assert_eq!(p.authorizers[0].refresh_token.expose(), "rt-1");
        let printed = crate::print::yaml(&c);
        assert!(
            !printed.contains("cs-1") && !printed.contains("rt-1") && !printed.contains(KEY),
            "{printed}"
        );

        let e = Config::parse(&format!(
            "{base}platforms:\n  - name: a b\n  - name: ok\n    component_appid: wxcomp\n    component_secret: cs-secret-9\n    component_secret_file: /x\n    token: t\n    encoding_aes_key: too-short-secret-value\n"
        ))
        .unwrap_err();
        let all = e.join("\n");
        assert!(all.contains("platforms[0].name"), "{all}");
        assert!(all.contains("platforms[1].component_secret: give component_secret or component_secret_file, not both"), "{all}");
        assert!(
            all.contains("platforms[1].encoding_aes_key: must be the 43"),
            "{all}"
        );
        assert!(
            !all.contains("cs-secret-9") && !all.contains("too-short-secret-value"),
            "{all}"
        );
    }

    #[test]
    fn callback_max_age_defaults_to_five_minutes_and_is_bounded() {
        let base = format!("accounts: []\nplatforms:\n  - name: saas\n    component_appid: wxcomp\n    component_secret: cs\n    token: tok\n    encoding_aes_key: {KEY}\n");
        let c = Config::parse(&base).unwrap();
        assert_eq!(
            c.platforms[0].callback_max_age,
            super::DEFAULT_CALLBACK_MAX_AGE
        );
        let c = Config::parse(&format!("{base}    callback_max_age: 2m\n")).unwrap();
        assert_eq!(c.platforms[0].callback_max_age.as_secs(), 120);
        assert!(crate::print::yaml(&c).contains("callback_max_age: 120s"));
        for bad in ["10s", "2h", "soon"] {
            let e = Config::parse(&format!("{base}    callback_max_age: {bad}\n"))
                .unwrap_err()
                .join("\n");
            assert!(e.contains("platforms[0].callback_max_age"), "{bad}: {e}");
        }
    }

    #[test]
    fn forward_events_takes_a_url_and_a_format_and_refuses_plain_text_off_loopback() {
        let base = format!("accounts: []\nplatforms:\n  - name: saas\n    component_appid: wxcomp\n    component_secret: cs\n    token: tok\n    encoding_aes_key: {KEY}\n");
        let c = Config::parse(&format!(
            "{base}    forward_events: http://127.0.0.1:9000/wechat/events?x=1\n"
        ))
        .unwrap();
        let f = c.platforms[0].forward.as_ref().unwrap();
        assert_eq!(f.format, super::ForwardFormat::Wechat);
        assert_eq!(f.path, "/wechat/events?x=1");
        assert_eq!((f.origin.host.as_str(), f.origin.port), ("127.0.0.1", 9000));
        assert_eq!(f.url, "http://127.0.0.1:9000/wechat/events?***");
        let plain = Config::parse(&format!(
            "{base}    forward_events: https://events.internal/in\n    forward_format: plain\n"
        ))
        .unwrap();
        assert_eq!(
            plain.platforms[0].forward.as_ref().unwrap().format,
            super::ForwardFormat::Plain
        );
        for (extra, expect) in [
            (
                "    forward_events: http://10.0.0.5/in\n    forward_format: plain\n",
                "platforms[0].forward_events: plain events carry authorisation codes",
            ),
            (
                "    forward_events: http://127.0.0.1/in\n    forward_format: xml\n",
                "platforms[0].forward_format: `xml` is not a format",
            ),
            (
                "    forward_events: http://user:pw-secret@127.0.0.1/in\n",
                "platforms[0].forward_events: must not carry credentials",
            ),
            (
                "    forward_events: ftp://127.0.0.1/in\n",
                "platforms[0].forward_events: scheme `ftp`",
            ),
        ] {
            let all = Config::parse(&format!("{base}{extra}"))
                .unwrap_err()
                .join("\n");
            assert!(all.contains(expect), "{extra}: {all}");
            assert!(!all.contains("pw-secret"), "{all}");
        }
    }
}
