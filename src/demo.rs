//! `wxsidecar demo`: a fake WeChat over TLS and a sidecar configured for it,
//! in one process, with curl commands to paste.

use std::time::Duration;

use std::net::SocketAddr;

use crate::config::Config;
use crate::fake::{self, FakeOptions, DEMO_APPID, DEMO_SECRET};

/// The demo's third-party platform (the fake plays WeChat's side of it).
const DEMO_COMPONENT: &str = "wxdemocomponent01";
const DEMO_COMPONENT_SECRET: &str = "demo-component-secret";
const DEMO_PLATFORM_TOKEN: &str = "demo-platform-token";
const DEMO_AES_KEY: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";
use crate::server;
use clap::Args;

/// How long to wait for the demo sidecar's first token before giving up.
const DEFAULT_READY_WAIT: Duration = Duration::from_secs(30);

/// `wxsidecar demo`'s options.
#[derive(Args)]
pub struct DemoArgs {
    /// The sidecar's app listener.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// The sidecar's admin listener.
    #[arg(long, default_value = "127.0.0.1:9901")]
    pub admin_listen: SocketAddr,
    /// The fake WeChat's listener.
    #[arg(long, default_value = "127.0.0.1:9443")]
    pub fake_listen: SocketAddr,
}

pub fn run(args: DemoArgs) -> i32 {
    let dir = std::env::temp_dir().join("wxsidecar-demo");
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("demo: cannot create {}: {e}", dir.display());
        return 2;
    }
    let ca_path = dir.join("fake-ca.pem");

    // The fake runs on its own runtime thread; pingora owns the main thread.
    let (tx, rx) = std::sync::mpsc::channel();
    let fake_listen = args.fake_listen;
    let sidecar_listen = args.listen;
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        rt.block_on(async move {
            let started = fake::start(FakeOptions {
                listen: fake_listen,
                // Like WeChat's gateways, offer HTTP/2 (the sidecar's default).
                h2: true,
                // A third-party platform whose events go to the sidecar; the
                // ticket comes every few seconds instead of WeChat's 10 min.
                platform: Some(format!(
                    "{DEMO_COMPONENT}:{DEMO_COMPONENT_SECRET}:{DEMO_PLATFORM_TOKEN}:{DEMO_AES_KEY}"
                )),
                platform_callback: Some(format!(
                    "http://{sidecar_listen}/wxsidecar/platform/demo/callback"
                )),
                ticket_push_every: Duration::from_secs(3),
                ..FakeOptions::default()
            })
            .await;
            let _ = tx.send(started.map(|f| f.ca_pem.unwrap_or_default()));
            std::future::pending::<()>().await;
        });
    });
    let ca_pem = match rx.recv() {
        Ok(Ok(pem)) => pem,
        Ok(Err(e)) => {
            eprintln!(
                "demo: the fake WeChat cannot listen on {fake_listen}: {e} (try --fake-listen)"
            );
            return 2;
        }
        Err(_) => return 2,
    };
    if let Err(e) = std::fs::write(&ca_path, ca_pem) {
        eprintln!("demo: cannot write {}: {e}", ca_path.display());
        return 2;
    }

    let yaml = format!(
        r#"
listen: {listen}
admin_listen: {admin}
upstream:
  url: https://localhost:{fport}
  ca_file: {ca}
accounts:
  - name: demo
    appid: {DEMO_APPID}
    secret: {DEMO_SECRET}
    token_api: stable
    default: true
platforms:
  - name: demo
    component_appid: {DEMO_COMPONENT}
    component_secret: {DEMO_COMPONENT_SECRET}
    token: {DEMO_PLATFORM_TOKEN}
    encoding_aes_key: {DEMO_AES_KEY}
"#,
        listen = args.listen,
        admin = args.admin_listen,
        fport = fake_listen.port(),
        ca = ca_path.display(),
    );
    let config = match Config::parse(&yaml) {
        Ok(c) => c,
        Err(problems) => {
            eprintln!("demo: {}", problems.join("; "));
            return 2;
        }
    };
    let prepared = match server::prepare(config, server::RunMode::default()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("demo: cannot start: {e} (try --listen / --admin-listen)");
            return 2;
        }
    };

    let app = prepared.app().clone();
    let listen = args.listen;
    let admin = args.admin_listen;
    std::thread::spawn(move || {
        let deadline = tokio::time::Instant::now() + DEFAULT_READY_WAIT;
        while app.not_ready_reason().is_some() {
            if tokio::time::Instant::now() > deadline {
                eprintln!(
                    "demo: the sidecar is not ready: {}",
                    app.not_ready_reason().unwrap_or_default()
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Give the listener a moment to bind after the ready flag.
        std::thread::sleep(Duration::from_millis(200));
        println!("{}", commands(listen, admin, fake_listen, &ca_path));
    });
    prepared.run();
    0
}

fn commands(
    listen: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    fake: std::net::SocketAddr,
    ca: &std::path::Path,
) -> String {
    format!(
        r#"
wxsidecar demo is running: app listener http://{listen}, admin http://{admin},
fake WeChat https://localhost:{fport} (CA {ca}). Paste these in another terminal:

# 1. Send a template message with no token: the sidecar adds it.
curl -s -X POST 'http://{listen}/cgi-bin/message/template/send' \
  -H 'Content-Type: application/json' \
  -d '{{"touser":"oUSER123","template_id":"TPL_ORDER","data":{{"status":{{"value":"shipped"}}}}}}'; echo

# 2. Send 100 more; still one token fetch and one TLS connection (HTTP/2).
for i in $(seq 100); do curl -s -o /dev/null -X POST 'http://{listen}/cgi-bin/message/template/send' -d '{{"touser":"oUSER123","template_id":"TPL_ORDER"}}'; done

# 3. The fake's counters: token fetches, messages, TLS handshakes.
curl -s --cacert {ca} https://localhost:{fport}/__fake/stats; echo

# 4. An SDK asking for a token gets the cached one, locally.
curl -s 'http://{listen}/cgi-bin/token?grant_type=client_credential&appid={DEMO_APPID}&secret={DEMO_SECRET}'; echo

# 5. A web page's wx.config, signed with the cached jsapi_ticket.
curl -s 'http://{listen}/wxsidecar/jssdk/config?url=https%3A%2F%2Fshop.example.com%2Fpay'; echo

# 6. A third-party platform: three customers authorise it (the fake pushes the
#    encrypted events to the sidecar, which exchanges them), then a send for each
#    with no token: X-Wx-Account names the customer's appid.
for n in 1 2 3; do curl -s -X POST --cacert {ca} "https://localhost:{fport}/__fake/authorize?authorizer=wxcustomer000000$n"; echo; done
for n in 1 2 3; do curl -s -X POST 'http://{listen}/cgi-bin/message/template/send' \
  -H "X-Wx-Account: wxcustomer000000$n" -d '{{"touser":"oUSER123","template_id":"TPL_ORDER"}}'; echo; done

# 7. Health and status.
curl -s http://{admin}/readyz; curl -s http://{admin}/status; echo

Stop with Ctrl-C.
"#,
        fport = fake.port(),
        ca = ca.display(),
    )
}
