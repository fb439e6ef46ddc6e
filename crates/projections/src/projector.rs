//! Events to table writes. Every write is idempotent, and every read-modify-write is guarded by
//! the source offset (`applied_offset`) of the row, so a redelivered or replayed event changes
//! nothing. Rows of one conversation are written only by the owner of that conversation's
//! partition, rows of one user stream only by the owner of that user's deliveries partition:
//! one writer per row, processing in log order.

use std::sync::Arc;

use async_trait::async_trait;
use chat_events::{
    ConversationId, Envelope, Event, EventLog, MessageDelivered, MessageId, MessageRead, MessageSent, PresenceStatus,
    ReceiptStatus, Record, StreamItem, TopicKind, Topics, UserId,
};
use chat_store::{InboxRow, MessageRow, ProjectionStore, ReadMarker, ReceiptRow, StoreError, StreamRow};
use tracing::debug;

use crate::worker::{dead_letter, Handler, HandlerError};

/// The projection stage.
pub struct Projector {
    store: Arc<dyn ProjectionStore>,
    log: Arc<dyn EventLog>,
    topics: Topics,
}

type R<T> = Result<T, StoreError>;

impl Projector {
    pub fn new(store: Arc<dyn ProjectionStore>, log: Arc<dyn EventLog>, topics: Topics) -> Self {
        Projector { store, log, topics }
    }

    /// Applies one event read at `offset` of its partition.
    pub async fn apply(&self, env: &Envelope, offset: i64) -> R<()> {
        match &env.event {
            Event::UserRegistered(u) => self.store.put_user(u.user_id, &u.username, env.occurred_at).await,
            Event::MessageSent(m) => self.message_sent(env, m, offset).await,
            Event::MessageDelivered(d) => self.message_delivered(env, d).await,
            Event::MessageRead(r) => self.message_read(env, r, offset).await,
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
        self.store
            .put_message(&MessageRow {
                conversation_id: m.conversation_id.clone(),
                message_id: m.message_id,
                sender: m.sender,
                sender_device: m.sender_device.to_string(),
                client_msg_id: m.client_msg_id.clone(),
                kind: m.kind.as_str().to_owned(),
                body: m.body.clone(),
                sent_at: env.occurred_at,
            })
            .await?;
        self.store
            .put_receipts(&[ReceiptRow {
                message_id: m.message_id,
                recipient: peer,
                status: ReceiptStatus::Sent,
                device_id: String::new(),
                at: env.occurred_at,
                conversation_id: m.conversation_id.clone(),
            }])
            .await?;
        for (user, other, unread_inc) in [(m.sender, peer, 0), (peer, m.sender, 1)] {
            let row = self.store.inbox_row(user, &m.conversation_id).await?;
            if matches!(&row, Some(r) if r.applied_offset >= offset) {
                continue;
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
                .await?;
        }
        Ok(())
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
        self.store
            .put_receipts(&[ReceiptRow {
                message_id: d.message_id,
                recipient: d.recipient,
                status: ReceiptStatus::Delivered,
                device_id: d.device_id.to_string(),
                at: env.occurred_at,
                conversation_id: d.conversation_id.clone(),
            }])
            .await?;
        self.store.remove_pending(d.recipient, d.message_id).await
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
        let json = serde_json::to_string(item).map_err(|e| StoreError::Data(e.to_string()))?;
        self.store.put_stream_item(recipient, &StreamRow { seq: offset, item_id: env.event_id.0, item: json }).await
    }
}

/// The conversation list shows at most this many characters of the last message.
const PREVIEW_CHARS: usize = 100;

fn preview(body: &str) -> String {
    body.chars().take(PREVIEW_CHARS).collect()
}

#[async_trait]
impl Handler for Projector {
    async fn handle(&self, records: &[Record]) -> Result<(), HandlerError> {
        for (i, rec) in records.iter().enumerate() {
            let env = match Envelope::decode(&rec.payload) {
                Ok(env) => env,
                Err(e) => {
                    dead_letter(self.log.as_ref(), &self.topics, rec, &e.to_string())
                        .await
                        .map_err(|le| HandlerError { done: i, reason: le.to_string() })?;
                    continue;
                }
            };
            // An event on a topic it does not belong to would break the single-writer rules.
            if self.topics.kind_of(&rec.topic) != Some(env.event.topic_kind()) {
                let reason = format!("{} found on topic {}", env.event.type_name(), rec.topic);
                dead_letter(self.log.as_ref(), &self.topics, rec, &reason)
                    .await
                    .map_err(|le| HandlerError { done: i, reason: le.to_string() })?;
                continue;
            }
            if let Err(e) = self.apply(&env, rec.offset).await {
                return Err(HandlerError { done: i, reason: e.to_string() });
            }
        }
        Ok(())
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
