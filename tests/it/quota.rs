//! The quota ledger and WeChat's quota tools on the admin listener: our
//! count per path beside WeChat's, resets counted to WeChat's ten a month,
//! failed calls looked up by rid, local daily caps, shared through Redis.

use serde_json::Value;

use crate::support::*;

const TEMPLATE_SEND: &str = "/cgi-bin/message/template/send";

async fn admin_post(side: &Sidecar, path: &str) -> (u16, Value) {
    let r = client().post(side.admin(path)).send().await.unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

fn path_of<'a>(ours: &'a Value, path: &str) -> &'a Value {
    ours.as_array()
        .unwrap()
        .iter()
        .find(|p| p["path"] == path)
        .unwrap_or_else(|| panic!("{path} not in {ours}"))
}

#[tokio::test]
async fn the_ledger_counts_per_path_beside_wechats_count_and_a_rid_is_looked_up() {
    let fake = Fake::start(&[]);
    let side = Sidecar::start_standard(&fake, "classic", "stable").await;
    for _ in 0..5 {
        assert_eq!(side.send(TEMPLATE_SEND, TEMPLATE).await.1["errcode"], 0);
    }
    for _ in 0..2 {
        let (_, v) = side.get("/cgi-bin/user/info?openid=o1", &[]).await;
        assert_eq!(v["errcode"], 0, "{v}");
    }
    // The full path (Expect takes it) counts too.
    let r = client()
        .post(side.url(TEMPLATE_SEND))
        .header("Expect", "100-continue")
        .body(TEMPLATE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["errcode"], 0);
    // WeChat's minute limit once: an errcode in the ledger, and a rid.
    fake.faults(&format!(
        r#"{{"rules":[{{"path":"{TEMPLATE_SEND}","errcode":45011,"errcode_rate":1.0}}]}}"#
    ))
    .await;
    let (_, failed) = side.send(TEMPLATE_SEND, TEMPLATE).await;
    fake.faults(r#"{"rules":[]}"#).await;
    let errmsg = failed["errmsg"].as_str().unwrap();
    let rid = errmsg.rsplit("rid: ").next().unwrap().trim().to_string();
    assert!(errmsg.contains("rid: ") && rid.len() > 10, "{errmsg}");

    let (code, q) = side.admin_get("/quota?account=shop").await;
    assert_eq!(code, 200, "{q}");
    let send = path_of(&q["ours"], TEMPLATE_SEND);
    assert_eq!(send["calls"], 7, "{q}");
    assert_eq!(send["errors"]["45011"], 1, "{q}");
    assert_eq!(path_of(&q["ours"], "/cgi-bin/user/info")["calls"], 2);
    assert!(q["day"].as_str().unwrap().len() == 10);

    let (code, q) = side
        .admin_get(&format!("/quota?account=shop&path={TEMPLATE_SEND}"))
        .await;
    assert_eq!(code, 200, "{q}");
    assert_eq!(q["ours"].as_array().unwrap().len(), 1);
    assert_eq!(q["ours"][0]["calls"], 7);
    // WeChat counted the six it served (the refused one is not counted).
    assert_eq!(q["wechat"]["errcode"], 0, "{q}");
    assert_eq!(q["wechat"]["quota"]["used"], 6, "{q}");
    assert_eq!(q["wechat"]["quota"]["daily_limit"], 100000);

    let (code, r) = side
        .admin_get(&format!("/rid?account=shop&rid={rid}"))
        .await;
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["errcode"], 0, "{r}");
    let req = &r["request"];
    assert!(
        req["response_body"].as_str().unwrap().contains("45011"),
        "{r}"
    );
    let url = req["request_url"].as_str().unwrap();
    assert!(
        url.starts_with(TEMPLATE_SEND) && url.contains("access_token=***"),
        "{url}"
    );
    let (_, r) = side.admin_get("/rid?account=shop&rid=nope-nope").await;
    assert_eq!(r["errcode"], 76001, "WeChat's answer as it is: {r}");
    let (code, _) = side.admin_get("/rid?account=shop").await;
    assert_eq!(code, 400);
    let (code, v) = side.admin_get("/quota?account=nobody").await;
    assert_eq!(code, 404, "{v}");
    let (code, v) = side.admin_get("/quota?account=shop&path=cgi-bin").await;
    assert_eq!(code, 400, "{v}");
    let all = side.log();
    side.assert_log_clean(&[]);
    assert!(!all.contains("appsecret="), "no secret query in the log");
}

#[tokio::test]
async fn quota_resets_stop_at_ten_a_month_and_need_the_admin_token() {
    let fake = Fake::start(&[]);
    let token = "a-long-enough-admin-token-0123456789";
    let side = Sidecar::start(
        &fake,
        &format!(
            "{}admin:\n  token: {token}\n{}",
            upstream(),
            Sidecar::accounts("classic", "stable")
        ),
    )
    .await;
    let c = client();
    let r = c
        .post(side.admin("/quota/clear?account=shop"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "behind admin.token");
    let r = c
        .get(side.admin("/quota?account=shop"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Spend some quota, then reset it.
    fake.daily_limit(3).await;
    for _ in 0..3 {
        assert_eq!(side.send(TEMPLATE_SEND, TEMPLATE).await.1["errcode"], 0);
    }
    assert_eq!(side.send(TEMPLATE_SEND, TEMPLATE).await.1["errcode"], 45009);
    let clear = || async {
        let r = c
            .post(side.admin("/quota/clear?account=shop"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    let (code, v) = clear().await;
    assert_eq!((code, v["errcode"].as_i64()), (200, Some(0)), "{v}");
    assert_eq!(v["clears_this_month"], 1);
    assert_eq!(v["clears_left"], 9);
    assert_eq!(
        side.send(TEMPLATE_SEND, TEMPLATE).await.1["errcode"],
        0,
        "reset"
    );
    for i in 2..=10 {
        let (code, v) = clear().await;
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["clears_this_month"], i, "{v}");
    }
    // The eleventh never reaches WeChat.
    let (code, v) = clear().await;
    assert_eq!((code, v["errcode"].as_i64()), (429, Some(48006)), "{v}");
    assert_eq!(fake.stats().await["quota_clears"][SHOP_APPID], 10);
    let r = c
        .get(side.admin("/quota/clear?account=shop"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    // The secret went to WeChat only; never to a log line.
    let seen = fake.requests().await;
    let v2 = seen
        .iter()
        .find(|r| r["path"] == "/cgi-bin/clear_quota/v2")
        .expect("clear_quota/v2 called");
    assert!(
        v2["query"].as_str().unwrap().contains("appsecret=***"),
        "{v2}"
    );
    side.assert_log_clean(&[token]);
}

#[tokio::test]
async fn a_local_daily_cap_answers_45009_before_wechat_would() {
    let fake = Fake::start(&[]);
    let body = format!(
        "{}{}    limits:\n      {TEMPLATE_SEND}: {{per_day: 3}}\n      /cgi-bin/media/upload: {{per_day: 1}}\n",
        upstream(),
        Sidecar::accounts("classic", "stable")
    );
    // The cap sits on mall, the last account in the standard config.
    let side = Sidecar::start(&fake, &body).await;
    let mall = |path: &'static str| side.send_as("mall", path, TEMPLATE);
    for _ in 0..3 {
        assert_eq!(mall(TEMPLATE_SEND).await.1["errcode"], 0);
    }
    let calls = fake.stats().await["api_calls"].as_u64().unwrap();
    let (code, v) = mall(TEMPLATE_SEND).await;
    assert_eq!((code, v["errcode"].as_i64()), (200, Some(45009)), "{v}");
    assert!(
        v["errmsg"].as_str().unwrap().contains("accounts[].limits"),
        "{v}"
    );
    // The full path refuses too, and neither reached WeChat.
    let r = client()
        .post(side.url(TEMPLATE_SEND))
        .header("X-Wx-Account", "mall")
        .header("Expect", "100-continue")
        .body(TEMPLATE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["errcode"], 45009);
    assert_eq!(fake.stats().await["api_calls"].as_u64().unwrap(), calls);
    // Other paths and other accounts are not capped.
    assert_eq!(mall("/cgi-bin/message/custom/send").await.1["errcode"], 0);
    assert_eq!(side.send(TEMPLATE_SEND, TEMPLATE).await.1["errcode"], 0);
    // A streamed upload is capped too, before its body moves.
    let upload = || async {
        side.upload(Some("mall"), "a.bin", vec![7u8; 64 * 1024])
            .await
            .1
    };
    assert!(upload().await["media_id"].is_string());
    let v = upload().await;
    assert_eq!(v["errcode"], 45009, "{v}");
    let (_, q) = side
        .admin_get(&format!("/quota?account=mall&path={TEMPLATE_SEND}"))
        .await;
    assert_eq!(q["local_limit_per_day"], 3, "{q}");
    assert_eq!(
        q["ours"][0]["calls"], 3,
        "refused calls are not counted: {q}"
    );
}

#[tokio::test]
async fn replicas_share_counts_caps_and_resets_through_redis() {
    let fake = Fake::start(&[]);
    let redis = Redis::start().await;
    let body = format!(
        "{}token:\n  store: {}\n{}    limits:\n      {TEMPLATE_SEND}: {{per_day: 10}}\n",
        upstream(),
        redis.url(),
        Sidecar::accounts("classic", "stable")
    );
    let a = Sidecar::start(&fake, &body).await;
    let b = Sidecar::start(&fake, &body).await;
    let send = |side: &Sidecar| {
        let url = side.url(TEMPLATE_SEND);
        async move {
            client()
                .post(url)
                .header("X-Wx-Account", "mall")
                .body(TEMPLATE)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()["errcode"]
                .as_i64()
        }
    };
    for _ in 0..6 {
        assert_eq!(send(&a).await, Some(0));
    }
    // Shared within a flush interval (2 s); wait for the count to land.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (_, q) = b
            .admin_get(&format!("/quota?account=mall&path={TEMPLATE_SEND}"))
            .await;
        if send(&b).await.is_some() && q["ours"][0]["cluster_calls"].as_u64().unwrap_or(0) >= 7 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "never shared: {q}");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    // b sent one above; then the cluster has room for 3 more at most.
    let mut ok = 0;
    for _ in 0..6 {
        if send(&b).await == Some(0) {
            ok += 1;
        }
    }
    assert!(ok <= 3, "{ok} more allowed past a shared cap of 10");
    let mut c = redis.conn().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("wxsidecar:quota:*")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(keys.iter().any(|k| k.contains(MALL_APPID)), "{keys:?}");

    // A reset on one replica counts for the other.
    let (_, v) = admin_post(&a, "/quota/clear?account=mall").await;
    assert_eq!(v["clears_this_month"], 1, "{v}");
    let (_, v) = admin_post(&b, "/quota/clear?account=mall").await;
    assert_eq!(v["clears_this_month"], 2, "{v}");
}

/// `quota/get` and `rid/get` are WeChat quotas of their own: forty admin
/// lookups, at once and one after another, make one call each; the kept
/// answer says its age; `/status` counts the calls made.
#[tokio::test]
async fn admin_lookups_make_one_wechat_call_a_minute() {
    let fake = Fake::start(&[]);
    let side = Sidecar::start_standard(&fake, "classic", "stable").await;
    assert_eq!(side.send(TEMPLATE_SEND, TEMPLATE).await.1["errcode"], 0);
    let calls = |path: &'static str| {
        let fake = &fake;
        async move {
            fake.requests()
                .await
                .iter()
                .filter(|r| r.to_string().contains(path))
                .count()
        }
    };
    for (lookup, path) in [
        (
            format!("/quota?account=shop&path={TEMPLATE_SEND}"),
            "openapi/quota/get",
        ),
        (
            "/rid?account=shop&rid=0123abcd-0123abcd-0123abcd".to_string(),
            "openapi/rid/get",
        ),
    ] {
        let ask = || async {
            let r = client().get(side.admin(&lookup)).send().await.unwrap();
            let age = r
                .headers()
                .get("age")
                .map(|a| a.to_str().unwrap().to_string());
            (r.status().as_u16(), age, r.json::<Value>().await.unwrap())
        };
        let at_once = futures_util::future::join_all((0..20).map(|_| ask())).await;
        let mut fresh = 0;
        for (code, age, v) in &at_once {
            assert_eq!(*code, 200, "{v}");
            fresh += usize::from(age.is_none());
        }
        assert_eq!(fresh, 1, "one answer came from WeChat, the rest were kept");
        for _ in 0..20 {
            let (code, age, v) = ask().await;
            assert_eq!(code, 200, "{v}");
            assert!(age.unwrap().parse::<u64>().unwrap() < 60);
        }
        assert_eq!(calls(path).await, 1, "{lookup}: one call to WeChat");
    }
    // Another path is its own lookup.
    let (code, _) = side
        .admin_get("/quota?account=shop&path=/cgi-bin/user/info")
        .await;
    assert_eq!(code, 200);
    let st = side.status().await;
    assert_eq!(
        st["admin_calls"],
        serde_json::json!({"quota_get": 2, "rid_get": 1, "clear_quota": 0}),
        "{st}"
    );
}
