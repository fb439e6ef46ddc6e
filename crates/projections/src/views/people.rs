//! Accounts, presence, profiles and privacy: `users`, `last_seen`, `profiles`,
//! `privacy_settings`, `blocks`.

use chat_events::{Envelope, PresenceChanged, PresenceStatus, PrivacyUpdated, ProfileUpdated, UserBlocked, UserRegistered};
use chat_store::{BlockRow, PrivacyRow, ProfileRow, Write};

pub fn registered(out: &mut Vec<Write>, env: &Envelope, u: &UserRegistered) {
    out.push(Write::User { user: u.user_id, username: u.username.clone(), at: env.occurred_at });
}

/// The latest change wins, in any replay order.
pub fn presence(out: &mut Vec<Write>, env: &Envelope, p: &PresenceChanged) {
    out.push(Write::Presence { user: p.user_id, online: p.status == PresenceStatus::Online, at: env.occurred_at });
}

/// The whole profile; the latest update by event time wins.
pub fn profile(out: &mut Vec<Write>, env: &Envelope, p: &ProfileUpdated) {
    out.push(Write::Profile(ProfileRow {
        user_id: p.user_id,
        display_name: p.display_name.clone(),
        avatar_media_id: p.avatar_media_id,
        updated_at: env.occurred_at,
    }));
}

/// The whole privacy settings; the latest update by event time wins.
pub fn privacy(out: &mut Vec<Write>, env: &Envelope, p: &PrivacyUpdated) {
    out.push(Write::Privacy(PrivacyRow {
        user_id: p.user_id,
        last_seen: p.last_seen,
        photo: p.photo,
        read_receipts: p.read_receipts,
        updated_at: env.occurred_at,
    }));
}

/// A block or an unblock of the actor's (an event naming another actor, or the user
/// themselves, is not one the gateway appends, and changes nothing); the latest by event time wins.
pub fn block(out: &mut Vec<Write>, env: &Envelope, b: &UserBlocked, blocked: bool) {
    if env.actor != Some(b.user_id) || b.user_id == b.target {
        return;
    }
    out.push(Write::Block(BlockRow { user_id: b.user_id, target: b.target, blocked, at: env.occurred_at }));
}
