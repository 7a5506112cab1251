//! Accounts and choosing the one a request is for.
//!
//! Order, as documented in docs/request-path.md: the `X-Wx-Account` header (name or
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
    pub id: Box<str>,
    pub agentid: Option<Box<str>>,
    /// Read when a token is fetched or an app's secret checked; a reload
    /// may replace it.
    pub secret: parking_lot::RwLock<Secret>,
    pub token_api: TokenApi,
    /// `accounts[].replace_tokens: always` (a reload may change it).
    always_replace: std::sync::atomic::AtomicBool,
    /// The platform it authorised (`platforms[].name`), for an authorised
    /// account: its token comes from the platform's component token.
    pub platform: Option<Box<str>>,
    /// An authorised account's last request, in seconds since the epoch
    /// (0 for configured accounts, which are never dropped).
    last_used: std::sync::atomic::AtomicU32,
    /// The number its tokens are indexed under: its position when the
    /// sidecar started, a new one for an account a reload added.
    key: u32,
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
    /// Local daily caps per path (`accounts[].limits`); none for most (a
    /// reload may change them).
    limits: arc_swap::ArcSwapOption<PathLimits>,
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
        if self.platform.is_some() {
            self.last_used
                .store(unix_secs(), std::sync::atomic::Ordering::Relaxed);
        }
        let path = crate::target::route_key(path);
        self.ledger.admit(path, self.limit_for(path))
    }

    /// Seconds since an authorised account's last request (since it was
    /// made an account, before the first).
    pub fn idle_secs(&self) -> u32 {
        unix_secs().saturating_sub(self.last_used.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// The local daily cap of `path` (a route key), if one is set.
    pub fn limit_for(&self, path: &str) -> Option<u64> {
        let limits = self.limits.load();
        limits
            .as_deref()?
            .iter()
            .find(|(p, _)| **p == *path)
            .map(|(_, n)| *n)
    }

    pub fn replace_tokens(&self) -> ReplaceTokens {
        if self
            .always_replace
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            ReplaceTokens::Always
        } else {
            ReplaceTokens::Issued
        }
    }

    /// What a reload may change in place: the secret, `replace_tokens`
    /// and the limits; what of them changed.
    fn update(&self, c: &AccountConfig) -> Updated {
        let always = c.replace_tokens == ReplaceTokens::Always;
        let limits = limits_of(&c.limits);
        let settings = self
            .always_replace
            .swap(always, std::sync::atomic::Ordering::Relaxed)
            != always
            || self.limits.load().as_deref() != limits.as_deref();
        self.limits.store(limits);
        let mut secret = self.secret.write();
        let secret_changed = secret.expose() != c.secret.expose();
        if secret_changed {
            *secret = c.secret.clone();
        }
        Updated {
            secret: secret_changed,
            settings,
        }
    }

    /// Whether `c` describes this account (the same token, so the same
    /// cell): name, kind, appid, agentid and token API.
    fn is(&self, c: &AccountConfig) -> bool {
        self.name == c.name
            && self.kind == c.kind
            && *self.id == *c.appid
            && self.agentid.as_deref() == c.agentid.as_deref()
            && self.token_api == c.token_api
            && self.platform.as_deref() == c.platform.as_deref()
    }

    /// Stops its refreshers: the account is gone (requests in flight still
    /// read its token).
    pub fn retire(&self) {
        self.tokens.retire();
        for (_, cell) in self.tickets.in_use() {
            cell.retire();
        }
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

fn unix_secs() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as u32)
}

/// Daily caps by path (`accounts[].limits`).
type PathLimits = Box<[(Box<str>, u64)]>;

fn limits_of(limits: &[(String, u64)]) -> Option<Arc<PathLimits>> {
    (!limits.is_empty()).then(|| {
        Arc::new(
            limits
                .iter()
                .map(|(p, n)| (p.as_str().into(), *n))
                .collect(),
        )
    })
}

impl Account {
    pub fn new(c: AccountConfig, index: Arc<TokenIndex>, key: u32) -> Self {
        Account {
            name: c.name,
            kind: c.kind,
            id: c.appid.into(),
            agentid: c.agentid.map(Into::into),
            secret: parking_lot::RwLock::new(c.secret),
            token_api: c.token_api,
            always_replace: (c.replace_tokens == ReplaceTokens::Always).into(),
            last_used: std::sync::atomic::AtomicU32::new(if c.platform.is_some() {
                unix_secs()
            } else {
                0
            }),
            platform: c.platform.map(Into::into),
            key,
            tokens: Arc::new(LeaseCell::new(
                index,
                key as usize,
                crate::metrics::FetchCounters::default(),
            )),
            tickets: Default::default(),
            replays: Default::default(),
            requests: Default::default(),
            whitelist: Default::default(),
            quota: Default::default(),
            ledger: Default::default(),
            limits: arc_swap::ArcSwapOption::new(limits_of(&c.limits)),
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
    /// Index key → position, sorted, once a reload made them differ (at
    /// start every account's key is its position).
    positions: Option<Box<[(u32, u32)]>>,
    /// The key the next account a reload adds gets.
    next_key: u32,
}

/// A reloaded account table and what changed against the running one.
/// What [`Account::update`] changed.
struct Updated {
    secret: bool,
    /// `replace_tokens` or the limits.
    settings: bool,
}

pub struct Reloaded {
    pub accounts: Accounts,
    /// New accounts: their refreshers are to be started (and a first token
    /// fetched) before the table is used.
    pub added: Vec<Arc<Account>>,
    /// Gone: to be retired once the new table is in use.
    pub removed: Vec<Arc<Account>>,
    /// Kept, with a new secret: a token is to be fetched with it.
    pub secret_changed: Vec<Arc<Account>>,
    /// Kept, with other settings changed in place (`replace_tokens`, limits).
    pub settings_changed: Vec<Arc<Account>>,
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

/// Account names an error shows at most: enough to spot a typo; with
/// thousands configured (platform authorisers) every bad request would
/// otherwise answer, and log, all of them.
const DEFAULT_NAMES_SHOWN: usize = 5;

/// `a, b, c` — or the first [`DEFAULT_NAMES_SHOWN`] and how many more.
fn names<'a>(all: impl Iterator<Item = &'a str>) -> String {
    let mut out = String::new();
    let mut n = 0;
    for name in all {
        if n < DEFAULT_NAMES_SHOWN {
            if n > 0 {
                out.push_str(", ");
            }
            out.push_str(name);
        }
        n += 1;
    }
    if n > DEFAULT_NAMES_SHOWN {
        out.push_str(&format!(" and {} more", n - DEFAULT_NAMES_SHOWN));
    }
    out
}

impl Accounts {
    /// The accounts of `configs`, taking their strings.
    pub fn new(configs: Vec<AccountConfig>) -> Self {
        let issued = Arc::new(TokenIndex::default());
        let default = configs.iter().position(|c| c.default);
        let mut list: Vec<Arc<Account>> = configs
            .into_iter()
            .enumerate()
            .map(|(i, c)| Arc::new(Account::new(c, issued.clone(), i as u32)))
            .collect();
        // The collect reuses the configs' buffer (12 times the size needed).
        list.shrink_to_fit();
        let next_key = list.len() as u32;
        Self::table(list, issued, default, next_key)
    }

    /// The table of `configs` for a reload: accounts that stay (same name,
    /// kind, appid, agentid and token API) keep their token cell, ledger and
    /// counters, taking a new secret, `replace_tokens` and limits in place;
    /// the others are new. Nothing of the running table changes here but
    /// those in-place updates.
    pub fn reloaded(&self, configs: Vec<AccountConfig>) -> Reloaded {
        let default = configs.iter().position(|c| c.default);
        let mut next_key = self.next_key;
        let (mut added, mut secret_changed, mut settings_changed) =
            (Vec::new(), Vec::new(), Vec::new());
        let list: Vec<Arc<Account>> = configs
            .into_iter()
            .map(|c| match self.list.iter().find(|a| a.is(&c)) {
                Some(a) => {
                    let updated = a.update(&c);
                    if updated.secret {
                        secret_changed.push(a.clone());
                    }
                    if updated.settings {
                        settings_changed.push(a.clone());
                    }
                    a.clone()
                }
                None => {
                    let a = Arc::new(Account::new(c, self.issued.clone(), next_key));
                    next_key += 1;
                    added.push(a.clone());
                    a
                }
            })
            .collect();
        let removed = self
            .list
            .iter()
            .filter(|a| !list.iter().any(|b| Arc::ptr_eq(a, b)))
            .cloned()
            .collect();
        Reloaded {
            accounts: Self::table(list, self.issued.clone(), default, next_key),
            added,
            removed,
            secret_changed,
            settings_changed,
        }
    }

    /// The table with `add` (accounts it does not hold) appended and the
    /// accounts `remove` picks left out (a platform's authorisations come
    /// and go); the default stays.
    pub fn edited(&self, add: Vec<AccountConfig>, remove: impl Fn(&Account) -> bool) -> Reloaded {
        let mut next_key = self.next_key;
        let (mut list, mut removed) = (Vec::with_capacity(self.list.len() + add.len()), Vec::new());
        for a in &self.list {
            if remove(a) {
                removed.push(a.clone());
            } else {
                list.push(a.clone());
            }
        }
        // The caller passes accounts the table does not hold (checking here
        // would cost a scan per account added: 10,000 at a resync).
        let mut added = Vec::with_capacity(add.len());
        for c in add {
            let a = Arc::new(Account::new(c, self.issued.clone(), next_key));
            next_key += 1;
            added.push(a.clone());
            list.push(a);
        }
        let default = self
            .default_account()
            .and_then(|d| list.iter().position(|a| Arc::ptr_eq(a, d)));
        Reloaded {
            accounts: Self::table(list, self.issued.clone(), default, next_key),
            added,
            removed,
            secret_changed: Vec::new(),
            settings_changed: Vec::new(),
        }
    }

    fn table(
        list: Vec<Arc<Account>>,
        issued: Arc<TokenIndex>,
        default: Option<usize>,
        next_key: u32,
    ) -> Self {
        let identity = list.iter().enumerate().all(|(i, a)| a.key as usize == i);
        let positions = (!identity).then(|| {
            let mut p: Vec<(u32, u32)> = list
                .iter()
                .enumerate()
                .map(|(i, a)| (a.key, i as u32))
                .collect();
            p.sort_unstable();
            p.into_boxed_slice()
        });
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
            positions,
            next_key,
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Account>> {
        self.list.iter()
    }

    /// The Official Account / mini program account with this appid.
    pub fn by_appid(&self, appid: &str) -> Option<&Arc<Account>> {
        // One hash lookup: every account's appid is in the table unless an
        // earlier entry has the same text (another account's name, or a
        // WeCom corpid); then the list is read.
        let hash = self.hasher.hash_one(appid);
        let linear = || {
            self.list
                .iter()
                .find(|a| a.kind == AccountKind::Official && &*a.id == appid)
        };
        match self.by_key.find(hash, |&e| key_of(&self.list, e) == appid) {
            None => None,
            Some(&e) if e & BY_ID != 0 => {
                let a = &self.list[(e & !BY_ID) as usize];
                if a.kind == AccountKind::Official {
                    Some(a)
                } else {
                    linear()
                }
            }
            Some(_) => linear(),
        }
    }

    /// The WeCom accounts of a corp (one per app secret).
    pub fn by_corpid(&self, corpid: &str) -> Vec<&Arc<Account>> {
        self.list
            .iter()
            .filter(|a| a.kind == AccountKind::WeCom && &*a.id == corpid)
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
        let at = |key: usize| match &self.positions {
            None => self.list.get(key),
            Some(p) => {
                let at = p.binary_search_by_key(&(key as u32), |e| e.0).ok()?;
                self.list.get(p[at].1 as usize)
            }
        };
        let key = self
            .issued
            .find(token, |key| at(key).is_some_and(|a| a.tokens.issued(token)))?;
        at(key)
    }

    /// Forgets the tokens `removed` handed out: they name no account now.
    pub fn forget(&self, removed: &Account) {
        self.issued.forget(removed.key as usize);
    }

    fn known(&self) -> String {
        names(self.list.iter().map(|a| a.name.as_str()))
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
                        known: names(
                            self.list
                                .iter()
                                .filter(|a| a.kind.family() == family)
                                .map(|a| a.name.as_str()),
                        ),
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
    fn by_appid_is_a_lookup_and_a_name_shadowing_an_appid_is_read_through() {
        let a = two();
        assert_eq!(a.by_appid("wxmall").unwrap().name, "mall");
        assert!(a.by_appid("mall").is_none() && a.by_appid("wxnone").is_none());
        // "wxmall" is also the first account's name: the table holds the
        // name, the appid is still found.
        let c = Config::parse(
            "accounts:\n  - {name: wxmall, appid: wxshop, secret: a}\n  - {name: mall, appid: wxmall, secret: b}\n",
        )
        .unwrap();
        let a = Accounts::new(c.accounts.clone());
        assert_eq!(a.by_appid("wxmall").unwrap().name, "mall");
        assert_eq!(a.by_appid("wxshop").unwrap().name, "wxmall");
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
    fn an_unknown_name_lists_a_few_accounts_not_all() {
        let yaml: String = (0..50)
            .map(|i| format!("  - {{name: acc{i}, appid: wx{i:014}, secret: s{i}}}\n"))
            .collect();
        let c = Config::parse(&format!("accounts:\n{yaml}")).unwrap();
        let a = Accounts::new(c.accounts.clone());
        let e = a.pick(Some("nope"), None).err().unwrap().to_string();
        assert!(e.contains("`nope`"), "{e}");
        assert!(
            e.contains("acc0, acc1, acc2, acc3, acc4 and 45 more"),
            "{e}"
        );
        assert!(!e.contains("acc5"), "{e}");
        let e = a.pick(None, None).err().unwrap().to_string();
        assert!(e.contains("acc4 and 45 more"), "{e}");
        // A few accounts are all named.
        let e = two().pick(Some("nope"), None).err().unwrap().to_string();
        assert!(e.contains("(configured: shop, mall)"), "{e}");
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
            assert_eq!(a.pick(Some(&by_id), None).unwrap().id.as_ref(), by_id);
        }
        assert!(a.pick(Some("a10000"), None).is_err());
    }

    #[test]
    fn a_reload_keeps_what_stays_and_indexes_tokens_by_key() {
        let a = Accounts::new(
            Config::parse(
                "accounts:\n  - {name: shop, appid: wxshop, secret: a, default: true}\n  - {name: mall, appid: wxmall, secret: b}\n  - {name: park, appid: wxpark, secret: c}\n",
            )
            .unwrap()
            .accounts,
        );
        a.list[0]
            .tokens
            .store("shop-token", Duration::from_secs(60));
        a.list[1]
            .tokens
            .store("mall-token", Duration::from_secs(60));
        a.list[2]
            .tokens
            .store("park-token", Duration::from_secs(60));
        // mall goes, shop gets a new secret and a cap, outlet arrives,
        // park changes token API (a different token: a new account).
        let next = Config::parse(
            "accounts:\n  - {name: outlet, appid: wxoutlet, secret: d}\n  - {name: shop, appid: wxshop, secret: a2, default: true, limits: {/cgi-bin/x: {per_day: 5}}}\n  - {name: park, appid: wxpark, secret: c, token_api: classic}\n",
        )
        .unwrap()
        .accounts;
        let r = a.reloaded(next);
        let names = |v: &[Arc<Account>]| v.iter().map(|a| a.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&r.added), ["outlet", "park"]);
        assert_eq!(names(&r.removed), ["mall", "park"]);
        assert_eq!(names(&r.secret_changed), ["shop"]);
        let b = r.accounts;
        let shop = b.pick(None, Some("shop-token")).unwrap();
        assert!(
            Arc::ptr_eq(shop, &a.list[0]),
            "the same account, its cell kept"
        );
        assert_eq!(shop.secret.read().expose(), "a2");
        assert_eq!(shop.limit_for("/cgi-bin/x"), Some(5));
        assert!(b.by_issued_token("mall-token").is_none(), "mall is gone");
        assert!(
            b.by_issued_token("park-token").is_none(),
            "old park's token"
        );
        b.list[0]
            .tokens
            .store("outlet-token", Duration::from_secs(60));
        assert_eq!(b.pick(None, Some("outlet-token")).unwrap().name, "outlet");
        assert_eq!(b.pick(None, None).unwrap().name, "shop", "default");
        b.forget(&a.list[1]);
        assert!(a.by_issued_token("mall-token").is_none(), "forgotten");
        // A second reload goes on from the keys handed out.
        let again = b.reloaded(
            Config::parse("accounts:\n  - {name: shop, appid: wxshop, secret: a2}\n  - {name: mall, appid: wxmall, secret: b}\n")
                .unwrap()
                .accounts,
        );
        assert_eq!(names(&again.added), ["mall"]);
        assert_eq!(again.added[0].key, 5);
    }
}
