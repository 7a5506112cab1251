//! Third-party platforms: WeChat (the fake) pushes encrypted tickets to the
//! sidecar's callback, the sidecar fetches the component token, exchanges
//! an authorisation, and apps call the authoriser's APIs with no token.

use serde_json::Value;

use crate::support::*;

pub(crate) const TEMPLATE_SEND: &str = "/cgi-bin/message/template/send";
pub(crate) const COMPONENT: &str = "wxcomponent00001";
pub(crate) const COMPONENT_SECRET: &str = "component-secret-1";
pub(crate) const PTOKEN: &str = "platform-token";
pub(crate) const AES_KEY: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";
pub(crate) const AUTHORIZER: &str = "wxauthorizer0001";

pub(crate) fn fake() -> Fake {
    Fake::start(&[
        "--platform",
        &format!("{COMPONENT}:{COMPONENT_SECRET}:{PTOKEN}:{AES_KEY}"),
    ])
}

pub(crate) fn platform_config(extra: &str) -> String {
    format!(
        "{}platforms:\n  - name: saas\n    component_appid: {COMPONENT}\n    component_secret: {COMPONENT_SECRET}\n    token: {PTOKEN}\n    encoding_aes_key: {AES_KEY}\n{extra}",
        upstream()
    )
}

/// WeChat pushes a ticket to `side`'s callback (and keeps it as the URL for
/// the events that follow); it is answered `success`.
pub(crate) async fn push_ticket(fake: &Fake, side: &Sidecar) {
    let cb = format!(
        "/__fake/platform-callback?url={}",
        side.url("/wxsidecar/platform/saas/callback")
    );
    assert_eq!(fake.platform_admin(&cb).await["delivered"], true);
}

/// `AUTHORIZER` authorises the platform; the event is delivered and its code
/// exchanged.
pub(crate) async fn authorise(fake: &Fake) {
    let v = fake
        .platform_admin(&format!("/__fake/authorize?authorizer={AUTHORIZER}"))
        .await;
    assert_eq!(v["delivered"], true, "{v}");
}

pub(crate) async fn platform_stats(fake: &Fake) -> Value {
    fake.stats().await["platform"].clone()
}

#[tokio::test]
async fn ticket_then_component_token_then_an_authorised_account_served_without_a_token() {
    let fake = fake();
    let side = Sidecar::start(&fake, &platform_config("")).await;
    // The platform's events reach the sidecar's callback.
    let callback = side.url("/wxsidecar/platform/saas/callback");
    let v = fake
        .platform_admin(&format!("/__fake/platform-callback?url={callback}"))
        .await;
    assert_eq!(
        v["delivered"], true,
        "the ticket push was answered success: {v}"
    );

    let v = fake
        .platform_admin(&format!("/__fake/authorize?authorizer={AUTHORIZER}"))
        .await;
    assert_eq!(v["delivered"], true, "the authorisation was exchanged: {v}");
    let (code, v) = side.send_as(AUTHORIZER, TEMPLATE_SEND, TEMPLATE).await;
    assert_eq!((code, v["errcode"].as_i64()), (200, Some(0)), "{v}");
    let seen = fake.last_request().await;
    assert!(seen["access_token"].as_str().is_some_and(|t| !t.is_empty()));
    let stats = platform_stats(&fake).await;
    assert_eq!(stats["component_token_fetches"], 1, "{stats}");
    assert_eq!(stats["query_auth_calls"], 1, "{stats}");

    // WeChat revokes the authoriser's token: one refresh, the send replayed.
    let fetches = stats["authorizer_token_fetches"].as_u64().unwrap();
    fake.invalidate(AUTHORIZER).await;
    let (code, v) = side.send_as(AUTHORIZER, TEMPLATE_SEND, TEMPLATE).await;
    assert_eq!(
        (code, v["errcode"].as_i64()),
        (200, Some(0)),
        "replayed: {v}"
    );
    let stats = platform_stats(&fake).await;
    assert_eq!(stats["authorizer_token_fetches"], fetches + 1, "{stats}");

    // /status knows it as an account; nothing secret in the log.
    let st = side.typed_status().await;
    assert!(st
        .accounts
        .iter()
        .any(|a| a.appid == AUTHORIZER && a.token_valid && a.token_api == "authorizer"));
    let p = &st.platforms[0];
    assert!(p.ticket_received && p.component_token_valid, "{p:?}");
    assert_eq!(p.authorizers, 1);
    assert!(!side.status().await.to_string().contains("ticket@@@"));
    side.assert_log_clean(&[COMPONENT_SECRET, PTOKEN]);

    // Revoked: gone.
    let v = fake
        .platform_admin(&format!("/__fake/unauthorize?authorizer={AUTHORIZER}"))
        .await;
    assert_eq!(v["delivered"], true, "{v}");
    let (code, v) = side.send_as(AUTHORIZER, TEMPLATE_SEND, TEMPLATE).await;
    assert_eq!(code, 400, "an unknown account now: {v}");
}

#[tokio::test]
async fn a_forged_event_is_refused_and_nothing_is_stored() {
    let fake = fake();
    let side = Sidecar::start(&fake, &platform_config("")).await;
    let url = side.url("/wxsidecar/platform/saas/callback");
    // Well-formed, but signed with the wrong token.
    let forged = "<xml><AppId>x</AppId><Encrypt><![CDATA[AAAA]]></Encrypt></xml>";
    let r = client()
        .post(format!("{url}?timestamp=1&nonce=2&encrypt_type=aes&msg_signature=0000000000000000000000000000000000000000"))
        .body(forged)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = client()
        .post(side.url("/wxsidecar/platform/nope/callback?timestamp=1&nonce=2&msg_signature=x"))
        .body(forged)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400, "unknown platform");
    // The route takes anyone's request until the signature is checked: it
    // reads no more than an event could be (64 KiB), whatever
    // limits.buffered_body allows.
    let r = client()
        .post(format!("{url}?timestamp=1&nonce=2&encrypt_type=aes&msg_signature=0000000000000000000000000000000000000000"))
        .body(vec![b'x'; 100 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    // No ticket was taken: the component token cannot have been fetched.
    assert_eq!(platform_stats(&fake).await["component_token_fetches"], 0);
}

#[tokio::test]
async fn a_restart_with_the_memory_store_keeps_refresh_tokens() {
    let fake = fake();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("saas.json");
    let config = platform_config(&format!("    state_file: {}\n", state.display()));
    let side = Sidecar::start(&fake, &config).await;
    let cb = |s: &Sidecar| {
        format!(
            "/__fake/platform-callback?url={}",
            s.url("/wxsidecar/platform/saas/callback")
        )
    };
    assert_eq!(fake.platform_admin(&cb(&side)).await["delivered"], true);
    authorise(&fake).await;
    assert_eq!(
        side.send_as(AUTHORIZER, TEMPLATE_SEND, TEMPLATE).await.1["errcode"],
        0
    );
    drop(side);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&state).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let text = std::fs::read_to_string(&state).unwrap();
    assert!(text.contains(AUTHORIZER));

    // A new process: the authoriser is an account at once, its token comes
    // from the refresh token kept (no new authorisation), the component
    // token from the ticket kept.
    let side = Sidecar::start(&fake, &config).await;
    let (code, v) = side.send_as(AUTHORIZER, TEMPLATE_SEND, TEMPLATE).await;
    assert_eq!((code, v["errcode"].as_i64()), (200, Some(0)), "{v}");
    let stats = platform_stats(&fake).await;
    assert_eq!(stats["query_auth_calls"], 1, "no re-authorisation: {stats}");
}

#[tokio::test]
async fn a_stale_refresh_token_is_recovered_through_the_authoriser_list() {
    let fake = fake();
    // The authoriser exists at WeChat; the sidecar's seed holds an old token.
    let v = fake
        .platform_admin(&format!("/__fake/authorize?authorizer={AUTHORIZER}"))
        .await;
    assert_eq!(v["delivered"], false, "no callback yet: {v}");
    let config = platform_config(&format!(
        "    authorizers:\n      - {{appid: {AUTHORIZER}, refresh_token: refreshtoken@@@stale}}\n"
    ));
    let side = Sidecar::start(&fake, &config).await;
    push_ticket(&fake, &side).await;
    // The seeded account fetches with the stale token: 61023, recovered.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (code, v) = side.send_as(AUTHORIZER, TEMPLATE_SEND, TEMPLATE).await;
        if v["errcode"] == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never recovered: {code} {v}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let stats = platform_stats(&fake).await;
    assert_eq!(stats["authorizer_list_calls"], 1, "{stats}");
    assert_eq!(stats["query_auth_calls"], 0, "no re-authorisation: {stats}");
    assert!(side
        .log()
        .contains("recovering it through api_get_authorizer_list"));
    side.assert_log_clean(&["refreshtoken@@@"]);
}

#[tokio::test]
async fn an_operator_resync_keeps_every_listed_refresh_token_for_first_use() {
    let fake = fake();
    let side = Sidecar::start(&fake, &platform_config("")).await;
    push_ticket(&fake, &side).await;
    // Two authorisations the sidecar never heard of (events lost).
    fake.platform_admin(&format!(
        "/__fake/platform-callback?url=http://127.0.0.1:{}/x",
        free_port()
    ))
    .await;
    for a in ["wxauthorizer0001", "wxauthorizer0002"] {
        let v = fake
            .platform_admin(&format!("/__fake/authorize?authorizer={a}"))
            .await;
        assert_eq!(v["delivered"], false, "{v}");
    }
    // Nothing named them yet: not accounts.
    let st = side.typed_status().await;
    assert!(st
        .accounts
        .iter()
        .all(|a| !a.appid.starts_with("wxauthorizer")));
    let r = client()
        .post(side.admin("/platform/resync?name=saas"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["authorizers"].as_array().unwrap().len(), 2, "{v}");
    // Kept, not fetched: an authoriser's token comes on its first use.
    let st = side.typed_status().await;
    assert!(st
        .accounts
        .iter()
        .all(|a| !a.appid.starts_with("wxauthorizer")));
    assert_eq!(platform_stats(&fake).await["authorizer_token_fetches"], 0);
    for a in ["wxauthorizer0001", "wxauthorizer0002"] {
        let (code, v) = side.send_as(a, TEMPLATE_SEND, TEMPLATE).await;
        assert_eq!((code, v["errcode"].as_i64()), (200, Some(0)), "{a}: {v}");
    }
    // Spaced: a second resync at once is refused.
    let r = client()
        .post(side.admin("/platform/resync?name=saas"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
}

#[tokio::test]
async fn three_replicas_on_redis_share_the_component_and_authoriser_tokens() {
    let fake = fake();
    let redis = Redis::start().await;
    let config = format!("{}token:\n  store: {}\n", platform_config(""), redis.url());
    let a = Sidecar::start(&fake, &config).await;
    let b = Sidecar::start(&fake, &config).await;
    let c = Sidecar::start(&fake, &config).await;
    // WeChat calls one replica only.
    push_ticket(&fake, &a).await;
    authorise(&fake).await;
    for side in [&a, &b, &c] {
        let (code, v) = side.send_as(AUTHORIZER, TEMPLATE_SEND, TEMPLATE).await;
        assert_eq!((code, v["errcode"].as_i64()), (200, Some(0)), "{v}");
    }
    let stats = platform_stats(&fake).await;
    assert_eq!(
        stats["component_token_fetches"], 1,
        "one per lifetime: {stats}"
    );
    assert_eq!(
        stats["authorizer_token_fetches"], 1,
        "one per lifetime: {stats}"
    );
    // The refresh token is in Redis, for any replica to come.
    let mut conn = redis.conn().await.unwrap();
    let kept: Option<String> = redis::cmd("HGET")
        .arg(format!("wxsidecar:platform:{COMPONENT}:refresh_tokens"))
        .arg(AUTHORIZER)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(kept.is_some_and(|t| t.starts_with("refreshtoken@@@")));
}

#[tokio::test]
async fn an_apps_own_component_calls_get_the_component_token_or_are_answered_locally() {
    let fake = fake();
    let side = Sidecar::start(&fake, &platform_config("")).await;
    push_ticket(&fake, &side).await;
    authorise(&fake).await;
    // The authoriser's first token is in (its fetch runs after the event).
    assert_eq!(
        side.send_as(AUTHORIZER, TEMPLATE_SEND, TEMPLATE).await.1["errcode"],
        0
    );
    let before = platform_stats(&fake).await;
    let c = client();
    let post = |path: &str, body: Value| {
        let (url, c) = (side.url(path), c.clone());
        async move {
            let r = c.post(url).body(body.to_string()).send().await.unwrap();
            let s = r.status().as_u16();
            (s, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    // The SDK's own token calls: answered from the cache, secret checked.
    let (code, v) = post(
        "/cgi-bin/component/api_component_token",
        serde_json::json!({"component_appid": COMPONENT, "component_appsecret": COMPONENT_SECRET, "component_verify_ticket": "whatever"}),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    let component = v["component_access_token"].as_str().unwrap().to_string();
    let (_, v) = post(
        "/cgi-bin/component/api_component_token",
        serde_json::json!({"component_appid": COMPONENT, "component_appsecret": "guess", "component_verify_ticket": "x"}),
    )
    .await;
    assert_eq!(v["errcode"], 61006, "{v}");
    let (code, v) = post(
        &format!("/cgi-bin/component/api_authorizer_token?component_access_token={component}"),
        serde_json::json!({"component_appid": COMPONENT, "authorizer_appid": AUTHORIZER, "authorizer_refresh_token": "x"}),
    )
    .await;
    assert_eq!(code, 200, "{v}");
    assert!(
        v["authorizer_access_token"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "{v}"
    );
    // Without the component token it learns nothing.
    let (_, v) = post(
        "/cgi-bin/component/api_authorizer_token?component_access_token=guess",
        serde_json::json!({"component_appid": COMPONENT, "authorizer_appid": AUTHORIZER, "authorizer_refresh_token": "x"}),
    )
    .await;
    assert_eq!(v["errcode"], 40001, "{v}");
    assert!(v.get("authorizer_access_token").is_none());
    let after = platform_stats(&fake).await;
    assert_eq!(
        after["component_token_fetches"],
        before["component_token_fetches"]
    );
    assert_eq!(
        after["authorizer_token_fetches"],
        before["authorizer_token_fetches"]
    );

    // Any other component API: the component token put in.
    let (code, v) = post(
        "/cgi-bin/component/api_create_preauthcode",
        serde_json::json!({"component_appid": COMPONENT}),
    )
    .await;
    assert_eq!((code, v["errcode"].as_i64()), (200, Some(0)), "{v}");
    // No parameter given: it goes in as access_token (the newer docs' name).
    let seen = fake.last_request().await;
    assert_eq!(seen["access_token"], component.as_str(), "{seen}");
    let (_, v) = post(
        &format!("/cgi-bin/component/api_create_preauthcode?component_access_token={component}"),
        serde_json::json!({"component_appid": COMPONENT}),
    )
    .await;
    assert_eq!(v["errcode"], 0, "{v}");
    let seen = fake.last_request().await;
    assert!(
        seen["query"]
            .as_str()
            .unwrap()
            .starts_with("component_access_token="),
        "in the parameter the caller used: {seen}"
    );
    // A component token that is not ours stays.
    let (_, v) = post(
        "/cgi-bin/component/api_create_preauthcode?component_access_token=FOREIGN",
        serde_json::json!({"component_appid": COMPONENT}),
    )
    .await;
    assert_eq!(v["errcode"], 40001, "forwarded as sent: {v}");

    // WeChat stops taking the component token (someone else fetched one):
    // refreshed once and the call replayed, as an account's call is.
    let fetches = platform_stats(&fake).await["component_token_fetches"]
        .as_u64()
        .unwrap();
    fake.invalidate(COMPONENT).await;
    let (code, v) = post(
        "/cgi-bin/component/api_create_preauthcode",
        serde_json::json!({"component_appid": COMPONENT}),
    )
    .await;
    assert_eq!(
        (code, v["errcode"].as_i64()),
        (200, Some(0)),
        "replayed: {v}"
    );
    assert_eq!(
        platform_stats(&fake).await["component_token_fetches"],
        fetches + 1
    );
    let (_, v) = post(
        "/cgi-bin/component/api_component_token",
        serde_json::json!({"component_appid": COMPONENT, "component_appsecret": COMPONENT_SECRET, "component_verify_ticket": "x"}),
    )
    .await;
    let component = v["component_access_token"].as_str().unwrap().to_string();

    // An upstream that echoes the request hands the app no component token
    // (only the component secret buys it), in either parameter.
    fake.faults(
        r#"{"rules": [{"path": "/cgi-bin/component/api_create_preauthcode", "echo_rate": 1.0}]}"#,
    )
    .await;
    for path in [
        "/cgi-bin/component/api_create_preauthcode".to_string(),
        format!("/cgi-bin/component/api_create_preauthcode?component_access_token={component}"),
    ] {
        let (_, v) = post(&path, serde_json::json!({"component_appid": COMPONENT})).await;
        let text = v.to_string();
        assert!(text.contains("echo:"), "{text}");
        assert!(!text.contains(&component), "masked: {text}");
    }
}

#[tokio::test]
async fn an_idle_authoriser_leaves_memory_and_comes_back_on_its_next_request() {
    let fake = fake();
    let side = Sidecar::start(&fake, &platform_config("    idle_after: 2s\n")).await;
    push_ticket(&fake, &side).await;
    authorise(&fake).await;
    assert_eq!(
        side.send_as(AUTHORIZER, TEMPLATE_SEND, TEMPLATE).await.1["errcode"],
        0
    );
    let listed = |st: &wxsidecar::status::Status| st.accounts.iter().any(|a| a.appid == AUTHORIZER);
    assert!(listed(&side.typed_status().await));
    // Unused past idle_after: dropped (the refresh token stays).
    let deadline = std::time::Instant::now() + WAIT;
    while listed(&side.typed_status().await) {
        assert!(std::time::Instant::now() < deadline, "never dropped");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    let st = side.typed_status().await;
    assert_eq!(st.platforms[0].authorizers, 1, "its refresh token is kept");
    assert!(side.log().contains("idle authorised accounts dropped"));
    // Its next request brings it back, with no new authorisation — the
    // app's own api_authorizer_token call too.
    let component = client()
        .post(side.url("/cgi-bin/component/api_component_token"))
        .body(serde_json::json!({"component_appid": COMPONENT, "component_appsecret": COMPONENT_SECRET, "component_verify_ticket": "x"}).to_string())
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap()["component_access_token"]
        .as_str()
        .unwrap()
        .to_string();
    let r = client()
        .post(side.url(&format!(
            "/cgi-bin/component/api_authorizer_token?component_access_token={component}"
        )))
        .body(serde_json::json!({"component_appid": COMPONENT, "authorizer_appid": AUTHORIZER, "authorizer_refresh_token": "x"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert!(
        v["authorizer_access_token"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "{v}"
    );
    let (code, v) = side.send_as(AUTHORIZER, TEMPLATE_SEND, TEMPLATE).await;
    assert_eq!((code, v["errcode"].as_i64()), (200, Some(0)), "{v}");
    assert_eq!(platform_stats(&fake).await["query_auth_calls"], 1);
}

#[tokio::test]
async fn a_flushed_store_is_recovered_through_the_authoriser_list_without_reauthorising() {
    let fake = fake();
    let redis = Redis::start().await;
    let config = format!("{}token:\n  store: {}\n", platform_config(""), redis.url());
    let a = Sidecar::start(&fake, &config).await;
    let cb = |s: &Sidecar| {
        format!(
            "/__fake/platform-callback?url={}",
            s.url("/wxsidecar/platform/saas/callback")
        )
    };
    assert_eq!(fake.platform_admin(&cb(&a)).await["delivered"], true);
    authorise(&fake).await;
    assert_eq!(
        a.send_as(AUTHORIZER, TEMPLATE_SEND, TEMPLATE).await.1["errcode"],
        0
    );
    // Redis loses everything; a new replica starts and gets the next ticket.
    let mut conn = redis.conn().await.unwrap();
    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
    let b = Sidecar::start(&fake, &config).await;
    assert_eq!(fake.platform_admin(&cb(&b)).await["delivered"], true);
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (code, v) = b.send_as(AUTHORIZER, TEMPLATE_SEND, TEMPLATE).await;
        if v["errcode"] == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never recovered: {code} {v}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    let stats = platform_stats(&fake).await;
    assert_eq!(stats["query_auth_calls"], 1, "no re-authorisation: {stats}");
    assert!(
        stats["authorizer_list_calls"].as_u64().unwrap() >= 1,
        "{stats}"
    );
    let kept: Option<String> = redis::cmd("HGET")
        .arg(format!("wxsidecar:platform:{COMPONENT}:refresh_tokens"))
        .arg(AUTHORIZER)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(kept.is_some(), "back in the store");
}

#[tokio::test]
async fn a_client_limited_to_some_accounts_drives_a_platform_only_when_it_lists_it() {
    const SHOP_ONLY: &str = "shop-only-token-0123456789";
    const SAAS: &str = "saas-token-0123456789abcdef";
    let fake = fake();
    let config = format!(
        "{}accounts:\n  - name: shop\n    appid: {SHOP_APPID}\n    secret: shop-secret-1\nclients:\n  tokens:\n    - {{name: shop-app, token: {SHOP_ONLY}, accounts: [shop]}}\n    - {{name: saas-app, token: {SAAS}, accounts: [saas]}}\n",
        platform_config("")
    );
    let side = Sidecar::start(&fake, &config).await;
    // WeChat's callback needs no client token: its signature is its credential.
    push_ticket(&fake, &side).await;
    authorise(&fake).await;

    let call = |bearer: &'static str, path: &'static str, account: Option<&'static str>| {
        let mut r = client()
            .post(side.url(path))
            .header("Authorization", format!("Bearer {bearer}"))
            .body(if path == TEMPLATE_SEND {
                TEMPLATE
            } else {
                r#"{"component_appid":"wxcomponent00001","offset":0,"count":100}"#
            });
        if let Some(a) = account {
            r = r.header("X-Wx-Account", a);
        }
        async move {
            let r = r.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    const LIST: &str = "/cgi-bin/component/api_get_authorizer_list";
    // The component token reaches every authoriser's refresh token: a
    // client limited to `shop` does not get it injected.
    let lists = platform_stats(&fake).await["authorizer_list_calls"]
        .as_u64()
        .unwrap();
    let (code, v) = call(SHOP_ONLY, LIST, None).await;
    assert_eq!((code, v["errcode"].as_i64()), (403, Some(48001)), "{v}");
    let (code, v) = call(SHOP_ONLY, TEMPLATE_SEND, Some(AUTHORIZER)).await;
    assert_eq!((code, v["errcode"].as_i64()), (403, Some(48001)), "{v}");
    assert_eq!(
        platform_stats(&fake).await["authorizer_list_calls"],
        lists,
        "nothing reached WeChat"
    );
    // A client that lists the platform drives it and its authorisers.
    let (code, v) = call(SAAS, LIST, None).await;
    assert_eq!((code, v["total_count"].as_i64()), (200, Some(1)), "{v}");
    let (code, v) = call(SAAS, TEMPLATE_SEND, Some(AUTHORIZER)).await;
    assert_eq!((code, v["errcode"].as_i64()), (200, Some(0)), "{v}");
    let (code, v) = call(SAAS, TEMPLATE_SEND, Some("shop")).await;
    assert_eq!((code, v["errcode"].as_i64()), (403, Some(48001)), "{v}");
    let (code, v) = call(SHOP_ONLY, TEMPLATE_SEND, Some("shop")).await;
    assert_eq!((code, v["errcode"].as_i64()), (200, Some(0)), "{v}");
    side.assert_log_clean(&[SHOP_ONLY, SAAS, COMPONENT_SECRET]);
}
