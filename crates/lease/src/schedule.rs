//! One task drives every lease's refresher: a timer heap of when each lease
//! is due, a queue of leases to refresh now, and at most
//! `DEFAULT_FETCHES_IN_FLIGHT` refresh steps running at once.
//!
//! A task per lease would keep its whole future (the largest state any
//! fetch can reach) allocated while it sleeps, about 10 KiB each; here an
//! idle lease is its boxed [`Job`] and a heap entry. The cap keeps a start
//! with thousands of accounts from opening thousands of fetches at once
//! (and the memory they take); reports and operator requests go to the
//! front of the queue. A step never sleeps: retries come back here as a
//! wait, so a failing lease holds no slot while it waits.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::LeaseCell;

/// Refresh steps running at once: enough to fetch thousands of tokens in
/// seconds, few enough that a start does not open thousands of requests.
pub const DEFAULT_FETCHES_IN_FLIGHT: usize = 64;

/// A running step: gives the job back with how long to wait before the next.
pub type Stepping = Pin<Box<dyn Future<Output = (Box<dyn Job>, Duration)> + Send>>;

/// One lease's refresher, as the scheduler sees it.
pub trait Job: Send + 'static {
    /// The cell it fills (its reports and requests wake the job).
    fn cell(&self) -> &Arc<LeaseCell>;
    /// A refresh is being retried: the next step is already decided, wakes
    /// wait for it.
    fn retrying(&self) -> bool;
    /// What it refreshes, for logs: "token of account shop".
    fn name(&self) -> String;
    /// One refresh attempt; `asked` is the value to replace, when a report
    /// or an operator asked.
    fn step(self: Box<Self>, asked: Option<Arc<str>>) -> Stepping;
}

/// How a cell wakes its job: the scheduler's wake channel and the job's id.
pub struct Wake {
    tx: mpsc::UnboundedSender<usize>,
    id: usize,
}

impl Wake {
    pub fn new(tx: mpsc::UnboundedSender<usize>, id: usize) -> Self {
        Wake { tx, id }
    }

    /// Asks the scheduler to look at the job (a send that never waits).
    pub fn wake(&self) {
        let _ = self.tx.send(self.id);
    }
}

/// The handle: add jobs from anywhere (the request path adds a ticket's on
/// first use); [`Scheduler::drive`] is the task that runs them.
#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

struct Inner {
    adds: mpsc::UnboundedSender<(usize, Box<dyn Job>)>,
    wakes: mpsc::UnboundedSender<usize>,
    next_id: AtomicUsize,
    /// The receivers, until the drive takes them.
    drive: Mutex<Option<Drive>>,
    limit: usize,
}

struct Drive {
    adds: mpsc::UnboundedReceiver<(usize, Box<dyn Job>)>,
    wakes: mpsc::UnboundedReceiver<usize>,
}

impl Scheduler {
    /// A scheduler running at most `limit` steps at once.
    pub fn new(limit: usize) -> Self {
        let (adds, add_rx) = mpsc::unbounded_channel();
        let (wakes, wake_rx) = mpsc::unbounded_channel();
        Scheduler {
            inner: Arc::new(Inner {
                adds,
                wakes,
                next_id: AtomicUsize::new(0),
                drive: Mutex::new(Some(Drive {
                    adds: add_rx,
                    wakes: wake_rx,
                })),
                limit: limit.max(1),
            }),
        }
    }

    /// Hands `job` to the scheduler: its first step runs as soon as a slot
    /// is free. Never waits.
    pub fn add(&self, job: Box<dyn Job>) {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        job.cell().attach(Wake::new(self.inner.wakes.clone(), id));
        let _ = self.inner.adds.send((id, job));
    }

    /// Leases added so far.
    pub fn leases(&self) -> usize {
        self.inner.next_id.load(Ordering::Relaxed)
    }

    /// The task that runs every job, once (`None` if already taken). It
    /// runs until dropped; dropping it drops every job.
    pub fn drive(&self) -> Option<impl Future<Output = ()> + Send + 'static> {
        let d = self.inner.drive.lock().take()?;
        let limit = self.inner.limit;
        // Holds the senders too, so the channels stay open while it runs.
        let keep = self.clone();
        Some(async move {
            let _keep = keep;
            run(d, limit).await
        })
    }
}

/// Where a job is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum State {
    /// Waiting for its time: the heap holds an entry with the slot's
    /// current `due` number.
    Due,
    /// In the queue to run (what it is asked to replace, if anything, is in
    /// the `asked` map: rare, so not a field of every slot).
    Queued,
    /// Its step is running (the job is inside the step).
    Running,
}

/// 24 bytes a lease: the job, which heap entry is its current one, where
/// it is.
struct Slot {
    job: Option<Box<dyn Job>>,
    /// Bumped each time the slot becomes due: a heap entry with another
    /// number is stale.
    due: u32,
    state: State,
    /// Woken while its step ran or a retry was pending: look at the cell
    /// once that is over (a permit, as `Notify` keeps one).
    woken: bool,
}

/// Queue capacity kept once it empties (a start queues every lease).
const DEFAULT_QUEUE_KEPT: usize = 64;

async fn run(mut d: Drive, limit: usize) {
    let mut slots: Vec<Slot> = Vec::new();
    let mut timers: BinaryHeap<Reverse<(Instant, u32, u32)>> = BinaryHeap::new();
    let mut queue: VecDeque<usize> = VecDeque::new();
    // Queued jobs asked to replace a value (a report, an operator).
    let mut asked_for: HashMap<usize, Arc<str>> = HashMap::new();
    let mut running: JoinSet<(usize, Box<dyn Job>, Duration)> = JoinSet::new();
    // Which job a running task holds, to name it if it panics.
    let mut names: HashMap<tokio::task::Id, (usize, String)> = HashMap::new();
    loop {
        while running.len() < limit {
            let Some(id) = queue.pop_front() else {
                // The start queued every lease at once: give that back.
                if queue.capacity() > DEFAULT_QUEUE_KEPT {
                    queue.shrink_to(DEFAULT_QUEUE_KEPT);
                }
                break;
            };
            let slot = &mut slots[id];
            if retire_if_done(slot) || slot.job.is_none() {
                asked_for.remove(&id);
                continue;
            }
            let (Some(job), State::Queued) = (
                slot.job.take(),
                std::mem::replace(&mut slot.state, State::Running),
            ) else {
                unreachable!("only queued jobs are in the queue");
            };
            let asked = asked_for.remove(&id);
            // A fresh step answers what woke it; a retry does not.
            if !job.retrying() {
                slot.woken = false;
            }
            let name = job.name();
            let step = job.step(asked);
            let handle = running.spawn(async move {
                let (job, wait) = step.await;
                (id, job, wait)
            });
            names.insert(handle.id(), (id, name));
        }
        let next = timers.peek().map(|Reverse((t, _, _))| *t);
        tokio::select! {
            Some((id, job)) = d.adds.recv() => {
                if slots.len() <= id {
                    slots.resize_with(id + 1, || Slot { job: None, due: 0, state: State::Running, woken: false });
                }
                slots[id] = Slot { job: Some(job), due: 0, state: State::Queued, woken: false };
                queue.push_back(id);
                // After a burst of adds (the start), give back what doubling
                // reserved: with 10,000 leases, ~50 bytes each.
                if d.adds.is_empty() && slots.capacity() > slots.len() + slots.len() / 8 {
                    slots.shrink_to_fit();
                    timers.shrink_to(slots.len());
                }
            }
            Some(id) = d.wakes.recv() => {
                let Some(slot) = slots.get_mut(id) else { continue };
                if retire_if_done(slot) {
                    continue;
                }
                let Some(job) = &slot.job else {
                    slot.woken = true;
                    continue;
                };
                if job.retrying() {
                    slot.woken = true;
                    continue;
                }
                match slot.state {
                    State::Due => {
                        if let Some(asked) = super::refresher::asked(job.cell()) {
                            slot.state = State::Queued;
                            set_asked(&mut asked_for, id, asked);
                            queue.push_front(id);
                        }
                    }
                    State::Queued => {
                        if let Some(asked) = super::refresher::asked(job.cell()) {
                            set_asked(&mut asked_for, id, asked);
                        }
                    }
                    State::Running => {}
                }
            }
            Some(done) = running.join_next_with_id(), if !running.is_empty() => match done {
                Ok((task, (id, job, wait))) => {
                    names.remove(&task);
                    let leases = slots.len();
                    let slot = &mut slots[id];
                    // Asked again while the step ran: go again now.
                    let again = if slot.woken && !job.retrying() {
                        slot.woken = false;
                        super::refresher::asked(job.cell())
                    } else {
                        None
                    };
                    match again {
                        Some(asked) => {
                            slot.state = State::Queued;
                            set_asked(&mut asked_for, id, asked);
                            queue.push_front(id);
                        }
                        None => {
                            let at = Instant::now() + wait;
                            slot.state = State::Due;
                            slot.due = slot.due.wrapping_add(1);
                            // Grown to what the slots need, not doubled: a
                            // timer per lease, 24 bytes each.
                            if timers.len() == timers.capacity() {
                                let more = leases.saturating_sub(timers.len()).max(timers.len() / 8 + 1);
                                timers.reserve_exact(more);
                            }
                            timers.push(Reverse((at, id as u32, slot.due)));
                        }
                    }
                    slot.job = Some(job);
                    retire_if_done(slot);
                }
                Err(e) => {
                    let (id, name) = names.remove(&e.id()).unwrap_or((usize::MAX, String::new()));
                    tracing::error!(lease = %name, error = %e, "a lease refresh failed unexpectedly; it is no longer refreshed (restart to recover)");
                    if let Some(slot) = slots.get_mut(id) {
                        slot.state = State::Running;
                    }
                }
            },
            _ = sleep_until(next), if next.is_some() => {
                let now = Instant::now();
                while let Some(Reverse((at, id, due))) = timers.peek().copied() {
                    if at > now {
                        break;
                    }
                    timers.pop();
                    let id = id as usize;
                    let slot = &mut slots[id];
                    // An entry for a time since replaced is stale.
                    if slot.state == State::Due && slot.due == due {
                        slot.state = State::Queued;
                        queue.push_back(id);
                    }
                }
            }
            else => return,
        }
    }
}

/// Drops a job whose cell was retired (its account removed); the slot
/// stays, as `Running` with no job, so every later event for it is a no-op.
fn retire_if_done(slot: &mut Slot) -> bool {
    if !slot.job.as_ref().is_some_and(|j| j.cell().is_retired()) {
        return false;
    }
    if let Some(job) = slot.job.take() {
        tracing::debug!(lease = %job.name(), "refresher stopped: its account was removed");
    }
    slot.state = State::Running;
    true
}

/// Records what a queued job is asked to replace (`None`: a plain refresh).
fn set_asked(asked_for: &mut HashMap<usize, Arc<str>>, id: usize, asked: Option<Arc<str>>) {
    match asked {
        Some(a) => {
            asked_for.insert(id, a);
        }
        None => {
            asked_for.remove(&id);
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
