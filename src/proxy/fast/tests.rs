//! The fast lane's parser: what it takes, what it leaves to pingora, and a
//! differential run against pingora's own HTTP/1.1 parser — whatever the
//! lane takes, pingora must read the same way (same method, target,
//! headers and body), so no request means one thing to the lane and
//! another to the path that would otherwise serve it.

use rand::{Rng, SeedableRng};

use super::*;

const LIMIT: usize = 1 << 20;
const BODY: &str = r#"{"touser":"o1","template_id":"T","data":{}}"#;

/// What the lane takes of `data`, as it gets it: behind the guard's
/// RFC 9112 check (`head::check`), which refuses a malformed head first.
fn lane_takes(data: &[u8], body_limit: usize) -> Option<Head<'_>> {
    crate::head::check(data).ok()?;
    parse(data, body_limit)
}

fn post(extra: &str) -> String {
    format!(
        "POST /cgi-bin/message/template/send HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n{BODY}",
        BODY.len()
    )
}

#[test]
fn takes_the_common_request() {
    let text = post("X-Wx-Account: shop\r\n");
    let h = lane_takes(text.as_bytes(), LIMIT).expect("taken");
    assert!(h.post);
    assert_eq!(h.path, "/cgi-bin/message/template/send");
    assert_eq!(h.query, None);
    assert_eq!(h.account, Some("shop"));
    assert_eq!(h.body, BODY.as_bytes());
    assert_eq!(h.used, text.len());
    assert!(!h.close);
    let names: Vec<&str> = h.forward.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names,
        ["Content-Type"],
        "Host, length and account stay ours"
    );

    let get = "GET /cgi-bin/user/info?openid=o1&lang=zh_CN HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let h = lane_takes(get.as_bytes(), LIMIT).expect("taken");
    assert_eq!(
        (h.post, h.query, h.close),
        (false, Some("openid=o1&lang=zh_CN"), true)
    );

    // A pipelined next request stays for the next round.
    let two = format!("{text}{get}");
    assert_eq!(lane_takes(two.as_bytes(), LIMIT).unwrap().used, text.len());
}

#[test]
fn leaves_everything_unusual_to_pingora() {
    let cl = BODY.len();
    let cases = [
        ("chunked", post("Transfer-Encoding: chunked\r\n")),
        (
            "CL and TE",
            "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\nabc".to_string(),
        ),
        ("two lengths", post(&format!("Content-Length: {cl}\r\n"))),
        ("length with sign", "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\nabc".to_string()),
        ("obs-fold", post("X-A: 1\r\n  folded\r\n")),
        ("bare LF", post("X-A: 1\n")),
        ("expect", post("Expect: 100-continue\r\n")),
        ("upgrade", post("Connection: upgrade\r\nUpgrade: websocket\r\n")),
        ("HTTP/1.0", post("").replacen("HTTP/1.1", "HTTP/1.0", 1)),
        ("HEAD", "HEAD /a HTTP/1.1\r\nHost: x\r\n\r\n".into()),
        ("escape in path", "GET /cgi-bin/%74oken HTTP/1.1\r\nHost: x\r\n\r\n".into()),
        ("dot segment", "GET /cgi-bin/../token HTTP/1.1\r\nHost: x\r\n\r\n".into()),
        ("double slash", "GET //cgi-bin/token HTTP/1.1\r\nHost: x\r\n\r\n".into()),
        ("empty segment", "GET /cgi-bin//token HTTP/1.1\r\nHost: x\r\n\r\n".into()),
        ("dot segment at the end", "GET /cgi-bin/. HTTP/1.1\r\nHost: x\r\n\r\n".into()),
        ("dot-dot at the end", "GET /cgi-bin/.. HTTP/1.1\r\nHost: x\r\n\r\n".into()),
        ("parameters", "GET /cgi-bin/a;b HTTP/1.1\r\nHost: x\r\n\r\n".into()),
        ("absolute form", "GET http://x/cgi-bin/a HTTP/1.1\r\nHost: x\r\n\r\n".into()),
        ("body still to come", post("").trim_end_matches('}').to_string()),
        ("GET with a body", "GET /a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}".into()),
        ("POST without a length", "POST /a HTTP/1.1\r\nHost: x\r\n\r\n".into()),
        ("no host", "GET /a HTTP/1.1\r\n\r\n".into()),
        ("two hosts", "GET /a HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n".into()),
        ("non-ASCII value", post("X-A: caf\u{e9}\r\n")),
        ("control in value", post("X-A: a\x01b\r\n")),
        ("multipart", post("").replace("application/json", "multipart/form-data; boundary=x")),
        ("form", post("").replace("application/json", "application/x-www-form-urlencoded")),
        ("signed callback", post("Wechatmp-Signature: abc\r\n")),
        ("two accounts", post("X-Wx-Account: a\r\nX-Wx-Account: b\r\n")),
        ("keep-alive header", post("Keep-Alive: timeout=5\r\n")),
    ];
    for (what, text) in cases {
        assert!(
            lane_takes(text.as_bytes(), LIMIT).is_none(),
            "{what} was taken:\n{text}"
        );
    }
    assert!(
        lane_takes(post("").as_bytes(), 10).is_none(),
        "over the body limit"
    );
}

/// What pingora's HTTP/1.1 server session reads from `bytes`: method,
/// target, headers and body; `None` when it refuses the request.
async fn pingora_reads(bytes: &[u8]) -> Option<(String, String, Vec<(String, Vec<u8>)>, Vec<u8>)> {
    use pingora::protocols::http::ServerSession;
    let stream: Stream = Box::new(std::io::Cursor::new(bytes.to_vec()));
    let mut s = ServerSession::new_http1(stream);
    if !matches!(s.read_request().await, Ok(true)) {
        return None;
    }
    let req = s.req_header();
    let method = req.method.to_string();
    let target = String::from_utf8_lossy(req.raw_path()).into_owned();
    let headers = req
        .headers
        .iter()
        .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
        .collect();
    let mut body = Vec::new();
    loop {
        match s.read_request_body().await {
            Ok(Some(b)) => body.extend_from_slice(&b),
            Ok(None) => break,
            Err(_) => return None,
        }
    }
    Some((method, target, headers, body))
}

/// A random change to a request: a byte that matters to HTTP/1.1 framing
/// put somewhere, a line doubled, a length changed.
fn mutate(rng: &mut rand::rngs::StdRng, text: &[u8]) -> Vec<u8> {
    const NASTY: &[&[u8]] = &[
        b"\r",
        b"\n",
        b"\r\n",
        b" ",
        b"\t",
        b":",
        b"\0",
        b"\x7f",
        b"\xff",
        b"%2e",
        b"/../",
        b"//",
        b";",
        b"?",
        b"#",
        b",",
        b"\r\n ",
        b"\r\nContent-Length: 5",
        b"\r\nTransfer-Encoding: chunked",
        b"\r\nHost: y",
        b"\r\nConnection: close",
        b"\r\nX-Wx-Account: shop",
        b"0",
        b"9",
    ];
    let mut out = text.to_vec();
    for _ in 0..rng.gen_range(1..=3) {
        match rng.gen_range(0..4) {
            0 => {
                let at = rng.gen_range(0..=out.len());
                let piece = NASTY[rng.gen_range(0..NASTY.len())];
                out.splice(at..at, piece.iter().copied());
            }
            1 if !out.is_empty() => {
                let at = rng.gen_range(0..out.len());
                out.remove(at);
            }
            2 if !out.is_empty() => {
                let at = rng.gen_range(0..out.len());
                out[at] = NASTY[rng.gen_range(0..NASTY.len())][0];
            }
            _ => {
                // Double one header line.
                let text = String::from_utf8_lossy(&out).into_owned();
                let lines: Vec<&str> = text.split("\r\n").collect();
                if lines.len() > 2 {
                    let i = rng.gen_range(1..lines.len() - 1);
                    let mut l = lines.clone();
                    l.insert(i, lines[i]);
                    out = l.join("\r\n").into_bytes();
                }
            }
        }
    }
    out
}

#[tokio::test]
async fn whatever_the_lane_takes_pingora_reads_the_same() {
    let seeds = [
        post(""),
        post("X-Wx-Account: shop\r\nAuthorization: Bearer abc\r\n"),
        "GET /cgi-bin/user/info?openid=o1&access_token=T HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n".to_string(),
        "GET /sns/jscode2session?appid=a&js_code=c HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n".to_string(),
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let (mut taken, mut compared) = (0, 0);
    for round in 0..4000 {
        let seed = seeds[round % seeds.len()].as_bytes();
        let bytes = if round < seeds.len() {
            seed.to_vec()
        } else {
            mutate(&mut rng, seed)
        };
        let Some(head) = lane_takes(&bytes, LIMIT) else {
            continue;
        };
        taken += 1;
        // pingora reads the request the lane took, and nothing after it.
        let Some((method, target, headers, body)) = pingora_reads(&bytes[..head.used]).await else {
            panic!(
                "the lane took what pingora refuses:\n{:?}",
                String::from_utf8_lossy(&bytes)
            );
        };
        compared += 1;
        let shown = String::from_utf8_lossy(&bytes).into_owned();
        assert_eq!(method, if head.post { "POST" } else { "GET" }, "{shown:?}");
        let ours = match head.query {
            Some(q) => format!("{}?{q}", head.path),
            None => head.path.to_string(),
        };
        assert_eq!(target, ours, "{shown:?}");
        assert_eq!(body, head.body, "{shown:?}");
        for (name, value) in &head.forward {
            assert!(
                headers
                    .iter()
                    .any(|(n, v)| n.eq_ignore_ascii_case(name) && v == value),
                "{name} differs: {shown:?}"
            );
        }
        // pingora sees no framing header the lane ignored.
        for (n, _) in &headers {
            assert!(
                !["transfer-encoding", "expect", "upgrade"].contains(&n.as_str()),
                "{n} in a taken request: {shown:?}"
            );
        }
        let lengths = headers
            .iter()
            .filter(|(n, _)| n == "content-length")
            .count();
        assert!(lengths <= 1, "{shown:?}");
    }
    assert!(taken > 200 && compared == taken, "taken {taken}");
}

#[test]
fn plain_segments_are_what_a_normaliser_leaves_alone() {
    for ok in [
        "/",
        "/cgi-bin/token",
        "/cgi-bin/x/",
        "/a/.b/c..",
        "/a/...",
        "/.well-known",
    ] {
        assert!(super::segments_plain(ok), "{ok}");
    }
    for bad in [
        "//", "//a", "/a//b", "/a/./b", "/a/../b", "/.", "/..", "/a/.", "/a/..", "/a//",
    ] {
        assert!(!super::segments_plain(bad), "{bad}");
    }
}

#[test]
fn the_byte_tables_hold_exactly_the_listed_bytes() {
    for b in 0..=255u8 {
        let path = b.is_ascii_alphanumeric() || b"/-._~!$&'()*+,=:@".contains(&b);
        assert_eq!(super::path_byte_ok(b), path, "path byte {b:#x}");
        assert_eq!(
            super::query_byte_ok(b),
            path || b == b'%' || b == b'?',
            "query byte {b:#x}"
        );
    }
}

#[test]
fn the_h2_request_is_the_lanes_request() {
    use crate::upstream::Outgoing;
    let authority = http::uri::Authority::from_static("api.weixin.qq.com");
    let text = post("X-Trace: t1\r\n");
    let h = lane_takes(text.as_bytes(), LIMIT).expect("taken");
    let plan = crate::pipeline::Plan::untouched(crate::config::Family::Official);
    let out = crate::pipeline::outgoing(&h, &plan);
    let req = out.to_h2(&authority).expect("valid for HTTP/2");
    assert_eq!(req.method(), http::Method::POST);
    assert_eq!(req.version(), http::Version::HTTP_2);
    assert_eq!(
        req.uri().to_string(),
        "https://api.weixin.qq.com/cgi-bin/message/template/send"
    );
    let names: Vec<&str> = req.headers().keys().map(|n| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "content-type",
            "x-trace",
            "accept-encoding",
            "content-length"
        ],
        "no Host (it is :authority), names in lower case, answers asked for as they are"
    );
    assert_eq!(req.headers()["accept-encoding"], "identity");
    assert_eq!(
        req.headers()["content-length"],
        BODY.len().to_string().as_str()
    );
    assert!(!out.idempotent(), "a POST may not be sent twice");
    let mut h1 = Vec::new();
    out.h1_head(&mut h1).expect("valid for HTTP/1.1");
    assert_eq!(
        String::from_utf8(h1).unwrap(),
        format!(
            "POST /cgi-bin/message/template/send HTTP/1.1\r\nContent-Type: application/json\r\nX-Trace: t1\r\nContent-Length: {}\r\n",
            BODY.len()
        ),
        "the request line, the app's headers, our length: Host and Accept-Encoding are the host's to add"
    );

    let get = "GET /cgi-bin/user/info?openid=o1&lang=zh_CN HTTP/1.1\r\nHost: x\r\n\r\n";
    let h = lane_takes(get.as_bytes(), LIMIT).expect("taken");
    let plan = crate::pipeline::Plan::untouched(crate::config::Family::Official);
    let out = crate::pipeline::outgoing(&h, &plan);
    let req = out.to_h2(&authority).expect("valid for HTTP/2");
    assert_eq!(req.method(), http::Method::GET);
    assert_eq!(
        req.uri().path_and_query().unwrap().as_str(),
        "/cgi-bin/user/info?openid=o1&lang=zh_CN"
    );
    assert!(
        req.headers().get("content-length").is_none(),
        "a GET without a body has no length"
    );
    assert_eq!(req.headers().len(), 1, "{:?}", req.headers());
    assert!(out.idempotent());
}
