//! Ended sessions. Tokens are stateless (signed, with an expiry), so ending one before it expires
//! needs state that every node sees: the `session_revocations` table (command side), "every token
//! of user U issued at or before time T is refused". A role change and a log-out everywhere write
//! one; every node reads the recent ones every [`POLL`] (one small partition read per node, not
//! per request or per user), refuses the ended tokens from then on and closes their open sockets.
//! So a revocation takes effect on every node within about [`POLL`] plus a read.
//!
//! A node that starts reads the revocations of the last token lifetime before it serves (older
//! ones only name expired tokens). Clocks: a revocation carries the writer's time and a token its
//! issuer's; a node issues a user's new token after the latest revocation it knows of, and
//! re-reads [`OVERLAP`] into the past on every poll, so clocks apart by less than that do not
//! lose a revocation (keep the nodes' clocks synchronised, as for message times).

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use chat_events::UserId;
use chat_store::{InsightStore, StoreResult};
use chrono::{DateTime, Utc};

use crate::auth::Principal;

/// How often a node reads new revocations.
pub const POLL: Duration = Duration::from_secs(2);
/// How far before the previous read each read starts again (late writes, clock differences).
pub const OVERLAP: chrono::Duration = chrono::Duration::seconds(60);

/// The revocations this node knows of, by user: the latest time (ms) at or before which the
/// user's tokens are ended.
pub struct Revocations {
    ended: RwLock<HashMap<UserId, i64>>,
    /// Where the next read starts; none before the first.
    next_from: Mutex<Option<DateTime<Utc>>>,
    /// The token lifetime: revocations older than it name only expired tokens.
    keep: chrono::Duration,
}

impl Revocations {
    pub fn new(token_ttl: chrono::Duration) -> Self {
        Revocations { ended: RwLock::new(HashMap::new()), next_from: Mutex::new(None), keep: token_ttl }
    }

    /// Whether the principal's token was ended by a revocation this node knows of.
    pub fn ended(&self, p: &Principal) -> bool {
        self.latest(p.user_id).is_some_and(|at| p.issued_at_ms <= at)
    }

    /// The user's latest revocation (ms), if any: a new token is issued after it.
    pub fn latest(&self, user: UserId) -> Option<i64> {
        self.ended.read().unwrap_or_else(|p| p.into_inner()).get(&user).copied()
    }

    /// Notes a revocation; true when it is newer than what was known for the user.
    pub fn note(&self, user: UserId, at_ms: i64) -> bool {
        let mut map = self.ended.write().unwrap_or_else(|p| p.into_inner());
        let e = map.entry(user).or_insert(i64::MIN);
        if at_ms > *e {
            *e = at_ms;
            true
        } else {
            false
        }
    }

    /// Reads the revocations written since the last read (the last token lifetime on the first
    /// read) and returns the ones that are news to this node, to close their sockets. Revocations
    /// older than a token lifetime are forgotten.
    pub async fn refresh(&self, store: &dyn InsightStore) -> StoreResult<Vec<(UserId, i64)>> {
        let started = Utc::now();
        let from = self.next_from.lock().unwrap_or_else(|p| p.into_inner()).unwrap_or(started - self.keep);
        let rows = store.revocations_since(from).await?;
        let news: Vec<(UserId, i64)> =
            rows.into_iter().map(|(u, at)| (u, at.timestamp_millis())).filter(|&(u, at)| self.note(u, at)).collect();
        let horizon = (started - self.keep).timestamp_millis();
        self.ended.write().unwrap_or_else(|p| p.into_inner()).retain(|_, at| *at >= horizon);
        *self.next_from.lock().unwrap_or_else(|p| p.into_inner()) = Some(started - OVERLAP);
        Ok(news)
    }

    /// Users with a revocation known (for metrics and tests).
    pub fn len(&self) -> usize {
        self.ended.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn principal(user: UserId, issued_at_ms: i64) -> Principal {
        Principal { user_id: user, username: "u".into(), expires_at: Utc::now(), issued_at_ms, roles: Vec::new() }
    }

    #[test]
    fn a_revocation_ends_the_tokens_issued_at_or_before_it() {
        let r = Revocations::new(chrono::Duration::hours(24));
        let (u, v) = (UserId::random(), UserId::random());
        assert!(!r.ended(&principal(u, 1_000)));
        assert!(r.note(u, 2_000));
        assert!(r.ended(&principal(u, 1_000)) && r.ended(&principal(u, 2_000)));
        assert!(!r.ended(&principal(u, 2_001)), "a token issued after the revocation is valid");
        assert!(!r.ended(&principal(v, 1_000)), "per user");
        assert!(!r.note(u, 1_500), "an older revocation is no news");
        assert!(!r.note(u, 2_000), "nor a repeat");
        assert_eq!(r.latest(u), Some(2_000));
    }
}
