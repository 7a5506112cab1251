//! The request path: injection, replacement, foreign tokens, untouched paths,
//! local token answers, account choice, pooling.

use serde_json::Value;

use crate::support::*;

fn param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|p| {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        (k == name).then(|| v.to_string())
    })
}

#[tokio::test]
async fn template_send_without_token_gets_the_cached_one() {
    let fake = Fake::start(&[]);
    let side = Sidecar::start_standard(&fake, "stable", "classic").await;
    // Odd spacing and non-ASCII: the body must arrive byte for byte.
    let body = "{ \"touser\":\"oUSER123\",  \"template_id\":\"TPL\",\"data\":{\"k\":{\"value\":\"发货 ✓\"}} }\n";
    let (status, v) = side
        .send("/cgi-bin/message/template/send?foo=1&bar=a%20b", body)
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["errcode"], 0, "{v}");
    assert!(v["msgid"].as_u64().is_some());

    let seen = fake.last_request().await;
    let token = side.token(SHOP_APPID, SHOP_SECRET).await;
    assert_eq!(
        seen["access_token"],
        token.as_str(),
        "the shop account's token was added"
    );
    assert_eq!(seen["body"], body, "body forwarded byte for byte");
    assert_eq!(
        seen["query"].as_str().unwrap(),
        format!("foo=1&bar=a%20b&access_token={token}")
    );
    assert_eq!(seen["host"], format!("localhost:{}", fake.port));
    side.assert_log_clean(&[&token]);
}

#[tokio::test]
async fn stale_token_issued_by_the_sidecar_is_replaced() {
    // 4 s tokens: refreshed at 2 s left; the old one dies 1 s after that.
    let fake = Fake::start(&["--token-ttl", "4"]);
    let side = Sidecar::start_standard(&fake, "classic", "stable").await;
    let old = side.token(SHOP_APPID, SHOP_SECRET).await;
    // Wait for the refresh, then for the old token's overlap to end.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let now = side.token(SHOP_APPID, SHOP_SECRET).await;
        if now != old {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "token never refreshed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    // Control: WeChat itself no longer takes the old token.
    let direct = fake
        .direct_post(
            &format!("/cgi-bin/message/template/send?access_token={old}"),
            TEMPLATE,
        )
        .await;
    assert_eq!(direct["errcode"], 40001, "{direct}");

    let (status, v) = side
        .send(
            &format!("/cgi-bin/message/template/send?access_token={old}"),
            TEMPLATE,
        )
        .await;
    assert_eq!((status, v["errcode"].as_i64()), (200, Some(0)), "{v}");
    let seen = fake.last_request().await;
    assert_ne!(
        seen["access_token"],
        old.as_str(),
        "the stale token was replaced"
    );
}

#[tokio::test]
async fn foreign_token_is_left_alone_unless_replace_always() {
    let fake = Fake::start(&[]);
    let side = Sidecar::start_standard(&fake, "stable", "stable").await;
    let (status, v) = side
        .send(
            "/cgi-bin/message/template/send?access_token=APP_OWN_TOKEN",
            TEMPLATE,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        v["errcode"], 40001,
        "WeChat's verdict on the app's own token: {v}"
    );
    assert_eq!(fake.last_request().await["access_token"], "APP_OWN_TOKEN");

    let always = format!(
        "{}accounts:\n  - name: shop\n    appid: {SHOP_APPID}\n    secret: ${{WXT_SHOP_SECRET}}\n    replace_tokens: always\n",
        upstream()
    );
    let side2 = Sidecar::start(&fake, &always).await;
    let (status, v) = side2
        .send(
            "/cgi-bin/message/template/send?access_token=PLACEHOLDER",
            TEMPLATE,
        )
        .await;
    assert_eq!((status, v["errcode"].as_i64()), (200, Some(0)), "{v}");
    let seen = fake.last_request().await;
    assert_eq!(
        seen["access_token"],
        side2.token(SHOP_APPID, SHOP_SECRET).await.as_str()
    );
    assert_eq!(
        param(seen["query"].as_str().unwrap(), "access_token").as_deref(),
        seen["access_token"].as_str()
    );
}

#[tokio::test]
async fn untouched_paths_get_no_token() {
    let fake = Fake::start(&[]);
    let side = Sidecar::start_standard(&fake, "stable", "stable").await;
    let c = client();
    // (path and query, extra header, the token WeChat must see)
    type Case<'a> = (&'a str, Option<(&'a str, &'a str)>, Option<&'a str>);
    let cases: &[Case] = &[
        ("/sns/jscode2session?appid=wxshop0000000001&secret=x&js_code=abc&grant_type=authorization_code", None, None),
        ("/sns/userinfo?access_token=USER_OAUTH_TOKEN&openid=o1", None, Some("USER_OAUTH_TOKEN")),
        ("/cgi-bin/component/api_create_preauthcode?component_access_token=C", None, None),
        ("/cgi-bin/midas/getbalance?access_token=SIGNED_TOKEN", None, Some("SIGNED_TOKEN")),
        ("/cgi-bin/clear_quota/v2", None, None),
        ("/wxa/business/getuserphonenumber", Some(("Wechatmp-Signature", "sig")), None),
    ];
    for (pq, header, expect_token) in cases {
        let mut req = c.post(side.url(pq)).body("{\"k\":1}");
        if let Some((k, v)) = header {
            req = req.header(*k, *v);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 200, "{pq}");
        let seen = fake.last_request().await;
        assert_eq!(seen["path"], pq.split('?').next().unwrap(), "{pq}");
        assert_eq!(
            seen["access_token"].as_str(),
            *expect_token,
            "{pq}: token must be left as sent"
        );
        assert_eq!(seen["body"], "{\"k\":1}");
    }
}

#[tokio::test]
async fn token_endpoints_are_answered_locally() {
    let fake = Fake::start(&[]);
    let side = Sidecar::start_standard(&fake, "classic", "stable").await;
    let before = fake.stats().await;
    let c = client();
    let get = |q: String| {
        let c = c.clone();
        let url = side.url(&format!("/cgi-bin/token?{q}"));
        async move {
            c.get(url)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let ok = get(format!(
        "grant_type=client_credential&appid={SHOP_APPID}&secret={SHOP_SECRET}"
    ))
    .await;
    let exp = ok["expires_in"].as_u64().unwrap();
    assert!(exp > 7000 && exp <= 7200, "{ok}");
    assert_eq!(ok["access_token"].as_str().unwrap().len(), 96);
    let bad = get(format!(
        "grant_type=client_credential&appid={SHOP_APPID}&secret=wrong"
    ))
    .await;
    assert_eq!(bad["errcode"], 40125);
    let unknown = get("grant_type=client_credential&appid=wxnope&secret=x".into()).await;
    assert_eq!(unknown["errcode"], 40013);

    let post = |body: String| {
        let c = c.clone();
        let url = side.url("/cgi-bin/stable_token");
        async move {
            c.post(url)
                .body(body)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let ok2 = post(format!(
        r#"{{"grant_type":"client_credential","appid":"{MALL_APPID}","secret":"{MALL_SECRET}","force_refresh":true}}"#
    ))
    .await;
    assert!(ok2["access_token"].as_str().is_some(), "{ok2}");
    let bad2 = post(format!(
        r#"{{"grant_type":"client_credential","appid":"{MALL_APPID}","secret":"nope"}}"#
    ))
    .await;
    assert_eq!(bad2["errcode"], 40125);
    let unknown2 =
        post(r#"{"grant_type":"client_credential","appid":"wxnope","secret":"x"}"#.into()).await;
    assert_eq!(unknown2["errcode"], 40013);
    let garbage = post("{not json".into()).await;
    assert_eq!(garbage["errcode"], 47001);

    let after = fake.stats().await;
    assert_eq!(
        before["token_fetches"], after["token_fetches"],
        "no classic fetch reached WeChat"
    );
    assert_eq!(
        before["stable_token_fetches"], after["stable_token_fetches"],
        "no stable fetch reached WeChat"
    );
    assert!(fake.requests().await.iter().all(
        |r| r["path"] != "/cgi-bin/token" || r["query"].as_str().unwrap().contains(SHOP_APPID)
    ));
    side.assert_log_clean(&[ok["access_token"].as_str().unwrap()]);
}

#[tokio::test]
async fn accounts_are_chosen_by_header_then_token_then_default() {
    let fake = Fake::start(&[]);
    let side = Sidecar::start_standard(&fake, "stable", "stable").await;
    let shop = side.token(SHOP_APPID, SHOP_SECRET).await;
    let mall = side.token(MALL_APPID, MALL_SECRET).await;
    assert_ne!(shop, mall);
    let c = client();
    let send = |name: Option<&'static str>, q: String| {
        let mut r = c
            .post(side.url(&format!("/cgi-bin/message/template/send{q}")))
            .body(TEMPLATE);
        if let Some(n) = name {
            r = r.header("X-Wx-Account", n);
        }
        async move { r.send().await.unwrap() }
    };
    // By name, and by appid.
    assert_eq!(send(Some("mall"), String::new()).await.status(), 200);
    let seen = fake.last_request().await;
    assert_eq!(seen["access_token"], mall.as_str());
    assert!(
        seen["headers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h[0] != "x-wx-account"),
        "X-Wx-Account is removed before forwarding"
    );
    send(Some(MALL_APPID), String::new()).await;
    assert_eq!(fake.last_request().await["access_token"], mall.as_str());
    // By a token the sidecar issued for mall.
    send(None, format!("?access_token={mall}")).await;
    assert_eq!(fake.last_request().await["access_token"], mall.as_str());
    // Default.
    send(None, String::new()).await;
    assert_eq!(fake.last_request().await["access_token"], shop.as_str());
    // Unknown name: 400 in WeChat's shape, nothing forwarded.
    let n = fake.requests().await.len();
    let r = send(Some("nosuch"), String::new()).await;
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["errcode"], 40013);
    assert!(
        v["errmsg"]
            .as_str()
            .unwrap()
            .starts_with("wxsidecar: no account for this request"),
        "{v}"
    );
    assert_eq!(fake.requests().await.len(), n);
}

#[tokio::test]
async fn no_default_account_is_a_clear_400() {
    let fake = Fake::start(&[]);
    let cfg = format!(
        "{}accounts:\n  - {{name: shop, appid: {SHOP_APPID}, secret: x1}}\n  - {{name: mall, appid: {MALL_APPID}, secret: x2}}\n",
        upstream()
    );
    // Wrong secrets on purpose: this test is about routing, not tokens.
    let side = Sidecar::start_unready(&fake, &cfg).await;
    let (status, v) = side.send("/cgi-bin/message/template/send", TEMPLATE).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["errcode"], 40013);
}

#[tokio::test]
async fn five_hundred_sends_cost_one_fetch_per_account_and_a_few_handshakes() {
    let fake = Fake::start(&[]);
    let side = Sidecar::start_standard(&fake, "classic", "stable").await;
    let c = client();
    let mut tasks = Vec::new();
    for w in 0..4 {
        let c = c.clone();
        let url = side.url("/cgi-bin/message/template/send");
        tasks.push(tokio::spawn(async move {
            for i in 0..125 {
                let mut r = c.post(&url).body(TEMPLATE);
                if (w + i) % 2 == 0 {
                    r = r.header("X-Wx-Account", "mall");
                }
                let v: Value = r.send().await.unwrap().json().await.unwrap();
                assert_eq!(v["errcode"], 0, "{v}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let s = fake.stats().await;
    assert_eq!(s["messages"], 500);
    assert_eq!(s["token_fetches"][SHOP_APPID], 1, "{s}");
    assert_eq!(s["stable_token_fetches"][MALL_APPID], 1, "{s}");
    // warm_connections (4) plus at most a few; our own stats calls add one.
    let handshakes = s["tls_handshakes"].as_u64().unwrap();
    assert!(
        handshakes <= 4 + 3,
        "{handshakes} TLS handshakes for 500 sends: {s}"
    );
    let st = side.status().await;
    assert!(
        st["upstream"]["hosts"][0]["connections_reused"]
            .as_u64()
            .unwrap()
            >= 490,
        "{st}"
    );
}

#[tokio::test]
async fn expect_100_continue_is_answered_and_not_forwarded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fake = Fake::start(&[]);
    let side = Sidecar::start_standard(&fake, "stable", "stable").await;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", side.port))
        .await
        .unwrap();
    let head = format!(
        "POST /cgi-bin/message/template/send HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
        TEMPLATE.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    // A client that waits for 100 Continue before sending the body.
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let got = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(got.starts_with("HTTP/1.1 100 Continue"), "{got}");
    s.write_all(TEMPLATE.as_bytes()).await.unwrap();
    let mut answer = String::new();
    while !answer.contains("\"msgid\"") && !answer.contains("errcode\":4") {
        let n = tokio::time::timeout(WAIT, s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "connection closed: {answer}");
        answer.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(answer.contains("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"errcode\":0"), "{answer}");
    let seen = fake.last_request().await;
    assert!(
        seen["headers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h[0] != "expect"),
        "Expect is not forwarded: {seen}"
    );
}
