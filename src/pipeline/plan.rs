//! Which account a request is for and whether the sidecar puts its token
//! in: the token rule, once.

use std::sync::Arc;

use crate::account::{Account, PickError};
use crate::app::App;
use crate::config::{Family, ReplaceTokens};
use crate::lease::{Lease, LeaseCell};
use crate::query;

/// Where a request goes and with which token.
pub(crate) struct Plan {
    /// Which upstream family the request goes to.
    pub family: Family,
    /// The account whose token the sidecar put in (none: untouched, or a
    /// platform's component token, see `cell`): its calls are counted and
    /// capped, its answers noted.
    pub account: Option<Arc<Account>>,
    /// The token the sidecar put in (none: untouched); masked in the answer.
    pub token: Option<Arc<Lease>>,
    /// The query parameter `token` goes in (`access_token`, or a
    /// platform's `component_access_token`).
    pub token_param: &'static str,
    /// Where `token` came from when no account holds it (a platform's
    /// component token): reported to and refreshed through this cell.
    pub cell: Option<Arc<LeaseCell>>,
}

impl Plan {
    /// As the app sent it.
    pub fn untouched(family: Family) -> Self {
        Plan {
            family,
            account: None,
            token: None,
            token_param: query::TOKEN_PARAM,
            cell: None,
        }
    }

    /// `account`'s `token` put in.
    pub fn with_token(account: Arc<Account>, token: Arc<Lease>) -> Self {
        Plan {
            family: account.kind.family(),
            account: Some(account),
            token: Some(token),
            token_param: query::TOKEN_PARAM,
            cell: None,
        }
    }

    /// Writes the target WeChat gets: `path`, and `query` with our token in
    /// it (replacing the app's) when the plan has one.
    pub fn target(&self, path: &str, query: Option<&str>, out: &mut Vec<u8>) {
        out.extend_from_slice(path.as_bytes());
        match (&self.token, query) {
            (Some(t), q) => {
                out.push(b'?');
                query::push_with_param(out, q, self.token_param, &t.value);
            }
            (None, Some(q)) => {
                out.push(b'?');
                out.extend_from_slice(q.as_bytes());
            }
            (None, None) => {}
        }
    }

    /// [`Self::target`] as a string (a streamed upload's request header).
    pub fn target_string(&self, path: &str, query: Option<&str>) -> String {
        let mut out = Vec::with_capacity(path.len() + query.map_or(0, str::len) + 200);
        self.target(path, query, &mut out);
        String::from_utf8(out).expect("made of str parts")
    }

    /// The cell the token came from: reported to when WeChat rejects it.
    pub(super) fn cell(&self) -> Option<&LeaseCell> {
        self.cell
            .as_deref()
            .or(self.account.as_ref().map(|a| &*a.tokens))
    }

    pub(super) fn count_replay(&self, path: &str, ok: bool) {
        if let Some(a) = &self.account {
            a.replays.inc(ok);
            if !ok {
                tracing::warn!(account = %a.name, path, "token rejected again after a refresh; passing WeChat's answer through");
            }
        }
    }
}

/// The token rule: the sidecar puts its token in when the app presented
/// none, presented one the sidecar issued, or the account says
/// `replace_tokens: always`. A token the app brought itself otherwise
/// goes through untouched: not ours to touch.
pub(crate) fn replaces(app: &App, account: &Account, presented: Option<&str>) -> bool {
    match presented {
        None => true,
        Some(t) => {
            account.replace_tokens() == ReplaceTokens::Always
                || app.accounts().by_issued_token(t).is_some()
        }
    }
}

/// The account a request is for (`X-Wx-Account`, else the token it
/// presented, else the default one of `family`) and whether the sidecar
/// puts its token in ([`replaces`]).
pub(crate) fn choose(
    app: &App,
    named: Option<&str>,
    presented: Option<&str>,
    family: Option<Family>,
) -> Result<(Arc<Account>, bool), PickError> {
    let account = app.accounts().pick_for(named, presented, family)?.clone();
    let replace = replaces(app, &account, presented);
    Ok((account, replace))
}
