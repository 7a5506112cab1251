//! Who may call: allow-lists, bearer tokens limited to accounts, and rate
//! limits, each answered in WeChat's error shape.

use serde_json::Value;

use crate::support::*;

const BILLING: &str = "billing-token-0123456789abcdef";
const OPS: &str = "ops-token-fedcba9876543210";

async fn post(
    c: &reqwest::Client,
    side: &Sidecar,
    bearer: Option<&str>,
    account: Option<&str>,
) -> (u16, Value) {
    let mut r = c
        .post(side.url("/cgi-bin/message/template/send"))
        .body(TEMPLATE);
    if let Some(b) = bearer {
        r = r.header("Authorization", format!("Bearer {b}"));
    }
    if let Some(a) = account {
        r = r.header("X-Wx-Account", a);
    }
    let r = r.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test]
async fn the_allow_list_admits_only_listed_addresses() {
    let fake = Fake::start(&[]);
    let cfg = format!(
        "{}clients:\n  allow: [127.0.0.2/32]\n{}",
        upstream(),
        Sidecar::accounts("stable", "stable")
    );
    let side = Sidecar::start(&fake, &cfg).await;
    let (status, v) = post(&client(), &side, None, None).await;
    assert_eq!(status, 403, "{v}");
    assert_eq!(v["errcode"], 40164);
    assert!(
        v["errmsg"]
            .as_str()
            .unwrap()
            .contains("127.0.0.1 is not in clients.allow"),
        "{v}"
    );
    let from_allowed = reqwest::Client::builder()
        .no_proxy()
        .local_address("127.0.0.2".parse::<std::net::IpAddr>().unwrap())
        .build()
        .unwrap();
    let (status, v) = post(&from_allowed, &side, None, None).await;
    assert_eq!((status, v["errcode"].as_i64()), (200, Some(0)), "{v}");
    assert_eq!(fake.stats().await["messages"], 1);
}

#[tokio::test]
async fn bearer_tokens_name_the_app_and_limit_its_accounts() {
    let fake = Fake::start(&[]);
    let cfg = format!(
        "{}clients:\n  tokens:\n    - name: billing\n      token: {BILLING}\n      accounts: [shop]\n    - name: ops\n      token: ${{WXT_OPS_TOKEN}}\n{}",
        upstream(),
        Sidecar::accounts("stable", "stable")
    )
    .replace("${WXT_OPS_TOKEN}", OPS);
    let side = Sidecar::start(&fake, &cfg).await;
    let c = client();
    let (status, v) = post(&c, &side, None, None).await;
    assert_eq!((status, v["errcode"].as_i64()), (403, Some(48001)), "{v}");
    let (status, _) = post(&c, &side, Some("not-a-known-token-123456"), None).await;
    assert_eq!(status, 403);
    let (status, v) = post(&c, &side, Some(BILLING), None).await;
    assert_eq!((status, v["errcode"].as_i64()), (200, Some(0)), "{v}");
    let (status, v) = post(&c, &side, Some(BILLING), Some("mall")).await;
    assert_eq!((status, v["errcode"].as_i64()), (403, Some(48001)), "{v}");
    assert!(v["errmsg"]
        .as_str()
        .unwrap()
        .contains("client billing may not use account mall"));
    let (status, _) = post(&c, &side, Some(OPS), Some("mall")).await;
    assert_eq!(status, 200);
    let seen = fake.last_request().await;
    assert!(
        seen["headers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h[0] != "authorization"),
        "our bearer token never reaches WeChat: {seen}"
    );
    // The local token endpoint is guarded too.
    let r = c
        .get(side.url(&format!(
            "/cgi-bin/token?grant_type=client_credential&appid={SHOP_APPID}&secret={SHOP_SECRET}"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    side.assert_log_clean(&[BILLING, OPS]);
    // The five template sends above, refusals included, were the fast
    // lane's: `clients` is checked there the same way.
    let metrics = side.metrics().await;
    let served: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix(r#"wxsidecar_fast_lane_total{result="served"} "#))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert_eq!(served, 5, "{metrics}");
}

#[tokio::test]
async fn rate_limits_per_client_and_per_account_answer_429() {
    let fake = Fake::start(&[]);
    let cfg = format!(
        "{}clients:\n  rate_limit:\n    per_client: {{rps: 0.5, burst: 5}}\n    per_account: {{rps: 0.5, burst: 3}}\n{}",
        upstream(),
        Sidecar::accounts("stable", "stable")
    );
    let side = Sidecar::start(&fake, &cfg).await;
    let c = client();
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(post(&c, &side, None, Some("shop")).await);
    }
    assert_eq!(
        statuses.iter().filter(|(s, _)| *s == 200).count(),
        3,
        "{statuses:?}"
    );
    let (status, v) = &statuses[3];
    assert_eq!((*status, v["errcode"].as_i64()), (429, Some(45011)), "{v}");
    assert!(v["errmsg"].as_str().unwrap().contains("account shop"));
    // Another account still has room; the client's own burst (5) runs out next.
    let (status, _) = post(&c, &side, None, Some("mall")).await;
    assert_eq!(status, 200);
    let (status, v) = post(&c, &side, None, Some("mall")).await;
    assert_eq!(status, 429);
    assert!(
        v["errmsg"].as_str().unwrap().contains("client 127.0.0.1"),
        "{v}"
    );
    // Refusals say when to come back (one request refills in 1 / 0.5 rps
    // = 2 s), on the fast lane and on the full path (`Expect` takes it).
    for expect in [None, Some("100-continue")] {
        let mut r = c
            .post(side.url("/cgi-bin/message/template/send"))
            .body(TEMPLATE);
        if let Some(e) = expect {
            r = r.header("Expect", e);
        }
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "2", "{expect:?}");
    }
    assert_eq!(fake.stats().await["messages"], 4);
}
