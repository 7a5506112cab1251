//! Media: a 20 MB multipart upload and its download stream through the
//! sidecar, with the token added on the way.

use rand::RngCore;
use serde_json::Value;

use crate::support::*;

#[tokio::test]
async fn twenty_megabytes_up_and_down() {
    let fake = Fake::start(&[]);
    let side = Sidecar::start_standard(&fake, "stable", "stable").await;
    let mut data = vec![0u8; 20 * 1024 * 1024];
    rand::thread_rng().fill_bytes(&mut data);
    let (status, v) = side.upload(None, "big.bin", data.clone()).await;
    assert_eq!(status, 200, "{v}");
    let c = client();
    let media_id = v["media_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no media_id: {v}"))
        .to_string();
    assert_eq!(v["type"], "file");

    let r = c
        .get(side.url(&format!("/cgi-bin/media/get?media_id={media_id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let disposition = r.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(disposition.contains("big.bin"), "{disposition}");
    let got = r.bytes().await.unwrap();
    assert_eq!(got.len(), data.len());
    assert!(got[..] == data[..], "downloaded bytes differ");

    let seen = fake.requests().await;
    let upload = seen
        .iter()
        .find(|r| r["path"] == "/cgi-bin/media/upload")
        .unwrap();
    assert!(upload["body_len"].as_u64().unwrap() > 20 * 1024 * 1024);
    // Counted in the quota ledger like any call.
    let (_, q) = side
        .admin_get("/quota?account=shop&path=/cgi-bin/media/upload")
        .await;
    assert_eq!(q["ours"][0]["calls"], 1, "{q}");
    assert!(
        upload["access_token"].as_str().is_some(),
        "token added on the streaming path"
    );
    // A JSON error from the media path (bad media_id) passes through too.
    let r = c
        .get(side.url("/cgi-bin/media/get?media_id=nope"))
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["errcode"], 40007);
}

/// The fake's QR code image: a fixed pattern the test can recompute.
fn qrcode_bytes() -> Vec<u8> {
    (0..256 * 1024)
        .map(|i: usize| (i.wrapping_mul(31).wrapping_add(7) % 251) as u8)
        .collect()
}

#[tokio::test]
async fn binary_answer_on_the_json_path_streams_past_the_buffer_cap() {
    // /wxa/getwxacodeunlimit is a JSON API that answers an image: it goes the
    // buffered way, and an answer over limits.buffered_body is streamed.
    let fake = Fake::start(&[]);
    let cfg = format!(
        "{}limits:\n  buffered_body: 64KiB\n{}",
        upstream(),
        Sidecar::accounts("stable", "stable")
    );
    let side = Sidecar::start(&fake, &cfg).await;
    let r = client()
        .post(side.url("/wxa/getwxacodeunlimit"))
        .body(r#"{"scene":"a=1","width":430}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "image/jpeg");
    let got = r.bytes().await.unwrap();
    assert!(
        got[..] == qrcode_bytes()[..],
        "image differs ({} bytes)",
        got.len()
    );
    // The connection pool survived: the next call works.
    let (status, v) = side.send("/cgi-bin/message/template/send", TEMPLATE).await;
    assert_eq!((status, v["errcode"].as_i64()), (200, Some(0)), "{v}");
}

#[tokio::test]
async fn a_chunked_upload_goes_through_the_sidecars_own_pool() {
    use std::io::Write;
    let fake = Fake::start(&[]);
    let side = Sidecar::start_standard(&fake, "stable", "stable").await;
    let counted = |s: &wxsidecar::status::Status| s.upstream.hosts[0].requests;
    let before = counted(&side.typed_status().await);
    let data = "x".repeat(100_000);
    let body = format!(
        "--XyZ\r\nContent-Disposition: form-data; name=\"media\"; filename=\"a.bin\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n{data}\r\n--XyZ--\r\n"
    );
    let mut s = std::net::TcpStream::connect(("127.0.0.1", side.port)).unwrap();
    s.write_all(
        b"POST /cgi-bin/media/upload?type=file HTTP/1.1\r\nHost: x\r\n\
          Content-Type: multipart/form-data; boundary=XyZ\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .unwrap();
    // Three chunks, each size line apart from its data: the body is
    // streamed as it comes, and a read that brings only a size line (an
    // empty piece of body) must not end the body upstream.
    for part in [&body[..10], &body[10..50_000], &body[50_000..]] {
        write!(s, "{:x}\r\n", part.len()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(30));
        write!(s, "{part}\r\n").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(30));
    }
    s.write_all(b"0\r\n\r\n").unwrap();
    let answer = crate::raw::read_until_quiet(&mut s, std::time::Duration::from_secs(1));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("media_id"), "{answer}");
    let seen = fake.requests().await;
    let upload = seen
        .iter()
        .find(|r| r["path"] == "/cgi-bin/media/upload")
        .unwrap();
    assert_eq!(upload["body_len"].as_u64(), Some(body.len() as u64));
    assert!(upload["access_token"].as_str().is_some());
    // Counted on the host like every other request: one pool, one set of
    // counters (pingora's own connector would not have been).
    assert_eq!(counted(&side.typed_status().await) - before, 1);
}
