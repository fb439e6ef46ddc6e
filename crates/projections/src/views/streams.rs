//! Users' streams: `user_stream` (the item at its deliveries offset, the user's sync cursor) and
//! `stream_heads` (per user and partition of the conversations topic, the highest fan-out source
//! applied), and what every item causes in the user's other rows.
//!
//! A fan-out that routes an event again (it restarted before committing its offset) appends the
//! same outputs with the same sources: an item at or below the head of its source partition is a
//! repeat and writes nothing. Items from one source partition reach a user in source order, since
//! a fan-out routes a partition in order and the log keeps each producer's order; so the head
//! alone says what was applied. The head is a guard: written after the items and what they caused
//! (the projector defers it to its next sync, with the message count rows, so that a head is
//! never durable before everything the items it covers caused; see `Projector::flush_deferred`).
//!
//! An output the fan-out appended exactly once (`Source::exactly_once`: with its offset, in one
//! transaction of the embedded log) is never repeated, so it writes no head; it is still dropped
//! when an earlier guarded output of the same source covered it (a log written before the
//! fan-out appended exactly once, routed again after an upgrade).

use chat_events::{DeliveryQueued, StreamItem};
use chat_store::{StreamRow, Write};

use super::rows::{Missing, Rows};
use super::{analytics, groups, history, inbox, receipts, Settings};

/// A `delivery.queued` at `offset` of the recipient's deliveries partition `partition`.
pub fn item(out: &mut Vec<Write>, rows: &Rows, settings: &Settings, q: &DeliveryQueued, partition: i32, offset: i64) -> Result<(), Missing> {
    let user = q.recipient;
    if let Some(src) = q.source {
        if rows.head(user, src.partition)?.is_some_and(|head| head >= src.packed()) {
            return Ok(());
        }
    }
    let item = &q.item;
    match item {
        StreamItem::Message { message_id, conversation_id, sender, message_kind, body, sent_at, .. } => {
            if *sender == user {
                // The sender's own copy writes history: once per accepted message.
                history::message(out, item);
                let counted = analytics::Counted { partition, offset, kind: message_kind.as_str(), group: conversation_id.is_group() };
                analytics::message(out, rows, settings, &counted, *message_id, *sender, body, sent_at)?;
            } else {
                receipts::stream_item(out, user, item);
            }
            inbox::message(out, rows, user, item, offset)?;
        }
        StreamItem::Receipt { .. } => receipts::stream_item(out, user, item),
        StreamItem::Read { .. } => inbox::read(out, rows, user, item, offset)?,
        StreamItem::Group { .. } => groups::membership(out, rows, user, item)?,
    }
    // Serialising an item of strings, ids and numbers cannot fail.
    let json = serde_json::to_string(item).unwrap_or_default();
    // The item id: the event id the fan-out derived for it (the same for a repeated item).
    let item_id = chat_events::derive_id::delivery_queued(user, item, chat_events::EventId(uuid::Uuid::nil())).0;
    out.push(Write::Stream { user, row: StreamRow { seq: offset, item_id, item: json } });
    // An output appended exactly once is never repeated: no guard to keep for it.
    if let Some(src) = q.source.filter(|s| !s.exactly_once) {
        out.push(Write::StreamHead { user, source_partition: src.partition, position: src.packed() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::fixtures::*;
    use crate::views::rows::{Fetched, Key};
    use chat_events::{Source, UserId};

    fn queued(recipient: UserId, item: StreamItem, offset: i64) -> DeliveryQueued {
        DeliveryQueued { recipient, item, source: Some(Source { partition: 3, offset, index: 0, exactly_once: false }) }
    }

    #[test]
    fn a_new_item_writes_its_rows_then_the_stream_row_then_the_head() {
        let (a, b, c) = users();
        let mut rows = Rows::default();
        rows.insert(Key::Head(b, 3), Fetched::Head(Some(40 << 16)));
        rows.insert(Key::Inbox(b, c.clone()), Fetched::Inbox(None));
        let q = queued(b, message_item(&c, a, msg_id(1), None), 41);
        let mut out = Vec::new();
        item(&mut out, &rows, &Settings::default(), &q, 0, 17).unwrap();
        assert!(matches!(out.first(), Some(Write::Receipt(r)) if r.recipient == b), "{out:?}");
        assert!(matches!(&out[out.len() - 2..], [Write::Stream { row, .. }, Write::StreamHead { position, .. }] if row.seq == 17 && *position == 41 << 16));
        assert!(out.iter().any(|w| matches!(w, Write::Inbox(r) if r.unread == 1)));
        assert!(!out.iter().any(|w| matches!(w, Write::Message(_))), "history comes from the sender's copy");
        // The same output again (a fan-out that routed the event again), at another offset: nothing.
        for w in &out {
            rows.note(w);
        }
        let mut again = Vec::new();
        item(&mut again, &rows, &Settings::default(), &q, 0, 23).unwrap();
        assert!(again.is_empty(), "{again:?}");
        // Older than the head: nothing either.
        let mut old = Vec::new();
        item(&mut old, &rows, &Settings::default(), &queued(b, message_item(&c, a, msg_id(0), None), 39), 0, 24).unwrap();
        assert!(old.is_empty());
    }

    #[test]
    fn the_senders_own_copy_writes_history_and_no_receipt() {
        let (a, _, c) = users();
        let mut rows = Rows::default();
        rows.insert(Key::Head(a, 3), Fetched::Head(None));
        rows.insert(Key::Inbox(a, c.clone()), Fetched::Inbox(None));
        let at = chrono::DateTime::from_timestamp_millis(1_700_000_000_000).unwrap_or_default();
        rows.insert(Key::MessageCount(analytics::count_key(0, "text", false, &at)), Fetched::Count(None));
        let mut out = Vec::new();
        item(&mut out, &rows, &Settings::default(), &queued(a, message_item(&c, a, msg_id(1), Some("phone")), 5), 0, 3).unwrap();
        assert!(!out.iter().any(|w| matches!(w, Write::Receipt(_))));
        assert!(out.iter().any(|w| matches!(w, Write::Message(m) if m.sender_device == "phone")));
        assert!(out.iter().any(|w| matches!(w, Write::MessageCount { key, messages: 1, applied_offset: 3 } if key.scope == "direct")));
        assert!(out.iter().any(|w| matches!(w, Write::Inbox(r) if r.unread == 0 && r.first_unread_seq.is_none())));
    }

    #[test]
    fn an_exactly_once_item_writes_no_head_and_is_still_dropped_below_one() {
        let (a, b, c) = users();
        let mut rows = Rows::default();
        rows.insert(Key::Head(b, 3), Fetched::Head(Some(40 << 16)));
        rows.insert(Key::Inbox(b, c.clone()), Fetched::Inbox(None));
        let once = |q: DeliveryQueued| DeliveryQueued { source: q.source.map(|s| Source { exactly_once: true, ..s }), ..q };
        let q = once(queued(b, message_item(&c, a, msg_id(1), None), 41));
        let mut out = Vec::new();
        item(&mut out, &rows, &Settings::default(), &q, 0, 17).unwrap();
        assert!(matches!(out.last(), Some(Write::Stream { row, .. }) if row.seq == 17), "{out:?}");
        assert!(!out.iter().any(|w| matches!(w, Write::StreamHead { .. })), "no guard for what is never repeated");
        // The same source routed again after an upgrade: a guarded output wrote head 40 first.
        let mut old = Vec::new();
        item(&mut old, &rows, &Settings::default(), &once(queued(b, message_item(&c, a, msg_id(0), None), 40)), 0, 18).unwrap();
        assert!(old.is_empty(), "{old:?}");
    }
}
