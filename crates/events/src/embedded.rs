//! The embedded back-end of the event log: Kafka's semantics on SQLite, in one process.
//!
//! - One SQLite database (`log.db` in the data directory, WAL journal, `synchronous=FULL`): a
//!   record is acknowledged only after the transaction that holds it is on disk, so neither a
//!   SIGKILL nor a power cut loses an acknowledged event.
//! - The writer of the one SQLite engine ([`crate::sqlite`]) assigns offsets (per topic partition,
//!   from 0, no gaps) and commits appends in groups: every request that arrives while a commit is
//!   running goes into the next transaction, which is how it keeps up under load with one fsync
//!   per group.
//! - Partitions by key with Kafka's own partitioner (murmur2, seed 0x9747b28c, positive modulo),
//!   so a key lands in the same partition number here and in Kafka.
//! - Consumer groups: members of a group in this process share the partitions (round-robin over
//!   sorted partitions; reassigned when a member joins or leaves); each member reads from its
//!   group's committed offset; stored offsets are committed every 500 ms and on `commit`.
//!   Committed offsets live in the same database.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::DateTime;
use rusqlite::{params, Connection, OptionalExtension, Transaction};
use tokio::sync::watch;
use tracing::warn;

use crate::log::{Committer, EventLog, LogConsumer, LogError, LogReader, PartitionLag, Position, Record, TopicSpec};
use crate::sqlite::{Durability, Engine, EngineError, Lane, Options};

pub use crate::sqlite::open_sqlite;

/// Kafka's default partitioner for keyed records.
pub fn partition_for(key: &[u8], partitions: i32) -> i32 {
    let h = murmur2::murmur2(key, murmur2::KAFKA_SEED) & 0x7fff_ffff;
    (h % partitions.max(1) as u32) as i32
}

/// A partition's offsets that are multiples of this are marked (see [`SCHEMA`]).
const MARK_EVERY: i64 = 64;
/// ... and so is a record appended this many rows (of any partition) or more after its
/// partition's last mark: a partition's unmarked records lie within this many rows after its
/// mark before them, which bounds every scan that starts at a mark (at open, reads from an
/// offset), however rarely the partition is written.
const MARK_GAP: i64 = 4_096;
/// `PRAGMA user_version` of a log in layout 3 (records in append order, sparse marks).
const LAYOUT: i64 = 3;

/// What the log's writer keeps in memory (and puts back if a transaction fails): the partition
/// count of every topic, the next offset of every partition, the row of every partition's last
/// mark and the last row appended.
#[derive(Clone, Default)]
struct Counters {
    topics: HashMap<String, i32>,
    ends: HashMap<(String, i32), i64>,
    last_mark: HashMap<(String, i32), i64>,
    max_seq: i64,
}

/// The ends of the partitions and the last row, as of one commit (published together, so that
/// a partition at its end has no record at or below `max_seq` past that end).
#[derive(Clone, Default)]
struct Tail {
    ends: HashMap<(String, i32), i64>,
    max_seq: i64,
}

#[derive(Default)]
struct GroupState {
    generation: u64,
    members: Vec<u64>,
}

struct Inner {
    path: PathBuf,
    /// Held for the life of the log: one process per data directory (the writer's offsets live
    /// in its memory, so a second writer would corrupt them).
    _lock: std::fs::File,
    engine: Arc<Engine<Counters>>,
    /// Partition count per topic.
    topics: Mutex<HashMap<String, i32>>,
    /// Next offset per (topic, partition), the end of each partition, and the last row.
    /// (Shared, not copied: every consumer's poll reads it.)
    tail: Mutex<Arc<Tail>>,
    /// Bumped after every commit of appends; consumers wait on it.
    appended: watch::Sender<u64>,
    groups: Mutex<HashMap<String, GroupState>>,
    next_member: Mutex<u64>,
}

/// The embedded event log.
#[derive(Clone)]
pub struct EmbeddedLog {
    inner: Arc<Inner>,
}

fn fatal(e: impl std::fmt::Display) -> LogError {
    LogError::Fatal(e.to_string())
}

impl From<EngineError> for LogError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::QueueFull => LogError::QueueFull,
            EngineError::Refused(e) | EngineError::Lost(e) => LogError::Fatal(e),
            e @ (EngineError::NotCommitted(_) | EngineError::Stopped) => LogError::Unavailable(e.to_string()),
        }
    }
}

/// Layout 3. The records are a rowid table in append order (`seq`): a commit's records fill the
/// table's last pages one after the other, whatever partitions they go to. There is no index of
/// every record's position: a full index (layout 2) had one entry per record in a B-tree ordered
/// by (topic, partition, offset), so each commit rewrote one index page per partition it touched,
/// most of the bytes the log wrote (docs/benchmarks.md). Instead `record_marks` holds the row of a
/// partition's offset every [`MARK_EVERY`] offsets (and after a gap of [`MARK_GAP`] rows), a
/// page written once per 64 records of a partition; a read from an offset starts at the mark
/// before it and scans in append order, and a consumer scans once for all its partitions, from
/// where it stopped ([`scan_records`]). Offsets of a partition rise with `seq` (one writer), which
/// every scan relies on. Layouts 1 and 2 are converted at open ([`migrate`]).
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS topics (
    topic      TEXT PRIMARY KEY,
    partitions INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS records (
    seq       INTEGER PRIMARY KEY,
    topic     TEXT NOT NULL,
    partition INTEGER NOT NULL,
    offset    INTEGER NOT NULL,
    key       BLOB,
    payload   BLOB NOT NULL,
    ts_ms     INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS record_marks (
    topic     TEXT NOT NULL,
    partition INTEGER NOT NULL,
    offset    INTEGER NOT NULL,
    seq       INTEGER NOT NULL,
    PRIMARY KEY (topic, partition, offset)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS group_offsets (
    grp         TEXT NOT NULL,
    topic       TEXT NOT NULL,
    partition   INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    PRIMARY KEY (grp, topic, partition)
) WITHOUT ROWID;
";

impl EmbeddedLog {
    /// Opens (or creates) the log in `dir/log.db`. `queue` bounds the appends waiting for the
    /// writer; beyond it `append` fails with [`LogError::QueueFull`].
    pub fn open(dir: &Path, queue: usize) -> Result<Self, LogError> {
        std::fs::create_dir_all(dir).map_err(|e| fatal(format!("data directory {}: {e}", dir.display())))?;
        let lock_path = dir.join("log.lock");
        let lock_file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| fatal(format!("{}: {e}", lock_path.display())))?;
        lock_file.try_lock().map_err(|_| {
            fatal(format!("data directory {} is in use by another chat process (stop it first)", dir.display()))
        })?;
        let path = dir.join("log.db");
        let mut conn = open_sqlite(&path, true).map_err(|e| fatal(format!("{}: {e}", path.display())))?;
        migrate(&mut conn).map_err(|e| fatal(format!("{}: converting the records to layout {LAYOUT}: {e}", path.display())))?;
        let topics = read_topics(&conn).map_err(fatal)?;
        let (tail, last_mark) = read_tail(&conn, &topics).map_err(fatal)?;
        let counters = Counters { topics: topics.clone(), ends: tail.ends.clone(), last_mark, max_seq: tail.max_seq };
        // The engine publishes the counters after each commit, through this slot (the log's
        // inner state does not exist yet when the engine starts).
        let published: Arc<Mutex<std::sync::Weak<Inner>>> = Arc::new(Mutex::new(std::sync::Weak::new()));
        let slot = published.clone();
        let mut options = Options::new("log", Durability::Full);
        options.queue = queue;
        options.jobs_per_commit = 1024;
        // A checkpoint runs in the writer after a commit and holds up the next one: once per 8 MiB
        // of WAL, not per 40 MiB as layout 2 did (its stalls doubled a send's p99 at 4,000/s;
        // docs/benchmarks.md), nor per SQLite's 4 MiB.
options.checkpoint_pages = 2_000;
        let engine = Engine::start(path.clone(), conn, counters, options, move |c: &Counters| {
            if let Some(inner) = lock(&slot).upgrade() {
                *lock(&inner.tail) = Arc::new(Tail { ends: c.ends.clone(), max_seq: c.max_seq });
                *lock(&inner.topics) = c.topics.clone();
                inner.appended.send_modify(|v| *v += 1);
            }
        })
        .map_err(fatal)?;
        let inner = Arc::new(Inner {
            path: path.clone(),
            _lock: lock_file,
            engine,
            topics: Mutex::new(topics),
            tail: Mutex::new(Arc::new(tail)),
            appended: watch::channel(0).0,
            groups: Mutex::new(HashMap::new()),
            next_member: Mutex::new(1),
        });
        *lock(&published) = Arc::downgrade(&inner);
        Ok(EmbeddedLog { inner })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }
}

fn user_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
}

fn read_topics(conn: &Connection) -> rusqlite::Result<HashMap<String, i32>> {
    let mut st = conn.prepare("SELECT topic, partitions FROM topics")?;
    let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i32>(1)?)))?;
    rows.collect()
}

/// The row of each partition's last mark.
type Marks = HashMap<(String, i32), i64>;

/// The end of every partition, the last row, and the row of every partition's last mark, read
/// from the marks and a bounded scan: a partition's records after its last mark lie within
/// [`MARK_GAP`] rows of it.
fn read_tail(conn: &Connection, topics: &HashMap<String, i32>) -> rusqlite::Result<(Tail, Marks)> {
    let mut last_mark = HashMap::new();
    let mut ends = HashMap::new();
    let mut from: HashMap<(String, i32), i64> = HashMap::new();
    {
        let mut st = conn.prepare_cached("SELECT offset, seq FROM record_marks WHERE topic = ?1 AND partition = ?2 ORDER BY offset DESC LIMIT 1")?;
        for (t, n) in topics {
            for p in 0..*n {
                let mark: Option<(i64, i64)> = st.query_row(params![t, p], |r| Ok((r.get(0)?, r.get(1)?))).optional()?;
                // Offset 0 is always marked: no mark, no record.
                ends.insert((t.clone(), p), mark.map(|(o, _)| o + 1).unwrap_or(0));
                if let Some((_, seq)) = mark {
                    last_mark.insert((t.clone(), p), seq);
                    from.insert((t.clone(), p), seq);
                }
            }
        }
    }
    // The stretches to scan, merged.
    let mut spans: Vec<(i64, i64)> = from.values().map(|s| (*s, s + MARK_GAP)).collect();
    spans.sort_unstable();
    let mut merged: Vec<(i64, i64)> = Vec::new();
    for (a, b) in spans {
        match merged.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    let mut st = conn.prepare_cached("SELECT seq, topic, partition, offset FROM records WHERE seq >= ?1 AND seq < ?2")?;
    for (a, b) in merged {
        let mut rows = st.query(params![a, b])?;
        while let Some(r) = rows.next()? {
            let (seq, partition, offset): (i64, i32, i64) = (r.get(0)?, r.get(2)?, r.get(3)?);
            let topic = r.get_ref(1)?.as_str().map_err(|e| rusqlite::Error::FromSqlConversionFailure(1, rusqlite::types::Type::Text, Box::new(e)))?;
            let key = (topic.to_owned(), partition);
            if from.get(&key).is_some_and(|f| seq >= *f) {
                let end = ends.entry(key).or_insert(0);
                *end = (*end).max(offset + 1);
            }
        }
    }
    let max_seq: i64 = conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM records", [], |r| r.get(0))?;
    Ok((Tail { ends, max_seq }, last_mark))
}

/// Brings a log of any earlier layout to layout 3, in one transaction (nothing to do on a log in
/// layout 3; a new log gets its tables). Layout 1 (records without a rowid, ordered by position)
/// is copied partition after partition; layout 2 (append order with a full index) loses the
/// index. Both get their marks from one pass over the records in `seq` order, which also checks
/// that each partition's offsets rise with `seq` (a layout-2 log converted from layout 1 by an
/// earlier release was copied by append time, which two racing appends can invert: such a log is
/// copied again, partition after partition). Returns whether there was anything to convert.
pub(crate) fn migrate(conn: &mut Connection) -> rusqlite::Result<bool> {
    let version = user_version(conn)?;
    // An earlier release that opened a log of layout 3 put its index back and appended without
    // marks (it leaves the version as it found it): its marks are written again.
    let index: bool = conn.query_row("SELECT COUNT(*) > 0 FROM sqlite_master WHERE type = 'index' AND name = 'records_position'", [], |r| r.get(0))?;
    if version >= LAYOUT && !index {
        return Ok(false);
    }
    let began = Instant::now();
    let t = conn.transaction()?;
    let sql: Option<String> = t
        .query_row("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'records'", [], |r| r.get(0))
        .optional()?;
    let existed = sql.is_some();
    if existed {
        tracing::info!("converting the event log to layout {LAYOUT} (once; records in append order, sparse marks instead of an index)");
    }
    if sql.is_some_and(|s| s.contains("WITHOUT ROWID")) {
        recopy_by_position(&t, "records")?;
    }
    t.execute_batch("DROP INDEX IF EXISTS records_position;")?;
    t.execute_batch(SCHEMA)?;
    if !write_marks(&t)? {
        tracing::warn!("the event log's records were not in offset order within a partition; copying them again by position");
        t.execute_batch("ALTER TABLE records RENAME TO records_unordered;")?;
        recopy_by_position(&t, "records_unordered")?;
        if !write_marks(&t)? {
            return Err(rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT), Some("the event log's offsets are not consecutive within a partition".into())));
        }
    }
    let records: i64 = t.query_row("SELECT COUNT(*) FROM records", [], |r| r.get(0))?;
    t.pragma_update(None, "user_version", LAYOUT)?;
    t.commit()?;
    if existed {
        tracing::info!(records, seconds = began.elapsed().as_secs_f64(), "event log converted to layout {LAYOUT}");
    }
    Ok(existed)
}

/// Replaces `records` with a copy of `from` (then dropped) in (topic, partition, offset) order.
fn recopy_by_position(t: &Transaction<'_>, from: &str) -> rusqlite::Result<()> {
    let moved = if from == "records" {
        t.execute_batch("ALTER TABLE records RENAME TO records_old;")?;
        "records_old"
    } else {
        from
    };
    t.execute_batch(&format!(
        "CREATE TABLE records (seq INTEGER PRIMARY KEY, topic TEXT NOT NULL, partition INTEGER NOT NULL, offset INTEGER NOT NULL, key BLOB, payload BLOB NOT NULL, ts_ms INTEGER NOT NULL);
         INSERT INTO records (topic, partition, offset, key, payload, ts_ms)
             SELECT topic, partition, offset, key, payload, ts_ms FROM {moved} ORDER BY topic, partition, offset;
         DROP TABLE {moved};"
    ))
}

/// Writes the marks of every record, in one pass in `seq` order. Returns false (and writes
/// nothing) when a partition's offsets do not rise by one from 0 in that order.
fn write_marks(t: &Transaction<'_>) -> rusqlite::Result<bool> {
    t.execute("DELETE FROM record_marks", [])?;
    let mut marks: Vec<(String, i32, i64, i64)> = Vec::new();
    let mut next: HashMap<(String, i32), i64> = HashMap::new();
    let mut last_mark: HashMap<(String, i32), i64> = HashMap::new();
    {
        let mut st = t.prepare("SELECT seq, topic, partition, offset FROM records ORDER BY seq")?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let (seq, topic, partition, offset): (i64, String, i32, i64) = (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?);
            let key = (topic, partition);
            let expected = next.entry(key.clone()).or_insert(0);
            if offset != *expected {
                return Ok(false);
            }
            *expected += 1;
            if is_mark(offset, seq, last_mark.get(&key).copied()) {
                last_mark.insert(key.clone(), seq);
                marks.push((key.0, key.1, offset, seq));
            }
        }
    }
    let mut st = t.prepare("INSERT INTO record_marks (topic, partition, offset, seq) VALUES (?1, ?2, ?3, ?4)")?;
    for (topic, partition, offset, seq) in marks {
        st.execute(params![topic, partition, offset, seq])?;
    }
    Ok(true)
}

/// Whether the record at `offset`, row `seq`, is marked, given its partition's last mark.
fn is_mark(offset: i64, seq: i64, last_mark: Option<i64>) -> bool {
    offset % MARK_EVERY == 0 || last_mark.is_none_or(|m| seq - m >= MARK_GAP)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Appends records in the writer's transaction: the next offset of each record's partition.
fn append_in(t: &Transaction<'_>, c: &mut Counters, records: Vec<(String, String, Vec<u8>)>, now_ms: i64) -> rusqlite::Result<Vec<Result<Position, LogError>>> {
    let mut out = Vec::with_capacity(records.len());
    for (topic, key, payload) in records {
        let Some(n) = c.topics.get(&topic).copied() else {
            out.push(Err(LogError::Fatal(format!("unknown topic {topic}"))));
            continue;
        };
        let partition = partition_for(key.as_bytes(), n);
        let tp = (topic, partition);
        let end = c.ends.entry(tp.clone()).or_insert(0);
        let offset = *end;
        t.prepare_cached("INSERT INTO records (topic, partition, offset, key, payload, ts_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")?
            .execute(params![tp.0, partition, offset, key.as_bytes(), payload, now_ms])?;
        *end += 1;
        let seq = t.last_insert_rowid();
        c.max_seq = seq;
        if is_mark(offset, seq, c.last_mark.get(&tp).copied()) {
            t.prepare_cached("INSERT INTO record_marks (topic, partition, offset, seq) VALUES (?1, ?2, ?3, ?4)")?
                .execute(params![tp.0, partition, offset, seq])?;
            c.last_mark.insert(tp.clone(), seq);
        }
        out.push(Ok(Position { topic: tp.0, partition, offset }));
    }
    Ok(out)
}

/// Commits a group's offsets in the writer's transaction. Never backwards: a member's late
/// commit of an older stored offset (a closed consumer's, committed in the background) must not
/// undo an offset committed with appends ([`EmbeddedCommitter`]), or those appends would be made
/// again.
fn commit_in(t: &Transaction<'_>, group: &str, offsets: &[(String, i32, i64)]) -> rusqlite::Result<()> {
    for (topic, partition, next) in offsets {
        t.prepare_cached(
            "INSERT INTO group_offsets (grp, topic, partition, next_offset) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (grp, topic, partition) DO UPDATE SET next_offset = MAX(next_offset, excluded.next_offset)",
        )?
        .execute(params![group, topic, partition, next])?;
    }
    Ok(())
}

fn committed_in(c: &Connection, group: &str, topic: &str, partition: i32) -> rusqlite::Result<Option<i64>> {
    c.prepare_cached("SELECT next_offset FROM group_offsets WHERE grp = ?1 AND topic = ?2 AND partition = ?3")?
        .query_row(params![group, topic, partition], |r| r.get(0))
        .optional()
}

impl Inner {
    /// A group's committed offset of a partition, as last committed (for lags).
    async fn committed(&self, group: &str, topic: &str, partition: i32) -> Result<i64, LogError> {
        let (group, topic) = (group.to_owned(), topic.to_owned());
        let v: Option<i64> = self
            .engine
            .read(move |c| committed_in(c, &group, &topic, partition))
            .await?;
        Ok(v.unwrap_or(0))
    }

    /// The same, for a new assignment: read on the writer (answered once its transaction
    /// committed), not on a reader, so that an offset a departing member committed with its
    /// appends ([`EmbeddedCommitter`]) in a transaction still open is seen, or this read fails
    /// with it.
    async fn committed_for_assignment(&self, group: &str, topic: &str, partition: i32) -> Result<i64, LogError> {
        let (group, topic) = (group.to_owned(), topic.to_owned());
        let v: Option<i64> = self
            .engine
            .write(Lane::Urgent, move |t, _| committed_in(t, &group, &topic, partition))
            .await?;
        Ok(v.unwrap_or(0))
    }
}

#[async_trait]
impl EventLog for EmbeddedLog {
    async fn append(&self, topic: &str, key: &str, payload: Vec<u8>) -> Result<Position, LogError> {
        let mut out = self.append_batch(vec![(topic.to_owned(), key.to_owned(), payload)]).await;
        out.pop().unwrap_or_else(|| Err(LogError::Fatal("empty append result".into())))
    }

    async fn append_batch(&self, records: Vec<(String, String, Vec<u8>)>) -> Vec<Result<Position, LogError>> {
        let n = records.len();
        let now_ms = chrono::Utc::now().timestamp_millis();
        // Appends shed load when the writer is behind (the gateway answers `overloaded`).
        match self.inner.engine.try_write(Lane::Urgent, move |t, c| append_in(t, c, records, now_ms)).await {
            Ok(out) => out,
            Err(e) => {
                let e = LogError::from(e);
                (0..n).map(|_| Err(clone_err(&e))).collect()
            }
        }
    }

    async fn ensure_topics(&self, specs: &[TopicSpec]) -> Result<(), LogError> {
        let specs: Vec<(String, i32)> = specs.iter().map(|s| (s.name.clone(), s.partitions)).collect();
        self.inner
            .engine
            .write(Lane::Urgent, move |t, c| {
                for (name, partitions) in specs {
                    t.execute("INSERT OR IGNORE INTO topics (topic, partitions) VALUES (?1, ?2)", params![name, partitions])?;
                    let n: i32 = t.query_row("SELECT partitions FROM topics WHERE topic = ?1", params![name], |r| r.get(0))?;
                    c.topics.insert(name.clone(), n);
                    for p in 0..n {
                        c.ends.entry((name.clone(), p)).or_insert(0);
                    }
                }
                Ok(())
            })
            .await
            .map_err(LogError::from)
    }

    async fn subscribe(&self, group: &str, topics: &[String]) -> Result<Box<dyn LogConsumer>, LogError> {
        let member = {
            let mut n = lock(&self.inner.next_member);
            *n += 1;
            *n
        };
        {
            let mut groups = lock(&self.inner.groups);
            let g = groups.entry(group.to_owned()).or_default();
            g.members.push(member);
            g.generation += 1;
        }
        Ok(Box::new(EmbeddedConsumer {
            log: self.inner.clone(),
            group: group.to_owned(),
            member,
            topics: topics.to_vec(),
            generation: 0,
            shared_generation: Arc::new(AtomicU64::new(0)),
            positions: BTreeMap::new(),
            stored: BTreeMap::new(),
            committed: BTreeMap::new(),
            last_commit: Instant::now(),
            appended: self.inner.appended.subscribe(),
            scanned: 0,
        }))
    }

    async fn partition_lags(&self, group: &str, topics: &[String]) -> Result<Vec<PartitionLag>, LogError> {
        let ends = lock(&self.inner.tail).ends.clone();
        let mut lags = Vec::new();
        for ((topic, partition), end) in ends {
            if topics.contains(&topic) {
                let committed = self.inner.committed(group, &topic, partition).await?;
                lags.push(PartitionLag { topic, partition, end, committed });
            }
        }
        Ok(lags)
    }

    async fn read_all(&self, topics: &[String]) -> Result<Box<dyn LogReader>, LogError> {
        inspect::reader(self.inner.path.parent().unwrap_or(Path::new(".")), topics)
    }

    /// Appends are going through (the last commit of `log.db` succeeded).
    async fn ping(&self) -> bool {
        self.inner.engine.probe().await
    }

    async fn delete_group(&self, group: &str) -> Result<(), LogError> {
        if lock(&self.inner.groups).get(group).is_some_and(|g| !g.members.is_empty()) {
            return Err(LogError::Fatal(format!("group {group} has live members")));
        }
        let group = group.to_owned();
        self.inner
            .engine
            .write(Lane::Urgent, move |t, _| t.execute("DELETE FROM group_offsets WHERE grp = ?1", params![group]).map(|_| ()))
            .await
            .map_err(LogError::from)
    }
}

fn clone_err(e: &LogError) -> LogError {
    match e {
        LogError::Unavailable(s) => LogError::Unavailable(s.clone()),
        LogError::QueueFull => LogError::QueueFull,
        LogError::Fatal(s) => LogError::Fatal(s.clone()),
    }
}

/// A member's appends with its offset committed in the same transaction.
struct EmbeddedCommitter {
    log: Arc<Inner>,
    group: String,
    /// The group generation the member's partitions were assigned at.
    generation: Arc<AtomicU64>,
}

#[async_trait]
impl Committer for EmbeddedCommitter {
    async fn append_committing(
        &self,
        records: Vec<(String, String, Vec<u8>)>,
        topic: &str,
        partition: i32,
        next: i64,
    ) -> Option<Vec<Result<Position, LogError>>> {
        let n = records.len();
        let now_ms = chrono::Utc::now().timestamp_millis();
        let (inner, group, topic, mine) = (self.log.clone(), self.group.clone(), topic.to_owned(), self.generation.load(Ordering::SeqCst));
        let done = self
            .log
            .engine
            .try_write(Lane::Urgent, move |t, c| {
                // Checked on the writer, where a new assignment also reads the committed offsets
                // (`Inner::committed_for_assignment`): a member that joined since bumped the generation before
                // that read, so either this commit is seen by it or this member is refused here.
                if lock(&inner.groups).get(&group).map(|g| g.generation) != Some(mine) {
                    return Ok(None);
                }
                // All or nothing: a record that cannot be appended (its topic is unknown, the
                // only failure of one record) fails them all, before any is appended. Appends
                // committed without the offset would be appended again by the retry, and marked
                // exactly once they would reach their readers twice.
                if let Some((topic, _, _)) = records.iter().find(|(topic, _, _)| !c.topics.contains_key(topic)) {
                    let e = LogError::Fatal(format!("unknown topic {topic}"));
                    return Ok(Some((0..n).map(|_| Err(clone_err(&e))).collect()));
                }
                let out = append_in(t, c, records, now_ms)?;
                if out.iter().all(Result::is_ok) {
                    commit_in(t, &group, &[(topic, partition, next)])?;
                }
                Ok(Some(out))
            })
            .await;
        match done {
            Ok(out) => out,
            Err(e) => {
                let e = LogError::from(e);
                Some((0..n).map(|_| Err(clone_err(&e))).collect())
            }
        }
    }

    async fn read(&self, topic: &str, partition: i32, from: i64, end: i64, max: usize) -> Result<Vec<Record>, LogError> {
        let topic = topic.to_owned();
        Ok(self.log.engine.read(move |c| read_range(c, &topic, partition, from, end, max)).await?)
    }
}

struct EmbeddedConsumer {
    log: Arc<Inner>,
    group: String,
    member: u64,
    topics: Vec<String>,
    generation: u64,
    /// The same, for this member's [`EmbeddedCommitter`].
    shared_generation: Arc<AtomicU64>,
    /// Next offset to read, per assigned partition.
    positions: BTreeMap<(String, i32), i64>,
    /// Next offset to commit (stored by the worker after its writes).
    stored: BTreeMap<(String, i32), i64>,
    committed: BTreeMap<(String, i32), i64>,
    last_commit: Instant,
    appended: watch::Receiver<u64>,
    /// Every record of an assigned partition at or past its position is in a row after this one:
    /// the next scan starts here.
    scanned: i64,
}

impl EmbeddedConsumer {
    /// Recomputes this member's partitions after the group changed.
    async fn rebalance(&mut self) -> Result<(), LogError> {
        let (generation, members) = {
            let groups = lock(&self.log.groups);
            let g = groups.get(&self.group).ok_or_else(|| LogError::Fatal("group vanished".into()))?;
            (g.generation, g.members.clone())
        };
        if generation == self.generation {
            return Ok(());
        }
        // Give up what we had: commit what was stored for it first, like Kafka's
        // commit-on-revoke.
        self.commit_stored().await?;
        let topics = lock(&self.log.topics).clone();
        let mut all: Vec<(String, i32)> = Vec::new();
        for t in &self.topics {
            for p in 0..topics.get(t).copied().unwrap_or(0) {
                all.push((t.clone(), p));
            }
        }
        all.sort();
        let mut sorted = members.clone();
        sorted.sort_unstable();
        let me = sorted.iter().position(|m| *m == self.member).unwrap_or(0);
        let mine: Vec<(String, i32)> = all.into_iter().enumerate().filter(|(i, _)| i % sorted.len().max(1) == me).map(|(_, tp)| tp).collect();
        // The ends before the committed offsets: a partition whose committed offset is at or past
        // this end has no record to read up to this tail's last row.
        let tail = Arc::clone(&lock(&self.log.tail));
        let mut positions = BTreeMap::new();
        let mut behind = Vec::new();
        for (t, p) in mine {
            let at = self.log.committed_for_assignment(&self.group, &t, p).await?;
            if at < tail.ends.get(&(t.clone(), p)).copied().unwrap_or(0) {
                behind.push((t.clone(), p, at));
            }
            positions.insert((t, p), at);
        }
        // A partition behind its end is read from the mark at or before its position.
        let from = self.log.engine.read(move |c| {
            let mut from = tail.max_seq;
            for (t, p, at) in &behind {
                from = from.min(mark_before(c, t, *p, *at)?);
            }
            Ok(from)
        });
        self.scanned = from.await?;
        self.positions = positions;
        self.stored.clear();
        self.committed.clear();
        self.generation = generation;
        self.shared_generation.store(generation, Ordering::SeqCst);
        Ok(())
    }

    /// Stored offsets not committed yet.
    fn uncommitted(&self) -> Vec<(String, i32, i64)> {
        self.stored.iter().filter(|(k, v)| self.committed.get(*k) != Some(*v)).map(|((t, p), o)| (t.clone(), *p, *o)).collect()
    }

    async fn commit_stored(&mut self) -> Result<(), LogError> {
        let offsets = self.uncommitted();
        self.last_commit = Instant::now();
        if offsets.is_empty() {
            return Ok(());
        }
        // Commits wait for room in the queue rather than fail: they are small and rare.
        let (group, committing) = (self.group.clone(), offsets.clone());
        self.log.engine.write(Lane::Background, move |t, _| commit_in(t, &group, &committing)).await?;
        for (t, p, o) in offsets {
            self.committed.insert((t, p), o);
        }
        Ok(())
    }

    /// Whether an assigned partition has records past its position; when none has, the scan
    /// can start at the tail's last row.
    fn readable(&mut self) -> bool {
        let tail = Arc::clone(&lock(&self.log.tail));
        let readable = self.positions.iter().any(|(k, pos)| tail.ends.get(k).copied().unwrap_or(0) > *pos);
        if !readable {
            self.scanned = self.scanned.max(tail.max_seq);
        }
        readable
    }
}

/// The row of the mark at or before `offset` of a partition, less one: its records from
/// `offset` on are in rows after it.
fn mark_before(c: &Connection, topic: &str, partition: i32, offset: i64) -> rusqlite::Result<i64> {
    let seq: Option<i64> = c
        .prepare_cached("SELECT seq FROM record_marks WHERE topic = ?1 AND partition = ?2 AND offset <= ?3 ORDER BY offset DESC LIMIT 1")?
        .query_row(params![topic, partition, offset], |r| r.get(0))
        .optional()?;
    Ok(seq.map(|s| s - 1).unwrap_or(0))
}

/// Rows a scan examines at most (records of other topics and partitions, or before a
/// position, are passed over).
const SCAN_ROWS: i64 = 65_536;

/// What one scan found.
struct Scan {
    records: Vec<Record>,
    /// The last row examined (every wanted record up to it is in `records`).
    last: i64,
    /// The scan reached the last row (not its row budget or `max`).
    at_end: bool,
}

/// Reads, in append order, the records in rows after `after` of the partitions in `positions`
/// from their positions on: up to `max` records, up to [`SCAN_ROWS`] rows examined, up to row
/// `until` if given.
fn scan_records(c: &Connection, after: i64, until: Option<i64>, positions: &[(String, i32, i64)], max: usize) -> rusqlite::Result<Scan> {
    let mut st = c.prepare_cached("SELECT seq, topic, partition, offset, key, payload, ts_ms FROM records WHERE seq > ?1 AND seq <= ?2 ORDER BY seq LIMIT ?3")?;
    let mut rows = st.query(params![after, until.unwrap_or(i64::MAX), SCAN_ROWS])?;
    let mut out = Scan { records: Vec::new(), last: after, at_end: true };
    let mut examined = 0;
    while let Some(r) = rows.next()? {
        examined += 1;
        out.last = r.get(0)?;
        let (partition, offset): (i32, i64) = (r.get(2)?, r.get(3)?);
        let topic = r.get_ref(1)?.as_str().map_err(|e| rusqlite::Error::FromSqlConversionFailure(1, rusqlite::types::Type::Text, Box::new(e)))?;
        if positions.iter().any(|(t, p, pos)| *p == partition && offset >= *pos && t == topic) {
            out.records.push(Record {
                topic: topic.to_owned(),
                partition,
                offset,
                key: r.get(4)?,
                payload: r.get(5)?,
                timestamp: DateTime::from_timestamp_millis(r.get(6)?),
            });
            if out.records.len() >= max {
                out.at_end = false;
                return Ok(out);
            }
        }
    }
    out.at_end = examined < SCAN_ROWS;
    Ok(out)
}

#[async_trait]
impl LogConsumer for EmbeddedConsumer {
    async fn poll_batch(&mut self, max: usize, wait: Duration) -> Result<Vec<Record>, LogError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            self.rebalance().await?;
            if self.last_commit.elapsed() >= Duration::from_millis(500) {
                if let Err(e) = self.commit_stored().await {
                    warn!(error = %e, "offset auto-commit failed");
                }
            }
            self.appended.borrow_and_update();
            if self.readable() {
                let positions: Vec<(String, i32, i64)> = self.positions.iter().map(|((t, p), o)| (t.clone(), *p, *o)).collect();
                let after = self.scanned;
                let scan = self.log.engine.read(move |c| scan_records(c, after, None, &positions, max.max(1))).await?;
                self.scanned = scan.last;
                for r in &scan.records {
                    if let Some(pos) = self.positions.get_mut(&(r.topic.clone(), r.partition)) {
                        *pos = (*pos).max(r.offset + 1);
                    }
                }
                if !scan.records.is_empty() {
                    return Ok(scan.records);
                }
                if !scan.at_end {
                    // Rows of other partitions passed over; go on scanning, within the wait.
                    if tokio::time::Instant::now() >= deadline {
                        return Ok(Vec::new());
                    }
                    continue;
                }
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Ok(Vec::new());
            }
            // Wake on the next append (or a group change, checked on the next turn).
            let _ = tokio::time::timeout(left.min(Duration::from_millis(250)), self.appended.changed()).await;
        }
    }

    fn store(&mut self, topic: &str, partition: i32, offset: i64) -> Result<(), LogError> {
        let key = (topic.to_owned(), partition);
        if !self.positions.contains_key(&key) {
            return Err(LogError::Unavailable(format!("{topic}/{partition} is not assigned to this member")));
        }
        self.stored.insert(key, offset + 1);
        Ok(())
    }

    async fn commit(&mut self) -> Result<(), LogError> {
        self.commit_stored().await
    }

    fn committer(&self) -> Option<Arc<dyn Committer>> {
        Some(Arc::new(EmbeddedCommitter { log: self.log.clone(), group: self.group.clone(), generation: self.shared_generation.clone() }))
    }
}

impl Drop for EmbeddedConsumer {
    fn drop(&mut self) {
        // Like Kafka's consumer close: commit what was stored (best effort, not awaited).
        let offsets = self.uncommitted();
        if !offsets.is_empty() {
            let (engine, group) = (self.log.engine.clone(), self.group.clone());
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    if let Err(e) = engine.write(Lane::Background, move |t, _| commit_in(t, &group, &offsets)).await {
                        warn!(error = %e, "committing offsets of a closed consumer failed");
                    }
                });
            }
        }
        let mut groups = lock(&self.log.groups);
        if let Some(g) = groups.get_mut(&self.group) {
            g.members.retain(|m| *m != self.member);
            g.generation += 1;
        }
    }
}

/// Reads topics in one pass in append order, in pages, on a read-only connection, up to the
/// last row when it was made.
struct SnapshotReader {
    dir: PathBuf,
    /// Every partition of the topics, from offset 0.
    parts: Vec<(String, i32, i64)>,
    /// The last row read, and the last row of the snapshot.
    after: i64,
    until: i64,
    /// The layout when the snapshot was taken: a conversion renumbers the rows.
    layout: i64,
    total: i64,
    read: i64,
}

#[async_trait]
impl LogReader for SnapshotReader {
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Record>, LogError> {
        if self.after >= self.until {
            return Ok(Vec::new());
        }
        let (dir, parts, mut after, until, max, layout) = (self.dir.clone(), self.parts.clone(), self.after, self.until, max.max(1), self.layout);
        let (page, last) = tokio::task::spawn_blocking(move || -> Result<(Vec<Record>, i64), LogError> {
            let c = open_sqlite(&dir.join("log.db"), false).map_err(fatal)?;
            if user_version(&c).map_err(fatal)? != layout {
                return Err(LogError::Fatal("the event log was converted to a new layout while it was read (by `chat run` starting); run the command again".into()));
            }
            let mut page = Vec::new();
            while page.len() < max && after < until {
                let scan = scan_records(&c, after, Some(until), &parts, max - page.len()).map_err(fatal)?;
                after = if scan.at_end && scan.records.len() < max - page.len() { until } else { scan.last };
                page.extend(scan.records);
            }
            Ok((page, after))
        })
        .await
        .map_err(fatal)??;
        self.after = last;
        self.read += page.len() as i64;
        Ok(page)
    }

    fn progress(&self) -> (i64, i64) {
        (self.read, self.total)
    }
}

/// Records `from <= offset < end` of one partition, at most `max`: from the mark at or before
/// `from`, in append order.
fn read_range(c: &Connection, topic: &str, partition: i32, from: i64, end: i64, max: usize) -> rusqlite::Result<Vec<Record>> {
    let mut after = mark_before(c, topic, partition, from)?;
    let (mut out, mut pos) = (Vec::new(), from);
    while out.len() < max && pos < end {
        let scan = scan_records(c, after, None, &[(topic.to_owned(), partition, pos)], max - out.len())?;
        after = scan.last;
        for r in scan.records {
            if r.offset >= end {
                return Ok(out);
            }
            pos = r.offset + 1;
            out.push(r);
        }
        if scan.at_end {
            break;
        }
    }
    Ok(out)
}

/// Read-only views of a data directory, usable while another process owns it (tests, tools).
pub mod inspect {
    use super::*;

    fn conn(dir: &Path) -> Result<Connection, LogError> {
        open_sqlite(&dir.join("log.db"), false).map_err(fatal)
    }

    /// The end of every partition (the marks of layout 3; a scan of an older layout's records,
    /// which `chat run` converts when it opens them).
    fn ends(c: &Connection) -> Result<(HashMap<String, i32>, Tail), LogError> {
        let topics = read_topics(c).map_err(fatal)?;
        if user_version(c).map_err(fatal)? >= LAYOUT {
            let (tail, _) = read_tail(c, &topics).map_err(fatal)?;
            return Ok((topics, tail));
        }
        let mut tail = Tail::default();
        let mut st = c.prepare("SELECT topic, partition, MAX(offset) + 1 FROM records GROUP BY topic, partition").map_err(fatal)?;
        let rows = st.query_map([], |r| Ok(((r.get::<_, String>(0)?, r.get::<_, i32>(1)?), r.get::<_, i64>(2)?))).map_err(fatal)?;
        for r in rows {
            let (k, end) = r.map_err(fatal)?;
            tail.ends.insert(k, end);
        }
        Ok((topics, tail))
    }

    /// Records still to be consumed by a group on some topics (end − committed, summed).
    pub fn group_lag(dir: &Path, group: &str, topics: &[String]) -> Result<i64, LogError> {
        let c = conn(dir)?;
        let (_, tail) = ends(&c)?;
        let mut lag = 0;
        let mut st = c.prepare("SELECT next_offset FROM group_offsets WHERE grp = ?1 AND topic = ?2 AND partition = ?3").map_err(fatal)?;
        for ((t, p), end) in &tail.ends {
            if topics.contains(t) {
                let done: Option<i64> = st.query_row(params![group, t, p], |r| r.get(0)).optional().map_err(fatal)?;
                lag += (end - done.unwrap_or(0)).max(0);
            }
        }
        Ok(lag)
    }

    /// A one-pass reader over a snapshot of topics, in append order (read-only: works while
    /// `chat run` owns the directory). A log of layout 1 (before 2026-12-06) is read once
    /// `chat run` has converted it.
    pub fn reader(dir: &Path, topics: &[String]) -> Result<Box<dyn LogReader>, LogError> {
        let c = conn(dir)?;
        let sql: Option<String> = c
            .query_row("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'records'", [], |r| r.get(0))
            .optional()
            .map_err(fatal)?;
        if sql.as_deref().is_some_and(|s| s.contains("WITHOUT ROWID")) {
            return Err(LogError::Fatal(format!(
                "{}: the event log is in layout 1; start `chat run` on this data directory once to convert it",
                dir.join("log.db").display()
            )));
        }
        // The last row and the ends from one snapshot, so that `progress` ends at its total.
        c.execute_batch("BEGIN").map_err(fatal)?;
        let until: i64 = if sql.is_some() { c.query_row("SELECT COALESCE(MAX(seq), 0) FROM records", [], |r| r.get(0)).map_err(fatal)? } else { 0 };
        let (counts, tail) = ends(&c)?;
        let mut parts = Vec::new();
        for t in topics {
            for p in 0..counts.get(t).copied().unwrap_or(0) {
                parts.push((t.clone(), p, 0));
            }
        }
        let total = tail.ends.iter().filter(|((t, _), _)| topics.contains(t)).map(|(_, e)| *e).sum();
        let layout = user_version(&c).map_err(fatal)?;
        Ok(Box::new(SnapshotReader { dir: dir.to_path_buf(), parts, after: 0, until, layout, total, read: 0 }))
    }

    /// Every record payload of a topic, in (partition, offset) order.
    pub fn records(dir: &Path, topic: &str) -> Result<Vec<Vec<u8>>, LogError> {
        let c = conn(dir)?;
        let mut st = c.prepare("SELECT payload FROM records WHERE topic = ?1 ORDER BY partition, offset").map_err(fatal)?;
        let rows = st.query_map(params![topic], |r| r.get::<_, Vec<u8>>(0)).map_err(fatal)?;
        rows.collect::<rusqlite::Result<_>>().map_err(fatal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_match_kafkas_murmur2() {
        // Values computed by Kafka's own Utils.murmur2 (toPositive(murmur2(key)) % n), as
        // published in its test suite: murmur2("21") = -973932308.
        let h = murmur2::murmur2(b"21", murmur2::KAFKA_SEED) as i32;
        assert_eq!(h, -973932308);
        assert_eq!(partition_for(b"21", 1), 0);
    }

    /// A log written with layout 1 (records without a rowid, ordered by position) opens with
    /// every record, offset, end and group offset as before, in the append-ordered layout, and
    /// appends continue each partition's offsets.
    #[tokio::test]
    async fn a_layout_1_log_is_converted_at_open() {
        let dir = std::env::temp_dir().join(format!("chat-log-layout1-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        {
            let c = Connection::open(dir.join("log.db")).unwrap();
            c.execute_batch(
                "CREATE TABLE topics (topic TEXT PRIMARY KEY, partitions INTEGER NOT NULL);
                 CREATE TABLE records (topic TEXT NOT NULL, partition INTEGER NOT NULL, offset INTEGER NOT NULL, key BLOB, payload BLOB NOT NULL, ts_ms INTEGER NOT NULL, PRIMARY KEY (topic, partition, offset)) WITHOUT ROWID;
                 CREATE TABLE group_offsets (grp TEXT NOT NULL, topic TEXT NOT NULL, partition INTEGER NOT NULL, next_offset INTEGER NOT NULL, PRIMARY KEY (grp, topic, partition)) WITHOUT ROWID;
                 INSERT INTO topics VALUES ('t', 2);
                 INSERT INTO group_offsets VALUES ('g', 't', 1, 2);",
            )
            .unwrap();
            // Partition 1's records were appended over time, interleaved with partition 0's.
            for (p, o, ts) in [(1, 0, 10), (0, 0, 11), (1, 1, 12), (1, 2, 12), (0, 1, 13)] {
                c.execute("INSERT INTO records VALUES ('t', ?1, ?2, ?3, ?4, ?5)", params![p, o, b"k".to_vec(), format!("{p}/{o}").into_bytes(), ts])
                    .unwrap();
            }
        }
        let log = EmbeddedLog::open(&dir, 16).unwrap();
        let sql: String = Connection::open(dir.join("log.db"))
            .unwrap()
            .query_row("SELECT sql FROM sqlite_master WHERE name = 'records'", [], |r| r.get(0))
            .unwrap();
        assert!(sql.contains("seq INTEGER PRIMARY KEY"), "{sql}");
        let consumer = log.subscribe("g", &["t".to_owned()]).await.unwrap();
        let committer = consumer.committer().unwrap();
        let read = |p: i32| {
            let committer = committer.clone();
            async move {
                committer.read("t", p, 0, 10, 10).await.unwrap().into_iter().map(|r| (r.offset, String::from_utf8(r.payload).unwrap())).collect::<Vec<_>>()
            }
        };
        assert_eq!(read(0).await, vec![(0, "0/0".to_owned()), (1, "0/1".to_owned())]);
        assert_eq!(read(1).await, vec![(0, "1/0".to_owned()), (1, "1/1".to_owned()), (2, "1/2".to_owned())]);
        let lags = log.partition_lags("g", &["t".to_owned()]).await.unwrap();
        let p1 = lags.iter().find(|l| l.partition == 1).unwrap();
        assert_eq!((p1.end, p1.committed), (3, 2));
        // "k" goes to one partition; its next append continues that partition's offsets.
        let at = log.append("t", "k", b"new".to_vec()).await.unwrap();
        assert_eq!(at.offset, if at.partition == 0 { 2 } else { 3 });
        drop(committer);
        drop(consumer);
        drop(log);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A log written with layout 2 (append order, a full index), converted from layout 1 by an
    /// earlier release in append-time order that two racing appends inverted, opens in layout 3:
    /// no index, marks written, each partition's offsets rising with `seq`, every record read.
    #[tokio::test]
    async fn a_layout_2_log_is_converted_at_open_and_offsets_put_in_order() {
        let dir = std::env::temp_dir().join(format!("chat-log-layout2-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        {
            let c = Connection::open(dir.join("log.db")).unwrap();
            c.execute_batch(
                "CREATE TABLE topics (topic TEXT PRIMARY KEY, partitions INTEGER NOT NULL);
                 CREATE TABLE records (seq INTEGER PRIMARY KEY, topic TEXT NOT NULL, partition INTEGER NOT NULL, offset INTEGER NOT NULL, key BLOB, payload BLOB NOT NULL, ts_ms INTEGER NOT NULL);
                 CREATE UNIQUE INDEX records_position ON records (topic, partition, offset);
                 CREATE TABLE group_offsets (grp TEXT NOT NULL, topic TEXT NOT NULL, partition INTEGER NOT NULL, next_offset INTEGER NOT NULL, PRIMARY KEY (grp, topic, partition)) WITHOUT ROWID;
                 INSERT INTO topics VALUES ('t', 2);",
            )
            .unwrap();
            // Partition 0's offsets 1 and 2 are in the wrong order.
            for (p, o) in [(0, 0), (1, 0), (0, 2), (0, 1), (1, 1)] {
                c.execute("INSERT INTO records (topic, partition, offset, key, payload, ts_ms) VALUES ('t', ?1, ?2, NULL, ?3, 1)", params![p, o, format!("{p}/{o}").into_bytes()])
                    .unwrap();
            }
        }
        let log = EmbeddedLog::open(&dir, 16).unwrap();
        {
            let c = Connection::open(dir.join("log.db")).unwrap();
            let index: i64 = c.query_row("SELECT COUNT(*) FROM sqlite_master WHERE name = 'records_position'", [], |r| r.get(0)).unwrap();
            assert_eq!(index, 0);
            let version: i64 = c.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
            assert_eq!(version, LAYOUT);
            let marks: i64 = c.query_row("SELECT COUNT(*) FROM record_marks WHERE offset = 0", [], |r| r.get(0)).unwrap();
            assert_eq!(marks, 2);
        }
        let mut consumer = log.subscribe("g", &["t".to_owned()]).await.unwrap();
        let mut got = Vec::new();
        while got.len() < 5 {
            let batch = consumer.poll_batch(10, Duration::from_secs(5)).await.unwrap();
            assert!(!batch.is_empty(), "read {got:?}");
            got.extend(batch.into_iter().map(|r| String::from_utf8(r.payload).unwrap()));
        }
        let p0: Vec<&String> = got.iter().filter(|s| s.starts_with("0/")).collect();
        assert_eq!(p0, ["0/0", "0/1", "0/2"]);
        let lags = log.partition_lags("g", &["t".to_owned()]).await.unwrap();
        assert_eq!(lags.iter().map(|l| l.end).sum::<i64>(), 5);
        drop(consumer);
        drop(log);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A partition written rarely, between thousands of another partition's records: its end
    /// after a reopen, a read of a range of it and a consumer starting behind on it find its
    /// records (the gap marks bound each scan), and a group reads every record once, in order.
    #[tokio::test]
    async fn a_rarely_written_partition_is_found_after_a_reopen() {
        let dir = std::env::temp_dir().join(format!("chat-log-quiet-{}", uuid::Uuid::new_v4()));
        let topic = "t".to_owned();
        let topics = std::slice::from_ref(&topic);
        let key_of = |p: i32| (0..).map(|i| format!("k{i}")).find(|k| partition_for(k.as_bytes(), 2) == p).unwrap();
        let (busy, quiet) = (key_of(0), key_of(1));
        let batch = |key: &str, n: usize, tag: &str| -> Vec<(String, String, Vec<u8>)> {
            (0..n).map(|i| (topic.clone(), key.to_owned(), format!("{tag}{i}").into_bytes())).collect()
        };
        {
            let log = EmbeddedLog::open(&dir, 16).unwrap();
            log.ensure_topics(&[TopicSpec { name: topic.clone(), partitions: 2, replication: 1 }]).await.unwrap();
            log.append_batch(batch(&quiet, 3, "q")).await.into_iter().for_each(|r| assert!(r.is_ok()));
            for _ in 0..9 {
                log.append_batch(batch(&busy, 1_000, "b")).await.into_iter().for_each(|r| assert!(r.is_ok()));
            }
            log.append_batch(batch(&quiet, 2, "r")).await.into_iter().for_each(|r| assert!(r.is_ok()));
            for _ in 0..5 {
                log.append_batch(batch(&busy, 1_000, "c")).await.into_iter().for_each(|r| assert!(r.is_ok()));
            }
            let mut g = log.subscribe("half", topics).await.unwrap();
            let _ = g.poll_batch(1, Duration::from_secs(5)).await.unwrap();
            g.store(&topic, 1, 3).unwrap();
            g.store(&topic, 0, 13_990).unwrap();
            g.commit().await.unwrap();
        }
        let log = EmbeddedLog::open(&dir, 16).unwrap();
        let lags = log.partition_lags("half", topics).await.unwrap();
        let end = |p: i32| lags.iter().find(|l| l.partition == p).unwrap().end;
        assert_eq!((end(0), end(1)), (14_000, 5));
        let mut g = log.subscribe("half", topics).await.unwrap();
        let committer = g.committer().unwrap();
        let range: Vec<i64> = committer.read(&topic, 1, 2, 5, 10).await.unwrap().iter().map(|r| r.offset).collect();
        assert_eq!(range, [2, 3, 4]);
        let mut rest = Vec::new();
        while rest.len() < 10 {
            let b = g.poll_batch(100, Duration::from_secs(5)).await.unwrap();
            assert!(!b.is_empty(), "read {rest:?}");
            rest.extend(b.into_iter().map(|r| (r.partition, r.offset)));
        }
        let quiet_read: Vec<i64> = rest.iter().filter(|(p, _)| *p == 1).map(|(_, o)| *o).collect();
        assert_eq!(quiet_read, [4]);
        assert_eq!(rest.len(), 10);
        let mut all = log.subscribe("all", topics).await.unwrap();
        let mut seen: HashMap<i32, i64> = HashMap::new();
        let mut n = 0;
        while n < 14_005 {
            let b = all.poll_batch(1_000, Duration::from_secs(5)).await.unwrap();
            assert!(!b.is_empty(), "read {n}");
            for r in b {
                let next = seen.entry(r.partition).or_insert(0);
                assert_eq!(r.offset, *next, "partition {}", r.partition);
                *next += 1;
                n += 1;
            }
        }
        let mut snapshot = log.read_all(topics).await.unwrap();
        let mut read = 0;
        loop {
            let b = snapshot.next_batch(4_000).await.unwrap();
            if b.is_empty() {
                break;
            }
            read += b.len();
        }
        assert_eq!((read, snapshot.progress()), (14_005, (14_005, 14_005)));
        drop((g, all, committer, log));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A log of layout 3 opened by the release before it (which put its index back and
    /// appended without marks) gets its marks written again: a record appended then, far after
    /// its partition's last mark, still counts in the partition's end.
    #[tokio::test]
    async fn marks_are_written_again_after_an_older_release_appended() {
        let dir = std::env::temp_dir().join(format!("chat-log-downgrade-{}", uuid::Uuid::new_v4()));
        let topic = "t".to_owned();
        let key_of = |p: i32| (0..).map(|i| format!("k{i}")).find(|k| partition_for(k.as_bytes(), 2) == p).unwrap();
        {
            let log = EmbeddedLog::open(&dir, 16).unwrap();
            log.ensure_topics(&[TopicSpec { name: topic.clone(), partitions: 2, replication: 1 }]).await.unwrap();
            let records = (0..3).map(|i| (topic.clone(), key_of(1), format!("q{i}").into_bytes())).collect();
            log.append_batch(records).await.into_iter().for_each(|r| assert!(r.is_ok()));
        }
        {
            // What the older release does: its schema's index, appends without marks.
            let c = Connection::open(dir.join("log.db")).unwrap();
            c.execute_batch("CREATE UNIQUE INDEX records_position ON records (topic, partition, offset)").unwrap();
            let mut st = c.prepare("INSERT INTO records (topic, partition, offset, key, payload, ts_ms) VALUES ('t', ?1, ?2, NULL, x'00', 1)").unwrap();
            for o in 0..(MARK_GAP + 10) {
                st.execute(params![0, o]).unwrap();
            }
            st.execute(params![1, 3]).unwrap();
        }
        let log = EmbeddedLog::open(&dir, 16).unwrap();
        let lags = log.partition_lags("g", std::slice::from_ref(&topic)).await.unwrap();
        let end = |p: i32| lags.iter().find(|l| l.partition == p).unwrap().end;
        assert_eq!((end(0), end(1)), (MARK_GAP + 10, 4));
        let index: i64 = Connection::open(dir.join("log.db"))
            .unwrap()
            .query_row("SELECT COUNT(*) FROM sqlite_master WHERE name = 'records_position'", [], |r| r.get(0))
            .unwrap();
        assert_eq!(index, 0);
        let at = log.append(&topic, &key_of(1), b"next".to_vec()).await.unwrap();
        assert_eq!(at.offset, 4);
        drop(log);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
