//! WeCom accounts: corpid + app secret, `GET /cgi-bin/gettoken`, their own
//! upstream, 40014 replayed, apps' own gettoken answered locally.

use serde_json::Value;

use crate::support::*;

const CORP: &str = "ww00000000000000a1";
const HR_SECRET: &str = "hr-app-secret-1";
const IT_SECRET: &str = "it-app-secret-2";

struct Setup {
    wechat: Fake,
    wecom: Fake,
    side: Sidecar,
    _ca: tempfile::TempDir,
}

async fn setup() -> Setup {
    let ca = tempfile::tempdir().unwrap();
    let wechat = Fake::start_in(ca.path(), 0, &[]);
    let hr = format!("{CORP}:{HR_SECRET}");
    let it = format!("{CORP}:{IT_SECRET}");
    let wecom = Fake::start_in(ca.path(), 0, &["--wecom-app", &hr, "--wecom-app", &it]);
    let cfg = format!(
        r#"upstream:
  url: https://localhost:{}
  ca_file: {ca}
wecom_upstream:
  url: https://localhost:{}
  ca_file: {ca}
accounts:
  - name: shop
    appid: {SHOP_APPID}
    secret: ${{WXT_SHOP_SECRET}}
    default: true
  - name: hr
    kind: wecom
    corpid: {CORP}
    agentid: 1000002
    secret: {HR_SECRET}
  - name: it
    kind: wecom
    corpid: {CORP}
    agentid: 1000003
    secret: {IT_SECRET}
"#,
        wechat.port,
        wecom.port,
        ca = wechat.ca.display(),
    );
    let side = Sidecar::start(&wechat, &cfg).await;
    Setup {
        wechat,
        wecom,
        side,
        _ca: ca,
    }
}

async fn gettoken(side: &Sidecar, corpid: &str, secret: &str) -> Value {
    client()
        .get(side.url(&format!(
            "/cgi-bin/gettoken?corpid={corpid}&corpsecret={secret}"
        )))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn wecom_accounts_use_gettoken_and_their_own_upstream() {
    let s = setup().await;
    let fetches = s.wecom.stats().await["wecom_token_fetches"][CORP]
        .as_u64()
        .unwrap();
    assert_eq!(fetches, 2, "one gettoken per WeCom app");

    let hr = gettoken(&s.side, CORP, HR_SECRET).await;
    assert_eq!(hr["errcode"], 0, "{hr}");
    let hr_token = hr["access_token"].as_str().unwrap().to_string();
    let it_token = gettoken(&s.side, CORP, IT_SECRET).await["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(hr_token, it_token);
    assert_eq!(gettoken(&s.side, CORP, "wrong").await["errcode"], 40001);
    assert_eq!(
        gettoken(&s.side, "wwnope", HR_SECRET).await["errcode"],
        40013
    );
    assert_eq!(
        s.wecom.stats().await["wecom_token_fetches"][CORP]
            .as_u64()
            .unwrap(),
        fetches,
        "apps' gettoken never reached WeCom"
    );

    // By name: to the WeCom host with hr's token.
    let r = client()
        .post(s.side.url("/cgi-bin/message/send"))
        .header("X-Wx-Account", "hr")
        .body(r#"{"touser":"@all","msgtype":"text","agentid":1000002,"text":{"content":"hi"}}"#)
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["errcode"], 0, "{v}");
    let seen = s.wecom.last_request().await;
    assert_eq!(seen["path"], "/cgi-bin/message/send");
    assert_eq!(seen["access_token"], hr_token.as_str());
    assert_eq!(seen["host"], format!("localhost:{}", s.wecom.port));

    // By a token the sidecar issued for it.
    s.side
        .send(
            &format!("/cgi-bin/message/send?access_token={it_token}"),
            "{}",
        )
        .await;
    assert_eq!(
        s.wecom.last_request().await["access_token"],
        it_token.as_str()
    );

    // The default Official Account still goes to the WeChat host.
    let (status, v) = s
        .side
        .send("/cgi-bin/message/template/send", TEMPLATE)
        .await;
    assert_eq!((status, v["errcode"].as_i64()), (200, Some(0)), "{v}");
    assert_eq!(s.wechat.stats().await["messages"], 1);
    s.side
        .assert_log_clean(&[HR_SECRET, IT_SECRET, &hr_token, &it_token]);
    let st = s.side.status().await;
    assert!(!st.to_string().contains(HR_SECRET));
    assert_eq!(st["accounts"][1]["kind"], "wecom");
    assert_eq!(st["accounts"][1]["agentid"], "1000002");
}

#[tokio::test]
async fn wecom_40014_is_replayed_with_a_fresh_token() {
    let s = setup().await;
    let before = s.wecom.stats().await["wecom_token_fetches"][CORP]
        .as_u64()
        .unwrap();
    s.wecom.invalidate(CORP).await;
    let r = client()
        .post(s.side.url("/cgi-bin/message/send"))
        .header("X-Wx-Account", "hr")
        .body("{}")
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["errcode"], 0, "the app never sees 40014: {v}");
    let sends: Vec<Value> = s
        .wecom
        .requests()
        .await
        .into_iter()
        .filter(|r| r["path"] == "/cgi-bin/message/send")
        .collect();
    assert_eq!(
        sends.len(),
        2,
        "first with the revoked token, then replayed"
    );
    assert_ne!(sends[0]["access_token"], sends[1]["access_token"]);
    assert_eq!(
        s.wecom.stats().await["wecom_token_fetches"][CORP]
            .as_u64()
            .unwrap(),
        before + 1,
        "only hr refreshed"
    );
}

#[tokio::test]
async fn a_token_fetch_refused_for_our_ip_names_it_in_status() {
    let s = setup().await;
    s.wecom.whitelist(Some(&["10.9.9.9"])).await;
    // The refresh fails (the admin call waits for a token that will not
    // come): what it left in /status is what matters.
    let refresh = client().post(s.side.admin("/refresh?account=hr")).send();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), refresh).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let st = loop {
        let st = s.side.typed_status().await;
        let refused = st
            .accounts
            .iter()
            .any(|a| a.name == "hr" && a.ip_whitelist_error.is_some());
        if refused || std::time::Instant::now() > deadline {
            break st;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let hr = st.accounts.iter().find(|a| a.name == "hr").unwrap();
    let e = hr.ip_whitelist_error.as_ref().expect("a standing refusal");
    assert_eq!(e.errcode, 60020);
    assert_eq!(e.ip.as_deref(), Some("127.0.0.1"));
    assert_eq!(hr.egress_ip_seen.as_deref(), Some("127.0.0.1"));
    let shop = st.accounts.iter().find(|a| a.name == "shop").unwrap();
    assert!(
        shop.ip_whitelist_error.is_none(),
        "only the refused account"
    );
    let log = s.side.log();
    assert!(
        log.contains("WeChat refused calls from 127.0.0.1") && log.contains("trusted IPs"),
        "{log}"
    );
    assert!(!log.contains(HR_SECRET));
}
