//! The config generation and what reloads did, for `/status`, the metric
//! `wxsidecar_config_reloads_total{result}` and `POST /reload`'s answer.
//! Knows nothing of what is reloaded: the reloader (`reload`) writes here,
//! the admin listener reads and asks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

/// One reload's outcome.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReloadReport {
    /// `ok` (applied), `unchanged` (read and checked, nothing differs from
    /// the running config) or `failed`.
    pub result: String,
    /// What asked: `SIGHUP`, `POST /reload`, `file change`.
    pub trigger: String,
    pub unix_time: u64,
    /// The generation running after it.
    pub generation: u64,
    /// What changed (accounts added, removed, secrets, upstream, …).
    #[serde(default)]
    pub changes: Vec<String>,
    /// Why a failed reload was refused: every problem of the new config.
    #[serde(default)]
    pub problems: Vec<String>,
    /// Keys that changed but take a restart (`listen`, `threads`, …).
    #[serde(default)]
    pub restart_needed: Vec<String>,
}

/// Reload requests: a trigger name, and where to send the outcome.
pub type Request = (String, Option<oneshot::Sender<ReloadReport>>);

pub struct Generation {
    current: AtomicU64,
    last: Mutex<Option<ReloadReport>>,
    requests: mpsc::UnboundedSender<Request>,
    /// Taken by the reloader task when it starts.
    receiver: Mutex<Option<mpsc::UnboundedReceiver<Request>>>,
}

impl Default for Generation {
    fn default() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Generation {
            current: AtomicU64::new(1),
            last: Mutex::new(None),
            requests: tx,
            receiver: Mutex::new(Some(rx)),
        }
    }
}

impl Generation {
    /// The config generation: 1 at start, one more per reload that changed
    /// something.
    pub fn current(&self) -> u64 {
        self.current.load(Ordering::Acquire)
    }

    pub fn last(&self) -> Option<ReloadReport> {
        self.last.lock().clone()
    }

    /// Asks for a reload and waits (up to `limit`) for its outcome; `None`
    /// when no reloader runs or it took longer.
    pub async fn request(&self, trigger: &str, limit: Duration) -> Option<ReloadReport> {
        if self.receiver.lock().is_some() {
            // Nobody took the requests: no reloader runs (no config file).
            return None;
        }
        let (tx, rx) = oneshot::channel();
        self.requests.send((trigger.to_string(), Some(tx))).ok()?;
        tokio::time::timeout(limit, rx).await.ok()?.ok()
    }

    /// Asks for a reload without waiting (a signal handler).
    pub fn ask(&self, trigger: &str) {
        let _ = self.requests.send((trigger.to_string(), None));
    }

    /// The request stream, once (for the reloader task).
    pub fn take_requests(&self) -> Option<mpsc::UnboundedReceiver<Request>> {
        self.receiver.lock().take()
    }

    /// Records an outcome; only a reload that changed something moves the
    /// generation on (a SIGHUP with the same file is not a new config).
    pub fn record(&self, trigger: &str, outcome: Outcome) -> ReloadReport {
        let result = match (outcome.problems.is_empty(), outcome.changes.is_empty()) {
            (false, _) => "failed",
            (true, true) => "unchanged",
            (true, false) => "ok",
        };
        let generation = match result {
            "ok" => self.current.fetch_add(1, Ordering::AcqRel) + 1,
            _ => self.current(),
        };
        crate::metrics::CONFIG_RELOADS
            .with_label_values(&[result])
            .inc();
        let report = ReloadReport {
            result: result.into(),
            trigger: trigger.into(),
            unix_time: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            generation,
            changes: outcome.changes,
            problems: outcome.problems,
            restart_needed: outcome.restart_needed,
        };
        *self.last.lock() = Some(report.clone());
        report
    }
}

/// What the reloader found: problems (refused), or changes applied.
#[derive(Default)]
pub struct Outcome {
    pub changes: Vec<String>,
    pub problems: Vec<String>,
    pub restart_needed: Vec<String>,
}
