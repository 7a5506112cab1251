//! Signals and draining.
//!
//! SIGTERM: `/readyz` turns 503 (so Kubernetes stops sending), the listeners
//! stop accepting, in-flight requests finish, and the process exits as soon
//! as nothing has been in flight for a moment — at the latest after
//! `shutdown_grace` (pingora alone would always wait the whole grace period,
//! 300 s by default). SIGINT: exit at once. SIGQUIT: zero-downtime upgrade —
//! the listening sockets go to a process started with `run --upgrade`, this
//! one drains and exits.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use tokio::signal::unix::{signal, SignalKind};

/// After SIGTERM, exit once nothing has been in flight for this long: covers
/// a connection accepted just before the listener closed.
const DEFAULT_IDLE_BEFORE_EXIT: Duration = Duration::from_millis(300);
/// How often the drain watcher looks.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// Requests in flight and whether the process is draining.
#[derive(Default)]
pub struct Drain {
    in_flight: AtomicUsize,
    draining: AtomicBool,
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

    fn start(self: &Arc<Self>, grace: Duration) {
        self.draining.store(true, Ordering::Release);
        let me = self.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + grace;
            let mut idle_since: Option<Instant> = None;
            while Instant::now() < deadline {
                if me.in_flight.load(Ordering::Acquire) == 0 {
                    let since = *idle_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= DEFAULT_IDLE_BEFORE_EXIT {
                        tracing::info!("drained: no request in flight; exiting");
                        std::process::exit(0);
                    }
                } else {
                    idle_since = None;
                }
                std::thread::sleep(DRAIN_POLL);
            }
            // Past the grace period pingora stops the runtimes itself.
        });
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
                self.drain.start(self.grace);
                ShutdownSignal::GracefulTerminate
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: exiting now");
                ShutdownSignal::FastShutdown
            }
        }
    }
}
