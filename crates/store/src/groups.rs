//! Group tables: the fan-out stage's own positional state ([`FanoutStore`]) and the per-user
//! projections of groups ([`GroupStore`]).
//!
//! Positions are offsets of events in the group's partition of the conversations topic. The
//! fan-out is the group aggregate: it reads a group's events in log order and decides, at each
//! position, who is a member, whether a membership change is allowed and who gets a message.
//! Its state is positional (member intervals `[since, until)`), so re-reading any event after a
//! crash gives the same decision whatever later state is already written. Projections only
//! ever see the fan-out's validated output (stream items carrying positions) and keep the
//! latest position per row, so they converge in any replay order.

use async_trait::async_trait;
use chat_events::{ConversationId, GroupRole, MessageId, ReceiptStatus, UserId};
use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::StoreResult;

/// A membership interval: member from position `since` (inclusive) to `until` (exclusive).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberInterval {
    pub member: UserId,
    pub since: i64,
    pub until: Option<i64>,
    pub role: GroupRole,
}

impl MemberInterval {
    /// Whether the member was in the group for an event at position `p` (the state after
    /// every event before `p`: the event that added them is at `since`, so strictly after it).
    pub fn covers(&self, p: i64) -> bool {
        self.since < p && self.until.is_none_or(|u| p < u)
    }
}

/// The fan-out's record of a group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FanoutGroup {
    pub conversation_id: ConversationId,
    pub name: String,
    /// Position of the `group.created` event.
    pub created_at: i64,
    /// Position of the last membership change applied: a cache of the members is valid while
    /// this is unchanged.
    pub membership_version: i64,
}

/// The fan-out's record of a group message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FanoutMessage {
    pub conversation_id: ConversationId,
    pub message_id: MessageId,
    pub sender: UserId,
    pub position: i64,
    /// Members at `position` other than the sender.
    pub recipients: i32,
}

/// The fan-out stage's own state (not a projection: never truncated by a rebuild, since the
/// fan-out's offsets are not reset with the projections').
#[async_trait]
pub trait FanoutStore: crate::Durable {
    /// The accepted send of (conversation, sender, client_msg_id), if any.
    async fn send_record(&self, conv: &ConversationId, sender: UserId, client_msg_id: &str) -> StoreResult<Option<crate::SendRecord>>;
    /// Several accepted sends at once (one round trip where the back-end can).
    async fn send_records(&self, keys: &[(ConversationId, UserId, String)]) -> StoreResult<Vec<Option<crate::SendRecord>>> {
        futures::future::try_join_all(keys.iter().map(|(c, u, m)| self.send_record(c, *u, m))).await
    }
    /// Records accepted sends (written before their outputs are appended).
    async fn put_send_records(&self, records: &[crate::SendRecord]) -> StoreResult<()>;
    async fn fanout_group(&self, conv: &ConversationId) -> StoreResult<Option<FanoutGroup>>;
    async fn put_fanout_group(&self, g: &FanoutGroup) -> StoreResult<()>;
    /// Every membership interval of a group.
    async fn fanout_members(&self, conv: &ConversationId) -> StoreResult<Vec<MemberInterval>>;
    /// Writes an interval, keyed by (group, member, since); writing it again with `until` set
    /// closes it.
    async fn put_fanout_member(&self, conv: &ConversationId, m: &MemberInterval) -> StoreResult<()>;
    /// Writes several intervals of one group (a creation's members): one batch where the engine
    /// has batches, else concurrent writes.
    async fn put_fanout_members(&self, conv: &ConversationId, members: &[MemberInterval]) -> StoreResult<()> {
        futures::future::try_join_all(members.iter().map(|m| self.put_fanout_member(conv, m))).await.map(|_| ())
    }
    async fn fanout_message(&self, conv: &ConversationId, message: MessageId) -> StoreResult<Option<FanoutMessage>>;
    async fn put_fanout_message(&self, m: &FanoutMessage) -> StoreResult<()>;
    /// Group messages with `after < id <= up_to` (from the start when `after` is None), oldest
    /// first.
    async fn fanout_messages_between(
        &self,
        conv: &ConversationId,
        after: Option<MessageId>,
        up_to: MessageId,
    ) -> StoreResult<Vec<FanoutMessage>>;
    /// Records that `member` reached `status` for a message (a set: repeats change nothing).
    async fn add_fanout_ack(&self, message: MessageId, status: ReceiptStatus, member: UserId) -> StoreResult<()>;
    /// How many members reached `status` for a message.
    async fn fanout_ack_count(&self, message: MessageId, status: ReceiptStatus) -> StoreResult<usize>;
    /// How far a member has read a group, and the position of that read.
    async fn fanout_read_marker(&self, conv: &ConversationId, reader: UserId) -> StoreResult<Option<(MessageId, i64)>>;
    async fn put_fanout_read_marker(&self, conv: &ConversationId, reader: UserId, up_to: MessageId, position: i64) -> StoreResult<()>;
    /// How far the fan-out's state of a partition is written: every record below the returned
    /// offset has had its state written. `None` when never recorded.
    async fn fanout_watermark(&self, topic: &str, partition: i32) -> StoreResult<Option<i64>>;
    /// Records that every record of a partition below `next` has had its state written (call
    /// only after those writes succeeded).
    async fn put_fanout_watermark(&self, topic: &str, partition: i32, next: i64) -> StoreResult<()>;
}

/// A group as its members see it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GroupRow {
    pub conversation_id: ConversationId,
    pub name: String,
    pub creator: UserId,
    #[serde(serialize_with = "crate::ser_time")]
    pub created_at: DateTime<Utc>,
    /// Position of the change this row reflects.
    #[serde(skip)]
    pub position: i64,
}

/// A member of a group (current, or former when `active` is false).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GroupMemberRow {
    pub conversation_id: ConversationId,
    pub member: UserId,
    pub role: GroupRole,
    pub active: bool,
    #[serde(skip)]
    pub position: i64,
}

/// A group of a user (current, or former when `active` is false).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct UserGroupRow {
    pub user_id: UserId,
    pub conversation_id: ConversationId,
    pub role: GroupRole,
    pub active: bool,
    #[serde(skip)]
    pub position: i64,
}

/// Reads of the group projections. Their writes ([`crate::Write::Group`] and the others) keep,
/// per row, the one with the highest position (equal positions: identical content), so the rows
/// converge whatever order items from different users' streams are applied in.
#[async_trait]
pub trait GroupStore: Send + Sync {
    /// The group, once its creation is projected (a rename seen first is kept but not enough).
    async fn group(&self, conv: &ConversationId) -> StoreResult<Option<GroupRow>>;
    async fn group_members(&self, conv: &ConversationId) -> StoreResult<Vec<GroupMemberRow>>;
    async fn group_member(&self, conv: &ConversationId, user: UserId) -> StoreResult<Option<GroupMemberRow>>;
    async fn user_groups(&self, user: UserId) -> StoreResult<Vec<UserGroupRow>>;
    /// A user's intervals `(since, until)` in a group, by `since`.
    async fn user_group_intervals(&self, user: UserId, conv: &ConversationId) -> StoreResult<Vec<(i64, Option<i64>)>>;
}
