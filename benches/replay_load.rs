//! Load harness for token replay (issue 3's measurement): N template sends
//! from concurrent clients while the fake revokes the account's tokens K
//! times and resets a share of connections. Prints what the clients saw,
//! the token fetches, and the duplicates the fake recorded.
//!
//! `cargo bench --bench replay_load` (defaults: 10,000 sends, 20
//! revocations, 2.5% resets before and 2.5% after the send takes effect).
//! Override with env: SENDS, INVALIDATIONS, RESET_BEFORE, RESET_AFTER, CLIENTS.
//! Loopback only; bounded by the send count and a 5-minute cap.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_wxsidecar");
const APPID: &str = "wxload0000000001";
const SECRET: &str = "load-secret";

fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

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
    let ca = dir.path().join("ca.pem");
    let faults = format!(
        r#"{{"seed":42,"rules":[{{"path":"/cgi-bin/message/template/send","reset_before_rate":{reset_before},"reset_after_rate":{reset_after}}}]}}"#
    );
    let mut fake = Command::new(BIN)
        .args([
            "fake-wechat",
            "--listen",
            "127.0.0.1:0",
            "--app",
            &format!("{APPID}:{SECRET}"),
            "--faults",
            &faults,
            "--ca-out",
        ])
        .arg(&ca)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(fake.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    let _fake = Kill(fake);
    let fport: u16 = line.trim().rsplit(':').next().unwrap().parse().unwrap();

    let (port, admin) = (free_port(), free_port());
    let cfg = dir.path().join("c.yaml");
    std::fs::write(
        &cfg,
        format!(
            "listen: 127.0.0.1:{port}\nadmin_listen: 127.0.0.1:{admin}\nupstream:\n  url: https://localhost:{fport}\n  ca_file: {}\naccounts:\n  - name: load\n    appid: {APPID}\n    secret: {SECRET}\n    token_api: classic\n",
            ca.display()
        ),
    )
    .unwrap();
    let side = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _side = Kill(side);

    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap();
    let pem = std::fs::read(&ca).unwrap();
    let https = reqwest::Client::builder()
        .no_proxy()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while http
        .get(format!("http://127.0.0.1:{admin}/readyz"))
        .send()
        .await
        .map(|r| r.status() != 200)
        .unwrap_or(true)
    {
        assert!(Instant::now() < deadline, "sidecar never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

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
    let stats: Value = https
        .get(format!("https://localhost:{fport}/__fake/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let status: Value = http
        .get(format!("http://127.0.0.1:{admin}/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
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
