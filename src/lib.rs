//! wxsidecar: a pingora sidecar that owns WeChat access tokens for the apps
//! behind it. See README.md for what it does and `../shared/design.md`-style
//! notes in each module for why.
#![forbid(unsafe_code)]

pub mod account;
pub mod admin;
pub mod app;
pub mod certs;
pub mod cli;
pub mod clients;
pub mod config;
#[cfg(feature = "fake")]
pub mod demo;
pub mod effective;
pub mod failover;
#[cfg(feature = "fake")]
pub mod fake;
pub mod forward;
pub mod guard;
pub mod inspect;
pub mod intercept;
pub mod jssdk;
pub mod lifecycle;
pub mod local;
pub mod logging;
pub mod metrics;
#[cfg(feature = "profiling")]
pub mod profile;
pub mod proxy;
pub mod query;
pub mod refresh;
pub mod refusal;
pub mod reply;
pub mod route;
pub mod secret;
pub mod server;
pub mod status;
pub mod target;
pub mod ticket;
pub mod token;
pub mod upstream;
