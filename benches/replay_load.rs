//! Load harness for token replay (issue 3's measurement): N template sends
//! from concurrent clients while the fake revokes the account's tokens K
//! times and resets a share of connections. Prints what the clients saw,
//! the token fetches, and the duplicates the fake recorded.
//!
//! `cargo bench --bench replay_load` (defaults: 10,000 sends, 20
//! revocations, 2.5% resets before and 2.5% after the send takes effect).
//! Override with env: SENDS, INVALIDATIONS, RESET_BEFORE, RESET_AFTER, CLIENTS.
//! Loopback only; bounded by the send count and a 5-minute cap.

// Benchmarks time real work: the wall clock is theirs.
#![allow(clippy::disallowed_types)]

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const APPID: &str = "wxload0000000001";
const SECRET: &str = "load-secret";

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` and test discovery
    }
    let sends: u64 = env_or("SENDS", 10_000);
    let invalidations: u64 = env_or("INVALIDATIONS", 20);
    let reset_before: f64 = env_or("RESET_BEFORE", 0.025);
    let reset_after: f64 = env_or("RESET_AFTER", 0.025);
    let clients: u64 = env_or("CLIENTS", 8);

    let dir = tempfile::tempdir().unwrap();
    let faults = format!(
        r#"{{"seed":42,"rules":[{{"path":"/cgi-bin/message/template/send","reset_before_rate":{reset_before},"reset_after_rate":{reset_after}}}]}}"#
    );
    let (_fake, fport, ca) = fake(
        dir.path(),
        &["--app", &format!("{APPID}:{SECRET}"), "--faults", &faults],
    );
    let body = format!(
        "upstream:\n  url: https://localhost:{fport}\n  ca_file: {}\naccounts:\n  - name: load\n    appid: {APPID}\n    secret: {SECRET}\n    token_api: classic\n",
        ca.display()
    );
    let (_side, port, admin) = sidecar(dir.path(), "load", &body).await;
    let http = http();
    let https = https(&ca);

    let next = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let token_errors = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let other = Arc::new(AtomicU64::new(0));
    let cap = Instant::now() + Duration::from_secs(300);
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..clients {
        let (http, next, ok, token_errors, failed, other) = (
            http.clone(),
            next.clone(),
            ok.clone(),
            token_errors.clone(),
            failed.clone(),
            other.clone(),
        );
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= sends || Instant::now() > cap {
                    break;
                }
                let body = format!(
                    r#"{{"touser":"oUSER","template_id":"TPL","client_msg_id":"load-{i}"}}"#
                );
                let r = http
                    .post(format!(
                        "http://127.0.0.1:{port}/cgi-bin/message/template/send"
                    ))
                    .body(body)
                    .send()
                    .await;
                let Ok(r) = r else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let status = r.status().as_u16();
                let v: Value = r.json().await.unwrap_or(Value::Null);
                match (status, v["errcode"].as_i64()) {
                    (200, Some(0)) => ok.fetch_add(1, Ordering::Relaxed),
                    (_, Some(40001 | 40014 | 42001)) => {
                        token_errors.fetch_add(1, Ordering::Relaxed)
                    }
                    (502 | 504, _) => failed.fetch_add(1, Ordering::Relaxed),
                    _ => other.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    // Revoke the account's tokens INVALIDATIONS times, evenly over the run.
    let mut done_invalidations = 0;
    while done_invalidations < invalidations && Instant::now() < cap {
        let progress = next.load(Ordering::Relaxed);
        if progress >= (done_invalidations + 1) * sends / (invalidations + 1) {
            https
                .post(format!(
                    "https://localhost:{fport}/__fake/invalidate?appid={APPID}"
                ))
                .send()
                .await
                .unwrap();
            done_invalidations += 1;
        }
        if progress >= sends {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for w in workers {
        w.await.unwrap();
    }
    let elapsed = start.elapsed();
    let stats = json(&https, format!("https://localhost:{fport}/__fake/stats")).await;
    let status = json(&http, format!("http://127.0.0.1:{admin}/status")).await;
    let acc = &status["accounts"][0];
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| sends | {sends} from {clients} clients in {:.1} s |",
        elapsed.as_secs_f64()
    );
    println!("| revocations by an outsider | {done_invalidations} |");
    println!(
        "| injected resets | {:.1}% before the send takes effect, {:.1}% after |",
        reset_before * 100.0,
        reset_after * 100.0
    );
    println!("| answered OK | {} |", ok.load(Ordering::Relaxed));
    println!(
        "| token errors seen by clients | {} |",
        token_errors.load(Ordering::Relaxed)
    );
    println!(
        "| 502/504 seen by clients (resets; never resent) | {} |",
        failed.load(Ordering::Relaxed)
    );
    println!("| other answers | {} |", other.load(Ordering::Relaxed));
    println!(
        "| token fetches at the fake | {} |",
        stats["token_fetches"][APPID]
    );
    println!(
        "| replays ok / failed | {} / {} |",
        acc["replays_ok"], acc["replays_failed"]
    );
    println!("| messages recorded by the fake | {} |", stats["messages"]);
    println!(
        "| duplicate client_msg_id at the fake | {} |",
        stats["duplicate_messages"]
    );
}
