//! Configuration errors and `check`: every kind of mistake is reported with
//! its key, the process exits non-zero before listening, no secret is shown.

use std::process::Command;

use crate::support::*;

fn check(config: &str, env: &[(&str, &str)]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, config).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args(["check", "--config"]).arg(&path);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_prints_the_setup_without_secrets() {
    let cfg = "upstream:\n  url: https://api.weixin.qq.com\naccounts:\n  - name: shop\n    appid: wx0123456789abcdef\n    secret: ${WXT_CHECK_SECRET}\n";
    let (code, out, err) = check(cfg, &[("WXT_CHECK_SECRET", "very-secret-check-value")]);
    assert_eq!(code, 0, "{err}");
    for needle in [
        "shop",
        "wx0123456789abcdef",
        "secret=***",
        "127.0.0.1:8080",
        "https://api.weixin.qq.com",
        "(default)",
    ] {
        assert!(out.contains(needle), "missing {needle} in:\n{out}");
    }
    assert!(!out.contains("very-secret-check-value") && !err.contains("very-secret-check-value"));
}

#[test]
fn each_kind_of_error_names_its_key() {
    let acc = "accounts:\n  - name: shop\n    appid: wx1\n    secret: s\n";
    let cases: &[(&str, String, &str)] = &[
        ("unknown key", format!("listn: 1.2.3.4:1\n{acc}"), "listn"),
        ("unknown nested key", "accounts:\n  - name: a\n    appid: wx1\n    secret: s\n    sekret: t\n".into(), "sekret"),
        ("missing env var", "accounts:\n  - name: a\n    appid: wx1\n    secret: ${WXT_SURELY_NOT_SET_42}\n".into(), "WXT_SURELY_NOT_SET_42"),
        ("two defaults", "accounts:\n  - {name: a, appid: wx1, secret: s, default: true}\n  - {name: b, appid: wx2, secret: s, default: true}\n".into(), "default: true"),
        ("duplicate name", "accounts:\n  - {name: a, appid: wx1, secret: s}\n  - {name: a, appid: wx2, secret: s}\n".into(), "accounts[1].name"),
        ("duplicate appid", "accounts:\n  - {name: a, appid: wx1, secret: s}\n  - {name: b, appid: wx1, secret: s}\n".into(), "accounts[1].appid"),
        ("bad URL", format!("upstream:\n  url: ftp://x\n{acc}"), "upstream.url"),
        ("bad duration", format!("upstream:\n  read_timeout: 15\n{acc}"), "upstream.read_timeout"),
        ("bad token_api", "accounts:\n  - {name: a, appid: wx1, secret: s, token_api: fast}\n".into(), "token_api"),
        ("no accounts", "listen: 127.0.0.1:8080\n".into(), "accounts"),
        ("wecom without corpid", "accounts:\n  - {name: a, kind: wecom, secret: s}\n".into(), "accounts[0].corpid"),
        ("wecom with appid", "accounts:\n  - {name: a, kind: wecom, corpid: ww1, appid: wx1, secret: s}\n".into(), "accounts[0].appid"),
        ("wecom with token_api", "accounts:\n  - {name: a, kind: wecom, corpid: ww1, secret: s, token_api: stable}\n".into(), "accounts[0].token_api"),
        ("unknown kind", "accounts:\n  - {name: a, kind: miniapp, appid: wx1, secret: s}\n".into(), "accounts[0].kind"),
        ("open listener without clients", format!("listen: 0.0.0.0:18080\n{acc}"), "clients.allow"),
        ("short client token", format!("clients:\n  tokens:\n    - {{name: a, token: short}}\n{acc}"), "clients.tokens[0].token"),
        ("bad CIDR", format!("clients:\n  allow: [10.0.0.0/99]\n{acc}"), "clients.allow[0]"),
        ("bad failover URL", format!("upstream:\n  failover: [\"nope\"]\n{acc}"), "upstream.failover[0]"),
    ];
    for (what, cfg, key) in cases {
        let (code, _out, err) = check(cfg, &[]);
        assert_ne!(code, 0, "{what}: accepted");
        assert!(err.contains(key), "{what}: `{key}` not named in:\n{err}");
    }
}

#[test]
fn all_problems_are_reported_in_one_run() {
    let cfg = "upstream:\n  url: nope\n  connect_timeout: 2x\naccounts:\n  - {name: a, appid: wx1, secret: s, default: true}\n  - {name: a, appid: wx1, secret: very-secret-dup, default: true}\n";
    let (code, _out, err) = check(cfg, &[]);
    assert_ne!(code, 0);
    for key in [
        "upstream.url",
        "upstream.connect_timeout",
        "accounts[1].name",
        "accounts[1].appid",
        "default",
    ] {
        assert!(err.contains(key), "missing {key}:\n{err}");
    }
    assert!(!err.contains("very-secret-dup"));
}

#[test]
fn run_with_a_bad_config_exits_before_listening() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(
        &path,
        format!("listen: 127.0.0.1:{port}\naccounts:\n  - name: a\n    appid: wx1\n    secret: ${{WXT_NOT_SET_EITHER}}\n"),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("WXT_NOT_SET_EITHER"));
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[test]
fn run_reports_a_port_in_use() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, format!("listen: 127.0.0.1:{port}\nadmin_listen: 127.0.0.1:{}\naccounts:\n  - {{name: a, appid: wx1, secret: s}}\n", free_port())).unwrap();
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("listen") && err.contains(&port.to_string()),
        "{err}"
    );
}

#[test]
fn the_store_password_is_masked() {
    let cfg = "token:\n  store: redis://:${WXT_REDIS_PW}@127.0.0.1:6379/0\naccounts:\n  - name: a\n    appid: wx1\n    secret: s\n";
    let (code, out, err) = check(cfg, &[("WXT_REDIS_PW", "redis-pass-value-9")]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("redis://:***@127.0.0.1:6379/0"), "{out}");
    assert!(!out.contains("redis-pass-value-9") && !err.contains("redis-pass-value-9"));
    let (code, _, err) = check(
        "token:\n  store: mysql://x\naccounts:\n  - {name: a, appid: wx1, secret: s}\n",
        &[],
    );
    assert_ne!(code, 0);
    assert!(err.contains("token.store"), "{err}");
}

#[test]
fn check_print_shows_the_effective_config_with_secrets_masked() {
    let cfg = "accounts:\n  - name: shop\n    appid: wx0123456789abcdef\n    secret: ${WXT_PRINT_SECRET}\nclients:\n  tokens:\n    - {name: app, token: client-token-value-0123}\nadmin:\n  token: admin-token-value-0123456\n";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, cfg).unwrap();
    let out = Command::new(BIN)
        .args(["check", "--print", "--config"])
        .arg(&path)
        .env("WXT_PRINT_SECRET", "print-secret-value-42")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "read_timeout: 15s",
        "daily_budget: 200",
        "shutdown_grace: 10s",
        "url: https://api.weixin.qq.com",
        "url: https://qyapi.weixin.qq.com",
        "token_api: stable",
        "secret: '***'",
        "token: '***'",
        "max_connections: 10000",
        "header_timeout: 10s",
        "answer_timeout: 180s",
        "budget_reserve: 40",
        "refresh_interval: 30s",
    ] {
        assert!(text.contains(needle), "missing `{needle}` in:\n{text}");
    }
    assert!(!text.contains("print-secret-value-42") && !text.contains("client-token-value-0123"));
    assert!(!text.contains("admin-token-value-0123456"));
    // It is YAML.
    let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).unwrap();
    assert_eq!(v["accounts"][0]["name"].as_str(), Some("shop"));
}

#[test]
fn check_print_writes_the_file_format_back() {
    // Printed, filled with secrets again and read back, a configuration
    // prints the same: every key is printed in the file's own format.
    let cfg = "accounts:\n  - name: shop\n    appid: wx0123456789abcdef\n    secret: s\n    default: true\n  - name: corp\n    kind: wecom\n    corpid: ww0123456789abcdef\n    agentid: \"1000002\"\n    secret: s\ntoken:\n  store: redis://:pw-value-1@127.0.0.1:6379/0\n  on_store_error: wait\nclients:\n  allow: [10.0.0.0/8]\n  tokens:\n    - {name: app, token: client-token-value-0123, accounts: [shop]}\n  rate_limit:\n    per_client: {rps: 10, burst: 20}\nlimits:\n  buffered_body: 64KiB\nupstream:\n  failover: [\"https://backup.example:8443\"]\n  connect_timeout: 1500ms\n";
    let dir = tempfile::tempdir().unwrap();
    let print = |text: &str| {
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, text).unwrap();
        let out = Command::new(BIN)
            .args(["check", "--print", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}\n{text}");
        String::from_utf8(out.stdout).unwrap()
    };
    let first = print(cfg);
    for needle in [
        "buffered_body: 65536",
        "connect_timeout: 1500ms",
        "corpid: ww0123456789abcdef",
        "on_store_error: wait",
        "store: redis://:***@127.0.0.1:6379/0",
        "- https://backup.example:8443",
        "- 10.0.0.0/8",
    ] {
        assert!(first.contains(needle), "missing `{needle}` in:\n{first}");
    }
    assert!(!first.contains("pw-value-1") && !first.contains("client-token-value-0123"));
    let refilled = first.replace("'***'", "'0123456789abcdef-again'");
    assert_eq!(print(&refilled), first);
}

#[test]
fn an_open_admin_listener_needs_a_token() {
    let acc = "accounts:\n  - name: shop\n    appid: wx0123456789abcdef\n    secret: s\n";
    let (code, _, err) = check(&format!("admin_listen: 0.0.0.0:9901\n{acc}"), &[]);
    assert_ne!(code, 0);
    assert!(
        err.contains("admin.token") && err.contains("0.0.0.0:9901"),
        "{err}"
    );
    let (code, _, err) = check(
        &format!("admin_listen: 0.0.0.0:9901\nadmin:\n  token: short\n{acc}"),
        &[],
    );
    assert_ne!(code, 0);
    assert!(err.contains("at least 16"), "{err}");
    assert!(
        !err.contains("short\n") && !err.contains("`short`"),
        "{err}"
    );
    let (code, _, err) = check(
        &format!("admin_listen: 0.0.0.0:9901\nadmin:\n  token: ${{WXT_ADMIN}}\n{acc}"),
        &[("WXT_ADMIN", "0123456789abcdef-admin")],
    );
    assert_eq!(code, 0, "{err}");
}

#[test]
fn errors_never_print_credentials() {
    let acc = "accounts:\n  - name: shop\n    appid: wx0123456789abcdef\n    secret: s\n";
    let cases = [
        format!("upstream:\n  url: https://user:PASSWORD-1@api.weixin.qq.com:99999\n{acc}"),
        format!("upstream:\n  url: ftp://user:PASSWORD-1@host\n{acc}"),
        format!("upstream:\n  url: https://host/?secret=PASSWORD-1:x\n  failover: [\"gopher://a?secret=PASSWORD-1\"]\n{acc}"),
        format!("upstream:\n  url: ${{WXT_URL}}\n{acc}"),
        format!("token:\n  store: redis://:PASSWORD-1@127.0.0.1:99999/0\n{acc}"),
        "accounts:\n  - name: shop\n    appid: wx0123456789abcdef\n    secret: s\n    token_api: PASSWORD-1\n".to_string(),
        "accounts:\n  - name: shop\n    appid: wx0123456789abcdef\n    secret: s\n    default: PASSWORD-1\n".to_string(),
        "accounts:\n  - name: shop\n    appid: PASSWORD-1!\n    secret: s\n    replace_tokens: PASSWORD-1\n    kind: PASSWORD-1\n".to_string(),
    ];
    for cfg in &cases {
        let (code, out, err) = check(cfg, &[("WXT_URL", "https://u:PASSWORD-1@h:99999")]);
        assert_ne!(code, 0, "{cfg}");
        assert!(
            !out.contains("PASSWORD-1") && !err.contains("PASSWORD-1"),
            "{cfg}\nprinted a credential:\n{err}"
        );
        assert!(err.contains("problem") || err.contains("cannot"), "{err}");
    }
}

#[test]
fn check_refuses_what_run_would_refuse() {
    let acc = "accounts:\n  - name: shop\n    appid: wx0123456789abcdef\n    secret: s\n";
    let (code, _, err) = check(
        &format!("token:\n  store: redis://:pw@127.0.0.1:99999/0\n{acc}"),
        &[],
    );
    assert_ne!(code, 0);
    assert!(err.contains("token.store"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("ca.pem");
    std::fs::write(&not_pem, "not a certificate\n").unwrap();
    let cfg = format!("upstream:\n  ca_file: {}\n{acc}", not_pem.display());
    let (code, _, err) = check(&cfg, &[]);
    assert_ne!(code, 0);
    assert!(
        err.contains("upstream.ca_file") && err.contains("PEM"),
        "{err}"
    );
    // And `run` refuses it the same way, before listening.
    let path = dir.path().join("c.yaml");
    std::fs::write(&path, &cfg).unwrap();
    let out = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("upstream.ca_file"));
}
