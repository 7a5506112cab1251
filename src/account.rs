//! Accounts and choosing the one a request is for.
//!
//! Order, as documented in the README: the `X-Wx-Account` header (name or
//! appid), then the account that issued a token the request carries, then the
//! default account. Errors name what was asked for and what exists, never a
//! token.

use std::hash::BuildHasher;
use std::sync::Arc;

use crate::config::{AccountConfig, AccountKind, Family, ReplaceTokens, TokenApi};
use crate::lease::{LeaseCell, TokenIndex};
use crate::secret::Secret;

/// The header that names the account; removed before forwarding.
pub const ACCOUNT_HEADER: &str = "x-wx-account";

/// One configured account and its token.
pub struct Account {
    pub name: String,
    pub kind: AccountKind,
    /// The id WeChat knows the account by: the appid, or a WeCom
    /// account's corpid.
    pub id: String,
    pub agentid: Option<Box<str>>,
    pub secret: Secret,
    pub token_api: TokenApi,
    pub replace_tokens: ReplaceTokens,
    pub tokens: Arc<LeaseCell>,
    /// Its JS-SDK and card tickets, made on first use.
    pub tickets: crate::ticket::Tickets,
    /// Requests sent again after WeChat rejected the token: the second
    /// answer was good / was a token error again. The metric series
    /// (`wxsidecar_token_replays_total{account,result}`), read by `/status`
    /// too.
    pub replays: crate::metrics::ReplayCounters,
    /// Its requests, by route and outcome.
    pub requests: crate::metrics::RequestCounters,
    /// What WeChat said about the IP our calls for it come from.
    pub whitelist: crate::egress::Whitelist,
    /// What WeChat's answers said about its quotas.
    pub quota: crate::quota::Quota,
    /// Calls and errcodes per API path today.
    pub ledger: crate::quota::ledger::Ledger,
    /// Local daily caps per path (`accounts[].limits`); empty for most.
    pub limits: Box<[(Box<str>, u64)]>,
}

impl Account {
    /// Reads the errcode of WeChat's answer to `path`: a whitelist refusal
    /// is recorded (with the IP WeChat names) and a success ends a standing
    /// one; quota errors and the other errcodes that matter are counted.
    /// `errmsg` is read only on a whitelist refusal.
    pub fn note_answer(
        &self,
        errcode: Option<i64>,
        path: &str,
        errmsg: impl FnOnce() -> Option<String>,
    ) {
        if let Some(c) = errcode.filter(|c| *c != 0) {
            self.ledger.error(crate::target::route_key(path), c);
        }
        self.note_errcode(errcode, path, errmsg)
    }

    /// Counts a call to `path` (an API path) about to go to WeChat in the
    /// ledger, or refuses it when the path's local daily cap is reached.
    pub fn admit_call(&self, path: &str) -> Result<(), crate::quota::ledger::OverLimit> {
        let path = crate::target::route_key(path);
        let cap = self
            .limits
            .iter()
            .find(|(p, _)| **p == *path)
            .map(|(_, n)| *n);
        self.ledger.admit(path, cap)
    }

    /// [`Self::note_answer`] for a token or ticket fetch (not in the
    /// ledger, whose paths are the app's calls).
    pub fn note_fetch_answer(&self, errcode: Option<i64>, errmsg: impl FnOnce() -> Option<String>) {
        self.note_errcode(errcode, "(token or ticket fetch)", errmsg)
    }

    fn note_errcode(
        &self,
        errcode: Option<i64>,
        path: &str,
        errmsg: impl FnOnce() -> Option<String>,
    ) {
        match errcode {
            Some(0) | None => {
                if errcode.is_some() {
                    self.whitelist.accepted(&self.name);
                }
                return;
            }
            Some(c) if crate::egress::IP_NOT_WHITELISTED.contains(&c) => {
                self.whitelist
                    .refused(&self.name, c, errmsg().as_deref().unwrap_or(""))
            }
            Some(_) => {}
        }
        if let Some(c) = errcode {
            self.quota.note(&self.name, c, path);
        }
    }
}

impl Account {
    pub fn new(c: AccountConfig, index: Arc<TokenIndex>, position: usize) -> Self {
        Account {
            name: c.name,
            kind: c.kind,
            id: c.appid,
            agentid: c.agentid.map(Into::into),
            secret: c.secret,
            token_api: c.token_api,
            replace_tokens: c.replace_tokens,
            tokens: Arc::new(LeaseCell::new(
                index,
                position,
                crate::metrics::FetchCounters::default(),
            )),
            tickets: Default::default(),
            replays: Default::default(),
            requests: Default::default(),
            whitelist: Default::default(),
            quota: Default::default(),
            ledger: Default::default(),
            limits: c
                .limits
                .into_iter()
                .map(|(p, n)| (p.into_boxed_str(), n))
                .collect(),
        }
    }
}

/// Marks a `by_key` entry found by the account's appid, not its name.
const BY_ID: u32 = 1 << 31;

/// The key a `by_key` entry is found by.
fn key_of(list: &[Arc<Account>], entry: u32) -> &str {
    let a = &list[(entry & !BY_ID) as usize];
    if entry & BY_ID == 0 {
        &a.name
    } else {
        &a.id
    }
}

/// All accounts, and the default.
pub struct Accounts {
    list: Vec<Arc<Account>>,
    /// Token → account, shared by every account's cell.
    issued: Arc<TokenIndex>,
    /// Name, then appid/corpid → account (first match), for `X-Wx-Account`:
    /// positions in `list`, hashed by the key they are found by, so the
    /// keys are not stored twice (with 10,000 accounts that was ~130 bytes
    /// each).
    by_key: hashbrown::HashTable<u32>,
    hasher: std::hash::RandomState,
    default: Option<usize>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum PickError {
    /// The header named an account that does not exist.
    Unknown { asked: String, known: String },
    /// Nothing named an account and there is no default.
    NoneNamed { known: String },
}

impl std::fmt::Display for PickError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PickError::Unknown { asked, known } => write!(
                f,
                "no account for this request: X-Wx-Account `{asked}` is not a configured name or appid (configured: {known})"
            ),
            PickError::NoneNamed { known } => write!(
                f,
                "no account for this request: send X-Wx-Account with one of {known}, or mark one account default: true"
            ),
        }
    }
}

impl std::error::Error for PickError {}

impl Accounts {
    /// The accounts of `configs`, taking their strings.
    pub fn new(configs: Vec<AccountConfig>) -> Self {
        let issued = Arc::new(TokenIndex::default());
        let default = configs.iter().position(|c| c.default);
        let mut list: Vec<Arc<Account>> = configs
            .into_iter()
            .enumerate()
            .map(|(i, c)| Arc::new(Account::new(c, issued.clone(), i)))
            .collect();
        // The collect reuses the configs' buffer (12 times the size needed).
        list.shrink_to_fit();
        let hasher = std::hash::RandomState::new();
        let mut by_key = hashbrown::HashTable::with_capacity(list.len() * 2);
        // Names first: a name wins over another account's appid.
        let names = 0..list.len() as u32;
        let ids = (0..list.len() as u32).map(|i| i | BY_ID);
        for entry in names.chain(ids) {
            let key = key_of(&list, entry);
            let hash = hasher.hash_one(key);
            if by_key.find(hash, |&e| key_of(&list, e) == key).is_none() {
                by_key.insert_unique(hash, entry, |&e| hasher.hash_one(key_of(&list, e)));
            }
        }
        Accounts {
            by_key,
            hasher,
            list,
            issued,
            default,
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Account>> {
        self.list.iter()
    }

    /// The Official Account / mini program account with this appid.
    pub fn by_appid(&self, appid: &str) -> Option<&Arc<Account>> {
        self.list
            .iter()
            .find(|a| a.kind == AccountKind::Official && a.id == appid)
    }

    /// The WeCom accounts of a corp (one per app secret).
    pub fn by_corpid(&self, corpid: &str) -> Vec<&Arc<Account>> {
        self.list
            .iter()
            .filter(|a| a.kind == AccountKind::WeCom && a.id == corpid)
            .collect()
    }

    /// The default account, if any.
    pub fn default_account(&self) -> Option<&Arc<Account>> {
        self.default.map(|i| &self.list[i])
    }

    pub fn has_kind(&self, kind: AccountKind) -> bool {
        self.list.iter().any(|a| a.kind == kind)
    }

    fn by_name_or_appid(&self, key: &str) -> Option<&Arc<Account>> {
        let hash = self.hasher.hash_one(key);
        self.by_key
            .find(hash, |&e| key_of(&self.list, e) == key)
            .map(|&e| &self.list[(e & !BY_ID) as usize])
    }

    /// The account that handed out `token`, if any.
    pub fn by_issued_token(&self, token: &str) -> Option<&Arc<Account>> {
        self.issued.get(token).map(|i| &self.list[i])
    }

    fn known(&self) -> String {
        self.list
            .iter()
            .map(|a| a.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Chooses the account for a request.
    pub fn pick(
        &self,
        header: Option<&str>,
        presented_token: Option<&str>,
    ) -> Result<&Arc<Account>, PickError> {
        self.pick_for(header, presented_token, None)
    }

    /// Like [`Self::pick`], for a request whose host says which family it
    /// is for (transparent mode: `qyapi.weixin.qq.com` is WeCom): when
    /// nothing names an account, the default account if it is of that
    /// family, else the family's only account.
    pub fn pick_for(
        &self,
        header: Option<&str>,
        presented_token: Option<&str>,
        family: Option<Family>,
    ) -> Result<&Arc<Account>, PickError> {
        if let (None, Some(family)) = (header, family) {
            if presented_token
                .and_then(|t| self.by_issued_token(t))
                .is_none()
                && self
                    .default_account()
                    .is_none_or(|a| a.kind.family() != family)
            {
                let mut of_kind = self.list.iter().filter(|a| a.kind.family() == family);
                return match (of_kind.next(), of_kind.next()) {
                    (Some(only), None) => Ok(only),
                    _ => Err(PickError::NoneNamed {
                        known: self
                            .list
                            .iter()
                            .filter(|a| a.kind.family() == family)
                            .map(|a| a.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                    }),
                };
            }
        }
        if let Some(h) = header {
            let h = h.trim();
            return self.by_name_or_appid(h).ok_or_else(|| PickError::Unknown {
                asked: h.chars().take(64).collect(),
                known: self.known(),
            });
        }
        if let Some(acc) = presented_token.and_then(|t| self.by_issued_token(t)) {
            return Ok(acc);
        }
        self.default
            .map(|i| &self.list[i])
            .ok_or_else(|| PickError::NoneNamed {
                known: self.known(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::time::Duration;

    fn two() -> Accounts {
        let c = Config::parse(
            "accounts:\n  - {name: shop, appid: wxshop, secret: a, default: true}\n  - {name: mall, appid: wxmall, secret: b}\n",
        )
        .unwrap();
        Accounts::new(c.accounts.clone())
    }

    #[test]
    fn header_then_token_then_default() {
        let a = two();
        a.list[1]
            .tokens
            .store("mall-token", Duration::from_secs(60));
        assert_eq!(a.pick(Some("mall"), None).unwrap().name, "mall");
        assert_eq!(a.pick(Some("wxmall"), None).unwrap().name, "mall");
        assert_eq!(a.pick(None, Some("mall-token")).unwrap().name, "mall");
        assert_eq!(a.pick(None, Some("foreign")).unwrap().name, "shop");
        assert_eq!(
            a.pick(Some("shop"), Some("mall-token")).unwrap().name,
            "shop"
        );
        let err = a.pick(Some("nope"), None).err().unwrap();
        assert!(err.to_string().contains("`nope`") && err.to_string().contains("shop, mall"));
    }

    #[test]
    fn the_token_index_follows_the_history() {
        let a = two();
        for i in 0..30 {
            a.list[1]
                .tokens
                .store(&format!("m{i}"), Duration::from_secs(60));
        }
        assert_eq!(a.by_issued_token("m29").unwrap().name, "mall");
        assert_eq!(a.by_issued_token("m10").unwrap().name, "mall");
        assert!(
            a.by_issued_token("m0").is_none(),
            "evicted from the history"
        );
        assert!(a.by_issued_token("nope").is_none());
    }

    #[test]
    fn the_host_family_picks_among_its_accounts() {
        let c = Config::parse(
            "accounts:\n  - {name: shop, appid: wxshop, secret: a, default: true}\n  - {name: hr, kind: wecom, corpid: ww1, secret: b}\n",
        )
        .unwrap();
        let a = Accounts::new(c.accounts.clone());
        let wecom = Some(Family::WeCom);
        assert_eq!(a.pick_for(None, None, wecom).unwrap().name, "hr");
        let official = Some(Family::Official);
        assert_eq!(a.pick_for(None, None, official).unwrap().name, "shop");
        assert_eq!(a.pick_for(Some("shop"), None, wecom).unwrap().name, "shop");
    }

    #[test]
    fn no_default_means_an_error() {
        let c = Config::parse(
            "accounts:\n  - {name: shop, appid: wxshop, secret: a}\n  - {name: mall, appid: wxmall, secret: b}\n",
        )
        .unwrap();
        let a = Accounts::new(c.accounts.clone());
        assert!(matches!(
            a.pick(None, None),
            Err(PickError::NoneNamed { .. })
        ));
    }

    #[test]
    fn a_name_wins_over_an_appid_and_the_first_appid_wins() {
        let c = Config::parse(
            "accounts:\n  - {name: a, appid: wxb, secret: x}\n  - {name: wxb, appid: wxc, secret: y}\n  - {name: hr, kind: wecom, corpid: ww1, agentid: '1', secret: z}\n  - {name: it, kind: wecom, corpid: ww1, agentid: '2', secret: w}\n",
        )
        .unwrap();
        let a = Accounts::new(c.accounts.clone());
        assert_eq!(a.pick(Some("wxb"), None).unwrap().name, "wxb");
        assert_eq!(a.pick(Some("wxc"), None).unwrap().name, "wxb");
        assert_eq!(a.pick(Some("ww1"), None).unwrap().name, "hr");
        assert_eq!(a.pick(Some("it"), None).unwrap().name, "it");
    }

    #[test]
    fn ten_thousand_accounts_are_found_by_name_and_appid() {
        let mut yaml = String::from("accounts:\n");
        for i in 0..10_000 {
            yaml.push_str(&format!(
                "  - {{name: a{i}, appid: wx{i:013}, secret: s}}\n"
            ));
        }
        let a = Accounts::new(Config::parse(&yaml).unwrap().accounts);
        for i in (0..10_000).step_by(7) {
            assert_eq!(
                a.pick(Some(&format!("a{i}")), None).unwrap().name,
                format!("a{i}")
            );
            let by_id = format!("wx{i:013}");
            assert_eq!(a.pick(Some(&by_id), None).unwrap().id, by_id);
        }
        assert!(a.pick(Some("a10000"), None).is_err());
    }
}
