//! The conversation list: `inbox` (last message, unread count) and, for direct conversations,
//! `read_markers`. Every row is a read-modify-write guarded by the offset of the last record
//! applied to it (`applied_offset`), so a redelivered record changes nothing.

use chat_events::{ConversationId, Envelope, MessageId, MessageRead, MessageSent, StreamItem, UserId};
use chat_store::{InboxRow, ReadMarker, Write};

use super::receipts;
use super::rows::{Missing, Rows};

/// The conversation list shows at most this many characters of the last message.
const PREVIEW_CHARS: usize = 100;

fn preview(body: &str) -> String {
    body.chars().take(PREVIEW_CHARS).collect()
}

/// A direct message: the sender's row and the recipient's (one more unread).
pub fn direct_message(out: &mut Vec<Write>, rows: &Rows, env: &Envelope, m: &MessageSent, offset: i64) -> Result<(), Missing> {
    let Some(peer) = m.conversation_id.peer_of(m.sender) else { return Ok(()) };
    for (user, other, unread) in [(m.sender, peer, 0), (peer, m.sender, 1)] {
        let row = rows.inbox(user, &m.conversation_id)?;
        if matches!(&row, Some(r) if r.applied_offset >= offset) {
            continue;
        }
        out.push(Write::Inbox(InboxRow {
            user_id: user,
            conversation_id: m.conversation_id.clone(),
            peer_id: Some(other),
            last_message_id: m.message_id,
            last_sender: m.sender,
            last_kind: m.kind.as_str().to_owned(),
            last_body: preview(&m.body),
            last_at: env.occurred_at,
            unread: row.map(|r| r.unread).unwrap_or(0) + unread,
            applied_offset: offset,
        }));
    }
    Ok(())
}

/// A direct read up to a message: every message of the other member after the reader's previous
/// marker gets its `seen` transition (and is no longer pending), the reader's unread count is
/// recounted, and the marker moves (never backwards), last.
pub fn direct_read(out: &mut Vec<Write>, rows: &Rows, env: &Envelope, r: &MessageRead, offset: i64) -> Result<(), Missing> {
    let conv = &r.conversation_id;
    if !conv.has_member(r.reader) {
        return Ok(());
    }
    let marker = rows.marker(conv, r.reader)?;
    if matches!(&marker, Some(m) if m.applied_offset >= offset) {
        return Ok(());
    }
    let previous = marker.as_ref().map(|m| m.up_to);
    let up_to = match previous {
        Some(p) if p >= r.up_to => p,
        _ => r.up_to,
    };
    let inbox = rows.inbox(r.reader, conv)?;
    let unread = match &inbox {
        Some(row) if row.applied_offset < offset => Some(unread_after(rows, conv, r.reader, up_to, row.last_message_id)?),
        _ => None,
    };
    if previous.is_none_or(|p| r.up_to > p) {
        let newly = rows.messages_between(conv, previous, r.up_to)?;
        for m in newly.iter().filter(|m| m.sender != r.reader) {
            receipts::seen(out, env, r, m.message_id);
        }
    }
    if let (Some(mut row), Some(unread)) = (inbox, unread) {
        row.unread = unread;
        row.applied_offset = offset;
        out.push(Write::Inbox(row));
    }
    // The marker last: once it is there, everything above is done.
    out.push(Write::ReadMarker(ReadMarker { conversation_id: conv.clone(), reader: r.reader, up_to, applied_offset: offset }));
    Ok(())
}

/// Messages of the other member after `read_up_to`, up to the last one.
fn unread_after(rows: &Rows, conv: &ConversationId, reader: UserId, read_up_to: MessageId, last: MessageId) -> Result<i32, Missing> {
    if read_up_to >= last {
        return Ok(0);
    }
    Ok(rows.messages_between(conv, Some(read_up_to), last)?.iter().filter(|m| m.sender != reader).count() as i32)
}

/// A group message item in `user`'s stream at `offset` (deliveries): their row of the group.
pub fn group_message(out: &mut Vec<Write>, rows: &Rows, user: UserId, item: &StreamItem, offset: i64) -> Result<(), Missing> {
    let StreamItem::Message { message_id, conversation_id, sender, message_kind, body, sent_at, .. } = item else { return Ok(()) };
    let row = rows.inbox(user, conversation_id)?;
    if matches!(&row, Some(r) if r.applied_offset >= offset) {
        return Ok(());
    }
    out.push(Write::Inbox(InboxRow {
        user_id: user,
        conversation_id: conversation_id.clone(),
        peer_id: None,
        last_message_id: *message_id,
        last_sender: *sender,
        last_kind: message_kind.as_str().to_owned(),
        last_body: preview(body),
        last_at: *sent_at,
        unread: row.map(|r| r.unread).unwrap_or(0) + i32::from(*sender != user),
        applied_offset: offset,
    }));
    Ok(())
}

/// A group `read` item in `user`'s stream: the unread count is recounted over the user's own
/// stream after the message read up to (written by this same writer, in order), scanning at most
/// [`super::rows::STREAM_SCAN`] items.
pub fn group_read(out: &mut Vec<Write>, rows: &Rows, user: UserId, conv: &ConversationId, up_to: MessageId, offset: i64) -> Result<(), Missing> {
    let Some(mut row) = rows.inbox(user, conv)? else { return Ok(()) };
    if row.applied_offset >= offset {
        return Ok(());
    }
    let read_item = super::streams::message_item_id(user, conv, up_to);
    let mut unread = 0;
    if let Some(seq) = rows.seq(user, read_item)? {
        for r in rows.stream_after(user, seq)? {
            if let Ok(StreamItem::Message { conversation_id, sender, .. }) = serde_json::from_str::<StreamItem>(&r.item) {
                if &conversation_id == conv && sender != user {
                    unread += 1;
                }
            }
        }
    }
    row.unread = unread;
    row.applied_offset = offset;
    out.push(Write::Inbox(row));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::views::fixtures::*;
    use crate::views::rows::{Fetched, Key};
    use chat_events::{DeviceId, Event};

    fn message_of(env: &Envelope) -> &MessageSent {
        match &env.event {
            Event::MessageSent(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn a_message_updates_both_rows_and_counts_unread_for_the_recipient_only() {
        let (a, b, c) = users();
        let mut rows = Rows::default();
        rows.insert(Key::Inbox(a, c.clone()), Fetched::Inbox(None));
        rows.insert(Key::Inbox(b, c.clone()), Fetched::Inbox(None));
        let mut out = Vec::new();
        for (i, offset) in [(1, 10), (2, 11)] {
            let env = sent(&c, a, msg_id(i), "hello");
            let mut writes = Vec::new();
            direct_message(&mut writes, &rows, &env, message_of(&env), offset).unwrap();
            for w in &writes {
                rows.note(w);
            }
            out.extend(writes);
        }
        // The same record again (redelivered): nothing.
        let again = sent(&c, a, msg_id(2), "hello");
        let mut writes = Vec::new();
        direct_message(&mut writes, &rows, &again, message_of(&again), 11).unwrap();
        assert!(writes.is_empty(), "{writes:?}");
        let bob = rows.inbox(b, &c).unwrap().unwrap();
        let alice = rows.inbox(a, &c).unwrap().unwrap();
        assert_eq!((bob.unread, bob.peer_id, bob.last_message_id, bob.applied_offset), (2, Some(a), msg_id(2), 11));
        assert_eq!((alice.unread, alice.peer_id), (0, Some(b)));
        assert_eq!(out.len(), 4);
    }

    #[test]
    fn a_read_sees_the_other_members_messages_after_the_marker_then_moves_it() {
        let (a, b, c) = users();
        let mut rows = Rows::default();
        let row = |user, peer| InboxRow {
            user_id: user,
            conversation_id: c.clone(),
            peer_id: Some(peer),
            last_message_id: msg_id(4),
            last_sender: a,
            last_kind: "text".into(),
            last_body: "4".into(),
            last_at: chrono::Utc::now(),
            unread: 3,
            applied_offset: 4,
        };
        rows.insert(Key::Inbox(b, c.clone()), Fetched::Inbox(Some(row(b, a))));
        rows.insert(Key::Marker(c.clone(), b), Fetched::Marker(Some(ReadMarker { conversation_id: c.clone(), reader: b, up_to: msg_id(1), applied_offset: 2 })));
        for i in 1..=4 {
            let sender = if i == 3 { b } else { a };
            let env = sent(&c, sender, msg_id(i), "x");
            let mut w = Vec::new();
            super::super::history::direct_message(&mut w, &env, message_of(&env), i as i64);
            rows.note(&w[0]);
        }
        rows.insert(Key::Between(c.clone(), Some(msg_id(1)), msg_id(3)), Fetched::Messages(Vec::new()));
        rows.insert(Key::Between(c.clone(), Some(msg_id(3)), msg_id(4)), Fetched::Messages(Vec::new()));
        let read = env(b, Event::MessageRead(MessageRead { conversation_id: c.clone(), reader: b, device_id: DeviceId::default_device(), up_to: msg_id(3) }));
        let Event::MessageRead(r) = &read.event else { unreachable!() };
        let mut out = Vec::new();
        direct_read(&mut out, &rows, &read, r, 9).unwrap();
        let seen: Vec<MessageId> = out.iter().filter_map(|w| match w { Write::Receipt(r) => Some(r.message_id), _ => None }).collect();
        assert_eq!(seen, vec![msg_id(2)], "only alice's message after the marker, up to 3");
        let unread = out.iter().find_map(|w| match w { Write::Inbox(r) => Some(r.unread), _ => None });
        assert_eq!(unread, Some(1), "message 4 is still unread");
        assert!(matches!(out.last(), Some(Write::ReadMarker(m)) if m.up_to == msg_id(3) && m.applied_offset == 9), "the marker is last");
        // Applied once: the same read again writes nothing.
        for w in &out {
            rows.note(w);
        }
        let mut again = Vec::new();
        direct_read(&mut again, &rows, &read, r, 9).unwrap();
        assert!(again.is_empty());
    }

    #[test]
    fn a_read_needs_its_rows_before_it_writes() {
        let (_a, b, c) = users();
        let read = env(b, Event::MessageRead(MessageRead { conversation_id: c.clone(), reader: b, device_id: DeviceId::default_device(), up_to: msg_id(3) }));
        let Event::MessageRead(r) = &read.event else { unreachable!() };
        let mut out = Vec::new();
        assert_eq!(direct_read(&mut out, &Rows::default(), &read, r, 9), Err(Missing(Key::Marker(c, b))));
    }
}
