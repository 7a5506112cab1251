//! Third-party platforms (开放平台第三方平台): one sidecar holds a platform's
//! `component_access_token` and the tokens of the accounts that authorised
//! it. This is the platform's own state: its message crypto, the latest
//! `component_verify_ticket`, the component token's cell, and every
//! authoriser's `authorizer_refresh_token` — which must never be lost (a
//! lost one means the customer authorises again), so with the memory store
//! it is written to `state_file` (atomically, mode 0600) before it is used.
//!
//! Authorised accounts are ordinary accounts (`account::Account` with
//! `platform` set): the request path, replay, metrics and `/status` are
//! theirs as for configured accounts. What WeChat is asked for them is in
//! `refresh::platform`.

pub use crate::msgcrypt as crypto;

pub mod forward;
pub mod replay;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::config::platform::PlatformConfig;
use crate::lease::store::RedisStore;
use crate::lease::{LeaseCell, TokenIndex};
use crate::metrics::FetchCounters;
use crate::msgcrypt::Signature;
use crate::secret::Secret;

pub struct Platform {
    pub name: String,
    pub component_appid: String,
    pub component_secret: Secret,
    pub crypt: crypto::MsgCrypt,
    /// The `component_access_token`.
    pub component: Arc<LeaseCell>,
    state: Mutex<State>,
    state_file: Option<PathBuf>,
    /// Unused this long, an authoriser leaves memory (`idle_after`).
    pub idle_after: std::time::Duration,
    /// When the authoriser list was last asked for (recovery is spaced).
    pub last_recovery: Mutex<Option<tokio::time::Instant>>,
    /// Authorisers waiting to become accounts: whoever edits the account
    /// table next adds them all in one edit (many first requests at once
    /// cost one table, not one each).
    pub pending_adds: Mutex<Vec<String>>,
    /// The shared store (`token.store`): refresh tokens and the ticket live
    /// there too, so every replica has them whichever one WeChat called.
    store: Option<Arc<RedisStore>>,
    /// `forward_events`: where accepted events are handed on.
    pub forward: Option<Arc<forward::Forwarder>>,
    /// `callback_max_age`: how far a callback's signed timestamp may lie
    /// from this host's clock.
    pub callback_max_age: std::time::Duration,
    /// Callbacks acted on lately (by `msg_signature`).
    seen: replay::Seen,
}

/// A ticket is valid 12 hours.
const TICKET_LIFETIME: std::time::Duration = std::time::Duration::from_secs(12 * 3600);

/// What survives a restart with the memory store.
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct State {
    /// The latest `component_verify_ticket` (valid 12 h; WeChat pushes a
    /// new one every 10 minutes).
    #[serde(default)]
    ticket: Option<String>,
    /// Authoriser appid → its refresh token.
    #[serde(default)]
    refresh_tokens: BTreeMap<String, String>,
}

impl Platform {
    /// The platform of `c`, with what `state_file` kept (if any) and the
    /// seed authorisers of the config (a seed never replaces a newer
    /// refresh token the file holds).
    pub fn new(
        c: &PlatformConfig,
        store: Option<Arc<RedisStore>>,
        upstream: &crate::config::UpstreamConfig,
        ca_bundle: Option<&std::path::Path>,
    ) -> Result<Self, String> {
        let crypt = crypto::MsgCrypt::new(
            c.token.clone(),
            c.encoding_aes_key.expose(),
            &c.component_appid,
        )
        .map_err(|e| format!("platforms {}: encoding_aes_key {e}", c.name))?;
        let mut state = match &c.state_file {
            Some(p) if p.exists() => {
                let text = std::fs::read_to_string(p).map_err(|e| {
                    format!("platforms {}: state_file {}: {e}", c.name, p.display())
                })?;
                serde_json::from_str(&text).map_err(|e| {
                    format!(
                        "platforms {}: state_file {} is not the sidecar's JSON ({e}); move it away to start empty",
                        c.name,
                        p.display()
                    )
                })?
            }
            _ => State::default(),
        };
        for seed in &c.authorizers {
            state
                .refresh_tokens
                .entry(seed.appid.clone())
                .or_insert_with(|| seed.refresh_token.expose().to_string());
        }
        Ok(Platform {
            name: c.name.clone(),
            component_appid: c.component_appid.clone(),
            component_secret: c.component_secret.clone(),
            crypt,
            component: Arc::new(LeaseCell::new(
                Arc::new(TokenIndex::default()),
                0,
                FetchCounters::default(),
            )),
            state: Mutex::new(state),
            state_file: c.state_file.clone(),
            last_recovery: Mutex::new(None),
            pending_adds: Mutex::new(Vec::new()),
            idle_after: c.idle_after,
            store,
            forward: c
                .forward
                .as_ref()
                .map(|f| Arc::new(forward::Forwarder::new(f, upstream, ca_bundle))),
            callback_max_age: c.callback_max_age,
            seen: replay::Seen::default(),
        })
    }

    pub fn ticket(&self) -> Option<String> {
        self.state.lock().ticket.clone()
    }

    /// Records a pushed ticket; `true` when it is new.
    pub fn set_ticket(&self, ticket: &str) -> bool {
        let mut st = self.state.lock();
        if st.ticket.as_deref() == Some(ticket) {
            return false;
        }
        st.ticket = Some(ticket.to_string());
        true
    }

    pub fn refresh_token(&self, authorizer: &str) -> Option<Secret> {
        self.state
            .lock()
            .refresh_tokens
            .get(authorizer)
            .map(|t| Secret::new(t.as_str()))
    }

    /// Records an authoriser's refresh token; `true` when it changed.
    pub fn set_refresh_token(&self, authorizer: &str, token: &str) -> bool {
        let mut st = self.state.lock();
        if st.refresh_tokens.get(authorizer).map(String::as_str) == Some(token) {
            return false;
        }
        st.refresh_tokens
            .insert(authorizer.to_string(), token.to_string());
        true
    }

    /// Forgets an authoriser (it revoked the authorisation).
    pub fn remove(&self, authorizer: &str) -> bool {
        self.state
            .lock()
            .refresh_tokens
            .remove(authorizer)
            .is_some()
    }

    /// How many authorisers this replica holds a refresh token for (not a
    /// list: `/status` asks, and there may be thousands).
    pub fn authorizer_count(&self) -> usize {
        self.state.lock().refresh_tokens.len()
    }

    fn refresh_key(&self, store: &RedisStore) -> String {
        store.key(&format!("platform:{}:refresh_tokens", self.component_appid))
    }

    fn ticket_key(&self, store: &RedisStore) -> String {
        store.key(&format!("platform:{}:ticket", self.component_appid))
    }

    /// Keeps a refresh token durably before anything uses it: memory, the
    /// shared store (never expiring) and the state file.
    pub async fn keep_refresh_token(&self, authorizer: &str, token: &str) -> Result<(), String> {
        self.share_refresh_token(authorizer, token).await?;
        self.persist().await
    }

    /// [`Self::keep_refresh_token`] without the state file (write it once
    /// after a batch).
    pub async fn share_refresh_token(&self, authorizer: &str, token: &str) -> Result<(), String> {
        self.set_refresh_token(authorizer, token);
        if let Some(store) = &self.store {
            store
                .hset(&self.refresh_key(store), authorizer, token)
                .await
                .map_err(|e| format!("refresh token of {authorizer} not stored: {e}"))?;
        }
        Ok(())
    }

    /// Forgets an authoriser everywhere it is kept.
    pub async fn forget(&self, authorizer: &str) {
        self.remove(authorizer);
        if let Some(store) = &self.store {
            if let Err(e) = store.hdel(&self.refresh_key(store), authorizer).await {
                tracing::error!(platform = %self.name, error = %e, "revoked authoriser not removed from the store");
            }
        }
        if let Err(e) = self.persist().await {
            tracing::error!(platform = %self.name, error = %e, "state_file not written");
        }
    }

    /// The refresh token of `authorizer`: ours, else the shared store's
    /// (another replica took the authorisation).
    pub async fn find_refresh_token(&self, authorizer: &str) -> Option<Secret> {
        if let Some(t) = self.refresh_token(authorizer) {
            return Some(t);
        }
        let store = self.store.as_ref()?;
        let t = store
            .hget(&self.refresh_key(store), authorizer)
            .await
            .ok()??;
        self.set_refresh_token(authorizer, &t);
        Some(Secret::new(t))
    }

    /// Keeps a pushed ticket (memory, store, state file); `true` when new.
    pub async fn keep_ticket(&self, ticket: &str) -> bool {
        if !self.set_ticket(ticket) {
            return false;
        }
        if let Some(store) = &self.store {
            if let Err(e) = store
                .set_for(&self.ticket_key(store), ticket, TICKET_LIFETIME)
                .await
            {
                tracing::error!(platform = %self.name, error = %e, "ticket not written to the store");
            }
        }
        if let Err(e) = self.persist().await {
            tracing::error!(platform = %self.name, error = %e, "ticket not written to state_file");
        }
        true
    }

    /// The latest ticket: ours, else the shared store's.
    pub async fn find_ticket(&self) -> Option<String> {
        if let Some(t) = self.ticket() {
            return Some(t);
        }
        let store = self.store.as_ref()?;
        let t = store.get(&self.ticket_key(store)).await.ok()??;
        self.set_ticket(&t);
        Some(t)
    }

    fn seen_key(&self, store: &RedisStore, signature: &Signature) -> String {
        store.key(&format!(
            "platform:{}:callback:{}",
            self.component_appid,
            signature.as_str()
        ))
    }

    /// Takes a fresh callback's `msg_signature` for acting on: `false` when
    /// it was acted on already (here, or with `token.store` by any
    /// replica). Remembered for twice `callback_max_age`, the longest a
    /// timestamp stays fresh; a store that cannot be reached leaves this
    /// replica's memory to decide.
    pub async fn claim_callback(&self, signature: &Signature) -> bool {
        let now = crate::lease::store::now_ms() / 1000;
        let ttl = self.callback_max_age * 2;
        if !self
            .seen
            .claim(signature.as_str(), now, now + ttl.as_secs())
        {
            return false;
        }
        let Some(store) = &self.store else {
            return true;
        };
        match store.claim(&self.seen_key(store, signature), ttl).await {
            Ok(first) => first,
            Err(e) => {
                tracing::warn!(platform = %self.name, error = %e, "callback not checked against the store for replays; this replica's memory only");
                true
            }
        }
    }

    /// Forgets a claimed callback whose action failed, so WeChat's retry of
    /// it is acted on.
    pub async fn release_callback(&self, signature: &Signature) {
        self.seen.release(signature.as_str());
        if let Some(store) = &self.store {
            if let Err(e) = store.del(&self.seen_key(store, signature)).await {
                tracing::warn!(platform = %self.name, error = %e, "a failed callback's mark not removed from the store; its retry is taken after callback_max_age");
            }
        }
    }

    /// Writes the state file (if configured): a temporary file beside it,
    /// mode 0600, then renamed over it, so a crash leaves the old or the
    /// new one whole. Off the runtime: it is a blocking write.
    pub async fn persist(&self) -> Result<(), String> {
        let Some(path) = self.state_file.clone() else {
            return Ok(());
        };
        let text = serde_json::to_string_pretty(&*self.state.lock()).expect("state serialises");
        let name = self.name.clone();
        tokio::task::spawn_blocking(move || write_private(&path, &text))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("platforms {name}: state_file: {e}"))
    }
}

/// Writes `text` to `path` atomically, readable by the owner alone.
fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn refresh_tokens_survive_in_the_state_file_and_seeds_do_not_override_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("saas.json");
        let yaml = format!(
            "platforms:\n  - name: saas\n    component_appid: wxcomp\n    component_secret: cs\n    token: tok\n    encoding_aes_key: abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG\n    state_file: {}\n    authorizers: [{{appid: wxa1, refresh_token: seed-1}}]\n",
            file.display()
        );
        let c = crate::config::Config::parse(&yaml).unwrap();
        let p = Platform::new(&c.platforms[0], None, &c.upstream, None).unwrap();
        assert_eq!(p.refresh_token("wxa1").unwrap().expose(), "seed-1");
        assert!(p.set_refresh_token("wxa1", "rotated-1"));
        assert!(p.set_refresh_token("wxa2", "rt-2"));
        assert!(p.set_ticket("ticket@@@1"));
        p.persist().await.unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let again = Platform::new(&c.platforms[0], None, &c.upstream, None).unwrap();
        assert_eq!(
            again.refresh_token("wxa1").unwrap().expose(),
            "rotated-1",
            "the file wins over the seed"
        );
        assert_eq!(again.authorizer_count(), 2);
        assert_eq!(again.refresh_token("wxa2").unwrap().expose(), "rt-2");
        assert_eq!(again.ticket().as_deref(), Some("ticket@@@1"));
        assert!(again.remove("wxa2"));
    }
}
