//! Every projection as a pure fold: from an event, its position and the rows it needs to the
//! [`Write`]s it causes, as data. Nothing here touches a store: the projector
//! (`crate::projector`) fetches the rows ([`Rows`]), calls [`fold`] for each record of a slice and
//! applies the slice's writes at once; the tests below give rows and an event and check the writes.
//!
//! One module per view:
//! - [`history`]: `messages`, `conversation_buckets`, `message_index`;
//! - [`inbox`]: `inbox` (last message, unread, how far the user read);
//! - [`receipts`]: `receipts` / `receipts_by_user`;
//! - [`streams`]: `user_stream` / `stream_heads`, the collapse of repeated stream items;
//! - [`groups`]: `groups`, `group_members`, `user_groups`, `user_group_intervals`;
//! - [`people`]: `users`, `last_seen`, `profiles`, `privacy_settings`, `blocks`;
//! - [`analytics`]: the analytics sets.
//!
//! Conversations, direct and group alike, are projected from the fan-out's validated output:
//! the `delivery.queued` items of each user's stream. The fan-out is the conversation aggregate
//! (it drops a retried send appended twice, and decides group membership at each position), so
//! the raw `message.sent` and `message.read` events are not projected; `message.delivered` is
//! (a device's ack: its receipt row and the end of the pending row). A user's rows (stream,
//! inbox, pending, memberships) have a single writer, the owner of the user's deliveries
//! partition, which applies the user's items in stream order; every read-modify-write is guarded
//! by the deliveries offset it applied (`applied_offset`), so a redelivered item changes nothing.

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

/// One record to project: the event, its partition and its offset there.
#[derive(Clone, Copy, Debug)]
pub struct Input<'a> {
    pub env: &'a Envelope,
    pub partition: i32,
    pub offset: i64,
}

/// The rows a record certainly needs (fetched for a whole slice before its first fold).
pub fn prefetch(input: Input<'_>, out: &mut Vec<Key>) {
    if let Event::DeliveryQueued(q) = &input.env.event {
        if let Some(src) = q.source {
            out.push(Key::Head(q.recipient, src.partition));
        }
        match &q.item {
            StreamItem::Message { conversation_id, sender, message_kind, sent_at, .. } => {
                out.push(Key::Inbox(q.recipient, conversation_id.clone()));
                if *sender == q.recipient {
                    out.push(Key::MessageCount(analytics::count_key(input.partition, message_kind.as_str(), conversation_id.is_group(), sent_at)));
                }
            }
            StreamItem::Read { conversation_id, .. } => {
                out.push(Key::Inbox(q.recipient, conversation_id.clone()));
            }
            StreamItem::Edited { conversation_id, message_id, .. }
            | StreamItem::Deleted { conversation_id, message_id, .. }
            | StreamItem::Hidden { conversation_id, message_id, .. } => {
                out.push(Key::Inbox(q.recipient, conversation_id.clone()));
                out.push(Key::StreamMessages(q.recipient, *message_id));
            }
            StreamItem::Receipt { .. } | StreamItem::Group { .. } | StreamItem::Reaction { .. } => {}
        }
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
        // Facts kept in the log itself (and, for roles, bans and media, in command-side tables).
        Event::UserRoleChanged(_)
        | Event::SessionsEnded(_)
        | Event::UserBanned(_)
        | Event::UserUnbanned(_)
        | Event::AuditAccessed(_)
        | Event::MediaUploaded(_) => {}
        Event::UserRegistered(u) => people::registered(&mut out, env, u),
        Event::PresenceChanged(p) => people::presence(&mut out, env, p),
        Event::ProfileUpdated(p) => people::profile(&mut out, env, p),
        Event::PrivacyUpdated(p) => people::privacy(&mut out, env, p),
        Event::UserBlocked(b) => people::block(&mut out, env, b, true),
        Event::UserUnblocked(b) => people::block(&mut out, env, b, false),
        Event::ProfileViewed(v) => analytics::profile_view(&mut out, env, v),
        // Projected from the fan-out's output (the stream items), which alone knows which send
        // of a key is the message and who was a member at each position.
        Event::MessageSent(_)
        | Event::MessageRead(_)
        | Event::MessageEdited(_)
        | Event::MessageDeleted(_)
        | Event::MessageHidden(_)
        | Event::MessageReacted(_) => {}
        Event::GroupCreated(_) | Event::GroupRenamed(_) | Event::GroupMemberAdded(_) | Event::GroupMemberRemoved(_) => {}
        Event::MessageDelivered(d) => receipts::delivered(&mut out, env, d),
        Event::DeliveryQueued(q) => streams::item(&mut out, rows, settings, q, input.partition, input.offset)?,
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod fixtures {
    //! Events and items for the given/when/then tests of the views.

    use chat_events::{ConversationId, Envelope, Event, EventId, MessageId, MessageKind, StreamItem, UserId};

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

    pub fn message_item(conv: &ConversationId, sender: UserId, id: MessageId, device: Option<&str>) -> StreamItem {
        StreamItem::Message {
            message_id: id,
            conversation_id: conv.clone(),
            sender,
            client_msg_id: format!("c-{id}"),
            message_kind: MessageKind::Text,
            body: "hi".into(),
            sent_at: chrono::DateTime::from_timestamp_millis(1_700_000_000_000).unwrap_or_default(),
            sender_device: device.map(str::to_owned),
            position: None,
            media: None,
            reply_to: None,
            mentions: Vec::new(),
            withheld: false,
        }
    }

    pub fn read_item(conv: &ConversationId, up_to: MessageId) -> StreamItem {
        StreamItem::Read {
            conversation_id: conv.clone(),
            up_to,
            at: chrono::DateTime::from_timestamp_millis(1_700_000_001_000).unwrap_or_default(),
            device_id: Some("phone".into()),
            private: false,
        }
    }
}
