//! The edges under abuse: request targets in every spelling, secrets and
//! methods where they do not belong, tokens echoed back by an upstream,
//! framing on the streamed route, pipelining, informational floods.

use std::time::Duration;

use crate::raw::*;
use crate::support::*;

const QUIET: Duration = Duration::from_millis(1500);

fn get(target: &str) -> Vec<u8> {
    format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").into_bytes()
}

#[tokio::test]
async fn every_spelling_of_the_token_endpoint_is_answered_locally() {
    let fake = Fake::start(&[]);
    let side = Sidecar::start_standard(&fake, "classic", "stable").await;
    let fetches = fake.fetches(SHOP_APPID).await;
    let calls = fake.stats().await["api_calls"].clone();
    let token = side.token(SHOP_APPID, SHOP_SECRET).await;
    let q = format!("?grant_type=client_credential&appid={SHOP_APPID}&secret={SHOP_SECRET}");
    for path in [
        "//cgi-bin/token",
        "/cgi-bin/token/",
        "/CGI-BIN/token",
        "/cgi-bin/%74oken",
        "/cgi-bin/./token",
        "/cgi-bin/x/../token",
        "/./cgi-bin//token",
    ] {
        let answer = exchange(side.port, &get(&format!("{path}{q}")), QUIET);
        assert!(answer.starts_with("HTTP/1.1 200"), "{path}: {answer}");
        assert!(
            answer.contains(&token),
            "{path}: answered locally: {answer}"
        );
    }
    // `;x` and climbing above the root are refused; nothing went upstream.
    for path in [
        "/cgi-bin/token;x",
        "/cgi-bin/../../cgi-bin/token",
        "/cgi-bin/%zz",
    ] {
        let answer = exchange(side.port, &get(&format!("{path}{q}")), QUIET);
        assert!(answer.starts_with("HTTP/1.1 400"), "{path}: {answer}");
        assert!(answer.contains("\"errcode\""), "WeChat's shape: {answer}");
    }
    assert_eq!(
        fake.fetches(SHOP_APPID).await,
        fetches,
        "no token fetch reached WeChat"
    );
    assert_eq!(
        fake.stats().await["api_calls"],
        calls,
        "nothing was forwarded"
    );
    side.assert_log_clean(&[&token]);
}

#[tokio::test]
async fn sns_paths_in_any_spelling_are_left_untouched() {
    let fake = Fake::start(&[]);
    let side = Sidecar::start_standard(&fake, "classic", "stable").await;
    let ours = side.token(SHOP_APPID, SHOP_SECRET).await;
    for path in [
        "/cgi-bin/../sns/userinfo",
        "//sns/userinfo",
        "/%73ns/userinfo",
        "/./sns/userinfo",
    ] {
        let answer = exchange(
            side.port,
            &get(&format!("{path}?access_token=USER-OAUTH-TOKEN&openid=o1")),
            QUIET,
        );
        assert!(answer.starts_with("HTTP/1.1 200"), "{path}: {answer}");
        let seen = fake.last_request().await;
        assert_eq!(
            seen["path"], "/sns/userinfo",
            "{path}: the normalised path goes upstream"
        );
        assert_eq!(seen["access_token"], "USER-OAUTH-TOKEN", "{path}: {seen}");
        assert!(
            !seen["query"].as_str().unwrap().contains(&ours),
            "{path}: {seen}"
        );
    }
}

#[tokio::test]
async fn an_encoded_access_token_key_is_the_access_token() {
    let fake = Fake::start(&[]);
    let side = Sidecar::start_standard(&fake, "classic", "stable").await;
    let ours = side.token(SHOP_APPID, SHOP_SECRET).await;
    let (status, v) = side
        .send(
            &format!("/cgi-bin/message/template/send?access%5Ftoken={ours}&a=1"),
            TEMPLATE,
        )
        .await;
    assert_eq!((status, &v["errcode"]), (200, &serde_json::json!(0)), "{v}");
    let seen = fake.last_request().await;
    let query = seen["query"].as_str().unwrap();
    assert_eq!(
        query.matches("access").count(),
        1,
        "one access_token upstream, not two: {query}"
    );
    assert!(query.ends_with("&a=1") || query.contains("a=1"), "{query}");
}

#[tokio::test]
async fn a_secret_goes_only_where_wechat_takes_one() {
    let fake = Fake::start(&[]);
    let side = Sidecar::start_standard(&fake, "classic", "stable").await;
    let calls = fake.stats().await["api_calls"].clone();
    // In the query, in any spelling of the key.
    for q in ["secret=S", "appsecret=S", "CORPSECRET=S", "%73ecret=S"] {
        let (status, v) = side
            .send(&format!("/cgi-bin/message/template/send?{q}"), TEMPLATE)
            .await;
        assert_eq!(status, 400, "{q}: {v}");
        let msg = v["errmsg"].as_str().unwrap();
        assert!(
            msg.contains("appsecret") && msg.contains('`'),
            "names the parameter: {msg}"
        );
    }
    // In a form body.
    let r = client()
        .post(side.url("/cgi-bin/user/info"))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body("openid=o1&appsecret=S")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(fake.stats().await["api_calls"], calls, "none was forwarded");
    // Where WeChat takes one, it goes (untouched).
    let (status, _) = side
        .get("/sns/jscode2session?appid=wxapp&secret=S&js_code=c", &[])
        .await;
    assert_eq!(status, 200);
    let seen = fake.last_request().await;
    assert_eq!(seen["path"], "/sns/jscode2session");
}

#[tokio::test]
async fn only_wechats_methods_go_upstream_and_no_answer_carries_our_token() {
    let up = RawUpstream::start();
    let side = Sidecar::start_bare(&up.config("")).await;
    for method in ["TRACE", "PUT", "DELETE", "OPTIONS", "PATCH"] {
        let answer = exchange(
            side.port,
            format!("{method} /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            QUIET,
        );
        assert!(answer.starts_with("HTTP/1.1 405"), "{method}: {answer}");
        assert!(answer.contains("43002"), "WeChat's shape: {answer}");
    }
    assert!(up.api_requests().is_empty(), "{:?}", up.api_requests());

    // A redirect that keeps the query, and an echo of the target: the
    // token went upstream, never back to the app.
    let answer = exchange(side.port, &get("/redirect/x?a=1"), QUIET);
    assert!(answer.starts_with("HTTP/1.1 302"), "{answer}");
    assert!(!answer.contains(RAW_TOKEN), "{answer}");
    assert!(
        !answer.to_ascii_lowercase().contains("location:"),
        "{answer}"
    );
    let answer = exchange(side.port, &get("/echo/x?a=1"), QUIET);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(!answer.contains(RAW_TOKEN), "{answer}");
    // The streamed route too.
    let answer = exchange(side.port, &streamed("/cgi-bin/media/redirect?a=1"), QUIET);
    assert!(answer.contains(" 302 "), "{answer}");
    assert!(!answer.contains(RAW_TOKEN), "{answer}");
    let sent = up.api_requests();
    assert!(
        sent.iter().all(|r| r.contains(RAW_TOKEN)),
        "the token did go upstream: {sent:?}"
    );
    assert!(!side.log().contains(RAW_TOKEN), "never logged");
}

/// The status line is ours on both fronts (the upstream's reason phrase is
/// its own text: an echo of the target would carry our token), and a token
/// percent-encoded in a header is masked like a plain one.
#[tokio::test]
async fn the_status_line_is_ours_and_an_encoded_token_is_masked_too() {
    let up = RawUpstream::start();
    let side = Sidecar::start_bare(&up.config("")).await;
    for (front, ask) in [
        ("fast lane", get as fn(&str) -> Vec<u8>),
        ("pingora", handed_off),
    ] {
        let answer = exchange(side.port, &ask("/cgi-bin/reason/x?a=1"), QUIET);
        assert!(
            answer.starts_with("HTTP/1.1 200 OK\r\n"),
            "{front}: {answer}"
        );
        assert!(!answer.contains(RAW_TOKEN), "{front}: {answer}");
        let answer = exchange(side.port, &ask("/cgi-bin/pct-redirect/x?a=1"), QUIET);
        assert!(
            answer.starts_with("HTTP/1.1 302 Found\r\n"),
            "{front}: {answer}"
        );
        assert!(!answer.contains(RAW_TOKEN), "{front}: {answer}");
        assert!(
            !answer.to_ascii_lowercase().contains("location:"),
            "{front}: {answer}"
        );
    }
    let sent = up.api_requests();
    assert!(
        sent.iter().any(|r| r.contains("/cgi-bin/reason/x?")),
        "{sent:?}"
    );
    assert!(
        sent.iter().all(|r| r.contains(RAW_TOKEN)),
        "the token did go upstream: {sent:?}"
    );
    assert!(!side.log().contains(RAW_TOKEN), "never logged");
}

/// Writes `request` in two pieces, apart (the head is not whole in the
/// first read, so it is read on before either front sees it).
fn exchange_split(port: u16, request: &[u8], at: usize) -> String {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(&request[..at]).unwrap();
    std::thread::sleep(Duration::from_millis(150));
    // The sidecar may have answered and closed already.
    let _ = s.write_all(&request[at..]);
    read_until_quiet(&mut s, QUIET)
}

/// Both fronts take exactly what RFC 9112 allows: a malformed request
/// line, a missing Host, a control byte or raw non-ASCII in the target are
/// answered 400 naming what is wrong, in one packet or split, on the fast
/// lane's way (a plain GET or POST) and pingora's (a chunked body), and
/// nothing of them goes upstream.
#[tokio::test]
async fn both_fronts_refuse_what_rfc_9112_refuses_and_forward_nothing() {
    let up = RawUpstream::start();
    let side = Sidecar::start_bare(&up.config("")).await;
    let fast = |line: &str, host: &str| {
        format!("{line}\r\n{host}Content-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}").into_bytes()
    };
    let full = |line: &str, host: &str| {
        format!("{line}\r\n{host}Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n").into_bytes()
    };
    const SEND: &str = "/cgi-bin/message/template/send";
    let host = "Host: x\r\n";
    let cases: Vec<(String, &str, &str)> = vec![
        (format!("POST  {SEND} HTTP/1.1"), host, "one space apart"),
        (format!("POST {SEND}  HTTP/1.1"), host, "one space apart"),
        (format!("POST {SEND} HTTP/1.1"), "", "must carry a Host"),
        (
            "POST /cgi-bin/a%00b HTTP/1.1".into(),
            host,
            "percent-encoded control",
        ),
        (
            "POST /cgi-bin/a\0b HTTP/1.1".into(),
            host,
            "control character in the request target",
        ),
        ("POST /cgi-bin/a\rb HTTP/1.1".into(), host, "lone CR"),
        (
            format!("POST {SEND}?q=caf\u{e9} HTTP/1.1"),
            host,
            "non-ASCII",
        ),
    ];
    for (front, build) in [
        ("fast lane", &fast as &dyn Fn(&str, &str) -> Vec<u8>),
        ("pingora", &full),
    ] {
        // The same request, well formed: served (so a refusal below is the head's).
        let good = build(&format!("POST {SEND} HTTP/1.1"), host);
        let answer = exchange(side.port, &good, QUIET);
        assert!(answer.starts_with("HTTP/1.1 200 "), "{front}: {answer}");
        let before = up.api_requests().len();
        for (line, host, why) in &cases {
            let bytes = build(line, host);
            for (how, answer) in [
                ("one packet", exchange(side.port, &bytes, QUIET)),
                ("split", exchange_split(side.port, &bytes, 12)),
            ] {
                assert!(
                    answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
                    "{front}, {how}, {line:?}: {answer}"
                );
                assert!(answer.contains(why), "{front}, {how}, {line:?}: {answer}");
                assert!(answer.contains("40035"), "WeChat's shape: {answer}");
            }
        }
        assert_eq!(
            up.api_requests().len(),
            before,
            "{front}: forwarded {:?}",
            &up.api_requests()[before..]
        );
    }
}

/// The body of an HTTP/1.1 answer, chunked framing undone; and its head.
fn head_and_body(answer: &str) -> (&str, String) {
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((answer, ""));
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return (head, body.to_string());
    }
    let (mut out, mut rest) = (String::new(), body);
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap();
        if n == 0 {
            break;
        }
        out.push_str(&after[..n]);
        rest = &after[n + 2..];
    }
    (head, out)
}

/// A request the streamed route serves: on a media path with a chunked
/// body (not one the sidecar could keep and send again).
fn streamed(target: &str) -> Vec<u8> {
    format!("POST {target} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n").into_bytes()
}

/// A request pingora's path serves (a chunked body is handed off).
fn handed_off(target: &str) -> Vec<u8> {
    format!("POST {target} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n2\r\n{{}}\r\n0\r\n\r\n").into_bytes()
}

/// An answer too large to buffer goes to the app piece by piece: our token
/// is masked in it too, also where it is split between two pieces, and a
/// declared length stays true (the mask is as long as the token). On the
/// fast lane, on pingora's path and on the streamed (media) route.
#[tokio::test]
async fn a_streamed_answer_carries_no_token_either() {
    let up = RawUpstream::start();
    let side = Sidecar::start_bare(&up.config("limits:\n  buffered_body: 4KiB\n")).await;
    let mask = format!("access_token={}", "*".repeat(RAW_TOKEN.len()));
    let asks = [
        (
            "fast lane, declared length",
            get("/cgi-bin/echo/x?a=1&size=10000"),
        ),
        (
            "fast lane, 7-byte pieces",
            get("/cgi-bin/chunked/x?size=10000&echo=1"),
        ),
        (
            "pingora's path, declared length",
            handed_off("/cgi-bin/echo/x?a=1&size=10000"),
        ),
        (
            "pingora's path, 7-byte pieces",
            handed_off("/cgi-bin/chunked/x?size=10000&echo=1"),
        ),
        (
            "streamed route",
            streamed("/cgi-bin/media/echo?a=1&size=10000"),
        ),
        (
            "streamed route, 7-byte pieces",
            streamed("/cgi-bin/media/chunked?size=10000&echo=1"),
        ),
    ];
    for (what, ask) in asks {
        let answer = exchange(side.port, &ask, QUIET);
        let (head, body) = head_and_body(&answer);
        assert!(head.starts_with("HTTP/1.1 200"), "{what}: {head}");
        assert!(body.len() > 10_000, "{what}: whole: {head}");
        assert!(
            !body.contains(RAW_TOKEN),
            "{what}: the token reached the app"
        );
        assert!(
            body.contains(&mask),
            "{what}: masked in place: {}",
            &body[..200]
        );
        assert!(
            body.ends_with("x\"}") || body.ends_with("x\"}}"),
            "{what}: {}",
            &body[body.len() - 50..]
        );
        let declared = head.lines().find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().to_string())
        });
        if let Some(n) = declared {
            assert_eq!(
                n.parse::<usize>().unwrap(),
                body.len(),
                "{what}: length kept"
            );
        }
    }
    let sent = up.api_requests();
    assert!(
        sent.len() >= 6 && sent.iter().all(|r| r.contains(RAW_TOKEN)),
        "the token did go upstream: {sent:?}"
    );
    assert!(side
        .log()
        .contains("an upstream answer carried our token; masked"));
    assert!(!side.log().contains(RAW_TOKEN), "never logged");
}

/// A whitelist refusal's errmsg (WeChat names our egress IP in it) is kept
/// for `/status`: an upstream echoing our token in it has it masked there,
/// on either path.
#[tokio::test]
async fn a_refusal_kept_for_status_carries_no_token() {
    let up = RawUpstream::start();
    let side = Sidecar::start_bare(&up.config("")).await;
    let refused = [
        get("/cgi-bin/echo/x?errcode=40164"),
        handed_off("/cgi-bin/echo/x?errcode=40164"),
    ];
    for ask in refused {
        let answer = exchange(side.port, &ask, QUIET);
        assert!(
            answer.contains("40164") && !answer.contains(RAW_TOKEN),
            "{answer}"
        );
        let st = side.status().await.to_string();
        assert!(
            st.contains("echo /cgi-bin/echo/x"),
            "the refusal is shown: {st}"
        );
        assert!(!st.contains(RAW_TOKEN), "{st}");
    }
    assert!(up.api_requests().iter().all(|r| r.contains(RAW_TOKEN)));
}

/// A chunked body whose framing is wrong is the app's error: 400 (WeChat's
/// 40035) naming it, the connection closed (where the body ends is
/// unknown), nothing of it sent on; on the JSON API and the streamed route.
#[tokio::test]
async fn a_malformed_chunked_body_is_a_400() {
    let up = RawUpstream::start();
    let side = Sidecar::start_bare(&up.config("")).await;
    for (target, framing) in [
        ("/cgi-bin/message/template/send", "zz\r\n{}\r\n0\r\n\r\n"),
        (
            "/cgi-bin/message/template/send",
            "ffffffffffffffffff\r\n{}\r\n0\r\n\r\n",
        ),
        ("/cgi-bin/media/upload?type=image", "zz\r\n{}\r\n0\r\n\r\n"),
    ] {
        let ask = format!(
            "POST {target} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{framing}"
        );
        let answer = exchange(side.port, ask.as_bytes(), QUIET);
        let what = &framing[..framing.len().min(20)];
        assert!(
            answer.starts_with("HTTP/1.1 400"),
            "{target} {what:?}: {answer}"
        );
        assert!(
            answer.contains("40035") && answer.contains("chunked request body is malformed"),
            "{answer}"
        );
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "{answer}"
        );
    }
    assert!(
        up.api_requests()
            .iter()
            .all(|r| !r.contains("template/send")),
        "{:?}",
        up.api_requests()
    );
}

/// A token answer claiming to live 2^64 - 1 seconds (a broken or hostile
/// upstream) is believed for a day: the real binary stays up, becomes ready,
/// serves with it and shows it expiring within the day (the sum once
/// overflowed the clock in the refresh scheduler).
#[tokio::test]
async fn an_endless_token_lifetime_is_a_day() {
    let up = RawUpstream::start();
    let cfg = up.config("").replace(RAW_APPID, RAW_ENDLESS_APPID);
    let side = Sidecar::start_bare(&cfg).await;
    let answer = exchange(side.port, &get("/cgi-bin/echo/x?a=1"), QUIET);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let st = side.status().await;
    let left = st["accounts"][0]["token_expires_in_seconds"]
        .as_u64()
        .unwrap();
    assert!((86_000..=86_400).contains(&left), "{st}");
    assert!(!side.log().contains("panicked"));
}

/// What goes back to the app is a well-formed HTTP/1.1 answer: a status
/// outside 200–599 (000, 099, 600, 999) or a 101 we never asked for is a
/// 502, never passed on; headers the upstream's `Connection` names are
/// dropped as hop-by-hop (and the app's, on the way up). Fast lane,
/// pingora's path and the streamed route.
#[tokio::test]
async fn answers_go_back_well_formed() {
    let up = RawUpstream::start();
    let side = Sidecar::start_bare(&up.config("")).await;
    for code in ["000", "099", "101", "600", "999"] {
        let target = format!("/cgi-bin/status/{code}");
        for ask in [get(&target), handed_off(&target)] {
            let answer = exchange(side.port, &ask, QUIET);
            assert!(answer.starts_with("HTTP/1.1 502"), "{code}: {answer}");
            assert!(answer.contains("\"errcode\":-1"), "{answer}");
        }
        let media = format!("/cgi-bin/media/status/{code}");
        let answer = exchange(side.port, &streamed(&media), QUIET);
        assert!(
            answer.starts_with("HTTP/1.1 502"),
            "streamed {code}: {answer}"
        );
    }
    for ask in [
        get("/cgi-bin/hop"),
        handed_off("/cgi-bin/hop"),
        streamed("/cgi-bin/media/hop"),
    ] {
        let answer = exchange(side.port, &ask, QUIET);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let lower = answer.to_ascii_lowercase();
        assert!(!lower.contains("x-hop"), "{answer}");
        assert!(
            lower.contains("set-cookie: a=b"),
            "end-to-end headers stay: {answer}"
        );
    }
    // The app's own: a header its Connection names stays with us.
    let ask = b"POST /cgi-bin/echo HTTP/1.1\r\nHost: x\r\nConnection: X-App-Hop, close\r\nX-App-Hop: mine\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n";
    let answer = exchange(side.port, ask, QUIET);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let sent = up.api_requests();
    let echo = sent
        .iter()
        .rev()
        .find(|r| r.contains("/cgi-bin/echo"))
        .unwrap();
    assert!(!echo.to_ascii_lowercase().contains("x-app-hop"), "{echo}");
}

/// Every answer is read here (its errcode for the replay, our token to
/// mask), so WeChat is asked for answers as they are (`Accept-Encoding:
/// identity`, the app's own stays with us), and a coded answer anyway (it
/// would hide an echoed token from the mask) is a 502. Fast lane, pingora's
/// path, media.
#[tokio::test]
async fn answers_are_asked_for_uncompressed() {
    let up = RawUpstream::start();
    let side = Sidecar::start_bare(&up.config("")).await;
    let with = |ask: Vec<u8>| {
        String::from_utf8(ask).unwrap().replacen(
            "Host: x\r\n",
            "Host: x\r\nAccept-Encoding: gzip, br\r\n",
            1,
        )
    };
    for ask in [
        with(get("/cgi-bin/echo/gz?a=1")),
        with(handed_off("/cgi-bin/echo/gz?a=2")),
        with(streamed("/cgi-bin/media/echo/gz?a=3")),
    ] {
        let answer = exchange(side.port, ask.as_bytes(), QUIET);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    let sent: Vec<String> = up
        .api_requests()
        .into_iter()
        .filter(|r| r.contains("/gz?"))
        .collect();
    assert_eq!(sent.len(), 3, "{sent:?}");
    for r in sent {
        let lower = r.to_ascii_lowercase();
        assert_eq!(lower.matches("accept-encoding").count(), 1, "{r}");
        assert!(lower.contains("accept-encoding: identity\r\n"), "{r}");
    }
    for ask in [
        get("/cgi-bin/gzipped?a=1"),
        handed_off("/cgi-bin/gzipped?a=2"),
        streamed("/cgi-bin/media/gzipped?a=3"),
    ] {
        let answer = exchange(side.port, &ask, QUIET);
        assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
        assert!(!answer.contains(RAW_TOKEN), "{answer}");
    }
}

#[tokio::test]
async fn the_streamed_route_frames_what_it_forwards() {
    let up = RawUpstream::start();
    let side = Sidecar::start_bare(&up.config("")).await;
    let upload = |cl: &str| {
        format!(
            "POST /cgi-bin/media/upload?type=image HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n{cl}Connection: close\r\n\r\nhello"
        )
        .into_bytes()
    };
    for cl in [
        "Content-Length: 5\r\nContent-Length: 7\r\n",
        "Content-Length: 5, 7\r\n",
        "Content-Length: five\r\n",
    ] {
        let answer = exchange(side.port, &upload(cl), QUIET);
        assert!(answer.starts_with("HTTP/1.1 400"), "{cl:?}: {answer}");
    }
    assert!(up.api_requests().is_empty(), "{:?}", up.api_requests());
    // The same number twice is one Content-Length upstream.
    for cl in [
        "Content-Length: 5\r\nContent-Length: 5\r\n",
        "Content-Length: 5, 5\r\n",
    ] {
        let answer = exchange(side.port, &upload(cl), QUIET);
        assert!(answer.starts_with("HTTP/1.1 200"), "{cl:?}: {answer}");
        let sent = up.api_requests().pop().unwrap();
        let lengths: Vec<&str> = sent
            .lines()
            .filter(|l| l.to_ascii_lowercase().starts_with("content-length"))
            .collect();
        assert_eq!(lengths.len(), 1, "{sent}");
        assert!(lengths[0].ends_with(" 5"), "{sent}");
        assert!(sent.ends_with("hello"), "{sent}");
    }
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let fake = Fake::start(&[]);
    let side = Sidecar::start_standard(&fake, "classic", "stable").await;
    let mut wire = Vec::new();
    for i in 0..3 {
        let body = TEMPLATE.replace("oUSER123", &format!("oPIPE{i}"));
        wire.extend_from_slice(
            format!(
                "POST /cgi-bin/message/template/send HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
    }
    wire.extend_from_slice(&get(&format!(
        "/cgi-bin/token?grant_type=client_credential&appid={SHOP_APPID}&secret={SHOP_SECRET}"
    )));
    let answer = exchange(side.port, &wire, QUIET);
    assert_eq!(statuses(&answer), [200, 200, 200, 200], "{answer}");
    assert_eq!(answer.matches("\"msgid\"").count(), 3, "{answer}");
    assert!(
        answer.contains("access_token"),
        "the last one is the token answer: {answer}"
    );
}

#[tokio::test]
async fn an_informational_flood_from_upstream_ends_in_502() {
    let up = RawUpstream::start();
    let side = Sidecar::start_bare(&up.config("")).await;
    // The JSON route reads a few, then gives up.
    let answer = exchange(
        side.port,
        b"POST /flood HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
        QUIET,
    );
    assert_eq!(statuses(&answer), [502], "{answer}");
    // The streamed route passes at most a few to the app, then 502 or a close.
    let answer = exchange(side.port, &streamed("/cgi-bin/media/flood"), QUIET);
    let seen = statuses(&answer);
    let informational = seen.iter().filter(|s| **s == 100).count();
    assert!(
        informational <= 8,
        "{informational} informational answers passed on"
    );
    assert!(!seen.contains(&200), "the flood never ends well: {seen:?}");
}

#[tokio::test]
async fn the_fast_lane_serves_the_common_request_and_hands_off_the_rest() {
    let up = RawUpstream::start();
    let side = Sidecar::start_bare(&up.config("limits:\n  buffered_body: 4KiB\n")).await;
    let lane = |r: &'static str| {
        let side = &side;
        async move {
            side.metric(&format!("wxsidecar_fast_lane_total{{result=\"{r}\"}}"))
                .await
        }
    };
    let body = r#"{"touser":"o1","template_id":"T"}"#;
    let post = |extra: &str| {
        format!(
            "POST /cgi-bin/message/template/send HTTP/1.1\r\nHost: app\r\nX-Wx-Account: raw\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    // Served by the lane: exactly what WeChat should get, one answer back.
    let answer = exchange(side.port, &post("Connection: close\r\n"), QUIET);
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(
        answer.contains("Content-Length: 27\r\n")
            && answer.ends_with(r#"{"errcode":0,"errmsg":"ok"}"#),
        "{answer}"
    );
    assert_eq!(lane("served").await, 1.0);
    let sent = up.api_requests().pop().unwrap();
    assert!(
        sent.starts_with(&format!(
            "POST /cgi-bin/message/template/send?access_token={RAW_TOKEN} HTTP/1.1\r\n"
        )),
        "{sent}"
    );
    assert!(
        sent.contains(&format!("Host: 127.0.0.1:{}\r\n", up.port)),
        "{sent}"
    );
    assert!(
        !sent.to_ascii_lowercase().contains("x-wx-account"),
        "{sent}"
    );
    assert!(!sent.to_ascii_lowercase().contains("connection:"), "{sent}");
    assert_eq!(sent.matches("Content-Length").count(), 1, "{sent}");
    assert!(sent.ends_with(body), "{sent}");

    // A chunked answer (trailer and all) comes back with a length; a big
    // one streams through and closes.
    let answer = exchange(side.port, &get("/cgi-bin/chunked/x"), QUIET);
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(
        answer.ends_with(r#"{"errcode":0,"errmsg":"ok","chunked":true}"#),
        "{answer}"
    );
    assert!(
        !answer.to_ascii_lowercase().contains("transfer-encoding"),
        "{answer}"
    );
    let answer = exchange(side.port, &get("/cgi-bin/chunked/x?size=10000"), QUIET);
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(
        answer.ends_with(&format!("{}\"}}", "x".repeat(100))),
        "{}",
        &answer[..300]
    );
    assert_eq!(lane("served").await, 3.0);

    // Ambiguous framing and unusual requests go to the full path, which
    // answers them as it always did.
    let before = lane("handed_off").await;
    let cases: [Vec<u8>; 3] = [
        post("Transfer-Encoding: chunked\r\n"),
        post(&format!("Content-Length: {}\r\n", body.len())),
        get("/cgi-bin/%75ser/info"),
    ];
    for wire in &cases {
        let _ = exchange(side.port, wire, Duration::from_millis(300));
    }
    assert_eq!(lane("handed_off").await - before, cases.len() as f64);
    // What RFC 9112 refuses reaches neither front (`head`): 400.
    for wire in [post("X-A: 1\r\n folded\r\n"), post("X-A: 1\n")] {
        let answer = exchange(side.port, &wire, Duration::from_millis(300));
        assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    }
    assert_eq!(lane("handed_off").await - before, cases.len() as f64);
    assert_eq!(lane("served").await, 3.0);

    // Pipelined requests: each served in turn on one connection.
    let mut wire = post("");
    wire.extend_from_slice(&post(""));
    wire.extend_from_slice(&get("/cgi-bin/user/info?openid=o1"));
    let answer = exchange(side.port, &wire, QUIET);
    assert_eq!(statuses(&answer), [200, 200, 200], "{answer}");
    assert_eq!(lane("served").await, 6.0);
    assert!(!answer.contains(RAW_TOKEN) && !side.log().contains(RAW_TOKEN));
}
