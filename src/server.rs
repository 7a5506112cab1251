//! Wiring: builds the pingora server with the app listener, the admin
//! listener and the background work, and runs it until a signal.
//!
//! Start order: the admin listener opens at once (so `/healthz` answers and
//! `/readyz` explains the wait); the app service first resolves the upstream,
//! starts one refresher per account and waits for each account's first fetch,
//! warms the pool, and only then opens the app listener. All of this runs in
//! the app service's own runtime, so the pooled upstream sockets live on the
//! same reactor as the requests that use them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::http_app::HttpServer;
use pingora::proxy::HttpProxy;
use pingora::server::configuration::ServerConf;
use pingora::server::{ListenFds, RunArgs, Server, ShutdownWatch};
use pingora::services::listening::Service as ListeningService;
use pingora::services::Service;

use crate::admin::Admin;
use crate::app::App;
use crate::config::{AccountKind, Config};
use crate::failover::Upstreams;
use crate::lease::refresher::refresh_delay;
use crate::lease::store::{Record, RedisStore};
use crate::lifecycle::Signals;
use crate::proxy::Proxy;
use crate::refresh::{self as refresher, Subject};
use crate::upstream;

/// Slack on top of connect + read timeouts for the first token fetch.
const DEFAULT_BOOT_SLACK: Duration = Duration::from_secs(3);

/// Everything `run` needs, built before any listener opens, so every error
/// is reported while the process can still exit non-zero.
pub struct Prepared {
    app: Arc<App>,
    mode: RunMode,
}

/// Validates what the config alone cannot: the CA bundle and free ports.
/// How the process was started.
#[derive(Debug, Default, Clone)]
pub struct RunMode {
    /// Take the listening sockets over from a running process (`run --upgrade`).
    pub upgrade: bool,
    /// Detach and write `pid_file` (`run --daemon`).
    pub daemon: bool,
    /// The config file, re-read on a reload (none: no reloads).
    pub config_path: Option<std::path::PathBuf>,
    /// The files the config was read from (watched for changes).
    pub watched: Vec<std::path::PathBuf>,
}

/// What the offline checks build: `run` keeps it, `check` drops it.
pub struct Offline {
    store: Option<Arc<RedisStore>>,
    intercept: Option<crate::intercept::Intercept>,
}

/// Every check `run` makes that needs no network and no port, by building
/// what they check: `check` calls this too, so whatever `check` accepts,
/// `run` starts with.
pub fn offline_checks(config: &Config) -> Result<Offline, String> {
    let store = match &config.token.store {
        Some(url) => Some(RedisStore::new(url.expose(), &config.token.store_prefix)?),
        None => None,
    };
    let intercept = match &config.intercept {
        None => None,
        Some(i) => Some(crate::intercept::Intercept {
            resolver: crate::intercept::tls::LeafResolver::new(i)
                .map_err(|e| format!("intercept: {e}"))?,
        }),
    };
    Ok(Offline { store, intercept })
}

pub fn prepare(config: Config, mode: RunMode) -> Result<Prepared, String> {
    crate::metrics::init();
    let Offline { store, intercept } = offline_checks(&config)?;
    let wecom_in_use = config.accounts.iter().any(|a| a.kind == AccountKind::WeCom);
    let ca_bundle = upstream::ca_bundle_for(&config, wecom_in_use)?;
    crate::intercept::loopcheck::check(&config, wecom_in_use)?;
    // An upgrade takes the ports over from the running process.
    if !mode.upgrade {
        let intercept_listeners = config.intercept.iter().flat_map(|i| i.listeners());
        for (key, addr) in [
            ("listen", config.listen),
            ("admin_listen", config.admin_listen),
        ]
        .into_iter()
        .chain(intercept_listeners)
        {
            std::net::TcpListener::bind(addr)
                .map_err(|e| format!("{key}: cannot listen on {addr}: {e}"))?;
        }
    }
    let up = Upstreams::new(&config.upstream, ca_bundle.as_deref());
    let wecom = wecom_in_use.then(|| Upstreams::new(&config.wecom_upstream, ca_bundle.as_deref()));
    let platforms = config
        .platforms
        .iter()
        .map(|p| {
            crate::platform::Platform::new(p, store.clone(), &config.upstream, ca_bundle.as_deref())
                .map(Arc::new)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Prepared {
        app: App::new(config, up, wecom, store, intercept, platforms),
        mode,
    })
}

impl Prepared {
    /// The wired app, for `demo` to wait on before it prints its hints.
    #[cfg(feature = "fake")]
    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// Runs until SIGTERM (graceful) or SIGINT (fast).
    pub fn run(self) {
        let config = &self.app.config_full();
        let grace = config.shutdown_grace.as_secs().max(1);
        let conf = ServerConf {
            threads: config.threads,
            // pingora waits this long, then gives the runtimes 1 s: together
            // no more than shutdown_grace (sooner when idle, see lifecycle).
            grace_period_seconds: Some(grace.saturating_sub(1)),
            graceful_shutdown_timeout_seconds: Some(1),
            upgrade_sock: config.upgrade_sock.display().to_string(),
            pid_file: config.pid_file.display().to_string(),
            daemon: self.mode.daemon,
            // One thread has nobody to steal from: pingora then gives each
            // service a current-thread runtime, which schedules a request's
            // wake-ups for less (−5–8 % CPU per request measured,
            // benches/proxy_bench.sh). More threads keep stealing, so a few
            // busy kept-alive connections still spread over them.
            work_stealing: config.threads > 1,
            ..ServerConf::default()
        };
        let opt = pingora::server::configuration::Opt {
            upgrade: self.mode.upgrade,
            daemon: self.mode.daemon,
            ..Default::default()
        };
        let mut server = Server::new_with_opt_and_conf(opt, conf);
        server.bootstrap();

        let nofile = crate::guard::raise_nofile_limit();
        let app_limits = crate::guard::ConnLimits {
            max: crate::guard::fit_to_fd_limit(
                config.limits.max_connections,
                config.limits.max_admin_connections,
                nofile,
            ),
            header_timeout: config.limits.header_timeout,
            idle_timeout: config.limits.idle_timeout,
            send_timeout: config.limits.send_timeout,
        };
        let mut guarded = crate::guard::Guarded::with_fast(
            pingora::proxy::http_proxy(&server.configuration, Proxy::new(self.app.clone())),
            app_limits,
            "app",
            crate::proxy::fast::FastLane::new(self.app.clone(), config.limits.send_timeout),
        );
        if let Some(front) = self.https_front() {
            guarded = guarded.with_tls(front);
        }
        let mut proxy = ListeningService::new("wxsidecar app listener".to_string(), guarded);
        proxy.add_listener(plain_listener(config.listen));
        let forward = self.add_intercept_listeners(&mut proxy, &server.configuration, app_limits);
        let app_service = Gated {
            inner: proxy,
            app: self.app.clone(),
            config_path: self.mode.config_path.clone(),
            watched: self.mode.watched.clone(),
        };

        let mut admin = ListeningService::new(
            "wxsidecar admin listener".to_string(),
            crate::guard::Guarded::new(
                HttpServer::new_app(Admin::new(self.app.clone())),
                crate::guard::ConnLimits {
                    max: config.limits.max_admin_connections,
                    ..app_limits
                },
                "admin",
            ),
        );
        admin.threads = Some(1);
        admin.add_listener(plain_listener(config.admin_listen));

        server.add_service(admin);
        server.add_service(app_service);
        if let Some(f) = forward {
            server.add_service(Draining {
                inner: f,
                app: self.app.clone(),
            });
        }
        if let Some(i) = &config.intercept {
            tracing::info!(
                https = ?i.https_listen,
                http = ?i.http_listen,
                proxy = ?i.proxy_listen,
                hosts = ?i.hosts,
                ca = %i.ca_source,
                "transparent mode: intercepting the WeChat hosts"
            );
        }
        tracing::info!(
            listen = %config.listen,
            admin = %config.admin_listen,
            upstream = %config.upstream.url,
            accounts = config.accounts.len(),
            "wxsidecar starting"
        );
        server.run(RunArgs {
            shutdown_signal: Box::new(Signals {
                drain: self.app.drain.clone(),
                grace: config.shutdown_grace,
            }),
        });
        tracing::info!("wxsidecar stopped");
    }
}

impl Prepared {
    /// TLS for `intercept.https_listen`, ended by the app listener's guard
    /// under its cap and `limits.header_timeout`.
    fn https_front(&self) -> Option<crate::guard::tls::TlsFront> {
        let config = self.app.config_full();
        let (i, ic) = (self.app.intercept.as_ref()?, config.intercept.as_ref()?);
        let addr = ic.https_listen?;
        Some(crate::guard::tls::TlsFront::new(
            addr,
            intercept_tls(&i.resolver).build(),
        ))
    }

    /// Transparent mode: the HTTPS and HTTP listeners join the app service
    /// (same request path); the forward proxy is a service of its own that
    /// hands what it accepts to the same path. Returns the forward proxy.
    fn add_intercept_listeners(
        &self,
        proxy: &mut ListeningService<
            crate::guard::Guarded<HttpProxy<Proxy>, crate::proxy::fast::FastLane>,
        >,
        conf: &Arc<ServerConf>,
        limits: crate::guard::ConnLimits,
    ) -> Option<ListeningService<crate::guard::Capped<crate::forward::ForwardProxy>>> {
        let config = self.app.config_full();
        let (i, ic) = (self.app.intercept.as_ref()?, config.intercept.as_ref()?);
        // HTTPS arrives as plain TCP: the app listener's guard ends TLS
        // (see `https_front`).
        if let Some(addr) = ic.https_listen {
            proxy.add_listener(plain_listener(addr));
        }
        if let Some(addr) = ic.http_listen {
            proxy.add_listener(plain_listener(addr));
        }
        let addr = ic.proxy_listen?;
        let forward = crate::forward::ForwardProxy {
            app: self.app.clone(),
            http: Arc::new(crate::guard::Guarded::uncapped(
                pingora::proxy::http_proxy(conf, Proxy::new(self.app.clone())),
                limits,
            )),
            resolver: i.resolver.clone(),
            tls: intercept_tls(&i.resolver).build(),
            head_timeout: limits.header_timeout,
        };
        // The forward proxy reads the raw socket (CONNECT, then TLS) and
        // bounds the proxy head and the handshake itself; the requests inside
        // go through the same request path under the same deadlines.
        let guarded = crate::guard::Capped::new(
            forward,
            self.app.config().limits.max_connections,
            "forward_proxy",
        );
        let mut service = ListeningService::new("wxsidecar forward proxy".to_string(), guarded);
        service.threads = Some(1);
        service.add_tcp(&addr.to_string());
        Some(service)
    }
}

/// TLS for the intercepted hosts: the local leaf by SNI, HTTP/1.1 only.
fn intercept_tls(
    resolver: &Arc<crate::intercept::tls::LeafResolver>,
) -> pingora::listeners::tls::TlsSettings {
    let mut t =
        pingora::listeners::tls::TlsSettings::intermediate("", "").expect("settings without files");
    t.set_cert_resolver(resolver.clone());
    t.set_alpn(pingora::protocols::ALPN::H1);
    t
}

/// The read buffer pingora puts under each accepted connection: its 64 KiB
/// default is most of an idle connection's memory, and its HTTP parser
/// reads into a buffer of its own anyway. Requests are small; media bodies
/// stream through in whatever chunks the socket gives.
const DEFAULT_L4_READ_BUFFER: usize = 0;

/// A plain TCP listener with [`DEFAULT_L4_READ_BUFFER`].
fn plain_listener(addr: std::net::SocketAddr) -> pingora::listeners::ListenerConfig {
    pingora::listeners::ListenerConfig::tcp(addr.to_string())
        .l4_buffer(pingora::listeners::L4BufferSettings::default().read(DEFAULT_L4_READ_BUFFER))
}

/// How often the shared store's health is checked.
const DEFAULT_STORE_HEALTH_INTERVAL: Duration = Duration::from_secs(1);

/// Pings the store; when it comes back (e.g. a Redis restart that lost its
/// data), puts this replica's valid tokens and tickets back unless another
/// replica did.
/// Shares every account's call counts through the store, every
/// `DEFAULT_FLUSH_EVERY`; a failed flush keeps its counts for the next.
async fn share_ledgers(app: Arc<App>, store: Arc<RedisStore>) {
    use crate::quota::ledger;
    loop {
        tokio::time::sleep(ledger::DEFAULT_FLUSH_EVERY).await;
        let accounts = app.accounts_full();
        let ledgers = accounts
            .iter()
            .map(|a| (crate::refresh::token_store_id(a).1, &a.ledger));
        if let Err(e) = ledger::flush(&store, ledgers).await {
            tracing::debug!(error = %e, "quota ledger not shared this time; kept for the next flush");
        }
    }
}

async fn watch_store(app: Arc<App>, store: Arc<RedisStore>) {
    loop {
        tokio::time::sleep(DEFAULT_STORE_HEALTH_INTERVAL).await;
        let was_healthy = store.is_healthy();
        if store.ping().await.is_err() || was_healthy {
            continue;
        }
        let accounts = app.accounts_full();
        for account in accounts.iter() {
            for (subject, cell) in Subject::in_use(account) {
                let (api, id) = subject.store_id(account);
                restore(&app, &store, &account.name, api, &id, cell).await;
            }
        }
    }
}

/// Puts one valid token or ticket back into a store that lost it.
async fn restore(
    app: &App,
    store: &RedisStore,
    account: &str,
    api: &str,
    id: &str,
    cell: &crate::lease::LeaseCell,
) {
    let Some(token) = cell.valid() else {
        return;
    };
    let delay = refresh_delay(
        token.remaining(),
        token.lifetime(),
        app.config().token.refresh_before,
    );
    let record = Record::now(
        token.value.to_string(),
        token.remaining(),
        delay,
        store.replica.clone(),
    );
    if store
        .restore(&store.token_key(api, id), &record)
        .await
        .is_ok()
    {
        tracing::info!(
            account,
            api,
            "token store back; shared value restored if it was lost"
        );
    }
}

/// An app-side service that stops accepting when the drain begins
/// (SIGTERM), before pingora's own shutdown.
struct Draining<S> {
    inner: S,
    app: Arc<App>,
}

#[async_trait]
impl<S: Service> Service for Draining<S> {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
    ) {
        let shutdown = self.app.drain.service_watch(shutdown);
        self.inner
            .start_service(fds, shutdown, listeners_per_fd)
            .await
    }

    fn name(&self) -> &str {
        self.inner.name()
    }

    fn threads(&self) -> Option<usize> {
        self.inner.threads()
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        self.inner.listen_addresses()
    }
}

/// The app listener, opened only after the first tokens are in.
struct Gated<S> {
    inner: S,
    app: Arc<App>,
    /// Re-read on a reload, and the files it was read from.
    config_path: Option<std::path::PathBuf>,
    watched: Vec<std::path::PathBuf>,
}

impl<S> Gated<S> {
    async fn boot(&self) {
        let app = &self.app;
        for family in app.families() {
            family.resolve().await;
        }
        if let Some(drive) = app.refreshers.drive() {
            app.tasks.spawn("lease scheduler", drive);
        }
        crate::refresh::platform::start_platforms(app);
        if !app.platforms.is_empty() {
            app.tasks.spawn(
                "idle authorisers",
                crate::refresh::platform::sweep_idle(app.clone()),
            );
        }
        for account in app.accounts().iter() {
            refresher::start(app, account, Subject::Token);
        }
        let wait = app.config().upstream.connect_timeout
            + app.config().upstream.read_timeout
            + DEFAULT_BOOT_SLACK;
        // Authorised accounts wait for the platform's ticket, which may
        // come through this very listener: the listener does not wait.
        let accounts = app.accounts_full();
        for account in accounts.iter().filter(|a| a.platform.is_none()) {
            if !account.tokens.wait_attempted(wait).await {
                tracing::error!(account = %account.name, "first token fetch still running; opening the listener anyway");
            } else if account.tokens.valid().is_none() {
                tracing::error!(account = %account.name, "no token yet; requests for this account get 503 until a fetch succeeds");
            }
        }
        for family in app.families() {
            family.warm().await;
            family.maintain(&|name, work| app.tasks.spawn(name, work));
        }
        if let Some(store) = &app.store {
            app.tasks
                .spawn("store watcher", watch_store(app.clone(), store.clone()));
            app.tasks
                .spawn("quota ledger", share_ledgers(app.clone(), store.clone()));
        }
        if let Some(i) = &app.intercept {
            app.tasks
                .spawn("leaf re-signing", i.resolver.clone().keep_fresh());
        }
        if let Some(path) = &self.config_path {
            crate::reload::start(app, path.clone(), self.watched.clone());
        }
    }
}

/// How long start-up waits for its listeners to take connections before it
/// says ready anyway (pingora binds them a moment after the service starts).
const DEFAULT_BIND_WAIT: Duration = Duration::from_secs(10);
/// One probe's connect: an address of this host answers at once.
const DEFAULT_PROBE_WAIT: Duration = Duration::from_millis(500);

/// Waits until every address in `addrs` takes a TCP connection (pingora's
/// listeners are bound inside its service start, one after another, and a
/// `/readyz` that said ready before would send traffic to a port not open
/// yet); a wildcard address is tried on loopback. The probe connection is
/// closed at once (the guard sees a connection that says nothing).
async fn until_bound(addrs: Vec<SocketAddr>) {
    let deadline = tokio::time::Instant::now() + DEFAULT_BIND_WAIT;
    for addr in addrs {
        let probe = match addr.ip() {
            std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
                SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), addr.port())
            }
            std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
                SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), addr.port())
            }
            _ => addr,
        };
        let taken = || async {
            let connect = tokio::net::TcpStream::connect(probe);
            matches!(
                tokio::time::timeout(DEFAULT_PROBE_WAIT, connect).await,
                Ok(Ok(_))
            )
        };
        while !taken().await {
            if tokio::time::Instant::now() > deadline {
                tracing::warn!(listen = %addr, "listener not taking connections yet; saying ready anyway");
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[async_trait]
impl<S: Service> Service for Gated<S> {
    async fn start_service(
        &mut self,
        fds: Option<ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
    ) {
        self.boot().await;
        let app = self.app.clone();
        let shutdown = app.drain.service_watch(shutdown);
        let serve = self.inner.start_service(fds, shutdown, listeners_per_fd);
        tokio::pin!(serve);
        // Ready once every listener takes connections, not before.
        let config = app.config_full();
        let mut addrs = vec![config.listen];
        if let Some(i) = &config.intercept {
            addrs.extend(
                [i.https_listen, i.http_listen, i.proxy_listen]
                    .into_iter()
                    .flatten(),
            );
        }
        let bound = until_bound(addrs);
        tokio::select! {
            _ = &mut serve => {}
            _ = bound => {
                app.set_listening();
                tracing::info!(listen = %config.listen, "app listener open");
                serve.await;
            }
        }
        self.app.tasks.shutdown().await;
    }

    fn name(&self) -> &str {
        self.inner.name()
    }

    fn threads(&self) -> Option<usize> {
        self.inner.threads()
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        self.inner.listen_addresses()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::apps::ServerApp;

    /// The most a connection's future may take: an idle kept-alive
    /// connection holds it whole, at the size of its largest state (4.8 KiB
    /// now; 8.5 KiB with the HTTPS handshake inline).
    const MAX_CONNECTION_FUTURE: usize = 6 * 1024;

    /// Whatever a rare step keeps inline (a TLS handshake, a connect, an
    /// HTTP/2 send), every idle connection pays for: a handshake left
    /// inline added 5 KiB to each (17.9 → 22.9 KiB of RSS).
    #[test]
    fn a_connections_future_stays_small() {
        let config = Config::parse(
            "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.2:0\nupstream:\n  url: http://127.0.0.1:9\naccounts:\n  - {name: a, appid: wx0123456789abcdef, secret: s}\n",
        )
        .unwrap();
        let mode = RunMode {
            upgrade: false,
            daemon: false,
            config_path: None,
            watched: Vec::new(),
        };
        let app = prepare(config, mode).unwrap().app;
        let limits = crate::guard::ConnLimits {
            max: 10,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            send_timeout: Duration::from_secs(60),
        };
        let guarded = Arc::new(crate::guard::Guarded::with_fast(
            pingora::proxy::http_proxy(&Arc::new(ServerConf::default()), Proxy::new(app.clone())),
            limits,
            "test",
            crate::proxy::fast::FastLane::new(app, limits.send_timeout),
        ));
        // The app owns runtimes of its own: it is built and dropped outside this one.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let size = rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
                .await
                .unwrap();
            let (server, _) = listener.accept().await.unwrap();
            let stream: pingora::protocols::Stream =
                Box::new(pingora::protocols::l4::stream::Stream::from(server));
            let (_stop, shutdown) = tokio::sync::watch::channel(false);
            let future = ServerApp::process_new(&guarded, stream, &shutdown);
            std::mem::size_of_val(&*future)
        });
        drop(rt);
        assert!(
            size <= MAX_CONNECTION_FUTURE,
            "a connection's future is {size} bytes; box what is rare in it"
        );
    }
}
