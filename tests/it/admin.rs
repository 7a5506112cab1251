//! The admin surface: metrics, forced refresh, and logs that never carry a
//! token or a secret, even at trace level.

use serde_json::Value;

use crate::support::*;

#[tokio::test]
async fn metrics_count_requests_fetches_replays_and_connections() {
    let fake = Fake::start(&[]);
    let side = Sidecar::start_standard(&fake, "classic", "stable").await;
    for _ in 0..3 {
        side.send("/cgi-bin/message/template/send", TEMPLATE).await;
    }
    fake.invalidate(SHOP_APPID).await;
    side.send("/cgi-bin/message/template/send", TEMPLATE).await;
    side.token(SHOP_APPID, SHOP_SECRET).await;
    // A request is counted once its answer is written (pingora's logging
    // phase): the scrape may come a moment before the last one is in.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let text = loop {
        let r = client().get(side.admin("/metrics")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let text = r.text().await.unwrap();
        // Every series is there from the start (at 0): wait for its count.
        if text.contains(r#"outcome="ok",route="token"} 1"#) || std::time::Instant::now() > deadline
        {
            break text;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let value = |series: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no `{series}` in:\n{text}"))
    };
    assert_eq!(
        value(r#"wxsidecar_requests_total{account="shop",outcome="ok",route="api"}"#),
        4.0
    );
    assert_eq!(
        value(r#"wxsidecar_requests_total{account="shop",outcome="ok",route="token"}"#),
        1.0
    );
    assert_eq!(
        value(r#"wxsidecar_token_fetches_total{account="shop",result="ok"}"#),
        2.0
    );
    assert_eq!(
        value(r#"wxsidecar_token_replays_total{account="shop",result="ok"}"#),
        1.0
    );
    let host = format!("localhost:{}", fake.port);
    assert!(
        value(&format!(
            r#"wxsidecar_upstream_connections_total{{host="{host}",reused="true"}}"#
        )) >= 4.0
    );
    assert!(
        value(&format!(
            r#"wxsidecar_upstream_requests_total{{host="{host}",outcome="ok"}}"#
        )) >= 6.0
    );
    let left = value(r#"wxsidecar_token_expiry_seconds{account="mall"}"#);
    assert!(left > 7000.0 && left <= 7200.0, "{left}");
    assert!(text.contains(r#"wxsidecar_request_duration_seconds_bucket{route="api""#));
    assert!(text.contains(&format!(
        r#"wxsidecar_build_info{{version="{}"}} 1"#,
        env!("CARGO_PKG_VERSION")
    )));
    let token = side.token(SHOP_APPID, SHOP_SECRET).await;
    assert!(
        !text.contains(&token) && !text.contains(SHOP_SECRET) && !text.contains("/cgi-bin/message")
    );
}

#[tokio::test]
async fn post_refresh_forces_one_fetch_and_get_is_refused() {
    let fake = Fake::start(&[]);
    let side = Sidecar::start_standard(&fake, "classic", "stable").await;
    let before = side.token(SHOP_APPID, SHOP_SECRET).await;
    let c = client();
    assert_eq!(
        c.get(side.admin("/refresh?account=shop"))
            .send()
            .await
            .unwrap()
            .status(),
        405
    );
    let r = c
        .post(side.admin("/refresh?account=shop"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["errcode"], 0, "{v}");
    assert!(!v.to_string().contains(&before));
    assert_ne!(side.token(SHOP_APPID, SHOP_SECRET).await, before);
    assert_eq!(fake.fetches(SHOP_APPID).await, 2);
    let st = side.status().await;
    assert_eq!(
        st["accounts"][0]["fetches_today"], 2,
        "counted against the budget: {st}"
    );
    let r = c
        .post(side.admin("/refresh?account=nosuch"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn a_whole_session_at_trace_level_logs_no_token_or_secret() {
    let fake = Fake::start(&["--token-ttl", "3"]);
    let cfg = format!("{}{}", upstream(), Sidecar::accounts("classic", "stable"));
    let side = Sidecar::start_with_log_level(&fake, &cfg, "trace").await;
    let mut tokens = Vec::new();
    tokens.push(side.token(SHOP_APPID, SHOP_SECRET).await);
    tokens.push(side.token(MALL_APPID, MALL_SECRET).await);
    // Inject, replace a stale token, a foreign token, a replay, a failure, refresh.
    side.send("/cgi-bin/message/template/send", TEMPLATE).await;
    side.send(
        &format!("/cgi-bin/message/template/send?access_token={}", tokens[0]),
        TEMPLATE,
    )
    .await;
    side.send(
        "/cgi-bin/message/template/send?access_token=FOREIGN_TOKEN_1",
        TEMPLATE,
    )
    .await;
    fake.invalidate(SHOP_APPID).await;
    side.send("/cgi-bin/message/template/send", TEMPLATE).await;
    client()
        .get(side.url(&format!(
            "/cgi-bin/token?grant_type=client_credential&appid={SHOP_APPID}&secret=wrong-guess-1"
        )))
        .send()
        .await
        .unwrap();
    client()
        .post(side.admin("/refresh?account=mall"))
        .send()
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(3500)).await; // a proactive refresh too
    tokens.push(side.token(SHOP_APPID, SHOP_SECRET).await);
    tokens.push(side.token(MALL_APPID, MALL_SECRET).await);
    for r in fake.requests().await {
        if let Some(t) = r["access_token"].as_str() {
            if t != "FOREIGN_TOKEN_1" {
                tokens.push(t.to_string());
            }
        }
    }
    let log = side.log();
    assert!(
        log.lines().count() > 100,
        "trace level is on: {} lines",
        log.lines().count()
    );
    assert!(
        log.contains("\"message\":\"request\""),
        "one line per request at debug"
    );
    let refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    side.assert_log_clean(&refs);
    assert!(!log.contains("wrong-guess-1") && !log.contains("FOREIGN_TOKEN_1"));
}

#[tokio::test]
async fn cpu_profiles_as_pprof_and_flamegraph() {
    let fake = Fake::start(&[]);
    let side = Sidecar::start_standard(&fake, "stable", "stable").await;
    // Work to sample while the profiles run: 8 clients until both are taken.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..8)
        .map(|_| {
            let (url, stop) = (side.url("/cgi-bin/message/template/send"), stop.clone());
            tokio::spawn(async move {
                let c = client();
                let deadline = std::time::Instant::now() + WAIT;
                while !stop.load(std::sync::atomic::Ordering::Relaxed)
                    && std::time::Instant::now() < deadline
                {
                    let _ = c.post(&url).body(TEMPLATE).send().await;
                }
            })
        })
        .collect();
    // Symbolising a debug build's profile takes seconds, more on a busy
    // box: a longer wait than the usual client's.
    let c = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(120))
        .build()
        .unwrap();
    let r = c
        .get(side.admin("/debug/pprof/profile?seconds=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/octet-stream");
    let pb = r.bytes().await.unwrap();
    assert!(pb.len() > 100, "a pprof protobuf: {} bytes", pb.len());
    let r = c
        .get(side.admin("/debug/pprof/profile?seconds=1&format=flamegraph"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let svg = r.text().await.unwrap();
    assert!(svg.contains("<svg"), "an SVG flamegraph");
    assert_eq!(
        c.get(side.admin("/debug/pprof/profile?seconds=0"))
            .send()
            .await
            .unwrap()
            .status(),
        400
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
}

/// Every counter series that can exist for the configured accounts, the
/// tickets in use and the listeners is in `/metrics` from the start, at 0:
/// `rate()` and `increase(…) > 0` need the series before the first event.
#[tokio::test]
async fn counters_are_exported_at_zero_before_anything_happens() {
    let fake = Fake::start(&[]);
    let side = Sidecar::start_standard(&fake, "classic", "stable").await;
    let text = side.metrics().await;
    let mut expected = vec![
        r#"wxsidecar_connections_shed_total{listener="app"} 0"#.to_string(),
        r#"wxsidecar_connections_refused_total{listener="app"} 0"#.into(),
        r#"wxsidecar_connections_refused_total{listener="admin"} 0"#.into(),
        r#"wxsidecar_fast_lane_total{result="served"} 0"#.into(),
        r#"wxsidecar_fast_lane_total{result="handed_off"} 0"#.into(),
        r#"wxsidecar_config_reloads_total{result="unchanged"} 0"#.into(),
        r#"wxsidecar_requests_total{account="-",outcome="refused",route="platform"} 0"#.into(),
    ];
    for account in ["shop", "mall"] {
        for result in ["ok", "failed"] {
            expected.push(format!(
                r#"wxsidecar_token_replays_total{{account="{account}",result="{result}"}} 0"#
            ));
        }
        for result in ["wechat_error", "transport_error", "budget_spent"] {
            expected.push(format!(
                r#"wxsidecar_token_fetches_total{{account="{account}",result="{result}"}} 0"#
            ));
        }
        for route in ["api", "untouched", "stream", "token", "ticket", "jssdk"] {
            for outcome in ["ok", "wechat_error", "refused", "error"] {
                expected.push(format!(
                    r#"wxsidecar_requests_total{{account="{account}",outcome="{outcome}",route="{route}"}} 0"#
                ));
            }
        }
        for errcode in ["40001", "45009", "48001", "89503"] {
            expected.push(format!(
                r#"wxsidecar_wechat_errors_total{{account="{account}",errcode="{errcode}"}} 0"#
            ));
        }
        expected.push(format!(
            r#"wxsidecar_ip_not_whitelisted_total{{account="{account}"}} 0"#
        ));
    }
    for line in &expected {
        assert!(text.lines().any(|l| l == line), "missing `{line}`:\n{text}");
    }
    // A ticket, once in use, has its fetch results too.
    let (_, v) = side.get("/cgi-bin/ticket/getticket?type=jsapi", &[]).await;
    assert_eq!(v["errcode"], 0, "{v}");
    let text = side.metrics().await;
    for result in ["ok", "wechat_error", "transport_error", "budget_spent"] {
        let prefix = format!(
            r#"wxsidecar_ticket_fetches_total{{account="shop",result="{result}",type="jsapi"}} "#
        );
        assert!(
            text.lines().any(|l| l.starts_with(&prefix)),
            "missing `{prefix}`:\n{text}"
        );
    }
}
