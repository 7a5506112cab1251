//! Integration tests: the real binary over real sockets, through the fake
//! WeChat over TLS. One test binary to save link time.

// They time real processes over real sockets: the wall clock is theirs
// (the product's deadlines are on tokio's clock, `.clippy.toml`).
#![allow(clippy::disallowed_types)]

mod admin;
mod architecture;
mod clients;
mod config;
mod deploy;
mod differential;
mod docs;
mod egress;
mod failover;
mod failures;
mod forward_proxy;
mod hardening;
mod http2;
mod intercept;
mod lifecycle;
mod limits;
mod path;
mod platform;
mod platform_callbacks;
mod pool;
mod quota;
mod raw;
mod reload;
mod replay;
mod store;
mod streaming;
mod support;
mod tickets;
mod tokens;
mod wecom;
