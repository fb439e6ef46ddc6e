//! Edits and deletes for everyone at the gateway (the `edit` and `delete` frames).
//!
//! The gateway checks what it can answer at once: the caller is a member of the conversation
//! and could see the message (else `not_found`, the same answer as for an id that names
//! nothing), the caller is its sender (or, to delete, an admin of its group), the message is not
//! deleted, and the change comes within the edit window of the message's sending (the time in
//! its id). Then it appends `message.edited` / `message.deleted` to the conversation's partition
//! and answers `ack` once the log has it. The fan-out decides for good at the event's position
//! (the sender's membership and an admin's role as of then, the window against the event's
//! time) and puts one `edited` / `deleted` item in the stream of everyone who got the message;
//! the projections replace the body everywhere (see `docs/protocol.md` §5.7).
//!
//! Delete for me (`delete` with `scope: "me"`) appends `message.hidden`: the message leaves the
//! caller's own stream, history and conversation list, on every device of theirs.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use chat_events::{
    derive_id, now_millis, within_edit_window, ConversationId, Envelope, Event, EventId, GroupRole, MessageDeleted, MessageEdited,
    MessageHidden, MessageId, StreamItem, UserId,
};
use chat_store::MessageRow;

use crate::error::ApiError;
use crate::frames::ServerFrame;
use crate::routing::Push;
use crate::service::{Chat, ConnCtx};

/// How long a change to a message with a valid id waits for the message to be projected (a
/// sender fixing a typo right after sending). Ids that are not this server's are answered at
/// once, so an unknown id costs what a foreign one does.
const NEW_MESSAGE_WAIT: Duration = Duration::from_secs(5);

/// What a client asked to do to a message.
#[derive(Clone, Debug)]
pub enum Change {
    Edit { body: String },
    Delete,
}

fn not_sender() -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", "only the sender may edit a message, and only the sender or a group admin delete it")
}

impl Chat {
    /// Edits or deletes a message for everyone; `Ok` once the change is durable in the log.
    pub async fn change_message(&self, ctx: &ConnCtx, conversation_id: &str, message_id: &str, change: Change) -> Result<(), ApiError> {
        self.take_send_budget(ctx.user)?;
        if let Change::Edit { body } = &change {
            if body.is_empty() || body.len() > self.limits.max_body_bytes {
                return Err(ApiError::bad_request("invalid_body", format!("body must be 1-{} bytes", self.limits.max_body_bytes)));
            }
        }
        let conv = self.member_conv(ctx.user, conversation_id).await?;
        let id: MessageId = message_id.parse().map_err(|_| ApiError::bad_request("invalid_message_id", "not a message id"))?;
        let row = self.visible_message(&conv, id, ctx.user).await?.ok_or_else(ApiError::not_found)?;
        let is_delete = matches!(change, Change::Delete);
        if row.deleted {
            // Deleting again is what the first delete did; editing a deleted message is refused.
            return if is_delete { Ok(()) } else { Err(ApiError::new(StatusCode::CONFLICT, "message_deleted", "the message was deleted")) };
        }
        if row.sender != ctx.user {
            let admin = is_delete
                && conv.is_group()
                && self.active_member(&conv, ctx.user).await?.is_some_and(|m| m.role == GroupRole::Admin);
            if !admin {
                return Err(not_sender());
            }
        }
        let at = now_millis();
        if !within_edit_window(&at, id, self.limits.edit_window) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "edit_window_closed",
                format!("messages can be edited or deleted for everyone up to {} hours after sending", self.limits.edit_window.as_secs() / 3600),
            ));
        }
        let (event_id, event, item) = match change {
            Change::Edit { body } => (
                EventId::new_v7(),
                Event::MessageEdited(MessageEdited { withheld: row.withheld, message_id: id, conversation_id: conv.clone(), sender: row.sender, body: body.clone() }),
                StreamItem::Edited { conversation_id: conv.clone(), message_id: id, sender: row.sender, body, at },
            ),
            Change::Delete => (
                derive_id::message_deleted(id),
                Event::MessageDeleted(MessageDeleted { withheld: row.withheld, message_id: id, conversation_id: conv.clone(), sender: row.sender, deleted_by: ctx.user }),
                StreamItem::Deleted { conversation_id: conv.clone(), message_id: id, sender: row.sender, by: ctx.user, at },
            ),
        };
        self.append(&Envelope { event_id, occurred_at: at, actor: Some(ctx.user), event }).await?;
        // A direct conversation's change is pushed now; a group's by the fan-out, which alone
        // knows who got the message.
        self.push_direct(ctx, &conv, &item, row.withheld).await;
        Ok(())
    }

    /// Pushes an item of a direct conversation to the other member and to the caller's other
    /// connections (nothing for a group: the fan-out pushes those).
    /// (`withheld`: the caller's other connections only.)
    pub(crate) async fn push_direct(&self, ctx: &ConnCtx, conv: &ConversationId, item: &StreamItem, withheld: bool) {
        if let Some(peer) = conv.peer_of(ctx.user) {
            let text: crate::hub::Outbound = Arc::from(ServerFrame::from_item(item).to_text());
            let pushes = [(peer, None), (ctx.user, Some(ctx.conn.clone()))]
                .into_iter()
                .skip(usize::from(withheld))
                .map(|(user, except)| Push { user, text: text.clone(), except, sent_at_ms: None })
                .collect();
            self.push(pushes).await;
        }
    }

    /// Deletes a message for the caller only ("delete for me"): any message of theirs or another
    /// member's that they can read, deleted for everyone or not; no window. `Ok` once durable;
    /// the caller's other devices get a `hidden` push.
    pub async fn hide_message(&self, ctx: &ConnCtx, conversation_id: &str, message_id: &str) -> Result<(), ApiError> {
        self.take_send_budget(ctx.user)?;
        let conv = self.member_conv(ctx.user, conversation_id).await?;
        let id: MessageId = message_id.parse().map_err(|_| ApiError::bad_request("invalid_message_id", "not a message id"))?;
        self.visible_message(&conv, id, ctx.user).await?.ok_or_else(ApiError::not_found)?;
        let at = now_millis();
        let event = Event::MessageHidden(MessageHidden { message_id: id, conversation_id: conv.clone(), user: ctx.user });
        self.append(&Envelope { event_id: derive_id::message_hidden(id, ctx.user), occurred_at: at, actor: Some(ctx.user), event }).await?;
        let item = StreamItem::Hidden { conversation_id: conv, message_id: id, at };
        let text: crate::hub::Outbound = Arc::from(ServerFrame::from_item(&item).to_text());
        self.push(vec![Push { user: ctx.user, text, except: Some(ctx.conn.clone()), sent_at_ms: None }]).await;
        Ok(())
    }

    /// The history row of message `id` of `conv`, if `user` may read it (a group member since
    /// before the message). A message id this server minted for the conversation waits, bounded,
    /// for the projection; any other id is looked up once.
    pub(crate) async fn visible_message(&self, conv: &ConversationId, id: MessageId, user: UserId) -> Result<Option<MessageRow>, ApiError> {
        let ids = self.tokens.message_ids();
        let ours = match conv.peer_of(user) {
            Some(peer) => ids.verify(id, conv, user) || ids.verify(id, conv, peer),
            None => ids.verify(id, conv, user),
        };
        let deadline = tokio::time::Instant::now() + if ours { NEW_MESSAGE_WAIT } else { Duration::ZERO };
        let mut step = Duration::from_millis(5);
        let row = loop {
            // The newest message at or before `id` is `id` itself when it is in history.
            let next = MessageId(uuid::Uuid::from_u128(id.as_uuid().as_u128().saturating_add(1)));
            let row = self.store.history_page(conv, Some(next), 1).await?.into_iter().next().filter(|m| m.message_id == id);
            if row.is_some() || tokio::time::Instant::now() >= deadline {
                break row;
            }
            tokio::time::sleep(step).await;
            step = (step * 2).min(Duration::from_millis(200));
        };
        let Some(row) = row else { return Ok(None) };
        // A withheld message (a block) exists for its sender only.
        if row.withheld && row.sender != user {
            return Ok(None);
        }
        if conv.is_group() && !self.saw_position(user, conv, row.position).await? {
            return Ok(None);
        }
        Ok(Some(row))
    }
}
