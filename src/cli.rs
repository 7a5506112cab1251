//! The command line: `run`, `check`, `fake-wechat`, `demo`, `ca init`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{Config, DEFAULT_CONFIG_PATH};
use crate::logging::{self, LogFormat};
use crate::server;
#[cfg(feature = "fake")]
use crate::{demo, fake};

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
    /// Print the reference of every configuration key (Markdown, as
    /// docs/configuration.md holds it) and exit; no file is read.
    #[arg(long, conflicts_with = "print")]
    reference: bool,
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

// Parsed once at start: the largest variant's size costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the sidecar.
    Run(RunArgs),
    /// Validate the configuration and print what it sets up (secrets masked).
    Check(CheckArgs),
    /// Run the fake WeChat server (for tests, demos and benchmarks).
    #[cfg(feature = "fake")]
    FakeWechat(fake::cli::FakeArgs),
    /// Start a fake WeChat and a sidecar for it, and print curl commands to try.
    #[cfg(feature = "fake")]
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

/// Runs the command line; returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(r) => {
            logging::init(cli.log_format.unwrap_or_else(LogFormat::auto));
            let mode = server::RunMode {
                upgrade: r.upgrade,
                daemon: r.daemon,
                config_path: Some(r.config.config.clone()),
                watched: Vec::new(),
            };
            run(&r.config.config, mode)
        }
        Command::Check(c) if c.reference => {
            print!("{}", crate::config::keys::reference());
            0
        }
        Command::Check(c) => check(&c.config.config, c.print),
        #[cfg(feature = "fake")]
        Command::FakeWechat(f) => {
            logging::init(cli.log_format.unwrap_or_else(LogFormat::auto));
            fake::cli::run(f)
        }
        #[cfg(feature = "fake")]
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

fn run(path: &std::path::Path, mut mode: server::RunMode) -> i32 {
    // The files read are what a reload watches: noted now, so the reloader
    // need not parse the config again at start.
    let (loaded, files) = Config::load_recording(path);
    let config = match loaded {
        Ok(c) => c,
        Err(e) => {
            eprint!("{e}");
            return 2;
        }
    };
    mode.watched = files;
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
        print!("{}", crate::config::print::yaml(&c));
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
