//! Events to table writes. Every write is idempotent, and every read-modify-write is guarded by
//! the source offset (`applied_offset`) of the row, so a redelivered or replayed event changes
//! nothing. Rows of one conversation are written only by the owner of that conversation's
//! partition, rows of one user stream only by the owner of that user's deliveries partition:
//! one writer per row, processing in log order.

use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt;
use chat_events::{
    ConversationId, Envelope, Event, EventLog, GroupChange, GroupRole, MessageDelivered, MessageId, MessageRead,
    MessageSent, PresenceStatus, ReceiptStatus, Record, StreamItem, TopicKind, Topics, UserId,
};
use chat_store::{
    GroupMemberRow, GroupRow, InboxRow, MessageRow, ProfileRow, ReadMarker, ReceiptRow, StoreError, StreamRow, Tables,
    UserGroupRow,
};

use crate::analytics::{day_of, topics_of};
use tracing::debug;

use crate::worker::{dead_letter, Handler, HandlerError};

/// The projection stage.
pub struct Projector {
    store: Arc<dyn Tables>,
    log: Arc<dyn EventLog>,
    topics: Topics,
    /// Analytics keywords (configuration: a rebuild with other keywords counts other topics).
    keywords: Vec<String>,
}

type R<T> = Result<T, StoreError>;

impl Projector {
    pub fn new(store: Arc<dyn Tables>, log: Arc<dyn EventLog>, topics: Topics, keywords: Vec<String>) -> Self {
        Projector { store, log, topics, keywords }
    }

    /// Analytics of one accepted message: counted once per (day, kind, scope), its sender active
    /// that day, its topics.
    async fn message_stats(&self, id: MessageId, sender: UserId, kind: &str, group: bool, body: &str, at: &chrono::DateTime<chrono::Utc>) -> R<()> {
        let day = day_of(at);
        // Set inserts that commute: issued together, so that they share one commit.
        let topics = topics_of(body, &self.keywords);
        let (stat, active, topics) = futures::join!(
            self.store.add_message_stat(day, kind, if group { "group" } else { "direct" }, id),
            self.store.add_active_user(day, sender),
            futures::future::join_all(topics.iter().map(|t| self.store.add_topic(day, t, id))),
        );
        stat?;
        active?;
        topics.into_iter().collect()
    }

    /// Applies one event read at `offset` of its partition.
    pub async fn apply(&self, env: &Envelope, offset: i64) -> R<()> {
        // Whoever acknowledges or reads is active that day (sending is counted with the message).
        // A set insert that depends on nothing else: issued beside the event's own writes.
        let active = async {
            match &env.event {
                Event::MessageDelivered(d) => self.store.add_active_user(day_of(&env.occurred_at), d.recipient).await,
                Event::MessageRead(r) => self.store.add_active_user(day_of(&env.occurred_at), r.reader).await,
                Event::PresenceChanged(p) if p.status == PresenceStatus::Online => {
                    self.store.add_active_user(day_of(&env.occurred_at), p.user_id).await
                }
                _ => Ok(()),
            }
        };
        let (active, rest) = futures::join!(active, self.apply_event(env, offset));
        active.and(rest)
    }

    async fn apply_event(&self, env: &Envelope, offset: i64) -> R<()> {
        match &env.event {
            // Facts kept in the log itself (and, for roles and media, in command-side tables).
            Event::UserRoleChanged(_) | Event::AuditAccessed(_) | Event::MediaUploaded(_) => Ok(()),
            Event::ProfileUpdated(p) => {
                self.store
                    .put_profile(&ProfileRow {
                        user_id: p.user_id,
                        display_name: p.display_name.clone(),
                        avatar_media_id: p.avatar_media_id,
                        updated_at: env.occurred_at,
                    })
                    .await
            }
            Event::ProfileViewed(v) => self.store.add_profile_view(v.viewed, day_of(&env.occurred_at), v.viewer, env.event_id).await,
            Event::UserRegistered(u) => self.store.put_user(u.user_id, &u.username, env.occurred_at).await,
            // Group conversations are projected from the fan-out's validated output (the
            // stream items below), never from their raw events: only the fan-out knows who was a
            // member at each position.
            Event::MessageSent(m) if m.conversation_id.is_group() => Ok(()),
            Event::MessageRead(r) if r.conversation_id.is_group() => Ok(()),
            Event::MessageDelivered(d) if d.conversation_id.is_group() => {
                // The acknowledging member has it now, whatever the fan-out decides about the
                // receipt (the gateway checked the message is of this group).
                self.store.remove_pending(d.recipient, d.message_id).await
            }
            Event::MessageSent(m) => self.message_sent(env, m, offset).await,
            Event::MessageDelivered(d) => self.message_delivered(env, d).await,
            Event::MessageRead(r) => self.message_read(env, r, offset).await,
            Event::GroupCreated(_) | Event::GroupRenamed(_) | Event::GroupMemberAdded(_) | Event::GroupMemberRemoved(_) => Ok(()),
            Event::PresenceChanged(p) => {
                self.store.put_presence(p.user_id, p.status == PresenceStatus::Online, env.occurred_at).await
            }
            Event::DeliveryQueued(q) => self.delivery_queued(env, q.recipient, &q.item, offset).await,
        }
    }

    async fn message_sent(&self, env: &Envelope, m: &MessageSent, offset: i64) -> R<()> {
        let Some((a, b)) = m.conversation_id.direct_members() else {
            return Ok(());
        };
        if m.sender != a && m.sender != b {
            debug!(message = %m.message_id, "sender is not a member; ignored");
            return Ok(());
        }
        let peer = if m.sender == a { b } else { a };
        // The history row, the analytics, the "sent" receipt and both inbox rows are independent
        // (each guarded on its own), so they are written together and share commits.
        let row = MessageRow {
            conversation_id: m.conversation_id.clone(),
            message_id: m.message_id,
            sender: m.sender,
            sender_device: m.sender_device.to_string(),
            client_msg_id: m.client_msg_id.clone(),
            kind: m.kind.as_str().to_owned(),
            body: m.body.clone(),
            sent_at: env.occurred_at,
            position: offset,
            media: m.media.clone(),
        };
        let sent = [ReceiptRow {
            message_id: m.message_id,
            recipient: peer,
            status: ReceiptStatus::Sent,
            device_id: String::new(),
            at: env.occurred_at,
            conversation_id: m.conversation_id.clone(),
        }];
        let inbox = |user: UserId, other: UserId, unread_inc: i32| async move {
            let row = self.store.inbox_row(user, &m.conversation_id).await?;
            if matches!(&row, Some(r) if r.applied_offset >= offset) {
                return Ok(());
            }
            let unread = row.as_ref().map(|r| r.unread).unwrap_or(0) + unread_inc;
            self.store
                .put_inbox_row(&InboxRow {
                    user_id: user,
                    conversation_id: m.conversation_id.clone(),
                    peer_id: Some(other),
                    last_message_id: m.message_id,
                    last_sender: m.sender,
                    last_kind: m.kind.as_str().to_owned(),
                    last_body: preview(&m.body),
                    last_at: env.occurred_at,
                    unread,
                    applied_offset: offset,
                })
                .await
        };
        let (history, stats, receipt, inbox_sender, inbox_peer) = futures::join!(
            self.store.put_message(&row),
            self.message_stats(m.message_id, m.sender, m.kind.as_str(), false, &m.body, &env.occurred_at),
            self.store.put_receipts(&sent),
            inbox(m.sender, peer, 0),
            inbox(peer, m.sender, 1),
        );
        history.and(stats).and(receipt).and(inbox_sender).and(inbox_peer)
    }

    async fn message_delivered(&self, env: &Envelope, d: &MessageDelivered) -> R<()> {
        // Only a real message of this conversation, acknowledged by a member who is not its
        // sender, gets a delivered transition; anything else a client claims is ignored.
        let Some(meta) = self.store.message_meta(d.message_id).await? else {
            debug!(message = %d.message_id, "delivery for an unknown message; ignored");
            return Ok(());
        };
        if meta.conversation_id != d.conversation_id || meta.sender == d.recipient || !d.conversation_id.has_member(d.recipient)
        {
            return Ok(());
        }
        // Independent and idempotent: issued together.
        let receipt = [ReceiptRow {
            message_id: d.message_id,
            recipient: d.recipient,
            status: ReceiptStatus::Delivered,
            device_id: d.device_id.to_string(),
            at: env.occurred_at,
            conversation_id: d.conversation_id.clone(),
        }];
        let (receipt, pending) = futures::join!(self.store.put_receipts(&receipt), self.store.remove_pending(d.recipient, d.message_id));
        receipt.and(pending)
    }

    async fn message_read(&self, env: &Envelope, r: &MessageRead, offset: i64) -> R<()> {
        let conv = &r.conversation_id;
        if !conv.has_member(r.reader) {
            return Ok(());
        }
        let marker = self.store.read_marker(conv, r.reader).await?;
        if matches!(&marker, Some(m) if m.applied_offset >= offset) {
            return Ok(());
        }
        let previous = marker.as_ref().map(|m| m.up_to);
        let up_to = match previous {
            Some(p) if p >= r.up_to => p,
            _ => r.up_to,
        };
        if previous.is_none_or(|p| r.up_to > p) {
            // Every message of the other member in (previous marker, up_to] is now seen.
            let newly = self.store.messages_between(conv, previous, r.up_to).await?;
            let rows: Vec<ReceiptRow> = newly
                .iter()
                .filter(|m| m.sender != r.reader)
                .map(|m| ReceiptRow {
                    message_id: m.message_id,
                    recipient: r.reader,
                    status: ReceiptStatus::Seen,
                    device_id: r.device_id.to_string(),
                    at: env.occurred_at,
                    conversation_id: conv.clone(),
                })
                .collect();
            self.store.put_receipts(&rows).await?;
            for row in &rows {
                // Read implies delivered to some device: nothing is pending any more.
                self.store.remove_pending(r.reader, row.message_id).await?;
            }
        }
        if let Some(mut inbox) = self.store.inbox_row(r.reader, conv).await? {
            if inbox.applied_offset < offset {
                inbox.unread = self.unread_after(conv, r.reader, up_to, inbox.last_message_id).await?;
                inbox.applied_offset = offset;
                self.store.put_inbox_row(&inbox).await?;
            }
        }
        // The marker last: once it is there, everything above is done.
        self.store
            .put_read_marker(&ReadMarker { conversation_id: conv.clone(), reader: r.reader, up_to, applied_offset: offset })
            .await
    }

    async fn unread_after(&self, conv: &ConversationId, reader: UserId, read_up_to: MessageId, last: MessageId) -> R<i32> {
        if read_up_to >= last {
            return Ok(0);
        }
        let rows = self.store.messages_between(conv, Some(read_up_to), last).await?;
        Ok(rows.iter().filter(|m| m.sender != reader).count() as i32)
    }

    async fn delivery_queued(&self, env: &Envelope, recipient: UserId, item: &StreamItem, offset: i64) -> R<()> {
        if self.store.stream_seq_of(recipient, env.event_id.0).await?.is_some() {
            // Already in the stream (a replay, or a duplicate the fan-out wrote after a crash):
            // the first position stays the only one.
            return Ok(());
        }
        if let StreamItem::Message { message_id, conversation_id, sender, .. } = item {
            if *sender != recipient {
                self.store.add_pending(recipient, *message_id, conversation_id).await?;
            }
        }
        self.group_views(recipient, item, offset).await?;
        let json = serde_json::to_string(item).map_err(|e| StoreError::Data(e.to_string()))?;
        // The stream row last: once it is there, everything this item causes is written.
        self.store.put_stream_item(recipient, &StreamRow { seq: offset, item_id: env.event_id.0, item: json }).await
    }

    /// Group views written from one user's stream items: this writer owns that user's rows
    /// (inbox, memberships), processes them in stream order, and guards read-modify-writes with
    /// the stream offset.
    async fn group_views(&self, user: UserId, item: &StreamItem, offset: i64) -> R<()> {
        match item {
            StreamItem::Message { message_id, conversation_id, sender, client_msg_id, message_kind, body, sent_at, position, media }
                if conversation_id.is_group() =>
            {
                let position = position.unwrap_or_default();
                if *sender == user {
                    // The sender's own copy writes history: once per message, and only for
                    // messages the fan-out accepted.
                    self.store
                        .put_message(&MessageRow {
                            conversation_id: conversation_id.clone(),
                            message_id: *message_id,
                            sender: *sender,
                            sender_device: String::new(),
                            client_msg_id: client_msg_id.clone(),
                            kind: message_kind.as_str().to_owned(),
                            body: body.clone(),
                            sent_at: *sent_at,
                            position,
                            media: media.clone(),
                        })
                        .await?;
                    self.message_stats(*message_id, *sender, message_kind.as_str(), true, body, sent_at).await?;
                } else {
                    self.store
                        .put_receipts(&[ReceiptRow {
                            message_id: *message_id,
                            recipient: user,
                            status: ReceiptStatus::Sent,
                            device_id: String::new(),
                            at: *sent_at,
                            conversation_id: conversation_id.clone(),
                        }])
                        .await?;
                }
                let row = self.store.inbox_row(user, conversation_id).await?;
                if matches!(&row, Some(r) if r.applied_offset >= offset) {
                    return Ok(());
                }
                let unread = row.as_ref().map(|r| r.unread).unwrap_or(0) + i32::from(*sender != user);
                self.store
                    .put_inbox_row(&InboxRow {
                        user_id: user,
                        conversation_id: conversation_id.clone(),
                        peer_id: None,
                        last_message_id: *message_id,
                        last_sender: *sender,
                        last_kind: message_kind.as_str().to_owned(),
                        last_body: preview(body),
                        last_at: *sent_at,
                        unread,
                        applied_offset: offset,
                    })
                    .await
            }
            StreamItem::Receipt { conversation_id, message_id, status, by, at, all, device_id } if conversation_id.is_group() && !*all => {
                self.store
                    .put_receipts(&[ReceiptRow {
                        message_id: *message_id,
                        recipient: *by,
                        status: *status,
                        device_id: device_id.clone().unwrap_or_default(),
                        at: *at,
                        conversation_id: conversation_id.clone(),
                    }])
                    .await
            }
            StreamItem::Read { conversation_id, up_to, .. } if conversation_id.is_group() => {
                let Some(mut row) = self.store.inbox_row(user, conversation_id).await? else { return Ok(()) };
                if row.applied_offset >= offset {
                    return Ok(());
                }
                row.unread = self.unread_in_stream(user, conversation_id, *up_to).await?;
                row.applied_offset = offset;
                self.store.put_inbox_row(&row).await
            }
            StreamItem::Group { conversation_id, change, name, member, role, members, by, at, position } => {
                let p = *position;
                let name = name.clone().unwrap_or_default();
                // Member rows before the group row: once a reader sees the group, it sees every
                // membership the creation made (the gateway's membership check relies on it).
                if *change == GroupChange::Created {
                    for m in members.iter().flatten() {
                        let role = if m == by { GroupRole::Admin } else { GroupRole::Member };
                        self.store
                            .put_group_member(&GroupMemberRow { conversation_id: conversation_id.clone(), member: *m, role, active: true, position: p })
                            .await?;
                    }
                }
                // Who this item is about: the member it names, or (created) the recipient.
                let subject = match change {
                    GroupChange::Created => Some((user, true)),
                    GroupChange::MemberAdded => Some((member.unwrap_or(user), true)),
                    GroupChange::MemberRemoved => Some((member.unwrap_or(user), false)),
                    GroupChange::Renamed => None,
                };
                if let Some((subject, active)) = subject {
                    let role = role.unwrap_or(if *change == GroupChange::Created && *by == user { GroupRole::Admin } else { GroupRole::Member });
                    self.store
                        .put_group_member(&GroupMemberRow { conversation_id: conversation_id.clone(), member: subject, role, active, position: p })
                        .await?;
                    if subject == user {
                        self.store
                            .put_user_group(&UserGroupRow { user_id: user, conversation_id: conversation_id.clone(), role, active, position: p })
                            .await?;
                        let (since, until) = if active { (p, None) } else { (self.open_since(user, conversation_id).await?, Some(p)) };
                        if let Some(since) = since_known(since) {
                            self.store.put_user_group_interval(user, conversation_id, since, until).await?;
                        }
                    }
                }
                if *change == GroupChange::Created {
                    self.store
                        .put_group(&GroupRow { conversation_id: conversation_id.clone(), name, creator: *by, created_at: *at, position: p })
                        .await
                } else {
                    self.store.put_group_name(conversation_id, &name, p).await
                }
            }
            StreamItem::Message { .. } | StreamItem::Receipt { .. } | StreamItem::Read { .. } => Ok(()),
        }
    }

    /// The `since` of the user's open interval in a group (the one a removal closes).
    async fn open_since(&self, user: UserId, conv: &ConversationId) -> R<i64> {
        let intervals = self.store.user_group_intervals(user, conv).await?;
        Ok(intervals.iter().rev().find(|(_, until)| until.is_none()).map(|(since, _)| *since).unwrap_or(-1))
    }

    /// Unread messages of a group for a user who read up to `up_to`: the user's own stream
    /// holds every message they got, in order, written by this same writer.
    async fn unread_in_stream(&self, user: UserId, conv: &ConversationId, up_to: MessageId) -> R<i32> {
        let probe = StreamItem::Message {
            message_id: up_to,
            conversation_id: conv.clone(),
            sender: user,
            client_msg_id: String::new(),
            message_kind: chat_events::MessageKind::Text,
            body: String::new(),
            sent_at: chrono::Utc::now(),
            position: None,
            media: None,
        };
        let id = chat_events::derive_id::delivery_queued(user, &probe, chat_events::EventId::new_v7());
        let Some(seq) = self.store.stream_seq_of(user, id.0).await? else { return Ok(0) };
        let mut unread = 0;
        for row in self.store.stream_after(user, seq, UNREAD_SCAN).await? {
            if let Ok(StreamItem::Message { conversation_id, sender, .. }) = serde_json::from_str::<StreamItem>(&row.item) {
                if &conversation_id == conv && sender != user {
                    unread += 1;
                }
            }
        }
        Ok(unread)
    }
}

/// How many stream items after a read marker are scanned to count a group's unread messages
/// (beyond it the count is a lower bound, shown as such by clients).
const UNREAD_SCAN: usize = 2_000;

fn since_known(since: i64) -> Option<i64> {
    (since >= 0).then_some(since)
}

/// The conversation list shows at most this many characters of the last message.
const PREVIEW_CHARS: usize = 100;

fn preview(body: &str) -> String {
    body.chars().take(PREVIEW_CHARS).collect()
}

impl Projector {
    /// Projects one record (dead-letters it if it cannot be read).
    async fn one(&self, rec: &Record) -> Result<(), String> {
        let env = match Envelope::decode(&rec.payload) {
            Ok(env) => env,
            Err(e) => return dead_letter(self.log.as_ref(), &self.topics, rec, &e.to_string()).await.map_err(|le| le.to_string()),
        };
        // An event on a topic it does not belong to would break the single-writer rules.
        if self.topics.kind_of(&rec.topic) != Some(env.event.topic_kind()) {
            let reason = format!("{} found on topic {}", env.event.type_name(), rec.topic);
            return dead_letter(self.log.as_ref(), &self.topics, rec, &reason).await.map_err(|le| le.to_string());
        }
        self.apply(&env, rec.offset).await.map_err(|e| e.to_string())
    }
}

/// Keys of one partition projected at once (on a pipelined store their statements share the
/// writer's transactions, so many keys in flight cost little).
const USERS_IN_FLIGHT: usize = 256;

#[async_trait]
impl Handler for Projector {
    async fn handle(&self, records: &[Record]) -> Result<(), HandlerError> {
        // A partition interleaves many keys: conversations (conversations topic), users (users
        // and deliveries topics). Every row has a single writer keyed like the record that
        // writes it and needs order only among that key's records, so keys are projected
        // concurrently (a message to a 1,024-member group is 1,024 deliveries records), each
        // key's records in order; their writes share the store's commits.
        let mut users: Vec<Vec<usize>> = Vec::new();
        let mut index: std::collections::HashMap<&[u8], usize> = std::collections::HashMap::new();
        for (i, rec) in records.iter().enumerate() {
            let key = rec.key.as_deref().unwrap_or_default();
            let slot = *index.entry(key).or_insert_with(|| {
                users.push(Vec::new());
                users.len() - 1
            });
            users[slot].push(i);
        }
        let mark = self.store.write_mark();
        let failures: Vec<(usize, String)> = futures::stream::iter(users)
            .map(|idxs| async move {
                for i in idxs {
                    if let Err(reason) = self.one(&records[i]).await {
                        return Some((i, reason));
                    }
                }
                None
            })
            .buffer_unordered(USERS_IN_FLIGHT)
            .filter_map(|f| async move { f })
            .collect()
            .await;
        // Nothing is done before its writes are committed: if a commit failed, every record
        // of the slice is handled again (idempotently).
        if let Err(e) = self.store.settle(mark).await {
            return Err(HandlerError { done: 0, reason: e.to_string() });
        }
        // Every record before the first failure (in partition order) is done, whichever user
        // it belongs to; what follows is handled again (idempotently) on the retry.
        match failures.into_iter().min_by_key(|(i, _)| *i) {
            None => Ok(()),
            Some((done, reason)) => Err(HandlerError { done, reason }),
        }
    }
    async fn sync(&self) -> Result<(), String> {
        self.store.sync().await.map_err(|e| e.to_string())
    }
}

/// Which topics the projection stage reads.
pub fn projection_topics(topics: &Topics) -> Vec<String> {
    vec![
        topics.name(TopicKind::Conversations),
        topics.name(TopicKind::Users),
        topics.name(TopicKind::Deliveries),
    ]
}
