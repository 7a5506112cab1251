//! wxsidecar's core: the rules that need no runtime, no pingora and no
//! account — secrets that cannot be printed, query strings and request
//! targets, what a request head may be (RFC 9112), WeChat's errcodes and
//! refusals, WeChat's message encryption.
//!
//! It may not know: tokio, pingora, the configuration, accounts, tokens in
//! cells, metrics. The product crate re-exports each module under its own
//! name (`wxsidecar::secret`, …).
#![forbid(unsafe_code)]

pub mod head;
pub mod inspect;
pub mod msgcrypt;
pub mod query;
pub mod refusal;
pub mod secret;
pub mod target;
