//! Load harness for the shared token store (issue 4's measurement): 1, 3 and
//! 5 replicas sharing one Redis, steady load through all of them for 10
//! token lifetimes, classic and stable. Prints the token fetches the fake saw
//! and the errors clients saw.
//!
//! `cargo bench --bench replicas` (env: TTL seconds, default 3; REFRESH_MS,
//! default 500; REPLICAS, default "1,3,5"). Loopback only; each run is
//! bounded to 10 lifetimes.

// Benchmarks time real work: the wall clock is theirs.
#![allow(clippy::disallowed_types)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const APPID: &str = "wxload0000000001";
const SECRET: &str = "load-secret";

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let ttl: u64 = env_or("TTL", 3);
    let refresh_ms: u64 = env_or("REFRESH_MS", 500);
    let replicas: Vec<usize> = env_or("REPLICAS", "1,3,5".to_string())
        .split(',')
        .filter_map(|n| n.parse().ok())
        .collect();
    println!(
        "| token API | replicas | lifetimes | sends | client errors | token fetches at the fake |"
    );
    println!("|---|---|---|---|---|---|");
    for api in ["classic", "stable"] {
        for &n in &replicas {
            let (sends, errors, fetches, cycles) = run(api, n, ttl, refresh_ms).await;
            println!("| {api} | {n} | {cycles} | {sends} | {errors} | {fetches} |");
        }
    }
}

async fn run(api: &str, replicas: usize, ttl: u64, refresh_ms: u64) -> (u64, u64, u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let (_redis, rport) = redis().await;
    let (_fake, fport, ca) = fake(
        dir.path(),
        &[
            "--token-ttl",
            &ttl.to_string(),
            "--app",
            &format!("{APPID}:{SECRET}"),
        ],
    );
    let body = format!(
        "upstream:\n  url: https://localhost:{fport}\n  ca_file: {}\ntoken:\n  store: redis://127.0.0.1:{rport}/0\n  refresh_before: {refresh_ms}ms\naccounts:\n  - name: load\n    appid: {APPID}\n    secret: {SECRET}\n    token_api: {api}\n",
        ca.display()
    );
    let mut sides = Vec::new();
    for i in 0..replicas {
        sides.push(sidecar(dir.path(), &format!("r{i}"), &body).await);
    }
    // One fetch at start, then one per cycle (ttl - refresh_before): run 9.5
    // cycles so 10 tokens are used.
    let cycle = Duration::from_secs(ttl) - Duration::from_millis(refresh_ms);
    let end = Instant::now() + cycle.mul_f64(9.5);
    let http = http();
    let (mut sends, mut errors) = (0u64, 0u64);
    while Instant::now() < end {
        for (_, port, _) in &sides {
            let v: Value = http
                .post(format!(
                    "http://127.0.0.1:{port}/cgi-bin/message/template/send"
                ))
                .body(r#"{"touser":"o","template_id":"t"}"#)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap_or(Value::Null);
            sends += 1;
            if v["errcode"] != 0 {
                errors += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let stats = json(
        &https(&ca),
        format!("https://localhost:{fport}/__fake/stats"),
    )
    .await;
    let fetches = stats["token_fetches"][APPID].as_u64().unwrap_or(0)
        + stats["stable_token_fetches"][APPID].as_u64().unwrap_or(0);
    (sends, errors, fetches, 10)
}
