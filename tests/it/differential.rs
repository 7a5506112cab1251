//! The two fronts agree. Generated requests (seeded, reproducible) are
//! each sent twice to one sidecar: whole in one packet, so the fast lane
//! may take it, and with its head split across two packets, so the lane
//! cannot (the guard reads the rest of the head and hands it to pingora's
//! session). What reaches the upstream (connection headers aside) and the
//! answer the app gets must be the same bytes. How many the lane took is
//! counted, so the test says how much of the space the lane covers. The
//! upstream hands out a new token at each fetch and revokes one now and
//! then (`/revoked`), so replays after a 40001 are compared too.
//!
//! `DIFF_CASES=N` runs more cases (1,000 by default), `DIFF_SEED=S` another
//! sequence.

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::raw::*;
use crate::support::*;

/// A client token, for the sidecar that checks them.
const CLIENT_TOKEN: &str = "differential-client-token-0123";

/// How long the split request waits between its two packets: long enough
/// for the sidecar to have read the first alone (on a loaded box it may
/// not have: then it is sent again with twice the pause, up to four times).
const SPLIT_PAUSE: Duration = Duration::from_millis(20);

/// One generated request: its bytes, and where its head may be split.
struct Case {
    bytes: Vec<u8>,
    /// Inside the head (so the first packet never holds a whole one).
    split_at: usize,
    /// The marker that finds what reached the upstream for it.
    marker: String,
}

fn pick<'a, T>(rng: &mut StdRng, from: &'a [T]) -> &'a T {
    &from[rng.gen_range(0..from.len())]
}

/// A request of the kinds apps send, and of the borderline ones.
fn generate(rng: &mut StdRng, n: usize, clients: bool, ours: &str) -> Case {
    let marker = format!("dcase{n}x");
    let path = *pick(
        rng,
        &[
            "/cgi-bin/message/template/send",
            "/cgi-bin/user/info",
            "/cgi-bin/revoked/x",
            "/cgi-bin/revoked/y",
            "/cgi-bin/echo/x",
            "/cgi-bin/big/x",
            "/cgi-bin/chunked/x",
            "/cgi-bin/hop/x",
            "/cgi-bin/redirect/x",
            "/cgi-bin/pct-redirect/x",
            "/cgi-bin/reason/x",
            "/cgi-bin/status/503",
            "/cgi-bin/status/204",
            "/sns/userinfo",
            "/wxa/getwxacodeunlimit",
            "/cgi-bin/../cgi-bin/echo/y",
            "/cgi-bin/%65cho/z",
            "//cgi-bin/echo/w",
            "/cgi-bin/a%00b",
            "/cgi-bin/media/get",
            "/cgi-bin/CGI-BIN/../token",
            "/cgi-bin/echo;x",
            "/cgi-bin/echo/%2e%2e/x",
        ],
    );
    let mut query = vec![format!("m={marker}")];
    for _ in 0..rng.gen_range(0..4) {
        query.push(
            pick(
                rng,
                &[
                    "a=1".to_string(),
                    format!("access_token={ours}"),
                    "access_token=someone-elses-token".into(),
                    "access%5Ftoken=x".into(),
                    "openid=o%20p".into(),
                    "size=5000".into(),
                    "size=40000".into(),
                    "errcode=45009".into(),
                    "errcode=40001".into(),
                    "errcode=42001".into(),
                    "echo=1".into(),
                    "empty=".into(),
                    "lone".into(),
                    "a=%zz".into(),
                    "q=%E4%BD%A0".into(),
                    "access_token=".into(),
                    "plus=a+b%2Bc".into(),
                    "secret=s3cr3t".into(),
                    "appid=wx1".into(),
                ],
            )
            .clone(),
        );
    }
    let query = query.join("&");
    let post = rng.gen_bool(0.6);
    let body: &[u8] = if post {
        pick::<&[u8]>(
            rng,
            &[
                br#"{"touser":"o1","template_id":"t","data":{}}"#.as_slice(),
                b"{}",
                "{\"text\":\"\u{4f60}\u{597d}\"}".as_bytes(),
                b"",
            ],
        )
    } else {
        b""
    };
    let mut headers = String::from("Host: 127.0.0.1\r\n");
    for _ in 0..rng.gen_range(0..4) {
        headers.push_str(pick::<&str>(
            rng,
            &[
                "User-Agent: diff/1.0\r\n",
                "Accept: */*\r\n",
                "Accept-Encoding: gzip\r\n",
                "X-Wx-Account: raw\r\n",
                "X-Wx-Account: nobody\r\n",
                "Content-Type: application/json\r\n",
                "X-Custom: a, b\r\n",
                "X-Empty:\r\n",
                "Connection: keep-alive\r\n",
                "Keep-Alive: timeout=5\r\n",
                "Expect: 100-continue\r\n",
                "X-Latin: caf\u{e9}\r\n",
                "X-Wx-Account: RAW\r\n",
                "Authorization: Basic dXNlcjpwYXNz\r\n",
                "Content-Type: multipart/form-data; boundary=b\r\n",
                "Content-Type: application/x-www-form-urlencoded\r\n",
                "TE: trailers\r\n",
                "Upgrade: websocket\r\n",
                "Accept-Encoding: identity\r\n",
            ],
        ));
    }
    if clients && rng.gen_bool(0.8) {
        headers.push_str(&format!("Authorization: Bearer {CLIENT_TOKEN}\r\n"));
    }
    let method = if post {
        "POST"
    } else {
        *pick(rng, &["GET", "GET", "GET", "HEAD", "DELETE"])
    };
    let length = if post || !body.is_empty() {
        format!("Content-Length: {}\r\n", body.len())
    } else {
        String::new()
    };
    // Now and then a request line RFC 9112 refuses.
    let sp = if rng.gen_ratio(1, 25) { "  " } else { " " };
    let head = format!(
        "{method}{sp}{path}?{query} HTTP/1.1\r\n{headers}{length}Connection: close\r\n\r\n"
    );
    let split_at = rng.gen_range(1..head.len() - 2);
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body);
    Case {
        bytes,
        split_at,
        marker,
    }
}

/// Sends `bytes`, in two packets when `split_at` is given, and reads the
/// whole answer (the request asks to close).
fn send(port: u16, bytes: &[u8], split_at: Option<(usize, Duration)>) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_nodelay(true).unwrap();
    match split_at {
        None => s.write_all(bytes).unwrap(),
        Some((at, pause)) => {
            s.write_all(&bytes[..at]).unwrap();
            std::thread::sleep(pause);
            // The sidecar may have answered (400) and closed already.
            let _ = s.write_all(&bytes[at..]);
        }
    }
    read_until_quiet(&mut s, Duration::from_secs(3))
}

/// An answer as the app's HTTP client reads it: status line, headers
/// grouped by name (the order of different names means nothing, RFC 9110
/// §5.3; within a name it is kept), body with its framing undone. Framing
/// and connection headers (`Content-Length`, `Transfer-Encoding`,
/// `Connection`) and `Date` are left out: a body may be sent with a length,
/// chunked or until close, and mean the same.
fn answer_shape(mut answer: &str) -> String {
    // Informational answers (`100 Continue`) first: their status lines only.
    let mut interim = Vec::new();
    while answer.starts_with("HTTP/1.1 1") {
        let (line, rest) = answer.split_once("\r\n\r\n").unwrap_or((answer, ""));
        interim.push(line.split("\r\n").next().unwrap_or_default().to_string());
        answer = rest;
    }
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((answer, ""));
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default().to_string();
    let mut headers: Vec<(String, String)> = Vec::new();
    let mut chunked = false;
    for l in lines {
        let (n, v) = l.split_once(':').unwrap_or((l, ""));
        let n = n.to_ascii_lowercase();
        chunked |= n == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked");
        if !["content-length", "transfer-encoding", "connection", "date"].contains(&n.as_str()) {
            headers.push((n, v.trim().to_string()));
        }
    }
    headers.sort_by(|a, b| a.0.cmp(&b.0));
    let body = if chunked {
        unchunk(body)
    } else {
        body.to_string()
    };
    format!("{interim:?}\n{status}\n{headers:?}\n{body}")
}

/// A chunked body's content.
fn unchunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16) else {
            return format!("(bad chunk framing){rest}");
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].strip_prefix("\r\n").unwrap_or(&after[n..]);
    }
    out
}

/// What the upstream saw for `marker` (each request it got, in order),
/// with the front's own tag taken out and connection headers aside.
fn upstream_saw(up: &RawUpstream, marker: &str) -> Vec<String> {
    up.seen
        .lock()
        .iter()
        .filter(|r| r.contains(marker))
        .map(|r| {
            let (head, body) = r.split_once("\r\n\r\n").unwrap_or((r, ""));
            let mut lines = head.split("\r\n");
            // Each front's replay fetched its own new token: the same
            // token, in another generation.
            let request_line = generation(lines.next().unwrap_or_default());
            // Names in any case, grouped by name (RFC 9110 §5.3), order
            // within a name kept.
            let mut headers: Vec<String> = lines
                .filter(|l| {
                    let l = l.to_ascii_lowercase();
                    !l.starts_with("connection:") && !l.starts_with("keep-alive:")
                })
                .map(|l| match l.split_once(':') {
                    Some((n, v)) => format!("{}:{v}", n.to_ascii_lowercase()),
                    None => l.to_string(),
                })
                .collect();
            headers.sort_by(|a, b| a.split(':').next().cmp(&b.split(':').next()));
            format!("{request_line}\r\n{}\r\n\r\n{body}", headers.join("\r\n"))
        })
        .collect()
}

/// `text` with the generation of a reissued token (`{RAW_TOKEN}-N`) left out.
fn generation(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find(RAW_TOKEN) {
        let after = &rest[i + RAW_TOKEN.len()..];
        out.push_str(&rest[..i + RAW_TOKEN.len()]);
        rest = match after.strip_prefix('-') {
            Some(n) => {
                out.push_str("-#");
                n.trim_start_matches(|c: char| c.is_ascii_digit())
            }
            None => after,
        };
    }
    out.push_str(rest);
    out
}

async fn run(clients: bool) {
    let cases: usize = std::env::var("DIFF_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1000)
        / 2;
    let seed: u64 = std::env::var("DIFF_SEED")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0xd1ff);
    let up = RawUpstream::start();
    let extra = match clients {
        true => format!("limits:\n  buffered_body: 16KiB\nclients:\n  tokens:\n    - name: app\n      token: {CLIENT_TOKEN}\n"),
        false => "limits:\n  buffered_body: 16KiB\n".to_string(),
    };
    let side = Sidecar::start_bare(&up.config(&extra).replace(RAW_APPID, RAW_REISSUE_APPID)).await;
    // A token the sidecar handed out, as an SDK that fetches its own has:
    // fetched afresh for each case (the sidecar knows the last 24 it
    // issued, and revocations here make a new one every few cases).
    let ours = || async {
        let target = format!(
            "/cgi-bin/token?grant_type=client_credential&appid={RAW_REISSUE_APPID}&secret={RAW_SECRET}"
        );
        let mut r = client().get(side.url(&target));
        if clients {
            r = r.bearer_auth(CLIENT_TOKEN);
        }
        let v: serde_json::Value = r.send().await.unwrap().json().await.unwrap();
        let ours = v["access_token"].as_str().expect("a token").to_string();
        assert!(ours.starts_with(RAW_TOKEN), "{ours}");
        ours
    };
    let lane = |r: &'static str| {
        let side = &side;
        async move {
            side.metric(&format!(r#"wxsidecar_fast_lane_total{{result="{r}"}}"#))
                .await
        }
    };
    let mut rng = StdRng::seed_from_u64(seed ^ u64::from(clients));
    let (mut taken, mut diverged) = (0u64, Vec::new());
    let port = side.port;
    for n in 0..cases {
        let case = generate(&mut rng, n, clients, &ours().await);
        let served = lane("served").await;
        let bytes = case.bytes.clone();
        let whole = tokio::task::spawn_blocking(move || send(port, &bytes, None))
            .await
            .unwrap();
        let by_lane = lane("served").await > served;
        taken += u64::from(by_lane);
        let fast_saw = upstream_saw(&up, &case.marker);
        up.seen.lock().retain(|r| !r.contains(&case.marker));
        let mut split = String::new();
        for attempt in 0..4 {
            let served = lane("served").await;
            let (bytes, at) = (case.bytes.clone(), case.split_at);
            let pause = SPLIT_PAUSE * 2u32.pow(attempt);
            split = tokio::task::spawn_blocking(move || send(port, &bytes, Some((at, pause))))
                .await
                .unwrap();
            if lane("served").await == served {
                break;
            }
            // Both packets were read at once: the lane took it. Again.
            up.seen.lock().retain(|r| !r.contains(&case.marker));
            assert!(attempt < 3, "the split request went to the lane four times");
        }
        let full_saw = upstream_saw(&up, &case.marker);
        up.seen.lock().retain(|r| !r.contains(&case.marker));
        let shown = String::from_utf8_lossy(&case.bytes);
        if answer_shape(&whole) != answer_shape(&split) || fast_saw != full_saw {
            diverged.push(format!(
                "case {n} (lane took it: {by_lane}):\n{shown:?}\n-- whole answer:\n{whole}\n-- split answer:\n{split}\n-- upstream saw (whole):\n{fast_saw:?}\n-- upstream saw (split):\n{full_saw:?}"
            ));
        }
    }
    eprintln!(
        "differential (clients {clients}, seed {seed:#x}): {cases} cases, the fast lane took {taken}, {} diverged",
        diverged.len()
    );
    if let Ok(dump) = std::env::var("DIFF_DUMP") {
        std::fs::write(format!("{dump}.{clients}"), diverged.join("\n\n")).unwrap();
    }
    assert!(
        diverged.is_empty(),
        "{} of {cases} cases diverged; the first:\n{}",
        diverged.len(),
        diverged[0]
    );
    assert!(taken > cases as u64 / 10, "the lane took only {taken}");
    // Replays after a revoked token were among them, on both fronts.
    let replayed = side
        .metric(r#"wxsidecar_token_replays_total{account="raw",result="ok"}"#)
        .await;
    assert!(replayed >= 20.0, "replays: {replayed}");
    assert!(!side.log().contains(RAW_TOKEN), "never logged");
}

#[tokio::test]
async fn both_fronts_send_and_answer_the_same_bytes() {
    run(false).await;
}

#[tokio::test]
async fn both_fronts_send_and_answer_the_same_bytes_with_client_tokens() {
    run(true).await;
}
