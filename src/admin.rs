//! The admin listener: `/healthz`, `/readyz` and `/status`.
//!
//! `/status` shows token ages and counters, never a token or a secret.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::app::App;
use crate::reply::JSON;

pub struct Admin {
    app: Arc<App>,
}

impl Admin {
    pub fn new(app: Arc<App>) -> Self {
        Admin { app }
    }

    fn status(&self) -> serde_json::Value {
        let app = &self.app;
        let accounts: Vec<_> = app
            .accounts
            .iter()
            .map(|a| {
                let st = a.tokens.status();
                let tok = a.tokens.latest();
                serde_json::json!({
                    "name": a.name,
                    "kind": a.kind.as_str(),
                    "appid": a.appid,
                    "agentid": a.agentid,
                    "token_api": a.token_api.as_str(),
                    "token_valid": tok.as_ref().is_some_and(|t| t.is_valid()),
                    "token_fetched_unix": tok.as_ref().and_then(|t| t.fetched_at.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_secs()),
                    "token_age_seconds": tok.as_ref().and_then(|t| t.fetched_at.elapsed().ok()).map(|d| d.as_secs()),
                    "token_expires_in_seconds": tok.as_ref().map(|t| t.remaining().as_secs()),
                    "fetches_ok": st.fetches_ok,
                    "fetches_today": st.fetches_today,
                    "budget_left": app.config.token.daily_budget.saturating_sub(st.fetches_today),
                    "budget_spent": st.budget_spent.is_some(),
                    "invalid_token_reports": st.invalid_reports,
                    "replays_ok": a.replays_ok.load(Ordering::Relaxed),
                    "replays_failed": a.replays_failed.load(Ordering::Relaxed),
                    "fetches_failed": st.fetches_failed,
                    "last_error": st.last_error.map(|(code, msg)| serde_json::json!({"errcode": code, "errmsg": msg})),
                })
            })
            .collect();
        serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": app.started.elapsed().as_secs(),
            "ready": app.not_ready_reason().is_none(),
            "accounts": accounts,
            "store": match &app.store {
                None => serde_json::json!({ "kind": "memory" }),
                Some(s) => serde_json::json!({ "kind": "redis", "url": s.url(), "state": s.state() }),
            },
            "upstream": app.upstream.status(),
            "wecom_upstream": app.wecom.as_ref().map(|w| w.status()),
        })
    }
}

fn answer(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .body(body)
        .expect("valid response")
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let text = "text/plain; charset=utf-8";
        if req.method != http::Method::GET && req.method != http::Method::HEAD {
            return answer(405, text, b"method not allowed\n".to_vec());
        }
        match req.uri.path() {
            "/healthz" => answer(200, text, b"ok\n".to_vec()),
            "/readyz" => match self.app.not_ready_reason() {
                None => answer(200, text, b"ready\n".to_vec()),
                Some(why) => answer(503, text, format!("not ready: {why}\n").into_bytes()),
            },
            "/status" => answer(200, JSON, self.status().to_string().into_bytes()),
            _ => answer(
                404,
                text,
                b"not found: try /healthz /readyz /status\n".to_vec(),
            ),
        }
    }
}
