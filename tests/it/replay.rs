//! Token errors never reach the app: compare-and-refresh, replay once, the
//! budget guard, backoff, and no duplicate sends.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

fn account<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["accounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == name)
        .unwrap()
}

#[tokio::test]
async fn outside_refreshes_are_invisible_in_classic_mode() {
    let fake = Fake::start(&[]);
    let side = Sidecar::start_standard(&fake, "classic", "stable").await;
    let c = client();
    let mut errors = Vec::new();
    let mut sent = 0;
    for round in 0..5 {
        // Someone else refreshed: every token the sidecar holds stops working.
        fake.invalidate(SHOP_APPID).await;
        for _ in 0..40 {
            let v: Value = post_json(
                &c,
                side.url("/cgi-bin/message/template/send"),
                TEMPLATE.to_string(),
            )
            .await;
            sent += 1;
            if v["errcode"] != 0 {
                errors.push((round, v));
            }
        }
    }
    assert!(errors.is_empty(), "the app saw token errors: {errors:?}");
    assert_eq!(sent, 200);
    assert_eq!(
        fake.fetches(SHOP_APPID).await,
        6,
        "one start-up fetch and one per revocation"
    );
    let st = side.status().await;
    assert_eq!(account(&st, "shop")["replays_ok"], 5, "{st}");
    assert_eq!(account(&st, "shop")["replays_failed"], 0, "{st}");
    side.assert_log_clean(&[]);
}

#[tokio::test]
async fn a_hundred_concurrent_failures_cause_exactly_one_fetch() {
    let fake = Fake::start(&[]);
    let side = Sidecar::start_standard(&fake, "classic", "stable").await;
    let before = fake.fetches(SHOP_APPID).await;
    let invalid_before = fake.stats().await["invalid_token_calls"].as_u64().unwrap();
    fake.invalidate(SHOP_APPID).await;
    let c = client();
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let req = c
                .post(side.url("/cgi-bin/message/template/send"))
                .body(TEMPLATE);
            tokio::spawn(async move { req.send().await.unwrap().json::<Value>().await.unwrap() })
        })
        .collect();
    for t in tasks {
        let v = t.await.unwrap();
        assert_eq!(v["errcode"], 0, "{v}");
    }
    assert_eq!(
        fake.fetches(SHOP_APPID).await,
        before + 1,
        "exactly one fetch"
    );
    let failed_first = fake.stats().await["invalid_token_calls"].as_u64().unwrap() - invalid_before;
    assert!(failed_first >= 1, "the revocation was seen");
    let st = side.status().await;
    assert_eq!(
        account(&st, "shop")["replays_ok"].as_u64().unwrap(),
        failed_first,
        "every request that failed on the old token was replayed: {st}"
    );
    assert_eq!(fake.stats().await["messages"], 100);
}

#[tokio::test]
async fn a_foreign_token_rejection_is_passed_through_without_a_refresh() {
    let fake = Fake::start(&[]);
    let side = Sidecar::start_standard(&fake, "classic", "stable").await;
    let before = fake.fetches(SHOP_APPID).await;
    let (status, v) = side
        .send(
            "/cgi-bin/message/template/send?access_token=THE_APPS_OWN",
            TEMPLATE,
        )
        .await;
    assert_eq!((status, v["errcode"].as_i64()), (200, Some(40001)), "{v}");
    assert_eq!(fake.fetches(SHOP_APPID).await, before);
    let st = side.status().await;
    assert_eq!(account(&st, "shop")["replays_ok"], 0);
    assert_eq!(account(&st, "shop")["invalid_token_reports"], 0);
}

#[tokio::test]
async fn a_second_rejection_is_passed_through_and_counted_never_looped() {
    let fake = Fake::start(&[]);
    let side = Sidecar::start_standard(&fake, "classic", "stable").await;
    let before = fake.fetches(SHOP_APPID).await;
    fake.faults(
        r#"{"seed":1,"rules":[{"path":"/cgi-bin/message/template/send","token_error_rate":1.0}]}"#,
    )
    .await;
    let (status, v) = side.send("/cgi-bin/message/template/send", TEMPLATE).await;
    assert_eq!(
        (status, v["errcode"].as_i64()),
        (200, Some(40001)),
        "WeChat's answer: {v}"
    );
    assert_eq!(
        fake.fetches(SHOP_APPID).await,
        before + 1,
        "one refresh, then no more"
    );
    let sends = fake
        .requests()
        .await
        .iter()
        .filter(|r| r["path"] == "/cgi-bin/message/template/send")
        .count();
    assert_eq!(sends, 2, "the request was sent twice, never more");
    let st = side.status().await;
    assert_eq!(account(&st, "shop")["replays_failed"], 1, "{st}");
}

#[tokio::test]
async fn force_refresh_from_an_app_is_answered_from_the_cache() {
    let fake = Fake::start(&[]);
    let side = Sidecar::start_standard(&fake, "stable", "stable").await;
    let before = fake.fetches(SHOP_APPID).await;
    let t = side.token(SHOP_APPID, SHOP_SECRET).await;
    for _ in 0..5 {
        let v: Value = post_json(&client(), side.url("/cgi-bin/stable_token"), format!(
                r#"{{"grant_type":"client_credential","appid":"{SHOP_APPID}","secret":"{SHOP_SECRET}","force_refresh":true}}"#
            ).to_string()).await;
        assert_eq!(
            v["access_token"],
            t.as_str(),
            "a young token is not refreshed: {v}"
        );
    }
    assert_eq!(
        fake.fetches(SHOP_APPID).await,
        before,
        "nothing reached WeChat"
    );
}

#[tokio::test]
async fn the_daily_budget_stops_fetches_with_a_clear_45009() {
    // 3 s tokens and a budget of 2: the third fetch is refused by the sidecar itself.
    let fake = Fake::start(&["--token-ttl", "3"]);
    let cfg = format!(
        "{}token:\n  daily_budget: 2\n{}",
        upstream(),
        Sidecar::accounts("classic", "stable")
    );
    let side = Sidecar::start(&fake, &cfg).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let st = side.status().await;
        let shop = account(&st, "shop");
        if shop["budget_spent"] == true && shop["token_valid"] == false {
            assert_eq!(shop["budget_left"], 0);
            assert_eq!(shop["fetches_today"], 2);
            break;
        }
        // While the cached token lasts, requests still work.
        assert!(Instant::now() < deadline, "budget never spent: {st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, v) = side.send("/cgi-bin/message/template/send", TEMPLATE).await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["errcode"], 45009);
    let msg = v["errmsg"].as_str().unwrap();
    assert!(
        msg.starts_with("wxsidecar: daily token budget for account shop spent"),
        "{msg}"
    );
    assert_eq!(fake.fetches(SHOP_APPID).await, 2);
    let log = side.log();
    let lines = log
        .lines()
        .filter(|l| l.contains("daily token budget spent") && l.contains(r#""account":"shop""#))
        .count();
    assert_eq!(lines, 1, "logged once:\n{log}");
    let r = client().get(side.admin("/readyz")).send().await.unwrap();
    assert_eq!(r.status(), 503);
    // An operator's refresh is told why at once, and fetches nothing.
    let r = client()
        .post(side.admin("/refresh?account=shop"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["errcode"], 45009, "{v}");
    assert!(v["errmsg"].as_str().unwrap().contains("budget"), "{v}");
    assert_eq!(fake.fetches(SHOP_APPID).await, 2);
}

#[tokio::test]
async fn a_hard_failure_is_retried_at_the_failed_retry_pace() {
    let fake = Fake::start(&[]);
    let cfg = format!(
        "{}token:\n  failed_retry: 1s\naccounts:\n  - name: shop\n    appid: {SHOP_APPID}\n    secret: not-the-secret\n    token_api: classic\n",
        upstream()
    );
    let side = Sidecar::start_unready(&fake, &cfg).await;
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let attempts = fake
        .requests()
        .await
        .iter()
        .filter(|r| r["path"] == "/cgi-bin/token")
        .count();
    assert!(
        (2..=5).contains(&attempts),
        "{attempts} fetch attempts in 3.5 s"
    );
    let st = side.status().await;
    assert_eq!(account(&st, "shop")["last_error"]["errcode"], 40125, "{st}");
    assert!(!st.to_string().contains("not-the-secret"));
    assert!(!side.log().contains("not-the-secret"));
}

#[tokio::test]
async fn a_busy_token_endpoint_is_retried_with_backoff() {
    let fake = Fake::start(&[
        "--faults",
        r#"{"seed":5,"rules":[{"path":"/cgi-bin/stable_token","busy_rate":1.0}]}"#,
    ]);
    let side = Sidecar::start_unready(
        &fake,
        &format!("{}{}", upstream(), Sidecar::accounts("stable", "stable")),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    fake.faults(r#"{"rules":[]}"#).await;
    side.wait_ready().await;
    let attempts = fake
        .requests()
        .await
        .iter()
        .filter(|r| r["path"] == "/cgi-bin/stable_token")
        .count();
    // Two accounts, each: the first try, at least one backed-off retry, the success.
    assert!(attempts >= 6, "{attempts}");
    assert!(attempts <= 16, "a hot loop: {attempts}");
    let (status, _) = side.send("/cgi-bin/message/template/send", TEMPLATE).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn posts_are_never_sent_twice_under_resets() {
    let fake = Fake::start(&[]);
    let side = Sidecar::start_standard(&fake, "stable", "stable").await;
    fake.faults(
        r#"{"seed":11,"rules":[{"path":"/cgi-bin/message/template/send","reset_before_rate":0.05,"reset_after_rate":0.05,"busy_rate":0.02}]}"#,
    )
    .await;
    let c = client();
    let (mut ok, mut failed, mut busy) = (0, 0, 0);
    for i in 0..400 {
        let body = format!(r#"{{"touser":"o","template_id":"t","client_msg_id":"m-{i}"}}"#);
        let r = c
            .post(side.url("/cgi-bin/message/template/send"))
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap();
        match (status, v["errcode"].as_i64()) {
            (200, Some(0)) => ok += 1,
            (200, Some(-1)) => busy += 1,
            (502, Some(-1)) => failed += 1,
            other => panic!("unexpected {other:?}: {v}"),
        }
    }
    let s = fake.stats().await;
    assert_eq!(s["duplicate_messages"], 0, "{s}");
    assert!(
        failed > 0 && busy > 0,
        "faults happened: ok {ok}, failed {failed}, busy {busy}"
    );
    // Every message the fake recorded was answered OK or lost to a reset after it.
    assert!(s["messages"].as_u64().unwrap() >= ok);
}

#[tokio::test]
async fn media_calls_within_the_buffer_cap_are_replayed_and_larger_uploads_are_not() {
    let fake = Fake::start(&[]);
    let cfg = format!(
        "{}limits:\n  buffered_body: 64KiB\n{}",
        upstream(),
        Sidecar::accounts("classic", "stable")
    );
    let side = Sidecar::start(&fake, &cfg).await;
    let c = client();
    // An upload over the cap streams: WeChat's 40001 reaches the app as it
    // is and nothing is replayed (the body is gone by the time it answers).
    let before = fake.fetches(SHOP_APPID).await;
    fake.invalidate(SHOP_APPID).await;
    let (_, v) = side.upload(None, "a.bin", vec![7u8; 100 * 1024]).await;
    assert_eq!(v["errcode"], 40001, "{v}");
    assert_eq!(fake.fetches(SHOP_APPID).await, before);
    assert_eq!(
        account(&side.status().await, "shop")["invalid_token_reports"],
        0
    );
    // One within it is kept: refreshed once and replayed.
    let (_, v) = side.upload(None, "a.bin", vec![7u8; 4096]).await;
    assert!(v["media_id"].is_string(), "replayed: {v}");
    assert_eq!(fake.fetches(SHOP_APPID).await, before + 1);
    let seen = fake.requests().await;
    let sent = seen
        .iter()
        .rfind(|r| r["path"] == "/cgi-bin/media/upload")
        .unwrap();
    assert!(sent["body_len"].as_u64().unwrap() > 4096, "{sent}");

    // So are a download by media_id and a JSON material call.
    fake.invalidate(SHOP_APPID).await;
    let v: Value = c
        .get(side.url("/cgi-bin/media/get?media_id=x"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["errcode"], 40007, "replayed with a fresh token: {v}");
    assert_eq!(fake.fetches(SHOP_APPID).await, before + 2);
    fake.invalidate(SHOP_APPID).await;
    let v: Value = c
        .post(side.url("/cgi-bin/material/get_materialcount"))
        .body("{}")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["errcode"], 0, "replayed: {v}");
    assert_eq!(fake.fetches(SHOP_APPID).await, before + 3);
    let m = side.metrics().await;
    assert!(
        m.lines().any(|l| l.starts_with("wxsidecar_requests_total{")
            && l.contains("route=\"stream\"")
            && !l.ends_with(" 0")),
        "still counted as media: {m}"
    );
}
