//! Replies, mentions and reactions at the gateway.
//!
//! A reply (`send` with `reply_to`) quotes an earlier message of the same conversation by id: the
//! sender must be able to read it (a member who saw it, not deleted for everyone, not deleted for
//! themselves), else `not_found`, the same answer as for an id that names nothing. The quoted
//! text is never copied: readers resolve the reference from what they can read themselves.
//!
//! Mentions (`send` with `mentions`, groups only) name members of the group now; the fan-out keeps
//! those who are members at the message's position and flags the message in each mentioned
//! member's conversation list until they read past it.
//!
//! A reaction (`react`) is one emoji per user per message: a new one replaces the user's earlier
//! one, and `react` without `emoji` takes it back. `message.reacted` goes to the conversation's
//! partition; the fan-out puts a `reaction` item in the stream of every member who got the message
//! and is a member still, and history shows each message's counts (see `docs/protocol.md` §5.8).

use std::collections::HashMap;

use axum::http::StatusCode;
use chat_events::{now_millis, ConversationId, Envelope, Event, EventId, MessageId, MessageReacted, StreamItem, UserId};
use chat_store::{MessageRow, ReactionCount};

use crate::error::ApiError;
use crate::service::{Chat, ConnCtx, HistoryPage};

/// Members one message may mention, at most.
pub const MAX_MENTIONS: usize = 50;

/// Reactions read for one history page, at most (the page's messages' counts stop there).
const PAGE_REACTIONS: usize = 20_000;

fn deleted() -> ApiError {
    ApiError::new(StatusCode::CONFLICT, "message_deleted", "the message was deleted")
}

/// The one emoji of a reaction, in its fully qualified spelling (so `❤` and `❤️` count as one),
/// or `invalid_emoji`.
pub fn canonical_emoji(s: &str) -> Result<String, ApiError> {
    match emojis::get(s) {
        Some(e) if s.len() <= 64 => Ok(e.as_str().to_owned()),
        _ => Err(ApiError::bad_request("invalid_emoji", "emoji is one emoji (a reaction is taken back by leaving emoji out)")),
    }
}

impl Chat {
    /// The message a send replies to, checked: the sender can read it in this conversation.
    pub(crate) async fn reply_target(&self, user: UserId, conv: &ConversationId, reply_to: Option<&str>) -> Result<Option<MessageId>, ApiError> {
        let Some(raw) = reply_to else { return Ok(None) };
        let id: MessageId = raw.parse().map_err(|_| ApiError::bad_request("invalid_message_id", "reply_to is not a message id"))?;
        let row = self.readable_message(user, conv, id).await?;
        if row.deleted {
            return Err(deleted());
        }
        Ok(Some(id))
    }

    /// The members a message of `user` mentions, checked: a group's members now (the caller
    /// included is allowed and flags nothing), distinct, in the order given.
    pub(crate) async fn mentioned(&self, conv: &ConversationId, mentions: Option<Vec<String>>) -> Result<Vec<UserId>, ApiError> {
        let Some(raw) = mentions.filter(|m| !m.is_empty()) else { return Ok(Vec::new()) };
        let invalid = |m: String| Err(ApiError::bad_request("invalid_mentions", m));
        if !conv.is_group() {
            return invalid("mentions are for group messages".into());
        }
        if raw.len() > MAX_MENTIONS {
            return invalid(format!("a message mentions at most {MAX_MENTIONS} members"));
        }
        let members: Vec<UserId> = self.active_members(conv).await?.into_iter().map(|m| m.member).collect();
        let mut out: Vec<UserId> = Vec::with_capacity(raw.len());
        for m in raw {
            match m.parse::<UserId>() {
                Ok(u) if members.contains(&u) => {
                    if !out.contains(&u) {
                        out.push(u);
                    }
                }
                _ => return invalid(format!("{m:?} is not a member of this group")),
            }
        }
        Ok(out)
    }

    /// A message `user` can read: a member who saw it, and not deleted by them for themselves
    /// (`not_found` otherwise, as for an id that names nothing). May be deleted for everyone.
    async fn readable_message(&self, user: UserId, conv: &ConversationId, id: MessageId) -> Result<MessageRow, ApiError> {
        let row = self.visible_message(conv, id, user).await?.ok_or_else(ApiError::not_found)?;
        if !self.store.hidden_messages(user, conv, id, id).await?.is_empty() {
            return Err(ApiError::not_found());
        }
        Ok(row)
    }

    /// Reacts to a message with `emoji`, or takes the reaction back (`None`); `Ok` once durable
    /// (at once when the user's reaction already is that).
    pub async fn react(&self, ctx: &ConnCtx, conversation_id: &str, message_id: &str, emoji: Option<&str>) -> Result<(), ApiError> {
        self.take_send_budget(ctx.user)?;
        let emoji = emoji.map(canonical_emoji).transpose()?;
        let conv = self.member_conv(ctx.user, conversation_id).await?;
        let id: MessageId = message_id.parse().map_err(|_| ApiError::bad_request("invalid_message_id", "not a message id"))?;
        let row = self.readable_message(ctx.user, &conv, id).await?;
        if row.deleted {
            return Err(deleted());
        }
        let current = self.store.reactions(&conv, &[id], 1_000_000).await?.into_iter().find(|r| r.user == ctx.user).map(|r| r.emoji);
        if current == emoji {
            return Ok(());
        }
        let at = now_millis();
        let event = Event::MessageReacted(MessageReacted { withheld: row.withheld, message_id: id, conversation_id: conv.clone(), user: ctx.user, emoji: emoji.clone() });
        self.append(&Envelope { event_id: EventId::new_v7(), occurred_at: at, actor: Some(ctx.user), event }).await?;
        // A direct conversation's reaction is pushed now; a group's by the fan-out, which knows
        // who got the message.
        let item = StreamItem::Reaction { conversation_id: conv.clone(), message_id: id, by: ctx.user, emoji, at };
        self.push_direct(ctx, &conv, &item, row.withheld).await;
        Ok(())
    }

    /// A history page as `user` sees it: without the messages they deleted for themselves (the
    /// page may get shorter; its cursor stays where the scan stopped), with each message's
    /// reaction counts and the user's own reaction (none on a message deleted for everyone).
    pub(crate) async fn finish_page(&self, user: UserId, conv: &ConversationId, mut page: HistoryPage) -> Result<HistoryPage, ApiError> {
        let (Some(first), Some(last)) = (page.messages.iter().map(|m| m.message_id).min(), page.messages.iter().map(|m| m.message_id).max()) else {
            return Ok(page);
        };
        let ids: Vec<MessageId> = page.messages.iter().map(|m| m.message_id).collect();
        let (hidden, reactions) = tokio::try_join!(self.store.hidden_messages(user, conv, first, last), self.store.reactions(conv, &ids, PAGE_REACTIONS))?;
        // Without what the user deleted for themselves, and without messages withheld from them
        // (a block: those are their sender's alone).
        page.messages.retain(|m| !hidden.contains(&m.message_id) && (!m.withheld || m.sender == user));
        let mut by_message: HashMap<MessageId, Vec<chat_store::Reaction>> = HashMap::new();
        for r in reactions {
            by_message.entry(r.message_id).or_default().push(r);
        }
        for m in &mut page.messages {
            let Some(rs) = by_message.remove(&m.message_id).filter(|_| !m.deleted) else { continue };
            m.my_reaction = rs.iter().find(|r| r.user == user).map(|r| r.emoji.clone());
            m.reactions = counts(&rs);
        }
        Ok(page)
    }
}

/// Reactions counted by emoji, most first (equal counts by emoji).
pub fn counts(reactions: &[chat_store::Reaction]) -> Vec<ReactionCount> {
    let mut n: HashMap<&str, u32> = HashMap::new();
    for r in reactions {
        *n.entry(r.emoji.as_str()).or_default() += 1;
    }
    let mut out: Vec<ReactionCount> = n.into_iter().map(|(emoji, count)| ReactionCount { emoji: emoji.to_owned(), count }).collect();
    out.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.emoji.cmp(&b.emoji)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_emoji_is_one_emoji_in_its_qualified_spelling() {
        assert_eq!(canonical_emoji("👍").unwrap(), "👍");
        assert_eq!(canonical_emoji("👍🏽").unwrap(), "👍🏽");
        assert_eq!(canonical_emoji("❤").unwrap(), canonical_emoji("❤️").unwrap());
        assert_eq!(canonical_emoji("👨‍👩‍👧").unwrap(), "👨‍👩‍👧");
        for bad in ["", "a", "👍👍", "👍 ", ":+1:", "ok", "\u{200d}", "👍x"] {
            assert_eq!(canonical_emoji(bad).err().map(|e| e.code), Some("invalid_emoji"), "{bad:?}");
        }
    }

    #[test]
    fn counts_are_by_emoji_most_first() {
        let m = MessageId::new_v7();
        let r = |e: &str| chat_store::Reaction { message_id: m, user: UserId::random(), emoji: e.into() };
        let c = counts(&[r("👍"), r("❤️"), r("👍"), r("😂"), r("❤️"), r("👍")]);
        let got: Vec<(&str, u32)> = c.iter().map(|c| (c.emoji.as_str(), c.count)).collect();
        assert_eq!(got, vec![("👍", 3), ("❤️", 2), ("😂", 1)]);
    }
}
