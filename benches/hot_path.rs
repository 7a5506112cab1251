//! Micro-benches of the request path's pure parts (criterion):
//! route classification, account choice, token injection into the query,
//! errcode sniffing on a JSON answer, log scrubbing, and the quota ledger.
//! `cargo bench --bench hot_path`

use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use pingora::http::RequestHeader;
use wxsidecar::account::Accounts;
use wxsidecar::config::Config;

fn accounts(n: usize) -> Accounts {
    let mut yaml = String::from("accounts:\n");
    for i in 0..n {
        yaml.push_str(&format!(
            "  - {{name: a{i}, appid: wx{i:016}, secret: s{i}, default: {}}}\n",
            i == 0
        ));
    }
    let c = Config::parse(&yaml).unwrap();
    let a = Accounts::new(c.accounts.clone());
    for (i, acc) in a.iter().enumerate() {
        acc.tokens
            .store_for_bench(&format!("TOKEN{i:090}"), Duration::from_secs(7200));
    }
    a
}

fn bench(c: &mut Criterion) {
    let mut req =
        RequestHeader::build("POST", b"/cgi-bin/message/template/send?foo=1", None).unwrap();
    req.insert_header("Content-Type", "application/json")
        .unwrap();
    c.bench_function("route::classify template send", |b| {
        b.iter(|| wxsidecar::route::classify(black_box(&req)))
    });

    for n in [1usize, 100, 10_000] {
        let a = accounts(n);
        let last = format!("TOKEN{:090}", n - 1);
        let name = format!("a{}", n - 1);
        c.bench_function(&format!("account::pick by header ({n} accounts)"), |b| {
            b.iter(|| a.pick(black_box(Some(name.as_str())), None).is_ok())
        });
        c.bench_function(
            &format!("account::pick by issued token ({n} accounts)"),
            |b| b.iter(|| a.pick(None, black_box(Some(last.as_str()))).is_ok()),
        );
        // A local token answer (`/cgi-bin/token?appid=`) finds its account.
        let appid = format!("wx{:016}", n - 1);
        c.bench_function(&format!("account::by_appid ({n} accounts)"), |b| {
            b.iter(|| a.by_appid(black_box(appid.as_str())).is_some())
        });
    }

    let token = format!("TOKEN{:090}", 7);
    c.bench_function("query::with_token inject", |b| {
        b.iter(|| wxsidecar::query::with_token(black_box(Some("foo=1&bar=2")), black_box(&token)))
    });
    c.bench_function("query::with_token replace", |b| {
        b.iter(|| {
            wxsidecar::query::with_token(
                black_box(Some("a=1&access_token=OLD&b=2")),
                black_box(&token),
            )
        })
    });
    c.bench_function("query::param access_token", |b| {
        b.iter(|| {
            wxsidecar::query::param(black_box("a=1&access_token=OLD&b=2"), "access_token").is_some()
        })
    });

    let ok = br#"{"errcode":0,"errmsg":"ok","msgid":200228332}"#;
    let bad = br#"{"errcode":40001,"errmsg":"invalid credential, access_token is invalid or not latest rid: 6579bd2c-0a3c1f14-2e8c1b01"}"#;
    c.bench_function("inspect::errcode ok answer", |b| {
        b.iter(|| wxsidecar::inspect::errcode(black_box(ok)))
    });
    c.bench_function("inspect::token_rejected 40001", |b| {
        b.iter(|| wxsidecar::inspect::token_rejected(black_box(bad)))
    });

    // The quota ledger's cost per call: the path is counted today already
    // (the steady state), with and without a local cap to check.
    let a = accounts(1);
    let acc = a.iter().next().unwrap();
    acc.admit_call("/cgi-bin/message/template/send").unwrap();
    c.bench_function("quota ledger: count a call", |b| {
        b.iter(|| {
            acc.ledger
                .admit(black_box("/cgi-bin/message/template/send"), None)
        })
    });
    c.bench_function("quota ledger: count a call under a cap", |b| {
        b.iter(|| {
            acc.ledger
                .admit(black_box("/cgi-bin/message/template/send"), Some(u64::MAX))
        })
    });

    let line = r#"{"timestamp":"2026-11-28T10:00:00Z","level":"DEBUG","message":"request","method":"POST","path":"/cgi-bin/message/template/send","status":200}"#;
    let secret_line = "GET /cgi-bin/token?grant_type=client_credential&appid=wx1&secret=abcdef0123456789 HTTP/1.1";
    // Scanning an answer for the token (nothing sent back may carry it):
    // a searcher kept with the token against one built per answer.
    let token: String = (0..136)
        .map(|i| (b'A' + (i * 7 % 26) as u8) as char)
        .collect();
    let answer = br#"{"errcode":0,"errmsg":"ok","msgid":200228332}"#;
    let kept = memchr::memmem::Finder::new(token.as_bytes()).into_owned();
    c.bench_function("token scan: kept searcher", |b| {
        b.iter(|| kept.find(black_box(answer)))
    });
    c.bench_function("token scan: searcher per answer", |b| {
        b.iter(|| memchr::memmem::find(black_box(answer), black_box(token.as_bytes())))
    });
    // What every answer and header now pays: the token in any spelling.
    let long_answer = br#"{"errcode":0,"errmsg":"ok","url":"https://mp.weixin.qq.com/s?__biz=MzA%3D&mid=1&idx=1&sn=abc%2Fdef","title":"Weekly news","digest":"What happened this week in the shop, and what comes next","thumb":"https://mmbiz.qpic.cn/mmbiz_jpg/abcdef0123456789/0?wx_fmt=jpeg"}"#;
    let clean_answer = br#"{"errcode":0,"errmsg":"ok","url":"https://mp.weixin.qq.com/s?__biz=MzA=&mid=1&idx=1&sn=abc-def","title":"Weekly news","digest":"What happened this week in the shop, and what comes next","thumb":"https://mmbiz.qpic.cn/mmbiz_jpg/abcdef0123456789/0?wx_fmt=jpeg"}"#;
    c.bench_function("token scan: plain only, clean answer", |b| {
        b.iter(|| memchr::memmem::find(black_box(clean_answer), black_box(token.as_bytes())))
    });
    c.bench_function("token scan: any spelling, clean answer", |b| {
        b.iter(|| {
            wxsidecar::secret::find_spelled(black_box(clean_answer), black_box(token.as_bytes()))
        })
    });
    c.bench_function("token scan: any spelling, answer with escapes", |b| {
        b.iter(|| {
            wxsidecar::secret::find_spelled(black_box(long_answer), black_box(token.as_bytes()))
        })
    });
    // The RFC 9112 check every request head passes before either front.
    let head = b"POST /cgi-bin/message/template/send HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: wrk\r\nContent-Type: application/json\r\nContent-Length: 187\r\n\r\n";
    c.bench_function("head::check template send", |b| {
        b.iter(|| wxsidecar::head::check(black_box(head)))
    });
    c.bench_function("logging::scrub clean line", |b| {
        b.iter(|| wxsidecar::logging::scrub(black_box(line)))
    });
    c.bench_function("logging::scrub line with a secret", |b| {
        b.iter(|| wxsidecar::logging::scrub(black_box(secret_line)))
    });
}

criterion_group! {
    name = benches;
    // Short runs: these are nanosecond functions; make bench runs many benches.
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
