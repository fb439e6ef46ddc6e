//! Privacy: settings (who sees a user's last seen and online status, profile photo and read
//! receipts) and blocking. Both are events first (`privacy.updated`, `user.blocked`,
//! `user.unblocked`), projected into `privacy_settings` and `blocks`; the endpoints answer once
//! the projection shows the change, so the next request of the user already obeys it.
//!
//! The rules (docs/protocol.md §16):
//! - An audience is `everyone`, `contacts` (the other members of direct conversations in which
//!   both wrote) or `nobody`; a user the owner blocked is never in it, and the owner always is.
//! - A user who never set anything has last seen and photo for `contacts`, read receipts for
//!   `everyone`.
//! - Read receipts are reciprocal: a direct conversation's read sends a receipt only when the
//!   reader's setting admits the sender and the sender's admits the reader. Decided when the
//!   read happens and recorded in the event (`private`), so a later change of setting neither
//!   reveals nor hides a read that happened before. Group read receipts are always on.
//! - A blocked user's direct messages to the blocker are accepted as usual (they get their
//!   `sent` tick) and withheld: kept in the sender's own history and never delivered, even after
//!   an unblock. The blocker cannot message the blocked user (`blocked`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use axum::http::StatusCode;
use chat_events::{Audience, Envelope, Event, EventId, PrivacyUpdated, UserBlocked, UserId};
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::service::Chat;

/// How long a privacy endpoint waits for the projection to show its change before it answers
/// anyway (the change is durable in the log and takes effect when the projection catches up).
const PROJECTION_WAIT: Duration = Duration::from_secs(5);

/// At most this many blocks are listed (and kept: a block beyond it is refused).
pub const MAX_BLOCKS: usize = 10_000;

/// The block state of the pairs this node read last (either direction), for sends while the
/// table store does not answer: a send needs the log, not the tables (docs/architecture.md,
/// "Privacy and blocking").
#[derive(Default)]
pub struct BlockCache(Mutex<HashMap<(UserId, UserId), bool>>);

/// Pairs kept in a [`BlockCache`] (then it starts again, empty).
const BLOCK_CACHE_MAX: usize = 100_000;

impl BlockCache {
    fn get(&self, user: UserId, target: UserId) -> Option<bool> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).get(&(user, target)).copied()
    }

    fn put(&self, user: UserId, target: UserId, blocked: bool) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= BLOCK_CACHE_MAX {
            m.clear();
        }
        m.insert((user, target), blocked);
    }
}

/// A user's privacy settings as the API shows them.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct PrivacySettings {
    pub last_seen: Audience,
    pub photo: Audience,
    pub read_receipts: Audience,
}

impl From<PrivacyUpdated> for PrivacySettings {
    fn from(p: PrivacyUpdated) -> Self {
        PrivacySettings { last_seen: p.last_seen, photo: p.photo, read_receipts: p.read_receipts }
    }
}

/// A change of settings: the ones given change, the others stay.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyChange {
    #[serde(default)]
    pub last_seen: Option<String>,
    #[serde(default)]
    pub photo: Option<String>,
    #[serde(default)]
    pub read_receipts: Option<String>,
}

/// One blocked user.
#[derive(Debug, Serialize)]
pub struct Blocked {
    pub user_id: UserId,
    pub username: String,
    pub blocked_at: String,
}

/// What a privacy setting governs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shown {
    LastSeen,
    Photo,
    ReadReceipts,
}

fn audience(value: Option<&str>, current: Audience) -> Result<Audience, ApiError> {
    match value {
        None => Ok(current),
        Some(v) => Audience::parse(v)
            .ok_or_else(|| ApiError::bad_request("invalid_privacy", "a privacy setting is everyone, contacts or nobody")),
    }
}

impl Chat {
    /// A user's settings (the defaults when never set).
    pub async fn privacy(&self, user: UserId) -> Result<PrivacyUpdated, ApiError> {
        Ok(match self.store.privacy(user).await? {
            Some(r) => PrivacyUpdated { user_id: user, last_seen: r.last_seen, photo: r.photo, read_receipts: r.read_receipts },
            None => PrivacyUpdated::defaults(user),
        })
    }

    /// Changes the caller's settings; answers with all of them once they are in effect.
    pub async fn set_privacy(&self, user: UserId, change: PrivacyChange) -> Result<PrivacySettings, ApiError> {
        let now = self.privacy(user).await?;
        let next = PrivacyUpdated {
            user_id: user,
            last_seen: audience(change.last_seen.as_deref(), now.last_seen)?,
            photo: audience(change.photo.as_deref(), now.photo)?,
            read_receipts: audience(change.read_receipts.as_deref(), now.read_receipts)?,
        };
        let env = Envelope::new(EventId::new_v7(), Some(user), Event::PrivacyUpdated(next));
        self.append(&env).await?;
        self.until_projected(|| async { Ok(self.store.privacy(user).await?.is_some_and(|r| r.updated_at >= env.occurred_at)) }).await?;
        Ok(next.into())
    }

    /// Blocks (`blocked`) or unblocks a user; answers once in effect. Blocking twice, or
    /// unblocking someone not blocked, changes nothing.
    pub async fn set_block(&self, user: UserId, target: &str, blocked: bool) -> Result<(), ApiError> {
        let target: UserId = target.parse().map_err(|_| ApiError::not_found())?;
        if target == user {
            return Err(ApiError::bad_request("invalid_block", "you cannot block yourself"));
        }
        if !self.user_exists(target).await? {
            return Err(ApiError::not_found());
        }
        if self.blocks(user, target).await? == blocked {
            return Ok(());
        }
        if blocked && self.store.blocks(user, MAX_BLOCKS).await?.len() >= MAX_BLOCKS {
            return Err(ApiError::new(StatusCode::CONFLICT, "too_many_blocks", format!("at most {MAX_BLOCKS} users can be blocked")));
        }
        let b = UserBlocked { user_id: user, target };
        let env = Envelope::new(EventId::new_v7(), Some(user), if blocked { Event::UserBlocked(b) } else { Event::UserUnblocked(b) });
        self.append(&env).await?;
        self.until_projected(|| async { Ok(self.store.block(user, target).await?.is_some_and(|r| r.at >= env.occurred_at)) }).await?;
        self.block_cache.put(user, target, blocked);
        Ok(())
    }

    /// For a direct send from `sender` to `peer`: (the sender blocks the peer, the peer blocks the
    /// sender). When the table store does not answer: the pair's state as this node last read it,
    /// else neither, so that sends keep being accepted while the tables are down (a block this
    /// node never saw is then not applied to them; the outage is logged).
    pub(crate) async fn send_blocks(&self, sender: UserId, peer: UserId) -> (bool, bool) {
        match tokio::try_join!(self.store.block(sender, peer), self.store.block(peer, sender)) {
            Ok((mine, theirs)) => {
                let (mine, theirs) = (mine.is_some_and(|b| b.blocked), theirs.is_some_and(|b| b.blocked));
                self.block_cache.put(sender, peer, mine);
                self.block_cache.put(peer, sender, theirs);
                (mine, theirs)
            }
            Err(e) => {
                // Logged (once per outage) by the conversion.
                let _ = ApiError::from(e);
                (self.block_cache.get(sender, peer).unwrap_or(false), self.block_cache.get(peer, sender).unwrap_or(false))
            }
        }
    }

    /// The users the caller blocks, by user id.
    pub async fn blocked_users(&self, user: UserId) -> Result<Vec<Blocked>, ApiError> {
        let rows = self.store.blocks(user, MAX_BLOCKS).await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let username = self.store.account_by_id(r.target).await?.unwrap_or_default();
            out.push(Blocked { user_id: r.target, username, blocked_at: chat_events::format_time(&r.at) });
        }
        Ok(out)
    }

    /// Whether `user` blocks `target` now.
    pub async fn blocks(&self, user: UserId, target: UserId) -> Result<bool, ApiError> {
        Ok(self.store.block(user, target).await?.is_some_and(|r| r.blocked))
    }

    /// Whether `viewer` may see `what` of `owner`, by the owner's setting.
    pub async fn shown(&self, owner: UserId, viewer: UserId, what: Shown) -> Result<bool, ApiError> {
        if owner == viewer {
            return Ok(true);
        }
        let settings = self.privacy(owner).await?;
        let audience = match what {
            Shown::LastSeen => settings.last_seen,
            Shown::Photo => settings.photo,
            Shown::ReadReceipts => settings.read_receipts,
        };
        self.admits(owner, viewer, audience).await
    }

    /// Whether `viewer` is in `owner`'s `audience` (never when the owner blocks the viewer).
    async fn admits(&self, owner: UserId, viewer: UserId, audience: Audience) -> Result<bool, ApiError> {
        if owner == viewer {
            return Ok(true);
        }
        if audience == Audience::Nobody || self.blocks(owner, viewer).await? {
            return Ok(false);
        }
        Ok(match audience {
            Audience::Everyone => true,
            Audience::Contacts => self.are_contacts(owner, viewer).await?,
            Audience::Nobody => false,
        })
    }

    /// Whether a read of a direct conversation by `reader` sends its receipt to the other member
    /// (reciprocal: both settings must admit the other). The defaults (everyone) need no
    /// contact lookup.
    pub(crate) async fn read_receipt_sent(&self, reader: UserId, sender: UserId) -> Result<bool, ApiError> {
        let (mine, theirs) = tokio::try_join!(self.privacy(reader), self.privacy(sender))?;
        Ok(self.admits(reader, sender, mine.read_receipts).await? && self.admits(sender, reader, theirs.read_receipts).await?)
    }

    /// Who is told of `user`'s presence changes: the other members of their direct
    /// conversations that the last-seen setting admits.
    pub(crate) async fn presence_audience(&self, user: UserId) -> Result<Vec<UserId>, ApiError> {
        let settings = self.privacy(user).await?;
        let peers: Vec<UserId> = match settings.last_seen {
            Audience::Nobody => return Ok(Vec::new()),
            Audience::Contacts => self.contacts(user).await?,
            Audience::Everyone => self.store.inbox(user, 1000).await?.into_iter().filter_map(|r| r.peer_id).collect(),
        };
        if peers.is_empty() {
            return Ok(peers);
        }
        let blocked: std::collections::HashSet<UserId> = self.store.blocks(user, MAX_BLOCKS).await?.into_iter().map(|r| r.target).collect();
        Ok(peers.into_iter().filter(|p| !blocked.contains(p)).collect())
    }

    /// Waits, bounded, until `done` says the projection shows a change just appended.
    async fn until_projected<F, Fut>(&self, done: F) -> Result<(), ApiError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<bool, ApiError>>,
    {
        let deadline = tokio::time::Instant::now() + PROJECTION_WAIT;
        let mut step = Duration::from_millis(5);
        while !done().await? {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!("privacy change not projected within {PROJECTION_WAIT:?}; it takes effect when the projection catches up");
                return Ok(());
            }
            tokio::time::sleep(step).await;
            step = (step * 2).min(Duration::from_millis(100));
        }
        Ok(())
    }
}
