//! Reload without restart: a secret rotated by a Kubernetes-style symlink
//! swap under load, accounts added and removed, an invalid config refused,
//! keys that need a restart named, a new upstream proxy taken up; by file
//! watch, `POST /reload` and SIGHUP.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

const TEMPLATE_SEND: &str = "/cgi-bin/message/template/send";
const OUTLET_APPID: &str = "wxoutlet00000003";

async fn reload(side: &Sidecar) -> (u16, Value) {
    let r = client().post(side.admin("/reload")).send().await.unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

async fn wait_generation(side: &Sidecar, n: u64) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let st = side.status().await;
        if st["config_generation"].as_u64() == Some(n) {
            return st;
        }
        assert!(Instant::now() < deadline, "generation {n} never came: {st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_secret_rotated_by_symlink_swap_under_load_loses_no_request_and_fetches_once() {
    let fake = Fake::start(&[]);
    // The Secret volume as the kubelet writes it: `current` points at a
    // versioned directory and is swapped atomically.
    let secrets = tempfile::tempdir().unwrap();
    let v1 = secrets.path().join("v1");
    std::fs::create_dir(&v1).unwrap();
    std::fs::write(v1.join("mall"), format!("{MALL_SECRET}\n")).unwrap();
    let current = secrets.path().join("current");
    std::os::unix::fs::symlink(&v1, &current).unwrap();
    let body = format!(
        "{}reload:\n  interval: 200ms\naccounts:\n  - name: mall\n    appid: {MALL_APPID}\n    secret_file: {}\n    default: true\n",
        upstream(),
        current.join("mall").display()
    );
    let side = Sidecar::start(&fake, &body).await;
    let before = fake.fetches(MALL_APPID).await;

    // Load: one request after another until told to stop (bounded).
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load = {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        let url = side.url(TEMPLATE_SEND);
        tokio::spawn(async move {
            let c = client();
            for _ in 0..20_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let r = c.post(&url).body(TEMPLATE).send().await;
                let good = match r {
                    Ok(r) => r
                        .json::<Value>()
                        .await
                        .map(|v| v["errcode"] == 0)
                        .unwrap_or(false),
                    Err(_) => false,
                };
                if good { &ok } else { &failed }.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The secret is reset at WeChat and the new one lands in the volume.
    let rotated = "mall-secret-rotated-9";
    fake.set_secret(MALL_APPID, rotated).await;
    let v2 = secrets.path().join("v2");
    std::fs::create_dir(&v2).unwrap();
    std::fs::write(v2.join("mall"), format!("{rotated}\n")).unwrap();
    let tmp = secrets.path().join("current.tmp");
    std::os::unix::fs::symlink(&v2, &tmp).unwrap();
    std::fs::rename(&tmp, &current).unwrap();

    let st = wait_generation(&side, 2).await;
    let last = &st["last_reload"];
    assert_eq!(last["result"], "ok", "{last}");
    assert_eq!(last["trigger"], "file change", "{last}");
    assert!(
        last["changes"]
            .to_string()
            .contains("secret of account mall changed"),
        "{last}"
    );
    // The fetch with the new secret lands; the old token served meanwhile.
    let deadline = Instant::now() + WAIT;
    while fake.fetches(MALL_APPID).await < before + 1 {
        assert!(Instant::now() < deadline, "no fetch with the new secret");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no request failed");
    assert!(ok.load(Ordering::Relaxed) > 20, "the load ran");
    assert_eq!(
        fake.fetches(MALL_APPID).await,
        before + 1,
        "one fetch, with the new secret"
    );
    let st = side.typed_status().await;
    let mall = &st.accounts[0];
    assert!(mall.last_error.is_none(), "{:?}", mall.last_error);
    assert!(side
        .metrics()
        .await
        .contains(r#"wxsidecar_config_reloads_total{result="ok"} 1"#));
    side.assert_log_clean(&[rotated]);
}

#[tokio::test]
async fn accounts_come_and_go_and_a_bad_config_changes_nothing() {
    let fake = Fake::start(&["--app", &format!("{OUTLET_APPID}:outlet-secret")]);
    let side = Sidecar::start_standard(&fake, "classic", "stable").await;
    let path = side.config_path();
    let original = std::fs::read_to_string(&path).unwrap();
    // No watching here: only POST /reload and SIGHUP reload.
    let base = original.replace("accounts:\n", "reload:\n  watch: false\naccounts:\n");
    std::fs::write(&path, &base).unwrap();

    // Invalid: refused, every problem named, nothing changes.
    std::fs::write(
        &path,
        base.replace(
            "warm_connections: 4\n",
            "warm_connections: 4\n  connect_timeout: soon\n",
        ),
    )
    .unwrap();
    let (code, r) = reload(&side).await;
    assert_eq!(code, 422, "{r}");
    assert_eq!(r["result"], "failed");
    assert!(
        r["problems"]
            .to_string()
            .contains("upstream.connect_timeout"),
        "{r}"
    );
    let st = side.status().await;
    assert_eq!(st["config_generation"], 1);
    assert_eq!(st["last_reload"]["result"], "failed");
    assert_eq!(
        side.send_as("mall", TEMPLATE_SEND, TEMPLATE).await.1["errcode"],
        0,
        "still serving"
    );
    assert!(side
        .metrics()
        .await
        .contains(r#"wxsidecar_config_reloads_total{result="failed"} 1"#));

    // mall goes, outlet comes, listen moves (that takes a restart).
    let old_listen = format!("listen: 127.0.0.1:{}", side.port);
    let next = base
        .replace(
            &format!("  - name: mall\n    appid: {MALL_APPID}\n"),
            &format!("  - name: outlet\n    appid: {OUTLET_APPID}\n"),
        )
        .replace(&old_listen, &format!("listen: 127.0.0.1:{}", free_port()));
    assert_ne!(next, base);
    // outlet takes the place of mall's entry, with its own secret inline.
    let mut next = next;
    let at = next.find("  - name: outlet").unwrap();
    let end = next[at..].find("    token_api").unwrap() + at;
    next.replace_range(
        at..end,
        &format!("  - name: outlet\n    appid: {OUTLET_APPID}\n    secret: outlet-secret\n"),
    );
    std::fs::write(&path, next).unwrap();
    let (code, r) = reload(&side).await;
    assert_eq!(code, 200, "{r}");
    let changes = r["changes"].to_string();
    assert!(
        changes.contains("account outlet added") && changes.contains("account mall removed"),
        "{r}"
    );
    // The upgrade socket and pid file follow the port by default.
    assert_eq!(
        r["restart_needed"],
        serde_json::json!(["listen", "upgrade_sock", "pid_file"]),
        "{r}"
    );
    assert_eq!(r["generation"], 2);
    // outlet was fetched before it was served; mall is gone.
    assert_eq!(
        side.send_as("outlet", TEMPLATE_SEND, TEMPLATE).await.1["errcode"],
        0
    );
    let (code, v) = side.send_as("mall", TEMPLATE_SEND, TEMPLATE).await;
    assert_eq!(code, 400, "{v}");
    assert_eq!(v["errcode"], 40013);
    assert_eq!(
        side.send(TEMPLATE_SEND, TEMPLATE).await.1["errcode"],
        0,
        "shop stays"
    );
    let st = side.typed_status().await;
    let names: Vec<&str> = st.accounts.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["shop", "outlet"]);

    // SIGHUP brings the original back.
    std::fs::write(&path, &base).unwrap();
    side.signal("HUP");
    let st = wait_generation(&side, 3).await;
    assert_eq!(st["last_reload"]["trigger"], "SIGHUP");
    assert_eq!(
        side.send_as("mall", TEMPLATE_SEND, TEMPLATE).await.1["errcode"],
        0
    );
    assert_eq!(side.send_as("outlet", TEMPLATE_SEND, TEMPLATE).await.0, 400);
    side.assert_log_clean(&["outlet-secret"]);
}

#[tokio::test]
async fn a_reload_puts_the_upstream_behind_a_proxy_for_new_requests() {
    let fake = Fake::start(&[]);
    let side = Sidecar::start_standard(&fake, "classic", "stable").await;
    assert_eq!(side.send(TEMPLATE_SEND, TEMPLATE).await.1["errcode"], 0);
    // From now on WeChat takes calls from the proxy's address only.
    fake.whitelist(Some(&[PROXY_EGRESS_IP])).await;
    assert_eq!(side.send(TEMPLATE_SEND, TEMPLATE).await.1["errcode"], 40164);
    let proxy = Tinyproxy::start("").await;
    let path = side.config_path();
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "warm_connections: 4\n",
        &format!(
            "warm_connections: 4\n  proxy: http://127.0.0.1:{}\n",
            proxy.port
        ),
    );
    std::fs::write(&path, text).unwrap();
    let (code, r) = reload(&side).await;
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["changes"], serde_json::json!(["upstream"]), "{r}");
    assert_eq!(side.send(TEMPLATE_SEND, TEMPLATE).await.1["errcode"], 0);
    assert!(proxy.connects() >= 1);
    let st = side.status().await;
    assert_eq!(
        st["upstream"]["proxy"],
        format!("http://127.0.0.1:{}", proxy.port),
        "{st}"
    );

    // Limits and clients apply to the next request too.
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        format!("limits:\n  buffered_body: 40\nclients:\n  rate_limit:\n    per_client: {{rps: 1000, burst: 1000}}\n{text}"),
    )
    .unwrap();
    let (code, r) = reload(&side).await;
    assert_eq!(code, 200, "{r}");
    assert_eq!(
        r["changes"],
        serde_json::json!(["clients", "limits"]),
        "{r}"
    );
    let (code, v) = side.send(TEMPLATE_SEND, TEMPLATE).await;
    assert_eq!((code, v["errcode"].as_i64()), (413, Some(45002)), "{v}");
}

#[tokio::test]
async fn a_ca_bundle_rotated_in_place_is_taken_up_by_the_watch() {
    // WeChat's side moves to a certificate from another CA; the operator
    // rotates the bundle at the same path (a Secret's content changes).
    let (ca1, ca2, dir) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let mut old = Fake::start_in(ca1.path(), 0, &[]);
    let bundle = dir.path().join("wechat-ca.pem");
    std::fs::copy(&old.ca, &bundle).unwrap();
    let side = Sidecar::start(
        &old,
        &format!(
            "upstream:\n  url: FAKE_URL\n  ca_file: {}\n  warm_connections: 1\nreload:\n  interval: 200ms\n{}",
            bundle.display(),
            Sidecar::accounts("stable", "stable")
        ),
    )
    .await;
    assert_eq!(side.send(TEMPLATE_SEND, TEMPLATE).await.1["errcode"], 0);

    let port = old.port;
    old.kill();
    let new = Fake::start_in(ca2.path(), port, &[]);
    let (code, v) = side.send(TEMPLATE_SEND, TEMPLATE).await;
    assert_eq!(code, 502, "the new certificate is not trusted yet: {v}");

    std::fs::write(&bundle, std::fs::read(&new.ca).unwrap()).unwrap();
    let st = wait_generation(&side, 2).await;
    assert_eq!(
        st["last_reload"]["changes"],
        serde_json::json!(["upstream"]),
        "{st}"
    );
    let (code, v) = side.send(TEMPLATE_SEND, TEMPLATE).await;
    assert_eq!((code, v["errcode"].as_i64()), (200, Some(0)), "{v}");
}

/// A reload that finds nothing changed is reported as such and leaves the
/// generation where it was: 100 SIGHUPs with the same file are not 100
/// configs. A change only a secret shows (a client token) is one.
#[tokio::test]
async fn a_reload_that_changes_nothing_keeps_the_generation() {
    let fake = Fake::start(&[]);
    let side = Sidecar::start_standard(&fake, "classic", "stable").await;
    let path = side.config_path();
    let original = std::fs::read_to_string(&path).unwrap();
    let base = original.replace(
        "accounts:\n",
        "reload:\n  watch: false\nclients:\n  tokens:\n    - name: app\n      token: client-token-one-0123456789\naccounts:\n",
    );
    std::fs::write(&path, &base).unwrap();
    let (code, r) = reload(&side).await;
    assert_eq!((code, r["result"].as_str()), (200, Some("ok")), "{r}");
    assert_eq!(r["generation"], 2, "{r}");

    for _ in 0..100 {
        side.signal("HUP");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Queued behind the signals' reloads: answered once they are done.
    let (code, r) = reload(&side).await;
    assert_eq!(
        (code, r["result"].as_str()),
        (200, Some("unchanged")),
        "{r}"
    );
    assert_eq!(r["generation"], 2, "{r}");
    assert_eq!(r["changes"], serde_json::json!([]), "{r}");
    let st = side.status().await;
    assert_eq!(st["config_generation"], 2, "{st}");
    assert_eq!(st["last_reload"]["result"], "unchanged", "{st}");
    assert_eq!(
        side.metric(r#"wxsidecar_config_reloads_total{result="ok"}"#)
            .await,
        1.0
    );
    assert!(
        side.metric(r#"wxsidecar_config_reloads_total{result="unchanged"}"#)
            .await
            >= 2.0
    );
    assert!(side.log().contains("nothing changed"), "{}", side.log());

    // Only the client token's value changes: a change.
    std::fs::write(
        &path,
        base.replace("client-token-one-0123456789", "client-token-two-0123456789"),
    )
    .unwrap();
    let (code, r) = reload(&side).await;
    assert_eq!((code, r["result"].as_str()), (200, Some("ok")), "{r}");
    assert_eq!(r["generation"], 3, "{r}");
    assert_eq!(r["changes"], serde_json::json!(["clients"]), "{r}");
    let sent = client()
        .post(side.url(TEMPLATE_SEND))
        .bearer_auth("client-token-two-0123456789")
        .body(TEMPLATE)
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), 200);
    side.assert_log_clean(&["client-token-one-0123456789", "client-token-two-0123456789"]);
}
