//! Replicas share one token through a real Redis: one fetch per lifetime
//! cluster-wide, locks that survive a crashed winner, Redis outages, restarts.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::*;

fn shared(fake_ttl_config: &str, redis: &Redis) -> String {
    format!(
        "{}token:\n  store: {}\n{fake_ttl_config}accounts:\n  - name: shop\n    appid: {SHOP_APPID}\n    secret: ${{WXT_SHOP_SECRET}}\n    token_api: classic\n",
        upstream(),
        redis.url()
    )
}

async fn send_through(sides: &[&Sidecar], n: usize) -> Vec<Value> {
    let c = client();
    let mut bad = Vec::new();
    for i in 0..n {
        let side = sides[i % sides.len()];
        let v: Value = post_json(
            &c,
            side.url("/cgi-bin/message/template/send"),
            TEMPLATE.to_string(),
        )
        .await;
        if v["errcode"] != 0 {
            bad.push(v);
        }
    }
    bad
}

#[tokio::test]
async fn three_replicas_fetch_once_per_lifetime() {
    // 4 s tokens refreshed 0.5 s before expiry: one fetch every 3.5 s.
    let fake = Fake::start(&["--token-ttl", "4"]);
    let redis = Redis::start().await;
    let cfg = shared("  refresh_before: 500ms\n", &redis);
    let a = Sidecar::start(&fake, &cfg).await;
    let b = Sidecar::start(&fake, &cfg).await;
    let c = Sidecar::start(&fake, &cfg).await;
    let sides = [&a, &b, &c];
    // Steady load through all three for 5.5 refresh cycles: 6 tokens (each
    // replica fetching alone would make 18). The refresher's own schedule
    // is unit-tested under a paused clock (lease::refresher).
    let end = Instant::now() + Duration::from_millis(19_250);
    let mut bad = Vec::new();
    let mut sent = 0;
    while Instant::now() < end {
        bad.extend(send_through(&sides, 3).await);
        sent += 3;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(bad.is_empty(), "clients saw errors: {bad:?}");
    assert!(sent > 150, "{sent}");
    let fetches = fake.fetches(SHOP_APPID).await;
    assert!(
        (5..=7).contains(&fetches),
        "{fetches} fetches for 6 lifetimes across 3 replicas"
    );
    for s in sides {
        assert_eq!(s.status().await["store"]["state"], "ok");
    }
    let rec: Value = serde_json::from_str(
        &redis
            .get(&format!("wxsidecar:token:classic:{SHOP_APPID}"))
            .await
            .unwrap(),
    )
    .unwrap();
    assert!(rec["token"].as_str().is_some() && rec["fetched_by"].as_str().is_some());
    assert!(
        !rec.to_string().contains(SHOP_SECRET),
        "the store never holds the secret"
    );
}

#[tokio::test]
async fn a_crashed_winners_lock_expires_and_another_replica_fetches() {
    let fake = Fake::start(&[]);
    let redis = Redis::start().await;
    // A replica took the lock and died: its lock lives 2.5 s more.
    let mut conn = redis.conn().await.unwrap();
    let lock_key = format!("wxsidecar:token:classic:{SHOP_APPID}:lock");
    let _: () = redis::cmd("SET")
        .arg(&lock_key)
        .arg("dead-replica-1")
        .arg("PX")
        .arg(2500)
        .query_async(&mut conn)
        .await
        .unwrap();
    let started = Instant::now();
    let side = Sidecar::start_nowait(&fake, &shared("", &redis));
    tokio::time::sleep(Duration::from_millis(1000).saturating_sub(started.elapsed())).await;
    assert_eq!(
        fake.fetches(SHOP_APPID).await,
        0,
        "no fetch while a valid lock exists"
    );
    side.wait_ready().await;
    assert!(
        started.elapsed() >= Duration::from_millis(2400),
        "waited for the lock to expire"
    );
    assert_eq!(fake.fetches(SHOP_APPID).await, 1);
    let (status, v) = side.send("/cgi-bin/message/template/send", TEMPLATE).await;
    assert_eq!((status, v["errcode"].as_i64()), (200, Some(0)), "{v}");
}

#[tokio::test]
async fn a_restarted_replica_uses_the_stored_token() {
    let fake = Fake::start(&[]);
    let redis = Redis::start().await;
    let cfg = shared("", &redis);
    let first = Sidecar::start(&fake, &cfg).await;
    let token = first.token(SHOP_APPID, SHOP_SECRET).await;
    drop(first);
    let second = Sidecar::start(&fake, &cfg).await;
    assert_eq!(second.token(SHOP_APPID, SHOP_SECRET).await, token);
    assert_eq!(fake.fetches(SHOP_APPID).await, 1, "0 fetches on restart");
    assert!(second.log().contains("token taken from the shared store"));
}

#[tokio::test]
async fn redis_outage_is_invisible_while_the_token_is_valid() {
    let fake = Fake::start(&[]);
    let mut redis = Redis::start().await;
    let cfg = shared("", &redis);
    let a = Sidecar::start(&fake, &cfg).await;
    let b = Sidecar::start(&fake, &cfg).await;
    assert!(send_through(&[&a, &b], 20).await.is_empty());

    redis.stop();
    assert!(
        send_through(&[&a, &b], 40).await.is_empty(),
        "errors while Redis is down"
    );
    let deadline = Instant::now() + WAIT;
    while !a.status().await["store"]["state"]
        .as_str()
        .unwrap()
        .starts_with("unreachable")
    {
        assert!(Instant::now() < deadline, "outage never noticed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    redis.restart().await;
    let key = format!("wxsidecar:token:classic:{SHOP_APPID}");
    while a.status().await["store"]["state"] != "ok" || redis.get(&key).await.is_none() {
        assert!(
            Instant::now() < deadline,
            "store never recovered: {}",
            a.status().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(send_through(&[&a, &b], 20).await.is_empty());
    assert_eq!(
        fake.fetches(SHOP_APPID).await,
        1,
        "the outage cost no fetch"
    );

    // After the restart, a revocation still costs exactly one fetch for both.
    fake.invalidate(SHOP_APPID).await;
    assert!(send_through(&[&a, &b], 20).await.is_empty());
    assert_eq!(fake.fetches(SHOP_APPID).await, 2);
    let log = a.log();
    assert_eq!(
        log.matches("token store unreachable").count(),
        1,
        "logged once per change"
    );
    assert!(log.contains("token store reachable again"));
}

#[tokio::test]
async fn three_replicas_times_a_hundred_failures_cost_one_fetch() {
    let fake = Fake::start(&[]);
    let redis = Redis::start().await;
    // 300 requests at once open new TLS connections to the fake: on a busy
    // test box the default 2 s connect bound is not what this test is about.
    let cfg = shared("", &redis).replacen(
        "  warm_connections: 4\n",
        "  warm_connections: 4\n  connect_timeout: 10s\n",
        1,
    );
    let sides = [
        Sidecar::start(&fake, &cfg).await,
        Sidecar::start(&fake, &cfg).await,
        Sidecar::start(&fake, &cfg).await,
    ];
    assert_eq!(fake.fetches(SHOP_APPID).await, 1);
    fake.invalidate(SHOP_APPID).await;
    let c = client();
    let mut tasks = Vec::new();
    for s in &sides {
        for _ in 0..100 {
            let req = c
                .post(s.url("/cgi-bin/message/template/send"))
                .body(TEMPLATE);
            tasks.push(tokio::spawn(async move {
                req.send().await.unwrap().json::<Value>().await.unwrap()
            }));
        }
    }
    for t in tasks {
        let v = t.await.unwrap();
        assert_eq!(v["errcode"], 0, "{v}");
    }
    assert_eq!(
        fake.fetches(SHOP_APPID).await,
        2,
        "exactly one fetch across three replicas"
    );
}

#[tokio::test]
async fn the_daily_budget_is_counted_across_replicas() {
    let fake = Fake::start(&["--token-ttl", "3"]);
    let redis = Redis::start().await;
    let cfg = shared("  daily_budget: 2\n", &redis);
    let a = Sidecar::start(&fake, &cfg).await;
    let b = Sidecar::start(&fake, &cfg).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let (sa, sb) = (a.status().await, b.status().await);
        if sa["accounts"][0]["budget_spent"] == true && sb["accounts"][0]["budget_spent"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "budget never spent: {sa} {sb}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        fake.fetches(SHOP_APPID).await,
        2,
        "two fetches for the whole cluster"
    );
}
