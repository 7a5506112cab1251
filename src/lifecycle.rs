//! Signals, draining and the background task set.
//!
//! SIGTERM: `/readyz` turns 503 (so Kubernetes stops sending), the app-side
//! listeners stop accepting, in-flight requests finish, and the process
//! exits as soon as nothing has been in flight for a moment — at the latest
//! after `shutdown_grace` (pingora alone would always wait the whole grace
//! period, 300 s by default). The waiting happens in the signal watcher
//! itself, before pingora is told to stop, so `main` returns and exits: no
//! thread ends the process. SIGINT: exit at once. SIGQUIT: zero-downtime
//! upgrade — the listening sockets go to a process started with
//! `run --upgrade`, this one drains for the grace period and exits.
//!
//! Every background task (refreshers, upstream upkeep, the store watcher,
//! leaf re-signing) is spawned into one [`Tasks`] set, named, and ends when
//! the set is stopped at shutdown; one that ends on its own is logged.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use async_trait::async_trait;
use parking_lot::Mutex;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// After SIGTERM, exit once nothing has been in flight for this long: covers
/// a connection accepted just before the listener closed.
const DEFAULT_IDLE_BEFORE_EXIT: Duration = Duration::from_millis(300);
/// How often the drain watcher looks.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// Requests in flight, whether the process is draining, and the signal
/// that stops the app-side listeners.
pub struct Drain {
    in_flight: AtomicUsize,
    draining: AtomicBool,
    /// `true`: the app-side listeners stop accepting and kept-alive
    /// connections close (pingora's own shutdown watch comes later).
    stop: watch::Sender<bool>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            in_flight: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            stop: watch::channel(false).0,
        }
    }
}

impl Drain {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Counts a request until the guard is dropped.
    pub fn enter(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// The shutdown watch for an app-side service: it fires on SIGTERM (our
    /// drain) or when pingora shuts down (upgrade, SIGINT), whichever comes
    /// first. Call from within the service's runtime.
    pub fn service_watch(&self, pingora: ShutdownWatch) -> ShutdownWatch {
        let stop = self.stop.clone();
        let mut ours = stop.subscribe();
        let mut theirs = pingora;
        tokio::spawn(async move {
            tokio::select! {
                _ = ours.wait_for(|s| *s) => {}
                _ = theirs.wait_for(|s| *s) => { stop.send_replace(true); }
            }
        });
        self.stop.subscribe()
    }

    /// SIGTERM: stop accepting, then wait until nothing has been in flight
    /// for a moment, or `grace` has passed.
    async fn drain(&self, grace: Duration) {
        self.draining.store(true, Ordering::Release);
        self.stop.send_replace(true);
        let deadline = Instant::now() + grace;
        let mut idle_since: Option<Instant> = None;
        while Instant::now() < deadline {
            if self.in_flight.load(Ordering::Acquire) == 0 {
                let since = *idle_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= DEFAULT_IDLE_BEFORE_EXIT {
                    tracing::info!("drained: no request in flight; exiting");
                    return;
                }
            } else {
                idle_since = None;
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
        tracing::warn!(in_flight = self.in_flight.load(Ordering::Acquire), grace = ?grace, "shutdown_grace over; exiting with requests in flight");
    }
}

/// Decrements the in-flight count when the request ends, however it ends.
pub struct InFlight(Arc<Drain>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Our shutdown signal watcher (pingora's, plus draining on SIGTERM).
pub struct Signals {
    pub drain: Arc<Drain>,
    pub grace: Duration,
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let mut quit = signal(SignalKind::quit()).expect("SIGQUIT handler");
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = quit.recv() => {
                tracing::info!("SIGQUIT: handing the listeners to the new process, then draining");
                self.drain.draining.store(true, Ordering::Release);
                ShutdownSignal::GracefulUpgrade
            }
            _ = term.recv() => {
                tracing::info!(grace = ?self.grace, "SIGTERM: draining");
                self.drain.drain(self.grace).await;
                // Drained (or out of time): nothing is left to wait for.
                ShutdownSignal::FastShutdown
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: exiting now");
                ShutdownSignal::FastShutdown
            }
        }
    }
}

/// The background work of a running sidecar; see the module doc.
#[derive(Default)]
pub struct Tasks {
    set: Mutex<JoinSet<&'static str>>,
    stop: watch::Sender<bool>,
}

/// How long stopped tasks get to finish at shutdown.
const DEFAULT_TASK_STOP_WAIT: Duration = Duration::from_secs(1);

impl Tasks {
    /// Runs `work` until it ends or the set is stopped. Call from within
    /// the runtime it should run on.
    pub fn spawn<F>(&self, name: &'static str, work: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let mut stop = self.stop.subscribe();
        let mut set = self.set.lock();
        Self::reap(&mut set, *self.stop.borrow());
        set.spawn(async move {
            tokio::select! {
                _ = work => {}
                _ = stop.wait_for(|s| *s) => {}
            }
            name
        });
    }

    /// Logs tasks that ended before shutdown (background work runs until
    /// then), and frees their slots.
    fn reap(set: &mut JoinSet<&'static str>, stopping: bool) {
        while let Some(done) = set.try_join_next() {
            match done {
                Ok(name) if !stopping => tracing::warn!(task = name, "background task ended"),
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "background task failed"),
            }
        }
    }

    /// Tasks running now.
    pub fn running(&self) -> usize {
        let mut set = self.set.lock();
        Self::reap(&mut set, *self.stop.borrow());
        set.len()
    }

    /// Stops every task and waits (briefly) for them to end.
    pub async fn shutdown(&self) {
        self.stop.send_replace(true);
        let mut set = std::mem::take(&mut *self.set.lock());
        let ended = tokio::time::timeout(DEFAULT_TASK_STOP_WAIT, async {
            while set.join_next().await.is_some() {}
        })
        .await;
        if ended.is_err() {
            tracing::warn!(
                left = set.len(),
                "background tasks still running at shutdown; aborting them"
            );
            set.abort_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_stopped_set_ends_every_task() {
        let tasks = Tasks::default();
        for _ in 0..3 {
            tasks.spawn("forever", std::future::pending());
        }
        tasks.spawn("short", async {});
        tokio::task::yield_now().await;
        assert_eq!(tasks.running(), 3, "the finished task is reaped");
        tasks.shutdown().await;
        assert_eq!(tasks.running(), 0);
    }
}
