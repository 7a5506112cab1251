//! Shutdown and upgrade: SIGTERM drains in-flight requests and exits within
//! the grace period (at once when idle), SIGINT exits now, and SIGQUIT hands
//! the listening sockets to a new process without a failed request.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

#[tokio::test]
async fn sigterm_finishes_the_request_in_flight_then_exits() {
    let fake = Fake::start(&["--latency-ms", "1500"]);
    let cfg = format!(
        "shutdown_grace: 6s\n{}{}",
        upstream(),
        Sidecar::accounts("stable", "stable")
    );
    let mut side = Sidecar::start(&fake, &cfg).await;
    // A kept-alive connection between requests (answered at once: an
    // unknown account is refused without asking WeChat).
    let mut kept = std::net::TcpStream::connect(("127.0.0.1", side.port)).unwrap();
    kept.write_all(b"GET /cgi-bin/x HTTP/1.1\r\nHost: x\r\nX-Wx-Account: nobody\r\n\r\n")
        .unwrap();
    let answer = crate::raw::read_until_quiet(&mut kept, Duration::from_millis(300));
    assert!(answer.starts_with("HTTP/1.1 4"), "{answer}");
    let slow = {
        let url = side.url("/cgi-bin/message/template/send");
        tokio::spawn(async move { client().post(url).body(TEMPLATE).send().await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sent = Instant::now();
    side.signal("TERM");
    // Closed at once, while the request in flight still runs (not at exit).
    let kept_closed = tokio::task::spawn_blocking(move || {
        crate::raw::closed_within(&mut kept, Duration::from_millis(800))
    })
    .await
    .unwrap();
    assert!(
        kept_closed,
        "the idle kept-alive connection was closed on SIGTERM"
    );
    // The listener closes on the same signal, in a task of its own: give
    // it its turn (under a loaded test run it may come after the close
    // above), a second at most.
    let mut refused = false;
    for _ in 0..50 {
        if tokio::net::TcpStream::connect(("127.0.0.1", side.port))
            .await
            .is_err()
        {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = slow
        .await
        .unwrap()
        .expect("the request in flight is answered");
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["errcode"], 0, "{v}");
    let status = tokio::task::spawn_blocking(move || {
        let s = side.wait_exit(Duration::from_secs(10));
        (s, side)
    })
    .await
    .unwrap();
    let elapsed = sent.elapsed();
    assert!(status.0.is_some(), "did not exit");
    assert!(
        elapsed < Duration::from_secs(6),
        "exited after {elapsed:?}, over shutdown_grace"
    );
    assert!(
        elapsed >= Duration::from_millis(1000),
        "exited before the request finished"
    );
    assert!(refused, "the listener stopped accepting after SIGTERM");
}

#[tokio::test]
async fn sigterm_when_idle_and_sigint_exit_at_once() {
    let fake = Fake::start(&[]);
    let cfg = format!("{}{}", upstream(), Sidecar::accounts("stable", "stable"));
    for sig in ["TERM", "INT"] {
        let mut side = Sidecar::start(&fake, &cfg).await;
        side.send("/cgi-bin/message/template/send", TEMPLATE).await;
        let sent = Instant::now();
        side.signal(sig);
        let status = tokio::task::spawn_blocking(move || side.wait_exit(Duration::from_secs(15)))
            .await
            .unwrap();
        assert!(status.is_some(), "SIG{sig}: did not exit");
        assert!(
            sent.elapsed() < Duration::from_secs(3),
            "SIG{sig}: {:?} for an idle sidecar (default grace 10 s)",
            sent.elapsed()
        );
    }
}

#[tokio::test]
async fn sigquit_hands_over_to_a_new_process_without_a_failed_request() {
    let fake = Fake::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = format!(
        "shutdown_grace: 2s\nupgrade_sock: {}\n{}{}",
        dir.path().join("upgrade.sock").display(),
        upstream(),
        Sidecar::accounts("stable", "stable")
    );
    let mut old = Sidecar::start(&fake, &cfg).await;
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (ok, failed, stop) = (ok.clone(), failed.clone(), stop.clone());
        let url = old.url("/cgi-bin/message/template/send");
        tokio::spawn(async move {
            let c = client();
            while !stop.load(Ordering::Relaxed) {
                match c.post(&url).body(TEMPLATE).send().await {
                    Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    Ok(r) => panic!("status {}", r.status()),
                    Err(e) => {
                        eprintln!("request failed during the upgrade: {e:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let new = old.start_upgrade();
    tokio::time::sleep(Duration::from_millis(500)).await;
    old.signal("QUIT");
    let exited = tokio::task::spawn_blocking(move || {
        let s = old.wait_exit(Duration::from_secs(20));
        (s, old)
    })
    .await
    .unwrap();
    assert!(
        exited.0.is_some(),
        "the old process never exited: {}",
        exited.1.log()
    );
    let before = ok.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let after = ok.load(Ordering::Relaxed);
    assert!(
        after > before,
        "the new process serves after the old one left: {}",
        new.log()
    );
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during the hand-over"
    );
    assert!(after > 100, "{after} requests");
    assert_eq!(fake.stats().await["messages"].as_u64().unwrap(), after);
}
