//! The command line: `run`, `check`, `fake-wechat`, `demo`, `ca init`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, DEFAULT_CONFIG_PATH};
use crate::fake::{self, FakeOptions};
use crate::logging::{self, LogFormat};
use crate::{demo, server};

#[derive(Parser)]
#[command(
    name = "wxsidecar",
    version,
    about = "A sidecar that owns WeChat access tokens: caches, injects, refreshes, pools TLS."
)]
struct Cli {
    /// Log line format (default: pretty at a terminal, json otherwise).
    #[arg(long, value_enum, global = true)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct ConfigArg {
    /// Configuration file.
    #[arg(long, short, env = "WXSIDECAR_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    config: PathBuf,
}

#[derive(Args)]
struct CheckArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Print the effective configuration (defaults filled in) as YAML.
    #[arg(long)]
    print: bool,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// Take the listening sockets over from a running wxsidecar (send it
    /// SIGQUIT): a zero-downtime upgrade.
    #[arg(long)]
    upgrade: bool,
    /// Detach from the terminal and write `pid_file`.
    #[arg(long)]
    daemon: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar.
    Run(RunArgs),
    /// Validate the configuration and print what it sets up (secrets masked).
    Check(CheckArgs),
    /// Run the fake WeChat server (for tests, demos and benchmarks).
    FakeWechat(FakeArgs),
    /// Start a fake WeChat and a sidecar for it, and print curl commands to try.
    Demo(demo::DemoArgs),
    /// The local CA of transparent mode.
    #[command(subcommand)]
    Ca(CaCommand),
}

#[derive(Subcommand)]
enum CaCommand {
    /// Make a new CA: DIR/ca.pem (give it to the apps' trust stores) and
    /// DIR/ca-key.pem (mode 0600; only the sidecar reads it).
    Init {
        /// Directory to write ca.pem and ca-key.pem into.
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing CA (apps that trust the old one stop trusting the sidecar).
        #[arg(long)]
        force: bool,
        /// DNS subtree the CA may sign for (X.509 name constraints); repeat for more.
        #[arg(long = "permit", default_value = crate::certs::ca::DEFAULT_PERMITTED_DOMAIN)]
        permit: Vec<String>,
    },
}

#[derive(Args)]
struct FakeArgs {
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
    /// Injected faults as JSON, e.g. '{"seed":1,"rules":[{"path":"/cgi-bin/message","reset_after_rate":0.05}]}'
    /// (also settable at run time with POST /__fake/faults).
    #[arg(long)]
    faults: Option<String>,
}

/// Runs the command line; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(r) => {
            logging::init(cli.log_format.unwrap_or_else(LogFormat::auto));
            let mode = server::RunMode {
                upgrade: r.upgrade,
                daemon: r.daemon,
            };
            run(&r.config.config, mode)
        }
        Command::Check(c) => check(&c.config.config, c.print),
        Command::FakeWechat(f) => {
            logging::init(cli.log_format.unwrap_or_else(LogFormat::auto));
            fake_wechat(f)
        }
        Command::Demo(d) => {
            logging::init(cli.log_format.unwrap_or(LogFormat::Pretty));
            demo::run(d)
        }
        Command::Ca(CaCommand::Init { out, force, permit }) => {
            match crate::certs::ca::init(&out, force, &permit) {
                Ok((cert, key)) => {
                    println!("wrote {} (trust this in the apps)", cert.display());
                    println!("wrote {} (mode 0600; the sidecar's secret)", key.display());
                    println!("set intercept.ca_cert and intercept.ca_key to these files");
                    0
                }
                Err(e) => {
                    eprintln!("wxsidecar ca init: {e}");
                    2
                }
            }
        }
    }
}

fn load(path: &std::path::Path) -> Result<Config, i32> {
    Config::load(path).map_err(|e| {
        eprint!("{e}");
        2
    })
}

fn run(path: &std::path::Path, mode: server::RunMode) -> i32 {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match server::prepare(config, mode) {
        Ok(p) => {
            p.run();
            0
        }
        Err(e) => {
            eprintln!("wxsidecar: cannot start: {e}");
            tracing::error!(error = %e, "cannot start");
            2
        }
    }
}

fn check(path: &std::path::Path, print: bool) -> i32 {
    let c = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Err(e) = server::offline_checks(&c) {
        eprintln!("configuration {} cannot start: {e}", path.display());
        return 2;
    }
    if print {
        print!("{}", crate::effective::yaml(&c));
        return 0;
    }
    println!("configuration {} is valid", path.display());
    println!("listen:        {} (apps, plain HTTP/1.1)", c.listen);
    println!(
        "admin_listen:  {} (/healthz /readyz /status)",
        c.admin_listen
    );
    println!(
        "upstream:      {} (ca_file: {}, connect {:?}, read {:?}, warm {}, idle {:?})",
        c.upstream.url,
        c.upstream
            .ca_file
            .as_ref()
            .map_or("system roots only".to_string(), |p| p.display().to_string()),
        c.upstream.connect_timeout,
        c.upstream.read_timeout,
        c.upstream.warm_connections,
        c.upstream.idle_timeout
    );
    println!(
        "token:         refresh {:?} before expiry, budget {}/day, store {}",
        c.token.refresh_before,
        c.token.daily_budget,
        c.token
            .store
            .as_ref()
            .map_or("memory".to_string(), |u| crate::secret::mask_url(
                u.expose()
            ))
    );
    if let Some(i) = &c.intercept {
        if matches!(
            crate::certs::ca::permitted_domains(&i.ca_cert_pem),
            Ok(None)
        ) {
            println!("note: the intercept CA has no name constraints: a leaked key could sign any site; `wxsidecar ca init` makes one that permits weixin.qq.com only");
        }
        let show = |a: Option<SocketAddr>| a.map_or("off".to_string(), |a| a.to_string());
        println!(
            "intercept:     https {} · http {} · proxy {} · hosts {} · CA {} (key not shown) · leaf {:?}",
            show(i.https_listen),
            show(i.http_listen),
            show(i.proxy_listen),
            i.hosts.join(", "),
            i.ca_source,
            i.leaf_lifetime
        );
    }
    println!("accounts:");
    for a in &c.accounts {
        println!(
            "  - {} appid={} token_api={} secret={} replace_tokens={}{}",
            a.name,
            a.appid,
            a.token_api.as_str(),
            a.secret,
            match a.replace_tokens {
                crate::config::ReplaceTokens::Issued => "issued",
                crate::config::ReplaceTokens::Always => "always",
            },
            if a.default { " (default)" } else { "" }
        );
    }
    0
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

fn fake_wechat(f: FakeArgs) -> i32 {
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
