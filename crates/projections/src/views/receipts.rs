//! The receipt timeline (`receipts`, and the same rows by recipient in `receipts_by_user`: one
//! write, earliest `at` wins) and `pending_deliveries` (not yet delivered to any device).

use chat_events::{Envelope, MessageDelivered, MessageId, MessageRead, MessageSent, ReceiptStatus, StreamItem, UserId};
use chat_store::{ReceiptRow, Write};
use tracing::debug;

use super::rows::{Missing, Rows};

/// A direct message was sent: the recipient's `sent` transition.
pub fn direct_sent(out: &mut Vec<Write>, env: &Envelope, m: &MessageSent) {
    if let Some(peer) = m.conversation_id.peer_of(m.sender) {
        out.push(Write::Receipt(ReceiptRow {
            message_id: m.message_id,
            recipient: peer,
            status: ReceiptStatus::Sent,
            device_id: String::new(),
            at: env.occurred_at,
            conversation_id: m.conversation_id.clone(),
        }));
    }
}

/// A device acknowledged a direct message: its `delivered` transition, and nothing is pending.
/// Only a real message of this conversation, acknowledged by a member who is not its sender;
/// anything else a client claims is ignored.
pub fn direct_delivered(out: &mut Vec<Write>, rows: &Rows, env: &Envelope, d: &MessageDelivered) -> Result<(), Missing> {
    let Some(meta) = rows.meta(d.message_id)? else {
        debug!(message = %d.message_id, "delivery for an unknown message; ignored");
        return Ok(());
    };
    if meta.conversation_id != d.conversation_id || meta.sender == d.recipient || !d.conversation_id.has_member(d.recipient) {
        return Ok(());
    }
    out.push(Write::Receipt(ReceiptRow {
        message_id: d.message_id,
        recipient: d.recipient,
        status: ReceiptStatus::Delivered,
        device_id: d.device_id.to_string(),
        at: env.occurred_at,
        conversation_id: d.conversation_id.clone(),
    }));
    out.push(Write::RemovePending { user: d.recipient, message: d.message_id });
    Ok(())
}

/// A direct message read (covered by a `read`): `seen`, and no longer pending (read implies
/// delivered to some device).
pub fn seen(out: &mut Vec<Write>, env: &Envelope, r: &MessageRead, message: MessageId) {
    out.push(Write::Receipt(ReceiptRow {
        message_id: message,
        recipient: r.reader,
        status: ReceiptStatus::Seen,
        device_id: r.device_id.to_string(),
        at: env.occurred_at,
        conversation_id: r.conversation_id.clone(),
    }));
    out.push(Write::RemovePending { user: r.reader, message });
}

/// A member acknowledged a group message: they have it now, whatever the fan-out decides about
/// the receipt (the gateway checked the message is of this group).
pub fn group_delivered(out: &mut Vec<Write>, d: &MessageDelivered) {
    out.push(Write::RemovePending { user: d.recipient, message: d.message_id });
}

/// A message item reached `user`'s stream: pending until a device acknowledges it (not for the
/// user's own messages).
pub fn pending(out: &mut Vec<Write>, user: UserId, item: &StreamItem) {
    if let StreamItem::Message { message_id, conversation_id, sender, .. } = item {
        if *sender != user {
            out.push(Write::AddPending { user, message: *message_id, conversation: conversation_id.clone() });
        }
    }
}

/// Group receipts, from stream items: each recipient's own message item is their `sent`
/// transition; the sender's per-member receipt items are the `delivered` (first device) and
/// `seen` ones. `all` items write nothing (the summary is computed when read).
pub fn group_item(out: &mut Vec<Write>, user: UserId, item: &StreamItem) {
    match item {
        StreamItem::Message { message_id, conversation_id, sender, sent_at, .. } if conversation_id.is_group() && *sender != user => {
            out.push(Write::Receipt(ReceiptRow {
                message_id: *message_id,
                recipient: user,
                status: ReceiptStatus::Sent,
                device_id: String::new(),
                at: *sent_at,
                conversation_id: conversation_id.clone(),
            }));
        }
        StreamItem::Receipt { conversation_id, message_id, status, by, at, all: false, device_id } if conversation_id.is_group() => {
            out.push(Write::Receipt(ReceiptRow {
                message_id: *message_id,
                recipient: *by,
                status: *status,
                device_id: device_id.clone().unwrap_or_default(),
                at: *at,
                conversation_id: conversation_id.clone(),
            }));
        }
        StreamItem::Message { .. } | StreamItem::Receipt { .. } | StreamItem::Read { .. } | StreamItem::Group { .. } => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::fixtures::*;
    use crate::views::rows::{Fetched, Key};
    use chat_events::{DeviceId, Event};
    use chat_store::MessageMeta;

    fn delivered(by: UserId, id: MessageId) -> Envelope {
        let (_, _, c) = users();
        env(by, Event::MessageDelivered(MessageDelivered { message_id: id, conversation_id: c, recipient: by, device_id: DeviceId::default_device() }))
    }

    #[test]
    fn only_the_other_member_of_a_known_message_gets_a_delivered_transition() {
        let (a, b, c) = users();
        let mut rows = Rows::default();
        rows.insert(
            Key::Meta(msg_id(1)),
            Fetched::Meta(Some(MessageMeta { message_id: msg_id(1), conversation_id: c.clone(), sender: a, sent_at: chrono::Utc::now(), position: 3 })),
        );
        rows.insert(Key::Meta(msg_id(2)), Fetched::Meta(None));
        let case = |by, id| {
            let e = delivered(by, id);
            let Event::MessageDelivered(d) = &e.event else { unreachable!() };
            let mut out = Vec::new();
            direct_delivered(&mut out, &rows, &e, d).unwrap();
            out
        };
        let ok = case(b, msg_id(1));
        assert!(matches!(&ok[..], [Write::Receipt(r), Write::RemovePending { user, .. }] if r.status == ReceiptStatus::Delivered && r.recipient == b && *user == b));
        assert!(case(a, msg_id(1)).is_empty(), "the sender's own ack");
        assert!(case(b, msg_id(2)).is_empty(), "an unknown message");
    }
}
