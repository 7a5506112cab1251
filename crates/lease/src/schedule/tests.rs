//! The scheduler alone, under tokio's paused clock, with jobs that record
//! when they ran and what they were asked (the refresher's own tests run it
//! with one real refresher).

use std::sync::atomic::AtomicBool;

use super::*;
use wxsidecar_metrics::FetchCounters;

const S: fn(u64) -> Duration = Duration::from_secs;

/// What every test job writes: (job, when, asked value).
type Log = Arc<Mutex<Vec<(usize, Duration, Option<String>)>>>;

#[derive(Clone, Default)]
struct Shared {
    log: Log,
    in_flight: Arc<AtomicUsize>,
    most_in_flight: Arc<AtomicUsize>,
}

struct TestJob {
    n: usize,
    cell: Arc<LeaseCell>,
    every: Duration,
    latency: Duration,
    shared: Shared,
    start: Instant,
    /// Steps left that end in a retry (after `every` as well).
    retries: usize,
    retrying: bool,
    panic: Arc<AtomicBool>,
}

impl Job for TestJob {
    fn cell(&self) -> &Arc<LeaseCell> {
        &self.cell
    }
    fn retrying(&self) -> bool {
        self.retrying
    }
    fn name(&self) -> String {
        format!("job {}", self.n)
    }
    fn step(self: Box<Self>, asked: Option<Arc<str>>) -> Stepping {
        Box::pin(async move {
            let mut me = self;
            let s = &me.shared;
            let now = s.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            s.most_in_flight.fetch_max(now, Ordering::SeqCst);
            s.log
                .lock()
                .push((me.n, me.start.elapsed(), asked.map(|a| a.to_string())));
            tokio::time::sleep(me.latency).await;
            s.in_flight.fetch_sub(1, Ordering::SeqCst);
            if me.panic.load(Ordering::SeqCst) {
                panic!("a step that fails");
            }
            me.retrying = me.retries > 0;
            me.retries = me.retries.saturating_sub(1);
            let every = me.every;
            (me as Box<dyn Job>, every)
        })
    }
}

fn cell() -> Arc<LeaseCell> {
    Arc::new(LeaseCell::new(Arc::default(), 0, FetchCounters::default()))
}

fn job(n: usize, every: Duration, shared: &Shared) -> TestJob {
    TestJob {
        n,
        cell: cell(),
        every,
        latency: Duration::ZERO,
        shared: shared.clone(),
        start: Instant::now(),
        retries: 0,
        retrying: false,
        panic: Arc::default(),
    }
}

/// Runs `s`'s drive in the background.
fn drive(s: &Scheduler) -> tokio::task::JoinHandle<()> {
    tokio::spawn(s.drive().expect("the drive is there once"))
}

/// The times job `n` ran.
fn runs(log: &Log, n: usize) -> Vec<Duration> {
    log.lock()
        .iter()
        .filter(|(j, _, _)| *j == n)
        .map(|(_, t, _)| *t)
        .collect()
}

#[tokio::test(start_paused = true)]
async fn one_task_keeps_a_thousand_leases_on_their_own_schedules() {
    let shared = Shared::default();
    let s = Scheduler::new(64);
    let task = drive(&s);
    for n in 0..1000 {
        // Jobs due every 10 s, 11 s, ... 19 s.
        s.add(Box::new(job(n, S(10 + n as u64 % 10), &shared)));
    }
    assert_eq!(s.leases(), 1000);
    assert!(s.drive().is_none(), "one drive per scheduler");
    tokio::time::sleep(S(65)).await;
    for n in [0, 1, 9, 555, 999] {
        let every = S(10 + n as u64 % 10);
        let expect: Vec<Duration> = (0..)
            .map(|k| every * k)
            .take_while(|t| *t <= S(60))
            .collect();
        assert_eq!(runs(&shared.log, n), expect, "job {n}");
    }
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn no_more_steps_run_at_once_than_the_limit() {
    let shared = Shared::default();
    let s = Scheduler::new(8);
    let task = drive(&s);
    for n in 0..100 {
        let mut j = job(n, S(3600), &shared);
        j.latency = Duration::from_millis(100);
        s.add(Box::new(j));
    }
    tokio::time::sleep(S(5)).await;
    assert_eq!(
        shared.log.lock().len(),
        100,
        "every lease got its first step"
    );
    assert_eq!(shared.most_in_flight.load(Ordering::SeqCst), 8);
    // 100 steps of 100 ms, 8 at a time: 13 rounds; the last began at 1.2 s.
    let last = shared.log.lock().iter().map(|(_, t, _)| *t).max().unwrap();
    assert_eq!(last, Duration::from_millis(1200));
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn a_report_runs_the_job_at_once_with_the_rejected_value() {
    let shared = Shared::default();
    let s = Scheduler::new(4);
    let task = drive(&s);
    let j = job(0, S(7200), &shared);
    let c = j.cell.clone();
    s.add(Box::new(j));
    tokio::time::sleep(S(1)).await;
    c.store("t1", S(7200));
    tokio::time::sleep(S(99)).await;
    // Reported at 100 s: runs then, told which value to replace.
    assert!(c.report_invalid("t1"));
    tokio::time::sleep(S(1)).await;
    let log = shared.log.lock().clone();
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(log[1].1, S(100));
    assert_eq!(log[1].2.as_deref(), Some("t1"));
    // An operator's request: the current value is named too.
    c.store("t2", S(7200));
    c.request_refresh();
    tokio::time::sleep(S(1)).await;
    let log = shared.log.lock().clone();
    assert_eq!(log.len(), 3, "{log:?}");
    assert_eq!(log[2].2.as_deref(), Some("t2"));
    // A wake with nothing asked (a report about an old value) does nothing.
    assert!(!c.report_invalid("t1"));
    tokio::time::sleep(S(10)).await;
    assert_eq!(shared.log.lock().len(), 3);
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn a_report_during_a_step_runs_the_job_again_after_it() {
    let shared = Shared::default();
    let s = Scheduler::new(4);
    let task = drive(&s);
    let mut j = job(0, S(7200), &shared);
    j.latency = S(2);
    let c = j.cell.clone();
    c.store("t1", S(7200));
    s.add(Box::new(j));
    tokio::time::sleep(S(1)).await;
    assert!(c.report_invalid("t1"), "reported while the first step runs");
    tokio::time::sleep(S(10)).await;
    assert_eq!(runs(&shared.log, 0), vec![S(0), S(2)]);
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn a_retrying_job_keeps_its_retry_time_whatever_wakes_it() {
    let shared = Shared::default();
    let s = Scheduler::new(4);
    let task = drive(&s);
    let mut j = job(0, S(30), &shared);
    j.retries = 1;
    let c = j.cell.clone();
    c.store("t1", S(7200));
    s.add(Box::new(j));
    tokio::time::sleep(S(5)).await;
    c.request_refresh();
    assert!(c.report_invalid("t1"));
    tokio::time::sleep(S(30)).await;
    // The retry at 30 s, not at the wake; then the wake it saw is served
    // at once after the retry.
    assert_eq!(runs(&shared.log, 0), vec![S(0), S(30), S(30)]);
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn a_step_that_panics_leaves_the_others_running() {
    let shared = Shared::default();
    let s = Scheduler::new(4);
    let task = drive(&s);
    let bad = job(0, S(10), &shared);
    bad.panic.store(true, Ordering::SeqCst);
    s.add(Box::new(bad));
    s.add(Box::new(job(1, S(10), &shared)));
    tokio::time::sleep(S(25)).await;
    assert_eq!(runs(&shared.log, 0), vec![S(0)]);
    assert_eq!(runs(&shared.log, 1), vec![S(0), S(10), S(20)]);
    assert!(!task.is_finished());
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn a_retired_cell_stops_its_job_whether_waiting_queued_or_running() {
    let shared = Shared::default();
    let s = Scheduler::new(4);
    let task = drive(&s);
    // 0: waiting for its time; 1: mid-step when retired; 2: keeps going.
    let waiting = job(0, S(10), &shared);
    let mut running = job(1, S(10), &shared);
    running.latency = S(5);
    let other = job(2, S(10), &shared);
    let (c0, c1) = (waiting.cell.clone(), running.cell.clone());
    for j in [waiting, running, other] {
        s.add(Box::new(j));
    }
    tokio::time::sleep(S(2)).await;
    c0.retire();
    c1.retire();
    // A report on a retired cell wakes nothing.
    c0.request_refresh();
    tokio::time::sleep(S(60)).await;
    assert_eq!(runs(&shared.log, 0), [S(0)], "stopped while waiting");
    assert_eq!(runs(&shared.log, 1), [S(0)], "stopped after its step");
    assert_eq!(runs(&shared.log, 2).len(), 7, "the others go on");
    task.abort();
}
