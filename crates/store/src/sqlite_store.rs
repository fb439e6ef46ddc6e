//! The embedded back-end of every table trait: SQLite (bundled), the same tables and the same
//! idempotence rules as the Cassandra back-end, in two files of the data directory:
//! `commands.db` (the gateway's gates) and `tables.db` (projections and the fan-out's state).
//!
//! - Each file has one writer thread that runs every write; writes that arrive while a commit is
//!   running are committed together. A write is answered only after its transaction committed:
//!   on disk for `commands.db` (`synchronous=FULL`), in the WAL for `tables.db`
//!   (`synchronous=NORMAL`; [`Durable::sync`] makes everything before it durable, and workers
//!   call it before they store offsets).
//! - Reads run on a small pool of read-only connections per file (WAL lets them run beside the
//!   writer).
//! - Cassandra's write-time rules become conditional upserts: receipts by user keep the earliest time,
//!   last seen keeps the latest change, group rows
//!   keep the highest position, a closed membership interval stays closed, a profile keeps its
//!   latest update. Analytics sets are `INSERT OR IGNORE`; days are `YYYY-MM-DD` text, which
//!   sorts like the dates.
//! - Lightweight transactions (unique usernames, send reservations) are plain inserts: the single
//!   writer makes them atomic.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use chat_events::{Audience, ConversationId, GroupRole, MessageId, ReceiptStatus, UserId};
use chrono::{DateTime, NaiveDate, Utc};
use chat_events::sqlite::{open_sqlite, Answer, Durability, Engine, EngineError, Lane, Options};
use rusqlite::{params, Connection, OptionalExtension, Row, Transaction};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::insights::{first_transitions, profile_views_from, sort_message_counts, sort_receipts_of_user, sort_topic_counts};
use crate::*;

/// `execute` and `query_row` through the connection's statement cache.
trait Cached {
    fn exec<P: rusqlite::Params>(&self, sql: &str, p: P) -> rusqlite::Result<usize>;
    fn row<T, P: rusqlite::Params, F: FnOnce(&Row<'_>) -> rusqlite::Result<T>>(&self, sql: &str, p: P, f: F) -> rusqlite::Result<T>;
}

impl Cached for Connection {
    fn exec<P: rusqlite::Params>(&self, sql: &str, p: P) -> rusqlite::Result<usize> {
        self.prepare_cached(sql)?.execute(p)
    }

    fn row<T, P: rusqlite::Params, F: FnOnce(&Row<'_>) -> rusqlite::Result<T>>(&self, sql: &str, p: P, f: F) -> rusqlite::Result<T> {
        self.prepare_cached(sql)?.query_row(p, f)
    }
}

/// Every table on SQLite, in two files with a writer each:
///
/// - `commands.db` (the gateway's gates: accounts, send reservations, owner rows, media):
///   `synchronous=FULL`, every commit on disk before it is answered, because an acknowledged
///   send depends on its reservation surviving a power cut. Small transactions, never behind a
///   projection write.
/// - `tables.db` (projections and the fan-out's state): `synchronous=NORMAL`. A commit survives
///   a killed process but a power cut may take the last ones back (the database stays
///   consistent). That is safe because these rows are derived from the log and a worker stores
///   an offset only after [`Durable::sync`] made the writes before it durable: after a power cut
///   the worker replays from its last committed offset and writes the same rows again.
///
/// Both files run on the one SQLite engine of the embedded mode ([`chat_events::sqlite`]): a
/// writer thread that group-commits, read connections beside it, and one failure rule (a refused
/// write leaves nothing and takes no other down; a failed commit fails every write of it).
#[derive(Clone)]
pub struct SqliteStore {
    commands: SqliteCommands,
    tables: Arc<Engine<()>>,
    /// Reads of tables.db hold it shared; [`TableAdmin::replace_projections`] holds it
    /// exclusively, so that no read sees the tables half replaced.
    swap: Arc<tokio::sync::RwLock<()>>,
}

impl From<EngineError> for StoreError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Refused(e) => StoreError::Data(e),
            EngineError::Lost(e) => StoreError::Lost(e),
            e @ (EngineError::NotCommitted(_) | EngineError::QueueFull | EngineError::Stopped) => StoreError::Unavailable(e.to_string()),
        }
    }
}

/// The command side's tables (`commands.db`): the gates the gateway checks before it appends.
/// `WITHOUT ROWID`: each row lives in its primary key's B-tree only, so a reservation or an
/// owner row is one B-tree insertion instead of two (table and key index).
const COMMAND_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS accounts_by_name (username TEXT PRIMARY KEY, user_id TEXT NOT NULL, password_hash TEXT NOT NULL, created_at INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS accounts_by_id (user_id TEXT PRIMARY KEY, username TEXT NOT NULL, created_at INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS media_objects (media_id TEXT PRIMARY KEY, uploader TEXT NOT NULL, kind TEXT NOT NULL, content_type TEXT NOT NULL, size INTEGER NOT NULL, sha256 TEXT NOT NULL, created_at INTEGER NOT NULL, public INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS media_shares (media_id TEXT NOT NULL, conversation_id TEXT NOT NULL, PRIMARY KEY (media_id, conversation_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS session_revocations (at INTEGER NOT NULL, user_id TEXT NOT NULL, PRIMARY KEY (at, user_id)) WITHOUT ROWID;
";

/// The projections and the fan-out's state (`tables.db`): everything the workers write. Every
/// table is `WITHOUT ROWID` (one B-tree per table; directories created before keep their layout,
/// which reads and writes the same rows).
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS users (user_id TEXT PRIMARY KEY, username TEXT NOT NULL, registered_at INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS messages (conversation_id TEXT NOT NULL, bucket INTEGER NOT NULL, message_id TEXT NOT NULL, sender TEXT NOT NULL, sender_device TEXT NOT NULL, client_msg_id TEXT NOT NULL, kind TEXT NOT NULL, body TEXT NOT NULL, sent_at INTEGER NOT NULL, position INTEGER NOT NULL, media TEXT, edited_at INTEGER, deleted INTEGER NOT NULL DEFAULT 0, reply_to TEXT, mentions TEXT, withheld INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (conversation_id, message_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS conversation_buckets (conversation_id TEXT NOT NULL, bucket INTEGER NOT NULL, PRIMARY KEY (conversation_id, bucket)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS message_index (message_id TEXT PRIMARY KEY, conversation_id TEXT NOT NULL, sender TEXT NOT NULL, sent_at INTEGER NOT NULL, position INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS inbox (user_id TEXT NOT NULL, conversation_id TEXT NOT NULL, peer_id TEXT, last_message_id TEXT NOT NULL, last_sender TEXT NOT NULL, last_kind TEXT NOT NULL, last_body TEXT NOT NULL, last_at INTEGER NOT NULL, unread INTEGER NOT NULL, first_unread_seq INTEGER, read_up_to TEXT, applied_offset INTEGER NOT NULL, wrote INTEGER NOT NULL DEFAULT 0, mentions INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (user_id, conversation_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS user_stream (user_id TEXT NOT NULL, seq INTEGER NOT NULL, item_id TEXT NOT NULL, item TEXT NOT NULL, PRIMARY KEY (user_id, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS stream_heads (user_id TEXT NOT NULL, source_partition INTEGER NOT NULL, position INTEGER NOT NULL, PRIMARY KEY (user_id, source_partition)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS receipts (message_id TEXT NOT NULL, at INTEGER NOT NULL, recipient TEXT NOT NULL, status TEXT NOT NULL, device_id TEXT NOT NULL, sender TEXT NOT NULL, conversation_id TEXT NOT NULL, PRIMARY KEY (message_id, at, recipient, status, device_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS last_seen (user_id TEXT PRIMARY KEY, status TEXT NOT NULL, changed_at INTEGER NOT NULL, last_seen INTEGER) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sends (sender TEXT NOT NULL, client_msg_id TEXT NOT NULL, conversation_id TEXT NOT NULL, message_id TEXT NOT NULL, sent_at INTEGER NOT NULL, content_sha256 TEXT NOT NULL, position INTEGER NOT NULL, PRIMARY KEY (sender, client_msg_id, conversation_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS fanout_groups (conversation_id TEXT PRIMARY KEY, name TEXT NOT NULL, created_at INTEGER NOT NULL, membership_version INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS fanout_members (conversation_id TEXT NOT NULL, member TEXT NOT NULL, since INTEGER NOT NULL, until INTEGER, role TEXT NOT NULL, PRIMARY KEY (conversation_id, member, since)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS fanout_messages (conversation_id TEXT NOT NULL, message_id TEXT NOT NULL, sender TEXT NOT NULL, position INTEGER NOT NULL, recipients INTEGER NOT NULL, PRIMARY KEY (conversation_id, message_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS fanout_acks (message_id TEXT NOT NULL, status TEXT NOT NULL, member TEXT NOT NULL, PRIMARY KEY (message_id, status, member)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS fanout_read_markers (conversation_id TEXT NOT NULL, reader TEXT NOT NULL, up_to TEXT NOT NULL, position INTEGER NOT NULL, PRIMARY KEY (conversation_id, reader)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS fanout_watermarks (topic TEXT NOT NULL, partition INTEGER NOT NULL, next INTEGER NOT NULL, PRIMARY KEY (topic, partition)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS groups (conversation_id TEXT PRIMARY KEY, name TEXT NOT NULL, name_position INTEGER NOT NULL, creator TEXT, created_at INTEGER, position INTEGER) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS group_members (conversation_id TEXT NOT NULL, member TEXT NOT NULL, role TEXT NOT NULL, active INTEGER NOT NULL, position INTEGER NOT NULL, PRIMARY KEY (conversation_id, member)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS user_groups (user_id TEXT NOT NULL, conversation_id TEXT NOT NULL, role TEXT NOT NULL, active INTEGER NOT NULL, position INTEGER NOT NULL, PRIMARY KEY (user_id, conversation_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS user_group_intervals (user_id TEXT NOT NULL, conversation_id TEXT NOT NULL, since INTEGER NOT NULL, until INTEGER, PRIMARY KEY (user_id, conversation_id, since)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS user_roles (user_id TEXT NOT NULL, role TEXT NOT NULL, PRIMARY KEY (user_id, role)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS profiles (user_id TEXT PRIMARY KEY, display_name TEXT NOT NULL, avatar_media_id TEXT, updated_at INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS analytics_message_counts (day TEXT NOT NULL, kind TEXT NOT NULL, scope TEXT NOT NULL, part INTEGER NOT NULL, messages INTEGER NOT NULL, applied_offset INTEGER NOT NULL, PRIMARY KEY (day, kind, scope, part)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS analytics_active_users (day TEXT NOT NULL, user_id TEXT NOT NULL, PRIMARY KEY (day, user_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS analytics_profile_views (viewed TEXT NOT NULL, day TEXT NOT NULL, viewer TEXT NOT NULL, view_id TEXT NOT NULL, PRIMARY KEY (viewed, day, viewer, view_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS media_messages (media_id TEXT NOT NULL, conversation_id TEXT NOT NULL, message_id TEXT NOT NULL, position INTEGER NOT NULL, PRIMARY KEY (media_id, conversation_id, message_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS analytics_topics (day TEXT NOT NULL, topic TEXT NOT NULL, message_id TEXT NOT NULL, sender TEXT NOT NULL DEFAULT '', PRIMARY KEY (day, topic, message_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS stream_messages (user_id TEXT NOT NULL, message_id TEXT NOT NULL, seq INTEGER NOT NULL, mark INTEGER NOT NULL, PRIMARY KEY (user_id, message_id, seq)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS message_edits (message_id TEXT NOT NULL, at INTEGER NOT NULL, body TEXT NOT NULL, PRIMARY KEY (message_id, at)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hidden_messages (user_id TEXT NOT NULL, conversation_id TEXT NOT NULL, message_id TEXT NOT NULL, PRIMARY KEY (user_id, conversation_id, message_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reactions (conversation_id TEXT NOT NULL, message_id TEXT NOT NULL, user_id TEXT NOT NULL, emoji TEXT, seq INTEGER NOT NULL, PRIMARY KEY (conversation_id, message_id, user_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS privacy_settings (user_id TEXT PRIMARY KEY, last_seen TEXT NOT NULL, photo TEXT NOT NULL, read_receipts TEXT NOT NULL, updated_at INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS blocks (user_id TEXT NOT NULL, target TEXT NOT NULL, blocked INTEGER NOT NULL, at INTEGER NOT NULL, PRIMARY KEY (user_id, target)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS receipts_by_user (recipient TEXT NOT NULL, message_id TEXT NOT NULL, status TEXT NOT NULL, device_id TEXT NOT NULL, at INTEGER NOT NULL, sender TEXT NOT NULL, conversation_id TEXT NOT NULL, PRIMARY KEY (recipient, message_id, status, device_id)) WITHOUT ROWID;
DROP INDEX IF EXISTS receipts_by_user_at;
CREATE TABLE IF NOT EXISTS sync_marks (id INTEGER PRIMARY KEY, n INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS layout (name TEXT PRIMARY KEY, version INTEGER NOT NULL) WITHOUT ROWID;
";

fn data(e: impl std::fmt::Display) -> StoreError {
    StoreError::Data(e.to_string())
}

fn ms(t: &DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

/// The first whole millisecond at or after `t`: rows keep whole milliseconds, so for a stored
/// `at`, `at >= t` exactly when `ms(at) >= ceil_ms(t)` (and `at < t` when `ms(at) < ceil_ms(t)`).
fn ceil_ms(t: &DateTime<Utc>) -> i64 {
    ms(t) + i64::from(!t.timestamp_subsec_nanos().is_multiple_of(1_000_000))
}

fn day_text(d: NaiveDate) -> String {
    d.format("%Y-%m-%d").to_string()
}

fn day_at(r: &Row<'_>, i: usize) -> rusqlite::Result<NaiveDate> {
    NaiveDate::parse_from_str(&r.get::<_, String>(i)?, "%Y-%m-%d").map_err(conversion)
}

fn count_at(r: &Row<'_>, i: usize) -> rusqlite::Result<u64> {
    Ok(r.get::<_, i64>(i)?.max(0) as u64)
}

fn status_at(r: &Row<'_>, i: usize) -> rusqlite::Result<ReceiptStatus> {
    let s: String = r.get(i)?;
    ReceiptStatus::parse(&s).ok_or_else(|| rusqlite::Error::InvalidColumnName(format!("bad receipt status {s:?}")))
}

fn time(v: i64) -> rusqlite::Result<DateTime<Utc>> {
    DateTime::from_timestamp_millis(v).ok_or_else(|| rusqlite::Error::IntegralValueOutOfRange(0, v))
}

fn conversion(e: impl std::error::Error + Send + Sync + 'static) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
}

fn uuid_at(r: &Row<'_>, i: usize) -> rusqlite::Result<Uuid> {
    Uuid::parse_str(&r.get::<_, String>(i)?).map_err(conversion)
}

fn conv_at(r: &Row<'_>, i: usize) -> rusqlite::Result<ConversationId> {
    r.get::<_, String>(i)?.parse().map_err(conversion)
}

fn role_at(r: &Row<'_>, i: usize) -> rusqlite::Result<GroupRole> {
    let s: String = r.get(i)?;
    GroupRole::parse(&s).ok_or_else(|| rusqlite::Error::InvalidColumnName(format!("bad group role {s:?}")))
}

fn audience_at(r: &Row<'_>, i: usize) -> rusqlite::Result<Audience> {
    let s: String = r.get(i)?;
    Audience::parse(&s).ok_or_else(|| rusqlite::Error::InvalidColumnName(format!("bad audience {s:?}")))
}

fn block_row(user: UserId, r: &Row<'_>) -> rusqlite::Result<BlockRow> {
    Ok(BlockRow { user_id: user, target: UserId(uuid_at(r, 0)?), blocked: r.get(1)?, at: time(r.get(2)?)? })
}

/// The `until` of an interval after a write, as Cassandra resolves it (the open never writes
/// `until`; of two closes the one with the higher write time, i.e. the higher `until`, wins).
const UNTIL_MERGE: &str = "CASE WHEN excluded.until IS NULL THEN {t}.until
                               WHEN {t}.until IS NULL THEN excluded.until
                               ELSE MAX({t}.until, excluded.until) END";

/// WAL pages between checkpoints of tables.db (40 MiB; SQLite's default is 1,000): hot pages
/// (a conversation's last history page, a user's inbox) are written to the file once per
/// checkpoint instead of once per thousand pages.
const CHECKPOINT_PAGES: u32 = 10_000;

/// Read connections of a database file (reads running at once).
const READERS: usize = 16;

/// How long a `tables.db` transaction stays open while more writes keep arriving. Projection
/// writes are answered when they ran (readers see them through the shared cache), so the
/// window does not delay anyone: it sets how many slices share one commit, and with it how often
/// a hot page (a user's inbox, a conversation's history) is written to the WAL again. A worker's
/// `Durable::sync` ends it early. 4 s rather than 1 s: a user's stream and inbox pages take four
/// times as many rows per write, and the tables' writer writes ~40 % fewer bytes (benchmarks.md,
/// "the tables' transaction").
const TABLES_WINDOW: std::time::Duration = std::time::Duration::from_secs(4);

/// How often workers sync tables.db (each sync is a commit and an fsync, and ends the window).
/// A crash replays at most about this much of the log into the tables.
const TABLES_SYNC_EVERY: std::time::Duration = std::time::Duration::from_secs(4);

/// The send gates of versions before the delivery pipeline v2 (see `migrate_send_gates`).
const LEGACY_SEND_GATES: &str = "
CREATE TABLE IF NOT EXISTS send_dedup (sender TEXT NOT NULL, client_msg_id TEXT NOT NULL, message_id TEXT NOT NULL, conversation_id TEXT NOT NULL, sent_at INTEGER NOT NULL, body_sha256 TEXT NOT NULL, committed INTEGER NOT NULL, PRIMARY KEY (sender, client_msg_id)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS message_owners (message_id TEXT PRIMARY KEY, conversation_id TEXT NOT NULL, sender TEXT NOT NULL) WITHOUT ROWID;
";

/// Command tables that older versions kept in `tables.db`; [`SqliteStore::open`] moves them.
const COMMAND_TABLES: &[&str] = &["accounts_by_name", "accounts_by_id", "send_dedup", "message_owners", "media_objects", "media_shares"];

/// Records that the projection tables are in this version's layout.
fn set_layout(c: &Connection) -> rusqlite::Result<()> {
    c.execute("INSERT OR REPLACE INTO layout (name, version) VALUES ('projections', ?1)", params![PROJECTION_LAYOUT])?;
    Ok(())
}

/// Opens a database file's writer connection and creates its tables.
fn open_db(path: &Path, schema: &str) -> StoreResult<Connection> {
    let conn = open_sqlite(path, true).map_err(|e| data(format!("{}: {e}", path.display())))?;
    conn.execute_batch(schema).map_err(data)?;
    Ok(conn)
}

/// Starts the engine of one file.
fn start(path: PathBuf, conn: Connection, options: Options) -> StoreResult<Arc<Engine<()>>> {
    Engine::start(path.clone(), conn, (), options, |_| {}).map_err(|e| data(format!("{}: {e}", path.display())))
}

impl SqliteStore {
    /// Opens (or creates) `dir/commands.db` and `dir/tables.db`. A directory written by a
    /// version that kept the command tables in `tables.db` has them moved to `commands.db`.
    pub fn open(dir: &Path) -> StoreResult<Self> {
        std::fs::create_dir_all(dir).map_err(|e| data(format!("data directory {}: {e}", dir.display())))?;
        let (cmd_path, tables_path) = (dir.join("commands.db"), dir.join("tables.db"));
        let mut cmd_conn = open_db(&cmd_path, COMMAND_SCHEMA)?;
        // Projection tables written before the layout was recorded are layout 1: kept as they
        // are (readable) until `reset_projections` rebuilds them; new tables get this layout.
        let fresh = !tables_path.exists()
            || open_sqlite(&tables_path, true)
                .and_then(|c| c.row("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'users'", [], |r| r.get::<_, i64>(0)))
                .map(|n| n == 0)
                .unwrap_or(true);
        let mut tables_conn = open_db(&tables_path, SCHEMA)?;
        if fresh {
            set_layout(&tables_conn).map_err(data)?;
        }
        move_command_tables(&mut cmd_conn, &tables_conn, &tables_path)?;
        migrate_send_gates(&cmd_conn, &mut tables_conn, &cmd_path)?;
        let commands = command_options();
        // tables.db: rows derived from the log, answered when they ran (readers share the
        // writer's cache and see them at once), committed unsynced and synced by `Durable::sync`
        // before a worker stores an offset past them. A failed commit loses answered writes: the
        // engine then refuses every job and the worker stops the process (`StoreError::Lost`).
        // 64 MiB of page cache (the default is 2 MiB): projection writes land all over the file
        // (per user, per conversation), and hot index pages stay in memory instead of being read
        // again through the kernel on every write.
        let mut tables = Options::new("tables", Durability::Relaxed);
        (tables.cache_kib, tables.window, tables.readers) = (65_536, Some(TABLES_WINDOW), READERS);
        (tables.answer, tables.shared_cache) = (Answer::Ran, true);
        tables.checkpoint_pages = CHECKPOINT_PAGES;
        Ok(SqliteStore {
            commands: SqliteCommands { engine: start(cmd_path, cmd_conn, commands)? },
            tables: start(tables_path, tables_conn, tables)?,
            swap: Arc::new(tokio::sync::RwLock::new(())),
        })
    }

    /// A projection write of tables.db, answered as soon as it ran in the open transaction
    /// (readers see it at once; it is on disk after the next `Durable::sync`).
    async fn write(&self, f: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<()> + Send + 'static) -> StoreResult<()> {
        Ok(self.tables.write(Lane::Background, move |t, _| f(t)).await?)
    }

    /// A write of tables.db that is not derived from the log (roles, schema changes): answered
    /// once on disk, with every write before it.
    async fn write_synced(&self, f: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<()> + Send + 'static) -> StoreResult<()> {
        Ok(self.tables.write(Lane::Sync, move |t, _| f(t)).await?)
    }

    /// A read of tables.db.
    async fn read<R: Send + 'static>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static) -> StoreResult<R> {
        let _not_swapping = self.swap.read().await;
        Ok(self.tables.read(f).await?)
    }

}

/// The command side alone (`commands.db`): the gates the gateway checks before it appends, and
/// the session revocations. Part of [`SqliteStore`], and the command side of the embedded store
/// whose tables are on fjall ([`crate::FjallStore`]).
#[derive(Clone)]
pub struct SqliteCommands {
    engine: Arc<Engine<()>>,
}

impl SqliteCommands {
    /// Opens (or creates) `dir/commands.db`.
    pub fn open(dir: &Path) -> StoreResult<Self> {
        std::fs::create_dir_all(dir).map_err(|e| data(format!("data directory {}: {e}", dir.display())))?;
        let path = dir.join("commands.db");
        let conn = open_db(&path, COMMAND_SCHEMA)?;
        Ok(SqliteCommands { engine: start(path, conn, command_options())? })
    }

    /// A command write (commands.db), answered once on disk.
    async fn command<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Transaction<'_>) -> rusqlite::Result<R> + Send + 'static,
    ) -> StoreResult<R> {
        Ok(self.engine.write(Lane::Urgent, move |t, _| f(t)).await?)
    }

    /// A read of commands.db.
    async fn command_read<R: Send + 'static>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<R> + Send + 'static) -> StoreResult<R> {
        Ok(self.engine.read(f).await?)
    }

    /// Creates the command tables that do not exist.
    pub async fn migrate(&self) -> StoreResult<()> {
        self.command(|t| t.execute_batch(COMMAND_SCHEMA)).await
    }

    /// Reads answer and the last commit succeeded.
    pub async fn ping(&self) -> bool {
        self.engine.probe().await && self.command_read(|c| c.row("SELECT 1", [], |r| r.get::<_, i64>(0))).await.is_ok()
    }

    /// See [`InsightStore::revoke_sessions`].
    pub async fn revoke_sessions(&self, user: UserId, at: DateTime<Utc>) -> StoreResult<()> {
        let expired = ms(&(Utc::now() - crate::insights::REVOCATIONS_KEPT));
        self.command(move |t| {
            t.prepare_cached("INSERT OR IGNORE INTO session_revocations (at, user_id) VALUES (?1, ?2)")?
                .execute(params![ms(&at), user.to_string()])?;
            t.prepare_cached("DELETE FROM session_revocations WHERE at < ?1")?.execute(params![expired])?;
            Ok(())
        })
        .await
    }

    /// See [`InsightStore::revocations_since`].
    pub async fn revocations_since(&self, since: DateTime<Utc>) -> StoreResult<Vec<(UserId, DateTime<Utc>)>> {
        let since = ms(&since.max(Utc::now() - crate::insights::REVOCATIONS_KEPT));
        self.command_read(move |c| {
            let mut st = c.prepare_cached("SELECT at, user_id FROM session_revocations WHERE at >= ?1 ORDER BY at, user_id")?;
            let rows = st.query_map(params![since], |r| {
                let user: String = r.get(1)?;
                Ok((user.parse::<UserId>().map_err(conversion)?, time(r.get(0)?)?))
            })?;
            rows.collect()
        })
        .await
    }
}

/// commands.db: every commit on disk before it is answered (a user waits for these).
fn command_options() -> Options {
    let mut commands = Options::new("commands", Durability::Full);
    commands.readers = READERS;
    commands
}

/// Sends reserved by versions before the delivery pipeline v2 (`send_dedup` in `commands.db`)
/// become accepted sends of the fan-out (`sends` in `tables.db`, position -1: any later append of
/// the key is a duplicate), so that a retry spanning the upgrade still gets the first attempt's
/// id; then the old gates (`send_dedup`, `message_owners`) are dropped. Safe to repeat after a
/// crash in between (the copy ignores rows already there).
fn migrate_send_gates(cmd: &Connection, tables: &mut Connection, cmd_path: &Path) -> StoreResult<()> {
    let has = |name: &str| cmd.row("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1", [name], |r| r.get::<_, i64>(0)).unwrap_or(0) > 0;
    if has("send_dedup") {
        tables.execute("ATTACH DATABASE ?1 AS old", [cmd_path.to_string_lossy()]).map_err(data)?;
        let copied = (|| {
            let tx = tables.transaction()?;
            tx.execute(
                "INSERT OR IGNORE INTO main.sends (sender, client_msg_id, conversation_id, message_id, sent_at, content_sha256, position)
                 SELECT sender, client_msg_id, conversation_id, message_id, sent_at, body_sha256, -1 FROM old.send_dedup",
                [],
            )?;
            tx.commit()
        })();
        let detached = tables.execute("DETACH DATABASE old", []);
        copied.map_err(|e| data(format!("moving send reservations to sends: {e}")))?;
        detached.map_err(data)?;
        cmd.execute("DROP TABLE send_dedup", []).map_err(data)?;
    }
    if has("message_owners") {
        cmd.execute("DROP TABLE message_owners", []).map_err(data)?;
    }
    Ok(())
}

/// Moves the command tables of an older `tables.db` into `commands.db`: copies their rows
/// (committed and synced), then drops them from `tables.db`. Safe to repeat after a crash in
/// between (the copy ignores rows already there).
fn move_command_tables(cmd: &mut Connection, tables: &Connection, tables_path: &Path) -> StoreResult<()> {
    let present: Vec<&str> = COMMAND_TABLES
        .iter()
        .copied()
        .filter(|t| tables.row("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1", [t], |r| r.get::<_, i64>(0)).unwrap_or(0) > 0)
        .collect();
    if present.is_empty() {
        return Ok(());
    }
    // The send gates of those versions: created here so their rows can come along, then moved
    // on by `migrate_send_gates`.
    cmd.execute_batch(LEGACY_SEND_GATES).map_err(data)?;
    cmd.execute("ATTACH DATABASE ?1 AS old", [tables_path.to_string_lossy()]).map_err(data)?;
    let copied = (|| {
        let tx = cmd.transaction()?;
        for t in &present {
            tx.execute(&format!("INSERT OR IGNORE INTO main.{t} SELECT * FROM old.{t}"), [])?;
        }
        tx.commit()
    })();
    let detached = cmd.execute("DETACH DATABASE old", []);
    copied.map_err(|e| data(format!("moving the command tables to commands.db: {e}")))?;
    detached.map_err(data)?;
    for t in &present {
        tables.execute(&format!("DROP TABLE {t}"), []).map_err(data)?;
    }
    Ok(())
}

/// Every row of a table as a JSON array of its columns.
fn table_rows_as_json(c: &Connection, table: &str) -> rusqlite::Result<Vec<String>> {
    let mut st = c.prepare(&format!("SELECT * FROM {table}"))?;
    let n = st.column_count();
    let rows = st
        .query_map([], |r| {
            let mut vals = Vec::with_capacity(n);
            for i in 0..n {
                vals.push(match r.get_ref(i)? {
                    rusqlite::types::ValueRef::Null => serde_json::Value::Null,
                    rusqlite::types::ValueRef::Integer(v) => serde_json::json!(v),
                    rusqlite::types::ValueRef::Real(v) => serde_json::json!(v),
                    rusqlite::types::ValueRef::Text(t) => serde_json::json!(String::from_utf8_lossy(t)),
                    rusqlite::types::ValueRef::Blob(b) => serde_json::json!(hex::encode(b)),
                });
            }
            Ok(serde_json::Value::Array(vals).to_string())
        })?
        .collect::<rusqlite::Result<_>>();
    rows
}

fn message_row(r: &Row<'_>) -> rusqlite::Result<MessageRow> {
    Ok(MessageRow {
        conversation_id: conv_at(r, 0)?,
        message_id: MessageId(uuid_at(r, 1)?),
        sender: UserId(uuid_at(r, 2)?),
        sender_device: r.get(3)?,
        client_msg_id: r.get(4)?,
        kind: r.get(5)?,
        body: r.get(6)?,
        sent_at: time(r.get(7)?)?,
        position: r.get(8)?,
        media: match r.get::<_, Option<String>>(9)? {
            Some(j) => Some(serde_json::from_str(&j).map_err(conversion)?),
            None => None,
        },
        edited_at: r.get::<_, Option<i64>>(10)?.and_then(DateTime::from_timestamp_millis),
        deleted: r.get(11)?,
        reply_to: match r.get::<_, Option<String>>(12)? {
            Some(m) => Some(MessageId(Uuid::parse_str(&m).map_err(conversion)?)),
            None => None,
        },
        mentions: match r.get::<_, Option<String>>(13)? {
            Some(j) => serde_json::from_str(&j).map_err(conversion)?,
            None => Vec::new(),
        },
        reactions: Vec::new(),
        my_reaction: None,
        withheld: r.get(14)?,
    })
}

const MESSAGE_COLS: &str = "conversation_id, message_id, sender, sender_device, client_msg_id, kind, body, sent_at, position, media, edited_at, deleted, reply_to, mentions, withheld";
const INBOX_COLS: &str =
    "user_id, conversation_id, peer_id, last_message_id, last_sender, last_kind, last_body, last_at, unread, first_unread_seq, read_up_to, applied_offset, wrote, mentions";

fn inbox_row(r: &Row<'_>) -> rusqlite::Result<InboxRow> {
    Ok(InboxRow {
        user_id: UserId(uuid_at(r, 0)?),
        conversation_id: conv_at(r, 1)?,
        peer_id: match r.get::<_, Option<String>>(2)? {
            Some(p) => Some(UserId(Uuid::parse_str(&p).map_err(conversion)?)),
            None => None,
        },
        last_message_id: MessageId(uuid_at(r, 3)?),
        last_sender: UserId(uuid_at(r, 4)?),
        last_kind: r.get(5)?,
        last_body: r.get(6)?,
        last_at: time(r.get(7)?)?,
        unread: r.get(8)?,
        first_unread_seq: r.get(9)?,
        read_up_to: match r.get::<_, Option<String>>(10)? {
            Some(m) => Some(MessageId(Uuid::parse_str(&m).map_err(conversion)?)),
            None => None,
        },
        applied_offset: r.get(11)?,
        wrote: r.get(12)?,
        mentions: r.get(13)?,
    })
}

/// `CommandStore` for a store that keeps its command gates in a `commands: SqliteCommands` field
/// (the embedded stores: the gates are in `commands.db` whatever holds the tables).
macro_rules! commands_in_sqlite {
    ($store:ty) => {
        #[async_trait::async_trait]
        impl $crate::CommandStore for $store {
            async fn create_account(&self, account: &$crate::Account) -> $crate::StoreResult<bool> {
                self.commands.create_account(account).await
            }
            async fn remove_account(&self, account: &$crate::Account) -> $crate::StoreResult<()> {
                self.commands.remove_account(account).await
            }
            async fn account_by_name(&self, username: &str) -> $crate::StoreResult<Option<$crate::Account>> {
                self.commands.account_by_name(username).await
            }
            async fn account_by_id(&self, user: chat_events::UserId) -> $crate::StoreResult<Option<String>> {
                self.commands.account_by_id(user).await
            }
            async fn put_media(&self, m: &$crate::MediaObject) -> $crate::StoreResult<()> {
                self.commands.put_media(m).await
            }
            async fn media(&self, id: uuid::Uuid) -> $crate::StoreResult<Option<$crate::MediaObject>> {
                self.commands.media(id).await
            }
            async fn set_media_public(&self, id: uuid::Uuid) -> $crate::StoreResult<()> {
                self.commands.set_media_public(id).await
            }
            async fn share_media(&self, id: uuid::Uuid, conv: &chat_events::ConversationId) -> $crate::StoreResult<()> {
                self.commands.share_media(id, conv).await
            }
            async fn media_shares(&self, id: uuid::Uuid) -> $crate::StoreResult<Vec<chat_events::ConversationId>> {
                self.commands.media_shares(id).await
            }
        }
    };
}
pub(crate) use commands_in_sqlite;

commands_in_sqlite!(SqliteStore);

#[async_trait]
impl CommandStore for SqliteCommands {
    async fn create_account(&self, a: &Account) -> StoreResult<bool> {
        let a = a.clone();
        self.command(move |t| {
            let n = t.exec(
                "INSERT OR IGNORE INTO accounts_by_name (username, user_id, password_hash, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![a.username, a.user_id.to_string(), a.password_hash, ms(&a.created_at)],
            )?;
            if n == 1 {
                t.exec(
                    "INSERT OR REPLACE INTO accounts_by_id (user_id, username, created_at) VALUES (?1, ?2, ?3)",
                    params![a.user_id.to_string(), a.username, ms(&a.created_at)],
                )?;
            }
            Ok(n == 1)
        })
        .await
    }

    async fn remove_account(&self, a: &Account) -> StoreResult<()> {
        let a = a.clone();
        self.command(move |t| {
            t.exec("DELETE FROM accounts_by_id WHERE user_id = ?1", params![a.user_id.to_string()])?;
            t.exec("DELETE FROM accounts_by_name WHERE username = ?1 AND user_id = ?2", params![a.username, a.user_id.to_string()])?;
            Ok(())
        })
        .await
    }

    async fn account_by_name(&self, username: &str) -> StoreResult<Option<Account>> {
        let username = username.to_owned();
        self.command_read(move |c| {
            c.row(
                "SELECT user_id, username, password_hash, created_at FROM accounts_by_name WHERE username = ?1",
                params![username],
                |r| Ok(Account { user_id: UserId(uuid_at(r, 0)?), username: r.get(1)?, password_hash: r.get(2)?, created_at: time(r.get(3)?)? }),
            )
            .optional()
        })
        .await
    }

    async fn account_by_id(&self, user: UserId) -> StoreResult<Option<String>> {
        self.command_read(move |c| {
            c.row("SELECT username FROM accounts_by_id WHERE user_id = ?1", params![user.to_string()], |r| r.get(0)).optional()
        })
        .await
    }


    async fn put_media(&self, m: &MediaObject) -> StoreResult<()> {
        let m = m.clone();
        self.command(move |t| {
            t.exec(
                "INSERT OR REPLACE INTO media_objects (media_id, uploader, kind, content_type, size, sha256, created_at, public) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![m.media_id.to_string(), m.uploader.to_string(), m.kind, m.content_type, m.size, m.sha256, ms(&m.created_at), m.public],
            )?;
            Ok(())
        })
        .await
    }

    async fn media(&self, id: Uuid) -> StoreResult<Option<MediaObject>> {
        self.command_read(move |c| {
            c.row(
                "SELECT uploader, kind, content_type, size, sha256, created_at, public FROM media_objects WHERE media_id = ?1",
                params![id.to_string()],
                |r| {
                    Ok(MediaObject {
                        media_id: id,
                        uploader: UserId(uuid_at(r, 0)?),
                        kind: r.get(1)?,
                        content_type: r.get(2)?,
                        size: r.get(3)?,
                        sha256: r.get(4)?,
                        created_at: time(r.get(5)?)?,
                        public: r.get::<_, i64>(6)? != 0,
                    })
                },
            )
            .optional()
        })
        .await
    }

    async fn set_media_public(&self, id: Uuid) -> StoreResult<()> {
        self.command(move |t| {
            t.exec("UPDATE media_objects SET public = 1 WHERE media_id = ?1", params![id.to_string()])?;
            Ok(())
        })
        .await
    }

    async fn share_media(&self, id: Uuid, c: &ConversationId) -> StoreResult<()> {
        let c = c.clone();
        self.command(move |t| {
            t.exec("INSERT OR IGNORE INTO media_shares (media_id, conversation_id) VALUES (?1, ?2)", params![id.to_string(), c.as_str()])?;
            Ok(())
        })
        .await
    }

    async fn media_shares(&self, id: Uuid) -> StoreResult<Vec<ConversationId>> {
        self.command_read(move |c| {
            let mut st = c.prepare_cached("SELECT conversation_id FROM media_shares WHERE media_id = ?1 ORDER BY conversation_id")?;
            let rows = st.query_map(params![id.to_string()], |r| conv_at(r, 0))?;
            rows.collect()
        })
        .await
    }
}

/// Applies one projection write inside the writer's transaction. Cassandra's write-time rules
/// become conditional upserts here (see the module doc).
fn apply_write(t: &Transaction<'_>, w: &Write) -> rusqlite::Result<()> {
    match w {
        Write::User { user, username, at } => {
            t.exec("INSERT OR REPLACE INTO users (user_id, username, registered_at) VALUES (?1, ?2, ?3)", params![user.to_string(), username, ms(at)])?;
        }
        Write::Message(m) => {
            let bucket = bucket_of(m.message_id);
            t.exec(
                // Written once: a message item applied again never undoes an edit or a delete.
                &format!("INSERT OR IGNORE INTO messages (bucket, {MESSAGE_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)"),
                params![
                    bucket,
                    m.conversation_id.as_str(),
                    m.message_id.to_string(),
                    m.sender.to_string(),
                    m.sender_device,
                    m.client_msg_id,
                    m.kind,
                    m.body,
                    ms(&m.sent_at),
                    m.position,
                    m.media.as_ref().map(|a| serde_json::to_string(a).unwrap_or_default()),
                    m.edited_at.as_ref().map(ms),
                    m.deleted,
                    m.reply_to.map(|r| r.to_string()),
                    (!m.mentions.is_empty()).then(|| serde_json::to_string(&m.mentions).unwrap_or_default()),
                    m.withheld
                ],
            )?;
            t.exec(
                "INSERT OR REPLACE INTO message_index (message_id, conversation_id, sender, sent_at, position) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![m.message_id.to_string(), m.conversation_id.as_str(), m.sender.to_string(), ms(&m.sent_at), m.position],
            )?;
        }
        Write::Bucket { conversation, bucket } => {
            t.exec("INSERT OR IGNORE INTO conversation_buckets (conversation_id, bucket) VALUES (?1, ?2)", params![conversation.as_str(), bucket])?;
        }
        Write::Inbox(r) => {
            t.exec(
                &format!("INSERT OR REPLACE INTO inbox ({INBOX_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)"),
                params![
                    r.user_id.to_string(),
                    r.conversation_id.as_str(),
                    r.peer_id.map(|p| p.to_string()),
                    r.last_message_id.to_string(),
                    r.last_sender.to_string(),
                    r.last_kind,
                    r.last_body,
                    ms(&r.last_at),
                    r.unread,
                    r.first_unread_seq,
                    r.read_up_to.map(|m| m.to_string()),
                    r.applied_offset,
                    r.wrote,
                    r.mentions
                ],
            )?;
        }
        Write::Stream { user, row } => {
            t.exec(
                "INSERT OR REPLACE INTO user_stream (user_id, seq, item_id, item) VALUES (?1, ?2, ?3, ?4)",
                params![user.to_string(), row.seq, row.item_id.to_string(), row.item],
            )?;
        }
        Write::StreamHead { user, source_partition, position } => {
            // The highest position wins (Cassandra: write time = position).
            t.exec(
                "INSERT INTO stream_heads (user_id, source_partition, position) VALUES (?1, ?2, ?3)
                 ON CONFLICT (user_id, source_partition) DO UPDATE SET position = MAX(position, excluded.position)",
                params![user.to_string(), source_partition, position],
            )?;
        }
        Write::Receipt(r) => {
            let (message, recipient, sender) = (r.message_id.to_string(), r.recipient.to_string(), r.sender.to_string());
            t.exec(
                "INSERT INTO receipts (message_id, recipient, status, device_id, at, sender, conversation_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (message_id, at, recipient, status, device_id) DO NOTHING",
                params![message, recipient, r.status.as_str(), r.device_id, ms(&r.at), sender, r.conversation_id.as_str()],
            )?;
            // The transition by recipient, the earliest `at` kept (the audit of one user).
            if r.in_user_audit() {
                t.exec(
                    "INSERT INTO receipts_by_user (recipient, message_id, status, device_id, at, sender, conversation_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT (recipient, message_id, status, device_id) DO UPDATE SET at = excluded.at, conversation_id = excluded.conversation_id
                     WHERE excluded.at < receipts_by_user.at",
                    params![recipient, message, r.status.as_str(), r.device_id, ms(&r.at), sender, r.conversation_id.as_str()],
                )?;
            }
        }
        Write::Presence { user, online, at } => {
            // Cassandra's rule, so that a replay in any order gives the same row: the later change
            // wins, and of two changes at the same instant the greater value ('online') does, as
            // Cassandra resolves two cells with one write time.
            let status = if *online { "online" } else { "offline" };
            let last_seen: Option<i64> = if *online { None } else { Some(ms(at)) };
            t.exec(
                "INSERT INTO last_seen (user_id, status, changed_at, last_seen) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (user_id) DO UPDATE SET
                   status = CASE WHEN excluded.changed_at > last_seen.changed_at THEN excluded.status
                                 WHEN excluded.changed_at < last_seen.changed_at THEN last_seen.status
                                 ELSE MAX(last_seen.status, excluded.status) END,
                   changed_at = MAX(last_seen.changed_at, excluded.changed_at),
                   last_seen = CASE WHEN excluded.last_seen IS NULL THEN last_seen.last_seen
                                    WHEN last_seen.last_seen IS NULL THEN excluded.last_seen
                                    ELSE MAX(last_seen.last_seen, excluded.last_seen) END",
                params![user.to_string(), status, ms(at), last_seen],
            )?;
        }
        // Cassandra writes the group rows with write time = position; here a conditional upsert
        // keeps the row with the highest position (equal positions carry identical content).
        Write::Group(g) => {
            // The name has its own position (Cassandra: its own cell write time), so a rename
            // projected before the creation keeps its name.
            t.exec(
                "INSERT INTO groups (conversation_id, name, name_position, creator, created_at, position) VALUES (?1, ?2, ?5, ?3, ?4, ?5)
                 ON CONFLICT (conversation_id) DO UPDATE SET
                   creator = CASE WHEN groups.position IS NULL OR excluded.position >= groups.position THEN excluded.creator ELSE groups.creator END,
                   created_at = CASE WHEN groups.position IS NULL OR excluded.position >= groups.position THEN excluded.created_at ELSE groups.created_at END,
                   position = MAX(COALESCE(groups.position, excluded.position), excluded.position),
                   name = CASE WHEN excluded.name_position >= groups.name_position THEN excluded.name ELSE groups.name END,
                   name_position = MAX(groups.name_position, excluded.name_position)",
                params![g.conversation_id.as_str(), g.name, g.creator.to_string(), ms(&g.created_at), g.position],
            )?;
        }
        Write::GroupName { conversation, name, position } => {
            t.exec(
                "INSERT INTO groups (conversation_id, name, name_position) VALUES (?1, ?2, ?3)
                 ON CONFLICT (conversation_id) DO UPDATE SET name = excluded.name, name_position = excluded.name_position
                 WHERE excluded.name_position >= groups.name_position",
                params![conversation.as_str(), name, position],
            )?;
        }
        Write::GroupMember(m) => {
            t.exec(
                "INSERT INTO group_members (conversation_id, member, role, active, position) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (conversation_id, member) DO UPDATE SET
                   role = excluded.role, active = excluded.active, position = excluded.position
                 WHERE excluded.position >= group_members.position",
                params![m.conversation_id.as_str(), m.member.to_string(), m.role.as_str(), m.active, m.position],
            )?;
        }
        Write::UserGroup(g) => {
            t.exec(
                "INSERT INTO user_groups (user_id, conversation_id, role, active, position) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (user_id, conversation_id) DO UPDATE SET
                   role = excluded.role, active = excluded.active, position = excluded.position
                 WHERE excluded.position >= user_groups.position",
                params![g.user_id.to_string(), g.conversation_id.as_str(), g.role.as_str(), g.active, g.position],
            )?;
        }
        Write::UserGroupInterval { user, conversation, since, until } => {
            let merged = UNTIL_MERGE.replace("{t}", "user_group_intervals");
            t.exec(
                &format!(
                    "INSERT INTO user_group_intervals (user_id, conversation_id, since, until) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (user_id, conversation_id, since) DO UPDATE SET until = {merged}"
                ),
                params![user.to_string(), conversation.as_str(), since, until],
            )?;
        }
        Write::Profile(p) => {
            // Cassandra's rule (write time = updated_at): the later update wins; of two with one
            // updated_at, each cell resolves alone, the greater value winning and a null (no
            // avatar, written as a tombstone) winning over a value.
            t.exec(
                "INSERT INTO profiles (user_id, display_name, avatar_media_id, updated_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (user_id) DO UPDATE SET
                   display_name = CASE WHEN excluded.updated_at > profiles.updated_at THEN excluded.display_name
                                       WHEN excluded.updated_at < profiles.updated_at THEN profiles.display_name
                                       ELSE MAX(profiles.display_name, excluded.display_name) END,
                   avatar_media_id = CASE WHEN excluded.updated_at > profiles.updated_at THEN excluded.avatar_media_id
                                          WHEN excluded.updated_at < profiles.updated_at THEN profiles.avatar_media_id
                                          WHEN excluded.avatar_media_id IS NULL OR profiles.avatar_media_id IS NULL THEN NULL
                                          ELSE MAX(profiles.avatar_media_id, excluded.avatar_media_id) END,
                   updated_at = MAX(profiles.updated_at, excluded.updated_at)",
                params![p.user_id.to_string(), p.display_name, p.avatar_media_id.map(|a| a.to_string()), ms(&p.updated_at)],
            )?;
        }
        Write::MessageCount { key, messages, applied_offset } => {
            t.exec(
                "INSERT INTO analytics_message_counts (day, kind, scope, part, messages, applied_offset) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (day, kind, scope, part) DO UPDATE SET messages = excluded.messages, applied_offset = excluded.applied_offset
                 WHERE excluded.applied_offset > analytics_message_counts.applied_offset",
                params![day_text(key.day), key.kind, key.scope, key.partition, messages, applied_offset],
            )?;
        }
        Write::ActiveUser { day, user } => {
            t.exec("INSERT OR IGNORE INTO analytics_active_users (day, user_id) VALUES (?1, ?2)", params![day_text(*day), user.to_string()])?;
        }
        Write::ProfileView { viewed, day, viewer, view } => {
            t.exec(
                "INSERT OR IGNORE INTO analytics_profile_views (viewed, day, viewer, view_id) VALUES (?1, ?2, ?3, ?4)",
                params![viewed.to_string(), day_text(*day), viewer.to_string(), view.to_string()],
            )?;
        }
        Write::MediaMessage { media, conversation, message, position } => {
            t.exec(
                "INSERT OR IGNORE INTO media_messages (media_id, conversation_id, message_id, position) VALUES (?1, ?2, ?3, ?4)",
                params![media.to_string(), conversation.as_str(), message.to_string(), position],
            )?;
        }
        Write::MessageEdited { conversation, message, body, at } => {
            t.exec(
                "UPDATE messages SET body = ?3, edited_at = ?4 WHERE conversation_id = ?1 AND message_id = ?2 AND deleted = 0",
                params![conversation.as_str(), message.to_string(), body, ms(at)],
            )?;
        }
        Write::MessageDeleted { conversation, message } => {
            t.exec(
                "UPDATE messages SET body = '', media = NULL, edited_at = NULL, deleted = 1, reply_to = NULL, mentions = NULL WHERE conversation_id = ?1 AND message_id = ?2",
                params![conversation.as_str(), message.to_string()],
            )?;
            t.exec("DELETE FROM message_edits WHERE message_id = ?1", params![message.to_string()])?;
        }
        Write::StreamMessage { user, message, seq, mark } => {
            t.exec(
                "INSERT OR REPLACE INTO stream_messages (user_id, message_id, seq, mark) VALUES (?1, ?2, ?3, ?4)",
                params![user.to_string(), message.to_string(), seq, mark.code()],
            )?;
        }
        Write::MessageVersion { message, at, body } => {
            t.exec(
                "INSERT OR REPLACE INTO message_edits (message_id, at, body) VALUES (?1, ?2, ?3)",
                params![message.to_string(), ms(at), body],
            )?;
        }
        Write::HiddenMessage { user, conversation, message } => {
            t.exec(
                "INSERT OR IGNORE INTO hidden_messages (user_id, conversation_id, message_id) VALUES (?1, ?2, ?3)",
                params![user.to_string(), conversation.as_str(), message.to_string()],
            )?;
        }
        Write::Reaction { conversation, message, user, emoji, seq } => {
            t.exec(
                "INSERT INTO reactions (conversation_id, message_id, user_id, emoji, seq) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (conversation_id, message_id, user_id) DO UPDATE SET emoji = excluded.emoji, seq = excluded.seq WHERE excluded.seq >= reactions.seq",
                params![conversation.as_str(), message.to_string(), user.to_string(), emoji, seq],
            )?;
        }
        Write::Privacy(p) => {
            // Cassandra's rule (write time = updated_at): the later update wins; of two with one
            // updated_at, each setting resolves alone, the greater text winning.
            t.exec(
                "INSERT INTO privacy_settings (user_id, last_seen, photo, read_receipts, updated_at) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (user_id) DO UPDATE SET
                   last_seen = CASE WHEN excluded.updated_at > privacy_settings.updated_at THEN excluded.last_seen
                                    WHEN excluded.updated_at < privacy_settings.updated_at THEN privacy_settings.last_seen
                                    ELSE MAX(privacy_settings.last_seen, excluded.last_seen) END,
                   photo = CASE WHEN excluded.updated_at > privacy_settings.updated_at THEN excluded.photo
                                WHEN excluded.updated_at < privacy_settings.updated_at THEN privacy_settings.photo
                                ELSE MAX(privacy_settings.photo, excluded.photo) END,
                   read_receipts = CASE WHEN excluded.updated_at > privacy_settings.updated_at THEN excluded.read_receipts
                                        WHEN excluded.updated_at < privacy_settings.updated_at THEN privacy_settings.read_receipts
                                        ELSE MAX(privacy_settings.read_receipts, excluded.read_receipts) END,
                   updated_at = MAX(privacy_settings.updated_at, excluded.updated_at)",
                params![p.user_id.to_string(), p.last_seen.as_str(), p.photo.as_str(), p.read_receipts.as_str(), ms(&p.updated_at)],
            )?;
        }
        Write::Block(b) => {
            // Cassandra's rule (write time = at): the later change wins; at one time, the block.
            t.exec(
                "INSERT INTO blocks (user_id, target, blocked, at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (user_id, target) DO UPDATE SET
                   blocked = CASE WHEN excluded.at > blocks.at THEN excluded.blocked
                                  WHEN excluded.at < blocks.at THEN blocks.blocked
                                  ELSE MAX(blocks.blocked, excluded.blocked) END,
                   at = MAX(blocks.at, excluded.at)",
                params![b.user_id.to_string(), b.target.to_string(), b.blocked, ms(&b.at)],
            )?;
        }
        Write::TopicRemoved { day, topic, message } => {
            t.exec(
                "DELETE FROM analytics_topics WHERE day = ?1 AND topic = ?2 AND message_id = ?3",
                params![day_text(*day), topic, message.to_string()],
            )?;
        }
        Write::Topic { day, topic, message, sender } => {
            t.exec(
                "INSERT OR IGNORE INTO analytics_topics (day, topic, message_id, sender) VALUES (?1, ?2, ?3, ?4)",
                params![day_text(*day), topic, message.to_string(), sender.to_string()],
            )?;
        }
    }
    Ok(())
}

#[async_trait]
impl WriteStore for SqliteStore {
    async fn apply(&self, writes: Vec<Write>) -> StoreResult<()> {
        crate::writes::validate(&writes)?;
        if writes.is_empty() {
            return Ok(());
        }
        // One transaction: all of the list or none of it.
        self.write(move |t| {
            for w in &writes {
                apply_write(t, w)?;
            }
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl ProjectionStore for SqliteStore {
    async fn inbox_row(&self, user: UserId, c: &ConversationId) -> StoreResult<Option<InboxRow>> {
        let c = c.clone();
        self.read(move |conn| {
            conn.row(
                &format!("SELECT {INBOX_COLS} FROM inbox WHERE user_id = ?1 AND conversation_id = ?2"),
                params![user.to_string(), c.as_str()],
                inbox_row,
            )
            .optional()
        })
        .await
    }

    async fn stream_head(&self, user: UserId, source_partition: i32) -> StoreResult<Option<i64>> {
        Ok(self.stream_heads(&[(user, source_partition)]).await?.pop().flatten())
    }

    async fn stream_messages(&self, user: UserId, message: MessageId) -> StoreResult<Vec<(i64, StreamMark)>> {
        self.read(move |c| {
            let mut st = c.prepare_cached("SELECT seq, mark FROM stream_messages WHERE user_id = ?1 AND message_id = ?2 ORDER BY seq")?;
            let rows = st.query_map(params![user.to_string(), message.to_string()], |r| Ok((r.get(0)?, StreamMark::from_code(r.get(1)?))))?.collect();
            rows
        })
        .await
    }

    async fn message_count_row(&self, key: &MessageCountKey) -> StoreResult<Option<(i64, i64)>> {
        let key = key.clone();
        self.read(move |c| {
            c.row(
                "SELECT messages, applied_offset FROM analytics_message_counts WHERE day = ?1 AND kind = ?2 AND scope = ?3 AND part = ?4",
                params![day_text(key.day), key.kind, key.scope, key.partition],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
        })
        .await
    }

    async fn inbox_rows(&self, keys: &[(UserId, ConversationId)]) -> StoreResult<Vec<Option<InboxRow>>> {
        let keys = keys.to_vec();
        self.read(move |conn| {
            let mut st = conn.prepare_cached(&format!("SELECT {INBOX_COLS} FROM inbox WHERE user_id = ?1 AND conversation_id = ?2"))?;
            keys.iter().map(|(u, c)| st.query_row(params![u.to_string(), c.as_str()], inbox_row).optional()).collect()
        })
        .await
    }

    async fn stream_heads(&self, keys: &[(UserId, i32)]) -> StoreResult<Vec<Option<i64>>> {
        let keys = keys.to_vec();
        self.read(move |c| {
            let mut st = c.prepare_cached("SELECT position FROM stream_heads WHERE user_id = ?1 AND source_partition = ?2")?;
            keys.iter().map(|(u, p)| st.query_row(params![u.to_string(), p], |r| r.get(0)).optional()).collect()
        })
        .await
    }
}

#[async_trait]
impl ReadStore for SqliteStore {
    async fn history_page(&self, c: &ConversationId, before: Option<MessageId>, limit: usize) -> StoreResult<Vec<MessageRow>> {
        let c = c.clone();
        self.read(move |conn| {
            // 'g' sorts after every hex digit and '-': no canonical id is >= it.
            let before = before.map(|b| b.to_string()).unwrap_or_else(|| "g".into());
            let mut st = conn.prepare_cached(&format!(
                "SELECT {MESSAGE_COLS} FROM messages WHERE conversation_id = ?1 AND message_id < ?2 ORDER BY message_id DESC LIMIT ?3"
            ))?;
            let rows = st.query_map(params![c.as_str(), before, limit as i64], message_row)?;
            rows.collect()
        })
        .await
    }

    async fn inbox(&self, user: UserId, limit: usize) -> StoreResult<Vec<InboxRow>> {
        self.read(move |conn| {
            let mut st = conn.prepare_cached(&format!("SELECT {INBOX_COLS} FROM inbox WHERE user_id = ?1 LIMIT ?2"))?;
            let rows = st.query_map(params![user.to_string(), limit as i64], inbox_row)?;
            rows.collect()
        })
        .await
    }

    async fn find_message(&self, id: MessageId) -> StoreResult<Option<MessageMeta>> {
        self.read(move |c| {
            c.row(
                "SELECT conversation_id, sender, sent_at, position FROM message_index WHERE message_id = ?1",
                params![id.to_string()],
                |r| {
                    Ok(MessageMeta {
                        message_id: id,
                        conversation_id: conv_at(r, 0)?,
                        sender: UserId(uuid_at(r, 1)?),
                        sent_at: time(r.get(2)?)?,
                        position: r.get(3)?,
                    })
                },
            )
            .optional()
        })
        .await
    }

    async fn receipts(&self, message: MessageId) -> StoreResult<Vec<ReceiptRow>> {
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT message_id, recipient, status, device_id, at, conversation_id, sender FROM receipts WHERE message_id = ?1",
            )?;
            let rows = st.query_map(params![message.to_string()], |r| {
                Ok(ReceiptRow {
                    message_id: MessageId(uuid_at(r, 0)?),
                    sender: UserId(uuid_at(r, 6)?),
                    recipient: UserId(uuid_at(r, 1)?),
                    status: status_at(r, 2)?,
                    device_id: r.get(3)?,
                    at: time(r.get(4)?)?,
                    conversation_id: conv_at(r, 5)?,
                })
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })
        .await
        .map(first_transitions)
    }

    async fn stream_after(&self, user: UserId, after: i64, limit: usize) -> StoreResult<Vec<StreamRow>> {
        self.read(move |c| {
            let mut st = c.prepare_cached("SELECT seq, item_id, item FROM user_stream WHERE user_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3")?;
            let rows = st.query_map(params![user.to_string(), after, limit.min(10_000) as i64], |r| {
                Ok(StreamRow { seq: r.get(0)?, item_id: uuid_at(r, 1)?, item: r.get(2)? })
            })?;
            rows.collect()
        })
        .await
    }

    async fn unread_count(&self, user: UserId, cap: usize) -> StoreResult<usize> {
        self.read(move |c| {
            c.row(
                "SELECT COALESCE(SUM(unread), 0) FROM (SELECT unread FROM inbox WHERE user_id = ?1 LIMIT ?2)",
                params![user.to_string(), crate::UNREAD_SCAN_CONVERSATIONS as i64],
                |r| r.get::<_, i64>(0),
            )
        })
        .await
        .map(|n| (n.max(0) as usize).min(cap))
    }

    async fn last_seen(&self, user: UserId) -> StoreResult<Option<LastSeenRow>> {
        self.read(move |c| {
            c.row("SELECT status, changed_at, last_seen FROM last_seen WHERE user_id = ?1", params![user.to_string()], |r| {
                Ok(LastSeenRow {
                    user_id: user,
                    status: r.get(0)?,
                    changed_at: time(r.get(1)?)?,
                    last_seen: match r.get::<_, Option<i64>>(2)? {
                        Some(v) => Some(time(v)?),
                        None => None,
                    },
                })
            })
            .optional()
        })
        .await
    }

    async fn in_inbox(&self, user: UserId, c: &ConversationId) -> StoreResult<bool> {
        Ok(ProjectionStore::inbox_row(self, user, c).await?.is_some())
    }

    async fn media_positions(&self, media: Uuid, conv: &ConversationId) -> StoreResult<Vec<i64>> {
        let conv = conv.as_str().to_owned();
        self.read(move |c| {
            let mut st = c.prepare_cached("SELECT position FROM media_messages WHERE media_id = ?1 AND conversation_id = ?2 ORDER BY position")?;
            let rows = st.query_map(params![media.to_string(), conv], |r| r.get(0))?;
            rows.collect()
        })
        .await
    }

    async fn message_versions(&self, message: MessageId) -> StoreResult<Vec<(DateTime<Utc>, String)>> {
        self.read(move |c| {
            let mut st = c.prepare_cached("SELECT at, body FROM message_edits WHERE message_id = ?1 ORDER BY at")?;
            let rows = st.query_map(params![message.to_string()], |r| Ok((time(r.get(0)?)?, r.get(1)?)))?;
            rows.collect()
        })
        .await
    }

    async fn hidden_messages(&self, user: UserId, conv: &ConversationId, from: MessageId, to: MessageId) -> StoreResult<Vec<MessageId>> {
        let conv = conv.as_str().to_owned();
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT message_id FROM hidden_messages WHERE user_id = ?1 AND conversation_id = ?2 AND message_id >= ?3 AND message_id <= ?4",
            )?;
            let rows = st.query_map(params![user.to_string(), conv, from.to_string(), to.to_string()], |r| Ok(MessageId(uuid_at(r, 0)?)))?;
            rows.collect()
        })
        .await
    }

    async fn reactions(&self, conv: &ConversationId, messages: &[MessageId], limit: usize) -> StoreResult<Vec<Reaction>> {
        let (Some(&from), Some(&to)) = (messages.iter().min(), messages.iter().max()) else { return Ok(Vec::new()) };
        let conv = conv.as_str().to_owned();
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT message_id, user_id, emoji FROM reactions WHERE conversation_id = ?1 AND message_id >= ?2 AND message_id <= ?3 AND emoji IS NOT NULL ORDER BY message_id LIMIT ?4",
            )?;
            let rows = st.query_map(params![conv, from.to_string(), to.to_string(), limit as i64], |r| {
                Ok(Reaction { message_id: MessageId(uuid_at(r, 0)?), user: UserId(uuid_at(r, 1)?), emoji: r.get(2)? })
            })?;
            rows.collect()
        })
        .await
    }

    async fn privacy(&self, user: UserId) -> StoreResult<Option<PrivacyRow>> {
        self.read(move |c| {
            c.row(
                "SELECT last_seen, photo, read_receipts, updated_at FROM privacy_settings WHERE user_id = ?1",
                params![user.to_string()],
                |r| {
                    Ok(PrivacyRow {
                        user_id: user,
                        last_seen: audience_at(r, 0)?,
                        photo: audience_at(r, 1)?,
                        read_receipts: audience_at(r, 2)?,
                        updated_at: time(r.get(3)?)?,
                    })
                },
            )
            .optional()
        })
        .await
    }

    async fn block(&self, user: UserId, target: UserId) -> StoreResult<Option<BlockRow>> {
        self.read(move |c| {
            c.row(
                "SELECT target, blocked, at FROM blocks WHERE user_id = ?1 AND target = ?2",
                params![user.to_string(), target.to_string()],
                |r| block_row(user, r),
            )
            .optional()
        })
        .await
    }

    async fn blocks(&self, user: UserId, limit: usize) -> StoreResult<Vec<BlockRow>> {
        self.read(move |c| {
            let mut st = c.prepare_cached("SELECT target, blocked, at FROM blocks WHERE user_id = ?1 AND blocked = 1 ORDER BY target LIMIT ?2")?;
            let rows = st.query_map(params![user.to_string(), limit.min(i64::MAX as usize) as i64], |r| block_row(user, r))?;
            rows.collect()
        })
        .await
    }
}

const FANOUT_MESSAGE_COLS: &str = "conversation_id, message_id, sender, position, recipients";

fn fanout_message_row(r: &Row<'_>) -> rusqlite::Result<FanoutMessage> {
    Ok(FanoutMessage {
        conversation_id: conv_at(r, 0)?,
        message_id: MessageId(uuid_at(r, 1)?),
        sender: UserId(uuid_at(r, 2)?),
        position: r.get(3)?,
        recipients: r.get(4)?,
    })
}

#[async_trait]
impl FanoutStore for SqliteStore {
    async fn send_record(&self, c: &ConversationId, sender: UserId, client_msg_id: &str) -> StoreResult<Option<SendRecord>> {
        Ok(self.send_records(&[(c.clone(), sender, client_msg_id.to_owned())]).await?.pop().flatten())
    }

    async fn send_records(&self, keys: &[(ConversationId, UserId, String)]) -> StoreResult<Vec<Option<SendRecord>>> {
        let keys = keys.to_vec();
        self.read(move |conn| {
            let mut st = conn.prepare_cached(
                "SELECT message_id, sent_at, content_sha256, position FROM sends WHERE sender = ?1 AND client_msg_id = ?2 AND conversation_id = ?3",
            )?;
            keys.iter()
                .map(|(c, sender, cmid)| {
                    st.query_row(params![sender.to_string(), cmid, c.as_str()], |r| {
                        Ok(SendRecord {
                            conversation_id: c.clone(),
                            sender: *sender,
                            client_msg_id: cmid.clone(),
                            message_id: MessageId(uuid_at(r, 0)?),
                            sent_at: time(r.get(1)?)?,
                            content_sha256: r.get(2)?,
                            position: r.get(3)?,
                        })
                    })
                    .optional()
                })
                .collect()
        })
        .await
    }

    async fn put_send_records(&self, records: &[SendRecord]) -> StoreResult<()> {
        let records = records.to_vec();
        self.write(move |t| {
            // The first accepted send of a key (the lowest position) stays, in any write order
            // (Cassandra: write time 2^62 - position).
            for r in &records {
                t.exec(
                    "INSERT INTO sends (sender, client_msg_id, conversation_id, message_id, sent_at, content_sha256, position) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                     ON CONFLICT (sender, client_msg_id, conversation_id) DO UPDATE SET
                       message_id = excluded.message_id, sent_at = excluded.sent_at, content_sha256 = excluded.content_sha256, position = excluded.position
                     WHERE excluded.position < sends.position",
                    params![r.sender.to_string(), r.client_msg_id, r.conversation_id.as_str(), r.message_id.to_string(), ms(&r.sent_at), r.content_sha256, r.position],
                )?;
            }
            Ok(())
        })
        .await
    }

    async fn fanout_group(&self, c: &ConversationId) -> StoreResult<Option<FanoutGroup>> {
        let c = c.clone();
        self.read(move |conn| {
            conn.row(
                "SELECT name, created_at, membership_version FROM fanout_groups WHERE conversation_id = ?1",
                params![c.as_str()],
                |r| Ok(FanoutGroup { conversation_id: c.clone(), name: r.get(0)?, created_at: r.get(1)?, membership_version: r.get(2)? }),
            )
            .optional()
        })
        .await
    }

    async fn put_fanout_group(&self, g: &FanoutGroup) -> StoreResult<()> {
        let g = g.clone();
        self.write(move |t| {
            t.prepare_cached("INSERT OR REPLACE INTO fanout_groups (conversation_id, name, created_at, membership_version) VALUES (?1, ?2, ?3, ?4)")?
                .execute(params![g.conversation_id.as_str(), g.name, g.created_at, g.membership_version])?;
            Ok(())
        })
        .await
    }

    async fn fanout_members(&self, c: &ConversationId) -> StoreResult<Vec<MemberInterval>> {
        let c = c.clone();
        self.read(move |conn| {
            let mut st = conn.prepare_cached(
                "SELECT member, since, until, role FROM fanout_members WHERE conversation_id = ?1 ORDER BY member, since",
            )?;
            let rows = st.query_map(params![c.as_str()], |r| {
                Ok(MemberInterval { member: UserId(uuid_at(r, 0)?), since: r.get(1)?, until: r.get(2)?, role: role_at(r, 3)? })
            })?;
            rows.collect()
        })
        .await
    }

    async fn put_fanout_member(&self, c: &ConversationId, m: &MemberInterval) -> StoreResult<()> {
        let (c, m) = (c.clone(), m.clone());
        self.write(move |t| {
            // Cassandra's rule (write time `until` for a close, `since` for an open): the close
            // keeps its `until` whatever the order, and the write at the higher position decides
            // the role (equal write times: the greater value, as Cassandra breaks ties).
            let until = UNTIL_MERGE.replace("{t}", "fanout_members");
            t.prepare_cached(&format!(
                "INSERT INTO fanout_members (conversation_id, member, since, until, role) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT (conversation_id, member, since) DO UPDATE SET
                   until = {until},
                   role = CASE WHEN COALESCE(excluded.until, excluded.since) > COALESCE(fanout_members.until, fanout_members.since) THEN excluded.role
                               WHEN COALESCE(excluded.until, excluded.since) < COALESCE(fanout_members.until, fanout_members.since) THEN fanout_members.role
                               ELSE MAX(fanout_members.role, excluded.role) END"
            ))?
            .execute(params![c.as_str(), m.member.to_string(), m.since, m.until, m.role.as_str()])?;
            Ok(())
        })
        .await
    }

    async fn fanout_message(&self, c: &ConversationId, message: MessageId) -> StoreResult<Option<FanoutMessage>> {
        let c = c.clone();
        self.read(move |conn| {
            conn.row(
                &format!("SELECT {FANOUT_MESSAGE_COLS} FROM fanout_messages WHERE conversation_id = ?1 AND message_id = ?2"),
                params![c.as_str(), message.to_string()],
                fanout_message_row,
            )
            .optional()
        })
        .await
    }

    async fn put_fanout_message(&self, m: &FanoutMessage) -> StoreResult<()> {
        let m = m.clone();
        self.write(move |t| {
            t.prepare_cached(&format!("INSERT OR REPLACE INTO fanout_messages ({FANOUT_MESSAGE_COLS}) VALUES (?1, ?2, ?3, ?4, ?5)"))?
                .execute(params![m.conversation_id.as_str(), m.message_id.to_string(), m.sender.to_string(), m.position, m.recipients])?;
            Ok(())
        })
        .await
    }

    async fn fanout_messages_between(
        &self,
        c: &ConversationId,
        after: Option<MessageId>,
        up_to: MessageId,
    ) -> StoreResult<Vec<FanoutMessage>> {
        let c = c.clone();
        self.read(move |conn| {
            // As in messages_between: canonical UUID text sorts like the ids (UUIDv7: by time),
            // and '' sorts before every id.
            let after = after.map(|a| a.to_string()).unwrap_or_default();
            let mut st = conn.prepare_cached(&format!(
                "SELECT {FANOUT_MESSAGE_COLS} FROM fanout_messages WHERE conversation_id = ?1 AND message_id > ?2 AND message_id <= ?3 ORDER BY message_id ASC"
            ))?;
            let rows = st.query_map(params![c.as_str(), after, up_to.to_string()], fanout_message_row)?;
            rows.collect()
        })
        .await
    }

    async fn add_fanout_ack(&self, message: MessageId, status: ReceiptStatus, member: UserId) -> StoreResult<()> {
        self.write(move |t| {
            t.prepare_cached("INSERT OR IGNORE INTO fanout_acks (message_id, status, member) VALUES (?1, ?2, ?3)")?
                .execute(params![message.to_string(), status.as_str(), member.to_string()])?;
            Ok(())
        })
        .await
    }

    async fn fanout_ack_count(&self, message: MessageId, status: ReceiptStatus) -> StoreResult<usize> {
        self.read(move |c| {
            c.row(
                "SELECT COUNT(*) FROM fanout_acks WHERE message_id = ?1 AND status = ?2",
                params![message.to_string(), status.as_str()],
                |r| r.get::<_, i64>(0),
            )
        })
        .await
        .map(|n| n.max(0) as usize)
    }

    async fn fanout_read_marker(&self, c: &ConversationId, reader: UserId) -> StoreResult<Option<(MessageId, i64)>> {
        let c = c.clone();
        self.read(move |conn| {
            conn.row(
                "SELECT up_to, position FROM fanout_read_markers WHERE conversation_id = ?1 AND reader = ?2",
                params![c.as_str(), reader.to_string()],
                |r| Ok((MessageId(uuid_at(r, 0)?), r.get(1)?)),
            )
            .optional()
        })
        .await
    }

    async fn put_fanout_read_marker(&self, c: &ConversationId, reader: UserId, up_to: MessageId, position: i64) -> StoreResult<()> {
        let c = c.clone();
        self.write(move |t| {
            t.prepare_cached("INSERT OR REPLACE INTO fanout_read_markers (conversation_id, reader, up_to, position) VALUES (?1, ?2, ?3, ?4)")?
                .execute(params![c.as_str(), reader.to_string(), up_to.to_string(), position])?;
            Ok(())
        })
        .await
    }

    async fn fanout_watermark(&self, topic: &str, partition: i32) -> StoreResult<Option<i64>> {
        let topic = topic.to_owned();
        self.read(move |conn| {
            conn.row("SELECT next FROM fanout_watermarks WHERE topic = ?1 AND partition = ?2", params![topic, partition], |r| r.get(0))
                .optional()
        })
        .await
    }

    async fn put_fanout_watermark(&self, topic: &str, partition: i32, next: i64) -> StoreResult<()> {
        let topic = topic.to_owned();
        self.write(move |t| {
            t.prepare_cached("INSERT OR REPLACE INTO fanout_watermarks (topic, partition, next) VALUES (?1, ?2, ?3)")?
                .execute(params![topic, partition, next])?;
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl GroupStore for SqliteStore {
    async fn group(&self, c: &ConversationId) -> StoreResult<Option<GroupRow>> {
        let c = c.clone();
        self.read(move |conn| {
            conn.row(
                "SELECT name, creator, created_at, position FROM groups WHERE conversation_id = ?1 AND creator IS NOT NULL",
                params![c.as_str()],
                |r| {
                    Ok(GroupRow {
                        conversation_id: c.clone(),
                        name: r.get(0)?,
                        creator: UserId(uuid_at(r, 1)?),
                        created_at: time(r.get(2)?)?,
                        position: r.get(3)?,
                    })
                },
            )
            .optional()
        })
        .await
    }

    async fn group_members(&self, c: &ConversationId) -> StoreResult<Vec<GroupMemberRow>> {
        let c = c.clone();
        self.read(move |conn| {
            let mut st = conn.prepare_cached(
                "SELECT member, role, active, position FROM group_members WHERE conversation_id = ?1 ORDER BY member",
            )?;
            let rows = st.query_map(params![c.as_str()], |r| {
                Ok(GroupMemberRow {
                    conversation_id: c.clone(),
                    member: UserId(uuid_at(r, 0)?),
                    role: role_at(r, 1)?,
                    active: r.get(2)?,
                    position: r.get(3)?,
                })
            })?;
            rows.collect()
        })
        .await
    }

    async fn group_member(&self, c: &ConversationId, user: UserId) -> StoreResult<Option<GroupMemberRow>> {
        let c = c.clone();
        self.read(move |conn| {
            conn.row(
                "SELECT role, active, position FROM group_members WHERE conversation_id = ?1 AND member = ?2",
                params![c.as_str(), user.to_string()],
                |r| Ok(GroupMemberRow { conversation_id: c.clone(), member: user, role: role_at(r, 0)?, active: r.get(1)?, position: r.get(2)? }),
            )
            .optional()
        })
        .await
    }

    async fn user_groups(&self, user: UserId) -> StoreResult<Vec<UserGroupRow>> {
        self.read(move |conn| {
            let mut st = conn.prepare_cached(
                "SELECT conversation_id, role, active, position FROM user_groups WHERE user_id = ?1 ORDER BY conversation_id",
            )?;
            let rows = st.query_map(params![user.to_string()], |r| {
                Ok(UserGroupRow { user_id: user, conversation_id: conv_at(r, 0)?, role: role_at(r, 1)?, active: r.get(2)?, position: r.get(3)? })
            })?;
            rows.collect()
        })
        .await
    }

    async fn user_group_intervals(&self, user: UserId, c: &ConversationId) -> StoreResult<Vec<(i64, Option<i64>)>> {
        let c = c.clone();
        self.read(move |conn| {
            let mut st = conn.prepare_cached(
                "SELECT since, until FROM user_group_intervals WHERE user_id = ?1 AND conversation_id = ?2 ORDER BY since",
            )?;
            let rows = st.query_map(params![user.to_string(), c.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
        .await
    }
}

#[async_trait]
impl InsightStore for SqliteStore {
    async fn set_role(&self, user: UserId, role: &str, granted: bool) -> StoreResult<()> {
        let role = role.to_owned();
        self.write_synced(move |t| {
            let sql = if granted {
                "INSERT OR IGNORE INTO user_roles (user_id, role) VALUES (?1, ?2)"
            } else {
                "DELETE FROM user_roles WHERE user_id = ?1 AND role = ?2"
            };
            t.prepare_cached(sql)?.execute(params![user.to_string(), role])?;
            Ok(())
        })
        .await
    }

    async fn roles(&self, user: UserId) -> StoreResult<Vec<String>> {
        self.read(move |c| {
            let mut st = c.prepare_cached("SELECT role FROM user_roles WHERE user_id = ?1 ORDER BY role")?;
            let rows = st.query_map(params![user.to_string()], |r| r.get(0))?;
            rows.collect()
        })
        .await
    }

    async fn revoke_sessions(&self, user: UserId, at: DateTime<Utc>) -> StoreResult<()> {
        self.commands.revoke_sessions(user, at).await
    }

    async fn revocations_since(&self, since: DateTime<Utc>) -> StoreResult<Vec<(UserId, DateTime<Utc>)>> {
        self.commands.revocations_since(since).await
    }

    async fn profile(&self, user: UserId) -> StoreResult<Option<ProfileRow>> {
        self.read(move |c| {
            c.row(
                "SELECT display_name, avatar_media_id, updated_at FROM profiles WHERE user_id = ?1",
                params![user.to_string()],
                |r| {
                    Ok(ProfileRow {
                        user_id: user,
                        display_name: r.get(0)?,
                        avatar_media_id: match r.get::<_, Option<String>>(1)? {
                            Some(a) => Some(Uuid::parse_str(&a).map_err(conversion)?),
                            None => None,
                        },
                        updated_at: time(r.get(2)?)?,
                    })
                },
            )
            .optional()
        })
        .await
    }

    async fn message_counts(&self, from: NaiveDate, to: NaiveDate) -> StoreResult<Vec<MessageCount>> {
        let mut rows = self
            .read(move |c| {
                let mut st = c.prepare_cached(
                    "SELECT day, kind, scope, SUM(messages) FROM analytics_message_counts WHERE day >= ?1 AND day <= ?2 GROUP BY day, kind, scope HAVING SUM(messages) > 0",
                )?;
                let rows = st.query_map(params![day_text(from), day_text(to)], |r| {
                    Ok(MessageCount { day: day_at(r, 0)?, kind: r.get(1)?, scope: r.get(2)?, messages: count_at(r, 3)? })
                })?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        sort_message_counts(&mut rows);
        Ok(rows)
    }

    async fn active_users(&self, from: NaiveDate, to: NaiveDate) -> StoreResult<Vec<(NaiveDate, u64)>> {
        self.read(move |c| {
            let mut st = c.prepare_cached(
                "SELECT day, COUNT(*) FROM analytics_active_users WHERE day >= ?1 AND day <= ?2 GROUP BY day ORDER BY day",
            )?;
            let rows = st.query_map(params![day_text(from), day_text(to)], |r| Ok((day_at(r, 0)?, count_at(r, 1)?)))?;
            rows.collect()
        })
        .await
    }

    async fn profile_views(&self, viewed: UserId, from: NaiveDate, to: NaiveDate) -> StoreResult<Vec<ProfileViews>> {
        let rows = self
            .read(move |c| {
                let mut st = c.prepare_cached(
                    "SELECT day, viewer, COUNT(*) FROM analytics_profile_views WHERE viewed = ?1 AND day >= ?2 AND day <= ?3 GROUP BY day, viewer",
                )?;
                let rows = st.query_map(params![viewed.to_string(), day_text(from), day_text(to)], |r| {
                    Ok((day_at(r, 0)?, UserId(uuid_at(r, 1)?), count_at(r, 2)?))
                })?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        Ok(profile_views_from(rows))
    }

    async fn topic_counts(&self, from: NaiveDate, to: NaiveDate) -> StoreResult<Vec<TopicCount>> {
        let mut rows = self
            .read(move |c| {
                let mut st = c.prepare_cached(
                    "SELECT day, topic, COUNT(*), COUNT(DISTINCT sender) FROM analytics_topics WHERE day >= ?1 AND day <= ?2 GROUP BY day, topic",
                )?;
                let rows = st.query_map(params![day_text(from), day_text(to)], |r| {
                    Ok(TopicCount { day: day_at(r, 0)?, topic: r.get(1)?, messages: count_at(r, 2)?, users: count_at(r, 3)? })
                })?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        sort_topic_counts(&mut rows);
        Ok(rows)
    }

    async fn receipts_of_user(&self, user: UserId, from: DateTime<Utc>, to: DateTime<Utc>) -> StoreResult<Vec<ReceiptRow>> {
        let mut rows = self
            .read(move |c| {
                // As on Cassandra: a receipt is never earlier than its message, so the key's
                // message-id order bounds the scan and `at` is a filter. No index on `at`: it
                // cost every receipt a second B-tree page (two per message), for a read only
                // auditors make.
                let mut st = c.prepare_cached(
                    "SELECT message_id, status, device_id, at, conversation_id, sender FROM receipts_by_user
                     WHERE recipient = ?1 AND message_id <= ?2 AND at >= ?3 AND at < ?4",
                )?;
                let upto = crate::max_v7(to.timestamp_millis()).to_string();
                let rows = st.query_map(params![user.to_string(), upto, ceil_ms(&from), ceil_ms(&to)], |r| {
                    Ok(ReceiptRow {
                        message_id: MessageId(uuid_at(r, 0)?),
                        sender: UserId(uuid_at(r, 5)?),
                        recipient: user,
                        status: status_at(r, 1)?,
                        device_id: r.get(2)?,
                        at: time(r.get(3)?)?,
                        conversation_id: conv_at(r, 4)?,
                    })
                })?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
            })
            .await?;
        sort_receipts_of_user(&mut rows);
        Ok(rows)
    }
}

#[async_trait]
impl TableAdmin for SqliteStore {
    async fn migrate(&self) -> StoreResult<()> {
        self.commands.migrate().await?;
        self.write_synced(|t| t.execute_batch(SCHEMA)).await
    }

    async fn projection_layout(&self) -> StoreResult<u32> {
        self.read(|c| c.row("SELECT version FROM layout WHERE name = 'projections'", [], |r| r.get::<_, u32>(0)).optional())
            .await
            .map(|v| v.unwrap_or(1))
    }

    async fn reset_projections(&self) -> StoreResult<()> {
        self.write_synced(|t| {
            for table in PROJECTION_TABLES.iter().chain(RETIRED_PROJECTION_TABLES) {
                t.execute(&format!("DROP TABLE IF EXISTS {table}"), [])?;
            }
            t.execute_batch(SCHEMA)?;
            set_layout(t)
        })
        .await
    }

    async fn replace_projections(&self, place: &str) -> StoreResult<()> {
        let from = Path::new(place).join("tables.db");
        if !from.is_file() {
            return Err(data(format!("no rebuilt tables at {}", from.display())));
        }
        let layout = {
            let path = from.clone();
            tokio::task::spawn_blocking(move || {
                open_sqlite(&path, false)?.row("SELECT version FROM layout WHERE name = 'projections'", [], |r| r.get::<_, u32>(0))
            })
            .await
            .map_err(|e| data(e.to_string()))?
            .map_err(|e| data(format!("{}: {e}", from.display())))?
        };
        if layout != PROJECTION_LAYOUT {
            return Err(data(format!("{} holds projection layout {layout}, this version writes {PROJECTION_LAYOUT}", from.display())));
        }
        let _swapping = self.swap.write().await;
        self.write_synced(move |t| {
            let src = open_sqlite(&from, false)?;
            for table in PROJECTION_TABLES {
                t.execute(&format!("DELETE FROM {table}"), [])?;
                let mut select = src.prepare(&format!("SELECT * FROM {table}"))?;
                let n = select.column_count();
                let marks = vec!["?"; n].join(", ");
                let mut insert = t.prepare(&format!("INSERT INTO {table} VALUES ({marks})"))?;
                let mut rows = select.query([])?;
                while let Some(row) = rows.next()? {
                    let values = (0..n).map(|i| row.get::<_, rusqlite::types::Value>(i)).collect::<rusqlite::Result<Vec<_>>>()?;
                    insert.execute(rusqlite::params_from_iter(values))?;
                }
            }
            set_layout(t)
        })
        .await
    }

    async fn truncate_projections(&self) -> StoreResult<()> {
        self.write_synced(|t| {
            for table in PROJECTION_TABLES {
                t.execute(&format!("DELETE FROM {table}"), [])?;
            }
            Ok(())
        })
        .await
    }

    async fn tables_containing(&self, needle: &str) -> StoreResult<BTreeMap<String, u64>> {
        let needle = needle.to_owned();
        self.read(move |c| {
            let mut out = BTreeMap::new();
            for table in PROJECTION_TABLES {
                let n = table_rows_as_json(c, table)?.iter().filter(|r| !needle.is_empty() && r.contains(&needle)).count() as u64;
                if n > 0 {
                    out.insert((*table).to_owned(), n);
                }
            }
            Ok(out)
        })
        .await
    }

    async fn checksums(&self) -> StoreResult<BTreeMap<String, TableChecksum>> {
        self.read(|c| {
            let mut out = BTreeMap::new();
            for table in PROJECTION_TABLES {
                let mut rows = table_rows_as_json(c, table)?;
                rows.sort_unstable();
                let mut h = Sha256::new();
                for r in &rows {
                    h.update(r.as_bytes());
                    h.update(b"\n");
                }
                out.insert((*table).to_owned(), TableChecksum { rows: rows.len() as u64, sha256: hex::encode(h.finalize()) });
            }
            Ok(out)
        })
        .await
    }

    /// Reads answer and writes go through (the last commit of each file succeeded, and
    /// `tables.db` lost no answered write since the last [`Durable::recover`]).
    async fn ping(&self) -> bool {
        self.tables.probe().await && self.read(|c| c.row("SELECT 1", [], |r| r.get::<_, i64>(0))).await.is_ok() && self.commands.ping().await
    }
}

#[async_trait]
impl Durable for SqliteStore {
    fn lost(&self) -> bool {
        self.tables.lost()
    }

    fn recover(&self) {
        self.tables.recover()
    }

    async fn sync(&self) -> StoreResult<()> {
        // A synced commit of one small row: syncing the WAL syncs every commit before it.
        Ok(self
            .tables
            .write(Lane::Sync, |t, _| {
                t.exec("INSERT INTO sync_marks (id, n) VALUES (1, 1) ON CONFLICT (id) DO UPDATE SET n = n + 1", [])?;
                Ok(())
            })
            .await?)
    }

    fn sync_every(&self) -> std::time::Duration {
        TABLES_SYNC_EVERY
    }

}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("chat-store-{tag}-{}", Uuid::new_v4().simple()))
    }

    #[tokio::test]
    async fn replace_projections_takes_the_rebuilt_rows_and_keeps_the_rest() {
        let (live_dir, rebuilt_dir) = (scratch("live"), scratch("rebuilt"));
        let live = SqliteStore::open(&live_dir).expect("live");
        let rebuilt = SqliteStore::open(&rebuilt_dir).expect("rebuilt");
        live.write_synced(|t| {
            t.execute("INSERT INTO users VALUES ('u1', 'stale', 1)", [])?;
            t.execute("INSERT INTO last_seen VALUES ('u1', 'online', 1, NULL)", [])?;
            t.execute("INSERT INTO sends VALUES ('u1', 'c1', 'd.u1.u2', 'm1', 1, 'x', 7)", [])?;
            Ok(())
        })
        .await
        .expect("live rows");
        rebuilt
            .write_synced(|t| {
                t.execute("INSERT INTO users VALUES ('u1', 'alice', 1)", [])?;
                t.execute("INSERT INTO users VALUES ('u2', 'bob', 2)", [])?;
                Ok(())
            })
            .await
            .expect("rebuilt rows");
        assert_ne!(live.checksums().await.expect("sums"), rebuilt.checksums().await.expect("sums"));

        live.replace_projections(&rebuilt_dir.display().to_string()).await.expect("replace");
        assert_eq!(live.checksums().await.expect("sums"), rebuilt.checksums().await.expect("sums"), "every projection table as rebuilt");
        let names = live.read(|c| c.prepare("SELECT username FROM users ORDER BY user_id")?.query_map([], |r| r.get::<_, String>(0))?.collect::<rusqlite::Result<Vec<_>>>()).await;
        assert_eq!(names.expect("users"), ["alice", "bob"]);
        let sends = live.read(|c| c.row("SELECT count(*) FROM sends", [], |r| r.get::<_, i64>(0))).await.expect("sends");
        assert_eq!(sends, 1, "the fan-out's state (not a projection) is kept");

        let missing = live.replace_projections(&scratch("missing").display().to_string()).await;
        assert!(matches!(missing, Err(StoreError::Data(_))), "{missing:?}");
        let _ = std::fs::remove_dir_all(&live_dir);
        let _ = std::fs::remove_dir_all(&rebuilt_dir);
    }
}
