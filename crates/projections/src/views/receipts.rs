//! The receipt timeline (`receipts`, and the same rows by recipient in `receipts_by_user`: one
//! write, earliest `at` wins).
//!
//! A message's `sent` rows come from its items in the recipients' streams (one per recipient, at
//! the time it was sent). A direct message's `delivered` rows come from the devices' acks
//! (`message.delivered`, checked by the gateway against the message id's tag), its `seen` rows
//! from the reader's `read` items ([`super::inbox::read`]). A group message's `delivered` and
//! `seen` rows come from the fan-out's per-member receipt items. Every row names the message's
//! sender, so that the timeline alone says who sent the message to whom.

use chat_events::{Envelope, MessageDelivered, ReceiptStatus, StreamItem, UserId};
use chat_store::{ReceiptRow, Write};

/// A device acknowledged a message: in a direct conversation, that is its `delivered`
/// transition. (A group's delivered rows come from the fan-out's per-member receipt item, which
/// knows whether the acker was a member at the message's position.)
pub fn delivered(out: &mut Vec<Write>, env: &Envelope, d: &MessageDelivered) {
    if d.conversation_id.is_group() || !d.conversation_id.has_member(d.recipient) {
        return;
    }
    let Some(sender) = d.conversation_id.peer_of(d.recipient) else { return };
    out.push(Write::Receipt(ReceiptRow {
        message_id: d.message_id,
        sender,
        recipient: d.recipient,
        status: ReceiptStatus::Delivered,
        device_id: d.device_id.to_string(),
        at: env.occurred_at,
        conversation_id: d.conversation_id.clone(),
    }));
}

/// Receipts from stream items: each recipient's own message item is their `sent` transition (direct
/// and group); the group sender's per-member receipt items are the `delivered` (first device)
/// and `seen` ones. `all` items write nothing (the summary is computed when read).
pub fn stream_item(out: &mut Vec<Write>, user: UserId, item: &StreamItem) {
    match item {
        StreamItem::Message { message_id, conversation_id, sender, sent_at, .. } if *sender != user => {
            out.push(Write::Receipt(ReceiptRow {
                message_id: *message_id,
                sender: *sender,
                recipient: user,
                status: ReceiptStatus::Sent,
                device_id: String::new(),
                at: *sent_at,
                conversation_id: conversation_id.clone(),
            }));
        }
        StreamItem::Receipt { conversation_id, message_id, status, by, at, all: false, device_id } if conversation_id.is_group() => {
            // A receipt item is in the stream of the message's sender.
            out.push(Write::Receipt(ReceiptRow {
                message_id: *message_id,
                sender: user,
                recipient: *by,
                status: *status,
                device_id: device_id.clone().unwrap_or_default(),
                at: *at,
                conversation_id: conversation_id.clone(),
            }));
        }
        StreamItem::Message { .. }
        | StreamItem::Receipt { .. }
        | StreamItem::Read { .. }
        | StreamItem::Edited { .. }
        | StreamItem::Deleted { .. }
        | StreamItem::Hidden { .. }
        | StreamItem::Reaction { .. }
        | StreamItem::Group { .. } => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::fixtures::*;
    use chat_events::{DeviceId, Event};

    #[test]
    fn a_direct_ack_is_a_delivered_transition() {
        let (a, b, c) = users();
        let e = env(b, Event::MessageDelivered(MessageDelivered { message_id: msg_id(1), conversation_id: c, recipient: b, device_id: DeviceId::default_device() }));
        let Event::MessageDelivered(d) = &e.event else { unreachable!() };
        let mut out = Vec::new();
        delivered(&mut out, &e, d);
        assert!(matches!(&out[..], [Write::Receipt(r)] if r.status == ReceiptStatus::Delivered && r.recipient == b && r.sender == a && r.device_id == "default"), "{out:?}");
    }

    #[test]
    fn a_direct_message_item_is_the_recipients_sent_transition() {
        let (a, b, c) = users();
        let mut out = Vec::new();
        stream_item(&mut out, b, &message_item(&c, a, msg_id(1), None));
        assert!(
            matches!(&out[..], [Write::Receipt(r)] if r.status == ReceiptStatus::Sent && r.recipient == b && r.sender == a && r.device_id.is_empty()),
            "{out:?}"
        );
        // The sender's own copy is not a transition.
        let mut out = Vec::new();
        stream_item(&mut out, a, &message_item(&c, a, msg_id(1), None));
        assert!(out.is_empty(), "{out:?}");
    }

    #[test]
    fn an_ack_from_outside_the_conversation_writes_nothing() {
        let (_a, _b, c) = users();
        let stranger = UserId(uuid::Uuid::from_u128(0x5));
        let e = env(stranger, Event::MessageDelivered(MessageDelivered { message_id: msg_id(1), conversation_id: c, recipient: stranger, device_id: DeviceId::default_device() }));
        let Event::MessageDelivered(d) = &e.event else { unreachable!() };
        let mut out = Vec::new();
        delivered(&mut out, &e, d);
        assert!(out.is_empty());
    }
}
