//! The harness: the real `wxsidecar` binary, run as a fake WeChat over TLS and
//! as a sidecar, on free loopback ports. Each handle kills its process on drop.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_wxsidecar");
/// Every wait in the tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(30);

pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    // Ports handed out below Linux's ephemeral range (32768+), where no
    // client socket of another test can take one between this check and the
    // child's bind; a per-process start keeps parallel runs apart.
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        20_000 + (std::process::id() % 120) as u16 * 100,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..13_000 {
        let port = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = if port >= 32_700 {
            NEXT.store(20_000, Ordering::Relaxed);
            20_000
        } else {
            port
        };
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in 20000-32699")
}

/// POSTs `body` to `url` and returns the JSON answer.
pub async fn post_json(c: &reqwest::Client, url: String, body: String) -> Value {
    c.post(url)
        .body(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// A plain HTTP client for the sidecar (no proxy from the environment).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// A client that trusts the fake's CA; `pooled: false` opens a connection
/// per request.
fn trusting(ca: &std::path::Path, pooled: bool) -> reqwest::Client {
    let pem = std::fs::read(ca).unwrap();
    let mut b = reqwest::Client::builder()
        .no_proxy()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap());
    if !pooled {
        b = b.pool_max_idle_per_host(0);
    }
    b.build().unwrap()
}

pub struct Fake {
    child: Child,
    pub port: u16,
    pub ca: PathBuf,
    _dir: tempfile::TempDir,
    https: reqwest::Client,
}

impl Fake {
    /// Starts `wxsidecar fake-wechat` with the shop and mall apps plus `extra` args.
    pub fn start(extra: &[&str]) -> Fake {
        Self::launch(None, 0, extra)
    }

    /// Starts a fake that keeps its CA in `ca_dir` (shared by every fake
    /// started there, so one CA file trusts them all), on `port` (0: any).
    pub fn start_in(ca_dir: &std::path::Path, port: u16, extra: &[&str]) -> Fake {
        Self::launch(Some(ca_dir), port, extra)
    }

    fn launch(ca_dir: Option<&std::path::Path>, port: u16, extra: &[&str]) -> Fake {
        let dir = tempfile::tempdir().unwrap();
        let ca = match ca_dir {
            Some(d) => d.join("ca.pem"),
            None => dir.path().join("ca.pem"),
        };
        let mut cmd = Command::new(BIN);
        cmd.args(["fake-wechat", "--listen", &format!("127.0.0.1:{port}")]);
        match ca_dir {
            Some(d) => cmd.arg("--ca-dir").arg(d),
            None => cmd.arg("--ca-out").arg(&ca),
        };
        let mut child = cmd
            .args([
                "--app",
                "wxshop0000000001:shop-secret-1",
                "--app",
                "wxmall0000000002:mall-secret-2",
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Keep reading the fake's stdout for its whole life, so it never
        // writes into a closed pipe.
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
        let port = line
            .trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("fake did not print its address: {line:?}"));
        let https = trusting(&ca, true);
        Fake {
            child,
            port,
            ca,
            _dir: dir,
            https,
        }
    }

    /// Stops the fake now (an outage).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.port)
    }

    async fn get_json(&self, path: &str) -> Value {
        self.get_json_on(&self.https, path).await
    }

    async fn get_json_on(&self, c: &reqwest::Client, path: &str) -> Value {
        c.get(format!("{}{path}", self.url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub async fn stats(&self) -> Value {
        self.get_json("/__fake/stats").await
    }

    /// The requests the fake has seen, oldest first (`/__fake/*` excluded).
    pub async fn requests(&self) -> Vec<Value> {
        serde_json::from_value(self.get_json("/__fake/requests").await).unwrap()
    }

    pub async fn last_request(&self) -> Value {
        self.requests().await.pop().expect("the fake saw a request")
    }

    /// Closes every idle HTTP/1.1 connection, as a server's keep-alive
    /// timeout does, and returns once the fake has closed them all. Its own
    /// calls go on connections of their own, never a pooled one the fake is
    /// closing.
    pub async fn close_idle(&self) {
        let once = trusting(&self.ca, false);
        self.post_ok(&once, "/__fake/close-idle", "").await;
        // The one left open is the stats call's own.
        let deadline = Instant::now() + WAIT;
        loop {
            let stats = self.get_json_on(&once, "/__fake/stats").await;
            if stats["h1_connections_open"].as_u64() <= Some(1) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the fake never closed its idle connections: {stats}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn invalidate(&self, appid: &str) {
        self.post_ok(
            &self.https,
            &format!("/__fake/invalidate?appid={appid}"),
            "",
        )
        .await;
    }

    /// Serves only callers from `ips` (`None`: everyone); the rest get
    /// WeChat's IP-whitelist errors naming their IP.
    pub async fn whitelist(&self, ips: Option<&[&str]>) {
        let body = serde_json::json!({ "ips": ips }).to_string();
        self.post_ok(&self.https, "/__fake/whitelist", &body).await;
    }

    /// A platform admin call (`/__fake/authorize?authorizer=`, …): its answer.
    pub async fn platform_admin(&self, path_and_query: &str) -> Value {
        self.https
            .post(format!("{}{path_and_query}", self.url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Resets an app's secret (the old one stops working).
    pub async fn set_secret(&self, appid: &str, secret: &str) {
        let path = format!("/__fake/secret?appid={appid}&secret={secret}");
        self.post_ok(&self.https, &path, "").await;
    }

    /// Sets the daily limit of every API path (45009 past it).
    pub async fn daily_limit(&self, n: u64) {
        let body = serde_json::json!({ "daily_limit": n }).to_string();
        self.post_ok(&self.https, "/__fake/quota", &body).await;
    }

    /// Sets the fake's injected faults (see `src/fake/faults.rs`).
    pub async fn faults(&self, plan: &str) {
        self.post_ok(&self.https, "/__fake/faults", plan).await;
    }

    /// POSTs to one of the fake's `/__fake/*` endpoints; it must succeed.
    async fn post_ok(&self, c: &reqwest::Client, path: &str, body: &str) {
        let r = c
            .post(format!("{}{path}", self.url()))
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert!(
            r.status().is_success(),
            "{path}: {}",
            r.text().await.unwrap()
        );
    }

    /// Token fetches the fake answered for `appid`, classic and stable.
    pub async fn fetches(&self, appid: &str) -> u64 {
        let s = self.stats().await;
        s["token_fetches"][appid].as_u64().unwrap_or(0)
            + s["stable_token_fetches"][appid].as_u64().unwrap_or(0)
    }

    /// Ticket fetches the fake answered for `owner:type` (e.g. `wx…:jsapi`).
    pub async fn ticket_fetches(&self, key: &str) -> u64 {
        self.stats().await["ticket_fetches"][key]
            .as_u64()
            .unwrap_or(0)
    }

    /// Milliseconds a ticket really has left at the fake (`None`: never issued).
    pub async fn ticket_left(&self, ticket: &str) -> Option<u64> {
        self.get_json(&format!("/__fake/ticket?value={ticket}"))
            .await["expires_in_ms"]
            .as_u64()
    }

    /// Calls the fake directly (not through the sidecar).
    pub async fn direct_post(&self, path_and_query: &str, body: &str) -> Value {
        self.https
            .post(format!("{}{path_and_query}", self.url()))
            .body(body.to_string())
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The two accounts every test config can use.
pub const SHOP_APPID: &str = "wxshop0000000001";
pub const SHOP_SECRET: &str = "shop-secret-1";
pub const MALL_APPID: &str = "wxmall0000000002";
pub const MALL_SECRET: &str = "mall-secret-2";

pub struct Sidecar {
    child: Option<Child>,
    pub port: u16,
    pub admin_port: u16,
    dir: tempfile::TempDir,
}

impl Sidecar {
    /// Writes a config with fresh ports plus `body` (upstream, accounts, …),
    /// starts `wxsidecar run` and waits until `/readyz` answers 200.
    pub async fn start(fake: &Fake, body: &str) -> Sidecar {
        let s = Self::spawn(fake, body);
        s.wait_ready().await;
        s
    }

    /// Like `start`, but does not require readiness (for failing accounts):
    /// waits for the admin listener, then for the app listener to be open
    /// (`/readyz` no longer says it is not: the port takes connections a
    /// moment before that).
    pub async fn start_unready(fake: &Fake, body: &str) -> Sidecar {
        let s = Self::spawn(fake, body);
        s.wait_admin().await;
        let deadline = Instant::now() + WAIT;
        let c = client();
        loop {
            let open = tokio::net::TcpStream::connect(("127.0.0.1", s.port))
                .await
                .is_ok();
            if open {
                let why = match c.get(s.admin("/readyz")).send().await {
                    Ok(r) => r.text().await.unwrap_or_default(),
                    Err(_) => String::new(),
                };
                if !why.contains("app listener not open yet") {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "app listener never opened: {}",
                s.log()
            );
            s.check_alive();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        s
    }

    /// The usual sidecar: the fake over TLS and both accounts (shop the default).
    pub async fn start_standard(fake: &Fake, shop_api: &str, mall_api: &str) -> Sidecar {
        Self::start(
            fake,
            &format!("{}{}", upstream(), Self::accounts(shop_api, mall_api)),
        )
        .await
    }

    /// Like `start`, with `RUST_LOG` set to `level` for every target.
    pub async fn start_with_log_level(fake: &Fake, body: &str, level: &str) -> Sidecar {
        let s = Self::spawn_with(fake, body, level);
        s.wait_ready().await;
        s
    }

    /// Spawns the sidecar and returns at once, ready or not.
    pub fn start_nowait(fake: &Fake, body: &str) -> Sidecar {
        Self::spawn(fake, body)
    }

    /// The standard config: both accounts, shop the default.
    pub fn accounts(shop_api: &str, mall_api: &str) -> String {
        format!(
            r#"accounts:
  - name: shop
    appid: {SHOP_APPID}
    secret: ${{WXT_SHOP_SECRET}}
    token_api: {shop_api}
    default: true
  - name: mall
    appid: {MALL_APPID}
    secret_file: MALL_SECRET_FILE
    token_api: {mall_api}
"#
        )
    }

    /// A sidecar whose `body` names its own upstream (no fake WeChat).
    pub async fn start_bare(body: &str) -> Sidecar {
        let s = Self::spawn_for(None, body, "debug,pingora_core=info,pingora_proxy=info");
        s.wait_ready().await;
        s
    }

    fn spawn(fake: &Fake, body: &str) -> Sidecar {
        Self::spawn_with(fake, body, "debug,pingora_core=info,pingora_proxy=info,h2=info,hyper=info,hickory_proto=info,hickory_resolver=info")
    }

    fn spawn_with(fake: &Fake, body: &str, log_level: &str) -> Sidecar {
        Self::spawn_for(Some(fake), body, log_level)
    }

    fn spawn_for(fake: Option<&Fake>, body: &str, log_level: &str) -> Sidecar {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let admin_port = free_port();
        let secret_file = dir.path().join("mall.secret");
        std::fs::write(&secret_file, format!("{MALL_SECRET}\n")).unwrap();
        let mut body = body.replace("MALL_SECRET_FILE", &secret_file.display().to_string());
        if let Some(fake) = fake {
            body = body
                .replace("FAKE_URL", &fake.url())
                .replace("FAKE_CA", &fake.ca.display().to_string());
        }
        let config =
            format!("listen: 127.0.0.1:{port}\nadmin_listen: 127.0.0.1:{admin_port}\n{body}");
        let path = dir.path().join("wxsidecar.yaml");
        std::fs::write(&path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let child = Self::command(&path, log_level, &[], log);
        Sidecar {
            child: Some(child),
            port,
            admin_port,
            dir,
        }
    }

    fn command(
        config: &std::path::Path,
        log_level: &str,
        extra: &[&str],
        log: std::fs::File,
    ) -> Child {
        Command::new(BIN)
            .args(["run", "--config"])
            .arg(config)
            .args(extra)
            .env("WXT_SHOP_SECRET", SHOP_SECRET)
            .env("RUST_LOG", log_level)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    /// Starts `run --upgrade` with this sidecar's config: the new process
    /// waits for the listening sockets, which this one hands over on SIGQUIT.
    pub fn start_upgrade(&self) -> Sidecar {
        let dir = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let child = Self::command(
            &self.dir.path().join("wxsidecar.yaml"),
            "info",
            &["--upgrade"],
            log,
        );
        Sidecar {
            child: Some(child),
            port: self.port,
            admin_port: self.admin_port,
            dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends a signal by name (TERM, INT, QUIT).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args(["-s", sig, &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -s {sig} failed");
    }

    /// Waits up to `limit` for the process to exit; its exit status.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut()?;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The config file this sidecar runs with.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("wxsidecar.yaml")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn admin(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    fn check_alive(&self) {
        let mut child = self.child.as_ref().map(|c| c.id());
        if let Some(pid) = child.take() {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                panic!("sidecar exited; log:\n{}", self.log());
            }
        }
    }

    async fn wait_admin(&self) {
        let c = client();
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if c.get(self.admin("/healthz")).send().await.is_ok() {
                return;
            }
            self.check_alive();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("admin listener never opened; log:\n{}", self.log());
    }

    pub async fn wait_ready(&self) {
        let c = client();
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Ok(r) = c.get(self.admin("/readyz")).send().await {
                if r.status() == 200
                    && tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                        .await
                        .is_ok()
                {
                    return;
                }
            }
            self.check_alive();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("sidecar never became ready; log:\n{}", self.log());
    }

    /// `/status` as JSON, checked to have the typed shape first (so every
    /// test that reads it checks [`wxsidecar::status::Status`] too).
    pub async fn status(&self) -> Value {
        let v: Value = client()
            .get(self.admin("/status"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if let Err(e) = serde_json::from_value::<wxsidecar::status::Status>(v.clone()) {
            panic!("/status does not have the Status shape ({e}): {v}");
        }
        v
    }

    /// `/status`, typed as the admin listener writes it.
    pub async fn typed_status(&self) -> wxsidecar::status::Status {
        serde_json::from_value(self.status().await).unwrap()
    }

    /// The admin listener's `/metrics` text.
    pub async fn metrics(&self) -> String {
        client()
            .get(self.admin("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// One series' value from `/metrics` (`name{labels}` as exposed).
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no `{series}` in:\n{text}"))
    }

    /// The token the sidecar hands out for an account, via the local token endpoint.
    pub async fn token(&self, appid: &str, secret: &str) -> String {
        let v: Value = client()
            .get(self.url(&format!(
                "/cgi-bin/token?grant_type=client_credential&appid={appid}&secret={secret}"
            )))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["access_token"]
            .as_str()
            .unwrap_or_else(|| panic!("no token in {v}"))
            .to_string()
    }

    /// GETs a path on the app listener, with headers; returns (status, JSON).
    pub async fn get(&self, path_and_query: &str, headers: &[(&str, &str)]) -> (u16, Value) {
        let mut r = client().get(self.url(path_and_query));
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        let r = r.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// POSTs a template message through the sidecar; returns (status, JSON).
    pub async fn send(&self, path_and_query: &str, body: &str) -> (u16, Value) {
        self.post_with(path_and_query, body, &[]).await
    }

    /// Uploads `data` as WeChat's multipart `media` field
    /// (`/cgi-bin/media/upload?type=file`), for `account` when named.
    pub async fn upload(
        &self,
        account: Option<&str>,
        filename: &str,
        data: Vec<u8>,
    ) -> (u16, Value) {
        let form = reqwest::multipart::Form::new().part(
            "media",
            reqwest::multipart::Part::bytes(data)
                .file_name(filename.to_string())
                .mime_str("application/octet-stream")
                .unwrap(),
        );
        let mut r = client()
            .post(self.url("/cgi-bin/media/upload?type=file"))
            .multipart(form);
        if let Some(a) = account {
            r = r.header("X-Wx-Account", a);
        }
        let r = r.send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// [`Self::send`] naming the account (`X-Wx-Account`).
    pub async fn send_as(&self, account: &str, path_and_query: &str, body: &str) -> (u16, Value) {
        self.post_with(path_and_query, body, &[("X-Wx-Account", account)])
            .await
    }

    async fn post_with(
        &self,
        path_and_query: &str,
        body: &str,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let mut req = client()
            .post(self.url(path_and_query))
            .body(body.to_string());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// A GET on the admin listener: (status, JSON).
    pub async fn admin_get(&self, path: &str) -> (u16, Value) {
        let r = client().get(self.admin(path)).send().await.unwrap();
        let s = r.status().as_u16();
        (s, r.json().await.unwrap_or(Value::Null))
    }

    /// Asserts that no secret and none of `tokens` appears in the log.
    pub fn assert_log_clean(&self, tokens: &[&str]) {
        let log = self.log();
        for s in [SHOP_SECRET, MALL_SECRET].iter().chain(tokens) {
            assert!(
                !log.contains(s),
                "log contains a secret or token `{s}`:\n{log}"
            );
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        // A failing test shows what the sidecar saw.
        if std::thread::panicking() {
            eprintln!(
                "--- sidecar log ---\n{}--- end of sidecar log ---",
                self.log()
            );
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub const TEMPLATE: &str =
    r#"{"touser":"oUSER123","template_id":"TPL_ORDER","data":{"status":{"value":"shipped"}}}"#;

/// A sidecar config pointing at `fake` over TLS with the fake's CA.
pub fn upstream() -> &'static str {
    "upstream:\n  url: FAKE_URL\n  ca_file: FAKE_CA\n  warm_connections: 4\n"
}

/// A real `redis-server` on a free loopback port, no persistence.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
}

impl Redis {
    pub async fn start() -> Redis {
        let mut r = Redis {
            child: None,
            port: free_port(),
        };
        r.restart().await;
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Starts (again) on the same port, empty.
    pub async fn restart(&mut self) {
        self.stop();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (make install-deps)");
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        loop {
            if let Ok(mut c) = self.conn().await {
                if redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
                {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub async fn conn(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        redis::Client::open(self.url())?
            .get_multiplexed_async_connection()
            .await
    }

    pub async fn get(&self, key: &str) -> Option<String> {
        let mut c = self.conn().await.unwrap();
        redis::cmd("GET")
            .arg(key)
            .query_async(&mut c)
            .await
            .unwrap()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A real forward proxy (Debian's `tinyproxy`) on a free loopback port: it
/// connects out from `127.0.0.2`, so the fake sees that address only for
/// calls that came through it.
pub struct Tinyproxy {
    child: Child,
    pub port: u16,
    dir: tempfile::TempDir,
}

/// The address tinyproxy connects out from.
pub const PROXY_EGRESS_IP: &str = "127.0.0.2";

impl Tinyproxy {
    /// `extra`: more config lines (`BasicAuth user pass`, `ConnectPort 443`).
    pub async fn start(extra: &str) -> Tinyproxy {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = dir.path().join("tinyproxy.conf");
        std::fs::write(
            &conf,
            format!(
                "Port {port}\nListen 127.0.0.1\nBind {PROXY_EGRESS_IP}\nTimeout 60\nMaxClients 200\nLogLevel Connect\nLogFile \"{}\"\n{extra}\n",
                dir.path().join("log").display()
            ),
        )
        .unwrap();
        let child = Command::new("tinyproxy")
            .arg("-d")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tinyproxy is installed (make install-deps)");
        let deadline = Instant::now() + WAIT;
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "tinyproxy did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Tinyproxy { child, port, dir }
    }

    /// The `CONNECT` requests it was asked for.
    pub fn connects(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("Request (file descriptor") && l.contains("CONNECT "))
            .count()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
