//! The fan-out stage: conversations topic in, per-recipient deliveries topic out.
//!
//! It is the single writer of every recipient's stream: the offset of a `delivery.queued` in the
//! recipient's partition is that recipient's sync cursor, so a cursor never skips an item that is
//! written later (no holes).
//!
//! It is also the group aggregate. It reads each group's events in log order and decides, at
//! each event's position, who is a member, whether a membership change is allowed (admins only,
//! size limit), whether a sender may post, and who gets a message — membership as of the
//! message's position, so a member removed before a message never gets it and a member added
//! after it never gets it. Its state is positional (member intervals `[since, until)` in the
//! `fanout_*` tables), so handling any event again after a crash gives the same answer whatever
//! later state is already written. Everything downstream (projections, pushes of group items) sees
//! only its validated output.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chat_events::{
    derive_id, within_edit_window, Committer, ConversationId, DeliveryQueued, Envelope, Event, EventLog, GroupChange, GroupRole, MessageDeleted,
    MessageDelivered, MessageEdited, MessageHidden, MessageReacted, MessageRead, MessageSent, DEFAULT_EDIT_WINDOW, ReceiptStatus, Record, Source, StreamItem, Topics, UserId,
};
use chat_store::{content_sha256, FanoutGroup, FanoutMessage, FanoutStore, MemberInterval, SendRecord, StoreError};
use tracing::{debug, info, warn};

use crate::worker::{Handled, Handler, HandlerError};

/// Best-effort delivery of stream items to their recipients' live connections (the fast path of
/// group items, which only the fan-out can address correctly).
#[async_trait]
pub trait Pusher: Send + Sync {
    async fn push(&self, items: Vec<(UserId, StreamItem)>);
}

/// Groups whose member lists are kept in memory, at most.
const MEMBER_CACHE_GROUPS: usize = 10_000;

/// The fan-out stage.
pub struct FanOut {
    log: Arc<dyn EventLog>,
    topics: Topics,
    store: Arc<dyn FanoutStore>,
    pusher: Option<Arc<dyn Pusher>>,
    max_group_size: usize,
    /// How long after sending a message may be edited or deleted for everyone.
    edit_window: Duration,
    /// Member intervals per group, valid while the group's `membership_version` is unchanged.
    members: Mutex<HashMap<ConversationId, CachedMembers>>,
    /// Duplicate sends dropped since start.
    duplicates: AtomicU64,
    /// Appends outputs with the consumer's offset in one atomic step, where the log can (the
    /// embedded log): outputs are then exactly once ([`Source::exactly_once`]).
    committer: Option<Arc<dyn Committer>>,
    /// Per partition, the offset after the last slice handled (a slice starting elsewhere, the
    /// first after a start or a rebalance, first catches the fan-out's state up to it), and when
    /// its watermark was last written by this fan-out.
    next: Mutex<HashMap<(String, i32), PartitionMark>>,
}

/// A partition's next offset and when this fan-out last wrote its watermark.
type PartitionMark = (i64, Option<Instant>);

/// Records read per page when the state is caught up (see [`FanOut::catch_up`]).
const CATCH_UP_PAGE: usize = 1000;

/// How often, at most, a partition's watermark is written: it only bounds a catch-up from
/// below, so an older one is as correct (and costs a row write per interval, not per slice).
const WATERMARK_EVERY: Duration = Duration::from_secs(1);

/// A slice routed: its outputs (with the index of their source record), and the record whose
/// routing failed, if any (the outputs are those of the records before it).
struct Routed {
    outputs: Vec<(usize, Envelope)>,
    failed: Option<(usize, StoreError)>,
}

type R<T> = Result<T, StoreError>;

/// A group's member intervals and the membership version they were read at.
type CachedMembers = (i64, Arc<Vec<MemberInterval>>);

/// What a group item says besides its change: (name, member, role).
type GroupDetail = (Option<String>, Option<UserId>, Option<GroupRole>);

fn queued(source: &Envelope, recipient: UserId, item: StreamItem) -> Envelope {
    Envelope {
        event_id: derive_id::delivery_queued(recipient, &item, source.event_id),
        // The source's time, so that a replayed fan-out writes identical events.
        occurred_at: source.occurred_at,
        actor: None,
        // The source is set when the event's outputs are complete (see `with_sources`).
        event: Event::DeliveryQueued(DeliveryQueued { recipient, item, source: None }),
    }
}

/// Numbers an event's outputs: each carries the event's partition and offset and its index.
fn with_sources(outputs: &mut [Envelope], partition: i32, offset: i64, exactly_once: bool) {
    for (index, out) in outputs.iter_mut().enumerate() {
        if let Event::DeliveryQueued(q) = &mut out.event {
            q.source = Some(Source { partition, offset, index: index as u32, exactly_once });
        }
    }
}

/// The same outputs, not marked exactly once (appended the ordinary way after all).
fn guarded(outputs: &[(usize, Envelope)]) -> Vec<(usize, Envelope)> {
    let mut outputs = outputs.to_vec();
    for (_, out) in &mut outputs {
        if let Event::DeliveryQueued(DeliveryQueued { source: Some(src), .. }) = &mut out.event {
            src.exactly_once = false;
        }
    }
    outputs
}

/// The message's item. `mentions`: the members it mentions who are members at its position (none
/// in a direct conversation).
fn message_item(env: &Envelope, m: &MessageSent, position: Option<i64>, mentions: Vec<UserId>) -> StreamItem {
    StreamItem::Message {
        message_id: m.message_id,
        conversation_id: m.conversation_id.clone(),
        sender: m.sender,
        client_msg_id: m.client_msg_id.clone(),
        message_kind: m.kind,
        body: m.body.clone(),
        sent_at: env.occurred_at,
        sender_device: None,
        position,
        media: m.media.clone(),
        reply_to: m.reply_to,
        mentions,
        withheld: false,
    }
}

/// A message item for its sender's own stream: with the sending device.
fn senders_copy(item: &StreamItem, m: &MessageSent) -> StreamItem {
    let mut item = item.clone();
    if let StreamItem::Message { sender_device, withheld, .. } = &mut item {
        *sender_device = Some(m.sender_device.to_string());
        *withheld = m.withheld;
    }
    item
}

fn read_item(env: &Envelope, r: &MessageRead) -> StreamItem {
    StreamItem::Read { conversation_id: r.conversation_id.clone(), up_to: r.up_to, at: env.occurred_at, device_id: Some(r.device_id.to_string()), private: r.private }
}

fn hidden_item(env: &Envelope, h: &MessageHidden) -> StreamItem {
    StreamItem::Hidden { conversation_id: h.conversation_id.clone(), message_id: h.message_id, at: env.occurred_at }
}

fn reaction_item(env: &Envelope, r: &MessageReacted) -> StreamItem {
    StreamItem::Reaction { conversation_id: r.conversation_id.clone(), message_id: r.message_id, by: r.user, emoji: r.emoji.clone(), at: env.occurred_at }
}

/// The items of an edit or a delete (the same item for every recipient).
fn change_item(env: &Envelope) -> Option<StreamItem> {
    match &env.event {
        Event::MessageEdited(e) => Some(StreamItem::Edited {
            conversation_id: e.conversation_id.clone(),
            message_id: e.message_id,
            sender: e.sender,
            body: e.body.clone(),
            at: env.occurred_at,
        }),
        Event::MessageDeleted(d) => Some(StreamItem::Deleted {
            conversation_id: d.conversation_id.clone(),
            message_id: d.message_id,
            sender: d.sender,
            by: d.deleted_by,
            at: env.occurred_at,
        }),
        _ => None,
    }
}

/// What one event of a direct conversation puts into users' streams (no state needed: the
/// conversation id names both members). An edit or delete is the sender's, within `edit_window`
/// (the gateway checked that the message is the sender's before the append).
pub fn route_direct(env: &Envelope, edit_window: Duration) -> Vec<Envelope> {
    match &env.event {
        // Delete for me: the user's own stream only, any message of a conversation of theirs.
        Event::MessageHidden(h) if env.actor == Some(h.user) && h.conversation_id.has_member(h.user) => {
            vec![queued(env, h.user, hidden_item(env, h))]
        }
        Event::MessageHidden(_) => Vec::new(),
        // A reaction of a member (the gateway checked that they can read the message): both
        // members' streams.
        // (A withheld message's reaction: its sender's own, to their own stream only.)
        Event::MessageReacted(r) if env.actor == Some(r.user) => match r.conversation_id.peer_of(r.user) {
            Some(_) if r.withheld => vec![queued(env, r.user, reaction_item(env, r))],
            Some(peer) => {
                let item = reaction_item(env, r);
                vec![queued(env, peer, item.clone()), queued(env, r.user, item)]
            }
            None => Vec::new(),
        },
        Event::MessageReacted(_) => Vec::new(),
        Event::MessageEdited(MessageEdited { message_id, conversation_id, sender, .. })
        | Event::MessageDeleted(MessageDeleted { message_id, conversation_id, sender, .. }) => {
            let by = match &env.event {
                Event::MessageDeleted(d) => d.deleted_by,
                _ => *sender,
            };
            let withheld = match &env.event {
                Event::MessageEdited(e) => e.withheld,
                Event::MessageDeleted(d) => d.withheld,
                _ => false,
            };
            let peer = conversation_id.peer_of(*sender);
            match (peer, change_item(env)) {
                (Some(peer), Some(item)) if env.actor == Some(*sender) && by == *sender && within_edit_window(&env.occurred_at, *message_id, edit_window) => {
                    // A withheld message's change reaches its sender only, as the message did.
                    if withheld {
                        vec![queued(env, *sender, item)]
                    } else {
                        vec![queued(env, peer, item.clone()), queued(env, *sender, item)]
                    }
                }
                _ => Vec::new(),
            }
        }
        Event::MessageSent(m) => {
            let Some((a, b)) = m.conversation_id.direct_members() else {
                return Vec::new();
            };
            if m.sender != a && m.sender != b {
                return Vec::new();
            }
            let item = message_item(env, m, None, Vec::new());
            // Withheld (the recipient blocks the sender): the sender's own stream only, whose
            // copy says so (history shows it to the sender alone).
            if m.withheld {
                return vec![queued(env, m.sender, senders_copy(&item, m))];
            }
            // Recipient first, then the sender's own stream (for the sender's other devices).
            let recipient = if a == m.sender { b } else { a };
            vec![queued(env, recipient, item.clone()), queued(env, m.sender, senders_copy(&item, m))]
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
                    all: false,
                    device_id: None,
                },
            )],
            None => Vec::new(),
        },
        // A read without a receipt (privacy settings): the reader's own stream only.
        Event::MessageRead(r) if r.private => match r.conversation_id.peer_of(r.reader) {
            Some(_) => vec![queued(env, r.reader, read_item(env, r))],
            None => Vec::new(),
        },
        Event::MessageRead(r) => match r.conversation_id.peer_of(r.reader) {
            Some(peer) => vec![
                queued(
                    env,
                    peer,
                    StreamItem::Receipt {
                        conversation_id: r.conversation_id.clone(),
                        message_id: r.up_to,
                        status: ReceiptStatus::Seen,
                        by: r.reader,
                        at: env.occurred_at,
                        all: false,
                        device_id: None,
                    },
                ),
                queued(env, r.reader, read_item(env, r)),
            ],
            None => Vec::new(),
        },
        // Group events never carry a direct conversation id; the rest are not on this topic.
        Event::GroupCreated(_)
        | Event::GroupRenamed(_)
        | Event::GroupMemberAdded(_)
        | Event::GroupMemberRemoved(_)
        | Event::UserRegistered(_)
        | Event::PresenceChanged(_)
        | Event::DeliveryQueued(_)
        | Event::UserRoleChanged(_)
        | Event::SessionsEnded(_)
        | Event::ProfileUpdated(_)
        | Event::ProfileViewed(_)
        | Event::AuditAccessed(_)
        | Event::MediaUploaded(_)
        | Event::PrivacyUpdated(_)
        | Event::UserBlocked(_)
        | Event::UserUnblocked(_)
        | Event::UserBanned(_)
        | Event::UserUnbanned(_) => Vec::new(),
    }
}

impl FanOut {
    pub fn new(
        log: Arc<dyn EventLog>,
        topics: Topics,
        store: Arc<dyn FanoutStore>,
        pusher: Option<Arc<dyn Pusher>>,
        max_group_size: usize,
    ) -> Self {
        FanOut {
            log,
            topics,
            store,
            pusher,
            max_group_size,
            edit_window: DEFAULT_EDIT_WINDOW,
            members: Mutex::new(HashMap::new()),
            duplicates: Default::default(),
            committer: None,
            next: Mutex::new(HashMap::new()),
        }
    }

    /// Edits and deletes for everyone are refused this long after a message was sent.
    pub fn with_edit_window(mut self, window: Duration) -> Self {
        self.edit_window = window;
        self
    }

    /// Appends outputs through the consumer's committer (see [`LogConsumer::committer`]).
    pub fn with_committer(mut self, committer: Option<Arc<dyn Committer>>) -> Self {
        self.committer = committer;
        self
    }

    /// Every membership interval of a group (from the cache while its version is current).
    async fn intervals(&self, group: &FanoutGroup) -> R<Arc<Vec<MemberInterval>>> {
        if let Some((v, list)) = self.members.lock().unwrap_or_else(|p| p.into_inner()).get(&group.conversation_id) {
            if *v == group.membership_version {
                return Ok(list.clone());
            }
        }
        let list = Arc::new(self.store.fanout_members(&group.conversation_id).await?);
        let mut cache = self.members.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MEMBER_CACHE_GROUPS {
            cache.clear();
        }
        cache.insert(group.conversation_id.clone(), (group.membership_version, list.clone()));
        Ok(list)
    }

    /// Members at position `p` (the state after every event before `p`).
    async fn members_at(&self, group: &FanoutGroup, p: i64) -> R<Vec<MemberInterval>> {
        Ok(self.intervals(group).await?.iter().filter(|i| i.since < p && i.until.is_none_or(|u| p < u)).cloned().collect())
    }

    /// Writes member intervals, then the group row with its new membership version (the row
    /// last: a cached member list is reloaded once the version moves).
    async fn write_members(&self, group: &mut FanoutGroup, members: &[MemberInterval], position: i64) -> R<()> {
        self.store.put_fanout_members(&group.conversation_id, members).await?;
        group.membership_version = group.membership_version.max(position);
        self.store.put_fanout_group(group).await
    }

    fn group_item(env: &Envelope, conv: &ConversationId, change: GroupChange, detail: GroupDetail, by: UserId, o: i64) -> StreamItem {
        let (name, member, role) = detail;
        StreamItem::Group { conversation_id: conv.clone(), change, name, member, role, members: None, by, at: env.occurred_at, position: o }
    }

    /// What one event of a group puts into users' streams, deciding at position `o`.
    async fn route_group(&self, env: &Envelope, o: i64) -> R<Vec<Envelope>> {
        let Some(conv) = env.event.conversation_id().cloned() else { return Ok(Vec::new()) };
        let existing = self.store.fanout_group(&conv).await?;
        let actor = env.actor;
        let to_all = |members: &[MemberInterval], item: StreamItem| -> Vec<Envelope> {
            members.iter().map(|m| queued(env, m.member, item.clone())).collect()
        };
        match &env.event {
            Event::GroupCreated(g) => {
                let replay = matches!(&existing, Some(e) if e.created_at == o);
                if (existing.is_some() && !replay) || actor != Some(g.creator) || g.conversation_id.group_id() != Some(g.group_id) {
                    debug!(conversation = %conv, "group.created refused");
                    return Ok(Vec::new());
                }
                let mut members = vec![g.creator];
                for m in &g.members {
                    if !members.contains(m) {
                        members.push(*m);
                    }
                }
                if members.len() > self.max_group_size {
                    return Ok(Vec::new());
                }
                let mut group = FanoutGroup { conversation_id: conv.clone(), name: g.name.clone(), created_at: o, membership_version: o };
                let intervals: Vec<MemberInterval> = members
                    .iter()
                    .map(|m| MemberInterval {
                        member: *m,
                        since: o,
                        until: None,
                        role: if *m == g.creator { GroupRole::Admin } else { GroupRole::Member },
                    })
                    .collect();
                self.write_members(&mut group, &intervals, o).await?;
                // Only the creator's copy lists the members (its projection writes every member
                // row, then the group row); each other member's copy writes that member's own
                // rows. A list in every copy made a creation cost n² rows and bytes.
                let item = Self::group_item(env, &conv, GroupChange::Created, (Some(g.name.clone()), None, None), g.creator, o);
                let mut listed = item.clone();
                if let StreamItem::Group { members: m, .. } = &mut listed {
                    *m = Some(members.clone());
                }
                Ok(members.iter().map(|m| queued(env, *m, if *m == g.creator { listed.clone() } else { item.clone() })).collect())
            }
            Event::GroupRenamed(r) => {
                let (Some(mut group), Some(actor)) = (existing, actor) else { return Ok(Vec::new()) };
                let members = self.members_at(&group, o).await?;
                if !members.iter().any(|m| m.member == actor && m.role == GroupRole::Admin) {
                    return Ok(Vec::new());
                }
                group.name = r.name.clone();
                self.store.put_fanout_group(&group).await?;
                let item = Self::group_item(env, &conv, GroupChange::Renamed, (Some(r.name.clone()), None, None), actor, o);
                Ok(to_all(&members, item))
            }
            Event::GroupMemberAdded(a) => {
                let (Some(mut group), Some(actor)) = (existing, actor) else { return Ok(Vec::new()) };
                let members = self.members_at(&group, o).await?;
                let replay = self.intervals(&group).await?.iter().any(|i| i.member == a.member && i.since == o);
                let allowed = members.iter().any(|m| m.member == actor && m.role == GroupRole::Admin)
                    && !members.iter().any(|m| m.member == a.member)
                    && members.len() < self.max_group_size;
                if !allowed && !replay {
                    return Ok(Vec::new());
                }
                self.write_members(&mut group, &[MemberInterval { member: a.member, since: o, until: None, role: a.role }], o).await?;
                let item = Self::group_item(env, &conv, GroupChange::MemberAdded, (Some(group.name.clone()), Some(a.member), Some(a.role)), actor, o);
                let mut out = to_all(&members, item.clone());
                out.push(queued(env, a.member, item));
                Ok(out)
            }
            Event::GroupMemberRemoved(r) => {
                let (Some(mut group), Some(actor)) = (existing, actor) else { return Ok(Vec::new()) };
                let members = self.members_at(&group, o).await?;
                let intervals = self.intervals(&group).await?;
                let open = members.iter().find(|m| m.member == r.member).cloned();
                let replayed = intervals.iter().find(|i| i.member == r.member && i.until == Some(o)).cloned();
                let allowed = open.is_some() && (actor == r.member || members.iter().any(|m| m.member == actor && m.role == GroupRole::Admin));
                let Some(mut interval) = (if allowed { open } else { replayed }) else { return Ok(Vec::new()) };
                interval.until = Some(o);
                let role = interval.role;
                self.write_members(&mut group, &[interval], o).await?;
                let item = Self::group_item(env, &conv, GroupChange::MemberRemoved, (Some(group.name.clone()), Some(r.member), Some(role)), actor, o);
                // Everyone who was a member, the removed one included, learns of it.
                let mut out = to_all(&members, item.clone());
                if !members.iter().any(|m| m.member == r.member) {
                    out.push(queued(env, r.member, item));
                }
                Ok(out)
            }
            Event::MessageSent(m) => {
                let Some(group) = existing else { return Ok(Vec::new()) };
                let members = self.members_at(&group, o).await?;
                if !members.iter().any(|i| i.member == m.sender) {
                    // Not a member at this position (a removal won the race): never delivered.
                    debug!(message = %m.message_id, "sender not a member at the message's position; dropped");
                    return Ok(Vec::new());
                }
                self.store
                    .put_fanout_message(&FanoutMessage {
                        conversation_id: conv.clone(),
                        message_id: m.message_id,
                        sender: m.sender,
                        position: o,
                        recipients: (members.len() - 1) as i32,
                    })
                    .await?;
                let mentions = m.mentions.iter().copied().filter(|u| members.iter().any(|i| i.member == *u)).collect();
                let item = message_item(env, m, Some(o), mentions);
                let own = senders_copy(&item, m);
                Ok(members.iter().map(|i| queued(env, i.member, if i.member == m.sender { own.clone() } else { item.clone() })).collect())
            }
            Event::MessageEdited(MessageEdited { message_id, sender, .. }) | Event::MessageDeleted(MessageDeleted { message_id, sender, .. }) => {
                let (Some(group), Some(actor), Some(item)) = (existing, actor, change_item(env)) else { return Ok(Vec::new()) };
                let Some(msg) = self.store.fanout_message(&conv, *message_id).await? else { return Ok(Vec::new()) };
                let now = self.members_at(&group, o).await?;
                let is_delete = matches!(env.event, Event::MessageDeleted(_));
                // The sender, still a member, changes their own message; an admin may delete
                // anyone's. Both within the window.
                let allowed = msg.sender == *sender
                    && within_edit_window(&env.occurred_at, *message_id, self.edit_window)
                    && now.iter().any(|m| m.member == actor && (actor == msg.sender || (is_delete && m.role == GroupRole::Admin)));
                if !allowed {
                    debug!(message = %message_id, "edit or delete refused at its position");
                    return Ok(Vec::new());
                }
                // Everyone who got the message, members removed since included: each holds it.
                let had = self.members_at(&group, msg.position).await?;
                Ok(to_all(&had, item))
            }
            Event::MessageHidden(h) => {
                // Anyone who got the message may delete it for themselves, members who left
                // since included.
                let Some(msg) = self.store.fanout_message(&conv, h.message_id).await? else { return Ok(Vec::new()) };
                if actor != Some(h.user) || !self.was_member_at(&conv, h.user, msg.position).await? {
                    return Ok(Vec::new());
                }
                Ok(vec![queued(env, h.user, hidden_item(env, h))])
            }
            Event::MessageReacted(r) => {
                // A member now who got the message reacts; the members now who got it see it
                // (not those who left since, nor those who joined after it).
                let Some(group) = existing else { return Ok(Vec::new()) };
                let Some(msg) = self.store.fanout_message(&conv, r.message_id).await? else { return Ok(Vec::new()) };
                let (now, had) = (self.members_at(&group, o).await?, self.members_at(&group, msg.position).await?);
                let got: Vec<MemberInterval> = now.into_iter().filter(|m| had.iter().any(|h| h.member == m.member)).collect();
                if actor != Some(r.user) || !got.iter().any(|m| m.member == r.user) {
                    debug!(message = %r.message_id, "reaction refused at its position");
                    return Ok(Vec::new());
                }
                Ok(to_all(&got, reaction_item(env, r)))
            }
            Event::MessageDelivered(d) => self.group_delivered(env, &conv, d).await,
            Event::MessageRead(r) => {
                let Some(group) = existing else { return Ok(Vec::new()) };
                self.group_read(env, &group, r, o).await
            }
            Event::UserRegistered(_)
            | Event::PresenceChanged(_)
            | Event::DeliveryQueued(_)
            | Event::UserRoleChanged(_)
            | Event::SessionsEnded(_)
            | Event::ProfileUpdated(_)
            | Event::ProfileViewed(_)
            | Event::AuditAccessed(_)
            | Event::MediaUploaded(_)
            | Event::PrivacyUpdated(_)
            | Event::UserBlocked(_)
            | Event::UserUnblocked(_)
            | Event::UserBanned(_)
            | Event::UserUnbanned(_) => Ok(Vec::new()),
        }
    }

    /// A member's receipt for one group message: the per-member receipt to the sender, and the
    /// aggregate once every recipient has reached the status.
    async fn receipt(
        &self,
        env: &Envelope,
        msg: &FanoutMessage,
        status: ReceiptStatus,
        by: UserId,
        device_id: Option<String>,
    ) -> R<Vec<Envelope>> {
        self.store.add_fanout_ack(msg.message_id, status, by).await?;
        let mut out = vec![queued(
            env,
            msg.sender,
            StreamItem::Receipt {
                conversation_id: msg.conversation_id.clone(),
                message_id: msg.message_id,
                status,
                by,
                at: env.occurred_at,
                all: false,
                device_id,
            },
        )];
        let count = self.store.fanout_ack_count(msg.message_id, status).await?;
        if count as i64 >= msg.recipients as i64 {
            // Derived ids make the aggregate one item however often this is reached again.
            out.push(queued(
                env,
                msg.sender,
                StreamItem::Receipt {
                    conversation_id: msg.conversation_id.clone(),
                    message_id: msg.message_id,
                    status,
                    by: msg.sender,
                    at: env.occurred_at,
                    all: true,
                    device_id: None,
                },
            ));
        }
        Ok(out)
    }

    async fn was_member_at(&self, conv: &ConversationId, user: UserId, p: i64) -> R<bool> {
        let Some(group) = self.store.fanout_group(conv).await? else { return Ok(false) };
        Ok(self.members_at(&group, p).await?.iter().any(|m| m.member == user))
    }

    async fn group_delivered(&self, env: &Envelope, conv: &ConversationId, d: &MessageDelivered) -> R<Vec<Envelope>> {
        let Some(msg) = self.store.fanout_message(conv, d.message_id).await? else { return Ok(Vec::new()) };
        if msg.sender == d.recipient || !self.was_member_at(conv, d.recipient, msg.position).await? {
            return Ok(Vec::new());
        }
        self.receipt(env, &msg, ReceiptStatus::Delivered, d.recipient, Some(d.device_id.to_string())).await
    }

    async fn group_read(&self, env: &Envelope, group: &FanoutGroup, r: &MessageRead, o: i64) -> R<Vec<Envelope>> {
        let conv = &group.conversation_id;
        if !self.members_at(group, o).await?.iter().any(|m| m.member == r.reader) {
            return Ok(Vec::new());
        }
        let marker = self.store.fanout_read_marker(conv, r.reader).await?;
        let lower = match marker {
            Some((_, p)) if p > o => return Ok(Vec::new()),
            // This very read again (after a crash): start from the beginning; receipts already
            // emitted collapse by their derived ids downstream.
            Some((_, p)) if p == o => None,
            Some((up_to, _)) if up_to >= r.up_to => return Ok(vec![queued(env, r.reader, read_item(env, r))]),
            Some((up_to, _)) => Some(up_to),
            None => None,
        };
        let mut out = Vec::new();
        for msg in self.store.fanout_messages_between(conv, lower, r.up_to).await? {
            if msg.sender == r.reader || !self.was_member_at(conv, r.reader, msg.position).await? {
                continue;
            }
            out.extend(self.receipt(env, &msg, ReceiptStatus::Seen, r.reader, None).await?);
        }
        out.push(queued(env, r.reader, read_item(env, r)));
        self.store.put_fanout_read_marker(conv, r.reader, r.up_to, o).await?;
        Ok(out)
    }

    async fn route(&self, env: &Envelope, offset: i64) -> R<Vec<Envelope>> {
        match env.event.conversation_id() {
            Some(c) if c.is_group() => self.route_group(env, offset).await,
            _ => Ok(route_direct(env, self.edit_window)),
        }
    }
}

#[async_trait]
impl Handler for FanOut {
    async fn handle(&self, records: &[Record]) -> Result<Handled, HandlerError> {
        self.route_and_append(records).await
    }
    async fn sync(&self) -> Result<(), HandlerError> {
        self.store.sync().await.map_err(|e| HandlerError::of_store(0, e))
    }

    fn sync_every(&self) -> std::time::Duration {
        self.store.sync_every()
    }
}

/// The key a send is deduplicated by.
type SendKey = (ConversationId, UserId, String);

fn send_key(m: &MessageSent) -> SendKey {
    (m.conversation_id.clone(), m.sender, m.client_msg_id.clone())
}

impl FanOut {
    /// The accepted sends of the slice's `message.sent` keys, read concurrently.
    async fn sends_of(&self, envs: &[(usize, Envelope)]) -> R<HashMap<SendKey, Option<SendRecord>>> {
        let keys: Vec<SendKey> = envs
            .iter()
            .filter_map(|(_, e)| match &e.event {
                Event::MessageSent(m) => Some(send_key(m)),
                _ => None,
            })
            .collect::<std::collections::HashSet<_>>()
            .into_iter()
            .collect();
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        // One round trip for the slice.
        let records = self.store.send_records(&keys).await?;
        Ok(keys.into_iter().zip(records).collect())
    }

    async fn route_and_append(&self, records: &[Record]) -> Result<Handled, HandlerError> {
        let (envs, dead) = decoded(records);
        let (topic, partition) = (records[0].topic.as_str(), records[0].partition);
        if let Some(committer) = &self.committer {
            self.catch_up(committer.as_ref(), topic, partition, records[0].offset).await.map_err(|e| e.with_dead(dead.clone()))?;
        }
        // Outputs are exactly once where the log commits them with the offset, and only in a
        // slice without undecodable records: those are dead-lettered by the worker after this
        // returns, and an offset committed past them here would skip them after a crash.
        let once = self.committer.is_some() && dead.is_empty();
        let routed = self.route_records(records, &envs, once).await.map_err(|e| HandlerError::of_store(0, e).with_dead(dead.clone()))?;
        if let Some((i, e)) = routed.failed {
            lock(&self.next).remove(&(topic.to_owned(), partition));
            let commit = once.then_some((topic, partition, records[i].offset));
            self.append_outputs(&routed.outputs, commit).await.map_err(|e| e.with_dead(dead.clone()))?;
            return Err(HandlerError::of_store(i, e).with_dead(dead));
        }
        let next = records.last().map_or(0, |r| r.offset + 1);
        let commit = once.then_some((topic, partition, next));
        let key = (topic.to_owned(), partition);
        let marked = lock(&self.next).get(&key).and_then(|(_, at)| *at);
        // The slice's state is written: its watermark may go beside the append (never ahead of
        // the state; one that is lost or old only makes a later catch-up longer).
        let mark = self.committer.is_some() && marked.is_none_or(|at| at.elapsed() >= WATERMARK_EVERY);
        let write_mark = async {
            if mark {
                if let Err(e) = self.store.put_fanout_watermark(topic, partition, next).await {
                    warn!(topic, partition, error = %e, "fan-out watermark not written; the next catch-up starts from an older one");
                }
            }
        };
        let (appended, ()) = tokio::join!(self.append_outputs(&routed.outputs, commit), write_mark);
        appended.map_err(|e| e.with_dead(dead.clone()))?;
        let at = if mark { Some(Instant::now()) } else { marked };
        lock(&self.next).insert(key, (next, at));
        Ok(Handled { dead })
    }

    /// Routes a slice, writing the fan-out's state as it goes. State is positional, so it is
    /// safe to write before the outputs are appended; the accepted sends are written before the
    /// outputs, so that a fan-out that restarts in between recognises its own decision (same
    /// position) and routes the message again. Fails as a whole only when the slice's accepted
    /// sends cannot be read or written.
    async fn route_records(&self, records: &[Record], envs: &[(usize, Envelope)], once: bool) -> R<Routed> {
        let mut sends = self.sends_of(envs).await?;
        let mut outputs: Vec<(usize, Envelope)> = Vec::new();
        let mut accepted: Vec<SendRecord> = Vec::new();
        let mut failed = None;
        for (i, env) in envs {
            let offset = records[*i].offset;
            if let Event::MessageSent(m) = &env.event {
                match sends.get(&send_key(m)).cloned().flatten() {
                    Some(first) if first.position != offset => {
                        // A second append of the same send (a retry that did not find the first):
                        // the first in log order is the message; this one reaches no one.
                        debug!(message = %m.message_id, first = %first.message_id, "duplicate send dropped");
                        self.duplicates.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    _ => {}
                }
            }
            match self.route(env, offset).await {
                Ok(mut out) => {
                    with_sources(&mut out, records[*i].partition, offset, once);
                    if let (Event::MessageSent(m), false) = (&env.event, out.is_empty()) {
                        let record = SendRecord {
                            conversation_id: m.conversation_id.clone(),
                            sender: m.sender,
                            client_msg_id: m.client_msg_id.clone(),
                            message_id: m.message_id,
                            sent_at: env.occurred_at,
                            content_sha256: content_sha256(&m.body, m.media.as_ref().map(|a| a.media_id.to_string()).as_deref(), m.reply_to, &m.mentions),
                            position: offset,
                        };
                        if sends.insert(send_key(m), Some(record.clone())).flatten().is_none() {
                            accepted.push(record);
                        }
                    }
                    outputs.extend(out.into_iter().map(|o| (*i, o)));
                }
                Err(e) => {
                    failed = Some((*i, e));
                    break;
                }
            }
        }
        if !accepted.is_empty() {
            self.store.put_send_records(&accepted).await?;
        }
        Ok(Routed { outputs, failed })
    }

    /// Before the first slice of a partition (after a start, a rebalance or a failed slice):
    /// routes again, state only, the records between the partition's watermark and `first`.
    ///
    /// With a committer the offset moves with the outputs, in `log.db`, while the state is in
    /// `tables.db`, whose commits are synced only every [`chat_store::Durable::sync_every`]: a
    /// power loss can take back state whose records' offset is committed. The watermark is
    /// written after the state it covers, in the same store, so it is taken back with it; the
    /// records from it to the committed offset are routed again (positional: the same
    /// decisions), and their outputs, already in the log, are not appended again. No watermark
    /// (a store written before watermarks existed, or never) means from the start.
    async fn catch_up(&self, committer: &dyn Committer, topic: &str, partition: i32, first: i64) -> Result<(), HandlerError> {
        let key = (topic.to_owned(), partition);
        if lock(&self.next).get(&key).map(|(next, _)| *next) == Some(first) {
            return Ok(());
        }
        let from = self.store.fanout_watermark(topic, partition).await.map_err(|e| HandlerError::of_store(0, e))?.unwrap_or(0);
        let (mut at, mut routed) = (from, 0usize);
        while at < first {
            let page = committer.read(topic, partition, at, first, CATCH_UP_PAGE).await.map_err(|e| HandlerError::retry(0, e.to_string()))?;
            let Some(last) = page.last() else { break };
            at = last.offset + 1;
            routed += page.len();
            // Undecodable records were dead-lettered when they were first handled.
            let (envs, _) = decoded(&page);
            if let Some((_, e)) = self.route_records(&page, &envs, false).await.map_err(|e| HandlerError::of_store(0, e))?.failed {
                return Err(HandlerError::of_store(0, e));
            }
        }
        let mut marked = None;
        if from < first {
            info!(topic, partition, from, to = first, records = routed, "fan-out state caught up with the committed offset");
            self.store.put_fanout_watermark(topic, partition, first).await.map_err(|e| HandlerError::of_store(0, e))?;
            marked = Some(Instant::now());
        }
        lock(&self.next).insert(key, (first, marked));
        Ok(())
    }

    fn encoded(&self, outputs: &[(usize, Envelope)]) -> Vec<(String, String, Vec<u8>)> {
        outputs.iter().map(|(_, env)| (self.topics.name(env.event.topic_kind()), env.key(), env.encode())).collect()
    }

    /// Appends outputs in order; on failure reports how many source records are fully done.
    /// `commit`: (topic, partition, next offset) when the outputs are marked exactly once and go
    /// with the consumer's offset.
    async fn append_outputs(&self, outputs: &[(usize, Envelope)], commit: Option<(&str, i32, i64)>) -> Result<(), HandlerError> {
        if outputs.is_empty() {
            return Ok(());
        }
        // Group items are pushed by the fan-out: only it knows who may get them. (Direct
        // conversations are pushed by the gateway right after the send's append.) The push does
        // not wait for the items' append: the event they come from is durable and its routing
        // is positional, so a fan-out that fails or dies before the append routes it again to
        // the same items (then pushed again: clients de-duplicate, protocol §5.6), and the
        // stream gets them. Waiting put the append of every member's item (a group of 1,024:
        // 1,023 records and an fsync) before the first push.
        if let Some(pusher) = &self.pusher {
            let pushes: Vec<(UserId, StreamItem)> = outputs
                .iter()
                .filter_map(|(_, env)| match &env.event {
                    Event::DeliveryQueued(q) if is_group_push(&q.item) => Some((q.recipient, q.item.clone())),
                    _ => None,
                })
                .collect();
            if !pushes.is_empty() {
                pusher.push(pushes).await;
            }
        }
        let results = match (commit, &self.committer) {
            (Some((topic, partition, next)), Some(committer)) => {
                // The state this offset moves past may be less durable than the offset: see
                // `catch_up`.
                match committer.append_committing(self.encoded(outputs), topic, partition, next).await {
                    Some(results) => results,
                    // Another member owns the partition now: the ordinary way, with guards.
                    None => self.log.append_batch(self.encoded(&guarded(outputs))).await,
                }
            }
            _ => self.log.append_batch(self.encoded(outputs)).await,
        };
        // The first failed output decides how far the slice got; everything after it is
        // retried (outputs that did land are collapsed downstream by their derived ids).
        if let Some(pos) = results.iter().position(|r| r.is_err()) {
            let reason = match &results[pos] {
                Err(e) => e.to_string(),
                Ok(_) => String::new(),
            };
            return Err(HandlerError::retry(outputs[pos].0, reason));
        }
        Ok(())
    }
}

/// Undecodable records of a slice: (index, reason).
type Dead = Vec<(usize, String)>;

/// A slice's decodable events (with their index) and its undecodable records (index, reason):
/// those are permanent failures, dead-lettered by the worker.
fn decoded(records: &[Record]) -> (Vec<(usize, Envelope)>, Dead) {
    let (mut envs, mut dead) = (Vec::with_capacity(records.len()), Vec::new());
    for (i, rec) in records.iter().enumerate() {
        match Envelope::decode(&rec.payload) {
            Ok(env) => envs.push((i, env)),
            Err(e) => dead.push((i, e.to_string())),
        }
    }
    (envs, dead)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn is_group_push(item: &StreamItem) -> bool {
    match item {
        StreamItem::Message { conversation_id, .. }
        | StreamItem::Receipt { conversation_id, .. }
        | StreamItem::Edited { conversation_id, .. }
        | StreamItem::Deleted { conversation_id, .. }
        | StreamItem::Reaction { conversation_id, .. }
        | StreamItem::Group { conversation_id, .. } => conversation_id.is_group(),
        // Pushed by the gateway, which answers the device that asked and knows its other ones.
        StreamItem::Read { .. } | StreamItem::Hidden { .. } => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chat_events::{
        DeviceId, EventId, GroupCreated, GroupId, GroupMemberAdded, GroupMemberRemoved, MessageId, MessageKind,
    };

    fn sent(conv: &ConversationId, from: UserId, cmid: &str) -> Envelope {
        Envelope::new(
            EventId::new_v7(),
            Some(from),
            Event::MessageSent(MessageSent {
                message_id: MessageId::new_v7(),
                conversation_id: conv.clone(),
                sender: from,
                sender_device: DeviceId::default_device(),
                client_msg_id: cmid.into(),
                kind: MessageKind::Text,
                body: "hi".into(),
                media: None,
                reply_to: None,
                mentions: Vec::new(),
                withheld: false,
            }),
        )
    }

    fn recipients(out: &[Envelope]) -> Vec<UserId> {
        let mut r: Vec<UserId> = out
            .iter()
            .map(|e| match &e.event {
                Event::DeliveryQueued(d) => d.recipient,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        r.sort();
        r
    }

    fn sorted(mut v: Vec<UserId>) -> Vec<UserId> {
        v.sort();
        v
    }

    #[test]
    fn a_direct_message_goes_to_the_recipient_and_the_sender() {
        let (a, b) = (UserId::random(), UserId::random());
        let conv = ConversationId::direct(a, b);
        let env = sent(&conv, a, "x");
        assert_eq!(recipients(&route_direct(&env, DEFAULT_EDIT_WINDOW)), sorted(vec![a, b]));
        // Same input, same ids: a replayed fan-out collapses downstream.
        assert_eq!(route_direct(&env, DEFAULT_EDIT_WINDOW), route_direct(&env, DEFAULT_EDIT_WINDOW));
        let read = Envelope::new(
            EventId::new_v7(),
            Some(b),
            Event::MessageRead(MessageRead { private: false, conversation_id: conv, reader: b, device_id: DeviceId::default_device(), up_to: MessageId::new_v7() }),
        );
        // A seen receipt to the sender, and a read marker to the reader's other devices.
        assert_eq!(recipients(&route_direct(&read, DEFAULT_EDIT_WINDOW)), sorted(vec![a, b]));
    }

    #[test]
    fn withheld_messages_and_private_reads_stay_with_their_actor() {
        let (a, b) = (UserId::random(), UserId::random());
        let conv = ConversationId::direct(a, b);
        let mut env = sent(&conv, a, "x");
        let Event::MessageSent(m) = &mut env.event else { unreachable!() };
        m.withheld = true;
        let id = m.message_id;
        let out = route_direct(&env, DEFAULT_EDIT_WINDOW);
        assert_eq!(recipients(&out), vec![a], "a withheld message: its sender's stream only");
        let Event::DeliveryQueued(q) = &out[0].event else { unreachable!() };
        assert!(matches!(q.item, StreamItem::Message { withheld: true, .. }), "the sender's copy says so (history shows it to the sender alone)");
        let now = chrono::Utc::now();
        let mut changes = vec![edited(&conv, a, a, id, now), deleted(&conv, a, a, id, now)];
        changes.push(event(a, Event::MessageReacted(MessageReacted { withheld: false, message_id: id, conversation_id: conv.clone(), user: a, emoji: Some("👍".into()) })));
        for mut c in changes {
            assert_eq!(recipients(&route_direct(&c, DEFAULT_EDIT_WINDOW)), sorted(vec![a, b]), "not withheld: both");
            match &mut c.event {
                Event::MessageEdited(e) => e.withheld = true,
                Event::MessageDeleted(d) => d.withheld = true,
                Event::MessageReacted(r) => r.withheld = true,
                _ => unreachable!(),
            }
            assert_eq!(recipients(&route_direct(&c, DEFAULT_EDIT_WINDOW)), vec![a], "a withheld message's change: its sender only");
        }
        let read = event(b, Event::MessageRead(MessageRead { private: true, conversation_id: conv, reader: b, device_id: DeviceId::default_device(), up_to: id }));
        let out = route_direct(&read, DEFAULT_EDIT_WINDOW);
        assert_eq!(recipients(&out), vec![b], "a private read: no receipt to the sender");
        let Event::DeliveryQueued(q) = &out[0].event else { unreachable!() };
        assert!(matches!(q.item, StreamItem::Read { private: true, .. }), "the reader's read item says so (no seen rows)");
    }

    fn edited(conv: &ConversationId, actor: UserId, sender: UserId, id: MessageId, at: chrono::DateTime<chrono::Utc>) -> Envelope {
        let mut env = event(actor, Event::MessageEdited(MessageEdited { withheld: false, message_id: id, conversation_id: conv.clone(), sender, body: "v2".into() }));
        env.occurred_at = at;
        env
    }

    fn deleted(conv: &ConversationId, actor: UserId, sender: UserId, id: MessageId, at: chrono::DateTime<chrono::Utc>) -> Envelope {
        let mut env = event(actor, Event::MessageDeleted(MessageDeleted { withheld: false, message_id: id, conversation_id: conv.clone(), sender, deleted_by: actor }));
        env.occurred_at = at;
        env
    }

    #[test]
    fn a_direct_edit_or_delete_is_the_senders_within_the_window() {
        let (a, b) = (UserId::random(), UserId::random());
        let conv = ConversationId::direct(a, b);
        let Event::MessageSent(m) = sent(&conv, a, "x").event else { unreachable!() };
        let now = chrono::Utc::now();
        assert_eq!(recipients(&route_direct(&edited(&conv, a, a, m.message_id, now), DEFAULT_EDIT_WINDOW)), sorted(vec![a, b]));
        assert_eq!(recipients(&route_direct(&deleted(&conv, a, a, m.message_id, now), DEFAULT_EDIT_WINDOW)), sorted(vec![a, b]));
        assert!(route_direct(&edited(&conv, b, a, m.message_id, now), DEFAULT_EDIT_WINDOW).is_empty(), "not the sender");
        assert!(route_direct(&deleted(&conv, b, a, m.message_id, now), DEFAULT_EDIT_WINDOW).is_empty(), "not the sender");
        let late = now + chrono::Duration::hours(49);
        assert!(route_direct(&edited(&conv, a, a, m.message_id, late), DEFAULT_EDIT_WINDOW).is_empty(), "past the window");
        assert!(!route_direct(&edited(&conv, a, a, m.message_id, late), Duration::from_secs(50 * 3600)).is_empty(), "the window is a setting");
    }

    #[tokio::test]
    async fn a_group_edit_or_delete_is_decided_at_its_position_and_reaches_everyone_who_got_the_message() {
        let dir = std::env::temp_dir().join(format!("chat-fanout-{}", uuid::Uuid::new_v4()));
        let f = fanout(&dir, 8);
        let (admin, bob, carol, dave) = (UserId::random(), UserId::random(), UserId::random(), UserId::random());
        let g = GroupId::random();
        let conv = ConversationId::group(g);
        let created = event(
            admin,
            Event::GroupCreated(GroupCreated { conversation_id: conv.clone(), group_id: g, name: "g".into(), creator: admin, members: vec![bob, carol] }),
        );
        f.route(&created, 1).await.unwrap();
        let m = sent(&conv, bob, "m");
        f.route(&m, 2).await.unwrap();
        let Event::MessageSent(msg) = &m.event else { unreachable!() };
        let id = msg.message_id;
        // carol leaves, dave joins: the message's holders are admin, bob and carol.
        f.route(&event(carol, Event::GroupMemberRemoved(GroupMemberRemoved { conversation_id: conv.clone(), member: carol })), 3).await.unwrap();
        let add = event(admin, Event::GroupMemberAdded(GroupMemberAdded { conversation_id: conv.clone(), member: dave, role: GroupRole::Member }));
        f.route(&add, 4).await.unwrap();
        let now = chrono::Utc::now();
        assert_eq!(recipients(&f.route(&edited(&conv, bob, bob, id, now), 5).await.unwrap()), sorted(vec![admin, bob, carol]));
        assert!(f.route(&edited(&conv, admin, bob, id, now), 6).await.unwrap().is_empty(), "an admin edits no one else's message");
        assert!(f.route(&deleted(&conv, dave, bob, id, now), 7).await.unwrap().is_empty(), "a member deletes no one else's message");
        assert!(f.route(&edited(&conv, bob, admin, id, now), 8).await.unwrap().is_empty(), "the event must name the real sender");
        let late = now + chrono::Duration::hours(49);
        assert!(f.route(&deleted(&conv, admin, bob, id, late), 9).await.unwrap().is_empty(), "past the window");
        assert_eq!(recipients(&f.route(&deleted(&conv, admin, bob, id, now), 10).await.unwrap()), sorted(vec![admin, bob, carol]), "an admin deletes anyone's");
        // A sender who left can no longer change their message.
        f.route(&event(bob, Event::GroupMemberRemoved(GroupMemberRemoved { conversation_id: conv.clone(), member: bob })), 11).await.unwrap();
        assert!(f.route(&edited(&conv, bob, bob, id, now), 12).await.unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn group_mentions_and_reactions_are_decided_at_their_positions() {
        let dir = std::env::temp_dir().join(format!("chat-fanout-{}", uuid::Uuid::new_v4()));
        let f = fanout(&dir, 8);
        let (admin, bob, carol, dave, eve) = (UserId::random(), UserId::random(), UserId::random(), UserId::random(), UserId::random());
        let g = GroupId::random();
        let conv = ConversationId::group(g);
        let created = event(
            admin,
            Event::GroupCreated(GroupCreated { conversation_id: conv.clone(), group_id: g, name: "g".into(), creator: admin, members: vec![bob, carol] }),
        );
        f.route(&created, 1).await.unwrap();
        // Mentions keep the members at the message's position only (eve never joined).
        let mut m = sent(&conv, bob, "m");
        if let Event::MessageSent(ms) = &mut m.event {
            ms.mentions = vec![carol, eve, admin];
        }
        let out = f.route(&m, 2).await.unwrap();
        let Event::MessageSent(msg) = &m.event else { unreachable!() };
        let id = msg.message_id;
        for o in &out {
            let Event::DeliveryQueued(q) = &o.event else { panic!() };
            let StreamItem::Message { mentions, .. } = &q.item else { panic!() };
            assert_eq!(mentions, &vec![carol, admin]);
        }
        // carol leaves, dave joins after the message.
        f.route(&event(carol, Event::GroupMemberRemoved(GroupMemberRemoved { conversation_id: conv.clone(), member: carol })), 3).await.unwrap();
        let add = event(admin, Event::GroupMemberAdded(GroupMemberAdded { conversation_id: conv.clone(), member: dave, role: GroupRole::Member }));
        f.route(&add, 4).await.unwrap();
        let react = |actor: UserId, user: UserId| {
            event(actor, Event::MessageReacted(MessageReacted { withheld: false, message_id: id, conversation_id: conv.clone(), user, emoji: Some("👍".into()) }))
        };
        assert_eq!(recipients(&f.route(&react(admin, admin), 5).await.unwrap()), sorted(vec![admin, bob]), "the members now who got the message");
        assert!(f.route(&react(carol, carol), 6).await.unwrap().is_empty(), "a former member cannot react");
        assert!(f.route(&react(dave, dave), 7).await.unwrap().is_empty(), "a member who joined after the message cannot react to it");
        assert!(f.route(&react(admin, bob), 8).await.unwrap().is_empty(), "only for oneself");
        // A direct reaction goes to both members, by a member only.
        let (a, b) = (UserId::random(), UserId::random());
        let direct = ConversationId::direct(a, b);
        let r = event(a, Event::MessageReacted(MessageReacted { withheld: false, message_id: id, conversation_id: direct.clone(), user: a, emoji: None }));
        assert_eq!(recipients(&route_direct(&r, DEFAULT_EDIT_WINDOW)), sorted(vec![a, b]));
        let r = event(eve, Event::MessageReacted(MessageReacted { withheld: false, message_id: id, conversation_id: direct, user: eve, emoji: None }));
        assert!(route_direct(&r, DEFAULT_EDIT_WINDOW).is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn fanout(dir: &std::path::Path, max: usize) -> FanOut {
        let store = Arc::new(chat_store::SqliteStore::open(dir).expect("store"));
        let log = Arc::new(chat_events::embedded::EmbeddedLog::open(&dir.join("log"), 10).expect("log"));
        FanOut::new(log, Topics::default(), store, None, max)
    }

    fn event(actor: UserId, e: Event) -> Envelope {
        Envelope::new(EventId::new_v7(), Some(actor), e)
    }

    #[tokio::test]
    async fn group_membership_is_decided_at_each_position() {
        let dir = std::env::temp_dir().join(format!("chat-fanout-{}", uuid::Uuid::new_v4()));
        let f = fanout(&dir, 4);
        let (admin, bob, carol, dave, eve) = (UserId::random(), UserId::random(), UserId::random(), UserId::random(), UserId::random());
        let g = GroupId::random();
        let conv = ConversationId::group(g);
        let created = event(
            admin,
            Event::GroupCreated(GroupCreated { conversation_id: conv.clone(), group_id: g, name: "g".into(), creator: admin, members: vec![bob, carol] }),
        );
        let out = f.route(&created, 1).await.unwrap();
        assert_eq!(recipients(&out), sorted(vec![admin, bob, carol]));
        // Only the creator's copy lists the members (a list in every copy is n² for a creation).
        let listed: Vec<(UserId, Option<usize>)> = out
            .iter()
            .filter_map(|e| match &e.event {
                Event::DeliveryQueued(DeliveryQueued { recipient, item: StreamItem::Group { members, .. }, .. }) => Some((*recipient, members.as_ref().map(Vec::len))),
                _ => None,
            })
            .collect();
        assert_eq!(listed, vec![(admin, Some(3)), (bob, None), (carol, None)]);

        let m2 = sent(&conv, bob, "m2");
        assert_eq!(recipients(&f.route(&m2, 2).await.unwrap()), sorted(vec![admin, bob, carol]));
        // An outsider's message is dropped.
        assert!(f.route(&sent(&conv, dave, "x"), 3).await.unwrap().is_empty());

        // A non-admin cannot add; the admin can, up to the size limit (4).
        let by_bob = event(bob, Event::GroupMemberAdded(GroupMemberAdded { conversation_id: conv.clone(), member: dave, role: GroupRole::Member }));
        assert!(f.route(&by_bob, 4).await.unwrap().is_empty());
        let add_dave = event(admin, Event::GroupMemberAdded(GroupMemberAdded { conversation_id: conv.clone(), member: dave, role: GroupRole::Member }));
        assert_eq!(recipients(&f.route(&add_dave, 5).await.unwrap()), sorted(vec![admin, bob, carol, dave]));
        let add_eve = event(admin, Event::GroupMemberAdded(GroupMemberAdded { conversation_id: conv.clone(), member: eve, role: GroupRole::Member }));
        assert!(f.route(&add_eve, 6).await.unwrap().is_empty(), "group full");

        // carol is removed at 7: she hears of it, and gets nothing positioned after it.
        let remove = event(admin, Event::GroupMemberRemoved(GroupMemberRemoved { conversation_id: conv.clone(), member: carol }));
        assert_eq!(recipients(&f.route(&remove, 7).await.unwrap()), sorted(vec![admin, bob, carol, dave]));
        let m8 = sent(&conv, bob, "m8");
        assert_eq!(recipients(&f.route(&m8, 8).await.unwrap()), sorted(vec![admin, bob, dave]));
        // carol can no longer post.
        assert!(f.route(&sent(&conv, carol, "late"), 9).await.unwrap().is_empty());

        // Handling earlier events again (after a crash) gives the same answers, whatever later
        // state is already written: membership is positional.
        assert_eq!(recipients(&f.route(&m2, 2).await.unwrap()), sorted(vec![admin, bob, carol]));
        assert_eq!(recipients(&f.route(&add_dave, 5).await.unwrap()), sorted(vec![admin, bob, carol, dave]));
        assert_eq!(recipients(&f.route(&remove, 7).await.unwrap()), sorted(vec![admin, bob, carol, dave]));
        assert_eq!(recipients(&f.route(&created, 1).await.unwrap()), sorted(vec![admin, bob, carol]));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn group_receipts_are_per_member_then_for_all() {
        let dir = std::env::temp_dir().join(format!("chat-fanout-{}", uuid::Uuid::new_v4()));
        let f = fanout(&dir, 10);
        let (admin, bob, carol) = (UserId::random(), UserId::random(), UserId::random());
        let g = GroupId::random();
        let conv = ConversationId::group(g);
        let created = event(
            admin,
            Event::GroupCreated(GroupCreated { conversation_id: conv.clone(), group_id: g, name: "g".into(), creator: admin, members: vec![bob, carol] }),
        );
        f.route(&created, 1).await.unwrap();
        let m = sent(&conv, admin, "m");
        let Event::MessageSent(ms) = &m.event else { unreachable!() };
        let mid = ms.message_id;
        f.route(&m, 2).await.unwrap();
        let delivered = |who: UserId| {
            event(who, Event::MessageDelivered(MessageDelivered { message_id: mid, conversation_id: conv.clone(), recipient: who, device_id: DeviceId::default_device() }))
        };
        let items = |out: Vec<Envelope>| -> Vec<(UserId, bool)> {
            out.into_iter()
                .filter_map(|e| match e.event {
                    Event::DeliveryQueued(DeliveryQueued { recipient, item: StreamItem::Receipt { all, .. }, .. }) => Some((recipient, all)),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(items(f.route(&delivered(bob), 3).await.unwrap()), vec![(admin, false)]);
        assert_eq!(items(f.route(&delivered(bob), 4).await.unwrap()), vec![(admin, false)], "a second device: no aggregate yet");
        assert_eq!(items(f.route(&delivered(carol), 5).await.unwrap()), vec![(admin, false), (admin, true)], "then delivered to all");
        // The sender's own ack is not a receipt.
        assert!(items(f.route(&delivered(admin), 6).await.unwrap()).is_empty());
        let read = |who: UserId| {
            event(who, Event::MessageRead(MessageRead { private: false, conversation_id: conv.clone(), reader: who, device_id: DeviceId::default_device(), up_to: mid }))
        };
        assert_eq!(items(f.route(&read(bob), 7).await.unwrap()), vec![(admin, false)]);
        assert_eq!(items(f.route(&read(carol), 8).await.unwrap()), vec![(admin, false), (admin, true)], "seen by all");
        let _ = std::fs::remove_dir_all(&dir);
    }

    async fn poll(c: &mut dyn chat_events::LogConsumer) -> Vec<Record> {
        for _ in 0..50 {
            let batch = c.poll_batch(10, std::time::Duration::from_millis(100)).await.expect("poll");
            if !batch.is_empty() {
                return batch;
            }
        }
        panic!("nothing to poll");
    }

    /// On the embedded log the outputs go with the consumer's offset, in one transaction, marked
    /// exactly once; once another member has joined the group (the partition may be someone
    /// else's), they are appended the ordinary way and unmarked.
    #[tokio::test]
    async fn outputs_go_with_the_offset_where_the_log_can() {
        use chat_events::{TopicKind, TopicSpec};
        let dir = std::env::temp_dir().join(format!("chat-fanout-{}", uuid::Uuid::new_v4()));
        let store = Arc::new(chat_store::SqliteStore::open(&dir).expect("store"));
        let log = Arc::new(chat_events::embedded::EmbeddedLog::open(&dir.join("log"), 100).expect("log"));
        let topics = Topics::default();
        let specs: Vec<TopicSpec> = topics.all().into_iter().map(|name| TopicSpec { name, partitions: 1, replication: 1 }).collect();
        log.ensure_topics(&specs).await.expect("topics");
        let conversations = topics.name(TopicKind::Conversations);
        let mut consumer = log.subscribe("fanout", std::slice::from_ref(&conversations)).await.expect("consumer");
        let f = FanOut::new(log.clone(), topics.clone(), store, None, 8).with_committer(consumer.committer());
        let (a, b) = (UserId::random(), UserId::random());
        let conv = ConversationId::direct(a, b);
        let deliveries = |n: usize| {
            let log = log.clone();
            let topic = topics.name(TopicKind::Deliveries);
            async move {
                let mut r = log.read_all(&[topic]).await.expect("reader");
                let mut all = Vec::new();
                loop {
                    let batch = r.next_batch(100).await.expect("read");
                    if batch.is_empty() {
                        break;
                    }
                    all.extend(batch.into_iter().map(|rec| match Envelope::decode(&rec.payload).expect("decode").event {
                        Event::DeliveryQueued(q) => q.source.expect("source").exactly_once,
                        other => panic!("{other:?}"),
                    }));
                }
                assert_eq!(all.len(), n, "{all:?}");
                all
            }
        };
        let committed = || async { log.partition_lags("fanout", std::slice::from_ref(&conversations)).await.expect("lags")[0].committed };

        log.append(&conversations, &conv.to_string(), sent(&conv, a, "1").encode()).await.expect("append");
        let slice = poll(consumer.as_mut()).await;
        f.handle(&slice).await.expect("handled");
        assert_eq!(deliveries(2).await, vec![true, true], "marked exactly once");
        assert_eq!(committed().await, 1, "the offset was committed with them");

        // Another member joins: the first no longer knows that the partition is its own.
        let _other = log.subscribe("fanout", std::slice::from_ref(&conversations)).await.expect("second member");
        let second = sent(&conv, a, "2").encode();
        let at = log.append(&conversations, &conv.to_string(), second.clone()).await.expect("append");
        f.handle(&[Record { offset: at.offset, payload: second, ..slice[0].clone() }]).await.expect("handled");
        assert_eq!(deliveries(4).await[2..], [false, false], "appended the ordinary way");
        assert_eq!(committed().await, 1, "and no offset with them");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// State a power loss took back while the offset (committed with the outputs) stayed: the
    /// next fan-out routes again, state only, the records from the store's watermark to the
    /// committed offset, so a retried send is still recognised, and appends nothing for them.
    #[tokio::test]
    async fn lost_state_is_caught_up_from_the_watermark() {
        use chat_events::{TopicKind, TopicSpec};
        let dir = std::env::temp_dir().join(format!("chat-fanout-{}", uuid::Uuid::new_v4()));
        let log = Arc::new(chat_events::embedded::EmbeddedLog::open(&dir.join("log"), 100).expect("log"));
        let topics = Topics::default();
        let specs: Vec<TopicSpec> = topics.all().into_iter().map(|name| TopicSpec { name, partitions: 1, replication: 1 }).collect();
        log.ensure_topics(&specs).await.expect("topics");
        let conversations = topics.name(TopicKind::Conversations);
        let deliveries = || {
            let (dir, topic) = (dir.join("log"), topics.name(TopicKind::Deliveries));
            async move { chat_events::embedded::inspect::records(&dir, &topic).expect("records").len() }
        };
        let (a, b) = (UserId::random(), UserId::random());
        let conv = ConversationId::direct(a, b);
        let append = |env: Envelope| {
            let (log, topic, key) = (log.clone(), conversations.clone(), conv.to_string());
            async move { log.append(&topic, &key, env.encode()).await.expect("append") }
        };
        {
            let store = Arc::new(chat_store::SqliteStore::open(&dir.join("before")).expect("store"));
            let mut consumer = log.subscribe("fanout", std::slice::from_ref(&conversations)).await.expect("consumer");
            let f = FanOut::new(log.clone(), topics.clone(), store.clone(), None, 8).with_committer(consumer.committer());
            for cmid in ["1", "2", "3"] {
                append(sent(&conv, a, cmid)).await;
            }
            let mut handled = 0;
            while handled < 3 {
                let slice = poll(consumer.as_mut()).await;
                handled += slice.len();
                f.handle(&slice).await.expect("handled");
            }
            // Written with the first slice, then at most once a second.
            let mark = store.fanout_watermark(&conversations, 0).await.expect("watermark");
            assert!(mark.is_some_and(|m| (1..=3).contains(&m)), "the watermark follows the state: {mark:?}");
        }
        assert_eq!(deliveries().await, 6);

        // The tables as a power loss may leave them: state and watermark up to offset 1 only.
        let store = Arc::new(chat_store::SqliteStore::open(&dir.join("after")).expect("store"));
        store.put_fanout_watermark(&conversations, 0, 1).await.expect("watermark");
        let mut consumer = log.subscribe("fanout", std::slice::from_ref(&conversations)).await.expect("consumer");
        let f = FanOut::new(log.clone(), topics.clone(), store.clone(), None, 8).with_committer(consumer.committer());
        // Retries of the sends at offsets 1 and 0 are appended (at offsets 3 and 4).
        append(sent(&conv, a, "2")).await;
        append(sent(&conv, a, "1")).await;
        let slice = poll(consumer.as_mut()).await;
        assert_eq!(slice[0].offset, 3, "the committed offset stayed");
        f.handle(&slice).await.expect("handled");
        let n = slice.len();
        if n == 1 {
            f.handle(&poll(consumer.as_mut()).await).await.expect("handled");
        }
        assert_eq!(store.send_record(&conv, a, "2").await.expect("send").map(|r| r.position), Some(1), "offset 1 was routed again");
        assert_eq!(store.send_record(&conv, a, "3").await.expect("send").map(|r| r.position), Some(2), "offset 2 was routed again");
        // Offset 0 is below the watermark: taken as written, so the retry of "1" is a new send
        // (which shows that the catch-up started at the watermark, not before it).
        assert_eq!(store.send_record(&conv, a, "1").await.expect("send").map(|r| r.position), Some(4));
        assert_eq!(deliveries().await, 8, "the retry of 2 reached no one; nothing was appended again for offsets 1 and 2");
        assert_eq!(store.fanout_watermark(&conversations, 0).await.expect("watermark"), Some(3), "written when caught up");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
