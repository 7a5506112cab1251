//! Third-party platforms (开放平台第三方平台): one sidecar holds the
//! component token and the tokens of the accounts that authorised it.

pub mod crypto;
