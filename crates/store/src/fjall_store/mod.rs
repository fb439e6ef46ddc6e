//! The projection tables and the fan-out's state on `fjall`, an LSM tree (the embedded
//! alternative to `tables.db`; the command side stays on SQLite's `commands.db`).
//!
//! Why an LSM: a SQLite transaction rewrites every page it touched, and one message's rows land
//! on ~8 pages spread over the B-trees, so the tables' writer wrote 15–33 KB per message at
//! 1,000 msgs/s; an LSM writes each row to its journal and again, compressed, at flush and
//! compaction, ~7 KB per message at any rate (docs/benchmarks.md, "Storage engines for the
//! projection tables, measured").
//!
//! - One keyspace per table, named like the table. Keys are the table's primary key in an
//!   order-preserving encoding ([`Key`]: ids as 16 bytes, integers big-endian with the sign bit
//!   flipped, text escaped and terminated), so a partition is a key prefix and a clustering
//!   range a key range. Values are the other columns, length-prefixed ([`Val`]).
//! - One write path, serialised by a mutex: a list of writes (or a fan-out state write) reads
//!   the rows its merge rules need (earliest receipt, highest position, latest presence, ...),
//!   then commits one write batch across keyspaces: atomic, and visible to readers at once.
//!   Batches go to the journal (the OS) when committed, so they survive a crash of the process;
//!   [`Durable::sync`] fsyncs the journal, and workers store offsets only after it, as with
//!   `tables.db`.
//! - Reads run on the caller's thread: point reads and short range scans of memtables and
//!   cached blocks.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chat_events::{Audience, ConversationId, GroupRole, MessageId, ReceiptStatus, UserId};
use chrono::{DateTime, Datelike, NaiveDate, Utc};
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::insights::{first_transitions, profile_views_from, sort_message_counts, sort_receipts_of_user, sort_topic_counts};
use crate::sqlite_store::SqliteCommands;
use crate::*;

pub mod convert;

/// Tables that are not projections (never truncated by a rebuild): the fan-out's state, roles,
/// the layout.
const STATE_TABLES: &[&str] = &[
    "sends",
    "fanout_groups",
    "fanout_members",
    "fanout_messages",
    "fanout_acks",
    "fanout_read_markers",
    "fanout_watermarks",
    "user_roles",
    "meta",
];

/// The directory of the fjall database inside a data directory.
pub const TABLES_DIR: &str = "tables";

/// How often workers sync the journal (an fsync of the journal's tail; nothing else waits on it).
/// A crash replays at most about this much of the log into the tables.
const SYNC_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

// ---------------------------------------------------------------------------------------------
// Encodings

/// An order-preserving key: components compare like the columns of the table's primary key.
#[derive(Default)]
struct Key(Vec<u8>);

impl Key {
    fn new() -> Self {
        Key(Vec::with_capacity(48))
    }
    fn u(mut self, u: Uuid) -> Self {
        self.0.extend_from_slice(u.as_bytes());
        self
    }
    /// Text: 0x00 escaped as 0x00 0xff, terminated by 0x00 0x01 (so a shorter text sorts first
    /// and a text component is never a prefix of another).
    fn s(mut self, s: &str) -> Self {
        for &b in s.as_bytes() {
            self.0.push(b);
            if b == 0 {
                self.0.push(0xff);
            }
        }
        self.0.extend_from_slice(&[0, 1]);
        self
    }
    fn i(mut self, n: i64) -> Self {
        self.0.extend_from_slice(&((n as u64) ^ (1 << 63)).to_be_bytes());
        self
    }
    fn conv(self, c: &ConversationId) -> Self {
        self.s(c.as_str())
    }
    fn day(self, d: NaiveDate) -> Self {
        self.i(i64::from(d.num_days_from_ce()))
    }
    fn done(self) -> Vec<u8> {
        self.0
    }
}

/// Reads a [`Key`] back, component by component.
struct KeyReader<'a>(&'a [u8]);

impl KeyReader<'_> {
    fn u(&mut self) -> StoreResult<Uuid> {
        let (head, rest) = self.0.split_at_checked(16).ok_or_else(|| data("key: short id"))?;
        self.0 = rest;
        Uuid::from_slice(head).map_err(data)
    }
    fn s(&mut self) -> StoreResult<String> {
        let mut out = Vec::new();
        let mut i = 0;
        loop {
            match (self.0.get(i), self.0.get(i + 1)) {
                (Some(0), Some(1)) => break,
                (Some(0), Some(0xff)) => {
                    out.push(0);
                    i += 2;
                }
                (Some(&b), _) => {
                    out.push(b);
                    i += 1;
                }
                (None, _) => return Err(data("key: unterminated text")),
            }
        }
        self.0 = &self.0[i + 2..];
        String::from_utf8(out).map_err(data)
    }
    fn i(&mut self) -> StoreResult<i64> {
        let (head, rest) = self.0.split_at_checked(8).ok_or_else(|| data("key: short integer"))?;
        self.0 = rest;
        let mut b = [0u8; 8];
        b.copy_from_slice(head);
        Ok((u64::from_be_bytes(b) ^ (1 << 63)) as i64)
    }
    fn conv(&mut self) -> StoreResult<ConversationId> {
        self.s()?.parse().map_err(|e| data(format!("key: conversation id: {e}")))
    }
    fn day(&mut self) -> StoreResult<NaiveDate> {
        let n = self.i()?;
        i32::try_from(n).ok().and_then(NaiveDate::from_num_days_from_ce_opt).ok_or_else(|| data(format!("key: bad day {n}")))
    }
}

/// A row's other columns: fixed-size integers and ids, length-prefixed text, tagged options.
#[derive(Default)]
struct Val(Vec<u8>);

impl Val {
    fn new() -> Self {
        Val(Vec::with_capacity(64))
    }
    fn u(mut self, u: Uuid) -> Self {
        self.0.extend_from_slice(u.as_bytes());
        self
    }
    fn s(mut self, s: &str) -> Self {
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    fn i(mut self, n: i64) -> Self {
        self.0.extend_from_slice(&n.to_le_bytes());
        self
    }
    fn b(mut self, v: bool) -> Self {
        self.0.push(u8::from(v));
        self
    }
    fn t(self, t: &DateTime<Utc>) -> Self {
        self.i(ms(t))
    }
    fn oi(mut self, n: Option<i64>) -> Self {
        match n {
            Some(n) => {
                self.0.push(1);
                self.i(n)
            }
            None => {
                self.0.push(0);
                self
            }
        }
    }
    fn os(mut self, s: Option<&str>) -> Self {
        match s {
            Some(s) => {
                self.0.push(1);
                self.s(s)
            }
            None => {
                self.0.push(0);
                self
            }
        }
    }
    fn ou(mut self, u: Option<Uuid>) -> Self {
        match u {
            Some(u) => {
                self.0.push(1);
                self.u(u)
            }
            None => {
                self.0.push(0);
                self
            }
        }
    }
    fn done(self) -> Vec<u8> {
        self.0
    }
}

/// Reads a [`Val`] back.
struct ValReader<'a>(&'a [u8]);

impl ValReader<'_> {
    fn take(&mut self, n: usize) -> StoreResult<&[u8]> {
        let (head, rest) = self.0.split_at_checked(n).ok_or_else(|| data("value: short row"))?;
        self.0 = rest;
        Ok(head)
    }
    fn u(&mut self) -> StoreResult<Uuid> {
        Uuid::from_slice(self.take(16)?).map_err(data)
    }
    fn s(&mut self) -> StoreResult<String> {
        let mut n = [0u8; 4];
        n.copy_from_slice(self.take(4)?);
        let bytes = self.take(u32::from_le_bytes(n) as usize)?.to_vec();
        String::from_utf8(bytes).map_err(data)
    }
    fn i(&mut self) -> StoreResult<i64> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(i64::from_le_bytes(b))
    }
    fn b(&mut self) -> StoreResult<bool> {
        Ok(self.take(1)?[0] != 0)
    }
    fn t(&mut self) -> StoreResult<DateTime<Utc>> {
        time(self.i()?)
    }
    fn tag(&mut self) -> StoreResult<bool> {
        self.b()
    }
    fn oi(&mut self) -> StoreResult<Option<i64>> {
        Ok(if self.tag()? { Some(self.i()?) } else { None })
    }
    fn os(&mut self) -> StoreResult<Option<String>> {
        Ok(if self.tag()? { Some(self.s()?) } else { None })
    }
    fn ou(&mut self) -> StoreResult<Option<Uuid>> {
        Ok(if self.tag()? { Some(self.u()?) } else { None })
    }
}

fn data(e: impl std::fmt::Display) -> StoreError {
    StoreError::Data(e.to_string())
}

fn unavailable(e: fjall::Error) -> StoreError {
    StoreError::Unavailable(format!("tables: {e}"))
}

fn ms(t: &DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

/// The first whole millisecond at or after `t` (see the SQLite back-end).
fn ceil_ms(t: &DateTime<Utc>) -> i64 {
    ms(t) + i64::from(!t.timestamp_subsec_nanos().is_multiple_of(1_000_000))
}

fn time(v: i64) -> StoreResult<DateTime<Utc>> {
    DateTime::from_timestamp_millis(v).ok_or_else(|| data(format!("bad time {v}")))
}

fn status(s: &str) -> StoreResult<ReceiptStatus> {
    ReceiptStatus::parse(s).ok_or_else(|| data(format!("bad receipt status {s:?}")))
}

fn role(s: &str) -> StoreResult<GroupRole> {
    GroupRole::parse(s).ok_or_else(|| data(format!("bad group role {s:?}")))
}

fn audience(s: &str) -> StoreResult<Audience> {
    Audience::parse(s).ok_or_else(|| data(format!("bad audience {s:?}")))
}

/// The key just past every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// The store

struct Inner {
    db: Database,
    spaces: HashMap<&'static str, Keyspace>,
    /// Serialises writers: read-modify-write rules read the rows as the last commit left them.
    writer: Mutex<()>,
}

/// The embedded tables on fjall, with the command side on SQLite (`commands.db`).
#[derive(Clone)]
pub struct FjallStore {
    commands: SqliteCommands,
    shared: Arc<Shared>,
}

struct Shared {
    path: PathBuf,
    /// The open database; replaced by [`Durable::recover`] after a failed write.
    inner: std::sync::RwLock<Option<Arc<Inner>>>,
    /// A write or sync failed: fjall refuses every later write of this instance (it is
    /// poisoned), and writes answered before may not be on disk. Workers stop; `recover` opens
    /// the database again (its journal replayed) and they resume from their stored offsets.
    failed: std::sync::atomic::AtomicBool,
    /// Reads and writes hold it shared; [`TableAdmin::replace_projections`] exclusively.
    swap: tokio::sync::RwLock<()>,
}

/// A write in progress: the batch, and the rows it already wrote (a merge rule must see them;
/// the batch is not readable).
struct Tx<'a> {
    inner: &'a Inner,
    batch: fjall::OwnedWriteBatch,
    pending: HashMap<(&'static str, Vec<u8>), Option<Vec<u8>>>,
}

impl Tx<'_> {
    fn space(&self, table: &'static str) -> StoreResult<&Keyspace> {
        self.inner.spaces.get(table).ok_or_else(|| data(format!("no table {table}")))
    }
    fn get(&self, table: &'static str, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        if let Some(v) = self.pending.get(&(table, key.to_vec())) {
            return Ok(v.clone());
        }
        Ok(self.space(table)?.get(key).map_err(unavailable)?.map(|v| v.to_vec()))
    }
    fn put(&mut self, table: &'static str, key: Vec<u8>, value: Vec<u8>) -> StoreResult<()> {
        let ks = self.space(table)?.clone();
        self.pending.insert((table, key.clone()), Some(value.clone()));
        self.batch.insert(&ks, key, value);
        Ok(())
    }
    /// The keys starting with `prefix`, the batch's own puts and deletes included.
    fn keys_with_prefix(&self, table: &'static str, prefix: &[u8]) -> StoreResult<std::collections::BTreeSet<Vec<u8>>> {
        let mut keys = std::collections::BTreeSet::new();
        for g in self.space(table)?.prefix(prefix) {
            keys.insert(g.key().map_err(unavailable)?.to_vec());
        }
        for ((t, k), v) in &self.pending {
            if *t == table && k.starts_with(prefix) {
                if v.is_some() {
                    keys.insert(k.clone());
                } else {
                    keys.remove(k);
                }
            }
        }
        Ok(keys)
    }
    fn del(&mut self, table: &'static str, key: Vec<u8>) -> StoreResult<()> {
        let ks = self.space(table)?.clone();
        self.pending.insert((table, key.clone()), None);
        self.batch.remove(&ks, key);
        Ok(())
    }
}

/// Every keyspace: the projection tables and the state tables.
fn table_names() -> impl Iterator<Item = &'static str> {
    PROJECTION_TABLES.iter().chain(STATE_TABLES).copied()
}

impl FjallStore {
    /// Opens (or creates) `dir/commands.db` (SQLite) and `dir/tables/` (fjall).
    pub fn open(dir: &Path) -> StoreResult<Self> {
        let commands = SqliteCommands::open(dir)?;
        let path = dir.join(TABLES_DIR);
        let inner = open_inner(&path)?;
        let shared = Shared {
            path,
            inner: std::sync::RwLock::new(Some(Arc::new(inner))),
            failed: std::sync::atomic::AtomicBool::new(false),
            swap: tokio::sync::RwLock::new(()),
        };
        Ok(FjallStore { commands, shared: Arc::new(shared) })
    }

    /// The open database.
    fn inner(&self) -> StoreResult<Arc<Inner>> {
        self.shared.inner.read().unwrap_or_else(|p| p.into_inner()).clone().ok_or_else(|| StoreError::Unavailable("tables: being opened again".into()))
    }

    /// A failed write or sync: every later write fails until [`Durable::recover`].
    fn failed(&self, what: &str, e: fjall::Error) -> StoreError {
        self.shared.failed.store(true, std::sync::atomic::Ordering::SeqCst);
        tracing::error!(error = %e, "tables: {what} failed; writes are refused until the worker stages start again");
        StoreError::Lost(format!("tables: {what}: {e}"))
    }

    /// Runs `f` as one atomic batch, with the writer's lock held.
    fn write_now<R>(&self, f: impl FnOnce(&mut Tx<'_>) -> StoreResult<R>) -> StoreResult<R> {
        if self.lost() {
            return Err(StoreError::Lost("tables: an earlier write failed".into()));
        }
        let inner = self.inner()?;
        let _writer = inner.writer.lock().unwrap_or_else(|p| p.into_inner());
        // `Buffer`: the batch leaves fjall's journal buffer with its commit, so a killed process
        // loses no committed batch (as with SQLite's WAL); a power loss can take back what was
        // not persisted yet, which `Durable::sync` bounds.
        let batch = inner.db.batch().durability(Some(PersistMode::Buffer));
        let mut tx = Tx { inner: &inner, batch, pending: HashMap::new() };
        let out = f(&mut tx)?;
        if !tx.pending.is_empty() {
            tx.batch.commit().map_err(|e| self.failed("a commit", e))?;
        }
        Ok(out)
    }

    /// A write, on the blocking pool: a commit may wait for fjall (a write stall while memtables
    /// are flushed, the journal's `write`), and the async workers must keep serving meanwhile.
    async fn write<R: Send + 'static>(&self, f: impl FnOnce(&mut Tx<'_>) -> StoreResult<R> + Send + 'static) -> StoreResult<R> {
        let _not_swapping = self.shared.swap.read().await;
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.write_now(f)).await.map_err(|e| StoreError::Unavailable(format!("tables: {e}")))?
    }

    fn get(&self, table: &'static str, key: &[u8]) -> StoreResult<Option<Vec<u8>>> {
        let inner = self.inner()?;
        let ks = inner.spaces.get(table).ok_or_else(|| data(format!("no table {table}")))?;
        Ok(ks.get(key).map_err(unavailable)?.map(|v| v.to_vec()))
    }

    /// Rows whose key starts with `prefix` and lies in `[from, to)` (`None`: the prefix's own
    /// bounds), in key order or reversed, at most `limit`.
    fn scan(
        &self,
        table: &'static str,
        prefix: &[u8],
        from: Option<Vec<u8>>,
        to: Option<Vec<u8>>,
        reverse: bool,
        limit: usize,
    ) -> StoreResult<Vec<(Vec<u8>, Vec<u8>)>> {
        use std::ops::Bound;
        let inner = self.inner()?;
        let ks = inner.spaces.get(table).ok_or_else(|| data(format!("no table {table}")))?;
        let lo = Bound::Included(from.unwrap_or_else(|| prefix.to_vec()));
        let hi = match to.or_else(|| prefix_end(prefix)) {
            Some(end) => Bound::Excluded(end),
            None => Bound::Unbounded,
        };
        let iter = ks.range::<Vec<u8>, _>((lo, hi));
        let mut out = Vec::new();
        let mut push = |g: fjall::Guard| -> StoreResult<bool> {
            let (k, v) = g.into_inner().map_err(unavailable)?;
            out.push((k.to_vec(), v.to_vec()));
            Ok(out.len() < limit)
        };
        if limit == 0 {
            return Ok(out);
        }
        if reverse {
            for g in iter.rev() {
                if !push(g)? {
                    break;
                }
            }
        } else {
            for g in iter {
                if !push(g)? {
                    break;
                }
            }
        }
        Ok(out)
    }

    fn prefix(&self, table: &'static str, prefix: &[u8]) -> StoreResult<Vec<(Vec<u8>, Vec<u8>)>> {
        self.scan(table, prefix, None, None, false, usize::MAX)
    }

    /// Makes every batch committed so far durable.
    async fn persist(&self) -> StoreResult<()> {
        if self.lost() {
            return Err(StoreError::Lost("tables: an earlier write failed".into()));
        }
        let inner = self.inner()?;
        tokio::task::spawn_blocking(move || inner.db.persist(PersistMode::SyncAll))
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?
            .map_err(|e| self.failed("a sync", e))
    }
}

impl Inner {
    /// Records the projections' layout, synced.
    fn set_layout(&self, layout: u32) -> StoreResult<()> {
        let mut batch = self.db.batch();
        batch.insert(&self.spaces["meta"], Key::new().s("projections").done(), Val::new().i(i64::from(layout)).done());
        batch.commit().map_err(unavailable)?;
        self.db.persist(PersistMode::SyncAll).map_err(unavailable)
    }
}

/// A keyspace's memtable is sealed and flushed at this size (fjall's default is 64 MiB): smaller
/// flushes spread the work of compressing and writing a table over the run instead of taking a
/// core for a moment (benchmarks.md: send -> deliver p99 at 4,000/s, 8 / 16 / 64 MiB).
const MEMTABLE_BYTES: u64 = 16 * 1024 * 1024;

fn keyspace_options() -> KeyspaceCreateOptions {
    KeyspaceCreateOptions::default().max_memtable_size(MEMTABLE_BYTES)
}

fn open_inner(path: &Path) -> StoreResult<Inner> {
    let fresh = !path.exists();
    // One instance per directory: another one just closed (a rebuild's tables handed over, a
    // reopen after a failure) may still be letting go of it for a moment.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let db = loop {
        match Database::builder(path).open() {
            Err(fjall::Error::Locked) if std::time::Instant::now() < deadline => std::thread::sleep(std::time::Duration::from_millis(50)),
            Err(fjall::Error::Locked) => return Err(data(format!("{}: in use by another process (a running `chat run`?)", path.display()))),
            r => break r.map_err(|e| data(format!("{}: {e}", path.display())))?,
        }
    };
    let mut spaces = HashMap::new();
    for name in table_names() {
        let ks = db.keyspace(name, keyspace_options).map_err(|e| data(format!("{}: {name}: {e}", path.display())))?;
        spaces.insert(name, ks);
    }
    let inner = Inner { db, spaces, writer: Mutex::new(()) };
    if fresh {
        inner.set_layout(PROJECTION_LAYOUT)?;
    }
    Ok(inner)
}

// ---------------------------------------------------------------------------------------------
// Rows

fn message_key(c: &ConversationId, id: MessageId) -> Vec<u8> {
    Key::new().conv(c).u(id.0).done()
}

fn message_val(m: &MessageRow) -> Vec<u8> {
    let media = m.media.as_ref().map(|a| serde_json::to_string(a).unwrap_or_default());
    Val::new()
        .u(m.sender.0)
        .s(&m.sender_device)
        .s(&m.client_msg_id)
        .s(&m.kind)
        .s(&m.body)
        .t(&m.sent_at)
        .i(m.position)
        .os(media.as_deref())
        .oi(m.edited_at.map(|t| t.timestamp_millis()))
        .b(m.deleted)
        .ou(m.reply_to.map(|r| r.0))
        .os((!m.mentions.is_empty()).then(|| serde_json::to_string(&m.mentions).unwrap_or_default()).as_deref())
        .b(m.withheld)
        .done()
}

fn message_row(k: &[u8], v: &[u8]) -> StoreResult<MessageRow> {
    let mut k = KeyReader(k);
    let (conversation_id, message_id) = (k.conv()?, MessageId(k.u()?));
    let mut v = ValReader(v);
    Ok(MessageRow {
        conversation_id,
        message_id,
        sender: UserId(v.u()?),
        sender_device: v.s()?,
        client_msg_id: v.s()?,
        kind: v.s()?,
        body: v.s()?,
        sent_at: v.t()?,
        position: v.i()?,
        media: match v.os()? {
            Some(j) => Some(serde_json::from_str(&j).map_err(data)?),
            None => None,
        },
        edited_at: v.oi()?.and_then(DateTime::from_timestamp_millis),
        deleted: v.b()?,
        reply_to: v.ou()?.map(MessageId),
        mentions: match v.os()? {
            Some(j) => serde_json::from_str(&j).map_err(data)?,
            None => Vec::new(),
        },
        reactions: Vec::new(),
        my_reaction: None,
        // Absent from values written before layout 8: not withheld.
        withheld: !v.0.is_empty() && v.b()?,
    })
}

fn message_count_key(k: &MessageCountKey) -> Vec<u8> {
    Key::new().day(k.day).s(&k.kind).s(&k.scope).i(i64::from(k.partition)).done()
}

fn inbox_key(u: UserId, c: &ConversationId) -> Vec<u8> {
    Key::new().u(u.0).conv(c).done()
}

fn inbox_val(r: &InboxRow) -> Vec<u8> {
    Val::new()
        .ou(r.peer_id.map(|p| p.0))
        .u(r.last_message_id.0)
        .u(r.last_sender.0)
        .s(&r.last_kind)
        .s(&r.last_body)
        .t(&r.last_at)
        .i(i64::from(r.unread))
        .oi(r.first_unread_seq)
        .ou(r.read_up_to.map(|m| m.0))
        .i(r.applied_offset)
        .b(r.wrote)
        .i(i64::from(r.mentions))
        .done()
}

fn inbox_row(k: &[u8], v: &[u8]) -> StoreResult<InboxRow> {
    let mut k = KeyReader(k);
    let (user_id, conversation_id) = (UserId(k.u()?), k.conv()?);
    let mut v = ValReader(v);
    Ok(InboxRow {
        user_id,
        conversation_id,
        peer_id: v.ou()?.map(UserId),
        last_message_id: MessageId(v.u()?),
        last_sender: UserId(v.u()?),
        last_kind: v.s()?,
        last_body: v.s()?,
        last_at: v.t()?,
        unread: i32::try_from(v.i()?).map_err(data)?,
        first_unread_seq: v.oi()?,
        read_up_to: v.ou()?.map(MessageId),
        applied_offset: v.i()?,
        wrote: v.b()?,
        mentions: i32::try_from(v.i()?).map_err(data)?,
    })
}

fn receipt_val(r: &ReceiptRow) -> Vec<u8> {
    Val::new().u(r.sender.0).conv_val(&r.conversation_id).done()
}

trait ConvVal {
    fn conv_val(self, c: &ConversationId) -> Self;
}

impl ConvVal for Val {
    fn conv_val(self, c: &ConversationId) -> Self {
        self.s(c.as_str())
    }
}

fn conv_of(v: &mut ValReader<'_>) -> StoreResult<ConversationId> {
    v.s()?.parse().map_err(|e| data(format!("conversation id: {e}")))
}

/// `receipts_by_user`: (recipient, message, status, device) → (at, sender, conversation).
fn receipt_by_user_key(r: &ReceiptRow) -> Vec<u8> {
    Key::new().u(r.recipient.0).u(r.message_id.0).s(r.status.as_str()).s(&r.device_id).done()
}

fn receipt_by_user_val(r: &ReceiptRow) -> Vec<u8> {
    Val::new().t(&r.at).u(r.sender.0).conv_val(&r.conversation_id).done()
}

/// The `until` of an interval after a write, as Cassandra resolves it: an open never clears
/// `until`, of two closes the higher wins.
fn until_merge(old: Option<i64>, new: Option<i64>) -> Option<i64> {
    match (old, new) {
        (o, None) => o,
        (None, n) => n,
        (Some(o), Some(n)) => Some(o.max(n)),
    }
}

/// Applies one projection write (see `sqlite_store::apply_write` for the same rules in SQL).
fn apply_write(tx: &mut Tx<'_>, w: &Write) -> StoreResult<()> {
    match w {
        Write::User { user, username, at } => tx.put("users", Key::new().u(user.0).done(), Val::new().s(username).t(at).done()),
        Write::Message(m) => {
            // Written once: a message item applied again never undoes an edit or a delete.
            let key = message_key(&m.conversation_id, m.message_id);
            if tx.get("messages", &key)?.is_none() {
                tx.put("messages", key, message_val(m))?;
            }
            tx.put(
                "message_index",
                Key::new().u(m.message_id.0).done(),
                Val::new().conv_val(&m.conversation_id).u(m.sender.0).t(&m.sent_at).i(m.position).done(),
            )
        }
        Write::Bucket { conversation, bucket } => {
            tx.put("conversation_buckets", Key::new().conv(conversation).i(i64::from(*bucket)).done(), Vec::new())
        }
        Write::Inbox(r) => tx.put("inbox", inbox_key(r.user_id, &r.conversation_id), inbox_val(r)),
        Write::Stream { user, row } => {
            tx.put("user_stream", Key::new().u(user.0).i(row.seq).done(), Val::new().u(row.item_id).s(&row.item).done())
        }
        Write::StreamHead { user, source_partition, position } => {
            let key = Key::new().u(user.0).i(i64::from(*source_partition)).done();
            let old = tx.get("stream_heads", &key)?.map(|v| ValReader(&v).i()).transpose()?;
            if old.is_some_and(|o| o >= *position) {
                return Ok(());
            }
            tx.put("stream_heads", key, Val::new().i(*position).done())
        }
        Write::Receipt(r) => {
            let key = Key::new().u(r.message_id.0).i(ms(&r.at)).u(r.recipient.0).s(r.status.as_str()).s(&r.device_id).done();
            if tx.get("receipts", &key)?.is_none() {
                tx.put("receipts", key, receipt_val(r))?;
            }
            if r.in_user_audit() {
                let key = receipt_by_user_key(r);
                let old_at = tx.get("receipts_by_user", &key)?.map(|v| ValReader(&v).i()).transpose()?;
                if old_at.is_none_or(|o| ms(&r.at) < o) {
                    tx.put("receipts_by_user", key, receipt_by_user_val(r))?;
                }
            }
            Ok(())
        }
        Write::Presence { user, online, at } => {
            let key = Key::new().u(user.0).done();
            let (status, changed_at, last_seen) = (if *online { "online" } else { "offline" }, ms(at), if *online { None } else { Some(ms(at)) });
            let merged = match tx.get("last_seen", &key)? {
                None => (status.to_owned(), changed_at, last_seen),
                Some(v) => {
                    let mut v = ValReader(&v);
                    let (o_status, o_changed, o_last) = (v.s()?, v.i()?, v.oi()?);
                    let status = match changed_at.cmp(&o_changed) {
                        std::cmp::Ordering::Greater => status.to_owned(),
                        std::cmp::Ordering::Less => o_status,
                        std::cmp::Ordering::Equal => o_status.max(status.to_owned()),
                    };
                    let last = match (last_seen, o_last) {
                        (None, o) => o,
                        (n, None) => n,
                        (Some(n), Some(o)) => Some(n.max(o)),
                    };
                    (status, changed_at.max(o_changed), last)
                }
            };
            tx.put("last_seen", key, Val::new().s(&merged.0).i(merged.1).oi(merged.2).done())
        }
        Write::Group(g) => {
            let key = Key::new().conv(&g.conversation_id).done();
            let new = GroupCell {
                name: g.name.clone(),
                name_position: g.position,
                creator: Some(g.creator.0),
                created_at: Some(ms(&g.created_at)),
                position: Some(g.position),
            };
            let merged = match tx.get("groups", &key)?.map(|v| GroupCell::read(&v)).transpose()? {
                None => new,
                Some(old) => {
                    let take = old.position.is_none_or(|p| g.position >= p);
                    let name_wins = new.name_position >= old.name_position;
                    GroupCell {
                        creator: if take { new.creator } else { old.creator },
                        created_at: if take { new.created_at } else { old.created_at },
                        position: Some(old.position.map_or(g.position, |p| p.max(g.position))),
                        name: if name_wins { new.name } else { old.name },
                        name_position: old.name_position.max(new.name_position),
                    }
                }
            };
            tx.put("groups", key, merged.write())
        }
        Write::GroupName { conversation, name, position } => {
            let key = Key::new().conv(conversation).done();
            let merged = match tx.get("groups", &key)?.map(|v| GroupCell::read(&v)).transpose()? {
                None => GroupCell { name: name.clone(), name_position: *position, creator: None, created_at: None, position: None },
                Some(old) if *position >= old.name_position => GroupCell { name: name.clone(), name_position: *position, ..old },
                Some(_) => return Ok(()),
            };
            tx.put("groups", key, merged.write())
        }
        Write::GroupMember(m) => {
            let key = Key::new().conv(&m.conversation_id).u(m.member.0).done();
            put_if_not_older(tx, "group_members", key, m.position, Val::new().s(m.role.as_str()).b(m.active).i(m.position).done())
        }
        Write::UserGroup(g) => {
            let key = Key::new().u(g.user_id.0).conv(&g.conversation_id).done();
            put_if_not_older(tx, "user_groups", key, g.position, Val::new().s(g.role.as_str()).b(g.active).i(g.position).done())
        }
        Write::UserGroupInterval { user, conversation, since, until } => {
            let key = Key::new().u(user.0).conv(conversation).i(*since).done();
            let old = tx.get("user_group_intervals", &key)?.map(|v| ValReader(&v).oi()).transpose()?;
            let merged = match old {
                Some(o) => until_merge(o, *until),
                None => *until,
            };
            tx.put("user_group_intervals", key, Val::new().oi(merged).done())
        }
        Write::Profile(p) => {
            let key = Key::new().u(p.user_id.0).done();
            let (name, avatar, at) = (p.display_name.clone(), p.avatar_media_id, ms(&p.updated_at));
            let merged = match tx.get("profiles", &key)? {
                None => (name, avatar, at),
                Some(v) => {
                    let mut v = ValReader(&v);
                    let (o_name, o_avatar, o_at) = (v.s()?, v.ou()?, v.i()?);
                    match at.cmp(&o_at) {
                        std::cmp::Ordering::Greater => (name, avatar, at),
                        std::cmp::Ordering::Less => (o_name, o_avatar, o_at),
                        std::cmp::Ordering::Equal => {
                            let avatar = match (o_avatar, avatar) {
                                (Some(a), Some(b)) => Some(a.to_string().max(b.to_string()).parse().map_err(data)?),
                                _ => None,
                            };
                            (o_name.max(name), avatar, at)
                        }
                    }
                }
            };
            tx.put("profiles", key, Val::new().s(&merged.0).ou(merged.1).i(merged.2).done())
        }
        Write::MessageCount { key, messages, applied_offset } => {
            let k = message_count_key(key);
            if let Some(old) = tx.get("analytics_message_counts", &k)? {
                let mut v = ValReader(&old);
                let (_, old_offset) = (v.i()?, v.i()?);
                if old_offset >= *applied_offset {
                    return Ok(());
                }
            }
            tx.put("analytics_message_counts", k, Val::new().i(*messages).i(*applied_offset).done())
        }
        Write::ActiveUser { day, user } => tx.put("analytics_active_users", Key::new().day(*day).u(user.0).done(), Vec::new()),
        Write::ProfileView { viewed, day, viewer, view } => {
            tx.put("analytics_profile_views", Key::new().u(viewed.0).day(*day).u(viewer.0).u(view.0).done(), Vec::new())
        }
        Write::MediaMessage { media, conversation, message, position } => {
            tx.put("media_messages", Key::new().u(*media).conv(conversation).u(message.0).done(), Val::new().i(*position).done())
        }
        Write::MessageEdited { conversation, message, body, at } => {
            let key = message_key(conversation, *message);
            let Some(old) = tx.get("messages", &key)? else { return Ok(()) };
            let mut row = message_row(&key, &old)?;
            if row.deleted {
                return Ok(());
            }
            (row.body, row.edited_at) = (body.clone(), Some(*at));
            tx.put("messages", key, message_val(&row))
        }
        Write::MessageDeleted { conversation, message } => {
            let key = message_key(conversation, *message);
            let Some(old) = tx.get("messages", &key)? else { return Ok(()) };
            let mut row = message_row(&key, &old)?;
            (row.body, row.media, row.edited_at, row.deleted) = (String::new(), None, None, true);
            (row.reply_to, row.mentions) = (None, Vec::new());
            tx.put("messages", key, message_val(&row))?;
            for k in tx.keys_with_prefix("message_edits", &Key::new().u(message.0).done())? {
                tx.del("message_edits", k)?;
            }
            Ok(())
        }
        Write::StreamMessage { user, message, seq, mark } => {
            tx.put("stream_messages", Key::new().u(user.0).u(message.0).i(*seq).done(), Val::new().i(i64::from(mark.code())).done())
        }
        Write::MessageVersion { message, at, body } => {
            tx.put("message_edits", Key::new().u(message.0).i(at.timestamp_millis()).done(), Val::new().s(body).done())
        }
        Write::HiddenMessage { user, conversation, message } => {
            tx.put("hidden_messages", Key::new().u(user.0).conv(conversation).u(message.0).done(), Vec::new())
        }
        Write::Reaction { conversation, message, user, emoji, seq } => {
            let key = Key::new().conv(conversation).u(message.0).u(user.0).done();
            if let Some(old) = tx.get("reactions", &key)? {
                if ValReader(&old).i()? > *seq {
                    return Ok(());
                }
            }
            tx.put("reactions", key, Val::new().i(*seq).os(emoji.as_deref()).done())
        }
        Write::Privacy(p) => {
            let key = Key::new().u(p.user_id.0).done();
            let new = [p.last_seen.as_str(), p.photo.as_str(), p.read_receipts.as_str()].map(str::to_owned);
            let at = ms(&p.updated_at);
            let merged = match tx.get("privacy_settings", &key)? {
                None => (new, at),
                Some(v) => {
                    let mut v = ValReader(&v);
                    let (old, o_at) = ([v.s()?, v.s()?, v.s()?], v.i()?);
                    match at.cmp(&o_at) {
                        std::cmp::Ordering::Greater => (new, at),
                        std::cmp::Ordering::Less => return Ok(()),
                        // As Cassandra resolves cells of one write time: each the greater text.
                        std::cmp::Ordering::Equal => {
                            let [a, b, c] = old;
                            let [x, y, z] = new;
                            ([a.max(x), b.max(y), c.max(z)], at)
                        }
                    }
                }
            };
            let [last_seen, photo, read_receipts] = &merged.0;
            tx.put("privacy_settings", key, Val::new().s(last_seen).s(photo).s(read_receipts).i(merged.1).done())
        }
        Write::Block(b) => {
            let key = Key::new().u(b.user_id.0).u(b.target.0).done();
            let at = ms(&b.at);
            let blocked = match tx.get("blocks", &key)? {
                None => b.blocked,
                Some(v) => {
                    let mut v = ValReader(&v);
                    let (o_blocked, o_at) = (v.b()?, v.i()?);
                    match at.cmp(&o_at) {
                        std::cmp::Ordering::Greater => b.blocked,
                        std::cmp::Ordering::Less => return Ok(()),
                        // One time: the block wins (Cassandra: the greater value).
                        std::cmp::Ordering::Equal => o_blocked || b.blocked,
                    }
                }
            };
            tx.put("blocks", key, Val::new().b(blocked).i(at).done())
        }
        Write::TopicRemoved { day, topic, message } => tx.del("analytics_topics", Key::new().day(*day).s(topic).u(message.0).done()),
        Write::Topic { day, topic, message, sender } => {
            let key = Key::new().day(*day).s(topic).u(message.0).done();
            if tx.get("analytics_topics", &key)?.is_some() {
                return Ok(());
            }
            tx.put("analytics_topics", key, Val::new().u(sender.0).done())
        }
    }
}

/// A row whose value starts with a role and an `active` flag and ends with its position: the
/// write at the higher (or equal) position wins.
fn put_if_not_older(tx: &mut Tx<'_>, table: &'static str, key: Vec<u8>, position: i64, value: Vec<u8>) -> StoreResult<()> {
    if let Some(old) = tx.get(table, &key)? {
        let mut v = ValReader(&old);
        let (_role, _active, old_position) = (v.s()?, v.b()?, v.i()?);
        if position < old_position {
            return Ok(());
        }
    }
    tx.put(table, key, value)
}

/// The `groups` row: the creation's cells (absent while only a rename was projected) and the
/// name with its own position.
struct GroupCell {
    name: String,
    name_position: i64,
    creator: Option<Uuid>,
    created_at: Option<i64>,
    position: Option<i64>,
}

impl GroupCell {
    fn read(v: &[u8]) -> StoreResult<GroupCell> {
        let mut v = ValReader(v);
        Ok(GroupCell { name: v.s()?, name_position: v.i()?, creator: v.ou()?, created_at: v.oi()?, position: v.oi()? })
    }
    fn write(&self) -> Vec<u8> {
        Val::new().s(&self.name).i(self.name_position).ou(self.creator).oi(self.created_at).oi(self.position).done()
    }
}

// ---------------------------------------------------------------------------------------------
// The traits

crate::sqlite_store::commands_in_sqlite!(FjallStore);

#[async_trait]
impl WriteStore for FjallStore {
    async fn apply(&self, writes: Vec<Write>) -> StoreResult<()> {
        crate::writes::validate(&writes)?;
        if writes.is_empty() {
            return Ok(());
        }
        // One batch: all of the list or none of it, visible at once.
        self.write(move |tx| writes.iter().try_for_each(|w| apply_write(tx, w))).await
    }
}

#[async_trait]
impl ProjectionStore for FjallStore {
    async fn inbox_row(&self, user: UserId, c: &ConversationId) -> StoreResult<Option<InboxRow>> {
        let _r = self.shared.swap.read().await;
        let key = inbox_key(user, c);
        self.get("inbox", &key)?.map(|v| inbox_row(&key, &v)).transpose()
    }

    async fn stream_head(&self, user: UserId, source_partition: i32) -> StoreResult<Option<i64>> {
        let _r = self.shared.swap.read().await;
        let key = Key::new().u(user.0).i(i64::from(source_partition)).done();
        self.get("stream_heads", &key)?.map(|v| ValReader(&v).i()).transpose()
    }

    async fn stream_messages(&self, user: UserId, message: MessageId) -> StoreResult<Vec<(i64, StreamMark)>> {
        let _r = self.shared.swap.read().await;
        self.prefix("stream_messages", &Key::new().u(user.0).u(message.0).done())?
            .iter()
            .map(|(k, v)| {
                let mut k = KeyReader(k);
                let (_user, _message, seq) = (k.u()?, k.u()?, k.i()?);
                Ok((seq, StreamMark::from_code(ValReader(v).i()?)))
            })
            .collect()
    }

    async fn message_count_row(&self, key: &MessageCountKey) -> StoreResult<Option<(i64, i64)>> {
        let _r = self.shared.swap.read().await;
        self.get("analytics_message_counts", &message_count_key(key))?
            .map(|v| {
                let mut v = ValReader(&v);
                Ok((v.i()?, v.i()?))
            })
            .transpose()
    }

    async fn inbox_rows(&self, keys: &[(UserId, ConversationId)]) -> StoreResult<Vec<Option<InboxRow>>> {
        let _r = self.shared.swap.read().await;
        keys.iter()
            .map(|(u, c)| {
                let key = inbox_key(*u, c);
                self.get("inbox", &key)?.map(|v| inbox_row(&key, &v)).transpose()
            })
            .collect()
    }

    async fn stream_heads(&self, keys: &[(UserId, i32)]) -> StoreResult<Vec<Option<i64>>> {
        let _r = self.shared.swap.read().await;
        keys.iter()
            .map(|(u, p)| {
                let key = Key::new().u(u.0).i(i64::from(*p)).done();
                self.get("stream_heads", &key)?.map(|v| ValReader(&v).i()).transpose()
            })
            .collect()
    }
}

#[async_trait]
impl ReadStore for FjallStore {
    async fn history_page(&self, c: &ConversationId, before: Option<MessageId>, limit: usize) -> StoreResult<Vec<MessageRow>> {
        let _r = self.shared.swap.read().await;
        let prefix = Key::new().conv(c).done();
        let to = before.map(|b| message_key(c, b));
        self.scan("messages", &prefix, None, to, true, limit)?.iter().map(|(k, v)| message_row(k, v)).collect()
    }

    async fn inbox(&self, user: UserId, limit: usize) -> StoreResult<Vec<InboxRow>> {
        let _r = self.shared.swap.read().await;
        let prefix = Key::new().u(user.0).done();
        self.scan("inbox", &prefix, None, None, false, limit)?.iter().map(|(k, v)| inbox_row(k, v)).collect()
    }

    async fn find_message(&self, id: MessageId) -> StoreResult<Option<MessageMeta>> {
        let _r = self.shared.swap.read().await;
        let Some(v) = self.get("message_index", &Key::new().u(id.0).done())? else { return Ok(None) };
        let mut v = ValReader(&v);
        Ok(Some(MessageMeta { message_id: id, conversation_id: conv_of(&mut v)?, sender: UserId(v.u()?), sent_at: v.t()?, position: v.i()? }))
    }

    async fn receipts(&self, message: MessageId) -> StoreResult<Vec<ReceiptRow>> {
        let _r = self.shared.swap.read().await;
        let rows = self
            .prefix("receipts", &Key::new().u(message.0).done())?
            .iter()
            .map(|(k, v)| {
                let mut k = KeyReader(k);
                let (message_id, at, recipient, st, device_id) = (MessageId(k.u()?), time(k.i()?)?, UserId(k.u()?), status(&k.s()?)?, k.s()?);
                let mut v = ValReader(v);
                Ok(ReceiptRow { message_id, sender: UserId(v.u()?), recipient, status: st, device_id, at, conversation_id: conv_of(&mut v)? })
            })
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(first_transitions(rows))
    }

    async fn stream_after(&self, user: UserId, after: i64, limit: usize) -> StoreResult<Vec<StreamRow>> {
        let _r = self.shared.swap.read().await;
        let prefix = Key::new().u(user.0).done();
        let Some(next) = after.checked_add(1) else { return Ok(Vec::new()) };
        let from = Key::new().u(user.0).i(next).done();
        self.scan("user_stream", &prefix, Some(from), None, false, limit.min(10_000))?
            .iter()
            .map(|(k, v)| {
                let mut k = KeyReader(k);
                k.u()?;
                let seq = k.i()?;
                let mut v = ValReader(v);
                Ok(StreamRow { seq, item_id: v.u()?, item: v.s()? })
            })
            .collect()
    }

    async fn unread_count(&self, user: UserId, cap: usize) -> StoreResult<usize> {
        let rows = self.inbox(user, crate::UNREAD_SCAN_CONVERSATIONS).await?;
        let n: i64 = rows.iter().map(|r| i64::from(r.unread)).sum();
        Ok((n.max(0) as usize).min(cap))
    }

    async fn last_seen(&self, user: UserId) -> StoreResult<Option<LastSeenRow>> {
        let _r = self.shared.swap.read().await;
        let Some(v) = self.get("last_seen", &Key::new().u(user.0).done())? else { return Ok(None) };
        let mut v = ValReader(&v);
        Ok(Some(LastSeenRow { user_id: user, status: v.s()?, changed_at: v.t()?, last_seen: v.oi()?.map(time).transpose()? }))
    }

    async fn in_inbox(&self, user: UserId, c: &ConversationId) -> StoreResult<bool> {
        Ok(ProjectionStore::inbox_row(self, user, c).await?.is_some())
    }

    async fn media_positions(&self, media: Uuid, conv: &ConversationId) -> StoreResult<Vec<i64>> {
        let _r = self.shared.swap.read().await;
        let mut out = self
            .prefix("media_messages", &Key::new().u(media).conv(conv).done())?
            .iter()
            .map(|(_, v)| ValReader(v).i())
            .collect::<StoreResult<Vec<_>>>()?;
        out.sort_unstable();
        Ok(out)
    }

    async fn message_versions(&self, message: MessageId) -> StoreResult<Vec<(DateTime<Utc>, String)>> {
        let _r = self.shared.swap.read().await;
        self.prefix("message_edits", &Key::new().u(message.0).done())?
            .iter()
            .map(|(k, v)| {
                let mut k = KeyReader(k);
                let (_message, ms) = (k.u()?, k.i()?);
                Ok((DateTime::from_timestamp_millis(ms).unwrap_or_default(), ValReader(v).s()?))
            })
            .collect()
    }

    async fn hidden_messages(&self, user: UserId, conv: &ConversationId, from: MessageId, to: MessageId) -> StoreResult<Vec<MessageId>> {
        let _r = self.shared.swap.read().await;
        let mut out = Vec::new();
        for (k, _) in self.prefix("hidden_messages", &Key::new().u(user.0).conv(conv).done())? {
            let mut k = KeyReader(&k);
            let (_user, _conv, id) = (k.u()?, k.conv()?, MessageId(k.u()?));
            if from <= id && id <= to {
                out.push(id);
            }
        }
        Ok(out)
    }

    async fn reactions(&self, conv: &ConversationId, messages: &[MessageId], limit: usize) -> StoreResult<Vec<Reaction>> {
        let (Some(&from), Some(&to)) = (messages.iter().min(), messages.iter().max()) else { return Ok(Vec::new()) };
        let _r = self.shared.swap.read().await;
        let prefix = Key::new().conv(conv).done();
        let lo = Key::new().conv(conv).u(from.0).done();
        let hi = to.0.as_u128().checked_add(1).map(|n| Key::new().conv(conv).u(Uuid::from_u128(n)).done());
        let mut out = Vec::new();
        // Taken-back reactions are rows without an emoji: read past them up to `limit` emojis.
        for (k, v) in self.scan("reactions", &prefix, Some(lo), hi, false, usize::MAX)? {
            let mut k = KeyReader(&k);
            let (_conv, message_id, user) = (k.conv()?, MessageId(k.u()?), UserId(k.u()?));
            let mut v = ValReader(&v);
            let _seq = v.i()?;
            if let Some(emoji) = v.os()? {
                out.push(Reaction { message_id, user, emoji });
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    async fn privacy(&self, user: UserId) -> StoreResult<Option<PrivacyRow>> {
        let _r = self.shared.swap.read().await;
        let Some(v) = self.get("privacy_settings", &Key::new().u(user.0).done())? else { return Ok(None) };
        let mut v = ValReader(&v);
        Ok(Some(PrivacyRow { user_id: user, last_seen: audience(&v.s()?)?, photo: audience(&v.s()?)?, read_receipts: audience(&v.s()?)?, updated_at: v.t()? }))
    }

    async fn block(&self, user: UserId, target: UserId) -> StoreResult<Option<BlockRow>> {
        let _r = self.shared.swap.read().await;
        let Some(v) = self.get("blocks", &Key::new().u(user.0).u(target.0).done())? else { return Ok(None) };
        let mut v = ValReader(&v);
        Ok(Some(BlockRow { user_id: user, target, blocked: v.b()?, at: v.t()? }))
    }

    async fn blocks(&self, user: UserId, limit: usize) -> StoreResult<Vec<BlockRow>> {
        let _r = self.shared.swap.read().await;
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        // By target id (the key order); unblocked rows are read past.
        for (k, v) in self.prefix("blocks", &Key::new().u(user.0).done())? {
            let mut k = KeyReader(&k);
            let (_user, target) = (k.u()?, UserId(k.u()?));
            let mut v = ValReader(&v);
            let (blocked, at) = (v.b()?, v.t()?);
            if blocked {
                out.push(BlockRow { user_id: user, target, blocked, at });
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }
}

fn send_key(sender: UserId, cmid: &str, c: &ConversationId) -> Vec<u8> {
    Key::new().u(sender.0).s(cmid).conv(c).done()
}

fn fanout_message_key(c: &ConversationId, id: MessageId) -> Vec<u8> {
    Key::new().conv(c).u(id.0).done()
}

fn fanout_message_row(k: &[u8], v: &[u8]) -> StoreResult<FanoutMessage> {
    let mut k = KeyReader(k);
    let (conversation_id, message_id) = (k.conv()?, MessageId(k.u()?));
    let mut v = ValReader(v);
    Ok(FanoutMessage { conversation_id, message_id, sender: UserId(v.u()?), position: v.i()?, recipients: i32::try_from(v.i()?).map_err(data)? })
}


/// An accepted send: the first of a key (the lowest position) stays, in any write order.
fn put_send(tx: &mut Tx<'_>, r: &SendRecord) -> StoreResult<()> {
    let key = send_key(r.sender, &r.client_msg_id, &r.conversation_id);
    if let Some(old) = tx.get("sends", &key)? {
        let mut v = ValReader(&old);
        let (_, _, _, position) = (v.u()?, v.i()?, v.s()?, v.i()?);
        if r.position >= position {
            return Ok(());
        }
    }
    tx.put("sends", key, Val::new().u(r.message_id.0).t(&r.sent_at).s(&r.content_sha256).i(r.position).done())
}

/// A membership interval: a close keeps its `until` in any order; the write at the higher
/// position decides the role (equal: the greater value).
fn put_member(tx: &mut Tx<'_>, c: &ConversationId, m: &MemberInterval) -> StoreResult<()> {
    let key = Key::new().conv(c).u(m.member.0).i(m.since).done();
    let (until, role_name) = match tx.get("fanout_members", &key)? {
        None => (m.until, m.role.as_str().to_owned()),
        Some(old) => {
            let mut v = ValReader(&old);
            let (o_until, o_role) = (v.oi()?, v.s()?);
            // The write at the higher position (until for a close, since for an open)
            // decides the role; equal: the greater value.
            let (new_at, old_at) = (m.until.unwrap_or(m.since), o_until.unwrap_or(m.since));
            let role_name = match new_at.cmp(&old_at) {
                std::cmp::Ordering::Greater => m.role.as_str().to_owned(),
                std::cmp::Ordering::Less => o_role,
                std::cmp::Ordering::Equal => o_role.max(m.role.as_str().to_owned()),
            };
            (until_merge(o_until, m.until), role_name)
        }
    };
    tx.put("fanout_members", key, Val::new().oi(until).s(&role_name).done())
}

#[async_trait]
impl FanoutStore for FjallStore {
    async fn send_record(&self, c: &ConversationId, sender: UserId, client_msg_id: &str) -> StoreResult<Option<SendRecord>> {
        Ok(self.send_records(&[(c.clone(), sender, client_msg_id.to_owned())]).await?.pop().flatten())
    }

    async fn send_records(&self, keys: &[(ConversationId, UserId, String)]) -> StoreResult<Vec<Option<SendRecord>>> {
        keys.iter()
            .map(|(c, sender, cmid)| {
                let Some(v) = self.get("sends", &send_key(*sender, cmid, c))? else { return Ok(None) };
                let mut v = ValReader(&v);
                Ok(Some(SendRecord {
                    conversation_id: c.clone(),
                    sender: *sender,
                    client_msg_id: cmid.clone(),
                    message_id: MessageId(v.u()?),
                    sent_at: v.t()?,
                    content_sha256: v.s()?,
                    position: v.i()?,
                }))
            })
            .collect()
    }

    async fn put_send_records(&self, records: &[SendRecord]) -> StoreResult<()> {
        let records = records.to_vec();
        self.write(move |tx| records.iter().try_for_each(|r| put_send(tx, r))).await
    }

    async fn fanout_group(&self, c: &ConversationId) -> StoreResult<Option<FanoutGroup>> {
        let Some(v) = self.get("fanout_groups", &Key::new().conv(c).done())? else { return Ok(None) };
        let mut v = ValReader(&v);
        Ok(Some(FanoutGroup { conversation_id: c.clone(), name: v.s()?, created_at: v.i()?, membership_version: v.i()? }))
    }

    async fn put_fanout_group(&self, g: &FanoutGroup) -> StoreResult<()> {
        let value = Val::new().s(&g.name).i(g.created_at).i(g.membership_version).done();
        let key = Key::new().conv(&g.conversation_id).done();
        self.write(move |tx| tx.put("fanout_groups", key, value)).await
    }

    async fn fanout_members(&self, c: &ConversationId) -> StoreResult<Vec<MemberInterval>> {
        self.prefix("fanout_members", &Key::new().conv(c).done())?
            .iter()
            .map(|(k, v)| {
                let mut k = KeyReader(k);
                k.conv()?;
                let (member, since) = (UserId(k.u()?), k.i()?);
                let mut v = ValReader(v);
                Ok(MemberInterval { member, since, until: v.oi()?, role: role(&v.s()?)? })
            })
            .collect()
    }

    async fn put_fanout_member(&self, c: &ConversationId, m: &MemberInterval) -> StoreResult<()> {
        let (c, m) = (c.clone(), m.clone());
        self.write(move |tx| put_member(tx, &c, &m)).await
    }

    async fn put_fanout_members(&self, c: &ConversationId, members: &[MemberInterval]) -> StoreResult<()> {
        let (c, members) = (c.clone(), members.to_vec());
        self.write(move |tx| members.iter().try_for_each(|m| put_member(tx, &c, m))).await
    }

    async fn fanout_message(&self, c: &ConversationId, message: MessageId) -> StoreResult<Option<FanoutMessage>> {
        let key = fanout_message_key(c, message);
        self.get("fanout_messages", &key)?.map(|v| fanout_message_row(&key, &v)).transpose()
    }

    async fn put_fanout_message(&self, m: &FanoutMessage) -> StoreResult<()> {
        let value = Val::new().u(m.sender.0).i(m.position).i(i64::from(m.recipients)).done();
        let key = fanout_message_key(&m.conversation_id, m.message_id);
        self.write(move |tx| tx.put("fanout_messages", key, value)).await
    }

    async fn fanout_messages_between(&self, c: &ConversationId, after: Option<MessageId>, up_to: MessageId) -> StoreResult<Vec<FanoutMessage>> {
        let prefix = Key::new().conv(c).done();
        // (after, up_to]: from just past `after`'s key to just past `up_to`'s.
        let from = after.map(|a| {
            let mut k = fanout_message_key(c, a);
            k.push(0);
            k
        });
        let mut to = fanout_message_key(c, up_to);
        to.push(0);
        self.scan("fanout_messages", &prefix, from, Some(to), false, usize::MAX)?.iter().map(|(k, v)| fanout_message_row(k, v)).collect()
    }

    async fn add_fanout_ack(&self, message: MessageId, status: ReceiptStatus, member: UserId) -> StoreResult<()> {
        let key = Key::new().u(message.0).s(status.as_str()).u(member.0).done();
        self.write(move |tx| tx.put("fanout_acks", key, Vec::new())).await
    }

    async fn fanout_ack_count(&self, message: MessageId, status: ReceiptStatus) -> StoreResult<usize> {
        Ok(self.prefix("fanout_acks", &Key::new().u(message.0).s(status.as_str()).done())?.len())
    }

    async fn fanout_read_marker(&self, c: &ConversationId, reader: UserId) -> StoreResult<Option<(MessageId, i64)>> {
        let Some(v) = self.get("fanout_read_markers", &Key::new().conv(c).u(reader.0).done())? else { return Ok(None) };
        let mut v = ValReader(&v);
        Ok(Some((MessageId(v.u()?), v.i()?)))
    }

    async fn put_fanout_read_marker(&self, c: &ConversationId, reader: UserId, up_to: MessageId, position: i64) -> StoreResult<()> {
        let (key, value) = (Key::new().conv(c).u(reader.0).done(), Val::new().u(up_to.0).i(position).done());
        self.write(move |tx| tx.put("fanout_read_markers", key, value)).await
    }

    async fn fanout_watermark(&self, topic: &str, partition: i32) -> StoreResult<Option<i64>> {
        self.get("fanout_watermarks", &Key::new().s(topic).i(i64::from(partition)).done())?.map(|v| ValReader(&v).i()).transpose()
    }

    async fn put_fanout_watermark(&self, topic: &str, partition: i32, next: i64) -> StoreResult<()> {
        let key = Key::new().s(topic).i(i64::from(partition)).done();
        self.write(move |tx| tx.put("fanout_watermarks", key, Val::new().i(next).done())).await
    }
}

#[async_trait]
impl GroupStore for FjallStore {
    async fn group(&self, c: &ConversationId) -> StoreResult<Option<GroupRow>> {
        let _r = self.shared.swap.read().await;
        let Some(v) = self.get("groups", &Key::new().conv(c).done())? else { return Ok(None) };
        let cell = GroupCell::read(&v)?;
        let (Some(creator), Some(created_at), Some(position)) = (cell.creator, cell.created_at, cell.position) else { return Ok(None) };
        Ok(Some(GroupRow { conversation_id: c.clone(), name: cell.name, creator: UserId(creator), created_at: time(created_at)?, position }))
    }

    async fn group_members(&self, c: &ConversationId) -> StoreResult<Vec<GroupMemberRow>> {
        let _r = self.shared.swap.read().await;
        self.prefix("group_members", &Key::new().conv(c).done())?
            .iter()
            .map(|(k, v)| {
                let mut k = KeyReader(k);
                k.conv()?;
                let member = UserId(k.u()?);
                let mut v = ValReader(v);
                Ok(GroupMemberRow { conversation_id: c.clone(), member, role: role(&v.s()?)?, active: v.b()?, position: v.i()? })
            })
            .collect()
    }

    async fn group_member(&self, c: &ConversationId, user: UserId) -> StoreResult<Option<GroupMemberRow>> {
        let _r = self.shared.swap.read().await;
        let Some(v) = self.get("group_members", &Key::new().conv(c).u(user.0).done())? else { return Ok(None) };
        let mut v = ValReader(&v);
        Ok(Some(GroupMemberRow { conversation_id: c.clone(), member: user, role: role(&v.s()?)?, active: v.b()?, position: v.i()? }))
    }

    async fn user_groups(&self, user: UserId) -> StoreResult<Vec<UserGroupRow>> {
        let _r = self.shared.swap.read().await;
        let mut rows = self
            .prefix("user_groups", &Key::new().u(user.0).done())?
            .iter()
            .map(|(k, v)| {
                let mut k = KeyReader(k);
                k.u()?;
                let conversation_id = k.conv()?;
                let mut v = ValReader(v);
                Ok(UserGroupRow { user_id: user, conversation_id, role: role(&v.s()?)?, active: v.b()?, position: v.i()? })
            })
            .collect::<StoreResult<Vec<_>>>()?;
        rows.sort_by(|a, b| a.conversation_id.as_str().cmp(b.conversation_id.as_str()));
        Ok(rows)
    }

    async fn user_group_intervals(&self, user: UserId, c: &ConversationId) -> StoreResult<Vec<(i64, Option<i64>)>> {
        let _r = self.shared.swap.read().await;
        self.prefix("user_group_intervals", &Key::new().u(user.0).conv(c).done())?
            .iter()
            .map(|(k, v)| {
                let mut k = KeyReader(k);
                k.u()?;
                k.conv()?;
                Ok((k.i()?, ValReader(v).oi()?))
            })
            .collect()
    }
}

/// Counts of the rows of `table` in `[from, to]` by day (the key starts with the day), grouped
/// by what `group` takes from the rest of the key.
fn by_day<G: Ord>(
    store: &FjallStore,
    table: &'static str,
    prefix: &[u8],
    from: NaiveDate,
    to: NaiveDate,
    group: impl Fn(&mut KeyReader<'_>, &[u8]) -> StoreResult<G>,
) -> StoreResult<BTreeMap<(NaiveDate, G), u64>> {
    sum_by_day(store, table, prefix, from, to, |k, v| Ok((group(k, v)?, 1)))
}

/// [`by_day`] with a number per row (its group's sum instead of its row count).
fn sum_by_day<G: Ord>(
    store: &FjallStore,
    table: &'static str,
    prefix: &[u8],
    from: NaiveDate,
    to: NaiveDate,
    group: impl Fn(&mut KeyReader<'_>, &[u8]) -> StoreResult<(G, u64)>,
) -> StoreResult<BTreeMap<(NaiveDate, G), u64>> {
    let start = {
        let mut k = prefix.to_vec();
        k.extend(Key::new().day(from).done());
        k
    };
    let end = {
        let mut k = prefix.to_vec();
        k.extend(Key::new().day(to.succ_opt().unwrap_or(to)).done());
        k
    };
    let mut out = BTreeMap::new();
    for (k, v) in store.scan(table, prefix, Some(start), Some(end), false, usize::MAX)? {
        let mut r = KeyReader(&k[prefix.len()..]);
        let day = r.day()?;
        if day > to {
            continue;
        }
        let (g, n) = group(&mut r, &v)?;
        *out.entry((day, g)).or_insert(0) += n;
    }
    Ok(out)
}

#[async_trait]
impl InsightStore for FjallStore {
    async fn set_role(&self, user: UserId, role: &str, granted: bool) -> StoreResult<()> {
        let key = Key::new().u(user.0).s(role).done();
        self.write(move |tx| if granted { tx.put("user_roles", key, Vec::new()) } else { tx.del("user_roles", key) }).await?;
        // A role is not derived from the log: on disk before it is answered.
        self.persist().await
    }

    async fn roles(&self, user: UserId) -> StoreResult<Vec<String>> {
        self.prefix("user_roles", &Key::new().u(user.0).done())?
            .iter()
            .map(|(k, _)| {
                let mut k = KeyReader(k);
                k.u()?;
                k.s()
            })
            .collect()
    }

    async fn revoke_sessions(&self, user: UserId, at: DateTime<Utc>) -> StoreResult<()> {
        self.commands.revoke_sessions(user, at).await
    }

    async fn revocations_since(&self, since: DateTime<Utc>) -> StoreResult<Vec<(UserId, DateTime<Utc>)>> {
        self.commands.revocations_since(since).await
    }

    async fn profile(&self, user: UserId) -> StoreResult<Option<ProfileRow>> {
        let _r = self.shared.swap.read().await;
        let Some(v) = self.get("profiles", &Key::new().u(user.0).done())? else { return Ok(None) };
        let mut v = ValReader(&v);
        Ok(Some(ProfileRow { user_id: user, display_name: v.s()?, avatar_media_id: v.ou()?, updated_at: v.t()? }))
    }

    async fn message_counts(&self, from: NaiveDate, to: NaiveDate) -> StoreResult<Vec<MessageCount>> {
        let _r = self.shared.swap.read().await;
        let counts = sum_by_day(self, "analytics_message_counts", &[], from, to, |k, v| Ok(((k.s()?, k.s()?), u64::try_from(ValReader(v).i()?).unwrap_or(0))))?;
        let mut rows: Vec<MessageCount> = counts
            .into_iter()
            .filter(|(_, messages)| *messages > 0)
            .map(|((day, (kind, scope)), messages)| MessageCount { day, kind, scope, messages })
            .collect();
        sort_message_counts(&mut rows);
        Ok(rows)
    }

    async fn active_users(&self, from: NaiveDate, to: NaiveDate) -> StoreResult<Vec<(NaiveDate, u64)>> {
        let _r = self.shared.swap.read().await;
        let counts = by_day(self, "analytics_active_users", &[], from, to, |_, _| Ok(()))?;
        Ok(counts.into_iter().map(|((day, ()), n)| (day, n)).collect())
    }

    async fn profile_views(&self, viewed: UserId, from: NaiveDate, to: NaiveDate) -> StoreResult<Vec<ProfileViews>> {
        let _r = self.shared.swap.read().await;
        let prefix = Key::new().u(viewed.0).done();
        let counts = by_day(self, "analytics_profile_views", &prefix, from, to, |k, _| Ok(UserId(k.u()?)))?;
        Ok(profile_views_from(counts.into_iter().map(|((day, viewer), n)| (day, viewer, n))))
    }

    async fn topic_counts(&self, from: NaiveDate, to: NaiveDate) -> StoreResult<Vec<TopicCount>> {
        let _r = self.shared.swap.read().await;
        // (day, topic) → messages, distinct senders.
        let mut acc: BTreeMap<(NaiveDate, String), (u64, std::collections::HashSet<Uuid>)> = BTreeMap::new();
        let senders = by_day(self, "analytics_topics", &[], from, to, |k, v| {
            let topic = k.s()?;
            Ok((topic, ValReader(v).u()?, k.u()?))
        })?;
        for ((day, (topic, sender, _message)), n) in senders {
            let e = acc.entry((day, topic)).or_default();
            e.0 += n;
            e.1.insert(sender);
        }
        let mut rows: Vec<TopicCount> =
            acc.into_iter().map(|((day, topic), (messages, users))| TopicCount { day, topic, messages, users: users.len() as u64 }).collect();
        sort_topic_counts(&mut rows);
        Ok(rows)
    }

    async fn receipts_of_user(&self, user: UserId, from: DateTime<Utc>, to: DateTime<Utc>) -> StoreResult<Vec<ReceiptRow>> {
        let _r = self.shared.swap.read().await;
        // As on the other back-ends: a receipt is never earlier than its message, so the key's
        // message-id order bounds the scan and `at` is a filter.
        let prefix = Key::new().u(user.0).done();
        let mut end = Key::new().u(user.0).u(crate::max_v7(to.timestamp_millis())).done();
        end.push(0xff);
        let (lo, hi) = (ceil_ms(&from), ceil_ms(&to));
        let mut rows = Vec::new();
        for (k, v) in self.scan("receipts_by_user", &prefix, None, Some(end), false, usize::MAX)? {
            let mut v = ValReader(&v);
            let at = v.i()?;
            if at < lo || at >= hi {
                continue;
            }
            let mut k = KeyReader(&k);
            k.u()?;
            let (message_id, st, device_id) = (MessageId(k.u()?), status(&k.s()?)?, k.s()?);
            rows.push(ReceiptRow { message_id, sender: UserId(v.u()?), recipient: user, status: st, device_id, at: time(at)?, conversation_id: conv_of(&mut v)? });
        }
        sort_receipts_of_user(&mut rows);
        Ok(rows)
    }
}

#[async_trait]
impl TableAdmin for FjallStore {
    async fn migrate(&self) -> StoreResult<()> {
        // Keyspaces are created at open.
        self.commands.migrate().await
    }

    async fn projection_layout(&self) -> StoreResult<u32> {
        Ok(match self.get("meta", &Key::new().s("projections").done())? {
            Some(v) => u32::try_from(ValReader(&v).i()?).map_err(data)?,
            None => PROJECTION_LAYOUT,
        })
    }

    async fn reset_projections(&self) -> StoreResult<()> {
        let _swapping = self.shared.swap.write().await;
        let inner = self.inner()?;
        tokio::task::spawn_blocking(move || -> StoreResult<()> {
            let _writer = inner.writer.lock().unwrap_or_else(|p| p.into_inner());
            // As in `replace_projections`: a crash in between leaves layout 0 (rebuilt at start).
            inner.set_layout(0)?;
            for table in PROJECTION_TABLES {
                inner.spaces[table].clear().map_err(unavailable)?;
            }
            for table in RETIRED_PROJECTION_TABLES.iter().filter(|t| inner.db.keyspace_exists(t)) {
                let ks = inner.db.keyspace(table, keyspace_options).map_err(unavailable)?;
                inner.db.delete_keyspace(ks).map_err(unavailable)?;
            }
            inner.set_layout(PROJECTION_LAYOUT)
        })
        .await
        .map_err(|e| data(e.to_string()))?
    }

    async fn replace_projections(&self, place: &str) -> StoreResult<()> {
        let from = Path::new(place).join(TABLES_DIR);
        if !from.is_dir() {
            return Err(data(format!("no rebuilt tables at {}", from.display())));
        }
        let src = {
            let from = from.clone();
            tokio::task::spawn_blocking(move || open_inner(&from)).await.map_err(|e| data(e.to_string()))??
        };
        let layout = match src.spaces["meta"].get(Key::new().s("projections").done()).map_err(unavailable)? {
            Some(v) => ValReader(&v).i()?,
            None => 0,
        };
        if layout != i64::from(PROJECTION_LAYOUT) {
            return Err(data(format!("{} holds projection layout {layout}, this version writes {PROJECTION_LAYOUT}", from.display())));
        }
        let _swapping = self.shared.swap.write().await;
        let inner = self.inner()?;
        tokio::task::spawn_blocking(move || -> StoreResult<()> {
            let _writer = inner.writer.lock().unwrap_or_else(|p| p.into_inner());
            // Not one transaction (fjall clears a keyspace on its own): the layout says "rebuild
            // me" until every table is copied, so a crash in between makes the next start
            // rebuild the projections from the log instead of serving half of them.
            inner.set_layout(0)?;
            for table in PROJECTION_TABLES {
                inner.spaces[table].clear().map_err(unavailable)?;
                let mut batch = inner.db.batch();
                for g in src.spaces[table].iter() {
                    let (k, v) = g.into_inner().map_err(unavailable)?;
                    batch.insert(&inner.spaces[table], k, v);
                    if batch.len() >= 10_000 {
                        std::mem::replace(&mut batch, inner.db.batch()).commit().map_err(unavailable)?;
                    }
                }
                batch.commit().map_err(unavailable)?;
            }
            inner.set_layout(PROJECTION_LAYOUT)
        })
        .await
        .map_err(|e| data(e.to_string()))?
    }

    async fn truncate_projections(&self) -> StoreResult<()> {
        let _swapping = self.shared.swap.write().await;
        let inner = self.inner()?;
        tokio::task::spawn_blocking(move || -> StoreResult<()> {
            let _writer = inner.writer.lock().unwrap_or_else(|p| p.into_inner());
            for table in PROJECTION_TABLES {
                inner.spaces[table].clear().map_err(unavailable)?;
            }
            inner.db.persist(PersistMode::SyncAll).map_err(unavailable)
        })
        .await
        .map_err(|e| data(e.to_string()))?
    }

    async fn checksums(&self) -> StoreResult<BTreeMap<String, TableChecksum>> {
        let _r = self.shared.swap.read().await;
        let mut out = BTreeMap::new();
        for table in PROJECTION_TABLES {
            // Keys come in order: the hash is over the rows sorted by their primary key.
            let mut h = Sha256::new();
            let mut rows = 0u64;
            for g in self.inner()?.spaces[table].iter() {
                let (k, v) = g.into_inner().map_err(unavailable)?;
                h.update((k.len() as u32).to_le_bytes());
                h.update(&k);
                h.update((v.len() as u32).to_le_bytes());
                h.update(&v);
                rows += 1;
            }
            out.insert((*table).to_owned(), TableChecksum { rows, sha256: hex::encode(h.finalize()) });
        }
        Ok(out)
    }

    async fn tables_containing(&self, needle: &str) -> StoreResult<BTreeMap<String, u64>> {
        let _r = self.shared.swap.read().await;
        let needle = needle.as_bytes();
        let mut out = BTreeMap::new();
        for table in PROJECTION_TABLES {
            let mut n = 0u64;
            for g in self.inner()?.spaces[table].iter() {
                let (k, v) = g.into_inner().map_err(unavailable)?;
                if [&k[..], &v[..]].iter().any(|b| !needle.is_empty() && b.windows(needle.len()).any(|w| w == needle)) {
                    n += 1;
                }
            }
            if n > 0 {
                out.insert((*table).to_owned(), n);
            }
        }
        Ok(out)
    }

    /// Reads answer, no write failed since the last [`Durable::recover`], and the command side
    /// answers.
    async fn ping(&self) -> bool {
        !self.lost() && self.get("meta", &Key::new().s("projections").done()).is_ok() && self.commands.ping().await
    }
}

#[async_trait]
impl Durable for FjallStore {
    async fn sync(&self) -> StoreResult<()> {
        self.persist().await
    }

    fn lost(&self) -> bool {
        self.shared.failed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Opens the database again: its journal is replayed, and a batch whose write failed is
    /// either whole in it or absent. If the old instance is still held (a read in flight), the
    /// store stays failed and the next attempt tries again.
    fn recover(&self) {
        let mut slot = self.shared.inner.write().unwrap_or_else(|p| p.into_inner());
        // Drop the old instance first: the directory's lock is held until it is gone.
        drop(slot.take());
        match open_inner(&self.shared.path) {
            Ok(inner) => {
                *slot = Some(Arc::new(inner));
                self.shared.failed.store(false, std::sync::atomic::Ordering::SeqCst);
                tracing::info!("tables: opened again after a failed write");
            }
            Err(e) => tracing::warn!(error = %e, "tables: cannot reopen yet; the workers will try again"),
        }
    }

    fn sync_every(&self) -> std::time::Duration {
        SYNC_EVERY
    }
}

/// The path of the fjall tables of a data directory.
pub fn tables_path(dir: &Path) -> PathBuf {
    dir.join(TABLES_DIR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_like_their_columns() {
        let a = Key::new().s("ab").i(-5).done();
        let b = Key::new().s("ab").i(3).done();
        let c = Key::new().s("abc").i(-100).done();
        let d = Key::new().s("a\0b").i(0).done();
        assert!(a < b && b < c, "text then integer, a shorter text first");
        assert!(d < a, "an escaped NUL sorts below every other byte");
        let mut r = KeyReader(&d);
        assert_eq!((r.s().unwrap(), r.i().unwrap()), ("a\0b".to_owned(), 0));
        let (u1, u2) = (Uuid::now_v7(), Uuid::now_v7());
        assert!(Key::new().u(u1).done() < Key::new().u(u2).done(), "v7 ids by time");
        assert_eq!(prefix_end(&[1, 0xff, 0xff]), Some(vec![2]));
        assert_eq!(prefix_end(&[0xff]), None);
    }

    /// Tables of projection layout 4 (a row per message in `analytics_messages`): a reset drops
    /// the retired keyspace, empties the others and records this layout, and the state stays.
    #[tokio::test]
    async fn a_reset_drops_retired_keyspaces() {
        let dir = std::env::temp_dir().join("chat-fjall-tests").join(format!("reset-{}", Uuid::new_v4().simple()));
        let user = UserId(Uuid::now_v7());
        {
            let store = FjallStore::open(&dir).expect("fjall");
            store.set_role(user, "analyst", true).await.expect("role");
            store.apply(vec![Write::ActiveUser { day: NaiveDate::from_ymd_opt(2026, 12, 1).expect("day"), user }]).await.expect("apply");
            let inner = store.inner().expect("inner");
            let old = inner.db.keyspace("analytics_messages", keyspace_options).expect("old keyspace");
            old.insert(b"2026-12-01/text/direct/m", b"").expect("old row");
            inner.set_layout(4).expect("layout 4");
        }
        let store = FjallStore::open(&dir).expect("fjall");
        assert_eq!(store.projection_layout().await.expect("layout"), 4);
        assert!(store.inner().expect("inner").db.keyspace_exists("analytics_messages"));
        store.reset_projections().await.expect("reset");
        assert_eq!(store.projection_layout().await.expect("layout"), PROJECTION_LAYOUT);
        assert!(!store.inner().expect("inner").db.keyspace_exists("analytics_messages"), "the retired keyspace is gone");
        assert_eq!(store.checksums().await.expect("checksums")["analytics_active_users"].rows, 0, "projections emptied");
        assert_eq!(store.roles(user).await.expect("roles"), vec!["analyst".to_owned()], "state kept");
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
mod conversion_tests {
    use super::*;
    use crate::{FanoutStore, InsightStore, SqliteStore};

    fn scratch(tag: &str) -> PathBuf {
        std::env::temp_dir().join("chat-fjall-tests").join(format!("{tag}-{}", Uuid::new_v4().simple()))
    }

    /// A data directory of the release before (tables in `tables.db`): its fan-out state and
    /// roles are in `tables/` after the conversion, its projections are marked for a rebuild, and
    /// `tables.db` is set aside.
    #[tokio::test]
    async fn a_sqlite_data_directory_is_converted() {
        let dir = scratch("convert");
        let conv = ConversationId::group(chat_events::GroupId(Uuid::now_v7()));
        let (user, message) = (UserId(Uuid::now_v7()), MessageId(Uuid::now_v7()));
        let send = SendRecord {
            conversation_id: conv.clone(),
            sender: user,
            client_msg_id: "c-1".into(),
            message_id: message,
            sent_at: time(1_714_521_600_123).expect("time"),
            content_sha256: "ab".into(),
            position: 7,
        };
        let member = MemberInterval { member: user, since: 3, until: Some(9), role: GroupRole::Admin };
        {
            let old = SqliteStore::open(&dir).expect("sqlite");
            old.put_send_records(std::slice::from_ref(&send)).await.expect("send");
            old.put_fanout_member(&conv, &member).await.expect("member");
            old.put_fanout_watermark("t", 2, 41).await.expect("watermark");
            old.set_role(user, "auditor", true).await.expect("role");
            old.sync().await.expect("sync");
        }
        let converted = convert::from_sqlite(&dir).expect("convert").expect("something converted");
        assert_eq!(converted.rows.get("sends"), Some(&1));
        assert!(dir.join("tables").is_dir() && !dir.join("tables.db").exists() && dir.join("tables.db.migrated").exists());
        assert!(convert::from_sqlite(&dir).expect("again").is_none(), "a second open converts nothing");
        let store = FjallStore::open(&dir).expect("fjall");
        assert_eq!(store.send_record(&conv, user, "c-1").await.expect("read"), Some(send));
        assert_eq!(store.fanout_members(&conv).await.expect("read"), vec![member]);
        assert_eq!(store.fanout_watermark("t", 2).await.expect("read"), Some(41));
        assert_eq!(store.roles(user).await.expect("read"), vec!["auditor".to_owned()]);
        assert_eq!(store.projection_layout().await.expect("layout"), 0, "projections rebuilt from the log");
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
