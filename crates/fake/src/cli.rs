//! `wxsidecar fake-wechat`: the fake WeChat's command-line options.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate as fake;
use crate::FakeOptions;

#[derive(Args)]
pub struct FakeArgs {
    /// Address to listen on (port 0 picks a free port; the chosen one is printed).
    #[arg(long, default_value = "127.0.0.1:9443")]
    listen: SocketAddr,
    /// Serve plain HTTP instead of TLS.
    #[arg(long)]
    plain: bool,
    /// Write the fake's CA certificate (PEM) here.
    #[arg(long)]
    ca_out: Option<PathBuf>,
    /// An app the fake knows, as APPID:SECRET (repeatable; default: the demo app).
    #[arg(long = "app", value_name = "APPID:SECRET")]
    apps: Vec<String>,
    /// More apps, one APPID:SECRET per line (for tests with thousands of accounts).
    #[arg(long, value_name = "FILE")]
    apps_file: Option<PathBuf>,
    /// A WeCom app the fake knows, as CORPID:SECRET (repeatable).
    #[arg(long = "wecom-app", value_name = "CORPID:SECRET")]
    wecom_apps: Vec<String>,
    /// Token lifetime in seconds.
    #[arg(long, default_value_t = 7200)]
    token_ttl: u64,
    /// Ticket lifetime in seconds (claimed in full on every fetch, as WeChat does).
    #[arg(long, default_value_t = 7200)]
    ticket_ttl: u64,
    /// Ticket fetches allowed per owner, type and hour (default: 400 per WeCom
    /// corp, 100 per app and type); beyond it the fake answers 45009.
    #[arg(long)]
    ticket_quota: Option<u32>,
    /// Delay before every API answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Delay before every token answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    token_latency_ms: u64,
    /// Keep the fake's CA in DIR (ca.pem, ca-key.pem), reusing it when present.
    #[arg(long, value_name = "DIR")]
    ca_dir: Option<PathBuf>,
    /// Offer HTTP/2 by ALPN (clients that do not ask get HTTP/1.1).
    #[arg(long)]
    h2: bool,
    /// With --h2: send GOAWAY on a connection after this many requests.
    #[arg(long, value_name = "N")]
    h2_max_requests: Option<u64>,
    /// With --h2: allow at most N streams at once on a connection
    /// (SETTINGS_MAX_CONCURRENT_STREAMS; hyper's default is 200).
    #[arg(long, value_name = "N")]
    h2_max_streams: Option<u32>,
    /// A third-party platform: APPID:SECRET:TOKEN:AESKEY (AESKEY: the 43
    /// characters of an EncodingAESKey).
    #[arg(long, value_name = "APPID:SECRET:TOKEN:AESKEY")]
    platform: Option<String>,
    /// Where the platform's events (tickets, authorisations) are POSTed.
    #[arg(long, value_name = "URL")]
    platform_callback: Option<String>,
    /// Seconds between ticket pushes (WeChat: 600).
    #[arg(long, default_value_t = 600)]
    ticket_push_every: u64,
    /// Hand out a new refresh token on every api_authorizer_token.
    #[arg(long)]
    rotate_refresh_tokens: bool,
    /// Injected faults as JSON, e.g. '{"seed":1,"rules":[{"path":"/cgi-bin/message","reset_after_rate":0.05}]}'
    /// (also settable at run time with POST /__fake/faults).
    #[arg(long)]
    faults: Option<String>,
}

fn parse_apps(apps: &[String]) -> Result<Vec<(String, String)>, String> {
    apps.iter()
        .map(|a| {
            a.split_once(':')
                .filter(|(id, s)| !id.is_empty() && !s.is_empty())
                .map(|(id, s)| (id.to_string(), s.to_string()))
                .ok_or_else(|| {
                    format!(
                        "--app `{}`: write APPID:SECRET",
                        a.split(':').next().unwrap_or("")
                    )
                })
        })
        .collect()
}

/// `wxsidecar fake-wechat`: runs the fake until killed.
pub fn run(f: FakeArgs) -> i32 {
    let mut opts = FakeOptions {
        listen: f.listen,
        plain: f.plain,
        token_ttl: Duration::from_secs(f.token_ttl),
        ticket_ttl: Duration::from_secs(f.ticket_ttl),
        ticket_quota: f.ticket_quota,
        latency: Duration::from_millis(f.latency_ms),
        token_latency: Duration::from_millis(f.token_latency_ms),
        ca_dir: f.ca_dir.clone(),
        h2: f.h2,
        h2_max_requests: f.h2_max_requests,
        h2_max_streams: f.h2_max_streams,
        platform: f.platform.clone(),
        platform_callback: f.platform_callback.clone(),
        ticket_push_every: Duration::from_secs(f.ticket_push_every.max(1)),
        rotate_refresh: f.rotate_refresh_tokens,
        ..FakeOptions::default()
    };
    if let Some(text) = &f.faults {
        match serde_json::from_str(text) {
            Ok(plan) => opts.faults = plan,
            Err(e) => {
                eprintln!("fake-wechat: --faults: {e}");
                return 2;
            }
        }
    }
    match parse_apps(&f.wecom_apps) {
        Ok(a) => opts.wecom_apps = a,
        Err(e) => {
            eprintln!("fake-wechat: {}", e.replace("--app", "--wecom-app"));
            return 2;
        }
    }
    let mut apps = f.apps.clone();
    if let Some(path) = &f.apps_file {
        match std::fs::read_to_string(path) {
            Ok(text) => apps.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(String::from),
            ),
            Err(e) => {
                eprintln!("fake-wechat: --apps-file {}: {e}", path.display());
                return 2;
            }
        }
    }
    if !apps.is_empty() {
        match parse_apps(&apps) {
            Ok(a) => opts.apps = a,
            Err(e) => {
                eprintln!("fake-wechat: {e}");
                return 2;
            }
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let fake = match fake::start(opts.clone()).await {
            Ok(f) => f,
            Err(e) => {
                eprintln!("fake-wechat: cannot listen on {}: {e}", opts.listen);
                return 2;
            }
        };
        if let (Some(path), Some(pem)) = (&f.ca_out, &fake.ca_pem) {
            if let Err(e) = std::fs::write(path, pem) {
                eprintln!("fake-wechat: cannot write {}: {e}", path.display());
                return 2;
            }
        }
        let scheme = if fake.tls { "https" } else { "http" };
        // One write, errors ignored: a reader that stops reading must not kill the fake.
        let mut banner = format!("fake-wechat listening on {scheme}://{}\n", fake.addr);
        for (appid, _) in &opts.apps {
            banner.push_str(&format!("fake-wechat app {appid}\n"));
        }
        use std::io::Write;
        let mut out = std::io::stdout();
        let _ = out.write_all(banner.as_bytes()).and_then(|_| out.flush());
        let _ = tokio::signal::ctrl_c().await;
        0
    })
}
