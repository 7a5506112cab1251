//! A refusal in WeChat's own words: HTTP 200 with WeChat's errcode for the
//! same mistake, as WeChat answers it (local token and ticket endpoints).

use bytes::Bytes;

/// A WeChat-style refusal: HTTP 200 with an errcode, as WeChat does.
pub struct Refusal {
    pub errcode: i64,
    pub errmsg: &'static str,
}

impl Refusal {
    pub fn body(&self) -> Bytes {
        Bytes::from(
            serde_json::json!({ "errcode": self.errcode, "errmsg": self.errmsg }).to_string(),
        )
    }
}
