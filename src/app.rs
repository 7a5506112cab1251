//! The shared state of a running sidecar: configuration, accounts with their
//! tokens, the upstream pool, and readiness.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::account::Accounts;
use crate::config::{Config, Family, OnStoreError};
use crate::failover::Upstreams;
use crate::lease::store::RedisStore;

pub struct App {
    /// The checked configuration, less its `accounts`: those are moved
    /// into [`App::accounts`] (read them there).
    pub config: Config,
    pub accounts: Accounts,
    /// Official Account / mini program hosts.
    pub upstream: Arc<Upstreams>,
    /// WeCom hosts, when a WeCom account is configured.
    pub wecom: Option<Arc<Upstreams>>,
    /// The shared token store (`token.store`), when not memory.
    pub store: Option<Arc<RedisStore>>,
    /// Who may call, and how fast.
    pub clients: crate::clients::Clients,
    /// Transparent mode, when `intercept` is configured.
    pub intercept: Option<crate::intercept::Intercept>,
    /// Requests in flight; draining after SIGTERM/SIGQUIT.
    pub drain: Arc<crate::lifecycle::Drain>,
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
    ) -> Arc<Self> {
        Arc::new(App {
            store,
            intercept,
            clients: crate::clients::Clients::new(config.clients.clone()),
            drain: Arc::default(),
            tasks: Default::default(),
            refreshers: crate::lease::schedule::Scheduler::new(
                crate::lease::schedule::DEFAULT_FETCHES_IN_FLIGHT,
            ),
            accounts: Accounts::new(std::mem::take(&mut config.accounts)),
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
            config,
            upstream,
            wecom,
            started: Instant::now(),
            listening: AtomicBool::new(false),
        })
    }

    /// The hosts an account of `kind` talks to.
    pub fn upstream_for(&self, family: Family) -> &Arc<Upstreams> {
        match (family, &self.wecom) {
            (Family::WeCom, Some(w)) => w,
            _ => &self.upstream,
        }
    }

    /// Every upstream family in use.
    pub fn families(&self) -> impl Iterator<Item = &Arc<Upstreams>> {
        std::iter::once(&self.upstream).chain(self.wecom.as_ref())
    }

    /// Where requests that carry no account of ours go: the default
    /// account's family, else the Official Account hosts.
    pub fn default_family(&self) -> Family {
        self.accounts
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
        let missing: Vec<String> = self
            .accounts
            .iter()
            .filter(|a| a.tokens.valid().is_none())
            .map(|a| match a.tokens.status().last_error {
                Some((code, msg)) => format!("{} (errcode {code}: {msg})", a.name),
                None => a.name.clone(),
            })
            .collect();
        (!missing.is_empty()).then(|| format!("no valid token for: {}", missing.join("; ")))
    }
}
