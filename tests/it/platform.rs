//! Third-party platforms: WeChat (the fake) pushes encrypted tickets to the
//! sidecar's callback, the sidecar fetches the component token, exchanges
//! an authorisation, and apps call the authoriser's APIs with no token.

use serde_json::Value;

use crate::support::*;

const TEMPLATE_SEND: &str = "/cgi-bin/message/template/send";
const COMPONENT: &str = "wxcomponent00001";
const COMPONENT_SECRET: &str = "component-secret-1";
const PTOKEN: &str = "platform-token";
const AES_KEY: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";
const AUTHORIZER: &str = "wxauthorizer0001";

fn fake() -> Fake {
    Fake::start(&[
        "--platform",
        &format!("{COMPONENT}:{COMPONENT_SECRET}:{PTOKEN}:{AES_KEY}"),
    ])
}

fn platform_config(extra: &str) -> String {
    format!(
        "{}platforms:\n  - name: saas\n    component_appid: {COMPONENT}\n    component_secret: {COMPONENT_SECRET}\n    token: {PTOKEN}\n    encoding_aes_key: {AES_KEY}\n{extra}",
        upstream()
    )
}

/// WeChat pushes a ticket to `side`'s callback (and keeps it as the URL for
/// the events that follow); it is answered `success`.
async fn push_ticket(fake: &Fake, side: &Sidecar) {
    let cb = format!(
        "/__fake/platform-callback?url={}",
        side.url("/wxsidecar/platform/saas/callback")
    );
    assert_eq!(fake.platform_admin(&cb).await["delivered"], true);
}

/// `AUTHORIZER` authorises the platform; the event is delivered and its code
/// exchanged.
async fn authorise(fake: &Fake) {
    let v = fake
        .platform_admin(&format!("/__fake/authorize?authorizer={AUTHORIZER}"))
        .await;
    assert_eq!(v["delivered"], true, "{v}");
}

async fn platform_stats(fake: &Fake) -> Value {
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

/// The app's own event handler: a real HTTP/1.1 server on loopback (keep-
/// alive) that records each request and answers `status` in turn (the last
/// one repeated).
struct Handler {
    port: u16,
    seen: std::sync::Arc<parking_lot::Mutex<Vec<Seen>>>,
}

#[derive(Clone, Debug)]
struct Seen {
    target: String,
    headers: Vec<(String, String)>,
    body: String,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn param(&self, k: &str) -> String {
        let q = self.target.split_once('?').map_or("", |(_, q)| q);
        q.split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(key, _)| *key == k)
            .map(|(_, v)| v.to_string())
            .unwrap_or_default()
    }
}

impl Handler {
    async fn start(statuses: &[u16]) -> Handler {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = std::sync::Arc::new(parking_lot::Mutex::new(Vec::<Seen>::new()));
        let statuses = std::sync::Arc::new(statuses.to_vec());
        let (rec, order) = (
            seen.clone(),
            std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        );
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let (rec, statuses, order) = (rec.clone(), statuses.clone(), order.clone());
                tokio::spawn(async move {
                    let (r, mut w) = sock.into_split();
                    let mut r = tokio::io::BufReader::new(r);
                    for _ in 0..100 {
                        let mut line = String::new();
                        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let target = line.split(' ').nth(1).unwrap_or_default().to_string();
                        let mut headers = Vec::new();
                        loop {
                            let mut h = String::new();
                            r.read_line(&mut h).await.unwrap();
                            let h = h.trim_end();
                            if h.is_empty() {
                                break;
                            }
                            let (k, v) = h.split_once(':').unwrap();
                            headers.push((k.trim().to_string(), v.trim().to_string()));
                        }
                        let len: usize = headers
                            .iter()
                            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                            .map_or(0, |(_, v)| v.parse().unwrap());
                        let mut body = vec![0; len];
                        r.read_exact(&mut body).await.unwrap();
                        let n = order.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let status = statuses[n.min(statuses.len() - 1)];
                        rec.lock().push(Seen {
                            target,
                            headers,
                            body: String::from_utf8(body).unwrap(),
                        });
                        let answer =
                            format!("HTTP/1.1 {status} X\r\nContent-Length: 7\r\n\r\nsuccess");
                        if w.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        Handler { port, seen }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().clone()
    }

    /// Waits until `n` requests came.
    async fn wait_for(&self, n: usize) -> Vec<Seen> {
        let until = std::time::Instant::now() + WAIT;
        while self.seen.lock().len() < n && std::time::Instant::now() < until {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        self.seen()
    }
}

#[tokio::test]
async fn events_are_handed_on_to_the_app_signed_as_wechat_sends_them_and_retried() {
    let fake = fake();
    // The handler fails its first request: the event is tried again.
    let handler = Handler::start(&[503, 200]).await;
    let side = Sidecar::start(
        &fake,
        &platform_config(&format!(
            "    forward_events: http://127.0.0.1:{}/wechat/events?key=handler-key-1\n",
            handler.port
        )),
    )
    .await;
    let callback = side.url("/wxsidecar/platform/saas/callback");
    let v = fake
        .platform_admin(&format!("/__fake/platform-callback?url={callback}"))
        .await;
    assert_eq!(v["delivered"], true, "{v}");
    authorise(&fake).await;
    // The ticket twice (a 503, then delivered), then the authorisation.
    let seen = handler.wait_for(3).await;
    assert_eq!(seen.len(), 3, "{seen:?}");

    // A handler written for WeChat's callbacks opens them as they are.
    let crypt = wxsidecar::msgcrypt::MsgCrypt::new(
        wxsidecar::secret::Secret::new(PTOKEN.to_string()),
        AES_KEY,
        COMPONENT,
    )
    .unwrap();
    let open = |s: &Seen| {
        let encrypt = wxsidecar::msgcrypt::xml_field(&s.body, "Encrypt")
            .unwrap()
            .to_string();
        crypt
            .open(
                &wxsidecar::msgcrypt::Signature::parse(&s.param("msg_signature")).unwrap(),
                &s.param("timestamp"),
                &s.param("nonce"),
                &encrypt,
            )
            .unwrap()
    };
    for s in &seen {
        assert!(
            s.target.starts_with("/wechat/events?key=handler-key-1&"),
            "{s:?}"
        );
        assert_eq!(s.param("encrypt_type"), "aes");
        assert_eq!(s.header("x-wxsidecar-forwarded"), Some("1"));
        assert!(s
            .body
            .contains(&format!("<AppId><![CDATA[{COMPONENT}]]></AppId>")));
        // The plain `signature` over token, timestamp and nonce, too.
        let mut parts = [PTOKEN, &s.param("timestamp"), &s.param("nonce")].map(String::from);
        parts.sort();
        let want: String = ring_sha1_hex(&parts.concat());
        assert_eq!(s.param("signature"), want);
    }
    let ticket = open(&seen[1]);
    assert!(
        ticket.contains("<InfoType><![CDATA[component_verify_ticket]]></InfoType>")
            || ticket.contains("<InfoType>component_verify_ticket</InfoType>"),
        "{ticket}"
    );
    assert_eq!(open(&seen[0]), ticket, "the retry is the same event");
    let authorized = open(&seen[2]);
    assert_eq!(
        wxsidecar::msgcrypt::xml_field(&authorized, "AuthorizerAppid"),
        Some(AUTHORIZER),
        "{authorized}"
    );

    // The handler passes a callback back as received (with our header): it
    // is acted on but not handed on again — no loop.
    let s = &seen[1];
    let r = client()
        .post(format!(
            "{callback}?{}",
            s.target.split_once("key=handler-key-1&").unwrap().1
        ))
        .header("x-wxsidecar-forwarded", "1")
        .body(s.body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "success");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(handler.seen().len(), 3);

    let st = side.typed_status().await;
    let f = st.platforms[0].forward.as_ref().unwrap();
    assert_eq!((f.sent, f.failed, f.dropped), (2, 0, 0), "{f:?}");
    assert_eq!(f.format, "wechat");
    assert_eq!(f.last_error.as_deref(), Some("the handler answered 503"));
    assert!(f.url.ends_with("/wechat/events?***"), "{}", f.url);
    assert_eq!(
        side.metric("wxsidecar_platform_events_forwarded_total{platform=\"saas\",result=\"sent\"}")
            .await,
        2.0
    );
    assert!(!side.status().await.to_string().contains("handler-key-1"));
    side.assert_log_clean(&[COMPONENT_SECRET, PTOKEN, "handler-key-1"]);
}

#[tokio::test]
async fn plain_events_carry_their_type_and_a_handler_that_is_down_is_counted() {
    let fake = fake();
    let handler = Handler::start(&[500]).await;
    let side = Sidecar::start(
        &fake,
        &platform_config(&format!(
            "    forward_events: http://127.0.0.1:{}/events\n    forward_format: plain\n",
            handler.port
        )),
    )
    .await;
    let callback = side.url("/wxsidecar/platform/saas/callback");
    let v = fake
        .platform_admin(&format!("/__fake/platform-callback?url={callback}"))
        .await;
    assert_eq!(v["delivered"], true, "WeChat's answer does not wait: {v}");
    let seen = handler.wait_for(3).await;
    assert_eq!(seen.len(), 3, "three tries: {seen:?}");
    let s = &seen[0];
    assert_eq!(s.target, "/events");
    assert_eq!(s.header("x-wx-platform"), Some("saas"));
    assert_eq!(s.header("x-wx-info-type"), Some("component_verify_ticket"));
    assert!(s.body.contains("ComponentVerifyTicket"), "{}", s.body);
    // Given up after the third try; nothing else is lost (the ticket was kept).
    let until = std::time::Instant::now() + WAIT;
    loop {
        let st = side.typed_status().await;
        let f = st.platforms[0].forward.clone().unwrap();
        if f.failed == 1 {
            assert_eq!((f.sent, f.dropped), (0, 0));
            assert_eq!(f.last_error.as_deref(), Some("the handler answered 500"));
            assert!(st.platforms[0].ticket_received);
            break;
        }
        assert!(std::time::Instant::now() < until, "{f:?}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

fn ring_sha1_hex(text: &str) -> String {
    ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, text.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An event sealed as WeChat does, at `timestamp`: query and body.
fn sealed(xml: &str, timestamp: u64) -> (String, String) {
    let crypt = wxsidecar::msgcrypt::MsgCrypt::new(
        wxsidecar::secret::Secret::new(PTOKEN.to_string()),
        AES_KEY,
        COMPONENT,
    )
    .unwrap();
    crypt.seal(
        xml,
        &timestamp.to_string(),
        &rand::random::<u32>().to_string(),
    )
}

async fn post_callback(side: &Sidecar, (query, body): &(String, String)) -> (u16, String) {
    let r = client()
        .post(side.url(&format!("/wxsidecar/platform/saas/callback?{query}")))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn a_stale_or_replayed_callback_is_not_acted_on_by_any_replica() {
    let fake = fake();
    let redis = Redis::start().await;
    let config = format!("{}token:\n  store: {}\n", platform_config(""), redis.url());
    let a = Sidecar::start(&fake, &config).await;
    let b = Sidecar::start(&fake, &config).await;
    push_ticket(&fake, &a).await;
    authorise(&fake).await;
    let works = |side: &Sidecar| {
        let side = side.url("");
        async move {
            let r = client()
                .post(format!("{side}{TEMPLATE_SEND}"))
                .header("X-Wx-Account", AUTHORIZER)
                .body(TEMPLATE)
                .send()
                .await
                .unwrap();
            r.status() == 200
        }
    };
    let refresh_token_kept = || async {
        let mut conn = redis.conn().await.unwrap();
        redis::cmd("HEXISTS")
            .arg(format!("wxsidecar:platform:{COMPONENT}:refresh_tokens"))
            .arg(AUTHORIZER)
            .query_async::<bool>(&mut conn)
            .await
            .unwrap()
    };
    let revoked = |ts: u64| {
        sealed(
            &format!("<xml><AppId><![CDATA[{COMPONENT}]]></AppId><CreateTime>{ts}</CreateTime><InfoType><![CDATA[unauthorized]]></InfoType><AuthorizerAppid><![CDATA[{AUTHORIZER}]]></AuthorizerAppid></xml>"),
            ts,
        )
    };

    // Signed by WeChat, but an hour old or an hour ahead: refused, not acted on.
    for ts in [unix_now() - 3600, unix_now() + 3600] {
        let (code, text) = post_callback(&a, &revoked(ts)).await;
        assert_eq!(code, 403, "{text}");
        assert!(text.contains("callback_max_age"), "{text}");
    }
    assert!(works(&a).await && refresh_token_kept().await);
    assert!(a.log().contains("timestamp is 3600 s old"), "{}", a.log());

    // A fresh revocation is acted on once (no request in between: one for
    // the authoriser would recover it through the fake's list) ...
    let event = revoked(unix_now());
    assert_eq!(post_callback(&a, &event).await, (200, "success".into()));
    assert!(!refresh_token_kept().await, "revoked");
    // ... the customer authorises again ...
    authorise(&fake).await;
    assert!(works(&a).await && works(&b).await && refresh_token_kept().await);
    // ... and the captured revocation sent again, to the same replica or
    // another, is answered as WeChat expects but changes nothing.
    for side in [&a, &b] {
        assert_eq!(post_callback(side, &event).await, (200, "success".into()));
        assert!(refresh_token_kept().await, "the refresh token stays");
        assert!(works(side).await, "not revoked again");
    }
    for side in [&a, &b] {
        assert!(side.log().contains("already acted on"), "{}", side.log());
        assert_eq!(
            side.log()
                .matches("account revoked its authorisation; removed")
                .count(),
            usize::from(std::ptr::eq(side, &a)),
        );
    }

    // An event whose action failed is not marked: WeChat's retry is acted on
    // (here it fails again, and is not answered success).
    let bad_code = sealed(
        &format!("<xml><AppId><![CDATA[{COMPONENT}]]></AppId><CreateTime>1</CreateTime><InfoType><![CDATA[authorized]]></InfoType><AuthorizerAppid><![CDATA[{AUTHORIZER}]]></AuthorizerAppid><AuthorizationCode><![CDATA[queryauthcode@@@unknown]]></AuthorizationCode></xml>"),
        unix_now(),
    );
    let calls = platform_stats(&fake).await["query_auth_calls"]
        .as_u64()
        .unwrap();
    for _ in 0..2 {
        let (code, text) = post_callback(&a, &bad_code).await;
        assert_ne!(code, 200, "{text}");
    }
    assert_eq!(
        platform_stats(&fake).await["query_auth_calls"],
        calls + 2,
        "both tries exchanged"
    );
    a.assert_log_clean(&[COMPONENT_SECRET, PTOKEN]);
}

/// A captured callback whose `msg_signature` is re-spelled (whitespace the
/// query decodes to, as `+`, `%20`, `%09`, `%0A`) is not a new callback:
/// refused 403 and not acted on; the genuine one is acted on once.
#[tokio::test]
async fn a_respelled_signature_is_refused_and_nothing_is_acted_on_again() {
    let fake = fake();
    let side = Sidecar::start(&fake, &platform_config("")).await;
    push_ticket(&fake, &side).await;
    authorise(&fake).await;
    let works = || async {
        client()
            .post(side.url(TEMPLATE_SEND))
            .header("X-Wx-Account", AUTHORIZER)
            .body(TEMPLATE)
            .send()
            .await
            .unwrap()
            .status()
            == 200
    };
    assert!(works().await);
    let ts = unix_now();
    let (query, body) = sealed(
        &format!("<xml><AppId><![CDATA[{COMPONENT}]]></AppId><CreateTime>{ts}</CreateTime><InfoType><![CDATA[unauthorized]]></InfoType><AuthorizerAppid><![CDATA[{AUTHORIZER}]]></AuthorizerAppid></xml>"),
        ts,
    );
    let sig = query.rsplit_once("msg_signature=").unwrap().1.to_string();
    assert_eq!(sig.len(), 40, "{query}");
    // The genuine revocation: acted on once.
    assert_eq!(
        post_callback(&side, &(query.clone(), body.clone())).await,
        (200, "success".into())
    );
    let removals = || {
        side.log()
            .matches("account revoked its authorisation; removed")
            .count()
    };
    assert_eq!(removals(), 1, "revoked");
    authorise(&fake).await;
    assert!(works().await, "authorised again");
    for spelling in [
        format!("{sig}+"),
        format!("%20{sig}"),
        format!("{sig}%09"),
        format!("{sig}%0A"),
        sig.to_uppercase(),
    ] {
        let respelled = query.replace(&sig, &spelling);
        let (code, text) = post_callback(&side, &(respelled, body.clone())).await;
        assert_eq!(code, 403, "{spelling}: {text}");
        assert!(text.contains("40 lowercase hex"), "{text}");
        assert_eq!(removals(), 1, "{spelling}: not revoked again");
    }
    // Sent again as it was: answered as WeChat expects, not acted on.
    assert_eq!(
        post_callback(&side, &(query, body)).await,
        (200, "success".into())
    );
    assert_eq!(removals(), 1, "not revoked again");
    assert!(works().await);
    side.assert_log_clean(&[COMPONENT_SECRET, PTOKEN]);
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
