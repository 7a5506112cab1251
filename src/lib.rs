//! wxsidecar: a pingora sidecar that owns WeChat access tokens for the apps
//! behind it. README.md says what it does, ARCHITECTURE.md how the modules
//! fit together; each module opens with why it exists.
//!
//! Public: what the binary (`cli`), the tests and the benches use; the rest
//! is the crate's own.
#![forbid(unsafe_code)]

pub mod account;
pub(crate) mod admin;
pub(crate) mod app;
pub mod certs;
pub mod cli;
pub(crate) mod clients;
pub mod config;
#[cfg(feature = "fake")]
pub(crate) mod demo;
pub(crate) mod egress;
pub(crate) mod failover;
#[cfg(feature = "fake")]
pub(crate) mod fake;
pub(crate) mod forward;
pub mod generation;
pub(crate) mod guard;
pub mod head;
pub mod inspect;
pub(crate) mod intercept;
pub(crate) mod jssdk;
pub(crate) mod lease;
pub(crate) mod lifecycle;
pub(crate) mod local;
pub mod logging;
pub(crate) mod metrics;
pub mod msgcrypt;
pub(crate) mod pipeline;
pub(crate) mod platform;
#[cfg(feature = "profiling")]
pub(crate) mod profile;
pub(crate) mod proxy;
pub mod query;
pub(crate) mod quota;
pub(crate) mod refresh;
pub(crate) mod refusal;
pub(crate) mod reload;
pub(crate) mod reply;
pub mod route;
pub mod secret;
pub(crate) mod server;
pub mod status;
pub(crate) mod target;
pub(crate) mod ticket;
pub(crate) mod upstream;
