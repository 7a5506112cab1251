//! The request path's rules, written once for both fronts (the fast lane,
//! `proxy::fast`, and pingora's HTTP session, `proxy`): a front parses a
//! request into something that is a [`Request`], asks for a [`Plan`], runs
//! [`exchange`], writes the [`Answer`] in its own framing and calls
//! [`report`]. Neither front holds a rule of its own.
//!
//! The stages and where each lives:
//! - admit: `clients` (who calls, at what rate; both fronts call it the
//!   same way), then the account's daily cap ([`exchange`]);
//! - plan: the account and the token rule ([`plan::choose`], [`Plan`]);
//! - send: [`exchange`] over `failover::Upstreams::send` (failover, pool,
//!   the one HTTP/1.1 exchange or an HTTP/2 stream);
//! - read the errcode, report a rejected token and replay once
//!   ([`exchange`]);
//! - scrub: [`Whole`] and [`Streaming`] give the answer's headers and body
//!   with our token out ([`scrub`]);
//! - count and log: [`report`].
//!
//! A streamed upload takes the same plan, cap, exchange and scrub through
//! [`upload`], its body read by the front ([`Pieces`]).

mod answer;
mod plan;
pub(crate) mod report;
pub(crate) mod scrub;
mod send;
mod upload;

pub(crate) use answer::{
    bodiless, connection_options, connection_tokens, Answer, Streaming, HOP_BY_HOP,
};
pub(crate) use plan::{choose, Plan};
pub(crate) use report::{refused, report, Report};
#[cfg(test)]
pub(crate) use send::outgoing;
pub(crate) use send::{exchange, forwarded, Request};
pub(crate) use upload::{upload, Pieces, Stop};
