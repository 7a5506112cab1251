//! Raw sockets on both sides of the sidecar: a client that writes exact
//! bytes (framing, pipelining, slow senders), and a plain-HTTP upstream that
//! logs exactly what reached it and misbehaves on request.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::support::free_port;

/// The token the raw upstream hands out.
pub const RAW_TOKEN: &str = "rawtoken0123456789abcdef";
pub const RAW_APPID: &str = "wxraw00000000001";
pub const RAW_SECRET: &str = "raw-secret-0123456789";
/// An app whose token answer claims an endless lifetime.
pub const RAW_ENDLESS_APPID: &str = "wxrawendless0001";
/// An app whose every token fetch gets a new token, `{RAW_TOKEN}-N`.
pub const RAW_REISSUE_APPID: &str = "wxrawreissue0001";

/// Writes `request` to the sidecar at `port` and reads until the peer
/// closes or nothing more arrives for `quiet`.
pub fn exchange(port: u16, request: &[u8], quiet: Duration) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(request).unwrap();
    read_until_quiet(&mut s, quiet)
}

/// Reads what arrives until EOF, an error, or `quiet` without a byte.
pub fn read_until_quiet(s: &mut TcpStream, quiet: Duration) -> String {
    s.set_read_timeout(Some(quiet)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether the peer has closed `s` (reads EOF or a reset within `within`).
pub fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 1024];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// The status codes of every answer in a raw HTTP/1.1 byte stream.
pub fn statuses(raw: &str) -> Vec<u16> {
    raw.match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| raw.get(i + 9..i + 12)?.parse().ok())
        .collect()
}

/// A plain-HTTP/1.1 upstream on loopback that records every request as it
/// arrived (head and body bytes) and answers by path:
/// - the token endpoints: [`RAW_TOKEN`] for 7200 s (`{RAW_TOKEN}-N`, a
///   new one each fetch, for [`RAW_REISSUE_APPID`]);
/// - `/revoked…?m=M`: errcode 40001 to every other request marked `M`;
/// - `/redirect…`: 302 to a `Location` that keeps the request's query;
/// - `/echo…`: 200 with the request target in the body;
/// - `/flood…`: 1,000 `100 Continue` answers, then 200;
/// - `/slow…`: a 40-byte answer trickled a byte every 200 ms;
/// - `/chunked…`: a chunked answer in 7-byte chunks with a trailer
///   (`?size=N`: about N bytes);
/// - `/big…?size=N`: a JSON answer of about N bytes with its length
///   (`&errcode=C`: that errcode, else 0);
/// - anything else: `{"errcode":0,"errmsg":"ok"}`.
pub struct RawUpstream {
    pub port: u16,
    pub seen: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl RawUpstream {
    pub fn start() -> RawUpstream {
        let port = free_port();
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen2, stop2) = (seen.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let seen = seen2.clone();
                        std::thread::spawn(move || serve(s, seen));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        RawUpstream { port, seen, stop }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Requests seen other than token fetches.
    pub fn api_requests(&self) -> Vec<String> {
        self.seen
            .lock()
            .iter()
            .filter(|r| !r.contains("/cgi-bin/stable_token") && !r.contains("/cgi-bin/token?"))
            .cloned()
            .collect()
    }

    /// Token fetches seen.
    pub fn token_fetches(&self) -> usize {
        self.seen
            .lock()
            .iter()
            .filter(|r| r.contains("stable_token"))
            .count()
    }

    /// The sidecar config for this upstream with one account, plus `extra`.
    pub fn config(&self, extra: &str) -> String {
        format!(
            "upstream:\n  url: {}\n  http2: false\n  warm_connections: 0\naccounts:\n  - name: raw\n    appid: {RAW_APPID}\n    secret: {RAW_SECRET}\n{extra}",
            self.url()
        )
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The `size=N` of a query (0 without one).
fn size_param(query: &str) -> usize {
    number_param(query, "size=") as usize
}

/// The number after `name` (`size=`) in `query`, 0 when absent.
fn number_param(query: &str, name: &str) -> i64 {
    query
        .split('&')
        .find_map(|p| p.strip_prefix(name))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn serve(mut s: TcpStream, seen: Arc<Mutex<Vec<String>>>) {
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        // One head.
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        let len = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            })
            .unwrap_or(0);
        // A chunked body (the sidecar's streamed uploads) runs to its last
        // chunk; this upstream's tests send no trailers.
        let chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        let body_end = |buf: &[u8]| -> Option<usize> {
            if !chunked {
                return (buf.len() >= end + len).then_some(end + len);
            }
            let body = &buf[end..];
            if body.starts_with(b"0\r\n\r\n") {
                return Some(end + 5);
            }
            body.windows(7)
                .position(|w| w == b"\r\n0\r\n\r\n")
                .map(|i| end + i + 7)
        };
        let len = loop {
            if let Some(e) = body_end(&buf) {
                break e - end;
            }
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let request: Vec<u8> = buf.drain(..end + len).collect();
        let text = String::from_utf8_lossy(&request).into_owned();
        let endless = text.contains(RAW_ENDLESS_APPID);
        let reissue = text.contains(RAW_REISSUE_APPID);
        seen.lock().push(text);
        let target = head.split(' ').nth(1).unwrap_or("/").to_string();
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let mut out = Vec::new();
        let mut extra = String::new();
        // The reason phrase: the target itself (token and all) on `/reason`.
        let mut reason = "X".to_string();
        let (status, body) = if path.contains("token") {
            // RAW_ENDLESS_APPID's token claims to live 2^64 - 1 seconds.
            let life = if endless { u64::MAX } else { 7200 };
            let token = match reissue {
                true => {
                    let n = seen
                        .lock()
                        .iter()
                        .filter(|r| r.contains(RAW_REISSUE_APPID))
                        .count();
                    format!("{RAW_TOKEN}-{n}")
                }
                false => RAW_TOKEN.to_string(),
            };
            (
                200,
                format!(r#"{{"access_token":"{token}","expires_in":{life}}}"#),
            )
        } else if path.contains("/revoked") {
            // WeChat revoked the token in between: 40001 to the first of
            // each pair of requests with the same `m=` marker, the replay
            // after a refresh is served.
            let marker = query
                .split('&')
                .find_map(|p| p.strip_prefix("m="))
                .unwrap_or("-");
            let n = seen.lock().iter().filter(|r| r.contains(marker)).count();
            match n % 2 {
                1 => (
                    200,
                    r#"{"errcode":40001,"errmsg":"invalid credential"}"#.to_string(),
                ),
                _ => (200, r#"{"errcode":0,"errmsg":"ok"}"#.to_string()),
            }
        } else if let Some((_, code)) = path.split_once("/status/") {
            // An answer with any status line at all (000, 101, 999).
            let wire = format!("HTTP/1.1 {code} X\r\nContent-Length: 2\r\n\r\n{{}}");
            if s.write_all(wire.as_bytes()).is_err() {
                return;
            }
            continue;
        } else if path.contains("/gzipped") {
            // Coded although identity was asked for (the bytes are not gzip:
            // the sidecar must not pass them on either way).
            extra = "Content-Encoding: gzip\r\n".into();
            (200, format!(r#"{{"echo":"{query}"}}"#))
        } else if path.contains("/hop") {
            // A header its Connection names: hop-by-hop, for us alone.
            extra =
                "Connection: keep-alive, X-Hop\r\nX-Hop: for-the-sidecar\r\nSet-Cookie: a=b\r\n"
                    .into();
            (200, r#"{"errcode":0,"errmsg":"ok"}"#.to_string())
        } else if path.contains("/reason") {
            reason = target.clone();
            (200, r#"{"errcode":0,"errmsg":"ok"}"#.to_string())
        } else if path.contains("/pct-redirect") {
            // The query percent-encoded, every other byte, hex case mixed.
            let mut encoded = String::new();
            for (i, b) in query.bytes().enumerate() {
                match i % 4 {
                    0 => encoded.push_str(&format!("%{b:02X}")),
                    2 => encoded.push_str(&format!("%{b:02x}")),
                    _ => encoded.push(b as char),
                }
            }
            extra = format!("Location: https://elsewhere.example/landing?q={encoded}\r\n");
            (302, r#"{"errcode":0,"errmsg":"moved"}"#.to_string())
        } else if path.contains("/redirect") {
            extra = format!("Location: https://elsewhere.example/landing?{query}\r\n");
            (302, r#"{"errcode":0,"errmsg":"moved"}"#.to_string())
        } else if path.contains("/echo") {
            // `size=N` pads it to over N bytes (streamed past buffered_body).
            // `errcode=N`: that errcode, the target echoed in its errmsg.
            let errcode = number_param(query, "errcode=");
            let errmsg = if errcode == 0 {
                "ok".to_string()
            } else {
                format!("echo {target}")
            };
            let mut echo = serde_json::json!({"errcode":errcode,"errmsg":errmsg,"target":target});
            let size = size_param(query);
            if size > 0 {
                echo["pad"] = "x".repeat(size).into();
            }
            (200, echo.to_string())
        } else if path.contains("/slow") {
            // A 40-byte answer, one byte every 200 ms.
            let head =
                "HTTP/1.1 200 X\r\nContent-Type: application/json\r\nContent-Length: 40\r\n\r\n";
            if s.write_all(head.as_bytes()).is_err() {
                return;
            }
            for _ in 0..40 {
                std::thread::sleep(Duration::from_millis(200));
                if s.write_all(b" ").is_err() {
                    return;
                }
            }
            continue;
        } else if path.contains("/chunked") {
            // Chunked, in pieces, with an extension and a trailer; a
            // `size=N` query makes the body N bytes.
            let size = size_param(query);
            let mut body = if size == 0 {
                r#"{"errcode":0,"errmsg":"ok","chunked":true}"#.to_string()
            } else {
                format!(r#"{{"errcode":0,"pad":"{}"}}"#, "x".repeat(size))
            };
            if query.contains("echo=1") {
                // The target, token and all, split over the 7-byte pieces.
                body = format!(r#"{{"target":"{target}","rest":{body}}}"#);
            }
            let mut wire = b"HTTP/1.1 200 X\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
            for piece in body.as_bytes().chunks(7) {
                wire.extend_from_slice(format!("{:x};ext=1\r\n", piece.len()).as_bytes());
                wire.extend_from_slice(piece);
                wire.extend_from_slice(b"\r\n");
            }
            wire.extend_from_slice(b"0\r\nX-Trailer: t\r\n\r\n");
            if s.write_all(&wire).is_err() {
                return;
            }
            continue;
        } else if path.contains("/big") {
            let size = size_param(query);
            let errcode = number_param(query, "errcode=");
            (
                200,
                format!(r#"{{"errcode":{errcode},"pad":"{}"}}"#, "x".repeat(size)),
            )
        } else if path.contains("/flood") {
            for _ in 0..1000 {
                out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
            }
            (200, r#"{"errcode":0,"errmsg":"ok"}"#.to_string())
        } else {
            (200, r#"{"errcode":0,"errmsg":"ok"}"#.to_string())
        };
        out.extend_from_slice(
            format!(
                "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
        if s.write_all(&out).is_err() {
            return;
        }
    }
}
