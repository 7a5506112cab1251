//! The configuration file: its YAML format and the validated [`Config`] the rest
//! of the code uses.
//!
//! The file format (`raw::*`) stays in this module; nothing past [`Config::load`]
//! sees a raw string for a duration, URL or secret. Validation reports every
//! problem at once, each naming the key and the fix, so one run of
//! `wxsidecar check` shows every mistake. Secrets are held in [`Secret`] and
//! never appear in an error.
//!
//! Its own crate (`wxsidecar-config`): every key is declared once in
//! [`keys`]; it may not know the request path, upstreams, pingora or the
//! runtime. The product re-exports it as `wxsidecar::config`.
#![forbid(unsafe_code)]

mod accounts;
use accounts::parse_accounts;
pub mod clients;
pub mod forward_proxy;
pub mod intercept;
pub mod keys;
pub mod platform;
pub mod print;
pub mod sources;
mod upstream;
use upstream::parse_upstream;
pub use upstream::{UpstreamConfig, UpstreamUrl};

pub use clients::{ClientToken, ClientsConfig, Limit};
use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use wxsidecar_core::secret::Secret;

/// Where apps connect: loopback, the sidecar case.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Admin endpoints stay on loopback unless asked otherwise.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9901";
/// WeChat's own host for Official Accounts and mini programs.
pub const DEFAULT_UPSTREAM_URL: &str = "https://api.weixin.qq.com";
/// A healthy TCP+TLS connect to WeChat takes well under a second.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// WeChat answers in milliseconds; 15 s covers media uploads on slow links.
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(15);
/// Enough warm connections for a burst of pushes without a handshake.
pub const DEFAULT_WARM_CONNECTIONS: usize = 4;
/// Offer HTTP/2: in `make bench` it held one connection instead of dozens,
/// with lower p99 and CPU per request over TLS (BENCHMARKS.md, A and B).
pub const DEFAULT_HTTP2: bool = true;
/// Below the ~60 s after which servers and NATs drop idle connections.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(50);
/// Connect failures in a row before a host is taken out of use: one is a
/// blip, three is an outage.
pub const DEFAULT_FAILOVER_AFTER: u32 = 3;
/// How often a host that is out of use is probed.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// WeCom's server API host.
pub const DEFAULT_WECOM_UPSTREAM_URL: &str = "https://qyapi.weixin.qq.com";
/// Five minutes is also when WeChat rotates a stable token.
pub const DEFAULT_REFRESH_BEFORE: Duration = Duration::from_secs(300);
/// Token fetches per account per day: far under WeChat's 2,000 (classic) so a
/// bug or a storm can never spend the account's real quota.
pub const DEFAULT_DAILY_BUDGET: u32 = 200;
/// A hard failure (wrong secret, IP not whitelisted) needs a human; retrying
/// once a minute notices the fix without hammering WeChat.
pub const DEFAULT_FAILED_RETRY: Duration = Duration::from_secs(60);
/// Redis keys start with this, so several deployments can share a Redis.
pub const DEFAULT_STORE_PREFIX: &str = "wxsidecar";
/// A refresh lock outlives a fetch (connect + read timeout) by this much.
const DEFAULT_LOCK_SLACK: Duration = Duration::from_secs(2);
/// JSON API bodies are small; 1 MiB leaves room for big template batches.
pub const DEFAULT_BUFFERED_BODY: usize = 1 << 20;
/// Every request body and upstream answer buffered at once: 256 bodies at
/// the default limit, so thousands of connections cannot take gigabytes.
pub const DEFAULT_BUFFERED_TOTAL: usize = 256 << 20;
/// One worker thread: a sidecar shares its pod's CPU with the app.
pub const DEFAULT_THREADS: usize = 1;
/// Kubernetes gives 30 s; we stop well within it (and sooner when idle).
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// App connections held at once: far above what one pod's apps open, far
/// below the file descriptors and memory the sidecar may use.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Admin connections: probes and a scraper need a handful.
pub const DEFAULT_MAX_ADMIN_CONNECTIONS: usize = 64;
/// A request's head arrives in one or two packets; 10 s is generous even
/// for a slow link, and short enough to end slowloris.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A kept-alive app connection idle this long is closed (apps' pools
/// usually idle out sooner; the same 60 s pingora uses).
pub const DEFAULT_CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// An answer write the app takes none of for this long ends the connection
/// (nginx's `send_timeout`): a client that stops reading holds no slot,
/// buffer or upstream answer for good.
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// A whole request body: 20 MB media at about 1 Mbit/s.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(180);
/// A whole upstream answer: 20 MB media downloads at about 1 Mbit/s.
pub const DEFAULT_ANSWER_TIMEOUT: Duration = Duration::from_secs(180);
/// One forced refresh per account and kind this often: WeChat's own
/// spacing for `force_refresh`.
pub const DEFAULT_ADMIN_REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// Share of `token.daily_budget` kept for automatic refreshes, in percent.
pub const DEFAULT_BUDGET_RESERVE_PERCENT: u32 = 20;
/// Admin bearer tokens shorter than this are guessable.
pub const MIN_ADMIN_TOKEN_LEN: usize = 16;

/// How an account gets its token from WeChat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenApi {
    /// `POST /cgi-bin/stable_token`: the same token for every caller; WeChat's advice.
    Stable,
    /// `GET /cgi-bin/token`: every fetch invalidates the previous token.
    Classic,
}

impl TokenApi {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenApi::Stable => "stable",
            TokenApi::Classic => "classic",
        }
    }
}

/// Which tokens presented by an app the sidecar replaces with its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReplaceTokens {
    /// Only tokens this sidecar handed out (current or earlier).
    Issued,
    /// Any token: the app's token is a placeholder.
    Always,
}

/// What an account is: decides its credentials, its token API and (through
/// [`AccountKind::family`]) which hosts serve it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccountKind {
    /// Official Account or mini program: `api.weixin.qq.com`, appid + appsecret.
    Official,
    /// WeCom app: `qyapi.weixin.qq.com`, corpid + the app's secret.
    WeCom,
}

impl AccountKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AccountKind::Official => "official",
            AccountKind::WeCom => "wecom",
        }
    }

    /// The upstream family that serves accounts of this kind.
    pub fn family(self) -> Family {
        match self {
            AccountKind::Official => Family::Official,
            AccountKind::WeCom => Family::WeCom,
        }
    }
}

/// An upstream family: the hosts of one of WeChat's APIs (`upstream`, and
/// `wecom_upstream`), each with its failover group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `api.weixin.qq.com` and its failover hosts.
    Official,
    /// `qyapi.weixin.qq.com`.
    WeCom,
}

#[derive(Debug, Clone)]
pub struct AccountConfig {
    pub name: String,
    pub kind: AccountKind,
    /// The appid, or the corpid of a WeCom account.
    pub appid: String,
    /// A WeCom app's agentid: a label, and part of what makes the account unique.
    pub agentid: Option<String>,
    pub secret: Secret,
    pub token_api: TokenApi,
    pub default: bool,
    pub replace_tokens: ReplaceTokens,
    /// Local daily caps per API path (`accounts[].limits`), normalised paths.
    pub limits: Vec<(String, u64)>,
    /// The platform an authorised account belongs to (never from the
    /// file's `accounts:`; see `platforms:`).
    pub platform: Option<String>,
}

impl AccountConfig {
    /// An account that authorised `platform`: known by its appid, its
    /// token from the platform (no secret of its own).
    pub fn authorizer(platform: &str, appid: &str) -> Self {
        AccountConfig {
            name: appid.to_string(),
            kind: AccountKind::Official,
            appid: appid.to_string(),
            agentid: None,
            secret: Secret::new(""),
            token_api: TokenApi::Stable,
            default: false,
            replace_tokens: ReplaceTokens::Issued,
            limits: Vec::new(),
            platform: Some(platform.to_string()),
        }
    }
}

pub use wxsidecar_lease::OnStoreError;

#[derive(Debug, Clone, Serialize)]
pub struct TokenConfig {
    #[serde(serialize_with = "print::duration")]
    pub refresh_before: Duration,
    pub daily_budget: u32,
    #[serde(serialize_with = "print::duration")]
    pub failed_retry: Duration,
    /// Fetches of the day that forced refreshes (`POST /refresh`) never
    /// spend: they stay for automatic refreshes.
    pub budget_reserve: u32,
    /// `None`: memory. Otherwise a Redis URL (may hold a password, hence `Secret`).
    #[serde(serialize_with = "print::store_url")]
    pub store: Option<Secret>,
    pub store_prefix: String,
    /// `None`: by token API (classic waits, the rest fetch).
    pub on_store_error: Option<OnStoreError>,
    /// How long a refresh lock lives: longer than any fetch.
    #[serde(serialize_with = "print::duration")]
    pub store_lock_ttl: Duration,
}

/// The validated configuration; serialised (secrets as `***`), it is the
/// file `check --print` shows, with every default filled in.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// Where a new process (`run --upgrade`) receives the listening sockets.
    pub upgrade_sock: PathBuf,
    /// Written by `run --daemon`.
    pub pid_file: PathBuf,
    pub threads: usize,
    #[serde(serialize_with = "print::duration")]
    pub shutdown_grace: Duration,
    pub limits: LimitsConfig,
    pub admin: AdminConfig,
    pub upstream: UpstreamConfig,
    /// Where `kind: wecom` accounts' requests and token fetches go.
    pub wecom_upstream: UpstreamConfig,
    /// Moved into `App::accounts` when the app is built.
    pub accounts: Vec<AccountConfig>,
    pub token: TokenConfig,
    pub clients: ClientsConfig,
    /// Transparent mode (`intercept`), when configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intercept: Option<crate::intercept::InterceptConfig>,
    pub reload: ReloadConfig,
    /// Third-party platforms (`platforms:`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<platform::PlatformConfig>,
}

/// Reload without restart (`reload.*`).
#[derive(Debug, Clone, Serialize)]
pub struct ReloadConfig {
    /// Re-read the config when it or a file it names changes.
    pub watch: bool,
    /// How often the watched files are read.
    #[serde(serialize_with = "print::duration")]
    pub interval: Duration,
}

/// Files are small; a read every 2 s costs nothing and sees a Kubernetes
/// Secret's symlink swap within 2 s of the kubelet making it.
pub const DEFAULT_RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// Bounds on what apps and admin callers may hold (`limits.*`).
#[derive(Debug, Clone, Serialize)]
pub struct LimitsConfig {
    /// JSON request and answer bodies are read whole up to this many bytes.
    pub buffered_body: usize,
    /// Request bodies and upstream answers being buffered, all together, at most.
    pub buffered_total: usize,
    pub max_connections: usize,
    pub max_admin_connections: usize,
    #[serde(serialize_with = "print::duration")]
    pub header_timeout: Duration,
    #[serde(serialize_with = "print::duration")]
    pub idle_timeout: Duration,
    #[serde(serialize_with = "print::duration")]
    pub body_timeout: Duration,
    #[serde(serialize_with = "print::duration")]
    pub send_timeout: Duration,
}

/// The admin listener's protection (`admin.*`).
#[derive(Debug, Clone, Serialize)]
pub struct AdminConfig {
    /// Bearer token for `/status`, `POST /refresh`, `/debug/pprof/*` (and
    /// `/metrics` with `protect_metrics`).
    pub token: Option<Secret>,
    pub protect_metrics: bool,
    /// At most one forced refresh per account and kind this often.
    #[serde(serialize_with = "print::duration")]
    pub refresh_interval: Duration,
}

impl Config {
    /// The account used when a request names none.
    pub fn default_account(&self) -> Option<usize> {
        self.accounts.iter().position(|a| a.default)
    }
}

/// Every problem found in a configuration file, one per line.
#[derive(Debug)]
pub struct ConfigErrors {
    pub file: String,
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "configuration {} has {} problem(s):",
            self.file,
            self.problems.len()
        )?;
        for p in &self.problems {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The file format. Unknown keys are errors, so a typo never silently
/// leaves a default in place.
mod raw;

/// Parses `300s`, `2m`, `1h`, `500ms` (a number and a unit, nothing else).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .ok_or_else(|| format!("`{t}` has no unit; write e.g. `{t}s` (units: ms, s, m, h)"))?;
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{t}` is not a number followed by ms, s, m or h"))?;
    let secs = match unit.trim() {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{t}`; use ms, s, m or h"
            ))
        }
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("`{t}` is not a valid duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses `1048576`, `512KiB`, `1MiB`, `20MB`.
pub fn parse_size(text: &str) -> Result<usize, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: usize = num
        .parse()
        .map_err(|_| format!("`{t}` is not a size like 1MiB or 65536"))?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "KB" => 1000,
        "MB" => 1_000_000,
        other => {
            return Err(format!(
                "unknown size unit `{other}`; use B, KiB, MiB, KB or MB"
            ))
        }
    };
    value
        .checked_mul(mult)
        .ok_or_else(|| format!("`{t}` is too large"))
}

/// Expands `${VAR}` from the environment. A missing variable is an error
/// that names the variable, never the value around it.
fn expand_env(key: &str, value: &str, problems: &mut Vec<String>) -> Option<String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            problems.push(format!("{key}: unclosed `${{` (write `${{VAR}}`)"));
            return None;
        };
        let var = &after[..end];
        match sources::var(var) {
            Some(v) => out.push_str(&v),
            None => {
                problems.push(format!(
                    "{key}: environment variable {var} is not set; export it or change the value"
                ));
                return None;
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Some(out)
}

fn duration_field(
    key: &str,
    value: Option<&String>,
    default: Duration,
    problems: &mut Vec<String>,
) -> Duration {
    match value {
        None => default,
        Some(v) => parse_duration(v).unwrap_or_else(|e| {
            problems.push(format!("{key}: {e}"));
            default
        }),
    }
}

fn socket_field(
    key: &str,
    value: Option<&String>,
    default: &str,
    problems: &mut Vec<String>,
) -> SocketAddr {
    let text = value.map(String::as_str).unwrap_or(default);
    text.parse().unwrap_or_else(|_| {
        problems.push(format!(
            "{key}: `{text}` is not an address like 127.0.0.1:8080"
        ));
        default.parse().expect("default address parses")
    })
}

/// The appid's shape: WeChat appids (`wx…`) and WeCom corpids (`ww…`) are short ASCII.
fn valid_appid(appid: &str) -> bool {
    !appid.is_empty()
        && appid.len() <= 64
        && appid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
            file: file.clone(),
            problems: vec![format!("cannot read the file: {e}")],
        })?;
        // The sources in effect ([`sources::with`]): the process's own
        // unless a caller records them.
        Self::check(&text).map_err(|problems| ConfigErrors { file, problems })
    }

    /// [`Self::load`], also naming every file it read (the config file and
    /// each `*_file`): what a reload watches.
    pub fn load_recording(path: &Path) -> (Result<Config, ConfigErrors>, Vec<PathBuf>) {
        let recording = std::sync::Arc::new(sources::Recording::default());
        let result = sources::with(recording.clone(), || Self::load(path));
        let mut files = vec![path.to_path_buf()];
        files.extend(recording.files().into_iter().map(PathBuf::from));
        files.sort_unstable();
        files.dedup();
        (result, files)
    }

    /// Validates configuration text, with `${VAR}` and `*_file` read from
    /// the process; on failure returns every problem found.
    pub fn parse(text: &str) -> Result<Config, Vec<String>> {
        Self::parse_with(text, std::sync::Arc::new(sources::System))
    }

    /// Validates configuration text with variables and files from `sources`.
    pub fn parse_with(
        text: &str,
        sources: std::sync::Arc<dyn sources::Sources>,
    ) -> Result<Config, Vec<String>> {
        sources::with(sources, || Self::check(text))
    }

    fn check(text: &str) -> Result<Config, Vec<String>> {
        let raw: raw::File = if text.trim().is_empty() {
            raw::File::default()
        } else {
            serde_yaml_ng::from_str(text).map_err(|e| vec![yaml_problem(&e)])?
        };
        let mut problems = Vec::new();

        let listen = socket_field("listen", raw.listen.as_ref(), DEFAULT_LISTEN, &mut problems);
        let admin_listen = socket_field(
            "admin_listen",
            raw.admin_listen.as_ref(),
            DEFAULT_ADMIN_LISTEN,
            &mut problems,
        );
        if listen == admin_listen {
            problems.push(format!(
                "admin_listen: {admin_listen} is also `listen`; give the admin listener its own port"
            ));
        }
        let threads = raw.threads.unwrap_or(DEFAULT_THREADS);
        let shutdown_grace = duration_field(
            "shutdown_grace",
            raw.shutdown_grace.as_ref(),
            DEFAULT_SHUTDOWN_GRACE,
            &mut problems,
        );
        let limits = raw.limits.unwrap_or_default();
        let buffered_body = match limits.buffered_body.as_deref() {
            None => DEFAULT_BUFFERED_BODY,
            Some(v) => parse_size(v).unwrap_or_else(|e| {
                problems.push(format!("limits.buffered_body: {e}"));
                DEFAULT_BUFFERED_BODY
            }),
        };
        let buffered_total = match limits.buffered_total.as_deref() {
            None => DEFAULT_BUFFERED_TOTAL.max(buffered_body),
            Some(v) => match parse_size(v) {
                Ok(n) if n < buffered_body => {
                    problems.push(format!(
                        "limits.buffered_total: {v} is less than limits.buffered_body ({buffered_body} bytes): no body that size could ever be buffered"
                    ));
                    buffered_body
                }
                Ok(n) => n,
                Err(e) => {
                    problems.push(format!("limits.buffered_total: {e}"));
                    DEFAULT_BUFFERED_TOTAL
                }
            },
        };
        let limits = LimitsConfig {
            buffered_body,
            buffered_total,
            max_connections: limits.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS),
            max_admin_connections: limits
                .max_admin_connections
                .unwrap_or(DEFAULT_MAX_ADMIN_CONNECTIONS),
            header_timeout: duration_field(
                "limits.header_timeout",
                limits.header_timeout.as_ref(),
                DEFAULT_HEADER_TIMEOUT,
                &mut problems,
            ),
            idle_timeout: duration_field(
                "limits.idle_timeout",
                limits.idle_timeout.as_ref(),
                DEFAULT_CLIENT_IDLE_TIMEOUT,
                &mut problems,
            ),
            body_timeout: duration_field(
                "limits.body_timeout",
                limits.body_timeout.as_ref(),
                DEFAULT_BODY_TIMEOUT,
                &mut problems,
            ),
            send_timeout: duration_field(
                "limits.send_timeout",
                limits.send_timeout.as_ref(),
                DEFAULT_SEND_TIMEOUT,
                &mut problems,
            ),
        };
        let admin = parse_admin(raw.admin.unwrap_or_default(), admin_listen, &mut problems);

        let mut upstream = parse_upstream(
            "upstream",
            raw.upstream.unwrap_or_default(),
            DEFAULT_UPSTREAM_URL,
            &mut problems,
        );
        let mut wecom_upstream = parse_upstream(
            "wecom_upstream",
            raw.wecom_upstream.unwrap_or_default(),
            DEFAULT_WECOM_UPSTREAM_URL,
            &mut problems,
        );
        let intercept = raw
            .intercept
            .and_then(|i| crate::intercept::parse(i, &mut problems));
        if let Some(i) = &intercept {
            // /etc/hosts sends the WeChat hosts to us: resolve them from DNS.
            upstream.hosts_file = false;
            wecom_upstream.hosts_file = false;
            for (key, addr) in i.listeners() {
                for (other, taken) in [("listen", listen), ("admin_listen", admin_listen)] {
                    if addr == taken {
                        problems.push(format!(
                            "{key}: {addr} is also `{other}`; give it its own port"
                        ));
                    }
                }
            }
        }

        // A platform alone is a whole configuration: its authorisers are
        // the accounts.
        let has_platforms = raw.platforms.as_ref().is_some_and(|p| !p.is_empty());
        let accounts = parse_accounts(
            raw.accounts.unwrap_or_default(),
            has_platforms,
            &mut problems,
        );

        let tok = raw.token.unwrap_or_default();
        let token = TokenConfig {
            refresh_before: duration_field(
                "token.refresh_before",
                tok.refresh_before.as_ref(),
                DEFAULT_REFRESH_BEFORE,
                &mut problems,
            ),
            daily_budget: tok.daily_budget.unwrap_or(DEFAULT_DAILY_BUDGET),
            budget_reserve: 0,
            store: None,
            store_prefix: String::new(),
            on_store_error: None,
            store_lock_ttl: Duration::ZERO,
            failed_retry: duration_field(
                "token.failed_retry",
                tok.failed_retry.as_ref(),
                DEFAULT_FAILED_RETRY,
                &mut problems,
            ),
        };
        let token = TokenConfig {
            store: match tok
                .store
                .as_deref()
                .map(|v| expand_env("token.store", v, &mut problems))
            {
                None | Some(None) => None,
                Some(Some(v)) if v == "memory" => None,
                Some(Some(v)) if v.starts_with("redis://") || v.starts_with("rediss://") => {
                    // The same check `run` makes, so `check` passes only what starts.
                    match redis::Client::open(v.as_str())
                        .map_err(|e| e.to_string())
                        .and_then(|_| url::Url::parse(&v).map(|_| ()).map_err(|e| e.to_string()))
                    {
                        Ok(()) => Some(Secret::new(v)),
                        Err(e) => {
                            problems.push(format!(
                                "token.store: `{}` is not a valid Redis URL ({}); write redis://[:password@]host:port/db",
                                wxsidecar_core::secret::mask_url(&v),
                                wxsidecar_core::secret::mask_in(&e, &v)
                            ));
                            None
                        }
                    }
                }
                Some(Some(v)) => {
                    problems.push(format!(
                        "token.store: `{}` is not memory or a redis:// / rediss:// URL",
                        wxsidecar_core::secret::mask_url(&v)
                    ));
                    None
                }
            },
            store_prefix: tok
                .store_prefix
                .unwrap_or_else(|| DEFAULT_STORE_PREFIX.into()),
            on_store_error: match tok.on_store_error.as_deref() {
                None => None,
                Some("wait") => Some(OnStoreError::Wait),
                Some("fetch") => Some(OnStoreError::Fetch),
                Some(_) => {
                    problems.push(
                        "token.on_store_error: must be wait or fetch (the value given is not shown)"
                            .into(),
                    );
                    None
                }
            },
            store_lock_ttl: duration_field(
                "token.store_lock_ttl",
                tok.store_lock_ttl.as_ref(),
                upstream.connect_timeout + upstream.read_timeout + DEFAULT_LOCK_SLACK,
                &mut problems,
            ),
            ..token
        };
        if token.store_prefix.is_empty() || token.store_prefix.contains(char::is_whitespace) {
            problems.push("token.store_prefix: must be non-empty, without spaces".into());
        }
        let platforms = platform::parse(raw.platforms.unwrap_or_default(), &mut problems);
        let clients = clients::parse(
            raw.clients.unwrap_or_default(),
            &accounts,
            &platforms,
            &mut problems,
        );
        // Every listener that injects tokens (`listen`, and transparent
        // mode's) needs a credential off loopback.
        if !clients.restricts() {
            let i = intercept.as_ref();
            for (key, addr) in [
                ("listen", Some(listen)),
                ("intercept.https_listen", i.and_then(|i| i.https_listen)),
                ("intercept.http_listen", i.and_then(|i| i.http_listen)),
                ("intercept.proxy_listen", i.and_then(|i| i.proxy_listen)),
            ] {
                if let Some(a) = addr.filter(|a| !a.ip().is_loopback()) {
                    problems.push(format!(
                        "clients: {key} {a} is not on loopback, so say who may call: set clients.allow (CIDRs) and/or clients.tokens (bearer tokens)"
                    ));
                }
            }
        }
        let token = TokenConfig {
            budget_reserve: match tok.budget_reserve {
                Some(r) if r >= token.daily_budget => {
                    problems.push(format!(
                        "token.budget_reserve: {r} leaves nothing of token.daily_budget ({}) for forced refreshes; make it smaller",
                        token.daily_budget
                    ));
                    0
                }
                Some(r) => r,
                None => token.daily_budget * DEFAULT_BUDGET_RESERVE_PERCENT / 100,
            },
            ..token
        };

        let raw_reload = raw.reload.unwrap_or_default();
        let reload = ReloadConfig {
            watch: raw_reload.watch.unwrap_or(true),
            interval: duration_field(
                "reload.interval",
                raw_reload.interval.as_ref(),
                DEFAULT_RELOAD_INTERVAL,
                &mut problems,
            ),
        };
        let config = Config {
            listen,
            admin_listen,
            upgrade_sock: raw.upgrade_sock.map(PathBuf::from).unwrap_or_else(|| {
                PathBuf::from(format!("/tmp/wxsidecar-{}.upgrade.sock", listen.port()))
            }),
            pid_file: raw
                .pid_file
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(format!("/tmp/wxsidecar-{}.pid", listen.port()))),
            threads,
            shutdown_grace,
            limits,
            admin,
            upstream,
            wecom_upstream,
            accounts,
            token,
            clients,
            intercept,
            reload,
            platforms,
        };
        // Every bound the key table declares (config::keys), checked once.
        keys::check_bounds(&config, &mut problems);
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(problems)
        }
    }
}

/// `text` with every double-quoted part replaced by `"…"`.
fn without_quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut inside = false;
    for c in text.chars() {
        match (c, inside) {
            ('"', false) => {
                out.push_str("\"…");
                inside = true;
            }
            ('"', true) => {
                out.push('"');
                inside = false;
            }
            (_, true) => {}
            (c, false) => out.push(c),
        }
    }
    out
}

/// A secret kept in a file (`*_file` keys), trimmed; a file that cannot be
/// read is a problem naming `key`, the path and `context`.
fn secret_file(key: &str, path: &str, context: &str, problems: &mut Vec<String>) -> Option<String> {
    sources::file(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| problems.push(format!("{key}: cannot read {path}: {e}{context}")))
        .ok()
}

/// Parses `admin`: the admin listener's bearer token and refresh spacing.
/// A non-loopback `admin_listen` without a token is refused: `/status` and
/// `POST /refresh` must not be open to the pod network.
fn parse_admin(
    raw: raw::Admin,
    admin_listen: SocketAddr,
    problems: &mut Vec<String>,
) -> AdminConfig {
    let token = match (raw.token, raw.token_file) {
        (Some(_), Some(_)) => {
            problems.push("admin: give token or token_file, not both".into());
            None
        }
        (Some(t), None) => expand_env("admin.token", &t, problems),
        (None, Some(f)) => expand_env("admin.token_file", &f, problems)
            .and_then(|f| secret_file("admin.token_file", &f, "", problems)),
        (None, None) => None,
    }
    .map(Secret::new);
    if let Some(t) = &token {
        if t.expose().len() < MIN_ADMIN_TOKEN_LEN {
            problems.push(format!(
                "admin.token: must be at least {MIN_ADMIN_TOKEN_LEN} characters (e.g. `openssl rand -hex 24`)"
            ));
        }
    }
    if token.is_none() && !admin_listen.ip().is_loopback() {
        problems.push(format!(
            "admin.token: admin_listen {admin_listen} is not on loopback, so /status and POST /refresh need a bearer token; set admin.token or admin.token_file (at least {MIN_ADMIN_TOKEN_LEN} characters), or listen on 127.0.0.1"
        ));
    }
    let refresh_interval = duration_field(
        "admin.refresh_interval",
        raw.refresh_interval.as_ref(),
        DEFAULT_ADMIN_REFRESH_INTERVAL,
        problems,
    );
    AdminConfig {
        token,
        protect_metrics: raw.protect_metrics.unwrap_or(false),
        refresh_interval,
    }
}

/// Turns a YAML error into one line that names the key (serde_yaml_ng puts
/// the path first, e.g. `accounts[0]: unknown field ...`).
fn yaml_problem(e: &serde_yaml_ng::Error) -> String {
    // serde quotes the offending value (`invalid type: string "…"`): a
    // secret typed under the wrong key would be printed. Keys (in
    // backticks) stay; quoted values go.
    let msg = without_quoted(&e.to_string());
    let fix = if msg.contains("unknown field") {
        " (remove it or fix its spelling; see conf/wxsidecar.yaml)"
    } else {
        ""
    };
    format!("{msg}{fix}")
}

/// The config path: `--config`, else `WXSIDECAR_CONFIG`, else the default.
pub const DEFAULT_CONFIG_PATH: &str = "conf/wxsidecar.yaml";

#[cfg(test)]
mod tests;
