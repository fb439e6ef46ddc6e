//! Users' streams: `user_stream` (the item at its deliveries offset, the user's sync cursor) and
//! `user_stream_ids` (item id → position). A `delivery.queued` that reaches the projection twice
//! (a fan-out that restarted before committing appends its last items again; a second device's
//! ack repeats a receipt's derived id) keeps its first position: the second copy writes nothing.
//! The id row is a guard: written last, it says the item and everything it caused are written.

use chat_events::{derive_id, ConversationId, DeliveryQueued, Envelope, EventId, MessageId, MessageKind, StreamItem, UserId};
use chat_store::{StreamRow, Write};

use super::rows::{Missing, Rows};
use super::{groups, receipts, Settings};

/// A `delivery.queued` at `offset` of the recipient's deliveries partition.
pub fn item(out: &mut Vec<Write>, rows: &Rows, settings: &Settings, env: &Envelope, q: &DeliveryQueued, offset: i64) -> Result<(), Missing> {
    let user = q.recipient;
    if rows.seq(user, env.event_id.0)?.is_some() {
        // Already in the stream: the first position stays the only one.
        return Ok(());
    }
    receipts::pending(out, user, &q.item);
    groups::item(out, rows, settings, user, &q.item, offset)?;
    // Serialising an item of strings, ids and numbers cannot fail.
    let json = serde_json::to_string(&q.item).unwrap_or_default();
    out.push(Write::Stream { user, row: StreamRow { seq: offset, item_id: env.event_id.0, item: json } });
    out.push(Write::StreamId { user, item_id: env.event_id.0, seq: offset });
    Ok(())
}

/// The item id of a message's item in a user's stream (derived from the user and the message
/// alone, whatever the message says).
pub fn message_item_id(user: UserId, conv: &ConversationId, message: MessageId) -> uuid::Uuid {
    let probe = StreamItem::Message {
        message_id: message,
        conversation_id: conv.clone(),
        sender: user,
        client_msg_id: String::new(),
        message_kind: MessageKind::Text,
        body: String::new(),
        sent_at: chrono::DateTime::UNIX_EPOCH,
        position: None,
        media: None,
    };
    derive_id::delivery_queued(user, &probe, EventId(uuid::Uuid::nil())).0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::fixtures::*;
    use crate::views::rows::{Fetched, Key};
    use chat_events::Event;

    fn queued(recipient: UserId, item: StreamItem) -> Envelope {
        let src = EventId(uuid::Uuid::from_u128(1));
        let mut e = env(recipient, Event::DeliveryQueued(DeliveryQueued { recipient, item: item.clone() }));
        e.event_id = derive_id::delivery_queued(recipient, &item, src);
        e
    }

    fn message(sender: UserId) -> StreamItem {
        let (_, _, c) = users();
        StreamItem::Message {
            message_id: msg_id(1),
            conversation_id: c,
            sender,
            client_msg_id: "c".into(),
            message_kind: MessageKind::Text,
            body: "hi".into(),
            sent_at: chrono::Utc::now(),
            position: None,
            media: None,
        }
    }

    #[test]
    fn a_new_item_is_pending_then_the_stream_row_then_its_id() {
        let (a, b, _) = users();
        let e = queued(b, message(a));
        let Event::DeliveryQueued(q) = &e.event else { unreachable!() };
        let mut rows = Rows::default();
        rows.insert(Key::Seq(b, e.event_id.0), Fetched::Seq(None));
        let mut out = Vec::new();
        item(&mut out, &rows, &Settings::default(), &e, q, 17).unwrap();
        assert!(matches!(&out[..], [Write::AddPending { .. }, Write::Stream { row, .. }, Write::StreamId { seq: 17, .. }] if row.seq == 17));
        // The same item again, at another offset: nothing.
        for w in &out {
            rows.note(w);
        }
        let mut again = Vec::new();
        item(&mut again, &rows, &Settings::default(), &e, q, 23).unwrap();
        assert!(again.is_empty(), "{again:?}");
    }

    #[test]
    fn the_senders_own_copy_is_not_pending() {
        let (a, _, _) = users();
        let e = queued(a, message(a));
        let Event::DeliveryQueued(q) = &e.event else { unreachable!() };
        let mut rows = Rows::default();
        rows.insert(Key::Seq(a, e.event_id.0), Fetched::Seq(None));
        let mut out = Vec::new();
        item(&mut out, &rows, &Settings::default(), &e, q, 3).unwrap();
        assert!(!out.iter().any(|w| matches!(w, Write::AddPending { .. })));
        assert_eq!(message_item_id(a, &users().2, msg_id(1)), e.event_id.0, "the derived id depends on the user and the message only");
    }
}
