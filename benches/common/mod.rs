//! Shared by the load harnesses: the real binary as fake WeChat, sidecars
//! and redis-server, on free loopback ports, killed on drop.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_wxsidecar");

/// The sidecar under test: `SIDECAR_BIN` (an older build, to compare), or
/// this build. The fake WeChat is always this build.
pub fn sidecar_bin() -> String {
    std::env::var("SIDECAR_BIN")
        .ok()
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| BIN.to_string())
}

pub fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the fake over TLS; returns it, its port and its CA file.
pub fn fake(dir: &Path, args: &[&str]) -> (Proc, u16, PathBuf) {
    let ca = dir.join("fake-ca.pem");
    let mut child = Command::new(BIN)
        .args(["fake-wechat", "--listen", "127.0.0.1:0", "--ca-out"])
        .arg(&ca)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    let port = line.trim().rsplit(':').next().unwrap().parse().unwrap();
    (Proc(child), port, ca)
}

/// Starts a sidecar with `body` after fresh listen/admin lines; returns it,
/// its app port and its admin port, once `/readyz` answers 200.
pub async fn sidecar(dir: &Path, name: &str, body: &str) -> (Proc, u16, u16) {
    let (port, admin) = (free_port(), free_port());
    let cfg = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &cfg,
        format!("listen: 127.0.0.1:{port}\nadmin_listen: 127.0.0.1:{admin}\n{body}"),
    )
    .unwrap();
    let child = Command::new(sidecar_bin())
        .args(["run", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let http = http();
    // Generous: start-up fetches a token per account (10,000 in benches/scale.rs).
    let deadline = Instant::now() + Duration::from_secs(180);
    while http
        .get(format!("http://127.0.0.1:{admin}/readyz"))
        .send()
        .await
        .map(|r| r.status() != 200)
        .unwrap_or(true)
    {
        assert!(
            Instant::now() < deadline,
            "sidecar {name} never became ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (Proc(child), port, admin)
}

/// A redis-server on a free port, no persistence.
pub async fn redis() -> (Proc, u16) {
    let port = free_port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server (make install-deps)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "redis-server did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (Proc(child), port)
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(64)
        .build()
        .unwrap()
}

pub fn https(ca: &Path) -> reqwest::Client {
    let pem = std::fs::read(ca).unwrap();
    reqwest::Client::builder()
        .no_proxy()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .build()
        .unwrap()
}

pub async fn json(c: &reqwest::Client, url: String) -> serde_json::Value {
    c.get(url).send().await.unwrap().json().await.unwrap()
}
