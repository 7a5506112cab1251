//! Transparent mode: clients that trust the local CA call
//! `https://api.weixin.qq.com` (resolved to the sidecar by the client, as
//! `hostAliases` would) or go through the forward proxy, and get what the
//! plain listener gives; other hosts are refused; the sidecar's own upstream
//! is resolved from DNS (a tiny DNS server here) and never loops back.

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

const CORP: &str = "ww00000000000000a1";

/// `wxsidecar ca init` into a fresh directory; returns (dir, ca.pem text).
fn ca_init() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["ca", "init", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let pem = std::fs::read_to_string(dir.path().join("ca.pem")).unwrap();
    (dir, pem)
}

struct Ports {
    https: u16,
    http: u16,
    proxy: u16,
}

fn intercept_block(ca: &std::path::Path, p: &Ports, extra: &str) -> String {
    format!(
        "intercept:\n  ca_cert: {}\n  ca_key: {}\n  https_listen: 127.0.0.1:{}\n  http_listen: 127.0.0.1:{}\n  proxy_listen: 127.0.0.1:{}\n{extra}",
        ca.join("ca.pem").display(),
        ca.join("ca-key.pem").display(),
        p.https,
        p.http,
        p.proxy
    )
}

/// A fake with a WeCom app too, and a sidecar in transparent mode.
async fn setup(extra: &str) -> (Fake, Sidecar, tempfile::TempDir, String, Ports) {
    let fake = Fake::start(&["--wecom-app", &format!("{CORP}:hr-secret")]);
    let (ca, pem) = ca_init();
    let ports = Ports {
        https: free_port(),
        http: free_port(),
        proxy: free_port(),
    };
    let cfg = format!(
        "{}wecom_upstream:\n  url: FAKE_URL\n  ca_file: FAKE_CA\n{}  - {{name: hr, kind: wecom, corpid: {CORP}, secret: hr-secret}}\n{}",
        upstream(),
        Sidecar::accounts("stable", "classic"),
        intercept_block(ca.path(), &ports, extra)
    );
    let side = Sidecar::start(&fake, &cfg).await;
    // Ready means every listener takes connections (pingora binds them one
    // after another; readiness waits for the last).
    for port in [ports.https, ports.http, ports.proxy] {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("ready, yet port {port} refuses: {e}"));
    }
    // Those probes leave no connection counted against the caps.
    for _ in 0..100 {
        if side
            .metric(r#"wxsidecar_connections_open{listener="app"}"#)
            .await
            == 0.0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (fake, side, ca, pem, ports)
}

/// A client that trusts only the local CA and sends the WeChat hosts to
/// `port` on loopback: what `hostAliases` does for an unmodified app.
fn resolving_client(pem: &str, port: u16) -> reqwest::Client {
    let to = SocketAddr::from(([127, 0, 0, 1], port));
    reqwest::Client::builder()
        .no_proxy()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap())
        .resolve("api.weixin.qq.com", to)
        .resolve("qyapi.weixin.qq.com", to)
        .resolve("example.com", to)
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

async fn json(r: reqwest::RequestBuilder) -> Value {
    r.send().await.unwrap().json().await.unwrap()
}

#[tokio::test]
async fn https_listener_serves_the_wechat_hosts_like_the_plain_listener() {
    let (fake, side, _ca, pem, p) = setup("").await;
    let c = resolving_client(&pem, p.https);
    let base = format!("https://api.weixin.qq.com:{}", p.https);
    // The token endpoint is answered locally, with the sidecar's token.
    let v = json(c.get(format!(
        "{base}/cgi-bin/token?grant_type=client_credential&appid={MALL_APPID}&secret={MALL_SECRET}"
    )))
    .await;
    let token = v["access_token"].as_str().unwrap().to_string();
    assert_eq!(token, side.token(MALL_APPID, MALL_SECRET).await);
    assert_eq!(fake.fetches(MALL_APPID).await, 1, "no fetch for the app");
    // A send with no token gets the default account's token injected.
    let v = json(
        c.post(format!("{base}/cgi-bin/message/template/send"))
            .body(TEMPLATE),
    )
    .await;
    assert_eq!(v["errcode"], 0, "{v}");
    let seen = fake.last_request().await;
    assert_eq!(seen["path"], "/cgi-bin/message/template/send");
    let shop_token = side.token(SHOP_APPID, SHOP_SECRET).await;
    assert_eq!(seen["access_token"], shop_token.as_str());
    // The token the app got back for mall is recognised and replaced.
    let v = json(
        c.post(format!(
            "{base}/cgi-bin/message/template/send?access_token={token}"
        ))
        .body(TEMPLATE),
    )
    .await;
    assert_eq!(v["errcode"], 0, "{v}");
    // qyapi.weixin.qq.com is WeCom: the WeCom account's token goes in.
    let v = json(
        c.post(format!(
            "https://qyapi.weixin.qq.com:{}/cgi-bin/message/send",
            p.https
        ))
        .body(r#"{"touser":"u1","msgtype":"text","agentid":1,"text":{"content":"hi"}}"#),
    )
    .await;
    assert_eq!(v["errcode"], 0, "{v}");
    let seen = fake.last_request().await;
    assert_ne!(seen["access_token"], shop_token.as_str());
    let wecom_token = json(c.get(format!(
        "https://qyapi.weixin.qq.com:{}/cgi-bin/gettoken?corpid={CORP}&corpsecret=hr-secret",
        p.https
    )))
    .await;
    assert_eq!(seen["access_token"], wecom_token["access_token"]);

    // Plain HTTP to the intercepted hosts (SDKs that still use http://).
    let plain = resolving_client(&pem, p.http);
    let v = json(
        plain
            .post(format!(
                "http://api.weixin.qq.com:{}/cgi-bin/message/template/send",
                p.http
            ))
            .body(TEMPLATE),
    )
    .await;
    assert_eq!(v["errcode"], 0, "{v}");
    assert_eq!(fake.stats().await["messages"], 3);
    // Plain HTTP to WeCom's host: still the WeCom account's token (the
    // host names the family, so the fast lane hands these off).
    let lane = |r: &'static str| {
        let side = &side;
        async move {
            side.metric(&format!(r#"wxsidecar_fast_lane_total{{result="{r}"}}"#))
                .await
        }
    };
    let (served, handed_off) = (lane("served").await, lane("handed_off").await);
    let v = json(
        plain
            .post(format!(
                "http://qyapi.weixin.qq.com:{}/cgi-bin/message/send",
                p.http
            ))
            .body(r#"{"touser":"u1","msgtype":"text","agentid":1,"text":{"content":"hi"}}"#),
    )
    .await;
    assert_eq!(v["errcode"], 0, "{v}");
    let seen = fake.last_request().await;
    assert_eq!(seen["access_token"], wecom_token["access_token"]);
    assert_eq!(lane("handed_off").await, handed_off + 1.0);
    // The app listener beside transparent mode keeps its fast lane.
    let (_, v) = side.send("/cgi-bin/message/template/send", TEMPLATE).await;
    assert_eq!(v["errcode"], 0, "{v}");
    assert_eq!(
        fake.last_request().await["access_token"],
        shop_token.as_str()
    );
    assert_eq!(lane("served").await, served + 1.0);

    // Any other name is refused at the handshake.
    let e = c
        .get(format!("https://example.com:{}/", p.https))
        .send()
        .await
        .unwrap_err();
    assert!(e.is_connect() || e.is_request(), "{e:?}");
    side.assert_log_clean(&[&token, &shop_token]);
}

#[tokio::test]
async fn forward_proxy_tunnels_wechat_and_refuses_everything_else() {
    let (fake, side, _ca, pem, p) = setup("").await;
    let c = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(format!("http://127.0.0.1:{}", p.proxy)).unwrap())
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap();
    // HTTPS through CONNECT, as HTTPS_PROXY makes an unmodified client do.
    let v = json(
        c.post("https://api.weixin.qq.com/cgi-bin/message/template/send")
            .body(TEMPLATE),
    )
    .await;
    assert_eq!(v["errcode"], 0, "{v}");
    let v = json(c.get(format!(
        "https://api.weixin.qq.com/cgi-bin/token?grant_type=client_credential&appid={SHOP_APPID}&secret={SHOP_SECRET}"
    )))
    .await;
    assert_eq!(
        v["access_token"],
        side.token(SHOP_APPID, SHOP_SECRET).await.as_str()
    );
    // Plain HTTP proxy requests too.
    let v = json(
        c.post("http://api.weixin.qq.com/cgi-bin/message/template/send")
            .body(TEMPLATE),
    )
    .await;
    assert_eq!(v["errcode"], 0, "{v}");
    assert_eq!(fake.stats().await["messages"], 2);
    assert_eq!(fake.fetches(SHOP_APPID).await, 1);

    // Never an open proxy: CONNECT elsewhere, other ports, other plain hosts.
    for head in [
        "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
        "CONNECT api.weixin.qq.com:22 HTTP/1.1\r\n\r\n",
        "GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n",
    ] {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", p.proxy))
            .await
            .unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 403"), "{head:?} → {answer}");
    }
    // A later request on an admitted plain connection is checked as well.
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", p.proxy))
        .await
        .unwrap();
    let first = format!("POST http://api.weixin.qq.com/cgi-bin/message/template/send HTTP/1.1\r\nHost: api.weixin.qq.com\r\nContent-Length: {}\r\n\r\n{TEMPLATE}", TEMPLATE.len());
    let second = "GET http://example.com/x HTTP/1.1\r\nHost: example.com\r\n\r\n";
    let mut buf = vec![0u8; 8192];
    let mut got = String::new();
    for (request, wanted) in [(first.as_str(), "\"errcode\":0"), (second, "403")] {
        s.write_all(request.as_bytes()).await.unwrap();
        while !got.contains(wanted) {
            let n = tokio::time::timeout(WAIT, s.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "connection closed: {got}");
            got.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
    assert!(got.contains("not a WeChat host"), "{got}");
    assert_eq!(fake.stats().await["messages"], 3);
}

/// Every way into transparent mode is bounded like the plain listener: a
/// connection that never ends its TLS handshake (on the HTTPS listener or
/// inside `CONNECT`), says nothing to the forward proxy, or trickles its
/// next request head through it is closed at `limits.header_timeout`; a
/// handshake in progress counts against `limits.max_connections`.
#[tokio::test]
async fn every_way_in_is_bounded_by_the_head_deadline() {
    use crate::raw::closed_within;
    use std::io::{Read, Write};
    use std::net::TcpStream;
    let (_fake, side, _ca, _pem, p) =
        setup("limits:\n  header_timeout: 1s\n  max_connections: 3\n").await;
    // Three silent sockets on the HTTPS listener fill the cap: a fourth is
    // refused at once, and counted. (Counted from here: the readiness
    // probes before may have met a full cap.)
    let refused = r#"wxsidecar_connections_refused_total{listener="app"}"#;
    let before = side.metric(refused).await;
    let silent: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(("127.0.0.1", p.https)).unwrap())
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut fourth = TcpStream::connect(("127.0.0.1", p.https)).unwrap();
    assert!(closed_within(&mut fourth, Duration::from_secs(5)));
    assert_eq!(
        side.metric(refused).await - before,
        1.0,
        "handshakes in progress count against the cap"
    );
    // pingora's own bound on a handshake is 60 s; ours is the head's.
    for mut s in silent {
        assert!(
            closed_within(&mut s, Duration::from_secs(5)),
            "a handshake that never starts is cut at header_timeout"
        );
    }
    let mut partial = TcpStream::connect(("127.0.0.1", p.https)).unwrap();
    partial.write_all(&[0x16, 0x03, 0x01]).unwrap();
    assert!(closed_within(&mut partial, Duration::from_secs(5)));

    // The forward proxy: silence, and CONNECT with no TLS after it.
    let mut quiet = TcpStream::connect(("127.0.0.1", p.proxy)).unwrap();
    assert!(closed_within(&mut quiet, Duration::from_secs(5)));
    let mut tunnel = TcpStream::connect(("127.0.0.1", p.proxy)).unwrap();
    tunnel
        .write_all(b"CONNECT api.weixin.qq.com:443 HTTP/1.1\r\nHost: api.weixin.qq.com:443\r\n\r\n")
        .unwrap();
    let mut answer = [0u8; 39];
    tunnel.read_exact(&mut answer).unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    assert!(
        closed_within(&mut tunnel, Duration::from_secs(5)),
        "a tunnel whose TLS never starts is cut at header_timeout"
    );

    // A plain proxy request is answered; the next head, trickled, is cut.
    let mut s = TcpStream::connect(("127.0.0.1", p.proxy)).unwrap();
    s.write_all(
        format!("POST http://api.weixin.qq.com/cgi-bin/message/template/send HTTP/1.1\r\nHost: api.weixin.qq.com\r\nContent-Length: {}\r\n\r\n{TEMPLATE}", TEMPLATE.len()).as_bytes(),
    )
    .unwrap();
    // (Read until the answer is whole: a loaded box may take a while.)
    let mut answer = String::new();
    let start = std::time::Instant::now();
    while !answer.contains("\"errcode\":0") && start.elapsed() < Duration::from_secs(10) {
        answer.push_str(&crate::raw::read_until_quiet(
            &mut s,
            Duration::from_millis(500),
        ));
    }
    assert!(answer.contains("\"errcode\":0"), "{answer}");
    s.write_all(b"GET http://api.weixin.qq.com/cgi-bin/x HTTP/1.1\r\n")
        .unwrap();
    let start = std::time::Instant::now();
    let mut cut = false;
    while start.elapsed() < Duration::from_secs(10) {
        if s.write_all(b"X").is_err() || closed_within(&mut s, Duration::from_millis(200)) {
            cut = true;
            break;
        }
    }
    assert!(
        cut,
        "a head trickled through the forward proxy for 10 s was never cut off"
    );
}

/// A TLS client that trusts only the local CA (`pem`).
fn trusting(pem: &str) -> tokio_rustls::TlsConnector {
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// TLS to the sidecar on `tcp`, trusting only the local CA, as `api.weixin.qq.com`.
async fn tls_over(
    pem: &str,
    tcp: tokio::net::TcpStream,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("api.weixin.qq.com").unwrap();
    trusting(pem).connect(name, tcp).await.unwrap()
}

/// Writes `head` in pieces (kept small so a server that stops reading
/// cannot block the writer for long) and reads what comes back until the
/// connection closes or is quiet for 3 s; returns it and whether the
/// sidecar closed the connection.
async fn send_head_over<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    pieces: &[Vec<u8>],
) -> (String, bool) {
    for piece in pieces {
        match tokio::time::timeout(Duration::from_secs(3), s.write_all(piece)).await {
            Ok(Ok(())) => {}
            _ => break,
        }
    }
    let _ = s.flush().await;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    (String::from_utf8_lossy(&got).into_owned(), closed)
}

/// Over TLS too (the HTTPS listener, and TLS inside `CONNECT`) a request
/// head over 64 KiB is answered 431 and its connection closed at once, not
/// buffered by pingora's parser up to 1 MiB until the head deadline; a
/// 30 KiB head, and a second request on the same connection, are served.
#[tokio::test]
async fn a_head_over_64_kib_is_refused_over_tls_too() {
    let (_fake, side, _ca, pem, p) = setup("limits:\n  header_timeout: 20s\n").await;
    let pad = |n: usize| -> Vec<Vec<u8>> {
        let mut pieces = vec![b"GET /cgi-bin/x HTTP/1.1\r\nHost: api.weixin.qq.com\r\n".to_vec()];
        pieces.extend((0..n).map(|_| format!("X-Pad: {}\r\n", "a".repeat(1000)).into_bytes()));
        pieces
    };
    let over_https = || async {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", p.https))
            .await
            .unwrap();
        tls_over(&pem, tcp).await
    };
    let over_connect = || async {
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", p.proxy))
            .await
            .unwrap();
        tcp.write_all(
            b"CONNECT api.weixin.qq.com:443 HTTP/1.1\r\nHost: api.weixin.qq.com:443\r\n\r\n",
        )
        .await
        .unwrap();
        let mut answer = [0u8; 39];
        tcp.read_exact(&mut answer).await.unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
        tls_over(&pem, tcp).await
    };
    for (way, mut s) in [
        ("https", over_https().await),
        ("connect", over_connect().await),
    ] {
        let (answer, closed) = send_head_over(&mut s, &pad(100)).await;
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
            "{way}: {answer}"
        );
        assert!(
            closed,
            "{way}: closed at once, not held to the 20 s header timeout"
        );
    }
    assert!(side.log().contains("request head over the limit"));
    for (way, mut s) in [
        ("https", over_https().await),
        ("connect", over_connect().await),
    ] {
        let mut pieces = pad(30);
        pieces.push(b"\r\n".to_vec());
        pieces.push(
            format!(
                "POST /cgi-bin/message/template/send HTTP/1.1\r\nHost: api.weixin.qq.com\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{TEMPLATE}",
                TEMPLATE.len()
            )
            .into_bytes(),
        );
        let (answer, _) = send_head_over(&mut s, &pieces).await;
        assert_eq!(
            answer.matches("HTTP/1.1 ").count(),
            2,
            "{way}: both requests answered: {answer}"
        );
        assert!(answer.contains("\"errcode\":0"), "{way}: {answer}");
    }
}

#[tokio::test]
async fn leaf_covers_exactly_the_hosts_and_is_resigned_before_it_expires() {
    let (_fake, _side, _ca, pem, p) =
        setup("  hosts: [api.weixin.qq.com, qyapi.weixin.qq.com]\n  leaf_lifetime: 10s\n").await;
    let leaf = |sni: &'static str| {
        let pem = pem.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", p.https))
                .await
                .unwrap();
            let name = tokio_rustls::rustls::pki_types::ServerName::try_from(sni).unwrap();
            let tls = trusting(&pem).connect(name, tcp).await?;
            Ok::<_, std::io::Error>(tls.get_ref().1.peer_certificates().unwrap()[0].to_vec())
        }
    };
    let der = leaf("qyapi.weixin.qq.com").await.unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
    let sans: Vec<String> = cert
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(
        sans,
        ["DNSName(api.weixin.qq.com)", "DNSName(qyapi.weixin.qq.com)"]
    );
    assert!(cert.issuer().to_string().contains("wxsidecar"));
    // Not configured, so refused, though it is a WeChat host.
    assert!(leaf("api2.weixin.qq.com").await.is_err());
    // 10 s leaves are re-signed when a third of their life is left.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let later = leaf("api.weixin.qq.com").await.unwrap();
    let (_, next) = x509_parser::parse_x509_certificate(&later).unwrap();
    assert!(
        next.validity().not_after > cert.validity().not_after,
        "still the first leaf"
    );
}

/// A DNS server that answers every A query with 127.0.0.1 and counts them.
async fn fake_dns() -> (u16, Arc<AtomicU64>) {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = sock.local_addr().unwrap().port();
    let queries = Arc::new(AtomicU64::new(0));
    let q = queries.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 512];
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf).await else {
                return;
            };
            if n < 12 {
                continue;
            }
            // The question ends after the name's zero label and 4 bytes.
            let mut i = 12;
            while i < n && buf[i] != 0 {
                i += buf[i] as usize + 1;
            }
            let qend = i + 5;
            if qend > n {
                continue;
            }
            let qtype = u16::from_be_bytes([buf[i + 1], buf[i + 2]]);
            q.fetch_add(1, Ordering::Relaxed);
            let mut out = buf[..qend].to_vec();
            out[2] = 0x81; // response, recursion desired
            out[3] = 0x80; // recursion available, no error
            out[6..8].copy_from_slice(&[0, u16::from(qtype == 1) as u8]);
            out[8..12].copy_from_slice(&[0, 0, 0, 0]);
            if qtype == 1 {
                out.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 127, 0, 0, 1]);
            }
            let _ = sock.send_to(&out, from).await;
        }
    });
    (port, queries)
}

// Two workers: the DNS server keeps answering while a test thread waits
// on a child process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_is_resolved_by_dns_and_a_loop_is_refused() {
    let (dns_port, queries) = fake_dns().await;
    let fake = Fake::start(&[]);
    let (ca, _pem) = ca_init();
    let ports = Ports {
        https: free_port(),
        http: free_port(),
        proxy: free_port(),
    };
    // api.weixin.qq.com → 127.0.0.1 by our DNS: the fake (its certificate
    // covers the WeChat names).
    let cfg = format!(
        "upstream:\n  url: https://api.weixin.qq.com:{}\n  ca_file: FAKE_CA\n  dns: [127.0.0.1:{dns_port}]\n{}{}",
        fake.port,
        Sidecar::accounts("stable", "stable"),
        intercept_block(ca.path(), &ports, "")
    );
    let side = Sidecar::start(&fake, &cfg).await;
    let (status, v) = side.send("/cgi-bin/message/template/send", TEMPLATE).await;
    assert_eq!((status, &v["errcode"]), (200, &Value::from(0)), "{v}");
    assert!(queries.load(Ordering::Relaxed) >= 1, "DNS was not asked");
    let seen = fake.last_request().await;
    assert_eq!(seen["host"], format!("api.weixin.qq.com:{}", fake.port));
    drop(side);

    // The same name on the HTTPS listener's own port: every request would
    // come back to us. The sidecar refuses to start and says why.
    let dir = tempfile::tempdir().unwrap();
    let mall_secret = dir.path().join("mall.secret");
    std::fs::write(&mall_secret, MALL_SECRET).unwrap();
    let cfg = format!(
        "listen: 127.0.0.1:{}\nadmin_listen: 127.0.0.1:{}\nupstream:\n  url: https://api.weixin.qq.com:{}\n  dns: [127.0.0.1:{dns_port}]\n{}{}",
        free_port(),
        free_port(),
        ports.https,
        Sidecar::accounts("stable", "stable").replace("MALL_SECRET_FILE", &mall_secret.display().to_string()),
        intercept_block(ca.path(), &ports, "")
    );
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, cfg).unwrap();
    let out = tokio::process::Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .env("WXT_SHOP_SECRET", SHOP_SECRET)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(WAIT, out)
        .await
        .expect("the sidecar should refuse to start, not run")
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("would loop") && err.contains("intercept.https_listen"),
        "{err}"
    );
}

#[test]
fn ca_init_writes_a_p256_ca_and_will_not_overwrite_it() {
    let (dir, pem) = ca_init();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("ca-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let der = pem::parse(&pem).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(der.contents()).unwrap();
    assert!(cert.is_ca());
    // It may sign for WeChat's domain only, and no other CA.
    assert_eq!(
        wxsidecar::certs::ca::permitted_domains(&pem).unwrap(),
        Some(vec!["weixin.qq.com".to_string()])
    );
    let bc = cert.basic_constraints().unwrap().unwrap().value;
    assert_eq!(bc.path_len_constraint, Some(0));
    assert!(
        cert.subject().to_string().contains("wxsidecar"),
        "{}",
        cert.subject()
    );
    let spki = cert.public_key();
    assert_eq!(spki.algorithm.algorithm.to_id_string(), "1.2.840.10045.2.1");
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .unwrap()
        .as_oid()
        .unwrap();
    assert_eq!(curve.to_id_string(), "1.2.840.10045.3.1.7", "P-256");
    let years = (cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp())
        / (365 * 86400);
    assert_eq!(years, 10);
    // Again: refused, nothing replaced; with --force: a new CA.
    let again = Command::new(BIN)
        .args(["ca", "init", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("ca.pem")).unwrap(),
        pem
    );
    let forced = Command::new(BIN)
        .args(["ca", "init", "--force", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(forced.status.success());
    assert_ne!(
        std::fs::read_to_string(dir.path().join("ca.pem")).unwrap(),
        pem
    );
}

#[test]
fn intercept_config_errors_name_their_keys() {
    let (dir, _) = ca_init();
    let check = |body: String| {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("c.yaml");
        std::fs::write(&path, body).unwrap();
        let out = Command::new(BIN)
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let base = "accounts:\n  - {name: a, appid: wx1, secret: s}\n";
    let (code, err) = check(format!(
        "{base}intercept:\n  https_listen: 127.0.0.1:1443\n"
    ));
    assert_eq!(code, Some(2));
    assert!(
        err.contains("intercept.ca_cert: missing") && err.contains("ca init"),
        "{err}"
    );
    // The CA certificate of `dir` with the key in `key_dir`, then `rest`.
    let with_ca = |key_dir: &std::path::Path, rest: &str| {
        format!(
            "{base}intercept:\n  ca_cert: {}\n  ca_key: {}\n{rest}",
            dir.path().join("ca.pem").display(),
            key_dir.join("ca-key.pem").display()
        )
    };
    // A key from another CA.
    let (other, _) = ca_init();
    let (code, err) = check(with_ca(
        other.path(),
        "  https_listen: 127.0.0.1:1443\n  hosts: [\"https://api.weixin.qq.com\"]\n",
    ));
    assert_eq!(code, Some(2));
    assert!(err.contains("intercept.hosts[0]"), "{err}");
    let (code, err) = check(with_ca(other.path(), "  proxy_listen: 127.0.0.1:8080\n"));
    assert_eq!(code, Some(2));
    assert!(err.contains("does not belong"), "{err}");
    let (code, err) = check(with_ca(dir.path(), "  proxy_listen: 127.0.0.1:8080\n"));
    assert_eq!(code, Some(2));
    assert!(
        err.contains("intercept.proxy_listen: 127.0.0.1:8080 is also `listen`"),
        "{err}"
    );
    // Off loopback, an intercept listener injects tokens for anyone who
    // reaches it: a credential is required, as for `listen`.
    for key in ["https_listen", "http_listen", "proxy_listen"] {
        let (code, err) = check(with_ca(dir.path(), &format!("  {key}: 0.0.0.0:1443\n")));
        assert_eq!(code, Some(2), "{key}");
        assert!(
            err.contains(&format!(
                "clients: intercept.{key} 0.0.0.0:1443 is not on loopback"
            )),
            "{err}"
        );
        let (code, err) = check(format!(
            "{}clients:\n  allow: [10.0.0.0/8]\n",
            with_ca(dir.path(), &format!("  {key}: 0.0.0.0:1443\n"))
        ));
        assert_eq!(code, Some(0), "{key} with clients: {err}");
    }
    // `check` and `check --print` show where the CA is, never its key.
    let good = with_ca(dir.path(), "  https_listen: 127.0.0.1:1443\n");
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("c.yaml");
    std::fs::write(&path, good).unwrap();
    let own_key = std::fs::read_to_string(dir.path().join("ca-key.pem")).unwrap();
    for print in [false, true] {
        let mut cmd = Command::new(BIN);
        cmd.args(["check", "--config"]).arg(&path);
        if print {
            cmd.arg("--print");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("ca.pem"), "{text}");
        assert!(!text.contains(own_key.lines().nth(1).unwrap()), "{text}");
    }
    let key = std::fs::read_to_string(other.path().join("ca-key.pem")).unwrap();
    assert!(
        !err.contains(key.lines().nth(1).unwrap()),
        "no key material in errors"
    );
}

#[test]
fn the_ca_must_cover_the_intercepted_hosts_and_a_ca_without_constraints_is_weaker() {
    let check = |ca_dir: &std::path::Path| {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("c.yaml");
        std::fs::write(
            &path,
            format!(
                "accounts:\n  - {{name: a, appid: wx0123456789abcdef, secret: s}}\nintercept:\n  ca_cert: {}\n  ca_key: {}\n  https_listen: 127.0.0.1:{}\n",
                ca_dir.join("ca.pem").display(),
                ca_dir.join("ca-key.pem").display(),
                free_port()
            ),
        )
        .unwrap();
        let out = Command::new(BIN)
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    // A CA for another domain cannot sign the WeChat hosts.
    let other = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["ca", "init", "--permit", "example.com", "--out"])
        .arg(other.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    let (ok, text) = check(other.path());
    assert!(!ok, "{text}");
    assert!(
        text.contains("intercept.hosts") && text.contains("--permit"),
        "{text}"
    );
    // A CA without name constraints (made elsewhere) still works, noted as weaker.
    let bare = tempfile::tempdir().unwrap();
    let issued = wxsidecar::certs::issue("some CA", &["x.example".into()], 30, None).unwrap();
    std::fs::write(bare.path().join("ca.pem"), &issued.ca_pem).unwrap();
    std::fs::write(bare.path().join("ca-key.pem"), &issued.ca_key_pem).unwrap();
    let (ok, text) = check(bare.path());
    assert!(ok, "{text}");
    assert!(text.contains("no name constraints"), "{text}");
}
