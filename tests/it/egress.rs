//! WeChat refusing our egress IP (not whitelisted): the IP it names shows in
//! `/status` and `/metrics`, one error line says where to whitelist it, and
//! the refusal clears once calls go through again.

use serde_json::Value;

use crate::support::*;

const TEMPLATE_SEND: &str = "/cgi-bin/message/template/send";

async fn send(side: &Sidecar) -> Value {
    post_json(&client(), side.url(TEMPLATE_SEND), TEMPLATE.to_string()).await
}

#[tokio::test]
async fn an_ip_whitelist_refusal_names_the_ip_once_and_clears_when_calls_go_through() {
    let fake = Fake::start(&[]);
    let side = Sidecar::start_standard(&fake, "classic", "stable").await;
    assert_eq!(send(&side).await["errcode"], 0);
    let shop = |st: &wxsidecar::status::Status| {
        st.accounts
            .iter()
            .find(|a| a.name == "shop")
            .unwrap()
            .clone()
    };
    assert!(shop(&side.typed_status().await).egress_ip_seen.is_none());

    fake.whitelist(Some(&["10.9.9.9"])).await;
    for _ in 0..3 {
        let v = send(&side).await;
        assert_eq!(v["errcode"], 40164, "passed through as WeChat said it: {v}");
    }
    let st = side.typed_status().await;
    let a = shop(&st);
    assert_eq!(a.egress_ip_seen.as_deref(), Some("127.0.0.1"));
    let e = a.ip_whitelist_error.expect("a standing refusal");
    assert_eq!((e.errcode, e.ip.as_deref()), (40164, Some("127.0.0.1")));
    assert!(e.errmsg.contains("not in whitelist"), "{}", e.errmsg);
    let metrics = side.metrics().await;
    assert!(
        metrics.contains(r#"wxsidecar_ip_not_whitelisted_total{account="shop"} 3"#),
        "{metrics}"
    );
    let log = side.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WeChat refused calls from"))
        .collect();
    assert_eq!(lines.len(), 1, "logged once: {lines:?}");
    assert!(
        lines[0].contains("127.0.0.1")
            && lines[0].contains("IP whitelist")
            && lines[0].contains("ERROR"),
        "{}",
        lines[0]
    );
    assert!(!log.contains(SHOP_SECRET));

    fake.whitelist(None).await;
    assert_eq!(send(&side).await["errcode"], 0);
    let a = shop(&side.typed_status().await);
    assert!(
        a.ip_whitelist_error.is_none(),
        "cleared by a call that went through"
    );
    assert_eq!(
        a.egress_ip_seen.as_deref(),
        Some("127.0.0.1"),
        "the IP seen stays"
    );
    assert!(side
        .log()
        .contains("accepts calls from the egress IP again"));
}

#[tokio::test]
async fn quota_answers_carry_retry_after_and_a_spent_quota_shows_until_midnight() {
    let fake = Fake::start(&[]);
    let side = Sidecar::start_standard(&fake, "classic", "stable").await;
    let c = client();
    // The minute limit and WeCom's concurrency limit: the app's HTTP client
    // is told when to come back, on both request paths (the fast lane, and
    // the full path a request with `Expect` takes).
    for (code, after) in [(45011, "60"), (45033, "1")] {
        fake.faults(&format!(
            r#"{{"rules":[{{"path":"{TEMPLATE_SEND}","errcode":{code},"errcode_rate":1.0}}]}}"#
        ))
        .await;
        let r = c
            .post(side.url(TEMPLATE_SEND))
            .body(TEMPLATE)
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["retry-after"], after, "{code}");
        assert_eq!(r.json::<Value>().await.unwrap()["errcode"], code);
        let r = c
            .post(side.url(TEMPLATE_SEND))
            .header("Expect", "100-continue")
            .body(TEMPLATE)
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["retry-after"], after, "{code}, full path");
    }
    // The daily quota: never replayed, the path marked spent.
    fake.faults(&format!(
        r#"{{"rules":[{{"path":"{TEMPLATE_SEND}","errcode":45009,"errcode_rate":1.0}}]}}"#
    ))
    .await;
    let before = fake.requests().await.len();
    let r = c
        .post(side.url(TEMPLATE_SEND))
        .body(TEMPLATE)
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("retry-after").is_none());
    assert_eq!(r.json::<Value>().await.unwrap()["errcode"], 45009);
    assert_eq!(fake.requests().await.len(), before + 1, "sent once");
    let st = side.typed_status().await;
    let shop = st.accounts.iter().find(|a| a.name == "shop").unwrap();
    assert_eq!(shop.quota_exhausted, [TEMPLATE_SEND]);
    let metrics = side.metrics().await;
    for (code, n) in [(45009, 1), (45011, 2), (45033, 2)] {
        let line =
            format!(r#"wxsidecar_wechat_errors_total{{account="shop",errcode="{code}"}} {n}"#);
        assert!(metrics.contains(&line), "{line}\n{metrics}");
    }
}
