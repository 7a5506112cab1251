//! `upstream.http2`: requests share one multiplexed TLS connection when the
//! server speaks h2, fall back to HTTP/1.1 when it declines, and keep every
//! rule of the HTTP/1.1 path (replay, never resending a POST that was sent).

use std::time::Duration;

use serde_json::Value;

use crate::raw::{exchange, RAW_APPID, RAW_SECRET, RAW_TOKEN};
use crate::support::*;

fn config(http2: bool) -> String {
    format!(
        "upstream:\n  url: FAKE_URL\n  ca_file: FAKE_CA\n  http2: {http2}\n{}",
        Sidecar::accounts("stable", "classic")
    )
}

async fn send_parallel(side: &Sidecar, n: usize) -> Vec<Value> {
    let c = client();
    let sends = (0..n).map(|i| {
        let c = c.clone();
        let url = side.url("/cgi-bin/message/template/send");
        async move {
            let mut r = c.post(url).body(TEMPLATE);
            if i % 2 == 1 {
                r = r.header("X-Wx-Account", "mall");
            }
            r.send().await.unwrap().json::<Value>().await.unwrap()
        }
    });
    futures_util::future::join_all(sends).await
}

/// `n` template sends at once, each answer's status and body; an app
/// connection closed without an answer fails the test.
async fn sends_at_once(side: &Sidecar, n: usize) -> Vec<(u16, Value)> {
    let c = client();
    let sends = (0..n).map(|_| {
        let c = c.clone();
        let url = side.url("/cgi-bin/message/template/send");
        async move {
            let r = c.post(url).body(TEMPLATE).send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    });
    futures_util::future::join_all(sends).await
}

#[tokio::test]
async fn requests_share_one_h2_connection() {
    let fake = Fake::start(&["--h2"]);
    let side = Sidecar::start(&fake, &config(true)).await;
    // Up to 32 streams share a connection.
    for v in send_parallel(&side, 30).await {
        assert_eq!(v["errcode"], 0, "{v}");
    }
    let stats = fake.stats().await;
    assert_eq!(stats["messages"], 30);
    // Token fetches, warm-up and 30 concurrent sends: one connection.
    assert_eq!(stats["h2_connections"], 1, "{stats}");
    // The other handshake is this test's own client asking for the stats.
    assert_eq!(stats["tls_handshakes"], 2, "{stats}");
    let seen = fake.last_request().await;
    assert_eq!(seen["protocol"], "HTTP/2.0");
    assert!(seen["host"].as_str().unwrap().starts_with("localhost:"));
    let st = side.status().await;
    let host = &st["upstream"]["hosts"][0];
    assert_eq!(host["protocol"], "h2", "{st}");
    assert_eq!(host["h2_connections_open"], 1);

    // A token WeChat rejects is still refreshed and the request replayed.
    fake.invalidate(SHOP_APPID).await;
    let (status, v) = side.send("/cgi-bin/message/template/send", TEMPLATE).await;
    assert_eq!((status, &v["errcode"]), (200, &Value::from(0)), "{v}");
    assert_eq!(fake.fetches(SHOP_APPID).await, 2);
    // All of it went through the fast lane, over HTTP/2 upstream.
    let served = side
        .metric(r#"wxsidecar_fast_lane_total{result="served"}"#)
        .await;
    assert_eq!(served, 31.0);
}

#[tokio::test]
async fn a_sent_post_is_not_resent_over_h2() {
    let fake = Fake::start(&["--h2"]);
    let side = Sidecar::start(&fake, &config(true)).await;
    fake.faults(
        r#"{"seed":1,"rules":[{"path":"/cgi-bin/message/template/send","reset_after_rate":1.0}]}"#,
    )
    .await;
    let (status, v) = side.send("/cgi-bin/message/template/send", TEMPLATE).await;
    assert_eq!(status, 502, "{v}");
    assert_eq!(fake.stats().await["messages"], 1, "sent once, never twice");
    // The connection (or a new one) still serves the next request.
    fake.faults(r#"{"rules":[]}"#).await;
    let (status, v) = side.send("/cgi-bin/message/template/send", TEMPLATE).await;
    assert_eq!((status, &v["errcode"]), (200, &Value::from(0)), "{v}");
}

#[tokio::test]
async fn a_server_without_h2_gets_http1() {
    let fake = Fake::start(&[]);
    let side = Sidecar::start(&fake, &config(true)).await;
    for v in send_parallel(&side, 10).await {
        assert_eq!(v["errcode"], 0, "{v}");
    }
    let stats = fake.stats().await;
    assert_eq!(stats["h2_connections"], 0);
    assert_eq!(fake.last_request().await["protocol"], "HTTP/1.1");
    let st = side.status().await;
    assert_eq!(st["upstream"]["hosts"][0]["protocol"], "http/1.1", "{st}");
    assert!(side.log().contains("upstream declined HTTP/2"));
}

#[tokio::test]
async fn http2_false_keeps_http1_even_when_the_server_offers_h2() {
    let fake = Fake::start(&["--h2"]);
    let side = Sidecar::start(&fake, &config(false)).await;
    let (status, _) = side.send("/cgi-bin/message/template/send", TEMPLATE).await;
    assert_eq!(status, 200);
    assert_eq!(fake.stats().await["h2_connections"], 0);
    assert_eq!(fake.last_request().await["protocol"], "HTTP/1.1");
}

#[tokio::test]
async fn refused_streams_are_sent_again() {
    // REFUSED_STREAM means the server did not process the request (RFC 9113
    // §8.7): even a POST goes again, and the app sees only the answer.
    let fake = Fake::start(&["--h2"]);
    let side = Sidecar::start(&fake, &config(true)).await;
    let refuse = |n: u32| {
        format!(r#"{{"rules":[{{"path":"/cgi-bin/message/template/send","refuse_next":{n}}}]}}"#)
    };
    // One send refused twice, answered on its third try.
    fake.faults(&refuse(2)).await;
    let (status, v) = side.send("/cgi-bin/message/template/send", TEMPLATE).await;
    assert_eq!((status, &v["errcode"]), (200, &Value::from(0)), "{v}");
    // Refusals among 30 parallel sends (two, so no send can meet three).
    fake.faults(&refuse(2)).await;
    for v in send_parallel(&side, 30).await {
        assert_eq!(v["errcode"], 0, "{v}");
    }
    let stats = fake.stats().await;
    assert_eq!(stats["refused"], 4, "{stats}");
    assert_eq!(stats["messages"], 31, "each once: {stats}");
    // A refused stream is not a closing connection: it stays in use.
    assert_eq!(stats["h2_connections"], 1, "{stats}");
    // Three refusals in a row: the app gets WeChat's busy answer, not a hang.
    fake.faults(&refuse(3)).await;
    let (status, v) = side.send("/cgi-bin/message/template/send", TEMPLATE).await;
    assert_eq!((status, &v["errcode"]), (502, &Value::from(-1)), "{v}");
    assert_eq!(fake.stats().await["messages"], 31);
    // Failed and resent streams are logged (debug): never with the token.
    let log = side.log();
    assert!(
        log.contains("HTTP/2 stream failed"),
        "the refusals were logged"
    );
    let token = fake.last_request().await["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    side.assert_log_clean(&[&token]);
}

#[tokio::test]
async fn an_answer_before_the_body_is_the_answer() {
    // A server may answer from the header alone and reset the stream before
    // taking the body (RFC 9113 §8.1): that answer is what the app gets.
    let fake = Fake::start(&["--h2"]);
    let side = Sidecar::start(&fake, &config(true)).await;
    fake.faults(r#"{"rules":[{"path":"/cgi-bin/message/template/send","early_answer_rate":1.0}]}"#)
        .await;
    // Over HTTP/2's first 64 KiB window: the body cannot all go out before
    // the answer comes back.
    let big = format!(
        r#"{{"touser":"oUSER123","template_id":"TPL_ORDER","data":{{"pad":{{"value":"{}"}}}}}}"#,
        "x".repeat(300_000)
    );
    let (status, v) = side.send("/cgi-bin/message/template/send", &big).await;
    assert_eq!((status, &v["errcode"]), (200, &Value::from(45002)), "{v}");
    // Nothing was acted on, nothing resent, and the connection serves on.
    fake.faults(r#"{"rules":[]}"#).await;
    let (status, v) = side.send("/cgi-bin/message/template/send", TEMPLATE).await;
    assert_eq!((status, &v["errcode"]), (200, &Value::from(0)), "{v}");
    let stats = fake.stats().await;
    assert_eq!(stats["messages"], 1, "{stats}");
    assert_eq!(stats["h2_connections"], 1, "{stats}");
}

#[tokio::test]
async fn a_server_closing_connections_loses_no_request() {
    // GOAWAY after every 7 requests. Streams the server refused are sent
    // again on a new connection. A stream caught by the connection being
    // dropped under it (the server may have acted on it) is answered 502,
    // never resent. Every send gets an answer; none is sent twice.
    let fake = Fake::start(&["--h2", "--h2-max-requests", "7"]);
    let side = Sidecar::start(&fake, &config(true)).await;
    let (mut ok, mut dropped) = (0u64, 0u64);
    for _ in 0..4 {
        for (status, v) in sends_at_once(&side, 20).await {
            match status {
                200 => {
                    assert_eq!(v["errcode"], 0, "{v}");
                    ok += 1;
                }
                502 => {
                    assert_eq!(v["errcode"], -1, "{v}");
                    dropped += 1;
                }
                _ => panic!("{status} {v}"),
            }
        }
    }
    let stats = fake.stats().await;
    let messages = stats["messages"].as_u64().unwrap();
    assert!(
        (ok..=ok + dropped).contains(&messages),
        "{ok} answered, {dropped} dropped, {messages} at the fake"
    );
    // Connections were really closed under the load and replaced.
    assert!(stats["h2_goaways"].as_u64().unwrap() >= 2, "{stats}");
    assert!(stats["h2_connections"].as_u64().unwrap() >= 3, "{stats}");
    assert!(ok >= 60, "{ok} of 80 answered");
}

#[tokio::test]
async fn a_slow_h2_answer_is_a_504_and_frees_its_stream() {
    // The server allows 32 streams at once per connection.
    let fake = Fake::start(&["--h2", "--h2-max-streams", "32", "--latency-ms", "1500"]);
    let cfg = config(true).replace("  http2: true\n", "  http2: true\n  read_timeout: 300ms\n");
    let side = Sidecar::start(&fake, &cfg).await;
    // The first request learns the server's limit (its SETTINGS).
    let (status, _) = side.send("/cgi-bin/message/template/send", TEMPLATE).await;
    assert_eq!(status, 504);
    // Two rounds of 40 at once: the first opens a second connection (32
    // streams each); the second finds the room the first gave up.
    for _ in 0..2 {
        let start = std::time::Instant::now();
        for (status, v) in sends_at_once(&side, 40).await {
            assert_eq!((status, &v["errcode"]), (504, &Value::from(-1)), "{v}");
        }
        assert!(
            start.elapsed() < std::time::Duration::from_millis(1400),
            "cut at read_timeout: {:?}",
            start.elapsed()
        );
    }
    let stats = fake.stats().await;
    assert_eq!(stats["h2_connections"], 2, "{stats}");
    let st = side.status().await;
    assert_eq!(st["upstream"]["hosts"][0]["h2_connections_open"], 2, "{st}");
}

#[tokio::test]
async fn streams_beyond_a_connections_room_open_another() {
    // 100 streams at once per connection at most: 120 slow sends at once
    // need two.
    let fake = Fake::start(&["--h2", "--latency-ms", "300"]);
    let side = Sidecar::start(&fake, &config(true)).await;
    for v in send_parallel(&side, 120).await {
        assert_eq!(v["errcode"], 0, "{v}");
    }
    let stats = fake.stats().await;
    assert_eq!(stats["h2_connections"], 2, "{stats}");
    assert_eq!(stats["messages"], 120, "{stats}");
}

#[tokio::test]
async fn a_server_allowing_fewer_streams_gets_more_connections() {
    // The server allows 8 streams at once: 20 slow sends at once go on
    // three connections, none waits unopened behind another.
    let fake = Fake::start(&["--h2", "--h2-max-streams", "8", "--latency-ms", "300"]);
    let side = Sidecar::start(&fake, &config(true)).await;
    // The first request learns the server's limit (its SETTINGS).
    let (status, _) = side.send("/cgi-bin/message/template/send", TEMPLATE).await;
    assert_eq!(status, 200);
    for v in send_parallel(&side, 20).await {
        assert_eq!(v["errcode"], 0, "{v}");
    }
    let stats = fake.stats().await;
    assert_eq!(stats["h2_connections"], 3, "{stats}");
}

#[tokio::test]
async fn an_oversized_answer_head_is_a_502_on_either_protocol() {
    // 100 KB of answer head: over the 64 KiB both exchanges take. The app
    // gets a clear 502 and the next answer comes as usual.
    for h2 in [false, true] {
        let fake = Fake::start(&["--h2"]);
        let side = Sidecar::start(&fake, &config(h2)).await;
        fake.faults(
            r#"{"rules":[{"path":"/cgi-bin/message/template/send","pad_header_bytes":100000}]}"#,
        )
        .await;
        let (status, v) = side.send("/cgi-bin/message/template/send", TEMPLATE).await;
        assert_eq!(
            (status, &v["errcode"]),
            (502, &Value::from(-1)),
            "h2 {h2}: {v}"
        );
        fake.faults(r#"{"rules":[]}"#).await;
        let (status, v) = side.send("/cgi-bin/message/template/send", TEMPLATE).await;
        assert_eq!(
            (status, &v["errcode"]),
            (200, &Value::from(0)),
            "h2 {h2}: {v}"
        );
    }
}

/// A TLS server speaking just enough HTTP/2 to answer the first request
/// (the token fetch: `RAW_TOKEN`) and then end every connection with a
/// GOAWAY whose debug data echoes our token: what a hostile upstream could
/// send back. Returns its port and the CA file that trusts it.
async fn goaway_echo_server(dir: &std::path::Path) -> (u16, std::path::PathBuf) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;

    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let issued = wxsidecar::certs::issue("goaway test CA", &names, 1, None).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, &issued.ca_pem).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![issued.leaf_der.into()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(issued.leaf_key_der.into()),
        )
        .unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let token_sent = std::sync::Arc::new(AtomicBool::new(false));
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    };
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, token_sent) = (acceptor.clone(), token_sent.clone());
            tokio::spawn(async move {
                let Ok(mut s) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut preface = [0u8; 24];
                if s.read_exact(&mut preface).await.is_err() {
                    return;
                }
                let _ = s.write_all(&frame(4, 0, 0, &[])).await;
                loop {
                    let mut head = [0u8; 9];
                    if s.read_exact(&mut head).await.is_err() {
                        return;
                    }
                    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                    let mut payload = vec![0u8; len];
                    if s.read_exact(&mut payload).await.is_err() {
                        return;
                    }
                    let (kind, flags) = (head[3], head[4]);
                    let stream =
                        u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
                    let out = match kind {
                        // SETTINGS: acknowledged.
                        4 if flags & 1 == 0 => frame(4, 1, 0, &[]),
                        // PING: answered.
                        6 if flags & 1 == 0 => frame(6, 1, 0, &payload),
                        // HEADERS: the first request gets the token (:status
                        // 200 is static index 8), every later one a GOAWAY
                        // that fails it (INTERNAL_ERROR, not processed), with
                        // our token as debug data.
                        1 if !token_sent.swap(true, Ordering::Relaxed) => {
                            let body =
                                format!(r#"{{"access_token":"{RAW_TOKEN}","expires_in":7200}}"#);
                            let mut out = frame(1, 4, stream, &[0x88]);
                            out.extend(frame(0, 1, stream, body.as_bytes()));
                            out
                        }
                        1 => {
                            let mut goaway = stream.saturating_sub(2).to_be_bytes().to_vec();
                            goaway.extend_from_slice(&2u32.to_be_bytes());
                            goaway.extend_from_slice(
                                format!("echo access_token={RAW_TOKEN} {RAW_TOKEN}").as_bytes(),
                            );
                            let _ = s.write_all(&frame(7, 0, 0, &goaway)).await;
                            let _ = s.flush().await;
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            return;
                        }
                        _ => continue,
                    };
                    if s.write_all(&out).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, ca)
}

/// A GOAWAY's debug data is the server's bytes: an upstream echoing our
/// token in it gets a 502 to the app that names the GOAWAY's reason, and
/// neither the answer nor any log line carries the token. On the fast lane
/// and on pingora's path. (Two threads: the server runs while the
/// test's blocking socket waits.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_goaway_echoing_our_token_does_not_pass_it_on() {
    let dir = tempfile::tempdir().unwrap();
    let (port, ca) = goaway_echo_server(dir.path()).await;
    let side = Sidecar::start_bare(&format!(
        "upstream:\n  url: https://127.0.0.1:{port}\n  ca_file: {}\n  http2: true\n  warm_connections: 0\naccounts:\n  - name: raw\n    appid: {RAW_APPID}\n    secret: {RAW_SECRET}\n",
        ca.display()
    ))
    .await;
    let asks: [&[u8]; 2] = [
        b"GET /cgi-bin/echo?a=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"POST /cgi-bin/echo?a=1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    ];
    for ask in asks {
        let answer = exchange(side.port, ask, Duration::from_secs(2));
        assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
        assert!(!answer.contains(RAW_TOKEN), "{answer}");
        assert!(answer.contains("GOAWAY"), "the reason is named: {answer}");
    }
    let log = side.log();
    assert!(log.contains("GOAWAY"), "the failure was logged");
    assert!(
        !log.contains(RAW_TOKEN),
        "never logged: {}",
        log.lines()
            .filter(|l| l.contains(RAW_TOKEN))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[tokio::test]
async fn a_large_download_comes_over_http2_whole_and_the_upload_over_http1() {
    let fake = Fake::start(&["--h2"]);
    let side = Sidecar::start(&fake, &config(true)).await;
    let data: Vec<u8> = (0..6 * 1024 * 1024)
        .map(|i: usize| (i % 251) as u8)
        .collect();
    let (_, v) = side.upload(None, "big.bin", data.clone()).await;
    let c = client();
    let media_id = v["media_id"].as_str().unwrap_or_else(|| panic!("{v}"));
    assert_eq!(fake.last_request().await["protocol"], "HTTP/1.1");
    // The download carries nothing it could not send again: the JSON API's
    // way, over the shared HTTP/2 connection; its 6 MiB stream past the
    // buffer cap.
    let r = c
        .get(side.url(&format!("/cgi-bin/media/get?media_id={media_id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let got = r.bytes().await.unwrap();
    assert!(
        got[..] == data[..],
        "downloaded bytes differ ({})",
        got.len()
    );
    assert_eq!(fake.last_request().await["protocol"], "HTTP/2.0");
}
