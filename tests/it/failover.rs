//! Domain failover and the breaker: two fakes over TLS (one CA), the first
//! killed, then both, then the first back.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

fn config(primary: &Fake, secondary: &Fake) -> String {
    format!(
        "upstream:\n  url: https://localhost:{}\n  failover: [\"https://localhost:{}\"]\n  ca_file: {}\n  failover_after: 3\n  probe_interval: 200ms\n  connect_timeout: 500ms\n{}",
        primary.port,
        secondary.port,
        primary.ca.display(),
        Sidecar::accounts("classic", "stable")
    )
}

async fn send_ok(side: &Sidecar) {
    let (status, v) = side.send("/cgi-bin/message/template/send", TEMPLATE).await;
    assert_eq!((status, v["errcode"].as_i64()), (200, Some(0)), "{v}");
}

async fn wait_for(side: &Sidecar, what: &str, pred: impl Fn(&Value) -> bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        let st = side.status().await;
        if pred(&st["upstream"]) {
            return;
        }
        assert!(Instant::now() < deadline, "never {what}: {st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_secondary_takes_over_and_the_primary_comes_back() {
    let ca = tempfile::tempdir().unwrap();
    let mut primary = Fake::start_in(ca.path(), 0, &[]);
    let secondary = Fake::start_in(ca.path(), 0, &[]);
    let side = Sidecar::start(&primary, &config(&primary, &secondary)).await;
    send_ok(&side).await;
    assert_eq!(primary.stats().await["messages"], 1);

    let port = primary.port;
    primary.kill();
    // Every send still succeeds: a failed connect moves on at once, and the
    // secondary's rejection of the primary's token is replayed away.
    for _ in 0..6 {
        send_ok(&side).await;
    }
    assert_eq!(secondary.stats().await["messages"], 6);
    assert!(
        secondary.fetches(SHOP_APPID).await >= 1,
        "token fetches follow the host choice"
    );
    wait_for(&side, "failed over", |u| {
        u["hosts"][0]["in_use"] == false
            && u["active"]
                .as_str()
                .unwrap()
                .ends_with(&secondary.port.to_string())
    })
    .await;

    // The primary returns on its old port: the probe takes it back.
    let primary = Fake::start_in(ca.path(), port, &[]);
    wait_for(&side, "took the primary back", |u| {
        u["hosts"][0]["in_use"] == true
    })
    .await;
    send_ok(&side).await;
    assert_eq!(primary.stats().await["messages"], 1);
    side.assert_log_clean(&[]);
}

#[tokio::test]
async fn the_breaker_fails_fast_when_every_host_is_down() {
    let ca = tempfile::tempdir().unwrap();
    let mut primary = Fake::start_in(ca.path(), 0, &[]);
    let mut secondary = Fake::start_in(ca.path(), 0, &[]);
    let side = Sidecar::start(&primary, &config(&primary, &secondary)).await;
    send_ok(&side).await;
    let port = primary.port;
    primary.kill();
    secondary.kill();
    let mut last = Value::Null;
    for _ in 0..10 {
        let (status, v) = side.send("/cgi-bin/message/template/send", TEMPLATE).await;
        assert!(status == 502 || status == 503, "{status} {v}");
        last = v;
    }
    assert_eq!(last["errcode"], -1);
    assert_eq!(
        last["errmsg"],
        "wxsidecar: upstream unavailable, retry later"
    );
    let st = side.status().await;
    assert_eq!(st["upstream"]["breaker_open"], true, "{st}");

    let _primary = Fake::start_in(ca.path(), port, &[]);
    wait_for(&side, "closed the breaker", |u| u["breaker_open"] == false).await;
    send_ok(&side).await;
}
