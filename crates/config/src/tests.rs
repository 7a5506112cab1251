use super::*;

const GOOD: &str = r#"
listen: 127.0.0.1:18080
admin_listen: 127.0.0.1:19901
upstream:
  url: https://api.weixin.qq.com
  connect_timeout: 500ms
accounts:
  - name: shop
    appid: wx0123456789abcdef
    secret: plain-secret-value
"#;

#[test]
fn good_file_parses_with_defaults() {
    let c = Config::parse(GOOD).unwrap();
    assert_eq!(c.listen.port(), 18080);
    assert_eq!(c.upstream.connect_timeout, Duration::from_millis(500));
    assert_eq!(c.upstream.read_timeout, DEFAULT_READ_TIMEOUT);
    assert_eq!(c.accounts[0].token_api, TokenApi::Stable);
    assert!(c.accounts[0].default, "one account is the default");
    assert_eq!(c.default_account(), Some(0));
    assert!(!format!("{c:?}").contains("plain-secret-value"));
}

#[test]
fn send_timeout_defaults_parses_and_refuses_zero() {
    let c = Config::parse(GOOD).unwrap();
    assert_eq!(c.limits.send_timeout, DEFAULT_SEND_TIMEOUT);
    let c = Config::parse(&format!("{GOOD}limits:\n  send_timeout: 5s\n")).unwrap();
    assert_eq!(c.limits.send_timeout, Duration::from_secs(5));
    let e = Config::parse(&format!("{GOOD}limits:\n  send_timeout: 0s\n"))
        .unwrap_err()
        .join("\n");
    assert!(
        e.contains("limits.send_timeout: must be greater than zero"),
        "{e}"
    );
}

#[test]
fn buffered_total_holds_at_least_one_body() {
    let c = Config::parse(GOOD).unwrap();
    assert_eq!(c.limits.buffered_total, DEFAULT_BUFFERED_TOTAL);
    let c = Config::parse(&format!("{GOOD}limits:\n  buffered_body: 512MiB\n")).unwrap();
    assert_eq!(
        c.limits.buffered_total,
        512 << 20,
        "the default grows to one body"
    );
    let e = Config::parse(&format!(
        "{GOOD}limits:\n  buffered_body: 2MiB\n  buffered_total: 1MiB\n"
    ))
    .unwrap_err()
    .join("\n");
    assert!(
        e.contains("limits.buffered_total: 1MiB is less than limits.buffered_body"),
        "{e}"
    );
}

#[test]
fn durations_and_sizes() {
    assert_eq!(parse_duration("300s").unwrap(), Duration::from_secs(300));
    assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
    assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
    assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
    assert!(parse_duration("300").unwrap_err().contains("no unit"));
    assert!(parse_duration("3d").unwrap_err().contains("unknown unit"));
    assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
    assert_eq!(parse_size("512KiB").unwrap(), 512 << 10);
    assert_eq!(parse_size("100").unwrap(), 100);
    assert!(parse_size("1GB").is_err());
}

#[test]
fn upstream_url_shapes() {
    let u = UpstreamUrl::parse("https://api.weixin.qq.com").unwrap();
    assert_eq!(
        (u.tls, u.port, u.host_header()),
        (true, 443, "api.weixin.qq.com".into())
    );
    let u = UpstreamUrl::parse("http://127.0.0.1:9000").unwrap();
    assert_eq!((u.tls, u.host_header()), (false, "127.0.0.1:9000".into()));
    assert!(UpstreamUrl::parse("ftp://x").is_err());
    assert!(UpstreamUrl::parse("https://x/cgi-bin").is_err());
    assert!(UpstreamUrl::parse("not a url").is_err());
}

#[test]
fn every_problem_is_reported_with_its_key() {
    let text = r#"
upstream:
  url: ftp://nowhere
  read_timeout: 15
accounts:
  - name: a
    appid: wx1
    secret: ${WXSIDECAR_TEST_SURELY_UNSET}
    default: true
  - name: a
    appid: wx1
    secret: s
    default: true
    token_api: fast
"#;
    let problems = Config::parse(text).unwrap_err();
    let all = problems.join("\n");
    for needle in [
        "upstream.url",
        "upstream.read_timeout",
        "WXSIDECAR_TEST_SURELY_UNSET is not set",
        "accounts[1].name: `a` is used by another account",
        "accounts[1].appid: `wx1` is used by another account",
        "all marked default",
        "accounts[1].token_api",
    ] {
        assert!(all.contains(needle), "missing `{needle}` in:\n{all}");
    }
}

#[test]
fn unknown_key_names_the_key() {
    let text = "accounts:\n  - name: a\n    appid: wx1\n    secret: s\n    sekret: x\n";
    let problems = Config::parse(text).unwrap_err();
    assert!(problems[0].contains("sekret"), "{problems:?}");
    assert!(problems[0].contains("accounts[0]"), "{problems:?}");
}

#[test]
fn env_secret_is_expanded_and_hidden() {
    let mut src = sources::Fixed::default();
    src.vars
        .insert("WXSIDECAR_TEST_SECRET_X".into(), "from-env-123".into());
    src.files
        .insert("/run/secrets/mall".into(), "mall-from-file\n".into());
    let text = "accounts:\n  - name: a\n    appid: wx1\n    secret: ${WXSIDECAR_TEST_SECRET_X}\n  - name: b\n    appid: wx2\n    secret_file: /run/secrets/mall\n";
    let c = Config::parse_with(text, std::sync::Arc::new(src.clone())).unwrap();
    assert_eq!(c.accounts[0].secret.expose(), "from-env-123");
    assert_eq!(c.accounts[1].secret.expose(), "mall-from-file");
    assert!(!format!("{c:?}").contains("from-env-123"));
    // Not in the sources: reported, naming the variable.
    src.vars.clear();
    let problems = Config::parse_with(text, std::sync::Arc::new(src)).unwrap_err();
    assert!(
        problems
            .iter()
            .any(|p| p.contains("WXSIDECAR_TEST_SECRET_X")),
        "{problems:?}"
    );
}
