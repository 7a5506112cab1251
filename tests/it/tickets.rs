//! Tickets: cached per account and type, answered locally whatever token the
//! app carries, refreshed by their own expiry (not by WeChat's claim), fetched
//! with a fresh token after a rejection, shared through Redis; and the JS-SDK
//! signature helper checked against a SHA-1 computed here.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

const GETTICKET: &str = "/cgi-bin/ticket/getticket?type=jsapi";

fn sha1_hex(s: &str) -> String {
    ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, s.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn ticket_of(v: &Value) -> String {
    assert_eq!(v["errcode"], 0, "{v}");
    v["ticket"]
        .as_str()
        .unwrap_or_else(|| panic!("no ticket in {v}"))
        .to_string()
}

async fn admin_refresh(side: &Sidecar, q: &str) -> (u16, String) {
    let r = client()
        .post(side.admin(&format!("/refresh?{q}")))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn an_operator_can_refresh_a_ticket_in_use() {
    let fake = Fake::start(&[]);
    let side = Sidecar::start_standard(&fake, "classic", "stable").await;
    let shop_jsapi = format!("{SHOP_APPID}:jsapi");
    // Nothing to refresh before first use; unknown types named.
    let (status, body) = admin_refresh(&side, "account=shop&ticket=jsapi").await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("fetched on first use"), "{body}");
    let (status, body) = admin_refresh(&side, "account=shop&ticket=agent_config").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("jsapi, wx_card"), "{body}");
    assert_eq!(fake.ticket_fetches(&shop_jsapi).await, 0);

    let (_, v) = side.get(GETTICKET, &[]).await;
    let ticket = ticket_of(&v);
    let token_fetches = fake.fetches(SHOP_APPID).await;
    // Mid-life WeChat hands the same ticket out again: the refresh is the
    // fetch, and the answer says whether the value changed.
    let (status, body) = admin_refresh(&side, "account=shop&ticket=jsapi").await;
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["refreshed"], "jsapi ticket", "{v}");
    assert_eq!(v["changed"], false, "{v}");
    assert!(!body.contains(&ticket), "the ticket never leaves: {body}");
    assert_eq!(fake.ticket_fetches(&shop_jsapi).await, 2);
    // The token is not touched; apps still get the ticket.
    assert_eq!(fake.fetches(SHOP_APPID).await, token_fetches);
    let (_, v) = side.get(GETTICKET, &[]).await;
    assert_eq!(ticket_of(&v), ticket);
    assert!(!side.log().contains(&ticket));
}

#[tokio::test]
async fn app_ticket_calls_are_answered_from_the_cache() {
    let fake = Fake::start(&[]);
    let side = Sidecar::start_standard(&fake, "classic", "stable").await;
    let shop_jsapi = format!("{SHOP_APPID}:jsapi");

    // First use fetches (its refresher joins the lease scheduler); every
    // later call, with no token, a foreign token or the sidecar's own, is
    // answered locally.
    let leases_before = side.typed_status().await.leases_refreshed;
    let (status, v) = side.get(GETTICKET, &[]).await;
    assert_eq!(status, 200);
    let ticket = ticket_of(&v);
    assert_eq!(
        side.typed_status().await.leases_refreshed,
        leases_before + 1
    );
    let left = v["expires_in"].as_u64().unwrap();
    assert!((7100..=7200).contains(&left), "{v}");
    let own = side.token(SHOP_APPID, SHOP_SECRET).await;
    for q in [
        GETTICKET.to_string(),
        format!("{GETTICKET}&access_token=not-ours"),
        format!("/cgi-bin/ticket/getticket?access_token={own}&type=jsapi"),
    ] {
        let (_, v) = side.get(&q, &[]).await;
        assert_eq!(ticket_of(&v), ticket);
    }
    assert_eq!(fake.ticket_fetches(&shop_jsapi).await, 1);
    let left_ms = fake.ticket_left(&ticket).await;
    assert!(left_ms.unwrap() > 7_000_000, "{left_ms:?}");

    // Another type and another account are other tickets.
    let (_, card) = side
        .get("/cgi-bin/ticket/getticket?type=wx_card", &[])
        .await;
    let card = ticket_of(&card);
    assert_ne!(card, ticket);
    let (_, mall) = side.get(GETTICKET, &[("X-Wx-Account", "mall")]).await;
    let mall = ticket_of(&mall);
    assert_ne!(mall, ticket);
    let stats = fake.stats().await;
    assert_eq!(stats["ticket_fetches"][format!("{SHOP_APPID}:wx_card")], 1);
    assert_eq!(stats["ticket_fetches"][format!("{MALL_APPID}:jsapi")], 1);

    // A new token leaves the ticket alone.
    let r = client()
        .post(side.admin("/refresh?account=shop"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_ne!(side.token(SHOP_APPID, SHOP_SECRET).await, own);
    let (_, v) = side.get(GETTICKET, &[]).await;
    assert_eq!(ticket_of(&v), ticket);
    assert_eq!(fake.ticket_fetches(&shop_jsapi).await, 1);

    // Bad requests get WeChat's answer; WeCom's paths need a WeCom account.
    let (status, v) = side.get("/cgi-bin/ticket/getticket?type=nope", &[]).await;
    assert_eq!((status, v["errcode"].as_i64()), (200, Some(40097)), "{v}");
    let (status, v) = side.get("/cgi-bin/get_jsapi_ticket", &[]).await;
    assert_eq!(status, 400, "{v}");
    assert!(v["errmsg"].as_str().unwrap().contains("official"), "{v}");
    let (status, v) = side.get(GETTICKET, &[("X-Wx-Account", "nobody")]).await;
    assert_eq!((status, v["errcode"].as_i64()), (400, Some(40013)), "{v}");

    // Status and metrics count, never show the ticket.
    let st = side.status().await;
    let shop = &st["accounts"][0];
    let tickets = shop["tickets"].as_array().unwrap();
    assert_eq!(tickets.len(), 2, "{shop}");
    assert_eq!(tickets[0]["type"], "jsapi");
    assert_eq!(tickets[0]["valid"], true);
    assert_eq!(tickets[0]["fetches_ok"], 1);
    assert!(tickets[0]["age_seconds"].as_u64().is_some());
    let text = st.to_string();
    let metrics = side.metrics().await;
    assert!(
        metrics.contains(
            r#"wxsidecar_ticket_fetches_total{account="shop",result="ok",type="jsapi"} 1"#
        ),
        "{metrics}"
    );
    assert!(metrics.contains(r#"wxsidecar_ticket_expiry_seconds{account="shop",type="jsapi"}"#));
    assert!(metrics.contains(r#"wxsidecar_ticket_age_seconds{account="mall",type="jsapi"}"#));
    for t in [&ticket, &card, &mall] {
        assert!(!text.contains(t.as_str()) && !metrics.contains(t.as_str()));
    }
    side.assert_log_clean(&[&ticket, &card, &mall, &own]);
}

#[tokio::test]
async fn tickets_follow_their_real_expiry_not_the_claim() {
    // 4 s tickets; a re-fetch mid-life returns the same ticket claiming 4 s
    // again. Over 10 s the app must never get a ticket WeChat already
    // expired, nor be told it lasts longer than it does.
    let fake = Fake::start(&["--ticket-ttl", "4"]);
    let side = Sidecar::start_standard(&fake, "classic", "stable").await;
    let end = Instant::now() + Duration::from_secs(10);
    let mut seen = std::collections::HashSet::new();
    let mut calls = 0;
    while Instant::now() < end {
        let (_, v) = side.get(GETTICKET, &[]).await;
        let ticket = ticket_of(&v);
        let claimed = v["expires_in"].as_u64().unwrap();
        let real_ms = fake
            .ticket_left(&ticket)
            .await
            .expect("a ticket the fake issued");
        assert!(real_ms > 0, "expired ticket handed out: {v}");
        // Whole seconds, read a moment apart: one second of slack.
        assert!(
            claimed * 1000 <= real_ms + 1000,
            "told {claimed} s, really {real_ms} ms"
        );
        seen.insert(ticket);
        calls += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(calls > 50, "{calls}");
    assert!(seen.len() >= 3, "rotated through {} tickets", seen.len());
    let fetches = fake.ticket_fetches(&format!("{SHOP_APPID}:jsapi")).await;
    assert!(
        fetches <= 4 * seen.len() as u64,
        "{fetches} fetches for {} tickets",
        seen.len()
    );
    // Tokens (7200 s) were not refreshed along the way.
    assert_eq!(fake.fetches(SHOP_APPID).await, 1);
}

#[tokio::test]
async fn a_ticket_fetch_refused_for_the_token_refreshes_the_token_first() {
    let fake = Fake::start(&[]);
    let side = Sidecar::start_standard(&fake, "classic", "stable").await;
    assert_eq!(fake.fetches(SHOP_APPID).await, 1);
    // Someone else's refresh: the sidecar's token is now invalid at WeChat.
    fake.invalidate(SHOP_APPID).await;
    let (status, v) = side.get(GETTICKET, &[]).await;
    assert_eq!(status, 200, "{v}");
    let ticket = ticket_of(&v);
    assert!(fake.ticket_left(&ticket).await.is_some());
    assert_eq!(fake.fetches(SHOP_APPID).await, 2, "one token refresh");
    assert_eq!(fake.ticket_fetches(&format!("{SHOP_APPID}:jsapi")).await, 1);
    let st = side.status().await;
    assert_eq!(st["accounts"][0]["invalid_token_reports"], 1, "{st}");
}

#[tokio::test]
async fn quota_spent_is_reported_not_hammered() {
    // One ticket fetch an hour: the refresh at half-life is refused (45009).
    let fake = Fake::start(&["--ticket-ttl", "2", "--ticket-quota", "1"]);
    let side = Sidecar::start_standard(&fake, "classic", "stable").await;
    let (_, v) = side.get(GETTICKET, &[]).await;
    ticket_of(&v);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let (status, v) = side.get(GETTICKET, &[]).await;
    assert_eq!(status, 503, "{v}");
    let msg = v["errmsg"].as_str().unwrap();
    assert!(
        msg.contains("jsapi ticket") && msg.contains("45009") && msg.contains("shop"),
        "{v}"
    );
    let st = side.status().await;
    let t = &st["accounts"][0]["tickets"][0];
    assert_eq!(t["last_error"]["errcode"], 45009, "{st}");
    // A hard failure waits token.failed_retry (60 s): one refused try, not a loop.
    assert_eq!(t["fetches_failed"], 1, "{st}");
    assert_eq!(side.get("/cgi-bin/get_jsapi_ticket", &[]).await.0, 400);
}

#[tokio::test]
async fn jssdk_config_is_signed_with_the_cached_ticket() {
    let fake = Fake::start(&[]);
    let side = Sidecar::start_standard(&fake, "classic", "stable").await;
    let page = "https://shop.example.com/pay?item=42&from=menu";
    let encoded: String =
        url::form_urlencoded::byte_serialize(format!("{page}#top").as_bytes()).collect();
    let (status, v) = side
        .get(
            &format!("/wxsidecar/jssdk/config?account=mall&url={encoded}"),
            &[],
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["appId"], MALL_APPID);
    let nonce = v["nonceStr"].as_str().unwrap();
    let ts = v["timestamp"].as_u64().unwrap();
    assert!(nonce.len() >= 16);
    let (_, t) = side.get(GETTICKET, &[("X-Wx-Account", "mall")]).await;
    let ticket = ticket_of(&t);
    let expected = sha1_hex(&format!(
        "jsapi_ticket={ticket}&noncestr={nonce}&timestamp={ts}&url={page}"
    ));
    assert_eq!(v["signature"], expected.as_str());
    assert!(!v.to_string().contains(&ticket), "the ticket stays inside");
    assert_eq!(fake.ticket_fetches(&format!("{MALL_APPID}:jsapi")).await, 1);

    // Default account; errors say what to fix.
    let (status, v) = side
        .get(&format!("/wxsidecar/jssdk/config?url={encoded}"), &[])
        .await;
    assert_eq!((status, &v["appId"]), (200, &Value::from(SHOP_APPID)));
    let (status, v) = side.get("/wxsidecar/jssdk/config?account=shop", &[]).await;
    assert_eq!(status, 400);
    assert!(v["errmsg"].as_str().unwrap().contains("url missing"), "{v}");
    let (status, v) = side
        .get("/wxsidecar/jssdk/config?url=shop.example.com%2Fpay", &[])
        .await;
    assert_eq!(status, 400);
    assert!(v["errmsg"].as_str().unwrap().contains("http(s) URL"), "{v}");
    let (status, v) = side
        .get(
            &format!("/wxsidecar/jssdk/config?account=nobody&url={encoded}"),
            &[],
        )
        .await;
    assert_eq!((status, v["errcode"].as_i64()), (400, Some(40013)), "{v}");
    let (status, v) = side
        .get(
            &format!("/wxsidecar/jssdk/agent_config?account=shop&url={encoded}"),
            &[],
        )
        .await;
    assert_eq!(status, 400, "{v}");
}

#[tokio::test]
async fn wecom_tickets_and_agent_config() {
    const CORP: &str = "ww00000000000000a1";
    let ca = tempfile::tempdir().unwrap();
    let wechat = Fake::start_in(ca.path(), 0, &[]);
    let wecom = Fake::start_in(
        ca.path(),
        0,
        &[
            "--wecom-app",
            &format!("{CORP}:hr-secret"),
            "--wecom-app",
            &format!("{CORP}:it-secret"),
        ],
    );
    let cfg = format!(
        "upstream:\n  url: https://localhost:{}\n  ca_file: {ca}\nwecom_upstream:\n  url: https://localhost:{}\n  ca_file: {ca}\naccounts:\n  - {{name: hr, kind: wecom, corpid: {CORP}, agentid: 1000002, secret: hr-secret, default: true}}\n  - {{name: it, kind: wecom, corpid: {CORP}, secret: it-secret}}\n",
        wechat.port,
        wecom.port,
        ca = wechat.ca.display(),
    );
    let side = Sidecar::start(&wechat, &cfg).await;
    let (_, corp) = side.get("/cgi-bin/get_jsapi_ticket", &[]).await;
    let corp = ticket_of(&corp);
    let (_, hr) = side.get("/cgi-bin/ticket/get?type=agent_config", &[]).await;
    let hr = ticket_of(&hr);
    let (_, it) = side
        .get(
            "/cgi-bin/ticket/get?type=agent_config",
            &[("X-Wx-Account", "it")],
        )
        .await;
    let it = ticket_of(&it);
    assert!(corp != hr && hr != it, "corp ticket, and one per app");
    let stats = wecom.stats().await;
    assert_eq!(
        stats["ticket_fetches"][format!("{CORP}:jsapi")],
        1,
        "{stats}"
    );
    assert_eq!(
        stats["ticket_fetches"][format!("{CORP}/app1:agent_config")],
        1
    );
    assert_eq!(
        stats["ticket_fetches"][format!("{CORP}/app2:agent_config")],
        1
    );
    assert_eq!(
        wechat.stats().await["ticket_fetches"],
        serde_json::json!({})
    );
    let (status, v) = side.get(GETTICKET, &[]).await;
    assert_eq!(status, 400, "Official Account path on a WeCom account: {v}");

    // wx.agentConfig for hr, signed with hr's agent_config ticket.
    let page = "https://hr.example.com/leave";
    let (status, v) = side
        .get(&format!("/wxsidecar/jssdk/agent_config?url={page}"), &[])
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        (&v["corpid"], &v["agentid"]),
        (&Value::from(CORP), &Value::from(1000002))
    );
    let (nonce, ts) = (
        v["nonceStr"].as_str().unwrap(),
        v["timestamp"].as_u64().unwrap(),
    );
    assert_eq!(
        v["signature"],
        sha1_hex(&format!(
            "jsapi_ticket={hr}&noncestr={nonce}&timestamp={ts}&url={page}"
        ))
        .as_str()
    );
    // wx.config on WeCom: the corp ticket, appId is the corpid.
    let (_, v) = side
        .get(&format!("/wxsidecar/jssdk/config?url={page}"), &[])
        .await;
    let (nonce, ts) = (
        v["nonceStr"].as_str().unwrap(),
        v["timestamp"].as_u64().unwrap(),
    );
    assert_eq!(v["appId"], CORP);
    assert_eq!(
        v["signature"],
        sha1_hex(&format!(
            "jsapi_ticket={corp}&noncestr={nonce}&timestamp={ts}&url={page}"
        ))
        .as_str()
    );
    // it has no agentid: agentConfig cannot be signed for it.
    let (status, v) = side
        .get(
            &format!("/wxsidecar/jssdk/agent_config?account=it&url={page}"),
            &[],
        )
        .await;
    assert_eq!(status, 400);
    assert!(v["errmsg"].as_str().unwrap().contains("agentid"), "{v}");
}

#[tokio::test]
async fn replicas_share_tickets_through_redis() {
    let fake = Fake::start(&[]);
    let redis = Redis::start().await;
    let cfg = format!(
        "{}token:\n  store: {}\n{}",
        upstream(),
        redis.url(),
        Sidecar::accounts("stable", "stable")
    );
    let a = Sidecar::start(&fake, &cfg).await;
    let b = Sidecar::start(&fake, &cfg).await;
    let (_, va) = a.get(GETTICKET, &[]).await;
    let (_, vb) = b.get(GETTICKET, &[]).await;
    assert_eq!(ticket_of(&va), ticket_of(&vb));
    assert_eq!(fake.ticket_fetches(&format!("{SHOP_APPID}:jsapi")).await, 1);
    let rec: Value = serde_json::from_str(
        &redis
            .get(&format!("wxsidecar:token:ticket_jsapi:{SHOP_APPID}"))
            .await
            .expect("the ticket is in the store"),
    )
    .unwrap();
    assert_eq!(rec["token"], ticket_of(&va).as_str());
}

/// An upstream that echoes what it was sent in its errmsg (a secret, our
/// token) gets it masked before the errmsg reaches the app's error answer
/// (a ticket's), `/status` or a log line.
#[tokio::test]
async fn an_errmsg_echoing_the_request_carries_no_secret_or_token() {
    let echo = |path: &str| {
        format!(r#"{{"rules":[{{"path":"{path}","echo_rate":1.0,"errcode":45009}}]}}"#)
    };
    // A ticket fetch sends our token in its query (45009: refused at once,
    // not retried while the app waits).
    let fake = Fake::start(&[]);
    let side = Sidecar::start_standard(&fake, "classic", "stable").await;
    fake.faults(&echo("/cgi-bin/ticket/getticket")).await;
    let (status, v) = side.get(GETTICKET, &[]).await;
    assert_eq!(status, 503, "{v}");
    let token = fake
        .requests()
        .await
        .iter()
        .find(|r| r["path"] == "/cgi-bin/ticket/getticket")
        .and_then(|r| r["access_token"].as_str().map(str::to_string))
        .expect("the ticket fetch went out with a token");
    assert!(v["errmsg"].as_str().unwrap().contains("echo: "), "{v}");
    assert!(!v.to_string().contains(&token), "{v}");
    let st = side.status().await;
    assert!(st.to_string().contains("echo: "), "{st}");
    assert!(!st.to_string().contains(&token), "{st}");
    side.assert_log_clean(&[&token]);

    // Token fetches send the secret: in the query (classic), in the body (stable).
    for (api, path) in [
        ("classic", "/cgi-bin/token"),
        ("stable", "/cgi-bin/stable_token"),
    ] {
        let fake = Fake::start(&["--faults", &echo(path)]);
        let cfg = format!("{}{}", upstream(), Sidecar::accounts(api, api));
        let side = Sidecar::start_unready(&fake, &cfg).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        let st = loop {
            let st = side.status().await;
            if st.to_string().contains("echo: ") || Instant::now() > deadline {
                break st;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let text = st.to_string();
        assert!(text.contains("echo: "), "{api}: the echo is shown: {st}");
        assert!(
            !text.contains(SHOP_SECRET) && !text.contains(MALL_SECRET),
            "{api}: {st}"
        );
        side.assert_log_clean(&[]);
    }
}
