//! The search stage: keeps the message search index ([`chat_search::SearchIndex`]) from the
//! fan-out's output. Only the sender's own copy of a message, edit or delete counts (one document
//! per message, not per recipient); the fan-out already dropped what it refused (a retried send,
//! a group message of a non-member, an edit out of its window), so the index holds exactly the
//! messages history holds. The index's commit is the stage's sync: offsets are stored only after
//! the changes they cover are durable, and a record handled again replaces a document by id.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chat_events::{Envelope, Event, Record, StreamItem};
use chat_search::{IndexOp, MessageDoc, SearchIndex};

use crate::worker::{Handled, Handler, HandlerError};

/// How often, at most, the index commits (each commit writes a small segment and syncs it; the
/// index merges them in the background, so fewer commits cost less CPU and fewer bytes: at 500 ms
/// the indexer cost a message ~150 µs of server CPU, see docs/benchmarks.md "Search"). Searches
/// see a message after at most about this long past its projection.
pub const SEARCH_COMMIT_EVERY: Duration = Duration::from_secs(2);

/// Whether a record may change the index, from its bytes: only message, edit and delete items do,
/// and most of the deliveries topic is receipts and reads, which are then not decoded at all.
fn may_index(payload: &[u8]) -> bool {
    const KINDS: [&[u8]; 3] = [b"\"kind\":\"message\"", b"\"kind\":\"edited\"", b"\"kind\":\"deleted\""];
    KINDS.iter().any(|k| payload.windows(k.len()).any(|w| w == *k))
}

/// The index change one record causes (none for most).
pub fn op(env: &Envelope) -> Option<IndexOp> {
    let Event::DeliveryQueued(q) = &env.event else { return None };
    match &q.item {
        StreamItem::Message { message_id, conversation_id, sender, message_kind, body, sent_at, position, withheld: false, .. } if *sender == q.recipient => {
            Some(IndexOp::Put(MessageDoc {
                message_id: *message_id,
                conversation_id: conversation_id.clone(),
                sender: *sender,
                kind: *message_kind,
                body: body.clone(),
                sent_at: *sent_at,
                position: position.unwrap_or(0),
            }))
        }
        StreamItem::Edited { message_id, sender, body, .. } if *sender == q.recipient => Some(IndexOp::Edit { message_id: *message_id, body: body.clone() }),
        StreamItem::Deleted { message_id, sender, .. } if *sender == q.recipient => Some(IndexOp::Remove { message_id: *message_id }),
        _ => None,
    }
}

/// The search stage's handler.
pub struct Indexer {
    index: Arc<SearchIndex>,
}

impl Indexer {
    pub fn new(index: Arc<SearchIndex>) -> Self {
        Indexer { index }
    }
}

#[async_trait]
impl Handler for Indexer {
    async fn handle(&self, records: &[Record]) -> Result<Handled, HandlerError> {
        let mut ops = Vec::new();
        for rec in records.iter().filter(|r| may_index(&r.payload)) {
            match Envelope::decode(&rec.payload) {
                Ok(env) => ops.extend(op(&env)),
                // Undecodable records are the projections' to dead-letter; here they index nothing.
                Err(e) => tracing::debug!(offset = rec.offset, error = %e, "search: record not decoded"),
            }
        }
        if ops.is_empty() {
            return Ok(Handled::default());
        }
        let index = self.index.clone();
        tokio::task::spawn_blocking(move || index.apply(ops))
            .await
            .map_err(|e| HandlerError::retry(0, e))?
            .map_err(|e| HandlerError::retry(0, e))?;
        Ok(Handled::default())
    }

    async fn sync(&self) -> Result<(), HandlerError> {
        let index = self.index.clone();
        tokio::task::spawn_blocking(move || index.commit())
            .await
            .map_err(|e| HandlerError::retry(0, e))?
            // Changes applied and not committed are lost with the writer: the records behind
            // them must be handled again.
            .map_err(|e| HandlerError::fatal(format!("search index commit: {e}")))
    }

    fn sync_every(&self) -> Duration {
        SEARCH_COMMIT_EVERY
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_events::{ConversationId, DeliveryQueued, EventId, MessageId, MessageKind, ReceiptStatus, UserId};

    fn queued(recipient: UserId, item: StreamItem) -> Envelope {
        Envelope::new(EventId::new_v7(), None, Event::DeliveryQueued(DeliveryQueued { recipient, item, source: None }))
    }

    #[test]
    fn only_the_senders_own_message_edit_and_delete_items_index() {
        let (a, b) = (UserId::random(), UserId::random());
        let conv = ConversationId::direct(a, b);
        let id = MessageId::new_v7();
        let at = chat_events::now_millis();
        let message = StreamItem::Message {
            message_id: id,
            conversation_id: conv.clone(),
            sender: a,
            client_msg_id: "c".into(),
            message_kind: MessageKind::Text,
            body: "hello there".into(),
            sent_at: at,
            sender_device: None,
            position: None,
            media: None,
            reply_to: None,
            mentions: Vec::new(),
            withheld: false,
        };
        let edited = StreamItem::Edited { conversation_id: conv.clone(), message_id: id, sender: a, body: "hi".into(), at };
        let deleted = StreamItem::Deleted { conversation_id: conv.clone(), message_id: id, sender: a, by: a, at };
        let receipt = StreamItem::Receipt { conversation_id: conv, message_id: id, status: ReceiptStatus::Seen, by: b, at, all: false, device_id: None };
        for (recipient, item, indexes) in [(a, &message, true), (b, &message, false), (a, &edited, true), (b, &edited, false), (a, &deleted, true), (a, &receipt, false)] {
            let env = queued(recipient, item.clone());
            assert_eq!(op(&env).is_some(), indexes, "{item:?} to the {}", if recipient == a { "sender" } else { "recipient" });
            if indexes {
                assert!(may_index(&env.encode()), "{item:?}: the byte filter lets it through");
            }
        }
        assert!(!may_index(&queued(a, StreamItem::Read { private: false, conversation_id: ConversationId::direct(a, b), up_to: id, at, device_id: None }).encode()));
    }
}
