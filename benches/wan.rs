//! Push latency over an emulated WAN (issue 6, table A): a TCP relay delays
//! every chunk by half the RTT in each direction (order preserved) between
//! the clients and the fake WeChat over TLS; the fake's token endpoint takes
//! 300 ms, its send endpoint a few ms. Four clients send template messages,
//! one at a time and then 16 in parallel:
//!   1. naive: a new connection per request, a token fetched before every push;
//!   2. a pooled client, a token fetched before every push;
//!   3. a pooled client with its own token cache;
//!   4. plain HTTP to wxsidecar on loopback, no token (the sidecar behind the relay);
//!   5. the same with `upstream.http2: true` (one multiplexed connection).
//!
//! `cargo bench --bench wan` (env: RTT_MS=40, TOKEN_MS=300, PUSHES=30,
//! PARALLEL_PUSHES=64). Loopback only; every run is bounded by its push count.

// Benchmarks time real work: the wall clock is theirs.
#![allow(clippy::disallowed_types)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const APPID: &str = "wxwan00000000001";
const SECRET: &str = "wan-secret";
const BODY: &str = r#"{"touser":"oUSER123","template_id":"TPL_ORDER_SHIPPED","url":"https://example.com/o/1","data":{"first":{"value":"Your order has shipped"},"keyword1":{"value":"SF1234567890"},"remark":{"value":"Thanks"}}}"#;

/// Copies `from` to `to`, delivering each chunk `delay` after it was read.
async fn delayed_copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Duration,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at.into()).await;
            if to.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx
                    .send((Instant::now() + delay, buf[..n].to_vec()))
                    .is_err()
                {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// A relay on a free port to `target`, adding `rtt` per round trip.
async fn relay(target: u16, rtt: Duration) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
                    return;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::join!(delayed_copy(cr, sw, rtt / 2), delayed_copy(sr, cw, rtt / 2));
            });
        }
    });
    port
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Naive,
    PooledFetch,
    PooledCache,
    Sidecar,
    SidecarH2,
}

struct Env {
    relay: u16,
    sidecar: u16,
    sidecar_h2: u16,
    ca: Vec<u8>,
}

fn https_client(env: &Env, pooled: bool) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .no_proxy()
        .add_root_certificate(reqwest::Certificate::from_pem(&env.ca).unwrap());
    if !pooled {
        b = b.pool_max_idle_per_host(0);
    }
    b.build().unwrap()
}

async fn fetch_token(c: &reqwest::Client, env: &Env) -> String {
    let v = json(
        c,
        format!(
            "https://localhost:{}/cgi-bin/token?grant_type=client_credential&appid={APPID}&secret={SECRET}",
            env.relay
        ),
    )
    .await;
    v["access_token"].as_str().unwrap().to_string()
}

/// One push; returns its latency and whether WeChat said ok.
async fn push(kind: Kind, c: &reqwest::Client, env: &Env, cached: &str) -> (Duration, bool) {
    let start = Instant::now();
    let url = match kind {
        Kind::Sidecar => format!(
            "http://127.0.0.1:{}/cgi-bin/message/template/send",
            env.sidecar
        ),
        Kind::SidecarH2 => format!(
            "http://127.0.0.1:{}/cgi-bin/message/template/send",
            env.sidecar_h2
        ),
        Kind::PooledCache => format!(
            "https://localhost:{}/cgi-bin/message/template/send?access_token={cached}",
            env.relay
        ),
        Kind::Naive | Kind::PooledFetch => {
            let t = fetch_token(c, env).await;
            format!(
                "https://localhost:{}/cgi-bin/message/template/send?access_token={t}",
                env.relay
            )
        }
    };
    let v: Value = c
        .post(url)
        .body(BODY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    (start.elapsed(), v["errcode"] == 0)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

async fn run(kind: Kind, env: Arc<Env>, pushes: usize, parallel: usize) -> (Vec<Duration>, usize) {
    let client = match kind {
        Kind::Naive => https_client(&env, false),
        Kind::PooledFetch | Kind::PooledCache => https_client(&env, true),
        Kind::Sidecar | Kind::SidecarH2 => http(),
    };
    let cached = if kind == Kind::PooledCache {
        fetch_token(&client, &env).await
    } else {
        String::new()
    };
    // Warm the pooled clients' connections (not counted).
    if kind != Kind::Naive {
        push(kind, &client, &env, &cached).await;
    }
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..parallel {
        let (client, env, cached, next) =
            (client.clone(), env.clone(), cached.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < pushes {
                out.push(push(kind, &client, &env, &cached).await);
            }
            out
        }));
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        for (d, ok) in t.await.unwrap() {
            lat.push(d);
            errors += usize::from(!ok);
        }
    }
    lat.sort();
    (lat, errors)
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rtt = Duration::from_millis(env_or("RTT_MS", 40));
    let token_ms: u64 = env_or("TOKEN_MS", 300);
    let pushes: usize = env_or("PUSHES", 30);
    let parallel_pushes: usize = env_or("PARALLEL_PUSHES", 64);
    let dir = tempfile::tempdir().unwrap();
    let (_fake, fport, ca) = fake(
        dir.path(),
        &[
            "--app",
            &format!("{APPID}:{SECRET}"),
            "--token-latency-ms",
            &token_ms.to_string(),
            "--latency-ms",
            "3",
            "--h2",
        ],
    );
    let relay_port = relay(fport, rtt).await;
    let body = format!(
        "upstream:\n  url: https://localhost:{relay_port}\n  http2: false\n  ca_file: {}\naccounts:\n  - name: wan\n    appid: {APPID}\n    secret: {SECRET}\n",
        ca.display()
    );
    let (_side, sport, sadmin) = sidecar(dir.path(), "wan", &body).await;
    // Row 4 is HTTP/1.1 whatever the default; row 5 the same with h2.
    let body_h2 = body.replace("  http2: false\n", "  http2: true\n");
    let (_side_h2, sport_h2, sadmin_h2) = sidecar(dir.path(), "wan-h2", &body_h2).await;
    let env = Arc::new(Env {
        relay: relay_port,
        sidecar: sport,
        sidecar_h2: sport_h2,
        ca: std::fs::read(&ca).unwrap(),
    });
    println!("RTT {} ms (relay), token endpoint {token_ms} ms, send endpoint 3 ms; TLS 1.3 to the fake\n", rtt.as_millis());
    for (label, parallel, n) in [
        ("one at a time", 1, pushes),
        ("16 in parallel", 16, parallel_pushes),
    ] {
        println!("**{label}** ({n} pushes)\n");
        println!("| client | p50 ms | p90 ms | p99 ms | errors | p50 / row 4 | p99 / row 4 |");
        println!("|---|---|---|---|---|---|---|");
        let kinds = [
            (Kind::Naive, "1. naive: new connection, token per push"),
            (Kind::PooledFetch, "2. pooled, token per push"),
            (Kind::PooledCache, "3. pooled, own token cache"),
            (Kind::Sidecar, "4. wxsidecar on loopback, no token"),
            (Kind::SidecarH2, "5. wxsidecar, `upstream.http2: true`"),
        ];
        let mut rows = Vec::new();
        for (kind, name) in kinds {
            let (lat, errors) = run(kind, env.clone(), n, parallel).await;
            rows.push((
                name,
                pct(&lat, 0.5),
                pct(&lat, 0.9),
                pct(&lat, 0.99),
                errors,
            ));
        }
        let (_, b50, _, b99, _) = rows[3];
        for (name, p50, p90, p99, errors) in rows {
            println!(
                "| {name} | {:.1} | {:.1} | {:.1} | {errors} | {:.1}× | {:.1}× |",
                p50.as_secs_f64() * 1e3,
                p90.as_secs_f64() * 1e3,
                p99.as_secs_f64() * 1e3,
                p50.as_secs_f64() / b50.as_secs_f64(),
                p99.as_secs_f64() / b99.as_secs_f64()
            );
        }
        println!();
    }
    // What each sidecar holds open to WeChat after both tables.
    let c = http();
    println!("| sidecar | upstream protocol | connections opened | HTTP/2 connections open |");
    println!("|---|---|---|---|");
    for (name, admin) in [
        ("row 4 (HTTP/1.1)", sadmin),
        ("row 5 (http2: true)", sadmin_h2),
    ] {
        let st = json(&c, format!("http://127.0.0.1:{admin}/status")).await;
        let h = &st["upstream"]["hosts"][0];
        println!(
            "| {name} | {} | {} | {} |",
            h["protocol"].as_str().unwrap_or("?"),
            h["connections_opened"],
            h["h2_connections_open"]
        );
    }
}
