//! The shared state of a running sidecar: configuration, accounts with their
//! tokens, the upstream pool, and readiness.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::time::Instant;

use arc_swap::{ArcSwap, Guard};

use crate::account::Accounts;
use crate::config::{Config, Family, OnStoreError};
use crate::failover::{Families, Upstreams};
use crate::lease::store::RedisStore;

/// Everything a reload may replace is behind an `ArcSwap`: a request reads
/// the current one (an atomic load) and keeps it until it ends; a reload
/// publishes a new one without waiting for anybody.
pub struct App {
    /// The checked configuration, less its `accounts`: those are moved
    /// into [`App::accounts`] (read them there).
    config: ArcSwap<Config>,
    accounts: ArcSwap<Accounts>,
    /// The upstream families, shared with the refreshers.
    pub upstreams: Arc<Families>,
    /// The shared token store (`token.store`), when not memory.
    pub store: Option<Arc<RedisStore>>,
    /// Who may call, and how fast.
    clients: ArcSwap<crate::clients::Clients>,
    /// The config generation and what the last reload did.
    pub generation: crate::generation::Generation,
    /// Third-party platforms (`platforms:`).
    pub platforms: Vec<Arc<crate::platform::Platform>>,
    /// One change of the account table at a time (reloads, platform
    /// authorisations), so none is lost.
    pub accounts_edit: tokio::sync::Mutex<()>,
    /// Transparent mode, when `intercept` is configured.
    pub intercept: Option<crate::intercept::Intercept>,
    /// Requests in flight; draining after SIGTERM/SIGQUIT.
    pub drain: Arc<crate::lifecycle::Drain>,
    /// Request body and upstream answer bytes buffered at once
    /// (`limits.buffered_total`).
    pub bodies: crate::guard::bodies::Bodies,
    /// Background work: the lease scheduler, upstream upkeep, the store watcher.
    pub tasks: crate::lifecycle::Tasks,
    /// Every token's and ticket's refresher, driven by one task.
    pub refreshers: crate::lease::schedule::Scheduler,
    /// The refreshers' settings, one per store policy (wait, fetch),
    /// shared rather than copied into each.
    refresh_settings: [Arc<crate::lease::refresher::Settings>; 2],
    pub started: Instant,
    /// Set once the app listener is about to accept.
    listening: AtomicBool,
}

impl App {
    /// The refresher settings for a store policy.
    pub fn refresh_settings(
        &self,
        on_store_error: OnStoreError,
    ) -> Arc<crate::lease::refresher::Settings> {
        self.refresh_settings[on_store_error as usize].clone()
    }

    pub fn new(
        mut config: Config,
        upstream: Arc<Upstreams>,
        wecom: Option<Arc<Upstreams>>,
        store: Option<Arc<RedisStore>>,
        intercept: Option<crate::intercept::Intercept>,
        platforms: Vec<Arc<crate::platform::Platform>>,
    ) -> Arc<Self> {
        // Authorised accounts known at start (seeds, the state file, the
        // store) become accounts on their first request, not before.
        Arc::new(App {
            platforms,
            accounts_edit: tokio::sync::Mutex::new(()),
            store,
            intercept,
            generation: Default::default(),
            clients: ArcSwap::from_pointee(crate::clients::Clients::new(config.clients.clone())),
            drain: Arc::default(),
            bodies: crate::guard::bodies::Bodies::new(config.limits.buffered_total),
            tasks: Default::default(),
            refreshers: crate::lease::schedule::Scheduler::new(
                crate::lease::schedule::DEFAULT_FETCHES_IN_FLIGHT,
            ),
            accounts: ArcSwap::from_pointee(Accounts::new(std::mem::take(&mut config.accounts))),
            refresh_settings: [OnStoreError::Wait, OnStoreError::Fetch].map(|on_store_error| {
                let t = &config.token;
                Arc::new(crate::lease::refresher::Settings {
                    refresh_before: t.refresh_before,
                    daily_budget: t.daily_budget,
                    failed_retry: t.failed_retry,
                    store_lock_ttl: t.store_lock_ttl,
                    on_store_error,
                })
            }),
            config: ArcSwap::from_pointee(config),
            upstreams: Arc::new(Families::new(upstream, wecom)),
            started: Instant::now(),
            listening: AtomicBool::new(false),
        })
    }

    /// The running configuration (less its accounts).
    pub fn config(&self) -> Guard<Arc<Config>> {
        self.config.load()
    }

    /// The accounts (a guard: read, do not hold across a wait).
    pub fn accounts(&self) -> Guard<Arc<Accounts>> {
        self.accounts.load()
    }

    /// The accounts, to hold across waits (background tasks).
    pub fn accounts_full(&self) -> Arc<Accounts> {
        self.accounts.load_full()
    }

    /// The configuration, to hold across waits.
    pub fn config_full(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// Who may call.
    pub fn clients(&self) -> Guard<Arc<crate::clients::Clients>> {
        self.clients.load()
    }

    /// Publishes a reloaded configuration, accounts and clients; requests
    /// already running keep what they loaded.
    pub fn publish(
        &self,
        config: Config,
        accounts: Accounts,
        clients: Option<crate::clients::Clients>,
    ) {
        self.accounts.store(Arc::new(accounts));
        if let Some(c) = clients {
            self.clients.store(Arc::new(c));
        }
        self.config.store(Arc::new(config));
    }

    pub fn platform(&self, name: &str) -> Option<&Arc<crate::platform::Platform>> {
        self.platforms.iter().find(|p| p.name == name)
    }

    /// Publishes a new account table alone (a platform's authorisations).
    pub fn publish_accounts(&self, accounts: Accounts) {
        self.accounts.store(Arc::new(accounts));
    }

    /// The hosts an account of `kind` talks to.
    pub fn upstream_for(&self, family: Family) -> Arc<Upstreams> {
        self.upstreams.get(family)
    }

    /// Every upstream family in use.
    pub fn families(&self) -> Vec<Arc<Upstreams>> {
        self.upstreams.all()
    }

    /// Where requests that carry no account of ours go: the default
    /// account's family, else the Official Account hosts.
    pub fn default_family(&self) -> Family {
        self.accounts()
            .default_account()
            .map_or(Family::Official, |a| a.kind.family())
    }

    pub fn set_listening(&self) {
        self.listening.store(true, Ordering::Release);
    }

    /// `None` when ready; otherwise why not, in one line.
    pub fn not_ready_reason(&self) -> Option<String> {
        if self.drain.is_draining() {
            return Some("draining: shutting down or handing over to a new process".into());
        }
        if !self.listening.load(Ordering::Acquire) {
            return Some("app listener not open yet (fetching first tokens)".into());
        }
        // Authorised accounts wait on WeChat's ticket push, which may come
        // through this very listener: they never hold readiness back.
        let missing: Vec<String> = self
            .accounts()
            .iter()
            .filter(|a| a.platform.is_none() && a.tokens.valid().is_none())
            .map(|a| match a.tokens.status().last_error {
                Some((code, msg)) => format!("{} (errcode {code}: {msg})", a.name),
                None => a.name.clone(),
            })
            .collect();
        (!missing.is_empty()).then(|| format!("no valid token for: {}", missing.join("; ")))
    }
}
