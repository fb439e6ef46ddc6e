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

use chat_events::{DeliveryQueued, StreamItem, UserId};
use chat_store::{StreamMark, StreamRow, Write};

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
    // Whether the item takes its place in the stream (an edit of a deleted message, or a second
    // delete, changes nothing).
    let mut keep = true;
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
            out.push(Write::StreamMessage { user, message: *message_id, seq: offset, mark: StreamMark::Message });
        }
        StreamItem::Edited { message_id, conversation_id, sender, body, at } => {
            let marks = rows.stream_messages(user, *message_id)?;
            let deleted = marks.iter().any(|(_, mark)| *mark == StreamMark::Deleted);
            // History follows the sender's edit unless the message is deleted for everyone
            // (a sender who deleted it for themselves still edits it for the others).
            if *sender == user && !deleted {
                out.push(Write::MessageEdited { conversation: conversation_id.clone(), message: *message_id, body: body.clone(), at: *at });
                // The edit history for auditors: the text as sent (read from the sender's own
                // message item, the first of the message's rows), then this version.
                if let Some((first, StreamMark::Message)) = marks.first() {
                    if let Some((sent, at0)) = original(rows, user, *first)? {
                        out.push(Write::MessageVersion { message: *message_id, at: at0, body: sent });
                    }
                }
                out.push(Write::MessageVersion { message: *message_id, at: *at, body: body.clone() });
            }
            // Nothing in the user's own stream after a delete, for everyone or for this user.
            keep = marks.iter().all(|(_, mark)| *mark == StreamMark::Message);
            if keep {
                inbox::edited(out, rows, user, item, offset)?;
                out.push(Write::StreamMessage { user, message: *message_id, seq: offset, mark: StreamMark::Message });
            }
        }
        StreamItem::Deleted { message_id, .. } => {
            let seqs = rows.stream_messages(user, *message_id)?;
            let hidden = seqs.iter().any(|(_, mark)| *mark == StreamMark::Hidden);
            if seqs.iter().any(|(_, mark)| *mark == StreamMark::Deleted) {
                keep = false;
            } else {
                // A user who deleted the message for themselves keeps their stream as it is
                // (no row of it holds the text any more), and the sender's copy still empties
                // history and analytics.
                keep = !hidden;
                deleted(out, rows, settings, user, item, if hidden { &[] } else { &seqs })?;
                if keep {
                    inbox::edited(out, rows, user, item, offset)?;
                    out.push(Write::StreamMessage { user, message: *message_id, seq: offset, mark: StreamMark::Deleted });
                }
            }
        }
        StreamItem::Hidden { message_id, conversation_id, .. } => {
            let seqs = rows.stream_messages(user, *message_id)?;
            keep = !seqs.iter().any(|(_, mark)| *mark == StreamMark::Hidden);
            if keep {
                for (seq, _) in &seqs {
                    out.push(Write::Stream { user, row: stream_row(user, item, *seq) });
                }
                out.push(Write::HiddenMessage { user, conversation: conversation_id.clone(), message: *message_id });
                inbox::edited(out, rows, user, item, offset)?;
                out.push(Write::StreamMessage { user, message: *message_id, seq: offset, mark: StreamMark::Hidden });
            }
        }
        StreamItem::Receipt { .. } => receipts::stream_item(out, user, item),
        // The reactor's own copy writes the reaction (their stream is in log order: the last
        // reaction of theirs to a message wins, by its seq).
        StreamItem::Reaction { conversation_id, message_id, by, emoji, .. } => {
            if *by == user {
                out.push(Write::Reaction { conversation: conversation_id.clone(), message: *message_id, user, emoji: emoji.clone(), seq: offset });
            }
        }
        StreamItem::Read { .. } => inbox::read(out, rows, user, item, offset)?,
        StreamItem::Group { .. } => groups::membership(out, rows, user, item)?,
    }
    if keep {
        out.push(Write::Stream { user, row: stream_row(user, item, offset) });
    }
    // An output appended exactly once is never repeated: no guard to keep for it.
    if let Some(src) = q.source.filter(|s| !s.exactly_once) {
        out.push(Write::StreamHead { user, source_partition: src.partition, position: src.packed() });
    }
    Ok(())
}

/// The stream row of an item at `seq`.
fn stream_row(user: UserId, item: &StreamItem, seq: i64) -> StreamRow {
    // Serialising an item of strings, ids and numbers cannot fail.
    let json = serde_json::to_string(item).unwrap_or_default();
    // The item id: the event id the fan-out derived for it (the same for a repeated item).
    let item_id = chat_events::derive_id::delivery_queued(user, item, chat_events::EventId(uuid::Uuid::nil())).0;
    StreamRow { seq, item_id, item: json }
}

/// The text and time of a message as sent, from its item at `seq` of `user`'s stream (none if
/// that row no longer holds the message item).
fn original(rows: &Rows, user: UserId, seq: i64) -> Result<Option<(String, chrono::DateTime<chrono::Utc>)>, Missing> {
    let row = rows.stream_after(user, seq - 1)?.into_iter().find(|r| r.seq == seq);
    Ok(match row.map(|r| serde_json::from_str::<StreamItem>(&r.item)) {
        Some(Ok(StreamItem::Message { body, sent_at, .. })) => Some((body, sent_at)),
        _ => None,
    })
}

/// A message deleted for everyone, in `user`'s stream: the delete item takes the place of the
/// message's item and of its edits (at `seqs`), so no row of the stream keeps the body. The
/// sender's copy also empties the history row and takes the message's topics out of analytics
/// (the topics of the text as sent, read from the sender's own message item).
fn deleted(out: &mut Vec<Write>, rows: &Rows, settings: &Settings, user: UserId, item: &StreamItem, seqs: &[(i64, StreamMark)]) -> Result<(), Missing> {
    let StreamItem::Deleted { conversation_id, message_id, sender, .. } = item else { return Ok(()) };
    if *sender == user {
        if let Some((first, _)) = seqs.first() {
            if let Some((body, sent_at)) = original(rows, user, *first)? {
                for topic in analytics::topics_of(&body, &settings.keywords) {
                    out.push(Write::TopicRemoved { day: analytics::day_of(&sent_at), topic, message: *message_id });
                }
            }
        }
        out.push(Write::MessageDeleted { conversation: conversation_id.clone(), message: *message_id });
    }
    for (seq, _) in seqs {
        out.push(Write::Stream { user, row: stream_row(user, item, *seq) });
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

    fn change(conv: &chat_events::ConversationId, sender: UserId, id: chat_events::MessageId, body: Option<&str>) -> StreamItem {
        let at = chrono::DateTime::from_timestamp_millis(1_700_000_005_000).unwrap_or_default();
        match body {
            Some(b) => StreamItem::Edited { conversation_id: conv.clone(), message_id: id, sender, body: b.into(), at },
            None => StreamItem::Deleted { conversation_id: conv.clone(), message_id: id, sender, by: sender, at },
        }
    }

    /// Folds `items` (at deliveries offsets 10, 11, ...) into `user`'s rows as one slice would,
    /// fetching what a fold asks for from `store` (rows of earlier slices).
    fn fold_all(user: UserId, items: &[StreamItem], store: &[StreamRow], settings: &Settings) -> Vec<Write> {
        let mut rows = Rows::default();
        let mut out = Vec::new();
        for (i, it) in items.iter().enumerate() {
            let q = queued(user, it.clone(), 100 + i as i64);
            loop {
                let mut w = Vec::new();
                match item(&mut w, &rows, settings, &q, 0, 10 + i as i64) {
                    Ok(()) => {
                        for x in &w {
                            rows.note(x);
                        }
                        out.extend(w);
                        break;
                    }
                    Err(Missing(k)) => {
                        let v = match &k {
                            Key::Head(..) => Fetched::Head(None),
                            Key::Inbox(..) => Fetched::Inbox(None),
                            Key::StreamMessages(..) => Fetched::Seqs(Vec::new()),
                            Key::StreamAfter(_, after) => Fetched::Stream(store.iter().filter(|r| r.seq > *after).cloned().collect()),
                            Key::MessageCount(..) => Fetched::Count(None),
                            Key::Intervals(..) => Fetched::Intervals(Vec::new()),
                        };
                        rows.insert(k, v);
                    }
                }
            }
        }
        out
    }

    fn bodies(out: &[Write]) -> Vec<(i64, String)> {
        let mut rows: std::collections::BTreeMap<i64, String> = Default::default();
        for w in out {
            if let Write::Stream { row, .. } = w {
                rows.insert(row.seq, row.item.clone());
            }
        }
        rows.into_iter().collect()
    }

    #[test]
    fn a_delete_replaces_the_message_and_its_edits_in_every_row_of_the_stream() {
        let (a, b, c) = users();
        let settings = Settings { keywords: vec!["pizza".into()] };
        let mut m = message_item(&c, a, msg_id(1), Some("phone"));
        if let StreamItem::Message { body, .. } = &mut m {
            *body = "secret #plan pizza".into();
        }
        let items = [m, change(&c, a, msg_id(1), Some("secret v2")), change(&c, a, msg_id(1), None), change(&c, a, msg_id(1), Some("too late"))];
        // The sender's copy: history, analytics and the stream.
        let out = fold_all(a, &items, &[], &settings);
        let rows = bodies(&out);
        assert_eq!(rows.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![10, 11, 12], "the edit after the delete takes no row");
        assert!(rows.iter().all(|(_, j)| j.contains("\"kind\":\"deleted\"") && !j.contains("secret")), "{rows:?}");
        assert!(out.iter().any(|w| matches!(w, Write::MessageEdited { body, .. } if body == "secret v2")));
        let versions: Vec<&str> = out.iter().filter_map(|w| if let Write::MessageVersion { body, .. } = w { Some(body.as_str()) } else { None }).collect();
        assert_eq!(versions, vec!["secret #plan pizza", "secret v2"], "the edit history: as sent, then the edit");
        let deleted_at = out.iter().position(|w| matches!(w, Write::MessageDeleted { .. })).expect("the history row is emptied");
        assert!(!out[deleted_at..].iter().any(|w| matches!(w, Write::MessageEdited { .. })), "no edit after the delete");
        let mut removed: Vec<&str> = out.iter().filter_map(|w| if let Write::TopicRemoved { topic, .. } = w { Some(topic.as_str()) } else { None }).collect();
        removed.sort();
        assert_eq!(removed, vec!["#plan", "pizza"], "the topics of the text as sent go");
        // The inbox preview: the last version says deleted, with no text.
        let last_inbox = out.iter().rev().find_map(|w| if let Write::Inbox(r) = w { Some(r.clone()) } else { None }).expect("inbox");
        assert_eq!((last_inbox.last_kind.as_str(), last_inbox.last_body.as_str()), ("deleted", ""));
        // A recipient's copy: its own stream rows, no history or analytics writes.
        let out = fold_all(b, &items, &[], &settings);
        assert!(bodies(&out).iter().all(|(_, j)| !j.contains("secret")));
        assert!(!out.iter().any(|w| matches!(w, Write::MessageEdited { .. } | Write::MessageDeleted { .. } | Write::TopicRemoved { .. })));
        let last_inbox = out.iter().rev().find_map(|w| if let Write::Inbox(r) = w { Some(r.clone()) } else { None }).expect("inbox");
        assert_eq!((last_inbox.unread, last_inbox.last_kind.as_str()), (1, "deleted"), "a deleted message keeps its place as unread");
    }

    #[test]
    fn a_delete_for_me_leaves_the_users_stream_and_history_and_nobody_elses() {
        let (a, b, c) = users();
        let settings = Settings::default();
        let mut m = message_item(&c, a, msg_id(1), Some("phone"));
        if let StreamItem::Message { body, .. } = &mut m {
            *body = "secret".into();
        }
        let hidden = StreamItem::Hidden { conversation_id: c.clone(), message_id: msg_id(1), at: chrono::DateTime::from_timestamp_millis(1_700_000_006_000).unwrap_or_default() };
        // b hides it, then the sender edits and deletes it for everyone.
        let items = [m, hidden, change(&c, a, msg_id(1), Some("secret v2")), change(&c, a, msg_id(1), None)];
        let out = fold_all(b, &items, &[], &settings);
        let rows = bodies(&out);
        assert_eq!(rows.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![10, 11], "nothing after the user's own delete: {rows:?}");
        assert!(rows.iter().all(|(_, j)| j.contains("\"kind\":\"hidden\"")), "{rows:?}");
        assert!(out.iter().any(|w| matches!(w, Write::HiddenMessage { user, .. } if *user == b)));
        let last_inbox = out.iter().rev().find_map(|w| if let Write::Inbox(r) = w { Some(r.clone()) } else { None }).expect("inbox");
        assert_eq!((last_inbox.last_kind.as_str(), last_inbox.last_body.as_str()), ("hidden", ""));
        // The sender who hid their own message still empties history when deleting it for everyone.
        let out = fold_all(a, &items, &[], &settings);
        assert!(out.iter().any(|w| matches!(w, Write::MessageDeleted { .. })), "{out:?}");
        assert!(out.iter().any(|w| matches!(w, Write::MessageEdited { .. })), "the sender's edit reaches history: {out:?}");
        assert!(!bodies(&out).iter().any(|(_, j)| j.contains("secret")));
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
