//! Egress through a forward proxy (`upstream.proxy`): a real tinyproxy that
//! connects out from its own address, which the fake alone whitelists, so a
//! call that did not go through the proxy fails.

use serde_json::Value;

use crate::support::*;

const TEMPLATE_SEND: &str = "/cgi-bin/message/template/send";
const PROXY_PASSWORD: &str = "pr0xy-pa55";

fn proxied(fake_extra: &str, proxy_line: &str) -> String {
    format!(
        "upstream:\n  url: FAKE_URL\n  ca_file: FAKE_CA\n  warm_connections: 2\n  connect_timeout: 3s\n  {proxy_line}\n{fake_extra}{}",
        Sidecar::accounts("classic", "stable")
    )
}

#[tokio::test]
async fn token_fetches_and_calls_go_through_the_proxy_with_basic_auth_and_stay_pooled() {
    let fake = Fake::start(&["--h2"]);
    // Only the proxy's address may call: a direct connection is refused.
    fake.whitelist(Some(&[PROXY_EGRESS_IP])).await;
    let proxy = Tinyproxy::start(&format!("BasicAuth bob {PROXY_PASSWORD}")).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("proxy-url");
    // In a file (a Kubernetes Secret), as `proxy_file`.
    std::fs::write(
        &file,
        format!("http://bob:{PROXY_PASSWORD}@127.0.0.1:{}\n", proxy.port),
    )
    .unwrap();
    let side = Sidecar::start(
        &fake,
        &proxied("", &format!("proxy_file: {}", file.display())),
    )
    .await;

    for i in 0..20 {
        let (code, v) = side.send(TEMPLATE_SEND, TEMPLATE).await;
        assert_eq!(
            (code, v["errcode"].as_i64()),
            (200, Some(0)),
            "call {i}: {v}"
        );
    }
    let st = side.typed_status().await;
    for a in &st.accounts {
        assert!(a.token_valid, "{}: fetched through the proxy", a.name);
        assert_eq!(a.egress_ip_seen, None, "{} was never refused", a.name);
    }
    let host = &st.upstream.hosts[0];
    assert_eq!(host.protocol, "h2", "HTTP/2 inside the tunnel");
    assert!(host.h2_connections_open >= 1);
    let shown = st.upstream.proxy.clone().expect("the proxy in /status");
    assert_eq!(shown, format!("http://***:***@127.0.0.1:{}", proxy.port));
    // Pooled and kept warm: far fewer tunnels than calls.
    let tunnels = proxy.connects();
    assert!(
        (1..=6).contains(&tunnels),
        "{tunnels} CONNECTs for 20 calls and 2 token fetches"
    );

    let check = std::process::Command::new(BIN)
        .args(["check", "--print", "--config"])
        .arg(side.config_path())
        .env("WXT_SHOP_SECRET", SHOP_SECRET)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&check.stdout);
    assert!(
        printed.contains("proxy: http://***:***@127.0.0.1"),
        "{printed}"
    );
    let all = format!("{printed}{}{}", side.status().await, side.log());
    assert!(!all.contains(PROXY_PASSWORD), "the proxy password leaked");
    side.assert_log_clean(&[PROXY_PASSWORD, SHOP_SECRET, MALL_SECRET]);
}

#[tokio::test]
async fn proxy_refusals_name_the_key_and_what_to_change() {
    let fake = Fake::start(&[]);
    // 407: the sidecar's password is wrong.
    let proxy = Tinyproxy::start(&format!("BasicAuth bob {PROXY_PASSWORD}")).await;
    let side = Sidecar::start_unready(
        &fake,
        &proxied(
            "",
            &format!("proxy: http://bob:wrong-one@127.0.0.1:{}", proxy.port),
        ),
    )
    .await;
    // The token fetch failed at the proxy: no token to call with.
    let (code, v) = side.send(TEMPLATE_SEND, TEMPLATE).await;
    assert_eq!(code, 503, "{v}");
    let said = v.to_string();
    assert!(
        said.contains("refused the user and password in upstream.proxy"),
        "the answer names the key: {said}"
    );
    let st = side.status().await;
    let err = st["upstream"]["hosts"][0]["last_connect_error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        err.contains("refused the user and password in upstream.proxy"),
        "{st}"
    );
    assert!(!format!("{st}{}", side.log()).contains("wrong-one"));
    let stats = fake.stats().await;
    assert_eq!(stats["api_calls"], 0, "nothing got past the proxy: {stats}");

    // 403: the proxy does not allow the port.
    let strict = Tinyproxy::start("ConnectPort 443").await;
    let side = Sidecar::start_unready(
        &fake,
        &proxied("", &format!("proxy: http://127.0.0.1:{}", strict.port)),
    )
    .await;
    let (code, v) = side.send(TEMPLATE_SEND, TEMPLATE).await;
    assert_eq!(code, 503, "{v}");
    let said: Value = v;
    let said = said.to_string();
    assert!(
        said.contains("upstream.proxy") && said.contains("403") && said.contains("ConnectPort"),
        "{said}"
    );

    // No credentials where the proxy wants them.
    let side = Sidecar::start_unready(
        &fake,
        &proxied("", &format!("proxy: http://127.0.0.1:{}", proxy.port)),
    )
    .await;
    let (_, v) = side.send(TEMPLATE_SEND, TEMPLATE).await;
    assert!(v.to_string().contains("http://user:pass@host:port"), "{v}");
}

#[tokio::test]
async fn a_dead_proxy_counts_toward_failover_like_a_dead_host() {
    let fake = Fake::start(&[]);
    // Nothing listens there.
    let dead = free_port();
    let side = Sidecar::start_unready(
        &fake,
        &proxied(
            "",
            &format!("proxy: http://127.0.0.1:{dead}\n  failover_after: 2\n  probe_interval: 60s"),
        ),
    )
    .await;
    for _ in 0..3 {
        let (code, _) = side.send(TEMPLATE_SEND, TEMPLATE).await;
        assert_eq!(code, 503);
    }
    let st = side.status().await;
    assert_eq!(st["upstream"]["breaker_open"], true, "{st}");
    let host = &st["upstream"]["hosts"][0];
    assert!(
        host["connect_failures_in_a_row"].as_u64().unwrap() >= 2,
        "{st}"
    );
    let err = host["last_connect_error"].as_str().unwrap_or_default();
    assert!(err.contains("cannot reach upstream.proxy"), "{err}");
}
