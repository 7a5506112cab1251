//! When things go wrong: upstream down or slow, bodies too large. The app
//! gets a WeChat-shaped error with an honest status; the sidecar keeps serving.

use serde_json::Value;

use crate::support::*;

#[tokio::test]
async fn unreachable_upstream_is_a_502_and_the_sidecar_stays_up() {
    let fake = Fake::start(&[]);
    let dead = free_port();
    let cfg = format!(
        // A high failover_after keeps the breaker (tested in failover.rs) shut.
        "upstream:\n  url: https://localhost:{dead}\n  ca_file: FAKE_CA\n  connect_timeout: 300ms\n  failover_after: 1000\n{}",
        Sidecar::accounts("stable", "stable")
    );
    let side = Sidecar::start_unready(&fake, &cfg).await;
    for _ in 0..2 {
        // /sns/* needs no token, so this reaches the forwarding step.
        let r = client()
            .get(side.url("/sns/jscode2session?appid=a&secret=b&js_code=c"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 502);
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["errcode"], -1);
        assert!(
            v["errmsg"].as_str().unwrap().starts_with("wxsidecar:"),
            "{v}"
        );
        assert!(!v["errmsg"].as_str().unwrap().contains("secret=b"), "{v}");
    }
    // No token could be fetched: a clear 503 naming the account.
    let (status, v) = side.send("/cgi-bin/message/template/send", TEMPLATE).await;
    assert_eq!(status, 503, "{v}");
    assert!(
        v["errmsg"].as_str().unwrap().contains("account shop"),
        "{v}"
    );
    let r = client().get(side.admin("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    side.assert_log_clean(&[]);
}

#[tokio::test]
async fn slow_upstream_is_a_504() {
    let fake = Fake::start(&["--latency-ms", "1500"]);
    let cfg = format!(
        "upstream:\n  url: FAKE_URL\n  ca_file: FAKE_CA\n  read_timeout: 300ms\n{}",
        Sidecar::accounts("stable", "stable")
    );
    let side = Sidecar::start(&fake, &cfg).await;
    for _ in 0..2 {
        let (status, v) = side.send("/cgi-bin/message/template/send", TEMPLATE).await;
        assert_eq!(status, 504, "{v}");
        assert_eq!(v["errcode"], -1);
        assert!(
            v["errmsg"].as_str().unwrap().starts_with("wxsidecar:"),
            "{v}"
        );
    }
    // Local answers still work.
    let t = side.token(SHOP_APPID, SHOP_SECRET).await;
    assert!(!t.is_empty());
}

#[tokio::test]
async fn an_answer_later_than_answer_timeout_is_a_504_at_that_deadline() {
    // The answer deadline is shorter than the read timeout: the fast lane's
    // exchange (HTTP/1.1 or HTTP/2) ends at it (one timer for both), and
    // says which limit it was.
    for h2 in [false, true] {
        let fake = Fake::start(&["--h2", "--latency-ms", "1500"]);
        let cfg = format!(
            "upstream:\n  url: FAKE_URL\n  ca_file: FAKE_CA\n  http2: {h2}\n  read_timeout: 10s\n  answer_timeout: 300ms\n{}",
            Sidecar::accounts("stable", "stable")
        );
        let side = Sidecar::start(&fake, &cfg).await;
        let start = std::time::Instant::now();
        let (status, v) = side.send("/cgi-bin/message/template/send", TEMPLATE).await;
        assert_eq!(status, 504, "h2 {h2}: {v}");
        assert!(
            v["errmsg"].as_str().unwrap().contains("300ms"),
            "h2 {h2}: names answer_timeout: {v}"
        );
        assert!(
            start.elapsed() < std::time::Duration::from_millis(1500),
            "h2 {h2}: answered before the fake would have: {:?}",
            start.elapsed()
        );
        let protocol = if h2 { "h2" } else { "http/1.1" };
        let st = side.status().await;
        assert_eq!(st["upstream"]["hosts"][0]["protocol"], protocol, "{st}");
        assert_eq!(fake.stats().await["h2_connections"], u64::from(h2));
    }
}

#[tokio::test]
async fn body_over_the_limit_is_a_413() {
    let fake = Fake::start(&[]);
    let cfg = format!(
        "{}limits:\n  buffered_body: 1KiB\n{}",
        upstream(),
        Sidecar::accounts("stable", "stable")
    );
    let side = Sidecar::start(&fake, &cfg).await;
    let big = format!(
        r#"{{"touser":"o","template_id":"t","pad":"{}"}}"#,
        "x".repeat(2048)
    );
    let (status, v) = side.send("/cgi-bin/message/template/send", &big).await;
    assert_eq!(status, 413, "{v}");
    assert_eq!(v["errcode"], 45002);
    assert_eq!(fake.stats().await["messages"], 0);
    let (status, _) = side.send("/cgi-bin/message/template/send", TEMPLATE).await;
    assert_eq!(status, 200);
}
