//! The fake's third-party platform (`--platform APPID:SECRET:TOKEN:AESKEY`):
//! pushes encrypted `component_verify_ticket`s to `--platform-callback`
//! every `--ticket-push-every` seconds, answers `api_component_token`,
//! `api_query_auth`, `api_authorizer_token` and `api_get_authorizer_list`
//! as WeChat does, and makes authorisers on request
//! (`POST /__fake/authorize`, `POST /__fake/unauthorize`), pushing the
//! events WeChat would.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use rand::distributions::Alphanumeric;
use rand::Rng;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Shared;
use wxsidecar_core::msgcrypt::MsgCrypt;

/// Tickets kept valid: WeChat accepts the last few pushed.
const TICKETS_KEPT: usize = 3;

pub struct Platform {
    pub appid: String,
    secret: String,
    crypt: MsgCrypt,
    pub callback: Option<String>,
    tickets: VecDeque<String>,
    authorizers: BTreeMap<String, Authorizer>,
    /// Authorisation codes → authoriser appid.
    codes: BTreeMap<String, String>,
    /// Rotate the refresh token on every `api_authorizer_token`.
    pub rotate_refresh: bool,
    component_fetches: u64,
    authorizer_fetches: u64,
    query_auth_calls: u64,
    list_calls: u64,
    pushes: u64,
    push_failures: u64,
}

struct Authorizer {
    refresh_token: String,
    auth_time: u64,
}

fn random(n: usize) -> String {
    rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(n)
        .map(char::from)
        .collect()
}

impl Platform {
    /// `APPID:SECRET:TOKEN:AESKEY`.
    pub fn parse(spec: &str, callback: Option<String>) -> Result<Self, String> {
        let parts: Vec<&str> = spec.splitn(4, ':').collect();
        let [appid, secret, token, key] = parts[..] else {
            return Err("--platform: write APPID:SECRET:TOKEN:AESKEY".into());
        };
        let crypt = MsgCrypt::new(wxsidecar_core::secret::Secret::new(token), key, appid)
            .map_err(|e| format!("--platform: AESKEY {e}"))?;
        Ok(Platform {
            appid: appid.into(),
            secret: secret.into(),
            crypt,
            callback,
            tickets: VecDeque::new(),
            authorizers: BTreeMap::new(),
            codes: BTreeMap::new(),
            rotate_refresh: false,
            component_fetches: 0,
            authorizer_fetches: 0,
            query_auth_calls: 0,
            list_calls: 0,
            pushes: 0,
            push_failures: 0,
        })
    }

    pub fn stats(&self) -> Value {
        json!({
            "component_token_fetches": self.component_fetches,
            "authorizer_token_fetches": self.authorizer_fetches,
            "query_auth_calls": self.query_auth_calls,
            "authorizer_list_calls": self.list_calls,
            "event_pushes": self.pushes,
            "event_push_failures": self.push_failures,
            "authorizers": self.authorizers.keys().collect::<Vec<_>>(),
        })
    }

    /// A new ticket, kept valid with the last few; the event's XML.
    fn new_ticket(&mut self) -> String {
        let ticket = format!("ticket@@@{}", random(40));
        self.tickets.push_back(ticket.clone());
        while self.tickets.len() > TICKETS_KEPT {
            self.tickets.pop_front();
        }
        format!(
            "<xml><AppId><![CDATA[{}]]></AppId><CreateTime>{}</CreateTime><InfoType><![CDATA[component_verify_ticket]]></InfoType><ComponentVerifyTicket><![CDATA[{ticket}]]></ComponentVerifyTicket></xml>",
            self.appid,
            unix_now()
        )
    }

    /// Creates (or re-creates) an authoriser; the `authorized` event.
    fn authorize(&mut self, authorizer: &str) -> (String, String) {
        let code = format!("queryauthcode@@@{}", random(32));
        self.codes.insert(code.clone(), authorizer.to_string());
        let refresh_token = format!("refreshtoken@@@{}", random(32));
        let known = self.authorizers.contains_key(authorizer);
        self.authorizers.insert(
            authorizer.to_string(),
            Authorizer {
                refresh_token,
                auth_time: unix_now(),
            },
        );
        let info = if known {
            "updateauthorized"
        } else {
            "authorized"
        };
        let xml = format!(
            "<xml><AppId><![CDATA[{}]]></AppId><CreateTime>{}</CreateTime><InfoType><![CDATA[{info}]]></InfoType><AuthorizerAppid><![CDATA[{authorizer}]]></AuthorizerAppid><AuthorizationCode><![CDATA[{code}]]></AuthorizationCode><AuthorizationCodeExpiredTime>{}</AuthorizationCodeExpiredTime><PreAuthCode><![CDATA[preauthcode@@@x]]></PreAuthCode></xml>",
            self.appid,
            unix_now(),
            unix_now() + 3600
        );
        (code, xml)
    }

    /// Revokes an authoriser; the `unauthorized` event, if it existed.
    fn unauthorize(&mut self, authorizer: &str) -> Option<String> {
        self.authorizers.remove(authorizer)?;
        Some(format!(
            "<xml><AppId><![CDATA[{}]]></AppId><CreateTime>{}</CreateTime><InfoType><![CDATA[unauthorized]]></InfoType><AuthorizerAppid><![CDATA[{authorizer}]]></AuthorizerAppid></xml>",
            self.appid,
            unix_now()
        ))
    }

    /// The envelope WeChat POSTs: query and body.
    fn envelope(&self, xml: &str) -> (String, String) {
        let (timestamp, nonce) = (unix_now().to_string(), rand::random::<u32>().to_string());
        self.crypt.seal(xml, &timestamp, &nonce)
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// POSTs an event to the callback URL (plain HTTP, as in the tests and the
/// demo); whether it answered `success`.
async fn push(shared: &Arc<Shared>, xml: String) -> bool {
    let (url, query, body) = {
        let st = shared.state.lock();
        let Some(p) = st.platform.as_ref() else {
            return false;
        };
        let Some(url) = p.callback.clone() else {
            return false;
        };
        let (q, b) = p.envelope(&xml);
        (url, q, b)
    };
    let ok = post(&url, &query, &body).await.unwrap_or(false);
    let mut st = shared.state.lock();
    if let Some(p) = st.platform.as_mut() {
        p.pushes += 1;
        if !ok {
            p.push_failures += 1;
        }
    }
    ok
}

async fn post(url: &str, query: &str, body: &str) -> Option<bool> {
    let u = url::Url::parse(url).ok()?;
    let addr = format!("{}:{}", u.host_str()?, u.port_or_known_default()?);
    let sep = if u.query().is_some() { '&' } else { '?' };
    let target = format!(
        "{}{}{sep}{query}",
        u.path(),
        u.query().map(|q| format!("?{q}")).unwrap_or_default()
    );
    let req = format!(
        "POST {target} HTTP/1.1\r\nHost: {}\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        u.host_str()?,
        body.len()
    );
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(&addr).await.ok()?;
        s.write_all(req.as_bytes()).await.ok()?;
        let mut answer = Vec::new();
        s.take(64 * 1024).read_to_end(&mut answer).await.ok()?;
        let text = String::from_utf8_lossy(&answer);
        Some(text.starts_with("HTTP/1.1 200") && text.ends_with("success"))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .ok()?
}

/// Pushes a fresh ticket now and every `every`.
pub(crate) async fn push_tickets(shared: Arc<Shared>, every: Duration) {
    loop {
        let xml = {
            let mut st = shared.state.lock();
            let Some(p) = st.platform.as_mut() else {
                return;
            };
            p.new_ticket()
        };
        push(&shared, xml).await;
        tokio::time::sleep(every).await;
    }
}

/// `POST /__fake/authorize?authorizer=APPID`, `/__fake/unauthorize` and
/// `/__fake/platform-callback?url=URL` (sets where events go, then pushes
/// a fresh ticket there).
pub(crate) async fn admin(shared: &Arc<Shared>, path: &str, arg: &str) -> Value {
    let authorizer = arg;
    let xml = {
        let mut st = shared.state.lock();
        let Some(p) = st.platform.as_mut() else {
            return json!({ "errcode": 404, "errmsg": "no --platform" });
        };
        if path == "/__fake/platform-callback" {
            p.callback = Some(arg.to_string());
            Some(p.new_ticket())
        } else if path == "/__fake/authorize" {
            Some(p.authorize(authorizer).1)
        } else {
            let xml = p.unauthorize(authorizer);
            if xml.is_some() {
                st.invalidate(authorizer);
            }
            xml
        }
    };
    match xml {
        None => {
            json!({ "errcode": 61003, "errmsg": "component is not authorized by this account" })
        }
        Some(xml) => {
            let delivered = push(shared, xml).await;
            json!({ "errcode": 0, "errmsg": "ok", "delivered": delivered })
        }
    }
}

fn err(code: i64, msg: &str) -> Value {
    json!({ "errcode": code, "errmsg": msg })
}

/// The component APIs; `token`: the component token the call carries (as
/// `component_access_token` or `access_token`).
pub(crate) fn api(shared: &Shared, path: &str, token: Option<&str>, body: &[u8]) -> Value {
    let v: Value = serde_json::from_slice(body).unwrap_or_default();
    let field = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let mut st = shared.state.lock();
    let Some(p) = st.platform.as_ref() else {
        return err(61004, "access clientip is not registered");
    };
    if field("component_appid") != p.appid {
        return err(61005, "component_appid is invalid");
    }
    let appid = p.appid.clone();
    if path == "/cgi-bin/component/api_component_token" {
        if field("component_appsecret") != p.secret {
            return err(61006, "component_appsecret is invalid");
        }
        if !p.tickets.contains(&field("component_verify_ticket")) {
            return err(61006, "component verify ticket is invalid");
        }
        let (t, ttl) = st.issue(&appid);
        if let Some(p) = st.platform.as_mut() {
            p.component_fetches += 1;
        }
        return json!({ "component_access_token": t, "expires_in": ttl });
    }
    // The rest take the component token.
    match st.check_token(token) {
        Ok(owner) if owner == appid => {}
        Ok(_) => {
            return err(
                40001,
                "invalid credential, access_token is invalid or not latest",
            )
        }
        Err(r) => return err(r.errcode, r.errmsg),
    }
    let p = st.platform.as_mut().expect("checked above");
    match path {
        "/cgi-bin/component/api_query_auth" => {
            p.query_auth_calls += 1;
            let Some(authorizer) = p.codes.remove(&field("authorization_code")) else {
                return err(61010, "code is expired or invalid");
            };
            let Some(a) = p.authorizers.get(&authorizer) else {
                return err(61003, "component is not authorized by this account");
            };
            let refresh = a.refresh_token.clone();
            let (t, ttl) = st.issue(&authorizer);
            json!({ "authorization_info": {
                "authorizer_appid": authorizer,
                "authorizer_access_token": t,
                "expires_in": ttl,
                "authorizer_refresh_token": refresh,
                "func_info": [{ "funcscope_category": { "id": 1 } }],
            }})
        }
        "/cgi-bin/component/api_authorizer_token" => {
            p.authorizer_fetches += 1;
            let authorizer = field("authorizer_appid");
            let rotate = p.rotate_refresh;
            let Some(a) = p.authorizers.get_mut(&authorizer) else {
                return err(61003, "component is not authorized by this account");
            };
            if a.refresh_token != field("authorizer_refresh_token") {
                return err(61023, "refresh_token is invalid");
            }
            if rotate {
                a.refresh_token = format!("refreshtoken@@@{}", random(32));
            }
            let refresh = a.refresh_token.clone();
            let (t, ttl) = st.issue(&authorizer);
            json!({ "authorizer_access_token": t, "expires_in": ttl, "authorizer_refresh_token": refresh })
        }
        "/cgi-bin/component/api_get_authorizer_list" => {
            p.list_calls += 1;
            let offset = v.get("offset").and_then(Value::as_u64).unwrap_or(0) as usize;
            let count = v.get("count").and_then(Value::as_u64).unwrap_or(0).min(500) as usize;
            let list: Vec<Value> = p
                .authorizers
                .iter()
                .skip(offset)
                .take(count)
                .map(|(id, a)| json!({ "authorizer_appid": id, "refresh_token": a.refresh_token, "auth_time": a.auth_time }))
                .collect();
            json!({ "total_count": p.authorizers.len(), "list": list })
        }
        _ => json!({ "errcode": 0, "errmsg": "ok" }),
    }
}
