//! The ScyllaDB / Cassandra back-end of every table trait, on the `scylla` driver.
//!
//! All statements are prepared once at connect. Write times (`USING TIMESTAMP`) carry the
//! idempotence rules that a replay in any order must respect (see `schemas/cql/tables.cql`).

use std::collections::BTreeMap;
use std::fmt::Display;
use std::time::Duration;

use async_trait::async_trait;
use chat_events::{ConversationId, GroupRole, MessageId, ReceiptStatus, UserId};
use chrono::{DateTime, NaiveDate, Utc};
use futures::{StreamExt, TryStreamExt};
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::statement::prepared::PreparedStatement;
use scylla::value::Row;
use sha2::{Digest, Sha256};
use tracing::info;
use uuid::Uuid;

use crate::insights::{days, first_transitions, profile_views_from, sort_message_counts, sort_receipts_of_user, sort_topic_counts};
use crate::*;

/// Connection settings.
#[derive(Clone, Debug)]
pub struct ScyllaConfig {
    /// `host:port` of the contact points.
    pub nodes: Vec<String>,
    pub keyspace: String,
    /// Replication factor of the keyspace when this store creates it.
    pub replication_factor: u32,
}

const SCHEMA: &str = include_str!("../../../schemas/cql/tables.cql");

/// Write time of a receipt row: earlier events get larger write times, so the earliest wins.
const RECEIPT_TS_BASE: i64 = 1 << 62;
/// Write time of an accepted send: the lowest position wins.
const SEND_TS_BASE: i64 = 1 << 62;

fn unavailable(e: impl Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn data(e: impl Display) -> StoreError {
    StoreError::Data(e.to_string())
}

fn conv(s: String) -> StoreResult<ConversationId> {
    s.parse().map_err(|_| StoreError::Data(format!("bad conversation id {s:?}")))
}

fn micros(t: &DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn role(s: String) -> StoreResult<GroupRole> {
    GroupRole::parse(&s).ok_or_else(|| StoreError::Data(format!("bad group role {s:?}")))
}

fn audience(s: Option<String>) -> StoreResult<chat_events::Audience> {
    let s = s.unwrap_or_default();
    chat_events::Audience::parse(&s).ok_or_else(|| StoreError::Data(format!("bad audience {s:?}")))
}

/// Write time of a membership interval write: the open at `since`, the close at `until` (see
/// `fanout_members` in `schemas/cql/tables.cql`).
fn interval_ts(since: i64, until: Option<i64>) -> i64 {
    until.unwrap_or(since)
}

struct Stmts {
    insert_account_lwt: PreparedStatement,
    insert_account_by_id: PreparedStatement,
    delete_account_by_name: PreparedStatement,
    delete_account_by_id: PreparedStatement,
    select_account_by_name: PreparedStatement,
    select_account_by_id: PreparedStatement,
    select_send: PreparedStatement,
    insert_send: PreparedStatement,
    insert_media: PreparedStatement,
    select_media: PreparedStatement,
    publish_media: PreparedStatement,
    insert_media_share: PreparedStatement,
    select_media_shares: PreparedStatement,

    insert_user: PreparedStatement,
    insert_message: PreparedStatement,
    update_message_edited: PreparedStatement,
    update_message_deleted: PreparedStatement,
    insert_stream_message: PreparedStatement,
    select_stream_messages: PreparedStatement,
    insert_hidden: PreparedStatement,
    insert_version: PreparedStatement,
    delete_versions: PreparedStatement,
    select_versions: PreparedStatement,
    select_hidden: PreparedStatement,
    insert_reaction: PreparedStatement,
    select_reactions: PreparedStatement,
    insert_privacy: PreparedStatement,
    select_privacy: PreparedStatement,
    insert_block: PreparedStatement,
    select_block: PreparedStatement,
    select_blocks: PreparedStatement,
    delete_topic: PreparedStatement,
    insert_bucket: PreparedStatement,
    insert_message_index: PreparedStatement,
    select_message_index: PreparedStatement,
    select_inbox_row: PreparedStatement,
    insert_inbox_row: PreparedStatement,
    select_inbox: PreparedStatement,
    select_buckets_desc: PreparedStatement,
    select_messages_before: PreparedStatement,
    select_messages_all_desc: PreparedStatement,
    insert_receipt: PreparedStatement,
    select_receipts: PreparedStatement,
    select_stream_head: PreparedStatement,
    insert_stream: PreparedStatement,
    insert_stream_head: PreparedStatement,
    select_stream_after: PreparedStatement,
    insert_media_message: PreparedStatement,
    select_media_positions: PreparedStatement,
    select_unread: PreparedStatement,
    insert_presence_online: PreparedStatement,
    insert_presence_offline: PreparedStatement,
    select_last_seen: PreparedStatement,

    insert_fanout_group: PreparedStatement,
    select_fanout_group: PreparedStatement,
    open_fanout_member: PreparedStatement,
    close_fanout_member: PreparedStatement,
    select_fanout_members: PreparedStatement,
    insert_fanout_message: PreparedStatement,
    select_fanout_message: PreparedStatement,
    select_fanout_messages_range: PreparedStatement,
    select_fanout_messages_upto: PreparedStatement,
    insert_fanout_ack: PreparedStatement,
    count_fanout_acks: PreparedStatement,
    insert_fanout_read_marker: PreparedStatement,
    select_fanout_read_marker: PreparedStatement,
    insert_fanout_watermark: PreparedStatement,
    select_fanout_watermark: PreparedStatement,

    insert_group: PreparedStatement,
    update_group_name: PreparedStatement,
    select_group: PreparedStatement,
    insert_group_member: PreparedStatement,
    select_group_members: PreparedStatement,
    select_group_member: PreparedStatement,
    insert_user_group: PreparedStatement,
    select_user_groups: PreparedStatement,
    open_user_group_interval: PreparedStatement,
    close_user_group_interval: PreparedStatement,
    select_user_group_intervals: PreparedStatement,

    insert_role: PreparedStatement,
    delete_role: PreparedStatement,
    select_roles: PreparedStatement,
    insert_revocation: PreparedStatement,
    select_revocations: PreparedStatement,
    insert_profile: PreparedStatement,
    select_profile: PreparedStatement,
    insert_message_count: PreparedStatement,
    select_message_count: PreparedStatement,
    select_message_counts_of_day: PreparedStatement,
    insert_active_user: PreparedStatement,
    count_active_users: PreparedStatement,
    insert_profile_view: PreparedStatement,
    count_profile_views_by_viewer: PreparedStatement,
    insert_topic: PreparedStatement,
    count_topics: PreparedStatement,
    insert_receipt_by_user: PreparedStatement,
    select_receipts_by_user_upto: PreparedStatement,
}

/// Every table of the platform on one ScyllaDB/Cassandra keyspace.
pub struct ScyllaStore {
    session: Session,
    keyspace: String,
    replication_factor: u32,
    stmts: Stmts,
}

/// The write time of a message's delete: above any edit's (written at the time it is applied),
/// so a deleted message stays deleted whatever is applied after it.
const DELETED_TS: i64 = 1 << 62;

const MESSAGE_COLS: &str =
    "conversation_id, message_id, sender, sender_device, client_msg_id, kind, body, sent_at, position, media, edited_at, deleted, reply_to, mentions, withheld";
type MessageTuple = (
    String,
    Uuid,
    Uuid,
    String,
    String,
    String,
    String,
    DateTime<Utc>,
    Option<i64>,
    Option<String>,
    Option<DateTime<Utc>>,
    Option<bool>,
    Option<Uuid>,
    Option<Vec<Uuid>>,
    Option<bool>,
);

fn message_from(t: MessageTuple) -> StoreResult<MessageRow> {
    Ok(MessageRow {
        conversation_id: conv(t.0)?,
        message_id: MessageId(t.1),
        sender: UserId(t.2),
        sender_device: t.3,
        client_msg_id: t.4,
        kind: t.5,
        body: t.6,
        sent_at: t.7,
        position: t.8.unwrap_or(0),
        media: match t.9 {
            Some(j) => Some(serde_json::from_str(&j).map_err(data)?),
            None => None,
        },
        edited_at: t.10,
        deleted: t.11.unwrap_or(false),
        reply_to: t.12.map(MessageId),
        mentions: t.13.unwrap_or_default().into_iter().map(UserId).collect(),
        reactions: Vec::new(),
        my_reaction: None,
        withheld: t.14.unwrap_or(false),
    })
}

const INBOX_COLS: &str =
    "user_id, conversation_id, peer_id, last_message_id, last_sender, last_kind, last_body, last_at, unread, first_unread_seq, read_up_to, applied_offset, wrote, mentions";
type InboxTuple = (Uuid, String, Option<Uuid>, Uuid, Uuid, String, String, DateTime<Utc>, i32, Option<i64>, Option<Uuid>, i64, Option<bool>, Option<i32>);

fn inbox_from(t: InboxTuple) -> StoreResult<InboxRow> {
    Ok(InboxRow {
        user_id: UserId(t.0),
        conversation_id: conv(t.1)?,
        peer_id: t.2.map(UserId),
        last_message_id: MessageId(t.3),
        last_sender: UserId(t.4),
        last_kind: t.5,
        last_body: t.6,
        last_at: t.7,
        unread: t.8,
        first_unread_seq: t.9,
        read_up_to: t.10.map(MessageId),
        applied_offset: t.11,
        wrote: t.12.unwrap_or(false),
        mentions: t.13.unwrap_or(0),
    })
}

/// The table a `CREATE TABLE` statement of the schema creates, and its columns with their types
/// (one column per line, as `schemas/cql/tables.cql` writes them; key-only lines skipped).
fn table_columns(stmt: &str) -> Option<(String, Vec<(String, String)>)> {
    let rest = stmt.split("CREATE TABLE IF NOT EXISTS ").nth(1)?;
    let name = rest.split(|c: char| c.is_whitespace() || c == '(').next()?.rsplit('.').next()?.to_owned();
    let columns = rest
        .lines()
        .skip(1)
        .take_while(|l| !l.trim_start().starts_with(')'))
        .filter_map(|l| {
            let l = l.trim().trim_end_matches(',');
            let (column, ty) = l.split_once(char::is_whitespace)?;
            let ty = ty.trim();
            let plain = column.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            (plain && column != "primary" && !l.starts_with("PRIMARY") && !ty.contains("PRIMARY KEY")).then(|| (column.to_owned(), ty.to_owned()))
        })
        .collect();
    Some((name, columns))
}

impl ScyllaStore {
    /// Every row of a table, as Cassandra's JSON (every column in a canonical text form,
    /// whatever the types).
    async fn rows_as_json(&self, table: &str) -> StoreResult<Vec<String>> {
        let mut stream = self
            .session
            .query_iter(format!("SELECT JSON * FROM {}.{}", self.keyspace, table), ())
            .await
            .map_err(unavailable)?
            .rows_stream::<(String,)>()
            .map_err(data)?;
        let mut rows = Vec::new();
        while let Some((json,)) = stream.try_next().await.map_err(unavailable)? {
            rows.push(json);
        }
        Ok(rows)
    }

    /// Connects, creates the keyspace and tables if needed, and prepares every statement.
    pub async fn connect(config: &ScyllaConfig) -> StoreResult<Self> {
        if !config.keyspace.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') || config.keyspace.is_empty() {
            return Err(StoreError::Data(format!("invalid keyspace name {:?}", config.keyspace)));
        }
        let session = SessionBuilder::new()
            .known_nodes(&config.nodes)
            .connection_timeout(Duration::from_secs(10))
            .build()
            .await
            .map_err(unavailable)?;
        Self::apply_schema(&session, &config.keyspace, config.replication_factor).await?;
        let stmts = Self::prepare_all(&session, &config.keyspace).await?;
        Ok(ScyllaStore {
            session,
            keyspace: config.keyspace.clone(),
            replication_factor: config.replication_factor,
            stmts,
        })
    }

    async fn apply_schema(session: &Session, ks: &str, rf: u32) -> StoreResult<()> {
        let replication = format!("{{'class': 'SimpleStrategy', 'replication_factor': {rf}}}");
        // Skip the DDL round trips when every table and column is already there (the common
        // restart).
        let existing_columns: std::collections::HashSet<(String, String)> = match session
            .query_unpaged("SELECT table_name, column_name FROM system_schema.columns WHERE keyspace_name = ?", (ks,))
            .await
        {
            Ok(r) => r
                .into_rows_result()
                .ok()
                .and_then(|r| r.rows::<(String, String)>().ok().map(|rows| rows.filter_map(Result::ok).collect()))
                .unwrap_or_default(),
            Err(_) => Default::default(),
        };
        let existing: std::collections::HashSet<String> = existing_columns.iter().map(|(t, _)| t.clone()).collect();
        let statements: Vec<String> = SCHEMA
            .split("\n;")
            .map(|s| {
                s.lines()
                    .filter(|l| !l.trim_start().starts_with("--"))
                    .collect::<Vec<_>>()
                    .join("\n")
                    .replace("{ks}", ks)
                    .replace("{replication}", &replication)
            })
            .filter(|s| !s.trim().is_empty())
            .collect();
        let tables: Vec<(String, Vec<(String, String)>)> = statements.iter().filter_map(|s| table_columns(s)).collect();
        // Columns a table of an older version lacks: added, so that every statement of this
        // version can be prepared on it (`chat migrate` can then connect and rebuild the
        // projections of an older layout; their tables are dropped and created anew there).
        let additions: Vec<String> = tables
            .iter()
            .filter(|(t, _)| existing.contains(t))
            .flat_map(|(t, columns)| {
                columns
                    .iter()
                    .filter(|(c, _)| !existing_columns.contains(&(t.clone(), c.clone())))
                    .map(move |(c, ty)| format!("ALTER TABLE {ks}.{t} ADD {c} {ty}"))
            })
            .collect();
        if tables.iter().all(|(t, _)| existing.contains(t)) && additions.is_empty() && !existing.is_empty() {
            return Ok(());
        }
        // Projection tables of versions before the layout was recorded are layout 1.
        let fresh = !existing.contains("users");
        info!(keyspace = ks, "creating keyspace and tables");
        for stmt in statements {
            session.query_unpaged(stmt.as_str(), ()).await.map_err(unavailable)?;
        }
        for add in &additions {
            info!(keyspace = ks, statement = %add, "adding a column this version writes");
            session.query_unpaged(add.as_str(), ()).await.map_err(unavailable)?;
        }
        session.await_schema_agreement().await.map_err(unavailable)?;
        if fresh {
            Self::set_layout(session, ks).await?;
        }
        Ok(())
    }

    async fn prepare_all(s: &Session, ks: &str) -> StoreResult<Stmts> {
        // Results are decoded with the metadata cached at preparation, so Cassandra does not
        // encode it into every response (~5 % of its CPU in a profile at 1,000 msgs/s). Safe
        // because every SELECT names its columns and the schema only ever gains tables; not for
        // the conditional statements, whose result columns depend on whether they applied.
        let p = |q: String| async move {
            let mut stmt = s.prepare(q.as_str()).await.map_err(unavailable)?;
            stmt.set_use_cached_result_metadata(!q.contains(" IF "));
            Ok::<_, StoreError>(stmt)
        };
        Ok(Stmts {
            insert_account_lwt: p(format!(
                "INSERT INTO {ks}.accounts_by_name (username, user_id, password_hash, created_at) VALUES (?, ?, ?, ?) IF NOT EXISTS"
            ))
            .await?,
            insert_account_by_id: p(format!(
                "INSERT INTO {ks}.accounts_by_id (user_id, username, created_at) VALUES (?, ?, ?)"
            ))
            .await?,
            delete_account_by_name: p(format!("DELETE FROM {ks}.accounts_by_name WHERE username = ? IF user_id = ?")).await?,
            delete_account_by_id: p(format!("DELETE FROM {ks}.accounts_by_id WHERE user_id = ?")).await?,
            select_account_by_name: p(format!(
                "SELECT user_id, username, password_hash, created_at FROM {ks}.accounts_by_name WHERE username = ?"
            ))
            .await?,
            select_account_by_id: p(format!("SELECT username FROM {ks}.accounts_by_id WHERE user_id = ?")).await?,
            select_send: p(format!(
                "SELECT message_id, sent_at, content_sha256, position FROM {ks}.sends WHERE sender = ? AND client_msg_id = ? AND conversation_id = ?"
            ))
            .await?,
            // The first accepted send of a key stays: written with write time `2^62 - position`,
            // so of two writes of one key the lower position wins (a replay writes the same
            // values), whatever the order they arrive in.
            insert_send: p(format!(
                "INSERT INTO {ks}.sends (sender, client_msg_id, conversation_id, message_id, sent_at, content_sha256, position) VALUES (?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            insert_media: p(format!(
                "INSERT INTO {ks}.media_objects (media_id, uploader, kind, content_type, size, sha256, created_at, public) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            ))
            .await?,
            select_media: p(format!(
                "SELECT uploader, kind, content_type, size, sha256, created_at, public FROM {ks}.media_objects WHERE media_id = ?"
            ))
            .await?,
            publish_media: p(format!("UPDATE {ks}.media_objects SET public = true WHERE media_id = ?")).await?,
            insert_media_share: p(format!("INSERT INTO {ks}.media_shares (media_id, conversation_id) VALUES (?, ?)")).await?,
            select_media_shares: p(format!("SELECT conversation_id FROM {ks}.media_shares WHERE media_id = ?")).await?,

            insert_user: p(format!("INSERT INTO {ks}.users (user_id, username, registered_at) VALUES (?, ?, ?)")).await?,
            insert_message: p(format!(
                "INSERT INTO {ks}.messages (conversation_id, bucket, message_id, sender, sender_device, client_msg_id, kind, body, sent_at, position, media, reply_to, mentions, withheld) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP 1"
            ))
            .await?,
            insert_bucket: p(format!("INSERT INTO {ks}.conversation_buckets (conversation_id, bucket) VALUES (?, ?)")).await?,
            insert_message_index: p(format!(
                "INSERT INTO {ks}.message_index (message_id, conversation_id, sender, sent_at, position) VALUES (?, ?, ?, ?, ?)"
            ))
            .await?,
            select_message_index: p(format!(
                "SELECT conversation_id, sender, sent_at, position FROM {ks}.message_index WHERE message_id = ?"
            ))
            .await?,
            select_inbox_row: p(format!("SELECT {INBOX_COLS} FROM {ks}.inbox WHERE user_id = ? AND conversation_id = ?")).await?,
            insert_inbox_row: p(format!("INSERT INTO {ks}.inbox ({INBOX_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")).await?,
            select_inbox: p(format!("SELECT {INBOX_COLS} FROM {ks}.inbox WHERE user_id = ? LIMIT ?")).await?,
            select_buckets_desc: p(format!(
                "SELECT bucket FROM {ks}.conversation_buckets WHERE conversation_id = ? AND bucket <= ?"
            ))
            .await?,
            select_messages_before: p(format!(
                "SELECT {MESSAGE_COLS} FROM {ks}.messages WHERE conversation_id = ? AND bucket = ? AND message_id < ? LIMIT ?"
            ))
            .await?,
            select_messages_all_desc: p(format!(
                "SELECT {MESSAGE_COLS} FROM {ks}.messages WHERE conversation_id = ? AND bucket = ? LIMIT ?"
            ))
            .await?,
            insert_receipt: p(format!(
                "INSERT INTO {ks}.receipts (message_id, at, recipient, status, device_id, sender, conversation_id) VALUES (?, ?, ?, ?, ?, ?, ?)"
            ))
            .await?,
            select_receipts: p(format!(
                "SELECT message_id, sender, recipient, status, device_id, at, conversation_id FROM {ks}.receipts WHERE message_id = ?"
            ))
            .await?,
            select_stream_head: p(format!("SELECT position FROM {ks}.stream_heads WHERE user_id = ? AND source_partition = ?")).await?,
            insert_stream: p(format!("INSERT INTO {ks}.user_stream (user_id, seq, item_id, item) VALUES (?, ?, ?, ?)")).await?,
            insert_stream_head: p(format!(
                "INSERT INTO {ks}.stream_heads (user_id, source_partition, position) VALUES (?, ?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            insert_media_message: p(format!(
                "INSERT INTO {ks}.media_messages (media_id, conversation_id, message_id, position) VALUES (?, ?, ?, ?)"
            ))
            .await?,
            select_media_positions: p(format!("SELECT position FROM {ks}.media_messages WHERE media_id = ? AND conversation_id = ?")).await?,
            select_stream_after: p(format!(
                "SELECT seq, item_id, item FROM {ks}.user_stream WHERE user_id = ? AND seq > ? LIMIT ?"
            ))
            .await?,
            select_unread: p(format!("SELECT unread FROM {ks}.inbox WHERE user_id = ? LIMIT ?")).await?,
            insert_presence_online: p(format!(
                "INSERT INTO {ks}.last_seen (user_id, status, changed_at) VALUES (?, 'online', ?) USING TIMESTAMP ?"
            ))
            .await?,
            insert_presence_offline: p(format!(
                "INSERT INTO {ks}.last_seen (user_id, status, changed_at, last_seen) VALUES (?, 'offline', ?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            select_last_seen: p(format!(
                "SELECT status, changed_at, last_seen FROM {ks}.last_seen WHERE user_id = ?"
            ))
            .await?,

            insert_fanout_group: p(format!(
                "INSERT INTO {ks}.fanout_groups (conversation_id, name, created_at, membership_version) VALUES (?, ?, ?, ?)"
            ))
            .await?,
            select_fanout_group: p(format!(
                "SELECT name, created_at, membership_version FROM {ks}.fanout_groups WHERE conversation_id = ?"
            ))
            .await?,
            // The open never names `until` (a NULL would delete a close written before it).
            open_fanout_member: p(format!(
                "INSERT INTO {ks}.fanout_members (conversation_id, member, since, role) VALUES (?, ?, ?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            close_fanout_member: p(format!(
                "INSERT INTO {ks}.fanout_members (conversation_id, member, since, until, role) VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            select_fanout_members: p(format!(
                "SELECT member, since, until, role FROM {ks}.fanout_members WHERE conversation_id = ?"
            ))
            .await?,
            insert_fanout_message: p(format!(
                "INSERT INTO {ks}.fanout_messages (conversation_id, message_id, sender, position, recipients) VALUES (?, ?, ?, ?, ?)"
            ))
            .await?,
            select_fanout_message: p(format!(
                "SELECT message_id, sender, position, recipients FROM {ks}.fanout_messages WHERE conversation_id = ? AND message_id = ?"
            ))
            .await?,
            select_fanout_messages_range: p(format!(
                "SELECT message_id, sender, position, recipients FROM {ks}.fanout_messages WHERE conversation_id = ? AND message_id > ? AND message_id <= ?"
            ))
            .await?,
            select_fanout_messages_upto: p(format!(
                "SELECT message_id, sender, position, recipients FROM {ks}.fanout_messages WHERE conversation_id = ? AND message_id <= ?"
            ))
            .await?,
            insert_fanout_ack: p(format!("INSERT INTO {ks}.fanout_acks (message_id, status, member) VALUES (?, ?, ?)")).await?,
            count_fanout_acks: p(format!("SELECT COUNT(*) FROM {ks}.fanout_acks WHERE message_id = ? AND status = ?")).await?,
            insert_fanout_read_marker: p(format!(
                "INSERT INTO {ks}.fanout_read_markers (conversation_id, reader, up_to, position) VALUES (?, ?, ?, ?)"
            ))
            .await?,
            select_fanout_read_marker: p(format!(
                "SELECT up_to, position FROM {ks}.fanout_read_markers WHERE conversation_id = ? AND reader = ?"
            ))
            .await?,
            insert_fanout_watermark: p(format!("INSERT INTO {ks}.fanout_watermarks (topic, partition, next) VALUES (?, ?, ?)")).await?,
            select_fanout_watermark: p(format!("SELECT next FROM {ks}.fanout_watermarks WHERE topic = ? AND partition = ?")).await?,

            // Write time = position: the highest position wins, in any write order.
            insert_group: p(format!(
                "INSERT INTO {ks}.groups (conversation_id, name, creator, created_at, position) VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            // A rename updates only the name cell, at its own position as write time.
            update_group_name: p(format!("UPDATE {ks}.groups USING TIMESTAMP ? SET name = ? WHERE conversation_id = ?")).await?,
            select_group: p(format!("SELECT name, creator, created_at, position FROM {ks}.groups WHERE conversation_id = ?")).await?,
            insert_group_member: p(format!(
                "INSERT INTO {ks}.group_members (conversation_id, member, role, active, position) VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            select_group_members: p(format!(
                "SELECT member, role, active, position FROM {ks}.group_members WHERE conversation_id = ?"
            ))
            .await?,
            select_group_member: p(format!(
                "SELECT member, role, active, position FROM {ks}.group_members WHERE conversation_id = ? AND member = ?"
            ))
            .await?,
            insert_user_group: p(format!(
                "INSERT INTO {ks}.user_groups (user_id, conversation_id, role, active, position) VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            select_user_groups: p(format!(
                "SELECT conversation_id, role, active, position FROM {ks}.user_groups WHERE user_id = ?"
            ))
            .await?,
            open_user_group_interval: p(format!(
                "INSERT INTO {ks}.user_group_intervals (user_id, conversation_id, since) VALUES (?, ?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            close_user_group_interval: p(format!(
                "INSERT INTO {ks}.user_group_intervals (user_id, conversation_id, since, until) VALUES (?, ?, ?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            select_user_group_intervals: p(format!(
                "SELECT since, until FROM {ks}.user_group_intervals WHERE user_id = ? AND conversation_id = ?"
            ))
            .await?,

            insert_role: p(format!("INSERT INTO {ks}.user_roles (user_id, role) VALUES (?, ?)")).await?,
            delete_role: p(format!("DELETE FROM {ks}.user_roles WHERE user_id = ? AND role = ?")).await?,
            select_roles: p(format!("SELECT role FROM {ks}.user_roles WHERE user_id = ?")).await?,
            insert_revocation: p(format!("INSERT INTO {ks}.session_revocations (hour, at, user_id) VALUES (?, ?, ?)")).await?,
            select_revocations: p(format!("SELECT at, user_id FROM {ks}.session_revocations WHERE hour = ? AND at >= ?")).await?,
            // Write time = updated_at: the latest update wins, in any order.
            insert_profile: p(format!(
                "INSERT INTO {ks}.profiles (user_id, display_name, avatar_media_id, updated_at) VALUES (?, ?, ?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            select_profile: p(format!(
                "SELECT display_name, avatar_media_id, updated_at FROM {ks}.profiles WHERE user_id = ?"
            ))
            .await?,
            // Write time = the partition's offset: the row counting further wins, in any order.
            insert_message_count: p(format!(
                "INSERT INTO {ks}.analytics_message_counts (day, kind, scope, part, messages, applied_offset) VALUES (?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            select_message_count: p(format!(
                "SELECT messages, applied_offset FROM {ks}.analytics_message_counts WHERE day = ? AND kind = ? AND scope = ? AND part = ?"
            ))
            .await?,
            select_message_counts_of_day: p(format!("SELECT kind, scope, messages FROM {ks}.analytics_message_counts WHERE day = ?")).await?,
            insert_active_user: p(format!("INSERT INTO {ks}.analytics_active_users (day, user_id) VALUES (?, ?)")).await?,
            count_active_users: p(format!("SELECT COUNT(*) FROM {ks}.analytics_active_users WHERE day = ?")).await?,
            insert_profile_view: p(format!(
                "INSERT INTO {ks}.analytics_profile_views (viewed, day, viewer, view_id) VALUES (?, ?, ?, ?)"
            ))
            .await?,
            count_profile_views_by_viewer: p(format!(
                "SELECT viewer, COUNT(*) FROM {ks}.analytics_profile_views WHERE viewed = ? AND day = ? GROUP BY viewer"
            ))
            .await?,
            insert_topic: p(format!("INSERT INTO {ks}.analytics_topics (day, topic, message_id, sender) VALUES (?, ?, ?, ?) USING TIMESTAMP 1")).await?,
            delete_topic: p(format!("DELETE FROM {ks}.analytics_topics WHERE day = ? AND topic = ? AND message_id = ?")).await?,
            update_message_edited: p(format!(
                "UPDATE {ks}.messages USING TIMESTAMP ? SET body = ?, edited_at = ? WHERE conversation_id = ? AND bucket = ? AND message_id = ?"
            ))
            .await?,
            update_message_deleted: p(format!(
                "UPDATE {ks}.messages USING TIMESTAMP {DELETED_TS} SET body = '', media = null, edited_at = null, deleted = true, reply_to = null, mentions = null WHERE conversation_id = ? AND bucket = ? AND message_id = ?"
            ))
            .await?,
            insert_stream_message: p(format!("INSERT INTO {ks}.stream_messages (user_id, message_id, seq, mark) VALUES (?, ?, ?, ?)")).await?,
            select_stream_messages: p(format!("SELECT seq, mark FROM {ks}.stream_messages WHERE user_id = ? AND message_id = ?")).await?,
            insert_version: p(format!("INSERT INTO {ks}.message_edits (message_id, at, body) VALUES (?, ?, ?) USING TIMESTAMP 1")).await?,
            delete_versions: p(format!("DELETE FROM {ks}.message_edits USING TIMESTAMP {DELETED_TS} WHERE message_id = ?")).await?,
            select_versions: p(format!("SELECT at, body FROM {ks}.message_edits WHERE message_id = ?")).await?,
            insert_hidden: p(format!("INSERT INTO {ks}.hidden_messages (user_id, conversation_id, message_id) VALUES (?, ?, ?)")).await?,
            select_hidden: p(format!(
                "SELECT message_id FROM {ks}.hidden_messages WHERE user_id = ? AND conversation_id = ? AND message_id >= ? AND message_id <= ?"
            ))
            .await?,
            insert_reaction: p(format!(
                "INSERT INTO {ks}.reactions (conversation_id, bucket, message_id, user_id, emoji, seq) VALUES (?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            select_reactions: p(format!(
                "SELECT message_id, user_id, emoji FROM {ks}.reactions WHERE conversation_id = ? AND bucket = ? AND message_id >= ? AND message_id <= ? LIMIT ?"
            ))
            .await?,
            // Write time = updated_at: the latest settings win, in any order.
            insert_privacy: p(format!(
                "INSERT INTO {ks}.privacy_settings (user_id, last_seen, photo, read_receipts, updated_at) VALUES (?, ?, ?, ?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            select_privacy: p(format!("SELECT last_seen, photo, read_receipts, updated_at FROM {ks}.privacy_settings WHERE user_id = ?")).await?,
            // Write time = the change's time: the latest block or unblock wins, in any order.
            insert_block: p(format!("INSERT INTO {ks}.blocks (user_id, target, blocked, at) VALUES (?, ?, ?, ?) USING TIMESTAMP ?")).await?,
            select_block: p(format!("SELECT target, blocked, at FROM {ks}.blocks WHERE user_id = ? AND target = ?")).await?,
            select_blocks: p(format!("SELECT target, blocked, at FROM {ks}.blocks WHERE user_id = ?")).await?,
            count_topics: p(format!("SELECT topic, sender FROM {ks}.analytics_topics WHERE day = ?")).await?,
            insert_receipt_by_user: p(format!(
                "INSERT INTO {ks}.receipts_by_user (recipient, message_id, status, device_id, at, sender, conversation_id) VALUES (?, ?, ?, ?, ?, ?, ?) USING TIMESTAMP ?"
            ))
            .await?,
            select_receipts_by_user_upto: p(format!(
                "SELECT message_id, status, device_id, at, sender, conversation_id FROM {ks}.receipts_by_user WHERE recipient = ? AND message_id <= ?"
            ))
            .await?,
        })
    }

    /// Drops every keyspace whose name starts with `prefix` (test clean-up, and the side-by-side
    /// keyspaces `chat rebuild` leaves behind). Returns the names dropped.
    pub async fn drop_keyspaces(nodes: &[String], prefix: &str) -> StoreResult<Vec<String>> {
        if prefix.len() < 3 || prefix.starts_with("system") {
            return Err(StoreError::Data(format!("refusing to drop keyspaces by prefix {prefix:?}")));
        }
        let session = SessionBuilder::new().known_nodes(nodes).build().await.map_err(unavailable)?;
        let rows = session
            .query_unpaged("SELECT keyspace_name FROM system_schema.keyspaces", ())
            .await
            .map_err(unavailable)?
            .into_rows_result()
            .map_err(data)?;
        let names: Vec<String> = rows
            .rows::<(String,)>()
            .map_err(data)?
            .filter_map(Result::ok)
            .map(|(n,)| n)
            .filter(|n| n.starts_with(prefix))
            .collect();
        for n in &names {
            session.query_unpaged(format!("DROP KEYSPACE IF EXISTS {n}"), ()).await.map_err(unavailable)?;
        }
        Ok(names)
    }

    /// Drops this store's own keyspace (a rebuilt copy that was only compared).
    pub async fn drop_own_keyspace(&self) -> StoreResult<()> {
        self.session.query_unpaged(format!("DROP KEYSPACE IF EXISTS {}", self.keyspace), ()).await.map_err(unavailable)?;
        Ok(())
    }

    /// The keyspace this store writes to.
    pub fn keyspace(&self) -> &str {
        &self.keyspace
    }

    /// The one column of an unprepared query's rows (schema and metadata reads).
    async fn query_column<T>(&self, query: String) -> StoreResult<Vec<T>>
    where
        T: for<'f, 'm> scylla::deserialize::value::DeserializeValue<'f, 'm>,
    {
        let rows = self.session.query_unpaged(query, ()).await.map_err(unavailable)?.into_rows_result().map_err(data)?;
        let out: Vec<T> = rows.rows::<(T,)>().map_err(data)?.filter_map(Result::ok).map(|(v,)| v).collect();
        Ok(out)
    }

    /// Records that the projection tables are in this version's layout.
    async fn set_layout(session: &Session, ks: &str) -> StoreResult<()> {
        session
            .query_unpaged(format!("INSERT INTO {ks}.layout (name, version) VALUES ('projections', ?)"), (PROJECTION_LAYOUT as i32,))
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Sends reserved by versions before the delivery pipeline v2 (`send_dedup`) become accepted
    /// sends of the fan-out (`sends`, position -1: any later append of the key is a duplicate),
    /// so that a retry spanning the upgrade still gets the first attempt's id; then the old gates
    /// (`send_dedup`, `message_owners`) are dropped. Safe to repeat. Run by `chat migrate`, with
    /// every node of the old version stopped (they still write those gates).
    async fn migrate_send_gates(&self) -> StoreResult<()> {
        let ks = &self.keyspace;
        let tables: Vec<String> = self.query_column(format!("SELECT table_name FROM system_schema.tables WHERE keyspace_name = '{ks}'")).await?;
        if tables.iter().any(|t| t == "send_dedup") {
            let select = self
                .session
                .prepare(format!("SELECT sender, client_msg_id, message_id, conversation_id, sent_at, body_sha256 FROM {ks}.send_dedup"))
                .await
                .map_err(unavailable)?;
            let mut rows = self
                .session
                .execute_iter(select, ())
                .await
                .map_err(unavailable)?
                .rows_stream::<(Uuid, String, Uuid, String, DateTime<Utc>, String)>()
                .map_err(data)?;
            let mut moved = 0u64;
            while let Some((sender, cmid, message, conv_id, sent_at, sha)) = rows.try_next().await.map_err(unavailable)? {
                let record = SendRecord {
                    conversation_id: conv(conv_id)?,
                    sender: UserId(sender),
                    client_msg_id: cmid,
                    message_id: MessageId(message),
                    sent_at,
                    content_sha256: sha,
                    position: -1,
                };
                self.put_send_records(&[record]).await?;
                moved += 1;
            }
            info!(keyspace = %ks, sends = moved, "send reservations moved to sends");
            self.session.query_unpaged(format!("DROP TABLE IF EXISTS {ks}.send_dedup"), ()).await.map_err(unavailable)?;
        }
        if tables.iter().any(|t| t == "message_owners") {
            self.session.query_unpaged(format!("DROP TABLE IF EXISTS {ks}.message_owners"), ()).await.map_err(unavailable)?;
        }
        Ok(())
    }

    /// The replication factor used when creating the keyspace.
    pub fn replication_factor(&self) -> u32 {
        self.replication_factor
    }

    async fn rows<T>(&self, stmt: &PreparedStatement, values: impl scylla::serialize::row::SerializeRow + Send) -> StoreResult<Vec<T>>
    where
        T: for<'f, 'm> scylla::deserialize::row::DeserializeRow<'f, 'm>,
    {
        let res = self.session.execute_unpaged(stmt, values).await.map_err(unavailable)?;
        let rows = res.into_rows_result().map_err(data)?;
        let out: Result<Vec<T>, _> = rows.rows::<T>().map_err(data)?.collect();
        out.map_err(data)
    }

    async fn exec(&self, stmt: &PreparedStatement, values: impl scylla::serialize::row::SerializeRow + Send) -> StoreResult<()> {
        self.session.execute_unpaged(stmt, values).await.map_err(unavailable)?;
        Ok(())
    }

    /// Every row of a query, page by page (for partitions that may be large).
    async fn all_rows<T>(&self, stmt: &PreparedStatement, values: impl scylla::serialize::row::SerializeRow) -> StoreResult<Vec<T>>
    where
        T: for<'f, 'm> scylla::deserialize::row::DeserializeRow<'f, 'm> + 'static,
    {
        let mut st = self
            .session
            .execute_iter(stmt.clone(), values)
            .await
            .map_err(unavailable)?
            .rows_stream::<T>()
            .map_err(data)?;
        let mut out = Vec::new();
        while let Some(t) = st.try_next().await.map_err(unavailable)? {
            out.push(t);
        }
        Ok(out)
    }

    async fn buckets(&self, stmt: &PreparedStatement, values: impl scylla::serialize::row::SerializeRow + Send) -> StoreResult<Vec<i32>> {
        Ok(self.rows::<(i32,)>(stmt, values).await?.into_iter().map(|(b,)| b).collect())
    }
}

#[async_trait]
impl CommandStore for ScyllaStore {
    async fn create_account(&self, a: &Account) -> StoreResult<bool> {
        let res = self
            .session
            .execute_unpaged(
                &self.stmts.insert_account_lwt,
                (&a.username, a.user_id.0, &a.password_hash, a.created_at),
            )
            .await
            .map_err(unavailable)?;
        let rows = res.into_rows_result().map_err(data)?;
        let row: Row = rows.first_row().map_err(data)?;
        let applied = row.columns.first().and_then(|c| c.as_ref()).and_then(|v| v.as_boolean()).unwrap_or(false);
        if applied {
            self.exec(&self.stmts.insert_account_by_id, (a.user_id.0, &a.username, a.created_at)).await?;
        }
        Ok(applied)
    }

    async fn remove_account(&self, a: &Account) -> StoreResult<()> {
        self.exec(&self.stmts.delete_account_by_id, (a.user_id.0,)).await?;
        self.exec(&self.stmts.delete_account_by_name, (&a.username, a.user_id.0)).await
    }

    async fn account_by_name(&self, username: &str) -> StoreResult<Option<Account>> {
        let rows = self
            .rows::<(Uuid, String, String, DateTime<Utc>)>(&self.stmts.select_account_by_name, (username,))
            .await?;
        Ok(rows.into_iter().next().map(|(id, username, password_hash, created_at)| Account {
            user_id: UserId(id),
            username,
            password_hash,
            created_at,
        }))
    }

    async fn account_by_id(&self, user: UserId) -> StoreResult<Option<String>> {
        let rows = self.rows::<(String,)>(&self.stmts.select_account_by_id, (user.0,)).await?;
        Ok(rows.into_iter().next().map(|(n,)| n))
    }






    async fn put_media(&self, m: &MediaObject) -> StoreResult<()> {
        self.exec(
            &self.stmts.insert_media,
            (m.media_id, m.uploader.0, &m.kind, &m.content_type, m.size, &m.sha256, m.created_at, m.public),
        )
        .await
    }

    async fn media(&self, id: Uuid) -> StoreResult<Option<MediaObject>> {
        type Row = (Uuid, String, String, i64, String, DateTime<Utc>, Option<bool>);
        let rows = self.rows::<Row>(&self.stmts.select_media, (id,)).await?;
        Ok(rows.into_iter().next().map(|(uploader, kind, content_type, size, sha256, created_at, public)| MediaObject {
            media_id: id,
            uploader: UserId(uploader),
            kind,
            content_type,
            size,
            sha256,
            created_at,
            public: public.unwrap_or(false),
        }))
    }

    async fn set_media_public(&self, id: Uuid) -> StoreResult<()> {
        self.exec(&self.stmts.publish_media, (id,)).await
    }

    async fn share_media(&self, id: Uuid, c: &ConversationId) -> StoreResult<()> {
        self.exec(&self.stmts.insert_media_share, (id, c.as_str())).await
    }

    async fn media_shares(&self, id: Uuid) -> StoreResult<Vec<ConversationId>> {
        self.rows::<(String,)>(&self.stmts.select_media_shares, (id,)).await?.into_iter().map(|(c,)| conv(c)).collect()
    }
}

/// Statements of one apply running at once, at most.
const APPLY_IN_FLIGHT: usize = 128;

/// Bytes of item text in one stream batch, at most (Cassandra refuses batches over
/// `batch_size_fail_threshold`, 50 KiB by default); a larger item goes alone, as a plain insert.
const STREAM_BATCH_BYTES: usize = 40 * 1024;

/// Rows in one stream batch, at most.
const STREAM_BATCH_ROWS: usize = 100;

/// Consecutive runs of rows for one batch each (see [`STREAM_BATCH_BYTES`]).
fn stream_chunks(rows: &[StreamRow]) -> Vec<&[StreamRow]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, r) in rows.iter().enumerate() {
        let full = i > start && (bytes + r.item.len() > STREAM_BATCH_BYTES || i - start >= STREAM_BATCH_ROWS);
        if full {
            out.push(&rows[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += r.item.len();
    }
    if start < rows.len() {
        out.push(&rows[start..]);
    }
    out
}

impl ScyllaStore {
    /// One projection write: its statements (in order where one marks the other as done).
    async fn apply_write(&self, w: &Write) -> StoreResult<()> {
        let st = &self.stmts;
        match w {
            Write::User { user, username, at } => self.exec(&st.insert_user, (user.0, username, *at)).await,
            Write::Message(m) => {
                let bucket = bucket_of(m.message_id);
                let row = (
                    m.conversation_id.as_str(),
                    bucket,
                    m.message_id.0,
                    m.sender.0,
                    &m.sender_device,
                    &m.client_msg_id,
                    &m.kind,
                    &m.body,
                    m.sent_at,
                    m.position,
                    m.media.as_ref().map(|a| serde_json::to_string(a).unwrap_or_default()),
                    m.reply_to.map(|r| r.0),
                    (!m.mentions.is_empty()).then(|| m.mentions.iter().map(|u| u.0).collect::<Vec<Uuid>>()),
                    m.withheld,
                );
                // Different partitions: separate statements (a multi-partition batch gains nothing).
                let (a, b) = futures::join!(
                    self.exec(&st.insert_message, row),
                    self.exec(&st.insert_message_index, (m.message_id.0, m.conversation_id.as_str(), m.sender.0, m.sent_at, m.position))
                );
                a.and(b)
            }
            Write::Bucket { conversation, bucket } => self.exec(&st.insert_bucket, (conversation.as_str(), *bucket)).await,
            Write::Inbox(r) => {
                self.exec(
                    &st.insert_inbox_row,
                    (
                        r.user_id.0,
                        r.conversation_id.as_str(),
                        r.peer_id.map(|p| p.0),
                        r.last_message_id.0,
                        r.last_sender.0,
                        &r.last_kind,
                        &r.last_body,
                        r.last_at,
                        r.unread,
                        r.first_unread_seq,
                        r.read_up_to.map(|m| m.0),
                        r.applied_offset,
                        r.wrote,
                        r.mentions,
                    ),
                )
                .await
            }
            Write::Stream { user, row } => self.exec(&st.insert_stream, (user.0, row.seq, row.item_id, &row.item)).await,
            Write::StreamHead { user, source_partition, position } => {
                self.exec(&st.insert_stream_head, (user.0, *source_partition, *position, *position)).await
            }
            Write::Receipt(r) => {
                // By message (every row, in time order: the reader keeps the first per
                // recipient, status and device) and by recipient (the audit of one user: the
                // earliest transition wins by write time).
                let ts = RECEIPT_TS_BASE - micros(&r.at);
                let by_user = async {
                    if !r.in_user_audit() {
                        return Ok(());
                    }
                    self.exec(
                        &st.insert_receipt_by_user,
                        (r.recipient.0, r.message_id.0, r.status.as_str(), &r.device_id, r.at, r.sender.0, r.conversation_id.as_str(), ts),
                    )
                    .await
                };
                let (a, b) = futures::join!(
                    self.exec(&st.insert_receipt, (r.message_id.0, r.at, r.recipient.0, r.status.as_str(), &r.device_id, r.sender.0, r.conversation_id.as_str())),
                    by_user
                );
                a.and(b)
            }
            Write::Presence { user, online: true, at } => self.exec(&st.insert_presence_online, (user.0, *at, micros(at))).await,
            Write::Presence { user, online: false, at } => self.exec(&st.insert_presence_offline, (user.0, *at, *at, micros(at))).await,
            Write::Group(g) => self.exec(&st.insert_group, (g.conversation_id.as_str(), &g.name, g.creator.0, g.created_at, g.position, g.position)).await,
            Write::GroupName { conversation, name, position } => self.exec(&st.update_group_name, (*position, name, conversation.as_str())).await,
            Write::GroupMember(m) => {
                self.exec(&st.insert_group_member, (m.conversation_id.as_str(), m.member.0, m.role.as_str(), m.active, m.position, m.position)).await
            }
            Write::UserGroup(g) => {
                self.exec(&st.insert_user_group, (g.user_id.0, g.conversation_id.as_str(), g.role.as_str(), g.active, g.position, g.position)).await
            }
            Write::UserGroupInterval { user, conversation, since, until } => {
                let ts = interval_ts(*since, *until);
                match until {
                    None => self.exec(&st.open_user_group_interval, (user.0, conversation.as_str(), *since, ts)).await,
                    Some(u) => self.exec(&st.close_user_group_interval, (user.0, conversation.as_str(), *since, *u, ts)).await,
                }
            }
            Write::Profile(p) => {
                self.exec(&st.insert_profile, (p.user_id.0, &p.display_name, p.avatar_media_id, p.updated_at, micros(&p.updated_at))).await
            }
            Write::MessageCount { key, messages, applied_offset } => {
                self.exec(&st.insert_message_count, (key.day, &key.kind, &key.scope, key.partition, *messages, *applied_offset, *applied_offset)).await
            }
            Write::ActiveUser { day, user } => self.exec(&st.insert_active_user, (*day, user.0)).await,
            Write::ProfileView { viewed, day, viewer, view } => self.exec(&st.insert_profile_view, (viewed.0, *day, viewer.0, view.0)).await,
            Write::Topic { day, topic, message, sender } => self.exec(&st.insert_topic, (*day, topic, message.0, sender.0)).await,
            Write::TopicRemoved { day, topic, message } => self.exec(&st.delete_topic, (*day, topic, message.0)).await,
            // Write time = the edit's time: the latest edit wins in any order; below a delete's.
            Write::MessageEdited { conversation, message, body, at } => {
                self.exec(&st.update_message_edited, (micros(at).clamp(2, DELETED_TS - 1), body, *at, conversation.as_str(), bucket_of(*message), message.0)).await
            }
            Write::MessageDeleted { conversation, message } => {
                let (a, b) = futures::join!(
                    self.exec(&st.update_message_deleted, (conversation.as_str(), bucket_of(*message), message.0)),
                    self.exec(&st.delete_versions, (message.0,))
                );
                a.and(b)
            }
            Write::MessageVersion { message, at, body } => self.exec(&st.insert_version, (message.0, *at, body)).await,
            Write::StreamMessage { user, message, seq, mark } => self.exec(&st.insert_stream_message, (user.0, message.0, *seq, mark.code())).await,
            Write::HiddenMessage { user, conversation, message } => self.exec(&st.insert_hidden, (user.0, conversation.as_str(), message.0)).await,
            // The reactor's stream position is the write time: the latest reaction wins.
            Write::Reaction { conversation, message, user, emoji, seq } => {
                let row = (conversation.as_str(), bucket_of(*message), message.0, user.0, emoji.as_deref(), *seq, *seq);
                self.exec(&st.insert_reaction, row).await
            }
            Write::Privacy(p) => {
                let row = (p.user_id.0, p.last_seen.as_str(), p.photo.as_str(), p.read_receipts.as_str(), p.updated_at, micros(&p.updated_at));
                self.exec(&st.insert_privacy, row).await
            }
            Write::Block(b) => self.exec(&st.insert_block, (b.user_id.0, b.target.0, b.blocked, b.at, micros(&b.at))).await,
            Write::MediaMessage { media, conversation, message, position } => {
                self.exec(&st.insert_media_message, (*media, conversation.as_str(), message.0, *position)).await
            }
        }
    }

    /// Writes stream rows so that a reader never sees a user's row before an earlier one of the
    /// same user: `sync` returns rows after a cursor, and a row visible above a missing one would
    /// move the client's cursor past it for good. Each user's rows, in seq order, go in
    /// single-partition unlogged batches (atomic and isolated in Cassandra), one after the other;
    /// the first failure stops that user's chain (the slice is applied again). Users run
    /// concurrently. A user's `stream_messages` rows (the same partition key) go first, in
    /// batches of their own: one round trip per user and slice, not one per message (they are read
    /// only by a later slice's edit or delete).
    async fn apply_streams(&self, writes: Vec<Write>) -> StoreResult<()> {
        type Marks = Vec<(Uuid, Uuid, i64, i32)>;
        let mut by_user: BTreeMap<Uuid, (Vec<StreamRow>, Marks)> = BTreeMap::new();
        for w in writes {
            match w {
                Write::Stream { user, row } => by_user.entry(user.0).or_default().0.push(row),
                Write::StreamMessage { user, message, seq, mark } => by_user.entry(user.0).or_default().1.push((user.0, message.0, seq, mark.code())),
                _ => {}
            }
        }
        let chains = by_user.into_iter().map(|(user, (mut rows, marks))| async move {
            rows.sort_by_key(|r| r.seq);
            for chunk in marks.chunks(STREAM_BATCH_ROWS) {
                if let [one] = chunk {
                    self.exec(&self.stmts.insert_stream_message, *one).await?;
                    continue;
                }
                let mut batch = scylla::statement::batch::Batch::new(scylla::statement::batch::BatchType::Unlogged);
                for _ in chunk {
                    batch.append_statement(self.stmts.insert_stream_message.clone());
                }
                self.session.batch(&batch, chunk.to_vec()).await.map_err(unavailable)?;
            }
            for chunk in stream_chunks(&rows) {
                if let [row] = chunk {
                    self.exec(&self.stmts.insert_stream, (user, row.seq, row.item_id, &row.item)).await?;
                    continue;
                }
                let mut batch = scylla::statement::batch::Batch::new(scylla::statement::batch::BatchType::Unlogged);
                let values: Vec<_> = chunk.iter().map(|r| (user, r.seq, r.item_id, r.item.as_str())).collect();
                for _ in chunk {
                    batch.append_statement(self.stmts.insert_stream.clone());
                }
                self.session.batch(&batch, values).await.map_err(unavailable)?;
            }
            Ok::<(), StoreError>(())
        });
        let mut results = futures::stream::iter(chains).buffer_unordered(APPLY_IN_FLIGHT);
        let mut first = Ok(());
        while let Some(r) = results.next().await {
            if first.is_ok() {
                first = r;
            }
        }
        first
    }

    /// Runs writes concurrently (at most [`APPLY_IN_FLIGHT`] at once); the first error, if any.
    async fn apply_all(&self, writes: &[Write]) -> StoreResult<()> {
        let futs: Vec<_> = writes.iter().map(|w| Box::pin(self.apply_write(w))).collect();
        let mut results = futures::stream::iter(futs).buffer_unordered(APPLY_IN_FLIGHT);
        let mut first = Ok(());
        while let Some(r) = results.next().await {
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

#[async_trait]
impl WriteStore for ScyllaStore {
    async fn apply(&self, writes: Vec<Write>) -> StoreResult<()> {
        crate::writes::validate(&writes)?;
        // Every rule is order-independent (write times, sets, one version per replaced row), so
        // the statements run concurrently; only the guards wait for everything else, so that a
        // guard never marks as done what a failure left unwritten.
        // Stream rows come after what they caused and before the guards, and each user's in
        // cursor order (see [`ScyllaStore::apply_streams`]).
        let (guards, rest): (Vec<Write>, Vec<Write>) = writes.into_iter().partition(Write::is_guard);
        let (streams, rest): (Vec<Write>, Vec<Write>) = rest.into_iter().partition(|w| matches!(w, Write::Stream { .. } | Write::StreamMessage { .. }));
        // A group's row after its member rows: a reader that sees the group sees every member
        // its creation made (the gateway's membership check relies on it).
        let (groups, rest): (Vec<Write>, Vec<Write>) = rest.into_iter().partition(|w| matches!(w, Write::Group(_)));
        self.apply_all(&rest).await?;
        self.apply_all(&groups).await?;
        self.apply_streams(streams).await?;
        self.apply_all(&guards).await
    }
}

#[async_trait]
impl ProjectionStore for ScyllaStore {


    async fn inbox_row(&self, user: UserId, c: &ConversationId) -> StoreResult<Option<InboxRow>> {
        let rows = self.rows::<InboxTuple>(&self.stmts.select_inbox_row, (user.0, c.as_str())).await?;
        rows.into_iter().next().map(inbox_from).transpose()
    }

    async fn stream_head(&self, user: UserId, source_partition: i32) -> StoreResult<Option<i64>> {
        let rows = self.rows::<(i64,)>(&self.stmts.select_stream_head, (user.0, source_partition)).await?;
        Ok(rows.into_iter().next().map(|(p,)| p))
    }

    async fn stream_messages(&self, user: UserId, message: MessageId) -> StoreResult<Vec<(i64, StreamMark)>> {
        let rows = self.rows::<(i64, Option<i32>)>(&self.stmts.select_stream_messages, (user.0, message.0)).await?;
        Ok(rows.into_iter().map(|(seq, m)| (seq, StreamMark::from_code(i64::from(m.unwrap_or(0))))).collect())
    }

    async fn message_count_row(&self, key: &MessageCountKey) -> StoreResult<Option<(i64, i64)>> {
        let rows = self.rows::<(i64, i64)>(&self.stmts.select_message_count, (key.day, key.kind.as_str(), key.scope.as_str(), key.partition)).await?;
        Ok(rows.into_iter().next())
    }




}

#[async_trait]
impl ReadStore for ScyllaStore {
    async fn history_page(
        &self,
        c: &ConversationId,
        before: Option<MessageId>,
        limit: usize,
    ) -> StoreResult<Vec<MessageRow>> {
        // CQL rejects `LIMIT 0`; an empty page is the answer.
        if limit == 0 {
            return Ok(Vec::new());
        }
        let top = before.map(bucket_of).unwrap_or(i32::MAX);
        let buckets = self.buckets(&self.stmts.select_buckets_desc, (c.as_str(), top)).await?;
        let mut out = Vec::new();
        for b in buckets {
            let want = (limit - out.len()) as i32;
            let rows = match before {
                Some(m) => {
                    self.rows::<MessageTuple>(&self.stmts.select_messages_before, (c.as_str(), b, m.0, want))
                        .await?
                }
                None => self.rows::<MessageTuple>(&self.stmts.select_messages_all_desc, (c.as_str(), b, want)).await?,
            };
            for t in rows {
                out.push(message_from(t)?);
            }
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    async fn inbox(&self, user: UserId, limit: usize) -> StoreResult<Vec<InboxRow>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let rows = self
            .rows::<InboxTuple>(&self.stmts.select_inbox, (user.0, limit.min(i32::MAX as usize) as i32))
            .await?;
        rows.into_iter().map(inbox_from).collect()
    }

    async fn find_message(&self, id: MessageId) -> StoreResult<Option<MessageMeta>> {
        let rows = self
            .rows::<(String, Uuid, DateTime<Utc>, Option<i64>)>(&self.stmts.select_message_index, (id.0,))
            .await?;
        match rows.into_iter().next() {
            None => Ok(None),
            Some((c, s, at, p)) => Ok(Some(MessageMeta {
                message_id: id,
                conversation_id: conv(c)?,
                sender: UserId(s),
                sent_at: at,
                position: p.unwrap_or(0),
            })),
        }
    }

    async fn receipts(&self, message: MessageId) -> StoreResult<Vec<ReceiptRow>> {
        let rows = self
            .all_rows::<(Uuid, Uuid, Uuid, String, String, DateTime<Utc>, String)>(&self.stmts.select_receipts, (message.0,))
            .await?;
        let rows = rows
            .into_iter()
            .map(|(m, sender, r, s, device_id, at, c)| {
                Ok(ReceiptRow { message_id: MessageId(m), sender: UserId(sender), recipient: UserId(r), status: status(s)?, device_id, at, conversation_id: conv(c)? })
            })
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(first_transitions(rows))
    }

    async fn stream_after(&self, user: UserId, after: i64, limit: usize) -> StoreResult<Vec<StreamRow>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let rows = self
            .rows::<(i64, Uuid, String)>(&self.stmts.select_stream_after, (user.0, after, limit.min(10_000) as i32))
            .await?;
        Ok(rows.into_iter().map(|(seq, item_id, item)| StreamRow { seq, item_id, item }).collect())
    }

    async fn unread_count(&self, user: UserId, cap: usize) -> StoreResult<usize> {
        if cap == 0 {
            return Ok(0);
        }
        let rows = self.rows::<(Option<i32>,)>(&self.stmts.select_unread, (user.0, crate::UNREAD_SCAN_CONVERSATIONS as i32)).await?;
        let sum: i64 = rows.into_iter().map(|(n,)| i64::from(n.unwrap_or(0).max(0))).sum();
        Ok((sum as usize).min(cap))
    }

    async fn last_seen(&self, user: UserId) -> StoreResult<Option<LastSeenRow>> {
        let rows = self
            .rows::<(Option<String>, Option<DateTime<Utc>>, Option<DateTime<Utc>>)>(&self.stmts.select_last_seen, (user.0,))
            .await?;
        Ok(rows.into_iter().next().and_then(|(status, changed_at, last_seen)| {
            Some(LastSeenRow { user_id: user, status: status?, changed_at: changed_at?, last_seen })
        }))
    }

    async fn in_inbox(&self, user: UserId, c: &ConversationId) -> StoreResult<bool> {
        Ok(ProjectionStore::inbox_row(self, user, c).await?.is_some())
    }

    async fn media_positions(&self, media: Uuid, conv: &ConversationId) -> StoreResult<Vec<i64>> {
        let mut out: Vec<i64> =
            self.rows::<(i64,)>(&self.stmts.select_media_positions, (media, conv.as_str())).await?.into_iter().map(|(p,)| p).collect();
        out.sort_unstable();
        Ok(out)
    }

    async fn message_versions(&self, message: MessageId) -> StoreResult<Vec<(DateTime<Utc>, String)>> {
        self.rows::<(DateTime<Utc>, String)>(&self.stmts.select_versions, (message.0,)).await
    }

    async fn hidden_messages(&self, user: UserId, conv: &ConversationId, from: MessageId, to: MessageId) -> StoreResult<Vec<MessageId>> {
        let rows = self.rows::<(Uuid,)>(&self.stmts.select_hidden, (user.0, conv.as_str(), from.0, to.0)).await?;
        Ok(rows.into_iter().map(|(m,)| MessageId(m)).collect())
    }

    async fn reactions(&self, conv: &ConversationId, messages: &[MessageId], limit: usize) -> StoreResult<Vec<Reaction>> {
        // One range query per day bucket the messages are in (a page spans one or two).
        let mut buckets: BTreeMap<i32, (MessageId, MessageId)> = BTreeMap::new();
        for &m in messages {
            let e = buckets.entry(bucket_of(m)).or_insert((m, m));
            (e.0, e.1) = (e.0.min(m), e.1.max(m));
        }
        let lim = limit.min(i32::MAX as usize) as i32;
        let reads = buckets
            .into_iter()
            .map(|(b, (from, to))| self.rows::<(Uuid, Uuid, Option<String>)>(&self.stmts.select_reactions, (conv.as_str(), b, from.0, to.0, lim)));
        let mut out = Vec::new();
        for rows in futures::future::try_join_all(reads).await? {
            out.extend(rows.into_iter().filter_map(|(m, u, e)| Some(Reaction { message_id: MessageId(m), user: UserId(u), emoji: e? })));
        }
        out.sort_by_key(|r| r.message_id);
        out.truncate(limit);
        Ok(out)
    }

    async fn privacy(&self, user: UserId) -> StoreResult<Option<PrivacyRow>> {
        type Row = (Option<String>, Option<String>, Option<String>, Option<DateTime<Utc>>);
        let Some((last_seen, photo, read_receipts, updated_at)) = self.rows::<Row>(&self.stmts.select_privacy, (user.0,)).await?.into_iter().next() else {
            return Ok(None);
        };
        let Some(updated_at) = updated_at else { return Ok(None) };
        Ok(Some(PrivacyRow { user_id: user, last_seen: audience(last_seen)?, photo: audience(photo)?, read_receipts: audience(read_receipts)?, updated_at }))
    }

    async fn block(&self, user: UserId, target: UserId) -> StoreResult<Option<BlockRow>> {
        let rows = self.rows::<(Uuid, Option<bool>, Option<DateTime<Utc>>)>(&self.stmts.select_block, (user.0, target.0)).await?;
        Ok(rows.into_iter().next().and_then(|(t, blocked, at)| Some(BlockRow { user_id: user, target: UserId(t), blocked: blocked.unwrap_or(false), at: at? })))
    }

    async fn blocks(&self, user: UserId, limit: usize) -> StoreResult<Vec<BlockRow>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // The user's whole partition (unblocked rows are read past), sorted here by id bytes as
        // the embedded stores do (Cassandra orders uuids of different versions by version first).
        let rows = self.all_rows::<(Uuid, Option<bool>, Option<DateTime<Utc>>)>(&self.stmts.select_blocks, (user.0,)).await?;
        let mut out: Vec<BlockRow> = rows
            .into_iter()
            .filter(|(_, blocked, _)| *blocked == Some(true))
            .filter_map(|(t, _, at)| Some(BlockRow { user_id: user, target: UserId(t), blocked: true, at: at? }))
            .collect();
        out.sort_by_key(|b| b.target);
        out.truncate(limit);
        Ok(out)
    }
}

type FanoutMessageTuple = (Uuid, Uuid, i64, i32);

fn fanout_message_from(c: &ConversationId, (message_id, sender, position, recipients): FanoutMessageTuple) -> FanoutMessage {
    FanoutMessage { conversation_id: c.clone(), message_id: MessageId(message_id), sender: UserId(sender), position, recipients }
}

#[async_trait]
impl FanoutStore for ScyllaStore {
    async fn send_record(&self, c: &ConversationId, sender: UserId, client_msg_id: &str) -> StoreResult<Option<SendRecord>> {
        let rows = self
            .rows::<(Uuid, DateTime<Utc>, String, i64)>(&self.stmts.select_send, (sender.0, client_msg_id, c.as_str()))
            .await?;
        Ok(rows.into_iter().next().map(|(m, sent_at, content_sha256, position)| SendRecord {
            conversation_id: c.clone(),
            sender,
            client_msg_id: client_msg_id.to_owned(),
            message_id: MessageId(m),
            sent_at,
            content_sha256,
            position,
        }))
    }

    async fn put_send_records(&self, records: &[SendRecord]) -> StoreResult<()> {
        let writes = records.iter().map(|r| {
            self.exec(
                &self.stmts.insert_send,
                (r.sender.0, &r.client_msg_id, r.conversation_id.as_str(), r.message_id.0, r.sent_at, &r.content_sha256, r.position, SEND_TS_BASE - r.position),
            )
        });
        for res in futures::future::join_all(writes).await {
            res?;
        }
        Ok(())
    }

    async fn fanout_group(&self, c: &ConversationId) -> StoreResult<Option<FanoutGroup>> {
        let rows = self.rows::<(String, i64, i64)>(&self.stmts.select_fanout_group, (c.as_str(),)).await?;
        Ok(rows.into_iter().next().map(|(name, created_at, membership_version)| FanoutGroup {
            conversation_id: c.clone(),
            name,
            created_at,
            membership_version,
        }))
    }

    async fn put_fanout_group(&self, g: &FanoutGroup) -> StoreResult<()> {
        self.exec(&self.stmts.insert_fanout_group, (g.conversation_id.as_str(), &g.name, g.created_at, g.membership_version)).await
    }

    async fn fanout_members(&self, c: &ConversationId) -> StoreResult<Vec<MemberInterval>> {
        let rows = self.all_rows::<(Uuid, i64, Option<i64>, String)>(&self.stmts.select_fanout_members, (c.as_str(),)).await?;
        let mut out = rows
            .into_iter()
            .map(|(member, since, until, r)| Ok(MemberInterval { member: UserId(member), since, until, role: role(r)? }))
            .collect::<StoreResult<Vec<_>>>()?;
        // Cassandra orders `uuid` clustering keys its own way (version first, then per version);
        // sort by bytes, as SQLite's text order does, so both back-ends answer alike.
        out.sort_by_key(|m| (m.member.0, m.since));
        Ok(out)
    }

    async fn put_fanout_member(&self, c: &ConversationId, m: &MemberInterval) -> StoreResult<()> {
        let ts = interval_ts(m.since, m.until);
        match m.until {
            None => self.exec(&self.stmts.open_fanout_member, (c.as_str(), m.member.0, m.since, m.role.as_str(), ts)).await,
            Some(until) => {
                self.exec(&self.stmts.close_fanout_member, (c.as_str(), m.member.0, m.since, until, m.role.as_str(), ts)).await
            }
        }
    }

    async fn fanout_message(&self, c: &ConversationId, message: MessageId) -> StoreResult<Option<FanoutMessage>> {
        let rows = self.rows::<FanoutMessageTuple>(&self.stmts.select_fanout_message, (c.as_str(), message.0)).await?;
        Ok(rows.into_iter().next().map(|t| fanout_message_from(c, t)))
    }

    async fn put_fanout_message(&self, m: &FanoutMessage) -> StoreResult<()> {
        self.exec(
            &self.stmts.insert_fanout_message,
            (m.conversation_id.as_str(), m.message_id.0, m.sender.0, m.position, m.recipients),
        )
        .await
    }

    async fn fanout_messages_between(
        &self,
        c: &ConversationId,
        after: Option<MessageId>,
        up_to: MessageId,
    ) -> StoreResult<Vec<FanoutMessage>> {
        // One partition per group, clustered by message id ascending: already oldest first.
        let rows = match after {
            Some(a) => {
                self.all_rows::<FanoutMessageTuple>(&self.stmts.select_fanout_messages_range, (c.as_str(), a.0, up_to.0)).await?
            }
            None => self.all_rows::<FanoutMessageTuple>(&self.stmts.select_fanout_messages_upto, (c.as_str(), up_to.0)).await?,
        };
        Ok(rows.into_iter().map(|t| fanout_message_from(c, t)).collect())
    }

    async fn add_fanout_ack(&self, message: MessageId, status: ReceiptStatus, member: UserId) -> StoreResult<()> {
        self.exec(&self.stmts.insert_fanout_ack, (message.0, status.as_str(), member.0)).await
    }

    async fn fanout_ack_count(&self, message: MessageId, status: ReceiptStatus) -> StoreResult<usize> {
        let rows = self.rows::<(i64,)>(&self.stmts.count_fanout_acks, (message.0, status.as_str())).await?;
        Ok(rows.into_iter().next().map_or(0, |(n,)| n.max(0) as usize))
    }

    async fn fanout_read_marker(&self, c: &ConversationId, reader: UserId) -> StoreResult<Option<(MessageId, i64)>> {
        let rows = self.rows::<(Uuid, i64)>(&self.stmts.select_fanout_read_marker, (c.as_str(), reader.0)).await?;
        Ok(rows.into_iter().next().map(|(up_to, position)| (MessageId(up_to), position)))
    }

    async fn put_fanout_read_marker(&self, c: &ConversationId, reader: UserId, up_to: MessageId, position: i64) -> StoreResult<()> {
        self.exec(&self.stmts.insert_fanout_read_marker, (c.as_str(), reader.0, up_to.0, position)).await
    }

    async fn fanout_watermark(&self, topic: &str, partition: i32) -> StoreResult<Option<i64>> {
        let rows = self.rows::<(i64,)>(&self.stmts.select_fanout_watermark, (topic, partition)).await?;
        Ok(rows.into_iter().next().map(|(n,)| n))
    }

    async fn put_fanout_watermark(&self, topic: &str, partition: i32, next: i64) -> StoreResult<()> {
        self.exec(&self.stmts.insert_fanout_watermark, (topic, partition, next)).await
    }
}

#[async_trait]
impl GroupStore for ScyllaStore {

    async fn group(&self, c: &ConversationId) -> StoreResult<Option<GroupRow>> {
        type Row = (Option<String>, Option<Uuid>, Option<DateTime<Utc>>, Option<i64>);
        let rows = self.rows::<Row>(&self.stmts.select_group, (c.as_str(),)).await?;
        Ok(rows.into_iter().next().and_then(|(name, creator, created_at, position)| {
            Some(GroupRow {
                conversation_id: c.clone(),
                name: name.unwrap_or_default(),
                creator: UserId(creator?),
                created_at: created_at?,
                position: position?,
            })
        }))
    }

    async fn group_members(&self, c: &ConversationId) -> StoreResult<Vec<GroupMemberRow>> {
        let rows = self.all_rows::<(Uuid, String, bool, i64)>(&self.stmts.select_group_members, (c.as_str(),)).await?;
        let mut out = rows
            .into_iter()
            .map(|(member, r, active, position)| {
                Ok(GroupMemberRow { conversation_id: c.clone(), member: UserId(member), role: role(r)?, active, position })
            })
            .collect::<StoreResult<Vec<_>>>()?;
        out.sort_by_key(|m| m.member.0);
        Ok(out)
    }

    async fn group_member(&self, c: &ConversationId, user: UserId) -> StoreResult<Option<GroupMemberRow>> {
        let rows = self.rows::<(Uuid, String, bool, i64)>(&self.stmts.select_group_member, (c.as_str(), user.0)).await?;
        rows.into_iter()
            .next()
            .map(|(member, r, active, position)| {
                Ok(GroupMemberRow { conversation_id: c.clone(), member: UserId(member), role: role(r)?, active, position })
            })
            .transpose()
    }

    async fn user_groups(&self, user: UserId) -> StoreResult<Vec<UserGroupRow>> {
        let rows = self.all_rows::<(String, String, bool, i64)>(&self.stmts.select_user_groups, (user.0,)).await?;
        rows.into_iter()
            .map(|(c, r, active, position)| Ok(UserGroupRow { user_id: user, conversation_id: conv(c)?, role: role(r)?, active, position }))
            .collect()
    }

    async fn user_group_intervals(&self, user: UserId, c: &ConversationId) -> StoreResult<Vec<(i64, Option<i64>)>> {
        self.all_rows::<(i64, Option<i64>)>(&self.stmts.select_user_group_intervals, (user.0, c.as_str())).await
    }
}

/// How many partition reads an analytics query runs at once: a year of message counts is 2,928
/// partitions (366 days x 4 kinds x 2 scopes), which one by one would be slow and all at once
/// would flood the coordinator.
const ANALYTICS_CONCURRENCY: usize = 16;

fn status(s: String) -> StoreResult<ReceiptStatus> {
    ReceiptStatus::parse(&s).ok_or_else(|| StoreError::Data(format!("bad receipt status {s:?}")))
}

impl ScyllaStore {
    /// The single `COUNT(*)` of an aggregate query.
    async fn count(&self, stmt: &PreparedStatement, values: impl scylla::serialize::row::SerializeRow + Send) -> StoreResult<u64> {
        let rows = self.rows::<(i64,)>(stmt, values).await?;
        Ok(rows.into_iter().next().map_or(0, |(n,)| n.max(0) as u64))
    }
}

/// The partition of a revocation: the hour it falls in.
fn revocation_hour(at: DateTime<Utc>) -> DateTime<Utc> {
    let h = at.timestamp().div_euclid(3600) * 3600;
    DateTime::from_timestamp(h, 0).unwrap_or(at)
}

#[async_trait]
impl InsightStore for ScyllaStore {
    async fn set_role(&self, user: UserId, role: &str, granted: bool) -> StoreResult<()> {
        if granted {
            self.exec(&self.stmts.insert_role, (user.0, role)).await
        } else {
            self.exec(&self.stmts.delete_role, (user.0, role)).await
        }
    }

    async fn roles(&self, user: UserId) -> StoreResult<Vec<String>> {
        // Clustered by role (text: by its UTF-8 bytes, as Rust and SQLite order strings).
        let rows = self.all_rows::<(String,)>(&self.stmts.select_roles, (user.0,)).await?;
        Ok(rows.into_iter().map(|(r,)| r).collect())
    }

    async fn revoke_sessions(&self, user: UserId, at: DateTime<Utc>) -> StoreResult<()> {
        self.exec(&self.stmts.insert_revocation, (revocation_hour(at), at, user.0)).await
    }

    async fn revocations_since(&self, since: DateTime<Utc>) -> StoreResult<Vec<(UserId, DateTime<Utc>)>> {
        let since = since.max(Utc::now() - crate::insights::REVOCATIONS_KEPT);
        let mut out = Vec::new();
        // One partition per hour, from since's to the current one (the next one too: a writer's
        // clock may be ahead of this node's).
        let mut hour = revocation_hour(since);
        let last = revocation_hour(Utc::now()) + chrono::Duration::hours(1);
        while hour <= last {
            let rows = self.all_rows::<(DateTime<Utc>, Uuid)>(&self.stmts.select_revocations, (hour, since)).await?;
            out.extend(rows.into_iter().map(|(at, u)| (UserId(u), at)));
            hour += chrono::Duration::hours(1);
        }
        out.sort_by_key(|(u, at)| (*at, *u));
        Ok(out)
    }

    async fn profile(&self, user: UserId) -> StoreResult<Option<ProfileRow>> {
        let rows = self
            .rows::<(Option<String>, Option<Uuid>, Option<DateTime<Utc>>)>(&self.stmts.select_profile, (user.0,))
            .await?;
        Ok(rows.into_iter().next().and_then(|(display_name, avatar_media_id, updated_at)| {
            Some(ProfileRow { user_id: user, display_name: display_name.unwrap_or_default(), avatar_media_id, updated_at: updated_at? })
        }))
    }

    async fn message_counts(&self, from: NaiveDate, to: NaiveDate) -> StoreResult<Vec<MessageCount>> {
        // One partition per day: a row per (kind, scope, deliveries partition), summed here.
        let days: Vec<Vec<(NaiveDate, String, String, i64)>> = futures::stream::iter(days(from, to))
            .map(|day| async move {
                let rows = self.rows::<(String, String, i64)>(&self.stmts.select_message_counts_of_day, (day,)).await?;
                Ok::<_, StoreError>(rows.into_iter().map(|(kind, scope, n)| (day, kind, scope, n)).collect())
            })
            .buffered(ANALYTICS_CONCURRENCY)
            .try_collect()
            .await?;
        let mut sums: BTreeMap<(NaiveDate, String, String), u64> = BTreeMap::new();
        for (day, kind, scope, n) in days.into_iter().flatten() {
            *sums.entry((day, kind, scope)).or_default() += u64::try_from(n).unwrap_or(0);
        }
        let mut rows: Vec<MessageCount> =
            sums.into_iter().filter(|(_, n)| *n > 0).map(|((day, kind, scope), messages)| MessageCount { day, kind, scope, messages }).collect();
        sort_message_counts(&mut rows);
        Ok(rows)
    }

    async fn active_users(&self, from: NaiveDate, to: NaiveDate) -> StoreResult<Vec<(NaiveDate, u64)>> {
        let counts: Vec<(NaiveDate, u64)> = futures::stream::iter(days(from, to))
            .map(|day| async move { Ok::<_, StoreError>((day, self.count(&self.stmts.count_active_users, (day,)).await?)) })
            .buffered(ANALYTICS_CONCURRENCY)
            .try_collect()
            .await?;
        Ok(counts.into_iter().filter(|(_, n)| *n > 0).collect())
    }

    async fn profile_views(&self, viewed: UserId, from: NaiveDate, to: NaiveDate) -> StoreResult<Vec<ProfileViews>> {
        let per_day: Vec<Vec<(NaiveDate, UserId, u64)>> = futures::stream::iter(days(from, to))
            .map(|day| async move {
                let rows = self.all_rows::<(Uuid, i64)>(&self.stmts.count_profile_views_by_viewer, (viewed.0, day)).await?;
                Ok::<_, StoreError>(rows.into_iter().map(|(viewer, n)| (day, UserId(viewer), n.max(0) as u64)).collect())
            })
            .buffered(ANALYTICS_CONCURRENCY)
            .try_collect()
            .await?;
        Ok(profile_views_from(per_day.into_iter().flatten()))
    }

    async fn topic_counts(&self, from: NaiveDate, to: NaiveDate) -> StoreResult<Vec<TopicCount>> {
        let per_day: Vec<Vec<TopicCount>> = futures::stream::iter(days(from, to))
            .map(|day| async move {
                // Messages and distinct senders per topic (CQL cannot count distinct values).
                let rows = self.all_rows::<(String, Option<Uuid>)>(&self.stmts.count_topics, (day,)).await?;
                let mut per_topic: BTreeMap<String, (u64, std::collections::BTreeSet<Uuid>)> = BTreeMap::new();
                for (topic, sender) in rows {
                    let e = per_topic.entry(topic).or_default();
                    e.0 += 1;
                    e.1.insert(sender.unwrap_or_default());
                }
                Ok::<_, StoreError>(
                    per_topic
                        .into_iter()
                        .map(|(topic, (messages, senders))| TopicCount { day, topic, messages, users: senders.len() as u64 })
                        .collect::<Vec<_>>(),
                )
            })
            .buffered(ANALYTICS_CONCURRENCY)
            .try_collect()
            .await?;
        let mut rows: Vec<TopicCount> = per_day.into_iter().flatten().collect();
        sort_topic_counts(&mut rows);
        Ok(rows)
    }

    async fn receipts_of_user(&self, user: UserId, from: DateTime<Utc>, to: DateTime<Utc>) -> StoreResult<Vec<ReceiptRow>> {
        // A receipt is never earlier than its message, so a receipt before `to` belongs to a
        // message minted at or before `to`: the clustering order bounds the scan; `at` is
        // filtered here.
        let upto = max_v7(to.timestamp_millis());
        let rows = self
            .all_rows::<(Uuid, String, String, DateTime<Utc>, Uuid, String)>(&self.stmts.select_receipts_by_user_upto, (user.0, upto))
            .await?;
        let mut out = Vec::new();
        for (m, s, device_id, at, sender, c) in rows {
            if at >= from && at < to {
                out.push(ReceiptRow { message_id: MessageId(m), sender: UserId(sender), recipient: user, status: status(s)?, device_id, at, conversation_id: conv(c)? });
            }
        }
        sort_receipts_of_user(&mut out);
        Ok(out)
    }
}

#[async_trait]
impl Durable for ScyllaStore {
    async fn sync(&self) -> StoreResult<()> {
        // Every write was answered by the replicas its consistency level needs: durable as
        // far as the cluster's commit-log settings make it; nothing to wait for.
        Ok(())
    }
}

#[async_trait]
impl TableAdmin for ScyllaStore {
    async fn migrate(&self) -> StoreResult<()> {
        Self::apply_schema(&self.session, &self.keyspace, self.replication_factor).await?;
        self.migrate_send_gates().await
    }

    async fn projection_layout(&self) -> StoreResult<u32> {
        let versions: Vec<i32> = self.query_column(format!("SELECT version FROM {}.layout WHERE name = 'projections'", self.keyspace)).await?;
        Ok(versions.first().map_or(1, |v| (*v).max(1) as u32))
    }

    async fn reset_projections(&self) -> StoreResult<()> {
        let ks = &self.keyspace;
        for table in PROJECTION_TABLES.iter().chain(RETIRED_PROJECTION_TABLES) {
            self.session.query_unpaged(format!("DROP TABLE IF EXISTS {ks}.{table}"), ()).await.map_err(unavailable)?;
        }
        self.session.await_schema_agreement().await.map_err(unavailable)?;
        Self::apply_schema(&self.session, ks, self.replication_factor).await?;
        Self::set_layout(&self.session, ks).await
    }

    async fn replace_projections(&self, place: &str) -> StoreResult<()> {
        Err(StoreError::Data(format!(
            "replacing the projection tables from {place} online needs the embedded store; in a cluster, compare with `chat rebuild` and reset the projections with `chat migrate` on a stopped set of workers"
        )))
    }

    async fn truncate_projections(&self) -> StoreResult<()> {
        for t in PROJECTION_TABLES {
            self.session
                .query_unpaged(format!("TRUNCATE {}.{}", self.keyspace, t), ())
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }

    async fn tables_containing(&self, needle: &str) -> StoreResult<BTreeMap<String, u64>> {
        let mut out = BTreeMap::new();
        for t in PROJECTION_TABLES {
            let n = self.rows_as_json(t).await?.iter().filter(|r| !needle.is_empty() && r.contains(needle)).count() as u64;
            if n > 0 {
                out.insert((*t).to_owned(), n);
            }
        }
        Ok(out)
    }

    async fn checksums(&self) -> StoreResult<BTreeMap<String, TableChecksum>> {
        let mut out = BTreeMap::new();
        for t in PROJECTION_TABLES {
            let mut rows = self.rows_as_json(t).await?;
            rows.sort_unstable();
            let mut h = Sha256::new();
            for r in &rows {
                h.update(r.as_bytes());
                h.update(b"\n");
            }
            out.insert((*t).to_owned(), TableChecksum { rows: rows.len() as u64, sha256: hex::encode(h.finalize()) });
        }
        Ok(out)
    }

    async fn ping(&self) -> bool {
        self.session.query_unpaged("SELECT release_version FROM system.local", ()).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seq: i64, len: usize) -> StreamRow {
        StreamRow { seq, item_id: Uuid::nil(), item: "x".repeat(len) }
    }

    #[test]
    fn stream_chunks_keep_order_and_stay_under_the_batch_limits() {
        let rows: Vec<StreamRow> = (0..250).map(|i| row(i, 600)).collect();
        let chunks = stream_chunks(&rows);
        let flat: Vec<i64> = chunks.iter().flat_map(|c| c.iter().map(|r| r.seq)).collect();
        assert_eq!(flat, (0..250).collect::<Vec<_>>(), "every row once, in order");
        assert!(chunks.iter().all(|c| c.len() <= STREAM_BATCH_ROWS && c.iter().map(|r| r.item.len()).sum::<usize>() <= STREAM_BATCH_BYTES));
        // An item over the limit goes alone; its neighbours are batched around it.
        let rows = vec![row(1, 10), row(2, STREAM_BATCH_BYTES + 1), row(3, 10), row(4, 10)];
        let lens: Vec<usize> = stream_chunks(&rows).iter().map(|c| c.len()).collect();
        assert_eq!(lens, vec![1, 1, 2]);
        assert!(stream_chunks(&[]).is_empty());
    }

    #[test]
    fn every_table_of_the_schema_is_read_with_its_columns() {
        let tables: Vec<(String, Vec<(String, String)>)> = SCHEMA.split("\n;").filter_map(table_columns).collect();
        let receipts = &tables.iter().find(|(t, _)| t == "receipts").expect("receipts").1;
        let names: Vec<&str> = receipts.iter().map(|(c, _)| c.as_str()).collect();
        assert_eq!(names, ["message_id", "at", "recipient", "status", "device_id", "sender", "conversation_id"]);
        assert!(receipts.contains(&("at".to_owned(), "timestamp".to_owned())));
        // A column declared as the whole key is not an addable column; its table is still read.
        let index = &tables.iter().find(|(t, _)| t == "message_index").expect("message_index").1;
        assert_eq!(index.first().map(|(c, _)| c.as_str()), Some("conversation_id"), "{index:?}");
        let creates = SCHEMA.matches("CREATE TABLE IF NOT EXISTS").count();
        assert_eq!(tables.len(), creates, "every table");
        assert!(tables.iter().all(|(_, cols)| !cols.is_empty() && cols.iter().all(|(c, ty)| !c.is_empty() && !ty.is_empty() && !ty.contains("PRIMARY"))));
    }
}
