//! Keeping an account's token and tickets fresh: what to fetch and where
//! to share it, handed to the neutral refresher
//! ([`crate::lease::refresher`]), which owns the schedule, single flight,
//! backoff, budget and store policy. Here live only what WeChat asks for:
//! the token request of each API ([`token`]), the ticket requests
//! ([`ticket`]), when a stable token needs `force_refresh`, store keys, and
//! which store policy suits which token. Logs name the account, never the
//! token or secret.

use std::sync::Arc;
use std::time::Duration;

pub mod platform;
pub mod ticket;
pub mod token;

use self::token::FetchError;
use crate::account::Account;
use crate::app::App;
use crate::config::{AccountKind, OnStoreError, TokenApi};
use crate::failover::Families;
use crate::lease::refresher::{Fetched, Label, Refresher, SharedKey, Source};
use crate::lease::LeaseCell;
use crate::ticket::TicketKind;

/// WeChat allows `force_refresh: true` at most every 30 s (and 20 a day).
const FORCE_REFRESH_SPACING: Duration = Duration::from_secs(30);

/// What a refresher keeps fresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    Token,
    Ticket(TicketKind),
}

/// The store key suffix of an account's token: its token API and id.
pub fn token_store_id(account: &Account) -> (&'static str, String) {
    if account.platform.is_some() {
        return ("authorizer", account.id.to_string());
    }
    match account.kind {
        AccountKind::WeCom => (
            "wecom",
            format!(
                "{}:{}",
                account.id,
                account.agentid.as_deref().unwrap_or(&account.name)
            ),
        ),
        AccountKind::Official => (account.token_api.as_str(), account.id.to_string()),
    }
}

impl Subject {
    /// The cell holding it (a ticket's exists once it is in use).
    pub fn cell(self, account: &Account) -> Option<&Arc<LeaseCell>> {
        match self {
            Subject::Token => Some(&account.tokens),
            Subject::Ticket(k) => account.tickets.get(k),
        }
    }

    /// "token", "jsapi ticket": for logs.
    pub fn what(self) -> &'static str {
        match self {
            Subject::Token => "token",
            Subject::Ticket(k) => k.what(),
        }
    }

    /// Its store key suffix, `(api, id)`. WeCom's jsapi ticket belongs to
    /// the corp, so every app of the corp shares it.
    pub fn store_id(self, account: &Account) -> (&'static str, String) {
        match (self, account.kind) {
            (Subject::Token, _) => token_store_id(account),
            (Subject::Ticket(TicketKind::AgentConfig), AccountKind::WeCom) => {
                (self.store_api(account), token_store_id(account).1)
            }
            (Subject::Ticket(_), _) => (self.store_api(account), account.id.to_string()),
        }
    }

    /// The first part of its store key: the token API or the ticket kind.
    pub fn store_api(self, account: &Account) -> &'static str {
        match self {
            Subject::Token => token_store_id(account).0,
            Subject::Ticket(TicketKind::Jsapi) => "ticket_jsapi",
            Subject::Ticket(TicketKind::WxCard) => "ticket_wx_card",
            Subject::Ticket(TicketKind::AgentConfig) => "ticket_agent_config",
        }
    }

    /// The account's token and its tickets in use, with their cells.
    pub fn in_use(account: &Account) -> impl Iterator<Item = (Subject, &LeaseCell)> {
        std::iter::once((Subject::Token, &*account.tokens)).chain(
            account
                .tickets
                .in_use()
                .map(|(k, c)| (Subject::Ticket(k), &**c)),
        )
    }
}

/// Names for the logs of `account`'s `subject`.
fn label(account: &Account, subject: Subject) -> Label<'_> {
    Label {
        account: &account.name,
        id: &account.id,
        what: subject.what(),
        api: subject.store_api(account),
    }
}

/// Fetches an account's token: the request its token API takes; a stable
/// fetch that hands back the very token WeChat just rejected is repeated
/// with `force_refresh: true`, as often as WeChat allows it.
struct TokenSource {
    account: Arc<Account>,
    /// Read at each fetch: a reload may replace the hosts.
    upstreams: Arc<Families>,
    /// When `force_refresh: true` was last sent (boxed: rare, and it keeps
    /// a refresher in the 64-byte class).
    last_force: Option<Box<tokio::time::Instant>>,
}

impl Source for TokenSource {
    type Error = FetchError;

    fn label(&self) -> Label<'_> {
        label(&self.account, Subject::Token)
    }

    async fn fetch(&mut self, rejected: Option<&str>) -> Result<Fetched, FetchError> {
        let account = &self.account;
        let upstream = &self.upstreams.get(account.kind.family());
        let f = noted(account, self::token::fetch(upstream, account, false).await)?;
        let may_force = account.token_api == TokenApi::Stable
            && account.kind == AccountKind::Official
            && self
                .last_force
                .as_ref()
                .is_none_or(|t| t.elapsed() >= FORCE_REFRESH_SPACING);
        if rejected == Some(f.value.as_str()) && may_force {
            tracing::info!(account = %account.name, "stable token unchanged after a rejection; forcing a new one");
            self.last_force = Some(Box::new(tokio::time::Instant::now()));
            return noted(account, self::token::fetch(upstream, account, true).await);
        }
        Ok(f)
    }
}

/// Fetches an account's ticket of one kind with its current token.
struct TicketSource {
    account: Arc<Account>,
    upstreams: Arc<Families>,
    kind: TicketKind,
}

impl Source for TicketSource {
    type Error = FetchError;

    fn label(&self) -> Label<'_> {
        label(&self.account, Subject::Ticket(self.kind))
    }

    async fn fetch(&mut self, _rejected: Option<&str>) -> Result<Fetched, FetchError> {
        let upstream = self.upstreams.get(self.account.kind.family());
        let wait = upstream.read_timeout();
        let fetched = self::ticket::fetch(&upstream, &self.account, self.kind, wait).await;
        noted(&self.account, fetched)
    }
}

/// Tells the account what a fetch's answer says about our egress IP.
fn noted(account: &Account, fetched: Result<Fetched, FetchError>) -> Result<Fetched, FetchError> {
    match &fetched {
        Ok(_) => account.note_fetch_answer(Some(0), || None),
        Err(FetchError::WeChat { errcode, errmsg }) => {
            account.note_fetch_answer(Some(*errcode), || Some(errmsg.clone()))
        }
        Err(_) => {}
    }
    fetched
}

/// What to do while the shared store is down: `token.on_store_error`, or
/// by default wait for classic tokens (a lone fetch invalidates the other
/// replicas' token) and fetch alone for the rest.
fn store_policy(app: &App, account: &Account) -> OnStoreError {
    app.config().token.on_store_error.unwrap_or(
        if account.kind == AccountKind::Official && account.token_api == TokenApi::Classic {
            OnStoreError::Wait
        } else {
            OnStoreError::Fetch
        },
    )
}

/// Hands the refresher of `account`'s `subject` (its cell must exist) to
/// the app's scheduler. Never waits.
pub fn start(app: &App, account: &Arc<Account>, subject: Subject) {
    let cell = subject
        .cell(account)
        .expect("a ticket's cell exists before its refresher")
        .clone();
    let settings = app.refresh_settings(store_policy(app, account));
    let (api, id) = subject.store_id(account);
    let shared = app.store.as_ref().map(|store| SharedKey {
        store: store.clone(),
        key: store.token_key(api, &id),
        budget_id: format!("{api}:{id}"),
    });
    let upstreams = app.upstreams.clone();
    let account = account.clone();
    let platform = account
        .platform
        .as_deref()
        .and_then(|name| app.platform(name).cloned());
    match subject {
        Subject::Token if account.platform.is_some() => {
            let Some(platform) = platform else {
                tracing::error!(account = %account.name, "authorised account of an unknown platform; its token is not kept");
                return;
            };
            let source = self::platform::AuthorizerSource {
                account,
                platform,
                families: upstreams,
            };
            let job = Refresher::new(cell, source, shared, settings);
            app.refreshers.add(job);
        }
        Subject::Token => {
            let source = TokenSource {
                account,
                upstreams,
                last_force: None,
            };
            let job = Refresher::new(cell, source, shared, settings);
            app.refreshers.add(job);
        }
        Subject::Ticket(kind) => {
            let source = TicketSource {
                account,
                upstreams,
                kind,
            };
            let job = Refresher::new(cell, source, shared, settings);
            app.refreshers.add(job);
        }
    }
}
/// The cell for `account`'s ticket of `kind`, starting its refresher the
/// first time it is asked for. Call from within the app's runtime.
pub fn ticket_cell<'a>(
    app: &App,
    account: &'a Arc<Account>,
    kind: TicketKind,
) -> &'a Arc<LeaseCell> {
    let (c, made) = account.tickets.get_or_make(kind);
    if made {
        tracing::info!(account = %account.name, ticket = kind.as_str(), "first use of a ticket; fetching it");
        start(app, account, Subject::Ticket(kind));
    }
    c
}
