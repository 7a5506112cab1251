//! Behaviour under change (issue 6, C):
//! 1. p99 during token refreshes under steady load vs steady state: the
//!    token endpoint takes 300 ms and a refresh is forced every second; the
//!    request path must not stall behind it.
//! 2. Cost per request and RSS with 1, 100 and 10,000 configured accounts
//!    (requests spread over the accounts by `X-Wx-Account`).
//!
//! `cargo bench --bench scale` (env: DURATION=5, CLIENTS=16, ACCOUNTS="1,100,10000",
//! PARTS="refresh,accounts" (add `platform` for N=AUTHORIZERS authorisers of
//! a third-party platform, 10,000 by default), SIDECAR_BIN=an older
//! wxsidecar to compare).
//! Loopback only (plain HTTP fake: the point is the sidecar's own cost).

// Benchmarks time real work: the wall clock is theirs.
#![allow(clippy::disallowed_types)]

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use parking_lot::Mutex;

const BODY: &str =
    r#"{"touser":"oUSER123","template_id":"TPL_ORDER","data":{"first":{"value":"shipped"}}}"#;

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    if v.is_empty() {
        return 0.0;
    }
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1].as_secs_f64() * 1e3
}

fn proc_stat(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let f: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (ticks, rss)
}

/// Steady load for `secs`; returns (latency, start offset) per request.
async fn load(port: u16, accounts: usize, clients: usize, secs: u64) -> Vec<(Duration, Duration)> {
    load_as(port, accounts, clients, secs, |i| format!("a{i}")).await
}

/// [`load`] naming account `i` by `name(i)`.
async fn load_as(
    port: u16,
    accounts: usize,
    clients: usize,
    secs: u64,
    name: fn(usize) -> String,
) -> Vec<(Duration, Duration)> {
    let out = Arc::new(Mutex::new(Vec::new()));
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for w in 0..clients {
        let out = out.clone();
        tasks.push(tokio::spawn(async move {
            let c = http();
            let mut i = w;
            while Instant::now() < end {
                let start = Instant::now();
                let r = c
                    .post(format!(
                        "http://127.0.0.1:{port}/cgi-bin/message/template/send"
                    ))
                    .header("X-Wx-Account", name(i % accounts))
                    .body(BODY)
                    .send()
                    .await;
                if let Ok(r) = r {
                    let _ = r.bytes().await;
                }
                out.lock().push((start.elapsed(), start - t0));
                i += clients;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let v = std::mem::take(&mut *out.lock());
    v
}

fn accounts_yaml(n: usize) -> String {
    let mut s = String::from("accounts:\n");
    for i in 0..n {
        s.push_str(&format!(
            "  - name: a{i}\n    appid: wxs{i:013}\n    secret: s{i}\n    default: {}\n",
            i == 0
        ));
    }
    s
}

/// How long the many-accounts runs wait after start before measuring.
const SETTLE_SECS: u64 = 15;

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let secs: u64 = env_or("DURATION", 5);
    let clients: usize = env_or("CLIENTS", 16);
    let counts: Vec<usize> = env_or("ACCOUNTS", "1,100,10000".to_string())
        .split(',')
        .filter_map(|n| n.parse().ok())
        .collect();

    let parts: String = env_or("PARTS", "refresh,accounts".to_string());

    // 1. Refresh under load.
    if parts.contains("refresh") {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("apps"), "wxs0000000000000:s0\n").unwrap();
        let apps = dir.path().join("apps");
        let (_fake, fport, _) = fake(
            dir.path(),
            &[
                "--plain",
                "--token-latency-ms",
                "300",
                "--apps-file",
                apps.to_str().unwrap(),
            ],
        );
        let body = format!(
            "upstream:\n  url: http://127.0.0.1:{fport}\n{}",
            accounts_yaml(1)
        );
        let (_side, port, admin) = sidecar(dir.path(), "refresh", &body).await;
        let mut steady: Vec<Duration> = load(port, 1, clients, secs)
            .await
            .into_iter()
            .map(|x| x.0)
            .collect();
        let refreshing = Arc::new(AtomicBool::new(true));
        let windows = Arc::new(Mutex::new(Vec::new()));
        let refresher = {
            let (refreshing, windows) = (refreshing.clone(), windows.clone());
            tokio::spawn(async move {
                let c = http();
                let t0 = Instant::now();
                while refreshing.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(700)).await;
                    let start = t0.elapsed();
                    let _ = c
                        .post(format!("http://127.0.0.1:{admin}/refresh?account=a0"))
                        .send()
                        .await;
                    windows.lock().push((start, t0.elapsed()));
                }
            })
        };
        let during = load(port, 1, clients, secs).await;
        refreshing.store(false, Ordering::Relaxed);
        refresher.await.unwrap();
        let w = windows.lock().clone();
        let (mut inside, mut all): (Vec<Duration>, Vec<Duration>) = (Vec::new(), Vec::new());
        for (lat, at) in &during {
            all.push(*lat);
            if w.iter().any(|(s, e)| at >= s && at <= e) {
                inside.push(*lat);
            }
        }
        println!("**Token refreshes under load** ({clients} clients, {secs} s each; token endpoint 300 ms; {} forced refreshes)\n", w.len());
        println!("| phase | requests | p50 ms | p99 ms |");
        println!("|---|---|---|---|");
        println!(
            "| steady state | {} | {:.2} | {:.2} |",
            steady.len(),
            pct(&mut steady, 0.5),
            pct(&mut steady, 0.99)
        );
        println!(
            "| with refreshes, all requests | {} | {:.2} | {:.2} |",
            all.len(),
            pct(&mut all, 0.5),
            pct(&mut all, 0.99)
        );
        println!(
            "| with refreshes, started while a refresh was in flight | {} | {:.2} | {:.2} |\n",
            inside.len(),
            pct(&mut inside, 0.5),
            pct(&mut inside, 0.99)
        );
    }

    // 2. Many accounts.
    if parts.contains("accounts") {
        configured_accounts(&counts, clients, secs).await;
    }
    // 3. A platform with many authorisers.
    if parts.contains("platform") {
        let n: usize = env_or("AUTHORIZERS", 10_000);
        platform(n, clients, secs).await;
    }
}

fn authorizer(i: usize) -> String {
    format!("wxcustomer{i:07}")
}

/// A third-party platform whose `n` authorisers the sidecar learns at once
/// (`POST /platform/resync`, as after lost refresh tokens): what knowing
/// them costs, then the first request of each (its token fetched on first
/// use), what holding them all in use costs, and a request's cost spread
/// over them.
async fn platform(n: usize, clients: usize, secs: u64) {
    const KEY: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";
    let dir = tempfile::tempdir().unwrap();
    let spec = format!("wxbenchcomponent:cs:ptok:{KEY}");
    let (_fake, fport, _) = fake(dir.path(), &["--plain", "--platform", &spec]);
    let admin_fake = |path: String| async move {
        http()
            .post(format!("http://127.0.0.1:{fport}{path}"))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
    };
    // The authorisers exist at WeChat before the sidecar hears of them.
    for i in 0..n {
        admin_fake(format!("/__fake/authorize?authorizer={}", authorizer(i))).await;
    }
    let body = format!(
        "upstream:\n  url: http://127.0.0.1:{fport}\n  read_timeout: 60s\nplatforms:\n  - {{name: bench, component_appid: wxbenchcomponent, component_secret: cs, token: ptok, encoding_aes_key: {KEY}}}\n"
    );
    let (side, port, admin) = sidecar(dir.path(), "platform", &body).await;
    let pid = side.0.id();
    admin_fake(format!(
        "/__fake/platform-callback?url=http://127.0.0.1:{port}/wxsidecar/platform/bench/callback"
    ))
    .await;
    // Wait for the component token (the ticket was just pushed).
    tokio::time::sleep(Duration::from_secs(2)).await;
    tokio::time::sleep(Duration::from_secs(SETTLE_SECS)).await;
    let (_, rss_before) = proc_stat(pid);
    let started = Instant::now();
    let r = http()
        .post(format!(
            "http://127.0.0.1:{admin}/platform/resync?name=bench"
        ))
        .send()
        .await
        .unwrap();
    assert!(
        r.status().is_success(),
        "resync: {}",
        r.text().await.unwrap()
    );
    let resync = started.elapsed();
    tokio::time::sleep(Duration::from_secs(SETTLE_SECS)).await;
    let (_, rss_known) = proc_stat(pid);

    // The first request of every authoriser: each waits for its token.
    let started = Instant::now();
    let firsts = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let mut tasks = Vec::new();
    for w in 0..clients {
        let firsts = firsts.clone();
        tasks.push(tokio::spawn(async move {
            let c = http();
            for i in (w..n).step_by(clients) {
                let t = Instant::now();
                let r = c
                    .post(format!(
                        "http://127.0.0.1:{port}/cgi-bin/message/template/send"
                    ))
                    .header("X-Wx-Account", authorizer(i))
                    .body(BODY)
                    .send()
                    .await
                    .unwrap();
                assert!(
                    r.status().is_success(),
                    "first request of {}",
                    authorizer(i)
                );
                firsts.lock().push(t.elapsed());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let all_in = started.elapsed();
    let mut firsts = std::mem::take(&mut *firsts.lock());
    tokio::time::sleep(Duration::from_secs(SETTLE_SECS)).await;
    let (t_before, rss_in_use) = proc_stat(pid);
    let mut lat: Vec<Duration> = load_as(port, n, clients, secs, authorizer)
        .await
        .into_iter()
        .map(|x| x.0)
        .collect();
    let (t_after, rss_after) = proc_stat(pid);
    let cpu_us = (t_after - t_before) as f64 / 100.0 * 1e6 / lat.len().max(1) as f64;
    let per = |rss: u64| (rss as f64 - rss_before as f64) * 1024.0 / n as f64;
    println!("\n**A platform's authorisers** ({clients} clients; the steady load {secs} s, requests spread over every authoriser by X-Wx-Account)\n");
    println!("| authorisers | resync s | RSS before MiB | known: RSS settled MiB | known: bytes each | first request of each: all done s | p99 ms | in use: RSS settled MiB | in use: bytes each | req/s | p99 ms | CPU µs / request | RSS after load MiB |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {n} | {:.2} | {:.1} | {:.1} | {:.0} | {:.2} | {:.1} | {:.1} | {:.0} | {:.0} | {:.2} | {:.0} | {:.1} |",
        resync.as_secs_f64(),
        rss_before as f64 / 1024.0,
        rss_known as f64 / 1024.0,
        per(rss_known),
        all_in.as_secs_f64(),
        pct(&mut firsts, 0.99),
        rss_in_use as f64 / 1024.0,
        per(rss_in_use),
        lat.len() as f64 / secs as f64,
        pct(&mut lat, 0.99),
        cpu_us,
        rss_after as f64 / 1024.0,
    );
}

async fn configured_accounts(counts: &[usize], clients: usize, secs: u64) {
    println!("**Configured accounts** ({clients} clients, {secs} s, requests spread over every account by X-Wx-Account)\n");
    println!("| accounts | req/s | p99 ms | CPU µs / request | RSS at ready MiB | RSS settled MiB | RSS after load MiB | start-up s |");
    println!("|---|---|---|---|---|---|---|---|");
    for &n in counts {
        let dir = tempfile::tempdir().unwrap();
        let apps: String = (0..n).map(|i| format!("wxs{i:013}:s{i}\n")).collect();
        std::fs::write(dir.path().join("apps"), apps).unwrap();
        let apps = dir.path().join("apps");
        let (_fake, fport, _) = fake(
            dir.path(),
            &["--plain", "--apps-file", apps.to_str().unwrap()],
        );
        let body = format!(
            "upstream:\n  url: http://127.0.0.1:{fport}\n  read_timeout: 60s\n{}",
            accounts_yaml(n)
        );
        let started = Instant::now();
        let (side, port, _) = sidecar(dir.path(), "many", &body).await;
        let startup = started.elapsed();
        let pid = side.0.id();
        let (_, rss_ready) = proc_stat(pid);
        // What a start leaves behind is given back within jemalloc's decay
        // (10 s): "settled" is what the accounts themselves hold.
        tokio::time::sleep(Duration::from_secs(SETTLE_SECS)).await;
        let (t_before, rss_idle) = proc_stat(pid);
        let mut lat: Vec<Duration> = load(port, n, clients, secs)
            .await
            .into_iter()
            .map(|x| x.0)
            .collect();
        let (t_after, rss_after) = proc_stat(pid);
        let hz = 100.0; // USER_HZ on Linux
        let cpu_us = (t_after - t_before) as f64 / hz * 1e6 / lat.len().max(1) as f64;
        println!(
            "| {n} | {:.0} | {:.2} | {:.0} | {:.1} | {:.1} | {:.1} | {:.2} |",
            lat.len() as f64 / secs as f64,
            pct(&mut lat, 0.99),
            cpu_us,
            rss_ready as f64 / 1024.0,
            rss_idle as f64 / 1024.0,
            rss_after as f64 / 1024.0,
            startup.as_secs_f64()
        );
    }
}
