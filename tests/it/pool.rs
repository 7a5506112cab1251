//! Idle HTTP/1.1 upstream connections: reused while they live, never used
//! once the server has closed them.

use serde_json::Value;

use crate::support::*;

fn config() -> String {
    format!(
        "upstream:\n  url: FAKE_URL\n  ca_file: FAKE_CA\n  http2: false\n  warm_connections: 2\n{}",
        Sidecar::accounts("stable", "classic")
    )
}

async fn host(side: &Sidecar) -> Value {
    side.status().await["upstream"]["hosts"][0].clone()
}

#[tokio::test]
async fn connections_are_reused_while_they_live() {
    let fake = Fake::start(&[]);
    let side = Sidecar::start(&fake, &config()).await;
    let before = host(&side).await;
    for _ in 0..20 {
        let (status, v) = side.send("/cgi-bin/message/template/send", TEMPLATE).await;
        assert_eq!((status, &v["errcode"]), (200, &Value::from(0)), "{v}");
    }
    let after = host(&side).await;
    // One request at a time: the same warm connection every time.
    assert_eq!(
        after["connections_opened"], before["connections_opened"],
        "{after}"
    );
    let reused = after["connections_reused"].as_u64().unwrap()
        - before["connections_reused"].as_u64().unwrap();
    assert_eq!(reused, 20, "{after}");
    assert!(after["idle_connections"].as_u64().unwrap() >= 1, "{after}");
}

#[tokio::test]
async fn a_connection_the_server_closed_while_idle_is_not_used() {
    let fake = Fake::start(&[]);
    let side = Sidecar::start(&fake, &config()).await;
    for _ in 0..3 {
        let (status, _) = side.send("/cgi-bin/message/template/send", TEMPLATE).await;
        assert_eq!(status, 200);
    }
    let before = host(&side).await;
    assert!(
        before["idle_connections"].as_u64().unwrap() >= 1,
        "{before}"
    );
    // The server's keep-alive timeout closes every idle connection; a POST
    // on one of them would be lost (a 502, never resent).
    fake.close_idle().await;
    for _ in 0..5 {
        let (status, v) = side.send("/cgi-bin/message/template/send", TEMPLATE).await;
        assert_eq!((status, &v["errcode"]), (200, &Value::from(0)), "{v}");
    }
    let after = host(&side).await;
    assert_eq!(after["failures"], before["failures"], "{after}");
    assert!(
        after["connections_opened"].as_u64() > before["connections_opened"].as_u64(),
        "{after}"
    );
    assert_eq!(fake.stats().await["messages"], 8);
}
