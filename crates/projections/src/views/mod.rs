//! Every projection as a pure fold: from an event, its position and the rows it needs to the
//! [`Write`]s it causes, as data. Nothing here touches a store: the projector
//! (`crate::projector`) fetches the rows ([`Rows`]), calls [`fold`] for each record of a slice and
//! applies the slice's writes at once; the tests below give rows and an event and check the writes.
//!
//! One module per view:
//! - [`history`]: `messages`, `conversation_buckets`, `message_index`;
//! - [`inbox`]: `inbox` (last message, unread) and `read_markers`;
//! - [`receipts`]: `receipts` / `receipts_by_user` and `pending_deliveries`;
//! - [`streams`]: `user_stream` / `user_stream_ids`, the collapse of repeated stream items;
//! - [`groups`]: `groups`, `group_members`, `user_groups`, `user_group_intervals`;
//! - [`people`]: `users`, `last_seen`, `profiles`;
//! - [`analytics`]: the analytics sets.
//!
//! Rows have single writers: a conversation's rows are written only from that conversation's
//! partition, a user's stream rows (and the group views built from them) only from that user's
//! deliveries partition, so a fold's read-modify-writes see every earlier write to their rows.
//! Every read-modify-write is guarded by the source offset it applied (`applied_offset`), so a
//! redelivered record changes nothing.

pub mod analytics;
pub mod groups;
pub mod history;
pub mod inbox;
pub mod people;
pub mod receipts;
pub mod rows;
pub mod streams;

use chat_events::{Envelope, Event, PresenceStatus, StreamItem};
use chat_store::Write;

pub use rows::{Fetched, Key, Missing, Rows};

/// What a fold needs besides the event and the rows.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    /// Analytics keywords (configuration: a rebuild with other keywords counts other topics).
    pub keywords: Vec<String>,
}

/// One record to project: the event and its offset in its partition.
#[derive(Clone, Copy, Debug)]
pub struct Input<'a> {
    pub env: &'a Envelope,
    pub offset: i64,
}

/// The rows a record certainly needs (fetched for a whole slice before its first fold).
pub fn prefetch(input: Input<'_>, out: &mut Vec<Key>) {
    let env = input.env;
    match &env.event {
        Event::MessageSent(m) if !m.conversation_id.is_group() => {
            if let Some((a, b)) = m.conversation_id.direct_members() {
                out.push(Key::Inbox(a, m.conversation_id.clone()));
                out.push(Key::Inbox(b, m.conversation_id.clone()));
            }
        }
        Event::MessageDelivered(d) if !d.conversation_id.is_group() => out.push(Key::Meta(d.message_id)),
        Event::MessageRead(r) if !r.conversation_id.is_group() => {
            out.push(Key::Marker(r.conversation_id.clone(), r.reader));
            out.push(Key::Inbox(r.reader, r.conversation_id.clone()));
        }
        Event::DeliveryQueued(q) => {
            out.push(Key::Seq(q.recipient, env.event_id.0));
            match &q.item {
                StreamItem::Message { conversation_id, .. } | StreamItem::Read { conversation_id, .. } if conversation_id.is_group() => {
                    out.push(Key::Inbox(q.recipient, conversation_id.clone()));
                }
                _ => {}
            }
        }
        _ => {}
    }
}

/// The writes one record causes, given the rows it needs (or the first row it needs that is not
/// loaded). Deterministic: the same record and rows give the same writes.
pub fn fold(input: Input<'_>, rows: &Rows, settings: &Settings) -> Result<Vec<Write>, Missing> {
    let env = input.env;
    let mut out = Vec::new();
    // Whoever acknowledges, reads or comes online is active that day (a sender is counted with
    // the message).
    match &env.event {
        Event::MessageDelivered(d) => analytics::active(&mut out, &env.occurred_at, d.recipient),
        Event::MessageRead(r) => analytics::active(&mut out, &env.occurred_at, r.reader),
        Event::PresenceChanged(p) if p.status == PresenceStatus::Online => analytics::active(&mut out, &env.occurred_at, p.user_id),
        _ => {}
    }
    match &env.event {
        // Facts kept in the log itself (and, for roles and media, in command-side tables).
        Event::UserRoleChanged(_) | Event::AuditAccessed(_) | Event::MediaUploaded(_) => {}
        Event::UserRegistered(u) => people::registered(&mut out, env, u),
        Event::PresenceChanged(p) => people::presence(&mut out, env, p),
        Event::ProfileUpdated(p) => people::profile(&mut out, env, p),
        Event::ProfileViewed(v) => analytics::profile_view(&mut out, env, v),
        // Group conversations are projected from the fan-out's validated output (the stream
        // items), never from their raw events: only the fan-out knows who was a member at each
        // position. One exception: the acknowledging member has the message now.
        Event::MessageSent(m) if m.conversation_id.is_group() => {}
        Event::MessageRead(r) if r.conversation_id.is_group() => {}
        Event::MessageDelivered(d) if d.conversation_id.is_group() => receipts::group_delivered(&mut out, d),
        Event::GroupCreated(_) | Event::GroupRenamed(_) | Event::GroupMemberAdded(_) | Event::GroupMemberRemoved(_) => {}
        Event::MessageSent(m) => {
            if history::direct_message(&mut out, env, m, input.offset) {
                analytics::message(&mut out, settings, m.message_id, m.sender, m.kind.as_str(), false, &m.body, &env.occurred_at);
                receipts::direct_sent(&mut out, env, m);
                inbox::direct_message(&mut out, rows, env, m, input.offset)?;
            }
        }
        Event::MessageDelivered(d) => receipts::direct_delivered(&mut out, rows, env, d)?,
        Event::MessageRead(r) => inbox::direct_read(&mut out, rows, env, r, input.offset)?,
        Event::DeliveryQueued(q) => streams::item(&mut out, rows, settings, env, q, input.offset)?,
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod fixtures {
    //! Events and rows for the given/when/then tests of the views.

    use chat_events::{ConversationId, DeviceId, Envelope, Event, EventId, MessageId, MessageKind, MessageSent, UserId};

    pub fn users() -> (UserId, UserId, ConversationId) {
        let (a, b) = (UserId(uuid::Uuid::from_u128(0xa)), UserId(uuid::Uuid::from_u128(0xb)));
        (a, b, ConversationId::direct(a, b))
    }

    pub fn msg_id(n: u64) -> MessageId {
        MessageId(uuid::Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 | u128::from(n) << 80))
    }

    pub fn env(actor: UserId, event: Event) -> Envelope {
        Envelope::new(EventId(uuid::Uuid::from_u128(0xe0e0)), Some(actor), event)
    }

    pub fn sent(conv: &ConversationId, sender: UserId, id: MessageId, body: &str) -> Envelope {
        env(
            sender,
            Event::MessageSent(MessageSent {
                message_id: id,
                conversation_id: conv.clone(),
                sender,
                sender_device: DeviceId::default_device(),
                client_msg_id: format!("c-{id}"),
                kind: MessageKind::Text,
                body: body.into(),
                media: None,
            }),
        )
    }
}
