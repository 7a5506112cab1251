//! Tokens over many lifetimes: a fast clock (short TTL at the fake) and a
//! steady client must never see 40001 or 42001.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

async fn steady_load(side: &Sidecar, run_for: Duration) -> (u64, Vec<Value>) {
    let c = client();
    let mut ok = 0;
    let mut bad = Vec::new();
    let end = Instant::now() + run_for;
    let mut i = 0u64;
    while Instant::now() < end {
        let mut r = c
            .post(side.url("/cgi-bin/message/template/send"))
            .body(TEMPLATE);
        if i % 2 == 1 {
            r = r.header("X-Wx-Account", "mall");
        }
        i += 1;
        let v: Value = r.send().await.unwrap().json().await.unwrap();
        if v["errcode"] == 0 {
            ok += 1;
        } else {
            bad.push(v);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (ok, bad)
}

#[tokio::test]
async fn several_lifetimes_without_a_token_error() {
    // 3 s tokens: over 10 s each account lives through at least three.
    let fake = Fake::start(&["--token-ttl", "3"]);
    let side = Sidecar::start_standard(&fake, "classic", "stable").await;
    let (ok, bad) = steady_load(&side, Duration::from_secs(10)).await;
    assert!(bad.is_empty(), "the client saw errors: {bad:?}");
    assert!(ok > 100, "only {ok} sends");
    let s = fake.stats().await;
    assert!(
        s["token_fetches"][SHOP_APPID].as_u64().unwrap() >= 4,
        "classic refreshed: {s}"
    );
    assert!(
        s["stable_token_fetches"][MALL_APPID].as_u64().unwrap() >= 4,
        "stable refreshed: {s}"
    );
    assert_eq!(s["invalid_token_calls"], 0, "{s}");
    // Refreshes stay bounded: not a fetch per request.
    assert!(
        s["token_fetches"][SHOP_APPID].as_u64().unwrap() <= 12,
        "{s}"
    );
}

#[tokio::test]
async fn readiness_waits_for_tokens_and_names_the_failing_account() {
    let fake = Fake::start(&[]);
    let cfg = format!(
        "{}accounts:\n  - name: shop\n    appid: {SHOP_APPID}\n    secret: ${{WXT_SHOP_SECRET}}\n    default: true\n  - name: broken\n    appid: {MALL_APPID}\n    secret: wrong-secret-value\n",
        upstream()
    );
    let side = Sidecar::start_unready(&fake, &cfg).await;
    let c = client();
    // The listener opened (start_unready waited for it) although one account failed.
    let r = c.get(side.admin("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let why = r.text().await.unwrap();
    assert!(why.contains("broken") && why.contains("40125"), "{why}");
    assert!(!why.contains("wrong-secret-value"));
    // The healthy account works; the broken one gets a clear 503.
    let (status, v) = side.send("/cgi-bin/message/template/send", TEMPLATE).await;
    assert_eq!((status, v["errcode"].as_i64()), (200, Some(0)), "{v}");
    let r = c
        .post(side.url("/cgi-bin/message/template/send"))
        .header("X-Wx-Account", "broken")
        .body(TEMPLATE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["errcode"], -1);
    let msg = v["errmsg"].as_str().unwrap();
    assert!(
        msg.starts_with("wxsidecar: no valid token for account broken") && msg.contains("40125"),
        "{msg}"
    );
    let st = side.status().await;
    let text = st.to_string();
    assert!(
        !text.contains("wrong-secret-value") && !text.contains(SHOP_SECRET),
        "{text}"
    );
    assert_eq!(st["accounts"][1]["last_error"]["errcode"], 40125);
    let log = side.log();
    assert!(
        log.contains("token fetch failed") && log.contains("40125"),
        "{log}"
    );
    assert!(!log.contains("wrong-secret-value"));
    side.assert_log_clean(&[]);
}
