//! wxsidecar: a pingora sidecar that owns WeChat access tokens for the apps
//! behind it. README.md says what it does, ARCHITECTURE.md how the modules
//! fit together; each module opens with why it exists.
//!
//! Public: what the binary (`cli`), the tests and the benches use; the rest
//! is the crate's own.
#![forbid(unsafe_code)]

// Layer 0, the certificates, the counters and the leases live in crates of
// their own (crates/): the compiler keeps them from knowing anything above.
pub use wxsidecar_certs as certs;
pub use wxsidecar_config as config;
pub use wxsidecar_core::{head, inspect, msgcrypt, query, refusal, secret, target};
pub(crate) use wxsidecar_lease as lease;
pub(crate) use wxsidecar_metrics as metrics;
pub(crate) use wxsidecar_upstream as upstream;
pub(crate) use wxsidecar_upstream::failover;

pub mod account;
pub(crate) mod admin;
pub(crate) mod app;
pub mod cli;
pub(crate) mod clients;
#[cfg(feature = "fake")]
pub(crate) mod demo;
pub(crate) mod egress;
#[cfg(feature = "fake")]
pub(crate) use wxsidecar_fake as fake;
pub(crate) mod forward;
pub mod generation;
pub(crate) mod guard;
pub(crate) mod intercept;
pub(crate) mod jssdk;
pub(crate) mod lifecycle;
pub(crate) mod local;
pub mod logging;
pub(crate) mod pipeline;
pub(crate) mod platform;
#[cfg(feature = "profiling")]
pub(crate) mod profile;
pub(crate) mod proxy;
pub(crate) mod quota;
pub(crate) mod refresh;
pub(crate) mod reload;
pub(crate) mod reply;
pub mod route;
pub(crate) mod server;
pub mod status;
pub(crate) mod ticket;
