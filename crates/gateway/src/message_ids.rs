//! Message ids that carry their own proof of origin.
//!
//! A message id is a UUIDv7 (time-ordered, so history pages sort by it) minted by the gateway
//! that accepts the send. Its 74 bits after the timestamp hold a 42-bit random nonce and a 32-bit
//! tag: HMAC-SHA256 under a key every gateway shares (derived from the token secret) of the
//! timestamp, the nonce, the conversation and, for direct conversations, the sender. So any
//! gateway can tell, with no lookup, whether an id a client names in `delivered` or `read` was
//! minted for that conversation (and, direct, by which member): a forged or borrowed id fails
//! the check (one guess in 2^32), and the gateway no longer writes an owner row per message
//! before the append. Ids minted before this scheme (or under another secret) fail the check
//! and are looked up in the message index instead.

use chat_events::{ConversationId, GroupId, MessageId, UserId};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// Mints and checks message ids.
#[derive(Clone)]
pub struct MessageIds {
    key: [u8; 32],
}

impl MessageIds {
    /// The key is derived from a secret every gateway shares (the token secret).
    pub fn new(secret: &[u8]) -> Self {
        let mut h = Sha256::new();
        h.update(b"chat message ids v1\x1f");
        h.update(secret);
        MessageIds { key: h.finalize().into() }
    }

    fn tag(&self, ms: u64, nonce: u64, conv: &ConversationId, sender: Option<UserId>) -> u32 {
        // A key of any length is accepted by HMAC; this cannot fail.
        let Ok(mut mac) = HmacSha256::new_from_slice(&self.key) else { return 0 };
        mac.update(&ms.to_be_bytes());
        mac.update(&nonce.to_be_bytes());
        mac.update(conv.as_str().as_bytes());
        if let Some(s) = sender {
            mac.update(s.as_uuid().as_bytes());
        }
        let out = mac.finalize().into_bytes();
        u32::from_be_bytes([out[0], out[1], out[2], out[3]])
    }

    /// The sender the tag binds: the sender in a direct conversation, none in a group (whose
    /// acknowledging members do not know the sender; the fan-out checks that one).
    fn bound(conv: &ConversationId, sender: UserId) -> Option<UserId> {
        (!conv.is_group()).then_some(sender)
    }

    /// A new id for a message of `sender` in `conv`, stamped with the current time.
    pub fn mint(&self, conv: &ConversationId, sender: UserId) -> MessageId {
        let ms = chrono::Utc::now().timestamp_millis().max(0) as u64 & ((1 << 48) - 1);
        let nonce = rand::random::<u64>() & ((1 << 42) - 1);
        let tag = self.tag(ms, nonce, conv, Self::bound(conv, sender));
        MessageId(assemble(ms, nonce, tag))
    }

    /// Whether `id` was minted for a message of `sender` in `conv` (groups: of anyone in `conv`).
    pub fn verify(&self, id: MessageId, conv: &ConversationId, sender: UserId) -> bool {
        let Some((ms, nonce, tag)) = split(id.as_uuid()) else { return false };
        self.tag(ms, nonce, conv, Self::bound(conv, sender)) == tag
    }
}

impl MessageIds {
    fn group_tag(&self, ms: u64, nonce: u64, creator: UserId) -> u32 {
        let Ok(mut mac) = HmacSha256::new_from_slice(&self.key) else { return 0 };
        mac.update(b"group\x1f");
        mac.update(&ms.to_be_bytes());
        mac.update(&nonce.to_be_bytes());
        mac.update(creator.as_uuid().as_bytes());
        let out = mac.finalize().into_bytes();
        u32::from_be_bytes([out[0], out[1], out[2], out[3]])
    }

    /// A new group id, in the layout of message ids, its tag binding the creator: any gateway
    /// can tell, with no lookup, a creator's own new group (worth waiting for while it is
    /// projected) from any other id (answered at once).
    pub fn mint_group(&self, creator: UserId) -> GroupId {
        let ms = chrono::Utc::now().timestamp_millis().max(0) as u64 & ((1 << 48) - 1);
        let nonce = rand::random::<u64>() & ((1 << 42) - 1);
        GroupId(assemble(ms, nonce, self.group_tag(ms, nonce, creator)))
    }

    /// When `user` created `group`, if this key minted it for them.
    pub fn created_by(&self, group: GroupId, user: UserId) -> Option<chrono::DateTime<chrono::Utc>> {
        let (ms, nonce, tag) = split(group.as_uuid())?;
        (self.group_tag(ms, nonce, user) == tag).then(|| chrono::DateTime::from_timestamp_millis(ms as i64)).flatten()
    }
}

/// 48-bit ms | version 7 | 12 nonce bits | variant 10 | 30 nonce bits | 32-bit tag.
fn assemble(ms: u64, nonce: u64, tag: u32) -> uuid::Uuid {
    let hi_nonce = (nonce >> 30) & 0xfff;
    let lo_nonce = nonce & ((1 << 30) - 1);
    let v: u128 = (u128::from(ms) << 80) | (0x7 << 76) | (u128::from(hi_nonce) << 64) | (0b10 << 62) | (u128::from(lo_nonce) << 32) | u128::from(tag);
    uuid::Uuid::from_u128(v)
}

fn split(id: uuid::Uuid) -> Option<(u64, u64, u32)> {
    let v = id.as_u128();
    if (v >> 76) & 0xf != 0x7 || (v >> 62) & 0b11 != 0b10 {
        return None;
    }
    let ms = (v >> 80) as u64;
    let nonce = ((((v >> 64) & 0xfff) as u64) << 30) | (((v >> 32) & ((1 << 30) - 1)) as u64);
    Some((ms, nonce, v as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_verifies_for_its_conversation_and_sender_only() {
        let ids = MessageIds::new(b"a secret of every gateway, 32 bytes+");
        let (a, b) = (UserId::random(), UserId::random());
        let conv = ConversationId::direct(a, b);
        let id = ids.mint(&conv, a);
        assert_eq!(id.as_uuid().get_version_num(), 7, "a UUIDv7");
        assert!((id.unix_millis() - chrono::Utc::now().timestamp_millis()).abs() < 5_000, "stamped now");
        assert!(ids.verify(id, &conv, a));
        assert!(!ids.verify(id, &conv, b), "not b's message");
        assert!(!ids.verify(id, &ConversationId::direct(a, UserId::random()), a), "not of another conversation");
        assert!(!MessageIds::new(b"another secret").verify(id, &conv, a), "not under another key");
        assert!(!ids.verify(MessageId::new_v7(), &conv, a), "a plain v7 id fails");
        let g = ConversationId::group(chat_events::GroupId::random());
        let gid = ids.mint(&g, a);
        assert!(ids.verify(gid, &g, b), "a group id binds the group only");
        assert!(!ids.verify(gid, &ConversationId::group(chat_events::GroupId::random()), a));
    }

    #[test]
    fn a_group_id_names_its_creator_only() {
        let ids = MessageIds::new(b"k");
        let (a, b) = (UserId::random(), UserId::random());
        let g = ids.mint_group(a);
        let at = ids.created_by(g, a).expect("a created it");
        assert!((chrono::Utc::now() - at).num_seconds().abs() < 5);
        assert!(ids.created_by(g, b).is_none(), "not b");
        assert!(ids.created_by(GroupId::random(), a).is_none(), "a random id names nobody");
        assert!(MessageIds::new(b"other").created_by(g, a).is_none(), "not under another key");
        let m = ids.mint(&ConversationId::group(g), a);
        assert!(ids.created_by(GroupId(m.as_uuid()), a).is_none(), "a message id is not a group id");
    }

    #[test]
    fn ids_are_distinct_and_time_ordered() {
        let ids = MessageIds::new(b"k");
        let (a, b) = (UserId::random(), UserId::random());
        let conv = ConversationId::direct(a, b);
        let first = ids.mint(&conv, a);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let many: std::collections::HashSet<MessageId> = (0..10_000).map(|_| ids.mint(&conv, a)).collect();
        assert_eq!(many.len(), 10_000);
        assert!(many.iter().all(|m| *m > first), "later milliseconds sort after");
    }
}
