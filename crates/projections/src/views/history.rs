//! History: `messages` (with `conversation_buckets` and `message_index`, written together).

use chat_events::{Envelope, MessageSent, StreamItem};
use chat_store::{MessageRow, Write};
use tracing::debug;

/// A direct message: its history row. False (and nothing written) if the sender is not one of
/// the conversation's two members; the other views then ignore the message too.
pub fn direct_message(out: &mut Vec<Write>, env: &Envelope, m: &MessageSent, offset: i64) -> bool {
    if !m.conversation_id.has_member(m.sender) {
        debug!(message = %m.message_id, "sender is not a member; ignored");
        return false;
    }
    out.push(Write::Message(MessageRow {
        conversation_id: m.conversation_id.clone(),
        message_id: m.message_id,
        sender: m.sender,
        sender_device: m.sender_device.to_string(),
        client_msg_id: m.client_msg_id.clone(),
        kind: m.kind.as_str().to_owned(),
        body: m.body.clone(),
        sent_at: env.occurred_at,
        position: offset,
        media: m.media.clone(),
    }));
    true
}

/// A group message, from the sender's own copy of the fan-out's item: once per message, and only
/// for messages the fan-out accepted (a dropped message has no items). Items do not carry the
/// sender's device.
pub fn group_message(out: &mut Vec<Write>, item: &StreamItem) {
    if let StreamItem::Message { message_id, conversation_id, sender, client_msg_id, message_kind, body, sent_at, position, media } = item {
        out.push(Write::Message(MessageRow {
            conversation_id: conversation_id.clone(),
            message_id: *message_id,
            sender: *sender,
            sender_device: String::new(),
            client_msg_id: client_msg_id.clone(),
            kind: message_kind.as_str().to_owned(),
            body: body.clone(),
            sent_at: *sent_at,
            position: position.unwrap_or_default(),
            media: media.clone(),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::fixtures::*;
    use chat_events::{ConversationId, UserId};

    #[test]
    fn a_direct_message_is_one_history_row_at_its_position() {
        let (a, _b, c) = users();
        let env = sent(&c, a, msg_id(1), "hi");
        let chat_events::Event::MessageSent(m) = &env.event else { unreachable!() };
        let mut out = Vec::new();
        assert!(direct_message(&mut out, &env, m, 41));
        let [Write::Message(row)] = out.as_slice() else { panic!("{out:?}") };
        assert_eq!((row.message_id, row.position, row.sent_at, row.body.as_str()), (msg_id(1), 41, env.occurred_at, "hi"));
    }

    #[test]
    fn a_sender_outside_the_conversation_writes_nothing() {
        let (_a, _b, c) = users();
        let stranger = UserId(uuid::Uuid::from_u128(0x5));
        let env = sent(&c, stranger, msg_id(1), "let me in");
        let chat_events::Event::MessageSent(m) = &env.event else { unreachable!() };
        let mut out = Vec::new();
        assert!(!direct_message(&mut out, &env, m, 7));
        assert!(out.is_empty());
        let _: ConversationId = c;
    }
}
