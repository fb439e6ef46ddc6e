//! The table-store boundary.
//!
//! Three narrow traits over the tables in `schemas/cql/tables.cql`:
//! - [`CommandStore`]: the gates the gateway checks *before* appending an event (unique
//!   usernames, recipient existence, the first message id of a `client_msg_id`);
//! - [`ProjectionStore`]: the idempotent writes (and the few reads) of projection workers;
//! - [`ReadStore`]: what the gateway reads to answer clients;
//! - [`TableAdmin`]: schema, truncation and content checksums (rebuild checks).
//!
//! [`scylla_store::ScyllaStore`] implements all four on ScyllaDB / Cassandra,
//! [`sqlite_store::SqliteStore`] on an embedded SQLite file (the single-process default);
//! `conformance` is the suite both must pass (cargo feature `conformance`).
//!
//! Life of a message row: the projection worker decodes `message.sent`, calls
//! [`ProjectionStore::put_message`] (history + bucket + index), and the gateway's history
//! endpoint pages it back with [`ReadStore::history_page`].

#[cfg(feature = "conformance")]
pub mod conformance;
pub mod fjall_store;
pub mod groups;
pub mod insights;
pub mod scylla_store;
pub mod sqlite_store;
pub mod writes;

use std::collections::BTreeMap;

use async_trait::async_trait;
use chat_events::{ConversationId, DeviceId, MessageId, ReceiptStatus, UserId};
use chrono::{DateTime, Utc};
use serde::Serialize;

pub use insights::{InsightStore, MessageCount, ProfileRow, ProfileViews, TopicCount, MESSAGE_KINDS, MESSAGE_SCOPES, REVOCATIONS_KEPT};
pub use groups::{FanoutGroup, FanoutMessage, FanoutStore, GroupMemberRow, GroupRow, GroupStore, MemberInterval, UserGroupRow};
pub use scylla_store::{ScyllaConfig, ScyllaStore};
pub use fjall_store::FjallStore;
pub use sqlite_store::{SqliteCommands, SqliteStore};
pub use writes::{coalesce, MessageCountKey, StreamMark, Write, WriteExt, WriteStore};

/// Table-store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database is unreachable, timed out or overloaded: retry later (a worker does not store
    /// its offset; the gateway answers `unavailable`).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A stored value could not be read back (corrupt row, schema drift): a bug or operator error.
    #[error("store data error: {0}")]
    Data(String),
    /// Writes answered earlier are gone (the embedded store answers projection writes before
    /// their commit, and a commit failed): permanent for this process. A worker stops, the
    /// process exits, and its workers resume from their stored offsets, as after a crash.
    #[error("store lost writes: {0}")]
    Lost(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The greatest UUIDv7 of the millisecond `ms` (every random bit set): `id <= max_v7(ms)` for
/// every v7 id minted at or before `ms`. Cassandra orders uuids of one version by their bytes and
/// puts lower versions first, so this bound also keeps any non-v7 id of a lower version; SQLite
/// compares the canonical text, which for v7 ids is the same order.
pub(crate) fn max_v7(ms: i64) -> uuid::Uuid {
    let ms = ms.clamp(0, (1 << 48) - 1) as u128;
    uuid::Uuid::from_u128((ms << 80) | (0x7 << 76) | (0xfff << 64) | (0b10 << 62) | ((1 << 62) - 1))
}

/// The day bucket of a message id, for history partitions.
pub fn bucket_of(id: MessageId) -> i32 {
    (id.unix_millis().max(0) / 86_400_000) as i32
}

/// A registered account, as the log-in check needs it.
#[derive(Clone, Debug)]
pub struct Account {
    pub user_id: UserId,
    pub username: String,
    pub password_hash: String,
    pub created_at: DateTime<Utc>,
}

/// The send the fan-out accepted for (conversation, sender, client_msg_id): the first
/// `message.sent` with that key in the conversation's log order. Later ones are duplicates (a
/// retried send appended again) and are dropped; a gateway answers a retry with this record's id
/// and time.
#[derive(Clone, Debug, PartialEq)]
pub struct SendRecord {
    pub conversation_id: ConversationId,
    pub sender: UserId,
    pub client_msg_id: String,
    pub message_id: MessageId,
    pub sent_at: DateTime<Utc>,
    /// [`content_sha256`] of the message: a retry with other content is a reuse, not a retry.
    pub content_sha256: String,
    /// Offset of the accepted `message.sent` in the conversation's partition (-1: accepted
    /// before sends were recorded by position; any later append of the key is a duplicate).
    pub position: i64,
}

/// What a send's idempotency covers (hex SHA-256): the body, a U+001F separator and the media id
/// as the client sent it (empty for text); then, only when there are any (so the hash of a plain
/// message is what it always was), the message replied to and the mentions, each after a
/// separator and a tag.
pub fn content_sha256(body: &str, media_id: Option<&str>, reply_to: Option<MessageId>, mentions: &[UserId]) -> String {
    use sha2::{Digest, Sha256};
    let mut text = format!("{body}\u{1f}{}", media_id.unwrap_or(""));
    if let Some(r) = reply_to {
        text.push_str(&format!("\u{1f}r{r}"));
    }
    for m in mentions {
        text.push_str(&format!("\u{1f}m{m}"));
    }
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// Gates checked before an event is appended.
#[async_trait]
pub trait CommandStore: Send + Sync {
    /// Claims a username. Returns false if it is taken (exactly one of concurrent claims wins).
    async fn create_account(&self, account: &Account) -> StoreResult<bool>;
    /// Undoes a claim whose `user.registered` event could not be appended.
    async fn remove_account(&self, account: &Account) -> StoreResult<()>;
    async fn account_by_name(&self, username: &str) -> StoreResult<Option<Account>>;
    /// The username of a user id, if registered.
    async fn account_by_id(&self, user: UserId) -> StoreResult<Option<String>>;
    /// Records an uploaded media object (after it is stored, before its event).
    async fn put_media(&self, m: &MediaObject) -> StoreResult<()>;
    async fn media(&self, id: uuid::Uuid) -> StoreResult<Option<MediaObject>>;
    /// Makes a media object readable by every user (it became an avatar).
    async fn set_media_public(&self, id: uuid::Uuid) -> StoreResult<()>;
    /// Records that a media object was sent in a conversation (before the message's append).
    async fn share_media(&self, id: uuid::Uuid, conv: &ConversationId) -> StoreResult<()>;
    /// The conversations a media object was sent in.
    async fn media_shares(&self, id: uuid::Uuid) -> StoreResult<Vec<ConversationId>>;
}

/// An uploaded media object (command side: who may attach and read it).
#[derive(Clone, Debug, PartialEq)]
pub struct MediaObject {
    pub media_id: uuid::Uuid,
    pub uploader: UserId,
    /// image, audio or video
    pub kind: String,
    /// Detected from the bytes.
    pub content_type: String,
    pub size: i64,
    pub sha256: String,
    pub created_at: DateTime<Utc>,
    /// Readable by every user (an avatar).
    pub public: bool,
}

/// A message in a conversation's history.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MessageRow {
    pub conversation_id: ConversationId,
    pub message_id: MessageId,
    pub sender: UserId,
    pub sender_device: String,
    pub client_msg_id: String,
    pub kind: String,
    pub body: String,
    #[serde(serialize_with = "ser_time")]
    pub sent_at: DateTime<Utc>,
    /// Offset of its `message.sent` in the conversation's partition (group history is shown to a
    /// member only for positions inside their membership).
    #[serde(skip)]
    pub position: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub media: Option<chat_events::MediaAttachment>,
    /// When its sender last edited it (`body` is then the edited text).
    #[serde(serialize_with = "ser_opt_time", skip_serializing_if = "Option::is_none")]
    pub edited_at: Option<DateTime<Utc>>,
    /// Deleted for everyone: `body` is empty and `media`, `reply_to` and `mentions` absent.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
    /// A reply: the message of the same conversation it quotes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<MessageId>,
    /// The members it mentions (members at the message's position).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mentions: Vec<UserId>,
    /// Reactions counted by emoji, most first: filled in when history is read, not stored here.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reactions: Vec<ReactionCount>,
    /// The reader's own reaction: filled in when history is read, not stored here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub my_reaction: Option<String>,
    /// Withheld from the recipient (a block): shown to its sender only, and nothing in what the
    /// sender reads says so (never serialized).
    #[serde(skip)]
    pub withheld: bool,
}

/// A user's privacy settings (`privacy_settings`): the latest `updated_at` wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrivacyRow {
    pub user_id: UserId,
    pub last_seen: chat_events::Audience,
    pub photo: chat_events::Audience,
    pub read_receipts: chat_events::Audience,
    pub updated_at: DateTime<Utc>,
}

/// One user's block of another (`blocks`): the latest change (`at`) wins; `blocked: false` is an
/// unblock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRow {
    pub user_id: UserId,
    pub target: UserId,
    pub blocked: bool,
    pub at: DateTime<Utc>,
}

/// How many members reacted to a message with one emoji.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReactionCount {
    pub emoji: String,
    pub count: u32,
}

/// A member's reaction to a message (`reactions`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reaction {
    pub message_id: MessageId,
    pub user: UserId,
    pub emoji: String,
}

/// Where a message lives.
#[derive(Clone, Debug, PartialEq)]
pub struct MessageMeta {
    pub message_id: MessageId,
    pub conversation_id: ConversationId,
    pub sender: UserId,
    pub sent_at: DateTime<Utc>,
    pub position: i64,
}

/// One conversation in a user's conversation list.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct InboxRow {
    pub user_id: UserId,
    pub conversation_id: ConversationId,
    pub peer_id: Option<UserId>,
    pub last_message_id: MessageId,
    pub last_sender: UserId,
    pub last_kind: String,
    pub last_body: String,
    #[serde(serialize_with = "ser_time")]
    pub last_at: DateTime<Utc>,
    pub unread: i32,
    /// Of the unread messages, how many mention the user.
    pub mentions: i32,
    /// The user's stream position of the oldest message of another member not read yet (none
    /// when nothing is unread): where a `read` starts looking for what it covers.
    #[serde(skip)]
    pub first_unread_seq: Option<i64>,
    /// How far the user has read the conversation.
    #[serde(skip)]
    pub read_up_to: Option<MessageId>,
    /// The offset (in the user's deliveries partition) of the last stream item applied to the
    /// row: a redelivered item at or below it changes nothing.
    #[serde(skip)]
    pub applied_offset: i64,
    /// The user has sent at least one message in the conversation. Two members who both wrote
    /// are contacts: only contacts see each other's presence and last seen.
    #[serde(skip)]
    pub wrote: bool,
}

/// One transition in the receipt timeline.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ReceiptRow {
    pub message_id: MessageId,
    /// Who sent the message (so a timeline read alone says who sent it to whom).
    pub sender: UserId,
    pub recipient: UserId,
    pub status: ReceiptStatus,
    /// The device that acknowledged (empty for `sent`).
    pub device_id: String,
    #[serde(serialize_with = "ser_time")]
    pub at: DateTime<Utc>,
    pub conversation_id: ConversationId,
}

impl ReceiptRow {
    /// Whether the row also goes to `receipts_by_user` (the audit of one user): every transition
    /// but a direct message's `sent`, which is in the message's timeline only (a row less per
    /// one-to-one message; the audit of a direct recipient lists what their devices did, as
    /// before layout 4). A group member's `sent` row stays there: it says which messages of the
    /// group reached them.
    pub fn in_user_audit(&self) -> bool {
        self.status != ReceiptStatus::Sent || self.conversation_id.is_group()
    }
}

/// Last seen of a user.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LastSeenRow {
    pub user_id: UserId,
    pub status: String,
    #[serde(serialize_with = "ser_time")]
    pub changed_at: DateTime<Utc>,
    #[serde(serialize_with = "ser_opt_time")]
    pub last_seen: Option<DateTime<Utc>>,
}

/// One entry of a user's stream.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamRow {
    pub seq: i64,
    pub item_id: uuid::Uuid,
    /// The `StreamItem` as JSON.
    pub item: String,
}

pub(crate) fn ser_time<S: serde::Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&chat_events::format_time(t))
}

fn ser_opt_time<S: serde::Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.serialize_str(&chat_events::format_time(t)),
        None => s.serialize_none(),
    }
}

/// Making answered writes durable. A worker calls [`Durable::sync`] before it stores the offsets
/// of the records whose writes were answered, so a committed offset never points past rows a
/// power cut could take back.
#[async_trait]
pub trait Durable: Send + Sync {
    /// Returns once every write answered before the call is on disk. Cassandra/ScyllaDB: a write
    /// is answered once the replicas required by the consistency level have it in their commit
    /// logs, so there is nothing more to wait for. SQLite (`tables.db`, unsynced commits): one
    /// synced commit.
    async fn sync(&self) -> StoreResult<()>;

    /// How often a worker should sync (and then store its offsets), at most: every sync costs
    /// a SQLite store a commit and an fsync, and ends the transaction that batches the pages of
    /// many slices; Cassandra's sync is free, and the interval only sets how much a new owner of
    /// a partition handles again.
    fn sync_every(&self) -> std::time::Duration {
        std::time::Duration::from_millis(100)
    }

    /// Whether the store lost writes it had answered (a failed commit of answered-early writes:
    /// SQLite `tables.db`, e.g. on a full disk) and refuses writes until [`Durable::recover`].
    /// Cassandra/ScyllaDB answer a write only once it is in the commit logs: never.
    fn lost(&self) -> bool {
        false
    }

    /// Takes writes again after [`Durable::lost`]: call it only once every writer that counted
    /// on the lost writes went back to its stored offsets (the workers stopped and start again).
    fn recover(&self) {}
}

/// The reads projections need (their writes go through [`WriteStore::apply`]).
#[async_trait]
pub trait ProjectionStore: Durable + WriteStore {
    async fn inbox_row(&self, user: UserId, conv: &ConversationId) -> StoreResult<Option<InboxRow>>;
    /// The highest source ([`chat_events::Source::packed`]) applied to a user's stream from one
    /// partition of the conversations topic.
    async fn stream_head(&self, user: UserId, source_partition: i32) -> StoreResult<Option<i64>>;
    /// The `stream_messages` rows of a user and message, by seq.
    async fn stream_messages(&self, user: UserId, message: MessageId) -> StoreResult<Vec<(i64, StreamMark)>>;
    /// The `analytics_message_counts` row of a deliveries partition: (messages, applied offset).
    async fn message_count_row(&self, key: &MessageCountKey) -> StoreResult<Option<(i64, i64)>>;
    /// Several inbox rows at once (one round trip where the back-end can).
    async fn inbox_rows(&self, keys: &[(UserId, ConversationId)]) -> StoreResult<Vec<Option<InboxRow>>> {
        futures::future::try_join_all(keys.iter().map(|(u, c)| self.inbox_row(*u, c))).await
    }
    /// Several stream heads at once (one round trip where the back-end can).
    async fn stream_heads(&self, keys: &[(UserId, i32)]) -> StoreResult<Vec<Option<i64>>> {
        futures::future::try_join_all(keys.iter().map(|(u, p)| self.stream_head(*u, *p))).await
    }
}

/// What the gateway reads.
#[async_trait]
pub trait ReadStore: Send + Sync {
    /// A page of history, newest first, strictly older than `before`.
    async fn history_page(
        &self,
        conv: &ConversationId,
        before: Option<MessageId>,
        limit: usize,
    ) -> StoreResult<Vec<MessageRow>>;
    /// A user's conversations (unordered; the caller sorts).
    async fn inbox(&self, user: UserId, limit: usize) -> StoreResult<Vec<InboxRow>>;
    async fn find_message(&self, id: MessageId) -> StoreResult<Option<MessageMeta>>;
    /// The receipt timeline of one message.
    async fn receipts(&self, message: MessageId) -> StoreResult<Vec<ReceiptRow>>;
    /// Stream items with `seq > after`, in order, at most `limit`.
    async fn stream_after(&self, user: UserId, after: i64, limit: usize) -> StoreResult<Vec<StreamRow>>;
    /// The user's unread messages over their conversations (the sum of the inbox rows' `unread`,
    /// of at most [`UNREAD_SCAN_CONVERSATIONS`] conversations), up to `cap`.
    async fn unread_count(&self, user: UserId, cap: usize) -> StoreResult<usize>;
    async fn last_seen(&self, user: UserId) -> StoreResult<Option<LastSeenRow>>;
    /// Whether `user` has `conv` in their conversation list.
    async fn in_inbox(&self, user: UserId, conv: &ConversationId) -> StoreResult<bool>;
    /// The positions of the messages of a group conversation that carry a media object.
    async fn media_positions(&self, media: uuid::Uuid, conv: &ConversationId) -> StoreResult<Vec<i64>>;
    /// The versions of an edited message's text, oldest first (none for a message never edited,
    /// or deleted).
    async fn message_versions(&self, message: MessageId) -> StoreResult<Vec<(DateTime<Utc>, String)>>;
    /// The messages of `conv` from `from` to `to` (both included) that `user` deleted for
    /// themselves.
    async fn hidden_messages(&self, user: UserId, conv: &ConversationId, from: MessageId, to: MessageId) -> StoreResult<Vec<MessageId>>;
    /// The reactions to these messages of `conv` (at most `limit`; a back-end may also return
    /// reactions to other messages between them).
    async fn reactions(&self, conv: &ConversationId, messages: &[MessageId], limit: usize) -> StoreResult<Vec<Reaction>>;
    /// A user's privacy settings (none: never set, the defaults apply).
    async fn privacy(&self, user: UserId) -> StoreResult<Option<PrivacyRow>>;
    /// The `blocks` row of (user, target), blocked or unblocked (none: never either).
    async fn block(&self, user: UserId, target: UserId) -> StoreResult<Option<BlockRow>>;
    /// The users `user` blocks now (rows with `blocked`), at most `limit`, by target id.
    async fn blocks(&self, user: UserId, limit: usize) -> StoreResult<Vec<BlockRow>>;
}

/// Row count and content hash of one table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct TableChecksum {
    pub rows: u64,
    pub sha256: String,
}

/// Schema, truncation, checksums.
#[async_trait]
pub trait TableAdmin: Send + Sync {
    /// Creates the keyspace and tables that do not exist (and moves data of older layouts of
    /// the command side and the fan-out's state).
    async fn migrate(&self) -> StoreResult<()>;
    /// The layout the projection tables were written in ([`PROJECTION_LAYOUT`] for tables this
    /// version made; 1 for tables of versions before the layout was recorded).
    async fn projection_layout(&self) -> StoreResult<u32>;
    /// Drops every projection table (of this layout and of older ones), creates them anew and
    /// records [`PROJECTION_LAYOUT`]: the projections are then rebuilt from the log by a
    /// projection group that starts at offset zero.
    async fn reset_projections(&self) -> StoreResult<()>;
    /// Empties every projection table (not the command gates), for a rebuild.
    async fn truncate_projections(&self) -> StoreResult<()>;
    /// Replaces every projection table's rows with those of the store rebuilt at `place` (a
    /// data directory of the same back-end, written by a projection group of this layout), in
    /// one transaction; reads wait meanwhile and then see the new rows. Nothing may project into
    /// either store while it runs. Embedded only: a cluster answers `Data`.
    async fn replace_projections(&self, place: &str) -> StoreResult<()>;
    /// Row count and SHA-256 over the sorted rows of every projection table.
    async fn checksums(&self) -> StoreResult<BTreeMap<String, TableChecksum>>;
    /// The projection tables holding a row whose text contains `needle`, with how many such rows
    /// (what an operator runs to check that a deleted message's text is gone from every table).
    async fn tables_containing(&self, needle: &str) -> StoreResult<BTreeMap<String, u64>>;
    /// Whether the store answers a trivial query.
    async fn ping(&self) -> bool;
}

/// Every table trait at once: what a back-end provides.
pub trait Tables: CommandStore + ProjectionStore + ReadStore + TableAdmin + FanoutStore + GroupStore + InsightStore {}
impl<T: CommandStore + ProjectionStore + ReadStore + TableAdmin + FanoutStore + GroupStore + InsightStore> Tables for T {}

/// The layout of the projection tables this version writes. 2: the delivery pipeline v2
/// (direct conversations projected from stream items, inbox rows with their read position,
/// stream heads in place of item-id rows). 3: inbox rows say whether their user wrote in the
/// conversation (contacts, for presence); `media_messages` (group media readable as the messages
/// that carry them). 4: `receipts` clustered by time (an auditor reads a message's timeline in
/// time order with one plain query), every receipt row names the message's sender, and a direct
/// message's `sent` transition is stored like a group member's. 5: messages are counted for
/// analytics in `analytics_message_counts` (a count per day, kind, scope and deliveries
/// partition, guarded by the partition's offset) instead of a row per message in
/// `analytics_messages`. 6: edits and deletes (`messages` says when a message was edited and
/// whether it was deleted; `stream_messages` finds the stream rows of a message, which a delete
/// replaces; `hidden_messages`, what each user deleted for themselves; `message_edits`, the versions
/// of edited messages). 7: replies, mentions and reactions (`messages` says which message one
/// replies to and whom it mentions; `inbox` counts the unread mentions of its user; `reactions`,
/// each member's reaction to each message). 8: privacy (`messages` says whether a message was
/// withheld from its recipient by a block; `privacy_settings`, each user's settings; `blocks`,
/// who blocks whom).
pub const PROJECTION_LAYOUT: u32 = 8;

/// Projection tables of older layouts, dropped by [`TableAdmin::reset_projections`].
/// (`pending_deliveries`: a row per message not yet delivered to any device, added and removed
/// per message, for the welcome frame's count alone; since 2026-12-06 that count is the inbox's
/// unread sum, see [`ProjectionStore::unread_count`]. `analytics_messages`: a row per message,
/// counted at query time, until layout 5.)
pub const RETIRED_PROJECTION_TABLES: &[&str] = &["read_markers", "user_stream_ids", "pending_deliveries", "analytics_messages"];

/// [`ProjectionStore::unread_count`] reads at most this many of a user's conversations.
pub const UNREAD_SCAN_CONVERSATIONS: usize = 10_000;

/// The projection tables, in the order checksums report them.
pub const PROJECTION_TABLES: &[&str] = &[
    "users",
    "messages",
    "conversation_buckets",
    "message_index",
    "inbox",
    "user_stream",
    "stream_heads",
    "receipts",
    "last_seen",
    "groups",
    "group_members",
    "user_groups",
    "user_group_intervals",
    "profiles",
    "analytics_message_counts",
    "analytics_active_users",
    "analytics_profile_views",
    "analytics_topics",
    "receipts_by_user",
    "media_messages",
    "stream_messages",
    "hidden_messages",
    "message_edits",
    "reactions",
    "privacy_settings",
    "blocks",
];

/// Convenience: a device id as stored in the receipts table.
pub fn device_column(d: &DeviceId) -> String {
    d.as_str().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn max_v7_bounds_every_v7_id_of_its_millisecond() {
        let ms = 1_714_521_600_123;
        let max = max_v7(ms);
        assert_eq!(max.get_version_num(), 7);
        assert_eq!(max.get_variant(), uuid::Variant::RFC4122);
        assert_eq!(MessageId(max).unix_millis(), ms);
        for _ in 0..100 {
            let ts = uuid::Timestamp::from_unix(uuid::NoContext, (ms / 1000) as u64, ((ms % 1000) * 1_000_000) as u32);
            let id = Uuid::new_v7(ts);
            assert!(id <= max, "{id} <= {max}");
            assert!(id.to_string() <= max.to_string(), "as text too (SQLite): {id} <= {max}");
            let next = Uuid::new_v7(uuid::Timestamp::from_unix(uuid::NoContext, ((ms + 1) / 1000) as u64, (((ms + 1) % 1000) * 1_000_000) as u32));
            assert!(next > max, "{next} > {max}");
            assert!(next.to_string() > max.to_string(), "as text too (SQLite): {next} > {max}");
        }
    }
}
