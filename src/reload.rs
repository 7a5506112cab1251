//! Reload without restart. SIGHUP, `POST /reload` on the admin listener and,
//! with `reload.watch`, a change to the config file or any file it names
//! (`*_file`, `ca_file`; a Kubernetes Secret's symlink swap included) re-read
//! the config.
//!
//! An invalid config changes nothing: every problem is logged and shown in
//! `/status`. A valid one is applied without dropping a request: new
//! accounts fetch a token before they are served; removed ones take no new
//! requests while those in flight finish; a new secret is used for a fetch
//! at once while the old token serves until the new one arrives; upstream
//! (and its proxy), clients and per-request limits apply to new requests.
//! Keys only a restart can change keep their running value and are named.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::app::App;
use crate::config::keys::differs;
use crate::config::{AccountKind, Config, Family, UpstreamConfig};
use crate::failover::Upstreams;
use crate::generation::{Outcome, ReloadReport};
use crate::refresh::{self, Subject};

/// Starts the reloader: one task that takes requests (the admin listener,
/// SIGHUP) and, with `reload.watch`, reads the watched files every
/// `reload.interval`.
/// `files`: what the running config was read from.
pub fn start(app: &Arc<App>, path: PathBuf, files: Vec<PathBuf>) {
    let Some(requests) = app.generation.take_requests() else {
        return;
    };
    app.tasks
        .spawn("config reloader", run(app.clone(), path, files, requests));
}

async fn run(
    app: Arc<App>,
    path: PathBuf,
    files: Vec<PathBuf>,
    mut requests: tokio::sync::mpsc::UnboundedReceiver<crate::generation::Request>,
) {
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGHUP; reload with POST /reload");
            None
        }
    };
    let mut watched = Watched::read(files);
    loop {
        let interval = app.config().reload.interval;
        let watch = app.config().reload.watch;
        let (trigger, reply) = tokio::select! {
            Some((trigger, reply)) = requests.recv() => (trigger, reply),
            Some(()) = async { hangup.as_mut()?.recv().await } => ("SIGHUP".to_string(), None),
            _ = tokio::time::sleep(interval), if watch => {
                if !watched.changed() {
                    continue;
                }
                ("file change".to_string(), None)
            }
        };
        let (report, files) = reload(&app, &path, &trigger).await;
        watched = Watched::read(files);
        if let Some(r) = reply {
            let _ = r.send(report);
        }
    }
}

/// The files a config was read from, each with what identifies its
/// content: a cheap `stat` (inode, size, modification time, following a
/// symlink) every tick, and a hash of the content read only when that
/// changed — a symlink swap changes the inode; an edit in place the time.
/// No read and no blocking-pool thread per tick: a watch that read every
/// file every 2 s kept a blocking thread and its allocator cache alive
/// (~3 MiB of RSS, and the whole config read again with 10,000 accounts).
struct Watched(Vec<(PathBuf, Option<Stamp>)>);

#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp {
    meta: (u64, u64, i64, i64),
    hash: u64,
}

impl Watched {
    fn read(files: Vec<PathBuf>) -> Self {
        Watched(
            files
                .into_iter()
                .map(|f| {
                    let s = stamp(&f, None);
                    (f, s)
                })
                .collect(),
        )
    }

    /// Whether any file's content changed (or it appeared or went away).
    fn changed(&mut self) -> bool {
        let mut changed = false;
        for (f, s) in &mut self.0 {
            let now = stamp(f, *s);
            if now.map(|x| x.hash) != s.map(|x| x.hash) {
                changed = true;
            }
            *s = now;
        }
        changed
    }
}

/// A file's stamp; its content hashed again only when its `stat` changed
/// since `before`. Small files (a config, secrets): read in place.
fn stamp(path: &std::path::Path, before: Option<Stamp>) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    let meta = (m.ino(), m.size(), m.mtime(), m.mtime_nsec());
    if let Some(b) = before.filter(|b| b.meta == meta) {
        return Some(b);
    }
    let bytes = std::fs::read(path).ok()?;
    Some(Stamp {
        meta,
        hash: crate::config::sources::digest(&bytes),
    })
}

/// Reads the config off the runtime (file reads block).
async fn load(path: PathBuf) -> (Result<Config, Vec<String>>, Vec<PathBuf>) {
    let fallback = vec![path.clone()];
    tokio::task::spawn_blocking(move || {
        let (r, files) = Config::load_recording(&path);
        (r.map_err(|e| e.problems), files)
    })
    .await
    .unwrap_or_else(|e| {
        (
            Err(vec![format!("reading the config failed: {e}")]),
            fallback,
        )
    })
}

/// One reload: read, check, apply; the outcome is recorded and logged.
pub async fn reload(
    app: &Arc<App>,
    path: &std::path::Path,
    trigger: &str,
) -> (ReloadReport, Vec<PathBuf>) {
    let (loaded, files) = load(path.to_path_buf()).await;
    let outcome = match loaded {
        Err(problems) => Outcome {
            problems,
            ..Outcome::default()
        },
        Ok(config) => match apply(app, config).await {
            Ok(o) => o,
            Err(problems) => Outcome {
                problems,
                ..Outcome::default()
            },
        },
    };
    let report = app.generation.record(trigger, outcome);
    if report.result == "unchanged" {
        tracing::info!(
            trigger,
            generation = report.generation,
            "config re-read; nothing changed"
        );
        if !report.restart_needed.is_empty() {
            tracing::warn!(keys = ?report.restart_needed, "these keys changed but take a restart; their running values stay");
        }
    } else if report.result == "ok" {
        tracing::info!(
            trigger,
            generation = report.generation,
            changes = ?report.changes,
            "config reloaded"
        );
        if !report.restart_needed.is_empty() {
            tracing::warn!(keys = ?report.restart_needed, "these keys changed but take a restart; their running values stay");
        }
    } else {
        for p in &report.problems {
            tracing::error!(trigger, problem = %p, "config reload refused; the running config stays");
        }
    }
    (report, files)
}

/// An upstream block changed: anything shown, the proxy's password (shown
/// masked), or the certificates in `ca_file` (a bundle rotated in place).
fn upstream_differs(a: &UpstreamConfig, b: &UpstreamConfig) -> bool {
    let creds = |u: &UpstreamConfig| {
        u.proxy
            .as_ref()
            .and_then(|p| p.credentials.as_ref())
            .map(|c| c.expose().to_string())
    };
    differs(a, b) || creds(a) != creds(b) || a.ca_digest != b.ca_digest
}

async fn apply(app: &Arc<App>, mut new: Config) -> Result<Outcome, Vec<String>> {
    let old = app.config_full();
    // Keys only a restart applies keep their running value (config::keys).
    let restart_needed = crate::config::keys::restart_needed(&old, &mut new);

    let mut changes = Vec::new();
    // Upstream families first: the one step that can still fail.
    let wecom_needed =
        app.upstreams.has_wecom() || new.accounts.iter().any(|a| a.kind == AccountKind::WeCom);
    let official = upstream_differs(&old.upstream, &new.upstream);
    let wecom = wecom_needed
        && (!app.upstreams.has_wecom()
            || upstream_differs(&old.wecom_upstream, &new.wecom_upstream));
    let mut replaced = Vec::new();
    if official || wecom {
        let ca = crate::upstream::ca_bundle_for(&new, wecom_needed).map_err(|e| vec![e])?;
        if official {
            replaced.push((
                Family::Official,
                Upstreams::new(&new.upstream, ca.as_deref()),
            ));
            changes.push("upstream".to_string());
        }
        if wecom {
            replaced.push((
                Family::WeCom,
                Upstreams::new(&new.wecom_upstream, ca.as_deref()),
            ));
            changes.push("wecom_upstream".to_string());
        }
    }
    for (family, up) in replaced {
        up.resolve().await;
        up.warm().await;
        up.maintain(&|name, work| app.tasks.spawn(name, work));
        app.upstreams.replace(family, up);
    }

    // Accounts: the new ones get a first token before the table is used.
    // One change of the table at a time; authorised accounts stay (their
    // platform, not the file, decides them).
    let _editing = app.accounts_edit.lock().await;
    let accounts = app.accounts_full();
    let mut configs = std::mem::take(&mut new.accounts);
    for a in accounts.iter() {
        if let Some(p) = &a.platform {
            configs.push(crate::config::AccountConfig::authorizer(p, &a.id));
        }
    }
    let reloaded = accounts.reloaded(configs);
    for a in &reloaded.added {
        refresh::start(app, a, Subject::Token);
    }
    let wait = new.upstream.connect_timeout + new.upstream.read_timeout + Duration::from_secs(2);
    futures_util::future::join_all(reloaded.added.iter().map(|a| a.tokens.wait_attempted(wait)))
        .await;
    for a in &reloaded.added {
        changes.push(format!("account {} added", a.name));
        if a.tokens.valid().is_none() {
            tracing::error!(account = %a.name, "account added by a reload has no token yet; its requests get 503 until a fetch succeeds");
        }
    }
    for a in &reloaded.secret_changed {
        changes.push(format!("secret of account {} changed", a.name));
    }
    for a in &reloaded.settings_changed {
        changes.push(format!("settings of account {} changed", a.name));
    }
    for a in &reloaded.removed {
        changes.push(format!("account {} removed", a.name));
    }
    let default = |t: &crate::account::Accounts| t.default_account().map(|a| a.name.clone());
    if default(&accounts) != default(&reloaded.accounts) {
        changes.push("default account".to_string());
    }
    let client_tokens = |c: &Config| {
        c.clients
            .tokens
            .iter()
            .map(|t| t.token.expose().to_string())
            .collect::<Vec<_>>()
    };
    let clients_changed =
        differs(&old.clients, &new.clients) || client_tokens(&old) != client_tokens(&new);
    if clients_changed {
        changes.push("clients".to_string());
    }
    if differs(&old.limits, &new.limits) {
        changes.push("limits".to_string());
    }
    if differs(&old.admin, &new.admin) || old.admin.token != new.admin.token {
        changes.push("admin".to_string());
    }
    if differs(&old.reload, &new.reload) {
        changes.push("reload".to_string());
    }
    if changes.is_empty() {
        // Nothing to publish: the running config stays as it is (and the
        // generation with it).
        return Ok(Outcome {
            changes,
            problems: Vec::new(),
            restart_needed,
        });
    }
    // Rate-limit buckets start afresh with the clients they belong to.
    let clients = clients_changed.then(|| crate::clients::Clients::new(new.clients.clone()));
    app.publish(new, reloaded.accounts, clients);

    for a in &reloaded.secret_changed {
        // The old token serves until the one fetched with the new secret
        // arrives.
        a.tokens.request_fetch();
    }
    for a in &reloaded.removed {
        a.retire();
        accounts.forget(a);
    }
    Ok(Outcome {
        changes,
        problems: Vec::new(),
        restart_needed,
    })
}
