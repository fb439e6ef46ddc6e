//! History: `messages` with `message_index`, and `conversation_buckets`, written from the
//! sender's own copy of the fan-out's message item: once per message, and only for messages the
//! fan-out accepted (a retried send it dropped, or a group message of a non-member, has none).

use chat_events::StreamItem;
use chat_store::{bucket_of, MessageRow, Write};

/// A message item in its sender's own stream: the history row.
pub fn message(out: &mut Vec<Write>, item: &StreamItem) {
    if let StreamItem::Message { message_id, conversation_id, sender, client_msg_id, message_kind, body, sent_at, sender_device, position, media, reply_to, mentions, withheld } =
        item
    {
        out.push(Write::Message(MessageRow {
            conversation_id: conversation_id.clone(),
            message_id: *message_id,
            sender: *sender,
            sender_device: sender_device.clone().unwrap_or_default(),
            client_msg_id: client_msg_id.clone(),
            kind: message_kind.as_str().to_owned(),
            body: body.clone(),
            sent_at: *sent_at,
            position: position.unwrap_or_default(),
            media: media.clone(),
            edited_at: None,
            deleted: false,
            reply_to: *reply_to,
            mentions: mentions.clone(),
            reactions: Vec::new(),
            my_reaction: None,
            withheld: *withheld,
        }));
        out.push(Write::Bucket { conversation: conversation_id.clone(), bucket: bucket_of(*message_id) });
        if let (Some(m), Some(p), true) = (media, position, conversation_id.is_group()) {
            out.push(Write::MediaMessage { media: m.media_id, conversation: conversation_id.clone(), message: *message_id, position: *p });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::fixtures::*;

    #[test]
    fn the_senders_copy_is_one_history_row_and_its_bucket() {
        let (a, _b, c) = users();
        let item = message_item(&c, a, msg_id(1), Some("phone"));
        let mut out = Vec::new();
        message(&mut out, &item);
        let [Write::Message(row), Write::Bucket { bucket, .. }] = out.as_slice() else { panic!("{out:?}") };
        assert_eq!((row.message_id, row.sender_device.as_str(), row.body.as_str()), (msg_id(1), "phone", "hi"));
        assert_eq!(*bucket, bucket_of(msg_id(1)));
    }
}
