//! `accounts:`: each account's kind, id, secret, token API, tickets,
//! budget and per-path caps, checked as a whole (names and ids unique, one
//! default, authorisers only with platforms).

use super::*;

pub(super) fn parse_accounts(
    raw: Vec<raw::Account>,
    has_platforms: bool,
    problems: &mut Vec<String>,
) -> Vec<AccountConfig> {
    if raw.is_empty() && has_platforms {
        return Vec::new();
    }
    if raw.is_empty() {
        problems.push("accounts: at least one account is required (name, appid, secret), or a platform (platforms:)".into());
        return Vec::new();
    }
    let mut accounts = Vec::with_capacity(raw.len());
    let mut names = HashSet::new();
    let mut appids = HashSet::new();
    let only_one = raw.len() == 1;
    for (i, a) in raw.into_iter().enumerate() {
        let at = |k: &str| format!("accounts[{i}].{k}");
        let name = match a.name {
            Some(n) if !n.trim().is_empty() => n,
            _ => {
                problems.push(format!(
                    "{}: missing; give each account a unique name",
                    at("name")
                ));
                format!("#{i}")
            }
        };
        if !names.insert(name.clone()) {
            problems.push(format!(
                "{}: `{name}` is used by another account; names must be unique",
                at("name")
            ));
        }
        let kind = match a.kind.as_deref() {
            None | Some("official") => AccountKind::Official,
            Some("wecom") => AccountKind::WeCom,
            Some(other) => {
                let _ = other; // never echoed: a misplaced secret may be there
                problems.push(format!(
                    "{}: must be official (Official Account / mini program) or wecom (the value given is not shown)",
                    at("kind")
                ));
                AccountKind::Official
            }
        };
        // The id WeChat knows the account by: appid, or corpid for WeCom.
        let (id_key, id_raw, misplaced) = match kind {
            AccountKind::Official => ("appid", &a.appid, a.corpid.as_ref().map(|_| "corpid")),
            AccountKind::WeCom => ("corpid", &a.corpid, a.appid.as_ref().map(|_| "appid")),
        };
        if let Some(k) = misplaced {
            problems.push(format!(
                "{}: not used by kind {} accounts; use {id_key} (account `{name}`)",
                at(k),
                kind.as_str()
            ));
        }
        if kind == AccountKind::WeCom && a.token_api.is_some() {
            problems.push(format!(
                "{}: WeCom accounts always use /cgi-bin/gettoken; remove the key (account `{name}`)",
                at("token_api")
            ));
        }
        let appid = match id_raw
            .as_deref()
            .and_then(|v| expand_env(&at(id_key), v, problems))
        {
            Some(v) if valid_appid(&v) => v,
            Some(v) => {
                problems.push(format!(
                    "{}: the {}-character value is not an {id_key} (letters, digits, `_`, `-`, at most 64, e.g. wx0123456789abcdef; the value is not shown)",
                    at(id_key),
                    v.chars().count()
                ));
                v
            }
            None => {
                if id_raw.is_none() {
                    problems.push(format!("{}: missing (account `{name}`)", at(id_key)));
                }
                String::new()
            }
        };
        let agentid = a.agentid.as_ref().map(|v| match v {
            serde_yaml_ng::Value::String(s) => s.clone(),
            other => serde_yaml_ng::to_string(other)
                .unwrap_or_default()
                .trim()
                .to_string(),
        });
        // One account per appid; WeCom: one per corpid and agent.
        let unique = (appid.clone(), agentid.clone());
        if !appid.is_empty() && !appids.insert(unique) {
            problems.push(format!(
                "{}: `{appid}` is used by another account; one account per {id_key}{}",
                at(id_key),
                if kind == AccountKind::WeCom {
                    " and agentid"
                } else {
                    ""
                }
            ));
        }
        let secret = match (a.secret, a.secret_file) {
            (Some(_), Some(_)) => {
                problems.push(format!(
                    "{}: set either secret or secret_file, not both (account `{name}`)",
                    at("secret")
                ));
                None
            }
            (Some(s), None) => expand_env(&at("secret"), &s, problems),
            (None, Some(f)) => expand_env(&at("secret_file"), &f, problems).and_then(|path| {
                let context = format!(" (account `{name}`)");
                secret_file(&at("secret_file"), &path, &context, problems)
            }),
            (None, None) => {
                problems.push(format!(
                    "{}: missing; set secret: ${{ENV_VAR}} or secret_file: PATH (account `{name}`)",
                    at("secret")
                ));
                None
            }
        };
        let secret = match secret {
            Some(s) if s.is_empty() => {
                problems.push(format!("{}: is empty (account `{name}`)", at("secret")));
                Secret::new("")
            }
            Some(s) => Secret::new(s),
            None => Secret::new(""),
        };
        let token_api = match a.token_api.as_deref() {
            None | Some("stable") => TokenApi::Stable,
            Some("classic") => TokenApi::Classic,
            Some(other) => {
                let _ = other; // never echoed: a misplaced secret may be there
                problems.push(format!(
                    "{}: must be stable or classic (the value given is not shown)",
                    at("token_api")
                ));
                TokenApi::Stable
            }
        };
        let replace_tokens = match a.replace_tokens.as_deref() {
            None | Some("issued") => ReplaceTokens::Issued,
            Some("always") => ReplaceTokens::Always,
            Some(other) => {
                let _ = other; // never echoed: a misplaced secret may be there
                problems.push(format!(
                    "{}: must be issued or always (the value given is not shown)",
                    at("replace_tokens")
                ));
                ReplaceTokens::Issued
            }
        };
        let limits = parse_limits(&at("limits"), a.limits.unwrap_or_default(), problems);
        accounts.push(AccountConfig {
            name,
            kind,
            agentid,
            appid,
            secret,
            token_api,
            default: a.default.unwrap_or(only_one),
            replace_tokens,
            limits,
            platform: None,
        });
    }
    let defaults: Vec<&str> = accounts
        .iter()
        .filter(|a| a.default)
        .map(|a| a.name.as_str())
        .collect();
    if defaults.len() > 1 {
        problems.push(format!(
            "accounts: {} are all marked default: true; keep it on one account",
            defaults.join(", ")
        ));
    }
    accounts
}

/// `accounts[].limits`: `{"/cgi-bin/message/template/send": {per_day: N}}`,
/// paths normalised as requests' are, so a cap matches the calls it names.
fn parse_limits(
    key: &str,
    raw: std::collections::BTreeMap<String, raw::PathLimit>,
    problems: &mut Vec<String>,
) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = Vec::with_capacity(raw.len());
    for (path, limit) in raw {
        let normal = match wxsidecar_core::target::normalise(&path) {
            Ok(p) => wxsidecar_core::target::route_key(&p).to_string(),
            Err(e) => {
                problems.push(format!(
                    "{key}: `{path}` is not an API path ({}); write e.g. /cgi-bin/message/template/send",
                    e.0
                ));
                continue;
            }
        };
        match limit.per_day {
            Some(n) if n >= 1 => {
                if out.iter().any(|(p, _)| *p == normal) {
                    problems.push(format!("{key}: `{path}` is given twice"));
                } else {
                    out.push((normal, n));
                }
            }
            _ => problems.push(format!(
                "{key}.{path}.per_day: give the calls allowed per day (at least 1)"
            )),
        }
    }
    out
}
