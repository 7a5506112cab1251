//! Tickets: the JS-SDK `jsapi_ticket`, the card `wx_card` ticket and WeCom's
//! corp `jsapi_ticket` and app `agent_config` ticket, owned like tokens.
//!
//! A ticket's cell is made on first use (an app asking for it, or the JS-SDK
//! helper) and from then on kept fresh by its own refresher: the token's
//! machinery — single flight, backoff, daily budget, the Redis store — with
//! the ticket's own expiry. A new token leaves the ticket alone: WeChat keeps
//! them independent. Nothing here logs a ticket.

pub mod answer;

use std::sync::{Arc, OnceLock};

use crate::config::AccountKind;
use crate::lease::LeaseCell;

/// The tickets WeChat issues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TicketKind {
    /// JS-SDK `wx.config` (Official Account), or WeCom's corp ticket.
    Jsapi,
    /// Card and coupon JS API (Official Account).
    WxCard,
    /// WeCom's `wx.agentConfig` (per app).
    AgentConfig,
}

impl TicketKind {
    pub const ALL: [TicketKind; 3] = [
        TicketKind::Jsapi,
        TicketKind::WxCard,
        TicketKind::AgentConfig,
    ];

    /// WeChat's `type` value.
    pub fn as_str(self) -> &'static str {
        match self {
            TicketKind::Jsapi => "jsapi",
            TicketKind::WxCard => "wx_card",
            TicketKind::AgentConfig => "agent_config",
        }
    }

    /// From WeChat's `type` value.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    fn slot(self) -> usize {
        self as usize
    }

    /// Whether an account of `kind` has this ticket.
    pub fn exists_for(self, kind: AccountKind) -> bool {
        matches!(
            (kind, self),
            (_, TicketKind::Jsapi)
                | (AccountKind::Official, TicketKind::WxCard)
                | (AccountKind::WeCom, TicketKind::AgentConfig)
        )
    }

    /// For logs and errors: "jsapi ticket".
    pub fn what(self) -> &'static str {
        match self {
            TicketKind::Jsapi => "jsapi ticket",
            TicketKind::WxCard => "wx_card ticket",
            TicketKind::AgentConfig => "agent_config ticket",
        }
    }
}

/// An account's tickets, each made on first use; the slots themselves too,
/// as most accounts never use a ticket (8 bytes each instead of 48).
#[derive(Default)]
pub struct Tickets {
    cells: once_cell::race::OnceBox<[OnceLock<Arc<LeaseCell>>; 3]>,
}

impl Tickets {
    /// The cell of a ticket already in use.
    pub fn get(&self, kind: TicketKind) -> Option<&Arc<LeaseCell>> {
        self.cells.get()?[kind.slot()].get()
    }

    /// The cell of a ticket, made now if it is not in use yet; `true` when
    /// it was made by this call (its refresher must then be started).
    pub fn get_or_make(&self, kind: TicketKind) -> (&Arc<LeaseCell>, bool) {
        let slot = &self.cells.get_or_init(Box::default)[kind.slot()];
        if let Some(c) = slot.get() {
            return (c, false);
        }
        let mut made = false;
        let c = slot.get_or_init(|| {
            made = true;
            Arc::new(LeaseCell::for_ticket(Default::default()))
        });
        (c, made)
    }

    /// The tickets in use, for `/status`, `/metrics` and the store watcher.
    pub fn in_use(&self) -> impl Iterator<Item = (TicketKind, &Arc<LeaseCell>)> {
        TicketKind::ALL
            .into_iter()
            .filter_map(|k| self.get(k).map(|c| (k, c)))
    }
}
