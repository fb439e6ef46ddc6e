//! Accounts, presence and profiles: `users`, `last_seen`, `profiles`.

use chat_events::{Envelope, PresenceChanged, PresenceStatus, ProfileUpdated, UserRegistered};
use chat_store::{ProfileRow, Write};

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
