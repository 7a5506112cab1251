//! What a hostile client can hold, and what the admin listener lets anyone
//! do: connection caps, head, idle and body deadlines, the admin token, and
//! forced refreshes that can never burn the day's budget.

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::raw::*;
use crate::support::*;

const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef";

/// Waits until the app listener holds `n` connections.
async fn wait_open(side: &Sidecar, n: f64) {
    let deadline = Instant::now() + WAIT;
    while side
        .metric(r#"wxsidecar_connections_open{listener="app"}"#)
        .await
        != n
    {
        assert!(Instant::now() < deadline, "never {n} open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `n` connections, opened 3 ms apart (so each has its own idle time),
/// each after writing `first` (nothing when empty) and reading `answered`
/// answers.
fn connections(port: u16, n: usize, first: &[u8], answered: bool) -> Vec<TcpStream> {
    (0..n)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
            if !first.is_empty() {
                s.write_all(first).unwrap();
            }
            if answered {
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut buf = [0u8; 4096];
                let n = std::io::Read::read(&mut s, &mut buf).unwrap();
                assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
            }
            std::thread::sleep(Duration::from_millis(3));
            s
        })
        .collect()
}

/// A full listener makes room as nginx does: a newcomer closes the
/// connection idle longest (one that sent nothing yet, or one kept alive
/// between requests), never one inside a request; only when every
/// connection is inside a request is the newcomer refused, and those
/// requests finish.
#[tokio::test]
async fn a_full_listener_closes_the_connection_idle_longest_for_a_newcomer() {
    const GET: &[u8] = b"GET /cgi-bin/x HTTP/1.1\r\nHost: x\r\n\r\n";
    let up = RawUpstream::start();
    let side = Sidecar::start_bare(&up.config("limits:\n  max_connections: 50\n")).await;
    wait_open(&side, 0.0).await;
    let metric = |name: &'static str| {
        let side = &side;
        async move {
            side.metric(&format!(
                r#"wxsidecar_connections_{name}_total{{listener="app"}}"#
            ))
            .await
        }
    };
    assert_eq!(metric("shed").await, 0.0, "exported from the start");
    let refused = metric("refused").await;

    // Filled with silent connections: five newcomers are served at once,
    // each in the place of the oldest.
    let mut silent = connections(side.port, 50, b"", false);
    wait_open(&side, 50.0).await;
    let newcomers = connections(side.port, 5, GET, true);
    assert_eq!(metric("shed").await, 5.0);
    for (i, s) in silent.iter_mut().enumerate().take(7) {
        assert_eq!(
            closed_within(s, Duration::from_millis(300)),
            i < 5,
            "silent connection {i}"
        );
    }
    drop((silent, newcomers));
    wait_open(&side, 0.0).await;

    // Filled with connections kept alive between requests: the same.
    let mut kept = connections(side.port, 50, GET, true);
    wait_open(&side, 50.0).await;
    let answer = exchange(
        side.port,
        b"GET /cgi-bin/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(2),
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(metric("shed").await, 6.0);
    assert!(closed_within(&mut kept[0], Duration::from_millis(300)));
    assert!(!closed_within(&mut kept[1], Duration::from_millis(300)));
    drop(kept);
    wait_open(&side, 0.0).await;

    // Filled with requests in flight (bodies still coming): the newcomer
    // is refused, and every request in flight finishes.
    let mut inflight = connections(
        side.port,
        50,
        b"POST /cgi-bin/x HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nConnection: close\r\n\r\n{}",
        false,
    );
    wait_open(&side, 50.0).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut late = TcpStream::connect(("127.0.0.1", side.port)).unwrap();
    assert!(closed_within(&mut late, Duration::from_secs(5)), "refused");
    assert_eq!(metric("refused").await - refused, 1.0);
    assert_eq!(metric("shed").await, 6.0, "none in a request was closed");
    for s in &mut inflight {
        s.write_all(b"  ").unwrap();
    }
    for s in &mut inflight {
        let answer = read_until_quiet(s, Duration::from_secs(2));
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
}

#[tokio::test]
async fn slow_heads_and_idle_connections_are_closed() {
    let up = RawUpstream::start();
    let side =
        Sidecar::start_bare(&up.config("limits:\n  header_timeout: 1s\n  idle_timeout: 3s\n"))
            .await;
    // Slowloris: a byte every 200 ms never completes the head.
    let mut slow = TcpStream::connect(("127.0.0.1", side.port)).unwrap();
    let start = Instant::now();
    slow.write_all(b"GET /cgi-bin/x HTTP/1.1\r\n").unwrap();
    let mut closed = false;
    while start.elapsed() < Duration::from_secs(10) {
        if slow.write_all(b"X").is_err() || closed_within(&mut slow, Duration::from_millis(200)) {
            closed = true;
            break;
        }
    }
    assert!(closed, "a head trickled for 10 s was never cut off");
    // A silent new connection is closed too.
    let mut silent = TcpStream::connect(("127.0.0.1", side.port)).unwrap();
    assert!(closed_within(&mut silent, Duration::from_secs(10)));

    // A kept-alive connection lives past the head deadline, then idles out.
    let mut kept = TcpStream::connect(("127.0.0.1", side.port)).unwrap();
    kept.write_all(b"GET /cgi-bin/x HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let answer = read_until_quiet(&mut kept, Duration::from_millis(500));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        !closed_within(&mut kept, Duration::from_millis(1500)),
        "idle for 1.5 s: within idle_timeout, still open"
    );
    kept.write_all(b"GET /cgi-bin/x HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let answer = read_until_quiet(&mut kept, Duration::from_millis(500));
    assert!(answer.starts_with("HTTP/1.1 200"), "reused: {answer}");
    // The idle clock restarts with each request (the connection's one timer
    // is moved on, not left at an earlier wait's end).
    assert!(
        !closed_within(&mut kept, Duration::from_secs(2)),
        "idle for 2 s after the second answer: still open"
    );
    assert!(
        closed_within(&mut kept, Duration::from_secs(10)),
        "closed after idle_timeout"
    );
}

#[tokio::test]
async fn a_trickled_body_is_answered_408() {
    let up = RawUpstream::start();
    let side = Sidecar::start_bare(&up.config("limits:\n  body_timeout: 1s\n")).await;
    for path in [
        "/cgi-bin/message/template/send",
        "/cgi-bin/media/upload?type=image",
    ] {
        let mut s = TcpStream::connect(("127.0.0.1", side.port)).unwrap();
        s.write_all(
            format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n{{").as_bytes(),
        )
        .unwrap();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(8) {
            std::thread::sleep(Duration::from_millis(300));
            if s.write_all(b" ").is_err() {
                break;
            }
        }
        let answer = read_until_quiet(&mut s, Duration::from_secs(2));
        assert!(answer.starts_with("HTTP/1.1 408"), "{path}: {answer:?}");
    }
    assert!(
        up.api_requests()
            .iter()
            .all(|r| !r.contains("template/send")),
        "an incomplete JSON body never goes upstream"
    );
}

#[tokio::test]
async fn the_admin_listener_needs_its_token_except_for_probes() {
    let up = RawUpstream::start();
    let side = Sidecar::start_bare(&up.config(&format!(
        "admin:\n  token: {ADMIN_TOKEN}\n  protect_metrics: true\n"
    )))
    .await;
    let c = client();
    for (method, path) in [
        ("GET", "/status"),
        ("GET", "/metrics"),
        ("POST", "/refresh?account=raw"),
        ("GET", "/debug/pprof/profile?seconds=1"),
    ] {
        let m: reqwest::Method = method.parse().unwrap();
        let r = c.request(m.clone(), side.admin(path)).send().await.unwrap();
        assert_eq!(r.status(), 401, "{path} without the token");
        let r = c
            .request(m.clone(), side.admin(path))
            .bearer_auth("admin-token-0123456789abcdeX")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{path} with a wrong token");
    }
    for path in ["/healthz", "/readyz"] {
        let r = c.get(side.admin(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path} stays open for the kubelet");
    }
    for path in ["/status", "/metrics"] {
        let r = c.get(side.admin(path)).bearer_auth(ADMIN_TOKEN);
        assert_eq!(
            r.send().await.unwrap().status(),
            200,
            "{path} with the token"
        );
    }
    assert!(!side.log().contains(ADMIN_TOKEN), "never logged");
    assert_eq!(
        up.token_fetches(),
        1,
        "no refresh happened without the token"
    );
}

#[tokio::test]
async fn forced_refreshes_never_burn_the_budget() {
    let fake = Fake::start(&[]);
    let side = Sidecar::start(
        &fake,
        &format!(
            "{}{}token:\n  daily_budget: 6\n  budget_reserve: 3\nadmin:\n  refresh_interval: 300ms\n",
            upstream(),
            Sidecar::accounts("classic", "stable")
        ),
    )
    .await;
    let c = client();
    let refresh = |account: &'static str| {
        let c = c.clone();
        let url = side.admin(&format!("/refresh?account={account}"));
        async move {
            let r = c.post(url).send().await.unwrap();
            let status = r.status().as_u16();
            let retry = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            (status, retry, r.json::<Value>().await.unwrap())
        }
    };
    let (status, _, v) = refresh("shop").await;
    assert_eq!(status, 200, "{v}");
    // Too soon for the same account: 429 at once, with the wait.
    let (status, retry, v) = refresh("shop").await;
    assert_eq!(status, 429, "{v}");
    assert_eq!(v["errcode"], 45011);
    assert!(
        retry.is_some_and(|s| s == "1"),
        "Retry-After in whole seconds"
    );
    // Another account has its own spacing.
    let (status, _, v) = refresh("mall").await;
    assert_eq!(status, 200, "{v}");
    // Past the spacing, another; then the reserve holds: 6 - 3 = 3 left, kept.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (status, _, v) = refresh("shop").await;
    assert_eq!(status, 200, "{v}");
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (status, _, v) = refresh("shop").await;
    assert_eq!(status, 429, "{v}");
    assert_eq!(v["errcode"], 45009);
    assert!(
        v["errmsg"].as_str().unwrap().contains("budget_reserve"),
        "{v}"
    );
    // A storm of refreshes (within max_admin_connections): every one
    // answered at once, none reaches WeChat.
    let storm: Vec<_> = (0..40).map(|_| refresh("shop")).collect();
    for (status, _, v) in futures_util::future::join_all(storm).await {
        assert_eq!(status, 429, "{v}");
    }
    assert_eq!(
        fake.fetches(SHOP_APPID).await,
        3,
        "start + two forced refreshes"
    );
    let st = side.typed_status().await;
    let shop = &st.accounts[0];
    assert_eq!(
        (shop.name.as_str(), shop.budget_left),
        ("shop", 3),
        "{shop:?}"
    );
    assert_eq!(shop.fetches_today, 3);
    // An unknown account is a 404 that names no account.
    let r = c
        .post(side.admin("/refresh?account=nobody"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let text = r.text().await.unwrap();
    assert!(!text.contains("shop") && !text.contains("mall"), "{text}");
}

#[tokio::test]
async fn under_a_low_open_file_limit_the_cap_holds_and_requests_are_served() {
    let up = RawUpstream::start();
    let dir = tempfile::tempdir().unwrap();
    let (port, admin) = (free_port(), free_port());
    let config = dir.path().join("c.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:{port}\nadmin_listen: 127.0.0.1:{admin}\n{}",
            up.config("")
        ),
    )
    .unwrap();
    // 600 files: the cap becomes 600 - 64 (admin) - 256 (reserve) = 280.
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n 600 && exec {BIN} run --config {}",
            config.display()
        ))
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("log")).unwrap())
        .spawn()
        .unwrap();
    let c = client();
    let deadline = Instant::now() + WAIT;
    while c
        .get(format!("http://127.0.0.1:{admin}/readyz"))
        .send()
        .await
        .map_or(true, |r| r.status() != 200)
    {
        assert!(Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let held: Vec<TcpStream> = (0..400)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Over the cap: the idle ones make room (the oldest closed), so a
    // newcomer is served, not left hanging.
    let answer = exchange(
        port,
        b"GET /cgi-bin/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(2),
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let metrics = c
        .get(format!("http://127.0.0.1:{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let line = metrics
        .lines()
        .find(|l| l.starts_with(r#"wxsidecar_connections_shed_total{listener="app"}"#))
        .unwrap()
        .to_string();
    let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= 100.0, "{line}");
    // A held connection is served: the upstream still gets a socket.
    let mut open = held
        .into_iter()
        .find_map(|mut s| {
            s.write_all(b"GET /cgi-bin/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .ok()?;
            let a = read_until_quiet(&mut s, Duration::from_secs(2));
            a.starts_with("HTTP/1.1 200").then_some(a)
        })
        .expect("some held connection is served");
    open.clear();
    let log = std::fs::read_to_string(dir.path().join("log")).unwrap();
    assert!(
        log.contains("open-file limit"),
        "the lowered cap is logged: {log}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// A client that asks for a large answer and stops reading is let go at
/// `limits.send_timeout`, on the fast lane (a JSON answer over the buffered
/// limit, streamed) and on pingora's path (a media download); the sidecar
/// serves others meanwhile and after.
#[tokio::test]
async fn a_client_that_stops_reading_is_let_go_at_the_send_timeout() {
    let up = RawUpstream::start();
    let side = Sidecar::start_bare(&up.config("limits:\n  send_timeout: 1s\n")).await;
    // Far more than the socket buffers between us hold (a few MiB).
    const SIZE: usize = 24 << 20;
    for target in [
        format!("/cgi-bin/big?size={SIZE}"),
        format!("/cgi-bin/media/big?media_id=1&size={SIZE}"),
    ] {
        let mut s = TcpStream::connect(("127.0.0.1", side.port)).unwrap();
        s.write_all(
            format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .unwrap();
        // Not reading: the sidecar's writes stall.
        std::thread::sleep(Duration::from_secs(3));
        let answer = exchange(
            side.port,
            b"GET /cgi-bin/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            Duration::from_secs(2),
        );
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "others are served: {answer}"
        );
        // What the buffers held, then the close.
        let mut got = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let ended = loop {
            match std::io::Read::read(&mut s, &mut buf) {
                Ok(0) => break true,
                Ok(n) => got += n,
                Err(_) => break false,
            }
        };
        assert!(ended, "{target}: the connection was closed");
        assert!(
            got < SIZE,
            "{target}: the answer was cut when the client stopped reading ({got} of {SIZE} bytes came)"
        );
    }
    assert!(
        side.log().contains("send_timeout"),
        "the fast lane says why it let the client go"
    );
}

/// The length of [`small_total`]'s template send.
const HELD: usize = 60_000;

/// A sidecar whose `limits.buffered_total` is 100 KiB (64 KiB bodies), and
/// the head and body of a [`HELD`]-byte template send that, left half sent,
/// holds most of it.
async fn small_total() -> (RawUpstream, Sidecar, String, String) {
    let up = RawUpstream::start();
    let side = Sidecar::start_bare(
        &up.config("limits:\n  buffered_body: 64KiB\n  buffered_total: 100KiB\n"),
    )
    .await;
    let head = format!(
        "POST /cgi-bin/message/template/send HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {HELD}\r\nConnection: close\r\n\r\n"
    );
    let body = format!("{{\"pad\":\"{}\"}}", "x".repeat(HELD - 10));
    assert_eq!(body.len(), HELD);
    (up, side, head, body)
}

/// Request bodies being buffered share `limits.buffered_total`: past it a
/// body is refused at once (503, retry in a second) instead of held, and
/// what a finished request held is free again.
#[tokio::test]
async fn bodies_buffered_at_once_share_a_total() {
    let (up, side, head, body) = small_total().await;
    // A body on its way holds its declared length.
    let mut first = TcpStream::connect(("127.0.0.1", side.port)).unwrap();
    first.write_all(head.as_bytes()).unwrap();
    first.write_all(&body.as_bytes()[..10]).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // A second would pass the total: refused before its body is read.
    let mut second = TcpStream::connect(("127.0.0.1", side.port)).unwrap();
    second.write_all(head.as_bytes()).unwrap();
    let answer = read_until_quiet(&mut second, Duration::from_secs(2));
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1"),
        "{answer}"
    );
    assert!(answer.contains("limits.buffered_total"), "{answer}");
    assert!(answer.contains("\"errcode\":-1"), "{answer}");
    assert_eq!(
        side.metric(r#"wxsidecar_buffered_total_spent_total{kind="request_body"}"#)
            .await,
        1.0
    );
    assert!(side.log().contains("limits.buffered_total is spent"));
    // The first completes as usual; then its share is free again.
    first.write_all(&body.as_bytes()[10..]).unwrap();
    let answer = read_until_quiet(&mut first, Duration::from_secs(2));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    drop(first);
    for _ in 0..2 {
        let answer = exchange(
            side.port,
            format!("{head}{body}").as_bytes(),
            Duration::from_secs(2),
        );
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    let sent = up
        .api_requests()
        .iter()
        .filter(|r| r.contains("template/send"))
        .count();
    assert_eq!(sent, 3, "the refused body never went upstream");
}

/// Upstream answers share `limits.buffered_total` with request bodies:
/// past it an answer is not buffered but streamed through (whole, then the
/// connection closes), so many large answers at once cannot take memory
/// without bound; with room again, it is buffered (and kept alive) as usual.
#[tokio::test]
async fn answers_past_the_shared_total_are_streamed_not_buffered() {
    let (_up, side, head, body) = small_total().await;
    let ask = b"GET /cgi-bin/big?size=50000 HTTP/1.1\r\nHost: x\r\n\r\n";
    let whole = |answer: &str| {
        let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((answer, ""));
        head.starts_with("HTTP/1.1 200") && body.len() > 50_000 && body.ends_with("\"}")
    };
    // A body on its way holds 60,000 of the 102,400 bytes.
    let mut first = TcpStream::connect(("127.0.0.1", side.port)).unwrap();
    first.write_all(head.as_bytes()).unwrap();
    first.write_all(&body.as_bytes()[..10]).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    // A 50 kB answer (under buffered_body) would pass the total: streamed.
    let mut s = TcpStream::connect(("127.0.0.1", side.port)).unwrap();
    s.write_all(ask).unwrap();
    let answer = read_until_quiet(&mut s, Duration::from_secs(2));
    assert!(whole(&answer), "{}", &answer[..answer.len().min(300)]);
    assert!(
        answer.contains("Connection: close"),
        "streamed, not buffered: {}",
        &answer[..answer.len().min(300)]
    );
    // Through pingora's session too (a chunked request body is handed
    // off): streamed, so its errcode is not read into the ledger.
    let chunked = b"POST /cgi-bin/big?size=50000&errcode=45009 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n2\r\n{}\r\n0\r\n\r\n";
    let answer = exchange(side.port, chunked, Duration::from_secs(2));
    assert!(whole(&answer), "{}", &answer[..answer.len().min(300)]);
    assert_eq!(ledger_errors(&side).await, 0, "streamed: errcode not read");
    assert_eq!(
        side.metric(r#"wxsidecar_buffered_total_spent_total{kind="answer"}"#)
            .await,
        2.0,
        "both streamed answers counted"
    );
    assert!(side.log().contains("limits.buffered_total is spent"));
    // Another body on its way leaves 2,400 bytes: a 5 kB answer is still
    // buffered (an answer under 16 KiB always is, so its errcode is read).
    let mut second = TcpStream::connect(("127.0.0.1", side.port)).unwrap();
    second
        .write_all(head.replace(&HELD.to_string(), "40000").as_bytes())
        .unwrap();
    second.write_all(b"{").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut s = TcpStream::connect(("127.0.0.1", side.port)).unwrap();
    s.write_all(b"GET /cgi-bin/big?size=5000 HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let answer = read_until_quiet(&mut s, Duration::from_millis(500));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        !answer.contains("Connection: close"),
        "a small answer is buffered: {answer}"
    );
    drop(second);
    // With the body done and its share free, the answer is buffered again.
    first.write_all(&body.as_bytes()[10..]).unwrap();
    let done = read_until_quiet(&mut first, Duration::from_secs(2));
    assert!(done.starts_with("HTTP/1.1 200"), "{done}");
    drop(first);
    let mut s = TcpStream::connect(("127.0.0.1", side.port)).unwrap();
    s.write_all(ask).unwrap();
    let answer = read_until_quiet(&mut s, Duration::from_millis(500));
    assert!(whole(&answer), "{}", &answer[..answer.len().min(300)]);
    assert!(
        !answer.contains("Connection: close"),
        "buffered and kept alive: {}",
        &answer[..answer.len().min(300)]
    );
    let answer = exchange(side.port, chunked, Duration::from_secs(2));
    assert!(whole(&answer), "{}", &answer[..answer.len().min(300)]);
    assert_eq!(ledger_errors(&side).await, 1, "buffered: errcode read");
}

/// How many 45009 answers the ledger holds for `/cgi-bin/big` today.
async fn ledger_errors(side: &Sidecar) -> u64 {
    let (code, q) = side.admin_get("/quota?account=raw").await;
    assert_eq!(code, 200, "{q}");
    q["ours"]
        .as_array()
        .and_then(|paths| paths.iter().find(|p| p["path"] == "/cgi-bin/big"))
        .and_then(|p| p["errors"]["45009"].as_u64())
        .unwrap_or(0)
}

/// A request head is taken up to 64 KiB (pingora's parser would buffer
/// 1 MiB per connection): a larger one is refused and its connection
/// closed at once; one under it, in many pieces, is served.
#[tokio::test]
async fn a_request_head_over_64_kib_is_refused() {
    let up = RawUpstream::start();
    let side = Sidecar::start_bare(&up.config("")).await;
    let line = format!("X-Pad: {}\r\n", "a".repeat(1000));
    // 100 KiB of header lines, no end: cut long before header_timeout.
    let mut s = TcpStream::connect(("127.0.0.1", side.port)).unwrap();
    s.write_all(b"GET /cgi-bin/x HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let start = Instant::now();
    for _ in 0..100 {
        if s.write_all(line.as_bytes()).is_err() {
            break;
        }
    }
    let answer = read_until_quiet(&mut s, Duration::from_secs(5));
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "closed at once, not at the 10 s header timeout"
    );
    assert!(side.log().contains("request head over the limit"));
    // 30 KiB of headers, sent in pieces: served.
    let mut s = TcpStream::connect(("127.0.0.1", side.port)).unwrap();
    s.write_all(b"GET /cgi-bin/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n")
        .unwrap();
    for _ in 0..30 {
        s.write_all(line.as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    s.write_all(b"\r\n").unwrap();
    let answer = read_until_quiet(&mut s, Duration::from_secs(2));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // A long head ended by a bare-LF empty line goes to the parser at once.
    let mut s = TcpStream::connect(("127.0.0.1", side.port)).unwrap();
    s.write_all(b"GET /cgi-bin/x HTTP/1.1\nHost: x\nConnection: close\n")
        .unwrap();
    for _ in 0..6 {
        s.write_all(format!("X-Pad: {}\n", "a".repeat(1000)).as_bytes())
            .unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    let start = Instant::now();
    s.write_all(b"\n").unwrap();
    let answer = read_until_quiet(&mut s, Duration::from_secs(2));
    assert!(answer.starts_with("HTTP/1.1 "), "{answer:?}");
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn a_trickled_answer_ends_at_the_answer_timeout() {
    let up = RawUpstream::start();
    let side = Sidecar::start_bare(
        &up.config("limits:\n  buffered_body: 32\n")
            .replace("  http2: false\n", "  http2: false\n  answer_timeout: 1s\n"),
    )
    .await;
    let start = Instant::now();
    let (status, v) = side.send("/slow/x", "{}").await;
    assert_eq!(status, 504, "{v}");
    assert_eq!(v["errcode"], -1, "{v}");
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "cut off before the 8 s the upstream would take"
    );
    // The streamed route (an upload over limits.buffered_body): the header
    // is out, so the answer is cut short.
    let start = Instant::now();
    let answer = exchange(
        side.port,
        format!(
            "POST /cgi-bin/media/slow?type=file HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 40\r\n\r\n{}",
            "x".repeat(40)
        )
        .as_bytes(),
        Duration::from_secs(10),
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or("");
    assert!(
        body.len() < 40,
        "the 40-byte answer was cut short: {answer:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(8));
}
