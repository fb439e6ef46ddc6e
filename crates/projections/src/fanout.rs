//! The fan-out stage: conversations topic in, per-recipient deliveries topic out.
//!
//! It is the single writer of every recipient's stream: the offset of a `delivery.queued` in the
//! recipient's partition is that recipient's sync cursor, so a cursor never skips an item that is
//! written later (no holes). It reads each conversation in log order, which is also where a
//! group's membership as of a message's position will be decided.

use std::sync::Arc;

use async_trait::async_trait;
use chat_events::{
    derive_id, DeliveryQueued, Envelope, Event, EventLog, ReceiptStatus, Record, StreamItem, Topics, UserId,
};

use crate::worker::{dead_letter, Handler, HandlerError};

/// The fan-out stage.
pub struct FanOut {
    log: Arc<dyn EventLog>,
    topics: Topics,
}

impl FanOut {
    pub fn new(log: Arc<dyn EventLog>, topics: Topics) -> Self {
        FanOut { log, topics }
    }
}

fn queued(source: &Envelope, recipient: UserId, item: StreamItem) -> Envelope {
    Envelope {
        event_id: derive_id::delivery_queued(recipient, &item),
        // The source's time, so that a replayed fan-out writes identical events.
        occurred_at: source.occurred_at,
        actor: None,
        event: Event::DeliveryQueued(DeliveryQueued { recipient, item }),
    }
}

/// What one event of the conversations topic puts into users' streams.
pub fn route(env: &Envelope) -> Vec<Envelope> {
    match &env.event {
        Event::MessageSent(m) => {
            let Some((a, b)) = m.conversation_id.direct_members() else {
                return Vec::new();
            };
            let item = StreamItem::Message {
                message_id: m.message_id,
                conversation_id: m.conversation_id.clone(),
                sender: m.sender,
                client_msg_id: m.client_msg_id.clone(),
                message_kind: m.kind,
                body: m.body.clone(),
                sent_at: env.occurred_at,
            };
            // Recipient first, then the sender's own stream (for the sender's other devices).
            let recipient = if a == m.sender { b } else { a };
            vec![queued(env, recipient, item.clone()), queued(env, m.sender, item)]
        }
        Event::MessageDelivered(d) => match d.conversation_id.peer_of(d.recipient) {
            Some(sender) => vec![queued(
                env,
                sender,
                StreamItem::Receipt {
                    conversation_id: d.conversation_id.clone(),
                    message_id: d.message_id,
                    status: ReceiptStatus::Delivered,
                    by: d.recipient,
                    at: env.occurred_at,
                },
            )],
            None => Vec::new(),
        },
        Event::MessageRead(r) => match r.conversation_id.peer_of(r.reader) {
            Some(peer) => vec![queued(
                env,
                peer,
                StreamItem::Receipt {
                    conversation_id: r.conversation_id.clone(),
                    message_id: r.up_to,
                    status: ReceiptStatus::Seen,
                    by: r.reader,
                    at: env.occurred_at,
                },
            )],
            None => Vec::new(),
        },
        // Not on the conversations topic; nothing to fan out.
        Event::UserRegistered(_) | Event::PresenceChanged(_) | Event::DeliveryQueued(_) => Vec::new(),
    }
}

#[async_trait]
impl Handler for FanOut {
    async fn handle(&self, records: &[Record]) -> Result<(), HandlerError> {
        // (index of the source record, output) for every output of the slice.
        let mut outputs: Vec<(usize, Envelope)> = Vec::new();
        for (i, rec) in records.iter().enumerate() {
            match Envelope::decode(&rec.payload) {
                Ok(env) => outputs.extend(route(&env).into_iter().map(|o| (i, o))),
                Err(e) => {
                    if let Err(le) = dead_letter(self.log.as_ref(), &self.topics, rec, &e.to_string()).await {
                        return Err(HandlerError { done: i, reason: le.to_string() });
                    }
                }
            }
        }
        let batch = outputs
            .iter()
            .map(|(_, env)| (self.topics.name(env.event.topic_kind()), env.key(), env.encode()))
            .collect();
        let results = self.log.append_batch(batch).await;
        // The first failed output decides how far the slice got; everything after it is
        // retried (outputs that did land are collapsed downstream by their derived ids).
        if let Some(pos) = results.iter().position(|r| r.is_err()) {
            let done = outputs[pos].0;
            let reason = match &results[pos] {
                Err(e) => e.to_string(),
                Ok(_) => String::new(),
            };
            return Err(HandlerError { done, reason });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_events::{ConversationId, DeviceId, EventId, MessageDelivered, MessageId, MessageKind, MessageRead, MessageSent};

    fn sent(a: UserId, b: UserId) -> Envelope {
        Envelope::new(
            EventId::new_v7(),
            Some(a),
            Event::MessageSent(MessageSent {
                message_id: MessageId::new_v7(),
                conversation_id: ConversationId::direct(a, b),
                sender: a,
                sender_device: DeviceId::default_device(),
                client_msg_id: "x".into(),
                kind: MessageKind::Text,
                body: "hi".into(),
            }),
        )
    }

    fn recipients(out: &[Envelope]) -> Vec<UserId> {
        out.iter()
            .map(|e| match &e.event {
                Event::DeliveryQueued(d) => d.recipient,
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    #[test]
    fn a_message_goes_to_the_recipient_and_the_sender() {
        let (a, b) = (UserId::random(), UserId::random());
        let out = route(&sent(a, b));
        assert_eq!(recipients(&out), vec![b, a]);
        // Same input, same ids: a replayed fan-out collapses downstream.
        let env = sent(a, b);
        assert_eq!(route(&env), route(&env));
    }

    #[test]
    fn receipts_go_to_the_other_member() {
        let (a, b) = (UserId::random(), UserId::random());
        let conv = ConversationId::direct(a, b);
        let m = MessageId::new_v7();
        let d = Envelope::new(
            EventId::new_v7(),
            Some(b),
            Event::MessageDelivered(MessageDelivered {
                message_id: m,
                conversation_id: conv.clone(),
                recipient: b,
                device_id: DeviceId::default_device(),
            }),
        );
        assert_eq!(recipients(&route(&d)), vec![a]);
        let phone: DeviceId = "phone".parse().unwrap();
        let d2 = Envelope::new(
            EventId::new_v7(),
            Some(b),
            Event::MessageDelivered(MessageDelivered { message_id: m, conversation_id: conv.clone(), recipient: b, device_id: phone }),
        );
        // A second device's delivery maps to the same stream item id.
        assert_eq!(route(&d)[0].event_id, route(&d2)[0].event_id);
        let r = Envelope::new(
            EventId::new_v7(),
            Some(b),
            Event::MessageRead(MessageRead { conversation_id: conv, reader: b, device_id: DeviceId::default_device(), up_to: m }),
        );
        assert_eq!(recipients(&route(&r)), vec![a]);
    }
}
