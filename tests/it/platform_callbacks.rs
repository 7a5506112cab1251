//! Platform callbacks past the first authorisation: events handed on to
//! the app's handler (signed as WeChat sends them, retried), and callbacks
//! that are stale, replayed or respelled, acted on by no replica.

use crate::platform::{
    authorise, fake, platform_config, platform_stats, push_ticket, AES_KEY, AUTHORIZER, COMPONENT,
    COMPONENT_SECRET, PTOKEN, TEMPLATE_SEND,
};
use crate::support::*;

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
