//! Projection writes as data.
//!
//! A projection is a pure function from an event (and the rows it needs) to a list of
//! [`Write`]s; a back-end applies a whole list at once ([`WriteStore::apply`]: one transaction on
//! SQLite, concurrent statements on Cassandra). Every write is idempotent and carries its own
//! merge rule (earliest receipt wins, highest position wins, a removed pending row stays
//! removed, ...), so applying a list again, or two lists in another order where the rule says
//! so, gives the same rows.
//!
//! [`Write::is_guard`] marks the rows that say "everything this event caused is written" (a
//! stream item's id row, a read marker): a back-end that cannot apply a list atomically applies
//! them after the others.

use async_trait::async_trait;
use chat_events::{ConversationId, EventId, MessageId, UserId};
use chrono::{DateTime, NaiveDate, Utc};

use crate::groups::{GroupMemberRow, GroupRow, UserGroupRow};
use crate::insights::ProfileRow;
use crate::{InboxRow, MessageRow, ReceiptRow, StoreResult, StreamRow};

/// The row of `analytics_message_counts` one deliveries partition writes for a (day, kind,
/// scope): messages are counted by the partition of their sender's own copy, whose single
/// projector owns the row.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageCountKey {
    pub day: NaiveDate,
    pub kind: String,
    pub scope: String,
    pub partition: i32,
}

/// What a user's stream row of a message holds (`stream_messages`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StreamMark {
    /// The message's item or one of its edits.
    Message = 0,
    /// The delete for everyone (its own item).
    Deleted = 1,
    /// The user's delete for themselves (its own item).
    Hidden = 2,
}

impl StreamMark {
    pub fn code(self) -> i32 {
        self as i32
    }

    /// The mark of a stored code (an unknown one reads as a message's).
    pub fn from_code(c: i64) -> Self {
        match c {
            1 => StreamMark::Deleted,
            2 => StreamMark::Hidden,
            _ => StreamMark::Message,
        }
    }
}

/// One idempotent write to a projection table.
#[derive(Clone, Debug, PartialEq)]
pub enum Write {
    /// `users`: an account.
    User { user: UserId, username: String, at: DateTime<Utc> },
    /// `messages` and `message_index`: a message in history.
    Message(MessageRow),
    /// `conversation_buckets`: a conversation has messages in a day bucket.
    Bucket { conversation: ConversationId, bucket: i32 },
    /// `inbox`: a user's row of a conversation (the whole row; written by its single writer).
    Inbox(InboxRow),
    /// `user_stream`: an item at `row.seq` of a user's stream.
    Stream { user: UserId, row: StreamRow },
    /// `stream_heads`: the highest source applied to a user's stream from one partition of the
    /// conversations topic (a guard: written after the items and everything they caused; the
    /// highest wins).
    StreamHead { user: UserId, source_partition: i32, position: i64 },
    /// `receipts` and `receipts_by_user`: a transition; the earliest `at` wins.
    Receipt(ReceiptRow),
    /// `last_seen`: the latest change wins.
    Presence { user: UserId, online: bool, at: DateTime<Utc> },
    /// `groups`: the group as created (highest position wins, the name by its own position).
    Group(GroupRow),
    /// `groups`: a rename at `position`.
    GroupName { conversation: ConversationId, name: String, position: i64 },
    /// `group_members`: highest position wins.
    GroupMember(GroupMemberRow),
    /// `user_groups`: highest position wins.
    UserGroup(UserGroupRow),
    /// `user_group_intervals`: opened at `since`; closed when `until` is set (a close stays).
    UserGroupInterval { user: UserId, conversation: ConversationId, since: i64, until: Option<i64> },
    /// `profiles`: the latest `updated_at` wins.
    Profile(ProfileRow),
    /// `analytics_message_counts`: the messages of a (day, kind, scope) counted by one
    /// deliveries partition, up to `applied_offset` of it (the whole row, from its single
    /// writer's read-modify-write; the highest `applied_offset` wins).
    MessageCount { key: MessageCountKey, messages: i64, applied_offset: i64 },
    /// `analytics_active_users`: a set.
    ActiveUser { day: NaiveDate, user: UserId },
    /// `analytics_profile_views`: a set.
    ProfileView { viewed: UserId, day: NaiveDate, viewer: UserId, view: EventId },
    /// `analytics_topics`: a set (with the message's sender, for the distinct users of a topic).
    Topic { day: NaiveDate, topic: String, message: MessageId, sender: UserId },
    /// `messages`: its sender edited a message (a message's changes come from its sender's copy,
    /// in log order: the last applied wins; a deleted message stays deleted).
    MessageEdited { conversation: ConversationId, message: MessageId, body: String, at: DateTime<Utc> },
    /// `messages`: a message was deleted for everyone (its body, media and edit time gone, for
    /// good: the row is the same whether its edits were applied before or coalesced away).
    MessageDeleted { conversation: ConversationId, message: MessageId },
    /// `stream_messages`: a user's stream row at `seq` holds message `message` (`mark`: its item
    /// or an edit, the delete's own item, or the user's delete-for-me). A set: what a delete reads
    /// to replace those rows.
    StreamMessage { user: UserId, message: MessageId, seq: i64, mark: StreamMark },
    /// `message_edits`: one version of an edited message's text, at the time it was written (the
    /// text as sent at `sent_at`, then each edit): the edit history auditors read. A set; a
    /// delete removes the message's versions for good.
    MessageVersion { message: MessageId, at: DateTime<Utc>, body: String },
    /// `hidden_messages`: the user deleted a message for themselves (a set).
    HiddenMessage { user: UserId, conversation: ConversationId, message: MessageId },
    /// `reactions`: `user`'s reaction to a message (none: taken back), from the item at `seq` of
    /// the user's own stream; the highest `seq` wins.
    Reaction { conversation: ConversationId, message: MessageId, user: UserId, emoji: Option<String>, seq: i64 },
    /// `privacy_settings`: a user's settings, whole; the latest `updated_at` wins (equal times:
    /// each setting's greatest value, as Cassandra resolves cells of one write time).
    Privacy(crate::PrivacyRow),
    /// `blocks`: a block or an unblock; the latest `at` wins (equal times: the block).
    Block(crate::BlockRow),
    /// `analytics_topics`: a deleted message's topics go.
    TopicRemoved { day: NaiveDate, topic: String, message: MessageId },
    /// `media_messages`: a set (a group message carrying a media object, at its position: who
    /// may download the object follows who may read the message).
    MediaMessage { media: uuid::Uuid, conversation: ConversationId, message: MessageId, position: i64 },
}

impl Write {
    /// The table the write goes to (the first of them, for writes of several), for counting.
    pub fn table(&self) -> &'static str {
        match self {
            Write::User { .. } => "users",
            Write::Message(_) => "messages",
            Write::Bucket { .. } => "conversation_buckets",
            Write::Inbox(_) => "inbox",
            Write::Stream { .. } => "user_stream",
            Write::StreamHead { .. } => "stream_heads",
            Write::Receipt(_) => "receipts",
            Write::Presence { .. } => "last_seen",
            Write::Group(_) | Write::GroupName { .. } => "groups",
            Write::GroupMember(_) => "group_members",
            Write::UserGroup(_) => "user_groups",
            Write::UserGroupInterval { .. } => "user_group_intervals",
            Write::Profile(_) => "profiles",
            Write::MessageCount { .. } => "analytics_message_counts",
            Write::ActiveUser { .. } => "analytics_active_users",
            Write::ProfileView { .. } => "analytics_profile_views",
            Write::Topic { .. } => "analytics_topics",
            Write::MediaMessage { .. } => "media_messages",
            Write::MessageEdited { .. } | Write::MessageDeleted { .. } => "messages",
            Write::StreamMessage { .. } => "stream_messages",
            Write::HiddenMessage { .. } => "hidden_messages",
            Write::MessageVersion { .. } => "message_edits",
            Write::TopicRemoved { .. } => "analytics_topics",
            Write::Reaction { .. } => "reactions",
            Write::Privacy(_) => "privacy_settings",
            Write::Block(_) => "blocks",
        }
    }

    /// Whether the row records that an event's other writes are done (see the module doc).
    pub fn is_guard(&self) -> bool {
        matches!(self, Write::StreamHead { .. })
    }

    /// The key of rows that a list may hold more than one version of, each a whole new version
    /// (the single writer's read-modify-write rows): of several in one list only the last
    /// counts. `None` for writes whose rule merges every version (sets, earliest or highest wins).
    pub fn replaces(&self) -> Option<(&'static str, String)> {
        match self {
            Write::Inbox(r) => Some(("inbox", format!("{}/{}", r.user_id, r.conversation_id))),
            // A stream row rewritten by a delete in the same list: the delete's version counts.
            Write::Stream { user, row } => Some(("user_stream", format!("{user}/{}", row.seq))),
            // A message's changes come in log order from its sender's copy: the last one counts
            // (a delete after an edit, or the later of two edits).
            Write::MessageEdited { conversation, message, .. } | Write::MessageDeleted { conversation, message } => {
                Some(("message_change", format!("{conversation}/{message}")))
            }
            // Positions of one partition only grow: the last one is the highest.
            Write::StreamHead { user, source_partition, .. } => Some(("stream_heads", format!("{user}/{source_partition}"))),
            // Offsets of one partition only grow: the last one counts every earlier message.
            Write::MessageCount { key, .. } => Some(("analytics_message_counts", format!("{}/{}/{}/{}", key.day, key.kind, key.scope, key.partition))),
            _ => None,
        }
    }
}

/// Refuses a list that holds a write no back-end could count later (an analytics kind or scope
/// outside the known ones: the Cassandra back-end counts by those names). Both back-ends check
/// before they apply anything.
pub fn validate(writes: &[Write]) -> StoreResult<()> {
    for w in writes {
        if let Write::MessageCount { key, .. } = w {
            crate::insights::check_message_stat(&key.kind, &key.scope)?;
        }
    }
    Ok(())
}

/// Keeps, of the writes that replace a whole row, only the last one per row, where it stands
/// (so a guard stays after everything it guards); the others keep their order.
pub fn coalesce(writes: Vec<Write>) -> Vec<Write> {
    let mut last: std::collections::HashMap<(&'static str, String), usize> = std::collections::HashMap::new();
    for (i, w) in writes.iter().enumerate() {
        if let Some(k) = w.replaces() {
            last.insert(k, i);
        }
    }
    if last.is_empty() {
        return writes;
    }
    writes
        .into_iter()
        .enumerate()
        .filter(|(i, w)| w.replaces().is_none_or(|k| last.get(&k) == Some(i)))
        .map(|(_, w)| w)
        .collect()
}

/// Applying projection writes.
#[async_trait]
pub trait WriteStore: Send + Sync {
    /// Applies the writes, in order where it matters: guards after the others, and a user's
    /// stream rows visible in seq order (a reader never sees a row above a missing one; the sync
    /// cursor depends on it). On SQLite the list is one transaction written in list order; on
    /// Cassandra its statements run concurrently, then each user's stream rows in single-partition
    /// batches, in order, then the guards. An error leaves a subset applied (never a user's stream
    /// row without the ones before it); applying the list again is always safe.
    async fn apply(&self, writes: Vec<Write>) -> StoreResult<()>;
}

/// One-write conveniences over [`WriteStore::apply`] (tests and tools).
#[async_trait]
pub trait WriteExt: WriteStore {
    async fn put_user(&self, user: UserId, username: &str, at: DateTime<Utc>) -> StoreResult<()> {
        self.apply(vec![Write::User { user, username: username.to_owned(), at }]).await
    }
    /// The message's row and its day bucket.
    async fn put_message(&self, m: &MessageRow) -> StoreResult<()> {
        let bucket = Write::Bucket { conversation: m.conversation_id.clone(), bucket: crate::bucket_of(m.message_id) };
        self.apply(vec![Write::Message(m.clone()), bucket]).await
    }
    async fn put_inbox_row(&self, r: &InboxRow) -> StoreResult<()> {
        self.apply(vec![Write::Inbox(r.clone())]).await
    }
    async fn put_receipts(&self, rows: &[ReceiptRow]) -> StoreResult<()> {
        self.apply(rows.iter().cloned().map(Write::Receipt).collect()).await
    }
    async fn put_stream_item(&self, user: UserId, row: &StreamRow) -> StoreResult<()> {
        self.apply(vec![Write::Stream { user, row: row.clone() }]).await
    }
    async fn put_presence(&self, user: UserId, online: bool, at: DateTime<Utc>) -> StoreResult<()> {
        self.apply(vec![Write::Presence { user, online, at }]).await
    }
    async fn put_group(&self, g: &GroupRow) -> StoreResult<()> {
        self.apply(vec![Write::Group(g.clone())]).await
    }
    async fn put_group_name(&self, conversation: &ConversationId, name: &str, position: i64) -> StoreResult<()> {
        self.apply(vec![Write::GroupName { conversation: conversation.clone(), name: name.to_owned(), position }]).await
    }
    async fn put_group_member(&self, m: &GroupMemberRow) -> StoreResult<()> {
        self.apply(vec![Write::GroupMember(m.clone())]).await
    }
    async fn put_user_group(&self, g: &UserGroupRow) -> StoreResult<()> {
        self.apply(vec![Write::UserGroup(g.clone())]).await
    }
    async fn put_user_group_interval(&self, user: UserId, conversation: &ConversationId, since: i64, until: Option<i64>) -> StoreResult<()> {
        self.apply(vec![Write::UserGroupInterval { user, conversation: conversation.clone(), since, until }]).await
    }
    async fn put_profile(&self, p: &ProfileRow) -> StoreResult<()> {
        self.apply(vec![Write::Profile(p.clone())]).await
    }
    async fn add_active_user(&self, day: NaiveDate, user: UserId) -> StoreResult<()> {
        self.apply(vec![Write::ActiveUser { day, user }]).await
    }
    async fn add_profile_view(&self, viewed: UserId, day: NaiveDate, viewer: UserId, view: EventId) -> StoreResult<()> {
        self.apply(vec![Write::ProfileView { viewed, day, viewer, view }]).await
    }
    async fn add_topic(&self, day: NaiveDate, topic: &str, message: MessageId, sender: UserId) -> StoreResult<()> {
        self.apply(vec![Write::Topic { day, topic: topic.to_owned(), message, sender }]).await
    }
}

impl<T: WriteStore + ?Sized> WriteExt for T {}

#[cfg(test)]
mod tests {
    use super::*;

    fn marker(n: i64) -> Write {
        Write::StreamHead { user: UserId(uuid::Uuid::from_u128(1)), source_partition: 3, position: n }
    }

    #[test]
    fn only_the_last_version_of_a_replaced_row_stays() {
        let active = Write::ActiveUser { day: NaiveDate::from_ymd_opt(2026, 1, 1).unwrap_or_default(), user: UserId(uuid::Uuid::from_u128(9)) };
        let out = coalesce(vec![marker(1), active.clone(), marker(2), active.clone()]);
        assert_eq!(out, vec![active.clone(), marker(2), active]);
    }
}
