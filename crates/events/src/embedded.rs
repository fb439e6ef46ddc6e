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

/// What the log's writer keeps in memory (and puts back if a transaction fails): the partition
/// count of every topic, and the next offset of every partition.
#[derive(Clone, Default)]
struct Counters {
    topics: HashMap<String, i32>,
    ends: HashMap<(String, i32), i64>,
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
    /// Next offset per (topic, partition): the end of each partition.
    ends: Mutex<HashMap<(String, i32), i64>>,
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

/// The records are a rowid table in append order (`seq`), so a commit's records fill its last
/// pages one after the other, and a small index finds a partition's offsets. (Layout 1 kept them
/// in a table ordered by (topic, partition, offset): every commit rewrote the tail page of each
/// partition it appended to, about four times the bytes written per record; see
/// docs/benchmarks.md. [`migrate_records`] converts it.)
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
CREATE UNIQUE INDEX IF NOT EXISTS records_position ON records (topic, partition, offset);
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
        migrate_records(&mut conn).map_err(|e| fatal(format!("{}: converting the records to the append-ordered layout: {e}", path.display())))?;
        conn.execute_batch(SCHEMA).map_err(fatal)?;
        let mut topics = HashMap::new();
        {
            let mut st = conn.prepare("SELECT topic, partitions FROM topics").map_err(fatal)?;
            let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i32>(1)?))).map_err(fatal)?;
            for r in rows {
                let (t, p) = r.map_err(fatal)?;
                topics.insert(t, p);
            }
        }
        let mut ends = HashMap::new();
        for (t, n) in &topics {
            for p in 0..*n {
                let end: Option<i64> = conn
                    .query_row("SELECT MAX(offset) FROM records WHERE topic = ?1 AND partition = ?2", params![t, p], |r| r.get(0))
                    .map_err(fatal)?;
                ends.insert((t.clone(), p), end.map(|e| e + 1).unwrap_or(0));
            }
        }
        let counters = Counters { topics: topics.clone(), ends: ends.clone() };
        // The engine publishes the counters after each commit, through this slot (the log's
        // inner state does not exist yet when the engine starts).
        let published: Arc<Mutex<std::sync::Weak<Inner>>> = Arc::new(Mutex::new(std::sync::Weak::new()));
        let slot = published.clone();
        let mut options = Options::new("log", Durability::Full);
        options.queue = queue;
        options.jobs_per_commit = 1024;
        // The tail page of each partition is rewritten by many commits: checkpointed once per
        // 40 MiB of WAL instead of once per 4 MiB.
        options.checkpoint_pages = 10_000;
        let engine = Engine::start(path.clone(), conn, counters, options, move |c: &Counters| {
            if let Some(inner) = lock(&slot).upgrade() {
                *lock(&inner.ends) = c.ends.clone();
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
            ends: Mutex::new(ends),
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

/// Converts a log written with layout 1 (records ordered by (topic, partition, offset), without
/// a rowid) to the append-ordered layout, in one transaction: the records are copied in the
/// order they were appended (by time, then position; a partition's offsets keep their order).
/// Returns whether there was anything to convert.
pub(crate) fn migrate_records(conn: &mut Connection) -> rusqlite::Result<bool> {
    let sql: Option<String> = conn
        .query_row("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'records'", [], |r| r.get(0))
        .optional()?;
    if !sql.is_some_and(|s| s.contains("WITHOUT ROWID")) {
        return Ok(false);
    }
    tracing::info!("converting the event log to the append-ordered layout (once; the file keeps its size, freed pages are reused)");
    let began = Instant::now();
    let t = conn.transaction()?;
    t.execute_batch(
        "ALTER TABLE records RENAME TO records_layout1;
         CREATE TABLE records (seq INTEGER PRIMARY KEY, topic TEXT NOT NULL, partition INTEGER NOT NULL, offset INTEGER NOT NULL, key BLOB, payload BLOB NOT NULL, ts_ms INTEGER NOT NULL);
         INSERT INTO records (topic, partition, offset, key, payload, ts_ms)
             SELECT topic, partition, offset, key, payload, ts_ms FROM records_layout1 ORDER BY ts_ms, topic, partition, offset;
         DROP TABLE records_layout1;",
    )?;
    let records: i64 = t.query_row("SELECT COUNT(*) FROM records", [], |r| r.get(0))?;
    t.commit()?;
    tracing::info!(records, seconds = began.elapsed().as_secs_f64(), "event log converted to the append-ordered layout");
    Ok(true)
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
        let end = c.ends.entry((topic.clone(), partition)).or_insert(0);
        let offset = *end;
        t.prepare_cached("INSERT INTO records (topic, partition, offset, key, payload, ts_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)")?
            .execute(params![topic, partition, offset, key.as_bytes(), payload, now_ms])?;
        *end += 1;
        out.push(Ok(Position { topic, partition, offset }));
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
            cursor: 0,
        }))
    }

    async fn partition_lags(&self, group: &str, topics: &[String]) -> Result<Vec<PartitionLag>, LogError> {
        let ends = lock(&self.inner.ends).clone();
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
    /// Round-robin start among partitions, so no partition starves.
    cursor: usize,
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
        let mut positions = BTreeMap::new();
        for (t, p) in mine {
            let at = self.log.committed_for_assignment(&self.group, &t, p).await?;
            positions.insert((t, p), at);
        }
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

    /// The assigned partitions that have records past our position.
    fn readable(&self) -> Vec<((String, i32), i64)> {
        let ends = lock(&self.log.ends).clone();
        let mut parts: Vec<((String, i32), i64)> = self
            .positions
            .iter()
            .filter(|(k, pos)| ends.get(*k).copied().unwrap_or(0) > **pos)
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        if !parts.is_empty() {
            let n = parts.len();
            parts.rotate_left(self.cursor % n);
        }
        parts
    }
}

/// Reads up to `max` records from the given partitions, starting at the given offsets.
fn read_records(conn: &Connection, parts: &[((String, i32), i64)], max: usize) -> rusqlite::Result<Vec<Record>> {
    let mut out = Vec::new();
    let per = (max / parts.len().max(1)).max(1);
    let mut st = conn.prepare_cached(
        "SELECT offset, key, payload, ts_ms FROM records WHERE topic = ?1 AND partition = ?2 AND offset >= ?3 ORDER BY offset LIMIT ?4",
    )?;
    for ((topic, partition), pos) in parts {
        if out.len() >= max {
            break;
        }
        let rows = st.query_map(params![topic, partition, pos, per.min(max - out.len()) as i64], |r| {
            Ok(Record {
                topic: topic.clone(),
                partition: *partition,
                offset: r.get(0)?,
                key: r.get(1)?,
                payload: r.get(2)?,
                timestamp: DateTime::from_timestamp_millis(r.get(3)?),
            })
        })?;
        for r in rows {
            out.push(r?);
        }
    }
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
            let parts = self.readable();
            if !parts.is_empty() {
                let batch = self.log.engine.read(move |c| read_records(c, &parts, max)).await?;
                self.cursor = self.cursor.wrapping_add(1);
                for r in &batch {
                    // Only advance partitions still assigned (a rebalance may have run meanwhile).
                    if let Some(pos) = self.positions.get_mut(&(r.topic.clone(), r.partition)) {
                        *pos = (*pos).max(r.offset + 1);
                    }
                }
                if !batch.is_empty() {
                    return Ok(batch);
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

/// Reads partitions one after the other, in pages, on a read-only connection.
struct SnapshotReader {
    dir: PathBuf,
    /// (topic, partition, next offset, end) still to read.
    parts: Vec<(String, i32, i64, i64)>,
    total: i64,
    read: i64,
}

#[async_trait]
impl LogReader for SnapshotReader {
    async fn next_batch(&mut self, max: usize) -> Result<Vec<Record>, LogError> {
        let Some((topic, partition, from, end)) = self.parts.first().cloned() else { return Ok(Vec::new()) };
        let dir = self.dir.clone();
        let page = tokio::task::spawn_blocking(move || {
            read_records_from(&dir, &topic, partition, from, end, max)
        })
        .await
        .map_err(fatal)??;
        let next = page.last().map(|r| r.offset + 1).unwrap_or(end);
        self.read += page.len() as i64;
        if next >= end {
            self.parts.remove(0);
        } else if let Some(p) = self.parts.first_mut() {
            p.2 = next;
        }
        if page.is_empty() && !self.parts.is_empty() {
            return Box::pin(self.next_batch(max)).await;
        }
        Ok(page)
    }

    fn progress(&self) -> (i64, i64) {
        (self.read, self.total)
    }
}

fn read_records_from(dir: &Path, topic: &str, partition: i32, from: i64, end: i64, max: usize) -> Result<Vec<Record>, LogError> {
    let c = open_sqlite(&dir.join("log.db"), false).map_err(fatal)?;
    read_range(&c, topic, partition, from, end, max).map_err(fatal)
}

/// Records `from <= offset < end` of one partition, at most `max`.
fn read_range(c: &Connection, topic: &str, partition: i32, from: i64, end: i64, max: usize) -> rusqlite::Result<Vec<Record>> {
    let mut st = c.prepare_cached(
        "SELECT offset, key, payload, ts_ms FROM records WHERE topic = ?1 AND partition = ?2 AND offset >= ?3 AND offset < ?4 ORDER BY offset LIMIT ?5",
    )?;
    let rows = st.query_map(params![topic, partition, from, end, max as i64], |r| {
        Ok(Record {
            topic: topic.to_owned(),
            partition,
            offset: r.get(0)?,
            key: r.get(1)?,
            payload: r.get(2)?,
            timestamp: DateTime::from_timestamp_millis(r.get(3)?),
        })
    })?;
    rows.collect()
}

/// Read-only views of a data directory, usable while another process owns it (tests, tools).
pub mod inspect {
    use super::*;

    fn conn(dir: &Path) -> Result<Connection, LogError> {
        open_sqlite(&dir.join("log.db"), false).map_err(fatal)
    }

    /// Records still to be consumed by a group on some topics (end − committed, summed).
    pub fn group_lag(dir: &Path, group: &str, topics: &[String]) -> Result<i64, LogError> {
        let c = conn(dir)?;
        let mut lag = 0;
        for t in topics {
            let mut st = c
                .prepare(
                    "SELECT r.partition, MAX(r.offset) + 1, COALESCE((SELECT next_offset FROM group_offsets g WHERE g.grp = ?1 AND g.topic = r.topic AND g.partition = r.partition), 0)
                     FROM records r WHERE r.topic = ?2 GROUP BY r.partition",
                )
                .map_err(fatal)?;
            let rows = st.query_map(params![group, t], |r| Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))).map_err(fatal)?;
            for r in rows {
                let (end, done) = r.map_err(fatal)?;
                lag += (end - done).max(0);
            }
        }
        Ok(lag)
    }

    /// A one-pass reader over a snapshot of topics (read-only: works while `chat run` owns the
    /// directory).
    pub fn reader(dir: &Path, topics: &[String]) -> Result<Box<dyn LogReader>, LogError> {
        let c = conn(dir)?;
        let mut parts = Vec::new();
        let mut total = 0;
        for t in topics {
            let mut st = c.prepare("SELECT partition, MIN(offset), MAX(offset) FROM records WHERE topic = ?1 GROUP BY partition ORDER BY partition").map_err(fatal)?;
            let rows = st
                .query_map(params![t], |r| Ok((r.get::<_, i32>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)))
                .map_err(fatal)?;
            for r in rows {
                let (p, lo, hi) = r.map_err(fatal)?;
                parts.push((t.clone(), p, lo, hi + 1));
                total += hi + 1 - lo;
            }
        }
        Ok(Box::new(SnapshotReader { dir: dir.to_path_buf(), parts, total, read: 0 }))
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
}
