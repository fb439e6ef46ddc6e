//! The conversation list: a user's `inbox` row of each conversation (last message, unread count,
//! how far they read), written from the user's own stream items by the single writer of the
//! user's deliveries partition. Every write is a read-modify-write guarded by the deliveries
//! offset of the last item applied (`applied_offset`), so a redelivered item changes nothing.

use chat_events::{MessageId, ReceiptStatus, StreamItem, UserId};
use chat_store::{InboxRow, ReceiptRow, Write};

use super::rows::{Missing, Rows};

/// The conversation list shows at most this many characters of the last message.
const PREVIEW_CHARS: usize = 100;

fn preview(body: &str) -> String {
    body.chars().take(PREVIEW_CHARS).collect()
}

/// A message item at `offset` of `user`'s stream: the last message; one more unread if another
/// member sent it (and where the unread ones start, for the next read).
pub fn message(out: &mut Vec<Write>, rows: &Rows, user: UserId, item: &StreamItem, offset: i64) -> Result<(), Missing> {
    let StreamItem::Message { message_id, conversation_id, sender, message_kind, body, sent_at, mentions, .. } = item else { return Ok(()) };
    let row = rows.inbox(user, conversation_id)?;
    if matches!(&row, Some(r) if r.applied_offset >= offset) {
        return Ok(());
    }
    let theirs = *sender != user;
    let first_unread_seq = row.as_ref().and_then(|r| r.first_unread_seq).or(theirs.then_some(offset));
    out.push(Write::Inbox(InboxRow {
        user_id: user,
        conversation_id: conversation_id.clone(),
        peer_id: conversation_id.peer_of(user),
        last_message_id: *message_id,
        last_sender: *sender,
        last_kind: message_kind.as_str().to_owned(),
        last_body: preview(body),
        last_at: *sent_at,
        unread: row.as_ref().map(|r| r.unread).unwrap_or(0) + i32::from(theirs),
        mentions: row.as_ref().map(|r| r.mentions).unwrap_or(0) + i32::from(theirs && mentions.contains(&user)),
        first_unread_seq,
        read_up_to: row.as_ref().and_then(|r| r.read_up_to),
        applied_offset: offset,
        wrote: !theirs || row.is_some_and(|r| r.wrote),
    }));
    Ok(())
}

/// An `edited`, `deleted` or `hidden` item at `offset` of `user`'s stream: the conversation list's
/// preview follows when the message is the conversation's last (a deleted one shows kind
/// `deleted`, one the user deleted for themselves `hidden`, and no text). The unread count stays:
/// a deleted message keeps its place, as a placeholder, until the next `read` recounts.
pub fn edited(out: &mut Vec<Write>, rows: &Rows, user: UserId, item: &StreamItem, offset: i64) -> Result<(), Missing> {
    let (conv, message, text) = match item {
        StreamItem::Edited { conversation_id, message_id, body, .. } => (conversation_id, message_id, Some(body)),
        StreamItem::Deleted { conversation_id, message_id, .. } => (conversation_id, message_id, None),
        StreamItem::Hidden { conversation_id, message_id, .. } => (conversation_id, message_id, Some(&String::new())),
        _ => return Ok(()),
    };
    let hidden = matches!(item, StreamItem::Hidden { .. });
    let Some(mut row) = rows.inbox(user, conv)? else { return Ok(()) };
    if row.applied_offset >= offset || row.last_message_id != *message {
        return Ok(());
    }
    match text {
        Some(_) if hidden => (row.last_body, row.last_kind) = (String::new(), "hidden".to_owned()),
        Some(body) => row.last_body = preview(body),
        None => (row.last_body, row.last_kind) = (String::new(), "deleted".to_owned()),
    }
    row.applied_offset = offset;
    out.push(Write::Inbox(row));
    Ok(())
}

/// A `read` item at `offset` of `user`'s stream (the user read a conversation up to a message,
/// on some device): the other members' messages from the first unread one up to `up_to` are read,
/// the ones after stay unread (counted over the user's own stream, at most
/// [`super::rows::STREAM_SCAN`] items from the first unread). In a direct conversation each of
/// them also gets its `seen` transition (unless the read is `private`); a group's seen receipts come from the fan-out, per
/// member.
pub fn read(out: &mut Vec<Write>, rows: &Rows, user: UserId, item: &StreamItem, offset: i64) -> Result<(), Missing> {
    let StreamItem::Read { conversation_id: conv, up_to, at, device_id, private } = item else { return Ok(()) };
    let Some(mut row) = rows.inbox(user, conv)? else { return Ok(()) };
    if row.applied_offset >= offset {
        return Ok(());
    }
    let read_up_to = row.read_up_to.map_or(*up_to, |r| r.max(*up_to));
    let (mut unread, mut mentioned, mut first_unread) = (0, 0, None);
    if let Some(start) = row.first_unread_seq {
        // Only the items before this one: later ones may be in the store already when a slice is
        // projected again, and must not count.
        // A deleted message still counts (in its place: the delete item that replaced it), once.
        let mut deleted = std::collections::HashSet::new();
        for r in rows.stream_after(user, start - 1)?.into_iter().take_while(|r| r.seq < offset) {
            let (conversation_id, sender, message_id, mentions) = match serde_json::from_str::<StreamItem>(&r.item) {
                Ok(StreamItem::Message { conversation_id, sender, message_id, mentions, .. }) => (conversation_id, sender, message_id, mentions),
                Ok(StreamItem::Deleted { conversation_id, sender, message_id, .. }) if deleted.insert(message_id) => {
                    (conversation_id, sender, message_id, Vec::new())
                }
                _ => continue,
            };
            if &conversation_id != conv || sender == user {
                continue;
            }
            if message_id <= read_up_to {
                // (A read without a receipt, by the privacy settings, leaves no `seen` row.)
                if !conv.is_group() && !private {
                    seen(out, user, conv, message_id, at, device_id.as_deref());
                }
            } else {
                unread += 1;
                mentioned += i32::from(mentions.contains(&user));
                first_unread.get_or_insert(r.seq);
            }
        }
    }
    row.unread = unread;
    row.mentions = mentioned;
    row.first_unread_seq = first_unread;
    row.read_up_to = Some(read_up_to);
    row.applied_offset = offset;
    out.push(Write::Inbox(row));
    Ok(())
}

/// A direct message of the other member, read by `reader`: seen.
fn seen(out: &mut Vec<Write>, reader: UserId, conv: &chat_events::ConversationId, message: MessageId, at: &chrono::DateTime<chrono::Utc>, device: Option<&str>) {
    let Some(sender) = conv.peer_of(reader) else { return };
    out.push(Write::Receipt(ReceiptRow {
        message_id: message,
        sender,
        recipient: reader,
        status: ReceiptStatus::Seen,
        device_id: device.unwrap_or_default().to_owned(),
        at: *at,
        conversation_id: conv.clone(),
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::fixtures::*;
    use crate::views::rows::{Fetched, Key};
    use chat_store::StreamRow;

    /// Folds items of `user`'s stream in order, noting each record's writes.
    fn apply(rows: &mut Rows, user: UserId, items: &[(i64, StreamItem)]) -> Vec<Write> {
        let mut all = Vec::new();
        for (offset, item) in items {
            let mut out = Vec::new();
            match item {
                StreamItem::Message { .. } => message(&mut out, rows, user, item, *offset).unwrap(),
                StreamItem::Read { .. } => read(&mut out, rows, user, item, *offset).unwrap(),
                _ => {}
            }
            out.push(Write::Stream { user, row: StreamRow { seq: *offset, item_id: uuid::Uuid::new_v4(), item: serde_json::to_string(item).unwrap() } });
            for w in &out {
                rows.note(w);
            }
            all.extend(out);
        }
        all
    }

    #[test]
    fn messages_count_unread_and_a_read_marks_the_ones_it_covers_seen() {
        let (a, b, c) = users();
        let mut rows = Rows::default();
        rows.insert(Key::Inbox(b, c.clone()), Fetched::Inbox(None));
        rows.insert(Key::StreamAfter(b, 9), Fetched::Stream(Vec::new()));
        // bob's stream: alice's 1 and 2, his own 3, alice's 4; then he reads up to 2.
        let items = vec![
            (10, message_item(&c, a, msg_id(1), None)),
            (11, message_item(&c, a, msg_id(2), None)),
            (12, message_item(&c, b, msg_id(3), Some("phone"))),
            (13, message_item(&c, a, msg_id(4), None)),
        ];
        apply(&mut rows, b, &items);
        let row = rows.inbox(b, &c).unwrap().unwrap();
        assert_eq!((row.unread, row.first_unread_seq, row.last_message_id, row.peer_id), (3, Some(10), msg_id(4), Some(a)));
        let writes = apply(&mut rows, b, &[(14, read_item(&c, msg_id(2)))]);
        let seen: Vec<MessageId> = writes.iter().filter_map(|w| match w { Write::Receipt(r) if r.status == ReceiptStatus::Seen => Some(r.message_id), _ => None }).collect();
        assert_eq!(seen, vec![msg_id(1), msg_id(2)], "alice's messages up to 2, not bob's own");
        let row = rows.inbox(b, &c).unwrap().unwrap();
        assert_eq!((row.unread, row.first_unread_seq, row.read_up_to), (1, Some(13), Some(msg_id(2))), "4 is still unread");
        // The same read item again (redelivered): nothing.
        let mut again = Vec::new();
        read(&mut again, &rows, b, &read_item(&c, msg_id(2)), 14).unwrap();
        assert!(again.is_empty());
        // Reading up to the end: nothing unread, 4 seen; an older read later changes nothing back.
        rows.insert(Key::StreamAfter(b, 12), Fetched::Stream(Vec::new()));
        apply(&mut rows, b, &[(15, read_item(&c, msg_id(4))), (16, read_item(&c, msg_id(1)))]);
        let row = rows.inbox(b, &c).unwrap().unwrap();
        assert_eq!((row.unread, row.first_unread_seq, row.read_up_to), (0, None, Some(msg_id(4))));
    }

    #[test]
    fn a_private_read_moves_the_marker_and_marks_nothing_seen() {
        let (a, b, c) = users();
        let mut rows = Rows::default();
        rows.insert(Key::Inbox(b, c.clone()), Fetched::Inbox(None));
        rows.insert(Key::StreamAfter(b, 9), Fetched::Stream(Vec::new()));
        apply(&mut rows, b, &[(10, message_item(&c, a, msg_id(1), None)), (11, message_item(&c, a, msg_id(2), None))]);
        let mut private = read_item(&c, msg_id(1));
        if let StreamItem::Read { private: p, .. } = &mut private {
            *p = true;
        }
        let writes = apply(&mut rows, b, &[(12, private)]);
        assert!(!writes.iter().any(|w| matches!(w, Write::Receipt(_))), "no seen row for a private read: {writes:?}");
        let row = rows.inbox(b, &c).unwrap().unwrap();
        assert_eq!((row.unread, row.read_up_to), (1, Some(msg_id(1))), "the unread count and the marker follow it");
        // A later read with a receipt marks only what it newly covers.
        rows.insert(Key::StreamAfter(b, 10), Fetched::Stream(Vec::new()));
        let writes = apply(&mut rows, b, &[(13, read_item(&c, msg_id(2)))]);
        let seen: Vec<MessageId> = writes.iter().filter_map(|w| match w { Write::Receipt(r) if r.status == ReceiptStatus::Seen => Some(r.message_id), _ => None }).collect();
        assert_eq!(seen, vec![msg_id(2)], "the privately read message stays without a seen row");
    }

    #[test]
    fn a_read_needs_the_users_row_first() {
        let (_a, b, c) = users();
        let mut out = Vec::new();
        assert_eq!(read(&mut out, &Rows::default(), b, &read_item(&c, msg_id(3)), 9), Err(Missing(Key::Inbox(b, c))));
    }
}
